"""Lazy, strict tensor reader: names, dtypes and shapes without reading data; one tensor at a time.

**Which files are read** -- what ``transformers``' ``from_pretrained`` loads from a folder, nothing else:

* ``model.safetensors`` when it exists;
* else ``model.safetensors.index.json``: exactly the shards and tensor names of its ``weight_map`` (a JSON object
  of tensor name -> shard file). A tensor listed for a shard that does not hold it is an error; tensors a shard
  holds but the index does not list *for that shard* are ignored, so a tensor present in two shards is read from
  the one the index names;
* else, only when the caller opted in with ``allow_pickle=True``, a pickled ``pytorch_model.bin``, read eagerly
  with ``torch.load(weights_only=True)``: the safe unpickler refuses any object other than tensors.

Other ``*.safetensors`` and ``*.safetensors.index.json`` files in the folder are ignored with a warning and listed
in :attr:`TensorReader.ignored_files`; a folder holding only such files is refused (rename the file to
``model.safetensors`` or add an index).

**Where files may be.** Every file read must be a regular file inside the folder once symlinks are resolved:
names that lead outside (``../x``, absolute paths, ``/dev/stdin``), links to files outside, FIFOs and devices are
refused before they are opened. The one exception is the Hugging Face cache: a snapshot folder
``models--org--name/snapshots/<commit>/`` links its files to ``models--org--name/blobs/<hash>``, so links into that
repo's ``blobs`` folder are followed.

**Headers** are checked as strictly as the safetensors format defines them (:mod:`deltakit.safetensors_format`).

**Errors** (:class:`CorruptCheckpointError`) say which kind of fault it is and what to do: a truncated file (fetch
it again), a file that is not a valid safetensors file (refused: the rule it breaks is named), a file outside the
folder or not a regular file (refused: the checkpoint is malformed or hostile), an unsupported dtype, or a pickle
the safe unpickler refused. They name the file as given relative to the folder and never echo its bytes.

Plain positioned reads (``os.preadv``) rather than a memory map keep the resident memory to one tensor at a time:
pages of a memory-mapped file stay resident (and count in RSS) once touched, so mapping a 14 GB checkpoint would
grow the process by 14 GB. No file stays open between calls. Tensors come back in their native dtype; callers do
their maths in fp32 and write back once in the model's dtype.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.safetensors_format import (
    MAX_HEADER,
    CorruptCheckpointError,
    Invalid,
    Missing,
    Outside,
    Problem,
    Refused,
    Truncated,
    load_json,
    parse_header,
    show,
)

__all__ = ["CheckpointChangedError", "CorruptCheckpointError", "Entry", "TensorInfo", "TensorReader", "content_parts",
           "parse_index", "read_header", "shard_entries", "tensor_infos"]

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "model.bin", "pytorch_model.pt")


# -- files ------------------------------------------------------------------------------------------------------------
def _allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where weight files may resolve to: the folder; for a Hub cache snapshot, also its repo's ``blobs``."""
    root = folder.resolve()
    snapshots = root.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return root, snapshots.parent / "blobs"
    return (root,)


@contextmanager
def _opened(path: Path) -> Iterator[int]:
    """A read-only descriptor of a regular file. ``O_NONBLOCK`` and the ``fstat`` check make sure a FIFO or
    device swapped in after the path was checked is neither waited on nor read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Outside("it is not a regular file")
        yield fd
    finally:
        os.close(fd)


def _pread(fd: int, size: int, offset: int, what: str) -> bytearray:
    """Read exactly ``size`` bytes at ``offset`` (in several calls: Linux returns at most ~2 GiB per call)."""
    buf = bytearray(size)
    view, done = memoryview(buf), 0
    while done < size:
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise Truncated(f"the file ends inside {what}")
        done += got
    return buf


SAMPLES, SAMPLE_BYTES = 16, 4096


class CheckpointChangedError(RuntimeError):
    """A weight file changed after it was first read (its header or sampled data differ); the message names it."""


def content_parts(file: Path) -> Iterator[bytes]:
    """What pins a safetensors file's content at a constant cost: its name and size, its header (the 8-byte length
    and the JSON) and 16 evenly spaced 4 KiB samples of its data. Retraining or re-saving changes almost every byte,
    so the samples catch it; hashing a 15 GB file whole would take minutes. The file must have been checked by a
    :class:`TensorReader` (its header length fits the file)."""
    with _opened(file) as fd:
        size = os.fstat(fd).st_size
        data_start = 8 + int.from_bytes(os.pread(fd, 8, 0), "little")
        yield f"{file.name}\0{size}\0".encode()
        yield os.pread(fd, data_start, 0)
        last = max(size - SAMPLE_BYTES, data_start)  # where the last sample starts
        for i in range(SAMPLES):
            yield os.pread(fd, SAMPLE_BYTES, data_start + (last - data_start) * i // (SAMPLES - 1))


@dataclass(frozen=True)
class TensorInfo:
    """Metadata of one stored tensor (read from the header only).

    Attributes:
        name: the tensor name exactly as in the checkpoint.
        dtype: the stored dtype.
        shape: the stored shape.
        file: the file that holds it (the model folder joined with the name the checkpoint gives it).
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


# -- the rules shared by every reader (local files here, Hub byte ranges in deltakit.hubstream) ------------------------
#: An entry of a validated header: (dtype, shape, begin, end), offsets relative to the data section.
Entry = tuple[torch.dtype, tuple[int, ...], int, int]


def parse_index(raw: bytes) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``model.safetensors.index.json``, checked.

    Raises:
        Invalid: the index is not strict JSON, not an object, or its weight_map is not a non-empty object of
            tensor name -> shard file name.
    """
    index = load_json(raw, "the index")
    if not isinstance(index, dict):
        raise Invalid(f"the index is a JSON {type(index).__name__}, not an object")
    weight_map = index.get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise Invalid("its weight_map is not a non-empty object of tensor name -> shard file name")
    return weight_map


def read_header(size: int, read: Callable[[int, int, str], bytes]) -> tuple[int, dict[str, Entry]]:
    """Read and validate the header of a safetensors file of ``size`` bytes.

    Args:
        size: the file's size in bytes.
        read: ``read(offset, nbytes, what)`` returns exactly ``nbytes`` bytes at ``offset`` (``what`` names them
            for an error), or raises :class:`Truncated`.

    Returns:
        (the absolute offset of the data section, tensor name -> entry in header order).

    Raises:
        Invalid / Unsupported / Truncated: as :func:`deltakit.safetensors_format.parse_header`, plus a header length
            over the format's limit or past the end of the file.
    """
    if size < 8:
        raise Truncated("the file ends inside the 8-byte header length")
    header_len = int.from_bytes(read(0, 8, "the 8-byte header length"), "little")
    if header_len > MAX_HEADER:
        raise Invalid(f"its header length exceeds the format's limit of {MAX_HEADER:,} bytes")
    if header_len > size - 8:
        raise Truncated("the file ends inside its header")
    return 8 + header_len, parse_header(read(8, header_len, "its header"), size - 8 - header_len)


def shard_entries(entries: dict[str, Entry], weight_map: dict[str, str] | None, name: str) -> dict[str, Entry]:
    """The entries of file ``name`` that are read: all of them without an index, else those the index maps to it.

    Raises:
        Missing: the index lists a tensor in ``name`` that the file does not hold.
    """
    if weight_map is None:
        return entries
    listed = [k for k, shard in weight_map.items() if shard == name]
    if absent := [k for k in listed if k not in entries]:
        raise Missing(f"it does not hold {len(absent)} of the tensors the index lists in it, e.g. {show(absent[0])}")
    return {k: entries[k] for k in entries if weight_map.get(k) == name}


def tensor_infos(entries: dict[str, Entry], data_start: int, file: Path) -> dict[str, TensorInfo]:
    """The :class:`TensorInfo` of each entry of ``file``, whose data section starts at ``data_start``."""
    return {key: TensorInfo(key, dtype, shape, file, data_start + begin, end - begin)
            for key, (dtype, shape, begin, end) in entries.items()}


class TensorReader:
    """Read the tensors of one checkpoint folder lazily and strictly (see the module docstring for the rules).

    Args:
        folder: a folder with ``model.safetensors`` or ``model.safetensors.index.json`` + shards; or, with
            ``allow_pickle=True``, a ``pytorch_model.bin``.
        allow_pickle: read pickled weights when no safetensors weights exist. Pickles can run arbitrary code
            when loaded; deltakit uses ``weights_only=True`` but still refuses them by default.

    Attributes:
        files: the weight files this reader reads, in order (what a fingerprint of the checkpoint must cover).
        ignored_files: other ``*.safetensors`` / ``*.safetensors.index.json`` files in the folder, not read.

    Raises:
        FileNotFoundError: the folder has no weights deltakit may read (the message says what to do).
        CorruptCheckpointError: a file is truncated, invalid, outside the folder or refused (the message says which).

    Warns:
        UserWarning: when ``ignored_files`` is not empty.

    The reader holds no open files: each :meth:`read` opens, reads and closes, so it is safe to keep many.
    """

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self._roots = _allowed_roots(self.folder)
        self._infos: dict[str, TensorInfo] = {}
        self._eager: dict[str, torch.Tensor] | None = None
        names, weight_map, used = self._select()
        self.files: list[Path] = [self.folder / n for n in names]
        self.ignored_files: list[Path] = sorted(
            p for p in {*self.folder.glob("*.safetensors"), *self.folder.glob("*.safetensors.index.json")}
            if p.name not in used)
        pickle_name = next((n for n in _PICKLE_FILES if os.path.lexists(self.folder / n)), None)
        ignored = [p.name for p in self.ignored_files]
        if names:
            for name in names:
                self._index_safetensors(name, weight_map)
        elif allow_pickle and pickle_name is not None:
            self.files = [self.folder / pickle_name]
            self._load_pickle(pickle_name)
        elif pickle_name is not None:
            raise FileNotFoundError(
                f"{self.folder} holds only pickled weights ({pickle_name}); deltakit reads safetensors by "
                "default because a pickle can run code when loaded. If you trust this model, pass "
                "allow_pickle=True (CLI: --allow-pickle)."
            )
        elif ignored:
            raise FileNotFoundError(
                f"{self.folder} has neither {_WEIGHTS} nor {_INDEX}, only {ignored}, which deltakit does not read "
                f"(transformers would not load them either). Rename a single-file checkpoint to {_WEIGHTS}, or add a "
                f"{_INDEX} whose weight_map maps each tensor name to its shard."
            )
        else:
            raise FileNotFoundError(f"no weights in {self.folder}: expected {_WEIGHTS} or {_INDEX} with its shards.")
        if ignored:
            warnings.warn(
                f"{self.folder}: ignoring weight files {ignored}. deltakit reads what transformers loads ({_WEIGHTS}, "
                f"else the shards listed in {_INDEX}); move them away if they hold the weights you meant.",
                stacklevel=2,
            )

    # -- discovery -------------------------------------------------------------------------------------------------
    def _select(self) -> tuple[list[str], dict[str, str] | None, set[str]]:
        """(safetensors files to read, the index's weight_map or None, every name used) -- transformers' choice."""
        if os.path.lexists(self.folder / _WEIGHTS):
            return [_WEIGHTS], None, {_WEIGHTS}
        if not os.path.lexists(self.folder / _INDEX):
            return [], None, set()
        with self._blame(_INDEX):
            weight_map = parse_index(self._checked(_INDEX).read_bytes())
        names = sorted(set(weight_map.values()))
        return names, weight_map, {_INDEX, *(os.path.normpath(n) for n in names)}

    @contextmanager
    def _blame(self, name: str) -> Iterator[None]:
        """Turn a fault found in file ``name`` into its :class:`CorruptCheckpointError`."""
        try:
            yield
        except Problem as problem:
            raise problem.error(name, self.folder) from None

    def _checked(self, name: str) -> Path:
        """The resolved path of file ``name`` (relative to the folder), checked before anything opens it."""
        root = os.path.abspath(self.folder)
        if os.path.isabs(name) or os.path.commonpath([root, os.path.normpath(os.path.join(root, name))]) != root:
            raise Outside("its name leads outside the model folder")
        try:
            path = (self.folder / name).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise Outside("its symlinks cannot be resolved") from None
        if not any(path.is_relative_to(r) for r in self._roots):
            raise Outside("it is a link to a file outside the model folder")
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise Missing("it does not exist") from None
        if not stat.S_ISREG(mode):
            raise Outside("it is not a regular file but a FIFO, device or folder")
        return path

    def _index_safetensors(self, name: str, weight_map: dict[str, str] | None) -> None:
        with self._blame(name), _opened(self._checked(name)) as fd:
            data_start, entries = read_header(os.fstat(fd).st_size,
                                              lambda offset, size, what: bytes(_pread(fd, size, offset, what)))
            entries = shard_entries(entries, weight_map, name)
        self._infos.update(tensor_infos(entries, data_start, self.folder / name))

    def _load_pickle(self, name: str) -> None:
        with self._blame(name):
            path = self._checked(name)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:  # torch's "Weights only load failed": a global it will not run
                raise Refused("torch.load(weights_only=True) raised UnpicklingError") from err
            except Exception as err:  # torch raises several unrelated types for cut-off files
                raise Truncated(f"torch.load raised {type(err).__name__}") from err
            if not isinstance(state, dict):
                raise Invalid(f"it holds a {type(state).__name__}, not a dict of tensor name -> tensor")
        self._eager = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        for key, t in self._eager.items():
            self._infos[key] = TensorInfo(key, t.dtype, tuple(t.shape), self.folder / name)

    # -- public API ------------------------------------------------------------------------------------------------
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
        """Read one tensor in its stored dtype, with one positioned read of exactly its bytes.

        Raises:
            KeyError: unknown name.
            CorruptCheckpointError: the file changed since the header was read (shorter, or no longer a regular file).
        """
        info = self.info(name)
        if self._eager is not None:
            return self._eager[name]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        with self._blame(str(info.file.relative_to(self.folder))), _opened(info.file) as fd:
            buf = _pread(fd, info.nbytes, info.start, f"tensor {show(name)}")
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def digests(self) -> dict[Path, str]:
        """A sha256 of each weight file's :func:`content_parts` (pickles: of the whole file)."""
        out = {}
        for file in self.files:
            h = hashlib.sha256()
            for part in (content_parts(file) if self._eager is None else (file.read_bytes(),)):
                h.update(part)
            out[file] = h.hexdigest()
        return out

    def check_unchanged(self, digests: dict[Path, str], *, fix: str = "") -> None:
        """Refuse files whose content changed since ``digests`` (:meth:`digests`) was taken.

        Raises:
            CheckpointChangedError: naming the file; ``fix`` ends the message.
        """
        try:
            now = self.digests()
        except (OSError, ValueError) as err:
            raise CheckpointChangedError(f"a weight file of {self.folder} can no longer be read ({err}). {fix}") \
                from None
        for file, digest in digests.items():
            if now.get(file) != digest:
                raise CheckpointChangedError(
                    f"{file.name} in {self.folder} changed after it was first read (its header or data differ): "
                    f"the checkpoint was replaced or rewritten while in use. {fix}")

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos
