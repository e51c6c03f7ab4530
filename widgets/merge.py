"""MergePanel: merge 2 to 8 fine-tunes of one base and watch each task's accuracy versus the pruning rate grow.

A thin shell over :func:`deltakit.merge.merge_sweep` (run in a worker thread, cancellable between points, resumable
from its results store), :func:`deltakit.plots.merge_curves` (one ``go.FigureWidget`` per task, redrawn in place
after every point) and :func:`deltakit.merge.merge_summary` (the task-by-task table). The method list is the merge
registry's (:func:`deltakit.methods.merge_methods`), so a newly registered merge method appears here without
touching this file. The fine-tunes to choose from are the fine-tuned members of the base's embedded family (and
the candidates a :class:`~deltakit.widgets.ModelPicker` found), plus any Hub id or folder typed beside them.
"""

from __future__ import annotations

import dataclasses
import html
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from deltakit import plots
from deltakit.hubsearch import embedded_finetunes
from deltakit.merge import merge_summary, merge_sweep, task_label
from deltakit.methods import get_merge, merge_methods
from deltakit.sources import ModelRef, Snapshot, SourceError
from deltakit.spec import (DEFAULT_LAMBDAS, DEFAULT_MERGE_METHODS, DEFAULT_MERGE_RATES, DEFAULT_SEEDS, MergeSpec,
                           RunOptions)
from deltakit.store import ResultStore
from deltakit.widgets._common import BackgroundJob, KnownSnapshots, parse_numbers, reference, report_error
from deltakit.widgets.picker import ModelPicker, candidate_label

__all__ = ["MergePanel", "family_candidates", "merge_method_options"]


def merge_method_options() -> list[tuple[str, str]]:
    """(label, name) for every merge method that runs without extra parameters (all built-in ones do).

    A variant with parameters (``dare_ta`` rescaled by ``1/q``) is typed in the "+ methods" field instead, as
    ``NAME:KEY=VALUE`` (e.g. ``dare_ta:q=0.5``).
    """
    out = []
    for name in merge_methods():
        info = get_merge(name)
        if all(p.default is not p.empty for p in info.params.values()):
            out.append((f"{info.pretty_name} ({name})", name))
    return out


def family_candidates(base: str) -> list[tuple[str, str]]:
    """(label, reference) of the fine-tuned members of ``base``'s embedded family; [] for any other reference."""
    try:
        ref = ModelRef.parse(base.strip())
        if ref.kind != "family":
            return []
        rows = embedded_finetunes(ref.family).to_dict("records")
    except (SourceError, KeyError):  # not a family reference (yet): Run says what is wrong with it
        return []
    return [(candidate_label(r), r["ref"]) for r in rows]


class MergePanel(w.VBox):
    """Merge controls, Run and Cancel, a progress bar, one live figure per task, a task-by-task table, errors.

    Each finished point appends its rows to ``results``, redraws every task's figure (``figures[task]``, a
    ``go.FigureWidget`` made once per task) with :func:`deltakit.plots.merge_curves` at the lambda chosen in
    ``lam``, and rewrites ``table`` with :func:`deltakit.merge.merge_summary`. The sweep runs in a worker thread
    that only updates widget values and figure data, so the kernel stays responsive and Cancel takes effect after
    the point in flight. With a results folder the sweep is resumable: stored points are drawn at once and not
    recomputed.

    Args:
        base: the base model: a reference or a resolved snapshot. A ``family:FAMILY/base`` reference lists the
            family's fine-tuned members in ``fine_tunes``.
        fine_tunes: the fine-tunes to merge (2 to 8; their order keys the masks): family members are selected in
            the list, other references go to the "+ fine-tunes" field.
        methods: merge methods selected initially (registry names, or ``NAME:KEY=VALUE`` variants).
        rates / lambdas / seeds: the grid (rates = fractions of each delta dropped before combining; merged =
            base + lambda x combined deltas).
        eval_limit: at most this many test examples per task (0 = all).
        out: results folder (resumable); blank keeps results in memory only.
        metric: the metric shown.
        evaluators: one ``model -> {metric: value}`` callable per fine-tune; replaces ``eval_limit``.
        picker: a :class:`~deltakit.widgets.ModelPicker` whose base the base field follows, whose fine-tune is
            added to the selection and whose search results are offered in the list; Run uses the snapshots it
            resolved.
        spec_options: further fields of the :class:`~deltakit.spec.MergeSpec` (e.g. ``tasks=...``, ``preset=...``).
    """

    def __init__(self, base: str | Snapshot = "", fine_tunes: Sequence[str | Snapshot] = (), *,
                 methods: Sequence[str] = DEFAULT_MERGE_METHODS, rates: Sequence[float] = DEFAULT_MERGE_RATES,
                 lambdas: Sequence[float] = DEFAULT_LAMBDAS, seeds: Sequence[int] = DEFAULT_SEEDS,
                 eval_limit: int = 200, out: str | Path = "", metric: str = "accuracy",
                 evaluators: Sequence[Callable] | None = None, picker: ModelPicker | None = None,
                 spec_options: dict | None = None) -> None:
        self.evaluators = list(evaluators) if evaluators is not None else None
        self.spec_options = dict(spec_options or {})
        self.picker = picker
        self.snapshots = KnownSnapshots([base, *fine_tunes], picker)
        self.results = pd.DataFrame()
        self.figures: dict[str, go.FigureWidget] = {}
        self.job = BackgroundJob("merge-panel", on_error=self._failed, busy=self._busy)
        self._draw_lock = threading.Lock()
        self._redrawing = False

        wide = w.Layout(width="36em")
        refs = [reference(ft) for ft in fine_tunes]
        self.base = w.Text(value=reference(base), description="base",
                           placeholder="org/name, a folder, or family:FAMILY/base", layout=wide)
        self.fine_tunes = w.SelectMultiple(options=[], rows=5, description="fine-tunes", layout=wide)
        self._refresh_candidates(selected=refs)
        listed = set(self.fine_tunes.value)
        self.more_fine_tunes = w.Text(value=" ".join(r for r in refs if r not in listed), description="+ fine-tunes",
                                      placeholder="Hub ids or folders, separated by spaces: org/name@rev ./my-ft",
                                      layout=wide)
        options = merge_method_options()
        names = [n for _, n in options]
        self.methods = w.SelectMultiple(options=options, value=[m for m in methods if m in names],
                                        rows=min(len(options), 6), description="methods", layout=wide)
        self.method_specs = w.Text(value=" ".join(m for m in methods if m not in names), description="+ methods",
                                   placeholder="with parameters, NAME:KEY=VALUE: e.g. dare_ta:q=0.5 dare_ties:q=0.5",
                                   layout=wide)
        self.rates = w.Text(value=", ".join(f"{r:g}" for r in rates), description="rates", layout=wide)
        self.lambdas = w.Text(value=", ".join(f"{x:g}" for x in lambdas), description="lambdas")
        self.seeds = w.Text(value=", ".join(str(s) for s in seeds), description="seeds")
        self.eval_limit = w.BoundedIntText(value=eval_limit, min=0, max=10**9, description="examples",
                                           tooltip="test examples per task; 0 = the whole split")
        self.eval_limit.disabled = evaluators is not None
        self.out = w.Text(value=str(out), description="results dir", placeholder="blank: keep in memory only",
                          layout=wide)
        self.metric = w.Dropdown(options=[metric], value=metric, description="metric")
        self.lam = w.Dropdown(options=[], description="lambda", tooltip="the merge weight the curves show")
        self.run_button = w.Button(description="Run", icon="play", button_style="primary")
        self.cancel_button = w.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="points")
        self.status = w.Label("")
        self.figure_box = w.VBox([])
        self.table = w.HTML()
        self.output = w.Output()

        self.base.observe(lambda _: self._refresh_candidates(), names="value")
        if picker is not None:
            w.dlink((picker, "base_ref"), (self.base, "value"))
            picker.candidates.observe(lambda _: self._refresh_candidates(), names="options")
            picker.observe(self._on_picked_fine_tune, names="fine_tune_ref")
            self._on_picked_fine_tune({"new": picker.fine_tune_ref})
        self.run_button.on_click(lambda _: self.run())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.metric.observe(lambda _: self._redraw(), names="value")
        self.lam.observe(lambda _: self._redraw(), names="value")

        super().__init__([
            self.base, self.fine_tunes, self.more_fine_tunes, self.methods, self.method_specs, self.rates,
            w.HBox([self.lambdas, self.seeds]), w.HBox([self.eval_limit, self.metric]), self.out,
            w.HBox([self.run_button, self.cancel_button, self.progress, self.status]),
            self.lam, self.figure_box, self.table, self.output,
        ])
        self.add_class("deltakit-merge-panel")
        for widget, name in ((self.status, "status"), (self.run_button, "run"), (self.cancel_button, "cancel")):
            widget.add_class(f"deltakit-{name}")  # stable hooks for browser tests and custom CSS
        if str(out).strip():
            self.show(ResultStore(out).frame())

    # --- actions --------------------------------------------------------------------------------------------
    def selected_fine_tunes(self) -> list[str]:
        """The fine-tunes a Run merges, in order: those selected in the list, then those typed (no duplicates)."""
        return list(dict.fromkeys([*self.fine_tunes.value, *self.more_fine_tunes.value.split()]))

    def run(self, *, blocking: bool = False) -> None:
        """Start the merge sweep the controls describe (points already in the results folder are not recomputed).

        Bad input (fewer than 2 fine-tunes, a rate outside [0, 1], an unknown method, a parameter out of range) is
        shown in ``status`` and ``output``, and nothing starts.

        Args:
            blocking: wait for the sweep to finish (it runs in a worker thread).
        """
        try:
            base = self.base.value.strip()
            if not base:
                raise ValueError("base: type the base model reference (org/name, a folder, or family:FAMILY/base).")
            fts = self.selected_fine_tunes()
            methods = [*self.methods.value, *self.method_specs.value.split()]
            if not methods:
                raise ValueError("methods: select at least one merge method (or type one under '+ methods').")
            data = {} if self.evaluators is not None else dict(eval_limit=self.eval_limit.value or None)
            spec = MergeSpec(base, fts, methods=methods, rates=parse_numbers(self.rates.value, float, "rates"),
                             lambdas=parse_numbers(self.lambdas.value, float, "lambdas"),
                             seeds=parse_numbers(self.seeds.value, int, "seeds"), **data, **self.spec_options)
            out = self.out.value.strip() or None
            options = RunOptions(out=out, progress=False)
            options.check()
            total = len(spec.points())
        except Exception as err:  # bad input (ValueError, KeyError, ...): say which, start nothing
            self.status.value = "not started: " + report_error(self.output, err)
            return
        new_points = [0]

        def on_point(rows: list[dict]) -> None:
            new_points[0] += 1
            self.results = pd.concat([self.results, pd.DataFrame(rows)], ignore_index=True)
            self.progress.value = min(self.progress.value + 1, total)
            last = rows[0]
            if last.get("status") == "failed":
                self.output.append_stderr(f"{_point_text(last)}: {last['error']}\n")
            self.status.value = f"{new_points[0]} new point(s); last: {_point_text(last)} ({last['status']})"
            try:
                self._redraw()
            except Exception as err:  # a drawing problem must not abort the sweep: its rows are still stored
                report_error(self.output, err)

        def work(cancel: threading.Event) -> None:
            self.progress.value, self.progress.max = 0, total
            self.status.value = f"resolving {len(fts) + 1} models ..."
            snaps = [self.snapshots.get(ref) for ref in [base, *fts]]
            stored = ResultStore(out).frame() if out else pd.DataFrame()
            if len(stored) and {"base", "fine_tune"} <= set(stored):  # this spec's models' points only
                stored = stored[(stored["base"] == base) & (stored["fine_tune"] == "+".join(fts))]
            self._ensure_figures([task_label(s) for s in snaps[1:]])
            self.show(stored, lambdas=spec.lambdas)
            reuse = " (stored points are reused)" if len(stored) else ""
            self.status.value = f"loading {len(fts)} fine-tunes; {total} points to run{reuse}"
            resolved = dataclasses.replace(spec, base=snaps[0], fine_tunes=tuple(snaps[1:]))
            frame = merge_sweep(resolved, options, evaluators=self.evaluators, cancel=cancel, on_point=on_point)
            self.show(frame, lambdas=spec.lambdas)
            self.progress.value = total if not cancel.is_set() else self.progress.value
            verb = "cancelled" if cancel.is_set() else "done"
            self.status.value = f"{verb}: {new_points[0]} new point(s), {_n_points(frame)} point(s) shown"

        self.job.start(work, blocking=blocking)

    def cancel(self) -> None:
        """Stop after the point in flight (the points finished so far are kept, and stored when a folder is set)."""
        self.job.cancel.set()
        self.cancel_button.disabled = True
        self.status.value = "cancelling after the current point ..."

    def show(self, results: pd.DataFrame, *, lambdas: Sequence[float] = ()) -> None:
        """Show merge rows (e.g. a stored results folder): a figure per task, the lambdas and metrics, the table.

        Rows without a task (prune sweeps sharing the folder) are left out.

        Args:
            results: rows of :func:`deltakit.merge.merge_sweep` (or ``ResultStore(folder).frame()``).
            lambdas: lambdas to offer besides those in the rows (a run's grid).
        """
        merged = results[results["task"].notna()] if "task" in results else results.iloc[0:0]
        self.results = merged.reset_index(drop=True)
        found = sorted(float(x) for x in merged["lam"].dropna().unique()) if "lam" in merged else []
        offered = sorted({*found, *(float(x) for x in lambdas)})
        if offered and [v for _, v in self.lam.options] != offered:
            current = self.lam.value
            self._redrawing = True  # the options' change fires the observer: draw once, below
            try:
                self.lam.options = [(f"{x:g}", x) for x in offered]
                self.lam.value = current if current in offered else offered[-1]
            finally:
                self._redrawing = False
        if "task" in merged:
            self._ensure_figures(list(dict.fromkeys(merged["task"])))
        self._redraw()

    # --- reactions ------------------------------------------------------------------------------------------
    def _refresh_candidates(self, selected: Sequence[str] | None = None) -> None:
        """List the base's family members and the picker's search results; keep what stays selectable."""
        keep = list(self.fine_tunes.value) if selected is None else list(selected)
        found = family_candidates(self.base.value)
        if self.picker is not None:
            found += [(label, ref) for label, ref in self.picker.candidates.options if ref]
        options = list(dict((ref, label) for label, ref in found).items())
        if [v for _, v in self.fine_tunes.options] != [ref for ref, _ in options]:
            self.fine_tunes.options = [(label, ref) for ref, label in options]
        self.fine_tunes.value = tuple(ref for ref, _ in options if ref in keep)

    def _on_picked_fine_tune(self, change: dict) -> None:
        ref = change["new"].strip()
        if not ref or ref in self.selected_fine_tunes():
            return
        if ref in [v for _, v in self.fine_tunes.options]:
            self.fine_tunes.value = (*self.fine_tunes.value, ref)
        else:
            self.more_fine_tunes.value = f"{self.more_fine_tunes.value} {ref}".strip()

    def _busy(self, busy: bool) -> None:
        self.run_button.disabled, self.cancel_button.disabled = busy, not busy

    def _failed(self, err: Exception) -> None:
        self.status.value = "failed: " + report_error(self.output, err)

    # --- drawing --------------------------------------------------------------------------------------------
    def _ensure_figures(self, tasks: Sequence[str]) -> None:
        """Show one figure per task, in order; a task's figure is made once and then only redrawn."""
        for task in tasks:
            if task not in self.figures:
                # Fixed ranges until the first point: an empty autoranged figure shows meaningless axes (-1..6).
                self.figures[task] = go.FigureWidget(layout=dict(
                    height=420, template="plotly_white", title=f"{task}: waiting for the first point",
                    xaxis=dict(title="pruning rate (fraction of each delta dropped)", range=[0, 1]),
                    yaxis=dict(title=self.metric.value, range=[0, 1])))
        shown = [self.figures[t] for t in tasks]
        if list(self.figure_box.children) != shown:
            self.figure_box.children = shown

    def _redraw(self) -> None:
        if self._redrawing:  # setting the metric or lambda options fires this observer again
            return
        with self._draw_lock:  # the worker (after each point) and the metric / lambda controls both redraw
            r = self.results
            if r.empty or "metric" not in r:
                return
            ok = r[r["status"] == "ok"]
            metrics = sorted(ok["metric"].dropna().unique())
            if not metrics:
                return  # no finished point yet (e.g. only failures so far)
            if list(self.metric.options) != metrics:
                current = self.metric.value
                self._redrawing = True
                try:
                    self.metric.options = metrics
                    self.metric.value = current if current in metrics else metrics[0]
                finally:
                    self._redrawing = False
            metric = self.metric.value
            for task, fig in self.figures.items():
                if fig not in self.figure_box.children or ok[(ok["task"] == task) & (ok["metric"] == metric)].empty:
                    continue
                with fig.batch_update():  # one update message: back to autorange, then the new traces
                    fig.layout.xaxis.autorange = True
                    fig.layout.yaxis.autorange = True
                    plots.merge_curves(r, task, metric, lam=self.lam.value, figure=fig)
            merged = ok[(ok["metric"] == metric) & ok["lam"].notna()] if "lam" in ok else ok.iloc[0:0]
            # merge_summary needs a merged point: until one is finished only the references exist
            self.table.value = (_table_html(merge_summary(r, metric), metric) if len(merged) else
                                "<div>the task-by-task table appears with the first merged point.</div>")


def _point_text(row: dict) -> str:
    lam = row.get("lam")
    at = "" if lam is None or (isinstance(lam, float) and math.isnan(lam)) else f" lambda {lam:g}"
    return f"{row['label']} rate {row['rate']:g}{at} seed {row['seed']}"


def _table_html(table: pd.DataFrame, metric: str) -> str:
    caption = (f"{metric} per task, mean over seeds (each task evaluated with its own head); the fine-tunes alone "
               "and the base first")
    body = table.to_html(index=False, border=0, na_rep="", float_format=lambda x: f"{x:.4g}",
                         classes="deltakit-table")
    return f"<div>{html.escape(caption)}</div>" + body


def _n_points(results: pd.DataFrame) -> int:
    return 0 if results.empty else int(results.drop_duplicates(["label", "rate", "lam", "seed"]).shape[0])
