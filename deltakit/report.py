"""Self-contained HTML reports: figures (plotly.js inlined once, so the file works offline) and tables."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from deltakit.fileio import write_atomically

__all__ = ["write_html_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f5f5f5; }
.note { color: #555; font-size: 0.9em; }
"""


def write_html_report(path: str | Path, *, title: str, sections: Sequence[tuple[str, object]],
                      intro: str = "") -> Path:
    """Write one HTML file.

    Args:
        path: the output file.
        title: page title.
        sections: (heading, content) pairs; content is a plotly Figure, a DataFrame, or text (escaped, one
            paragraph per blank-line-separated block).
        intro: text under the title.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>", _paragraphs(intro)]
    first_figure = True
    for i, (heading, content) in enumerate(sections):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, go.Figure):
            parts.append(content.to_html(full_html=False, include_plotlyjs=True if first_figure else False,
                                         div_id=f"fig{i}"))
            first_figure = False
        elif isinstance(content, pd.DataFrame):
            parts.append(content.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0))
        else:
            parts.append(_paragraphs(str(content)))
    parts.append("</body></html>")
    text = "\n".join(parts)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))  # a reload never sees half a file
    return path


def _paragraphs(text: str) -> str:
    return "".join(f"<p class='note'>{html.escape(block.strip())}</p>" for block in text.split("\n\n") if block.strip())
