"""Memory tiers of a sweep: every tier (and the uniform cache on or off) writes bit-identical weights, records say
which tier ran and what memory it peaked at, a budget picks the fastest tier that fits or is refused before
anything loads, and the CLI reports both."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from deltakit.cli import main
from deltakit.memory import TIER_NAMES, MemoryBudgetError, format_size
from deltakit.resident import ResidentModel
from deltakit.sources import resolve
from deltakit.spec import RunOptions, SweepSpec
from deltakit.store import ResultStore
from deltakit.sweep import sweep
from tests.weights import weights_digest

BASE, FT = "family:tiny/base", "family:tiny/sentiment3"
LLM_BASE, LLM_FT = "family:tiny-llm/base", "family:tiny-llm/arith"
TEXTS = ["a fine film", "the worst plot", "i loved it", "not good at all"] * 2
# A one-point eta grid: the analytic q still reads every delta through the tier, in seconds.
ANALYTIC = "darex_q_analytic:eta_lo=0.1,eta_hi=0.1,eta_step=0.1"
FIXED_RSS = 400 * 2**20  # the process's memory as planning sees it, fixed so that estimates do not drift


class FallingSearch:
    """A search evaluator that prefers the first candidate (each later score is lower): a short, fixed search."""

    fingerprint = "falling-search-v1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        return {"accuracy": -float(self.calls)}


class Counting:
    fingerprint = "counting-v1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        return {"accuracy": 0.5}


def outcome(df: pd.DataFrame) -> pd.DataFrame:
    """What a sweep measured, per point, in run order: the fields every tier must reproduce exactly."""
    assert set(df["status"]) == {"ok"}, df[df["status"] != "ok"][["method", "rate", "error"]]
    return df[["key", "method", "rate", "seed", "q", "params", "metric", "value"]].reset_index(drop=True)


def run(spec: SweepSpec, tier: str, cache: bool | None, **kw) -> pd.DataFrame:
    """The sweep in ``tier``; the uniform cache as the budget allows (None) or forced on or off."""
    if cache is None:
        return sweep(spec, RunOptions(tier=tier, progress=False), evaluator=weights_digest, **kw)
    rm = ResidentModel(resolve(spec.base), resolve(spec.fine_tune), include=spec.include, tier=tier,
                       cache_uniforms=cache)
    assert (rm.tier, rm.cache_uniforms) == (tier, cache)
    return sweep(spec, RunOptions(progress=False), evaluator=weights_digest, resident=rm, **kw)


CONFIGS = [("host", None), ("file", None), ("resident", False), ("host", False), ("file", False), ("file", True)]


def check_tiers_agree(spec: SweepSpec, configs=CONFIGS, extra=dict) -> None:
    """Sweep ``spec`` resident (with the cache the budget allows) and in each of ``configs`` (tier, cache), and
    compare; ``extra()`` gives fresh keyword arguments for each sweep."""
    reference = run(spec, "resident", None, **extra())
    assert "resident + uniform cache" in reference.attrs["memory"]  # the fastest choice: the cache is exercised
    expected = outcome(reference)
    assert expected["value"].nunique() > len(expected) // 2  # points differ from each other
    for tier, cache in [("resident", None), *configs]:
        df = reference if (tier, cache) == ("resident", None) else run(spec, tier, cache, **extra())
        pd.testing.assert_frame_equal(outcome(df), expected, check_exact=True, obj=f"tier={tier}, cache={cache}")
        assert set(df["tier"]) == {tier}
        assert (df["peak_host_mb"] > 0).all() and df["peak_device_mb"].isna().all()  # NaN on CPU
        assert df.attrs["memory"].startswith(f"memory tier: {TIER_NAMES[tier]}")
        assert ("uniform cache" in df.attrs["memory"]) == (cache is not False and tier != "host")


def test_every_tier_and_cache_setting_gives_bit_identical_weights_on_the_classifier(tiny):
    check_tiers_agree(SweepSpec(BASE, FT, methods=["dare", "magnitude"], rates=[0.5, 0.9], seeds=[0, 1]))


def test_the_analytic_q_reads_the_same_deltas_in_every_tier(tiny):
    # Its prepare step reads every delta through the tier (ctx.weights); one layer and a short search keep this to
    # seconds.
    spec = SweepSpec(BASE, FT, methods=[ANALYTIC], rates=[0.9], seeds=[0, 1], references=False,
                     include=[r".*\.layer\.0\..*"])
    searches: list[FallingSearch] = []

    def extra() -> dict:
        searches.append(FallingSearch())  # fresh per sweep, so each sweep's search sees the same scores
        return dict(search_evaluator=searches[-1], calibration_texts=TEXTS)

    check_tiers_agree(spec, [("file", False)], extra)
    assert len(searches) == 2 and searches[0].calls > 0 and searches[0].calls == searches[1].calls


def test_every_tier_and_cache_setting_gives_bit_identical_weights_on_the_decoder(tiny_llm):
    check_tiers_agree(SweepSpec(LLM_BASE, LLM_FT, methods=["dare", "magnitude"], rates=[0.5, 0.9], seeds=[0, 1]))


def test_records_in_the_store_carry_the_tier_and_peak_memory(tiny, tmp_path):
    spec = SweepSpec(BASE, FT, methods=["dare"], rates=[0.5], seeds=[0])
    sweep(spec, RunOptions(tier="file", out=tmp_path / "s", progress=False), evaluator=Counting())
    lines = (tmp_path / "s" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    for r in records:
        assert r["tier"] == "file" and r["peak_host_mb"] > 0 and r["peak_device_mb"] is None
    stored = pd.read_parquet(tmp_path / "s" / "results.parquet")
    assert set(stored["tier"]) == {"file"} and (stored["peak_host_mb"] > 0).all()


@pytest.fixture
def fixed_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning sees a constant process size, so a budget computed from one plan means the same in the next."""
    monkeypatch.setattr("deltakit.memory.current_rss", lambda: FIXED_RSS)


@pytest.mark.parametrize("form", ["int", "str"])
def test_a_budget_too_small_for_resident_picks_the_file_tier(tiny, fixed_rss, form):
    spec = SweepSpec(BASE, FT, methods=["dare"], rates=[0.5], seeds=[0])
    probe = ResidentModel(resolve(BASE), resolve(FT), n_seeds=1, full_delta=False)  # what the sweep will plan
    choices = probe.memory.choices
    resident = min(f.host for f in choices if f.tier == "resident")
    file = min(f.host for f in choices if f.tier == "file")
    assert file < resident
    budget = resident - 1
    df = sweep(spec, RunOptions(max_memory=budget if form == "int" else f"{budget}B", progress=False),
               evaluator=Counting())
    assert set(df["tier"]) == {"file"} and set(df["status"]) == {"ok"}
    assert "(the fastest that fits)" in df.attrs["memory"]
    assert f"of {format_size(budget)}" in df.attrs["memory"]  # the budget it chose under


def test_a_budget_below_every_tier_is_refused_before_anything_loads(tiny, fixed_rss, tmp_path, monkeypatch):
    probe = ResidentModel(resolve(BASE), resolve(FT), n_seeds=1, full_delta=False)
    smallest = min(f.host for f in probe.memory.choices)
    loads = []
    monkeypatch.setattr("deltakit.resident.load_model", lambda *a: loads.append(a))
    ev = Counting()
    with pytest.raises(MemoryBudgetError) as info:
        sweep(SweepSpec(BASE, FT, methods=["dare"], rates=[0.5], seeds=[0]),
              RunOptions(max_memory="1KB", out=tmp_path / "s", progress=False), evaluator=ev)
    msg = str(info.value)
    assert f"smallest budget that works is host {format_size(smallest)} ({TIER_NAMES['file']})" in msg
    assert "1KB" in msg  # the budget given
    assert ev.calls == 0 and not loads
    assert ResultStore(tmp_path / "s").records() == []


def test_the_memory_plan_goes_to_stderr_when_progress_is_on(tiny, capsys):
    spec = SweepSpec(BASE, FT, methods=["magnitude"], rates=[0.5], seeds=[0], references=False)
    df = sweep(spec, RunOptions(tier="file", progress=True), evaluator=Counting())
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "memory tier:" in line]
    assert lines == [f"deltakit: {df.attrs['memory']}"]
    assert "file-streamed (chosen by the caller)" in lines[0]
    assert "memory tier" not in captured.out
    sweep(spec, RunOptions(tier="file", progress=False), evaluator=Counting())
    assert "memory tier" not in capsys.readouterr().err


# -- the command line ---------------------------------------------------------------------------------------------
def test_cli_refuses_a_budget_below_every_tier(tiny, tmp_path, capsys):
    code = main(["sweep", BASE, FT, "--methods", "dare", "--rates", "0.5", "--out", str(tmp_path / "out"),
                 "--max-memory", "1KB"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("deltakit: error: no memory tier fits the budget") and err.count("\n") == 1
    assert "1KB" in err and "smallest budget that works is host" in err and "Traceback" not in err


@pytest.mark.parametrize("value, words", [("5", ["'5'", "has no unit"]), ("5 gigs", ["'gigs'", "unknown unit"]),
                                          ("cuda=5GB", ["cuda='5GB'", "runs on the CPU"])])
def test_cli_refuses_a_malformed_budget(tiny, tmp_path, capsys, monkeypatch, value, words):
    monkeypatch.setattr(ResidentModel, "__init__", lambda *a, **k: pytest.fail("a model loaded for a bad budget"))
    code = main(["sweep", BASE, FT, "--out", str(tmp_path / "out"), "--max-memory", value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("deltakit: error:") and err.count("\n") == 1
    for word in words:
        assert word in err, (word, err)


def test_cli_refuses_an_unknown_tier(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", BASE, FT, "--out", str(tmp_path / "out"), "--tier", "disk"])
    assert info.value.code == 2 and "'disk'" in capsys.readouterr().err


def test_cli_sweep_in_a_forced_tier_reports_plan_and_measured_peak(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sweep", BASE, FT, "--methods", "magnitude", "--rates", "0.5", "--limit", "8", "--out", str(out),
                 "--tier", "file", "--max-memory", "100GB"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "deltakit: memory tier: file-streamed (chosen by the caller)" in captured.err
    assert "budget given: 100GB" in captured.err
    assert "measured peak: host" in captured.out
    assert set(pd.read_parquet(Path(out) / "results.parquet")["tier"]) == {"file"}
