"""deltakit.hubsearch: fine-tunes of a base through the local Hub, and the embedded fallback offline."""

from __future__ import annotations

import pytest

from deltakit.families import FAMILIES
from deltakit.hubsearch import COLUMNS, embedded_finetunes, find_finetunes, finetune_filter


def test_hub_search_lists_finetunes_only(hub_family, hf_home):
    found = find_finetunes(hub_family["base"] + "@main")  # the revision is ignored: the tree links repos
    assert found.source == "hub" and found.base == hub_family["base"]
    assert sorted(found.refs) == sorted([hub_family["ft1"], hub_family["ft2"]])  # the adapter is left out
    assert tuple(found.finetunes.columns) == COLUMNS
    assert set(found.finetunes["source"]) == {"hub"}
    assert finetune_filter(hub_family["base"]) in found.note and "2 fine-tune(s)" in found.note


def test_hub_search_without_finetunes_is_an_empty_answer(hub_family, hf_home):
    found = find_finetunes(hub_family["ft1"])
    assert found.source == "hub" and found.refs == [] and "no fine-tunes" in found.note


def test_offline_lists_the_embedded_families(hub_family, hub_offline):
    found = find_finetunes(hub_family["base"])
    assert found.source == "embedded" and "HF_HUB_OFFLINE" in found.note
    expected = [f"family:{f.name}/{s.name}" for f in FAMILIES.values() for s in f.finetunes]
    assert found.refs == expected


def _connect_error() -> Exception:
    """What huggingface_hub 2.x lets through when nothing listens at the endpoint (httpx2's, not an OSError)."""
    httpx2 = pytest.importorskip("httpx2")
    return httpx2.ConnectError("[Errno 111] Connection refused")


@pytest.mark.parametrize("make_error", [lambda: ConnectionRefusedError(111, "Connection refused"), _connect_error])
def test_unreachable_hub_falls_back_to_the_embedded_families(monkeypatch, hf_home, make_error):
    from huggingface_hub import HfApi

    error = make_error()

    def refuse(self, **kwargs):
        raise error

    monkeypatch.setattr(HfApi, "list_models", refuse)
    found = find_finetunes("org/some-base")
    assert found.source == "embedded" and "could not be reached" in found.note
    assert type(error).__name__ in found.note
    assert found.refs == list(embedded_finetunes()["ref"])


def test_family_reference_lists_that_family_without_network(hub_offline):
    found = find_finetunes("family:tiny/base")
    assert found.source == "embedded"
    assert found.refs == [f"family:tiny/{s.name}" for s in FAMILIES["tiny"].finetunes]
    assert list(found.finetunes["task"]) == [s.task for s in FAMILIES["tiny"].finetunes]


@pytest.mark.parametrize(("base", "kwargs", "error", "match"), [
    ("./checkpoints/base", {}, ValueError, "local path"),
    ("org/a/b", {}, ValueError, "not a model reference"),
    ("org/base", {"limit": 0}, ValueError, "outside 1..1000"),
    ("org/base", {"sort": "stars"}, ValueError, "not a Hub sort order"),
    ("family:nope/base", {}, KeyError, "unknown family 'nope'"),
])
def test_bad_requests_name_the_value(base, kwargs, error, match):
    with pytest.raises(error, match=match):
        find_finetunes(base, **kwargs)
