"""Ray is an optional extra: with it blocked, the library, the CLI and the sweep widget import and sweep in process,
and asking for Ray workers says how to install it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
sys.modules["ray"] = None  # `import ray` now raises ImportError, as on an install without the extra
import deltakit.sweep, deltakit.cli, deltakit.ray_runner
from deltakit.spec import RunOptions, SweepSpec
from deltakit.sweep import sweep
from tests.integration.ray_helpers import BASE, FT, WeightEvaluator

df = sweep(SweepSpec(BASE, FT, methods=["dare"], rates=[0.5], seeds=[0]), RunOptions(progress=False),
           evaluator=WeightEvaluator())
print("in process:", sorted(set(df["status"])), df["key"].nunique())
code = deltakit.cli.main(["sweep", BASE, FT, "--methods", "dare", "--rates", "0.5", "--ray", "--out", sys.argv[1]])
print("cli --ray exit:", code)
try:
    from deltakit.widgets.sweep import SweepPanel
except ImportError:
    print("panel: no ipywidgets")
else:
    panel = SweepPanel(BASE, FT, methods=["dare"], rates=[0.5], seeds=[0], evaluator=WeightEvaluator(), workers=2)
    panel.run(blocking=True)
    print("panel:", panel.status.value)
print("ray imported:", sys.modules.get("ray") is not None)
"""


def test_without_ray_everything_imports_and_workers_say_how_to_install(tiny_home, tmp_path):
    env = dict(os.environ, DELTAKIT_HOME=str(tiny_home), PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "s")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "in process: ['ok'] 3" in run.stdout
    assert "cli --ray exit: 2" in run.stdout
    assert "pip install 'deltakit[ray]'" in run.stderr  # the CLI's one-line error names the fix
    assert "ray imported: False" in run.stdout
    if "panel: no ipywidgets" not in run.stdout:
        assert "panel: not started: " in run.stdout and "pip install 'deltakit[ray]'" in run.stdout
    assert not (tmp_path / "s" / "results.jsonl").exists()  # refused before any point ran
