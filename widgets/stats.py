"""StatsDashboard: compute (or load) delta statistics, then browse them by fine-tune, module kind and layer.

A thin shell over :func:`deltakit.stats.delta_stats`, :meth:`deltakit.stats.DeltaStats.load` / ``save`` and the
figures of :mod:`deltakit.plots` (``delta_histogram``, ``layer_kind_heatmap``, ``similarity_matrix``,
``spectral_figure``). Models come in as snapshots (handed in, or resolved by a :class:`~deltakit.widgets.ModelPicker`)
or as references, which are resolved once, with :func:`deltakit.sources.resolve`, when Compute runs.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Sequence
from pathlib import Path

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from deltakit import plots
from deltakit.sources import Snapshot
from deltakit.stats import DeltaStats, delta_stats
from deltakit.widgets._common import BackgroundJob, KnownSnapshots, draw_into, reference, report_error
from deltakit.widgets.picker import ModelPicker

__all__ = ["StatsDashboard", "TABLE_COLUMNS"]

ALL = "all"
#: Columns of the per-tensor table (those present in ``DeltaStats.tensors``).
TABLE_COLUMNS = ("tensor", "kind", "layer", "numel", "mean_abs", "max_abs", "rel_norm", "frac_below_0.005",
                 "p99_abs", "kurtosis", "stable_rank", "effective_rank", "low_rank")


class StatsDashboard(w.VBox):
    """Delta statistics of one base and its fine-tunes: a table and four figures, with selectors.

    Compute: takes each model's snapshot -- the one handed in or resolved by the picker while the field still
    spells its reference, else resolves it (one progress step each; family members are built on first use) --,
    runs ``delta_stats`` (one more step; with spectral statistics while the ``spectral`` checkbox is ticked, the
    default; while ``stream`` is ticked, Hub references not resolved yet are resolved with ``stream=True`` and read
    by range requests, without downloading their weights -- local folders and family members are read from disk)
    and, when ``stats_dir`` is set, saves the tables there. Load: reads tables saved earlier (``deltakit
    stats ... --out DIR`` writes the same files).

    Selectors: ``model`` (the fine-tune shown in the table, the heatmap and the spectral figure), ``kind`` (module
    kind of the table and the histogram; ``all`` = global) and ``layer`` (rows of the table). Figures are
    ``go.FigureWidget``s that are redrawn in place; the spectral figure says so when the statistics have no spectral
    columns (computed without ``spectral``, or loaded from such a run).

    Args:
        base: the base model: a reference, or a resolved snapshot.
        fine_tunes: the fine-tunes, references or snapshots (shown one reference per line in the text area).
        stats: statistics to show right away (e.g. from ``delta_stats`` in a previous cell).
        stats_dir: folder to save computed statistics to, or to load them from.
        picker: a ModelPicker whose base and fine-tune the fields follow (overrides ``base`` and ``fine_tunes``),
            and whose resolved snapshots Compute uses.
        max_rows: at most this many table rows (the largest mean |delta| first).
    """

    def __init__(self, base: str | Snapshot = "", fine_tunes: Sequence[str | Snapshot] = (), *,
                 stats: DeltaStats | None = None, stats_dir: str | Path = "", picker: ModelPicker | None = None,
                 max_rows: int = 25) -> None:
        self.max_rows = max_rows
        self.stats: DeltaStats | None = None
        self.snapshots = KnownSnapshots([base, *fine_tunes], picker)
        self.job = BackgroundJob("stats-dashboard", on_error=self._failed, busy=self._busy)

        self.base = w.Text(value=reference(base), description="base", layout=w.Layout(width="36em"))
        self.fine_tunes = w.Textarea(value="\n".join(map(reference, fine_tunes)), description="fine-tunes",
                                     placeholder="one reference per line", layout=w.Layout(width="36em", height="5em"))
        self.stats_dir = w.Text(value=str(stats_dir), description="stats dir",
                                placeholder="optional: save to / load from this folder", layout=w.Layout(width="36em"))
        self.compute_button = w.Button(description="Compute", icon="play", button_style="primary")
        self.load_button = w.Button(description="Load", icon="folder-open")
        self.spectral = w.Checkbox(value=True, description="spectral", indent=False, layout=w.Layout(width="7em"),
                                   tooltip="also compute stable / effective rank and merged-LoRA-like low rank")
        self.stream = w.Checkbox(value=False, description="stream from the Hub (no download)", indent=False,
                                 layout=w.Layout(width="18em"),
                                 tooltip="read Hub models by HTTP range requests; only their small files are saved")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="progress")
        self.status = w.Label("")
        selector = dict(style={"description_width": "initial"}, layout=w.Layout(width="16em"))
        self.model = w.Dropdown(options=[], description="fine-tune", **selector)
        self.kind = w.Dropdown(options=[ALL], value=ALL, description="module kind", **selector)
        self.layer = w.Dropdown(options=[ALL], value=ALL, description="layer", **selector)
        self.overview = w.HTML()
        self.table = w.HTML()
        self.histogram = go.FigureWidget(layout=dict(height=360, title="|delta| distribution"))
        self.heatmap = go.FigureWidget(layout=dict(height=380, title="layer x module kind"))
        self.similarity = go.FigureWidget(layout=dict(height=360, title="similarity across fine-tunes"))
        self.ranks = go.FigureWidget(layout=dict(height=360, title="spectral statistics of the deltas"))
        self.output = w.Output()

        if picker is not None:
            w.dlink((picker, "base_ref"), (self.base, "value"))
            w.dlink((picker, "fine_tune_ref"), (self.fine_tunes, "value"))
        self.compute_button.on_click(lambda _: self.compute())
        self.load_button.on_click(lambda _: self.load())
        self.model.observe(self._on_model, names="value")
        self.kind.observe(self._on_kind, names="value")
        self.layer.observe(lambda _: self._draw_table(), names="value")

        super().__init__([
            self.base, self.fine_tunes, self.stats_dir,
            w.HBox([self.compute_button, self.spectral, self.stream, self.load_button, self.progress, self.status]),
            self.overview, w.HBox([self.model, self.kind, self.layer]), self.table,
            self.histogram, self.heatmap, self.similarity, self.ranks, self.output,
        ])
        self.add_class("deltakit-stats-dashboard")
        self.status.add_class("deltakit-status")  # stable hooks for browser tests and custom CSS
        if stats is not None:
            self.show(stats)

    # --- actions --------------------------------------------------------------------------------------------
    def compute(self, *, blocking: bool = False) -> None:
        """Take the models' snapshots, compute the statistics (and save them when ``stats_dir`` is set), show them.

        Args:
            blocking: wait for the computation to finish (it runs in a worker thread).
        """
        base = self.base.value.strip()
        fts = [line.strip() for line in self.fine_tunes.value.splitlines() if line.strip()]
        if not base or not fts:
            self.status.value = "type a base and at least one fine-tune (one per line)."
            return
        out = self.stats_dir.value.strip()
        spectral, stream = self.spectral.value, self.stream.value

        def work(cancel: threading.Event) -> None:
            self.progress.value, self.progress.max = 0, 1
            snaps = []
            for ref in [base, *fts]:
                self.status.value = f"resolving {ref} ..."
                snaps.append(self.snapshots.get(ref, stream=stream))
            self.status.value = f"computing statistics of {len(fts)} fine-tune(s) ..."

            def on_progress(done: int, total: int, current: str) -> None:  # after each tensor read, in bytes
                self.progress.max, self.progress.value = total, done
                self.status.value = f"statistics: read {current}"

            stats = delta_stats(snaps[0], snaps[1:], progress=False, on_progress=on_progress, spectral=spectral)
            if out:
                stats.save(out)
            self.show(stats)
            self.progress.value = self.progress.max
            self.status.value = f"done: {len(stats.tensors)} tensor rows" + (f", saved to {out}" if out else "")

        self.job.start(work, blocking=blocking)

    def load(self, *, blocking: bool = False) -> None:
        """Show statistics saved in ``stats_dir`` (by :meth:`compute`, ``DeltaStats.save`` or ``deltakit stats --out``).

        Args:
            blocking: wait until they are shown (loading runs in a worker thread).
        """
        folder = self.stats_dir.value.strip()
        if not folder:
            self.status.value = "type the folder to load statistics from in 'stats dir'."
            return

        def work(cancel: threading.Event) -> None:
            self.progress.value, self.progress.max = 0, 1
            self.show(DeltaStats.load(folder))
            self.progress.value = 1
            self.status.value = f"loaded {folder}"

        self.job.start(work, blocking=blocking)

    def show(self, stats: DeltaStats) -> None:
        """Show ``stats``: fill the selectors, the overview, the table and the four figures."""
        self.stats = stats
        models = list(stats.overall["model"])
        kinds = sorted(stats.tensors["kind"].unique())
        layers = sorted(int(x) for x in stats.tensors["layer"].unique())
        # Setting options resets the values and fires the observers; hold the redraws until all are set.
        self._drawing = False
        try:
            self.kind.options = [ALL, *kinds]
            self.layer.options = [(ALL, ALL)] + [("outside blocks" if i < 0 else str(i), i) for i in layers]
            self.model.options = models
            self.kind.value, self.layer.value, self.model.value = ALL, ALL, models[0]
        finally:
            self._drawing = True
        self.overview.value = _table_html(stats.overall[[c for c in ("model", "n_tensors", "numel", "mean_abs",
                                                                     "max_abs", "rel_norm", "frac_below_0.005",
                                                                     "p99_abs") if c in stats.overall]])
        self._draw_table()
        self._draw_histogram()
        self._draw_heatmap()
        self._draw_ranks()
        if len(models) > 1:
            draw_into(self.similarity, plots.similarity_matrix(stats.similarity))
        else:
            draw_into(self.similarity, go.Figure(layout=dict(
                height=200, title="similarity across fine-tunes: needs two or more fine-tunes")))

    # --- reactions ------------------------------------------------------------------------------------------
    _drawing = True

    def _busy(self, busy: bool) -> None:
        self.compute_button.disabled = self.load_button.disabled = busy

    def _failed(self, err: Exception) -> None:
        self.status.value = "failed: " + report_error(self.output, err)

    def _on_model(self, change: dict) -> None:
        if self._drawing and self.stats is not None:
            self._draw_table()
            self._draw_heatmap()
            self._draw_ranks()

    def _on_kind(self, change: dict) -> None:
        if self._drawing and self.stats is not None:
            self._draw_table()
            self._draw_histogram()

    def _draw_table(self) -> None:
        if not self._drawing or self.stats is None or self.model.value is None:
            return
        t = self.stats.tensors
        sel = t[t["model"] == self.model.value]
        if self.kind.value != ALL:
            sel = sel[sel["kind"] == self.kind.value]
        if self.layer.value != ALL:
            sel = sel[sel["layer"] == self.layer.value]
        sel = sel.sort_values("mean_abs", ascending=False)
        shown = sel[[c for c in TABLE_COLUMNS if c in sel]].head(self.max_rows)
        caption = (f"{len(sel)} tensor(s) of {self.model.value}, kind {self.kind.value}, layer {self.layer.label}"
                   + (f"; the {self.max_rows} with the largest mean |delta| shown" if len(sel) > self.max_rows else ""))
        self.table.value = f"<div>{html.escape(caption)}</div>" + _table_html(shown)

    def _draw_histogram(self) -> None:
        if self._drawing and self.stats is not None:
            draw_into(self.histogram, plots.delta_histogram(self.stats.histograms, kind=self.kind.value))

    def _draw_heatmap(self) -> None:
        if self._drawing and self.stats is not None and self.model.value is not None:
            draw_into(self.heatmap, plots.layer_kind_heatmap(self.stats.tensors, self.model.value))

    def _draw_ranks(self) -> None:
        if not self._drawing or self.stats is None or self.model.value is None:
            return
        if "stable_rank" in self.stats.tensors:
            draw_into(self.ranks, plots.spectral_figure(self.stats.tensors, self.model.value))
        else:
            draw_into(self.ranks, go.Figure(layout=dict(
                height=200, title="spectral statistics: not computed (tick 'spectral', then Compute)")))


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, float_format=lambda x: f"{x:.4g}", classes="deltakit-table")
