"""Pruning-rate sweeps: the model stays resident; each point rewrites the prunable tensors in place and evaluates.

DESIGN.md decision 5. MergeLM reloads the model from disk for every pruning rate; here the fine-tuned model is
loaded once onto the device, the base and fine-tuned values of every prunable tensor are kept beside it, and a
point is one fused pass per tensor (``deltakit.prune.apply_method``) plus one evaluation. On CPU the uniform
numbers of a seed are computed once per tensor and reused by every rate and random method (masks are nested
across rates by construction: common random numbers give smooth curves).

Every point is a pure function of its key -- a hash of everything that defines it (the models' content
fingerprints, preset, method, params, rate, seed, evaluator fingerprint). Results are appended to
``<out>/results.jsonl`` (:mod:`deltakit.store`: one record per finished point, on disk whole or not at all; one
sweep writes a folder at a time), so a killed sweep loses at most the point in flight, and rerunning the same
sweep skips completed points. ``results.parquet`` is rewritten at the end. The result is a tidy DataFrame:
one row per (point, metric).

Rates: sorted and de-duplicated (documented normalisation); each must lie in [0, 1].
Seeds: deterministic methods (magnitude, wanda) ignore the seed, so they run once per rate with the first seed.
Reference rows: ``method="finetuned"`` (rate 0) and ``method="base"`` (every prunable tensor at its base value,
rate 1; non-prunable tensors such as the new head keep their fine-tuned values).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from deltakit import masks
from deltakit.darex_search import STRATEGIES, SearchContext
from deltakit.pairing import pair_models, prunable_selector
from deltakit.sources import Snapshot, SourceError, resolve
from deltakit.store import ResultStore, fingerprint, tidy_rows  # ResultStore: re-exported for old imports
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
    for r in rates:
        masks.check_rate(r)  # refuses strings and bools by type, NaN, and numbers outside [0, 1]
    return sorted({float(r) for r in rates})


@dataclass
class _Target:
    name: str
    param: torch.nn.Parameter
    base: torch.Tensor
    ft: torch.Tensor
    u: dict[int, torch.Tensor] = field(default_factory=dict)


def refuse_remote_code(snapshot: Snapshot) -> None:
    """Refuse a checkpoint whose architecture transformers does not ship (loading it would need the repo's code).

    deltakit always passes ``trust_remote_code=False``; this check turns transformers' refusal (or, in older
    versions, its question on stdin) into a clear error before any loading starts.

    Raises:
        SourceError: naming the model type, whether ``config.json`` carries an ``auto_map``, and what to do.
    """
    from transformers import CONFIG_MAPPING

    model_type = snapshot.config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    code = " and its config.json maps it to the repository's own Python code (auto_map)" \
        if "auto_map" in snapshot.config else ""
    raise SourceError(
        f"{snapshot.label!r} has model_type {model_type!r}, which is not an architecture transformers ships{code}. "
        "deltakit never runs code from a checkpoint (trust_remote_code is always False): use a fine-tune of a "
        "built-in architecture, or load the model yourself and pass model_loader=."
    )


def load_classifier(snapshot: Snapshot) -> torch.nn.Module:
    """Load a sequence classifier from a snapshot, safely: built-in architectures only, every weight present.

    Raises:
        SourceError: the architecture needs the repository's code (:func:`refuse_remote_code`), or the checkpoint
            lacks weights the architecture needs (transformers would initialise them randomly).
    """
    from transformers import AutoModelForSequenceClassification

    refuse_remote_code(snapshot)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        snapshot.path, trust_remote_code=False, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise SourceError(
            f"{snapshot.label!r} lacks {len(missing)} weight(s) its architecture needs (e.g. {missing[:3]}); "
            "transformers would initialise them randomly and every point would measure noise. Use the complete "
            "checkpoint (or pass model_loader= to load it your way)."
        )
    return model


def load_tokenizer(snapshot: Snapshot):
    """The snapshot's tokenizer (None when it ships none); never runs the repository's code.

    A tokenizer config that maps to the repository's own code (``auto_map``) is loaded from its ``tokenizer.json``
    by transformers' built-in backend when there is one; otherwise it cannot be loaded safely and is refused.

    Raises:
        SourceError: the tokenizer cannot be loaded without running the repository's code, or at all.
    """
    from transformers import AutoTokenizer

    config_file = snapshot.path / "tokenizer_config.json"
    if not config_file.exists():
        return None
    try:
        return AutoTokenizer.from_pretrained(snapshot.path, trust_remote_code=False)
    except (ValueError, OSError) as err:
        remote = "auto_map" in config_file.read_text(encoding="utf-8", errors="replace")
        why = ("it maps to the repository's own code (auto_map), which deltakit never runs (trust_remote_code is "
               "always False)" if remote else str(err).splitlines()[0])
        raise SourceError(f"cannot load the tokenizer of {snapshot.label!r}: {why}. Use a checkpoint with a "
                          "tokenizer.json or a built-in tokenizer class.") from None


class ResidentModel:
    """A fine-tuned model loaded once, with the base and fine-tuned values of its prunable tensors beside it.

    Args:
        base / fine_tune: snapshots (see :func:`deltakit.sources.resolve`).
        preset / include / exclude: the prunable set (:mod:`deltakit.pairing`).
        shared_rows: when the vocabularies differ, prune the rows both have; the fine-tune's extra rows keep their
            fine-tuned values (their delta is zero).
        device: where the model lives.
        model_loader: ``path -> nn.Module``; defaults to :func:`load_classifier` (never runs a checkpoint's code).
        cache_uniforms: keep each seed's uniform numbers per tensor (CPU; ~4 bytes per prunable parameter per seed).

    Raises:
        deltakit.pairing.PairingError: base and fine-tune are not homologous.
        deltakit.sources.SourceError: the fine-tune needs its own code, or lacks weights its architecture needs.
        ValueError: nothing is prunable, or a prunable tensor of the checkpoint is not a parameter of the model.
    """

    def __init__(self, base: Snapshot, fine_tune: Snapshot, *, preset: str = "mergelm_encoder",
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 shared_rows: bool = False, device: str | torch.device = "cpu",
                 model_loader: Callable[[Path], torch.nn.Module] | None = None, cache_uniforms: bool = True) -> None:
        from deltakit.prune import check_finite_delta

        self.base_snapshot, self.ft_snapshot = base, fine_tune
        self.device = torch.device(device)
        base_reader = TensorReader(base.path)
        ft_reader = TensorReader(fine_tune.path)
        self.pairing = pair_models(base, fine_tune, preset=preset, include=include, exclude=exclude,
                                   shared_rows=shared_rows, base_reader=base_reader, ft_reader=ft_reader)
        if not self.pairing.prunable():
            raise ValueError(
                f"nothing to prune: preset {preset!r} with include={list(include or [])} and "
                f"exclude={list(exclude or [])} selects none of the {len(self.pairing.pairs)} paired tensors of "
                f"{fine_tune.label!r}, so every point would equal the fine-tune. Loosen --exclude / --include."
            )
        self.model = (model_loader(fine_tune.path) if model_loader else load_classifier(fine_tune)).to(self.device)
        self.model.eval()
        self.tokenizer = load_tokenizer(fine_tune)
        params = dict(self.model.named_parameters())
        self.targets: list[_Target] = []
        for pair in self.pairing.prunable():
            param = params.get(pair.name)
            if param is None:
                raise ValueError(f"checkpoint tensor {pair.name!r} is not a parameter of the loaded model; exclude it.")
            base_t = base_reader.read(pair.base_name).to(self.device, param.dtype)
            ft_t = param.detach().clone()
            if pair.rows is not None:  # rows only the fine-tune has get a zero delta: they keep fine-tuned values
                shared = ft_t.clone()
                shared[: pair.rows] = base_t[: pair.rows]
                base_t = shared
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


def _schema(name: str) -> dict[str, inspect.Parameter]:
    """The parameters a method spec may set: a registry method's own parameters, or a DAREx-q strategy's."""
    if name in STRATEGIES:
        fixed = ("ctx", "rate", "seed", "backend")
        return {n: p for n, p in inspect.signature(STRATEGIES[name], eval_str=True).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in fixed}
    from deltakit.methods import method_params

    return method_params(name)  # KeyError lists the registered methods


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a value typed on the command line fits a parameter's annotation (bool is never a number)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return option is float or isinstance(value, int)
        if option is str and isinstance(value, str):
            return True
    return False


def check_method_spec(spec: MethodSpec, rates: Sequence[float]) -> None:
    """Refuse, before anything loads, a method spec that cannot run at one of ``rates``.

    Unknown parameters and values of the wrong type are refused for every method; a registry method is also run
    once per rate on a small dummy delta, which applies exactly the checks a real point applies (e.g. DAREx-q's
    ``1 - rate <= q <= 1``, structural's ``axis``).

    Raises:
        KeyError: an unknown method (the message lists the available ones).
        ValueError: an unknown parameter, a value of the wrong type, or one out of range at some rate.
    """
    if spec.name in ("finetuned", "base"):
        return
    schema = _schema(spec.name)
    for key, value in spec.params:
        if key not in schema:
            raise ValueError(f"{spec.label}: unknown parameter {key!r}; {spec.name} takes "
                             f"{sorted(schema) or 'no parameters'} (written NAME:KEY=VALUE,KEY=VALUE).")
        annotation = schema[key].annotation
        if not _accepts(annotation, value):
            shown = getattr(annotation, "__name__", None) or str(annotation).replace("torch.", "")
            raise ValueError(f"{spec.label}: parameter {key} must be {shown}, got {value!r} "
                             f"({type(value).__name__}); e.g. {spec.name}:{key}=<value>.")
    if spec.name in STRATEGIES:
        return
    from deltakit.methods import get_method

    dummy = torch.linspace(-1.0, 1.0, 16).reshape(4, 4)
    for rate in rates:
        try:
            get_method(spec.name).fn(dummy, rate=rate, seed=0, name="check", **dict(spec.params))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{spec.label} cannot run at rate {rate:g}: {err}. Change the parameter or the "
                             "rates.") from None


def check_run_options(device: str, backend: str) -> torch.device:
    """Refuse, before anything loads, a device or kernel backend this machine cannot use.

    Returns:
        The device.

    Raises:
        ValueError: an unknown device string, a CUDA device without CUDA, or an unusable backend.
        ImportError: ``backend="triton"`` without the triton package.
    """
    from deltakit.kernels import resolve_backend

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available on this machine; use device 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: deltakit runs on 'cpu' or 'cuda'.")
    resolve_backend(backend, dev)
    return dev


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
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"seeds must be non-negative integers, got {bad}; pass e.g. seeds=[0, 1].")
    specs = [MethodSpec.parse(m) for m in methods]
    for spec in specs:
        check_method_spec(spec, rates)
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
    shared_rows: bool = False,
    out: str | Path | None = None,
    wait: bool = False,
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
        shared_rows: when vocabularies differ, prune the shared rows; extra rows keep fine-tuned values.
        out: folder of the resumable results store (:class:`deltakit.store.ResultStore`); None keeps results in
            memory only. The sweep holds the folder's writer lock while it runs.
        wait: when another sweep is writing to ``out``, wait for it to finish instead of failing.
        device / backend: where the model lives; kernel backend (``auto`` uses Triton on CUDA).
        references: add the ``finetuned`` and ``base`` reference rows.
        progress: progress bar. cancel: an event checked between points (a cancelled sweep returns what it has).
        on_point: called with the tidy rows of each finished point (live plots).
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
        deltakit.store.StoreError: ``out`` cannot be written (checked before any model loads), or a point could
            not be appended (full disk); StoreLockedError: another sweep is writing to ``out`` and ``wait`` is
            False.
    """
    points = plan_points(methods, rates, seeds, references=references)
    check_run_options(device, backend)
    prunable_selector(preset, include, exclude)  # an unknown preset or a bad regex fails before anything loads
    # The store's checks and its writer lock come before any model loads: a bad or busy folder fails at once.
    opened = ResultStore(out).writer(wait=wait) if out is not None else contextlib.nullcontext()
    with opened as store:
        base_s = base if isinstance(base, Snapshot) else resolve(base)
        ft_s = fine_tune if isinstance(fine_tune, Snapshot) else resolve(fine_tune)
        rm = resident or ResidentModel(base_s, ft_s, preset=preset, include=include, exclude=exclude,
                                       shared_rows=shared_rows, device=device)
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
        common = dict(base=fingerprint(base_s), fine_tune=fingerprint(ft_s), preset=preset,
                      include=list(include or []), exclude=list(exclude or []), shared_rows=shared_rows,
                      evaluator=getattr(ev, "fingerprint", getattr(ev, "__qualname__", repr(ev))))
        labels = dict(base=base_s.ref, fine_tune=ft_s.ref)
        keys = [_key(dict(common, method=s.name, params=s.params, rate=r, seed=sd)) for s, r, sd in points]
        # The store may hold other sweeps' points too: reuse and return only this sweep's.
        own = set(keys)
        stored = [r for r in (store.records() if store else []) if r["status"] == "ok" and r["key"] in own]
        done = {r["key"] for r in stored}
        rows_out = [row for r in stored for row in tidy_rows(r)]
        bar = tqdm(total=len(points), desc="sweep", unit="point", disable=not progress)
        try:
            for (spec, rate, seed), key in zip(points, keys):
                if key in done:
                    bar.update(1)
                    continue
                if cancel is not None and cancel.is_set():
                    break
                record = dict(_run_point(ctx, ev, spec, rate, seed, backend=backend), key=key, **labels)
                if store:
                    store.append(record)
                rows = tidy_rows(record)
                rows_out.extend(rows)
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


def _run_point(ctx: SearchContext, ev, spec: MethodSpec, rate: float, seed: int, *, backend: str) -> dict[str, Any]:
    """Prepare one point (rewrite the prunable tensors), evaluate it, return its record (never raises).

    The record is in :mod:`deltakit.store`'s format, less the key and model labels that the sweep adds.
    """
    rm = ctx.rm
    params = dict(spec.params)
    record = dict(method=spec.name, label=spec.label, params=json.dumps(params, default=str), q=math.nan, rate=rate,
                  seed=seed, status="ok", error=None, prep_seconds=math.nan, eval_seconds=math.nan, metrics={})
    t0 = time.perf_counter()
    try:
        if spec.name == "finetuned":
            rm.restore()
        elif spec.name == "base":
            rm.set_base()
        elif spec.name in STRATEGIES:
            chosen = STRATEGIES[spec.name](ctx, rate=rate, seed=seed, backend=backend, **params)
            record["q"] = chosen.q
            record["params"] = json.dumps(dict(params, **chosen.record), default=str)
            rm.apply("darex_q", rate=rate, seed=seed, backend=backend, params_for=chosen.params_for)
        else:
            params_for = _wanda_params(ctx) if spec.name == "wanda" and "act_norms" not in params else None
            rm.apply(spec.name, rate=rate, seed=seed, backend=backend, params_for=params_for, **params)
            if spec.name == "dare":
                record["q"] = 1.0 - rate
            elif "q" in params:
                record["q"] = params["q"]
        prep = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = {name: float(value) for name, value in ev(rm.model).items()}
        evs = time.perf_counter() - t1
    except Exception as err:  # a failed point is recorded and the sweep goes on
        return dict(record, status="failed", error=f"{type(err).__name__}: {err}",
                    prep_seconds=time.perf_counter() - t0)
    return dict(record, prep_seconds=prep, eval_seconds=evs, metrics=metrics)
