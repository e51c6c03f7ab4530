"""Integration fixtures: the `tiny` family built once per session, and published to the local Hub on demand."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

_counter = itertools.count()


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DELTAKIT_HOME holding the built `tiny` family (built once per test session, in seconds)."""
    from deltakit.families import build_family

    home = tmp_path_factory.mktemp("deltakit-home")
    build_family("tiny", home=home, progress=False)
    return home


@pytest.fixture
def tiny(tiny_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DELTAKIT_HOME points at the built tiny family for this test; returns the family folder."""
    monkeypatch.setenv("DELTAKIT_HOME", str(tiny_home))
    return tiny_home / "families" / "tiny"


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
