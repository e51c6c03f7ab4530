"""Benchmark: ``deltakit stats BASE FT`` at real scale -- time, peak memory and read throughput by model size.

The pairs are synthetic Llama checkpoints (:mod:`deltakit.testing`: bf16, Qwen2.5-0.5B / 1.5B widths, Llama-2-7B with
``--big``), written once under ``--folder`` and reused. For each size, each in its own process (so its peak RSS,
``ru_maxrss`` from ``os.wait4``, is its own):

1. a plain sequential read of every weight file of base and fine-tune (64 MiB ``readinto``), untimed: it warms the
   page cache;
2. the same read, timed: the I/O limit, in the cache state the stats run finds;
3. ``deltakit.stats.delta_stats(BASE, [FT])`` (what ``deltakit stats`` runs), timed inside the process after imports.

Both timed runs are warm when the pair fits in memory; when it does not (7B on a small machine) both read mostly
from disk. The output says which. Reported per size: seconds, GB read, GB/s of deltakit and of the plain read, their
ratio, peak RSS; then one JSON line with

* ``rss_growth``: peak RSS at the largest size / at the smallest (target <= 1.5: memory does not grow with the model);
* ``time_per_gparam_growth``: seconds per 1e9 parameters at the largest / at the smallest (target <= 1.3: linear);
* ``fraction_of_read_limit``: deltakit's throughput / the plain read's at the largest size (target >= 0.5);

plus ``rss_largest_mb`` and the raw per-size figures.

    python benchmarks/scale.py [--sizes 0.5b 1.5b] [--big] [--folder DIR]

Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TARGETS = {"rss_growth": 1.5, "time_per_gparam_growth": 1.3, "fraction_of_read_limit": 0.5}
SEED = 0
BUFFER = 64 << 20  # bytes per read() of the plain read


# -- workers (each runs in its own process) ----------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _worker_read(files: list[str]) -> dict:
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while got := f.readinto(view):
                total += got
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def _worker_stats(base: str, ft: str) -> dict:
    import deltakit  # noqa: F401 - first, so that torch starts with deltakit's OpenMP policy
    from deltakit.stats import delta_stats

    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    st = delta_stats(base, [ft], progress=False)
    seconds = time.perf_counter() - t0
    overall = st.overall.iloc[0]
    return {"seconds": seconds, "rss_before_mb": rss_before, "numel": int(overall["numel"]),
            "mean_abs": float(overall["mean_abs"]), "frac_below_0.005": float(overall["frac_below_0.005"])}


def _child(*args: str) -> tuple[dict, dict]:
    """Run this script as ``--worker ARGS`` in a fresh process; (its JSON result, its own resource usage)."""
    proc = subprocess.Popen([sys.executable, __file__, "--worker", *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone, not all children's maximum
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"worker {args[0]} failed with exit status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), {"peak_rss_mb": usage.ru_maxrss / 1024,
                                                      "cpu_s": usage.ru_utime + usage.ru_stime}


# -- driver ------------------------------------------------------------------------------------------------------------
def _default_folder() -> Path:
    from deltakit.families.layout import deltakit_home

    return deltakit_home() / "synthetic"


def _mem_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _prepare(folder: Path, size: str) -> tuple[dict[str, Path], dict]:
    """Write (or reuse) the pair; how long writing took, if it was written."""
    from deltakit.testing import family_bytes, write_synthetic_family

    where = folder / f"llama-{size}-seed{SEED}"
    markers = [where / m / ".complete" for m in ("base", "ft0")]
    before = [p.stat().st_mtime_ns if p.exists() else None for p in markers]
    t0 = time.perf_counter()
    paths = write_synthetic_family(where, size, finetunes=1, seed=SEED, progress=True)
    seconds = time.perf_counter() - t0
    written = [p.stat().st_mtime_ns for p in markers] != before
    info = {"written": written, "write_seconds": round(seconds, 2) if written else None,
            "write_gb_per_s": round(family_bytes(size) / seconds / 1e9, 3) if written else None}
    if written:
        print(f"{size}: wrote {family_bytes(size) / 1e9:.2f} GB in {seconds:.1f} s "
              f"({family_bytes(size) / seconds / 1e9:.2f} GB/s) to {where}")
    else:
        print(f"{size}: reusing {where}")
    return paths, info


def _measure(size: str, paths: dict[str, Path]) -> dict:
    from deltakit.tensors import TensorReader
    from deltakit.testing import SHAPES

    files = [str(f) for m in ("base", "ft0") for f in TensorReader(paths[m]).files]
    nbytes = sum(os.path.getsize(f) for f in files)
    warmup, _ = _child("read", *files)
    plain, _ = _child("read", *files)
    stats, usage = _child("stats", str(paths["base"]), str(paths["ft0"]))
    params = SHAPES[size].num_parameters
    if stats["numel"] != params:
        print(f"WARNING: the stats cover {stats['numel']:,} entries, the model has {params:,} parameters")
    dk_gbps = nbytes / stats["seconds"] / 1e9
    plain_gbps = plain["bytes"] / plain["seconds"] / 1e9
    return {
        "size": size, "params": params, "gb_read": round(nbytes / 1e9, 3),
        "stats_seconds": round(stats["seconds"], 3), "stats_cpu_seconds": round(usage["cpu_s"], 2),
        "gb_per_s_deltakit": round(dk_gbps, 3), "gb_per_s_plain_read": round(plain_gbps, 3),
        "gb_per_s_first_read": round(warmup["bytes"] / warmup["seconds"] / 1e9, 3),
        "fraction_of_read_limit": round(dk_gbps / plain_gbps, 4),
        "seconds_per_gparam": round(stats["seconds"] / (params / 1e9), 3),
        "peak_rss_mb": round(usage["peak_rss_mb"], 1), "rss_after_imports_mb": round(stats["rss_before_mb"], 1),
        "fits_in_ram": nbytes < _mem_bytes("MemTotal") * 0.8,
        "frac_below_0.005": round(stats["frac_below_0.005"], 5),
    }


def main() -> None:
    from deltakit.testing import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SHAPES), help="sizes to measure, smallest first "
                        "(default: 0.5b 1.5b, plus 7b with --big)")
    parser.add_argument("--big", action="store_true", help="add the Llama-2-7B pair (27 GB on disk)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the synthetic pairs are kept (default: $DELTAKIT_HOME/synthetic, else "
                             "~/.cache/deltakit/synthetic); existing ones are reused")
    args = parser.parse_args()
    sizes = args.sizes or ["0.5b", "1.5b"]
    if args.big and "7b" not in sizes:
        sizes.append("7b")
    folder = args.folder or _default_folder()

    print(f"{os.cpu_count()} CPUs, {_mem_bytes('MemTotal') / 2**30:.0f} GiB RAM; pairs under {folder}")
    prepared = {size: _prepare(folder, size) for size in dict.fromkeys(sizes)}
    rows = []
    for size in sizes:
        row = _measure(size, prepared[size][0])
        row.update(prepared[size][1])
        rows.append(row)

    print("\ncache: a plain read warms the page cache, then the timed plain read and the stats run follow "
          "immediately (both warm when the pair fits in RAM, else both read mostly from disk)")
    print(f"{'size':>5} {'params':>14} {'stats s':>8} {'GB read':>8} {'GB/s dk':>8} {'GB/s read':>9} "
          f"{'fraction':>8} {'peak RSS MB':>11} {'cpu s':>6} {'cache':>5}")
    for r in rows:
        print(f"{r['size']:>5} {r['params']:>14,} {r['stats_seconds']:>8.2f} {r['gb_read']:>8.2f} "
              f"{r['gb_per_s_deltakit']:>8.3f} {r['gb_per_s_plain_read']:>9.2f} {r['fraction_of_read_limit']:>8.3f} "
              f"{r['peak_rss_mb']:>11.0f} {r['stats_cpu_seconds']:>6.1f} {'warm' if r['fits_in_ram'] else 'disk':>5}")
    small, large = rows[0], rows[-1]
    summary = {
        "rss_largest_mb": large["peak_rss_mb"],
        "rss_growth": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "time_per_gparam_growth": round(large["seconds_per_gparam"] / small["seconds_per_gparam"], 3),
        "fraction_of_read_limit": large["fraction_of_read_limit"],
        "targets": {"rss_growth_max": TARGETS["rss_growth"],
                    "time_per_gparam_growth_max": TARGETS["time_per_gparam_growth"],
                    "fraction_of_read_limit_min": TARGETS["fraction_of_read_limit"]},
        "cpus": os.cpu_count(),
        "sizes": {r["size"]: r for r in rows},
    }
    summary["targets_met"] = (summary["rss_growth"] <= TARGETS["rss_growth"]
                              and summary["time_per_gparam_growth"] <= TARGETS["time_per_gparam_growth"]
                              and summary["fraction_of_read_limit"] >= TARGETS["fraction_of_read_limit"])
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        kind, rest = sys.argv[2], sys.argv[3:]
        print(json.dumps(_worker_read(rest) if kind == "read" else _worker_stats(*rest)))
    else:
        main()
