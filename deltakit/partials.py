"""Additive partials of one delta tensor, and the layout of the |delta| histogram they carry.

For ``d = ft32 - base32`` (fp32 difference) a :class:`Partials` holds counts, fp64 sums of powers, ``max |d|`` and a
histogram of ``|d|`` with :data:`BINS_PER_DECADE` log10-spaced bins per decade over [1e-10, 10) (smaller values,
zeros included, fall in the first bin; larger ones in the last). Rollups (by layer, module kind, model) add
partials, never average averages. The thresholds and quantities follow DARE (Yu et al. 2024, arXiv:2311.03099) and
DAREx (Deng et al. 2025, arXiv:2410.09344).

:func:`partials_torch` is the reference; ``deltakit.kernels.stats.partials_triton`` computes the same partials in
one Triton pass, with the histogram layout defined here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

__all__ = ["Partials", "partials_torch", "THRESHOLDS", "HIST_LOG10_LO", "HIST_LOG10_HI", "BINS_PER_DECADE", "N_BINS",
           "hist_edges"]

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
    # Bins from an fp64 log10 of |d|, as the Triton kernel (fp64 log2 * log10(2)): they agree except within an fp64
    # rounding of a bin edge.
    bins = torch.floor((torch.log10(a64) - HIST_LOG10_LO) * BINS_PER_DECADE).clamp_(0, N_BINS - 1)
    bins = torch.where(a == 0, torch.zeros_like(bins), bins).long()
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
