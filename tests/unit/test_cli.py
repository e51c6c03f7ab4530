"""The CLI is a thin layer: it prints the library's summary, writes parquet, and turns errors into one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from deltakit.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_stats_json_and_parquet(pair_dirs, tmp_path, capsys):
    b, f, *_ = pair_dirs
    out = tmp_path / "out"
    assert main(["stats", str(b), str(f), "--out", str(out), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["global"]["ft"]["mean_abs"] > 0
    assert all("mean_abs" in row for row in js["kinds"]["ft"].values())
    assert len(pd.read_parquet(out / "tensors.parquet")) == 9


def test_stats_text_summary(pair_dirs, capsys):
    b, f, *_ = pair_dirs
    assert main(["stats", str(b), str(f)]) == 0
    text = capsys.readouterr().out
    assert "mean|d|" in text and "unpaired" in text and "classifier.weight" in text


def test_stats_spectral(pair_dirs, tmp_path, capsys):
    b, f, *_ = pair_dirs
    out = tmp_path / "out"
    assert main(["stats", str(b), str(f), "--spectral", "--spectral-k", "4", "--out", str(out)]) == 0
    assert "low-rank deltas (look like a merged LoRA: rank_99 <= 4" in capsys.readouterr().out
    tensors = pd.read_parquet(out / "tensors.parquet")
    assert tensors["stable_rank"].notna().any() and tensors["stable_rank"].isna().any()  # 2-D tensors only
    assert main(["stats", str(b), str(f), "--spectral", "--spectral-k", "0"]) == 2
    assert "spectral_k=0" in capsys.readouterr().err


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nope"), str(tmp_path / "nope2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltakit: error:") and "does not exist" in err and "Traceback" not in err


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
