"""Random delta-parameter pruning: DARE, its drop-only ablation, and DAREx-q.

DARE (Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", arXiv:2311.03099) drops every delta entry independently with probability ``rate`` and rescales the
survivors by ``1 / (1 - rate)``, which keeps every output unchanged in expectation. Without the rescale
("DropOnly", the paper's ablation) a layer's output shrinks by ``1 - rate`` on average. DAREx-q (Deng et al.,
2025, "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models", arXiv:2410.09344) keeps the
same mask and rescales by ``1 / q`` with ``1 - rate <= q <= 1``: a larger q trades a little bias for much less
variance, which is what rescues DARE at extreme rates such as 0.99.

All three are "keep iff u >= rate, multiply the kept deltas by a scale", with ``u`` the counter-based uniform
number of each entry (``deltakit.masks``). Each method declares that as a :class:`RandomPlan` and computes
through the one torch reference of the maths, ``deltakit.kernels.apply.fused_apply_torch``, so that
``deltakit.prune.apply_method`` (which runs the same plan fused over base and fine-tuned weights, in Triton on
CUDA) equals ``base + method(ft - base)`` bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltakit import masks
from deltakit.darex import q_in_range
from deltakit.kernels.apply import fused_apply_torch
from deltakit.methods.registry import RandomPlan, register

__all__ = ["dare", "drop_only", "darex_q", "dare_scale", "q_scale", "prune_random"]



def dare_scale(rate: float) -> float:
    """DARE's rescale of kept deltas, ``1 / (1 - rate)``; 1.0 at ``rate == 1``, where nothing is kept.

    Args:
        rate: Fraction of delta entries dropped, in [0, 1].

    Returns:
        The scale as a Python float.
    """
    return 1.0 / (1.0 - rate) if rate < 1.0 else 1.0


def q_scale(q: float | Tensor, *, rate: float, like: Tensor, method: str) -> float | Tensor:
    """DAREx-q's rescale ``1 / q`` after checking ``1 - rate <= q <= 1``.

    Args:
        q: A number, or a 1-D tensor with one q per row (first dimension) of a delta with at least 2 dimensions.
        rate: Fraction of delta entries dropped, in [0, 1].
        like: A tensor with the delta's shape and device (where a per-row scale is placed).
        method: Method name, for error messages.

    Returns:
        ``1 / q`` as a Python float, or as a float32 tensor of shape ``(rows,)`` on ``like.device`` (computed in
        float64 and rounded once, so a per-row q equal to a scalar q gives the same scale). At ``rate == 1``
        nothing is kept and the scale is 1.0.

    Raises:
        ValueError: If q is outside [1 - rate, 1] (small rounding slack allowed), non-finite, or a per-row q does
            not match the delta's rows.
    """
    low = 1.0 - rate
    allowed = f"[1 - rate, 1] = [{low:.6g}, 1] for rate={rate:g} (q = 1 - rate is DARE, q = 1 is drop_only)"
    if isinstance(q, Tensor) and q.dim() == 0:
        q = float(q)
    if isinstance(q, Tensor):
        rows = masks.matrix_shape(like.shape)[0]
        if like.dim() < 2 or q.dim() != 1 or q.numel() != rows or not q.dtype.is_floating_point:
            raise ValueError(
                f"{method}: a per-row q must be a 1-D float tensor with one value per row of a delta with >= 2 "
                f"dimensions; the delta has shape {tuple(like.shape)} ({rows} rows), got q of shape "
                f"{tuple(q.shape)} and dtype {q.dtype}. Pass a float q to use one value for every row."
            )
        q64 = q.detach().to(device="cpu", dtype=torch.float64)
        ok = q_in_range(q64, rate) & (q64 > 0.0)  # NaN fails every comparison
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0])
            raise ValueError(f"{method}: q must be in {allowed}; row {i} has q={float(q64[i])!r}")
        if rate >= 1.0:
            return 1.0
        return (1.0 / q64).to(dtype=torch.float32, device=like.device)
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise ValueError(f"{method}: q must be a float in {allowed}, or a per-row tensor; got {q!r}")
    value = float(q)
    if not q_in_range(value, rate) or (value <= 0.0 and rate < 1.0):
        raise ValueError(f"{method}: q must be in {allowed}; got q={q!r}")
    if rate >= 1.0 or value <= 0.0:
        return 1.0
    return 1.0 / value


def prune_random(delta: Tensor, plan: RandomPlan, *, rate: float, seed: int, name: str) -> Tensor:
    """Run a random plan on a delta: ``where(u >= rate, delta * scale, 0)`` in fp32, cast once to delta's dtype.

    Implemented as ``fused_apply_torch(out, base=0, ft=delta)``: with a zero base the fused maths is exactly the
    pruned delta (``0 + x == x``), so a method and the fused apply share one definition.

    Args:
        delta: The delta tensor (not modified).
        plan: Mask axis and scale.
        rate: Fraction dropped, in [0, 1].
        seed: Global seed.
        name: Checkpoint tensor name (keys the mask).

    Returns:
        A new tensor with delta's shape and dtype.
    """
    src = delta.contiguous()  # the mask indexes the row-major (logical) layout
    out = torch.empty_like(src)
    fused_apply_torch(
        out,
        torch.zeros_like(src),
        src,
        key=masks.tensor_key(seed, name, plan.axis),
        rate=rate,
        scale=plan.scale,
        axis=plan.axis,
    )
    return out


def _dare_plan(like: Tensor, *, rate: float) -> RandomPlan:
    return RandomPlan(axis="element", scale=dare_scale(rate))


def _drop_only_plan(like: Tensor, *, rate: float) -> RandomPlan:
    return RandomPlan(axis="element", scale=1.0)


def _darex_q_plan(like: Tensor, *, rate: float, q: float | Tensor) -> RandomPlan:
    return RandomPlan(axis="element", scale=q_scale(q, rate=rate, like=like, method="darex_q"))


@register(
    name="dare",
    pretty_name="DARE",
    reference="Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099",
    random=True,
    plan=_dare_plan,
)
def dare(delta: Tensor, *, rate: float, seed: int, name: str) -> Tensor:
    """DARE: drop each entry with probability ``rate``, rescale the survivors by ``1 / (1 - rate)``.

    The DARE scale is ``1 / (1 - rate)``, so ``E[output] = delta`` entry by entry. An entry is kept iff its
    counter-based uniform number ``u >= rate`` (``deltakit.masks``), so the number kept is Binomial, not an exact
    count. Rate 0 returns ``delta`` unchanged; rate 1 returns zeros (the rescale is skipped, no NaN).

    Args:
        delta: Fine-tuned minus base, any shape, float dtype.
        rate: Fraction of entries dropped, in [0, 1].
        seed: Global seed.
        name: Checkpoint tensor name; with ``seed`` it keys the mask.

    Returns:
        The pruned delta, same shape and dtype (computed in fp32, rounded once).
    """
    return prune_random(delta, _dare_plan(delta, rate=rate), rate=rate, seed=seed, name=name)


@register(
    name="drop_only",
    pretty_name="Drop only (DARE without rescale)",
    reference="Yu et al. 2024, arXiv:2311.03099 (the DropOnly ablation of DARE)",
    random=True,
    plan=_drop_only_plan,
)
def drop_only(delta: Tensor, *, rate: float, seed: int, name: str) -> Tensor:
    """DARE's mask without the rescale: survivors keep their value, so ``E[output] = (1 - rate) * delta``.

    The ablation showing that the rescale is what makes DARE work: without it accuracy drops once rate reaches
    about 0.3-0.4 (Yu et al. 2024).

    Args:
        delta: Fine-tuned minus base.
        rate: Fraction of entries dropped, in [0, 1].
        seed: Global seed.
        name: Checkpoint tensor name (keys the mask).

    Returns:
        The pruned delta, same shape and dtype.
    """
    return prune_random(delta, _drop_only_plan(delta, rate=rate), rate=rate, seed=seed, name=name)


@register(
    name="darex_q",
    pretty_name="DAREx-q",
    reference="Deng et al. 2025, DARE the Extreme (DAREx-q), arXiv:2410.09344",
    random=True,
    plan=_darex_q_plan,
)
def darex_q(delta: Tensor, *, rate: float, seed: int, name: str, q: float | Tensor) -> Tensor:
    """DAREx-q: DARE's mask, survivors rescaled by ``1 / q`` instead of ``1 / (1 - rate)``.

    The DAREx-q scale is ``1 / q`` with ``1 - rate <= q <= 1``: ``q = 1 - rate`` is DARE, ``q = 1`` is drop_only,
    and the paper's useful range is ``1 - rate <= q < 1``. ``E[output] = (1 - rate) / q * delta``: biased towards
    zero for ``q > 1 - rate``, with variance reduced by ``((1 - rate) / q)^2``.

    Args:
        delta: Fine-tuned minus base.
        rate: Fraction of entries dropped, in [0, 1].
        seed: Global seed.
        name: Checkpoint tensor name (keys the mask).
        q: One q for the whole tensor, or a 1-D tensor with one q per row (first dimension) for a delta with at
            least 2 dimensions (the paper's per-neuron / per-layer variants).

    Returns:
        The pruned delta, same shape and dtype.

    Raises:
        ValueError: If q is outside [1 - rate, 1] or a per-row q has the wrong length.
    """
    return prune_random(delta, _darex_q_plan(delta, rate=rate, q=q), rate=rate, seed=seed, name=name)
