"""Pruning-rate sweeps: the model stays resident; each point rewrites the prunable tensors in place and evaluates.

DESIGN.md decision 5. MergeLM reloads the model from disk for every pruning rate; here the fine-tuned model is
loaded once onto the device, the base and fine-tuned values of every prunable tensor are kept beside it, and a
point is one fused pass per tensor (``deltakit.prune.apply_method``) plus one evaluation. On CPU the uniform
numbers of a seed are computed once per tensor and reused by every rate and random method (masks are nested
across rates by construction: common random numbers give smooth curves).

Every point is a pure function of its key -- a hash of everything that defines it (model snapshots, preset,
method, params, rate, seed, evaluator fingerprint). Results are appended to ``<out>/results.jsonl`` one line per
finished point (flushed and fsynced), so a killed sweep loses at most the point in flight, and rerunning the same
sweep skips completed points. ``results.parquet`` is rewritten at the end. The result is a tidy DataFrame:
one row per (point, metric).

Rates: sorted and de-duplicated (documented normalisation); each must lie in [0, 1].
Seeds: deterministic methods (magnitude, wanda) ignore the seed, so they run once per rate with the first seed.
Reference rows: ``method="finetuned"`` (rate 0) and ``method="base"`` (every prunable tensor at its base value,
rate 1; non-prunable tensors such as the new head keep their fine-tuned values).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from deltakit.darex_search import STRATEGIES, SearchContext
from deltakit.pairing import pair_models
from deltakit.sources import Snapshot, resolve
from deltakit.stats import json_default
from deltakit.tensors import TensorReader

__all__ = ["MethodSpec", "ResidentModel", "ResultStore", "sweep", "plan_points", "normalise_rates"]

REFERENCE_METHODS = ("finetuned", "base")


@dataclass(frozen=True)
class MethodSpec:
    """One method of a sweep with its fixed parameters (e.g. ``darex_q`` with ``q=0.3``).

    ``parse("darex_q:q=0.3")`` reads the CLI form ``NAME[:KEY=VALUE[,KEY=VALUE...]]`` (values parsed as JSON
    where possible). Names are registry methods (``deltakit.methods.available_methods()``) or DAREx-q search
    strategies (``deltakit.darex_search.STRATEGIES``), which choose ``q`` per point.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str | MethodSpec) -> MethodSpec:
        if isinstance(text, MethodSpec):
            return text
        name, _, rest = text.partition(":")
        params = []
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"method parameter {item!r} in {text!r} must be KEY=VALUE, e.g. darex_q:q=0.3")
            try:
                params.append((key.strip(), json.loads(value)))
            except json.JSONDecodeError:
                params.append((key.strip(), value.strip()))
        return cls(name.strip(), tuple(sorted(params)))

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params)})"


def normalise_rates(rates: Sequence[float]) -> list[float]:
    """Sort and de-duplicate pruning rates; refuse values outside [0, 1] or non-numbers.

    Raises:
        ValueError: empty list, a non-finite rate, or one outside [0, 1] (the message names it).
    """
    if not rates:
        raise ValueError("no pruning rates given: pass e.g. rates=[0.1, 0.5, 0.9, 0.99].")
    out = []
    for r in rates:
        r = float(r)
        if not math.isfinite(r) or not 0.0 <= r <= 1.0:
            raise ValueError(f"pruning rate {r} is outside [0, 1] (rate = fraction of delta entries dropped).")
        out.append(r)
    return sorted(set(out))


class ResultStore:
    """Append-only JSON-lines store of sweep rows, keyed by point; resumable.

    Args:
        folder: where ``results.jsonl`` (and, on :meth:`write_parquet`, ``results.parquet``) live.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "results.jsonl"
        self._lock = threading.Lock()

    def rows(self) -> list[dict]:
        """All complete rows on disk (a partly written last line, from a killed process, is ignored); rows of a
        failed attempt are dropped once a later attempt of the same point succeeded."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        ok = {r["key"] for r in out if r.get("status") == "ok"}
        return [r for r in out if r.get("status") == "ok" or r["key"] not in ok]

    def done_keys(self) -> set[str]:
        """Keys of points finished successfully (failed points are retried by the next run)."""
        return {r["key"] for r in self.rows() if r.get("status") == "ok"}

    def append(self, rows: list[dict]) -> None:
        """Append the rows of one point durably (one write, flushed and fsynced)."""
        text = "".join(json.dumps(r, default=json_default) + "\n" for r in rows)
        with self._lock:
            if self.path.exists() and self.path.stat().st_size:
                with self.path.open("rb") as fh:  # a killed writer may have left a partial line: end it first
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        text = "\n" + text
            with self.path.open("a") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows())

    def write_parquet(self) -> Path:
        out = self.folder / "results.parquet"
        df = self.frame()
        if "params" in df:
            df["params"] = df["params"].astype(str)
        df.to_parquet(out, index=False)
        return out


@dataclass
class _Target:
    name: str
    param: torch.nn.Parameter
    base: torch.Tensor
    ft: torch.Tensor
    u: dict[int, torch.Tensor] = field(default_factory=dict)


class ResidentModel:
    """A fine-tuned model loaded once, with the base and fine-tuned values of its prunable tensors beside it.

    Args:
        base / fine_tune: snapshots (see :func:`deltakit.sources.resolve`).
        preset / include / exclude: the prunable set (:mod:`deltakit.pairing`).
        device: where the model lives.
        model_loader: ``path -> nn.Module``; defaults to ``AutoModelForSequenceClassification.from_pretrained``
            (never with ``trust_remote_code``).
        cache_uniforms: keep each seed's uniform numbers per tensor (CPU; ~4 bytes per prunable parameter per seed).

    Raises:
        deltakit.pairing.PairingError: base and fine-tune are not homologous.
        ValueError: a prunable tensor of the checkpoint is not a parameter of the loaded model.
    """

    def __init__(self, base: Snapshot, fine_tune: Snapshot, *, preset: str = "mergelm_encoder",
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", model_loader: Callable[[Path], torch.nn.Module] | None = None,
                 cache_uniforms: bool = True) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from deltakit.prune import check_finite_delta

        self.base_snapshot, self.ft_snapshot = base, fine_tune
        self.device = torch.device(device)
        base_reader = TensorReader(base.path)
        ft_reader = TensorReader(fine_tune.path)
        self.pairing = pair_models(base, fine_tune, preset=preset, include=include, exclude=exclude,
                                   base_reader=base_reader, ft_reader=ft_reader)
        load = model_loader or (lambda p: AutoModelForSequenceClassification.from_pretrained(p))
        self.model = load(fine_tune.path).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(fine_tune.path) if (fine_tune.path / "tokenizer_config.json").exists() else None
        params = dict(self.model.named_parameters())
        self.targets: list[_Target] = []
        for pair in self.pairing.prunable():
            if pair.rows is not None:
                raise ValueError(f"{pair.name}: pruning tensors with different row counts is not supported; exclude "
                                 "it (exclude=[...]) or resize the vocabularies first.")
            param = params.get(pair.name)
            if param is None:
                raise ValueError(f"checkpoint tensor {pair.name!r} is not a parameter of the loaded model; exclude it.")
            base_t = base_reader.read(pair.base_name).to(self.device, param.dtype)
            ft_t = param.detach().clone()
            check_finite_delta(base_t, ft_t, pair.name)  # once here, so every point can skip the check
            self.targets.append(_Target(pair.name, param, base_t, ft_t))
        self.cache_uniforms = cache_uniforms and self.device.type == "cpu"

    @property
    def n_prunable(self) -> int:
        return sum(t.param.numel() for t in self.targets)

    def uniforms(self, target: _Target, seed: int) -> torch.Tensor | None:
        """The element-wise uniform numbers of (seed, tensor), cached on CPU (None when caching is off)."""
        if not self.cache_uniforms:
            return None
        if seed not in target.u:
            from deltakit import masks

            target.u[seed] = masks.uniform(masks.tensor_key(seed, target.name), target.param.numel())
        return target.u[seed]

    def drop_uniforms(self, seed: int) -> None:
        for t in self.targets:
            t.u.pop(seed, None)

    @torch.no_grad()
    def apply(self, method: str, *, rate: float, seed: int, backend: str = "auto",
              params_for: Callable[[str], dict[str, Any]] | None = None, **params: Any) -> None:
        """Rewrite every prunable parameter with base + pruned delta (in place, one pass per tensor).

        Args:
            method: a registered method name.
            rate: fraction dropped. seed: the mask seed. backend: ``auto`` / ``torch`` / ``triton``.
            params_for: per-tensor parameters (e.g. a per-layer ``q``) by tensor name, merged over ``params``.
            **params: the method's own parameters.
        """
        from deltakit.methods import get_method
        from deltakit.prune import apply_method

        info = get_method(method)
        for t in self.targets:
            extra = dict(params, **(params_for(t.name) if params_for else {}))
            u = self.uniforms(t, seed) if info.plan is not None and _element_axis(info, t, rate, extra) else None
            apply_method(t.param.data, t.base, t.ft, method=method, rate=rate, seed=seed, name=t.name,
                         backend=backend, u=u, allow_nonfinite=True, **extra)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the fine-tuned values back."""
        for t in self.targets:
            t.param.data.copy_(t.ft)

    @torch.no_grad()
    def set_base(self) -> None:
        """Put the base values into every prunable tensor (non-prunable tensors keep fine-tuned values)."""
        for t in self.targets:
            t.param.data.copy_(t.base)


def _element_axis(info, target: _Target, rate: float, params: dict[str, Any]) -> bool:
    """Whether the method's mask uses the element-wise stream (the one the cache holds)."""
    plan = info.plan(target.ft, rate=rate, **params)
    return plan.axis == "element"


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _snapshot_id(s: Snapshot) -> str:
    """What pins a model: the Hub commit, or the weights files' sizes and mtimes for local folders."""
    if s.commit:
        return f"{s.repo_id}@{s.commit}"
    files = sorted(s.path.glob("*.safetensors"))
    return f"{s.path}:" + ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def default_evaluator(fine_tune: Snapshot, tokenizer, *, task: str | None, split: str, limit: int | None,
                      batch_size: int = 64, max_length: int = 128):
    """The evaluator for a fine-tune: its own family task data, or ``task`` (see :func:`deltakit.evaluate.load_split`).

    Inputs are truncated to ``max_length`` tokens, or to the model's ``max_position_embeddings`` if smaller.
    """
    max_length = min(max_length, int(fine_tune.config.get("max_position_embeddings", max_length)))
    from deltakit.evaluate import GLUE_TASKS, ClassificationEvaluator, load_split

    source = task or (fine_tune.ref if fine_tune.kind == "family" else None)
    if source is None:
        raise ValueError(f"no evaluation task for {fine_tune.ref!r}: pass task= (e.g. 'glue/sst2', a dataset id, or a "
                         "parquet file) or an evaluator callable.")
    ds = load_split(source, split, limit=limit)
    if source.startswith("glue/"):
        g = GLUE_TASKS[source[5:]]
        ev = ClassificationEvaluator(ds, tokenizer, text_column=g.text, text_pair_column=g.text_pair,
                                     regression=g.regression, glue_score=g.score, batch_size=batch_size,
                                     max_length=max_length)
    else:
        ev = ClassificationEvaluator(ds, tokenizer, batch_size=batch_size, max_length=max_length)
    ev.fingerprint = f"{source}:{split}:{limit}:{getattr(ds, '_fingerprint', len(ds))}:{max_length}"
    return ev


def plan_points(methods: Sequence[str | MethodSpec], rates: Sequence[float], seeds: Sequence[int], *,
                references: bool = True) -> list[tuple[MethodSpec, float, int]]:
    """The (method, rate, seed) points of a sweep, in run order; deterministic methods run the first seed only.

    Raises:
        ValueError: bad rates (see :func:`normalise_rates`) or no seeds. KeyError: an unknown method.
    """
    from deltakit.methods import get_method

    rates = normalise_rates(rates)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds given: pass e.g. seeds=[0, 1].")
    specs = [MethodSpec.parse(m) for m in methods]
    points: list[tuple[MethodSpec, float, int]] = []
    if references:
        points += [(MethodSpec("finetuned"), 0.0, seeds[0]), (MethodSpec("base"), 1.0, seeds[0])]
    for spec in specs:
        random = spec.name in STRATEGIES or get_method(spec.name).random  # KeyError lists the registered methods
        points += [(spec, rate, seed) for rate in rates for seed in (seeds if random else seeds[:1])]
    return points


def sweep(
    base: str | Snapshot,
    fine_tune: str | Snapshot,
    *,
    methods: Sequence[str | MethodSpec] = ("dare",),
    rates: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9, 0.99),
    seeds: Sequence[int] = (0, 1),
    evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    task: str | None = None,
    split: str = "test",
    eval_limit: int | None = None,
    preset: str = "mergelm_encoder",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    backend: str = "auto",
    references: bool = True,
    progress: bool = True,
    cancel: threading.Event | None = None,
    on_point: Callable[[list[dict]], None] | None = None,
    resident: ResidentModel | None = None,
    search_evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    search_limit: int | None = 512,
    calibration_texts: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Sweep pruning methods x rates x seeds on one fine-tune and evaluate every point.

    Args:
        base / fine_tune: model references or snapshots.
        methods: registry methods or DAREx-q strategies, as names or ``NAME:KEY=VALUE,...`` / :class:`MethodSpec`.
        rates: pruning rates (fraction dropped); sorted and de-duplicated.
        seeds: mask seeds (every curve point carries its seed).
        evaluator: ``model -> dict[str, float]``; default: classification on ``task`` / the family's own data.
        task / split / eval_limit: what the default evaluator reads (:func:`deltakit.evaluate.load_split`).
        preset / include / exclude: the prunable set.
        out: folder of the resumable results store; None keeps results in memory only.
        device / backend: where the model lives; kernel backend (``auto`` uses Triton on CUDA).
        references: add the ``finetuned`` and ``base`` reference rows.
        progress: progress bar. cancel: an event checked between points (a cancelled sweep returns what it has).
        on_point: called with the rows of each finished point (live plots).
        resident: reuse an already loaded :class:`ResidentModel` (its models must be ``base``/``fine_tune``).
        search_evaluator: the labelled evaluator DAREx-q searches maximise (default: the task's ``validation``
            split, at most ``search_limit`` rows) -- never the test split.
        calibration_texts: unlabelled texts for activations (wanda, analytic q) and the output-change proxy
            (default: 64 texts of the task's ``train`` split).

    Returns:
        Tidy rows: key, base, fine_tune, method, label, params, q, rate, seed, metric, value, status, error,
        prep_seconds, eval_seconds.

    Raises:
        ValueError: bad rates, unknown method (KeyError), a model/task mismatch found before the first point.
    """
    points = plan_points(methods, rates, seeds, references=references)
    base_s = base if isinstance(base, Snapshot) else resolve(base)
    ft_s = fine_tune if isinstance(fine_tune, Snapshot) else resolve(fine_tune)
    rm = resident or ResidentModel(base_s, ft_s, preset=preset, include=include, exclude=exclude, device=device)
    ev = evaluator or default_evaluator(ft_s, rm.tokenizer, task=task, split=split, limit=eval_limit)
    if hasattr(ev, "check_model"):
        ev.check_model(rm.model)
    ctx = SearchContext(
        rm,
        (lambda: search_evaluator) if search_evaluator is not None else
        (lambda: default_evaluator(ft_s, rm.tokenizer, task=task, split="validation", limit=search_limit)),
        (lambda: list(calibration_texts)) if calibration_texts is not None else
        (lambda: _train_texts(ft_s, task)),
    )
    store = ResultStore(out) if out is not None else None
    done = store.done_keys() if store else set()
    common = dict(base=_snapshot_id(base_s), fine_tune=_snapshot_id(ft_s), preset=preset, include=list(include or []),
                  exclude=list(exclude or []), evaluator=getattr(ev, "fingerprint", getattr(ev, "__qualname__", repr(ev))))
    labels = dict(base=base_s.ref, fine_tune=ft_s.ref)

    rows_out: list[dict] = [r for r in (store.rows() if store else []) if r["key"] in done]
    bar = tqdm(total=len(points), desc="sweep", unit="point", disable=not progress)
    keys = [_key(dict(common, method=s.name, params=s.params, rate=r, seed=sd)) for s, r, sd in points]
    # The store may hold other sweeps' points too: return only this sweep's.
    own = set(keys)
    rows_out = [r for r in rows_out if r["key"] in own]
    try:
        for (spec, rate, seed), key in zip(points, keys):
            if key in done:
                bar.update(1)
                continue
            if cancel is not None and cancel.is_set():
                break
            rows = _run_point(ctx, ev, spec, rate, seed, backend=backend)
            for r in rows:
                r.update(key=key, **labels)
            if store:
                store.append(rows)
            rows_out.extend(rows)
            done.add(key)
            if on_point is not None:
                on_point(rows)
            bar.update(1)
    finally:
        bar.close()
        rm.restore()
        if store:
            store.write_parquet()
    return pd.DataFrame(rows_out)


def _train_texts(fine_tune: Snapshot, task: str | None, n: int = 64) -> list[str]:
    from deltakit.evaluate import load_split

    source = task or (fine_tune.ref if fine_tune.kind == "family" else None)
    if source is None:
        raise ValueError("calibration needs texts: pass calibration_texts= or task=.")
    ds = load_split(source, "train", limit=n)
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return list(ds[column])


def _wanda_params(ctx: SearchContext) -> Callable[[str], dict[str, Any]]:
    """act_norms per tensor; 2-D tensors that are no Linear input (embeddings) get ones: per-row magnitude."""
    l2 = ctx.activations().l2
    shapes = {t.name: t.ft.shape for t in ctx.rm.targets}

    def params_for(name: str) -> dict[str, Any]:
        if len(shapes[name]) != 2:
            return {}
        return {"act_norms": l2.get(name, torch.ones(shapes[name][1]))}

    return params_for


def _run_point(ctx: SearchContext, ev, spec: MethodSpec, rate: float, seed: int, *, backend: str) -> list[dict]:
    """Prepare one point (rewrite the prunable tensors), evaluate it, return its tidy rows (never raises)."""
    rm = ctx.rm
    params = dict(spec.params)
    base_row = dict(method=spec.name, label=spec.label, params=json.dumps(params, default=str), rate=rate, seed=seed,
                    q=math.nan, status="ok", error=None)
    t0 = time.perf_counter()
    try:
        if spec.name == "finetuned":
            rm.restore()
        elif spec.name == "base":
            rm.set_base()
        elif spec.name in STRATEGIES:
            chosen = STRATEGIES[spec.name](ctx, rate=rate, seed=seed, backend=backend, **params)
            base_row["q"] = chosen.q
            base_row["params"] = json.dumps(dict(params, **chosen.record), default=str)
            rm.apply("darex_q", rate=rate, seed=seed, backend=backend, params_for=chosen.params_for)
        else:
            params_for = _wanda_params(ctx) if spec.name == "wanda" and "act_norms" not in params else None
            rm.apply(spec.name, rate=rate, seed=seed, backend=backend, params_for=params_for, **params)
            if spec.name == "dare":
                base_row["q"] = 1.0 - rate
            elif "q" in params:
                base_row["q"] = params["q"]
        prep = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = ev(rm.model)
        evs = time.perf_counter() - t1
    except Exception as err:  # a failed point is recorded and the sweep goes on
        return [dict(base_row, metric=None, value=math.nan, status="failed", error=f"{type(err).__name__}: {err}",
                     prep_seconds=time.perf_counter() - t0, eval_seconds=math.nan)]
    return [dict(base_row, metric=m, value=float(v), prep_seconds=prep, eval_seconds=evs) for m, v in metrics.items()]
