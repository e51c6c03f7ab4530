"""Tests for deltakit.darex: moments vs Monte-Carlo, closed-form q* vs brute force, analytical q vs a plain
per-row re-implementation of the DAREx objective, Φ, and the two-stage grid search."""

from __future__ import annotations

import math

import pytest
import torch

from deltakit.darex import (
    AnalyticalQ,
    analytical_q,
    error_moments,
    influence,
    optimal_q,
    phi,
    q_for_tensor,
)
from deltakit.grid_search import two_stage_grid_search


def _c(rows: int, cols: int, *, mean: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) + mean


# ---------------------------------------------------------------- influence


def test_influence_is_delta_times_mean_activation_in_fp64_with_bias_column():
    g = torch.Generator().manual_seed(1)
    dw = (torch.randn(3, 5, generator=g) * 1e-3).half()
    x = torch.randn(5, generator=g).half()
    db = (torch.randn(3, generator=g) * 1e-3).half()
    c = influence(dw, x)
    assert c.dtype == torch.float64 and c.shape == (3, 5)
    torch.testing.assert_close(c, dw.double() * x.double(), rtol=0, atol=0)
    cb = influence(dw, x, db)
    assert cb.shape == (3, 6)
    torch.testing.assert_close(cb[:, :5], c, rtol=0, atol=0)
    torch.testing.assert_close(cb[:, 5], db.double(), rtol=0, atol=0)


def test_fp64_statistics_keep_tiny_influences_that_fp16_squares_lose():
    # Pitfall 2: c ~ 1e-4 squared is ~1e-8, below fp16's smallest subnormal (6e-8) -> Q collapses in fp16.
    c = torch.full((1, 768), 1e-4, dtype=torch.float16)
    _, var = error_moments(c, rate=0.5, q=0.5)
    q_exact = 768 * float(torch.tensor(1e-4, dtype=torch.float16)) ** 2
    assert float(var[0]) == pytest.approx(0.25 * q_exact / 0.25, rel=1e-12)
    assert float((c * c).sum()) < 0.5 * q_exact  # what the fp16 reference computes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta_w": torch.zeros(3), "x_mean": torch.zeros(3)}, "delta_w has shape"),
        ({"delta_w": torch.zeros(3, 4), "x_mean": torch.zeros(3)}, r"x_mean has shape \(3,\)"),
        ({"delta_w": torch.zeros(3, 4), "x_mean": torch.zeros(4), "delta_b": torch.zeros(4)}, r"delta_b has shape"),
    ],
)
def test_influence_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        influence(**kwargs)


# ---------------------------------------------------------------- error moments


@pytest.mark.parametrize("rate", [0.5, 0.9, 0.99])
def test_error_moments_match_monte_carlo(rate):
    n, draws = 768, 4000
    c = _c(2, n, mean=0.3, seed=2)  # two rows: non-zero mean so the bias term is visible
    g = torch.Generator().manual_seed(3)
    dropped = (torch.rand(draws, n, generator=g, dtype=torch.float64) < rate).double()  # ω, 1 = dropped
    for q in (1.0 - rate, (1.0 - rate + 1.0) / 2, 1.0):
        h = (c.unsqueeze(0) * (1.0 - (1.0 - dropped.unsqueeze(1)) / q)).sum(-1)  # (draws, rows)
        mean, var = error_moments(c, rate=rate, q=q)
        sample_mean, sample_var = h.mean(0), h.var(0)
        se_mean = (var / draws).sqrt()
        assert torch.all((sample_mean - mean).abs() <= 4 * se_mean + 1e-12), (q, sample_mean, mean)
        # Var of the sample variance is about 2σ⁴/(draws-1) for a near-Gaussian H (n = 768 summands).
        se_var = var * math.sqrt(2.0 / (draws - 1))
        assert torch.all((sample_var - var).abs() <= 5 * se_var), (q, sample_var, var)


def test_error_moments_dare_is_unbiased_and_accepts_per_row_q():
    c = _c(4, 50, mean=1.0, seed=4)
    mean, var = error_moments(c, rate=0.99, q=0.01)  # 1 - 0.99 is 0.010000000000000009: accepted as DARE
    assert torch.allclose(mean, torch.zeros(4, dtype=torch.float64), atol=1e-9)
    q_rows = torch.tensor([0.01, 0.1, 0.5, 1.0])
    mean_r, var_r = error_moments(c, rate=0.99, q=q_rows)
    for i, q in enumerate(q_rows.tolist()):
        m_i, v_i = error_moments(c[i : i + 1], rate=0.99, q=q)
        assert float(mean_r[i]) == pytest.approx(float(m_i[0]), rel=1e-6)
        assert float(var_r[i]) == pytest.approx(float(v_i[0]), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 1.5, "q": 0.5}, "rate=1.5"),
        ({"rate": -0.1, "q": 0.5}, "rate=-0.1"),
        ({"rate": 0.9, "q": 0.05}, "q=0.05"),
        ({"rate": 0.9, "q": 1.2}, "q=1.2"),
        ({"rate": 1.0, "q": 0.0}, "q=0.0"),
        ({"rate": 0.9, "q": torch.tensor([0.5, 0.01, 0.5])}, "q contains 0.01"),
        ({"rate": 0.9, "q": torch.tensor([0.5, 0.5])}, r"q has shape \(2,\)"),
    ],
)
def test_error_moments_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        error_moments(_c(3, 8), **kwargs)


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(0, 4), torch.zeros(2, 3, 4)])
def test_c_must_be_a_nonempty_matrix(bad):
    with pytest.raises(ValueError, match="c has shape"):
        optimal_q(bad, rate=0.5)


def test_c_must_be_finite():
    c = _c(2, 4)
    c[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        analytical_q(c, rate=0.9, eta=1.0)


# ---------------------------------------------------------------- optimal q


@pytest.mark.parametrize("rate", [0.5, 0.9, 0.99])
def test_optimal_q_is_the_brute_force_mse_minimiser(rate):
    c = _c(6, 768, mean=0.2, seed=5)
    q_star = optimal_q(c, rate=rate)
    assert torch.all(q_star >= 1.0 - rate)
    grid = torch.linspace(1.0 - rate, 5.0, 200_001, dtype=torch.float64)  # spacing ~2.5e-5
    s, sq = c.sum(1, keepdim=True), c.square().sum(1, keepdim=True)
    mse = ((1.0 - (1.0 - rate) / grid) * s) ** 2 + rate * (1.0 - rate) * sq / grid**2  # (rows, grid)
    brute = grid[mse.argmin(dim=1)]
    assert float(q_star.max()) < 5.0  # the brute-force grid covers the optimum
    torch.testing.assert_close(q_star, brute, atol=3e-5, rtol=0)


def test_optimal_q_edge_cases():
    c = torch.tensor([[1.0, -1.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    q = optimal_q(c, rate=0.9)
    assert math.isinf(q[0]) and math.isinf(q[1])  # S = 0: no bias to trade, q* = +inf (uncapped)
    assert float(q[2]) == pytest.approx(0.1 + 0.9 * 2 / 4)
    assert torch.equal(optimal_q(c, rate=0.0), torch.ones(3, dtype=torch.float64))
    assert float(optimal_q(c, rate=1.0)[2]) == pytest.approx(0.5)


def test_optimal_q_exceeds_one_when_influences_nearly_cancel():
    c = _c(1, 768, mean=0.0, seed=6)
    c = c - c.mean() + 1e-3  # S tiny, Q large
    assert float(optimal_q(c, rate=0.9)[0]) > 1.0


# ---------------------------------------------------------------- phi


def test_phi_properties():
    assert phi(0.5) == 0.5
    assert phi(0.0) == 0.0 and phi(1.0) == 0.0
    for p in (1e-6, 0.01, 0.1, 0.3, 0.49, 0.5 - 1e-9, 0.5 + 1e-12):
        assert phi(p) == pytest.approx(phi(1.0 - p), rel=1e-9)
        assert 0.0 < phi(p) <= 0.5
        if p != 0.5 + 1e-12:
            assert phi(p) == pytest.approx((1 - 2 * p) / math.log((1 - p) / p), rel=1e-6)
    assert phi(0.5 + 1e-12) == pytest.approx(0.5, abs=1e-9)  # no 0/0 near the middle
    assert phi(1e-300) < 0.002  # tends to 0 at the ends
    values = [phi(k / 100) for k in range(1, 51)]
    assert values == sorted(values)  # increasing up to the maximum at 1/2


@pytest.mark.parametrize("rate", [-0.01, 1.01, math.nan, "0.5x"])
def test_phi_rejects_bad_rate(rate):
    with pytest.raises(ValueError, match="rate="):
        phi(rate)


# ---------------------------------------------------------------- analytical q


def _brute_force_analytical_q(rows, *, rate, eta, prob=0.95, stop_iter=0.8):
    """A plain transcription of spec §5.3: Python floats, one row at a time, a 0.001 grid up to 0.998."""
    k = math.floor(round((1.0 - rate) * 1000, 6))
    grid = [j / 1000 for j in range(max(k, 1), 999)]
    phi_p = (1 - 2 * rate) / math.log((1 - rate) / rate) if rate != 0.5 else 0.5
    sums = [(math.fsum(row), math.fsum(v * v for v in row)) for row in rows]
    best = [math.inf] * len(rows)
    chosen = [math.nan] * len(rows)
    done = [False] * len(rows)
    scanned = 0
    for q in grid:
        scanned += 1
        for i, (s, sq) in enumerate(sums):
            t1 = (1 - (1 - rate) / q) * s
            t2 = eta**2 * phi_p * sq / (4 * q**2) + math.log(2 / (1 - prob))
            r = abs(eta * t1 + t2)
            if r >= best[i]:
                done[i] = True
            if r <= best[i]:
                best[i] = r
                chosen[i] = q
        if sum(done) / len(rows) >= stop_iter:
            break
    return chosen, scanned


def _synthetic_layer(seed: int) -> torch.Tensor:
    """40 rows of every kind: positive sums of varied size (interior minima, done at different q's), negative
    sums (r falls, or crosses zero inside |.|), all-zero rows (r constant -> a tie at every grid point) and a
    row whose influences cancel exactly. 33/40 rows can be done, so stop_iter=0.8 can end the scan early."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(30, 30, generator=g, dtype=torch.float64) * 0.5 + torch.linspace(0.5, 3.0, 30).unsqueeze(1)
    neg = torch.randn(6, 30, generator=g, dtype=torch.float64) * 0.5 - 2.0
    zero = torch.zeros(3, 30, dtype=torch.float64)
    cancel = torch.tensor([[1.0, -1.0] * 15], dtype=torch.float64)
    return torch.cat([pos, neg, zero, cancel])[torch.randperm(40, generator=g)]


@pytest.mark.parametrize(
    ("rate", "eta", "stop_iter"),
    [
        (0.99, 0.5, 0.8),
        (0.99, 0.01, 0.8),
        (0.9, 0.3, 0.8),
        (0.9, 0.05, 0.8),
        (0.9, 2.0, 0.5),
        (0.95, 1.0, 1.0),
        (0.7, 0.37, 0.8),
        (0.5, 1.0, 0.8),
    ],
)
def test_analytical_q_matches_brute_force(rate, eta, stop_iter):
    c = _synthetic_layer(seed=int(rate * 100))
    result = analytical_q(c, rate=rate, eta=eta, stop_iter=stop_iter)
    expected, scanned = _brute_force_analytical_q(c.tolist(), rate=rate, eta=eta, stop_iter=stop_iter)
    assert isinstance(result, AnalyticalQ)
    assert result.n_grid_points_scanned == scanned
    assert result.row_q.tolist() == pytest.approx(expected, abs=1e-12)
    assert result.layer_q == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def test_analytical_q_ties_go_to_the_later_q_and_early_stop_counts():
    # All-zero rows: r is log(2/γ) at every q, so each grid point ties and the q moves on; each row is done at
    # the second point, so with stop_iter=0.8 the scan stops right there.
    c = torch.zeros(5, 4, dtype=torch.float64)
    result = analytical_q(c, rate=0.9, eta=1.0)
    assert result.n_grid_points_scanned == 2
    assert result.row_q.tolist() == [0.101] * 5
    # With one row whose r keeps falling (negative S), 4/5 = 0.8 rows done still stops at the second point.
    c[0] = -1.0
    result = analytical_q(c, rate=0.9, eta=1.0)
    assert result.n_grid_points_scanned == 2
    # stop_iter=1.0 needs every row done: the falling row never is, so the scan runs to 0.998.
    result = analytical_q(c, rate=0.9, eta=1.0, stop_iter=1.0)
    assert result.n_grid_points_scanned == 998 - 100 + 1
    assert result.row_q.tolist() == [0.998] * 5  # done rows keep taking ties until the scan stops


def test_analytical_q_grid_starts_at_one_minus_rate_rounded_down():
    c = -torch.ones(1, 3, dtype=torch.float64)  # r falls monotonically: the scan covers the whole grid
    assert analytical_q(c, rate=0.9, eta=1.0).n_grid_points_scanned == 899  # 0.100 .. 0.998, not from 0.099
    assert analytical_q(c, rate=0.99, eta=1.0).n_grid_points_scanned == 989  # 0.010 .. 0.998
    assert analytical_q(c, rate=0.9985, eta=1.0).n_grid_points_scanned == 998  # 0.001 (below 1 - rate) ..
    # rate 1: r does not depend on q (everything dropped), so the scan ties and stops at its second point;
    # the grid starts at 0.001 because q = 0 is skipped.
    at_one = analytical_q(c, rate=1.0, eta=1.0)
    assert at_one.n_grid_points_scanned == 2 and at_one.row_q.tolist() == [0.002]
    assert analytical_q(c, rate=0.002, eta=1.0).n_grid_points_scanned == 1  # only 0.998


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0.9, "eta": 0.0}, "eta=0.0"),
        ({"rate": 0.9, "eta": -1.0}, "eta=-1.0"),
        ({"rate": 1.2, "eta": 1.0}, "rate=1.2"),
        ({"rate": 0.9, "eta": 1.0, "prob": 1.0}, "prob=1.0"),
        ({"rate": 0.9, "eta": 1.0, "stop_iter": 0.0}, "stop_iter=0.0"),
        ({"rate": 0.9, "eta": 1.0, "q_max": 1.0}, "q_max=1.0"),
        ({"rate": 0.9, "eta": 1.0, "step": 0.0}, "step=0.0"),
        ({"rate": 0.0, "eta": 1.0}, "rate=0.0 .* grid is empty"),
    ],
)
def test_analytical_q_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        analytical_q(_c(3, 4), **kwargs)


# ---------------------------------------------------------------- q per tensor


def test_q_for_tensor_rules_bert_and_llama_names():
    layer_qs = {
        "bert.encoder.layer.0.attention.self.query.weight": 0.2,
        "bert.pooler.dense.weight": 0.4,
        "model.layers.0.self_attn.q_proj.weight": 0.3,
    }
    mean = (0.2 + 0.4 + 0.3) / 3
    assert q_for_tensor("bert.encoder.layer.0.attention.self.query.weight", layer_qs) == 0.2
    assert q_for_tensor("bert.encoder.layer.0.attention.self.query.bias", layer_qs) == 0.2
    assert q_for_tensor("bert.pooler.dense.bias", layer_qs) == 0.4
    assert q_for_tensor("model.layers.0.self_attn.q_proj.bias", layer_qs) == 0.3  # Qwen2-style q/k/v bias
    assert q_for_tensor("bert.embeddings.word_embeddings.weight", layer_qs) == pytest.approx(mean)
    assert q_for_tensor("bert.encoder.layer.0.attention.output.LayerNorm.bias", layer_qs) == pytest.approx(mean)
    assert q_for_tensor("bert.encoder.layer.0.attention.self.key.bias", layer_qs) == pytest.approx(mean)
    assert q_for_tensor("classifier.weight", layer_qs) is None
    assert q_for_tensor("classifier.dense.bias", layer_qs) is None
    assert q_for_tensor("lm_head.weight", layer_qs) is None


def test_q_for_tensor_rejects_empty_or_bad_layer_qs():
    with pytest.raises(ValueError, match="layer_qs is empty"):
        q_for_tensor("bert.embeddings.word_embeddings.weight", {})
    with pytest.raises(ValueError, match=r"layer_qs\['a.weight'\]=1.5"):
        q_for_tensor("a.weight", {"a.weight": 1.5})
    assert q_for_tensor("classifier.weight", {}) is None


# ---------------------------------------------------------------- grid search


class _Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x: float) -> float:
        self.calls.append(x)
        return self.fn(x)


def test_grid_search_reproduces_the_readme_mrpc_grid():
    objective = _Recorder(lambda x: -abs(x - 0.06))  # best coarse point 0.06
    result = two_stage_grid_search(objective, lo=0.01, hi=0.1, step=0.05)
    assert result.coarse_grid == (0.01, 0.06, 0.11)
    assert result.fine_step == 0.005
    assert result.fine_grid == tuple(round(0.015 + 0.005 * k, 10) for k in range(19))  # 0.015 .. 0.105
    assert objective.calls[:3] == [0.01, 0.06, 0.11]
    assert len(objective.calls) == len(set(objective.calls))  # 0.06 is not re-evaluated in the fine pass
    assert result.best_x == 0.06 and result.best_score == 0.0
    assert [x for x, _ in result.evaluated] == objective.calls


def test_grid_search_finds_a_fine_optimum_and_returns_the_argmax_over_all_points():
    result = two_stage_grid_search(lambda x: -((x - 0.037) ** 2), lo=0.01, hi=0.1, step=0.05)
    assert result.best_x == 0.035
    assert result.best_score == max(s for _, s in result.evaluated)
    # A coarse point can stay the overall best when the fine pass never beats it.
    result = two_stage_grid_search(lambda x: 1.0 if x == 0.06 else 0.0, lo=0.01, hi=0.1, step=0.05)
    assert result.best_x == 0.06


def test_grid_search_stops_after_patience_misses():
    objective = _Recorder(lambda x: -x)  # best at lo, every later point is a miss
    result = two_stage_grid_search(objective, lo=0.1, hi=1.0, step=0.1)
    coarse_calls = objective.calls[:5]
    assert coarse_calls == [0.1, 0.2, 0.3, 0.4, 0.5]  # 1 best + 4 misses, then stop (of 10 planned)
    assert len(result.coarse_grid) == 10
    # Fine pass from max(lo + 0.01, 0.1 - 0.09) = 0.11: the first point is its best, 4 misses, stop.
    assert objective.calls[5:] == [0.11, 0.12, 0.13, 0.14, 0.15]
    assert result.best_x == 0.1
    # A score equal to the best resets the counter.
    objective = _Recorder(lambda x: 0.0 if x in (0.1, 0.5) else -1.0)
    two_stage_grid_search(objective, lo=0.1, hi=1.0, step=0.1, patience=4)
    assert objective.calls[:9] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    objective = _Recorder(lambda x: -x)
    two_stage_grid_search(objective, lo=0.1, hi=1.0, step=0.1, patience=2)
    assert objective.calls[:3] == [0.1, 0.2, 0.3]


def test_grid_search_decoder_lower_bound_and_inclusive_hi():
    objective = _Recorder(lambda x: -x)
    result = two_stage_grid_search(objective, lo=0.01, hi=0.1, step=0.05, encoder=False)
    # Decoder: max(0, 0.01 - 0.045) = 0 -> fine grid 0.005, 0.010, ... (0 itself is skipped).
    assert result.fine_grid[:3] == (0.005, 0.01, 0.015)
    assert result.best_x == 0.005
    # hi on the grid is included; the CoLA README search 0.1-0.5 step 0.1 has five coarse points.
    result = two_stage_grid_search(lambda x: x, lo=0.1, hi=0.5, step=0.1)
    assert result.coarse_grid == (0.1, 0.2, 0.3, 0.4, 0.5)


def test_grid_search_ignores_nan_scores():
    result = two_stage_grid_search(lambda x: math.nan if x < 0.05 else -x, lo=0.01, hi=0.1, step=0.05)
    assert result.best_x == 0.06
    with pytest.raises(ValueError, match="every score was NaN"):
        two_stage_grid_search(lambda x: math.nan, lo=0.01, hi=0.1, step=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lo": 0.0, "hi": 0.1, "step": 0.05}, "lo=0.0"),
        ({"lo": 0.2, "hi": 0.1, "step": 0.05}, "hi=0.1"),
        ({"lo": 0.01, "hi": 0.1, "step": -0.05}, "step=-0.05"),
        ({"lo": 0.01, "hi": 0.1, "step": 0.05, "decay": 1.0}, "decay=1.0"),
        ({"lo": 0.01, "hi": 0.1, "step": 0.05, "patience": 0}, "patience=0"),
        ({"lo": 0.01, "hi": math.inf, "step": 0.05}, "hi=inf"),
    ],
)
def test_grid_search_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_stage_grid_search(lambda x: x, **kwargs)
