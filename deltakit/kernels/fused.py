"""The one entry point of the fused DARE apply, and its CPU launcher.

:func:`fused_apply` writes ``where(u >= rate, base + (ft - base) * scale, base)`` into ``dst`` (DARE, Yu et al.
2024, arXiv:2311.03099: ``scale = 1 / (1 - rate)``; DAREx-q, Deng et al. 2025, arXiv:2410.09344: ``scale = 1 / q``)
through one of two launchers of the same maths, whose single definition is
``deltakit.kernels.apply.fused_apply_torch``:

* ``"triton"`` -- ``deltakit.kernels.apply.fused_apply_triton`` (the Triton kernel; CUDA tensors under
  ``backend="auto"``);
* ``"torch"`` -- ``fused_apply_torch`` over cache-sized blocks of whole rows, run by ``torch.get_num_threads()``
  worker threads when the uniform numbers must be made (see :func:`_fused_apply_blocked`).

Both equal one ``fused_apply_torch`` call on the whole tensor bit for bit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from deltakit import masks
from deltakit.kernels.apply import (
    check_apply_args,
    check_uniforms,
    fused_apply_torch,
    fused_apply_triton,
    resolve_backend,
    stream_length,
)

__all__ = ["fused_apply"]

# Entries per block of the CPU path: large enough that per-call overhead is small, small enough that the fp32
# temporaries of one block stay in cache (measured on 2 cores: 2^18 fastest among 2^15..2^20).
_BLOCK = 1 << 18


def fused_apply(
    dst: torch.Tensor,
    base: torch.Tensor,
    ft: torch.Tensor,
    *,
    key: int,
    rate: float,
    scale: float | torch.Tensor,
    axis: str = "element",
    u: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Write ``where(u >= rate, base + (ft - base) * scale, base)`` into ``dst`` with the chosen backend.

    Args:
        dst: Output tensor, same shape and device as ``base``; may be ``ft`` or ``base`` itself (in-place rewrite
            of a live parameter).
        base: Base (pre-trained) weights.
        ft: Fine-tuned weights.
        key: Key of the stream, ``deltakit.masks.tensor_key(seed, name, axis)``.
        rate: Fraction of delta entries dropped, in [0, 1].
        scale: Rescale of kept entries: a float, or a 1-D tensor with one value per row.
        axis: ``"element"``, ``"row"`` or ``"col"`` (see ``fused_apply_torch``).
        u: Optional cached ``uniform(key, m)`` of this tensor's stream (``m`` = numel, rows or columns), so a sweep
            can reuse a seed's numbers for every rate. Used by the torch path only (the Triton kernel makes them in
            registers). Not checked against ``key``.
        backend: ``"auto"`` (Triton for CUDA tensors when triton is installed, else torch), ``"torch"`` or
            ``"triton"``.

    Returns:
        ``dst``.

    Raises:
        ValueError: As ``fused_apply_torch``, or ``backend`` is unknown or cannot run on the tensors' device.
        ImportError: If ``backend="triton"`` and triton is not installed.
    """
    check_apply_args(dst, base, ft, rate=rate, scale=scale, axis=axis)
    if resolve_backend(backend, dst.device) == "triton":
        return fused_apply_triton(dst, base, ft, key=key, rate=rate, scale=scale, axis=axis)
    return _fused_apply_blocked(dst, base, ft, key=key, rate=rate, scale=scale, axis=axis, u=u)


def _fused_apply_blocked(
    dst: torch.Tensor,
    base: torch.Tensor,
    ft: torch.Tensor,
    *,
    key: int,
    rate: float,
    scale: float | torch.Tensor,
    axis: str,
    u: torch.Tensor | None,
) -> torch.Tensor:
    """``fused_apply_torch`` over blocks of whole rows.

    Bit-identical to one ``fused_apply_torch`` call on the whole tensor (element-wise maths; each block gets the
    uniform numbers at its own global indices), but the fp32 temporaries of a block stay in cache. When the numbers
    must be made, blocks run in worker threads so the NumPy Philox of different blocks runs on different cores
    (NumPy and torch release the GIL); when they are given (a sweep's cache), blocks run in turn and torch's
    intra-op threads share each one.
    """
    if u is not None:
        check_uniforms(u, dst.shape, axis)  # before it is cut into blocks
    n_rows, n_cols = masks.matrix_shape(dst.shape)
    rows_per_block = max(1, _BLOCK // max(n_cols, 1))
    workers = max(1, min(torch.get_num_threads(), -(-n_rows // rows_per_block)))
    contiguous = dst.is_contiguous() and base.is_contiguous() and ft.is_contiguous()
    if workers == 1 or not contiguous or dst.device.type != "cpu":  # blocks pay off for CPU caches and cores
        return fused_apply_torch(dst, base, ft, key=key, rate=rate, scale=scale, axis=axis, u=u)
    if u is None and axis != "element":
        u = masks.uniform(key, stream_length(dst.shape, axis))  # one number per row / column: small, made once
    dst2, base2, ft2 = (t.view(n_rows, n_cols) for t in (dst, base, ft))  # (rows, cols) views, no copies
    per_row = isinstance(scale, torch.Tensor) and scale.dim() > 0

    def run(r0: int) -> None:
        r1 = min(n_rows, r0 + rows_per_block)
        if axis == "element":
            lo, hi = r0 * n_cols, r1 * n_cols
            block_u = u[lo:hi] if u is not None else masks.uniform(key, hi - lo, offset=lo, threads=1)
        elif axis == "row":
            block_u = u[r0:r1]
        else:
            block_u = u
        fused_apply_torch(
            dst2[r0:r1],
            base2[r0:r1],
            ft2[r0:r1],
            key=key,
            rate=rate,
            scale=scale[r0:r1] if per_row else scale,
            axis=axis,
            u=block_u,
        )

    blocks = range(0, n_rows, rows_per_block)
    if u is not None:  # nothing to generate: torch's own threads split each block's ops (measured faster)
        for r0 in blocks:
            run(r0)
        return dst
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltakit-apply") as pool:
        for future in [pool.submit(run, r0) for r0 in blocks]:
            future.result()  # re-raises a worker's exception
    return dst
