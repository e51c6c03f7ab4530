"""The widgets without a browser: set values, click, wait for the worker, assert on widget state and figure data.

Outside a kernel, ipywidgets talks to a dummy comm, so widgets, observers, ``Button.click()`` and
``go.FigureWidget.batch_update()`` behave as in a notebook; what a browser renders is tests/browser's job.
"""

from __future__ import annotations

import math
import threading

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from deltakit.methods import available_methods, get_method
from deltakit.sweep import ResultStore
from deltakit.widgets import ModelPicker, StatsDashboard, SweepPanel
from deltakit.widgets._common import BackgroundJob
from deltakit.widgets.sweep import method_options

RATES = (0.2, 0.6, 0.9)


class Evaluator:
    """A fast stand-in for a classification evaluator: the mean class-0 probability on fixed random input ids.

    It records what the panel showed when each point started, so tests can see the curve grow point by point.
    """

    def __init__(self, panel_getter=None, fail_from: int | None = None, cancel_after: int | None = None) -> None:
        self.ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
        self.calls = 0
        self.shown: list[int] = []
        self.panel_getter = panel_getter
        self.fail_from = fail_from
        self.cancel_after = cancel_after
        self.fingerprint = "test-evaluator"

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        if self.panel_getter is not None:
            self.shown.append(len(self.panel_getter().results))
            if self.cancel_after is not None and self.calls == self.cancel_after:
                self.panel_getter().cancel_button.click()
        if self.fail_from is not None and self.calls >= self.fail_from:
            raise RuntimeError("evaluation broke on purpose")
        with torch.no_grad():
            probs = model(input_ids=self.ids).logits.softmax(-1)
        return {"accuracy": float(probs[:, 0].mean()), "margin": float((probs[:, 0] - probs[:, 1]).abs().mean())}


def _curve_points(fig: go.FigureWidget) -> dict[str, list[float]]:
    """Method label -> x values of its mean line (interval bands excluded)."""
    return {t.name: list(t.x) for t in fig.data if t.mode == "lines+markers"}


# --- ModelPicker ----------------------------------------------------------------------------------------------
def test_picker_fields_spell_the_references():
    p = ModelPicker("org/base@v1", "family:tiny/sentiment3")
    assert (p.base_id.value, p.base_revision.value) == ("org/base", "v1")
    assert (p.fine_tune_id.value, p.fine_tune_revision.value) == ("family:tiny/sentiment3", "")
    assert (p.base_ref, p.fine_tune_ref) == ("org/base@v1", "family:tiny/sentiment3")
    p.base_revision.value = " "
    p.fine_tune_id.value = "org/ft"
    p.fine_tune_revision.value = "abc123"
    assert (p.base_ref, p.fine_tune_ref) == ("org/base", "org/ft@abc123")


def test_picker_finds_finetunes_on_the_hub_and_picks_one(hub_family, hf_home):
    p = ModelPicker(hub_family["base"])
    p.find_button.click()
    p.job.join()
    assert sorted(v for _, v in p.candidates.options) == sorted([hub_family["ft1"], hub_family["ft2"]])
    assert "2 fine-tune(s)" in p.search_note.value and p.base_error.value == ""
    p.candidates.value = hub_family["ft2"]
    assert p.fine_tune_id.value == hub_family["ft2"] and p.fine_tune_ref == hub_family["ft2"]


def test_picker_offline_lists_the_embedded_families(hub_offline):
    p = ModelPicker("org/anything")
    p.find(blocking=True)
    values = [v for _, v in p.candidates.options]
    assert "family:tiny/sentiment3" in values and "family:minilm-tweets/sentiment3" in values
    assert "HF_HUB_OFFLINE" in p.search_note.value


def test_picker_find_without_a_base_says_so_in_place():
    p = ModelPicker()
    p.find_button.click()
    assert "Type a base model first" in p.base_error.value and p.candidates.options == ()


def test_picker_resolves_a_pinned_pair_and_reports_the_pairing(local_hub, hub_family, hf_home):
    first = local_hub.commit(hub_family["ft1"], {"notes.txt": b"a later commit"})
    p = ModelPicker(hub_family["base"], f"{hub_family['ft1']}@{first}")
    p.resolve_button.click()
    p.job.join()
    assert p.base_error.value == p.fine_tune_error.value == ""
    assert p.fine_tune_snapshot.commit == first and p.base_snapshot.kind == "hub"
    assert "paired tensors" in p.status.value and "classifier.weight" in p.status.value  # the new head
    assert p.pairing.prunable()
    p.fine_tune_revision.value = "main"  # an edit makes the resolution stale
    assert p.fine_tune_snapshot is None


def test_picker_shows_resolution_errors_under_each_field(hub_family, hf_home):
    p = ModelPicker("nobody/nothing", f"{hub_family['ft1']}@no-such-branch")
    p.resolve(blocking=True)
    assert "not found" in p.base_error.value and "nobody/nothing" in p.base_error.value
    assert "revision" in p.fine_tune_error.value and "no-such-branch" in p.fine_tune_error.value
    assert p.base_snapshot is None and "not resolved" in p.status.value
    assert len(p.output.outputs) == 2 and all(o["name"] == "stderr" for o in p.output.outputs)


def test_picker_shows_a_pairing_error_under_the_finetune(tmp_path, bert_family):
    other = tmp_path / "gpt"
    other.mkdir()
    for f in bert_family["ft1"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    p = ModelPicker(str(bert_family["base"]), str(other))
    p.resolve(blocking=True)
    assert p.base_error.value == "" and "PairingError" in p.fine_tune_error.value
    assert "does not pair" in p.status.value


# --- StatsDashboard -------------------------------------------------------------------------------------------
def test_dashboard_computes_saves_and_draws(bert_family, tmp_path):
    out = tmp_path / "stats"
    d = StatsDashboard(str(bert_family["base"]), [str(bert_family["ft1"]), str(bert_family["ft2"])],
                       stats_dir=str(out))
    d.compute_button.click()
    d.job.join()
    assert d.progress.value == d.progress.max > 0, d.status.value
    assert d.status.value.startswith("done") and (out / "tensors.parquet").exists()
    assert list(d.model.options) == ["ft1", "ft2"] and d.model.value == "ft1"
    assert "bert.encoder.layer.0.attention.self.query.weight" in d.table.value
    assert {t.name for t in d.histogram.data} == {"ft1", "ft2"}
    heat = d.heatmap.data[0]
    assert "attn_q" in heat.x and "ft1" in d.heatmap.layout.title.text
    sim = d.similarity.data[0]
    assert list(sim.x) == ["ft1", "ft2"] and sim.z[0][0] == 1.0 and -1 <= sim.z[0][1] <= 1


def test_dashboard_selectors_filter_table_and_figures(bert_family):
    d = StatsDashboard(str(bert_family["base"]), [str(bert_family["ft1"]), str(bert_family["ft2"])])
    d.compute(blocking=True)
    tensors = d.stats.tensors
    d.kind.value = "attn_q"
    assert "attention.self.query" in d.table.value and "intermediate.dense" not in d.table.value
    assert "attn_q" in d.histogram.layout.title.text
    d.layer.value = 1
    expected = tensors[(tensors["model"] == "ft1") & (tensors["kind"] == "attn_q") & (tensors["layer"] == 1)]
    assert f"{len(expected)} tensor(s) of ft1, kind attn_q, layer 1" in d.table.value
    assert "layer.1.attention" in d.table.value and "layer.0.attention" not in d.table.value
    d.model.value = "ft2"
    assert "ft2" in d.heatmap.layout.title.text and "of ft2" in d.table.value
    # One figure object throughout: the widgets were redrawn in place.
    assert isinstance(d.heatmap, go.FigureWidget)


def test_dashboard_loads_saved_statistics_and_reports_errors(bert_family, tmp_path):
    first = StatsDashboard(str(bert_family["base"]), [str(bert_family["ft1"])], stats_dir=str(tmp_path / "s"))
    first.compute(blocking=True)
    d = StatsDashboard(stats_dir=str(tmp_path / "s"))
    d.load_button.click()
    d.job.join()
    assert d.status.value.startswith("loaded")
    pd.testing.assert_frame_equal(d.stats.tensors, first.stats.tensors)
    assert "needs two or more" in d.similarity.layout.title.text  # a single fine-tune
    d.stats_dir.value = str(tmp_path / "missing")
    d.load(blocking=True)
    assert d.status.value.startswith("failed") and d.output.outputs[-1]["name"] == "stderr"
    assert not d.load_button.disabled and not d.compute_button.disabled


def test_dashboard_shows_given_stats_and_refuses_bad_models(bert_family, tmp_path):
    first = StatsDashboard(str(bert_family["base"]), [str(bert_family["ft1"])])
    first.compute(blocking=True)
    d = StatsDashboard(stats=first.stats)
    assert d.model.value == "ft1" and len(d.histogram.data) == 1
    bad = StatsDashboard(str(bert_family["base"]), [str(tmp_path / "nowhere")])
    bad.compute(blocking=True)
    assert bad.status.value.startswith("failed") and "does not exist" in bad.output.outputs[0]["text"]


def test_dashboard_and_panel_follow_a_picker():
    p = ModelPicker("family:tiny/base", "family:tiny/polarity")
    d = StatsDashboard(picker=p)
    s = SweepPanel(picker=p)
    assert d.base.value == s.base.value == "family:tiny/base"
    p.fine_tune_id.value = "family:tiny/sentiment3"
    assert d.fine_tunes.value == s.fine_tune.value == "family:tiny/sentiment3"


def test_dashboard_uses_given_and_picked_snapshots_without_resolving_again(bert_family, monkeypatch):
    from deltakit.sources import resolve
    from deltakit.widgets import _common

    base, ft1 = resolve(str(bert_family["base"])), resolve(str(bert_family["ft1"]))
    p = ModelPicker(str(bert_family["base"]), str(bert_family["ft2"]))
    p.resolve(blocking=True)
    resolved_again: list[str] = []
    monkeypatch.setattr(_common, "resolve", resolved_again.append)
    given = StatsDashboard(base, [ft1])
    assert (given.base.value, given.fine_tunes.value) == (base.ref, ft1.ref)
    given.compute(blocking=True)
    picked = StatsDashboard(picker=p)
    picked.compute(blocking=True)
    assert resolved_again == []
    assert given.status.value.startswith("done") and picked.status.value.startswith("done"), picked.status.value
    assert list(given.model.options) == ["ft1"] and list(picked.model.options) == ["ft2"]


# --- SweepPanel -----------------------------------------------------------------------------------------------
def test_panel_methods_come_from_the_registry():
    names = [n for _, n in method_options()]
    for name in available_methods():
        required = [k for k, p in get_method(name).params.items() if p.default is p.empty]
        assert (name in names) == (not required), name
    assert {"darex_q_labelled", "darex_q_unlabelled", "darex_q_analytic"} <= set(names)
    panel = SweepPanel(methods=["dare", "darex_q:q=0.5"])
    assert panel.methods.value == ("dare",) and panel.method_specs.value == "darex_q:q=0.5"


def test_panel_runs_and_the_curve_grows_point_by_point(bert_family):
    panel = None
    ev = Evaluator(lambda: panel)
    panel = SweepPanel(str(bert_family["base"]), str(bert_family["ft1"]), methods=["dare", "magnitude"],
                       rates=RATES, seeds=(0, 1), evaluator=ev)
    panel.metric.value = "accuracy"
    panel.run_button.click()
    assert panel.run_button.disabled and not panel.cancel_button.disabled
    panel.job.join()
    total = 2 + len(RATES) * 2 + len(RATES)  # references + dare (2 seeds) + magnitude (deterministic: 1 seed)
    assert panel.status.value.startswith("done: 11 new point(s)"), panel.status.value
    assert panel.progress.value == panel.progress.max == total == ev.calls
    # Each point was on the panel before the next one started: 2 metric rows per finished point.
    assert ev.shown == [2 * i for i in range(total)]
    curves = _curve_points(panel.figure)
    assert sorted(curves) == ["dare", "magnitude"] and sorted(curves["dare"]) == list(RATES)
    refs = [t.name for t in panel.figure.data if t.name.startswith(("finetuned", "base"))]
    assert len(refs) == 2  # finetuned and base reference lines, not one per redraw
    assert sorted(panel.metric.options) == ["accuracy", "margin"]
    assert not panel.run_button.disabled and panel.cancel_button.disabled and panel.output.outputs == ()
    panel.metric.value = "margin"
    assert panel.figure.layout.yaxis.title.text == "margin"
    panel.log_rate.value = True
    assert panel.figure.layout.xaxis.type == "log"
    panel.interval.value = "minmax"  # the band redraws as the seeds' range
    band = next(t for t in panel.figure.data if t.name == "dare interval")
    per_rate = panel.results[lambda d: (d["method"] == "dare") & (d["metric"] == "margin")]
    assert max(band.y) == pytest.approx(per_rate["value"].max())
    assert min(band.y) == pytest.approx(per_rate["value"].min())


def test_panel_cancel_stops_between_points(bert_family):
    panel = None
    ev = Evaluator(lambda: panel, cancel_after=4)
    panel = SweepPanel(str(bert_family["base"]), str(bert_family["ft1"]), methods=["dare"], rates=RATES,
                       seeds=(0, 1), evaluator=ev)
    panel.run(blocking=True)
    assert panel.status.value.startswith("cancelled: 4 new point(s)"), panel.status.value
    assert ev.calls == 4 and panel.progress.value == 4 < panel.progress.max
    assert not panel.run_button.disabled


def test_panel_resumes_from_a_results_store(bert_family, tmp_path):
    out = tmp_path / "sweep"
    first = SweepPanel(str(bert_family["base"]), str(bert_family["ft2"]), methods=["dare"], rates=RATES,
                       seeds=(0,), evaluator=Evaluator(), out=str(out))
    first.run(blocking=True)
    stored = ResultStore(out).frame()
    assert len(stored) == 2 * (2 + len(RATES))
    ev = Evaluator()
    again = SweepPanel(str(bert_family["base"]), str(bert_family["ft2"]), methods=["dare"], rates=RATES,
                       seeds=(0,), evaluator=ev, out=str(out))
    assert sorted(_curve_points(again.figure)["dare"]) == list(RATES)  # drawn from the store at once
    again.run(blocking=True)
    assert ev.calls == 0 and again.status.value.startswith("done: 0 new point(s)"), again.status.value


def test_panel_reports_failed_points_and_bad_input(bert_family):
    panel = SweepPanel(str(bert_family["base"]), str(bert_family["ft1"]), methods=["dare"], rates=RATES,
                       seeds=(0,), evaluator=Evaluator(fail_from=3))
    panel.run(blocking=True)
    failed = panel.results[panel.results["status"] == "failed"]
    assert len(failed) == len(RATES) and failed["value"].map(math.isnan).all()
    assert len(panel.output.outputs) == len(RATES)
    assert "evaluation broke on purpose" in panel.output.outputs[0]["text"]
    assert _curve_points(panel.figure) == {}  # only the reference rows succeeded
    panel.rates.value = "0.1, abc"
    panel.run()
    assert panel.status.value.startswith("not started") and "'abc' is not a number" in panel.status.value
    panel.rates.value = "0.5 1.5"
    panel.run()
    assert "not started" in panel.status.value and "1.5" in panel.status.value and "[0, 1]" in panel.status.value
    panel.rates.value = "0.5"
    panel.methods.value = ()
    panel.method_specs.value = "no_such_method"
    panel.run()
    assert "unknown pruning method 'no_such_method'" in panel.status.value
    assert panel.job.thread is not None and not panel.job.running  # none of these started a worker


# --- every widget ---------------------------------------------------------------------------------------------
def test_background_job_shows_what_the_work_raises_and_lets_nothing_escape(monkeypatch):
    escaped, shown, busy = [], [], []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    job = BackgroundJob("test-job", on_error=shown.append, busy=busy.append)

    def work(cancel):
        raise AttributeError("'list' object has no attribute 'items'")

    assert job.start(work, blocking=True)
    assert [type(e) for e in shown] == [AttributeError] and busy == [True, False] and escaped == []


def test_a_second_run_while_one_runs_is_refused_in_place(bert_family):
    entered, release = threading.Event(), threading.Event()

    def evaluator(model):
        entered.set()
        release.wait(60)
        return {"accuracy": 0.5}

    panel = SweepPanel(str(bert_family["base"]), str(bert_family["ft1"]), methods=["dare"], rates=(0.5,),
                       seeds=(0,), evaluator=evaluator)
    panel.run()
    assert entered.wait(60)
    panel.run()  # refused in the status, not raised
    assert "still running" in panel.status.value and "cancel it" in panel.status.value
    release.set()
    panel.job.join(60)
    assert panel.status.value.startswith("done"), panel.status.value
