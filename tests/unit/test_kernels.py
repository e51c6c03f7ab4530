"""Triton kernels vs their torch references: fused apply bit for bit, delta statistics exact/within tolerance.

CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) with big blocks
(~10 ms per program instance). Tests marked ``gpu`` run the compiled kernels on CUDA; run them with
``TRITON_INTERPRET=0 pytest -m gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltakit import masks
from deltakit.kernels import apply as apply_mod
from deltakit.kernels.apply import (
    fused_apply_torch,
    fused_apply_triton,
    interpreter_enabled,
    resolve_backend,
    uniform_triton,
)
from triton_marks import HAS_TRITON, INT_VIEW, needs_compiled_triton, needs_interpreter


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality, except that any NaN equals any NaN (NaN payloads are not part of the contract)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), "NaN positions differ"
    ia, ib = a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])
    diff = (ia != ib) & ~nan_a
    assert not bool(diff.any()), f"{int(diff.sum())} of {a.numel()} entries differ, first at {int(diff.nonzero()[0][0])}"


def make_pair(shape, dtype, *, seed=0, delta=1e-2):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    ft = base + delta * torch.randn(shape, generator=g)
    return base.to(dtype), ft.to(dtype)


def scale_for(rate: float) -> float:
    return float("inf") if rate >= 1 else 1.0 / (1.0 - rate)


def both(base, ft, *, dst_dtype=None, **kw):
    """(triton result, torch reference result), each into a fresh dst."""
    dtype = dst_dtype or ft.dtype
    d_triton = torch.empty(base.shape, dtype=dtype)
    d_torch = torch.empty(base.shape, dtype=dtype)
    fused_apply_triton(d_triton, base, ft, **kw)
    fused_apply_torch(d_torch, base, ft, **kw)
    return d_triton, d_torch


# ------------------------------------------------------------------------------------------------ backend choice


def test_resolve_backend(monkeypatch):
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"  # the interpreter is for tests, never picked automatically
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == ("triton" if HAS_TRITON else "torch")
    with pytest.raises(ValueError, match="'tritn'"):
        resolve_backend("tritn", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if HAS_TRITON:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            resolve_backend("triton", "cpu")
    monkeypatch.setattr(apply_mod, "triton_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install deltakit\[triton\]"):
        resolve_backend("triton", torch.device("cuda"))
    assert resolve_backend("auto", torch.device("cuda")) == "torch"


# ------------------------------------------------------------------------------------------------ fused apply parity


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: d * inf at rate 1
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", ["element", "row", "col"])
@pytest.mark.parametrize("rate", [0.0, 0.5, 0.99, 1.0])
def test_fused_apply_matches_torch_scalar_scale(dtype, axis, rate):
    base, ft = make_pair((96, 211), dtype, seed=1)
    key = masks.tensor_key(4, "model.layers.2.mlp.up_proj.weight", axis)
    got, ref = both(base, ft, key=key, rate=rate, scale=scale_for(rate), axis=axis)
    assert_same_bits(got, ref)
    if rate == 1.0:  # nothing kept: exactly base, no NaN from 0 * inf
        assert_same_bits(got, base)
    if rate == 0.0:
        assert_same_bits(got, (base.float() + (ft.float() - base.float())).to(dtype))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", ["element", "row", "col"])
def test_fused_apply_matches_torch_per_row_scale(dtype, axis):
    # DAREx-q with one q per row: scale = 1 / q_row, 1 - rate <= q <= 1.
    rate = 0.7
    base, ft = make_pair((64, 129), dtype, seed=2)
    q = torch.linspace(1 - rate, 1.0, 64)
    scale = (1.0 / q.double()).float()
    key = masks.tensor_key(0, "w", axis)
    got, ref = both(base, ft, key=key, rate=rate, scale=scale, axis=axis)
    assert_same_bits(got, ref)


@needs_interpreter
@pytest.mark.parametrize(
    ("base_dtype", "ft_dtype", "dst_dtype"),
    [
        (torch.bfloat16, torch.float32, torch.float16),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float32),
        (torch.float64, torch.float32, torch.float64),
    ],
)
def test_fused_apply_mixed_dtypes(base_dtype, ft_dtype, dst_dtype):
    base, ft = make_pair((50, 70), torch.float32, seed=3, delta=0.3)
    got, ref = both(base.to(base_dtype), ft.to(ft_dtype), dst_dtype=dst_dtype, key=-5, rate=0.3, scale=1 / 0.7)
    assert_same_bits(got, ref)


@needs_interpreter
def test_fused_apply_bf16_rounds_to_nearest_even():
    # fp32 values exactly between two bf16 values, and values just above/below: RNE, as torch (not truncation).
    halfway = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1.0 + 2**-8 + 2**-20, 3.0e38, 1e-40])
    base = torch.zeros_like(halfway)
    got, ref = both(base, halfway, dst_dtype=torch.bfloat16, key=1, rate=0.0, scale=1.0)
    assert_same_bits(got, ref)
    assert_same_bits(got, halfway.to(torch.bfloat16))


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf - inf, d * inf
def test_fused_apply_special_values():
    base = torch.tensor([-0.0, 1.0, 2.0, float("inf"), 5.0, -3.0, 0.0, 7.0] * 8)
    ft = torch.tensor([1.0, float("nan"), float("inf"), 1.0, -0.0, 1e38, -0.0, 7.0] * 8)
    for rate in (0.0, 0.5, 1.0):
        for dtype in (torch.float32, torch.bfloat16):
            got, ref = both(base.to(dtype), ft.to(dtype), key=8, rate=rate, scale=2.0 if rate < 1 else float("inf"))
            assert_same_bits(got, ref)
    got, _ = both(base, ft, key=8, rate=1.0, scale=float("inf"))
    assert_same_bits(got, base)  # dropped entries keep base bit for bit, -0.0 included


@needs_interpreter
def test_fused_apply_block_size_does_not_change_the_result():
    base, ft = make_pair((3000,), torch.float32, seed=4)
    ref = torch.empty_like(base)
    fused_apply_torch(ref, base, ft, key=77, rate=0.4, scale=1 / 0.6)
    for block in (256, 4096, 1 << 16):
        out = torch.empty_like(base)
        fused_apply_triton(out, base, ft, key=77, rate=0.4, scale=1 / 0.6, block_size=block)
        assert_same_bits(out, ref)


@needs_interpreter
def test_fused_apply_in_place_on_ft_and_base():
    base, ft = make_pair((40, 60), torch.bfloat16, seed=5)
    ref = torch.empty_like(ft)
    fused_apply_torch(ref, base, ft, key=3, rate=0.5, scale=2.0)
    live = ft.clone()
    assert fused_apply_triton(live, base, live, key=3, rate=0.5, scale=2.0) is live
    assert_same_bits(live, ref)
    live_base = base.clone()
    fused_apply_triton(live_base, live_base, ft, key=3, rate=0.5, scale=2.0)
    assert_same_bits(live_base, ref)
    # the torch reference handles aliasing the same way
    live2 = ft.clone()
    fused_apply_torch(live2, base, live2, key=3, rate=0.5, scale=2.0)
    assert_same_bits(live2, ref)


@needs_interpreter
@pytest.mark.parametrize("axis", ["element", "row"])
def test_fused_apply_non_contiguous_views(axis):
    # Transposed views: the mask indexes the logical row-major order, whatever the storage order.
    base_t, ft_t = make_pair((70, 40), torch.float16, seed=6)
    base, ft = base_t.t(), ft_t.t()  # (40, 70), non-contiguous
    assert not base.is_contiguous()
    key = masks.tensor_key(1, "w", axis)
    ref = torch.empty(base.shape, dtype=base.dtype)
    fused_apply_torch(ref, base.contiguous(), ft.contiguous(), key=key, rate=0.5, scale=2.0, axis=axis)
    out = torch.empty(base.shape, dtype=base.dtype)
    fused_apply_triton(out, base, ft, key=key, rate=0.5, scale=2.0, axis=axis)
    assert_same_bits(out, ref)
    # non-contiguous dst that is a view of ft (in-place rewrite of a transposed parameter)
    storage = ft_t.clone()
    dst = storage.t()
    fused_apply_triton(dst, base, dst, key=key, rate=0.5, scale=2.0, axis=axis)
    assert_same_bits(dst, ref)
    assert_same_bits(storage, ref.t())
    storage2 = ft_t.clone()
    fused_apply_torch(storage2.t(), base, storage2.t(), key=key, rate=0.5, scale=2.0, axis=axis)
    assert_same_bits(storage2.t(), ref)


@needs_interpreter
def test_fused_apply_partial_overlap_is_not_read_after_write():
    # dst and ft share storage, shifted by one entry: the kernel must read ft before anything overwrites it.
    storage = torch.randn(1001)
    base = torch.zeros(1000)
    ft_view, dst_view = storage[1:], storage[:-1]
    ref = torch.empty(1000)
    fused_apply_torch(ref, base, ft_view.clone(), key=2, rate=0.5, scale=2.0)
    fused_apply_triton(dst_view, base, ft_view, key=2, rate=0.5, scale=2.0)
    assert_same_bits(dst_view, ref)


def test_fused_apply_torch_agrees_with_keep_mask_and_formula():
    base, ft = make_pair((30, 50), torch.float32, seed=7)
    keep = masks.keep_mask(12, "enc.w", base.shape, 0.6)
    out = torch.empty_like(base)
    fused_apply_torch(out, base, ft, key=masks.tensor_key(12, "enc.w"), rate=0.6, scale=2.5)
    expected = torch.where(keep, base + (ft - base) * torch.tensor(2.5), base)
    assert_same_bits(out, expected)
    assert 0.3 < float(keep.float().mean()) < 0.5


def test_fused_apply_torch_accepts_cached_uniforms():
    base, ft = make_pair((20, 33), torch.bfloat16, seed=8)
    for axis, m in (("element", 660), ("row", 20), ("col", 33)):
        key = masks.tensor_key(0, "w", axis)
        u = masks.uniform(key, m)
        a, b = torch.empty_like(ft), torch.empty_like(ft)
        fused_apply_torch(a, base, ft, key=key, rate=0.25, scale=4 / 3, axis=axis)
        fused_apply_torch(b, base, ft, key=key, rate=0.25, scale=4 / 3, axis=axis, u=u)
        assert_same_bits(a, b)
    with pytest.raises(ValueError, match="660"):
        fused_apply_torch(a, base, ft, key=0, rate=0.25, scale=1.0, u=masks.uniform(0, 659))


def test_fused_apply_validation():
    base, ft = make_pair((4, 5), torch.float32)
    dst = torch.empty_like(base)
    with pytest.raises(ValueError, match="same shape"):
        fused_apply_torch(dst, base, ft[:3], key=0, rate=0.5, scale=2.0)
    with pytest.raises(ValueError, match="dtype"):
        fused_apply_torch(dst, base, ft.long(), key=0, rate=0.5, scale=2.0)
    with pytest.raises(ValueError, match="1.2"):
        fused_apply_torch(dst, base, ft, key=0, rate=1.2, scale=2.0)
    with pytest.raises(ValueError, match="one value per row"):
        fused_apply_torch(dst, base, ft, key=0, rate=0.5, scale=torch.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        fused_apply_torch(dst, base, ft, key=0, rate=0.5, scale=float("nan"))
    with pytest.raises(ValueError, match="axis"):
        fused_apply_torch(dst, base, ft, key=0, rate=0.5, scale=2.0, axis="diag")
    if HAS_TRITON and interpreter_enabled():
        with pytest.raises(ValueError, match="block_size"):
            fused_apply_triton(dst, base, ft, key=0, rate=0.5, scale=2.0, block_size=1000)
    empty = torch.empty(0, 3)
    assert fused_apply_torch(empty, empty, empty, key=0, rate=0.5, scale=2.0) is empty


# ------------------------------------------------------------------------------------------------ delta statistics


def _hist64(base: torch.Tensor, ft: torch.Tensor) -> np.ndarray:
    """The |d| histogram with the bin arithmetic in fp64 (what the kernel computes)."""
    from deltakit.partials import BINS_PER_DECADE, HIST_LOG10_LO, N_BINS

    d = ft.reshape(-1).float() - base.reshape(-1).float()
    a = d[torch.isfinite(d)].abs().double()
    bins = torch.floor((torch.log10(a) - HIST_LOG10_LO) * BINS_PER_DECADE).clamp(0, N_BINS - 1)
    bins = torch.where(a == 0, torch.zeros_like(bins), bins).long()
    return torch.bincount(bins, minlength=N_BINS).numpy()


def _stats_pair(dtype, n=60_000, seed=9):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    magnitude = 10.0 ** torch.randint(-11, 2, (n,), generator=g).float()  # |d| across the whole histogram range
    ft = base + magnitude * torch.randn(n, generator=g)
    base, ft = base.to(dtype), ft.to(dtype)
    ft[7] = float("nan")
    ft[11] = float("inf")
    base[13] = float("-inf")
    ft[20:40] = base[20:40]  # exact zeros
    ft[50] = (base[50].float() + float(np.float32(0.005))).to(dtype)  # near a `below` threshold
    return base, ft


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [None, 4096])
def test_partials_triton_matches_torch(dtype, block_size, monkeypatch):
    from deltakit.kernels import stats as stats_mod
    from deltakit.partials import partials_torch

    monkeypatch.setattr(stats_mod, "_MAX_PROGRAMS", 4)  # with 4096-blocks: 15 tiles over 4 programs (the loop)
    base, ft = _stats_pair(dtype)
    got = stats_mod.partials_triton(base, ft, block_size=block_size)
    ref = partials_torch(base, ft)
    assert got.nonfinite == ref.nonfinite == 3
    assert (got.count, got.zeros, got.absmax) == (ref.count, ref.zeros, ref.absmax)
    assert ref.zeros >= 20
    np.testing.assert_array_equal(got.below, ref.below)
    for name in ("sum", "sumsq", "sum3", "sum4", "sumabs"):
        assert getattr(got, name) == pytest.approx(getattr(ref, name), rel=1e-12, abs=1e-300), name
    assert np.isnan(got.base_sumsq) is np.isnan(ref.base_sumsq)  # -inf base entry: both inf or both NaN
    assert got.base_sumsq == ref.base_sumsq or np.isnan(ref.base_sumsq)
    # Histogram: exact against the same bin arithmetic in fp64 ...
    np.testing.assert_array_equal(got.hist, _hist64(base, ft))
    assert got.hist.sum() == ref.count
    # ... and against the reference (torch.log10 instead of the kernel's log2 * log10(2), both fp64): an entry
    # within an fp64 rounding of a bin edge may move to the neighbouring bin (cumulative counts differ by a few).
    cum_diff = np.abs(np.cumsum(got.hist) - np.cumsum(ref.hist))
    assert cum_diff.max() <= 3 and np.abs(got.hist - ref.hist).sum() <= 2 * 10


@needs_interpreter
def test_partials_triton_moments_finite_inputs():
    from deltakit.kernels.stats import partials_triton
    from deltakit.partials import partials_torch

    base, ft = make_pair((123, 77), torch.bfloat16, seed=10, delta=0.05)
    got, ref = partials_triton(base, ft), partials_torch(base, ft)
    assert (got.count, got.nonfinite) == (123 * 77, 0)
    for name in ("sum", "sumsq", "sum3", "sum4", "sumabs", "base_sumsq"):
        assert getattr(got, name) == pytest.approx(getattr(ref, name), rel=1e-12), name
    assert got.absmax == ref.absmax


@needs_interpreter
def test_partials_triton_validation_and_empty():
    from deltakit.kernels.stats import partials_triton

    empty = partials_triton(torch.empty(0), torch.empty(0))
    assert empty.count == 0 and empty.hist.sum() == 0
    with pytest.raises(ValueError, match="same shape"):
        partials_triton(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="float"):
        partials_triton(torch.zeros(3, dtype=torch.int32), torch.zeros(3))


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@needs_compiled_triton
@pytest.mark.parametrize("offset", [0, 2**32 + 1])
def test_gpu_uniform_equals_cpu_bitwise(offset):
    key = masks.tensor_key(2024, "model.embed_tokens.weight")
    n = 10_000_003
    got = uniform_triton(key, n, offset=offset, device="cuda")
    assert_same_bits(got, masks.uniform(key, n, offset=offset))


@pytest.mark.gpu
@needs_compiled_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", ["element", "row", "col"])
def test_gpu_fused_apply_matches_torch(dtype, axis):
    base, ft = make_pair((1536, 2305), dtype, seed=11)
    base, ft = base.cuda(), ft.cuda()
    key = masks.tensor_key(1, "w", axis)
    for rate, scale in ((0.0, 1.0), (0.9, 10.0), (1.0, float("inf"))):
        got, ref = torch.empty_like(ft), torch.empty_like(ft)
        fused_apply_triton(got, base, ft, key=key, rate=rate, scale=scale, axis=axis)
        fused_apply_torch(ref, base, ft, key=key, rate=rate, scale=scale, axis=axis)
        assert_same_bits(got, ref)
    per_row = (1.0 / torch.linspace(0.1, 1.0, 1536, device="cuda", dtype=torch.float64)).float()
    got, ref = torch.empty_like(ft), torch.empty_like(ft)
    fused_apply_triton(got, base, ft, key=key, rate=0.9, scale=per_row, axis=axis)
    fused_apply_torch(ref, base, ft, key=key, rate=0.9, scale=per_row, axis=axis)
    assert_same_bits(got, ref)
    live = ft.clone()
    fused_apply_triton(live, base, live, key=key, rate=0.9, scale=per_row, axis=axis)
    assert_same_bits(live, ref)


@pytest.mark.gpu
@needs_compiled_triton
def test_gpu_partials_match_torch():
    from deltakit.kernels.stats import partials_triton
    from deltakit.partials import partials_torch

    base, ft = _stats_pair(torch.bfloat16, n=3_000_017)
    base, ft = base.cuda(), ft.cuda()
    got, ref = partials_triton(base, ft), partials_torch(base, ft)
    assert (got.count, got.nonfinite, got.zeros, got.absmax) == (ref.count, ref.nonfinite, ref.zeros, ref.absmax)
    np.testing.assert_array_equal(got.below, ref.below)
    for name in ("sum", "sumsq", "sum3", "sum4", "sumabs"):
        assert getattr(got, name) == pytest.approx(getattr(ref, name), rel=1e-9), name
    assert np.abs(np.cumsum(got.hist) - np.cumsum(ref.hist)).max() <= 50
