"""MergePanel without a browser, on the tiny family: set values, click, wait for the worker, assert on widget state.

The runs merge ``sentiment3`` and ``polarity`` of the tiny family (built once per session by the ``tiny_home``
fixture) on 40 test examples per task, so each takes seconds.
"""

from __future__ import annotations

import html

import pytest

from deltakit.methods import merge_methods
from deltakit.spec import MergeSpec
from deltakit.store import ResultStore
from deltakit.widgets import MergePanel, ModelPicker
from deltakit.widgets.merge import merge_method_options

BASE = "family:tiny/base"
FINE_TUNES = ("family:tiny/sentiment3", "family:tiny/polarity")
TASKS = ["sentiment3", "polarity"]
SMALL = dict(methods=["ta", "dare_ta"], rates=(0.5,), lambdas=(1.0,), seeds=(0,), eval_limit=40)


def _curve_points(fig) -> dict[str, list[float]]:
    """Method label -> x values of its mean line (interval bands and horizontal lines excluded)."""
    return {t.name: list(t.x) for t in fig.data if t.mode == "lines+markers"}


def _line_names(fig) -> list[str]:
    """Names of the horizontal lines (references, task arithmetic), without the value in brackets."""
    return sorted(t.name.split(" (")[0] for t in fig.data if t.mode == "lines")


def _n_points(panel: MergePanel) -> int:
    return len(MergeSpec(panel.base.value, panel.selected_fine_tunes(), methods=list(panel.methods.value),
                         rates=[float(x) for x in panel.rates.value.split(",")],
                         lambdas=[float(x) for x in panel.lambdas.value.split(",")],
                         seeds=[int(x) for x in panel.seeds.value.split(",")]).points())


def test_merge_panel_lists_the_family_members_and_the_registry_methods():
    panel = MergePanel(BASE, [*FINE_TUNES, "org/other-ft"], methods=["ta", "dare_ta:q=0.5"])
    listed = [v for _, v in panel.fine_tunes.options]
    assert set(FINE_TUNES) <= set(listed) and all(v.startswith("family:tiny/") for v in listed)
    assert panel.fine_tunes.value == FINE_TUNES and panel.more_fine_tunes.value == "org/other-ft"
    assert panel.selected_fine_tunes() == [*FINE_TUNES, "org/other-ft"]
    assert [n for _, n in merge_method_options()] == merge_methods()  # every built-in merge runs without parameters
    assert panel.methods.value == ("ta",) and panel.method_specs.value == "dare_ta:q=0.5"
    panel.base.value = "org/some-base"  # not a family: nothing to list, the typed references stay
    assert panel.fine_tunes.options == () and panel.selected_fine_tunes() == ["org/other-ft"]
    panel.base.value = BASE
    assert len(panel.fine_tunes.options) == len(listed)


def test_merge_panel_follows_a_picker():
    picker = ModelPicker(BASE, FINE_TUNES[1])
    panel = MergePanel(picker=picker)
    assert panel.base.value == BASE and panel.fine_tunes.value == (FINE_TUNES[1],)
    picker.fine_tune_id.value = FINE_TUNES[0]  # the picker's fine-tune joins the selection
    assert set(panel.fine_tunes.value) == set(FINE_TUNES)
    picker.fine_tune_id.value = "org/hub-ft"  # not a family member: typed beside the list
    assert panel.more_fine_tunes.value == "org/hub-ft"


def test_merge_panel_runs_and_draws_a_figure_per_task(tiny, tmp_path):
    panel = MergePanel(BASE, FINE_TUNES, methods=["ta", "ties", "dare_ta"], rates=(0.5, 0.9), lambdas=(0.5, 1.0),
                       seeds=(0, 1), eval_limit=40, out=str(tmp_path / "merge"))
    seen: list[list[str]] = []  # the sentiment3 figure's curves when each point finished
    panel.progress.observe(lambda c: seen.append(sorted(_curve_points(panel.figures["sentiment3"]))),
                           names="value")
    panel.run_button.click()
    assert panel.run_button.disabled and not panel.cancel_button.disabled
    panel.job.join()
    total = 2 + 2 + 2 * 2 + 2 * 2 * 2  # references + ta (2 lambdas) + ties (2 rates x 2) + dare_ta (x 2 seeds)
    assert total == _n_points(panel)
    assert panel.status.value.startswith(f"done: {total} new point(s)"), panel.status.value
    assert panel.progress.value == panel.progress.max == total and panel.output.outputs == ()
    assert not panel.run_button.disabled and panel.cancel_button.disabled
    # One figure per task, in the fine-tunes' order, each with a curve per rate-dependent method and the lines.
    assert list(panel.figures) == TASKS and list(panel.figure_box.children) == list(panel.figures.values())
    for task, fig in panel.figures.items():
        assert {k: sorted(v) for k, v in _curve_points(fig).items()} == {"dare_ta": [0.5, 0.9], "ties": [0.5, 0.9]}
        assert _line_names(fig) == ["base", "finetuned", "ta"]
        assert fig.layout.title.text.startswith(f"{task}: accuracy") and "lambda 1" in fig.layout.title.text
    assert seen[0] == [] and seen[-1] == ["dare_ta", "ties"] and len(set(map(tuple, seen))) > 2  # grew live
    # The task-by-task table: a column per task, a row per (method, rate, lambda) and the references.
    table = html.unescape(panel.table.value)
    assert all(f"<th>{t}</th>" in table for t in [*TASKS, "mean"]) and "<td>finetuned</td>" in table
    assert table.count("<td>dare_ta</td>") == 4 and table.count("<td>ta</td>") == 2
    # The lambda dropdown redraws the same figure objects at another lambda.
    figure = panel.figures["polarity"]
    ta_before = next(t.y[0] for t in figure.data if t.name.startswith("ta ("))
    assert [v for _, v in panel.lam.options] == [0.5, 1.0] and panel.lam.value == 1.0
    panel.lam.value = 0.5
    assert panel.figures["polarity"] is figure and "lambda 0.5" in figure.layout.title.text
    rows = panel.results.query("method == 'ta' and task == 'polarity' and metric == 'accuracy' and lam == 0.5")
    assert next(t.y[0] for t in figure.data if t.name.startswith("ta (")) == pytest.approx(rows["value"].mean())
    assert ta_before == pytest.approx(panel.results.query(
        "method == 'ta' and task == 'polarity' and metric == 'accuracy' and lam == 1.0")["value"].mean())
    panel.metric.value = "macro_f1"
    assert figure.layout.yaxis.title.text == "macro_f1" and "macro_f1 per task" in panel.table.value


def test_merge_panel_cancel_stops_early_and_a_rerun_resumes(tiny, tmp_path):
    out = tmp_path / "merge"
    panel = MergePanel(BASE, FINE_TUNES, out=str(out), **dict(SMALL, seeds=(0, 1)))
    total = _n_points(panel)  # references + ta + dare_ta x 2 seeds = 5
    panel.progress.observe(lambda c: c["new"] == 2 and panel.cancel_button.click(), names="value")
    panel.run(blocking=True)
    assert panel.status.value.startswith("cancelled: 2 new point(s)"), panel.status.value
    assert panel.progress.value == 2 < panel.progress.max == total
    assert len(ResultStore(out).records()) == 2 and not panel.run_button.disabled

    again = MergePanel(BASE, FINE_TUNES, out=str(out), **dict(SMALL, seeds=(0, 1)))
    assert list(again.figures) == TASKS  # the stored points are drawn at once
    assert _line_names(again.figures["polarity"]) == ["base", "finetuned"]
    again.run(blocking=True)
    assert again.status.value.startswith(f"done: {total - 2} new point(s), {total} point(s)"), again.status.value
    again.run(blocking=True)  # everything is stored now: nothing is recomputed
    assert again.status.value.startswith(f"done: 0 new point(s), {total} point(s)"), again.status.value
    assert len(ResultStore(out).records()) == total
    assert sorted(_curve_points(again.figures["sentiment3"])) == ["dare_ta"]


BAD_INPUT = [
    ("one-fine-tune", dict(fine_tunes=FINE_TUNES[:1]), ("2 to 8 fine-tunes", "got 1")),
    ("rate-above-one", dict(rates="0.5, 1.5"), ("1.5", "[0, 1]")),
    ("unknown-method", dict(methods=(), method_specs="no_such_merge"),
     ("unknown merge method 'no_such_merge'", "registered: ", "register_merge")),
    ("q-out-of-range", dict(method_specs="dare_ta:q=5"),
     ("dare_ta(q=5) cannot run at rate 0.5", "q must be in [1 - rate, 1]", "got 5")),
    ("bad-lambdas", dict(lambdas="1, x"), ("lambdas: 'x' is not a number",)),
]


@pytest.mark.parametrize("bad, expect", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_merge_panel_shows_bad_input_in_place_without_starting(bad, expect):
    panel = MergePanel(BASE, FINE_TUNES, **SMALL)
    for name, value in bad.items():
        getattr(panel, name).value = value
    panel.run_button.click()  # nothing raises: the message is in the panel
    assert panel.status.value.startswith("not started: "), panel.status.value
    for fragment in expect:
        assert fragment in panel.status.value, panel.status.value
    assert [o["name"] for o in panel.output.outputs] == ["stderr"] and expect[0] in panel.output.outputs[0]["text"]
    assert panel.job.thread is None and not panel.run_button.disabled  # no worker was started
