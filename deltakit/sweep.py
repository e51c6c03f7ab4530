"""Pruning-rate sweeps: each point rewrites the resident model's prunable tensors in place, then evaluates it.

A sweep is a :class:`~deltakit.spec.SweepSpec` (what to run) plus :class:`~deltakit.spec.RunOptions` (where and
how). The fine-tune is loaded once (:class:`~deltakit.resident.ResidentModel`); a point is: the registry entry's
``prepare`` step if it has one (a DAREx-q search, WANDA's activation norms), the apply (one fused pass per
tensor), one evaluation.

Every point is a pure function of its key -- a hash of everything that defines it (the models' content
fingerprints, preset, method, params, rate, seed, evaluator fingerprint). Results are appended to
``<out>/results.jsonl`` (:mod:`deltakit.store`: one record per finished point, on disk whole or not at all; one
sweep writes a folder at a time), so a killed sweep loses at most the point in flight, and rerunning the same
sweep skips completed points. ``results.parquet`` is rewritten at the end. The result is a tidy DataFrame:
one row per (point, metric).

Where the points run is a runner's business (:class:`LocalRunner`, this process; :class:`deltakit.ray_runner.RayRunner`,
one resident model per Ray worker); planning, skipping stored points and writing the store stay here, in
:func:`run_points`, the one loop every sweep shares.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch
from tqdm.auto import tqdm

from deltakit.memory import PeakMemory, is_out_of_memory
from deltakit.methods import Prepared, get_method
from deltakit.resident import ResidentModel
from deltakit.sources import Snapshot, resolve
from deltakit.spec import MethodSpec, RunOptions, SweepSpec
from deltakit.store import ResultStore, StoreError, fingerprint, point_key, tidy_rows
from deltakit.tensors import CheckpointChangedError

__all__ = ["LocalRunner", "Runner", "RunningSweep", "SweepContext", "SweepWorker", "default_evaluator",
           "evaluator_fingerprint", "failed_record", "in_order", "run_points", "sweep"]

Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class SweepContext:
    """What a registry entry's prepare step may use (:class:`deltakit.methods.PrepareContext`): the resident
    model, and the search evaluator and calibration data built on first use and kept for the whole sweep.

    Attributes:
        rm: the resident model.
        make_search_evaluator: builds the labelled validation evaluator (called once, on first use).
        calibration_texts: builds the unlabelled calibration texts (called once, on first use).
    """

    rm: ResidentModel
    make_search_evaluator: Callable[[], Evaluator]
    calibration_texts: Callable[[], list[str]]
    _cache: dict = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.rm.model

    @property
    def targets(self) -> list:
        return self.rm.targets

    def weights(self, target) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rm.weights(target)

    def apply(self, method: str, **kwargs: Any) -> None:
        self.rm.apply(method, **kwargs)

    def restore(self) -> None:
        self.rm.restore()

    def search_evaluator(self) -> Evaluator:
        return self.memo(("search_evaluator",), self.make_search_evaluator)

    def batches(self) -> list[dict[str, torch.Tensor]]:
        from deltakit.calibration import calibration_batches

        max_length = min(128, int(getattr(self.model.config, "max_position_embeddings", 128)))
        return self.memo(("batches",), lambda: calibration_batches(self.rm.tokenizer, self.calibration_texts(),
                                                                   max_length=max_length))

    def activations(self):
        """Activation statistics of the *fine-tuned* model (computed once)."""
        from deltakit.calibration import collect_activations

        def compute():
            self.rm.restore()
            return collect_activations(self.model, self.batches())

        return self.memo(("activations",), compute)

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def default_evaluator(fine_tune: Snapshot, tokenizer, *, task: str | None, split: str, limit: int | None,
                      batch_size: int = 64, max_length: int = 128):
    """The evaluator for a fine-tune: its own family task data, or ``task`` (see :func:`deltakit.evaluate.load_split`).

    A classifier is scored by :class:`~deltakit.evaluate.ClassificationEvaluator`, inputs truncated to
    ``max_length`` tokens (or the model's ``max_position_embeddings`` if smaller). A decoder LM
    (:func:`deltakit.pairing.is_causal_lm`) is scored by its family task's :class:`~deltakit.lm_eval.LMTask`
    (a ``family:`` task) or by the task :func:`deltakit.lm_eval.infer_lm_task` reads from the data's columns
    (``choices``: multiple choice; ``answer``: generation; ``text``: perplexity).
    """
    from deltakit.evaluate import GLUE_TASKS, ClassificationEvaluator, load_split
    from deltakit.pairing import is_causal_lm

    source = task or (fine_tune.ref if fine_tune.kind == "family" else None)
    if source is None:
        raise ValueError(f"no evaluation task for {fine_tune.ref!r}: pass task= (e.g. 'glue/sst2', a dataset id, or a "
                         "parquet file) or an evaluator callable.")
    ds = load_split(source, split, limit=limit)
    if is_causal_lm(fine_tune):
        ev = _lm_task(source, ds).evaluator(ds, tokenizer, batch_size=32)
        ev.fingerprint = f"{source}:{split}:{limit}:{getattr(ds, '_fingerprint', len(ds))}:{ev.fingerprint}"
        return ev
    max_length = min(max_length, int(fine_tune.config.get("max_position_embeddings", max_length)))
    if source.startswith("glue/"):
        g = GLUE_TASKS[source[5:]]
        ev = ClassificationEvaluator(ds, tokenizer, text_column=g.text, text_pair_column=g.text_pair,
                                     regression=g.regression, glue_score=g.score, batch_size=batch_size,
                                     max_length=max_length)
    else:
        ev = ClassificationEvaluator(ds, tokenizer, batch_size=batch_size, max_length=max_length)
    ev.fingerprint = f"{source}:{split}:{limit}:{getattr(ds, '_fingerprint', len(ds))}:{max_length}"
    return ev


def _lm_task(source: str, ds):
    """The LM task scoring ``source``: a decoder family member's own, else the one the columns call for."""
    from deltakit.families import get_family
    from deltakit.lm_eval import infer_lm_task
    from deltakit.sources import FAMILY_PREFIX, ModelRef

    if source.startswith(FAMILY_PREFIX):
        ref = ModelRef.parse(source)
        family = get_family(ref.family)
        if family.model_kind == "causal_lm":
            from deltakit.families.lm import lm_task

            return lm_task(family.task_of(ref.member)).evaluation
    return infer_lm_task(ds)


def _train_texts(fine_tune: Snapshot, task: str | None, n: int = 64) -> list[str]:
    from deltakit.evaluate import load_split

    source = task or (fine_tune.ref if fine_tune.kind == "family" else None)
    if source is None:
        raise ValueError("calibration needs texts: pass calibration_texts= or task=.")
    ds = load_split(source, "train", limit=n)
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return list(ds[column])


def _q_of(info, rate: float, params: dict[str, Any]) -> float:
    """The DAREx-q rescale a random mask-and-scale method applies: ``1 / scale`` (DARE: ``1 - rate``); NaN for
    methods without one, and at rate 1, where nothing is kept."""
    if info.plan is None or rate >= 1.0:
        return math.nan
    scale = info.plan(torch.empty(1, 1), rate=rate, **params).scale
    return 1.0 / scale if isinstance(scale, float) else math.nan


def _run_point(ctx: SweepContext, ev: Evaluator, spec: MethodSpec, rate: float, seed: int, *,
               backend: str, on_oom: Callable[[BaseException], bool] | None = None) -> dict[str, Any]:
    """Prepare (if the entry has a prepare step), apply, evaluate; return the point's record.

    Raises only :class:`~deltakit.tensors.CheckpointChangedError`; any other error is recorded. When the point runs
    out of memory and ``on_oom(err)`` says it lowered the memory tier, the point runs once more.

    The record is in :mod:`deltakit.store`'s format, less the key and model labels that the sweep adds.
    """
    info = get_method(spec.name)
    params = dict(spec.params)
    record = _point_record(spec, rate, seed)
    t0 = time.perf_counter()
    try:
        prepared = info.prepare(ctx, rate=rate, seed=seed, backend=backend, **(params if info.applies_as else {})) \
            if info.prepare else Prepared()
        # A prepared entry's own parameters belong to its prepare step; a tensor method's to its apply.
        apply_params = dict(prepared.params) if info.applies_as else dict(params, **prepared.params)
        ctx.apply(info.applied, rate=rate, seed=seed, backend=backend, params_for=prepared.params_for,
                  **apply_params)
        record["q"] = prepared.q if info.prepare else _q_of(info, rate, apply_params)
        if prepared.record:
            record["params"] = json.dumps(dict(params, **prepared.record), default=str)
        prep = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = {name: float(value) for name, value in ev(ctx.model).items()}
        evs = time.perf_counter() - t1
    except CheckpointChangedError:
        raise  # every later point would be wrong: stop (finished points are stored)
    except Exception as err:  # a failed point is recorded and the sweep goes on
        if on_oom is not None and is_out_of_memory(err) and on_oom(err):
            return _run_point(ctx, ev, spec, rate, seed, backend=backend)
        return dict(record, status="failed", error=f"{type(err).__name__}: {err}",
                    prep_seconds=time.perf_counter() - t0)
    return dict(record, prep_seconds=prep, eval_seconds=evs, metrics=metrics)


def _point_record(spec: MethodSpec, rate: float, seed: int) -> dict[str, Any]:
    """A point's record before it runs: status ok, no metrics yet."""
    return dict(method=spec.name, label=spec.label, params=json.dumps(dict(spec.params), default=str), q=math.nan,
                rate=rate, seed=seed, status="ok", error=None, prep_seconds=math.nan, eval_seconds=math.nan,
                metrics={})


def failed_record(point: tuple[MethodSpec, float, int], error: str) -> dict[str, Any]:
    """The record of a (method, rate, seed) point that could not run (e.g. its worker died): status failed,
    ``error`` says why; a rerun of the sweep retries it."""
    return dict(_point_record(*point), status="failed", error=error)


def _memory_needs(spec: SweepSpec) -> dict[str, Any]:
    """What the memory plan needs to know of a spec: how many seeds the uniform cache would hold, and whether a
    method computes whole-tensor deltas (methods without a fused plan, and prepare steps that read deltas)."""
    infos = [get_method(s.name) for s in spec.methods]
    random = any(i.random for i in infos)
    return dict(n_seeds=len(spec.seeds) if random else 0,
                full_delta=any(i.plan is None or i.prepare is not None for i in infos))


def _lower_tier(rm: ResidentModel, err: BaseException) -> bool:
    """After an out-of-memory error, lower the tier once and say so; False when it cannot be lowered."""
    change = rm.step_down(err)
    if change is not None:
        warnings.warn(f"deltakit: {change}; the point runs again, finished points are kept.", stacklevel=2)
    return change is not None


def _measured(rm: ResidentModel, peak: PeakMemory, record: dict[str, Any]) -> dict[str, Any]:
    """The record with the tier it ran in and the peak memory so far (host resident set, CUDA allocations)."""
    device_peak = peak.device_peak()
    return dict(record, tier=rm.tier, peak_host_mb=round(peak.host() / 2**20, 1),
                peak_device_mb=None if device_peak is None else round(device_peak / 2**20, 1))


class SweepWorker:
    """One loaded sweep, ready to run points: the resident model, the evaluator and the prepare context, built once.

    The in-process runner builds one; each Ray actor (:mod:`deltakit.ray_runner`) builds its own from the same spec.
    :attr:`common` is what every point key of this sweep shares (the models' content fingerprints, the prunable-set
    preset as paired, the evaluator's fingerprint), so two workers that loaded the same models agree on it.

    Args:
        spec: what to run; ``spec.base`` / ``spec.fine_tune`` may be references or resolved snapshots.
        options: checked run options. device: ``options.check()``'s result.
        evaluator / search_evaluator / calibration_texts / resident: as for :func:`sweep`.
    """

    def __init__(self, spec: SweepSpec, options: RunOptions, device: torch.device, *,
                 evaluator: Evaluator | None = None, search_evaluator: Evaluator | None = None,
                 calibration_texts: Sequence[str] | None = None, resident: ResidentModel | None = None) -> None:
        base_s = spec.base if isinstance(spec.base, Snapshot) else resolve(spec.base)
        ft_s = spec.fine_tune if isinstance(spec.fine_tune, Snapshot) else resolve(spec.fine_tune)
        self.backend = options.backend
        self.peak = PeakMemory(device)
        self.peak.reset()
        rm = resident or ResidentModel(base_s, ft_s, preset=spec.preset, include=spec.include, exclude=spec.exclude,
                                       shared_rows=spec.shared_rows, device=device, max_memory=options.max_memory,
                                       tier=options.tier, cache_uniforms=options.cache_uniforms,
                                       **_memory_needs(spec))
        self.rm = rm
        if options.progress:
            print(f"deltakit: {rm.memory.describe()}", file=sys.stderr, flush=True)
        ev = evaluator or default_evaluator(ft_s, rm.tokenizer, task=spec.task, split=spec.split,
                                            limit=spec.eval_limit)
        if hasattr(ev, "check_model"):
            ev.check_model(rm.model)
        self.ev = ev
        self.ctx = SweepContext(
            rm,
            (lambda: search_evaluator) if search_evaluator is not None else
            (lambda: default_evaluator(ft_s, rm.tokenizer, task=spec.task, split="validation",
                                       limit=spec.search_limit)),
            (lambda: list(calibration_texts)) if calibration_texts is not None else
            (lambda: _train_texts(ft_s, spec.task)),
        )
        self.common: dict[str, Any] = dict(spec.key_parts(), preset=rm.pairing.preset, base=fingerprint(base_s),
                                           fine_tune=fingerprint(ft_s), evaluator=evaluator_fingerprint(ev))
        self.labels = dict(base=base_s.ref, fine_tune=ft_s.ref)

    @property
    def memory(self) -> str:
        """The memory plan, in words (:meth:`deltakit.memory.MemoryPlan.describe`)."""
        return self.rm.memory.describe()

    def run(self, point: tuple[MethodSpec, float, int]) -> dict[str, Any]:
        """Run one (method, rate, seed) point; its record with the memory tier and peak (never raises, except
        :class:`~deltakit.tensors.CheckpointChangedError`)."""
        return _measured(self.rm, self.peak, _run_point(self.ctx, self.ev, *point, backend=self.backend,
                                                        on_oom=lambda err: _lower_tier(self.rm, err)))

    def restore(self) -> None:
        """Put the fine-tuned weights back (after the last point, or when the sweep stops on an error)."""
        with contextlib.suppress(CheckpointChangedError):  # the sweep has stopped on it, or had finished
            self.rm.restore()


def evaluator_fingerprint(ev: Evaluator) -> str:
    """What pins an evaluator in the point keys: its ``fingerprint`` attribute, else its qualified name."""
    return getattr(ev, "fingerprint", getattr(ev, "__qualname__", repr(ev)))


Dispatch = Callable[[Sequence[tuple[int, Any]], threading.Event | None], Iterator[tuple[int, dict[str, Any]]]]
"""``(pending, cancel) -> (index, record), ...``: runs the pending ``(index, point)`` pairs and yields each record
as it finishes, in any order; it stops handing out points once ``cancel`` is set (points in flight still finish)."""


@runtime_checkable
class Runner(Protocol):
    """Where a sweep's points run: :class:`LocalRunner` (this process) or :class:`deltakit.ray_runner.RayRunner`.

    A runner only runs points; the driver (:func:`sweep`) plans them, skips stored ones and is the only writer of
    the results store.
    """

    def check(self, options: RunOptions) -> None:
        """Refuse run options this runner cannot use, before the store opens or anything loads."""
        ...

    def open(self, spec: SweepSpec, options: RunOptions, *, evaluator: Evaluator | None,
             search_evaluator: Evaluator | None, calibration_texts: Sequence[str] | None,
             resident: ResidentModel | None) -> contextlib.AbstractContextManager[RunningSweep]:
        """Load the sweep's models wherever the points run; the context gives its :class:`RunningSweep`."""
        ...


@dataclass
class RunningSweep:
    """A loaded sweep as the driver sees it.

    Attributes:
        common: the key parts every point shares (:attr:`SweepWorker.common`).
        labels: the model references added to every record.
        memory: the memory plan in words (per worker), asked when the sweep ends (a tier lowered on the way says so).
        dispatch: runs pending points (:data:`Dispatch`).
    """

    common: dict[str, Any]
    labels: dict[str, str]
    memory: Callable[[], str]
    dispatch: Dispatch


def in_order(run: Callable[[Any], dict[str, Any]]) -> Dispatch:
    """The in-process dispatch: the pending points one after the other, checking ``cancel`` before each."""

    def dispatch(pending: Sequence[tuple[int, Any]], cancel: threading.Event | None) -> Iterator[tuple[int, dict]]:
        for index, point in pending:
            if cancel is not None and cancel.is_set():
                return
            yield index, run(point)

    return dispatch


class LocalRunner:
    """Run every point in this process, on ``options.device`` (the default runner)."""

    def check(self, options: RunOptions) -> None:
        options.check()

    @contextlib.contextmanager
    def open(self, spec: SweepSpec, options: RunOptions, *, evaluator: Evaluator | None = None,
             search_evaluator: Evaluator | None = None, calibration_texts: Sequence[str] | None = None,
             resident: ResidentModel | None = None) -> Iterator[RunningSweep]:
        worker = SweepWorker(spec, options, options.check(), evaluator=evaluator, search_evaluator=search_evaluator,
                             calibration_texts=calibration_texts, resident=resident)
        try:
            yield RunningSweep(worker.common, worker.labels, lambda: worker.memory, in_order(worker.run))
        finally:
            worker.restore()


def sweep(
    spec: SweepSpec,
    options: RunOptions | None = None,
    *,
    evaluator: Evaluator | None = None,
    search_evaluator: Evaluator | None = None,
    calibration_texts: Sequence[str] | None = None,
    cancel: threading.Event | None = None,
    on_point: Callable[[list[dict]], None] | None = None,
    resident: ResidentModel | None = None,
    runner: Runner | None = None,
) -> pd.DataFrame:
    """Run a sweep: every point of ``spec`` (methods x rates x seeds, plus the references), evaluated.

    Args:
        spec: what to run (checked when it was built).
        options: where and how (device, backend, the results folder, progress); default :class:`RunOptions()`.
        evaluator: ``model -> dict[str, float]``; default: classification on ``spec.task`` / the family's own data.
        search_evaluator: the labelled evaluator DAREx-q searches maximise (default: the task's ``validation``
            split, at most ``spec.search_limit`` rows) -- never the test split.
        calibration_texts: unlabelled texts for activations (wanda, analytic q) and the output-change proxy
            (default: 64 texts of the task's ``train`` split).
        cancel: an event checked between points (a cancelled sweep returns what it has).
        on_point: called with the tidy rows of each finished point (live plots).
        resident: reuse an already loaded :class:`ResidentModel` (its models must be the spec's; in process only).
        runner: where the points run: :class:`LocalRunner` (default, this process) or
            :class:`deltakit.ray_runner.RayRunner` (one resident model per Ray worker; this process plans the
            points and is the only writer of the store). Every runner gives the same keys and results.

    Returns:
        Tidy rows: key, base, fine_tune, method, label, params, q, rate, seed, metric, value, status, error,
        prep_seconds, eval_seconds.

    Raises:
        ValueError: bad run options, or a model/task mismatch found before the first point.
        deltakit.store.StoreError: the results folder cannot be written (checked before any model loads), or a
            point could not be appended (full disk); StoreLockedError: another sweep is writing to it.
    """
    options = options or RunOptions()
    runner = runner or LocalRunner()
    runner.check(options)
    points = spec.points()
    # The store's checks and its writer lock come before any model loads: a bad or busy folder fails at once.
    opened = ResultStore(options.out).writer(wait=options.wait) if options.out is not None else contextlib.nullcontext()
    with opened as store, runner.open(spec, options, evaluator=evaluator, search_evaluator=search_evaluator,
                                      calibration_texts=calibration_texts, resident=resident) as running:
        keys = [point_key(dict(running.common, method=s.name, params=s.params, rate=r, seed=sd))
                for s, r, sd in points]
        rows = run_points(points, keys, None, dispatch=running.dispatch, store=store, labels=running.labels,
                          cancel=cancel, on_point=on_point, progress=options.progress, desc="sweep")
        rows.attrs["memory"] = running.memory()
    return rows


def run_points(points: Sequence[Any], keys: Sequence[str], run: Callable[[Any], dict[str, Any]] | None, *,
               store: ResultStore | None, labels: dict[str, str], cancel: threading.Event | None,
               on_point: Callable[[list[dict]], None] | None, progress: bool, desc: str,
               dispatch: Dispatch | None = None) -> pd.DataFrame:
    """The loop every sweep shares: skip stored points, run the others, append each record, report rows.

    Args:
        points / keys: the points in run order and their keys (a key listed twice runs once).
        run: ``point -> record`` (never raises), run in order in this process; or None with ``dispatch``.
        store: the open results store, or None. labels: fields added to every record (model references).
        cancel: checked between points. on_point: called with each new point's tidy rows. progress / desc: the bar.
        dispatch: runs the pending points elsewhere and yields their records as they finish (:data:`Dispatch`);
            this loop stays the only writer of the store.

    Returns:
        The tidy rows of this run's points: the stored ones (the store may hold other runs' points too) and the new.
    """
    if (run is None) == (dispatch is None):
        raise TypeError("run_points takes exactly one of run (a point -> record callable) and dispatch.")
    dispatch = dispatch or in_order(run)
    own = set(keys)
    stored = [r for r in (store.records() if store else []) if r["status"] == "ok" and r["key"] in own]
    done = {r["key"] for r in stored}
    rows_out = [row for r in stored for row in tidy_rows(r)]
    pending, planned = [], set(done)
    for index, (point, key) in enumerate(zip(points, keys)):
        if key not in planned:
            planned.add(key)
            pending.append((index, point))
    bar = tqdm(total=len(points), desc=desc, unit="point", disable=not progress)
    bar.update(len(points) - len(pending))
    try:
        for index, result in dispatch(pending, cancel):
            record = dict(result, key=keys[index], **labels)
            if store:
                store.append(record)
            rows = tidy_rows(record)
            rows_out.extend(rows)
            if on_point is not None:
                on_point(rows)
            bar.update(1)
    except BaseException:
        if store:  # the parquet mirrors what is stored even when the sweep stops on an error
            with contextlib.suppress(StoreError):
                store.write_parquet()
        raise
    finally:
        bar.close()
    if store:
        store.write_parquet()
    return pd.DataFrame(rows_out)
