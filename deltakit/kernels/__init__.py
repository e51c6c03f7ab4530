"""Triton kernels and the torch references they equal bit for bit (or within a stated tolerance, for statistics).

Importing this package never imports triton: kernels are built on first use. ``backend="auto"`` (see
:func:`resolve_backend`) picks the Triton kernels for CUDA tensors when triton is installed, the torch references
otherwise.

* :mod:`deltakit.kernels.apply` -- fused DARE/DAREx apply (:func:`fused_apply`; reference :func:`fused_apply_torch`).
* :mod:`deltakit.kernels.stats` -- one-pass delta statistics (``partials_triton``; reference
  ``deltakit.stats.partials_torch``). Imported on first access, so ``deltakit.stats`` may import this package.
"""

from __future__ import annotations

from typing import Any

from deltakit.kernels.apply import (
    BACKENDS,
    fused_apply,
    fused_apply_torch,
    interpreter_enabled,
    resolve_backend,
    triton_available,
    uniform_triton,
)

__all__ = [
    "BACKENDS",
    "fused_apply",
    "fused_apply_torch",
    "interpreter_enabled",
    "partials_triton",
    "resolve_backend",
    "triton_available",
    "uniform_triton",
]


def __getattr__(name: str) -> Any:
    # deltakit.kernels.stats needs deltakit.stats, which may itself import this package: resolve it lazily.
    if name == "partials_triton":
        from deltakit.kernels.stats import partials_triton

        return partials_triton
    raise AttributeError(f"module 'deltakit.kernels' has no attribute {name!r}")
