"""Calibration: per-input-feature activation statistics of every ``nn.Linear``, from forward hooks.

Two statistics per Linear input feature j, over all (non-padding) calibration tokens:

* the mean activation x̄_j -- DAREx's analytical q uses c_ij = ΔW_ij · x̄_j (Deng et al. 2025, arXiv:2410.09344:
  the authors' code records the *mean*, not a norm);
* the L2 norm ‖X_j‖₂ -- the WANDA score |ΔW_ij| · ‖X_j‖₂ (Sun et al. 2024).

Sums are accumulated in fp64. Statistics are keyed by the Linear's *weight* tensor name
(``bert.encoder.layer.0.attention.self.query.weight``), the name the pruning methods see.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

__all__ = ["Activations", "collect_activations", "calibration_batches"]


@dataclass(frozen=True)
class Activations:
    """Per-Linear input statistics.

    Attributes:
        mean: weight name -> (in_features,) fp32 mean input activation.
        l2: weight name -> (in_features,) fp32 L2 norm of the input feature over all tokens.
        n_tokens: weight name -> number of input rows (tokens) seen.
    """

    mean: dict[str, torch.Tensor]
    l2: dict[str, torch.Tensor]
    n_tokens: dict[str, int]


def calibration_batches(tokenizer, texts: Sequence[str], *, batch_size: int = 16,
                        max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenize calibration texts into padded batches (with attention masks).

    Raises:
        ValueError: no texts.
    """
    if not texts:
        raise ValueError("no calibration texts: pass a few dozen unlabelled examples of the task's inputs.")
    return [dict(tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


@torch.inference_mode()
def collect_activations(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], *,
                        progress: bool = False) -> Activations:
    """Run calibration batches through ``model`` and record per-Linear input statistics.

    Padding tokens are excluded: for inputs shaped (batch, seq, features) the batch's attention mask selects
    the real tokens; 2-D inputs (e.g. BERT's pooler, which sees only the [CLS] token) count every row.

    Args:
        model: the (fine-tuned) model; it is put in eval mode.
        batches: tokenized batches (see :func:`calibration_batches`).
        progress: show a progress bar.

    Returns:
        The statistics.
    """
    model.eval()
    device = next(model.parameters()).device
    names = {m: f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sums: dict[str, torch.Tensor] = {}
    sumsq: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0].detach()
        mask = state["mask"]
        if x.dim() == 3 and mask is not None and mask.shape == x.shape[:2]:
            x = x[mask.bool()]  # (tokens, in)
        x = x.reshape(-1, x.shape[-1]).double()  # (rows, in)
        key = names[module]
        sums[key] = sums.get(key, 0) + x.sum(0)
        sumsq[key] = sumsq.get(key, 0) + (x * x).sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        for batch in tqdm(list(batches), desc="calibration", leave=False, disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            state["mask"] = batch.get("attention_mask")
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return Activations(
        mean={k: (sums[k] / counts[k]).float() for k in sums},
        l2={k: sumsq[k].sqrt().float() for k in sumsq},
        n_tokens=dict(counts),
    )
