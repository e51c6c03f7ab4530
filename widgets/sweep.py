"""SweepPanel: prune a fine-tune over methods x rates x seeds and watch the metric-versus-rate curve grow.

A thin shell over :func:`deltakit.sweep.sweep` (run in a worker thread, cancellable between points, resumable
from its results store) and :func:`deltakit.plots.metric_curves` (redraws into the panel's ``go.FigureWidget``
inside ``batch_update()`` after every point). The method list is the registry's
(:func:`deltakit.methods.sweep_methods`), so a newly registered method appears here without touching this file.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from deltakit import plots
from deltakit.methods import get_method, sweep_methods
from deltakit.sources import Snapshot
from deltakit.spec import DEFAULT_METHODS, DEFAULT_RATES, DEFAULT_SEEDS, RunOptions, SweepSpec
from deltakit.store import ResultStore
from deltakit.sweep import LocalRunner, sweep
from deltakit.widgets._common import BackgroundJob, KnownSnapshots, parse_numbers, reference, report_error
from deltakit.widgets.picker import ModelPicker

__all__ = ["SweepPanel", "method_options"]


def method_options() -> list[tuple[str, str]]:
    """(label, name) for every registry entry that runs without extra parameters.

    Entries with a required parameter (``darex_q`` needs ``q``) are typed in the "with parameters" field instead,
    as ``NAME:KEY=VALUE`` (e.g. ``darex_q:q=0.3``).
    """
    out = []
    for name in sweep_methods():
        info = get_method(name)
        if all(p.default is not p.empty for p in info.params.values()):
            out.append((f"{info.pretty_name} ({name})", name))
    return out


class SweepPanel(w.VBox):
    """Sweep controls, Run and Cancel, a progress bar, the live curve, and an Output area for errors.

    Each finished point appends its rows to ``results`` and redraws ``figure`` (a ``go.FigureWidget``) with
    :func:`deltakit.plots.metric_curves`. The sweep runs in a worker thread that only updates widget values and
    figure data, so the kernel stays responsive and Cancel takes effect after the point in flight. With a results
    folder the sweep is resumable: stored points are drawn at once and not recomputed.

    Args:
        base / fine_tune: model references or resolved snapshots (used as they are, never resolved again).
        methods: methods selected initially (registry names or DAREx-q strategies).
        rates / seeds: the grid (rates = fractions of delta entries dropped).
        task: evaluation data (``glue/TASK``, a dataset id, a parquet file); blank = the fine-tune's own data.
        split: evaluation split. eval_limit: at most this many examples (0 = all).
        out: results folder (resumable); blank keeps results in memory only.
        metric: the metric on the y axis.
        evaluator: a ``model -> {metric: value}`` callable that replaces task/split/eval_limit.
        picker: a :class:`~deltakit.widgets.ModelPicker` whose references the fields follow (overrides
            ``base`` and ``fine_tune``); Run uses the snapshots it resolved.
        spec_options: further fields of the :class:`~deltakit.spec.SweepSpec` (e.g. ``search_limit=64``,
            ``preset=...``).
        max_memory: the memory budget (``5GB``, ``cpu=32GB,cuda=20GB``; blank: 80% of the available memory); the
            sweep runs in the fastest memory tier that fits it, shown under the buttons with the measured peak.
        workers: 0 runs the points in this process; N > 0 runs them on N Ray workers
            (:class:`deltakit.ray_runner.RayRunner`: the Ray instance this kernel has, else a local cluster started
            with ``ray start``, else a new local one), each holding its own copy of the model.
    """

    def __init__(self, base: str | Snapshot = "", fine_tune: str | Snapshot = "", *, methods: Sequence[str] = DEFAULT_METHODS,
                 rates: Sequence[float] = DEFAULT_RATES, seeds: Sequence[int] = DEFAULT_SEEDS,
                 task: str = "", split: str = "test", eval_limit: int = 200, out: str | Path = "",
                 metric: str = "accuracy", evaluator: Callable | None = None, picker: ModelPicker | None = None,
                 spec_options: dict | None = None, max_memory: str = "", workers: int = 0) -> None:
        self.evaluator = evaluator
        self.spec_options = dict(spec_options or {})
        self.snapshots = KnownSnapshots([base, fine_tune], picker)
        self.results = pd.DataFrame()
        self.job = BackgroundJob("sweep-panel", on_error=self._failed, busy=self._busy)
        self._draw_lock = threading.Lock()
        self._redrawing = False

        options = method_options()
        names = [n for _, n in options]
        self.base = w.Text(value=reference(base), description="base", layout=w.Layout(width="36em"))
        self.fine_tune = w.Text(value=reference(fine_tune), description="fine-tune", layout=w.Layout(width="36em"))
        self.methods = w.SelectMultiple(options=options, value=[m for m in methods if m in names],
                                        rows=min(len(options), 8), description="methods",
                                        layout=w.Layout(width="36em"))
        self.method_specs = w.Text(value=" ".join(m for m in methods if m not in names), description="+ methods",
                                   placeholder="with parameters, NAME:KEY=VALUE: e.g. darex_q:q=0.3 darex_q:q=0.5",
                                   layout=w.Layout(width="36em"))
        self.rates = w.Text(value=", ".join(f"{r:g}" for r in rates), description="rates",
                            layout=w.Layout(width="36em"))
        self.seeds = w.Text(value=", ".join(str(s) for s in seeds), description="seeds")
        self.task = w.Text(value=task, description="task", placeholder="blank: the fine-tune's own data")
        self.split = w.Dropdown(options=["test", "validation", "train"], value=split, description="split")
        self.eval_limit = w.BoundedIntText(value=eval_limit, min=0, max=10**9, description="examples",
                                           tooltip="0 = the whole split")
        if evaluator is not None:
            for field in (self.task, self.split, self.eval_limit):
                field.disabled = True
        self.out = w.Text(value=str(out), description="results dir", placeholder="blank: keep in memory only",
                          layout=w.Layout(width="36em"))
        self.max_memory = w.Text(value=str(max_memory), description="max memory",
                                 placeholder="blank: 80% of what is available; e.g. 5GB, cpu=32GB,cuda=20GB",
                                 layout=w.Layout(width="36em"))
        self.workers = w.BoundedIntText(value=workers, min=0, max=4096, description="workers",
                                        tooltip="0 = in this process; N > 0 = N Ray workers (pip install "
                                                "'deltakit[ray]')")
        self.memory = w.Label("", tooltip="the memory tier the sweep runs in and its measured peak")
        self.metric = w.Dropdown(options=[metric], value=metric, description="metric")
        self.log_rate = w.Checkbox(value=False, description="log axis (kept fraction)")
        self.interval = w.Dropdown(options=[("95% CI of the mean", "ci95"), ("lowest to highest seed", "minmax"),
                                            ("mean ± 1 std", "std")], value="ci95", description="band")
        self.run_button = w.Button(description="Run", icon="play", button_style="primary")
        self.cancel_button = w.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="points")
        self.status = w.Label("")
        # Fixed ranges until the first point: an empty autoranged figure shows meaningless axes (-1..6).
        self.figure = go.FigureWidget(layout=dict(
            height=420, template="plotly_white", title="press Run to start the sweep",
            xaxis=dict(title="pruning rate (fraction of delta dropped)", range=[0, 1]),
            yaxis=dict(title=metric, range=[0, 1])))
        self.output = w.Output()

        if picker is not None:
            w.dlink((picker, "base_ref"), (self.base, "value"))
            w.dlink((picker, "fine_tune_ref"), (self.fine_tune, "value"))
        self.run_button.on_click(lambda _: self.run())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.metric.observe(lambda _: self._redraw(), names="value")
        self.log_rate.observe(lambda _: self._redraw(), names="value")
        self.interval.observe(lambda _: self._redraw(), names="value")

        super().__init__([
            self.base, self.fine_tune, self.methods, self.method_specs, self.rates,
            w.HBox([self.seeds, self.metric]), w.HBox([self.task, self.split, self.eval_limit]), self.out,
            w.HBox([self.max_memory, self.workers]),
            w.HBox([self.run_button, self.cancel_button, self.progress, self.status]), self.memory,
            w.HBox([self.log_rate, self.interval]), self.figure, self.output,
        ])
        self.add_class("deltakit-sweep-panel")
        for widget, name in ((self.status, "status"), (self.run_button, "run"), (self.cancel_button, "cancel")):
            widget.add_class(f"deltakit-{name}")  # stable hooks for browser tests and custom CSS
        if str(out).strip():
            self.show(ResultStore(out).frame())

    # --- actions --------------------------------------------------------------------------------------------
    def run(self, *, blocking: bool = False) -> None:
        """Start the sweep the controls describe (rows already in the results folder are not recomputed).

        Args:
            blocking: wait for the sweep to finish (it runs in a worker thread).
        """
        try:
            methods = [*self.methods.value, *self.method_specs.value.split()]
            if not methods:
                raise ValueError("methods: select at least one method (or type one under '+ methods').")
            base, ft = self.base.value.strip(), self.fine_tune.value.strip()
            if not base or not ft:
                raise ValueError("type a base and a fine-tune model reference.")
            data = {} if self.evaluator is not None else dict(
                task=self.task.value.strip() or None, split=self.split.value, eval_limit=self.eval_limit.value or None)
            spec = SweepSpec(base, ft, methods=methods, rates=parse_numbers(self.rates.value, float, "rates"),
                             seeds=parse_numbers(self.seeds.value, int, "seeds"), **data, **self.spec_options)
            out = self.out.value.strip() or None
            options = RunOptions(out=out, progress=False, max_memory=self.max_memory.value.strip() or None)
            runner = None
            if self.workers.value > 0:
                from deltakit.ray_runner import RayRunner  # imports Ray only when a sweep starts

                runner = RayRunner(workers=self.workers.value)  # without Ray: ImportError saying how to install it
            (runner or LocalRunner()).check(options)
            total = len(spec.points())
        except Exception as err:  # bad input (ValueError, KeyError, ...): say which, start nothing
            self.status.value = "not started: " + report_error(self.output, err)
            return
        new_points = [0]

        def on_point(rows: list[dict]) -> None:
            new_points[0] += 1
            self.results = pd.concat([self.results, pd.DataFrame(rows)], ignore_index=True)
            self.progress.value = min(self.progress.value + 1, total)
            for r in rows:
                if r.get("status") == "failed":
                    self.output.append_stderr(f"{r['label']} rate {r['rate']:g} seed {r['seed']}: {r['error']}\n")
            last = rows[0]
            self.status.value = (f"{new_points[0]} new point(s); last: {last['label']} rate {last['rate']:g} "
                                 f"seed {last['seed']} ({last['status']})")
            self.memory.value = memory_line(last)
            try:
                self._redraw()
            except Exception as err:  # a drawing problem must not abort the sweep: its rows are still stored
                report_error(self.output, err)

        def work(cancel: threading.Event) -> None:
            stored = ResultStore(out).frame() if out else pd.DataFrame()
            self.show(stored)
            self.progress.value, self.progress.max = 0, total
            reuse = " (stored points are reused)" if len(stored) else ""
            where = f" on {self.workers.value} Ray worker(s)" if runner is not None else ""
            self.status.value = f"loading models{where}; {total} points to run{reuse}"
            resolved = dataclasses.replace(spec, base=self.snapshots.get(base), fine_tune=self.snapshots.get(ft))
            frame = sweep(resolved, options, evaluator=self.evaluator, cancel=cancel, on_point=on_point,
                          runner=runner)
            self.show(frame)
            if "memory" in frame.attrs:
                peak = f"; {memory_line(frame.iloc[-1])}" if len(frame) and "tier" in frame else ""
                self.memory.value = frame.attrs["memory"] + peak
            self.progress.value = total if not cancel.is_set() else self.progress.value
            verb = "cancelled" if cancel.is_set() else "done"
            self.status.value = f"{verb}: {new_points[0]} new point(s), {_n_points(frame)} point(s) shown"

        self.job.start(work, blocking=blocking)

    def cancel(self) -> None:
        """Stop after the point in flight (the rows finished so far are kept, and stored when a folder is set)."""
        self.job.cancel.set()
        self.cancel_button.disabled = True
        self.status.value = "cancelling after the current point ..."

    def show(self, results: pd.DataFrame) -> None:
        """Show sweep rows (e.g. a stored results folder) in the figure, and offer their metrics."""
        self.results = results.reset_index(drop=True)
        self._redraw()

    def _busy(self, busy: bool) -> None:
        self.run_button.disabled, self.cancel_button.disabled = busy, not busy

    def _failed(self, err: Exception) -> None:
        self.status.value = "failed: " + report_error(self.output, err)

    # --- drawing --------------------------------------------------------------------------------------------
    def _redraw(self) -> None:
        if self._redrawing:  # setting the metric options below fires this observer again
            return
        with self._draw_lock:  # the worker (after each point) and the metric / axis controls both redraw
            r = self.results
            if r.empty or "metric" not in r:
                return
            metrics = sorted(r.loc[r["status"] == "ok", "metric"].dropna().unique())
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
            with self.figure.batch_update():  # back to autorange (metric_curves reverses the log axis itself)
                self.figure.layout.xaxis.autorange = True
                self.figure.layout.yaxis.autorange = True
            plots.metric_curves(r, self.metric.value, figure=self.figure, log_rate=self.log_rate.value,
                                interval=self.interval.value)


def memory_line(row) -> str:
    """``tier file; peak host 3.91 GB`` from a sweep row (empty for rows stored before tiers were recorded)."""
    from deltakit.memory import TIER_NAMES, format_size

    tier, host, device = row.get("tier"), row.get("peak_host_mb"), row.get("peak_device_mb")
    if not isinstance(tier, str):
        return ""
    peaks = [f"host {format_size(host * 2**20)}"] if host == host and host is not None else []
    peaks += [f"device {format_size(device * 2**20)}"] if device == device and device is not None else []
    return f"tier {TIER_NAMES.get(tier, tier)}; measured peak {', '.join(peaks)}"


def _n_points(results: pd.DataFrame) -> int:
    return 0 if results.empty else int(results.drop_duplicates(["label", "rate", "seed"]).shape[0])
