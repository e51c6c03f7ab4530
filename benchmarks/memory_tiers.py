"""Benchmark: a DARE sweep in every memory tier -- peak memory, seconds per point, and the pruned weights' digest.

The pair is a synthetic Llama checkpoint in bf16 (:mod:`deltakit.testing`: the 1.5B shape by default, 7B with
``--big``), written once and reused. Each choice runs in its own process (so its peak RSS, ``ru_maxrss`` from
``os.wait4``, is its own, loading included): ``deltakit.sweep.sweep`` with ``RunOptions(tier=..., max_memory=...)``,
method ``dare``, rates 0.5 and 0.9, seeds 0 and 1 (4 points: 2 rates, a second seed), preset ``darex_decoder``. The
"evaluation" of a point is a sha256 of every parameter of the model, so equal digests mean bit-identical pruned
models. The pair's files are read once before the runs, so the file-streamed tier finds a warm page cache when
the pair fits in memory (the output says when it does not).

Choices, on CPU: ``resident`` and ``file`` with and without the uniform-number cache (``host`` is ``resident`` on
a CPU: the host is the device). On CUDA (``--device cuda``): ``resident``, ``host``, ``file``.

Prints a table and one JSON line with ``bytes_per_param`` per choice (peak RSS / parameters; on CUDA also device),
``bytes_per_param_lowest`` (target <= 2.5 for a bf16 model), ``identical_across_tiers`` (target true),
``streamed_vs_resident`` (seconds per point, file-streamed over resident, both with the cache on CPU; target
<= 1.5) and the raw figures.

    python benchmarks/memory_tiers.py [--size 1.5b | --big] [--device cuda] [--max-memory 5GB]

Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TARGETS = {"bytes_per_param_lowest": 2.5, "streamed_vs_resident": 1.5}
RATES, SEEDS = (0.5, 0.9), (0, 1)


def _worker(base: str, ft: str, device: str, tier: str, cache: str, max_memory: str | None) -> dict:
    import deltakit  # noqa: F401 - first, so that torch starts with deltakit's OpenMP policy
    import hashlib

    import torch

    from deltakit.spec import RunOptions, SweepSpec
    from deltakit.sweep import sweep
    from deltakit.tensors import TensorReader

    def digest(model: torch.nn.Module) -> dict[str, float]:
        h = hashlib.sha256()
        for _, p in sorted(model.named_parameters()):
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())  # no copy on CPU
        return {"digest": float(int(h.hexdigest()[:12], 16))}

    digest.fingerprint = "sha256-of-parameters"
    t0 = time.perf_counter()
    spec = SweepSpec(base, ft, methods=["dare"], rates=list(RATES), seeds=list(SEEDS), references=False,
                     preset="darex_decoder")
    options = RunOptions(device=device, tier=tier, max_memory=max_memory, cache_uniforms=cache == "yes",
                         progress=False)
    df = sweep(spec, options, evaluator=digest)
    total = time.perf_counter() - t0
    if set(df["status"]) != {"ok"}:
        raise SystemExit(f"failed points: {df[df.status != 'ok'][['rate', 'seed', 'error']].to_string()}")
    df = df.sort_values(["rate", "seed"])
    reader = TensorReader(ft)
    n_params = sum(reader.info(n).numel for n in reader.names())
    return {"tier": str(df["tier"].iloc[-1]), "plan": df.attrs["memory"], "total_seconds": total,
            "apply_seconds": df["prep_seconds"].tolist(), "digest_seconds": df["eval_seconds"].tolist(),
            "digests": [int(v) for v in df["value"]], "params": n_params,
            "peak_device_mb": None if df["peak_device_mb"].isna().all() else float(df["peak_device_mb"].max())}


def _child(*args: str) -> tuple[dict, dict]:
    """Run this script as ``--worker ARGS`` in a fresh process; (its JSON result, its own resource usage)."""
    proc = subprocess.Popen([sys.executable, __file__, "--worker", *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"worker {args} failed with exit status {os.waitstatus_to_exitcode(status)}")
    return json.loads(out.strip().splitlines()[-1]), {"peak_rss_mb": usage.ru_maxrss / 1024,
                                                      "cpu_s": usage.ru_utime + usage.ru_stime}


def _warm(files: list[Path]) -> float:
    """Read every file once (the page cache keeps them when they fit); seconds taken."""
    buf = memoryview(bytearray(64 << 20))
    t0 = time.perf_counter()
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(*sys.argv[2:7], sys.argv[7] if len(sys.argv) > 7 else None)))
        return
    from deltakit.families.layout import deltakit_home
    from deltakit.tensors import TensorReader
    from deltakit.testing import SHAPES, write_synthetic_family

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SHAPES), default="1.5b")
    parser.add_argument("--big", action="store_true", help="the Llama-2-7B pair (27 GB on disk)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-memory", help="also pass this budget to every run (e.g. 5GB); a choice that does "
                        "not fit it is refused by the sweep")
    parser.add_argument("--tiers", nargs="+", help="only these choices (e.g. file:no)")
    parser.add_argument("--folder", type=Path, help="where the synthetic pairs are kept (default: "
                        "$DELTAKIT_HOME/synthetic, else ~/.cache/deltakit/synthetic)")
    args = parser.parse_args()
    size = "7b" if args.big else args.size
    folder = (args.folder or deltakit_home() / "synthetic") / f"llama-{size}-seed0"
    paths = write_synthetic_family(folder, size, finetunes=1, seed=0, progress=True)
    files = [f for m in ("base", "ft0") for f in TensorReader(paths[m]).files]
    nbytes = sum(f.stat().st_size for f in files)
    with open("/proc/meminfo") as fh:
        mem_total = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
    warm = nbytes < 0.7 * mem_total
    cuda = args.device.startswith("cuda")
    choices = args.tiers or (["resident:no", "host:no", "file:no"] if cuda else
                             ["resident:yes", "file:yes", "resident:no", "file:no"])
    print(f"{os.cpu_count()} CPUs, {mem_total / 2**30:.0f} GiB RAM; pair {folder} ({nbytes / 1e9:.2f} GB, "
          f"{'fits in' if warm else 'larger than 70% of'} RAM); first read {_warm(files):.1f} s")
    rows = {}
    for choice in choices:
        tier, cache = choice.split(":")
        extra = [args.max_memory] if args.max_memory else []
        result, usage = _child(str(paths["base"]), str(paths["ft0"]), args.device, tier, cache, *extra)
        per_point = sum(result["apply_seconds"]) / len(result["apply_seconds"])
        rows[choice] = {
            "tier": result["tier"], "cache": cache == "yes", "plan": result["plan"],
            "seconds_per_point": round(per_point, 3),
            "first_point_seconds": round(result["apply_seconds"][0], 3),
            "apply_seconds": [round(x, 3) for x in result["apply_seconds"]],
            "digest_seconds_per_point": round(sum(result["digest_seconds"]) / len(result["digest_seconds"]), 3),
            "total_seconds": round(result["total_seconds"], 1), "cpu_seconds": round(usage["cpu_s"], 1),
            "peak_rss_mb": round(usage["peak_rss_mb"], 1),
            "bytes_per_param": round(usage["peak_rss_mb"] * 2**20 / result["params"], 3),
            "device_bytes_per_param": None if result["peak_device_mb"] is None else
            round(result["peak_device_mb"] * 2**20 / result["params"], 3),
            "digests": result["digests"], "params": result["params"],
        }
    print(f"\n{'choice':>13} {'s/point':>8} {'1st point s':>11} {'peak RSS MB':>11} {'B/param':>8} "
          f"{'dev B/param':>11} {'total s':>8}  digest of the 4 points")
    for name, r in rows.items():
        dev = "-" if r["device_bytes_per_param"] is None else f"{r['device_bytes_per_param']:.2f}"
        print(f"{name:>13} {r['seconds_per_point']:>8.2f} {r['first_point_seconds']:>11.2f} {r['peak_rss_mb']:>11.0f} "
              f"{r['bytes_per_param']:>8.3f} {dev:>11} {r['total_seconds']:>8.1f}  "
              f"{' '.join(f'{d:012x}' for d in r['digests'])}")
    key = "device_bytes_per_param" if cuda else "bytes_per_param"
    lowest = min(r[key] for r in rows.values())
    resident = rows.get("resident:yes") or rows.get("resident:no")
    streamed = rows.get("file:yes" if "resident:yes" in rows else "file:no")
    summary = {
        "size": size, "params": next(iter(rows.values()))["params"], "device": args.device,
        "bytes_per_param": {k: r[key] for k, r in rows.items()},
        "bytes_per_param_lowest": lowest,
        "identical_across_tiers": len({tuple(r["digests"]) for r in rows.values()}) == 1,
        "streamed_vs_resident": round(streamed["seconds_per_point"] / resident["seconds_per_point"], 3)
        if resident and streamed else None,
        "page_cache": "warm" if warm else "cold (the pair does not fit in RAM)",
        "host": "same as resident on cpu" if not cuda else "measured",
        "targets": {"bytes_per_param_lowest_max": TARGETS["bytes_per_param_lowest"],
                    "streamed_vs_resident_max": TARGETS["streamed_vs_resident"], "identical_across_tiers": True},
        "runs": {k: {f: v for f, v in r.items() if f != "digests"} for k, r in rows.items()},
    }
    summary["targets_met"] = (summary["identical_across_tiers"] and lowest <= TARGETS["bytes_per_param_lowest"]
                              and (summary["streamed_vs_resident"] or 0) <= TARGETS["streamed_vs_resident"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
