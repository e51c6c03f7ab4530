"""Fixtures for the widget tests: ``bert_family`` (tests/conftest.py) published to the local Hub.

The models are real ``transformers`` checkpoints (a bare ``BertModel`` base, ``BertForSequenceClassification``
fine-tunes with keys under ``bert.`` and a new head), so the widgets go through the same resolve / pairing /
statistics / sweep code as with the embedded families, without building a family.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

_orgs = itertools.count()


def _card(front: dict) -> str:
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n# test model\n"


@pytest.fixture
def hub_family(local_hub, bert_family: dict[str, Path]) -> dict[str, str]:
    """``bert_family`` published to the local Hub under a fresh org, with fine-tune cards naming that base.

    Also publishes an adapter of the base (relation ``adapter``), which a fine-tune search must not return.
    Returns member -> repo id (``base``, ``ft1``, ``ft2``, ``adapter``).
    """
    org = f"widgets{next(_orgs)}"
    repos = {m: f"{org}/{m}" for m in ("base", "ft1", "ft2", "adapter")}
    for member in ("base", "ft1", "ft2"):
        folder = bert_family[member]
        files = {p.name: p for p in folder.iterdir() if p.is_file() and p.name != "README.md"}
        front = {"license": "apache-2.0"} if member == "base" else {
            "base_model": repos["base"], "base_model_relation": "finetune"}
        files["README.md"] = _card(front).encode()
        local_hub.commit(repos[member], files)
    local_hub.commit(repos["adapter"], {"README.md": _card({"base_model": repos["base"],
                                                            "base_model_relation": "adapter"}).encode(),
                                        "adapter_config.json": b"{}"})
    return repos
