"""Fixtures for the widget tests: a tiny BERT base and two fine-tunes on disk (built in about a second).

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


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders ``base``, ``ft1`` (small deltas) and ``ft2`` (larger deltas); member -> folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("bert-family")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    base = BertModel(cfg)
    base.save_pretrained(root / "base")
    (root / "base" / "README.md").write_text(_card({"model_id": "test/base"}))
    out = {"base": root / "base"}
    for i, (name, scale) in enumerate((("ft1", 0.01), ("ft2", 0.05))):
        ft = BertForSequenceClassification(cfg)
        ft.bert.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in ft.bert.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        ft.save_pretrained(root / name)
        (root / name / "README.md").write_text(_card({"base_model": "test/base", "base_model_relation": "finetune"}))
        out[name] = root / name
    return out


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
