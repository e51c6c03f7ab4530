"""Lazy tensor reader: names, dtypes and shapes without reading data; one tensor at a time.

A checkpoint folder holds either one ``model.safetensors``, a sharded set described by
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file), or -- only when the caller
opted in with ``allow_pickle=True`` -- a pickled ``pytorch_model.bin`` (read eagerly with
``torch.load(weights_only=True)``, since pickles cannot be memory-mapped).

Safetensors headers (an 8-byte little-endian length, then JSON: name -> dtype, shape, byte offsets) are parsed
here and validated against the file size; a tensor is read with one positioned ``read`` of exactly its bytes.
Plain reads rather than a memory map keep the resident memory to one tensor at a time: pages of a memory-mapped
file stay resident (and count in RSS) once touched, so mapping a 14 GB checkpoint would grow the process by
14 GB. Tensors come back in their native dtype; callers do their maths in fp32 (DESIGN.md decision 3).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TensorInfo", "TensorReader", "CorruptCheckpointError"]

_PICKLE_FILES = ("pytorch_model.bin", "model.bin", "pytorch_model.pt")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CorruptCheckpointError(ValueError):
    """A weights file is truncated or unreadable."""


@dataclass(frozen=True)
class TensorInfo:
    """Metadata of one stored tensor (read from the header only).

    Attributes:
        name: the tensor name exactly as in the checkpoint.
        dtype: the stored dtype.
        shape: the stored shape.
        file: the file that holds it.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int = 0  # absolute byte offset of the data in ``file`` (safetensors only)
    nbytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def _corrupt(file: Path, err: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"cannot read weights file {file} ({err}). The file is truncated or corrupt: delete it "
        "(for a Hub model, delete its folder in the Hugging Face cache or pass force_download) and fetch it again."
    )


class TensorReader:
    """Read the tensors of one checkpoint folder lazily.

    Args:
        folder: a folder with ``model.safetensors``, ``*.safetensors.index.json`` + shards, or other
            ``*.safetensors`` files; or, with ``allow_pickle=True``, a ``pytorch_model.bin``.
        allow_pickle: read pickled weights when no safetensors exist. Pickles can run arbitrary code
            when loaded; deltakit uses ``weights_only=True`` but still refuses them by default.

    Raises:
        FileNotFoundError: the folder has no weights deltakit may read.
        CorruptCheckpointError: a file's header cannot be parsed or the file is shorter than its header says.

    The reader holds no open files: each :meth:`read` opens, reads and closes, so it is safe to keep many.
    """

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self._infos: dict[str, TensorInfo] = {}
        self._eager: dict[str, torch.Tensor] | None = None
        files = self._weight_files()
        #: The weight files this reader reads, in order (what a fingerprint of the checkpoint must cover).
        self.files: list[Path] = list(files)
        if files:
            for file in files:
                self._index_file(file)
        elif allow_pickle and (pickle := self._pickle_file()) is not None:
            self.files = [pickle]
            self._load_pickle(pickle)
        else:
            pickle = self._pickle_file()
            if pickle is not None:
                raise FileNotFoundError(
                    f"{self.folder} holds only pickled weights ({pickle.name}); deltakit reads safetensors by "
                    "default because a pickle can run code when loaded. If you trust this model, pass "
                    "allow_pickle=True (CLI: --allow-pickle)."
                )
            raise FileNotFoundError(
                f"no weights in {self.folder}: expected model.safetensors or a *.safetensors.index.json with shards."
            )

    # -- discovery -------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CorruptCheckpointError(
                    f"{indexes[0]} lists shards that are missing: {missing}. Fetch the complete checkpoint again."
                )
            return files
        return sorted(self.folder.glob("*.safetensors"))

    def _pickle_file(self) -> Path | None:
        for name in _PICKLE_FILES:
            if (self.folder / name).exists():
                return self.folder / name
        return None

    def _index_file(self, file: Path) -> None:
        size = file.stat().st_size
        try:
            with file.open("rb") as fh:
                raw_len = fh.read(8)
                header_len = int.from_bytes(raw_len, "little")
                if len(raw_len) < 8 or header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds the file size {size}")
                header = json.loads(fh.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise _corrupt(file, err) from err
        data_start = 8 + header_len
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CorruptCheckpointError(f"{file}: tensor {key!r} has unsupported dtype {entry.get('dtype')!r}.")
            begin, end = entry["data_offsets"]
            shape = tuple(int(x) for x in entry["shape"])
            info = TensorInfo(key, dtype, shape, file, data_start + begin, end - begin)
            if info.nbytes != info.numel * dtype.itemsize or data_start + end > size:
                raise _corrupt(file, ValueError(f"tensor {key!r} needs bytes {data_start + begin}..{data_start + end}"
                                                f" but the file has {size} bytes"))
            self._infos[key] = info

    def _load_pickle(self, file: Path) -> None:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for bad pickles
            raise _corrupt(file, err) from err
        self._eager = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        for key, t in self._eager.items():
            self._infos[key] = TensorInfo(key, t.dtype, tuple(t.shape), file)

    # -- public API ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """All tensor names, in checkpoint order."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Metadata of one tensor, without reading data.

        Raises:
            KeyError: the checkpoint has no tensor of that name.
        """
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.folder} ({len(self._infos)} tensors)") from None

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor in its stored dtype (memory-mapped for safetensors).

        Raises:
            KeyError: unknown name.
            CorruptCheckpointError: the bytes cannot be read.
        """
        info = self.info(name)
        if self._eager is not None:
            return self._eager[name]
        buf = bytearray(info.nbytes)
        try:
            with info.file.open("rb", buffering=0) as fh:
                got = os.preadv(fh.fileno(), [buf], info.start) if info.nbytes else 0
        except OSError as err:
            raise _corrupt(info.file, err) from err
        if got != info.nbytes:
            raise _corrupt(info.file, ValueError(f"read {got} of {info.nbytes} bytes of {name!r}"))
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos
