"""Spectral statistics of one 2-D delta: how many directions fine-tuning used, and whether it looks like a merged LoRA.

For a delta ``dW = W_ft - W_base`` of shape (m, n) with singular values ``s_1 >= s_2 >= ... >= s_p`` (``p = min(m,
n)``) and energy ``||dW||_F^2 = sum_i s_i^2``:

- ``stable_rank = ||dW||_F^2 / s_1^2``: the stable (numerical) rank of Rudelson & Vershynin (2007, "Sampling from
  large matrices: an approach through geometric functional analysis", J. ACM 54(4)); at most the rank, robust to
  tiny singular values.
- ``effective_rank = exp(H(p))`` with ``p_i = s_i / sum_j s_j`` and H the Shannon entropy (natural log): the
  effective rank of Roy & Vetterli (2007, "The effective rank: a measure of effective dimensionality", EUSIPCO);
  between 1 (one direction) and p (a flat spectrum).
- ``energy_top_k``: the share of ``||dW||_F^2`` in the top k singular values (k capped at p).
- ``rank_90`` / ``rank_99``: the fewest singular values whose energy reaches 90% / 99% of ``||dW||_F^2`` (to within
  a relative 1e-6, about the precision of the fp32 delta). NaN when more than k are needed and only the top k
  were computed.
- ``low_rank``: the delta is numerically low-rank, which is what a merged LoRA (Hu et al. 2021, arXiv:2106.09685)
  looks like: ``rank_99 <= k`` and ``rank_99 <= p / 8``; full fine-tuning spreads the energy over most of the
  spectrum. A merged rank-r LoRA keeps over 99% of its energy in r directions only while the rounding of the stored
  weights carries under 1% of it: in bf16 (rounding error up to 2^-8 of |W| per entry, about 0.25% of the weights'
  rms for base and fine-tune together) that needs an update rms above roughly 2.5% of the weights' rms; smaller
  merged updates drown in rounding noise (``rank_90`` still shows them) and are not flagged. Tensors with p < 8 are
  never flagged (even rank 1 exceeds p / 8).
- ``spectral_exact``: whether the whole spectrum was computed.

Computation: the whole spectrum when ``p <= exact_max``, as the square roots of the eigenvalues of the p x p Gram
matrix (``torch.linalg.eigvalsh`` in fp64, the Gram accumulated from fp64 copies of a bounded chunk of rows at a
time). The squared singular values, which every statistic here is made of, come out to an absolute accuracy of
about 1e-14 s_1^2, finer than fp32 ``torch.linalg.svdvals`` gives; singular values below about 1e-7 s_1 (under 1e-14
of the energy) are not resolved, which no statistic here can notice. It is also several times faster than
``svdvals`` on a busy CPU, where LAPACK's many small threaded steps stall. Otherwise the top k come from a seeded
randomized SVD (Halko, Martinsson & Tropp 2011, "Finding structure with randomness", SIAM Review 53(2), Algorithm
4.4: a Gaussian test matrix with oversampling, two power iterations re-orthonormalised by QR, then the same Gram
eigenvalues of the small projected matrix). Its estimates of the top singular values are slight underestimates and
the energy ``||dW||_F^2`` is summed directly (fp64), so ``energy_top_k`` can only come out low and ``stable_rank``
high: on decaying spectra both agree with the exact values to within 0.2% (1e-6 when the top k hold most of the
energy), on a flat (Gaussian-noise) spectrum ``energy_top_k`` is up to ~10% low and ``stable_rank`` up to ~8% high
(tests/unit/test_spectral.py checks both). ``effective_rank`` is an approximation there: it spreads the tail energy
(``||dW||_F^2`` minus the top-k energy) evenly over the remaining ``p - k`` singular values, which is exact for a
flat tail and overestimates the effective rank of a decaying one.

Everything runs on the delta's device (CPU or CUDA) within the streaming memory bound: the exact path holds the
p x p Gram and one chunk besides the delta (no full-size copy); the randomized path divides the delta by its largest
|entry| into one fp32 working copy (so fp32 squares neither underflow nor overflow; every statistic is
scale-invariant) and holds (m + n) x (k + oversampling) values besides it.

A zero delta gives ``stable_rank = effective_rank = rank_90 = rank_99 = 0``, ``energy_top_k = 1`` (the top k hold
all of its zero energy, so ``rank_q <= k`` and ``energy_top_k >= q`` agree) and ``low_rank = False`` (nothing was
merged). A delta with NaN/Inf entries is skipped: NaN numbers, ``low_rank = spectral_exact = False``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["spectral_stats", "SPECTRAL_COLUMNS", "LOW_RANK_DIVISOR", "OVERSAMPLE", "POWER_ITERATIONS"]

#: The keys of :func:`spectral_stats`, in the order of the per-tensor table's columns.
SPECTRAL_COLUMNS = ("stable_rank", "effective_rank", "energy_top_k", "rank_90", "rank_99", "low_rank",
                    "spectral_exact")
#: ``low_rank`` needs ``rank_99 <= min(m, n) / LOW_RANK_DIVISOR`` (and ``rank_99 <= k``).
LOW_RANK_DIVISOR = 8
#: Oversampling of the randomized SVD: it samples k + max(k, OVERSAMPLE) random directions to estimate the top k
#: (Halko et al. 2011, section 4.2; generous, since fine-tuning deltas often have slowly decaying spectra).
OVERSAMPLE = 16
#: Power iterations of the randomized SVD (Halko et al. 2011, Algorithm 4.4); two sharpen a slowly decaying spectrum.
POWER_ITERATIONS = 2
# A rank reaches q of the energy when its cumulative energy is within this relative slack of q * total: the delta's
# fp32 entries are only that precise, and an exact tie (e.g. ten equal values and q = 0.9) is not lost to rounding.
_RANK_RTOL = 1e-6
_CHUNK = 1 << 20  # elements per fp64 chunk (8 MiB) when accumulating a Gram matrix or a sum of squares


def spectral_stats(delta: torch.Tensor, *, k: int = 64, exact_max: int = 1024,
                   seed: int = 0) -> dict[str, float | bool]:
    """Spectral statistics of one 2-D delta (see the module docstring for the definitions and references).

    Args:
        delta: the (m, n) delta, fine-tuned minus base weights, any floating dtype, on CPU or CUDA; not modified.
        k: how many top singular values ``energy_top_k`` covers and the randomized SVD computes (capped at
            min(m, n)); also the largest ``rank_99`` that counts as ``low_rank``.
        exact_max: compute the full spectrum exactly when min(m, n) <= exact_max (or when the randomized SVD's
            k + max(k, OVERSAMPLE) directions would cover it anyway); otherwise the top k by randomized SVD.
        seed: seed of the randomized SVD's Gaussian test matrix (a generator on the delta's device): the same seed,
            delta and device give the same values.

    Returns:
        ``{"stable_rank", "effective_rank", "energy_top_k", "rank_90", "rank_99"}`` as floats (ranks are whole
        numbers, or NaN when not determined) and ``{"low_rank", "spectral_exact"}`` as bools, keyed in the order of
        :data:`SPECTRAL_COLUMNS`.

    Raises:
        ValueError: delta not a 2-D floating-point tensor, k < 1, exact_max < 0 or seed < 0 (or not integers).
    """
    if not isinstance(delta, torch.Tensor) or delta.ndim != 2 or not delta.is_floating_point():
        what = f"a {delta.ndim}-D {delta.dtype} tensor of shape {tuple(delta.shape)}" if isinstance(
            delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta must be a 2-D floating-point tensor (a weight matrix), got {what}; spectral "
                         "statistics are defined for matrices only.")
    for name, value, low in (("k", k, 1), ("exact_max", exact_max, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
    m, n = delta.shape
    p = min(m, n)
    top = min(k, p)
    # max |entry| without a copy; NaN or Inf when any entry is
    scale = float(torch.linalg.vector_norm(delta, ord=math.inf)) if delta.numel() else 0.0
    if not math.isfinite(scale):
        return _result(math.nan, math.nan, math.nan, math.nan, math.nan, low_rank=False, exact=False)
    if scale == 0.0:
        return _result(0.0, 0.0, 1.0, 0.0, 0.0, low_rank=False, exact=True)
    exact = p <= exact_max or top + max(top, OVERSAMPLE) >= p
    if exact:
        s = _singular_values(delta)  # (p,), descending
        total = float(np.sum(s * s))
    else:
        a = delta.to(torch.float32, copy=True).div_(scale)  # (m, n), max |entry| = 1: the one working copy
        s = _singular_values(_randomized_projection(a, top, seed))[:top]  # (top,), descending
        total = _squared_norm(a)
        del a
    energy = np.cumsum(s * s)  # energy[i] = energy of the top i + 1 singular values
    ranks = []
    for q in (0.9, 0.99):
        needed = int(np.searchsorted(energy, q * total * (1 - _RANK_RTOL), side="left")) + 1
        ranks.append(float(needed) if needed <= len(s) else math.nan)
    rank_99 = ranks[1]
    low_rank = not math.isnan(rank_99) and rank_99 <= top and rank_99 <= p / LOW_RANK_DIVISOR
    return _result(total / float(s[0] ** 2), _effective_rank(s, total, p, exact),
                   min(1.0, float(energy[top - 1]) / total), ranks[0], rank_99, low_rank=low_rank, exact=exact)


def _result(stable: float, effective: float, energy: float, rank_90: float, rank_99: float, *, low_rank: bool,
            exact: bool) -> dict[str, float | bool]:
    return dict(zip(SPECTRAL_COLUMNS, (stable, effective, energy, rank_90, rank_99, low_rank, exact)))


def _singular_values(a: torch.Tensor) -> np.ndarray:
    """All min(m, n) singular values of ``a``, descending, as fp64 numpy: square roots of the eigenvalues of the fp64
    Gram matrix over the shorter side, accumulated a bounded chunk of rows at a time."""
    tall = a.T if a.shape[0] < a.shape[1] else a  # (rows, p), a view
    p = tall.shape[1]
    gram = torch.zeros(p, p, dtype=torch.float64, device=a.device)  # (p, p)
    rows = max(1, _CHUNK // max(1, p))
    for i in range(0, tall.shape[0], rows):
        chunk = tall[i : i + rows].double()  # (<= rows, p)
        gram.addmm_(chunk.T, chunk)
    eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)  # descending; rounding can make ~0 eigenvalues negative
    return eig.sqrt().cpu().numpy()


def _randomized_projection(a: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """``Q^T a`` of shape (rank + max(rank, OVERSAMPLE), n), whose singular values approximate the top ones of ``a``,
    by randomized subspace iteration (Halko et al. 2011, Algorithm 4.4) from a Gaussian test matrix drawn by a
    generator seeded with ``seed`` on ``a``'s device."""
    m, n = a.shape
    width = min(m, n, rank + max(rank, OVERSAMPLE))
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, device=a.device, dtype=a.dtype)  # (n, width)
    q = torch.linalg.qr(a @ omega).Q  # (m, width): an orthonormal basis of the sampled range
    for _ in range(POWER_ITERATIONS):  # re-orthonormalise after each product so small directions survive in fp32
        z = torch.linalg.qr(a.T @ q).Q  # (n, width)
        q = torch.linalg.qr(a @ z).Q  # (m, width)
    return q.T @ a  # (width, n)


def _squared_norm(a: torch.Tensor) -> float:
    """``||a||_F^2`` summed in fp64, a bounded chunk of rows at a time (no full-size fp64 copy)."""
    rows = max(1, _CHUNK // max(1, a.shape[1]))
    return sum(float(a[i : i + rows].double().square().sum()) for i in range(0, a.shape[0], rows))


def _effective_rank(s: np.ndarray, total: float, p: int, exact: bool) -> float:
    """exp(entropy of s / sum(s)); with only the top singular values known, the tail energy is spread evenly over
    the p - len(s) unknown ones."""
    tail_n = 0 if exact else p - len(s)
    tail = max(total - float(np.sum(s * s)), 0.0) if tail_n else 0.0
    tail_s = math.sqrt(tail / tail_n) if tail > 0 else 0.0  # each unknown singular value
    l1 = float(np.sum(s)) + tail_n * tail_s
    prob = s[s > 0] / l1
    entropy = -float(np.sum(prob * np.log(prob)))
    if tail_s > 0:
        entropy -= tail_n * (tail_s / l1) * math.log(tail_s / l1)
    return math.exp(entropy)
