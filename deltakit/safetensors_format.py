"""The safetensors format's rules, checked as strictly as the format defines them, and the kinds of fault.

A safetensors file is an 8-byte little-endian header length (at most 100,000,000), a UTF-8 JSON header that is an
object, then the data section. :func:`parse_header` checks the header: no duplicate keys and no NaN/Infinity; an
optional ``__metadata__`` object of string -> string; every other entry an object with a known ``dtype``, a
``shape`` of non-negative integers and ``data_offsets`` of exactly two integers with ``0 <= begin <= end`` and
``end - begin == numel * itemsize``; sorted by ``begin``, the tensors tile the data section exactly (contiguous
from 0, no gap, no shared bytes, ending at the end of the file).

Each fault kind (:class:`Problem` and its subclasses) carries the wording of the :class:`CorruptCheckpointError`
it becomes: what kind of fault it is and what to do. Messages never echo a file's bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch

__all__ = ["CorruptCheckpointError", "DTYPES", "MAX_HEADER", "Invalid", "Missing", "Outside", "Problem", "Refused",
           "Truncated", "Unsupported", "load_json", "parse_header", "show"]

MAX_HEADER = 100_000_000  # the safetensors format's limit on the header length
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu, "C64": torch.complex64,
}


class CorruptCheckpointError(ValueError):
    """A weights file cannot be used: truncated, not a valid safetensors file or index, outside the model folder,
    of an unsupported dtype, or a pickle holding objects other than tensors. The message says which, and what to do.
    """


# -- the kinds of fault: each carries the wording of its error -------------------------------------------------------
class Problem(Exception):
    """A fault in one file; ``str(self)`` is the detail, ``template`` the sentence around it."""

    template: ClassVar[str] = "{file} cannot be read ({detail})."

    def error(self, file: str, folder: str | Path) -> CorruptCheckpointError:
        kind = ("safetensors index" if file.endswith(".json") else
                "safetensors file" if file.endswith(".safetensors") else "state dict")
        return CorruptCheckpointError(
            "file " + self.template.format(file=f"{show(file)} in {folder}", detail=self, kind=kind))


class Truncated(Problem):
    template = ("{file} is truncated or corrupt ({detail}): delete it (for a Hub model, delete its folder in the "
                "Hugging Face cache or pass force_download) and fetch it again.")


class Missing(Problem):
    template = ("{file} is missing or incomplete ({detail}): fetch the complete checkpoint again; if this persists, "
                "its index is wrong (tell its publisher).")


class Invalid(Problem):
    template = ("{file} is not a valid {kind} ({detail}): deltakit refuses it. The checkpoint is malformed or "
                "hostile; fetching it again will not help, ask its publisher for one written by the safetensors "
                "library.")


class Outside(Problem):
    template = ("{file} is refused ({detail}): weight files must be regular files inside the model folder. The "
                "checkpoint is malformed or hostile; do not load it.")


class Unsupported(Problem):
    template = ("{file} cannot be read ({detail}): convert the checkpoint to a supported dtype (load it with "
                "transformers and save_pretrained it), then retry.")


class Refused(Problem):
    template = ("{file} is refused by the safe (weights-only) unpickler: the file holds objects other than tensors; "
                "deltakit will not load it ({detail}). Use a safetensors version of this model.")


def show(value: object, limit: int = 80) -> str:
    """A value from a checkpoint as safe, bounded text (ASCII escapes, clipped) for an error message."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- pure parsing ------------------------------------------------------------------------------------------------------
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Invalid(f"key {show(key)} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise Invalid(f"{name} is not a JSON number")


def load_json(raw: bytes, what: str) -> Any:
    """Parse JSON strictly: UTF-8, no duplicate keys, no NaN/Infinity (:func:`json.loads` accepts both)."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except Problem:
        raise
    except UnicodeDecodeError:
        raise Invalid(f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise Invalid(f"{what} is not valid JSON ({err.msg} at character {err.pos})") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits; nesting deeper than the stack
        raise Invalid(f"{what} is not valid JSON (a number too long or nesting too deep)") from None


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is a subclass of int, and not a size


def _entry(name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """Validate one header entry; return (dtype, shape, begin, end) with offsets relative to the data section."""
    tensor = f"tensor {show(name)}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise Invalid(f"{tensor} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise Invalid(f"{tensor} has a dtype that is not a string")
    if dtype not in DTYPES:
        raise Unsupported(f"{tensor} has dtype {show(dtype)}; supported dtypes: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise Invalid(f"{tensor} has a shape that is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1]):
        raise Invalid(f"{tensor} has data_offsets that are not two integers 0 <= begin <= end")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise Invalid(f"{tensor} has a byte length that does not equal its number of elements times the "
                       f"{dtype} item size")
    return DTYPES[dtype], tuple(shape), begin, end


def parse_header(raw: bytes, data_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """Validate a safetensors header against a data section of ``data_size`` bytes.

    Args:
        raw: the header bytes (after the 8-byte length).
        data_size: the bytes that follow the header in the file.

    Returns:
        Tensor name -> (dtype, shape, begin, end), offsets relative to the data section, in header order.

    Raises:
        Invalid: the header breaks a rule of the format (the message names it).
        Unsupported: a tensor's dtype is not one deltakit reads.
        Truncated: the data section is shorter than the header says.
    """
    header = load_json(raw, "the header")
    if not isinstance(header, dict):
        raise Invalid(f"the header is a JSON {type(header).__name__}, not an object")
    if not raw.startswith(b"{"):
        raise Invalid("the header does not start with '{'")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Invalid("__metadata__ is not an object of string -> string")
    entries = {name: _entry(name, entry) for name, entry in header.items()}
    expected = 0  # the tensors, sorted by offsets, must tile the data section
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != expected:
            where = "inside the bytes of another tensor; tensors may not share bytes" if begin < expected else \
                "after a gap of unused bytes"
            raise Invalid(f"tensor {show(name)} starts {where}")
        expected = end
    if expected > data_size:
        raise Truncated("the file ends before the data of its last tensor")
    if expected < data_size:
        raise Invalid("unused bytes follow the data of the last tensor")
    return entries
