"""Triton kernel of the one-pass delta statistics; reference ``deltakit.partials.partials_torch``.

For ``d = ft32 - base32`` each program writes the additive partials of :class:`deltakit.partials.Partials` for its
tiles (DARE, Yu et al. 2024, arXiv:2311.03099, and DAREx, Deng et al. 2025, arXiv:2410.09344, report these
magnitudes). The launcher (validation, program count, host reduction in fp64) is
``deltakit.kernels.stats.partials_triton``; it imports this module, and with it triton, only when it runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def delta_stats_kernel(
    sums_ptr,  # out: fp64 [programs, 7]: sum d, d^2, d^3, d^4, |d| (finite d), max |d|, sum base^2
    counts_ptr,  # out: int64 [programs, 7]: finite, non-finite, d == 0, |d| < t0..t3 (finite d)
    hist_ptr,  # out: int32 [programs, HIST_BINS]: counts of finite |d| per log10 bin
    base_ptr,  # in: n_elements base weights, contiguous, any float dtype
    ft_ptr,  # in: n_elements fine-tuned weights, contiguous, any float dtype
    n_elements,  # number of entries
    n_tiles,  # cdiv(n_elements, BLOCK_SIZE); program p takes tiles p, p + programs, ...
    t0,  # fp32 thresholds of the `below` counts
    t1,
    t2,
    t3,
    HIST_LO: tl.constexpr,  # log10 of the lower edge of bin 0
    BINS_PER_DECADE: tl.constexpr,  # bins per factor of 10
    N_BINS: tl.constexpr,  # bins in use; the last one also takes everything above
    HIST_BINS: tl.constexpr,  # power of 2 >= N_BINS (tl.histogram's size)
    BLOCK_SIZE: tl.constexpr,  # entries per tile, a power of 2
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK_SIZE)
    zero64 = tl.sum(tl.zeros([BLOCK_SIZE], dtype=tl.float64), axis=0)  # fp64 scalar 0 (loop-carried type)
    izero = tl.sum(tl.zeros([BLOCK_SIZE], dtype=tl.int64), axis=0)  # int64 scalar 0
    s1 = zero64
    s2 = zero64
    s3 = zero64
    s4 = zero64
    sabs = zero64
    sbase = zero64
    amax = tl.sum(tl.zeros([BLOCK_SIZE], dtype=tl.float32), axis=0)
    n_finite = izero
    n_nonfinite = izero
    n_zero = izero
    n_b0 = izero
    n_b1 = izero
    n_b2 = izero
    n_b3 = izero
    hist = tl.zeros([HIST_BINS], dtype=tl.int32)
    tile = pid
    # A while loop, not range(pid, n_tiles, n_programs): the interpreter cannot take tensors as range bounds.
    while tile < n_tiles:
        offs = tile.to(tl.int64) * BLOCK_SIZE + lanes
        in_bounds = offs < n_elements
        base = tl.load(base_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        ft = tl.load(ft_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        d = ft - base
        a = tl.abs(d)
        finite = a <= 3.4028234663852886e38  # false for NaN and +-inf
        valid = in_bounds & finite
        a = tl.where(valid, a, 0.0)  # (BLOCK,) fp32, 0 where not counted
        d64 = tl.where(valid, d, 0.0).to(tl.float64)
        d2 = d64 * d64
        s1 += tl.sum(d64, axis=0)
        s2 += tl.sum(d2, axis=0)
        s3 += tl.sum(d2 * d64, axis=0)
        s4 += tl.sum(d2 * d2, axis=0)
        sabs += tl.sum(a.to(tl.float64), axis=0)
        b64 = base.to(tl.float64)
        sbase += tl.sum(b64 * b64, axis=0)
        amax = tl.maximum(amax, tl.max(a, axis=0))
        n_finite += tl.sum(valid.to(tl.int32), axis=0).to(tl.int64)
        n_nonfinite += tl.sum((in_bounds & ~finite).to(tl.int32), axis=0).to(tl.int64)
        n_zero += tl.sum((valid & (a == 0.0)).to(tl.int32), axis=0).to(tl.int64)
        n_b0 += tl.sum((valid & (a < t0)).to(tl.int32), axis=0).to(tl.int64)
        n_b1 += tl.sum((valid & (a < t1)).to(tl.int32), axis=0).to(tl.int64)
        n_b2 += tl.sum((valid & (a < t2)).to(tl.int32), axis=0).to(tl.int64)
        n_b3 += tl.sum((valid & (a < t3)).to(tl.int32), axis=0).to(tl.int64)
        # bin = clamp(floor((log10|d| - HIST_LO) * BINS_PER_DECADE), 0, N_BINS - 1) in fp64; |d| == 0 -> bin 0
        a64 = tl.where(a > 0.0, a, 1.0).to(tl.float64)  # keep log2 finite; zeros are put in bin 0 below
        pos = (tl.log2(a64) * 0.30102999566398120 - HIST_LO) * BINS_PER_DECADE
        pos = tl.minimum(tl.maximum(tl.floor(pos), 0.0), N_BINS - 1.0)
        bins = tl.where(a > 0.0, pos.to(tl.int32), 0)
        hist += tl.histogram(bins, HIST_BINS, mask=valid)
        tile += n_programs
    row = pid.to(tl.int64) * 7
    tl.store(sums_ptr + row + 0, s1)
    tl.store(sums_ptr + row + 1, s2)
    tl.store(sums_ptr + row + 2, s3)
    tl.store(sums_ptr + row + 3, s4)
    tl.store(sums_ptr + row + 4, sabs)
    tl.store(sums_ptr + row + 5, amax.to(tl.float64))
    tl.store(sums_ptr + row + 6, sbase)
    tl.store(counts_ptr + row + 0, n_finite)
    tl.store(counts_ptr + row + 1, n_nonfinite)
    tl.store(counts_ptr + row + 2, n_zero)
    tl.store(counts_ptr + row + 3, n_b0)
    tl.store(counts_ptr + row + 4, n_b1)
    tl.store(counts_ptr + row + 5, n_b2)
    tl.store(counts_ptr + row + 6, n_b3)
    tl.store(hist_ptr + pid.to(tl.int64) * HIST_BINS + tl.arange(0, HIST_BINS), hist)
