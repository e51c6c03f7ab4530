"""Counter-based masks: Philox4x32-10 port bit-identical to Triton, keys, windows, rates, nesting.

The Triton comparisons run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deltakit import masks
from deltakit.kernels.apply import interpreter_enabled, uniform_triton

REPO = Path(__file__).resolve().parents[2]

needs_interpreter = pytest.mark.skipif(
    not interpreter_enabled() or importlib.util.find_spec("triton") is None,
    reason="Triton comparisons on CPU need triton and TRITON_INTERPRET=1 (set by tests/conftest.py)",
)

KEYS = [0, 1, 16, 2**31 - 1, 2**31, 2**32 + 5, 2**63 - 1, -1, -12345, -(2**63)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


try:  # the library never needs triton; these comparisons do
    import triton
    import triton.language as tl
    from triton.language.random import uint_to_uniform_float
except ImportError:  # pragma: no cover - triton is a dev dependency
    triton = None

if triton is not None:
    # Module level, not in a fixture: the interpreter re-executes a kernel's source with its module's globals.
    @triton.jit
    def _randint4x_uniform_kernel(out_ptr, n, key, offset, BLOCK: tl.constexpr):
        """Triton's own tl.randint4x numbers, word (j % 4) of counter (j // 4), written independently of deltakit."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        j = offset + i
        r0, r1, r2, r3 = tl.randint4x(key, j // 4)
        w = j % 4
        r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
        tl.store(out_ptr + i, uint_to_uniform_float(r), mask=i < n)


def _triton_uniform(key: int, n: int, offset: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    block = 4096
    _randint4x_uniform_kernel[(triton.cdiv(n, block),)](out, n, key, offset, BLOCK=block)
    return out


# ------------------------------------------------------------------------------------------------ Philox itself


def test_philox_known_answer_zero_key_zero_counter():
    # Random123's published known-answer vector for philox4x32-10 with key = counter = 0.
    words = masks._philox_words(0, 0, 0, 1)
    assert [int(w) for w in words[0]] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@needs_interpreter
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("offset", [0, 1, 3, 2**32 - 2, 2**32 + 1, 2**40 + 17])
def test_uniform_equals_triton_randint4x_bitwise(key, offset):
    n = 1001  # not a multiple of 4
    assert torch.equal(_bits(masks.uniform(key, n, offset=offset)), _bits(_triton_uniform(key, n, offset)))


@needs_interpreter
@pytest.mark.parametrize("offset", [0, 6, 2**33 + 4, 2**33 + 3])
@pytest.mark.parametrize(("block_size", "n"), [(16, 203), (1024, 5003), (65536, 5003)])
def test_library_kernel_path_equals_uniform_any_block(offset, block_size, n):
    # uniform_triton runs the exact helpers fused_apply uses (4-per-call block path when offset % 4 == 0).
    # (Small n with the small block: the interpreter pays ~10 ms per program.)
    key = masks.tensor_key(3, "encoder.layer.0.weight")
    got = uniform_triton(key, n, offset=offset, device="cpu", block_size=block_size)
    assert torch.equal(_bits(got), _bits(masks.uniform(key, n, offset=offset)))


# ------------------------------------------------------------------------------------------------ uniform


def test_uniform_windows_agree_across_chunk_boundaries():
    key = -987654321
    full = masks.uniform(key, 3 * 2**16 + 11)
    for start, n in [(0, 1), (1, 7), (2**16 - 3, 9), (5, 2**16 + 13), (2**17 + 1, 2**16 + 2)]:
        assert torch.equal(_bits(masks.uniform(key, n, offset=start)), _bits(full[start : start + n]))


@pytest.mark.parametrize("threads", [2, 3])
def test_uniform_threads_do_not_change_the_numbers(threads):
    key, offset, n = 4242, 6, 5 * 2**17 + 3  # several chunks, an offset inside a counter, a partial last chunk
    one = masks.uniform(key, n, offset=offset, threads=1)
    assert torch.equal(_bits(masks.uniform(key, n, offset=offset, threads=threads)), _bits(one))


def test_uniform_range_and_moments():
    u = masks.uniform(masks.tensor_key(0, "w"), 400_000)
    assert u.dtype == torch.float32 and u.shape == (400_000,)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # mean 1/2, var 1/12: 6-sigma bounds (deterministic input; just guards against a broken conversion).
    assert abs(float(u.double().mean()) - 0.5) < 6 * math.sqrt(1 / 12 / 400_000)
    assert abs(float(u.double().var()) - 1 / 12) < 0.002


def test_uniform_empty_and_validation():
    assert masks.uniform(1, 0).shape == (0,)
    with pytest.raises(ValueError, match="offset"):
        masks.uniform(1, 4, offset=-1)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        masks.uniform(1, 8, offset=2**63 - 4)
    with pytest.raises(ValueError, match="key"):
        masks.uniform(2**64, 4)
    with pytest.raises(TypeError, match="key"):
        masks.uniform(1.5, 4)  # type: ignore[arg-type]
    # keys >= 2**63 are the same bits as the negative key
    assert torch.equal(masks.uniform(2**64 - 1, 9), masks.uniform(-1, 9))


# ------------------------------------------------------------------------------------------------ keys


def test_tensor_key_hashes_the_documented_bytes():
    payload = b"deltakit.masks.v1\x00" + b"42" + b"\x00" + "bert.pooler.dense.weight".encode() + b"\x00" + b"row"
    expected = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little", signed=True)
    assert masks.tensor_key(42, "bert.pooler.dense.weight", "row") == expected


@pytest.fixture(scope="module")
def fresh_process() -> list[str]:
    """Output of a fresh interpreter that imports deltakit.masks and deltakit.kernels (one start-up for two tests)."""
    code = (
        "import sys; import deltakit.masks as m; import deltakit.kernels; "
        "print(m.tensor_key(7, 'a.b', 'col')); print('triton' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_tensor_key_is_stable_across_processes(fresh_process):
    # Python's hash() is salted per process; blake2b is not.
    assert int(fresh_process[0]) == masks.tensor_key(7, "a.b", "col")


def test_tensor_key_separates_seed_name_axis():
    keys = {masks.tensor_key(s, n, a) for s in (0, 1, -1) for n in ("w", "w2", "") for a in masks.AXES}
    assert len(keys) == 27
    assert all(-(2**63) <= k < 2**63 for k in keys)


def test_tensor_key_validation():
    with pytest.raises(ValueError, match="axis"):
        masks.tensor_key(0, "w", "rows")
    with pytest.raises(TypeError, match="seed"):
        masks.tensor_key(True, "w")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        masks.tensor_key(0, 3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ keep masks


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9, 0.99])
def test_kept_fraction_within_binomial_interval(rate):
    n = 200_000
    kept = int(masks.keep_mask(11, "layer.3.mlp.weight", (400, 500), rate).sum())
    mean = n * (1 - rate)
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(kept - mean) <= 5 * sd, (kept, mean, sd)


def test_masks_nested_across_rates():
    shape = (64, 300)
    rates = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]
    ms = [masks.keep_mask(5, "w", shape, r) for r in rates]
    assert bool(ms[0].all()) and not bool(ms[-1].any())
    for lo, hi in zip(ms, ms[1:]):
        assert bool((hi <= lo).all())  # kept at the higher rate => kept at the lower rate
    counts = [int(m.sum()) for m in ms]
    assert counts == sorted(counts, reverse=True) and counts[1] > counts[-2]


def test_mask_is_a_function_of_seed_name_index_only():
    shape = (33, 17)
    first = masks.keep_mask(9, "a", shape, 0.5)
    masks.keep_mask(9, "b", shape, 0.5)  # another tensor in between changes nothing
    assert torch.equal(first, masks.keep_mask(9, "a", shape, 0.5))
    assert not torch.equal(first, masks.keep_mask(9, "b", shape, 0.5))
    assert not torch.equal(first, masks.keep_mask(10, "a", shape, 0.5))
    # the element mask is the flat stream in row-major order
    u = masks.uniform(masks.tensor_key(9, "a"), 33 * 17).view(shape)
    assert torch.equal(first, u >= np.float32(0.5))


def test_row_and_col_masks_are_whole_rows_and_columns():
    shape = (40, 6, 5)  # rows = 40, cols = 30
    rows = masks.keep_mask(1, "w", shape, 0.5, axis="row").reshape(40, 30)
    cols = masks.keep_mask(1, "w", shape, 0.5, axis="col").reshape(40, 30)
    assert torch.equal(rows, rows[:, :1].expand(40, 30))
    assert torch.equal(cols, cols[:1, :].expand(40, 30))
    assert torch.equal(rows[:, 0], masks.uniform(masks.tensor_key(1, "w", "row"), 40) >= np.float32(0.5))
    assert torch.equal(cols[0], masks.uniform(masks.tensor_key(1, "w", "col"), 30) >= np.float32(0.5))


def test_rate_validation_and_edges():
    assert bool(masks.keep_mask(0, "w", (10, 10), 0).all())
    assert not bool(masks.keep_mask(0, "w", (10, 10), 1).any())
    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="rate"):
            masks.keep_mask(0, "w", (3,), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1.5"):
        masks.check_rate(1.5)


def test_matrix_shape():
    assert masks.matrix_shape((7, 3)) == (7, 3)
    assert masks.matrix_shape((7, 3, 2)) == (7, 6)
    assert masks.matrix_shape((5,)) == (5, 1)
    assert masks.matrix_shape(()) == (1, 1)
    assert masks.matrix_shape(torch.Size([0, 4])) == (0, 4)


def test_importing_masks_and_kernels_does_not_import_triton(fresh_process):
    assert fresh_process[1] == "False"
