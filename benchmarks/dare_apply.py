"""Benchmark: rewriting a parameter with DARE, deltakit vs PEFT vs plain torch.bernoulli.

What is timed is one sweep step for one tensor: ``dst <- base + DARE(ft - base)`` with fp32 maths and one cast to the
storage dtype (DARE: Yu et al. 2024, arXiv:2311.03099; drop rate ``rate``, rescale ``1 / (1 - rate)``).

* ``deltakit``: ``deltakit.prune.apply_method(dst, base, ft, method="dare", ...)`` -- counter-based Philox mask
  (bit-identical on CPU and GPU), blocked fused torch path on CPU, the Triton kernel on CUDA.
* ``peft``: PEFT's DARE pruning, ``peft.utils.merge_utils.random_pruning(ft - base, density=1 - rate, rescale=True)``
  then ``base + result`` cast to the storage dtype (PEFT is an optional benchmark-only install: ``pip install peft``).
* ``bernoulli``: a tight plain-torch version (``bernoulli_`` bool mask, ``where``), same maths.

Two cases:

* single-shot: the mask is generated inside the timing (one apply with a fresh seed);
* sweep point: the seed's uniform numbers were computed before (a sweep reuses them for every rate and method):
  deltakit gets ``u=``; PEFT cannot reuse a mask and pays it every time; ``torch_cached_u`` is plain torch with a
  cached ``torch.rand`` tensor, for reference.

Reported: seconds (best of the repeats, implementations interleaved round by round so machine load hits all alike),
GB/s counting the bytes of base and ft read and dst written (3 x numel x element size), and ratios PEFT time /
deltakit time (> 1: deltakit faster). On CUDA also the Triton path, the fraction of the device's peak memory
bandwidth, and a Llama-2-7B-sized set of tensors. The last line printed is a JSON summary; ratios are taken at
1e7 elements, fp32.

Usage: ``python benchmarks/dare_apply.py [--sizes 1e5 1e6 1e7 1e8] [--repeats 3] [--skip-7b]``. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deltakit import masks  # noqa: E402
from deltakit.prune import apply_method  # noqa: E402

try:
    from peft.utils.merge_utils import random_pruning
except ImportError:  # benchmark-only dependency
    random_pruning = None

RATE = 0.5
SEED = 0
NAME = "model.layers.0.mlp.down_proj.weight"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Peak HBM bandwidth in bytes/s, matched against torch.cuda.get_device_name() in this order (first match wins).
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM, reported as "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB parts
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
    ("L4", 0.3e12),
]

# Llama-2-7B: 32 layers of (q, k, v, o: 4096x4096; gate, up: 11008x4096; down: 4096x11008; 2 RMSNorms), plus
# embeddings, final norm and lm_head (32000x4096): 6.74e9 parameters.
LLAMA7B = (
    [((4096, 4096), 4), ((11008, 4096), 2), ((4096, 11008), 1), ((4096,), 2)],
    32,
    [((32000, 4096), 2), ((4096,), 1)],
)


# ---------------------------------------------------------------------------------------------------------------
# The implementations (each rewrites dst from base and ft)
# ---------------------------------------------------------------------------------------------------------------


def deltakit_apply(dst, base, ft, *, seed, u=None, backend="auto", allow_nonfinite=False):
    apply_method(dst, base, ft, method="dare", rate=RATE, seed=seed, name=NAME, backend=backend, u=u,
                 allow_nonfinite=allow_nonfinite)


def peft_apply(dst, base, ft, *, seed):
    torch.manual_seed(seed)
    delta = ft.float() - base.float()
    pruned = random_pruning(delta, density=1.0 - RATE, rescale=True)
    dst.copy_(base.float() + pruned)


def bernoulli_apply(dst, base, ft, *, seed):
    torch.manual_seed(seed)
    base32, ft32 = base.float(), ft.float()
    keep = torch.empty(base.shape, dtype=torch.bool, device=base.device).bernoulli_(1.0 - RATE)
    d = ft32 - base32
    d.mul_(1.0 / (1.0 - RATE))
    d.add_(base32)
    dst.copy_(torch.where(keep, d, base32))


def torch_cached_u_apply(dst, base, ft, *, u):
    base32, ft32 = base.float(), ft.float()
    d = ft32 - base32
    d.mul_(1.0 / (1.0 - RATE))
    d.add_(base32)
    dst.copy_(torch.where(u >= RATE, d, base32))


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(candidates: dict[str, Callable[[int], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best time of each candidate; one warm-up, then rounds in which every candidate runs once (interleaved)."""
    for fn in candidates.values():
        fn(-1)
    sync(device)
    best = {k: math.inf for k in candidates}
    for r in range(repeats):
        for key, fn in candidates.items():
            sync(device)
            t0 = time.perf_counter()
            fn(r)
            sync(device)
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def make_pair(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(n, generator=g, device=device, dtype=torch.float32).mul_(0.02)
    ft = base + torch.randn(n, generator=g, device=device, dtype=torch.float32).mul_(4e-4)
    return base.to(dtype), ft.to(dtype)


def bench_size(n: int, dtype_name: str, repeats: int, device: torch.device) -> dict:
    dtype = DTYPES[dtype_name]
    base, ft = make_pair(n, dtype, device)
    dst = torch.empty_like(base)
    nbytes = 3 * n * base.element_size()
    key = masks.tensor_key(SEED, NAME)

    single: dict[str, Callable[[int], None]] = {}
    backends = ["triton", "torch"] if device.type == "cuda" else ["torch"]
    for be in backends:
        single[f"deltakit_{be}"] = lambda r, be=be: deltakit_apply(dst, base, ft, seed=SEED + 1 + r, backend=be)
        # Without the NaN/Inf check (two reductions over base and ft): what a sweep that checked once pays.
        single[f"deltakit_{be}_nocheck"] = lambda r, be=be: deltakit_apply(
            dst, base, ft, seed=SEED + 1 + r, backend=be, allow_nonfinite=True)
    if random_pruning is not None:
        single["peft"] = lambda r: peft_apply(dst, base, ft, seed=SEED + 1 + r)
    single["bernoulli"] = lambda r: bernoulli_apply(dst, base, ft, seed=SEED + 1 + r)
    t_single = race(single, repeats, device)

    t_sweep: dict[str, float] = {}
    if device.type == "cpu":  # the Triton kernel makes its numbers in registers: no cached case on CUDA
        u = masks.uniform(key, n)  # the seed's numbers, made once per sweep
        u_torch = torch.rand(n, generator=torch.Generator().manual_seed(SEED))
        sweep = {"deltakit_torch": lambda r: deltakit_apply(dst, base, ft, seed=SEED, u=u, backend="torch")}
        if random_pruning is not None:
            sweep["peft"] = lambda r: peft_apply(dst, base, ft, seed=SEED + 1 + r)
        sweep["torch_cached_u"] = lambda r: torch_cached_u_apply(dst, base, ft, u=u_torch)
        t_sweep = race(sweep, repeats, device)
        del u, u_torch

    def rows(case: str, times: dict[str, float]) -> list[dict]:
        out = []
        for impl, sec in times.items():
            out.append({"device": device.type, "dtype": dtype_name, "n": n, "case": case, "impl": impl,
                        "seconds": sec, "gb_per_s": nbytes / sec / 1e9})
        return out

    return {"rows": rows("single", t_single) + rows("sweep_point", t_sweep), "single": t_single, "sweep": t_sweep}


def bench_llama7b(device: torch.device, peak: float | None) -> dict:
    """Time DARE over every tensor of a Llama-2-7B-sized bf16 model on the GPU (sum over its tensors)."""
    per_layer, n_layers, extra = LLAMA7B
    shapes = [s for s, k in per_layer for _ in range(k)] * n_layers + [s for s, k in extra for _ in range(k)]
    n_params = sum(math.prod(s) for s in shapes)
    # Distinct shapes only, timed once each and weighted by their count: the model's 40 GB of base+ft+dst need not
    # be resident at once, and the time of a pass over the model is the sum over its tensors anyway.
    counts: dict[tuple[int, ...], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    total = {"deltakit_triton": 0.0, "deltakit_triton_nocheck": 0.0, "peft": 0.0}
    for shape, count in counts.items():
        for k, v in _time_shape(shape, device).items():
            total[k] += v * count
        torch.cuda.empty_cache()
    nbytes = 3 * n_params * 2
    dk, dk_nocheck = total["deltakit_triton"], total["deltakit_triton_nocheck"]
    out = {"n_params": n_params, "deltakit_triton_s": dk, "deltakit_gb_per_s": nbytes / dk / 1e9,
           "fraction_of_peak": (nbytes / dk / peak) if peak else None,
           "deltakit_triton_nocheck_s": dk_nocheck,
           "fraction_of_peak_nocheck": (nbytes / dk_nocheck / peak) if peak else None}
    if random_pruning is not None:
        out.update({"peft_s": total["peft"], "vs_peft": total["peft"] / dk})
    return out


def _time_shape(shape: tuple[int, ...], device: torch.device) -> dict[str, float]:
    base, ft = make_pair(math.prod(shape), torch.bfloat16, device)
    base, ft = base.view(shape), ft.view(shape)
    dst = torch.empty_like(base)
    cands = {
        "deltakit_triton": lambda r: deltakit_apply(dst, base, ft, seed=SEED + 1 + r, backend="triton"),
        "deltakit_triton_nocheck": lambda r: deltakit_apply(dst, base, ft, seed=SEED + 1 + r, backend="triton",
                                                            allow_nonfinite=True),
    }
    if random_pruning is not None:
        cands["peft"] = lambda r: peft_apply(dst, base, ft, seed=SEED + 1 + r)
    return race(cands, 3, device)


def peak_bandwidth(device_name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH:
        if key in device_name:
            return value
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per size (best is kept)")
    parser.add_argument("--skip-7b", action="store_true", help="skip the Llama-2-7B-sized set on CUDA")
    parser.add_argument("--json-out", type=Path, help="also write all rows and the summary to this file")
    args = parser.parse_args()

    if random_pruning is None:
        print("peft is not installed: the PEFT columns are skipped and its ratios are null "
              "(pip install peft to compare; it is a benchmark-only dependency)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, rate {RATE}")
    sizes = [int(s) for s in args.sizes]
    all_rows: list[dict] = []
    at_1e7: dict[str, dict] = {}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    gpu_name, peak = None, None
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name()
        peak = peak_bandwidth(gpu_name)
        print(f"GPU {gpu_name}, peak bandwidth {peak / 1e12 if peak else 'unknown'} TB/s")

    print(f"{'device':6} {'dtype':5} {'n':>9} {'case':11} {'impl':24} {'seconds':>9} {'GB/s':>8}")
    for device in devices:
        for n in sizes:
            for dtype_name in DTYPES:
                # Small sizes are cheap and noisy (scheduler), large ones slow: scale the rounds.
                repeats = args.repeats * 5 if n <= 10**6 else max(1, args.repeats - 1) if n >= 10**8 else args.repeats
                res = bench_size(n, dtype_name, repeats, device)
                for row in res["rows"]:
                    print(f"{row['device']:6} {row['dtype']:5} {row['n']:>9.0e} {row['case']:11} {row['impl']:24} "
                          f"{row['seconds']:>9.4f} {row['gb_per_s']:>8.2f}")
                    if peak and device.type == "cuda":
                        row["fraction_of_peak"] = row["gb_per_s"] * 1e9 / peak
                all_rows.extend(res["rows"])
                if n == 10**7 and dtype_name == "fp32":
                    at_1e7[device.type] = res

    def ratio(times: dict[str, float], num: str, den: str) -> float | None:
        return round(times[num] / times[den], 3) if num in times and den in times else None

    cpu = at_1e7.get("cpu", {"single": {}, "sweep": {}})
    summary: dict[str, object] = {
        "cpu_single_vs_peft": ratio(cpu["single"], "peft", "deltakit_torch"),
        "cpu_sweep_point_vs_peft": ratio(cpu["sweep"], "peft", "deltakit_torch"),
        "cpu_single_vs_peft_nocheck": ratio(cpu["single"], "peft", "deltakit_torch_nocheck"),
        "cpu_single_vs_bernoulli": ratio(cpu["single"], "bernoulli", "deltakit_torch"),
        "cpu_sweep_point_vs_torch_cached_u": ratio(cpu["sweep"], "torch_cached_u", "deltakit_torch"),
        "gpu_fraction_of_peak": None,
        "gpu_fraction_of_peak_nocheck": None,
        "gpu_vs_peft": None,
        "gpu": gpu_name,
        "cpu_threads": torch.get_num_threads(),
        "peft_installed": random_pruning is not None,
    }
    gpu = at_1e7.get("cuda")
    if gpu:
        dk = gpu["single"]["deltakit_triton"]
        if peak:
            summary["gpu_fraction_of_peak"] = round(3 * 10**7 * 4 / dk / peak, 3)
            summary["gpu_fraction_of_peak_nocheck"] = round(
                3 * 10**7 * 4 / gpu["single"]["deltakit_triton_nocheck"] / peak, 3)
        summary["gpu_vs_peft"] = ratio(gpu["single"], "peft", "deltakit_triton")
        if not args.skip_7b:
            llama = bench_llama7b(torch.device("cuda"), peak)
            print(f"Llama-2-7B-sized set ({llama['n_params'] / 1e9:.2f}e9 params, bf16): {llama}")
            summary["gpu_7b"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in llama.items()}
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": all_rows, "summary": summary}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
