"""Sweeps on a local Ray instance (2 CPUs, started here): the same table as in process, a worker killed mid-sweep,
a driver killed and restarted, the SweepPanel's workers option. Skipped when Ray is not installed."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'deltakit[ray]')")

from deltakit.ray_runner import RayRunner, RayWorkerError  # noqa: E402
from deltakit.spec import RunOptions, SweepSpec  # noqa: E402
from deltakit.sweep import sweep  # noqa: E402
from tests.integration.ray_helpers import BASE, FT, WeightEvaluator, killable_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["key", "base", "fine_tune", "method", "label", "params", "rate", "seed", "metric", "value", "status"]


@pytest.fixture(scope="module")
def cluster(tiny_home: Path):
    """A local Ray instance whose workers see the tiny family and can import the test helpers; its GCS address."""
    env = {"DELTAKIT_HOME": str(tiny_home), "PYTHONPATH": str(ROOT), "HF_HOME": os.environ["HF_HOME"]}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _table(df):
    return df[COLUMNS].sort_values(["key", "metric"]).reset_index(drop=True)


def _stored_keys(out: Path) -> collections.Counter:
    return collections.Counter(json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines())


def test_ray_sweep_gives_the_in_process_table(cluster, tiny, tmp_path):
    spec = SweepSpec(BASE, FT, methods=["dare", "magnitude"], rates=[0.5, 0.9], seeds=[0, 1], eval_limit=32)
    local = sweep(spec, RunOptions(out=tmp_path / "local", progress=False))
    seen = []
    remote = sweep(spec, RunOptions(out=tmp_path / "ray", progress=False), runner=RayRunner(workers=2),
                   on_point=seen.append)
    assert set(remote["status"]) == {"ok"}
    assert _table(remote).equals(_table(local))  # same keys, same numbers, same labels
    assert len(seen) == len(spec.points()) == 8  # live rows for every point, as in process
    assert _stored_keys(tmp_path / "ray") == _stored_keys(tmp_path / "local")  # one record per point, driver-written
    assert "2 Ray worker(s)" in remote.attrs["memory"]


def test_a_killed_worker_has_its_point_retried_on_another(cluster, tiny, tmp_path):
    spec = SweepSpec(BASE, FT, methods=["dare"], rates=[0.5, 0.9], seeds=[0, 1])
    marker = tmp_path / "one-worker-died"
    df = sweep(spec, RunOptions(out=tmp_path / "s", progress=False),
               evaluator=WeightEvaluator(dies_at=2, marker=marker), runner=RayRunner(workers=2))
    assert marker.exists()  # a worker process did exit mid-point
    assert set(df["status"]) == {"ok"} and df["key"].nunique() == len(spec.points()) == 6
    assert set(_stored_keys(tmp_path / "s").values()) == {1} and len(_stored_keys(tmp_path / "s")) == 6
    local = sweep(spec, RunOptions(progress=False), evaluator=WeightEvaluator())
    assert _table(df).equals(_table(local))


def test_a_killed_driver_resumes_from_the_store(cluster, tiny, tiny_home, tmp_path):
    out, release = tmp_path / "s", tmp_path / "release"
    env = dict(os.environ, DELTAKIT_HOME=str(tiny_home), PYTHONPATH=str(ROOT))
    driver = subprocess.Popen([sys.executable, "-m", "tests.integration.ray_helpers", cluster, str(out), str(release)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    results = out / "results.jsonl"
    try:  # each of the 2 workers finishes 2 points, then holds: 4 records, whatever the speed
        while driver.poll() is None and not (results.exists() and len(results.read_text().splitlines()) >= 4):
            time.sleep(0.05)
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = results.read_text().splitlines()
    assert len(before) == 4
    df = sweep(killable_spec(), RunOptions(out=out, progress=False), evaluator=WeightEvaluator(),
               runner=RayRunner(workers=1))  # the restarted driver
    total = len(killable_spec().points())
    assert set(df["status"]) == {"ok"} and df["key"].nunique() == total == 10
    assert results.read_text().splitlines()[:4] == before  # nothing lost: the killed driver's records stand
    assert set(_stored_keys(out).values()) == {1} and len(_stored_keys(out)) == total  # nothing duplicated


def test_workers_must_agree_with_the_driver_and_evaluators_must_travel(cluster, tiny, tmp_path):
    import dataclasses

    from deltakit.sources import resolve

    spec = SweepSpec(BASE, FT, methods=["dare"], rates=[0.5], seeds=[0], references=False)
    with pytest.raises(TypeError, match="cannot be sent to Ray workers"):
        sweep(spec, RunOptions(progress=False), evaluator=_Unpicklable(), runner=RayRunner(workers=1))
    # a driver snapshot whose files differ from what the workers load (another member under the same folder name)
    wrong = dataclasses.replace(resolve(FT), path=resolve("family:tiny/polarity").path)
    with pytest.raises(RayWorkerError, match="fine_tune"):
        sweep(dataclasses.replace(spec, fine_tune=wrong), RunOptions(progress=False), evaluator=WeightEvaluator(),
              runner=RayRunner(workers=1))
    with pytest.raises(ValueError, match="tokens are never sent"):
        RayRunner(runtime_env={"env_vars": {"HF_TOKEN": "x"}})
    with pytest.raises(ValueError, match="cuda:N"):
        sweep(spec, RunOptions(device="cuda:1", progress=False), runner=RayRunner())


def test_sweep_panel_runs_on_ray_workers(cluster, tiny, tmp_path):
    pytest.importorskip("ipywidgets")
    from deltakit.widgets.sweep import SweepPanel

    panel = SweepPanel(BASE, FT, methods=["dare"], rates=[0.5], seeds=[0, 1], evaluator=WeightEvaluator(),
                       out=tmp_path / "s", workers=1)
    panel.run(blocking=True)
    assert panel.status.value.startswith("done: 4 new point(s)"), panel.status.value
    assert "1 Ray worker(s)" in panel.memory.value
    assert len(_stored_keys(tmp_path / "s")) == 4 and set(panel.results["status"]) == {"ok"}


class _Unpicklable:
    fingerprint = "unpicklable"

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()

    def __call__(self, model):
        return {"accuracy": 0.0}


def test_cli_sweep_with_ray_workers(cluster, tiny, tmp_path, capsys):
    from deltakit.cli import main

    argv = ["sweep", BASE, FT, "--methods", "dare", "--rates", "0.5", "--seeds", "0", "--limit", "16",
            "--out", str(tmp_path / "s")]
    assert main([*argv, "--workers", "2"]) == 2
    assert "add --ray" in capsys.readouterr().err
    assert main([*argv, "--ray", "--workers", "1"]) == 0  # attaches to this process's Ray instance
    out = capsys.readouterr().out
    assert "accuracy, mean over seeds:" in out and "dare" in out
    assert len(_stored_keys(tmp_path / "s")) == 3 and set(_stored_keys(tmp_path / "s").values()) == {1}
