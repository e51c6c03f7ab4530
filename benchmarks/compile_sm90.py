"""Compile every deltakit Triton kernel for an H100 (sm_90) on a machine without a GPU.

The Triton interpreter (used by the unit tests) runs kernels as NumPy code and never meets the GPU compiler, so a
kernel can pass every interpreter test and still fail to compile. This script builds PTX and a cubin for each
kernel variant with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (the triton wheel ships
ptxas), the same launch options as the library (fp fusion disabled), and checks that the PTX of the fused apply and
the fused merge has no fused multiply-add and no approximate fp32 division (the bit-for-bit parity with the torch
references depends on both).

Usage::

    python benchmarks/compile_sm90.py

Prints one line per kernel variant and a summary; exits 1 if any variant fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The GPU compiler path must be active: set before triton is imported anywhere.
os.environ.pop("TRITON_INTERPRET", None)
_CACHE = tempfile.mkdtemp(prefix="deltakit-sm90-")
os.environ["TRITON_CACHE_DIR"] = _CACHE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deltakit.kernels import apply as apply_mod  # noqa: E402
from deltakit.kernels import merge_triton as merge_mod  # noqa: E402
from deltakit.kernels import stats as stats_mod  # noqa: E402
from deltakit.kernels import triton_apply, triton_merge, triton_stats  # noqa: E402
from deltakit.partials import BINS_PER_DECADE, HIST_LOG10_LO, N_BINS  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = ("fp32", "fp16", "bf16")
_FMA = re.compile(r"\bfma\.rn\.f32\b")
# `/` on fp32 lowers to div.full.f32 (about 2 ulp); exact kernels must use tl.div_rn (div.rn.f32).
_APPROX_DIV = re.compile(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b")
# Fused-merge variants: (K, dtype, combine, random, window, type of n_elements). K = 3 covers every combination of
# the flags per dtype; K = 1 and K = 8 (the unroll limit) the extremes of the loop over fine-tunes.
_MERGE_VARIANTS = [(3, dt, combine, random, window, "i64") for dt in DTYPES for combine in (0, 1)
                   for random, window in ((False, False), (True, False), (False, True))]
_MERGE_VARIANTS += [(1, "fp32", 0, True, False, "i32"), (8, "bf16", 1, True, True, "i32"),
                    (8, "fp16", 0, True, True, "i64")]


def _variants() -> list[tuple[str, object, dict, dict, dict, bool]]:
    """(label, jit function, signature, constexprs, options, exact) for every variant the library launches.

    ``exact``: the PTX must hold no fp32 FMA and no approximate fp32 division.

    Block sizes and warp counts are the library's own CUDA defaults, so this compiles what a GPU would run.
    """
    apply_opts = {"num_warps": apply_mod._CUDA_WARPS, "enable_fp_fusion": False}
    stats_opts = {"num_warps": stats_mod._CUDA_WARPS, "enable_fp_fusion": False}
    out: list[tuple[str, object, dict, dict, dict, bool]] = []
    for dt in DTYPES:
        for axis, axis_name in enumerate(apply_mod.AXES):
            for per_row in (False, True):
                sig = {
                    "dst_ptr": f"*{dt}",
                    "base_ptr": f"*{dt}",
                    "ft_ptr": f"*{dt}",
                    "scale_ptr": "*fp32",
                    "n_elements": "i64",
                    "n_cols": "i64",
                    "key": "i64",
                    "rate": "fp32",
                    "scale": "fp32",
                    "AXIS": "constexpr",
                    "PER_ROW_SCALE": "constexpr",
                    "ROUND_BF16": "constexpr",
                    "BLOCK_SIZE": "constexpr",
                }
                const = {"AXIS": axis, "PER_ROW_SCALE": per_row, "ROUND_BF16": dt == "bf16",
                         "BLOCK_SIZE": apply_mod._CUDA_BLOCK}
                label = f"fused_apply[{dt}, axis={axis_name}, scale={'per-row' if per_row else 'scalar'}]"
                out.append((label, triton_apply.fused_apply_kernel, sig, const, apply_opts, True))
    for aligned in (True, False):
        sig = {"out_ptr": "*fp32", "n": "i64", "key": "i64", "offset": "i64", "ALIGNED": "constexpr",
               "BLOCK_SIZE": "constexpr"}
        out.append((f"uniform[aligned={aligned}]", triton_apply.uniform_kernel, sig,
                    {"ALIGNED": aligned, "BLOCK_SIZE": apply_mod._CUDA_BLOCK}, apply_opts, True))
    merge_opts = {"num_warps": merge_mod.CUDA_WARPS, "enable_fp_fusion": False}
    for k, dt, combine, random, window, n_type in _MERGE_VARIANTS:
        sig = {
            "dst_ptr": f"*{dt}",
            "base_ptr": f"*{dt}",
            "fts_ptr": f"*{dt}",
            "keys_ptr": "*i64",
            "scales_ptr": "*fp32",
            "lo_ptr": "*fp32",
            "hi_ptr": "*fp32",
            "n_elements": n_type,
            "rate": "fp32",
            "lam": "fp32",
            "K": "constexpr",
            "COMBINE": "constexpr",
            "RANDOM": "constexpr",
            "WINDOW": "constexpr",
            "ROUND_BF16": "constexpr",
            "BLOCK_SIZE": "constexpr",
        }
        const = {"K": k, "COMBINE": combine, "RANDOM": random, "WINDOW": window, "ROUND_BF16": dt == "bf16",
                 "BLOCK_SIZE": merge_mod.CUDA_BLOCK}
        label = (f"fused_merge[{dt}, K={k}, {('sum', 'ties')[combine]}, random={int(random)}, "
                 f"window={int(window)}, n {n_type}]")
        out.append((label, triton_merge.fused_merge_kernel, sig, const, merge_opts, True))
    hist_bins = 1 << (N_BINS - 1).bit_length()
    for dt in DTYPES:
        sig = {
            "sums_ptr": "*fp64",
            "counts_ptr": "*i64",
            "hist_ptr": "*i32",
            "base_ptr": f"*{dt}",
            "ft_ptr": f"*{dt}",
            "n_elements": "i64",
            "n_tiles": "i32",
            "t0": "fp32",
            "t1": "fp32",
            "t2": "fp32",
            "t3": "fp32",
            "HIST_LO": "constexpr",
            "BINS_PER_DECADE": "constexpr",
            "N_BINS": "constexpr",
            "HIST_BINS": "constexpr",
            "BLOCK_SIZE": "constexpr",
        }
        const = {"HIST_LO": float(HIST_LOG10_LO), "BINS_PER_DECADE": float(BINS_PER_DECADE), "N_BINS": N_BINS,
                 "HIST_BINS": hist_bins, "BLOCK_SIZE": stats_mod._CUDA_BLOCK}
        out.append((f"delta_stats[{dt}]", triton_stats.delta_stats_kernel, sig, const, stats_opts, False))
    return out


def _registers(cubin: bytes) -> str:
    """Registers/spills from cuobjdump (bundled with the triton wheel), or '?' if it is not available."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return "regs ?"
    with tempfile.NamedTemporaryFile(suffix=".cubin", dir=_CACHE, delete=False) as f:
        f.write(cubin)
    res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=False)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", res.stdout)
    return f"regs {m.group(1)} stack {m.group(2)}" if m else "regs ?"


def main() -> int:
    print(f"triton {triton.__version__}, target {TARGET}, enable_fp_fusion=False")
    failures = 0
    variants = _variants()
    t_all = time.perf_counter()
    for label, fn, sig, const, options, exact in variants:
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=TARGET,
                                      options=options)
            ptx = compiled.asm["ptx"]
            cubin = compiled.asm["cubin"]
            n_fma = len(_FMA.findall(ptx))
            if exact and n_fma:
                raise RuntimeError(f"{n_fma} fp32 FMA in the PTX although fp fusion is disabled")
            n_div = len(_APPROX_DIV.findall(ptx))
            if exact and n_div:
                raise RuntimeError(f"{n_div} approximate fp32 divisions in the PTX (use tl.div_rn)")
            print(f"OK   {label:<66} {time.perf_counter() - t0:5.2f}s  warps {options['num_warps']}  ptx {len(ptx) // 1024:4d} KiB  "
                  f"cubin {len(cubin) // 1024:4d} KiB  shared {compiled.metadata.shared:6d} B  "
                  f"{_registers(cubin)}  fp32-fma {n_fma}")
        except Exception as exc:  # report every failure, then exit non-zero
            failures += 1
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"FAIL {label:<66} {type(exc).__name__}: {first}")
    total = time.perf_counter() - t_all
    print(f"summary: {len(variants) - failures}/{len(variants)} kernel variants compiled for sm_90 in {total:.1f}s, "
          f"{failures} failed")
    shutil.rmtree(_CACHE, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
