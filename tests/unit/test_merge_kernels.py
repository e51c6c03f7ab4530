"""The fused merge: Triton kernel and blocked CPU path vs the torch reference ``fused_merge_torch``, bit for bit.

CPU tests run the kernel in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) on small tensors
(~10 ms per program instance, one or a few programs per launch). The merge methods with a plan
(``deltakit.methods.merging``) are checked to be ``base + fn(deltas)`` through the fused merge. Tests marked ``gpu``
run the compiled kernel on CUDA against the reference on the CPU; run them with ``TRITON_INTERPRET=0 pytest -m gpu``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from deltakit import masks
from deltakit.kernels import merge as merge_mod
from deltakit.kernels.merge import MergePlan, fused_merge, fused_merge_torch
from deltakit.methods.merging import get_merge, merge_keys
from triton_marks import HAS_TRITON, INT_VIEW, needs_compiled_triton, needs_interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAME = "model.layers.3.self_attn.o_proj.weight"
SHAPE = (19, 53)  # 1007 entries: 2-D, not a multiple of any block
# (rate, lam) pairs of one parity case: every rate of the brief, both weights.
RATE_LAM = [(0.0, 1.0), (0.5, 0.5), (0.9, 1.0), (1.0, 0.5)]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality of two NaN-free tensors of one dtype and shape."""
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    assert not bool(torch.isnan(a).any() or torch.isnan(b).any()), "NaN in a result"
    assert torch.equal(a, b)
    ia, ib = a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])
    diff = ia != ib  # torch.equal says 0.0 == -0.0: the bit patterns must agree too
    first = int(diff.nonzero()[0][0]) if bool(diff.any()) else -1
    assert first < 0, f"{int(diff.sum())} of {a.numel()} entries differ, first at {first}"


def make_merge(shape, k, dtype, *, seed=0):
    """(base, fts) with fine-tune deltas of different sizes, exact zeros, and opposite pairs (TIES ties)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    base = torch.randn(n, generator=g)
    deltas = torch.stack([(1e-2 * (1 + i)) * torch.randn(n, generator=g) for i in range(k)])  # (K, n)
    deltas[:, : n // 16] = 0.0  # fine-tunes that left these entries alone
    if k > 1:
        deltas[1, n // 16: n // 8] = -deltas[0, n // 16: n // 8]  # equal mass of both signs: P + N == 0
    deltas[:, -7:] *= 100.0  # a few large deltas (outside a magnitude window)
    fts = (base + deltas).to(dtype).reshape(k, *shape)
    return base.to(dtype).reshape(shape), fts


def make_plan(k, combine, random, window, *, rate):
    """A plan as the merge methods build them: DARE's rescale when random, per fine-tune windows when asked."""
    dare = 1.0 / (1.0 - rate) if random and rate < 1.0 else 1.0
    scales = tuple(dare * (1.0 + 0.3 * i) for i in range(k))
    if not window:
        return MergePlan(combine, random, scales)
    lo = tuple(2e-3 * (1 + i) if i != 2 else math.inf for i in range(k))  # fine-tune 2 keeps nothing
    hi = tuple(0.05 * (1 + i) if i % 2 == 0 else math.inf for i in range(k))
    return MergePlan(combine, random, scales, lo=lo, hi=hi)


def merge_both(base, fts, plan, *, rate, lam, keys, dst_dtype=None, block_size=None):
    """(Triton result, reference result), each into a fresh dst."""
    dtype = dst_dtype or base.dtype
    got, ref = torch.empty(base.shape, dtype=dtype), torch.empty(base.shape, dtype=dtype)
    if block_size is None:
        assert fused_merge(got, base, fts, plan, keys=keys, rate=rate, lam=lam, backend="triton") is got
    else:
        from deltakit.kernels.merge_triton import fused_merge_triton

        fused_merge_triton(got, base, fts, plan, keys=keys, rate=rate, lam=lam, block_size=block_size)
    fused_merge_torch(ref, base, fts, plan, keys=keys, rate=rate, lam=lam)
    return got, ref


# ------------------------------------------------------------------------------------------------ Triton parity


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [False, True], ids=["all", "window"])
@pytest.mark.parametrize("random", [False, True], ids=["fixed", "random"])
@pytest.mark.parametrize("combine", ["sum", "ties"])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_fused_merge_triton_matches_torch(k, combine, random, window, dtype):
    base, fts = make_merge(SHAPE, k, dtype, seed=k)
    keys = merge_keys(7, NAME, k)
    # Random plans: every rate in bf16 (rounded in-kernel, the dtype of the models); rates 0.5 and 0.9 (with both
    # weights) in fp32 and fp16, as each Philox stream costs ~25 ms in the interpreter. Fixed plans ignore the rate.
    pairs = (RATE_LAM if dtype is torch.bfloat16 else RATE_LAM[1:3]) if random else RATE_LAM[:2]
    for rate, lam in pairs:
        plan = make_plan(k, combine, random, window, rate=rate)
        got, ref = merge_both(base, fts, plan, rate=rate, lam=lam, keys=keys)
        assert_same_bits(got, ref)
        if random and rate == 1.0:  # nothing kept: base exactly
            assert_same_bits(got, base)


@needs_interpreter
@pytest.mark.parametrize("combine", ["sum", "ties"])
def test_fused_merge_triton_block_size_and_odd_1d_size(combine):
    # 1000 + 7 entries over several programs: each program's Philox numbers at its own global indices.
    base, fts = make_merge((1000 + 7,), 3, torch.bfloat16, seed=11)
    plan = make_plan(3, combine, True, True, rate=0.5)
    keys = merge_keys(3, NAME, 3)
    _, ref = merge_both(base, fts, plan, rate=0.5, lam=0.5, keys=keys)
    for block in (256, 1 << 16):
        got, _ = merge_both(base, fts, plan, rate=0.5, lam=0.5, keys=keys, block_size=block)
        assert_same_bits(got, ref)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_merge_triton_in_place(dtype):
    base, fts = make_merge(SHAPE, 3, dtype, seed=5)
    plan = make_plan(3, "ties", True, False, rate=0.5)
    keys = merge_keys(1, NAME, 3)
    ref = fused_merge_torch(torch.empty_like(base), base, fts, plan, keys=keys, rate=0.5, lam=0.5)
    live = base.clone()  # dst is base: the merged weights replace the base in place
    assert fused_merge(live, live, fts, plan, keys=keys, rate=0.5, lam=0.5, backend="triton") is live
    assert_same_bits(live, ref)
    stack = fts.clone()  # dst is one fine-tune of the stack
    fused_merge(stack[1], base, stack, plan, keys=keys, rate=0.5, lam=0.5, backend="triton")
    assert_same_bits(stack[1], ref)
    assert_same_bits(stack[0], fts[0])
    assert_same_bits(stack[2], fts[2])
    live_ref = base.clone()  # the reference handles aliasing the same way
    fused_merge_torch(live_ref, live_ref, fts, plan, keys=keys, rate=0.5, lam=0.5)
    assert_same_bits(live_ref, ref)


@needs_interpreter
def test_fused_merge_triton_non_contiguous_and_mixed_dtypes():
    base_t, fts_t = make_merge((53, 19), 2, torch.float16, seed=6)
    base = base_t.t()  # (19, 53), non-contiguous
    fts = fts_t.transpose(1, 2)  # (2, 19, 53), non-contiguous
    plan = make_plan(2, "sum", True, True, rate=0.5)
    keys = merge_keys(2, NAME, 2)
    for dst_dtype in (torch.float16, torch.float32, torch.bfloat16):
        got, ref = merge_both(base, fts, plan, rate=0.5, lam=1.0, keys=keys, dst_dtype=dst_dtype)
        assert_same_bits(got, ref)
        got_t = torch.empty((53, 19), dtype=dst_dtype)
        fused_merge(got_t.t(), base, fts, plan, keys=keys, rate=0.5, lam=1.0, backend="triton")  # strided dst
        assert_same_bits(got_t.t(), ref)
    base64, fts64 = base.double(), fts.double()  # fp64 storage, fp32 maths
    got, ref = merge_both(base64, fts64, plan, rate=0.5, lam=1.0, keys=keys)
    assert_same_bits(got, ref)


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf - inf
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_fused_merge_triton_special_values():
    # -0.0 deltas and bases, ties of mass, overflow to inf in the sum, a bf16 tie-to-even store, and deltas that
    # underflow to -0.0 when rescaled by 0.5 (last column): the reference's sum starts from zeros (0.0 + -0.0 is
    # 0.0), so its output there is -0.0 + 0.0 = +0.0; a kernel whose sum started from -0.0 would give -0.0.
    tiny = -(2.0**-149)
    base = torch.tensor([-0.0, 0.0, 1.0, -1.0, 3e38, 1.0 + 2**-8, 2.0, -0.0, -0.0] * 4)
    ft0 = torch.tensor([-0.0, -0.0, 1.5, -0.5, 3e38, 1.0, 2.5, 0.0, tiny] * 4)
    ft1 = torch.tensor([0.0, -0.0, 0.5, -1.5, 3.4e38, 1.0 + 2**-7, 1.5, -0.0, tiny] * 4)
    fts = torch.stack([ft0, ft1])
    for combine, random, scales in itertools.product(("sum", "ties"), (False, True), ((1.0, 2.0), (0.5, 0.5))):
        plan = MergePlan(combine, random, scales)
        for dtype in (torch.float32, torch.bfloat16):
            got, ref = merge_both(base, fts, plan, rate=0.5, lam=1.0, keys=[1, 2], dst_dtype=dtype)
            got, ref = got.float(), ref.float()
            finite = torch.isfinite(ref)
            assert torch.equal(torch.isfinite(got), finite)
            assert_same_bits(got[finite], ref[finite])
            if scales == (0.5, 0.5):
                assert_same_bits(got[8::9], torch.zeros(4))  # +0.0, not -0.0


@needs_interpreter
def test_fused_merge_triton_validation():
    from deltakit.kernels.merge_triton import fused_merge_triton

    base, fts = make_merge((40,), 2, torch.float32)
    plan = make_plan(2, "sum", True, False, rate=0.5)
    keys = merge_keys(0, NAME, 2)
    with pytest.raises(ValueError, match="block_size"):
        fused_merge_triton(torch.empty_like(base), base, fts, plan, keys=keys, rate=0.5, lam=1.0, block_size=100)
    with pytest.raises(ValueError, match="one Philox key per fine-tune"):
        fused_merge_triton(torch.empty_like(base), base, fts, plan, keys=keys[:1], rate=0.5, lam=1.0)
    with pytest.raises(ValueError, match="backend='torch'"):
        fused_merge_triton(torch.empty(40, dtype=torch.float8_e4m3fn), base, fts, plan, keys=keys, rate=0.5, lam=1.0)
    empty = torch.empty(0)
    assert fused_merge_triton(empty, empty, torch.empty(2, 0), plan, keys=keys, rate=0.5, lam=1.0) is empty


# ------------------------------------------------------------------------------------------------ CPU blocked path


@pytest.mark.parametrize(("combine", "random", "window", "dtype"),
                         [("ties", True, True, torch.float32), ("sum", True, False, torch.bfloat16)])
def test_fused_merge_blocked_cpu_equals_one_reference_call(combine, random, window, dtype, monkeypatch):
    n = 600_000  # more than two blocks of 2**18 elements
    assert n > 2 * merge_mod._BLOCK
    base, fts = make_merge((n,), 3, dtype, seed=9)
    plan = make_plan(3, combine, random, window, rate=0.5)
    keys = merge_keys(5, NAME, 3)
    ref = fused_merge_torch(torch.empty_like(base), base, fts, plan, keys=keys, rate=0.5, lam=0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the blocked, threaded path even on a one-core runner
    try:
        got = fused_merge(torch.empty_like(base), base, fts, plan, keys=keys, rate=0.5, lam=0.5, backend="torch")
        assert_same_bits(got, ref)
        u = [masks.uniform(key, n) for key in keys]  # cached numbers: the blocks slice them
        got_u = fused_merge(torch.empty_like(base), base, fts, plan, keys=keys, rate=0.5, lam=0.5, u=u,
                            backend="torch")
        assert_same_bits(got_u, ref)
        live = base.clone()  # in place over the blocks
        fused_merge(live, live, fts, plan, keys=keys, rate=0.5, lam=0.5, backend="torch")
        assert_same_bits(live, ref)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ merge methods


def _method_cases():
    return [("ta", 0.0, {}), ("ties", 0.5, {}), ("dare_ta", 0.5, {}), ("dare_ta", 0.9, {"q": 0.5}),
            ("dare_ties", 0.5, {}), ("breadcrumbs", 0.5, {"top": 0.05})]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize(("name", "rate", "params"), _method_cases(), ids=lambda v: str(v) if v != {} else "")
def test_merge_methods_through_fused_merge(name, rate, params, backend):
    info = get_merge(name)
    assert info.plan is not None
    base, fts = make_merge(SHAPE, 3, torch.float32, seed=13)
    deltas = [fts[k].float() - base.float() for k in range(3)]
    plan = info.plan(deltas, rate=rate, **params)
    for lam in (0.5, 1.0):
        expected = (base.float() + info.fn(deltas, rate=rate, seed=21, name=NAME, lam=lam, **params)).to(base.dtype)
        got = fused_merge(torch.empty_like(base), base, fts, plan, keys=merge_keys(21, NAME, 3), rate=rate, lam=lam,
                          backend=backend)
        assert_same_bits(got, expected)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@needs_compiled_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_gpu_fused_merge_matches_cpu_reference(k, dtype):
    base, fts = make_merge((1537, 2053), k, dtype, seed=k)  # 3.2M entries, many programs
    base_gpu, fts_gpu = base.cuda(), fts.cuda()
    keys = merge_keys(2024, NAME, k)
    u = [masks.uniform(key, base.numel()) for key in keys]  # the reference's numbers, made once
    for combine in ("sum", "ties"):
        for random, window in ((False, False), (True, False), (False, True), (True, True)):
            for rate, lam in RATE_LAM if random else RATE_LAM[:2]:
                plan = make_plan(k, combine, random, window, rate=rate)
                ref = fused_merge_torch(torch.empty_like(base), base, fts, plan, keys=keys, rate=rate, lam=lam, u=u)
                got = fused_merge(torch.empty_like(base_gpu), base_gpu, fts_gpu, plan, keys=keys, rate=rate,
                                  lam=lam)  # backend="auto": Triton on CUDA
                assert_same_bits(got, ref)
    live = base_gpu.clone()
    plan = make_plan(k, "ties", True, True, rate=0.5)
    ref = fused_merge_torch(torch.empty_like(base), base, fts, plan, keys=keys, rate=0.5, lam=0.5, u=u)
    fused_merge(live, live, fts_gpu, plan, keys=keys, rate=0.5, lam=0.5)
    assert_same_bits(live, ref)
