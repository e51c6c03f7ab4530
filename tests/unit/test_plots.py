"""Plots read tidy sweep rows: intervals over seeds, one line per method, reference lines, log-rate axis."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from deltakit import plots
from deltakit.summary import summarise


def _rows() -> pd.DataFrame:
    rows = [dict(label="finetuned", method="finetuned", rate=0.0, seed=0, value=0.80, q=math.nan),
            dict(label="base", method="base", rate=1.0, seed=0, value=0.40, q=math.nan)]
    for rate, values in ((0.5, (0.78, 0.80, 0.79)), (0.99, (0.60, 0.70, 0.65))):
        rows += [dict(label="dare", method="dare", rate=rate, seed=s, value=v, q=1 - rate) for s, v in enumerate(values)]
        rows.append(dict(label="magnitude", method="magnitude", rate=rate, seed=0, value=0.7, q=math.nan))
    rows.append(dict(label="dare", method="dare", rate=0.99, seed=3, value=math.nan, q=0.01, status="failed"))
    df = pd.DataFrame(rows).assign(metric="accuracy")
    df["status"] = df["status"].fillna("ok")
    return df


def test_summarise_student_t_interval_over_seeds():
    c = summarise(_rows()).set_index(["label", "rate"])
    r = c.loc[("dare", 0.99)]
    assert r["n_seeds"] == 3  # the failed point is left out
    assert r["mean"] == pytest.approx(0.65)
    # sd 0.05, t(0.975, 2) = 4.3027: half-width 4.3027 * 0.05 / sqrt(3)
    assert (r["hi"] - r["lo"]) / 2 == pytest.approx(4.302653 * 0.05 / math.sqrt(3), rel=1e-5)
    mag = c.loc[("magnitude", 0.5)]
    assert mag["n_seeds"] == 1 and mag["lo"] == mag["hi"] == 0.7  # one seed: no interval
    mm = summarise(_rows(), interval="minmax").set_index(["label", "rate"]).loc[("dare", 0.99)]
    assert (mm["lo"], mm["hi"]) == (0.60, 0.70)
    assert {"finetuned", "base"} <= set(c.reset_index()["method"])


def test_summarise_bad_input_names_the_choices():
    with pytest.raises(ValueError, match="ci95"):
        summarise(_rows(), interval="iqr")
    with pytest.raises(ValueError, match="accuracy"):
        summarise(_rows(), metric="f1")


@pytest.mark.parametrize("log_rate", [False, True])
def test_metric_curves_lines_bands_and_references(log_rate):
    fig = plots.metric_curves(_rows(), log_rate=log_rate)
    names = [t.name for t in fig.data]
    assert names.count("dare") == names.count("magnitude") == 1
    assert "dare interval" in names and "magnitude interval" in names
    assert "finetuned (0.800)" in names and "base (0.400)" in names
    dare = next(t for t in fig.data if t.name == "dare")
    if log_rate:  # x = kept fraction on a reversed log axis
        assert list(dare.x) == pytest.approx([0.5, 0.01])
        assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.autorange == "reversed"
    else:
        assert list(dare.x) == [0.5, 0.99]
    assert list(dare.y) == pytest.approx([0.79, 0.65])


def test_metric_curves_redraws_into_a_given_figure():
    fig = plots.metric_curves(_rows())
    again = plots.metric_curves(_rows()[lambda d: d["label"] != "magnitude"], figure=fig)
    assert again is fig and "magnitude" not in [t.name for t in fig.data]


def test_q_vs_rate_plots_the_mean_q_per_rate_with_dare_reference():
    fig = plots.q_vs_rate(_rows())
    dare = next(t for t in fig.data if t.name == "dare")
    assert list(dare.x) == [0.5, 0.99] and list(dare.y) == pytest.approx([0.5, 0.01])
    assert fig.data[0].name.startswith("DARE: q = 1 - rate")
