"""Delta statistics: exact moments, histogram quantiles, rollups from sums, NaN handling, cross-model similarity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from deltakit.partials import Partials, partials_torch
from deltakit.stats import DeltaStats, delta_stats
from synthetic import bert_like, write_checkpoint


def test_partials_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 70, generator=g)
    d = torch.randn(300, 70, generator=g) * 3e-3
    d[0, :5] = 0.0
    s = partials_torch(base, base + d).summary()
    dd = ((base + d) - base).double().numpy().ravel()  # the fp32 difference, as the library computes it
    a = np.abs(dd)
    assert s["numel"] == dd.size and s["zeros"] == int((dd == 0).sum())
    assert s["mean"] == pytest.approx(dd.mean(), rel=1e-9, abs=1e-15)
    assert s["std"] == pytest.approx(dd.std(), rel=1e-7)
    assert s["mean_abs"] == pytest.approx(a.mean(), rel=1e-9)
    assert s["max_abs"] == pytest.approx(a.max(), rel=1e-7)
    assert s["l2"] == pytest.approx(np.linalg.norm(dd), rel=1e-9)
    assert s["rel_norm"] == pytest.approx(np.linalg.norm(dd) / np.linalg.norm(base.double().numpy()), rel=1e-9)
    assert s["kurtosis"] == pytest.approx(sps.kurtosis(dd), rel=1e-6, abs=1e-9)
    for t in (0.002, 0.005, 0.01, 0.03):
        assert s[f"frac_below_{t:g}"] == pytest.approx((a < t).mean(), abs=0)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_histogram_quantiles_within_documented_precision(q):
    g = torch.Generator().manual_seed(1)
    d = torch.randn(200_000, generator=g).abs() * 10 ** torch.empty(200_000).uniform_(-6, -1, generator=g)
    part = partials_torch(torch.zeros_like(d), d)
    exact = float(np.quantile(d.numpy(), q))
    assert part.quantile(q) == pytest.approx(exact, rel=0.012)


def test_rollups_are_sums_not_averages_of_averages():
    g = torch.Generator().manual_seed(2)
    small = torch.randn(10, generator=g) * 1e-3  # a tiny tensor with small deltas
    big = torch.randn(10_000, generator=g) * 1e-1  # a big tensor with large deltas
    total = partials_torch(torch.zeros(10), small) + partials_torch(torch.zeros(10_000), big)
    both = torch.cat([small, big])
    assert total.summary()["mean_abs"] == pytest.approx(both.abs().double().mean().item(), rel=1e-9)
    assert total.count == 10_010 and total.hist.sum() == 10_010


def test_nonfinite_entries_are_counted_not_fatal():
    base = torch.zeros(100)
    ft = torch.full((100,), 1e-3)
    ft[3] = float("nan")
    ft[7] = float("inf")
    s = partials_torch(base, ft).summary()
    assert s["nonfinite"] == 2 and s["numel"] == 100
    assert s["mean_abs"] == pytest.approx(1e-3, rel=1e-6)


def test_low_precision_inputs_use_fp32_difference():
    base = torch.randn(1000).to(torch.bfloat16)
    ft = (base.float() + 0.01).to(torch.bfloat16)
    expected = (ft.float() - base.float()).abs().mean().item()
    assert partials_torch(base, ft).summary()["mean_abs"] == pytest.approx(expected, rel=1e-6)


def _family(tmp_path, scales):
    base = bert_like(0)
    b = write_checkpoint(tmp_path / "base", base, card={"model_id": "org/base"})
    fts = [write_checkpoint(tmp_path / f"ft{i}", bert_like(10 + i, prefix="bert.", head=True, scale=s, base=base))
           for i, s in enumerate(scales)]
    return b, fts


def test_delta_stats_end_to_end_on_disk(tmp_path):
    b, fts = _family(tmp_path, [1e-3, 1e-2])
    st = delta_stats(str(b), [str(f) for f in fts], progress=False)
    overall = st.overall.set_index("model")
    assert overall.loc["ft1", "mean_abs"] > 5 * overall.loc["ft0", "mean_abs"]
    assert set(st.tensors["model"]) == {"ft0", "ft1"}
    assert (st.tensors.groupby("model")["numel"].sum() == overall["numel"]).all()
    assert set(st.kinds["kind"]) >= {"attn_q", "attn_k", "attn_v", "attn_o", "ffn_in", "ffn_out", "embedding", "norm"}
    assert sorted(st.layers["layer"].unique()) == [-1, 0, 1]
    # The heads are new in the fine-tunes: reported as unpaired, never in the statistics.
    assert not st.tensors["tensor"].str.startswith("classifier").any()
    assert set(st.pairing.query("status == 'unpaired'")["name"]) == {"classifier.weight", "classifier.bias"}
    # Independent noise: cosine near 0, sign agreement near 1/2.
    glob = st.similarity.query("tensor == '__global__'").iloc[0]
    assert abs(glob["cosine"]) < 0.2 and 0.35 < glob["sign_agreement"] < 0.65
    assert len(st.similarity) == st.tensors["tensor"].nunique() + 1
    assert st.histograms.groupby(["model", "kind"])["count"].sum().loc[("ft0", "all")] == overall.loc["ft0", "numel"]


def test_similarity_of_identical_and_opposite_deltas(tmp_path):
    base = bert_like(0)
    ft = bert_like(5, scale=1e-3, base=base)
    neg = {k: (2 * base[k] - v if v.is_floating_point() else v) for k, v in ft.items()}
    b = write_checkpoint(tmp_path / "b", base)
    f1 = write_checkpoint(tmp_path / "f1", ft)
    f2 = write_checkpoint(tmp_path / "f2", ft)
    f3 = write_checkpoint(tmp_path / "f3", neg)
    st = delta_stats(str(b), [str(f1), str(f2), str(f3)], progress=False)
    g = st.similarity.query("tensor == '__global__'").set_index(["model_a", "model_b"])
    assert g.loc[("f1", "f2"), "cosine"] == pytest.approx(1.0, abs=1e-9)
    assert g.loc[("f1", "f2"), "sign_agreement"] == 1.0 and g.loc[("f1", "f2"), "topk_overlap"] == 1.0
    assert g.loc[("f1", "f3"), "cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert g.loc[("f1", "f3"), "sign_agreement"] == pytest.approx(0.0, abs=1e-3)


def test_save_load_and_json(tmp_path):
    b, fts = _family(tmp_path, [1e-3])
    st = delta_stats(str(b), [str(fts[0])], progress=False)
    out = st.save(tmp_path / "out")
    back = DeltaStats.load(out)
    assert back.overall.equals(st.overall) and back.meta["base"] == str(b)
    js = json.loads((out / "summary.json").read_text())
    assert js["global"]["ft0"]["mean_abs"] == pytest.approx(st.overall["mean_abs"].iloc[0])
    assert all("mean_abs" in v for v in js["kinds"]["ft0"].values())
    assert "ft0" in (out / "summary.txt").read_text()


def test_nan_delta_reported_in_summary(tmp_path):
    base = bert_like(0)
    ft = bert_like(1, scale=1e-3, base=base)
    ft["encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
    st = delta_stats(str(write_checkpoint(tmp_path / "b", base)), [str(write_checkpoint(tmp_path / "f", ft))],
                     progress=False)
    assert int(st.overall["nonfinite"].iloc[0]) == 1
    assert "NaN/Inf: 1" in st.summary()
    assert math.isfinite(st.overall["mean_abs"].iloc[0])


def test_bad_arguments(tmp_path):
    b, fts = _family(tmp_path, [1e-3])
    with pytest.raises(ValueError, match="no fine-tunes"):
        delta_stats(str(b), [], progress=False)
    with pytest.raises(ValueError, match="topk=0"):
        delta_stats(str(b), [str(fts[0])], topk=0, progress=False)


def test_partials_addition_is_associative_and_max_for_absmax():
    a = Partials(count=1, absmax=0.5, sum=1.0)
    b = Partials(count=2, absmax=0.25, sum=2.0)
    c = a + b
    assert c.count == 3 and c.absmax == 0.5 and c.sum == 3.0
