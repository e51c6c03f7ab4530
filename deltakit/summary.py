"""Sweep rows -> one row per (method, rate): the mean over seeds and an interval, the one summary every face shows.

The CLI's table, the demo's tables, the fidelity report and the curves of :mod:`deltakit.plots` all read
:func:`summarise`, so a number in a table and the point drawn for it are the same number.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy.stats import t as student_t

__all__ = ["INTERVALS", "summarise"]

#: Interval kinds: a Student-t 95% interval of the mean over seeds, the seeds' range, or the mean +- 1 std.
INTERVALS = ("ci95", "minmax", "std")


def summarise(results: pd.DataFrame, metric: str = "accuracy", interval: str = "ci95") -> pd.DataFrame:
    """Mean and interval over seeds, per (method label, rate), and per (task, lambda) for merge results.

    Args:
        results: sweep rows (``label``, ``method``, ``rate``, ``seed``, ``metric``, ``value``, ``q``, ``status``).
        metric: which metric.
        interval: ``"ci95"`` (Student-t 95% interval of the mean over seeds: mean +- t(0.975, n-1) standard
            errors), ``"minmax"`` or ``"std"``.

    Returns:
        Columns label, method, rate, mean, std, lo, hi, n_seeds, q (the mean DAREx-q rescale, NaN when none), and
        task, lam for merge results (references have lam NaN); reference methods included.

    Raises:
        ValueError: unknown interval kind, or the metric is absent (the message lists those present).
    """
    if interval not in INTERVALS:
        raise ValueError(f"interval={interval!r}; use one of {INTERVALS}.")
    ok = results[(results["status"] == "ok") & (results["metric"] == metric)]
    if ok.empty:
        raise ValueError(f"no rows for metric {metric!r}; metrics present: {sorted(results['metric'].dropna().unique())}")
    extra = [c for c in ("task", "lam") if c in ok and ok[c].notna().any()]
    rows = []
    for keys, g in ok.groupby(["label", "method", "rate", *extra], sort=True, dropna=False):
        label, method, rate = keys[:3]
        v = g["value"].to_numpy(dtype=float)
        mean, n = float(v.mean()), len(v)
        sd = float(v.std(ddof=1)) if n > 1 else 0.0
        half = float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else 0.0
        lo, hi = {"ci95": (mean - half, mean + half), "std": (mean - sd, mean + sd),
                  "minmax": (float(v.min()), float(v.max()))}[interval]
        q = float(g["q"].mean()) if "q" in g else math.nan
        rows.append(dict(label=label, method=method, rate=rate, mean=mean, std=sd, lo=lo, hi=hi, n_seeds=n, q=q,
                         **dict(zip(extra, keys[3:]))))
    return pd.DataFrame(rows)
