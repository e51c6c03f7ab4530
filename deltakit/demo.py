"""The main job: ``deltakit demo`` -- statistics, sweeps and an HTML report on the embedded family, told as a story.

The demo is planned so that something can be looked at early and everything fits a standing budget on a 2-core
machine without a GPU (10 minutes from an empty cache, building included; a first result within 3):

1. build the base and the standard fine-tune (``sentiment3``), compute its delta statistics, sweep DARE on it, and
   write ``DIR/index.html`` -- the first result;
2. build the large-delta fine-tune (``sentiment3-hot``), recompute the statistics for both, and sweep DARE,
   DAREx-q (the labelled q search) and magnitude pruning on it -- where DARE collapses and DAREx-q recovers;
3. sweep magnitude pruning on the standard fine-tune, for comparison;
4. build the topic fine-tune (BBC news topics, a different task on the same base) and merge it with ``sentiment3``
   by task arithmetic, TIES, DARE+TA and DARE+TIES: each task's accuracy with its own head (when the family has a
   ``topic`` member).

``index.html`` is rewritten after every finished method (reload it to follow), and the terminal prints one line
per finding (a method's accuracy at the highest rate against the fine-tune). The run ends with one JSON line of
its timings. ``full=True`` (CLI ``--full``) runs the larger grid of the fidelity study instead (seven rates, the
``polarity`` member in the statistics, 400 test examples); it does not fit the budget. Every sweep is resumable:
an interrupted demo resumes where it stopped, and a second run only rewrites the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from deltakit import plots
from deltakit.families import get_family
from deltakit.merge import merge_sweep
from deltakit.methods import get_method, reference_methods
from deltakit.report import write_html_report
from deltakit.spec import MergeSpec, RunOptions, SweepSpec
from deltakit.stats import DeltaStats, delta_stats
from deltakit.store import check_writable_folder
from deltakit.summary import summarise
from deltakit.sweep import sweep

__all__ = ["DEMO", "FULL", "DemoGrid", "run_demo"]


@dataclass(frozen=True)
class DemoGrid:
    """How big the demo is.

    Attributes:
        rates: the sweep rates (fractions of delta entries dropped).
        seeds: mask seeds (two or more: every curve has a band over seeds).
        eval_limit: test examples per evaluation (a fixed, seeded subset of the test split).
        search_limit: validation examples per DAREx-q search evaluation.
        extra_members: fine-tunes built only for the statistics (their deltas' similarity).
        merge_rates / merge_lambdas: the merge section's grid (DARE's drop rate before merging, merge weights).
    """

    rates: tuple[float, ...]
    seeds: tuple[int, ...] = (0, 1)
    eval_limit: int | None = 300
    search_limit: int | None = 96
    extra_members: tuple[str, ...] = ()
    merge_rates: tuple[float, ...] = (0.9,)
    merge_lambdas: tuple[float, ...] = (1.0,)


#: The default demo, sized for the budget (measured figures in the README).
DEMO = DemoGrid(rates=(0.5, 0.9, 0.95, 0.99))
#: ``--full``: the grid of the fidelity study.
FULL = DemoGrid(rates=(0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99), eval_limit=400, search_limit=128,
                extra_members=("polarity",), merge_rates=(0.5, 0.7, 0.9), merge_lambdas=(0.5, 0.7, 1.0))

#: (member, method) in run order; the first is the first result. Each finished one rewrites the report.
_PLAN = (("sentiment3", "dare"), ("sentiment3-hot", "dare"), ("sentiment3-hot", "darex_q_labelled"),
         ("sentiment3-hot", "magnitude"), ("sentiment3", "magnitude"))
#: The fine-tunes merged last (when the family has both), and the merge methods.
_MERGE = ("sentiment3", "topic")
_MERGE_METHODS = ("ta", "ties", "dare_ta", "dare_ties")


class _Story:
    """The demo's state: timings, findings, results and statistics so far; rewrites the report on demand."""

    def __init__(self, out: Path, family: str, grid: DemoGrid, echo: Callable[[str], None]) -> None:
        self.out, self.family, self.grid, self.echo = out, family, grid, echo
        self.t0 = time.perf_counter()
        self.timings = dict(build_s=0.0, stats_s=0.0, sweeps_s=0.0, first_result_s=None, total_s=None)
        self.findings: list[str] = []
        self.results: dict[str, pd.DataFrame] = {}
        self.merged: pd.DataFrame | None = None
        self.stats: DeltaStats | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def timed(self, what: str, work: Callable[[], object]) -> object:
        t = time.perf_counter()
        value = work()
        self.timings[what] += time.perf_counter() - t
        return value

    def say(self, line: str) -> None:
        self.echo(f"[{self.elapsed():5.0f} s] {line}")

    def finding(self, member: str, label: str) -> None:
        """One line: the method's mean accuracy at its highest rate, against the fine-tune and the base."""
        table = summarise(self.results[member], "accuracy")
        refs = {r.method: r.mean for r in table.itertuples() if r.method in reference_methods()}
        rows = table[table["label"] == label]
        top = rows.loc[rows["rate"].idxmax()]
        info = get_method(top["method"])
        q = f", q {top['q']:.3f}" if info.prepare and top["q"] == top["q"] else ""  # a searched q (not NaN)
        seeds = f"{int(top['n_seeds'])} seed{'s' if top['n_seeds'] > 1 else ''}"
        line = (f"{member}: {info.pretty_name} at rate {top['rate']:g}: accuracy {top['mean']:.3f} over {seeds}{q} "
                f"(fine-tune {refs['finetuned']:.3f}, base {refs['base']:.3f})")
        self.findings.append(line)
        self.say(line)

    def merge_finding(self) -> None:
        """One line per task: each merge method at the highest rate and lambda, against the fine-tune alone."""
        from deltakit.merge import merge_summary

        table = merge_summary(self.merged, "accuracy")
        lam, rate = max(self.grid.merge_lambdas), max(self.grid.merge_rates)
        at = table[(table["lam"] == lam) & ((table["rate"] == rate) | (table["label"] == "ta"))]
        alone = table[table["label"] == "finetuned"].iloc[0]
        for task in _MERGE:
            methods = ", ".join(f"{r.label} {getattr(r, task):.3f}" for r in at.itertuples())
            line = (f"merge {' + '.join(_MERGE)} on {task} (rate {rate:g}, lambda {lam:g}, mean over seeds): "
                    f"{methods} (fine-tune alone {alone[task]:.3f})")
            self.findings.append(line)
            self.say(line)

    def write(self) -> Path:
        """Rewrite ``index.html`` with everything measured so far (atomically: a reload never sees half a file)."""
        path = write_html_report(self.out / "index.html", title=f"deltakit demo: {self.family}",
                                 sections=self._sections(), intro=self._intro())
        if self.timings["first_result_s"] is None:
            self.timings["first_result_s"] = round(self.elapsed(), 1)
            self.say(f"first result: {path} (reload it as the demo goes on)")
        return path

    def _sections(self) -> list[tuple[str, object]]:
        sections: list[tuple[str, object]] = [("Findings", "\n\n".join(self.findings) or "(measuring)")]
        if self.stats is not None:
            s = self.stats
            sections += [("Delta statistics", s.overall[["model", "numel", "mean_abs", "max_abs", "rel_norm",
                                                        "frac_below_0.005", "p99_abs"]]),
                         ("|delta| distributions", plots.delta_histogram(s.histograms)),
                         ("Where fine-tuning changed the model (sentiment3)",
                          plots.layer_kind_heatmap(s.tensors, f"{self.family}/sentiment3"))]
            if len(s.overall) > 1:
                sections.append(("Similarity of the fine-tunes' deltas", plots.similarity_matrix(s.similarity)))
        for member, results in self.results.items():
            sections.append((f"Accuracy vs pruning rate: {member}", plots.metric_curves(
                results, "accuracy", log_rate=True, interval="minmax",
                title=f"{member}: accuracy vs pruning rate (mean, band from the lowest to the highest seed)")))
            sections.append((f"Table: {member}", summarise(results, "accuracy")[
                ["label", "rate", "mean", "std", "n_seeds", "q"]]))
            if results["q"].notna().any() and (results["method"] == "darex_q_labelled").any():
                sections.append((f"Rescale q chosen by DAREx-q ({member})", plots.q_vs_rate(results)))
        if self.merged is not None:
            from deltakit.merge import merge_summary

            sections.append((f"Merging {' + '.join(_MERGE)}: each task with its own head",
                             merge_summary(self.merged, "accuracy")))
            lam = max(self.grid.merge_lambdas)
            for task in _MERGE:
                sections.append((f"Merged model on {task} (lambda {lam:g})", plots.merge_curves(
                    self.merged, task, "accuracy", lam=lam, interval="minmax")))
        return sections

    def _intro(self) -> str:
        g = self.grid
        n_test = "all" if g.eval_limit is None else g.eval_limit
        done = self.timings["total_s"] is not None
        state = (f"Finished in {self.timings['total_s']:.0f} s (building the fine-tunes {self.timings['build_s']:.0f} s, "
                 f"statistics {self.timings['stats_s']:.0f} s, sweeps {self.timings['sweeps_s']:.0f} s)." if done else
                 f"Still running ({self.elapsed():.0f} s so far): reload this page to see the next results.")
        return (f"Family {self.family}: base and fine-tunes built offline by deltakit. Each sweep point rewrites the "
                f"prunable tensors of the resident model and evaluates accuracy on {n_test} test examples (a fixed "
                f"seeded subset of the test split); DAREx-q searches q on {g.search_limit} validation examples. "
                f"Seeds {list(g.seeds)}; the bands span the seeds' lowest to highest accuracy (with two seeds, the "
                f"half-width of a 95% interval of the mean would be about nine standard deviations).\n\n{state}")


def run_demo(out: str | Path = "deltakit-demo", *, family: str = "minilm-tweets", grid: DemoGrid = DEMO,
             progress: bool = True, echo: Callable[[str], None] = print) -> Path:
    """Run the demo, writing ``out/index.html`` early and rewriting it as each result comes in.

    Args:
        out: output folder (results are resumable: rerunning skips finished sweep points).
        family: the embedded family (``tiny`` for a seconds-long smoke run).
        grid: :data:`DEMO` (the default, within the budget) or :data:`FULL` (the fidelity grid), or your own.
        progress: progress bars.
        echo: where the story lines and the final JSON line of timings go.

    Returns:
        The path of ``index.html``.

    Raises:
        deltakit.store.StoreError: ``out`` cannot be written (checked before anything is built).
        ValueError: a grid that cannot run (e.g. ``eval_limit`` 0), before anything is built.
    """
    from deltakit.families import build_family

    out = Path(out)
    check_writable_folder(out)  # before minutes of building, not after
    story = _Story(out, family, grid, echo)
    ref = f"family:{family}/{{}}".format
    built: list[str] = []
    # One sweep per method, so that each finding is reported as soon as it is measured; the reference points are
    # computed by a member's first sweep and found in its results store by the next ones. The specs are built (and
    # so checked) before anything else runs.
    specs = [SweepSpec(ref("base"), ref(member), methods=[method], rates=grid.rates, seeds=grid.seeds,
                       eval_limit=grid.eval_limit, search_limit=grid.search_limit) for member, method in _PLAN]
    merging = all(m in get_family(family).members for m in _MERGE)
    merge_spec = MergeSpec(ref("base"), [ref(m) for m in _MERGE], methods=_MERGE_METHODS, rates=grid.merge_rates,
                           lambdas=grid.merge_lambdas, seeds=grid.seeds, eval_limit=grid.eval_limit) if merging else None
    for (member, _), spec in zip(_PLAN, specs):
        if member not in built:  # build a member only when its turn comes: the first result does not wait
            new = [member] + ([] if built else list(grid.extra_members))
            story.say(f"building {', '.join(new)} (once per machine)")
            story.timed("build_s", lambda: build_family(family, members=new, progress=progress))
            built += new
            story.stats = story.timed("stats_s", lambda: delta_stats(ref("base"), [ref(m) for m in built],
                                                                    progress=progress))
            story.stats.save(out / "stats")
            story.say("delta statistics of " + ", ".join(built))
        rows = story.timed("sweeps_s", lambda: sweep(spec, RunOptions(out=out / "sweeps" / member,
                                                                      progress=progress)))
        story.results[member] = pd.concat([story.results.get(member), rows]).drop_duplicates(["key", "metric"])
        story.finding(member, spec.methods[0].label)
        story.write()
    if merge_spec is not None:
        new = [m for m in _MERGE if m not in built]
        story.say(f"building {', '.join(new)} (once per machine)")
        story.timed("build_s", lambda: build_family(family, members=new, progress=progress))
        story.merged = story.timed("sweeps_s", lambda: merge_sweep(merge_spec, RunOptions(
            out=out / "sweeps" / "merge", progress=progress)))
        story.merge_finding()
        story.write()
    frames = [r.assign(member=m) for m, r in story.results.items()]
    if story.merged is not None:
        frames.append(story.merged.assign(member="+".join(_MERGE)))
    results = pd.concat(frames, ignore_index=True)
    results.assign(params=results["params"].astype(str)).to_parquet(out / "results.parquet", index=False)
    story.timings["total_s"] = round(story.elapsed(), 1)
    story.timings.update({k: round(v, 1) for k, v in story.timings.items() if k in ("build_s", "stats_s", "sweeps_s")})
    path = story.write()
    echo(json.dumps(story.timings))
    return path
