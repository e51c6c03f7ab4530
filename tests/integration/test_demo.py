"""`deltakit demo`, the main job, end to end on the tiny family: report, tidy results, resumable rerun."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from deltakit.cli import main


def test_demo_writes_the_report_and_results(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--family", "tiny", "--out", str(out), "--limit", "64"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in printed

    # The story: the first result (sentiment3's DARE curve) is written before the large-delta member is swept,
    # one finding per method, and one JSON line of timings at the end.
    lines = printed.splitlines()
    first = next(i for i, line in enumerate(lines) if "first result:" in line)
    findings = [i for i, line in enumerate(lines) if "at rate 0.99: accuracy" in line]
    assert len(findings) == 5 and findings[0] < first < findings[1]
    assert "sentiment3: DARE" in lines[findings[0]] and "fine-tune" in lines[findings[0]]
    assert "sentiment3-hot: DAREx-q (labelled q search)" in lines[findings[2]] and ", q " in lines[findings[2]]
    timings = json.loads(lines[-2])
    assert set(timings) == {"build_s", "stats_s", "sweeps_s", "first_result_s", "total_s"}
    assert 0 < timings["first_result_s"] <= timings["total_s"]

    html = (out / "index.html").read_text()
    for section in ("Findings", "Delta statistics", "Accuracy vs pruning rate: sentiment3", "Accuracy vs pruning rate: "
                    "sentiment3-hot", "Rescale q chosen by DAREx-q", "64 test examples", "Finished in",
                    "Merging sentiment3 + topic", "Merged model on topic"):
        assert section in html, section
    assert not re.search(r"<script[^>]*\ssrc=", html)  # self-contained: plotly.js is inlined, no script is fetched
    assert html.count("Plotly.newPlot") >= 5

    df = pd.read_parquet(out / "results.parquet")
    acc = df[(df["metric"] == "accuracy") & (df["status"] == "ok")]
    assert set(acc[acc["member"] == "sentiment3"]["method"]) == {"dare", "magnitude", "finetuned", "base"}
    hot = acc[acc["member"] == "sentiment3-hot"]
    assert {"dare", "darex_q_labelled", "magnitude", "finetuned", "base"} == set(hot["method"])
    for method in ("dare", "darex_q_labelled"):
        points = hot[hot["method"] == method]
        assert sorted(points["rate"].unique()) == [0.5, 0.9, 0.95, 0.99]
        assert points.groupby("rate")["seed"].nunique().eq(2).all()  # two seeds per rate: intervals exist
    # The merge section: each merge method on both tasks, each task with its own head, beside the fine-tunes alone.
    merged = acc[acc["member"] == "sentiment3+topic"]
    assert set(merged["method"]) == {"ta", "ties", "dare_ta", "dare_ties", "finetuned", "base"}
    assert set(merged["task"]) == {"sentiment3", "topic"}
    assert sum("merge sentiment3 + topic on" in line for line in lines) == 2
    q = hot[hot["method"] == "darex_q_labelled"]
    assert (q["q"] >= 1 - q["rate"] - 1e-9).all() and (q["q"] <= 1).all()  # the searched q lies in [1 - rate, 1]
    assert (out / "stats").is_dir()

    # A rerun reuses every stored point (the append-only stores do not grow) and gives the same numbers.
    stores = sorted((out / "sweeps").glob("*/results.jsonl"))
    sizes = [p.stat().st_size for p in stores]
    assert len(stores) == 3  # the two members' sweeps and the merge
    assert main(["demo", "--family", "tiny", "--out", str(out), "--limit", "64"]) == 0
    rerun = pd.read_parquet(out / "results.parquet")
    cols = ["member", "method", "rate", "seed", "metric", "value"]
    pd.testing.assert_frame_equal(rerun[cols].sort_values(cols[:5]).reset_index(drop=True),
                                  df[cols].sort_values(cols[:5]).reset_index(drop=True))
    assert [p.stat().st_size for p in stores] == sizes
