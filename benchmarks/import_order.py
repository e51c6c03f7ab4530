"""Does deltakit's speed depend on whether torch was imported first? DARE applies, deltakit-first vs torch-first.

deltakit sets ``OMP_WAIT_POLICY=PASSIVE`` when it is imported, which OpenMP honours only if torch has not been
imported yet; otherwise idle OpenMP threads spin and steal the cores from whatever else runs. This script runs the
same sweep-like workload (``--repeats`` fused DARE applies over ``--numel`` fp32 entries at a few rates, the
uniform numbers cached as a sweep does, plus a small matmul "evaluation" after each) in fresh processes that import
deltakit first or torch first, on an idle machine and next to a busy process (one bounded CPU spinner per core,
stopped when the run ends), and prints wall and CPU seconds side by side, then one JSON line of ratios
(torch-first / deltakit-first).

    python benchmarks/import_order.py [--numel 20000000] [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

WORKLOAD = """
import json, sys, time
first = sys.argv[1]
if first == "torch":
    import torch
    import deltakit
else:
    import deltakit
    import torch
from deltakit import masks
from deltakit.kernels import fused_apply

numel, repeats = int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
base = torch.randn(numel // 1024, 1024, generator=g)
ft = base + 1e-3 * torch.randn(base.shape, generator=g)
dst = torch.empty_like(base)
key = masks.tensor_key(0, "w")
u = masks.uniform(key, base.numel())
x = torch.randn(256, 1024, generator=g)
t0, c0 = time.perf_counter(), time.process_time()
for i in range(repeats):
    rate = (0.5, 0.9, 0.99)[i % 3]
    fused_apply(dst, base, ft, key=key, rate=rate, scale=1.0 / (1.0 - rate), u=u, backend="torch")
    (x @ dst[:1024].T).sum()  # a small forward pass between applies, as a sweep evaluates each point
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
"""


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def run(first: str, busy: bool, numel: int, repeats: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    spinners = [multiprocessing.Process(target=_spin, args=(600.0,), daemon=True)
                for _ in range(os.cpu_count() or 1)] if busy else []
    for p in spinners:
        p.start()
    try:
        out = subprocess.run([sys.executable, "-c", WORKLOAD, first, str(numel), str(repeats)], env=env,
                             capture_output=True, text=True, timeout=900, check=True)
    finally:
        for p in spinners:
            p.terminate()
            p.join()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    rows = {}
    print(f"{'machine':8} {'imported first':15} {'wall s':>8} {'cpu s':>8}")
    for busy in (False, True):
        for first in ("deltakit", "torch"):
            r = run(first, busy, args.numel, args.repeats)
            rows[(busy, first)] = r
            print(f"{'busy' if busy else 'idle':8} {first:15} {r['wall_s']:8.2f} {r['cpu_s']:8.2f}", flush=True)
    summary = {}
    for busy in (False, True):
        tag = "busy" if busy else "idle"
        d, t = rows[(busy, "deltakit")], rows[(busy, "torch")]
        summary[f"{tag}_wall_torch_first_over_deltakit_first"] = round(t["wall_s"] / d["wall_s"], 2)
        summary[f"{tag}_cpu_torch_first_over_deltakit_first"] = round(t["cpu_s"] / d["cpu_s"], 2)
    summary.update(numel=args.numel, repeats=args.repeats, cpus=os.cpu_count())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
