"""Fused DARE apply: ``dst = where(keep, base + (ft - base) * scale, base)`` in one pass over memory.

DARE (Yu et al., 2024, "Language Models are Super Mario", arXiv:2311.03099) drops each delta entry with probability
``rate`` and rescales the survivors by ``1 / (1 - rate)``; DAREx-q (Deng et al., 2025, arXiv:2410.09344) rescales by
``1 / q`` with ``1 - rate <= q <= 1``, optionally one ``q`` per row. Both are this one operation with a different
``scale``. The keep decision of an entry is ``u >= float32(rate)`` with ``u`` from :mod:`deltakit.masks`
(Philox4x32-10 keyed by the tensor, counter = index), so the mask is a function, not generator state.

Two implementations of exactly the same maths:

* :func:`fused_apply_torch` -- the torch reference and the CPU path, the single definition of the maths. In fp32::

      d   = ft32 - base32
      t   = d * scale32                        # scale32: fp32 scalar or per-row fp32 column
      out = where(u >= rate32, base32 + t, base32)
      dst = out cast once to dst's dtype (round to nearest even)

  Dropped entries are ``base`` bit for bit (``-0.0`` stays ``-0.0``); ``where`` never forms ``0 * inf``, so
  ``rate == 1`` gives exactly ``base`` even with an infinite scale.

* :func:`fused_apply_triton` -- launches the Triton kernel of :mod:`deltakit.kernels.triton_apply` (CUDA, or CPU
  under ``TRITON_INTERPRET=1`` for tests), bit-identical to :func:`fused_apply_torch`: same op order, launched with
  fp fusion disabled (no FMA contraction), bf16 stores rounded to nearest even in-kernel (the interpreter would
  truncate otherwise).

Importing this module never imports triton: the launchers import the kernel module when they run.
:func:`resolve_backend` picks between the two; ``deltakit.kernels.fused_apply`` is the one entry point that does.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from deltakit.masks import AXES, check_rate, matrix_shape, uniform

__all__ = [
    "BACKENDS",
    "fused_apply_torch",
    "fused_apply_triton",
    "resolve_backend",
    "triton_available",
    "interpreter_enabled",
    "uniform_triton",
]

#: Accepted values of every ``backend=`` argument.
BACKENDS = ("auto", "torch", "triton")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_AXIS_CODE = {"element": 0, "row": 1, "col": 2}
# GPU launch shape: 1024 elements per program = 256 Philox calls, 8 values per thread with 4 warps.
_CUDA_BLOCK = 1024
_CUDA_WARPS = 4
# The interpreter costs ~11 ms per program instance whatever its size, so it gets big blocks (masks do not
# depend on the block size).
_INTERPRETER_BLOCK = 1 << 16
_MIN_BLOCK = 16
_MAX_BLOCK = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------------------------


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (Triton then runs kernels on CPU tensors, slowly; used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn a ``backend=`` choice into the implementation that will run.

    Args:
        backend: ``"auto"`` (Triton for CUDA tensors when triton is installed, else torch), ``"torch"`` or
            ``"triton"``.
        device: The device of the tensors.

    Returns:
        ``"torch"`` or ``"triton"``.

    Raises:
        ValueError: If ``backend`` is unknown, or ``"triton"`` is asked for tensors Triton cannot run on.
        ImportError: If ``"triton"`` is asked for and triton is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ImportError(
            "backend='triton' needs the triton package, which is not installed: "
            "pip install deltakit[triton] (or use backend='torch' / 'auto')"
        )
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if interpreter_enabled():
            return "triton"
        raise ValueError(
            "backend='triton' got CPU tensors; Triton runs on CUDA tensors. Move the tensors to a CUDA device, "
            "use backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before triton is first imported to run "
            "the kernels in Triton's (slow) CPU interpreter"
        )
    raise ValueError(f"backend='triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1), got device {device}")


# ----------------------------------------------------------------------------------------------------------------
# The torch reference (CPU path)
# ----------------------------------------------------------------------------------------------------------------


def fused_apply_torch(
    dst: torch.Tensor,
    base: torch.Tensor,
    ft: torch.Tensor,
    *,
    key: int,
    rate: float,
    scale: float | torch.Tensor,
    axis: str = "element",
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``where(u >= rate, base + (ft - base) * scale, base)`` into ``dst`` (torch reference).

    The maths in fp32, in this order: ``d = ft32 - base32``; ``t = d * scale32``; ``out = base32 + t`` where kept,
    ``base32`` where dropped; one cast to ``dst.dtype`` (round to nearest even). DARE: ``scale = 1 / (1 - rate)``;
    DAREx-q: ``scale = 1 / q``.

    Args:
        dst: Output tensor, same shape as ``base``; may be ``ft`` or ``base`` itself (in-place rewrite of a live
            parameter) and may be non-contiguous.
        base: Base (pre-trained) weights.
        ft: Fine-tuned weights.
        key: Key of the stream, ``deltakit.masks.tensor_key(seed, name, axis)``.
        rate: Fraction of delta entries dropped, in [0, 1].
        scale: Rescale of kept entries: a float, or a 1-D tensor with one value per row (``matrix_shape`` rows).
        axis: ``"element"``: one ``u`` per entry (index ``i``); ``"row"``: one per row (``i // n_cols``);
            ``"col"``: one per column (``i % n_cols``).
        u: Optional precomputed ``uniform(key, m)`` for this tensor and axis (``m`` = numel, rows or columns), so a
            sweep can reuse the numbers of a seed for every rate. Not checked against ``key``.

    Returns:
        ``dst``.

    Raises:
        ValueError: On mismatched shapes/devices, non-float dtypes, ``rate`` outside [0, 1], an unknown ``axis``,
            a per-row ``scale`` or ``u`` of the wrong length, or a NaN scale.
    """
    rate32, scale_value, scale_rows = check_apply_args(dst, base, ft, rate=rate, scale=scale, axis=axis)
    n = dst.numel()
    if n == 0:
        return dst
    n_rows, n_cols = matrix_shape(dst.shape)
    u = uniform(key, stream_length(dst.shape, axis)) if u is None else check_uniforms(u, dst.shape, axis)
    u = u.to(dst.device)
    keep = u >= float(rate32)  # rate32 is exactly representable: no double/float ambiguity in the comparison
    keep = keep.view((n_rows, n_cols) if axis == "element" else (n_rows, 1) if axis == "row" else (1, n_cols))
    base32 = base.reshape(n_rows, n_cols).to(torch.float32)  # (rows, cols)
    ft32 = ft.reshape(n_rows, n_cols).to(torch.float32)  # (rows, cols)
    if scale_rows is None:
        scale32 = torch.tensor(scale_value, dtype=torch.float32, device=dst.device)  # 0-d
    else:
        scale32 = scale_rows.to(device=dst.device, dtype=torch.float32).view(n_rows, 1)  # (rows, 1)
    t = ft32 - base32  # d; a fresh tensor, so the in-place steps below touch no input
    t.mul_(scale32)  # d * scale
    t.add_(base32)  # base + d * scale (IEEE addition is commutative: same bits as base32 + t)
    if dst.dtype == torch.float32 and dst.is_contiguous():
        torch.where(keep, t, base32, out=dst.view(n_rows, n_cols))  # no cast: write in place (dst may alias an input)
    else:
        dst.copy_(torch.where(keep, t, base32).view(dst.shape))  # the single cast to dst's dtype (nearest even)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# The Triton launchers (the kernels are in deltakit.kernels.triton_apply)
# ----------------------------------------------------------------------------------------------------------------


def fused_apply_triton(
    dst: torch.Tensor,
    base: torch.Tensor,
    ft: torch.Tensor,
    *,
    key: int,
    rate: float,
    scale: float | torch.Tensor,
    axis: str = "element",
    block_size: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`fused_apply_torch`; equal to it bit for bit.

    One read of ``base`` and ``ft``, one write of ``dst``; the Philox numbers are made in registers (four per call
    for ``axis="element"``). Launched with ``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA.

    Args:
        dst: Output tensor, same shape as ``base``; may be ``ft`` itself (in-place rewrite of a live parameter).
            Non-contiguous tensors are handled through contiguous copies (slower, still exact).
        base: Base (pre-trained) weights.
        ft: Fine-tuned weights.
        key: Key of the stream, ``deltakit.masks.tensor_key(seed, name, axis)``.
        rate: Fraction of delta entries dropped, in [0, 1].
        scale: Rescale of kept entries: a float, or a 1-D tensor with one value per row.
        axis: ``"element"``, ``"row"`` or ``"col"`` (see :func:`fused_apply_torch`).
        block_size: Entries per program (power of 2 in [16, 2**20]); default 1024 on CUDA and 65536 in the
            interpreter. The result does not depend on it.

    Returns:
        ``dst``.

    Raises:
        ValueError: As :func:`fused_apply_torch`, plus tensors on different devices, tensors Triton cannot run on
            (CPU without ``TRITON_INTERPRET=1``) or a bad ``block_size``.
        ImportError: If triton is not installed.
    """
    rate32, scale_value, scale_rows = check_apply_args(dst, base, ft, rate=rate, scale=scale, axis=axis)
    resolve_backend("triton", dst.device)
    key = _signed64(key)
    n = dst.numel()
    block = _check_block(block_size, n, dst.device)
    if n == 0:
        return dst
    _, n_cols = matrix_shape(dst.shape)

    base_c = base.contiguous()
    ft_c = ft.contiguous()
    out = dst if dst.is_contiguous() else torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
    # An input read straight from memory that `out` also writes must be that very memory (each entry is read
    # before it is written by the same program); any other overlap gets a private copy first.
    if _overlaps(base_c, out) and not _same_layout(base_c, out):
        base_c = base_c.clone()
    if _overlaps(ft_c, out) and not _same_layout(ft_c, out):
        ft_c = ft_c.clone()
    if scale_rows is not None:
        scale_arg = scale_rows.to(device=dst.device, dtype=torch.float32).contiguous()
        scale_value = 1.0
    else:
        scale_arg = out  # placeholder pointer, never read

    import triton

    from deltakit.kernels.triton_apply import fused_apply_kernel

    launch_opts = {} if dst.device.type == "cpu" else {"num_warps": _CUDA_WARPS}
    fused_apply_kernel[(triton.cdiv(n, block),)](
        out,
        base_c,
        ft_c,
        scale_arg,
        n,
        n_cols,
        key,
        float(rate32),
        scale_value,
        AXIS=_AXIS_CODE[axis],
        PER_ROW_SCALE=scale_rows is not None,
        ROUND_BF16=dst.dtype == torch.bfloat16,
        BLOCK_SIZE=block,
        enable_fp_fusion=False,
        **launch_opts,
    )
    if out is not dst:
        dst.copy_(out)
    return dst


def uniform_triton(
    key: int, n: int, *, offset: int = 0, device: torch.device | str = "cuda", block_size: int | None = None
) -> torch.Tensor:
    """The numbers of :func:`deltakit.masks.uniform` made by the Triton code path of :func:`fused_apply_triton`.

    Used to check on a device that GPU masks equal the CPU masks bit for bit.

    Args:
        key: 64-bit key of the stream.
        n: How many numbers.
        offset: Global index of the first number (``offset % 4 == 0`` exercises the 4-per-call path of the
            element-wise kernel; other offsets the one-per-call path of row/column streams).
        device: CUDA device, or ``"cpu"`` under ``TRITON_INTERPRET=1``.
        block_size: Numbers per program (power of 2 in [16, 2**20]).

    Returns:
        A float32 tensor of shape ``(n,)`` on ``device``.

    Raises:
        ValueError: If ``n`` or ``offset`` is out of range, or the device cannot run Triton.
        ImportError: If triton is not installed.
    """
    device = torch.device(device)
    resolve_backend("triton", device)
    key = _signed64(key)
    if n < 0 or offset < 0 or offset + n > (1 << 63):
        raise ValueError(f"need n >= 0, offset >= 0 and offset + n <= 2**63, got n={n}, offset={offset}")
    out = torch.empty(n, dtype=torch.float32, device=device)
    block = _check_block(block_size, n, device)
    if n == 0:
        return out
    import triton

    from deltakit.kernels.triton_apply import uniform_kernel

    uniform_kernel[(triton.cdiv(n, block),)](
        out, n, key, offset, ALIGNED=offset % 4 == 0, BLOCK_SIZE=block, enable_fp_fusion=False
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers (shared by both paths)
# ----------------------------------------------------------------------------------------------------------------


def check_apply_args(
    dst: torch.Tensor,
    base: torch.Tensor,
    ft: torch.Tensor,
    *,
    rate: float,
    scale: float | torch.Tensor,
    axis: str,
) -> tuple[np.float32, float, torch.Tensor | None]:
    """Check the arguments of the fused apply; return (rate32, scalar scale as an fp32 value, per-row scale or None)."""
    for label, t in (("dst", dst), ("base", base), ("ft", ft)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{label} has dtype {t.dtype}; supported: {', '.join(map(str, _FLOAT_DTYPES))}")
    if not base.shape == ft.shape == dst.shape:
        raise ValueError(
            f"base, ft and dst must have the same shape, got {tuple(base.shape)}, {tuple(ft.shape)}, "
            f"{tuple(dst.shape)}; pair tensors by name and shape before applying a method"
        )
    if not base.device == ft.device == dst.device:
        raise ValueError(f"base, ft and dst must be on one device, got {base.device}, {ft.device}, {dst.device}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    rate32 = check_rate(rate)
    n_rows, _ = matrix_shape(dst.shape)
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        if scale.dim() != 1 or scale.numel() != n_rows or not scale.dtype.is_floating_point:
            raise ValueError(
                f"a per-row scale must be a 1-D float tensor with one value per row ({n_rows} for shape "
                f"{tuple(dst.shape)}), got shape {tuple(scale.shape)} and dtype {scale.dtype}"
            )
        return rate32, 1.0, scale
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a float or a per-row tensor, got {scale!r}") from None
    if value != value:
        raise ValueError("scale is NaN; DARE uses scale = 1 / (1 - rate), DAREx-q scale = 1 / q with 1 - rate <= q <= 1")
    with np.errstate(over="ignore"):  # beyond the fp32 range the scale is inf, as the kernel would see it
        return rate32, float(np.float32(value)), None


def stream_length(shape: torch.Size, axis: str) -> int:
    """How many uniform numbers a tensor of ``shape`` draws for ``axis``: numel, rows or columns."""
    n_rows, n_cols = matrix_shape(shape)
    return {"element": n_rows * n_cols, "row": n_rows, "col": n_cols}[axis]


def check_uniforms(u: torch.Tensor, shape: torch.Size, axis: str) -> torch.Tensor:
    """Check cached uniform numbers ``u`` of a tensor of ``shape`` for ``axis``; return them.

    Raises:
        ValueError: If ``u`` is not a 1-D float32 tensor of :func:`stream_length` numbers.
    """
    m = stream_length(shape, axis)
    if not isinstance(u, torch.Tensor) or u.dtype != torch.float32 or u.dim() != 1 or u.numel() != m:
        got = f"{tuple(u.shape)} {u.dtype}" if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(
            f"u must be a 1-D float32 tensor of {m} numbers (uniform(key, {m}) for axis={axis!r} of a "
            f"{tuple(shape)} tensor), got {got}"
        )
    return u


def _check_block(block_size: int | None, n: int, device: torch.device) -> int:
    if block_size is None:
        if device.type == "cuda":
            return _CUDA_BLOCK
        return min(_INTERPRETER_BLOCK, max(_MIN_BLOCK, 1 << max(n - 1, 0).bit_length()))
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < _MIN_BLOCK
        or block_size > _MAX_BLOCK
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be a power of 2 in [{_MIN_BLOCK}, 2**20], got {block_size!r}")
    return block_size


def _signed64(key: int) -> int:
    """A key as the signed 64-bit value with the same bits, so Triton types it as i64 (or i32) every time."""
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise ValueError(f"key must be an int (from deltakit.masks.tensor_key), got {key!r}")
    key = int(key)
    if not -(1 << 63) <= key < (1 << 64):
        raise ValueError(f"key must be a 64-bit integer in [-2**63, 2**64), got {key}")
    return key - (1 << 64) if key >= (1 << 63) else key


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors of one shape address exactly the same entries."""
    return a.data_ptr() == b.data_ptr() and a.element_size() == b.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()

    a_lo, a_hi = span(a)
    b_lo, b_hi = span(b)
    return a_lo < b_hi and b_lo < a_hi
