"""Merge sweeps on the tiny family: per-task rows, shared merged body with per-task heads, the fused path equal to
the method functions, resumability, the CLI, and refusals of fine-tunes that cannot be merged."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from deltakit.merge import MergedModel, merge_summary, merge_sweep
from deltakit.methods import get_merge
from deltakit.pairing import PairingError
from deltakit.sources import resolve
from deltakit.spec import MergeSpec, RunOptions, SweepSpec
from deltakit.store import ResultStore
from deltakit.sweep import sweep

BASE = "family:tiny/base"
FTS = ["family:tiny/sentiment3", "family:tiny/polarity"]


def _merged(tiny) -> MergedModel:
    return MergedModel(resolve(BASE), [resolve(f) for f in FTS])


def test_merged_body_is_shared_and_heads_are_own(tiny):
    mm = _merged(tiny)
    p0 = dict(mm.models[0].named_parameters())
    p1 = dict(mm.models[1].named_parameters())
    name = mm.targets[0].name
    assert p0[name] is p1[name]  # one merged body
    assert p0["classifier.weight"].shape[0] == 3 and p1["classifier.weight"].shape[0] == 2  # each task's own head
    assert not any(t.name.startswith("classifier") for t in mm.targets)


@pytest.mark.parametrize("method, params", [("ta", {}), ("ties", {}), ("dare_ta", {}), ("dare_ties", {"q": 0.6}),
                                            ("breadcrumbs", {"top": 0.05}), ("della", {})])
def test_resident_merge_equals_method_function(tiny, method, params):
    mm = _merged(tiny)
    mm.apply(method, rate=0.5, seed=2, lam=0.7, backend="torch", **params)
    for t in mm.targets:
        deltas = [ft.float() - t.base.float() for ft in t.fts]
        expected = (t.base.float() + get_merge(method).fn(deltas, rate=0.5, seed=2, name=t.name, lam=0.7, **params))
        assert torch.equal(t.param.data, expected.to(t.param.dtype)), t.name


def test_merge_sweep_rows_references_and_resume(tiny, tmp_path):
    spec = MergeSpec(BASE, FTS, methods=["ta", "dare_ties"], rates=[0.5, 0.9], lambdas=[0.5, 1.0], seeds=[0, 1],
                     eval_limit=100)
    df = merge_sweep(spec, RunOptions(out=tmp_path, progress=False))
    ok = df[df["status"] == "ok"]
    assert set(ok["task"]) == {"sentiment3", "polarity"}
    assert len(ok[ok["metric"] == "accuracy"]) == 2 * len(spec.points())  # one row per (point, task, metric)
    # The "finetuned" reference is each fine-tune alone on its own task: the prune sweep's reference agrees.
    alone = sweep(SweepSpec(BASE, FTS[1], methods=["dare"], rates=[0.5], seeds=[0], eval_limit=100),
                  RunOptions(progress=False))
    ref = alone[(alone["method"] == "finetuned") & (alone["metric"] == "accuracy")]["value"].item()
    merged_ref = ok[(ok["method"] == "finetuned") & (ok["task"] == "polarity") & (ok["metric"] == "accuracy")]
    assert merged_ref["value"].item() == ref
    table = merge_summary(df)
    assert list(table["label"][:2]) == ["finetuned", "base"] and {"sentiment3", "polarity", "mean"} <= set(table)
    # Rerun: every point comes from the store.
    calls = []
    again = merge_sweep(spec, RunOptions(out=tmp_path, progress=False), on_point=calls.append)
    assert calls == [] and len(again) == len(df)
    assert len(ResultStore(tmp_path).records()) == len(spec.points())


def test_cancel_keeps_finished_points(tiny, tmp_path):
    spec = MergeSpec(BASE, FTS, methods=["dare_ta"], rates=[0.5, 0.7, 0.9], lambdas=[1.0], seeds=[0, 1],
                     eval_limit=50)
    cancel = threading.Event()
    seen = []

    def stop_after_three(rows):
        seen.append(rows)
        if len(seen) == 3:
            cancel.set()

    merge_sweep(spec, RunOptions(out=tmp_path, progress=False), cancel=cancel, on_point=stop_after_three)
    assert len(ResultStore(tmp_path).records()) == 3 < len(spec.points())


def test_cli_merge_writes_table_and_report(tiny, tmp_path):
    out = tmp_path / "m"
    run = subprocess.run([sys.executable, "-m", "deltakit.cli", "merge", BASE, *FTS, "--methods", "ta", "ties",
                          "--rates", "0.5", "--lambdas", "1", "--seeds", "0", "--limit", "50", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "sentiment3" in run.stdout and "polarity" in run.stdout and "finetuned" in run.stdout
    html = (out / "index.html").read_text()
    assert "sentiment3, lambda 1" in html and "polarity, lambda 1" in html
    assert (out / "results.parquet").is_file()


def test_fine_tunes_of_another_base_refused(tiny, bert_family):
    with pytest.raises(PairingError):
        MergedModel(resolve(BASE), [resolve(FTS[0]), resolve(str(bert_family["ft1"]))])


def test_cli_refuses_bad_merge_before_loading(tiny, tmp_path):
    run = subprocess.run([sys.executable, "-m", "deltakit.cli", "merge", BASE, FTS[0], "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "2 to 8 fine-tunes" in run.stderr
    run = subprocess.run([sys.executable, "-m", "deltakit.cli", "merge", BASE, *FTS, "--methods", "dare_ta:q=2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "q must be in" in run.stderr
    assert not (tmp_path / "results.jsonl").exists()


def test_exported_merge_scores_what_the_sweep_measured(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from deltakit.refs import read_card_front_matter
    from deltakit.sweep import default_evaluator

    spec = MergeSpec(BASE, FTS, methods=["dare_ties"], rates=[0.7], lambdas=[1.0], seeds=[1], eval_limit=100)
    merge_sweep(spec, RunOptions(out=tmp_path / "runs", progress=False))
    out = tmp_path / "exported"
    run = subprocess.run([sys.executable, "-m", "deltakit.cli", "export", BASE, *FTS, "--method", "dare_ties",
                          "--rate", "0.7", "--seed", "1", "--lam", "1", "--head", "1", "--results",
                          str(tmp_path / "runs"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    card = read_card_front_matter(out)
    assert card["base_model_relation"] == "merge" and card["deltakit"]["method"] == "dare_ties"
    measured = card["deltakit"]["metrics"]["accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(out)  # a plain transformers load
    ft = resolve(FTS[1])
    from deltakit.resident import load_tokenizer

    score = default_evaluator(ft, load_tokenizer(ft), task=None, split="test", limit=100)(model.eval())["accuracy"]
    assert score == measured
