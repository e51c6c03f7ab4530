"""One-pass delta statistics on (base, ft): the Triton version of ``deltakit.stats.partials_torch``.

For ``d = ft32 - base32`` (fp32 difference, as everywhere in deltakit) one read of both tensors yields the additive
partials of :class:`deltakit.stats.Partials`: counts (finite, non-finite, exact zeros, below each threshold), sums of
``d, d^2, d^3, d^4, |d|`` over finite entries, ``max |d|``, ``sum base^2`` and the log10-spaced histogram of ``|d|``
(DARE, Yu et al. 2024, arXiv:2311.03099, and DAREx, Deng et al. 2025, arXiv:2410.09344, report these
magnitudes to decide whether a delta can be pruned).

Determinism: a fixed number of programs (``<= 1024``, independent of the device) each walk a fixed set of tiles and
write their own partials (sums in fp64, counts in int64, histogram in int32); the host adds the partials in fp64.
No atomics, so the result is the same from run to run.

Agreement with the reference:
    * counts, ``absmax`` and ``base_sumsq``'s inputs are exact; ``count``/``nonfinite``/``zeros``/``below`` equal the
      reference exactly;
    * moments are fp64 sums in a different order (and squared in fp64 per element as the reference): equal within
      ~1e-12 relative;
    * the histogram bin is computed in fp64 here (``log10 |d| = log2 |d| * log10(2)``: Triton has no log10 and
      its interpreter no libdevice) while the reference takes ``torch.log10`` of the fp32 ``|d|`` and does the
      bin arithmetic in fp32. An entry within about one fp32 rounding (~1e-4 of a bin width) of a bin edge can
      therefore land in the neighbouring bin: bin counts may differ by a few +-1 shifts between adjacent bins,
      never more than one bin apart.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deltakit.kernels.apply import resolve_backend

if TYPE_CHECKING:  # deltakit.stats imports this module lazily; importing it here at run time would be circular
    from deltakit.stats import Partials

__all__ = ["partials_triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Device-independent number of programs, so the summation order (and the result) is the same on every GPU.
_MAX_PROGRAMS = 1024
# 512 entries x 8 warps: 128 registers per thread and no spills on sm_90 (benchmarks/compile_sm90.py); 1024 x 4
# needs 255 registers and spills (tl.histogram's per-lane bins). Not yet tuned on a GPU.
_CUDA_BLOCK = 512
_CUDA_WARPS = 8
_INTERPRETER_BLOCK = 1 << 16
# Column order of the per-program outputs.
_SUMS = ("sum", "sumsq", "sum3", "sum4", "sumabs", "absmax", "base_sumsq")
_COUNTS = ("count", "nonfinite", "zeros", "below0", "below1", "below2", "below3")
_N_THRESHOLDS = 4


@torch.no_grad()
def partials_triton(base: torch.Tensor, ft: torch.Tensor, *, block_size: int | None = None) -> Partials:
    """Partials of ``d = ft32 - base32`` in one Triton pass (see the module docstring for the agreement).

    Args:
        base: Base (pre-trained) tensor, any float dtype, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        ft: Fine-tuned tensor, same shape, dtype may differ, same device. Non-contiguous tensors are copied.
        block_size: Entries per tile (power of 2 in [16, 2**20]); default 512 on CUDA, 65536 in the interpreter.

    Returns:
        A :class:`deltakit.stats.Partials`.

    Raises:
        ValueError: On mismatched shapes or devices, non-float dtypes, a bad block size, or tensors Triton cannot
            run on.
        ImportError: If triton is not installed.
    """
    from deltakit.stats import BINS_PER_DECADE, HIST_LOG10_LO, N_BINS, THRESHOLDS, Partials

    if len(THRESHOLDS) != _N_THRESHOLDS:
        raise ValueError(f"the stats kernel counts {_N_THRESHOLDS} thresholds, deltakit.stats has {THRESHOLDS}")
    for label, t in (("base", base), ("ft", ft)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{label} must be a float tensor ({', '.join(map(str, _FLOAT_DTYPES))}), got {got}")
    if base.shape != ft.shape:
        raise ValueError(f"base and ft must have the same shape, got {tuple(base.shape)} and {tuple(ft.shape)}")
    if base.device != ft.device:
        raise ValueError(f"base and ft must be on one device, got {base.device} and {ft.device}")
    resolve_backend("triton", base.device)
    n = base.numel()
    block = _check_block(block_size, base.device)
    if n == 0:
        return Partials()

    k = _kernels()
    n_tiles = k["triton"].cdiv(n, block)
    n_programs = min(n_tiles, _MAX_PROGRAMS)
    hist_bins = 1 << (N_BINS - 1).bit_length()  # tl.histogram wants a power of 2; bins >= N_BINS stay empty
    sums = torch.empty((n_programs, len(_SUMS)), dtype=torch.float64, device=base.device)
    counts = torch.empty((n_programs, len(_COUNTS)), dtype=torch.int64, device=base.device)
    hist = torch.empty((n_programs, hist_bins), dtype=torch.int32, device=base.device)
    thresholds = [float(np.float32(t)) for t in THRESHOLDS]  # the reference compares fp32 |d| with fp32 t
    launch_opts = {} if base.device.type == "cpu" else {"num_warps": _CUDA_WARPS}
    k["delta_stats"][(n_programs,)](
        sums,
        counts,
        hist,
        base.contiguous(),
        ft.contiguous(),
        n,
        n_tiles,
        *thresholds,
        HIST_LO=float(HIST_LOG10_LO),
        BINS_PER_DECADE=float(BINS_PER_DECADE),
        N_BINS=N_BINS,
        HIST_BINS=hist_bins,
        BLOCK_SIZE=block,
        enable_fp_fusion=False,
        **launch_opts,
    )
    s = sums.cpu().numpy()  # (programs, 7) fp64
    c = counts.cpu().numpy().sum(axis=0)  # (7,) int64
    h = hist.cpu().numpy().astype(np.int64).sum(axis=0)  # (hist_bins,)
    col = {name: i for i, name in enumerate(_SUMS)}
    return Partials(
        count=int(c[0]),
        nonfinite=int(c[1]),
        zeros=int(c[2]),
        sum=float(np.sum(s[:, col["sum"]])),
        sumsq=float(np.sum(s[:, col["sumsq"]])),
        sum3=float(np.sum(s[:, col["sum3"]])),
        sum4=float(np.sum(s[:, col["sum4"]])),
        sumabs=float(np.sum(s[:, col["sumabs"]])),
        absmax=float(np.max(s[:, col["absmax"]])),
        base_sumsq=float(np.sum(s[:, col["base_sumsq"]])),
        below=np.asarray(c[3 : 3 + _N_THRESHOLDS], dtype=np.int64),
        hist=np.asarray(h[:N_BINS], dtype=np.int64),
    )


@functools.cache
def _kernels() -> dict[str, Any]:
    """Import triton and build the kernel (once); see ``deltakit.kernels.apply._kernels`` for why ``global``."""
    global tl, delta_stats_kernel
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

    return {"triton": triton, "delta_stats": delta_stats_kernel}


def _check_block(block_size: int | None, device: torch.device) -> int:
    if block_size is None:
        return _CUDA_BLOCK if device.type == "cuda" else _INTERPRETER_BLOCK
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or not 16 <= block_size <= (1 << 20)
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be a power of 2 in [16, 2**20], got {block_size!r}")
    return block_size

