"""partials_fast against the reference partials_torch: exact counts, histogram and max, sums within the stated bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deltakit import partials as partials_mod
from deltakit.partials import N_BINS, THRESHOLDS, partials_fast, partials_torch

EXACT = ("count", "nonfinite", "zeros", "absmax")
# fp64 products, fp64 sums in another order: |error| <= 1e-12 * sum(|term|)  (term: d, d^2, d^3, d^4)
FP64_SUMS = {"sum": 1, "sumsq": 2, "sum3": 3, "sum4": 4}
FP32_BLOCK_RTOL = 1e-6  # sumabs, base_sumsq: fp32 sums of 16 entries, added in fp64


def _assert_agree(base: torch.Tensor, ft: torch.Tensor, **kw) -> None:
    ref, got = partials_torch(base, ft), partials_fast(base, ft, **kw)
    for name in EXACT:
        assert getattr(got, name) == getattr(ref, name), name
    np.testing.assert_array_equal(got.below, ref.below)
    np.testing.assert_array_equal(got.hist, ref.hist)
    assert got.hist.dtype == ref.hist.dtype == got.below.dtype == np.int64
    d = ft.reshape(-1).float() - base.reshape(-1).float()
    a = d[torch.isfinite(d)].double().abs()
    for name, power in FP64_SUMS.items():
        scale = float((a**power).sum())  # sum(|term|): the size of the rounding of a reordered fp64 sum
        assert abs(getattr(got, name) - getattr(ref, name)) <= 1e-12 * scale, name
    for name in ("sumabs", "base_sumsq"):
        r, g = getattr(ref, name), getattr(got, name)
        if math.isnan(r):
            assert math.isnan(g), name
        else:
            assert g == pytest.approx(r, rel=FP32_BLOCK_RTOL, abs=0), name


def _sft_pair(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT-like: base weights ~0.02, deltas ~1e-3 with a few 20x larger rows, rounded to the storage dtype."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    scale = torch.where(torch.rand(n, generator=g) < 0.005, 20.0, 1.0) * 1e-3
    ft = base + torch.randn(n, generator=g) * scale
    return base.to(dtype), ft.to(dtype)


def _boundary_values() -> torch.Tensor:
    """Every bin edge and threshold boundary (the smallest fp32 |d| the reference puts at or above it), +-1, 2 ulps."""
    table = partials_mod._bin_table()
    bits = torch.from_numpy(table.bounds).to(torch.int64)
    near = torch.cat([bits + k for k in (-2, -1, 0, 1, 2)])
    return near.clamp(0, partials_mod._MAX_FINITE).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [None, 4096])
def test_sft_like_deltas(dtype, chunk):
    base, ft = _sft_pair(7 * 1771, dtype, seed=0)  # 12397 entries: three chunks of 4096 and a ragged tail
    ft[:50] = base[:50]  # exact zeros
    kw = {} if chunk is None else {"chunk": chunk}
    _assert_agree(base.reshape(-1, 7), ft.reshape(-1, 7), **kw)


def test_mixed_and_other_dtypes():
    base, ft = _sft_pair(5000, torch.float32, seed=1)
    _assert_agree(base.to(torch.bfloat16), ft)
    _assert_agree(base.half(), ft.half())
    _assert_agree(base.double(), ft.double() + 1e-9)  # fp64 inputs are rounded to fp32 first, as in the reference


def test_every_bin_edge_and_threshold_exactly_and_one_ulp_around():
    x = _boundary_values()
    assert x.numel() == 5 * (N_BINS - 1 + len(THRESHOLDS) + 1)  # edges, thresholds, the zero split: all distinct
    both_signs = torch.cat([x, -x])
    _assert_agree(torch.zeros_like(both_signs), both_signs)
    _assert_agree(-both_signs, torch.zeros_like(both_signs), chunk=1000)  # d = 0 - (-x): the base carries |d|
    ref = partials_torch(torch.zeros_like(x), x)
    assert np.all(ref.hist[1:] >= 2)  # each edge's values -2..-1 ulp and 0..2 ulps fall on either side of it


def test_zeros_tiny_huge_and_special_values():
    values = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 1e-38, 1e-12, 1e-10, 9.99, 10.0, 1e3, 1e19, 1e30, 3.4e38, -3.4e38]
    ft = torch.tensor(values * 3)
    _assert_agree(torch.zeros_like(ft), ft)
    _assert_agree(torch.zeros(100), torch.zeros(100))  # all zeros: every entry in bin 0, zeros == count


def test_nonfinite_entries_counted_and_excluded():
    base, ft = _sft_pair(10_000, torch.float32, seed=2)
    ft[3], ft[4000], ft[9999] = float("nan"), float("inf"), float("-inf")
    base[17] = float("inf")  # d = -inf, and base_sumsq = inf in both
    _assert_agree(base, ft, chunk=1024)
    got = partials_fast(base, ft, chunk=1024)
    assert got.nonfinite == 4 and got.count == 9_996 and math.isinf(got.base_sumsq)
    base[17] = float("nan")
    assert math.isnan(partials_fast(base, ft).base_sumsq)
    nan = torch.full((7,), float("nan"))
    _assert_agree(torch.zeros(7), nan)  # nothing finite: count 0, absmax 0


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1023, 1025])
def test_empty_and_odd_sizes(n):
    base, ft = _sft_pair(n, torch.bfloat16, seed=n)
    _assert_agree(base, ft, chunk=512)


def test_base_sumsq_outside_the_fp32_square_range():
    g = torch.Generator().manual_seed(3)
    for scale in (1e-30, 1e-20, 1e20, 1e30):  # fp32 squares underflow / overflow: recomputed in fp64
        base = torch.randn(1000, generator=g) * scale
        ft = base + torch.randn(1000, generator=g) * 1e-3
        _assert_agree(base, ft)


def test_non_contiguous_inputs():
    base, ft = _sft_pair(64 * 48, torch.bfloat16, seed=4)
    _assert_agree(base.reshape(64, 48).t(), ft.reshape(64, 48).t(), chunk=1000)


@pytest.mark.parametrize("case", ["inseparable", "infinite"])
def test_boundaries_the_table_cannot_hold_are_counted_directly(monkeypatch, case):
    # inseparable: thresholds one fp32 ulp below four bin edges whose low 16 bits differ, so no single bucket shift
    # separates all four pairs; infinite: a threshold past every finite value. Such boundaries leave the table and are
    # counted by a direct comparison. Still exact.
    edges = partials_mod._bin_table().bounds[partials_mod._bin_table().edge_at]
    picks = [int(e) for e in edges[[300, 555, 730, 905]]]
    assert len({p % (1 << 16) for p in picks}) == 4
    thresholds = tuple(float(torch.tensor([p - 1], dtype=torch.int32).view(torch.float32)) for p in picks)
    if case == "infinite":
        thresholds = (*THRESHOLDS[:3], math.inf)
    monkeypatch.setattr(partials_mod, "THRESHOLDS", thresholds)
    partials_mod._bin_table.cache_clear()
    try:
        table = partials_mod._bin_table()
        assert len(table.extra) >= (3 if case == "inseparable" else 1)
        x = _boundary_values()
        _assert_agree(torch.zeros_like(x), x, chunk=999)
        if case == "infinite":
            assert partials_fast(torch.zeros_like(x), x).below[3] == x.numel()
    finally:
        partials_mod._bin_table.cache_clear()


def test_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        partials_fast(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="float"):
        partials_fast(torch.zeros(3, dtype=torch.int32), torch.zeros(3))
    with pytest.raises(ValueError, match="CPU"):
        partials_fast(torch.zeros(3, device="meta"), torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="chunk"):
        partials_fast(torch.zeros(3), torch.zeros(3), chunk=0)


def test_delta_stats_uses_the_fast_path_on_cpu(monkeypatch):
    from deltakit import stats

    calls = []
    monkeypatch.setattr(stats, "partials_fast", lambda b, f: calls.append(b.numel()) or partials_torch(b, f))
    stats._partials(torch.zeros(5), torch.ones(5))
    assert calls == [5]
