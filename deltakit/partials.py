"""Additive partials of one delta tensor, and the layout of the |delta| histogram they carry.

For ``d = ft32 - base32`` (fp32 difference) a :class:`Partials` holds counts, fp64 sums of powers, ``max |d|`` and a
histogram of ``|d|`` with :data:`BINS_PER_DECADE` log10-spaced bins per decade over [1e-10, 10) (smaller values,
zeros included, fall in the first bin; larger ones in the last). Rollups (by layer, module kind, model) add
partials, never average averages. The thresholds and quantities follow DARE (Yu et al. 2024, arXiv:2311.03099) and
DAREx (Deng et al. 2025, arXiv:2410.09344).

:func:`partials_torch` is the reference; ``deltakit.kernels.stats.partials_triton`` computes the same partials in
one Triton pass, with the histogram layout defined here. :func:`partials_fast` is the CPU path of
:func:`deltakit.stats.delta_stats`: the same counts, histogram and ``max |d|`` exactly, the sums within a stated
tolerance, ~5x faster (no fp64 logarithm: the bin of ``|d|`` comes from its fp32 bit pattern and a table built once
from the reference's own bin formula).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

__all__ = ["Partials", "partials_torch", "partials_fast", "THRESHOLDS", "HIST_LOG10_LO", "HIST_LOG10_HI",
           "BINS_PER_DECADE", "N_BINS", "hist_edges"]

THRESHOLDS = (0.002, 0.005, 0.01, 0.03)
HIST_LOG10_LO = -10
HIST_LOG10_HI = 1
BINS_PER_DECADE = 100
N_BINS = (HIST_LOG10_HI - HIST_LOG10_LO) * BINS_PER_DECADE


def hist_edges() -> np.ndarray:
    """The N_BINS + 1 bin edges of the |delta| histogram (the first bin also holds everything below 1e-10)."""
    return 10.0 ** (HIST_LOG10_LO + np.arange(N_BINS + 1) / BINS_PER_DECADE)


@dataclass
class Partials:
    """Additive sufficient statistics of one delta tensor (or of a sum of tensors).

    Attributes:
        count: finite entries. nonfinite: NaN/Inf entries. zeros: entries exactly 0.
        sum, sumsq, sum3, sum4, sumabs: sums of d, d^2, d^3, d^4, |d| over finite entries (fp64).
        absmax: max |d| over finite entries. base_sumsq: sum of base^2 (for the relative norm).
        below: counts of finite |d| < each of :data:`THRESHOLDS`.
        hist: counts of finite |d| in the log-spaced bins (:func:`hist_edges`).
    """

    count: int = 0
    nonfinite: int = 0
    zeros: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    sum3: float = 0.0
    sum4: float = 0.0
    sumabs: float = 0.0
    absmax: float = 0.0
    base_sumsq: float = 0.0
    below: np.ndarray = field(default_factory=lambda: np.zeros(len(THRESHOLDS), dtype=np.int64))
    hist: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, dtype=np.int64))

    def __add__(self, other: Partials) -> Partials:
        out = Partials()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(out, f.name, max(a, b) if f.name == "absmax" else a + b)
        return out

    def summary(self) -> dict[str, float]:
        """The reported statistics (see :mod:`deltakit.stats` for definitions and precision)."""
        n = self.count
        out: dict[str, float] = {"numel": n + self.nonfinite, "nonfinite": self.nonfinite, "zeros": self.zeros}
        mean = self.sum / n if n else math.nan
        ex2 = self.sumsq / n if n else math.nan
        var = max(ex2 - mean * mean, 0.0) if n else math.nan
        m4 = (self.sum4 / n - 4 * mean * self.sum3 / n + 6 * mean**2 * ex2 - 3 * mean**4) if n else math.nan
        out.update(
            mean=mean,
            std=math.sqrt(var) if n else math.nan,
            mean_abs=self.sumabs / n if n else math.nan,
            max_abs=self.absmax if n else math.nan,
            l2=math.sqrt(self.sumsq),
            base_l2=math.sqrt(self.base_sumsq),
            rel_norm=math.sqrt(self.sumsq / self.base_sumsq) if self.base_sumsq > 0 else math.nan,
            kurtosis=(m4 / var**2 - 3.0) if n and var > 0 else math.nan,
        )
        for t, c in zip(THRESHOLDS, self.below):
            out[f"frac_below_{t:g}"] = c / n if n else math.nan
        for q in (0.5, 0.9, 0.99):
            out[f"p{round(q * 100)}_abs"] = self.quantile(q)
        return out

    def quantile(self, q: float) -> float:
        """Quantile of |delta| from the histogram (geometric bin centre; 0 where the rank falls on exact zeros)."""
        if self.count == 0:
            return math.nan
        rank = q * self.count
        if rank <= self.zeros:
            return 0.0
        b = int(np.searchsorted(np.cumsum(self.hist), rank, side="left"))
        b = min(b, N_BINS - 1)
        return float(10.0 ** (HIST_LOG10_LO + (b + 0.5) / BINS_PER_DECADE))


def partials_torch(base: torch.Tensor, ft: torch.Tensor, *, chunk: int = 1 << 20) -> Partials:
    """Partials of ``d = ft - base`` (fp32 difference, fp64 sums): the reference the Triton kernel must match.

    Args:
        base: the pre-trained tensor (any float dtype, any device).
        ft: the fine-tuned tensor, same shape.
        chunk: entries per pass; the fp64 temporaries of one chunk bound the extra memory (~50 MB at 2^20).

    Returns:
        The partials.
    """
    b, f = base.detach().reshape(-1), ft.detach().reshape(-1)
    total = _partials_chunk(b[:chunk], f[:chunk])
    for start in range(chunk, b.numel(), chunk):
        total = total + _partials_chunk(b[start:start + chunk], f[start:start + chunk])
    return total


def _partials_chunk(base: torch.Tensor, ft: torch.Tensor) -> Partials:
    b32 = base.to(torch.float32)
    d = ft.to(torch.float32) - b32
    finite = torch.isfinite(d)
    nonfinite = int((~finite).sum())
    if nonfinite:
        d = d[finite]
    a = d.abs()
    d64 = d.double()
    a64 = d64.abs()
    d2 = d64 * d64
    bins = _bins_reference(a64)
    b64 = b32.double()
    return Partials(
        count=int(d.numel()),
        nonfinite=nonfinite,
        zeros=int((d == 0).sum()),
        sum=float(d64.sum()),
        sumsq=float(d2.sum()),
        sum3=float((d2 * d64).sum()),
        sum4=float((d2 * d2).sum()),
        sumabs=float(a64.sum()),
        absmax=float(a.max()) if a.numel() else 0.0,
        base_sumsq=float((b64 * b64).sum()),
        below=np.array([int((a < t).sum()) for t in THRESHOLDS], dtype=np.int64),
        hist=torch.bincount(bins, minlength=N_BINS).cpu().numpy().astype(np.int64),
    )


def _bins_reference(a64: torch.Tensor) -> torch.Tensor:
    """The histogram bin (int64) of each ``|d|`` (fp64, >= 0): the definition that every other path must reproduce."""
    # Bins from an fp64 log10 of |d|, as the Triton kernel (fp64 log2 * log10(2)): they agree except within an fp64
    # rounding of a bin edge. partials_fast reproduces this formula exactly (its table is built from this function).
    bins = torch.floor((torch.log10(a64) - HIST_LOG10_LO) * BINS_PER_DECADE).clamp_(0, N_BINS - 1)
    return torch.where(a64 == 0, torch.zeros_like(bins), bins).long()


# ------------------------------------------------------------------------------------------------ fast CPU path
#
# The bin of |d| is a step function of its fp32 bit pattern (non-negative fp32 values order like their int32
# patterns). Every threshold and bin edge is therefore one "boundary" pattern: the smallest fp32 value that the
# reference puts at or above it, found once by bisection over patterns with the reference's own expressions. The
# patterns are cut into buckets of 2**16 (the top bits, after adding a constant chosen so that no bucket holds two
# boundaries); one int32 table entry per bucket turns a pattern into the index of the interval between boundaries
# it falls in, with integer adds and shifts only: idx = (bits + offset[(bits + shift_add) >> 16]) >> 16. One
# bincount of idx then gives every count: zeros, below each threshold, each histogram bin. This assumes the
# reference's bin is non-decreasing in |d| (an fp64 log10 is monotone at fp32 resolution); the tests check every
# boundary at +-2 ulps.

_KEY_BITS = 16  # a bucket holds 2**16 fp32 patterns: <= 0.8% of |d|, a third of a bin (2.3%)
_MAX_FINITE = 0x7F7FFFFF  # the int32 pattern of the largest finite fp32
_INF = 0x7F800000  # the int32 pattern of +inf
# sum |d| and sum base^2 add fp32 values in blocks of 16 (fp64 across blocks): relative error <= 16 * 2**-24 < 1e-6
_BLOCK = 16
_FP32_SQUARES_MIN = 2.0**-96  # below it fp32 squares may have underflowed: base_sumsq is recomputed in fp64
_FAST_CHUNK = 1 << 18  # entries per pass (~37 bytes of scratch each): the fastest of 2^16 .. 2^20 on 2 cores


@dataclass(frozen=True)
class _BinTable:
    """The pattern -> interval table of :func:`partials_fast` (see the comment above).

    Attributes:
        shift_add: the constant added to a pattern before taking its bucket (0: no add needed).
        offsets: int32 [n_buckets]; interval index = (bits + offsets[(bits + shift_add) >> 16]) >> 16.
        n_intervals: the number of intervals (bincount length).
        bounds: int64 [n_bounds] every boundary pattern, sorted, unique.
        in_table: bool [n_bounds] the boundaries that the table resolves; the others (none unless boundaries sit
            closer than any bucket shift can separate, or past the largest finite value) are counted by a direct
            comparison.
        extra: the patterns of the boundaries not in the table.
        zero_at: index in ``bounds`` of pattern 1 (entries below it are the exact zeros).
        edge_at: int64 [N_BINS - 1] index in ``bounds`` of the first pattern of bins 1 .. N_BINS - 1.
        threshold_at: int64 [len(THRESHOLDS)] index in ``bounds`` of the first pattern not below each threshold.
    """

    shift_add: int
    offsets: torch.Tensor
    n_intervals: int
    bounds: np.ndarray
    in_table: np.ndarray
    extra: tuple[int, ...]
    zero_at: int
    edge_at: np.ndarray
    threshold_at: np.ndarray


def _first_true(pred, n: int) -> np.ndarray:
    """Smallest non-negative fp32 pattern where each of n monotone predicates holds (+inf's pattern at most).

    ``pred(x)`` gets an fp32 tensor [n] (one candidate value per predicate) and returns a bool tensor [n].
    """
    lo = torch.zeros(n, dtype=torch.int64)
    hi = torch.full((n,), _INF, dtype=torch.int64)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        ok = pred(mid.to(torch.int32).view(torch.float32))
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    return lo.numpy()


def _edge_patterns() -> np.ndarray:
    """[N_BINS - 1]: for k = 1 .. N_BINS - 1 the smallest fp32 |d| that the reference puts in bin k or above."""
    k = torch.arange(1, N_BINS)
    return _first_true(lambda x: _bins_reference(x.double()) >= k, N_BINS - 1)


def _threshold_patterns() -> np.ndarray:
    """[len(THRESHOLDS)]: the smallest fp32 |d| that the reference does not count below each threshold."""
    # The reference's own expression: an fp32 tensor compared with a Python float.
    return np.concatenate([_first_true(lambda x, t=t: ~(x < t), 1) for t in THRESHOLDS])


def _choose_shift_add(bounds: np.ndarray) -> int:
    """The constant in [0, 2**16) added before bucketing that leaves the fewest buckets with two boundaries inside."""
    size = 1 << _KEY_BITS
    gaps = np.diff(bounds)
    close = np.nonzero(gaps < size)[0]  # neighbours that may share a bucket
    if len(close) == 0:
        return 0
    shift = np.arange(size, dtype=np.int64)
    clashes = np.zeros(size, dtype=np.int64)
    for i in close:
        # The pair is separated when a bucket starts in (lower, upper], or when the lower one starts its bucket.
        r = (bounds[i] + shift) % size
        clashes += ~((r == 0) | (r >= size - gaps[i]))
    return int(np.argmin(clashes))  # the first minimum: 0 (no add pass) whenever 0 is as good as any


@functools.cache
def _bin_table() -> _BinTable:
    size = 1 << _KEY_BITS
    edges, thresholds = _edge_patterns(), _threshold_patterns()
    bounds = np.unique(np.concatenate([[1], edges, thresholds]).astype(np.int64))
    shift_add = _choose_shift_add(bounds)
    shifted = bounds + shift_add
    key, inside = shifted // size, shifted % size != 0
    in_table = bounds <= _MAX_FINITE  # a boundary past every finite value (a threshold >= 2**128) is counted directly
    last_key = -1
    for i in np.nonzero(inside & in_table)[0]:  # one split per bucket: the first boundary inside it
        in_table[i] = key[i] != last_key
        last_key = key[i]
    split = shifted[in_table]
    n_buckets = (_MAX_FINITE + shift_add) // size + 1
    buckets = np.arange(n_buckets, dtype=np.int64)
    first = np.searchsorted(split, buckets * size, side="right")  # intervals wholly below each bucket's start
    cut = np.full(n_buckets, size, dtype=np.int64)  # the split inside each bucket (size: none)
    cut[split[split % size != 0] // size] = split[split % size != 0] % size
    offsets = (first - buckets + 1) * size - cut + shift_add
    if offsets.min() < -(2**31) or offsets.max() >= 2**31:
        raise RuntimeError("deltakit.partials: the bin table does not fit in int32 (a bug: please report it)")
    at = {int(b): i for i, b in enumerate(bounds)}
    return _BinTable(
        shift_add=shift_add,
        offsets=torch.from_numpy(offsets.astype(np.int32)),
        n_intervals=len(split) + 1,
        bounds=bounds,
        in_table=in_table,
        extra=tuple(int(b) for b in bounds[~in_table]),
        zero_at=at[1],
        edge_at=np.array([at[int(e)] for e in edges], dtype=np.int64),
        threshold_at=np.array([at[int(t)] for t in thresholds], dtype=np.int64),
    )


def _sum_fp32_blocks(x: torch.Tensor, ones: torch.Tensor, part: torch.Tensor) -> float:
    """sum(x) of fp32 x [n]: fp32 sums of _BLOCK entries (one BLAS pass), added in fp64."""
    main = x.numel() - x.numel() % _BLOCK
    total = 0.0
    if main:
        blocks = torch.mv(x[:main].view(-1, _BLOCK), ones, out=part[: main // _BLOCK])  # [main / 16] fp32
        total = float(blocks.sum(dtype=torch.float64))
    if main < x.numel():
        total += float(x[main:].sum(dtype=torch.float64))
    return total


@torch.no_grad()
def partials_fast(base: torch.Tensor, ft: torch.Tensor, *, chunk: int = _FAST_CHUNK) -> Partials:
    """Partials of ``d = ft32 - base32`` on the CPU, ~5x faster than :func:`partials_torch` (same partials).

    Contract, against :func:`partials_torch` on the same tensors:

    * ``count``, ``nonfinite``, ``zeros``, ``below``, ``hist`` and ``absmax`` are exactly equal. The bin of each
      ``|d|`` is read from a table built once (a few ms, cached) from the reference's own bin formula, by bisection
      over fp32 bit patterns, so every fp32 value lands where the reference puts it, at every bin edge and threshold.
    * ``sum``, ``sumsq``, ``sum3``, ``sum4``: the same exact fp64 products (``d`` widened to fp64), summed in fp64 in
      another order (a BLAS product): they differ by the rounding of a reordered fp64 sum only, measured
      ``<= 1e-13 * sum(|term|)`` (term: ``d``, ``d^2``, ``d^3``, ``d^4``), tested at ``1e-12``.
    * ``sumabs`` and ``base_sumsq``: fp32 sums of 16 entries (of ``|d|``; of fp32 squares of ``base``), added in
      fp64: relative error ``<= 16 * 2**-24 < 1e-6`` (measured ``<= 6e-8``); fp64 is used instead where fp32 would
      overflow, or where the squares could underflow.

    NaN/Inf in ``d`` (detected through ``max |d|``, which they turn non-finite) cost a few extra passes over the
    chunks that hold them.

    Args:
        base: the pre-trained tensor (any float dtype), on the CPU.
        ft: the fine-tuned tensor, same shape, any float dtype, on the CPU.
        chunk: entries per pass (the scratch is ~37 bytes per entry).

    Returns:
        The partials.

    Raises:
        ValueError: different shapes, a non-float dtype, a tensor not on the CPU (use ``partials_torch``, or
            ``deltakit.kernels.stats.partials_triton`` on CUDA), or ``chunk < 1``.
    """
    for label, t in (("base", base), ("ft", ft)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{label} must be a float tensor, got {got}")
        if t.device.type != "cpu":
            raise ValueError(f"partials_fast runs on the CPU, got {label} on {t.device}: use partials_torch, or "
                             "deltakit.kernels.stats.partials_triton on CUDA")
    if base.shape != ft.shape:
        raise ValueError(f"base and ft must have the same shape, got {tuple(base.shape)} and {tuple(ft.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (entries per pass), got {chunk!r}")
    b, f = base.detach().reshape(-1), ft.detach().reshape(-1)
    n = b.numel()
    if n == 0:
        return Partials()
    table = _bin_table()
    size = min(chunk, n)
    # Scratch, reused by every chunk.
    d_buf = torch.empty(size)  # d (fp32)
    a_buf = torch.empty(size)  # |d|, then base^2
    b_buf = torch.empty(size) if b.dtype != torch.float32 else None  # base32
    key_buf = torch.empty(size, dtype=torch.int32)  # bucket of each |d| pattern
    idx_buf = torch.empty(size, dtype=torch.int32)  # interval of each |d| pattern
    p_buf = torch.empty(2, size, dtype=torch.float64)  # rows d, d^2 (fp64)
    part = torch.empty((size + _BLOCK - 1) // _BLOCK)  # fp32 block sums
    ones = torch.ones(_BLOCK)
    below_extra = torch.empty(size, dtype=torch.bool) if table.extra else None
    counts = torch.zeros(table.n_intervals, dtype=torch.int64)
    extra = np.zeros(len(table.extra), dtype=np.int64)
    out = Partials()
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        bc, fc = b[start:start + m], f[start:start + m]
        b32 = bc if b_buf is None else b_buf[:m].copy_(bc)
        d = d_buf[:m]
        if fc.dtype == torch.float32:
            torch.sub(fc, b32, out=d)
        else:
            d.copy_(fc).sub_(b32)
        base_sq = _sum_fp32_blocks(torch.mul(b32, b32, out=a_buf[:m]), ones, part)
        if not _FP32_SQUARES_MIN <= base_sq < math.inf:  # fp32 squares overflowed, underflowed, or NaN/Inf in base
            b64 = b32.double()
            base_sq = float(torch.dot(b64, b64))
        out.base_sumsq += base_sq
        a = torch.abs(d, out=a_buf[:m])
        absmax = float(a.max())
        if not math.isfinite(absmax):  # NaN/Inf in d (NaN propagates through max): keep the finite entries
            finite = torch.isfinite(d)
            kept = int(finite.sum())
            out.nonfinite += m - kept
            if kept == 0:
                continue
            d, m = d[finite], kept
            a = torch.abs(d, out=a_buf[:m])
            absmax = float(a.max())
        out.count += m
        out.absmax = max(out.absmax, absmax)
        # Histogram, zeros and thresholds: one interval index per entry, one bincount.
        bits = a.view(torch.int32)  # [m] non-negative patterns, ordered like |d|
        key = key_buf[:m]
        if table.shift_add:
            torch.add(bits, table.shift_add, out=key).bitwise_right_shift_(_KEY_BITS)
        else:
            torch.bitwise_right_shift(bits, _KEY_BITS, out=key)
        idx = torch.index_select(table.offsets, 0, key, out=idx_buf[:m])
        idx.add_(bits).bitwise_right_shift_(_KEY_BITS)
        counts += torch.bincount(idx, minlength=table.n_intervals)
        for j, pattern in enumerate(table.extra):
            extra[j] += int(torch.count_nonzero(torch.lt(bits, pattern, out=below_extra[:m])))
        # Moments: exact fp64 products, fp64 sums; one BLAS product gives sum d^2, d^3, d^4.
        p = p_buf[:, :m]
        p[0].copy_(d)
        torch.mul(p[0], p[0], out=p[1])
        gram = torch.mm(p, p.t()).tolist()  # [[sum d^2, sum d^3], [sum d^3, sum d^4]]
        out.sum += float(p[0].sum())
        out.sumsq += gram[0][0]
        out.sum3 += gram[0][1]
        out.sum4 += gram[1][1]
        sumabs = _sum_fp32_blocks(a, ones, part)
        out.sumabs += sumabs if sumabs < math.inf else float(a.sum(dtype=torch.float64))
    # below[b] = entries whose pattern is below boundary b; every count is a difference of two of them.
    below = np.empty(len(table.bounds), dtype=np.int64)
    below[table.in_table] = np.cumsum(counts.numpy())[:-1]
    below[~table.in_table] = extra
    upper = np.append(below[table.edge_at], out.count)  # entries below the start of bins 1 .. N_BINS - 1, then all
    out.zeros = int(below[table.zero_at])
    out.below = below[table.threshold_at].copy()
    out.hist = np.diff(upper, prepend=0)
    return out
