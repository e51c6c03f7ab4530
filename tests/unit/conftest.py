"""Fixtures for unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthetic import bert_like, write_checkpoint


@pytest.fixture
def pair_dirs(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    """A base (bare keys) and a fine-tune (``bert.`` keys + a classifier head) on disk."""
    base = bert_like(0)
    ft = bert_like(1, prefix="bert.", head=True, scale=1e-3, base=base)
    b = write_checkpoint(tmp_path / "base", base, card={"model_id": "org/base"})
    f = write_checkpoint(tmp_path / "ft", ft, card={"base_model": "org/base", "base_model_relation": "finetune"})
    return b, f, base, ft
