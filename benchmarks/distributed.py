"""Benchmark: the same sweep in one process and on a local Ray instance; statistics streamed vs downloaded.

1. **Ray.** A DARE + magnitude sweep of a family member (``--family``, default ``tiny``; rates 0.5 0.9 0.99, seeds
   0 1 2, the references: 14 points; ``--limit`` test examples per point) runs with the in-process runner, then
   with :class:`deltakit.ray_runner.RayRunner` on a local Ray instance with 2 workers, each into its own results
   folder. Timed from the first finished point to the last (loading excluded; printed separately), so the ratio
   measures what Ray adds per point; on a 2-core machine the two workers share the cores, so it measures overhead.
2. **Streaming.** The family's base and first fine-tune are published to a local Hub server (``tests/hubserver.py``,
   which honours ``Range``); in fresh processes with empty ``HF_HOME`` folders, ``delta_stats(..., stream=True)``
   and ``delta_stats(...)`` (download, then statistics) run against it: wall time, requests, bytes left on disk.

Ends with one JSON line: ``ray_vs_single`` (throughput ratio, target >= 0.8), ``overhead_ms_per_point``,
``identical_results`` (both stores hold the same keys and numbers), ``stream_vs_download`` (wall-time ratio) and the
raw figures.

    python benchmarks/distributed.py [--family minilm-tweets] [--limit 200]

Needs the ``ray`` extra. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; tests.hubserver for the local Hub

MEMBERS = {"tiny": ("base", "sentiment3"), "minilm-tweets": ("base", "sentiment3")}


def _sweep(family: str, member: str, limit: int, out: Path, workers: int) -> dict:
    """One sweep; the finish time of every point, the rows, and the load time."""
    from deltakit.spec import RunOptions, SweepSpec
    from deltakit.sweep import sweep

    spec = SweepSpec(f"family:{family}/base", f"family:{family}/{member}", methods=["dare", "magnitude"],
                     rates=[0.5, 0.9, 0.99], seeds=[0, 1, 2], eval_limit=limit)
    runner = None
    if workers:
        from deltakit.ray_runner import RayRunner

        runner = RayRunner(workers=workers, runtime_env={"env_vars": {"DELTAKIT_HOME": os.environ["DELTAKIT_HOME"],
                                                                      "PYTHONPATH": str(ROOT)}})
    finished: list[float] = []
    t0 = time.perf_counter()
    df = sweep(spec, RunOptions(out=out, progress=False), runner=runner,
               on_point=lambda rows: finished.append(time.perf_counter()))
    total = time.perf_counter() - t0
    return {"finished": [t - t0 for t in finished], "total_s": total, "points": len(finished), "rows": df}


def _ray_part(family: str, member: str, limit: int, folder: Path) -> dict:
    import ray

    from deltakit.store import ResultStore

    single = _sweep(family, member, limit, folder / "single", workers=0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        ray_run = _sweep(family, member, limit, folder / "ray", workers=2)
        ray_total = time.perf_counter() - t0
    finally:
        ray.shutdown()

    def span(run: dict) -> float:  # first to last finished point: the points' own time, loading excluded
        f = run["finished"]
        return (f[-1] - f[0]) / (len(f) - 1)

    def table(name: str):
        df = ResultStore(folder / name).frame()
        return sorted(zip(df["key"], df["metric"], df["value"].round(12)))

    per_single, per_ray = span(single), span(ray_run)
    return {"points": single["points"], "single_s_per_point": round(per_single, 4),
            "ray_s_per_point": round(per_ray, 4), "single_first_point_s": round(single["finished"][0], 2),
            "ray_first_point_s": round(ray_run["finished"][0], 2), "single_total_s": round(single["total_s"], 2),
            "ray_total_s": round(ray_total, 2), "ray_vs_single": round(per_single / per_ray, 3),
            "overhead_ms_per_point": round((per_ray - per_single) * 1000, 1),
            "identical_results": table("single") == table("ray")}


_CHILD = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from deltakit.stats import delta_stats
t0 = time.perf_counter()
st = delta_stats(sys.argv[1], [sys.argv[2]], progress=False, stream=sys.argv[3] == "stream")
seconds = time.perf_counter() - t0
home = os.environ["HF_HOME"]
on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(home) for f in fs
              if not os.path.islink(os.path.join(d, f)))
print(json.dumps({{"seconds": seconds, "mean_abs": float(st.overall["mean_abs"].iloc[0]), "bytes_on_disk": on_disk}}))
"""


def _stream_part(family: str, member: str, folder: Path) -> dict:
    from tests.hubserver import LocalHub

    from deltakit.sources import resolve

    folders = {m: resolve(f"family:{family}/{m}").path for m in ("base", member)}  # builds just these two if needed
    hub = LocalHub()
    endpoint = hub.start()
    try:
        repos = {}
        for m in ("base", member):
            repos[m] = f"bench/{family}-{m}"
            hub.upload_folder(repos[m], folders[m])
        out = {}
        for mode in ("download", "stream"):
            home = folder / f"hf-{mode}"
            env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
            before = hub.requests
            proc = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT)), repos["base"], repos[member],
                                   mode], env=env, capture_output=True, text=True, check=True)
            out[mode] = dict(json.loads(proc.stdout.strip().splitlines()[-1]), requests=hub.requests - before)
    finally:
        hub.stop()
    weights = sum(p.stat().st_size for m in ("base", member) for p in folders[m].glob("*.safetensors"))
    return {"family": family, "weights_bytes": weights, **{f"{k}_{f}": v for k, r in out.items() for f, v in r.items()},
            "same_statistics": out["stream"]["mean_abs"] == out["download"]["mean_abs"],
            "stream_vs_download": round(out["stream"]["seconds"] / out["download"]["seconds"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="tiny", choices=list(MEMBERS))
    parser.add_argument("--limit", type=int, default=64, help="test examples per point")
    args = parser.parse_args()
    family, member = args.family, MEMBERS[args.family][1]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DELTAKIT_HOME", str(Path.home() / ".cache" / "deltakit"))
        stream = _stream_part(family, member, Path(tmp))
        print("streaming:", stream)
        ray_figures = _ray_part(family, member, args.limit, Path(tmp))
        print("ray:", ray_figures)
    summary = {"ray_vs_single": ray_figures["ray_vs_single"],
               "overhead_ms_per_point": ray_figures["overhead_ms_per_point"],
               "identical_results": ray_figures["identical_results"],
               "stream_vs_download": stream["stream_vs_download"], "cpus": os.cpu_count(),
               "targets": {"ray_vs_single_min": 0.8, "identical_results": True}, "ray": ray_figures,
               "stream": stream}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
