"""Triton kernels of the fused DARE apply; reference ``deltakit.kernels.apply.fused_apply_torch``.

DARE (Yu et al., 2024, arXiv:2311.03099) and DAREx-q (Deng et al., 2025, arXiv:2410.09344) as one pass:
``dst = where(u >= rate, base + (ft - base) * scale, base)`` with ``u`` the Philox4x32-10 numbers of
:func:`deltakit.masks.uniform`. The launchers (validation, block sizes, aliasing) are
``deltakit.kernels.apply.fused_apply_triton`` and ``uniform_triton``; they import this module, and with it triton,
only when the Triton backend runs.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float


@triton.jit
def uniform_block(key, start, BLOCK_SIZE: tl.constexpr):
    """u at global indices start .. start + BLOCK_SIZE - 1 (start a multiple of 4): 4 numbers per Philox call."""
    counters = start // 4 + tl.arange(0, BLOCK_SIZE // 4)  # int64: counters above 2^32 fill the high word
    r0, r1, r2, r3 = tl.randint4x(key, counters)
    # [r0_0, r1_0, r2_0, r3_0, r0_1, ...]: index 4c + w takes word w of counter c, as deltakit.masks.uniform.
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return uint_to_uniform_float(words)


@triton.jit
def uniform_at(key, index):
    """u at arbitrary global indices (row/column streams, unaligned windows): one Philox call per number."""
    r0, r1, r2, r3 = tl.randint4x(key, index // 4)
    word = index % 4
    r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return uint_to_uniform_float(r)


@triton.jit
def store_rounded(ptr, value, mask, ROUND_BF16: tl.constexpr):
    """Store fp32 ``value`` in ptr's dtype, rounding to nearest even (bf16 by bit arithmetic)."""
    if ROUND_BF16:
        # fp32 -> bf16 round-to-nearest-even on the bit pattern; the interpreter's own cast truncates.
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)  # NaN -> the canonical quiet NaN, as torch
        tl.store(ptr, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_apply_kernel(
    dst_ptr,  # out: n_elements values of dst's dtype, contiguous; may be the same memory as ft_ptr/base_ptr
    base_ptr,  # in: n_elements base weights, contiguous, any float dtype
    ft_ptr,  # in: n_elements fine-tuned weights, contiguous, any float dtype
    scale_ptr,  # in: n_rows fp32 per-row scales; read only when PER_ROW_SCALE (any tensor otherwise)
    n_elements,  # number of entries
    n_cols,  # entries per row (row = i // n_cols, column = i % n_cols)
    key,  # 64-bit Philox key of the stream (tensor_key(seed, name, axis))
    rate,  # fp32 drop rate: kept iff u >= rate
    scale,  # fp32 rescale of kept entries (unused when PER_ROW_SCALE)
    AXIS: tl.constexpr,  # 0: u per element, 1: u per row, 2: u per column
    PER_ROW_SCALE: tl.constexpr,  # scale from scale_ptr[row] instead of `scale`
    ROUND_BF16: tl.constexpr,  # dst is bf16: round in-kernel
    BLOCK_SIZE: tl.constexpr,  # entries per program, a power of 2 >= 16
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors and streams beyond 2^31 entries
    start = pid * BLOCK_SIZE
    offs = start + tl.arange(0, BLOCK_SIZE)
    in_bounds = offs < n_elements
    base = tl.load(base_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    ft = tl.load(ft_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    if AXIS == 0:
        u = uniform_block(key, start, BLOCK_SIZE)
    elif AXIS == 1:
        u = uniform_at(key, offs // n_cols)
    else:
        u = uniform_at(key, offs % n_cols)
    keep = u >= rate
    if PER_ROW_SCALE:
        s = tl.load(scale_ptr + offs // n_cols, mask=in_bounds, other=0.0)
    else:
        s = scale
    # Same op order as fused_apply_torch; `where`, never keep * (...), so 0 * inf cannot appear.
    d = ft - base
    t = d * s
    out = tl.where(keep, base + t, base)
    store_rounded(dst_ptr + offs, out, in_bounds, ROUND_BF16)


@triton.jit
def uniform_kernel(
    out_ptr,  # out: n fp32 uniform numbers, contiguous
    n,  # how many numbers
    key,  # 64-bit Philox key
    offset,  # global index of the first number
    ALIGNED: tl.constexpr,  # offset % 4 == 0: use the 4-per-call block path of fused_apply_kernel
    BLOCK_SIZE: tl.constexpr,  # numbers per program, a power of 2 >= 16
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if ALIGNED:
        u = uniform_block(key, offset + pid * BLOCK_SIZE, BLOCK_SIZE)
    else:
        u = uniform_at(key, offset + i)
    tl.store(out_ptr + i, u, mask=i < n)
