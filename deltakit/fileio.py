"""File-writing helpers shared by the statistics and the sweep store: one JSON encoder, one atomic replace."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["json_default", "write_atomically"]


def json_default(o: object) -> object:
    """``json.dumps(default=...)`` for results: tensors become lists, NumPy/torch scalars numbers, the rest text."""
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it over ``path``.

    A failed write (a full disk, a kill) never leaves a truncated file where a reader expects a whole one: the
    previous file, if any, stays as it was, and the temporary file is removed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
