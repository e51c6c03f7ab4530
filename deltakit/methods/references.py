"""The two reference points of every sweep, as registry entries: the fine-tune itself and the base.

``finetuned`` keeps the whole delta and runs at rate 0; ``base`` drops it all and runs at rate 1. As tensor methods
they go through the same apply as every other point (``base + method(delta)`` in fp32, one cast), which writes the
fine-tuned values exactly at rate 0 and the base values exactly when the pruned delta is zero. Tensors outside the
prunable set keep their fine-tuned values in both (the new classifier head of a fine-tune, for instance).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltakit.methods.registry import register

__all__ = ["finetuned", "base"]


@register(name="finetuned", pretty_name="fine-tuned", reference="the fine-tuned model (no pruning)", random=False,
          reference_rate=0.0)
def finetuned(delta: Tensor, *, rate: float, seed: int, name: str) -> Tensor:
    """The whole delta: the fine-tuned model itself (the curve's reference at rate 0)."""
    return delta.clone()


@register(name="base", pretty_name="base", reference="the pre-trained base (every delta dropped)", random=False,
          reference_rate=1.0)
def base(delta: Tensor, *, rate: float, seed: int, name: str) -> Tensor:
    """No delta at all: the base's values in every prunable tensor (the curve's reference at rate 1)."""
    return torch.zeros_like(delta)
