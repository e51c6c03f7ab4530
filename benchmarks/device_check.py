"""The GPU check's end-to-end part: the same sweep on CPU and on the device must give the same numbers, and a
1.5B-parameter Llama pair must go through statistics and a DARE sweep's preparation on the device.

1. **Parity.** A sweep on the ``tiny`` family (DARE, DAREx-q with a fixed q, magnitude; two rates, two seeds) runs
   once with ``device="cpu"`` and once with ``--device`` (the Triton kernels there). Masks are a function of
   (seed, tensor, element) and the kernels round like the torch reference, so the pruned weights are bit-identical;
   the metrics may differ only where the device's matmuls round differently and flip a prediction, which the
   report counts (``max_abs_metric_diff``, ``weights_equal``).
2. **Scale.** The synthetic Llama pair of :mod:`deltakit.testing` (``1.5b``: 1.5e9 parameters, bf16, sharded) is
   written if missing, then ``deltakit.stats.delta_stats`` runs on the device, then a DARE sweep's preparation:
   the fine-tune loaded onto the device with its base beside it (:class:`deltakit.resident.ResidentModel`) and one
   DARE point applied. Reported: seconds, parameters per second, peak device memory.
3. **Host-streamed tier.** The 7B-shaped pair (``--host-tier-size``) with the model on the device and base and
   fine-tune in pinned host memory (:mod:`deltakit.memory`, tier ``host``): seconds per DARE point (two seeds) and
   the host-to-device bandwidth achieved (base + fine-tune bytes of the prunable tensors per point) next to a plain
   pinned 256 MiB copy's, the link's practical peak.

Prints a table-like log and ends with one JSON line (also written to ``--json-out``). ``--dry-run`` runs both
parts on the CPU at toy size (``--device cpu``, the ``tiny`` synthetic shape): it proves the script, not the GPU.

Usage: ``python benchmarks/device_check.py [--device cuda] [--size 1.5b] [--json-out FILE] [--dry-run]``.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import deltakit  # noqa: E402,F401  (before torch: sets the OpenMP wait policy)
import torch  # noqa: E402


def parity(device: str, home: Path) -> dict:
    """The tiny family's sweep on CPU and on ``device``: pruned weights and metrics side by side."""
    from deltakit.families import build_family
    from deltakit.resident import ResidentModel
    from deltakit.sources import resolve
    from deltakit.spec import RunOptions, SweepSpec
    from deltakit.sweep import sweep

    os.environ["DELTAKIT_HOME"] = str(home)
    build_family("tiny", members=["sentiment3"], progress=False)
    base, ft = resolve("family:tiny/base"), resolve("family:tiny/sentiment3")
    spec = SweepSpec(base, ft, methods=["dare", "darex_q:q=0.3", "magnitude"], rates=[0.7, 0.9], seeds=[0, 1],
                     eval_limit=200)
    frames = {}
    for dev in ("cpu", device):
        start = time.perf_counter()
        frames[dev] = sweep(spec, RunOptions(device=dev, progress=False)).set_index(["label", "rate", "seed",
                                                                                      "metric"])["value"]
        print(f"sweep on {dev}: {time.perf_counter() - start:.1f} s, {len(frames[dev])} rows")
    diff = (frames["cpu"] - frames[device].reindex(frames["cpu"].index)).abs()
    # The pruned weights themselves, tensor by tensor: bit-identical is the contract.
    cpu_rm, dev_rm = ResidentModel(base, ft, device="cpu"), ResidentModel(base, ft, device=device)
    equal = True
    for rm in (cpu_rm, dev_rm):
        rm.apply("dare", rate=0.9, seed=1)
    for a, b in zip(cpu_rm.targets, dev_rm.targets):
        equal &= torch.equal(a.param.detach(), b.param.detach().cpu())
    return {"rows": int(len(diff)), "max_abs_metric_diff": float(diff.max()), "metric_rows_differing":
            int((diff > 0).sum()), "weights_equal": bool(equal), "device": device}


def scale(device: str, size: str, folder: Path) -> dict:
    """Statistics and a DARE sweep's preparation on the synthetic pair of ``size``, on ``device``."""
    from deltakit.resident import ResidentModel
    from deltakit.sources import resolve
    from deltakit.stats import delta_stats
    from deltakit.testing import write_synthetic_family

    start = time.perf_counter()
    paths = write_synthetic_family(folder, size, finetunes=1)
    written = time.perf_counter() - start
    base, ft = resolve(str(paths["base"])), resolve(str(paths["ft0"]))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    stats = delta_stats(base, [ft], device=device, progress=False)
    stats_s = time.perf_counter() - start
    params = int(stats.overall["numel"].iloc[0]) if "numel" in stats.overall else None
    start = time.perf_counter()
    rm = ResidentModel(base, ft, device=device, preset="mergelm_decoder")
    load_s = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    rm.apply("dare", rate=0.9, seed=0)
    if cuda:
        torch.cuda.synchronize()
    apply_s = time.perf_counter() - start
    pruned = sum(t.param.numel() for t in rm.targets)
    out = {"size": size, "params": params, "write_s": round(written, 2), "stats_s": round(stats_s, 2),
           "stats_gparams_per_s": round(params / stats_s / 1e9, 3) if params else None,
           "resident_load_s": round(load_s, 2), "dare_apply_s": round(apply_s, 4), "pruned_params": pruned,
           "dare_gparams_per_s": round(pruned / apply_s / 1e9, 3)}
    if cuda:
        out["peak_device_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def host_tier(device: str, size: str, folder: Path) -> dict:
    """The host-streamed memory tier on the synthetic pair of ``size`` (7B-shaped by default), model on ``device``:
    seconds per DARE point, and the host-to-device bandwidth it achieved next to a plain pinned copy's."""
    from deltakit.resident import ResidentModel
    from deltakit.sources import resolve
    from deltakit.testing import write_synthetic_family

    paths = write_synthetic_family(folder, size, finetunes=1)
    base, ft = resolve(str(paths["base"])), resolve(str(paths["ft0"]))
    cuda = torch.device(device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    block = torch.empty(2**28 if cuda else 2**22, dtype=torch.uint8)  # 256 MiB (toy size on CPU)
    block = block.pin_memory() if cuda else block
    dst = torch.empty_like(block, device=device)
    dst.copy_(block, non_blocking=True)
    sync()
    start = time.perf_counter()
    for _ in range(8):
        dst.copy_(block, non_blocking=True)
    sync()
    link_gbps = 8 * block.numel() / (time.perf_counter() - start) / 1e9
    del dst
    start = time.perf_counter()
    rm = ResidentModel(base, ft, device=device, tier="host", preset="darex_decoder")
    load_s = time.perf_counter() - start
    moved = sum(2 * t.param.numel() * t.param.element_size() for t in rm.targets)  # base + fine-tune per point
    seconds = []
    for seed in (0, 1):
        sync()
        start = time.perf_counter()
        rm.apply("dare", rate=0.9, seed=seed)
        sync()
        seconds.append(time.perf_counter() - start)
    out = {"size": size, "tier": rm.tier, "plan": rm.memory.describe(), "load_s": round(load_s, 2),
           "seconds_per_point": [round(x, 3) for x in seconds], "bytes_per_point_gb": round(moved / 1e9, 2),
           "achieved_h2d_gbps": round(moved / min(seconds) / 1e9, 2), "pinned_copy_gbps": round(link_gbps, 2)}
    out["fraction_of_link"] = round(out["achieved_h2d_gbps"] / out["pinned_copy_gbps"], 3)
    if cuda:
        out["peak_device_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1.5b", help="synthetic pair for the scale part (deltakit.testing.SHAPES)")
    parser.add_argument("--host-tier-size", default="7b", help="synthetic pair for the host-streamed tier part")
    parser.add_argument("--folder", type=Path, help="where the synthetic pair lives (default: a temporary folder)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy size: checks the script, not the GPU")
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.size, args.host_tier_size = "cpu", "tiny", "tiny"
    elif torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"device {args.device!r}: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(os.environ.get("DELTAKIT_HOME") or Path(tmp) / "home")
        summary = {"parity": parity(args.device, home)}
        print("parity:", summary["parity"])
        summary["scale"] = scale(args.device, args.size, args.folder or Path(tmp) / "synthetic")
        print("scale:", summary["scale"])
        summary["host_tier"] = host_tier(args.device, args.host_tier_size, args.folder or Path(tmp) / "synthetic")
        print("host tier:", summary["host_tier"])
    summary["ok"] = summary["parity"]["weights_equal"] and math.isfinite(summary["parity"]["max_abs_metric_diff"])
    line = json.dumps(summary)
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
