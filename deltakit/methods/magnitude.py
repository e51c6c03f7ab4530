"""Importance-based delta-parameter pruning: magnitude (MP) and Wanda-style scores.

Instead of a random mask, these methods keep the delta entries that look most important and drop the rest:

* **magnitude** -- per tensor, keep the top ``1 - rate`` fraction by ``|delta|``; the magnitude-pruning (MP)
  baseline of DARE (Yu et al., 2024, arXiv:2311.03099) and PEFT's ``magnitude_based_pruning``.
* **wanda** -- score ``|delta_ij| * ||X_j||_2`` (``X_j``: input feature j over calibration tokens) and keep the top
  ``1 - rate`` per output row: Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for Large Language
  Models", arXiv:2306.11695) applied to deltas, the importance baseline of DAREx (Deng et al., 2025,
  arXiv:2410.09344), which reports that importance-based pruning beats DARE when deltas are large.

Neither rescales by default: MergeLM issue #16 (yule-BUAA/MergeLM) and the DARE paper found magnitude pruning with
DARE's ``1 / (1 - rate)`` rescale much worse than without, because the kept entries are the largest ones, not an
unbiased sample.

Counting rule (both methods): a group of ``n`` entries (the tensor for magnitude, one row for wanda) drops exactly
``round_half_up(rate * n)`` entries, the lowest-scoring ones; ties are broken by position, the entry with the lower
flat index is dropped first. So the kept count is exact and deterministic (unlike MergeLM's ``kthvalue`` threshold,
where ties can drop extra entries), masks are nested across rates, and ``seed`` is ignored. NaN/Inf deltas (only
with ``allow_nonfinite=True``) rank as the largest scores and are kept first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deltakit.methods.dare import dare_scale
from deltakit.methods.prepare import PrepareContext, Prepared
from deltakit.methods.registry import register

__all__ = ["magnitude", "wanda", "drop_count", "keep_top"]


def drop_count(rate: float, n: int) -> int:
    """How many of ``n`` entries a deterministic method drops at ``rate``: ``round_half_up(rate * n)``.

    Rounding (not flooring) keeps e.g. ``rate = 0.7, n = 10`` at 7 despite ``0.7 * 10`` being 6.999...; half-up
    makes the count monotone in ``rate``, so masks stay nested.

    Args:
        rate: Fraction dropped, in [0, 1].
        n: Group size.

    Returns:
        An int in ``[0, n]``.
    """
    return min(n, max(0, math.floor(rate * n + 0.5)))


def keep_top(scores: Tensor, n_drop: int) -> Tensor:
    """Keep mask that drops the ``n_drop`` lowest scores of every row, lower column index dropped first on ties.

    Equivalent to a stable ascending sort of each row and dropping its first ``n_drop`` positions, in linear time
    (``kthvalue`` finds the threshold; only ties at the threshold need their positions).

    Args:
        scores: ``(rows, n)`` float32 scores; NaN is ranked as +inf.
        n_drop: Entries to drop per row, in ``[0, n]``.

    Returns:
        ``(rows, n)`` bool tensor, True = kept; exactly ``n - n_drop`` True per row.
    """
    rows, n = scores.shape
    if n_drop <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_drop >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    scores = torch.nan_to_num(scores, nan=math.inf, posinf=math.inf)  # NaN ranks with +inf (kept first)
    threshold = scores.kthvalue(n_drop, dim=1, keepdim=True).values  # (rows, 1): the n_drop-th smallest
    below = scores < threshold  # (rows, n) strictly lower: always dropped
    tie = scores == threshold  # (rows, n) at the threshold: drop the first `room` of them by position
    room = n_drop - below.sum(dim=1, keepdim=True)  # (rows, 1), >= 1
    tie_rank = tie.to(torch.int32).cumsum(dim=1, dtype=torch.int32)  # (rows, n): 1-based rank among ties
    return ~(below | (tie & (tie_rank <= room)))


def _prune_by_magnitude(delta: Tensor, *, rate: float, rescale: bool) -> Tensor:
    d32 = delta.float()  # (...) fp32 view or copy; never written
    keep = keep_top(d32.abs().reshape(1, -1), drop_count(rate, d32.numel())).reshape(delta.shape)
    kept = d32 * dare_scale(rate) if rescale else d32
    return torch.where(keep, kept, 0.0).to(delta.dtype)


@register(
    name="magnitude",
    pretty_name="Magnitude (MP)",
    reference="Yu et al. 2024, arXiv:2311.03099 (MP baseline); PEFT merge_utils.magnitude_based_pruning",
    random=False,
)
def magnitude(delta: Tensor, *, rate: float, seed: int, name: str, rescale: bool = False) -> Tensor:
    """Magnitude pruning: keep the ``1 - rate`` fraction of entries with the largest ``|delta|`` in the tensor.

    Drops exactly ``round_half_up(rate * numel)`` entries, ties broken by flat index (lower dropped first; see
    the module docstring). Deterministic: ``seed`` is ignored.

    Args:
        delta: Fine-tuned minus base, any shape.
        rate: Fraction of entries dropped, in [0, 1].
        seed: Ignored (kept for the common method signature).
        name: Checkpoint tensor name (unused).
        rescale: Multiply the kept entries by DARE's ``1 / (1 - rate)``. Off by default and usually harmful:
            MergeLM issue #16 and the DARE paper report MP + rescale far below MP.

    Returns:
        The pruned delta, same shape and dtype (computed in fp32, rounded once).
    """
    return _prune_by_magnitude(delta, rate=rate, rescale=rescale)


def _wanda_prepare(ctx: PrepareContext, *, rate: float, seed: int, backend: str = "auto") -> Prepared:
    """Activation norms ``||X_j||_2`` of the fine-tuned model on calibration texts, per 2-D prunable tensor.

    A 2-D tensor that is no Linear input (an embedding) gets ones: per-row magnitude pruning.
    """
    l2 = ctx.activations().l2
    shapes = {t.name: t.param.shape for t in ctx.targets}

    def params_for(name: str) -> dict[str, Tensor]:
        shape = shapes[name]
        return {"act_norms": l2.get(name, torch.ones(shape[1]))} if len(shape) == 2 else {}

    return Prepared(params_for=params_for)


@register(
    name="wanda",
    pretty_name="Wanda (delta)",
    reference="Sun et al. 2024, Wanda, arXiv:2306.11695; on deltas: Deng et al. 2025, arXiv:2410.09344",
    random=False,
    prepare=_wanda_prepare,
)
def wanda(delta: Tensor, *, rate: float, seed: int, name: str, act_norms: Tensor | None = None) -> Tensor:
    """Wanda on deltas: score ``|delta_ij| * ||X_j||_2``, keep the top ``1 - rate`` of every output row.

    ``delta`` is a ``(out_features, in_features)`` weight delta; row i is output unit i. Each row drops exactly
    ``round_half_up(rate * in_features)`` entries, ties broken by column index (lower dropped first). No rescale.
    1-D tensors (biases, norm weights) have no input features to weigh, so they fall back to per-tensor
    magnitude pruning and ``act_norms`` is not needed for them. Deterministic: ``seed`` is ignored.

    Args:
        delta: Fine-tuned minus base: 2-D ``(out, in)``, or 1-D (magnitude fallback).
        rate: Fraction of entries dropped per row, in [0, 1].
        seed: Ignored.
        name: Checkpoint tensor name (for messages).
        act_norms: ``(in,)`` L2 norm of each input feature over the calibration tokens, ``||X_j||_2``;
            required for 2-D deltas, finite and >= 0.

    Returns:
        The pruned delta, same shape and dtype.

    Raises:
        ValueError: If ``act_norms`` is missing for a 2-D delta, has the wrong length, or holds negative /
            non-finite values; or if ``delta`` has more than 2 dimensions.
    """
    if delta.dim() < 2:
        return _prune_by_magnitude(delta, rate=rate, rescale=False)
    if delta.dim() > 2:
        raise ValueError(
            f"wanda scores (out, in) weight deltas; {name!r} has shape {tuple(delta.shape)}. "
            "Reshape it to 2-D or use 'magnitude' for this tensor"
        )
    n_in = delta.shape[1]
    if act_norms is None:
        raise ValueError(
            f"wanda needs act_norms for {name!r}: a 1-D tensor of input-feature L2 norms ||X_j||_2 from "
            f"calibration data (expected length {n_in}, got None)"
        )
    if not isinstance(act_norms, Tensor) or act_norms.dim() != 1 or act_norms.numel() != n_in:
        got = f"shape {tuple(act_norms.shape)}" if isinstance(act_norms, Tensor) else type(act_norms).__name__
        raise ValueError(
            f"wanda act_norms for {name!r} (shape {tuple(delta.shape)}) must be 1-D with one norm per input "
            f"feature: expected length {n_in}, got {got}"
        )
    norms = act_norms.detach().to(device=delta.device, dtype=torch.float32)  # (in,)
    if not bool(torch.isfinite(norms).all()) or bool((norms < 0).any()):
        raise ValueError(f"wanda act_norms for {name!r} must be finite and >= 0 (they are L2 norms)")
    d32 = delta.float()  # (out, in)
    scores = d32.abs() * norms  # (out, in): |dW_ij| * ||X_j||_2
    keep = keep_top(scores, drop_count(rate, n_in))  # (out, in)
    return torch.where(keep, d32, 0.0).to(delta.dtype)
