"""Triton kernels and the torch references they equal bit for bit (or within a stated tolerance, for statistics).

Importing this package never imports triton: the kernel modules (``triton_*.py``, plain module-level
``@triton.jit`` functions) are imported by their launchers when the Triton backend runs. ``backend="auto"`` (see
:func:`resolve_backend`) picks the Triton kernels for CUDA tensors when triton is installed, the torch references
otherwise.

* :mod:`deltakit.kernels.fused` -- :func:`fused_apply`, the one entry point of the fused DARE/DAREx apply: the Triton
  launcher or the blocked torch launcher.
* :mod:`deltakit.kernels.apply` -- backend selection, the reference :func:`fused_apply_torch`, the Triton launchers
  :func:`fused_apply_triton` and :func:`uniform_triton`; kernels in :mod:`deltakit.kernels.triton_apply`.
* :mod:`deltakit.kernels.merge` -- the fused merge of K fine-tunes (task arithmetic, TIES, DARE+TA/TIES, Breadcrumbs):
  :class:`~deltakit.kernels.merge.MergePlan`, the reference ``fused_merge_torch`` and the entry point ``fused_merge``;
  Triton launcher in :mod:`deltakit.kernels.merge_triton`, kernel in :mod:`deltakit.kernels.triton_merge`.
* :mod:`deltakit.kernels.stats` -- one-pass delta statistics, :func:`partials_triton` (reference
  ``deltakit.partials.partials_torch``); kernel in :mod:`deltakit.kernels.triton_stats`.
"""

from __future__ import annotations

from deltakit.kernels.apply import (
    BACKENDS,
    fused_apply_torch,
    fused_apply_triton,
    interpreter_enabled,
    resolve_backend,
    triton_available,
    uniform_triton,
)
from deltakit.kernels.fused import fused_apply
from deltakit.kernels.stats import partials_triton

__all__ = [
    "BACKENDS",
    "fused_apply",
    "fused_apply_torch",
    "fused_apply_triton",
    "interpreter_enabled",
    "partials_triton",
    "resolve_backend",
    "triton_available",
    "uniform_triton",
]
