"""benchmarks/gpu_check.sh, the one script a session runs on a lent GPU: its dry run works without one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_collects_the_gpu_tests():
    report = ROOT / "reports" / "gpu.md"
    before = report.stat().st_mtime_ns if report.exists() else None
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    collected = re.search(r"(\d+)/\d+ tests collected", run.stdout)
    assert collected and int(collected.group(1)) > 0  # the gpu-marked kernel tests exist and import
    assert "test_merge_kernels.py" in run.stdout and "benchmarks/dare_apply.py parses" in run.stdout
    # The end-to-end part ran on the CPU: the sweep twice, the same numbers, the toy synthetic pair through stats.
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["parity"]["weights_equal"] and summary["parity"]["rows"] > 0
    assert summary["scale"]["size"] == "tiny" and summary["scale"]["params"] > 0
    assert (report.stat().st_mtime_ns if report.exists() else None) == before  # a dry run writes no report
