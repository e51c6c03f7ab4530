"""DAREx's coarse-then-fine grid search: maximise a score over a positive scalar (a global q, or the analytic eta).

Deng et al. 2025 (arXiv:2410.09344) tune q (and eta) with a coarse grid, then a finer grid around the coarse best,
each pass stopping after a few consecutive misses. :func:`two_stage_grid_search` is that search, with exact grid
points (no float drift) and no re-evaluation of a point already scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["GRID_DECIMALS", "GridSearchResult", "two_stage_grid_search"]

# Grid points are rounded to this many decimals so that keys like 0.06 do not become 0.060000000000000005.
GRID_DECIMALS = 10
# A step ratio this close to an integer counts as that integer.
_EPS = 1e-9


def _finite(label: str, value: object) -> float:
    """``value`` as a finite float, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label}={value!r} must be a finite number.")
    return float(value)


@dataclass(frozen=True)
class GridSearchResult:
    """Result of :func:`two_stage_grid_search`.

    Attributes:
        best_x: the evaluated point with the highest score (ties: the first evaluated).
        best_score: its score.
        evaluated: every distinct point evaluated, ``(x, score)`` in evaluation order (coarse pass first).
        coarse_grid: the planned coarse grid (the scan may have stopped early).
        fine_grid: the planned fine grid.
        fine_step: the fine spacing, ``step · decay``.
    """

    best_x: float
    best_score: float
    evaluated: tuple[tuple[float, float], ...]
    coarse_grid: tuple[float, ...]
    fine_grid: tuple[float, ...]
    fine_step: float


def _arange(start: float, stop: float, step: float) -> list[float]:
    """``np.arange(start, stop, step)`` in exact arithmetic: points ``start + k·step < stop``, rounded.

    np.arange decides its length from a float division, so ``arange(0.1, 0.6, 0.1)`` may or may not include 0.6;
    here a ratio within 1e-9 of an integer counts as that integer.
    """
    ratio = (stop - start) / step
    n = round(ratio) if abs(ratio - round(ratio)) < _EPS else math.floor(ratio) + 1
    return [round(start + k * step, GRID_DECIMALS) for k in range(max(n, 0))]


def two_stage_grid_search(
    objective: Callable[[float], float],
    *,
    lo: float,
    hi: float,
    step: float,
    decay: float = 0.1,
    patience: int = 4,
    encoder: bool = True,
) -> GridSearchResult:
    """DAREx's coarse-then-fine maximisation of a score over a positive scalar (a global q, or η).

    1. Coarse pass over ``arange(lo, hi + step, step)`` (so the last point may pass ``hi``: lo=0.01, hi=0.1,
       step=0.05 gives 0.01, 0.06, 0.11).
    2. Fine pass with spacing ``step·decay`` around the coarse best ``q_b``, over
       ``arange(max(lo + step·decay, q_b − step·(1−decay)), q_b + step, step·decay)`` for encoders; decoders use
       the lower bound ``max(0, q_b − step·(1−decay))``. The upper end is exclusive, as in the reference
       (``q_b + step`` is the next coarse point).

    Each pass stops early after ``patience`` consecutive scores below the pass's best so far (the counter
    resets on a score ``≥`` the best). The result is the argmax over **all** evaluated points.

    Differences from the reference, none of which changes its answer for a deterministic objective: grid
    points are computed as ``start + k·step`` rounded to 10 decimals (no float drift); a point already
    evaluated is not re-evaluated, its score is reused (the reference re-runs e.g. ``q_b`` in the fine pass);
    fine points ``≤ 0`` (reachable only with ``encoder=False``) are skipped, since neither q nor η can be 0;
    a NaN score never counts as a best.

    Args:
        objective: maps a candidate to a score to maximise (e.g. validation accuracy, or minus the output
            change). Called once per distinct grid point.
        lo: first coarse point, > 0 (for q: ``1 − rate``, so DARE itself is the first candidate).
        hi: last coarse point wanted, ``≥ lo``.
        step: coarse spacing, > 0.
        decay: fine spacing as a fraction of ``step``, in (0, 1).
        patience: consecutive misses that end a pass, ≥ 1.
        encoder: use the encoder's fine-pass lower bound (True) or the decoder's (False).

    Returns:
        A :class:`GridSearchResult`.

    Raises:
        ValueError: if an argument is out of range, or every score was NaN.
    """
    lo, hi, step, decay = (_finite(k, v) for k, v in (("lo", lo), ("hi", hi), ("step", step), ("decay", decay)))
    if lo <= 0:
        raise ValueError(f"lo={lo!r} must be > 0: the searched value (q or eta) divides or scales the delta.")
    if hi < lo:
        raise ValueError(f"hi={hi!r} is below lo={lo!r}; pass lo <= hi.")
    if step <= 0:
        raise ValueError(f"step={step!r} must be > 0.")
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay={decay!r} is outside (0, 1); the reference uses 0.1.")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience={patience!r} must be an integer >= 1; the reference uses 4.")

    scores: dict[float, float] = {}  # insertion order = evaluation order

    def run_pass(points: list[float]) -> None:
        best = -math.inf
        misses = 0
        for x in points:
            if x not in scores:
                scores[x] = float(objective(x))
            score = scores[x]
            if score >= best:  # False for NaN: a NaN is a miss
                best = score
                misses = 0
            else:
                misses += 1
            if misses >= patience:
                break

    def argmax() -> tuple[float, float]:
        finite = [(x, s) for x, s in scores.items() if not math.isnan(s)]
        if not finite:
            raise ValueError(f"every score was NaN at the points {list(scores)}; check the objective.")
        return max(finite, key=lambda item: item[1])  # max keeps the first of equal scores

    coarse = _arange(lo, hi + step, step)
    run_pass(coarse)
    q_b, _ = argmax()
    fine_step = round(step * decay, GRID_DECIMALS)
    lower = q_b - step * (1.0 - decay)
    lower = max(lo + step * decay, lower) if encoder else max(0.0, lower)
    fine = [x for x in _arange(lower, q_b + step, fine_step) if x > 0]
    run_pass(fine)
    best_x, best_score = argmax()
    return GridSearchResult(
        best_x=best_x,
        best_score=best_score,
        evaluated=tuple(scores.items()),
        coarse_grid=tuple(coarse),
        fine_grid=tuple(fine),
        fine_step=fine_step,
    )
