"""Hub-style cards: a README.md whose YAML front matter carries the machine-readable facts.

The Hugging Face Hub reads model and dataset metadata from YAML front matter at the top of README.md
(between two ``---`` lines), followed by free markdown. deltakit writes every family member and every family
dataset this way, so the same folder is both a local checkpoint and a repository that can be pushed to a Hub
unchanged, and so the facts a user needs (``base_model``, the recipe, the measured metrics) are read back from
one place by :func:`read_model_card`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deltakit.refs import CARD_FILE, read_card_front_matter

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


def read_model_card(folder: Path) -> dict[str, Any]:
    """Read back the front matter of a card that :func:`write_card` wrote.

    Unlike :func:`deltakit.refs.read_card_front_matter` (any model folder; {} when there is no card), a missing
    card is an error here: every folder deltakit builds has one.

    Args:
        folder: A repository folder holding a README.md.

    Returns:
        The front matter as a dict; empty if the card has none.

    Raises:
        FileNotFoundError: If the folder has no README.md.
    """
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No model card at {path}: a folder deltakit builds always has one; rebuild it.")
    return read_card_front_matter(folder)
