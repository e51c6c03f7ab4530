"""Sweeps on the tiny family: tidy rows, references, resumability, cancellation, failures, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from deltakit.resident import ResidentModel
from deltakit.spec import MethodSpec, RunOptions, SweepSpec, normalise_rates
from deltakit.store import ResultStore
from deltakit.sweep import sweep

BASE, FT = "family:tiny/base", "family:tiny/sentiment3"


class CountingEvaluator:
    """A cheap evaluator: the mean |weight| of the prunable model (changes with every rewrite)."""

    fingerprint = "counting-v1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        w = model.bert.encoder.layer[0].attention.self.query.weight
        return {"accuracy": float(w.detach().abs().mean()), "other": 1.0}


def test_sweep_rows_are_tidy_and_references_present(tiny, tmp_path):
    df = sweep(SweepSpec(BASE, FT, methods=['dare', 'magnitude'], rates=[0.9, 0.5, 0.5], seeds=[0, 1], eval_limit=64), RunOptions(out=tmp_path / 's', progress=False))
    assert set(df["status"]) == {"ok"}
    acc = df[df["metric"] == "accuracy"]
    assert sorted(acc["rate"].unique()) == [0.0, 0.5, 0.9, 1.0]  # sorted, de-duplicated, references at 0 and 1
    assert len(acc[acc["method"] == "dare"]) == 4  # 2 rates x 2 seeds
    assert len(acc[acc["method"] == "magnitude"]) == 2  # deterministic: one seed per rate
    assert set(acc["method"]) == {"finetuned", "base", "dare", "magnitude"}
    assert {"accuracy", "macro_f1", "mcc"} <= set(df["metric"])
    assert acc[acc["method"] == "dare"]["q"].round(6).tolist() == [0.5, 0.5, 0.1, 0.1]
    stored = pd.read_parquet(tmp_path / "s" / "results.parquet")
    assert len(stored) == len(df)
    # spec.points() (what progress bars count) lists exactly the points run, searches running every seed
    grid = dict(methods=["dare", "magnitude"], rates=[0.9, 0.5, 0.5], seeds=[0, 1])
    assert len(SweepSpec(BASE, FT, **grid).points()) == df["key"].nunique() == 8
    spec = SweepSpec(BASE, FT, methods=["darex_q_labelled"], rates=[0.5], seeds=[0, 1, 2], references=False)
    assert len(spec.points()) == 3


def test_rate_one_equals_base_reference_and_rate_zero_the_finetune(tiny):
    ev = CountingEvaluator()
    df = sweep(SweepSpec(BASE, FT, methods=['dare'], rates=[0.0, 1.0], seeds=[3]), RunOptions(progress=False), evaluator=ev)
    acc = df[df["metric"] == "accuracy"].set_index(["method", "rate"])["value"]
    assert acc[("dare", 1.0)] == acc[("base", 1.0)]
    assert acc[("dare", 0.0)] == acc[("finetuned", 0.0)]


def test_resident_model_matches_method_on_the_delta(tiny):
    from deltakit.methods import get_method
    from deltakit.sources import resolve

    rm = ResidentModel(resolve(BASE), resolve(FT))
    rm.apply("dare", rate=0.7, seed=5)
    for t in rm.targets[:5]:
        delta = t.ft.float() - t.base.float()
        expected = (t.base.float() + get_method("dare").fn(delta, rate=0.7, seed=5, name=t.name)).to(t.ft.dtype)
        assert torch.equal(t.param.data, expected)
    rm.restore()
    assert all(torch.equal(t.param.data, t.ft) for t in rm.targets)
    head = dict(rm.model.named_parameters())["classifier.weight"]
    assert all(t.name != "classifier.weight" for t in rm.targets) and head.requires_grad


def test_rerun_skips_completed_points(tiny, tmp_path):
    ev = CountingEvaluator()
    options = RunOptions(out=tmp_path / "s", progress=False)
    first = sweep(SweepSpec(BASE, FT, methods=["dare"], rates=[0.5, 0.9], seeds=[0]), options, evaluator=ev)
    calls = ev.calls
    second = sweep(SweepSpec(BASE, FT, methods=["dare"], rates=[0.5, 0.9], seeds=[0]), options, evaluator=ev)
    assert ev.calls == calls  # nothing recomputed
    assert sorted(second["key"]) == sorted(first["key"])
    third = sweep(SweepSpec(BASE, FT, methods=["dare"], rates=[0.5, 0.9, 0.99], seeds=[0]), options, evaluator=ev)
    assert ev.calls == calls + 1 and len(third) == len(first) + 2  # only the new point ran (2 metrics)


def test_cancel_stops_between_points(tiny, tmp_path):
    cancel = threading.Event()
    seen = []

    def on_point(rows):
        seen.append(rows)
        if len(seen) == 3:
            cancel.set()

    df = sweep(SweepSpec(BASE, FT, methods=['dare'], rates=[0.1, 0.3, 0.5, 0.7, 0.9], seeds=[0]), RunOptions(out=tmp_path / 's', progress=False), evaluator=CountingEvaluator(), cancel=cancel, on_point=on_point)
    assert len(seen) == 3 and df["key"].nunique() == 3
    assert ResultStore(tmp_path / "s").done_keys() == set(df["key"])


def test_failing_evaluator_is_recorded_and_the_sweep_goes_on(tiny, tmp_path):
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("evaluation server down")
        return {"accuracy": 0.5}

    df = sweep(SweepSpec(BASE, FT, methods=['dare'], rates=[0.5, 0.9], seeds=[0], references=False), RunOptions(out=tmp_path / 's', progress=False), evaluator=flaky)
    failed = df[df["status"] == "failed"]
    assert len(failed) == 1 and "evaluation server down" in failed["error"].iloc[0]
    assert (df["status"] == "ok").sum() == 1
    # The failed point is retried by the next run; the finished one is not.
    again = sweep(SweepSpec(BASE, FT, methods=['dare'], rates=[0.5, 0.9], seeds=[0], references=False), RunOptions(out=tmp_path / 's', progress=False), evaluator=flaky)
    assert calls["n"] == 3 and set(again["status"]) == {"ok"} and len(again) == 2


def test_bad_input(tiny):
    with pytest.raises(KeyError, match="dare"):
        sweep(SweepSpec(BASE, FT, methods=['nope'], rates=[0.5]), RunOptions(progress=False), evaluator=CountingEvaluator())
    with pytest.raises(ValueError, match="1.5"):
        sweep(SweepSpec(BASE, FT, rates=[0.5, 1.5]), RunOptions(progress=False), evaluator=CountingEvaluator())
    with pytest.raises(ValueError, match="no pruning rates"):
        normalise_rates([])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        MethodSpec.parse("darex_q:0.3")
    assert MethodSpec.parse("darex_q:q=0.3").params == (("q", 0.3),)


def test_dataset_without_columns_or_with_foreign_labels(tiny, tmp_path):
    from deltakit.evaluate import ClassificationEvaluator, load_split
    from deltakit.sources import resolve
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(FT).path)
    ds = load_split(FT, "test", limit=20)
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence'\].*available"):
        ClassificationEvaluator(ds, tok, text_column="sentence")
    from datasets import Value

    wrong = ds.cast_column("label", Value("int64")).map(lambda r: {"label": r["label"] + 5})
    with pytest.raises(ValueError, match="num_labels=3"):
        sweep(SweepSpec(BASE, FT, methods=['dare'], rates=[0.5]), RunOptions(progress=False), evaluator=ClassificationEvaluator(wrong, tok))


def test_glue_task_through_the_local_hub(tiny, local_hub, hf_home, tmp_path):
    """A GLUE-layout dataset repo (nyu-mll/glue, config sst2) served locally, loaded through datasets."""
    from deltakit.evaluate import load_split

    ds = load_split("family:tiny/polarity", "test", limit=40)
    frame = pd.DataFrame({"sentence": ds["text"], "label": ds["label"], "idx": range(len(ds))})
    path = tmp_path / "validation.parquet"
    frame.to_parquet(path)
    card = ("---\nconfigs:\n- config_name: sst2\n  data_files:\n  - split: validation\n"
            "    path: sst2/validation-*\n---\n# glue\n")
    local_hub.commit("nyu-mll/glue", {"README.md": card.encode(), "sst2/validation-00000-of-00001.parquet": path},
                     repo_type="dataset")
    df = sweep(SweepSpec(BASE, 'family:tiny/polarity', methods=['dare'], rates=[0.5], seeds=[0], task='glue/sst2', split='validation', references=False), RunOptions(progress=False))
    metrics = set(df["metric"])
    assert {"accuracy", "f1", "score"} <= metrics
    row = df.set_index("metric")["value"]
    assert row["score"] == row["accuracy"]  # SST-2's GLUE score is accuracy


KILL_SCRIPT = """
import sys, time, json
sys.path.insert(0, {root!r})
from deltakit.spec import RunOptions, SweepSpec
from deltakit.sweep import sweep

class Slow:
    fingerprint = "slow-v1"
    def __call__(self, model):
        time.sleep(0.4)
        return {{"accuracy": float(model.bert.encoder.layer[0].attention.self.query.weight.abs().mean())}}

sweep(SweepSpec("family:tiny/base", "family:tiny/sentiment3", methods=["dare"],
                rates=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], seeds=[0]),
      RunOptions(out={out!r}, progress=False), evaluator=Slow())
print("DONE")
"""


def test_sigkill_and_rerun_loses_and_repeats_nothing(tiny, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(root=str(Path(__file__).resolve().parents[2]), out=str(out)))
    env = dict(os.environ, DELTAKIT_HOME=str(tiny.parents[1]))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = ResultStore(out)
    deadline = time.time() + 120
    while len(store.done_keys()) < 4 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = store.done_keys()
    assert 4 <= len(done_before) < 10
    lines_before = store.path.read_text().splitlines()
    finish = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert "DONE" in finish.stdout, finish.stderr[-2000:]
    records = [json.loads(x) for x in store.path.read_text().splitlines() if x.strip().startswith("{")]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 10  # one record per point: 8 rates + 2 references, each exactly once
    assert all(r["status"] == "ok" and set(r["metrics"]) == {"accuracy"} for r in records)
    assert done_before <= set(keys)
    assert store.path.read_text().splitlines()[: len(lines_before)] == lines_before  # nothing rewritten
