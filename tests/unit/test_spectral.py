"""Spectral delta statistics: exact values on constructed matrices, randomized vs exact SVD, merged-LoRA detection,
zero and non-finite deltas, seeds, bad arguments; the columns delta_stats adds, the summary line, the figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from deltakit.plots import spectral_figure
from deltakit.spectral import SPECTRAL_COLUMNS, spectral_stats
from deltakit.stats import DeltaStats, delta_stats
from synthetic import bert_like, write_checkpoint


def _with_singular_values(s: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An (m, n) matrix U diag(s) V^T with random orthonormal U, V: its singular values are exactly ``s`` (and 0)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return ((u * torch.tensor(s, dtype=torch.float64)) @ v.T).float()


def _erank(s: list[float]) -> float:
    p = np.asarray(s, dtype=float) / sum(s)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_known_singular_values_give_exact_statistics():
    st = spectral_stats(_with_singular_values([5, 4, 3, 2, 1], 200, 150), k=3)
    assert list(st) == list(SPECTRAL_COLUMNS)
    assert st["stable_rank"] == pytest.approx(55 / 25, rel=1e-5)  # sum s^2 / s_max^2
    assert st["effective_rank"] == pytest.approx(_erank([5, 4, 3, 2, 1]), rel=1e-4)
    assert st["energy_top_k"] == pytest.approx(50 / 55, rel=1e-5)
    assert (st["rank_90"], st["rank_99"]) == (3.0, 5.0)  # cumulative shares .45 .75 .91 .98 1
    assert st["spectral_exact"] is True
    assert st["low_rank"] is False  # rank_99 = 5 > k = 3
    assert spectral_stats(_with_singular_values([5, 4, 3, 2, 1], 200, 150), k=8)["low_rank"] is True  # 5 <= 150 / 8


@pytest.mark.parametrize("shape", [(6, 6), (6, 40), (40, 6)])
def test_diagonal_matrices(shape):
    d = torch.zeros(shape)
    d[0, 0], d[1, 1], d[2, 2] = 3.0, -2.0, 1.0  # singular values 3, 2, 1 (signs do not matter)
    st = spectral_stats(d, k=2)
    assert st["stable_rank"] == pytest.approx(14 / 9, rel=1e-6)
    assert st["effective_rank"] == pytest.approx(_erank([3, 2, 1]), rel=1e-6)
    assert st["energy_top_k"] == pytest.approx(13 / 14, rel=1e-6)
    assert (st["rank_90"], st["rank_99"]) == (2.0, 3.0)
    assert st["low_rank"] is False  # min(m, n) = 6 < 8: never low-rank


def test_equal_singular_values_tie_exactly_at_the_threshold():
    st = spectral_stats(torch.eye(10) * 0.01, k=64)
    assert st["stable_rank"] == pytest.approx(10, rel=1e-6) and st["effective_rank"] == pytest.approx(10, rel=1e-6)
    assert (st["rank_90"], st["rank_99"]) == (9.0, 10.0)  # 9 of 10 equal values are exactly 90%
    assert st["energy_top_k"] == 1.0  # k capped at min(m, n) = 10


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)], ids=["tall", "wide"])
def test_exact_spectrum_matches_numpy_svd(shape):
    g = torch.Generator().manual_seed(5)
    d = torch.randn(*shape, generator=g) * torch.linspace(1.0, 0.01, shape[1])  # a decaying, full-rank spectrum
    st = spectral_stats(d, k=16)
    s = np.linalg.svd(d.double().numpy(), compute_uv=False)
    cum = np.cumsum(s**2) / (s**2).sum()
    assert st["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    assert st["effective_rank"] == pytest.approx(_erank(list(s)), rel=1e-9)
    assert st["energy_top_k"] == pytest.approx(cum[15], rel=1e-9)
    assert st["rank_90"] == 1 + np.searchsorted(cum, 0.9) and st["rank_99"] == 1 + np.searchsorted(cum, 0.99)


def test_rank_r_product_is_low_rank_and_matches_numpy():
    g = torch.Generator().manual_seed(3)
    r = 6
    d = torch.randn(300, r, generator=g) @ torch.randn(r, 200, generator=g) * 1e-3  # rank 6
    st = spectral_stats(d)
    s = np.linalg.svd(d.double().numpy(), compute_uv=False)
    assert st["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-5) and st["stable_rank"] <= r
    assert st["effective_rank"] == pytest.approx(_erank(list(s[:r])), rel=1e-3)  # fp32 noise beyond rank r
    assert st["rank_99"] <= r and st["rank_90"] <= st["rank_99"]
    assert st["energy_top_k"] == pytest.approx(1.0, abs=1e-6)
    assert st["low_rank"] is True and st["spectral_exact"] is True


def test_randomized_agrees_with_exact_on_a_2000_by_1500_matrix():
    """Decaying spectrum: energy_top_k and stable_rank within 0.1%; flat (Gaussian) spectrum: the randomized SVD can
    only underestimate the top singular values, so energy_top_k is low and stable_rank high, by at most 15%."""
    g = torch.Generator().manual_seed(0)
    decaying = torch.randn(2000, 1500, generator=g) * torch.arange(1, 1501.0) ** -1.0  # (2000, 1500)
    flat = torch.randn(2000, 1500, generator=g)
    results = {}
    for name, d, tol in (("decaying", decaying, 1e-3), ("flat", flat, 0.15)):
        exact = spectral_stats(d, exact_max=1500)
        rand = spectral_stats(d)  # min(m, n) = 1500 > exact_max = 1024
        assert exact["spectral_exact"] is True and rand["spectral_exact"] is False
        assert exact["energy_top_k"] * (1 - tol) <= rand["energy_top_k"] <= exact["energy_top_k"] * (1 + 1e-6)
        assert exact["stable_rank"] * (1 - 1e-6) <= rand["stable_rank"] <= exact["stable_rank"] * (1 + tol)
        results[name] = exact, rand
    exact, rand = results["decaying"]
    assert rand["rank_90"] == exact["rank_90"] <= 64 and rand["rank_99"] == exact["rank_99"] <= 64
    exact, rand = results["flat"]
    assert math.isnan(rand["rank_99"]) and exact["rank_99"] > 64  # more than k needed: unknown without the tail


@pytest.mark.parametrize("shape, exact_max", [((768, 768), 1024), ((1280, 1152), 1024)], ids=["exact", "randomized"])
def test_merged_lora_in_bf16_is_flagged_and_full_rank_delta_is_not(shape, exact_max):
    m, n = shape
    g = torch.Generator().manual_seed(7)
    w = torch.randn(m, n, generator=g) * 0.02  # base weights
    b, a = torch.randn(m, 8, generator=g) * 0.02, torch.randn(8, n, generator=g) * 0.02  # a rank-8 LoRA, alpha/r = 2
    base = w.to(torch.bfloat16)
    lora_ft = (w + 2 * b @ a).to(torch.bfloat16)  # merged, then stored in bf16: rounding noise on every entry
    sft_ft = (w + 1e-3 * torch.randn(m, n, generator=g)).to(torch.bfloat16)  # full fine-tune-like Gaussian delta
    lora = spectral_stats(lora_ft.float() - base.float(), exact_max=exact_max)
    sft = spectral_stats(sft_ft.float() - base.float(), exact_max=exact_max)
    assert lora["low_rank"] is True and lora["rank_99"] <= 8 and lora["stable_rank"] < 8
    assert sft["low_rank"] is False and not sft["rank_99"] <= 64  # NaN (randomized) or hundreds (exact)
    assert sft["stable_rank"] > 100 and sft["effective_rank"] > 5 * lora["effective_rank"]
    assert lora["spectral_exact"] is (exact_max >= min(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_delta_is_nan_free(dtype):
    st = spectral_stats(torch.zeros(64, 32, dtype=dtype))
    assert st == dict(stable_rank=0.0, effective_rank=0.0, energy_top_k=1.0, rank_90=0.0, rank_99=0.0,
                      low_rank=False, spectral_exact=True)
    assert spectral_stats(torch.zeros(0, 5))["stable_rank"] == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_delta_is_skipped_not_fatal(bad):
    d = torch.randn(50, 40)
    d[3, 4] = bad
    before = d.clone()
    st = spectral_stats(d, exact_max=0)
    assert all(math.isnan(st[c]) for c in SPECTRAL_COLUMNS[:5])
    assert st["low_rank"] is False and st["spectral_exact"] is False
    assert torch.equal(d.isnan(), before.isnan()) and torch.equal(d.nan_to_num(), before.nan_to_num())


def test_input_untouched_low_precision_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(120, 90, generator=g)
    before = d.clone()
    ref = spectral_stats(d)
    assert torch.equal(d, before)
    tiny = spectral_stats(d * 1e-30)  # squares would underflow fp32 without the rescale
    big = spectral_stats(d * 1e30)
    for c in SPECTRAL_COLUMNS[:5]:
        assert tiny[c] == pytest.approx(ref[c], rel=1e-5) and big[c] == pytest.approx(ref[c], rel=1e-5)
    assert tiny["low_rank"] == big["low_rank"] == ref["low_rank"]
    half = spectral_stats(d.to(torch.bfloat16))
    assert half["stable_rank"] == pytest.approx(ref["stable_rank"], rel=0.02)


def test_randomized_svd_is_reproducible_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(400, 300, generator=g)  # flat spectrum: the estimate depends on the test matrix
    state = torch.random.get_rng_state()
    first = spectral_stats(d, k=8, exact_max=0, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert spectral_stats(d, k=8, exact_max=0, seed=5) == first
    other = spectral_stats(d, k=8, exact_max=0, seed=6)
    assert other != first and other["stable_rank"] == pytest.approx(first["stable_rank"], rel=0.2)
    assert first["spectral_exact"] is False


def test_rank_and_top_k_energy_agree():
    g = torch.Generator().manual_seed(4)
    for r in (2, 10, 40):
        d = torch.randn(150, r, generator=g) @ torch.randn(r, 120, generator=g) + 0.05 * torch.randn(150, 120,
                                                                                                      generator=g)
        st = spectral_stats(d, k=12)
        for q, col in ((0.9, "rank_90"), (0.99, "rank_99")):
            assert (st[col] <= 12) == (st["energy_top_k"] >= q - 1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k=0"), (dict(k=-3), "k=-3"), (dict(k=1.5), "k=1.5"), (dict(k=True), "k=True"),
    (dict(exact_max=-1), "exact_max=-1"), (dict(seed=-1), "seed=-1"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral_stats(torch.ones(4, 4), **kwargs)


@pytest.mark.parametrize("delta", [torch.ones(8), torch.ones(2, 3, 4), torch.ones(4, 4, dtype=torch.int64)],
                         ids=["1-D", "3-D", "int"])
def test_only_floating_matrices(delta):
    with pytest.raises(ValueError, match="2-D floating-point"):
        spectral_stats(delta)


# --- delta_stats(..., spectral=True) ---------------------------------------------------------------------------
QUERY = "encoder.layer.0.attention.self.query.weight"


def _lora_family(tmp_path):
    """A base and a fine-tune whose deltas are Gaussian noise, except a rank-1 (merged-LoRA-like) query delta."""
    base = bert_like(0)
    ft = bert_like(1, scale=1e-3, base=base)
    g = torch.Generator().manual_seed(9)
    ft[QUERY] = base[QUERY] + 1e-2 * torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g)
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "ft", ft)


def test_delta_stats_fills_spectral_columns_for_matrices_only(tmp_path):
    b, f = _lora_family(tmp_path)
    st = delta_stats(str(b), [str(f)], progress=False, spectral=True, spectral_k=4)
    t = st.tensors.set_index("tensor")
    matrices = [n for n in t.index if not n.endswith("LayerNorm.weight")]  # every other tensor of bert_like is 2-D
    assert t.loc[matrices, list(SPECTRAL_COLUMNS)].notna().all().all()
    assert t.drop(index=matrices)[list(SPECTRAL_COLUMNS)].isna().all().all()
    assert str(t["low_rank"].dtype) == "boolean" and str(t["spectral_exact"].dtype) == "boolean"
    assert t.loc[QUERY, "rank_99"] == 1.0 and bool(t.loc[QUERY, "low_rank"])
    assert list(t.index[t["low_rank"].fillna(False)]) == [QUERY]  # 8x8 Gaussian deltas need > 8/8 directions
    kinds = st.kinds.set_index("kind")
    assert kinds.loc["attn_q", "n_low_rank"] == 1 and kinds.loc["norm", "n_low_rank"] == 0
    assert math.isnan(kinds.loc["norm", "mean_stable_rank"]) and kinds.loc["ffn_in", "mean_effective_rank"] > 1
    assert f"1 of {len(matrices)} 2-D tensors" in st.summary() and st.meta["spectral_k"] == 4
    back = DeltaStats.load(st.save(tmp_path / "out"))
    pd.testing.assert_frame_equal(back.tensors, st.tensors)
    pd.testing.assert_frame_equal(back.kinds, st.kinds)
    assert back.summary() == st.summary()
    assert st.to_json()["kinds"]["ft"]["norm"]["mean_stable_rank"] is None


def test_delta_stats_without_spectral_is_unchanged(tmp_path):
    b, f = _lora_family(tmp_path)
    st = delta_stats(str(b), [str(f)], progress=False)
    assert not set(SPECTRAL_COLUMNS) & set(st.tensors) and "n_low_rank" not in st.kinds
    assert "low-rank" not in st.summary()
    with pytest.raises(ValueError, match="spectral=True"):
        spectral_figure(st.tensors)
    with pytest.raises(ValueError, match="spectral_k=0"):
        delta_stats(str(b), [str(f)], progress=False, spectral=True, spectral_k=0)


def test_spectral_figure_draws_both_panels_and_rings_low_rank_deltas(tmp_path):
    b, f = _lora_family(tmp_path)
    st = delta_stats(str(b), [str(f)], progress=False, spectral=True, spectral_k=4)
    fig = spectral_figure(st.tensors)
    low = [t for t in fig.data if t.legendgroup == "low_rank"]
    assert len(low) == 2 and all(list(t.text) == [QUERY] for t in low)
    assert low[0].name.endswith(": 1") and low[0].marker.symbol == "circle-open"
    kinds = {t.name for t in fig.data if t.legendgroup != "low_rank"}
    assert kinds == {"attn_q", "attn_k", "attn_o", "attn_v", "ffn_in", "ffn_out", "embedding"}
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log" and "ft" in fig.layout.title.text
    assert "outside blocks" in fig.layout.xaxis.ticktext
    with pytest.raises(ValueError, match="no tensors for model 'nope'"):
        spectral_figure(st.tensors, "nope")
