"""StatsDashboard's spectral checkbox: on by default (spectral columns, the rank figure), off draws a placeholder."""

from __future__ import annotations

from deltakit.widgets import StatsDashboard


def test_dashboard_spectral_checkbox(bert_family, tmp_path):
    d = StatsDashboard(str(bert_family["base"]), [str(bert_family["ft1"]), str(bert_family["ft2"])],
                       stats_dir=str(tmp_path / "s"))
    assert d.spectral.value is True
    d.compute(blocking=True)
    assert d.status.value.startswith("done"), d.status.value
    assert "stable_rank" in d.stats.tensors and "stable_rank" in d.table.value
    names = {t.name for t in d.ranks.data}
    assert "attn_q" in names and any(n.startswith("low rank") for n in names)
    assert "ft1" in d.ranks.layout.title.text and d.ranks.layout.yaxis2.type == "log"
    d.model.value = "ft2"
    assert "ft2" in d.ranks.layout.title.text
    loaded = StatsDashboard(stats_dir=str(tmp_path / "s"))
    loaded.load(blocking=True)
    assert "ft1" in loaded.ranks.layout.title.text  # spectral columns survive save / load
    d.spectral.value = False
    d.compute(blocking=True)
    assert "stable_rank" not in d.stats.tensors and "not computed" in d.ranks.layout.title.text
