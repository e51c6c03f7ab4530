"""Benchmark: deltakit's streaming delta statistics vs the naive approach, side by side.

Naive = what one writes first: load the base and the fine-tune fully with transformers, subtract every tensor,
and compute the same global statistics from the whole delta. deltakit streams one tensor at a time.
Each approach runs in its own process so its peak RSS (``ru_maxrss``) is its own.

    python benchmarks/stats.py [BASE FT]      # default: the minilm-tweets base and sentiment3 (built if needed)

Prints one line per approach and, last, a JSON line with ``rss_naive_over_deltakit`` and
``time_naive_over_deltakit`` (> 1 means deltakit uses less memory / is faster).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

DEFAULT = ("family:minilm-tweets/base", "family:minilm-tweets/sentiment3")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _worker(mode: str, base: str, ft: str) -> dict:
    import torch

    from deltakit.sources import resolve

    b, f = resolve(base), resolve(ft)  # resolving (and building a family) happens before the clock starts
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "deltakit":
        from deltakit.stats import delta_stats

        st = delta_stats(b, [f], progress=False)
        mean_abs = float(st.overall["mean_abs"].iloc[0])
    else:
        from transformers import AutoModel, AutoModelForSequenceClassification

        base_sd = AutoModel.from_pretrained(b.path, trust_remote_code=False).state_dict()
        ft_sd = AutoModelForSequenceClassification.from_pretrained(f.path, trust_remote_code=False).state_dict()
        prefix = "bert." if any(k.startswith("bert.") for k in ft_sd) else ""
        deltas = {k: ft_sd[prefix + k].float() - v.float() for k, v in base_sd.items()
                  if v.is_floating_point() and prefix + k in ft_sd}
        flat = torch.cat([d.reshape(-1) for d in deltas.values()]).double()
        a = flat.abs()
        stats = dict(mean=flat.mean(), std=flat.std(), mean_abs=a.mean(), max_abs=a.max(),
                     below=[(a < t).double().mean() for t in (0.002, 0.005, 0.01, 0.03)],
                     q=torch.quantile(a[:: max(1, a.numel() // 10_000_000)].float(), torch.tensor([0.5, 0.9, 0.99])))
        mean_abs = float(stats["mean_abs"])
    seconds = time.perf_counter() - t0
    return {"mode": mode, "seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before,
            "mean_abs": mean_abs}


def _run(mode: str, base: str, ft: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, base, ft], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = [a for a in sys.argv[1:]]
    if args and args[0] == "--worker":
        print(json.dumps(_worker(args[1], args[2], args[3])))
        return
    base, ft = args if len(args) == 2 else DEFAULT
    _run("deltakit", base, ft)  # warm-up: builds the family if needed, warms the page cache
    results = {m: _run(m, base, ft) for m in ("deltakit", "naive")}
    for r in results.values():
        print(f"{r['mode']:>9}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(after imports and resolve: {r['rss_before_mb']:.0f} MB), mean|d| {r['mean_abs']:.4g}")
    d, n = results["deltakit"], results["naive"]
    if abs(d["mean_abs"] - n["mean_abs"]) > 1e-6 * max(1.0, abs(n["mean_abs"])) + 1e-9:
        print(f"WARNING: the two approaches disagree on mean|d|: {d['mean_abs']} vs {n['mean_abs']}")
    print(json.dumps({
        "base": base, "fine_tune": ft,
        "rss_naive_over_deltakit": round(n["peak_rss_mb"] / d["peak_rss_mb"], 3),
        "time_naive_over_deltakit": round(n["seconds"] / d["seconds"], 3),
        "deltakit_peak_rss_mb": round(d["peak_rss_mb"], 1), "naive_peak_rss_mb": round(n["peak_rss_mb"], 1),
        "deltakit_seconds": round(d["seconds"], 3), "naive_seconds": round(n["seconds"], 3),
    }))


if __name__ == "__main__":
    main()
