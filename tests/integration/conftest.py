"""Integration fixtures: the `tiny` family (built once per session, tests/conftest.py) published to the local Hub."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

_counter = itertools.count()


@pytest.fixture
def published(local_hub, tiny: Path) -> dict[str, str]:
    """The tiny family published to the local Hub under a fresh org; member -> repo id."""
    org = f"tiny{next(_counter)}"
    out = {}
    for member in ("base", "sentiment3", "polarity", "sentiment3-hot"):
        repo = f"{org}/{member}"
        local_hub.upload_folder(repo, tiny / member)
        out[member] = repo
    return out
