"""Merging homologous fine-tunes: the resident merged model and merge sweeps.

DARE was introduced to merge (Yu et al. 2024, "Language Models are Super Mario", arXiv:2311.03099): drop most of
each fine-tune's delta, rescale, and add several deltas to one base, so that one model absorbs several abilities.
Here a merge is K pruned deltas plus a combine step (``deltakit.methods.merging``), run like a prune:

* :class:`MergedModel` loads each fine-tune once (its own classification head), makes the K models share one set of
  merged parameters (the prunable set), and keeps the base and the K fine-tuned values of every merged tensor
  beside them. A point rewrites the shared parameters in place -- one fused pass per tensor
  (``deltakit.kernels.merge.fused_merge``: Triton on CUDA) -- and every task is evaluated with its own head.
  Tensors outside the merged set (the heads, anything excluded) keep each fine-tune's own values, as the DARE paper
  does for encoders.
* :func:`merge_sweep` runs a :class:`~deltakit.spec.MergeSpec` over (method, rate, lambda, seed): every point is
  appended to the same results store as prune sweeps (one record per point, its metrics per task), so a killed
  sweep resumes; the tidy result has one row per (point, task, metric).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from deltakit import masks
from deltakit.kernels.merge import fused_merge
from deltakit.methods import get_merge
from deltakit.methods.merging import merge_keys
from deltakit.pairing import DEFAULT_PRESET, PairingError, pair_models
from deltakit.prune import check_finite_delta
from deltakit.refs import Snapshot
from deltakit.resident import load_model, load_tokenizer, require_local
from deltakit.sources import resolve
from deltakit.spec import MergeSpec, MethodSpec, RunOptions
from deltakit.store import ResultStore, fingerprint, point_key
from deltakit.sweep import default_evaluator, run_points
from deltakit.tensors import TensorReader

__all__ = ["MergedModel", "merge_summary", "merge_sweep", "task_label", "write_merge_report"]

Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class _MergeTarget:
    name: str
    param: torch.nn.Parameter  # shared by the K models
    base: torch.Tensor
    fts: torch.Tensor  # (K, *shape), the fine-tunes' values
    u: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # seed -> one stream per fine-tune (CPU cache)
    plans: dict[tuple, Any] = field(default_factory=dict)  # (method, params, rate) -> MergePlan


def task_label(snapshot: Snapshot) -> str:
    """A fine-tune's short label in merge results: a family member's name, else the last part of its reference."""
    return snapshot.ref.rstrip("/").rsplit("/", 1)[-1]


class MergedModel:
    """K fine-tunes of one base, loaded once, sharing one set of merged parameters; each keeps its own head.

    Args:
        base / fine_tunes: snapshots (:func:`deltakit.sources.resolve`); 1 to 8 fine-tunes.
        preset / include / exclude: the merged set (:mod:`deltakit.pairing`); it must be the same for every fine-tune.
        device: where the models live.
        model_loader: ``path -> nn.Module``; default :func:`deltakit.resident.load_model` (never runs a
            checkpoint's code).
        cache_uniforms: keep each seed's uniform numbers per tensor and fine-tune (CPU; 4 bytes x K per merged
            parameter per seed).

    Raises:
        deltakit.pairing.PairingError: a fine-tune is not homologous to the base, or the fine-tunes' merged sets
            differ.
        ValueError: nothing to merge, or a merged tensor is not a parameter of a loaded model.
    """

    def __init__(self, base: Snapshot, fine_tunes: Sequence[Snapshot], *, preset: str = DEFAULT_PRESET,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", model_loader: Callable[[Path], torch.nn.Module] | None = None,
                 cache_uniforms: bool = True) -> None:
        require_local(base, *fine_tunes)
        self.base_snapshot, self.ft_snapshots = base, list(fine_tunes)
        self.device = torch.device(device)
        base_reader = TensorReader(base.path)
        pairings = [pair_models(base, ft, preset=preset, include=include, exclude=exclude, base_reader=base_reader,
                                ft_reader=TensorReader(ft.path)) for ft in self.ft_snapshots]
        merged = [{(p.name, p.shape) for p in pairing.prunable()} for pairing in pairings]
        for ft, names in zip(self.ft_snapshots[1:], merged[1:]):
            if names != merged[0]:
                odd = sorted(n for n, _ in names ^ merged[0])[:3]
                raise PairingError(f"{ft.label!r} and {self.ft_snapshots[0].label!r} do not share one merged set "
                                   f"(e.g. {odd}): merge fine-tunes of one base and architecture, or narrow the set "
                                   "with --include / --exclude.")
        self.preset = pairings[0].preset  # "auto" resolved
        if not merged[0]:
            raise ValueError(f"nothing to merge: preset {preset!r} with include={list(include or [])} and "
                             f"exclude={list(exclude or [])} selects no tensor. Loosen --exclude / --include.")
        self.models = [(model_loader(ft.path) if model_loader else load_model(ft)).to(self.device).eval()
                       for ft in self.ft_snapshots]
        self.tokenizers = [load_tokenizer(ft) for ft in self.ft_snapshots]
        params = [dict(model.named_parameters()) for model in self.models]
        self.targets: list[_MergeTarget] = []
        for pair in pairings[0].prunable():
            param = params[0].get(pair.name)
            if param is None:
                raise ValueError(f"checkpoint tensor {pair.name!r} is not a parameter of the loaded model; exclude it.")
            base_t = base_reader.read(pair.base_name).to(self.device, param.dtype)
            fts = []
            for k, model in enumerate(self.models):
                fts.append(params[k][pair.name].detach().clone())
                check_finite_delta(base_t, fts[-1], f"{pair.name} of {self.ft_snapshots[k].ref}",
                                   fix=f"fix the checkpoint, or leave the tensor out of the merge (--exclude "
                                       f"'{re.escape(pair.name)}')")
                if k:  # the K models share one parameter object: a merge is written once
                    module_name, _, leaf = pair.name.rpartition(".")
                    setattr(model.get_submodule(module_name), leaf, param)
            self.targets.append(_MergeTarget(pair.name, param, base_t, torch.stack(fts)))
        self.cache_uniforms = cache_uniforms and self.device.type == "cpu"

    @property
    def k(self) -> int:
        return len(self.models)

    def _uniforms(self, t: _MergeTarget, seed: int) -> list[torch.Tensor] | None:
        if not self.cache_uniforms:
            return None
        if seed not in t.u:
            t.u[seed] = [masks.uniform(key, t.base.numel()) for key in merge_keys(seed, t.name, self.k)]
        return t.u[seed]

    @torch.no_grad()
    def apply(self, method: str, *, rate: float, seed: int, lam: float = 1.0, backend: str = "auto",
              **params: Any) -> None:
        """Write ``base + method(deltas)`` into the shared parameters (one fused pass per tensor when it has a plan).

        Raises:
            KeyError: unknown merge method. ValueError: a bad rate, lambda or parameter.
        """
        info = get_merge(method)
        for t in self.targets:
            if info.plan is None:  # della: per-element probabilities, torch only
                deltas = [ft.float() - t.base.float() for ft in t.fts]
                t.param.data.copy_(t.base.float() + info.unchecked(deltas, rate=rate, seed=seed, name=t.name,
                                                                   lam=lam, **params))
                continue
            cache = (method, json.dumps(params, sort_keys=True, default=str), rate)
            if cache not in t.plans:
                t.plans[cache] = info.plan([ft.float() - t.base.float() for ft in t.fts], rate=rate, **params)
            plan = t.plans[cache]
            fused_merge(t.param.data, t.base, t.fts, plan, keys=merge_keys(seed, t.name, self.k), rate=rate, lam=lam,
                        u=self._uniforms(t, seed) if plan.random else None, backend=backend)

    @torch.no_grad()
    def set_body(self, source: int | str) -> None:
        """Put a whole model's values in the shared parameters: fine-tune ``k`` (its index) or ``"base"``."""
        for t in self.targets:
            t.param.data.copy_(t.base if source == "base" else t.fts[source])


def _default_evaluators(spec: MergeSpec, mm: MergedModel, fts: list[Snapshot]) -> list[Evaluator]:
    tasks = spec.tasks or (None,) * len(fts)
    return [default_evaluator(ft, tok, task=task, split=spec.split, limit=spec.eval_limit)
            for ft, tok, task in zip(fts, mm.tokenizers, tasks)]


def _run_point(mm: MergedModel, evaluators: list[Evaluator], labels: list[str], spec: MethodSpec, rate: float,
               lam: float, seed: int, *, backend: str) -> dict[str, Any]:
    """Apply one point (a merge, or a reference), evaluate every task with its own head; never raises."""
    params = dict(spec.params)
    record = dict(method=spec.name, label=spec.label, params=json.dumps(params, default=str), q=math.nan, rate=rate,
                  lam=lam, seed=seed, status="ok", error=None, prep_seconds=math.nan, eval_seconds=math.nan,
                  metrics={})
    t0 = time.perf_counter()
    try:
        reference = spec.name in ("finetuned", "base")
        if not reference:
            mm.apply(spec.name, rate=rate, seed=seed, lam=lam, backend=backend, **params)
        prep = time.perf_counter() - t0
        metrics = {}
        for k, (ev, label) in enumerate(zip(evaluators, labels)):
            if reference:  # each fine-tune alone, or the base body, under task k's head
                mm.set_body(k if spec.name == "finetuned" else "base")
            metrics[label] = {m: float(v) for m, v in ev(mm.models[k]).items()}
        evs = time.perf_counter() - t0 - prep
    except Exception as err:  # a failed point is recorded and the sweep goes on
        return dict(record, status="failed", error=f"{type(err).__name__}: {err}",
                    prep_seconds=time.perf_counter() - t0)
    return dict(record, prep_seconds=prep, eval_seconds=evs, metrics=metrics)


def merge_sweep(spec: MergeSpec, options: RunOptions | None = None, *, evaluators: Sequence[Evaluator] | None = None,
                cancel: threading.Event | None = None, on_point: Callable[[list[dict]], None] | None = None,
                resident: MergedModel | None = None) -> pd.DataFrame:
    """Run a merge sweep: every (method, rate, lambda, seed) point of ``spec``, plus the references, on every task.

    Args:
        spec: what to run (checked when it was built).
        options: where and how (device, backend, results folder, progress); default :class:`RunOptions()`.
        evaluators: one ``model -> dict[str, float]`` per fine-tune (its task); default: each family member's own
            data, or ``spec.tasks``.
        cancel: checked between points (a cancelled sweep returns what it has).
        on_point: called with the tidy rows of each finished point (live plots).
        resident: reuse a loaded :class:`MergedModel` (its models must be the spec's).

    Returns:
        Tidy rows: key, base, fine_tune (the fine-tunes joined by ``+``), method, label, params, rate, lam, seed,
        task, metric, value, status, error, prep_seconds, eval_seconds.

    Raises:
        ValueError: bad run options, or models that cannot be merged (before the first point).
        deltakit.store.StoreError / StoreLockedError: the results folder cannot be written, or is in use.
    """
    options = options or RunOptions()
    device = options.check()
    points = spec.points()
    opened = ResultStore(options.out).writer(wait=options.wait) if options.out is not None else contextlib.nullcontext()
    with opened as store:
        base_s = spec.base if isinstance(spec.base, Snapshot) else resolve(spec.base)
        fts = [ft if isinstance(ft, Snapshot) else resolve(ft) for ft in spec.fine_tunes]
        labels = [task_label(ft) for ft in fts]
        if len(set(labels)) != len(labels):
            labels = [f"{i}:{label}" for i, label in enumerate(labels)]
        mm = resident or MergedModel(base_s, fts, preset=spec.preset, include=spec.include, exclude=spec.exclude,
                                     device=device)
        evs = list(evaluators) if evaluators is not None else _default_evaluators(spec, mm, fts)
        if len(evs) != len(fts):
            raise ValueError(f"evaluators: got {len(evs)} for {len(fts)} fine-tunes; pass one per fine-tune.")
        for ev, model in zip(evs, mm.models):
            if hasattr(ev, "check_model"):
                ev.check_model(model)
        common = dict(spec.key_parts(), preset=mm.preset, base=fingerprint(base_s),
                      fine_tunes=[fingerprint(ft) for ft in fts],
                      evaluators=[getattr(ev, "fingerprint", getattr(ev, "__qualname__", repr(ev))) for ev in evs])
        keys = [point_key(dict(common, method=s.name, params=s.params, rate=r, lam=lam, seed=sd))
                for s, r, lam, sd in points]
        model_labels = dict(base=base_s.ref, fine_tune="+".join(ft.ref for ft in fts))
        try:
            rows = run_points(points, keys, lambda p: _run_point(mm, evs, labels, *p, backend=options.backend),
                              store=store, labels=model_labels, cancel=cancel, on_point=on_point,
                              progress=options.progress, desc="merge")
        finally:
            mm.set_body(0)
    return rows


def merge_summary(results: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """One row per (method label, rate, lambda): the mean over seeds on each task, and the mean over tasks.

    The fine-tunes alone (each on its own task) and the base come first; the rest by method, rate and lambda.
    """
    from deltakit.summary import summarise

    data = summarise(results, metric)
    if "lam" not in data:  # only the references so far (they have no lambda)
        data["lam"] = math.nan
    table = data.pivot_table(index=["label", "rate", "lam"], columns="task", values="mean", dropna=False,
                             sort=False).dropna(how="all")
    table.columns.name = None
    table["mean"] = table.mean(axis=1)
    table = table.reset_index()
    first = table["label"].map({"finetuned": 0, "base": 1}).fillna(2)
    return table.assign(_first=first).sort_values(["_first", "label", "rate", "lam"]).drop(columns="_first")


def write_merge_report(results: pd.DataFrame, path: str | Path, *, metric: str = "accuracy",
                       title: str = "deltakit merge report") -> Path:
    """An HTML report of a merge sweep: per-task curves at each lambda, the task-by-task table, a lambda slice.

    Returns:
        The written path.
    """
    from deltakit.plots import lambda_slice, merge_curves
    from deltakit.report import write_html_report

    ok = results[(results["status"] == "ok") & (results["metric"] == metric)]
    tasks = list(dict.fromkeys(ok["task"].dropna()))
    lambdas = sorted(ok["lam"].dropna().unique())
    rates = sorted(r for r in ok.loc[ok["lam"].notna(), "rate"].unique() if r > 0)
    sections: list[tuple[str, object]] = [("Mean over seeds, per task", merge_summary(results, metric))]
    for task in tasks:
        for lam in lambdas:
            sections.append((f"{task}, lambda {lam:g}", merge_curves(results, task, metric, lam=lam)))
        if len(lambdas) > 1 and rates:
            sections.append((f"{task}: lambda slice", lambda_slice(results, task, metric, rate=rates[-1])))
    intro = ("Each fine-tune keeps its own head; the merged body is evaluated once per task with that task's head. "
             "Dashed lines: the fine-tune alone and the base with the task's head; dotted: task arithmetic (which "
             "drops nothing). Curves: the mean over seeds with a 95% interval.")
    return write_html_report(path, title=title, sections=sections, intro=intro)
