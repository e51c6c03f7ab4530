"""Structural delta-parameter pruning: drop whole rows or columns of a weight delta.

DAREx (Deng et al., 2025, "DARE the Extreme", arXiv:2410.09344) notes that DAREx-q "can facilitate structural DPP":
instead of one Bernoulli draw per entry, draw one per **row** (output unit i of an ``(out, in)`` weight) or per
**column** (input feature j), zero the whole row/column of the delta and rescale the survivors. Every entry is
still kept with probability ``1 - rate``, so with the DARE scale ``1 / (1 - rate)`` the output is unbiased entry by
entry; the paper pairs it with DAREx-q's ``1 / q``. The draws come from the row/column streams of
``deltakit.masks`` (one uniform number per row or column, keyed by (seed, tensor name, axis)), so CPU and GPU agree
bit for bit and masks are nested across rates. The paper ships no code for this variant: this follows the
proposed implementation of the reference spec (rows and columns as in ``deltakit.masks.matrix_shape``).

1-D tensors (biases, norm weights) have no rows or columns to speak of, so they are pruned element-wise, exactly
like DARE (or DAREx-q with the given q).
"""

from __future__ import annotations

from torch import Tensor

from deltakit.methods.dare import dare_scale, prune_random, q_scale
from deltakit.methods.registry import RandomPlan, register

__all__ = ["structural"]

_STRUCT_AXES = ("row", "col")


def _structural_plan(like: Tensor, *, rate: float, axis: str = "row", q: float | None = None) -> RandomPlan:
    if axis not in _STRUCT_AXES:
        raise ValueError(
            f"structural: axis must be one of {_STRUCT_AXES} (drop whole rows = output units, or whole columns "
            f"= input features), got {axis!r}"
        )
    scale = dare_scale(rate) if q is None else q_scale(q, rate=rate, like=like, method="structural")
    return RandomPlan(axis=axis if like.dim() >= 2 else "element", scale=scale)


@register(
    name="structural",
    pretty_name="Structural DARE (rows / columns)",
    reference="Deng et al. 2025, DARE the Extreme (structural DPP), arXiv:2410.09344",
    random=True,
    plan=_structural_plan,
)
def structural(
    delta: Tensor, *, rate: float, seed: int, name: str, axis: str = "row", q: float | None = None
) -> Tensor:
    """Drop whole rows or columns of the delta with probability ``rate``, rescale the survivors.

    Scale: DARE's ``1 / (1 - rate)`` by default (unbiased), or DAREx-q's ``1 / q`` with ``1 - rate <= q <= 1``.
    For a tensor with more than 2 dimensions a row is the first dimension and a column everything after it
    (``deltakit.masks.matrix_shape``). 1-D tensors are pruned element-wise (see the module docstring).

    Args:
        delta: Fine-tuned minus base.
        rate: Probability that a row (column) is dropped, in [0, 1].
        seed: Global seed.
        name: Checkpoint tensor name (keys the row/column stream).
        axis: ``"row"`` (output units) or ``"col"`` (input features).
        q: DAREx-q's q, or None for DARE's rescale.

    Returns:
        The pruned delta, same shape and dtype.

    Raises:
        ValueError: If ``axis`` is not "row"/"col" or ``q`` is outside [1 - rate, 1].
    """
    return prune_random(delta, _structural_plan(delta, rate=rate, axis=axis, q=q), rate=rate, seed=seed, name=name)
