"""Fused merge: base + lambda * combine_k(select_k(ft_k - base) * scale_k), one pass over base and K fine-tunes.

Every merge method with a :class:`MergePlan` (task arithmetic, TIES, DARE/DAREx-q + TA/TIES, Breadcrumbs; see
``deltakit.methods.merging``) is this one operation with different arguments. Per element, in fp32::

    for k in 0 .. K-1:                              # fine-tunes in the order given
        d_k  = ft_k32 - base32
        keep = (u_k >= rate32 if RANDOM) and (lo_k <= |d_k| <= hi_k if WINDOW)
        t_k  = where(keep, d_k * scale_k, 0)
        sum:  acc = acc + t_k
        ties: P = P + where(t_k > 0, t_k, 0); NP = NP + (t_k > 0)
              N = N + where(t_k < 0, t_k, 0); NN = NN + (t_k < 0)
    sum:  m = acc                                   # task arithmetic
    ties: m = where(P + N >= 0, P / max(NP, 1), N / max(NN, 1))
                                                    # elect the sign of the summed mass, disjoint mean (TIES)
    dst = (base32 + lam32 * m) cast once to dst's dtype

``u_k`` is the Philox stream of fine-tune ``k`` (``deltakit.masks.finetune_key(seed, name, k)``), so a merge is
reproducible bit for bit on CPU and GPU and fine-tune 0 shares DARE's own mask of that tensor. An element's sign is
elected from ``P + N`` (not from a separate running sum) so that one pass gives both the sign and the mean.

* :func:`fused_merge_torch` -- the torch reference, the single definition of the maths.
* :func:`fused_merge` -- the one entry point: the Triton kernel (``deltakit.kernels.triton_merge``) when the backend
  resolves to ``"triton"``, else the reference over cache-sized blocks of elements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from deltakit import masks
from deltakit.kernels.apply import resolve_backend

__all__ = ["COMBINES", "MAX_FINETUNES", "MergePlan", "check_lam", "check_merge_args", "fused_merge", "fused_merge_torch"]

#: How the selected, rescaled deltas of the K fine-tunes are combined.
COMBINES = ("sum", "ties")
#: The kernels unroll the loop over fine-tunes: at most this many in one merge.
MAX_FINETUNES = 8
# Elements per block of the CPU path (fp32 temporaries of a block stay in cache; as deltakit.kernels.fused).
_BLOCK = 1 << 18


@dataclass(frozen=True)
class MergePlan:
    """The arguments of the fused merge for one tensor (see the module docstring).

    Attributes:
        combine: ``"sum"`` (task arithmetic) or ``"ties"`` (sign election and disjoint mean).
        random: drop with the fine-tune's Philox stream (keep iff ``u_k >= rate``).
        scales: per fine-tune rescale of kept deltas (DARE ``1 / (1 - rate)``, DAREx-q ``1 / q``, else 1).
        lo, hi: per fine-tune magnitude window, kept iff ``lo_k <= |d_k| <= hi_k``; None: no window.
    """

    combine: str
    random: bool
    scales: tuple[float, ...]
    lo: tuple[float, ...] | None = None
    hi: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise ValueError(f"MergePlan.combine must be one of {COMBINES}, got {self.combine!r}")
        k = len(self.scales)
        if not 1 <= k <= MAX_FINETUNES:
            raise ValueError(f"a merge takes 1 to {MAX_FINETUNES} fine-tunes, got {k}")
        if (self.lo is None) != (self.hi is None) or (self.lo is not None and not len(self.lo) == len(self.hi) == k):
            raise ValueError(f"MergePlan.lo and .hi must both be None or both hold {k} values (one per fine-tune)")
        if any(not math.isfinite(s) for s in self.scales):
            raise ValueError(f"MergePlan.scales must be finite, got {self.scales}")

    @property
    def window(self) -> bool:
        return self.lo is not None


def check_merge_args(dst: torch.Tensor, base: torch.Tensor, fts: torch.Tensor, plan: MergePlan, *,
                     keys: Sequence[int] | None, rate: float, lam: float) -> None:
    """Validate the fused merge's tensors and numbers (shared by every launcher).

    Raises:
        ValueError: naming what does not fit (shapes, devices, dtypes, K, keys, rate, lam).
    """
    for label, t in (("dst", dst), ("base", base), ("fts", fts)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{label} must be a floating-point tensor, got {type(t).__name__}")
    k = len(plan.scales)
    if fts.dim() != base.dim() + 1 or fts.shape[0] != k or fts.shape[1:] != base.shape:
        raise ValueError(f"fts must stack {k} fine-tunes of base's shape {tuple(base.shape)}, got {tuple(fts.shape)}")
    if dst.shape != base.shape or len({dst.device, base.device, fts.device}) != 1:
        raise ValueError("dst, base and fts must share base's shape and one device")
    if base.dtype != fts.dtype:
        raise ValueError(f"base and fts must have one dtype, got {base.dtype} and {fts.dtype}")
    if plan.random and (keys is None or len(keys) != k):
        raise ValueError(f"a random merge plan needs one Philox key per fine-tune ({k}), got {keys!r}")
    masks.check_rate(rate)
    check_lam(lam)


def check_lam(lam: float) -> None:
    """Refuse a merge weight that is not a finite number.

    Raises:
        ValueError: naming the value.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam (the merge weight lambda) must be a finite number such as 0.5 or 1.0, got {lam!r}")


def _zero_unless(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, x, 0.0)`` for fp32 ``x``, bit for bit (NaN, inf, -0.0 too), as an AND with a bit mask."""
    return (x.view(torch.int32) & keep.to(torch.int32).neg_()).view(torch.float32)


def _select(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(cond, a, b)`` for fp32 ``a`` and ``b`` of one shape, bit for bit, by bit masks."""
    mask = cond.to(torch.int32).neg_()  # all ones where cond, else 0
    return ((a.view(torch.int32) & mask) | (b.view(torch.int32) & ~mask)).view(torch.float32)


def fused_merge_torch(dst: torch.Tensor, base: torch.Tensor, fts: torch.Tensor, plan: MergePlan, *,
                      keys: Sequence[int] | None = None, rate: float = 0.0, lam: float = 1.0,
                      u: Sequence[torch.Tensor] | None = None, offset: int = 0) -> torch.Tensor:
    """The reference fused merge (module docstring), written into ``dst``; elements are row-major.

    Args:
        dst: output, base's shape; may be ``base`` itself.
        base: base weights. fts: the K fine-tunes stacked, shape ``(K, *base.shape)``, base's dtype.
        plan: what to select, rescale and combine.
        keys: one Philox key per fine-tune (random plans). rate: fraction dropped, in [0, 1]. lam: merge weight.
        u: optional cached uniform numbers, one flat fp32 tensor per fine-tune covering these elements.
        offset: global index of the first element (when called on a block of a larger tensor).

    Returns:
        ``dst``.
    """
    # Selections go through _zero_unless / _select (torch.where by bit masks, same bits) and the counts through
    # uint8 (at most 8, exact, converted once): on CPU a per-element branch on a random mask costs ~5 ns.
    n = base.numel()
    base32 = base.reshape(-1).float()
    rate32 = float(np.float32(rate))
    ties = plan.combine == "ties"
    acc = torch.zeros(n, dtype=torch.float32, device=base.device)  # (n,) the sum, or P for ties
    if ties:
        neg = torch.zeros_like(acc)  # (n,) N
        n_pos = torch.zeros(n, dtype=torch.uint8, device=base.device)  # (n,) NP
        n_neg = torch.zeros_like(n_pos)  # (n,) NN
    for k in range(len(plan.scales)):
        d = fts[k].reshape(-1).float() - base32  # (n,)
        keep = None
        if plan.random:
            uk = u[k] if u is not None else masks.uniform(keys[k], n, offset=offset, threads=1).to(base.device)
            keep = uk >= rate32
        if plan.window:
            a = d.abs()
            inside = (a >= np.float32(plan.lo[k]).item()) & (a <= np.float32(plan.hi[k]).item())
            keep = inside if keep is None else keep & inside
        t = d * np.float32(plan.scales[k]).item()
        if keep is not None:
            t = _zero_unless(keep, t)  # where(keep, d * scale, 0)
        if ties:
            pos, negative = t > 0, t < 0
            acc += _zero_unless(pos, t)  # P + where(t > 0, t, 0)
            n_pos += pos.view(torch.uint8)
            neg += _zero_unless(negative, t)  # N + where(t < 0, t, 0)
            n_neg += negative.view(torch.uint8)
        else:
            acc += t
    if ties:
        one = torch.ones((), dtype=torch.float32, device=base.device)
        merged = _select(acc + neg >= 0, acc / torch.maximum(n_pos.float(), one),
                         neg / torch.maximum(n_neg.float(), one))
    else:
        merged = acc
    out = base32 + np.float32(lam).item() * merged
    dst.view(-1).copy_(out) if dst.is_contiguous() else dst.copy_(out.view(dst.shape))
    return dst


def fused_merge(dst: torch.Tensor, base: torch.Tensor, fts: torch.Tensor, plan: MergePlan, *,
                keys: Sequence[int] | None = None, rate: float = 0.0, lam: float = 1.0,
                u: Sequence[torch.Tensor] | None = None, backend: str = "auto") -> torch.Tensor:
    """The fused merge with the chosen backend: Triton on CUDA (``backend="auto"``), else blocked torch.

    Args:
        As :func:`fused_merge_torch`; ``u`` (cached numbers, one per fine-tune) is used by the torch path only.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``dst``, bit-identical to one :func:`fused_merge_torch` call on the whole tensor.

    Raises:
        ValueError: bad arguments (:func:`check_merge_args`) or an unusable backend.
    """
    check_merge_args(dst, base, fts, plan, keys=keys, rate=rate, lam=lam)
    if resolve_backend(backend, dst.device) == "triton":
        from deltakit.kernels.merge_triton import fused_merge_triton

        return fused_merge_triton(dst, base, fts, plan, keys=keys, rate=rate, lam=lam)
    n = base.numel()
    if u is not None and (len(u) != fts.shape[0] or any(x.numel() != n for x in u)):
        raise ValueError(f"u must hold {n} cached numbers for each of the {fts.shape[0]} fine-tunes")
    workers = max(1, min(torch.get_num_threads(), -(-n // _BLOCK)))
    if workers == 1 or dst.device.type != "cpu" or not (dst.is_contiguous() and base.is_contiguous()
                                                        and fts.is_contiguous()):
        return fused_merge_torch(dst, base, fts, plan, keys=keys, rate=rate, lam=lam, u=u)
    flat_dst, flat_base, flat_fts = dst.view(-1), base.view(-1), fts.view(fts.shape[0], -1)

    def run(lo: int) -> None:  # one block of elements; its own numbers at its own global indices
        hi = min(n, lo + _BLOCK)
        fused_merge_torch(flat_dst[lo:hi], flat_base[lo:hi], flat_fts[:, lo:hi], plan, keys=keys, rate=rate,
                          lam=lam, u=None if u is None else [x[lo:hi] for x in u], offset=lo)

    # Blocks on worker threads with or without cached numbers: a 2^18-element block is too small for torch's own
    # intra-op threads to pay off (measured on 2 cores, K = 3 TIES over 1.2e7 elements with u given: 1.96 s with
    # the blocks in turn on torch's threads, 0.42 s with the blocks on this pool).
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltakit-merge") as pool:
        for future in [pool.submit(run, lo) for lo in range(0, n, _BLOCK)]:
            future.result()
    return dst
