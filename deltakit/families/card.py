"""Hub-style cards: a README.md whose YAML front matter carries the machine-readable facts.

The Hugging Face Hub reads model and dataset metadata from YAML front matter at the top of README.md
(between two ``---`` lines), followed by free markdown. deltakit writes every family member and every family
dataset this way, so the same folder is both a local checkpoint and a repository that can be pushed to a Hub
unchanged, and so the facts a user needs (``base_model``, the recipe, the measured metrics) are read back from
one place by :func:`read_card`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"
_FENCE = "---"


def write_card(folder: Path, front_matter: dict[str, Any], body: str) -> Path:
    """Write ``folder/README.md`` with YAML front matter followed by a markdown body.

    Keys keep their insertion order so the card reads top-down like the Hub's own cards.

    Args:
        folder: The repository folder; must exist.
        front_matter: Plain YAML-serialisable data (str, int, float, bool, None, lists, dicts).
        body: Markdown text placed after the front matter.

    Returns:
        The path of the written card.
    """
    text = yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True, width=120)
    path = Path(folder) / CARD_FILE
    path.write_text(f"{_FENCE}\n{text}{_FENCE}\n\n{body.strip()}\n", encoding="utf-8")
    return path


def read_card(folder: Path) -> dict[str, Any]:
    """Read the YAML front matter of ``folder/README.md``.

    Args:
        folder: A repository folder holding a README.md.

    Returns:
        The front matter as a dict; empty if the card has none.

    Raises:
        FileNotFoundError: If the folder has no README.md.
    """
    text = (Path(folder) / CARD_FILE).read_text(encoding="utf-8")
    lines = text.splitlines()
    if not lines or lines[0].strip() != _FENCE:
        return {}
    for end, line in enumerate(lines[1:], start=1):
        if line.strip() == _FENCE:
            data = yaml.safe_load("\n".join(lines[1:end]))
            return data if isinstance(data, dict) else {}
    return {}
