"""Hostile or careless merge requests: refused before any model loads, with one line naming the value and the fix;
fine-tunes that cannot be merged (another base, a non-finite delta, a busy results folder) refused clearly."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit.cli import main
from deltakit.merge import MergedModel
from deltakit.sources import resolve
from deltakit.store import ResultStore

BASE = "family:tiny/base"
FTS = ["family:tiny/sentiment3", "family:tiny/polarity"]


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list:
    """Records every attempt to load the merged models: planning errors must come before any."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("models were loaded although the request was invalid")

    monkeypatch.setattr(MergedModel, "__init__", refuse)
    return calls


# (id, fine-tunes, extra CLI arguments, words the one-line message must contain)
PLANNING_CASES = [
    ("one-fine-tune", FTS[:1], [], ["2 to 8 fine-tunes"]),
    ("nine-fine-tunes", FTS * 4 + FTS[:1], [], ["2 to 8 fine-tunes", "9"]),
    ("unknown-merge-method", FTS, ["--methods", "average"], ["'average'", "ta"]),
    ("pruning-method-as-merge", FTS, ["--methods", "dare"], ["'dare'", "dare_ta"]),
    ("q-out-of-range", FTS, ["--methods", "dare_ta:q=0.05", "--rates", "0.5"], ["q must be in", "0.05"]),
    ("breadcrumbs-top-above-rate", FTS, ["--methods", "breadcrumbs:top=0.6", "--rates", "0.5"], ["top", "0.6"]),
    ("della-epsilon", FTS, ["--methods", "della:epsilon=2"], ["epsilon", "[0, 1]"]),
    ("unknown-parameter", FTS, ["--methods", "ties:q=0.5"], ["'q'", "no parameters"]),
    ("lambda-nan", FTS, ["--lambdas", "nan"], ["lambdas", "nan"]),
    ("rate-above-one", FTS, ["--rates", "1.5"], ["1.5", "[0, 1]"]),
    ("tasks-count", FTS, ["--tasks", "glue/sst2"], ["one per fine-tune"]),
    ("seed-negative", FTS, ["--seeds", "-1"], ["non-negative"]),
    ("device-bogus", FTS, ["--device", "bogus"], ["'bogus'"]),
]


@pytest.mark.parametrize("fts, args, words", [c[1:] for c in PLANNING_CASES], ids=[c[0] for c in PLANNING_CASES])
def test_bad_merge_request_is_refused_before_loading(fts, args, words, no_loading, tiny, tmp_path, capsys):
    t0 = time.perf_counter()
    code = main(["merge", BASE, *fts, "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("deltakit: error:") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not no_loading and time.perf_counter() - t0 < 10
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_fine_tune_of_another_shape_is_refused(tiny, bert_family, capsys, tmp_path):
    code = main(["merge", BASE, FTS[0], str(bert_family["ft1"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "deltakit: error:" in err


def test_non_finite_delta_in_one_fine_tune_is_named(tiny, tmp_path):
    bad = tmp_path / "polarity-nan"
    shutil.copytree(tiny / "polarity", bad)
    weights = load_file(bad / "model.safetensors")
    name = next(n for n in weights if n.endswith("attention.self.query.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="non-finite") as err:
        MergedModel(resolve(BASE), [resolve(FTS[0]), resolve(str(bad))])
    assert "query.weight" in str(err.value) and "polarity-nan" in str(err.value)


def test_second_merge_on_a_busy_folder_fails_at_once(tiny, tmp_path, capsys):
    out = tmp_path / "busy"
    with ResultStore(out).writer():  # another run holds the folder
        t0 = time.perf_counter()
        code = main(["merge", BASE, *FTS, "--methods", "ta", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "pid" in err and time.perf_counter() - t0 < 10


@pytest.mark.parametrize("args, words", [
    (["--method", "dare_ta", "--rate", "0.5", "--head", "2"], ["head", "0 to 1"]),
    (["--method", "dare_ta", "--rate", "0.5", "--compact"], ["--compact", "one"]),
    (["--method", "dare_ta", "--rate", "0.5", "--results", "nowhere"], ["no finished point"]),
], ids=["head-out-of-range", "compact-merge", "results-without-the-point"])
def test_bad_merge_export_is_refused(args, words, tiny, tmp_path, capsys):
    out = tmp_path / "exported"
    code = main(["export", BASE, *FTS, "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() or not any(Path(out).iterdir())


def test_nan_lambda_in_the_library_is_refused(tiny):
    mm = MergedModel(resolve(BASE), [resolve(f) for f in FTS])
    before = [t.param.detach().clone() for t in mm.targets]
    with pytest.raises(ValueError, match="lam"):
        mm.apply("dare_ta", rate=0.5, seed=0, lam=float("nan"))
    assert all(torch.equal(b, t.param) for b, t in zip(before, mm.targets))  # nothing half-written
