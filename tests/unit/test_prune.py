"""apply_method: rewriting a live parameter with base + pruned delta, for every registered method."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from deltakit import masks
from deltakit.kernels.apply import fused_apply_torch, interpreter_enabled
from deltakit.kernels.fused import _BLOCK
from deltakit.methods import available_methods, get_method
from deltakit.prune import apply_method

ALL = available_methods()
RANDOM = [m for m in ALL if get_method(m).random]
PLANNED = [m for m in ALL if get_method(m).plan is not None]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAME = "encoder.layer.3.output.dense.weight"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def make_pair(shape=(48, 64), dtype=torch.float32, seed=0, delta_scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.05
    ft = base + torch.randn(shape, generator=g) * delta_scale
    return base.to(dtype), ft.to(dtype)


def params_for(method: str, shape, rate: float) -> dict:
    """Valid method parameters (methods with required parameters are listed here)."""
    if method == "darex_q":
        return {"q": 1.0 - rate / 2}
    if method == "wanda" and len(shape) == 2:
        return {"act_norms": torch.linspace(0.5, 2.0, shape[1])}
    required = [p.name for p in get_method(method).params.values() if p.default is p.empty]
    if required:
        pytest.fail(f"method {method!r} has required parameters {required}: add them to params_for()")
    return {}


def reference(method, base, ft, rate, seed=0, name=NAME, out_dtype=None, **params):
    """base + method(delta), all in fp32, one cast."""
    delta = ft.float() - base.float()
    pruned = get_method(method).fn(delta, rate=rate, seed=seed, name=name, **params)
    return (base.float() + pruned).to(out_dtype or base.dtype)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate", [0.3, 0.9])
@pytest.mark.parametrize("shape", [(48, 64), (130,)])
def test_apply_equals_base_plus_method_of_delta_bitwise(method, dtype, rate, shape):
    base, ft = make_pair(shape, dtype)
    params = params_for(method, shape, rate)
    dst = torch.empty_like(base)
    out = apply_method(dst, base, ft, method=method, rate=rate, seed=4, name=NAME, **params)
    assert out is dst
    assert torch.equal(dst, reference(method, base, ft, rate, seed=4, **params))


@pytest.mark.parametrize(
    "method, extra",
    [(m, {}) for m in PLANNED] + [("structural", {"axis": "col"}), ("darex_q", {"q": "rows"}),
                                  ("structural", {"q": "rows"})],
)
def test_blocked_cpu_path_equals_one_reference_call(method, extra, monkeypatch):
    """Big enough for several blocks (threads); must equal one fused_apply_torch call on the whole tensor."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # several workers even on a 1-core runner
    rows, cols = 300, 2 * _BLOCK // 300 + 7  # ~2 blocks of whole rows, rows not a divisor of the block
    base, ft = make_pair((rows, cols), torch.bfloat16, delta_scale=1e-3)
    rate = 0.6
    params = dict(params_for(method, (rows, cols), rate))
    if extra.get("q") == "rows":
        params["q"] = torch.linspace(0.4, 1.0, rows)
    elif extra:
        params.update(extra)
    plan = get_method(method).plan(ft, rate=rate, **params)
    expected = torch.empty_like(base)
    fused_apply_torch(expected, base, ft, key=masks.tensor_key(9, NAME, plan.axis), rate=rate, scale=plan.scale,
                      axis=plan.axis)
    dst = torch.empty_like(base)
    apply_method(dst, base, ft, method=method, rate=rate, seed=9, name=NAME, backend="torch", **params)
    assert torch.equal(dst, expected)
    # Cached uniforms (what a sweep passes) give the same result.
    n_rows, n_cols = masks.matrix_shape(base.shape)
    u = masks.uniform(masks.tensor_key(9, NAME, plan.axis), {"element": base.numel(), "row": n_rows,
                                                             "col": n_cols}[plan.axis])
    cached = torch.empty_like(base)
    apply_method(cached, base, ft, method=method, rate=rate, seed=9, name=NAME, backend="torch", u=u, **params)
    assert torch.equal(cached, expected)
    assert torch.equal(dst, reference(method, base, ft, rate, seed=9, **params))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rate_zero_writes_ft_bit_for_bit(method, dtype):
    # |base| >> |ft| makes base + (ft - base) != ft in fp32 for some entries: rate 0 must still give ft exactly.
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(40, 50, generator=g) * 300).to(dtype)
    ft = (torch.randn(40, 50, generator=g) * 1e-3).to(dtype)
    naive = (base.float() + (ft.float() - base.float())).to(dtype)
    if dtype == torch.float32:
        assert not torch.equal(naive, ft)  # the trap is real
    dst = torch.empty_like(base)
    apply_method(dst, base, ft, method=method, rate=0.0, seed=0, name=NAME, **params_for(method, (40, 50), 0.0))
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    assert torch.equal(dst.view(bits), ft.view(bits))


@pytest.mark.parametrize("method", RANDOM)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rate_one_writes_base_for_random_methods(method, dtype):
    base, ft = make_pair(dtype=dtype)
    dst = torch.empty_like(base)
    apply_method(dst, base, ft, method=method, rate=1.0, seed=0, name=NAME, **params_for(method, base.shape, 1.0))
    assert torch.equal(dst, base)


def test_dst_can_be_a_parameter_of_another_dtype_or_ft_itself():
    base, ft = make_pair()
    param = torch.nn.Parameter(torch.zeros(48, 64, dtype=torch.bfloat16))
    apply_method(param, base, ft, method="dare", rate=0.5, seed=1, name=NAME)
    assert param.requires_grad and param.grad_fn is None
    assert torch.equal(param.data, reference("dare", base, ft, 0.5, seed=1, out_dtype=torch.bfloat16))
    for method in ("dare", "magnitude"):
        expected = reference(method, base, ft, 0.5, seed=1)
        ft_copy = ft.clone()
        apply_method(ft_copy, base, ft_copy, method=method, rate=0.5, seed=1, name=NAME)  # in place over ft
        assert torch.equal(ft_copy, expected)


def test_fp32_in_place_over_base_or_ft_with_cached_uniforms(monkeypatch):
    """A sweep's case: fp32 live tensors, several blocks, cached numbers; dst may be base or ft itself."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    base, ft = make_pair((3, _BLOCK // 2 + 5), torch.float32, delta_scale=1e-3)
    expected = reference("dare", base, ft, 0.7, seed=2)
    u = masks.uniform(masks.tensor_key(2, NAME), base.numel())
    for over in ("base", "ft", None):
        b, f = base.clone(), ft.clone()
        dst = {"base": b, "ft": f, None: torch.empty_like(base)}[over]
        apply_method(dst, b, f, method="dare", rate=0.7, seed=2, name=NAME, backend="torch", u=u)
        assert torch.equal(dst, expected), over


def test_inputs_are_untouched():
    base, ft = make_pair()
    b0, f0 = base.clone(), ft.clone()
    for method in ALL:
        apply_method(torch.empty_like(base), base, ft, method=method, rate=0.5, seed=0, name=NAME,
                     **params_for(method, base.shape, 0.5))
    assert torch.equal(base, b0) and torch.equal(ft, f0)


def test_deterministic_methods_ignore_seed_u_and_triton_backend():
    base, ft = make_pair()
    params = params_for("wanda", base.shape, 0.5)
    a, b = torch.empty_like(base), torch.empty_like(base)
    apply_method(a, base, ft, method="wanda", rate=0.5, seed=0, name=NAME, **params)
    apply_method(b, base, ft, method="wanda", rate=0.5, seed=1, name=NAME, backend="torch", u=torch.zeros(3),
                 **params)
    assert torch.equal(a, b)


@pytest.mark.skipif(not (HAS_TRITON and interpreter_enabled()), reason="needs triton with TRITON_INTERPRET=1")
@pytest.mark.parametrize("method", PLANNED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_equals_torch_backend(method, dtype):
    base, ft = make_pair((48, 64), dtype)
    rate = 0.7
    params = params_for(method, base.shape, rate)
    if method == "darex_q":
        params["q"] = torch.linspace(0.3, 1.0, 48)
    if method == "structural":
        params["axis"] = "col"
    via_torch, via_triton = torch.empty_like(base), torch.empty_like(base)
    apply_method(via_torch, base, ft, method=method, rate=rate, seed=3, name=NAME, backend="torch", **params)
    apply_method(via_triton, base, ft, method=method, rate=rate, seed=3, name=NAME, backend="triton", **params)
    assert torch.equal(via_triton, via_torch)
    assert torch.equal(via_torch, reference(method, base, ft, rate, seed=3, **params))


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpu_bitwise(method, dtype):
    base, ft = make_pair((257, 1031), dtype)
    rate = 0.8
    params = params_for(method, base.shape, rate)
    cpu = torch.empty_like(base)
    apply_method(cpu, base, ft, method=method, rate=rate, seed=5, name=NAME, **params)
    cuda_params = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    gpu = torch.empty_like(base, device="cuda")
    apply_method(gpu, base.cuda(), ft.cuda(), method=method, rate=rate, seed=5, name=NAME, **cuda_params)
    assert torch.equal(gpu.cpu(), cpu)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_mismatched_base_and_ft_name_both():
    base, ft = make_pair()
    dst = torch.empty_like(base)
    with pytest.raises(ValueError, match=r"base is \(48, 64\) torch.float32 on cpu, ft is \(48, 63\)"):
        apply_method(dst, base, ft[:, :63], method="dare", rate=0.5, seed=0, name=NAME)
    with pytest.raises(ValueError, match=r"torch.float32 on cpu, ft is \(48, 64\) torch.bfloat16"):
        apply_method(dst, base, ft.bfloat16(), method="dare", rate=0.5, seed=0, name=NAME)
    with pytest.raises(ValueError, match=r"on cpu, ft is \(48, 64\) torch.float32 on meta"):
        apply_method(dst, base, ft.to("meta"), method="dare", rate=0.5, seed=0, name=NAME)
    with pytest.raises(ValueError, match="floating-point"):
        apply_method(dst, base.long(), ft.long(), method="dare", rate=0.5, seed=0, name=NAME)
    with pytest.raises(ValueError, match=r"dst is \(64, 48\)"):
        apply_method(dst.T, base, ft, method="dare", rate=0.5, seed=0, name=NAME)


@pytest.mark.parametrize("method", ALL)
def test_nonfinite_delta_is_rejected_with_name_and_count(method):
    base, ft = make_pair()
    ft[0, 0], ft[1, 1] = float("nan"), float("inf")
    dst = torch.zeros_like(base)
    params = params_for(method, base.shape, 0.5)
    with pytest.raises(ValueError, match=rf"{NAME!r} has 2 non-finite"):
        apply_method(dst, base, ft, method=method, rate=0.5, seed=0, name=NAME, **params)
    assert not bool(dst.any())  # rejected before anything was written
    apply_method(dst, base, ft, method=method, rate=0.5, seed=0, name=NAME, allow_nonfinite=True, **params)
    finite = torch.isfinite(ft)
    assert bool(torch.isfinite(dst[finite]).all())


def test_allow_nonfinite_semantics_dropped_is_base_kept_stays_nonfinite():
    base, ft = make_pair((4, 1000))
    ft[:, :] = float("nan")
    dst = torch.empty_like(base)
    apply_method(dst, base, ft, method="dare", rate=0.5, seed=0, name=NAME, allow_nonfinite=True)
    keep = masks.keep_mask(0, NAME, base.shape, 0.5)
    assert torch.equal(dst[~keep], base[~keep]) and bool(dst[keep].isnan().all())


def test_other_bad_arguments():
    base, ft = make_pair()
    dst = torch.empty_like(base)
    with pytest.raises(KeyError, match="registered"):
        apply_method(dst, base, ft, method="ties", rate=0.5, seed=0, name=NAME)
    with pytest.raises(ValueError, match="1.5"):
        apply_method(dst, base, ft, method="dare", rate=1.5, seed=0, name=NAME)
    with pytest.raises(ValueError, match="backend"):
        apply_method(dst, base, ft, method="magnitude", rate=0.5, seed=0, name=NAME, backend="cuda")
    with pytest.raises(ValueError, match=r"q must be in"):
        apply_method(dst, base, ft, method="darex_q", rate=0.5, seed=0, name=NAME, q=0.2)
    with pytest.raises(ValueError, match=r"q must be in"):
        apply_method(dst, base, ft, method="darex_q", rate=0.0, seed=0, name=NAME, q=0.2)  # checked at rate 0 too
    with pytest.raises(TypeError, match="unexpected keyword"):
        apply_method(dst, base, ft, method="dare", rate=0.5, seed=0, name=NAME, q=0.7)
    big_base, big_ft = make_pair((4, _BLOCK // 2 + 1))
    with pytest.raises(ValueError, match=r"u must be a 1-D float32 tensor of"):
        apply_method(torch.empty_like(big_base), big_base, big_ft, method="dare", rate=0.5, seed=0, name=NAME,
                     backend="torch", u=torch.rand(10))
