#!/usr/bin/env bash
# The GPU check: what a session runs, in one go, on a lent CUDA machine.
#
#   bash benchmarks/gpu_check.sh             on the device: run the checks, write reports/gpu.md ($OUT/gpu.md too)
#   bash benchmarks/gpu_check.sh --dry-run   anywhere, no GPU: collect the gpu tests and check the scripts parse
#
# Steps: (1) the device and the software (nvidia-smi, torch, triton, CUDA); (2) the gpu-marked tests: every Triton
# kernel (DARE apply, statistics, merge) against its torch reference on CUDA tensors, bit for bit, with the repo's
# nbval options switched off (the device image has no nbval); (3) benchmarks/dare_apply.py on CPU and CUDA (GB/s and
# the fraction of the device's peak bandwidth, side by side with PEFT's eager pruning). deltakit runs from this
# source tree (PYTHONPATH=.): nothing is installed, so the device image's own python3 (with torch, triton,
# transformers, safetensors, peft and pytest) is all it needs. The exit status is the tests' (non-zero if one fails).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
tests=(-o addopts= -p no:cacheprovider -m gpu -q -rs tests/unit)

if (( dry )); then
  echo "== dry run: the gpu tests the check runs (collected, not run)"
  "$py" -m pytest "${tests[@]}" --collect-only || exit 1
  for script in benchmarks/dare_apply.py benchmarks/merge.py; do
    "$py" -c "import ast, sys; ast.parse(open(sys.argv[1]).read())" "$script" || exit 1
    echo "$script parses"
  done
  exit 0
fi

logs=$(mktemp -d)
echo "== device"
device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)
software=$("$py" -c 'import torch, triton; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\"}")' 2>&1)
echo "$device"; echo "$software"

echo "== gpu tests"
"$py" -m pytest "${tests[@]}" 2>&1 | tee "$logs/tests.txt"
tests_status=${PIPESTATUS[0]}

echo "== DARE apply benchmark"
"$py" benchmarks/dare_apply.py 2>&1 | tee "$logs/dare_apply.txt"
bench_status=${PIPESTATUS[0]}

mkdir -p reports
{
  echo "# GPU check"
  echo
  echo "Run by \`bash benchmarks/gpu_check.sh\` on $(date -u +%F) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
  echo "- Device: $device"
  echo "- Software: $software"
  echo "- gpu tests: exit status $tests_status; DARE apply benchmark: exit status $bench_status"
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
} > reports/gpu.md
[[ -n "${OUT:-}" ]] && cp reports/gpu.md "$OUT/gpu.md"
echo "wrote reports/gpu.md"
exit "$tests_status"
