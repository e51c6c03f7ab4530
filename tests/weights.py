"""An evaluator whose one number changes with any bit of any parameter (equal numbers: equal weights)."""

from __future__ import annotations

import hashlib

import torch


def weights_digest(model: torch.nn.Module) -> dict[str, float]:
    """The first 48 bits of a sha256 over every parameter's name and bytes, as the ``accuracy`` metric."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"accuracy": float(int(h.hexdigest()[:12], 16))}


weights_digest.fingerprint = "weights-digest-v1"
