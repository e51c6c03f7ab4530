"""Memory tiers under faults: checkpoint files rewritten while a sweep runs (stop, keep what finished, resume),
running out of memory mid-point (lower the tier once, rerun the point, then record failures), and budgets in the
wrong unit or form (refused before anything loads, naming the value)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from deltakit.memory import MemoryBudgetError
from deltakit.resident import ResidentModel
from deltakit.spec import RunOptions, SweepSpec
from deltakit.sweep import sweep
from deltakit.tensors import SAMPLE_BYTES, SAMPLES, CheckpointChangedError, CorruptCheckpointError
from tests.weights import weights_digest

BASE, FT = "family:tiny/base", "family:tiny/sentiment3"
WEIGHTS = "model.safetensors"
ROOT = Path(__file__).resolve().parents[2]


class Evaluator:
    """The weights' digest; ``after(n)`` runs once the n-th evaluation is done (a fault injected between points)."""

    fingerprint = "weights-digest-v1"

    def __init__(self, after: dict | None = None) -> None:
        self.calls = 0
        self.after = after or {}

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        scores = weights_digest(model)
        if self.calls in self.after:
            self.after[self.calls]()
        return scores


def sample_offsets(file: Path) -> list[int]:
    """Where :func:`deltakit.tensors.content_parts` samples the data of a safetensors file."""
    raw = file.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    last = max(len(raw) - SAMPLE_BYTES, start)
    return [start + (last - start) * i // (SAMPLES - 1) for i in range(SAMPLES)]


def flip_sampled_bytes(file: Path) -> None:
    """Rewrite four bytes in place where the data is sampled (same size, same inode)."""
    at = sample_offsets(file)[SAMPLES // 2] + 100
    with file.open("r+b") as fh:
        fh.seek(at)
        old = fh.read(4)
        fh.seek(at)
        fh.write(bytes(b ^ 0x5A for b in old))


def rewrite_header_metadata(file: Path) -> None:
    """Change the header's ``__metadata__`` in place, keeping its length (so every offset still holds)."""
    raw = file.read_bytes()
    assert b'"format":"pt"' in raw[:200]
    with file.open("r+b") as fh:
        fh.seek(raw.index(b'"format":"pt"'))
        fh.write(b'"format":"PT"')


def replace_with_changed_copy(file: Path) -> None:
    """Write a changed copy beside the file and rename it over (how most tools save)."""
    tmp = file.with_suffix(".tmp")
    shutil.copy2(file, tmp)
    flip_sampled_bytes(tmp)
    os.replace(tmp, file)


@pytest.fixture
def models(tiny: Path, tmp_path: Path) -> dict[str, Path]:
    """Private copies of the tiny base and fine-tune (the shared family is never written to)."""
    return {m: Path(shutil.copytree(tiny / m, tmp_path / "models" / m)) for m in ("base", "sentiment3")}


def stored_lines(folder: Path) -> list[dict]:
    text = (folder / "results.jsonl").read_text()
    assert text.endswith("\n")  # no partial line
    return [json.loads(line) for line in text.splitlines()]


# -- (a) checkpoint files changed while the sweep runs -----------------------------------------------------------
@pytest.mark.parametrize("tier", ["resident", "file"])
def test_a_checkpoint_rewritten_between_points_stops_the_sweep_and_the_rerun_resumes(models, tmp_path, tier):
    ft = models["sentiment3"]
    file = ft / WEIGHTS
    original = file.read_bytes()
    spec = SweepSpec(BASE, str(ft), methods=["dare"], rates=[0.3, 0.5, 0.7], seeds=[0])  # 5 points with references
    out = tmp_path / "store"
    ev = Evaluator(after={2: lambda: flip_sampled_bytes(file)})
    with pytest.raises(CheckpointChangedError) as info:
        sweep(spec, RunOptions(tier=tier, out=out, progress=False), evaluator=ev)
    msg = str(info.value)
    assert WEIGHTS in msg and str(ft) in msg and "changed after it was first read" in msg
    assert ev.calls == 2
    records = stored_lines(out)
    assert [r["method"] for r in records] == ["finetuned", "base"]  # exactly the finished points, once each
    assert len({r["key"] for r in records}) == 2 and {r["status"] for r in records} == {"ok"}

    file.write_bytes(original)  # the checkpoint as it was: the same points, the same keys
    again = Evaluator()
    df = sweep(spec, RunOptions(tier=tier, out=out, progress=False), evaluator=again)
    assert again.calls == 3  # only the points not finished before
    records = stored_lines(out)
    assert len(records) == 5 and len({r["key"] for r in records}) == 5
    assert df["key"].nunique() == 5 and set(df["status"]) == {"ok"}
    undisturbed = sweep(spec, RunOptions(tier=tier, progress=False), evaluator=Evaluator())
    assert sorted(df["value"]) == sorted(undisturbed["value"])  # the resumed sweep measured the same weights


@pytest.mark.parametrize("change", [flip_sampled_bytes, rewrite_header_metadata, replace_with_changed_copy],
                         ids=["data-in-place", "header-metadata", "replaced-by-rename"])
@pytest.mark.parametrize("member", ["sentiment3", "base"])
def test_a_change_that_keeps_size_and_mtime_is_still_detected(models, change, member):
    file = models[member] / WEIGHTS
    before = file.stat()

    def tamper() -> None:
        change(file)
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = file.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    spec = SweepSpec(str(models["base"]), str(models["sentiment3"]), methods=["magnitude"], rates=[0.5], seeds=[0])
    ev = Evaluator(after={1: tamper})
    with pytest.raises(CheckpointChangedError, match=WEIGHTS) as info:
        sweep(spec, RunOptions(progress=False), evaluator=ev)
    assert str(models[member]) in str(info.value)
    assert ev.calls == 1


def truncate_in_place(file: Path) -> None:
    """What re-saving over the same path does first (``open(path, "wb")``): the file shrinks in place."""
    with file.open("r+b") as fh:
        fh.truncate(file.stat().st_size // 2)


def test_a_checkpoint_truncated_in_place_stops_the_file_tier_sweep_as_changed(models, tmp_path):
    file = models["sentiment3"] / WEIGHTS
    spec = SweepSpec(BASE, str(models["sentiment3"]), methods=["dare"], rates=[0.5], seeds=[0])
    ev = Evaluator(after={2: lambda: truncate_in_place(file)})
    with pytest.raises(CheckpointChangedError, match=WEIGHTS):
        sweep(spec, RunOptions(tier="file", out=tmp_path / "s", progress=False), evaluator=ev)


_TRUNCATE_SCRIPT = """
import sys
from pathlib import Path
from deltakit.spec import RunOptions, SweepSpec
from deltakit.sweep import sweep
from deltakit.tensors import CheckpointChangedError
ft = Path(sys.argv[1])
calls = []
def ev(model):
    calls.append(1)
    if len(calls) == 2:
        with (ft / "model.safetensors").open("r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
    return {"accuracy": 0.5}
try:
    sweep(SweepSpec("family:tiny/base", str(ft), methods=["dare"], rates=[0.5]), RunOptions(progress=False),
          evaluator=ev)
except CheckpointChangedError as err:
    print("stopped:", err)
"""


def test_a_checkpoint_truncated_in_place_does_not_crash_a_resident_sweep(models):
    proc = subprocess.run([sys.executable, "-c", _TRUNCATE_SCRIPT, str(models["sentiment3"])],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "stopped:" in proc.stdout and WEIGHTS in proc.stdout


def test_an_unchanged_checkpoint_is_never_reported(models):
    file = models["sentiment3"] / WEIGHTS
    spec = SweepSpec(BASE, str(models["sentiment3"]), methods=["magnitude"], rates=[0.5], seeds=[0])
    # reading it, and touching its mtime, change nothing
    ev = Evaluator(after={1: lambda: (file.read_bytes(), os.utime(file))})
    df = sweep(spec, RunOptions(tier="file", progress=False), evaluator=ev)
    assert set(df["status"]) == {"ok"} and ev.calls == 3


# -- (b) out of memory mid-sweep ----------------------------------------------------------------------------------
SPEC = dict(methods=["dare", "magnitude"], rates=[0.5, 0.9], seeds=[0])  # 6 points: 2 references, 2 dare, 2 magnitude
OOM = "CUDA out of memory (simulated)"


def outcome(df: pd.DataFrame) -> pd.DataFrame:
    return df[["key", "method", "rate", "seed", "metric", "value"]].reset_index(drop=True)


@pytest.fixture
def undisturbed(tiny) -> pd.DataFrame:
    df = sweep(SweepSpec(BASE, FT, **SPEC), RunOptions(progress=False), evaluator=weights_digest)
    assert set(df["tier"]) == {"resident"} and set(df["status"]) == {"ok"}
    return df


def inject(monkeypatch: pytest.MonkeyPatch, fail_on: set[int], error, *, tensor: int = 10) -> list[int]:
    """Make the ``tensor``-th tensor write of the n-th call of ``ResidentModel.apply`` (n in ``fail_on``) raise
    ``error()``: the model is left half rewritten, as a real allocation failure would leave it."""
    calls = [0]
    real_apply = ResidentModel.apply
    import deltakit.resident as resident

    real_apply_method = resident.apply_method
    state = {"armed": False, "writes": 0}

    def apply(self, *args, **kwargs):
        calls[0] += 1
        state.update(armed=calls[0] in fail_on, writes=0)
        return real_apply(self, *args, **kwargs)

    def apply_method(*args, **kwargs):
        state["writes"] += 1
        if state["armed"] and state["writes"] == tensor:
            raise error()
        return real_apply_method(*args, **kwargs)

    monkeypatch.setattr(ResidentModel, "apply", apply)
    monkeypatch.setattr(resident, "apply_method", apply_method)
    return calls


ERRORS = {"torch-oom": lambda: torch.OutOfMemoryError(OOM), "memory-error": lambda: MemoryError(OOM)}


@pytest.mark.parametrize("error", list(ERRORS), ids=list(ERRORS))
def test_out_of_memory_in_a_point_lowers_the_tier_once_and_reruns_it(undisturbed, monkeypatch, error):
    calls = inject(monkeypatch, {3}, ERRORS[error])  # the first dare point, half-way through its rewrite
    with pytest.warns(UserWarning, match="moved to") as caught:
        df = sweep(SweepSpec(BASE, FT, **SPEC), RunOptions(progress=False), evaluator=weights_digest)
    moved = [str(w.message) for w in caught if "moved to" in str(w.message)]
    assert len(moved) == 1 and "resident + uniform cache: moved to file-streamed" in moved[0]
    assert calls[0] == 7  # 6 points, one of them twice
    assert set(df["status"]) == {"ok"}
    tiers = df.drop_duplicates("key")["tier"].tolist()
    assert tiers == ["resident", "resident", "file", "file", "file", "file"]
    pd.testing.assert_frame_equal(outcome(df), outcome(undisturbed), check_exact=True)
    assert df.attrs["memory"].startswith("memory tier: file-streamed")


@pytest.mark.parametrize("fail_on, failed_at", [({3, 4}, 2), ({3, 6}, 4)],
                         ids=["again-on-the-rerun", "again-in-a-later-point"])
def test_out_of_memory_after_the_fallback_is_a_failed_point_and_the_sweep_goes_on(undisturbed, monkeypatch,
                                                                                  fail_on, failed_at):
    inject(monkeypatch, fail_on, ERRORS["torch-oom"])  # apply calls: 1-2 references, 3 (+4 when rerun) dare 0.5
    with pytest.warns(UserWarning, match="moved to") as caught:
        df = sweep(SweepSpec(BASE, FT, **SPEC), RunOptions(progress=False), evaluator=weights_digest)
    assert sum("moved to" in str(w.message) for w in caught) == 1  # lowered once only
    points = df.drop_duplicates("key").reset_index(drop=True)
    assert points["status"].tolist() == ["failed" if i == failed_at else "ok" for i in range(6)]
    assert points.loc[failed_at, "error"] == f"OutOfMemoryError: {OOM}"
    assert points["tier"].tolist()[2:] == ["file"] * 4
    ok = df[df["status"] == "ok"]
    expected = outcome(undisturbed)
    assert outcome(ok).equals(expected[expected["key"].isin(ok["key"])].reset_index(drop=True))


def test_out_of_memory_in_the_evaluation_lowers_the_tier_too(undisturbed, tiny, monkeypatch):
    state = {"calls": 0}

    def evaluator(model):
        state["calls"] += 1
        if state["calls"] == 4:
            raise torch.OutOfMemoryError(OOM)
        return weights_digest(model)

    evaluator.fingerprint = weights_digest.fingerprint
    with pytest.warns(UserWarning, match="moved to"):
        df = sweep(SweepSpec(BASE, FT, **SPEC), RunOptions(progress=False), evaluator=evaluator)
    assert set(df["status"]) == {"ok"} and state["calls"] == 7
    assert df.drop_duplicates("key")["tier"].tolist() == ["resident"] * 3 + ["file"] * 3
    pd.testing.assert_frame_equal(outcome(df), outcome(undisturbed), check_exact=True)


def test_out_of_memory_in_the_lowest_tier_is_a_failed_point_without_a_move(tiny, monkeypatch):
    inject(monkeypatch, {3}, ERRORS["torch-oom"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*moved to.*")
        df = sweep(SweepSpec(BASE, FT, **SPEC), RunOptions(tier="file", progress=False), evaluator=weights_digest)
    points = df.drop_duplicates("key")
    assert points["status"].tolist() == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert set(points["tier"]) == {"file"}


def test_other_errors_do_not_lower_the_tier(tiny, monkeypatch):
    inject(monkeypatch, {3}, lambda: RuntimeError("kernel exploded"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*moved to.*")
        df = sweep(SweepSpec(BASE, FT, **SPEC), RunOptions(progress=False), evaluator=weights_digest)
    points = df.drop_duplicates("key")
    assert points["status"].tolist() == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert "kernel exploded" in points["error"].iloc[2]
    assert set(points["tier"]) == {"resident"}


# -- (c) budgets in the wrong unit or form ------------------------------------------------------------------------
BAD_BUDGETS = [  # (value, words the message must contain)
    ("5 gigs", ["'5 gigs'", "unknown unit"]),
    ("-1GB", ["'-1GB'"]),
    ("5", ["'5'", "has no unit"]),
    ("cpu=", ["cpu="]),
    ("gpu=4GB", ["gpu=", "'4GB'", "CPU"]),
    ("cuda=4GB", ["cuda=", "'4GB'", "CPU"]),
    ({"disk": "1GB"}, ["'disk'", "unknown key"]),
    ("disk=1GB", ["'disk'", "unknown key"]),
    (0, ["budget 0 "]),
    (-5, ["budget -5 "]),
    (float("nan"), ["nan"]),
    (True, ["True"]),
]
IDS = ["unknown-unit", "negative", "no-unit", "empty-pair", "gpu-on-cpu", "cuda-on-cpu", "dict-unknown-key",
       "unknown-key", "zero", "negative-int", "nan", "bool"]


@pytest.mark.parametrize("value, words", BAD_BUDGETS, ids=IDS)
def test_a_bad_budget_is_refused_by_run_options(value, words):
    with pytest.raises(MemoryBudgetError) as info:
        RunOptions(max_memory=value).check()
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the memory budget was invalid")

    monkeypatch.setattr(ResidentModel, "__init__", refuse)


@pytest.mark.parametrize("value, words", BAD_BUDGETS, ids=IDS)
def test_a_bad_budget_is_refused_by_sweep_before_anything_loads(value, words, no_loading, tiny, tmp_path):
    with pytest.raises(MemoryBudgetError) as info:
        sweep(SweepSpec(BASE, FT, methods=["dare"], rates=[0.5]),
              RunOptions(max_memory=value, out=tmp_path / "s", progress=False), evaluator=weights_digest)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not (tmp_path / "s").exists()  # refused before the results folder was made


@pytest.mark.parametrize("value", ["5 GB", "5GB", "5GiB", "cpu=5GB", {"cpu": "5GB"}, 5 * 10**9, None])
def test_good_budgets_pass_the_check(value):
    assert RunOptions(max_memory=value).check() == torch.device("cpu")


@pytest.mark.parametrize("tier", ["disk", "RESIDENT", ""])
def test_an_unknown_tier_is_refused_before_anything_loads(tier, no_loading, tiny):
    with pytest.raises(MemoryBudgetError, match=f"unknown memory tier {tier!r}"):
        RunOptions(tier=tier).check()
    with pytest.raises(MemoryBudgetError, match=f"unknown memory tier {tier!r}"):
        sweep(SweepSpec(BASE, FT, methods=["dare"], rates=[0.5]), RunOptions(tier=tier, progress=False),
              evaluator=weights_digest)


def test_a_budget_given_as_a_string_with_a_space_runs(tiny):
    df = sweep(SweepSpec(BASE, FT, methods=["magnitude"], rates=[0.5], references=False),
               RunOptions(max_memory="500 GB", progress=False), evaluator=weights_digest)
    assert set(df["status"]) == {"ok"} and "given: 500 GB" in df.attrs["memory"]
