"""Counter-based keep masks: the uniform number of every delta entry is a pure function of (seed, name, index).

DARE (Yu et al., 2024, "Language Models are Super Mario", arXiv:2311.03099) drops each delta entry with
probability ``rate`` and rescales the survivors by ``1 / (1 - rate)``; DAREx (Deng et al., 2025, arXiv:2410.09344)
changes the rescale, not the mask. deltakit never keeps a random generator's *state*: the uniform number of
element ``i`` of tensor ``name`` under global ``seed`` is defined by a counter-based generator, Philox4x32-10
(Salmon et al., 2011, "Parallel random numbers: as easy as 1, 2, 3"), exactly as Triton's ``tl.randint4x``
computes it. An element is **kept iff u >= rate** (``rate`` = fraction dropped, rounded to float32 first).

Layout (deltakit's choice: four numbers per Philox call, about 4x cheaper than one). For a 64-bit key ``k``
and global element index ``j`` (``j = offset + i``)::

    c      = j // 4                               # 64-bit counter
    words  = Philox4x32-10(key=(k & 0xffffffff, (k >> 32) & 0xffffffff),
                           counter=(c & 0xffffffff, c >> 32, 0, 0))
    w      = words[j % 4]                         # uint32
    x      = int32 bit pattern of w;  x = ~x if x < 0 else x
    u      = float32(x) * float32(4.6566127342e-10)   # int -> fp32 round-to-nearest-even, one fp32 multiply

which is what ``r0, r1, r2, r3 = tl.randint4x(key, j // 4)``, picking word ``j % 4``, and
``triton.language.random.uint_to_uniform_float`` give inside a kernel. ``u`` lies in [0, 1) and is never 1.0.
The key is a signed 64-bit integer (negative keys are the two's complement bit pattern, as Triton's
``seed.to(tl.uint64)`` sign-extends).

Consequences:
    * the CPU path (this module, NumPy, no Triton) and the GPU kernels give the same masks bit for bit;
    * masks are nested across rates (one ``u`` per element: kept at a higher rate implies kept at a lower one),
      so curves over ``rate`` use common random numbers and are smooth;
    * a tensor's mask does not depend on the order tensors are processed in, on the device or on the block size.

Every tensor gets its own key from :func:`tensor_key`; ``axis="row"`` / ``"col"`` keys give a separate stream
with one number per row / column (structured dropping), see :func:`matrix_shape` for what a row is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = [
    "AXES",
    "tensor_key",
    "finetune_key",
    "uniform",
    "keep_mask",
    "matrix_shape",
    "check_rate",
]

#: The index spaces a keyed stream can run over.
AXES = ("element", "row", "col")

# Philox4x32 constants (Random123; identical to triton/language/random.py).
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# The fp32 scale of triton's uint_to_uniform_float for 32-bit inputs: the largest value with INT32_MAX * s < 1.
_TO_UNIT = np.float32(4.6566127342e-10)
# Counters per NumPy chunk: 2^15 counters = 2^17 numbers (measured fastest on 2 cores, with the threads below).
_CHUNK_COUNTERS = 1 << 15
# Streams at least this long are made on torch.get_num_threads() threads by default (two chunks or more).
_PARALLEL_MIN = 2 * 4 * _CHUNK_COUNTERS
# Global indices are int64 inside the Triton kernels, so a stream ends at 2^63.
_MAX_INDEX = 1 << 63
_KEY_DOMAIN = b"deltakit.masks.v1"


def tensor_key(seed: int, name: str, axis: str = "element") -> int:
    """Derive the Philox key of one tensor's stream from the global seed and the tensor name.

    The bytes hashed are exactly::

        b"deltakit.masks.v1" + b"\\x00" + str(seed).encode("ascii") + b"\\x00"
        + name.encode("utf-8") + b"\\x00" + axis.encode("ascii")

    with ``hashlib.blake2b(digest_size=8)``; the 8-byte digest read as a little-endian *signed* integer is the key.
    Python's ``hash`` is never used (it is salted per process).

    Args:
        seed: The global seed of a run (any Python int, negative allowed; ``bool`` is rejected).
        name: The tensor name exactly as in the checkpoint, e.g. ``"bert.encoder.layer.0.attention.self.query.weight"``.
        axis: ``"element"`` (one number per entry), ``"row"`` or ``"col"`` (one number per row / column);
            each axis gets an independent stream.

    Returns:
        A signed 64-bit integer in ``[-2**63, 2**63)``.

    Raises:
        TypeError: If ``seed`` is not an int or ``name`` is not a str.
        ValueError: If ``axis`` is not one of ``AXES``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r} of type {type(seed).__name__}; pass e.g. seed=0")
    if not isinstance(name, str):
        raise TypeError(f"name must be the tensor name as a str, got {name!r} of type {type(name).__name__}")
    _check_axis(axis)
    payload = b"\x00".join(
        [_KEY_DOMAIN, str(int(seed)).encode("ascii"), name.encode("utf-8"), axis.encode("ascii")]
    )
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def finetune_key(seed: int, name: str, finetune: int) -> int:
    """The element-stream key of tensor ``name`` of the ``finetune``-th fine-tune of a merge (0-based).

    Fine-tune 0 uses the tensor's own key, :func:`tensor_key(seed, name) <tensor_key>`, so merging one fine-tune with
    DARE draws exactly DARE's mask; fine-tune ``k > 0`` hashes the name with a ``"\\x00finetune<k>"`` suffix, an
    independent stream. A merge is therefore reproducible from (seed, position of the fine-tune, tensor name).

    Raises:
        TypeError / ValueError: as :func:`tensor_key`, or ``finetune`` is not a non-negative int.
    """
    if isinstance(finetune, bool) or not isinstance(finetune, int) or finetune < 0:
        raise ValueError(f"finetune must be the fine-tune's 0-based position in the merge, got {finetune!r}")
    return tensor_key(seed, name if finetune == 0 else f"{name}\x00finetune{finetune}")


def uniform(key: int, n: int, *, offset: int = 0, threads: int | None = None) -> torch.Tensor:
    """The uniform numbers ``offset, ..., offset + n - 1`` of the stream ``key`` (see the module docstring).

    Bit-identical to the Triton kernels in ``deltakit.kernels``. Vectorised NumPy Philox on uint32 words, 64-bit
    products for the high/low halves, processed in cache-sized chunks.

    Args:
        key: The stream's 64-bit key, usually from :func:`tensor_key`; ``[-2**63, 2**64)`` is accepted and taken
            modulo 2**64.
        n: How many numbers (``n >= 0``).
        offset: Global index of the first number (``offset >= 0``, ``offset + n <= 2**63``). Element ``i`` of the
            result is the number at global index ``offset + i``, so windows of one stream agree.
        threads: Worker threads; ``None``: ``torch.get_num_threads()`` for streams of ``2**18`` numbers or more,
            else 1. Callers already running in worker threads pass 1.

    Returns:
        A float32 CPU tensor of shape ``(n,)`` with values in [0, 1).

    Raises:
        TypeError: If ``key``, ``n`` or ``offset`` is not an int.
        ValueError: If ``key``, ``n`` or ``offset`` is out of range.
    """
    key = _check_key(key)
    n = _check_index("n", n)
    offset = _check_index("offset", offset)
    if offset + n > _MAX_INDEX:
        raise ValueError(
            f"offset + n = {offset + n} exceeds 2**63, the end of a stream (global indices are int64 in the kernels)"
        )
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return torch.from_numpy(out)
    k0 = key & _MASK32
    k1 = (key >> 32) & _MASK32
    first = offset // 4  # first counter touched
    last = (offset + n - 1) // 4  # last counter touched (inclusive)
    skip = offset - 4 * first  # numbers of the first counter before `offset`

    def fill(c_start: int) -> None:  # one chunk of counters into its own slice of `out`
        c_stop = min(c_start + _CHUNK_COUNTERS, last + 1)
        flat = _philox_words(k0, k1, c_start, c_stop - c_start).reshape(-1)  # word w of counter c at 4c + w
        lo = 4 * (c_start - first) - skip  # index in `out` of the chunk's first number
        if lo < 0:
            flat, lo = flat[-lo:], 0
        take = min(flat.size, n - lo)
        _words_to_unit(flat[:take], out[lo : lo + take])

    chunks = range(first, last + 1, _CHUNK_COUNTERS)
    if threads is None:
        threads = torch.get_num_threads() if n >= _PARALLEL_MIN else 1
    workers = max(1, min(threads, len(chunks)))
    if workers > 1:  # NumPy releases the GIL: chunks run on all cores
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltakit-philox") as pool:
            list(pool.map(fill, chunks))
    else:
        for c_start in chunks:
            fill(c_start)
    return torch.from_numpy(out)


def keep_mask(seed: int, name: str, shape: Sequence[int] | torch.Size, rate: float, *, axis: str = "element") -> torch.Tensor:
    """The DARE keep mask of tensor ``name``: kept iff ``u >= float32(rate)``.

    Rate 0 keeps everything (``u >= 0`` always holds), rate 1 drops everything (``u < 1`` always holds).
    Masks of one (seed, name, axis) are nested: anything kept at a higher rate is kept at every lower rate.

    Args:
        seed: The global seed.
        name: The tensor name.
        shape: The tensor's shape.
        rate: Fraction of entries dropped, in [0, 1].
        axis: ``"element"`` (independent entries), ``"row"`` or ``"col"`` (whole rows / columns kept or dropped,
            rows and columns as defined by :func:`matrix_shape`).

    Returns:
        A bool CPU tensor of ``shape``.

    Raises:
        ValueError: If ``rate`` is outside [0, 1] or ``axis`` is unknown.
    """
    rate32 = check_rate(rate)
    _check_axis(axis)
    shape = torch.Size(tuple(int(s) for s in shape))
    n_rows, n_cols = matrix_shape(shape)
    key = tensor_key(seed, name, axis)
    if axis == "element":
        u = uniform(key, shape.numel())  # (numel,)
    elif axis == "row":
        u = uniform(key, n_rows).view(n_rows, 1).expand(n_rows, n_cols)  # (rows, cols)
    else:
        u = uniform(key, n_cols).view(1, n_cols).expand(n_rows, n_cols)  # (rows, cols)
    return (u >= rate32).reshape(shape)


def matrix_shape(shape: Sequence[int] | torch.Size) -> tuple[int, int]:
    """How deltakit views a tensor as a matrix for row/column streams and per-row scales.

    Rows are the first dimension and columns everything after it flattened, so for the row-major flat index
    ``i`` the row is ``i // n_cols`` and the column ``i % n_cols``. A ``(out, in)`` Linear weight has one row per
    output unit; a 1-D tensor (a bias) has one row per entry and one column; a 0-d tensor is ``(1, 1)``.

    Args:
        shape: A tensor shape.

    Returns:
        ``(n_rows, n_cols)`` with ``n_rows * n_cols == numel``.
    """
    dims = tuple(int(s) for s in shape)
    if not dims:
        return 1, 1
    n_rows = dims[0]
    return n_rows, math.prod(dims[1:])


def check_rate(rate: float) -> np.float32:
    """Validate a drop rate and return it as the float32 the masks compare against.

    Args:
        rate: Fraction of entries dropped.

    Returns:
        ``float32(rate)``.

    Raises:
        ValueError: If ``rate`` is not a number in [0, 1].
    """
    # A string ("0.5") or a bool would pass float(); both are caller mistakes, so refuse them by type.
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise ValueError(
            f"rate must be a number in [0, 1] (fraction of delta entries dropped), got {rate!r} "
            f"({type(rate).__name__}); pass a float such as 0.9"
        )
    value = float(rate)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"rate must be in [0, 1] (fraction of delta entries dropped), got {rate!r}; "
            "use rate=0 to keep every entry and rate=1 to drop every entry"
        )
    return np.float32(value)


# ----------------------------------------------------------------------------------------------------------------
# Internals
# ----------------------------------------------------------------------------------------------------------------


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def _check_key(key: int) -> int:
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise TypeError(f"key must be an int (e.g. from tensor_key), got {key!r} of type {type(key).__name__}")
    key = int(key)
    if not -(1 << 63) <= key < (1 << 64):
        raise ValueError(f"key must be a 64-bit integer in [-2**63, 2**64), got {key}; derive it with tensor_key()")
    return key & ((1 << 64) - 1)


def _check_index(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if not 0 <= value <= _MAX_INDEX:
        raise ValueError(f"{what} must be in [0, 2**63], got {value}")
    return value


def _philox_words(k0: int, k1: int, c_start: int, m: int) -> np.ndarray:
    """Philox4x32-10 of counters ``c_start .. c_start + m - 1`` (64-bit, split lo/hi) under key (k0, k1).

    Returns an ``(m, 4)`` uint32 array whose row ``c`` holds the four output words of counter ``c_start + c``.
    State words are uint32; each product is formed in uint64 (no overflow: both factors < 2**32) and its
    high/low halves are read back through a uint32 view of the product buffer (little-endian: [lo, hi]).
    """
    counters = np.arange(c_start, c_start + m, dtype=np.uint64)
    c0 = (counters & np.uint64(_MASK32)).astype(np.uint32)
    c1 = (counters >> np.uint64(32)).astype(np.uint32)
    c2 = np.zeros(m, dtype=np.uint32)
    c3 = np.zeros(m, dtype=np.uint32)
    # Double buffers: round r writes set r % 2 while c1/c3 still view the products of the previous round.
    prod_a = [np.empty(m, dtype=np.uint64), np.empty(m, dtype=np.uint64)]
    prod_b = [np.empty(m, dtype=np.uint64), np.empty(m, dtype=np.uint64)]
    new_c0 = [np.empty(m, dtype=np.uint32), np.empty(m, dtype=np.uint32)]
    new_c2 = [np.empty(m, dtype=np.uint32), np.empty(m, dtype=np.uint32)]
    little = np.little_endian
    lo, hi = (0, 1) if little else (1, 0)
    for r in range(_N_ROUNDS):
        s = r & 1
        rk0 = np.uint32((k0 + r * _KEY_A) & _MASK32)
        rk1 = np.uint32((k1 + r * _KEY_B) & _MASK32)
        np.multiply(c0, _ROUND_A, out=prod_a[s], casting="unsafe")
        np.multiply(c2, _ROUND_B, out=prod_b[s], casting="unsafe")
        halves_a = prod_a[s].view(np.uint32)
        halves_b = prod_b[s].view(np.uint32)
        # c0' = hi(B*c2) ^ c1 ^ k0 ; c2' = hi(A*c0) ^ c3 ^ k1 ; c1' = lo(B*c2) ; c3' = lo(A*c0)
        np.bitwise_xor(halves_b[hi::2], c1, out=new_c0[s])
        np.bitwise_xor(new_c0[s], rk0, out=new_c0[s])
        np.bitwise_xor(halves_a[hi::2], c3, out=new_c2[s])
        np.bitwise_xor(new_c2[s], rk1, out=new_c2[s])
        c0, c2 = new_c0[s], new_c2[s]
        c1, c3 = halves_b[lo::2], halves_a[lo::2]
    words = np.empty((m, 4), dtype=np.uint32)
    words[:, 0] = c0
    words[:, 1] = c1
    words[:, 2] = c2
    words[:, 3] = c3
    return words


def _words_to_unit(words: np.ndarray, out: np.ndarray) -> None:
    """Triton's ``uint_to_uniform_float`` for 32-bit words, written into the float32 array ``out``."""
    x = words.view(np.int32)
    # x ^ (x >> 31) is ~x for negative x (arithmetic shift gives -1) and x otherwise: Triton's `-x - 1 if x < 0`.
    x = np.bitwise_xor(x, np.right_shift(x, 31))
    np.multiply(x.astype(np.float32), _TO_UNIT, out=out)  # int32 -> fp32 rounds to nearest even, like cvt.rn
