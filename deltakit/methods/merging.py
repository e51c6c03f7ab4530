"""Merge methods: K fine-tunes' deltas of one tensor -> one merged delta (DESIGN 11: pruning of K deltas + combine).

A merge method is a plain typed function, registered with :func:`register_merge` (the merge side of the one
registry of what a sweep can run; the pruning side is ``deltakit.methods.registry``)::

    fn(deltas: Sequence[Tensor], *, rate: float, seed: int, name: str, lam: float, **params) -> Tensor

``deltas[k]`` is fine-tune k minus the base (same shape, float); the result is ``lam * merged`` in fp32, so the
merged weights are ``base + fn(...)``. ``rate`` is the fraction of each delta dropped before combining (one rate
vocabulary with the pruning methods; peers' ``density`` is ``1 - rate``); ``seed`` and ``name`` key each fine-tune's
own Philox mask (``deltakit.masks.finetune_key(seed, name, k)``). Keyword-only parameters beyond those are the
method's schema, as for pruning methods.

The built-in methods:

* ``ta`` -- task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089):
  ``lam * sum_k delta_k``. It drops nothing, so it runs at rate 0 only.
* ``ties`` -- TIES (Yadav et al. 2023, "TIES-Merging", arXiv:2306.01708): per fine-tune keep the
  ``floor((1 - rate) * n)`` largest ``|delta|`` (ties at the threshold are all kept), elect each entry's sign by the
  summed mass, average the entries that agree (disjoint mean), times ``lam``.
* ``dare_ta`` / ``dare_ties`` -- DARE before merging (Yu et al. 2024, arXiv:2311.03099, the paper's DARE+TA and
  DARE+TIES): each delta is DARE-pruned with its own mask and rescaled by ``1 / (1 - rate)``, or by ``1 / q`` with
  ``q`` given (DAREx-q, Deng et al. 2025, arXiv:2410.09344), then summed (TA) or sign-elected (TIES, no further trim).
* ``breadcrumbs`` -- Model Breadcrumbs (Davari & Belilovsky 2024, arXiv:2312.06795): per fine-tune drop the largest
  ``top`` fraction and the smallest ``rate - top`` fraction of ``|delta|``, sum the rest, times ``lam``.
* ``della`` -- DELLA (Deep et al. 2024, arXiv:2406.11617): magnitude-ranked drop probabilities
  ``rate + epsilon * (1/2 - rank / (n - 1))`` (the largest ``|delta|`` is dropped least), survivors rescaled by
  ``1 / (1 - p_i)``, then TIES' sign election and disjoint mean, times ``lam``.

Methods that are "select, rescale, combine" register a *plan* (:class:`~deltakit.kernels.merge.MergePlan`), so the
resident merge runs them as one fused pass per tensor (``deltakit.kernels.merge.fused_merge``: Triton on CUDA); the
method function computes through the same reference with a zero base, so the two agree bit for bit. ``della``
(per-element probabilities) has no plan and runs in torch.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deltakit import masks
from deltakit.darex import q_in_range
from deltakit.kernels.merge import MAX_FINETUNES, MergePlan, check_lam, fused_merge_torch
from deltakit.methods.dare import dare_scale
from deltakit.methods.registry import _NAME_RE, check_finite

__all__ = ["MergeInfo", "register_merge", "get_merge", "merge_methods", "merge_keys", "run_plan"]

_MERGE_CONTRACT = ("rate", "seed", "name", "lam")
_MERGES: dict[str, MergeInfo] = {}


@dataclass(frozen=True)
class MergeInfo:
    """One registered merge method.

    Attributes:
        name / pretty_name / reference: registry key, label, source paper.
        random: the result depends on the seed.
        uses_rate: the method drops part of each delta (False: ``ta``, run at rate 0 only).
        fn: the checked function. unchecked: the same without input checks.
        plan: ``plan(deltas, *, rate, **params) -> MergePlan`` for fused methods, else None.
    """

    name: str
    pretty_name: str
    reference: str
    random: bool
    uses_rate: bool
    fn: Callable[..., Tensor]
    unchecked: Callable[..., Tensor]
    plan: Callable[..., MergePlan] | None = None

    @property
    def params(self) -> dict[str, inspect.Parameter]:
        """The method's own keyword-only parameters (beyond rate, seed, name, lam), annotations resolved."""
        signature = inspect.signature(self.unchecked, eval_str=True)
        return {p.name: p for p in signature.parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _MERGE_CONTRACT}

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.unchecked) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


def register_merge(*, name: str, pretty_name: str, reference: str, random: bool, uses_rate: bool = True,
                   plan: Callable[..., MergePlan] | None = None) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a merge method under ``name`` (a decorator); returns the checked function.

    The checked function validates the deltas (1 to 8 floating-point tensors of one shape, finite), the rate
    (in [0, 1]) and ``lam`` (finite), then calls the method.

    Raises:
        ValueError: a malformed or taken name, or a function not of the form
            ``fn(deltas, *, rate, seed, name, lam, **annotated params)``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _MERGES:
        raise ValueError(f"merge method name must be a new lowercase identifier, got {name!r}")
    method_name = name

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = list(inspect.signature(fn, eval_str=True).parameters.values())
        keyword_only = {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if not params or params[0].name != "deltas" or any(p not in keyword_only for p in _MERGE_CONTRACT) or \
                any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params[1:]) or \
                any(p.annotation is p.empty for n, p in keyword_only.items() if n not in _MERGE_CONTRACT):
            raise ValueError(f"merge method {method_name!r} must be fn(deltas, *, rate, seed, name, lam, "
                             "**annotated keyword-only params)")

        @functools.wraps(fn)
        def checked(deltas: Sequence[Tensor], *, rate: float, seed: int, name: str, lam: float = 1.0, **params):
            check_deltas(deltas, name)
            masks.check_rate(rate)
            check_lam(lam)
            return fn(list(deltas), rate=float(rate), seed=seed, name=name, lam=float(lam), **params)

        _MERGES[method_name] = MergeInfo(method_name, pretty_name, reference, random, uses_rate, checked, fn, plan)
        return checked

    return decorator


def get_merge(name: str) -> MergeInfo:
    """The registered merge method ``name``.

    Raises:
        KeyError: unknown name (the message lists the registered ones and how to add one).
    """
    try:
        return _MERGES[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown merge method {name!r}; registered: {', '.join(merge_methods())}. To add one, "
                       "decorate fn(deltas, *, rate, seed, name, lam, **params) -> Tensor with "
                       "@deltakit.methods.merging.register_merge(...)") from None


def merge_methods() -> list[str]:
    """Names of the registered merge methods, sorted."""
    return sorted(_MERGES)


def check_deltas(deltas: Sequence[Tensor], name: str) -> None:
    """Refuse anything but 1 to 8 finite floating-point tensors of one shape (naming the tensor)."""
    if isinstance(deltas, Tensor) or not 1 <= len(deltas) <= MAX_FINETUNES:
        got = "a single tensor" if isinstance(deltas, Tensor) else f"{len(deltas)}"
        raise ValueError(f"a merge of {name!r} takes a list of 1 to {MAX_FINETUNES} deltas, got {got}")
    for k, d in enumerate(deltas):
        if not isinstance(d, Tensor) or not d.is_floating_point() or d.shape != deltas[0].shape:
            raise ValueError(f"delta {k} of {name!r} must be a float tensor of shape {tuple(deltas[0].shape)}")
        check_finite(d, f"{name} (fine-tune {k})")


def merge_keys(seed: int, name: str, k: int) -> list[int]:
    """The Philox keys of the K fine-tunes' masks of tensor ``name``."""
    return [masks.finetune_key(seed, name, i) for i in range(k)]


def run_plan(deltas: Sequence[Tensor], plan: MergePlan, *, rate: float, seed: int, name: str, lam: float) -> Tensor:
    """A plan on deltas: the fused reference with a zero base, so ``base + run_plan(...)`` is the fused merge."""
    like = deltas[0].float().contiguous()
    stacked = torch.stack([d.float().contiguous() for d in deltas])  # (K, *shape)
    out = torch.empty_like(like)
    return fused_merge_torch(out, torch.zeros_like(like), stacked, plan, keys=merge_keys(seed, name, len(deltas)),
                             rate=rate, lam=lam)


# ----------------------------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------------------------


def _kth_largest(a: Tensor, k: int) -> float:
    """The k-th largest value of a flat tensor (k >= 1), as a Python float; +inf when k == 0."""
    if k <= 0:
        return math.inf
    return float(torch.kthvalue(a.float().reshape(-1).cpu(), a.numel() - k + 1).values)


def trim_threshold(delta: Tensor, rate: float) -> float:
    """TIES' trim: the ``floor((1 - rate) * n)``-th largest ``|delta|`` (PEFT's kept count); +inf keeps nothing."""
    return _kth_largest(delta.abs(), int((1.0 - rate) * delta.numel()))


def _dare_scale(rate: float, q: float | None) -> float:
    if q is None:
        return dare_scale(rate)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not q_in_range(float(q), rate) or q <= 0:
        raise ValueError(f"q must be in [1 - rate, 1] = [{1 - rate:.6g}, 1] for rate={rate:g} (DAREx-q rescale 1/q), "
                         f"got {q!r}")
    return 1.0 / float(q) if rate < 1.0 else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------------


def _ta_plan(deltas: Sequence[Tensor], *, rate: float) -> MergePlan:
    return MergePlan("sum", random=False, scales=(1.0,) * len(deltas))


def _ties_plan(deltas: Sequence[Tensor], *, rate: float) -> MergePlan:
    lo = tuple(trim_threshold(d, rate) for d in deltas)
    return MergePlan("ties", random=False, scales=(1.0,) * len(deltas), lo=lo, hi=(math.inf,) * len(deltas))


def _dare_ta_plan(deltas: Sequence[Tensor], *, rate: float, q: float | None = None) -> MergePlan:
    return MergePlan("sum", random=True, scales=(_dare_scale(rate, q),) * len(deltas))


def _dare_ties_plan(deltas: Sequence[Tensor], *, rate: float, q: float | None = None) -> MergePlan:
    return MergePlan("ties", random=True, scales=(_dare_scale(rate, q),) * len(deltas))


def _breadcrumbs_plan(deltas: Sequence[Tensor], *, rate: float, top: float = 0.01) -> MergePlan:
    if isinstance(top, bool) or not isinstance(top, (int, float)) or not 0.0 <= top <= rate:
        raise ValueError(f"breadcrumbs: top (the fraction of largest |delta| dropped) must be in [0, rate] = "
                         f"[0, {rate:g}], got {top!r}; the smallest rate - top are dropped too")
    lo, hi = [], []
    for d in deltas:
        n, a = d.numel(), d.abs()
        n_top, n_keep = int(top * n), int((1.0 - rate) * n)
        hi.append(_kth_largest(a, n_top + 1) if n_top > 0 else math.inf)
        lo.append(_kth_largest(a, n_top + n_keep) if n_keep > 0 else math.inf)
    return MergePlan("sum", random=False, scales=(1.0,) * len(deltas), lo=tuple(lo), hi=tuple(hi))


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------

_TA_REF = "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089"
_TIES_REF = "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708"
_DARE_REF = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"


@register_merge(name="ta", pretty_name="Task arithmetic", reference=_TA_REF, random=False, uses_rate=False,
                plan=_ta_plan)
def ta(deltas: Sequence[Tensor], *, rate: float, seed: int, name: str, lam: float) -> Tensor:
    """Task arithmetic: ``lam * sum_k delta_k`` (the rate is ignored: nothing is dropped)."""
    return run_plan(deltas, _ta_plan(deltas, rate=rate), rate=0.0, seed=seed, name=name, lam=lam)


@register_merge(name="ties", pretty_name="TIES", reference=_TIES_REF, random=False, plan=_ties_plan)
def ties(deltas: Sequence[Tensor], *, rate: float, seed: int, name: str, lam: float) -> Tensor:
    """TIES: trim each delta to its largest ``1 - rate`` fraction, elect signs by mass, disjoint mean, times lam."""
    return run_plan(deltas, _ties_plan(deltas, rate=rate), rate=rate, seed=seed, name=name, lam=lam)


@register_merge(name="dare_ta", pretty_name="DARE + TA", reference=_DARE_REF, random=True, plan=_dare_ta_plan)
def dare_ta(deltas: Sequence[Tensor], *, rate: float, seed: int, name: str, lam: float,
            q: float | None = None) -> Tensor:
    """DARE + task arithmetic: DARE each delta (own mask, rescale 1/(1-rate), or 1/q), sum, times lam."""
    return run_plan(deltas, _dare_ta_plan(deltas, rate=rate, q=q), rate=rate, seed=seed, name=name, lam=lam)


@register_merge(name="dare_ties", pretty_name="DARE + TIES", reference=_DARE_REF, random=True, plan=_dare_ties_plan)
def dare_ties(deltas: Sequence[Tensor], *, rate: float, seed: int, name: str, lam: float,
              q: float | None = None) -> Tensor:
    """DARE + TIES: DARE each delta (rescale 1/(1-rate), or 1/q), elect signs by mass, disjoint mean, times lam."""
    return run_plan(deltas, _dare_ties_plan(deltas, rate=rate, q=q), rate=rate, seed=seed, name=name, lam=lam)


@register_merge(name="breadcrumbs", pretty_name="Breadcrumbs", reference="Davari & Belilovsky 2024, Model "
                "Breadcrumbs, arXiv:2312.06795", random=False, plan=_breadcrumbs_plan)
def breadcrumbs(deltas: Sequence[Tensor], *, rate: float, seed: int, name: str, lam: float,
                top: float = 0.01) -> Tensor:
    """Breadcrumbs: drop the largest ``top`` and the smallest ``rate - top`` of each |delta|, sum, times lam."""
    return run_plan(deltas, _breadcrumbs_plan(deltas, rate=rate, top=top), rate=rate, seed=seed, name=name, lam=lam)


@register_merge(name="della", pretty_name="DELLA", reference="Deep et al. 2024, DELLA-Merging, arXiv:2406.11617",
                random=True)
def della(deltas: Sequence[Tensor], *, rate: float, seed: int, name: str, lam: float,
          epsilon: float = 0.1) -> Tensor:
    """DELLA: magnitude-ranked drop probabilities around the rate, rescale 1/(1-p), TIES election, times lam.

    Entry ``i`` of a delta with ``n`` entries, ranked by ``|delta|`` (rank 0 the smallest, ties by index), is dropped
    with probability ``p_i = clamp(rate + epsilon * (1/2 - rank_i / (n - 1)), 0, 1)``: kept iff its Philox number
    ``u_i >= p_i`` (the fine-tune's own stream), survivors are rescaled by ``1 / (1 - p_i)``.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"della: epsilon (the spread of drop probabilities) must be in [0, 1], got {epsilon!r}")
    kept = []
    for k, d in enumerate(deltas):
        flat = d.float().reshape(-1)
        n = flat.numel()
        rank = torch.empty(n, dtype=torch.float32)
        rank[torch.sort(flat.abs().cpu(), stable=True).indices] = torch.arange(n, dtype=torch.float32)
        spread = 0.5 - rank / max(n - 1, 1)
        p = (rate + epsilon * spread).clamp(0.0, 1.0).to(flat.device)
        u = masks.uniform(masks.finetune_key(seed, name, k), n).to(flat.device)
        scale = torch.where(p < 1.0, 1.0 / (1.0 - p.clamp(max=0.999999)), torch.ones_like(p))
        kept.append(torch.where(u >= p, flat * scale, torch.zeros_like(flat)).reshape(d.shape))
    plan = MergePlan("ties", random=False, scales=(1.0,) * len(deltas))
    return run_plan(kept, plan, rate=rate, seed=seed, name=name, lam=lam)
