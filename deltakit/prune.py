"""Apply a pruning method to a live parameter: ``dst <- base + method(ft - base)``, in place, one cast.

In a sweep the model stays on its device and, for every prunable tensor, the base and
fine-tuned weights are kept beside it; each sweep point rewrites the model's parameter ``dst`` from them. The maths
is fp32 whatever the storage dtype, rounded once to ``dst.dtype``.

* Random mask-and-scale methods (``dare``, ``drop_only``, ``darex_q``, ``structural``: those registered with a
  :class:`~deltakit.methods.RandomPlan`) run as one fused pass, never materialising the delta, through
  ``deltakit.kernels.fused_apply``: the Triton kernel when the backend resolves to ``"triton"`` (CUDA tensors under
  ``backend="auto"``), else the torch reference ``fused_apply_torch`` over cache-sized blocks of rows on worker
  threads. Both equal ``base + method(ft - base)`` computed in fp32 bit for bit (up to the sign of zero), on CPU
  and on CUDA, because the method itself computes through the same reference.
* Every other method (``magnitude``, ``wanda``, anything registered without a plan) runs in torch on the tensors'
  device: ``delta = ft32 - base32``, ``dst = base32 + method(delta)``, cast once.

Exact ends: ``rate == 0`` writes ``ft`` itself, bit for bit, for every method. (``base + (ft - base)`` is not always
``ft`` in floating point, e.g. when ``|base| >> |ft|``, so rate 0 is special-cased rather than computed.) ``rate == 1``
writes ``base`` exactly for the random methods (every entry dropped).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deltakit import masks
from deltakit.kernels import fused_apply, resolve_backend
from deltakit.methods import get_method
from deltakit.methods.registry import check_rate

__all__ = ["apply_method", "check_pair", "check_finite_delta"]


def apply_method(
    dst: Tensor,
    base: Tensor,
    ft: Tensor,
    *,
    method: str,
    rate: float,
    seed: int,
    name: str,
    backend: str = "auto",
    u: Tensor | Callable[[str], Tensor | None] | None = None,
    allow_nonfinite: bool = False,
    **params: object,
) -> Tensor:
    """Rewrite ``dst`` in place with ``base + method(ft - base)`` (fp32 maths, one cast to ``dst.dtype``).

    Args:
        dst: The live parameter to overwrite (e.g. a model's ``nn.Parameter``; gradients are not tracked). Same shape
            and device as ``base``; any float dtype. May be ``ft`` or ``base`` itself, but must not partially
            overlap them.
        base: Base (pre-trained) weights.
        ft: Fine-tuned weights: same shape, dtype and device as ``base``.
        method: Registered method name (``deltakit.methods.available_methods()``).
        rate: Fraction of delta entries dropped, in [0, 1].
        seed: Global seed (with ``name`` it keys the mask; ignored by deterministic methods).
        name: Checkpoint tensor name.
        backend: ``"auto"`` (Triton for CUDA tensors when installed, else torch), ``"torch"`` or ``"triton"``; only
            random methods with a plan have a Triton path, the others always run in torch.
        u: Cached uniform numbers of this tensor's stream for the method's axis, ``deltakit.masks.uniform(
            masks.tensor_key(seed, name, axis), m)`` with ``m`` = numel (element), rows or columns; lets a sweep
            draw them once per seed and reuse them for every rate. Used by the torch path only (the Triton kernel
            makes them in registers) and ignored by methods without a plan. Not checked against ``seed``/``name``.
            May be a function of the plan's mask axis returning them (or None), called once the plan is built.
        allow_nonfinite: Skip the NaN/Inf check of the delta. Non-finite deltas then go through the same maths:
            a dropped entry becomes ``base`` exactly, a kept entry stays NaN/Inf; magnitude and wanda rank NaN/Inf
            as the largest scores, so they are kept first.
        **params: The method's own parameters (``deltakit.methods.method_params(method)``).

    Returns:
        ``dst``.

    Raises:
        KeyError: If ``method`` is unknown.
        ValueError: If ``rate`` is outside [0, 1]; ``base``/``ft`` differ in shape, dtype or device, or ``dst`` in
            shape or device; the delta holds NaN/Inf (unless ``allow_nonfinite``); a method parameter is invalid;
            ``u`` has the wrong length; or ``backend`` is unknown or unusable for the device.
    """
    info = get_method(method)
    rate = check_rate(rate)
    check_pair(base, ft, name)
    if not isinstance(dst, Tensor) or not dst.is_floating_point():
        raise ValueError(f"dst for {name!r} must be a floating-point torch.Tensor, got {_describe(dst)}")
    if dst.shape != base.shape or dst.device != base.device:
        raise ValueError(
            f"dst for {name!r} must match base in shape and device: dst is {_describe(dst)}, base is {_describe(base)}"
        )
    if not allow_nonfinite:
        check_finite_delta(base, ft, name)
    resolved = resolve_backend(backend, dst.device)  # also validates `backend` for methods without a Triton path

    with torch.no_grad():  # dst may be a leaf Parameter that requires grad
        if info.plan is None:
            pruned = info.unchecked(ft.float() - base.float(), rate=rate, seed=seed, name=name, **params)
            if rate == 0.0:
                dst.copy_(ft)
            else:
                dst.copy_(base.float() + pruned)  # fp32 sum, the one cast to dst.dtype
            return dst
        plan = info.plan(ft, rate=rate, **params)  # validates the method's parameters
        if rate == 0.0:
            dst.copy_(ft)
            return dst
        if callable(u):  # a sweep's cache: asked only now that the plan's mask axis is known
            u = u(plan.axis)
        fused_apply(dst, base, ft, key=masks.tensor_key(seed, name, plan.axis), rate=rate, scale=plan.scale,
                    axis=plan.axis, u=u, backend=resolved)
    return dst


def check_pair(base: Tensor, ft: Tensor, name: str) -> None:
    """Check that base and fine-tuned tensors can form a delta.

    Args:
        base: Base weights.
        ft: Fine-tuned weights.
        name: Tensor name, for the message.

    Raises:
        ValueError: If either is not a floating-point tensor, or they differ in shape, dtype or device (the
            message names both).
    """
    for label, t in (("base", base), ("ft", ft)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{label} of {name!r} must be a floating-point torch.Tensor, got {_describe(t)}")
    if base.shape != ft.shape or base.dtype != ft.dtype or base.device != ft.device:
        raise ValueError(
            f"base and ft of {name!r} must have the same shape, dtype and device: base is {_describe(base)}, "
            f"ft is {_describe(ft)}; pair tensors by name and cast both to one dtype before pruning"
        )


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{tuple(t.shape)} {t.dtype} on {t.device}"
    return type(t).__name__


def check_finite_delta(base: Tensor, ft: Tensor, name: str, *,
                       fix: str = "fix the checkpoint, exclude the tensor, or pass allow_nonfinite=True to prune it "
                                  "anyway") -> None:
    """Raise if ``ft - base`` (fp32) has NaN/Inf (the message ends with ``fix``); two reductions when finite."""
    if base.numel() == 0:
        return
    # A sum is NaN/Inf whenever a term is (IEEE propagation), so finite sums prove finite inputs and hence a finite
    # delta (short of ft - base overflowing fp32, i.e. weights near 1e38, which is not checked). A sum that merely
    # overflows (e.g. a big fp16 tensor) only costs the exact count below. Native-dtype sums accumulate in fp32
    # internally; sum(dtype=float32) of a bf16 tensor is ~7x slower on CPU.
    if bool(torch.isfinite(base.sum())) and bool(torch.isfinite(ft.sum())):
        return
    bad = int((~torch.isfinite(ft.float() - base.float())).sum())
    if bad:
        raise ValueError(
            f"tensor {name!r} has {bad} non-finite (NaN/Inf) delta entries out of {base.numel()}; {fix}"
        )
