"""The pruning-method registry and every registered method.

The parametrized suite runs over ``available_methods()``, so a method registered later is tested automatically;
a method with required parameters must add them to ``example_params`` (the suite fails until it does).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from deltakit import masks
from deltakit.methods import (
    MethodInfo,
    RandomPlan,
    available_methods,
    get_method,
    method_params,
    register,
    registry,
)
from deltakit.methods.dare import dare, darex_q, drop_only
from deltakit.methods.magnitude import drop_count, magnitude, wanda
from deltakit.methods.structural import structural

ALL = available_methods()
RANDOM = [m for m in ALL if get_method(m).random]
DETERMINISTIC = [m for m in ALL if not get_method(m).random]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(48, 64), (96,)]
NAME = "encoder.layer.0.attention.self.query.weight"


def make_delta(shape=(48, 64), dtype=torch.float32, seed=0) -> torch.Tensor:
    """Small Gaussian delta without exact zeros (so 'kept' == 'nonzero output')."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(shape, generator=g) * 1e-3
    d = torch.where(d == 0, torch.full_like(d, 1e-3), d)
    return d.to(dtype)


def example_params(method: str, delta: torch.Tensor, rate: float) -> dict:
    """Valid parameters of ``method`` for ``delta`` at ``rate`` (methods with required params are listed here)."""
    params: dict = {}
    if method == "darex_q":
        params["q"] = 1.0 - rate / 2  # inside [1 - rate, 1] at every rate; the mask does not depend on q
    if method == "wanda" and delta.dim() == 2:
        params["act_norms"] = torch.linspace(0.5, 2.0, delta.shape[1])
    required = [p.name for p in get_method(method).params.values() if p.default is p.empty and p.name not in params]
    if required:
        pytest.fail(f"method {method!r} has required parameters {required}: add them to example_params()")
    return params


def run(method: str, delta: torch.Tensor, rate: float, seed: int = 0, name: str = NAME, **extra) -> torch.Tensor:
    params = {**example_params(method, delta, rate), **extra}
    return get_method(method).fn(delta, rate=rate, seed=seed, name=name, **params)


def independent_units(method: str, delta: torch.Tensor, rate: float) -> int:
    """How many independent keep/drop draws a random method makes (entries, rows or columns)."""
    info = get_method(method)
    if info.plan is None:
        return delta.numel()
    axis = info.plan(delta, rate=rate, **example_params(method, delta, rate)).axis
    rows, cols = masks.matrix_shape(delta.shape)
    return {"element": delta.numel(), "row": rows, "col": cols}[axis]


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


def test_builtin_methods_are_registered_with_their_schema():
    assert {"dare", "drop_only", "darex_q", "magnitude", "wanda", "structural"} <= set(ALL)
    assert ALL == sorted(ALL)
    schema = {m: {n: (p.annotation, p.default) for n, p in method_params(m).items()} for m in ALL}
    assert schema["dare"] == {} and schema["drop_only"] == {}
    assert schema["darex_q"] == {"q": (float | torch.Tensor, inspect.Parameter.empty)}
    assert schema["magnitude"] == {"rescale": (bool, False)}
    assert schema["wanda"] == {"act_norms": (torch.Tensor | None, None)}
    assert schema["structural"] == {"axis": (str, "row"), "q": (float | None, None)}
    info = get_method("dare")
    assert isinstance(info, MethodInfo) and info.pretty_name == "DARE" and "2311.03099" in info.reference
    assert info.random and info.fn is dare and "1 / (1 - rate)" in info.summary
    assert [m for m in ALL if get_method(m).random] == ["dare", "darex_q", "drop_only", "structural"]


def test_unknown_method_lists_the_registered_ones_and_how_to_add_one():
    with pytest.raises(KeyError) as err:
        get_method("dare_ties")
    message = str(err.value)
    assert "'dare_ties'" in message and all(m in message for m in ALL) and "register" in message


def test_registering_a_method_makes_it_available(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after the test

    @register(name="halve", pretty_name="Halve", reference="test", random=False)
    def halve(delta: torch.Tensor, *, rate: float, seed: int, name: str, factor: float = 0.5) -> torch.Tensor:
        """Multiply by a factor."""
        return delta * factor

    assert "halve" in available_methods()
    assert list(method_params("halve")) == ["factor"]
    assert torch.equal(halve(torch.ones(3), rate=0.1, seed=0, name="w"), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="rate"):
        halve(torch.ones(3), rate=2.0, seed=0, name="w")  # the registry adds the input checks


@pytest.mark.parametrize(
    "source, match",
    [
        ("def f(x, *, rate: float, seed: int, name: str): ...", "first parameter"),
        ("def f(delta, *, rate: float, seed: int): ...", "missing keyword-only"),
        ("def f(delta, alpha: float, *, rate: float, seed: int, name: str): ...", "keyword-only"),
        ("def f(delta, *, rate: float, seed: int, name: str, **kw): ...", "keyword-only"),
        ("def f(delta, *, rate: float, seed: int, name: str, alpha=1.0): ...", "annotations"),
        ("def f(delta, *, rate: float, seed: int, name: str, allow_nonfinite: bool = False): ...", "reserved"),
    ],
)
def test_register_rejects_functions_that_break_the_contract(source, match, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    namespace: dict = {}
    exec(source, namespace)
    with pytest.raises(ValueError, match=match):
        register(name="broken", pretty_name="Broken", reference="test", random=False)(namespace["f"])
    assert "broken" not in available_methods()


def test_register_rejects_duplicates_bad_names_and_mismatched_plans(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def f(delta: torch.Tensor, *, rate: float, seed: int, name: str, q: float = 1.0) -> torch.Tensor:
        return delta

    with pytest.raises(ValueError, match="already registered"):
        register(name="dare", pretty_name="x", reference="x", random=True)(f)
    with pytest.raises(ValueError, match="lowercase identifier"):
        register(name="Bad Name", pretty_name="x", reference="x", random=False)
    with pytest.raises(ValueError, match="random=True"):
        register(name="p", pretty_name="x", reference="x", random=False, plan=lambda like, *, rate, q: None)
    with pytest.raises(ValueError, match="plan must take"):
        register(name="p", pretty_name="x", reference="x", random=True, plan=lambda like, *, rate: None)(f)


def test_random_plan_validates_itself():
    with pytest.raises(ValueError, match="axis"):
        RandomPlan(axis="diagonal", scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        RandomPlan(axis="element", scale=torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# The contract, for every registered method
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rate_zero_is_identity(method, dtype, shape):
    delta = make_delta(shape, dtype)
    out = run(method, delta, 0.0)
    assert out.dtype == dtype and out.shape == delta.shape
    assert torch.equal(out, delta)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_input_and_params_untouched(method, shape):
    delta = make_delta(shape)
    before = delta.clone()
    params = example_params(method, delta, 0.5)
    params_before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    out = get_method(method).fn(delta, rate=0.5, seed=0, name=NAME, **params)
    assert out.data_ptr() != delta.data_ptr()
    assert torch.equal(delta.view(torch.int32), before.view(torch.int32))  # bit for bit
    for k, v in params.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, params_before[k])


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rate", [0.3, 0.9])
def test_low_precision_inputs_compute_in_fp32_and_round_once(method, dtype, rate):
    delta = make_delta((48, 64), dtype)
    out = run(method, delta, rate)
    assert out.dtype == dtype and out.shape == delta.shape
    assert torch.equal(out, run(method, delta.float(), rate).to(dtype))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("rate", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_rates_are_finite_and_rate_one_is_all_zeros(method, rate, dtype):
    delta = make_delta((48, 64), dtype)
    out = run(method, delta, rate)
    assert bool(torch.isfinite(out).all())
    if rate == 1.0:
        assert not bool(out.any())


@pytest.mark.parametrize("method", RANDOM)
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_kept_fraction_is_binomial(method, rate, shape):
    delta = make_delta(shape)
    units = independent_units(method, delta, rate)
    kept = (run(method, delta, rate, seed=7) != 0).float().mean().item()
    sigma = math.sqrt(rate * (1 - rate) / units)
    assert abs(kept - (1 - rate)) <= 5 * sigma + 1e-12, (kept, units)


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9, 0.37])
@pytest.mark.parametrize("shape", SHAPES)
def test_deterministic_kept_count_is_exact_up_to_per_row_rounding(method, rate, shape):
    delta = make_delta(shape)
    kept = int((run(method, delta, rate) != 0).sum())
    rows = masks.matrix_shape(shape)[0] if len(shape) > 1 else 1
    assert abs(kept - (1 - rate) * delta.numel()) <= 0.5 * rows + 1e-9


@pytest.mark.parametrize("method", ALL)
def test_same_seed_same_output_and_seed_dependence(method):
    delta = make_delta()
    a = run(method, delta, 0.5, seed=3)
    assert torch.equal(a, run(method, delta, 0.5, seed=3))
    other_seed = run(method, delta, 0.5, seed=4)
    other_name = run(method, delta, 0.5, seed=3, name=NAME.replace("query", "key"))
    if get_method(method).random:
        assert not torch.equal(a, other_seed) and not torch.equal(a, other_name)
    else:
        assert torch.equal(a, other_seed) and torch.equal(a, other_name)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_masks_are_nested_across_rates(method, shape):
    delta = make_delta(shape)
    kept = [run(method, delta, rate, seed=1) != 0 for rate in (0.2, 0.5, 0.8, 0.95)]
    for low, high in zip(kept, kept[1:], strict=False):
        assert bool((high <= low).all())  # kept at a higher rate => kept at every lower rate
        assert int(high.sum()) < int(low.sum())


@pytest.mark.parametrize("method", ALL)
def test_independent_of_call_order_and_global_rng(method):
    a, b = make_delta(seed=1), make_delta(seed=2)
    first = (run(method, a, 0.6, name="a"), run(method, b, 0.6, name="b"))
    torch.manual_seed(12345)
    torch.rand(10)
    second_b = run(method, b, 0.6, name="b")
    second_a = run(method, a, 0.6, name="a")
    assert torch.equal(first[0], second_a) and torch.equal(first[1], second_b)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "half"])
def test_bad_rate_is_a_value_error_naming_the_value(method, rate):
    delta = make_delta()
    params = example_params(method, delta, 0.5)
    with pytest.raises(ValueError, match=r"rate") as err:
        get_method(method).fn(delta, rate=rate, seed=0, name=NAME, **params)
    assert repr(rate) in str(err.value)


@pytest.mark.parametrize("method", ALL)
def test_nonfinite_delta_is_rejected_unless_allowed(method):
    delta = make_delta()
    delta[0, 0], delta[3, 5], delta[7, 1] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(ValueError, match=r"'w\.bad'.* 3 non-finite"):
        run(method, delta, 0.5, name="w.bad")
    out = run(method, delta, 0.5, name="w.bad", allow_nonfinite=True)
    assert out.shape == delta.shape
    finite = torch.isfinite(delta)
    assert bool(torch.isfinite(out[finite]).all())  # finite entries stay finite


@pytest.mark.parametrize("method", ALL)
def test_non_float_delta_is_rejected(method):
    with pytest.raises(ValueError, match="floating-point"):
        get_method(method).fn(torch.ones(4, 4, dtype=torch.int64), rate=0.5, seed=0, name="w")


# Mean factor E[output] / delta of the random methods under example_params-like settings; a new random method
# that is not unbiased must add its factor here.
MEAN_FACTOR = {"drop_only": lambda rate: 1 - rate}
UNBIASED_PARAMS = {"darex_q": lambda rate: {"q": 1 - rate}}


@pytest.mark.parametrize(
    "method, extra",
    [(m, {}) for m in RANDOM] + [("structural", {"axis": "col"}), ("darex_q", {"q": 0.6})],
)
def test_expectation_over_seeds(method, extra):
    """E[output] = factor * delta, checked entry by entry with a CLT tolerance over many seeds."""
    rate, seeds = 0.7, 3000
    delta = make_delta((12, 16))
    params = {**UNBIASED_PARAMS.get(method, lambda r: {})(rate), **extra}
    total = torch.zeros_like(delta, dtype=torch.float64)
    for seed in range(seeds):
        total += get_method(method).fn(delta, rate=rate, seed=seed, name=NAME, **params).double()
    mean = total / seeds
    scale = 1 / params["q"] if "q" in params else (1.0 if method == "drop_only" else 1 / (1 - rate))
    factor = (1 - rate) * scale
    if "q" not in extra:
        assert factor == pytest.approx(MEAN_FACTOR.get(method, lambda r: 1.0)(rate))
    sd = (scale * delta.double()).abs() * math.sqrt(rate * (1 - rate) / seeds)
    z = (mean - factor * delta.double()).abs() / sd
    assert float(z.max()) < 5.0, float(z.max())


# ---------------------------------------------------------------------------------------------------------------
# DARE family
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.9, 1.0])
def test_dare_is_keep_mask_times_the_dare_scale(rate):
    delta = make_delta()
    keep = masks.keep_mask(5, NAME, delta.shape, rate)
    scale = 1 / (1 - rate) if rate < 1 else 1.0
    expected = torch.where(keep, delta * torch.tensor(scale, dtype=torch.float32), 0.0)
    assert torch.equal(dare(delta, rate=rate, seed=5, name=NAME), expected)
    assert torch.equal(drop_only(delta, rate=rate, seed=5, name=NAME), torch.where(keep, delta, 0.0))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9, 0.99])
def test_darex_q_spans_dare_to_drop_only(rate):
    delta = make_delta()
    kw = {"rate": rate, "seed": 2, "name": NAME}
    assert torch.equal(darex_q(delta, q=1 - rate, **kw), dare(delta, **kw))
    assert torch.equal(darex_q(delta, q=1.0, **kw), drop_only(delta, **kw))
    q = (1 - rate + 1) / 2
    expected = torch.where(masks.keep_mask(2, NAME, delta.shape, rate), delta * torch.tensor(1 / q), 0.0)
    assert torch.equal(darex_q(delta, q=q, **kw), expected)


def test_darex_q_per_row_q():
    delta = make_delta((6, 10))
    rate = 0.5
    q_rows = torch.linspace(0.5, 1.0, 6)
    out = darex_q(delta, rate=rate, seed=0, name=NAME, q=q_rows)
    keep = masks.keep_mask(0, NAME, delta.shape, rate)
    scale = (1 / q_rows.double()).float()[:, None]
    assert torch.equal(out, torch.where(keep, delta * scale, 0.0))
    # A per-row q that repeats one value equals the scalar q.
    same = darex_q(delta, rate=rate, seed=0, name=NAME, q=torch.full((6,), 0.7))
    assert torch.equal(same, darex_q(delta, rate=rate, seed=0, name=NAME, q=0.7))
    assert torch.equal(darex_q(delta, rate=rate, seed=0, name=NAME, q=torch.tensor(0.7)), same)


def test_darex_q_validates_q():
    delta = make_delta((6, 10))
    for q in (0.4, 1.01, 0.0, float("nan")):
        with pytest.raises(ValueError, match=r"q must be in \[1 - rate, 1\] = \[0\.5, 1\] for rate=0\.5") as err:
            darex_q(delta, rate=0.5, seed=0, name=NAME, q=q)
        assert repr(q) in str(err.value)
    with pytest.raises(ValueError, match=r"row 2 has q=0\.2"):
        darex_q(delta, rate=0.5, seed=0, name=NAME, q=torch.tensor([0.6, 0.6, 0.2, 0.6, 0.6, 0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="one value per row"):
        darex_q(delta, rate=0.5, seed=0, name=NAME, q=torch.full((5,), 0.7))
    with pytest.raises(ValueError, match="one value per row"):
        darex_q(make_delta((10,)), rate=0.5, seed=0, name=NAME, q=torch.full((10,), 0.7))
    with pytest.raises(ValueError, match="q must be a float"):
        darex_q(delta, rate=0.5, seed=0, name=NAME, q="0.7")
    with pytest.raises(TypeError):
        darex_q(delta, rate=0.5, seed=0, name=NAME)  # q is required
    # Rounding: q computed as 1 - rate in float64, or stored as float32, still counts as DARE's q.
    darex_q(delta, rate=0.9, seed=0, name=NAME, q=1 - 0.9)
    darex_q(delta, rate=0.9, seed=0, name=NAME, q=0.1)
    darex_q(delta, rate=0.1, seed=0, name=NAME, q=torch.full((6,), 0.9, dtype=torch.float32))
    assert not bool(darex_q(delta, rate=1.0, seed=0, name=NAME, q=0.0).any())  # rate 1: q = 0 allowed, all dropped


@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("rate", [0.3, 0.8])
def test_structural_drops_whole_rows_or_columns(axis, rate):
    delta = make_delta((40, 30))
    out = structural(delta, rate=rate, seed=1, name=NAME, axis=axis)
    kept = out != 0
    lines = kept if axis == "row" else kept.T
    assert bool((lines.all(dim=1) | ~lines.any(dim=1)).all())  # each row/column entirely kept or dropped
    keep = masks.keep_mask(1, NAME, delta.shape, rate, axis=axis)
    assert torch.equal(out, torch.where(keep, delta * torch.tensor(1 / (1 - rate)), 0.0))
    with_q = structural(delta, rate=rate, seed=1, name=NAME, axis=axis, q=1.0)
    assert torch.equal(with_q, torch.where(keep, delta, 0.0))


def test_structural_on_1d_is_elementwise_dare_and_validates():
    bias = make_delta((200,))
    assert torch.equal(structural(bias, rate=0.4, seed=0, name="b"), dare(bias, rate=0.4, seed=0, name="b"))
    with pytest.raises(ValueError, match="axis must be one of"):
        structural(make_delta(), rate=0.4, seed=0, name=NAME, axis="diag")
    with pytest.raises(ValueError, match=r"q must be in"):
        structural(make_delta(), rate=0.4, seed=0, name=NAME, q=0.5)


# ---------------------------------------------------------------------------------------------------------------
# Importance-based methods
# ---------------------------------------------------------------------------------------------------------------


def stable_keep(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Reference: stable ascending sort per row, drop the first n_drop positions."""
    order = torch.sort(scores, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :n_drop], False)
    return keep


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.7, 0.93, 1.0])
def test_magnitude_keeps_the_largest_with_exact_count_and_index_tie_break(rate):
    # Integer-valued deltas: many ties, so the tie rule matters.
    delta = (torch.arange(240) % 7 - 3).float().reshape(12, 20) * 0.25
    out = magnitude(delta, rate=rate, seed=0, name=NAME)
    n_drop = drop_count(rate, delta.numel())
    keep = stable_keep(delta.abs().reshape(1, -1), n_drop).reshape(delta.shape)
    assert torch.equal(out, torch.where(keep, delta, 0.0))
    assert int(keep.sum()) == delta.numel() - n_drop
    rescaled = magnitude(delta, rate=rate, seed=0, name=NAME, rescale=True)
    scale = 1 / (1 - rate) if rate < 1 else 1.0
    assert torch.equal(rescaled, torch.where(keep, delta * scale, 0.0))


def test_drop_count_rounds_half_up_and_is_robust_to_float_error():
    assert drop_count(0.7, 10) == 7 and drop_count(1 - 0.3, 10) == 7
    assert drop_count(0.5, 5) == 3 and drop_count(0.0, 5) == 0 and drop_count(1.0, 5) == 5
    assert [drop_count(r / 100, 37) for r in range(101)] == sorted(drop_count(r / 100, 37) for r in range(101))


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_wanda_keeps_top_scores_per_row(rate):
    delta = make_delta((8, 50))
    norms = torch.rand(50, generator=torch.Generator().manual_seed(3)) + 0.1
    norms[10:20] = norms[10]  # ties in the norms
    out = wanda(delta, rate=rate, seed=0, name=NAME, act_norms=norms)
    keep = stable_keep(delta.abs() * norms, drop_count(rate, 50))
    assert torch.equal(out, torch.where(keep, delta, 0.0))
    assert ((out != 0).sum(dim=1) == 50 - drop_count(rate, 50)).all()  # exact count per output row


def test_wanda_reduces_to_row_magnitude_and_falls_back_to_magnitude_for_1d():
    delta = make_delta((8, 50))
    out = wanda(delta, rate=0.6, seed=0, name=NAME, act_norms=torch.ones(50))
    assert torch.equal(out, torch.where(stable_keep(delta.abs(), drop_count(0.6, 50)), delta, 0.0))
    bias = make_delta((50,))
    assert torch.equal(wanda(bias, rate=0.6, seed=0, name="b"), magnitude(bias, rate=0.6, seed=0, name="b"))
    # Activation norms change the choice: a large norm protects its column.
    norms = torch.ones(50)
    norms[0] = 1e6
    assert bool((wanda(delta, rate=0.9, seed=0, name=NAME, act_norms=norms)[:, 0] != 0).all())


def test_wanda_validates_act_norms():
    delta = make_delta((8, 50))
    with pytest.raises(ValueError, match=r"expected length 50, got None"):
        wanda(delta, rate=0.5, seed=0, name=NAME)
    with pytest.raises(ValueError, match=r"expected length 50, got shape \(49,\)"):
        wanda(delta, rate=0.5, seed=0, name=NAME, act_norms=torch.ones(49))
    with pytest.raises(ValueError, match=r"expected length 50, got shape \(8, 50\)"):
        wanda(delta, rate=0.5, seed=0, name=NAME, act_norms=torch.ones(8, 50))
    with pytest.raises(ValueError, match="finite and >= 0"):
        wanda(delta, rate=0.5, seed=0, name=NAME, act_norms=-torch.ones(50))
    with pytest.raises(ValueError, match="magnitude"):
        wanda(make_delta((2, 3, 4)), rate=0.5, seed=0, name=NAME, act_norms=torch.ones(3))
