"""What a sweep runs (:class:`SweepSpec`, the experiment) and how it runs (:class:`RunOptions`), validated up front.

The spec is frozen and checked on construction, before anything loads: rates (numbers in [0, 1], sorted and
de-duplicated), seeds (non-negative integers), every method (known to the registry, parameters of the right type
and valid at every rate), the preset and the include/exclude regexes. The run options (device, kernel backend,
output folder) are checked by :meth:`RunOptions.check`. The CLI, the widgets, the demo and the fidelity script all
build a spec; the defaults live here and nowhere else.

Points: every method runs at every rate; random methods (and searches) run every seed, deterministic ones the
first seed only; the reference points (``finetuned`` at rate 0, ``base`` at rate 1) run once. See :meth:`points`.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltakit import masks
from deltakit.methods import get_method, reference_methods
from deltakit.pairing import DEFAULT_PRESET, prunable_selector

__all__ = ["DEFAULT_LAMBDAS", "DEFAULT_MERGE_METHODS", "DEFAULT_MERGE_RATES", "DEFAULT_METHODS", "DEFAULT_PRESET",
           "DEFAULT_RATES", "DEFAULT_SEEDS", "MergeSpec", "MethodSpec", "RunOptions", "SweepSpec", "normalise_rates"]

DEFAULT_METHODS = ("dare",)
DEFAULT_RATES = (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)
DEFAULT_SEEDS = (0, 1)
DEFAULT_MERGE_METHODS = ("ta", "ties", "dare_ta", "dare_ties")
DEFAULT_MERGE_RATES = (0.5, 0.7, 0.9)
DEFAULT_LAMBDAS = (0.5, 1.0)


@dataclass(frozen=True)
class MethodSpec:
    """One method of a sweep with its fixed parameters (e.g. ``darex_q`` with ``q=0.3``).

    ``parse("darex_q:q=0.3")`` reads the CLI form ``NAME[:KEY=VALUE[,KEY=VALUE...]]`` (values parsed as JSON where
    possible). Names are registry entries (``deltakit.methods.sweep_methods()``).
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


def normalise_rates(rates: Sequence[float]) -> tuple[float, ...]:
    """Sort and de-duplicate pruning rates; refuse values outside [0, 1] or non-numbers.

    Raises:
        ValueError: empty list, a non-finite rate, or one outside [0, 1] (the message names it).
    """
    if not rates:
        raise ValueError("no pruning rates given: pass e.g. rates=[0.1, 0.5, 0.9, 0.99].")
    for r in rates:
        masks.check_rate(r)  # refuses strings and bools by type, NaN, and numbers outside [0, 1]
    return tuple(sorted({float(r) for r in rates}))


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


def _check_params(spec: MethodSpec, schema: dict[str, Any]) -> None:
    """Refuse unknown parameters and values of the wrong type (the message names the method's parameters)."""
    for key, value in spec.params:
        if key not in schema:
            raise ValueError(f"{spec.label}: unknown parameter {key!r}; {spec.name} takes "
                             f"{sorted(schema) or 'no parameters'} (written NAME:KEY=VALUE,KEY=VALUE).")
        annotation = schema[key].annotation
        if not _accepts(annotation, value):
            shown = getattr(annotation, "__name__", None) or str(annotation).replace("torch.", "")
            raise ValueError(f"{spec.label}: parameter {key} must be {shown}, got {value!r} "
                             f"({type(value).__name__}); e.g. {spec.name}:{key}=<value>.")


def check_method_spec(spec: MethodSpec, rates: Sequence[float]) -> None:
    """Refuse, before anything loads, a method spec that cannot run at one of ``rates``.

    Unknown parameters and values of the wrong type are refused for every entry; a tensor method is also run once
    per rate on a small dummy delta, which applies exactly the checks a real point applies (e.g. DAREx-q's
    ``1 - rate <= q <= 1``, structural's ``axis``).

    Raises:
        KeyError: an unknown method (the message lists the available ones).
        ValueError: an unknown parameter, a value of the wrong type, or one out of range at some rate.
    """
    info = get_method(spec.name)
    _check_params(spec, info.params)
    if info.fn is None or info.prepare is not None:  # a prepare step supplies inputs (a q, activation norms)
        return  # that a dummy delta cannot have: the step checks its own parameters when it runs
    dummy = torch.linspace(-1.0, 1.0, 16).reshape(4, 4)
    for rate in rates:
        try:
            info.fn(dummy, rate=rate, seed=0, name="check", **dict(spec.params))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{spec.label} cannot run at rate {rate:g}: {err}. Change the parameter or the "
                             "rates.") from None


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: which fine-tune, which methods, rates and seeds, which tensors, evaluated on what (frozen, checked).

    Attributes:
        base / fine_tune: model references (``org/name[@rev]``, a folder, ``family:F/M``) or resolved snapshots.
        methods: registry entries as names, ``NAME:KEY=VALUE,...`` or :class:`MethodSpec` (stored as MethodSpecs).
        rates: pruning rates, the fraction of delta entries dropped (stored sorted and de-duplicated).
        seeds: mask seeds; every curve point carries its seed.
        preset / include / exclude: the prunable set (:mod:`deltakit.pairing`).
        shared_rows: when vocabularies differ, prune the shared rows; added rows keep fine-tuned values.
        task / split / eval_limit: what the default evaluator reads (:func:`deltakit.evaluate.load_split`);
            ``task`` None means the family member's own data.
        search_limit: validation examples per DAREx-q search evaluation.
        references: add the reference points (``finetuned``, ``base``).

    Raises:
        ValueError, KeyError: on construction, for anything that cannot run (the message names it and the fix).
    """

    base: Any
    fine_tune: Any
    methods: tuple[MethodSpec, ...] = DEFAULT_METHODS  # names are parsed into MethodSpecs on construction
    rates: tuple[float, ...] = DEFAULT_RATES
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    preset: str = DEFAULT_PRESET
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    shared_rows: bool = False
    task: str | None = None
    split: str = "test"
    eval_limit: int | None = None
    search_limit: int | None = 512
    references: bool = True

    def __post_init__(self) -> None:
        # Accept lists and strings as given by callers; store tuples (the spec is frozen and hashable).
        set_ = object.__setattr__
        set_(self, "methods", tuple(MethodSpec.parse(m) for m in _as_tuple(self.methods)))
        set_(self, "rates", normalise_rates(list(_as_tuple(self.rates))))
        set_(self, "seeds", tuple(_as_tuple(self.seeds)))
        set_(self, "include", tuple(_as_tuple(self.include or ())))
        set_(self, "exclude", tuple(_as_tuple(self.exclude or ())))
        _check_seeds(self.seeds)
        if not self.methods:
            raise ValueError("no methods given: pass e.g. methods=['dare'].")
        for spec in self.methods:
            check_method_spec(spec, self.rates)
        prunable_selector(self.preset, self.include, self.exclude)  # unknown preset, bad regex
        if self.eval_limit is not None and (isinstance(self.eval_limit, bool) or self.eval_limit < 1):
            raise ValueError(f"eval_limit must be a positive number of examples or None, got {self.eval_limit!r}.")

    def points(self) -> list[tuple[MethodSpec, float, int]]:
        """The (method, rate, seed) points in run order; deterministic methods run the first seed only."""
        points = [(MethodSpec(name), info.reference_rate, self.seeds[0])
                  for name, info in reference_methods().items()] if self.references else []
        for spec in self.methods:
            seeds = self.seeds if get_method(spec.name).random else self.seeds[:1]
            points += [(spec, rate, seed) for rate in self.rates for seed in seeds]
        return points

    def key_parts(self) -> dict[str, Any]:
        """What, besides the models' fingerprints and the evaluator, makes a point of this spec what it is."""
        return dict(preset=self.preset, include=list(self.include), exclude=list(self.exclude),
                    shared_rows=self.shared_rows)


def check_merge_spec(spec: MethodSpec, rates: Sequence[float]) -> None:
    """Refuse, before anything loads, a merge method spec that cannot run at one of ``rates``.

    Unknown parameters and values of the wrong type are refused, then the method runs once per rate on two small
    dummy deltas (the checks a real point applies, e.g. ``q`` in ``[1 - rate, 1]``, Breadcrumbs' ``top <= rate``).

    Raises:
        KeyError: an unknown merge method (the message lists them).
        ValueError: an unknown parameter, a value of the wrong type, or one out of range at some rate.
    """
    from deltakit.methods import get_merge

    info = get_merge(spec.name)
    _check_params(spec, info.params)
    dummy = [torch.linspace(-1.0, 1.0, 16).reshape(4, 4), torch.linspace(1.0, -0.5, 16).reshape(4, 4)]
    for rate in rates if info.uses_rate else (0.0,):
        try:
            info.fn(dummy, rate=rate, seed=0, name="check", lam=1.0, **dict(spec.params))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{spec.label} cannot run at rate {rate:g}: {err}. Change the parameter or the "
                             "rates.") from None


def _check_seeds(seeds: tuple) -> None:
    if not seeds:
        raise ValueError("no seeds given: pass e.g. seeds=[0, 1].")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"seeds must be non-negative integers, got {bad}; pass e.g. seeds=[0, 1].")


@dataclass(frozen=True)
class MergeSpec:
    """A merge sweep: one base, 2 to 8 of its fine-tunes, merge methods x rates x lambdas x seeds (frozen, checked).

    Each fine-tune keeps its own classification head (and every tensor outside the prunable set); the merged model is
    evaluated once per task, with that task's head, on that task's data.

    Attributes:
        base / fine_tunes: model references or resolved snapshots; the fine-tunes' order keys their masks
            (``deltakit.masks.finetune_key``).
        methods: merge methods (``deltakit.methods.merge_methods()``), as names, ``NAME:KEY=VALUE,...`` or MethodSpecs.
        rates: fraction of each delta dropped before combining (``ta`` runs at rate 0 only).
        lambdas: merge weights lambda (merged = base + lambda * combined deltas).
        seeds: mask seeds (deterministic methods run the first only).
        preset / include / exclude: the merged (prunable) set, as for sweeps.
        tasks: evaluation data per fine-tune (None: each family member's own data).
        split / eval_limit: the evaluation split and its size.
        references: add the individual fine-tunes and the base, each on every task.

    Raises:
        ValueError, KeyError: on construction, for anything that cannot run (the message names it and the fix).
    """

    base: Any
    fine_tunes: tuple[Any, ...]
    methods: tuple[MethodSpec, ...] = DEFAULT_MERGE_METHODS
    rates: tuple[float, ...] = DEFAULT_MERGE_RATES
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    preset: str = DEFAULT_PRESET
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    tasks: tuple[str | None, ...] | None = None
    split: str = "test"
    eval_limit: int | None = None
    references: bool = True

    def __post_init__(self) -> None:
        from deltakit.kernels.merge import MAX_FINETUNES

        set_ = object.__setattr__
        set_(self, "fine_tunes", tuple(_as_tuple(self.fine_tunes)))
        set_(self, "methods", tuple(MethodSpec.parse(m) for m in _as_tuple(self.methods)))
        set_(self, "rates", normalise_rates(list(_as_tuple(self.rates))))
        set_(self, "lambdas", tuple(_as_tuple(self.lambdas)))
        set_(self, "seeds", tuple(_as_tuple(self.seeds)))
        set_(self, "include", tuple(_as_tuple(self.include or ())))
        set_(self, "exclude", tuple(_as_tuple(self.exclude or ())))
        if not 2 <= len(self.fine_tunes) <= MAX_FINETUNES:
            raise ValueError(f"a merge takes 2 to {MAX_FINETUNES} fine-tunes of one base, got {len(self.fine_tunes)}: "
                             "pass e.g. family:minilm-tweets/sentiment3 family:minilm-tweets/topic.")
        if self.tasks is not None:
            set_(self, "tasks", tuple(_as_tuple(self.tasks)))
            if len(self.tasks) != len(self.fine_tunes):
                raise ValueError(f"tasks gives {len(self.tasks)} evaluation task(s) for {len(self.fine_tunes)} "
                                 "fine-tunes: give one per fine-tune (None for a family member's own data).")
        _check_seeds(self.seeds)
        if not self.lambdas or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
                                   for x in self.lambdas):
            raise ValueError(f"lambdas must be finite numbers such as 0.5 1.0, got {list(self.lambdas)}.")
        set_(self, "lambdas", tuple(sorted({float(x) for x in self.lambdas})))
        if not self.methods:
            raise ValueError("no merge methods given: pass e.g. methods=['ta', 'dare_ta'].")
        for spec in self.methods:
            check_merge_spec(spec, self.rates)
        prunable_selector(self.preset, self.include, self.exclude)
        if self.eval_limit is not None and (isinstance(self.eval_limit, bool) or self.eval_limit < 1):
            raise ValueError(f"eval_limit must be a positive number of examples or None, got {self.eval_limit!r}.")

    def points(self) -> list[tuple[MethodSpec, float, float, int]]:
        """The (method, rate, lambda, seed) points in run order; references first (lambda NaN).

        ``finetuned`` (each fine-tune alone on its own task) and ``base`` (the base body with each task's head) run
        once; deterministic methods run the first seed only; ``ta`` (which drops nothing) runs at rate 0 only.
        """
        from deltakit.methods import get_merge

        points = [(MethodSpec(name), info.reference_rate, math.nan, self.seeds[0])
                  for name, info in reference_methods().items()] if self.references else []
        for spec in self.methods:
            info = get_merge(spec.name)
            seeds = self.seeds if info.random else self.seeds[:1]
            rates = self.rates if info.uses_rate else (0.0,)
            points += [(spec, rate, lam, seed) for rate in rates for lam in self.lambdas for seed in seeds]
        return points

    def key_parts(self) -> dict[str, Any]:
        """What, besides the models' fingerprints and the evaluators, makes a point of this spec what it is."""
        return dict(kind="merge", preset=self.preset, include=list(self.include), exclude=list(self.exclude))


def _as_tuple(value: Any) -> tuple:
    return (value,) if isinstance(value, (str, MethodSpec, int, float)) else tuple(value)


@dataclass(frozen=True)
class RunOptions:
    """Where and how a sweep runs (not part of what a point means: changing them never invalidates results).

    Attributes:
        device: ``cpu``, ``cuda`` or ``cuda:N``: where the model lives.
        backend: kernel backend, ``auto`` (Triton on CUDA), ``torch`` or ``triton``.
        out: folder of the resumable results store; None keeps results in memory only.
        wait: when another sweep is writing to ``out``, wait for it instead of failing.
        progress: show a progress bar.
        max_memory: the memory budget (:func:`deltakit.memory.parse_budget`: ``"5GB"``, ``"cpu=32GB,cuda=20GB"``;
            None: 80% of the available host memory, 90% of a CUDA device's free memory). The sweep picks the fastest
            memory tier that fits it (:mod:`deltakit.memory`); every tier gives the same results.
        tier: force a memory tier (``resident``, ``host``, ``file``) instead of choosing one.
        cache_uniforms: keep each seed's uniform numbers (CPU; 4 bytes per prunable parameter per seed): None when
            the budget allows, or force it on / off.
    """

    device: str = "cpu"
    backend: str = "auto"
    out: str | Path | None = None
    wait: bool = False
    progress: bool = True
    max_memory: str | int | dict | None = None
    tier: str | None = None
    cache_uniforms: bool | None = None

    def check(self) -> torch.device:
        """Refuse a device or kernel backend this machine cannot use, before anything loads.

        Returns:
            The device.

        Raises:
            ValueError: an unknown device string, a CUDA device without CUDA, or an unusable backend;
                :class:`deltakit.memory.MemoryBudgetError`: a malformed memory budget or an unknown tier.
            ImportError: ``backend="triton"`` without the triton package.
        """
        from deltakit.kernels import resolve_backend
        from deltakit.memory import TIERS, MemoryBudgetError, parse_budget

        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {self.device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N'.") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: deltakit runs on 'cpu' or 'cuda'.")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device is available on this machine; use device 'cpu'.")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
        resolve_backend(self.backend, dev)
        parse_budget(self.max_memory, dev)
        if self.tier is not None and self.tier not in TIERS:
            raise MemoryBudgetError(f"unknown memory tier {self.tier!r}; choose one of {', '.join(TIERS)} (or none, "
                                    "to pick the fastest that fits the budget).")
        return dev

