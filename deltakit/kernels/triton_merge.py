"""Triton kernel of the fused merge; reference ``deltakit.kernels.merge.fused_merge_torch``.

``dst = base + lam * combine_k(where(keep_k, (ft_k - base) * scale_k, 0))`` in one pass over base and the K
fine-tunes: task arithmetic (Ilharco et al. 2023, arXiv:2212.04089), TIES (Yadav et al. 2023, arXiv:2306.01708),
DARE / DAREx-q + TA / TIES (Yu et al. 2024, arXiv:2311.03099; Deng et al. 2025, arXiv:2410.09344) and Model
Breadcrumbs (Davari & Belilovsky 2024, arXiv:2312.06795) are this one kernel with different constexprs and numbers
(``deltakit.kernels.merge.MergePlan``). The maths, op for op, is the module docstring of ``deltakit.kernels.merge``.

The keep mask of fine-tune k is its own Philox stream (``deltakit.masks.finetune_key``), made in registers four
numbers per Philox call by ``deltakit.kernels.triton_apply.uniform_block``, bit-identical to
``deltakit.masks.uniform``. The launcher (validation, block sizes, aliasing) is
``deltakit.kernels.merge_triton.fused_merge_triton``; it imports this module, and with it triton, only when it runs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from deltakit.kernels.triton_apply import store_rounded, uniform_block


@triton.jit
def fused_merge_kernel(
    dst_ptr,  # out: n_elements values of dst's dtype, contiguous; may be base's or one fine-tune's very memory
    base_ptr,  # in: n_elements base weights, contiguous, any float dtype
    fts_ptr,  # in: K * n_elements fine-tuned weights, a (K, n_elements) contiguous stack, base's dtype
    keys_ptr,  # in: K int64 Philox keys, finetune_key(seed, name, k); read only when RANDOM
    scales_ptr,  # in: K fp32 rescales of kept deltas
    lo_ptr,  # in: K fp32 lower bounds of |d| (kept iff lo <= |d|); read only when WINDOW
    hi_ptr,  # in: K fp32 upper bounds of |d| (kept iff |d| <= hi); read only when WINDOW
    n_elements,  # entries per tensor (and the row stride of the fine-tune stack)
    rate,  # fp32 drop rate: kept iff u >= rate (RANDOM)
    lam,  # fp32 merge weight lambda
    K: tl.constexpr,  # number of fine-tunes, 1..8 (the loop over them is unrolled)
    COMBINE: tl.constexpr,  # 0: sum (task arithmetic), 1: TIES sign election and disjoint mean
    RANDOM: tl.constexpr,  # drop with each fine-tune's Philox stream
    WINDOW: tl.constexpr,  # keep only lo_k <= |d_k| <= hi_k
    ROUND_BF16: tl.constexpr,  # dst is bf16: round in-kernel
    BLOCK_SIZE: tl.constexpr,  # entries per program, a power of 2 >= 16
):
    """One block of the fused merge, equal bit for bit to ``deltakit.kernels.merge.fused_merge_torch``."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors and streams beyond 2^31 entries
    start = pid * BLOCK_SIZE
    offs = start + tl.arange(0, BLOCK_SIZE)  # global element indices = Philox indices, as masks.uniform
    in_bounds = offs < n_elements
    base = tl.load(base_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    # The reference starts every accumulator from zeros and adds: 0.0 + -0.0 is 0.0, so start from 0.0 here too.
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)  # sum: the sum; ties: P, the positive mass
    neg = tl.zeros([BLOCK_SIZE], dtype=tl.float32)  # ties: N, the negative mass
    n_pos = tl.zeros([BLOCK_SIZE], dtype=tl.float32)  # ties: count of t > 0 (fp32 sums of 0/1 are exact)
    n_neg = tl.zeros([BLOCK_SIZE], dtype=tl.float32)  # ties: count of t < 0
    ft_ptrs = fts_ptr + offs  # fine-tune 0; stepping the pointers (not k * n_elements) cannot wrap in int32
    for k in tl.static_range(K):
        ft = tl.load(ft_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
        ft_ptrs += n_elements  # the next fine-tune's row of the stack
        d = ft - base
        scaled = d * tl.load(scales_ptr + k)
        if RANDOM or WINDOW:
            keep = in_bounds
            if RANDOM:
                u = uniform_block(tl.load(keys_ptr + k), start, BLOCK_SIZE)
                keep = keep & (u >= rate)
            if WINDOW:
                a = tl.abs(d)
                keep = keep & (a >= tl.load(lo_ptr + k)) & (a <= tl.load(hi_ptr + k))
            # `where`, never keep * (...): a dropped inf or NaN contributes an exact 0.
            t = tl.where(keep, scaled, 0.0)
        else:
            t = scaled  # the reference's where(all true, d * scale, 0) is d * scale
        if COMBINE == 1:
            acc = acc + tl.where(t > 0, t, 0.0)
            n_pos = n_pos + (t > 0).to(tl.float32)
            neg = neg + tl.where(t < 0, t, 0.0)
            n_neg = n_neg + (t < 0).to(tl.float32)
        else:
            acc = acc + t
    if COMBINE == 1:
        # Elect the sign of the summed mass; IEEE division (div_rn): plain `/` is approximate on the GPU.
        pos_mean = tl.div_rn(acc, tl.maximum(n_pos, 1.0))
        neg_mean = tl.div_rn(neg, tl.maximum(n_neg, 1.0))
        merged = tl.where(acc + neg >= 0, pos_mean, neg_mean)
    else:
        merged = acc
    out = base + lam * merged  # launched with fp fusion disabled: a multiply then an add, as torch
    store_rounded(dst_ptr + offs, out, in_bounds, ROUND_BF16)
