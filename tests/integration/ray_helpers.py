"""Helpers for the Ray sweep tests, importable by Ray workers (``tests.integration.ray_helpers``, with the
repository root on their PYTHONPATH), and a sweep driver run as a subprocess (``python -m``) so a test can kill it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

BASE, FT = "family:tiny/base", "family:tiny/sentiment3"


class WeightEvaluator:
    """A cheap evaluator: mean |weight| of two prunable tensors (changes with every rewrite; no data to load).

    Args:
        dies_at / marker: the worker process exits (``os._exit``) on its ``dies_at``-th call if it is the first to
            create the file ``marker``: exactly one worker dies, once, whatever the scheduling.
        hold_after / release: after ``hold_after`` calls, each further call waits until the file ``release``
            exists: every worker finishes exactly ``hold_after`` points, then the sweep stands still.
    """

    fingerprint = "ray-test-weights-v1"

    def __init__(self, *, dies_at: int | None = None, marker: str | Path | None = None,
                 hold_after: int | None = None, release: str | Path | None = None) -> None:
        self.dies_at, self.marker = dies_at, None if marker is None else str(marker)
        self.hold_after, self.release = hold_after, None if release is None else str(release)
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        if self.dies_at is not None and self.calls == self.dies_at and self.marker is not None:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(3)  # this worker process dies mid-point, like a lost node
        if self.hold_after is not None and self.calls > self.hold_after and self.release is not None:
            while not os.path.exists(self.release):
                time.sleep(0.05)
        layer = model.bert.encoder.layer[0]
        return {"accuracy": float(layer.attention.self.query.weight.detach().abs().mean()),
                "ffn": float(layer.intermediate.dense.weight.detach().abs().mean())}


def killable_spec():
    from deltakit.spec import SweepSpec

    return SweepSpec(BASE, FT, methods=["dare"], rates=[0.3, 0.5, 0.7, 0.9], seeds=[0, 1])


def main(argv: list[str]) -> None:
    """``python -m tests.integration.ray_helpers ADDRESS OUT RELEASE``: a driver whose workers hold after 2 points."""
    from deltakit.ray_runner import RayRunner
    from deltakit.spec import RunOptions
    from deltakit.sweep import sweep

    address, out, release = argv
    env = {name: os.environ[name] for name in ("DELTAKIT_HOME", "PYTHONPATH", "HF_HOME") if name in os.environ}
    sweep(killable_spec(), RunOptions(out=out, progress=False),
          evaluator=WeightEvaluator(hold_after=2, release=release),
          runner=RayRunner(address, workers=2, runtime_env={"env_vars": env}))


if __name__ == "__main__":
    main(sys.argv[1:])
