"""One-pass delta statistics on (base, ft): the Triton version of ``deltakit.partials.partials_torch``.

For ``d = ft32 - base32`` (fp32 difference, as everywhere in deltakit) one read of both tensors yields the additive
partials of :class:`deltakit.partials.Partials`: counts (finite, non-finite, exact zeros, below each threshold), sums
of ``d, d^2, d^3, d^4, |d|`` over finite entries, ``max |d|``, ``sum base^2`` and the log10-spaced histogram of
``|d|`` (DARE, Yu et al. 2024, arXiv:2311.03099, and DAREx, Deng et al. 2025, arXiv:2410.09344, report these
magnitudes to decide whether a delta can be pruned). The kernel is in :mod:`deltakit.kernels.triton_stats`,
imported (with triton) only when :func:`partials_triton` runs.

Determinism: a fixed number of programs (``<= 1024``, independent of the device) each walk a fixed set of tiles and
write their own partials (sums in fp64, counts in int64, histogram in int32); the host adds the partials in fp64.
No atomics, so the result is the same from run to run.

Agreement with the reference:
    * counts, ``absmax`` and ``base_sumsq``'s inputs are exact; ``count``/``nonfinite``/``zeros``/``below`` equal the
      reference exactly;
    * moments are fp64 sums in a different order (and squared in fp64 per element as the reference): equal within
      ~1e-12 relative;
    * both compute the histogram bin in fp64 from ``|d|`` widened to fp64: the reference as
      ``floor((torch.log10(|d|) - HIST_LOG10_LO) * BINS_PER_DECADE)``, the kernel with
      ``log10 |d| = log2 |d| * log10(2)`` (Triton has no log10 and its interpreter no libdevice). The two logarithms
      can differ in the last fp64 bits, so only an entry within about 1e-14 (relative) of a bin edge could land in
      the neighbouring bin; elsewhere the histograms are equal.
"""

from __future__ import annotations

import numpy as np
import torch

from deltakit.kernels.apply import resolve_backend
from deltakit.partials import BINS_PER_DECADE, HIST_LOG10_LO, N_BINS, THRESHOLDS, Partials

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
        A :class:`deltakit.partials.Partials`.

    Raises:
        ValueError: On mismatched shapes or devices, non-float dtypes, a bad block size, or tensors Triton cannot
            run on.
        ImportError: If triton is not installed.
    """
    if len(THRESHOLDS) != _N_THRESHOLDS:
        raise ValueError(f"the stats kernel counts {_N_THRESHOLDS} thresholds, deltakit.partials has {THRESHOLDS}")
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

    import triton

    from deltakit.kernels.triton_stats import delta_stats_kernel

    n_tiles = triton.cdiv(n, block)
    n_programs = min(n_tiles, _MAX_PROGRAMS)
    hist_bins = 1 << (N_BINS - 1).bit_length()  # tl.histogram wants a power of 2; bins >= N_BINS stay empty
    sums = torch.empty((n_programs, len(_SUMS)), dtype=torch.float64, device=base.device)
    counts = torch.empty((n_programs, len(_COUNTS)), dtype=torch.int64, device=base.device)
    hist = torch.empty((n_programs, hist_bins), dtype=torch.int32, device=base.device)
    thresholds = [float(np.float32(t)) for t in THRESHOLDS]  # the reference compares fp32 |d| with fp32 t
    launch_opts = {} if base.device.type == "cpu" else {"num_warps": _CUDA_WARPS}
    delta_stats_kernel[(n_programs,)](
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

