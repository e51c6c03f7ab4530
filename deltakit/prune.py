"""Apply a pruning method to a live parameter: ``dst <- base + method(ft - base)``, in place, one cast.

In a sweep (DESIGN decision 5) the model stays on its device and, for every prunable tensor, the base and
fine-tuned weights are kept beside it; each sweep point rewrites the model's parameter ``dst`` from them. The maths
is fp32 whatever the storage dtype, rounded once to ``dst.dtype`` (DESIGN decision 3).

* Random mask-and-scale methods (``dare``, ``drop_only``, ``darex_q``, ``structural``: those registered with a
  :class:`~deltakit.methods.RandomPlan`) run as one fused pass, never materialising the delta:
  ``deltakit.kernels.apply.fused_apply`` (Triton) when the backend resolves to ``"triton"`` (CUDA tensors under
  ``backend="auto"``), else the torch reference ``fused_apply_torch`` over cache-sized blocks of rows processed by
  ``torch.get_num_threads()`` worker threads. Both equal ``base + method(ft - base)`` computed in fp32 bit for bit
  (up to the sign of zero), on CPU and on CUDA, because the method itself computes through the same reference.
* Every other method (``magnitude``, ``wanda``, anything registered without a plan) runs in torch on the tensors'
  device: ``delta = ft32 - base32``, ``dst = base32 + method(delta)``, cast once.

Exact ends: ``rate == 0`` writes ``ft`` itself, bit for bit, for every method. (``base + (ft - base)`` is not always
``ft`` in floating point, e.g. when ``|base| >> |ft|``, so rate 0 is special-cased rather than computed.) ``rate == 1``
writes ``base`` exactly for the random methods (every entry dropped).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from deltakit import masks
from deltakit.kernels.apply import fused_apply, fused_apply_torch, resolve_backend
from deltakit.methods import get_method
from deltakit.methods.registry import RandomPlan, check_rate

__all__ = ["apply_method", "check_pair", "check_finite_delta"]

# Entries per block of the CPU path: large enough that per-call overhead is small, small enough that the fp32
# temporaries of one block stay in cache (measured on 2 cores: 2^18 fastest among 2^15..2^20).
_BLOCK = 1 << 18


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
    u: Tensor | None = None,
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
        key = masks.tensor_key(seed, name, plan.axis)
        if resolved == "triton":
            fused_apply(dst, base, ft, key=key, rate=rate, scale=plan.scale, axis=plan.axis)
        else:
            _fused_torch_blocked(dst, base, ft, key=key, rate=rate, plan=plan, u=u)
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


def check_finite_delta(base: Tensor, ft: Tensor, name: str) -> None:
    """Raise if ``ft - base`` (fp32) has NaN/Inf; two reductions in the common, finite case."""
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
            f"tensor {name!r} has {bad} non-finite (NaN/Inf) delta entries out of {base.numel()}; fix the checkpoint, "
            "exclude the tensor, or pass allow_nonfinite=True to prune it anyway"
        )


def _fused_torch_blocked(dst: Tensor, base: Tensor, ft: Tensor, *, key: int, rate: float, plan: RandomPlan,
                         u: Tensor | None) -> None:
    """``fused_apply_torch`` over blocks of whole rows.

    Bit-identical to one ``fused_apply_torch`` call on the whole tensor (element-wise maths; each block gets the
    uniform numbers at its own global indices), but the fp32 temporaries of a block stay in cache. When the numbers
    must be made, blocks run in worker threads so the NumPy Philox of different blocks runs on different cores
    (NumPy and torch release the GIL); when they are given (a sweep's cache), blocks run in turn and torch's
    intra-op threads share each one.
    """
    n = dst.numel()
    n_rows, n_cols = masks.matrix_shape(dst.shape)
    m = {"element": n, "row": n_rows, "col": n_cols}[plan.axis]
    if u is not None and (not isinstance(u, Tensor) or u.dtype != torch.float32 or u.dim() != 1 or u.numel() != m):
        raise ValueError(
            f"u must be a 1-D float32 tensor of {m} uniform numbers (axis {plan.axis!r} of a {tuple(dst.shape)} "
            f"tensor), got {_describe(u)}"
        )
    rows_per_block = max(1, _BLOCK // max(n_cols, 1))
    workers = max(1, min(torch.get_num_threads(), -(-n_rows // rows_per_block)))
    contiguous = dst.is_contiguous() and base.is_contiguous() and ft.is_contiguous()
    if workers == 1 or not contiguous or dst.device.type != "cpu":  # blocks pay off for CPU caches and cores
        fused_apply_torch(dst, base, ft, key=key, rate=rate, scale=plan.scale, axis=plan.axis, u=u)
        return
    if u is None and plan.axis != "element":
        u = masks.uniform(key, m)  # one number per row / column: small, made once
    dst2, base2, ft2 = (t.view(n_rows, n_cols) for t in (dst, base, ft))  # (rows, cols) views, no copies
    per_row = isinstance(plan.scale, Tensor)

    def run(r0: int) -> None:
        r1 = min(n_rows, r0 + rows_per_block)
        if plan.axis == "element":
            lo, hi = r0 * n_cols, r1 * n_cols
            block_u = u[lo:hi] if u is not None else masks.uniform(key, hi - lo, offset=lo, threads=1)
        elif plan.axis == "row":
            block_u = u[r0:r1]
        else:
            block_u = u
        fused_apply_torch(
            dst2[r0:r1],
            base2[r0:r1],
            ft2[r0:r1],
            key=key,
            rate=rate,
            scale=plan.scale[r0:r1] if per_row else plan.scale,
            axis=plan.axis,
            u=block_u,
        )

    blocks = range(0, n_rows, rows_per_block)
    if u is not None:  # nothing to generate: torch's own threads split each block's ops (measured faster)
        for r0 in blocks:
            run(r0)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltakit-apply") as pool:
        for future in [pool.submit(run, r0) for r0 in blocks]:
            future.result()  # re-raises a worker's exception
