"""The widgets on a decoder family: the sweep panel scores generation by exact match, the dashboard streams it."""

from __future__ import annotations

from deltakit.widgets import StatsDashboard, SweepPanel


def test_sweep_panel_on_a_decoder_offers_its_lm_metrics(tiny_llm):
    panel = SweepPanel("family:tiny-llm/base", "family:tiny-llm/arith", methods=["dare"], rates=(0.5, 0.99),
                       seeds=(0,), eval_limit=20)
    panel.run(blocking=True)
    assert panel.status.value.startswith("done: 4 new point(s)"), panel.status.value
    assert panel.output.outputs == ()
    assert sorted(panel.metric.options) == ["exact_match", "extracted"]
    assert panel.figure.layout.yaxis.title.text == panel.metric.value


def test_stats_dashboard_on_a_decoder_family(tiny_llm):
    d = StatsDashboard("family:tiny-llm/base", ["family:tiny-llm/arith", "family:tiny-llm/arith-hot"])
    d.compute(blocking=True)
    assert d.stats is not None and set(d.stats.tensors["model"]) == {"tiny-llm/arith", "tiny-llm/arith-hot"}
    assert {"attn_q", "ffn_in", "embedding"} <= set(d.stats.tensors["kind"])
    assert d.stats.tensors["stable_rank"].notna().any()  # the spectral view is on by default
