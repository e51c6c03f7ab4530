"""Skip marks and helpers shared by the Triton kernel tests (imported as ``from triton_marks import ...``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from deltakit.kernels.apply import interpreter_enabled

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and interpreter_enabled()),
    reason="kernel tests on CPU need triton and TRITON_INTERPRET=1 (set by tests/conftest.py)",
)
needs_compiled_triton = pytest.mark.skipif(
    not HAS_TRITON or interpreter_enabled(),
    reason="GPU kernel tests need triton with TRITON_INTERPRET=0 (tests/conftest.py defaults it to 1)",
)
#: The integer dtype of each float dtype's width: compare bit patterns with ``t.view(INT_VIEW[t.dtype])``.
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}
