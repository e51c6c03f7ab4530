"""deltakit sets OMP_WAIT_POLICY=PASSIVE, which OpenMP honours only if torch is not imported yet: when it comes too
late, deltakit says so once, with what to do (benchmarks/import_order.py measures what it costs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("code, env, warned", [
    ("import torch, deltakit", {}, True),
    ("import deltakit, torch, os; assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'", {}, False),
    ("import torch, deltakit", {"OMP_WAIT_POLICY": "PASSIVE"}, False),
], ids=["torch-first", "deltakit-first", "policy-set-by-the-user"])
def test_a_late_import_is_reported_once_with_the_fix(code, env, warned):
    done = _imports(code, **env)
    assert done.returncode == 0, done.stderr
    assert ("OMP_WAIT_POLICY=PASSIVE" in done.stderr) == warned, done.stderr
    if warned:
        assert done.stderr.count("torch was imported before deltakit") == 1 and "import deltakit before" in done.stderr
