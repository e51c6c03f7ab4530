"""The registry of delta-parameter pruning methods: one decorator, one lookup, the signature as the schema.

A pruning method is a plain typed function (after PEFT's ``merge_utils`` and mergekit's ``sparsify``)::

    fn(delta: Tensor, *, rate: float, seed: int, name: str, **params) -> Tensor

It returns the pruned delta with the same shape and dtype as ``delta`` and never mutates its input. ``rate`` is
the fraction of delta entries dropped (DARE's p, Yu et al. 2024, arXiv:2311.03099), ``seed`` the global seed
and ``name`` the checkpoint tensor name that keys the counter-based mask (``deltakit.masks``). Every keyword-only
parameter beyond ``rate``, ``seed`` and ``name``, with its annotation and default, *is* the method's schema:
the CLI, the sweeps and the widgets read it through :func:`method_params`, so a newly registered method appears
everywhere without touching them.

Random methods that are "keep where u >= rate, multiply the kept deltas by a scale" also register a *plan*
(:class:`RandomPlan`): the mask axis and the scale. ``deltakit.prune.apply_method`` uses the plan to rewrite a
live parameter in one fused pass (``deltakit.kernels.fused_apply``: Triton on CUDA, torch elsewhere) instead of
materialising the delta; the method function itself computes through the same torch reference, so the two
agree bit for bit.

Adding a method::

    from deltakit.methods import register

    @register(name="my_method", pretty_name="My method", reference="Author et al. 2025, arXiv:...", random=False)
    def my_method(delta: Tensor, *, rate: float, seed: int, name: str, alpha: float = 0.5) -> Tensor:
        ...

**Sweep entries.** The same registry holds everything a sweep can run (one list for the CLI, the widgets and the
plots):

* tensor methods (above); one may add a ``prepare`` step that computes inputs from the resident model and data
  before the point is applied (``wanda``: the activation norms of calibration texts);
* prepared entries (:func:`register_prepared`): a ``prepare`` step that chooses parameters, then applies as another
  tensor method (``darex_q_labelled`` searches q, then applies as ``darex_q``); their schema is the prepare step's;
* reference points (``finetuned`` at rate 0, ``base`` at rate 1): tensor methods flagged with the one rate they run
  at (:attr:`MethodInfo.reference_rate`), added to every sweep and drawn as reference lines.

A prepare step is ``prepare(ctx: PrepareContext, *, rate, seed, backend, **params) -> Prepared``; a sweep runs each
point as: prepare (if any), apply, evaluate.

The decorator returns a checked version of the function: it validates ``delta`` (a floating-point tensor),
``rate`` (in [0, 1]) and, unless ``allow_nonfinite=True``, that ``delta`` has no NaN/Inf, then calls the
function. The unchecked function stays reachable as :attr:`MethodInfo.unchecked` for callers that validated
already (``apply_method``).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deltakit import masks
from deltakit.methods.prepare import Prepared

__all__ = [
    "RandomPlan",
    "MethodInfo",
    "register",
    "register_prepared",
    "get_method",
    "available_methods",
    "sweep_methods",
    "reference_methods",
    "method_params",
    "check_rate",
    "check_finite",
]

#: Keyword-only arguments every method takes; everything else keyword-only is the method's own schema.
CONTRACT_PARAMS = ("rate", "seed", "name")
#: Keyword-only arguments every prepare step takes; everything else keyword-only is a prepared entry's schema.
_PREPARE_PARAMS = ("rate", "seed", "backend")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_REGISTRY: dict[str, MethodInfo] = {}


@dataclass(frozen=True)
class RandomPlan:
    """How a random method maps onto the fused apply: ``where(u >= rate, delta * scale, 0)``.

    Attributes:
        axis: Which uniform stream decides: ``"element"`` (one number per entry), ``"row"`` or ``"col"`` (one per
            row / column, rows and columns as in ``deltakit.masks.matrix_shape``).
        scale: Multiplier of the kept deltas: a Python float (rounded to float32 by the kernels) or a float32
            tensor with one value per row.
    """

    axis: str
    scale: float | Tensor

    def __post_init__(self) -> None:
        if self.axis not in masks.AXES:
            raise ValueError(f"RandomPlan.axis must be one of {masks.AXES}, got {self.axis!r}")
        if isinstance(self.scale, Tensor):
            if self.scale.dtype != torch.float32 or self.scale.dim() != 1:
                raise ValueError(
                    "RandomPlan.scale must be a float or a 1-D float32 tensor (one value per row), "
                    f"got a {self.scale.dim()}-D {self.scale.dtype} tensor"
                )
        elif isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"RandomPlan.scale must be a float or a per-row float32 tensor, got {self.scale!r}")


@dataclass(frozen=True)
class MethodInfo:
    """One registered pruning method.

    Attributes:
        name: Registry key, e.g. ``"dare"`` (lowercase identifier).
        pretty_name: Label for plots and widgets, e.g. ``"DARE"``.
        reference: Where the method comes from (paper and arXiv id).
        random: True if the result depends on ``seed`` (a sampled mask), False if it is a deterministic rule.
        fn: The checked method function (validates ``delta``, ``rate`` and finiteness, then computes).
        unchecked: The same function without the input checks.
        plan: For random methods expressible as one fused pass, ``plan(like, *, rate, **params) -> RandomPlan``
            (``like`` is any tensor of the delta's shape and device); validates ``params``. None otherwise.
        prepare: ``prepare(ctx, *, rate, seed, backend, **params) -> Prepared`` run before the apply, or None.
        applies_as: for prepared entries, the tensor method applied after ``prepare`` (None: this entry's own).
        reference_rate: for reference points, the one rate they run at (``finetuned`` 0, ``base`` 1); else None.
    """

    name: str
    pretty_name: str
    reference: str
    random: bool
    fn: Callable[..., Tensor] | None
    unchecked: Callable[..., Tensor] | None
    plan: Callable[..., RandomPlan] | None = None
    prepare: Callable[..., Prepared] | None = None
    applies_as: str | None = None
    reference_rate: float | None = None

    @property
    def params(self) -> dict[str, inspect.Parameter]:
        """The parameters a user may set: a prepared entry's prepare step's, else the method's own (keyword-only,
        beyond rate/seed/name), annotations resolved."""
        if self.applies_as is not None:
            return {n: p for n, p in inspect.signature(self.prepare, eval_str=True).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _PREPARE_PARAMS}
        return _own_params(self.unchecked)

    @property
    def summary(self) -> str:
        """The first line of the method's docstring (for CLI help and widget tooltips)."""
        doc = inspect.getdoc(self.prepare if self.applies_as is not None else self.unchecked) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @property
    def applied(self) -> str:
        """The tensor method a point of this entry applies."""
        return self.applies_as or self.name


def register(
    *,
    name: str,
    pretty_name: str,
    reference: str,
    random: bool,
    plan: Callable[..., RandomPlan] | None = None,
    prepare: Callable[..., Prepared] | None = None,
    reference_rate: float | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a pruning method under ``name`` (a decorator).

    Args:
        name: Registry key: a lowercase identifier, unique.
        pretty_name: Human-readable label.
        reference: Paper / code the method follows.
        random: Whether the output depends on ``seed``.
        plan: Optional ``plan(like, *, rate, **params) -> RandomPlan`` for random mask-and-scale methods; it must
            accept the same parameters as the method and describe exactly what the method computes.
        prepare: Optional step a sweep runs before applying the method to compute some of its inputs
            (``prepare(ctx, *, rate, seed, backend) -> Prepared``).
        reference_rate: Only for the reference points (``finetuned``, ``base``): the one rate they run at.

    Returns:
        A decorator that registers the function and returns its checked version (same signature, plus an
        ``allow_nonfinite: bool = False`` keyword that skips the NaN/Inf check).

    Raises:
        ValueError: If ``name`` is malformed or taken, or the function does not follow the method contract
            (first parameter ``delta``; keyword-only ``rate``, ``seed``, ``name``; annotated keyword-only params).
    """
    _check_free(name)
    if plan is not None and not random:
        raise ValueError(f"method {name!r}: a plan describes a random mask, so it needs random=True")

    method_name = name  # `name` means the tensor name inside `checked` below

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _check_free(method_name)  # again: the name may have been taken since the decorator was made
        _check_contract(method_name, fn)
        if plan is not None:
            plan_params = inspect.signature(plan).parameters
            wanted = {"rate", *_own_params(fn)}
            got = {p.name for p in plan_params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
            if got != wanted:
                raise ValueError(
                    f"method {method_name!r}: its plan must take (like, *, rate, <the method's own params>) = "
                    f"{sorted(wanted)} as keyword-only parameters, got {sorted(got)}"
                )

        @functools.wraps(fn)
        def checked(delta: Tensor, *, rate: float, seed: int, name: str, allow_nonfinite: bool = False, **params):
            if not isinstance(delta, Tensor) or not delta.is_floating_point():
                got = f"a {delta.dtype} tensor" if isinstance(delta, Tensor) else type(delta).__name__
                raise ValueError(f"delta of {name!r} must be a floating-point torch.Tensor, got {got}")
            check_rate(rate)
            if not allow_nonfinite:
                check_finite(delta, name)
            return fn(delta, rate=rate, seed=seed, name=name, **params)

        signature = inspect.signature(fn)
        extra = inspect.Parameter("allow_nonfinite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
        checked.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
        _REGISTRY[method_name] = MethodInfo(
            name=method_name,
            pretty_name=pretty_name,
            reference=reference,
            random=random,
            fn=checked,
            unchecked=fn,
            plan=plan,
            prepare=prepare,
            reference_rate=reference_rate,
        )
        return checked

    return decorator


def register_prepared(*, name: str, pretty_name: str, reference: str, applies_as: str, random: bool,
                      prepare: Callable[..., Prepared]) -> None:
    """Register a sweep entry that chooses parameters with ``prepare``, then applies as the method ``applies_as``.

    Args:
        name: Registry key: a lowercase identifier, unique.
        pretty_name / reference: as for :func:`register`.
        applies_as: A registered tensor method (e.g. ``"darex_q"``).
        random: Whether the applied result depends on the seed.
        prepare: ``prepare(ctx: PrepareContext, *, rate, seed, backend, **params) -> Prepared``; its own
            keyword-only parameters (beyond rate, seed, backend) are the entry's schema.

    Raises:
        ValueError: a malformed or taken name, or ``applies_as`` is not a registered tensor method.
    """
    _check_free(name)
    target = _REGISTRY.get(applies_as)
    if target is None or target.unchecked is None:
        raise ValueError(f"{name!r} applies as {applies_as!r}, which is not a registered tensor method")
    _REGISTRY[name] = MethodInfo(name=name, pretty_name=pretty_name, reference=reference, random=random, fn=None,
                                 unchecked=None, prepare=prepare, applies_as=applies_as)


def get_method(name: str) -> MethodInfo:
    """Look up a registered pruning method.

    Args:
        name: Registry key, e.g. ``"dare"``.

    Returns:
        The method's :class:`MethodInfo`.

    Raises:
        KeyError: If no method has that name (the message lists the registered ones and how to add one).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise KeyError(
            f"unknown pruning method {name!r}; registered: {', '.join(sweep_methods())}. "
            "To add one, decorate a function fn(delta, *, rate, seed, name, **params) -> Tensor with "
            "@deltakit.methods.register(name=..., pretty_name=..., reference=..., random=...) "
            "(see deltakit/methods/registry.py)"
        ) from None


def available_methods() -> list[str]:
    """Names of the registered tensor pruning methods (what ``get_method(name).fn`` runs on a delta), sorted."""
    return sorted(n for n, info in _REGISTRY.items() if info.unchecked is not None and info.reference_rate is None)


def sweep_methods() -> list[str]:
    """Names of everything a user can ask a sweep to run: tensor methods and prepared entries, sorted."""
    return sorted(n for n, info in _REGISTRY.items() if info.reference_rate is None)


def reference_methods() -> dict[str, MethodInfo]:
    """The reference points every sweep adds (``finetuned``, ``base``), by name, in rate order."""
    refs = [info for info in _REGISTRY.values() if info.reference_rate is not None]
    return {info.name: info for info in sorted(refs, key=lambda info: info.reference_rate)}


def method_params(name: str) -> dict[str, inspect.Parameter]:
    """The schema of a method: its own keyword-only parameters with annotations and defaults.

    A parameter whose ``default`` is ``inspect.Parameter.empty`` is required.

    Args:
        name: Registry key.

    Returns:
        ``{param_name: inspect.Parameter}`` in declaration order, excluding ``delta``, ``rate``, ``seed``, ``name``.

    Raises:
        KeyError: If the method is unknown.
    """
    return get_method(name).params


def check_rate(rate: float) -> float:
    """Validate a drop rate (fraction of delta entries dropped).

    Args:
        rate: The value to check.

    Returns:
        ``rate`` as a Python float.

    Raises:
        ValueError: If ``rate`` is not a number in [0, 1] (NaN included); the message names the value.
    """
    masks.check_rate(rate)
    return float(rate)


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise if ``tensor`` holds NaN or Inf.

    The fast path is one reduction: a sum is NaN/Inf whenever any term is (IEEE propagation), so a finite sum
    proves a finite tensor; only a non-finite sum (a real NaN/Inf, or a rare overflow) pays for an exact count.

    Args:
        tensor: A floating-point tensor.
        name: Tensor name for the message.

    Raises:
        ValueError: Naming the tensor and how many entries are NaN/Inf.
    """
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(
            f"tensor {name!r} has {bad} non-finite (NaN/Inf) delta entries out of {tensor.numel()}; fix the "
            "checkpoint, exclude the tensor, or pass allow_nonfinite=True to prune it anyway"
        )


def _check_free(name: str) -> None:
    """Refuse a malformed or taken registry name."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"method name must be a lowercase identifier like 'dare' or 'my_method', got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a method named {name!r} is already registered; pick another name")


def _own_params(fn: Callable[..., Tensor]) -> dict[str, inspect.Parameter]:
    signature = inspect.signature(fn, eval_str=True)
    return {
        p.name: p
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in CONTRACT_PARAMS
    }


def _check_contract(method: str, fn: Callable[..., Tensor]) -> None:
    """Reject functions that do not follow ``fn(delta, *, rate, seed, name, **params) -> Tensor``."""
    try:
        signature = inspect.signature(fn, eval_str=True)
    except NameError as exc:
        raise ValueError(f"method {method!r}: cannot resolve the annotations of {fn.__qualname__}: {exc}") from None
    params = list(signature.parameters.values())
    if not params or params[0].name != "delta" or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ValueError(f"method {method!r}: the first parameter must be the positional 'delta'")
    keyword_only = {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    missing = [p for p in CONTRACT_PARAMS if p not in keyword_only]
    if missing:
        raise ValueError(f"method {method!r}: missing keyword-only parameters {missing} (contract: rate, seed, name)")
    others = [p.name for p in params[1:] if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if others:
        raise ValueError(
            f"method {method!r}: parameters {others} must be explicit keyword-only parameters (declared after '*', "
            "no *args/**kwargs: the signature is the schema)"
        )
    if "allow_nonfinite" in keyword_only:
        raise ValueError(f"method {method!r}: 'allow_nonfinite' is reserved for the registry's input check")
    unannotated = [n for n, p in keyword_only.items() if n not in CONTRACT_PARAMS and p.annotation is p.empty]
    if unannotated:
        raise ValueError(f"method {method!r}: parameters {unannotated} need type annotations (they are the schema)")
