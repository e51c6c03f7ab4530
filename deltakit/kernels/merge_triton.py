"""The Triton launcher of the fused merge; kernel ``deltakit.kernels.triton_merge.fused_merge_kernel``.

:func:`fused_merge_triton` equals ``deltakit.kernels.merge.fused_merge_torch`` bit for bit (the maths is that
module's docstring): same op order in fp32, the fine-tunes' Philox streams made in registers, IEEE division for the
TIES mean, launched with fp fusion disabled (no multiply-add contracted into an FMA) and bf16 stored with
round-to-nearest-even in-kernel. ``deltakit.kernels.merge.fused_merge`` imports this module when the backend resolves
to ``"triton"``; importing it never imports triton, which is imported (with the kernel module) when the launcher runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from deltakit.kernels.apply import (
    _CUDA_BLOCK,
    _CUDA_WARPS,
    _check_block,
    _overlaps,
    _same_layout,
    _signed64,
    resolve_backend,
)
from deltakit.kernels.merge import MergePlan, check_merge_args

__all__ = ["fused_merge_triton"]

# Storage dtypes the kernel loads and stores exactly as torch does (fp32 <-> fp64/fp16 by IEEE conversion, bf16 by
# the in-kernel rounding of store_rounded).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Entries per program and warps on CUDA: the fused apply's launch shape (the merge reads K + 1 streams per entry).
CUDA_BLOCK = _CUDA_BLOCK
CUDA_WARPS = _CUDA_WARPS


def fused_merge_triton(dst: torch.Tensor, base: torch.Tensor, fts: torch.Tensor, plan: MergePlan, *,
                       keys: Sequence[int] | None, rate: float, lam: float,
                       block_size: int | None = None) -> torch.Tensor:
    """Triton version of ``deltakit.kernels.merge.fused_merge_torch``; equal to it bit for bit.

    One read of ``base`` and of each fine-tune, one write of ``dst``; per entry the K keep masks, the rescale, the
    sum or TIES combine and ``base + lam * merged``, all in registers.

    Args:
        dst: Output, base's shape; may be ``base`` itself or one fine-tune of ``fts`` (in-place merge). A
            non-contiguous ``dst`` is computed into a contiguous temporary and copied (slower, still exact).
        base: Base weights, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        fts: The K fine-tunes stacked, shape ``(K, *base.shape)``, base's dtype.
        plan: What to select, rescale and combine (``deltakit.kernels.merge.MergePlan``).
        keys: One Philox key per fine-tune, ``deltakit.masks.finetune_key(seed, name, k)`` (random plans).
        rate: Fraction of each delta dropped, in [0, 1] (random plans).
        lam: Merge weight lambda.
        block_size: Entries per program (power of 2 in [16, 2**20]); default 1024 on CUDA, up to 65536 in the
            interpreter. The result does not depend on it.

    Returns:
        ``dst``.

    Raises:
        ValueError: As ``deltakit.kernels.merge.check_merge_args``, plus a dtype the kernel does not store (use
            ``backend="torch"``), tensors Triton cannot run on (CPU without ``TRITON_INTERPRET=1``), a bad key or
            ``block_size``.
        ImportError: If triton is not installed.
    """
    check_merge_args(dst, base, fts, plan, keys=keys, rate=rate, lam=lam)
    for label, t in (("dst", dst), ("base", base)):
        if t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{label} has dtype {t.dtype}; the Triton merge supports "
                             f"{', '.join(map(str, _KERNEL_DTYPES))}; use backend='torch' for others")
    device = dst.device
    resolve_backend("triton", device)
    k = len(plan.scales)
    key_values = [_signed64(key) for key in keys] if plan.random else [0] * k
    n = base.numel()
    block = _check_block(block_size, n, device)
    if n == 0:
        return dst

    # The numbers exactly as the reference rounds them: np.float32 of each (inf beyond the fp32 range, as there).
    with np.errstate(over="ignore"):
        rate32 = float(np.float32(rate))
        lam32 = float(np.float32(lam))
        scales = torch.from_numpy(np.asarray(plan.scales, dtype=np.float64).astype(np.float32)).to(device)  # (K,)
        if plan.window:
            lo = torch.from_numpy(np.asarray(plan.lo, dtype=np.float64).astype(np.float32)).to(device)  # (K,)
            hi = torch.from_numpy(np.asarray(plan.hi, dtype=np.float64).astype(np.float32)).to(device)  # (K,)
        else:
            lo = hi = scales  # placeholder pointers, never read
    keys_t = torch.tensor(key_values, dtype=torch.int64, device=device)  # (K,)

    base_c = base.contiguous()
    fts_c = fts.contiguous()  # (K, *shape): row k starts n entries after row k - 1
    out = dst if dst.is_contiguous() else torch.empty(dst.shape, dtype=dst.dtype, device=device)
    # An input read straight from memory that `out` also writes must be that very memory (each entry is read
    # before it is written, by the same program); any other overlap gets a private copy first.
    if _overlaps(base_c, out) and not _same_layout(base_c, out):
        base_c = base_c.clone()
    if _overlaps(fts_c, out) and not any(_same_layout(fts_c[i], out) for i in range(k)):
        fts_c = fts_c.clone()

    import triton

    from deltakit.kernels.triton_merge import fused_merge_kernel

    launch_opts = {} if device.type == "cpu" else {"num_warps": CUDA_WARPS}
    fused_merge_kernel[(triton.cdiv(n, block),)](
        out,
        base_c,
        fts_c,
        keys_t,
        scales,
        lo,
        hi,
        n,
        rate32,
        lam32,
        K=k,
        COMBINE=1 if plan.combine == "ties" else 0,
        RANDOM=bool(plan.random),
        WINDOW=plan.window,
        ROUND_BF16=dst.dtype == torch.bfloat16,
        BLOCK_SIZE=block,
        enable_fp_fusion=False,
        **launch_opts,
    )
    if out is not dst:
        dst.copy_(out)
    return dst
