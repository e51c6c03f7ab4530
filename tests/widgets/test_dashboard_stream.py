"""StatsDashboard's stream checkbox: off by default; ticked, Hub models are read by range requests, not downloaded."""

from __future__ import annotations

from deltakit.widgets import StatsDashboard


def _weights_in_cache(home) -> list:
    return [p for p in (home / "hub").rglob("*") if p.name.endswith(".safetensors")]


def test_dashboard_stream_checkbox(hub_family, hf_home):
    d = StatsDashboard(hub_family["base"], [hub_family["ft1"]])
    assert d.stream.value is False and "no download" in d.stream.description
    d.spectral.value = False
    d.stream.value = True
    d.compute(blocking=True)
    assert d.status.value.startswith("done"), d.status.value
    assert d.stats.meta["streamed"] == [hub_family["base"], hub_family["ft1"]]
    assert _weights_in_cache(hf_home) == []
    streamed = d.stats.tensors
    d.stream.value = False
    d.compute(blocking=True)
    assert d.stats.meta["streamed"] == [] and _weights_in_cache(hf_home)
    assert d.stats.tensors.equals(streamed)
