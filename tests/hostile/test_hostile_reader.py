"""Hostile checkpoints against the reader and the pairing pre-flight: each refused quickly, with a clear message.

Every file here is written by hand (``struct.pack('<Q', len(header)) + header + data``), most of them files the
safetensors library would refuse to write. A case asserts the exception type, that the message names the offending
file or value and says what to do, that it never echoes the file's bytes, and that it finishes within a time bound.
FIFOs and ``/dev/stdin`` would block a reader that opens them: the pytest-timeout marker stops a hang from ever
stalling the suite, and the time bound turns one into a failure.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltakit.pairing import PairingError, pair_models
from deltakit.sources import resolve
from deltakit.tensors import CorruptCheckpointError, TensorReader

SECONDS = 5.0  # the time bound of every case
MARKER = "PWNED"  # the file a malicious pickle would create, were it ever run
SECRET = "hf_SECRETTOKENabcdefghij"  # the contents of a token file an index points at

# What each kind of message tells the user to do.
REFETCH = r"truncated or corrupt.*fetch it again"
REFUSE = r"not a valid safetensors file.*deltakit refuses it"
BAD_INDEX = r"not a valid safetensors index.*deltakit refuses it"
OUTSIDE = r"refused.*must be regular files inside the model folder.*malformed or hostile"
INCOMPLETE = r"fetch the complete checkpoint again"
UNPICKLER = (r"refused by the safe \(weights-only\) unpickler: the file holds objects other than tensors; "
             "deltakit will not load it")

W = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)  # the data of a valid F32 tensor of shape (4,)


def entry(dtype: object = "F32", shape: object = (4,), offsets: object = (0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def st(header: object, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, header (JSON unless given as bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


VALID = st({"w": entry()}, W)
Build = Callable[[Path], Path]  # writes a checkpoint under a temporary folder, returns the folder to read


def files(**contents: bytes | str | dict) -> Build:
    """Files by name (``__`` in a keyword stands for ``.``); dicts are written as JSON."""
    def build(tmp: Path) -> Path:
        folder = tmp / "m"
        folder.mkdir()
        for name, value in contents.items():
            value = json.dumps(value) if isinstance(value, dict | list) else value
            path = folder / name.replace("__", ".")
            path.write_bytes(value if isinstance(value, bytes) else value.encode())
        (tmp / "secret.safetensors").write_bytes(VALID)  # a valid file outside the folder, for escapes to reach
        (tmp / "token").write_text(SECRET)
        return folder
    return build


def model(raw: bytes) -> Build:
    return files(model__safetensors=raw)


def index(weight_map: object, **shards: bytes) -> Build:
    return files(model__safetensors__index__json=json.dumps({"metadata": {}, "weight_map": weight_map}), **shards)


def then(build: Build, step: Callable[[Path, Path], None]) -> Build:
    """``build``, then ``step(folder, tmp)`` (links, FIFOs, folders)."""
    def run(tmp: Path) -> Path:
        folder = build(tmp)
        step(folder, tmp)
        return folder
    return run


def hub_snapshot(link_target: Callable[[Path], Path], repo: str = "models--org--name") -> Build:
    """A Hugging Face cache snapshot whose model.safetensors links to ``link_target(tmp)``."""
    def build(tmp: Path) -> Path:
        for r in ("models--org--name", "models--other--repo"):
            (tmp / "hub" / r / "blobs").mkdir(parents=True)
            (tmp / "hub" / r / "blobs" / "0123abcd").write_bytes(VALID)
        snap = tmp / "hub" / repo / "snapshots" / "c0ffee"
        snap.mkdir(parents=True)
        (snap / "model.safetensors").symlink_to(os.path.relpath(link_target(tmp), snap))
        return snap
    return build


class Evil:
    """Unpickling this runs ``touch <tmp>/PWNED``: the safe unpickler must refuse it before it can run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return os.system, (f"touch {self.folder.parent / MARKER}",)


def evil_pickle(zipped: bool) -> Build:
    def build(tmp: Path) -> Path:
        folder = files()(tmp)
        if zipped:
            torch.save({"w": Evil(folder)}, folder / "pytorch_model.bin")
        else:
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil(folder)}))
        return folder
    return build


def saved_pickle(obj: object, cut: bool = False) -> Build:
    def build(tmp: Path) -> Path:
        folder = files()(tmp)
        torch.save(obj, folder / "pytorch_model.bin")
        if cut:
            data = (folder / "pytorch_model.bin").read_bytes()
            (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
        return folder
    return build


@dataclass(frozen=True)
class Case:
    """A hostile checkpoint, the exception it must raise and what its message must say (regexes)."""

    id: str
    build: Build
    error: type[Exception]
    says: tuple[str, ...]
    allow_pickle: bool = False


REFUSED = [
    # -- truncated files: fetch again --------------------------------------------------------------------------------
    Case("empty-file", model(b""), CorruptCheckpointError, ("'model.safetensors'", "8-byte header length", REFETCH)),
    Case("shorter-than-length", model(b"\x10\x00"), CorruptCheckpointError, ("'model.safetensors'", REFETCH)),
    Case("header-length-beyond-file", model(struct.pack("<Q", 4096) + b'{"w": 1}'), CorruptCheckpointError,
         ("'model.safetensors'", "ends inside its header", REFETCH)),
    Case("truncated-data", model(VALID[:-3]), CorruptCheckpointError,
         ("'model.safetensors'", "ends before the data of its last tensor", REFETCH)),
    # -- the header itself ---------------------------------------------------------------------------------------------
    Case("header-too-large", model(struct.pack("<Q", 200_000_000) + b"{}"), CorruptCheckpointError,
         ("'model.safetensors'", "limit of 100,000,000 bytes", REFUSE)),
    Case("text-file-as-weights", model(SECRET.encode()), CorruptCheckpointError,
         ("'model.safetensors'", "limit of 100,000,000 bytes", REFUSE)),
    Case("invalid-utf8", model(st(b'{"w\xff": 1}')), CorruptCheckpointError,
         ("'model.safetensors'", "not UTF-8", REFUSE)),
    Case("not-json", model(st(b"{not json")), CorruptCheckpointError,
         ("'model.safetensors'", "not valid JSON", REFUSE)),
    Case("header-a-list", model(st([entry()], W)), CorruptCheckpointError, ("JSON list, not an object", REFUSE)),
    Case("header-a-number", model(st(42)), CorruptCheckpointError, ("JSON int, not an object", REFUSE)),
    Case("header-leading-space", model(st(b" " + json.dumps({"w": entry()}).encode(), W)), CorruptCheckpointError,
         ("does not start with '\\{'", REFUSE)),
    Case("duplicate-keys", model(st(b'{"w": %s, "w": %s}' % (json.dumps(entry()).encode(),
                                                              json.dumps(entry(offsets=(16, 32))).encode()), W + W)),
         CorruptCheckpointError, ("key 'w' appears twice", REFUSE)),
    Case("duplicate-field", model(st(b'{"w": {"dtype": "F32", "dtype": "I32", "shape": [4], "data_offsets": [0, 16]}}',
                                     W)), CorruptCheckpointError, ("key 'dtype' appears twice", REFUSE)),
    Case("nan-offset", model(st(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, NaN]}}', W)),
         CorruptCheckpointError, ("NaN is not a JSON number", REFUSE)),
    Case("deep-nesting", model(st(b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
         CorruptCheckpointError, ("nesting too deep", REFUSE)),
    Case("metadata-not-str-to-str", model(st({"__metadata__": {"format": 1}, "w": entry()}, W)), CorruptCheckpointError,
         ("__metadata__ is not an object of string -> string", REFUSE)),
    Case("metadata-a-list", model(st({"__metadata__": ["pt"], "w": entry()}, W)), CorruptCheckpointError,
         ("__metadata__", REFUSE)),
    # -- one entry -----------------------------------------------------------------------------------------------------
    Case("entry-not-object", model(st({"w": [0, 16]}, W)), CorruptCheckpointError,
         ("tensor 'w' is not an object with dtype, shape and data_offsets", REFUSE)),
    Case("entry-without-offsets", model(st({"w": {"dtype": "F32", "shape": [4]}}, W)), CorruptCheckpointError,
         ("tensor 'w'", "data_offsets", REFUSE)),
    Case("unknown-dtype", model(st({"w": entry(dtype="X99")}, W)), CorruptCheckpointError,
         ("tensor 'w' has dtype 'X99'", "supported dtypes: F64, F32", "U32", "convert the checkpoint")),
    Case("dtype-not-string", model(st({"w": entry(dtype=7)}, W)), CorruptCheckpointError,
         ("tensor 'w' has a dtype that is not a string", REFUSE)),
    Case("negative-shape", model(st({"w": entry(shape=(-1, -4))}, W)), CorruptCheckpointError,
         ("tensor 'w' has a shape that is not a list of non-negative integers", REFUSE)),
    Case("shape-of-strings", model(st({"w": entry(shape=["4"])}, W)), CorruptCheckpointError,
         ("tensor 'w' has a shape", REFUSE)),
    Case("shape-of-bools", model(st({"w": entry(dtype="U8", shape=[True], offsets=(0, 1))}, b"\x01")),
         CorruptCheckpointError, ("tensor 'w' has a shape", REFUSE)),
    Case("offsets-strings", model(st({"w": entry(offsets=["0", "16"])}, W)), CorruptCheckpointError,
         ("tensor 'w' has data_offsets that are not two integers", REFUSE)),
    Case("offsets-floats", model(st({"w": entry(offsets=[0.0, 16.0])}, W)), CorruptCheckpointError,
         ("tensor 'w' has data_offsets", REFUSE)),
    Case("offsets-bools", model(st({"w": entry(dtype="U8", shape=(1,), offsets=[False, True])}, b"\x01")),
         CorruptCheckpointError, ("tensor 'w' has data_offsets", REFUSE)),
    Case("offsets-three", model(st({"w": entry(offsets=(0, 16, 16))}, W)), CorruptCheckpointError,
         ("tensor 'w' has data_offsets", REFUSE)),
    Case("offsets-negative", model(st({"w": entry(offsets=(-16, 0))}, W)), CorruptCheckpointError,
         ("tensor 'w' has data_offsets", "0 <= begin <= end", REFUSE)),
    Case("offsets-reversed", model(st({"w": entry(offsets=(16, 0))}, W)), CorruptCheckpointError,
         ("tensor 'w' has data_offsets", REFUSE)),
    Case("dtype-shape-mismatch", model(st({"w": entry(offsets=(0, 8))}, W[:8])), CorruptCheckpointError,
         ("tensor 'w' has a byte length", "F32", REFUSE)),
    # -- the entries together ------------------------------------------------------------------------------------------
    Case("shared-bytes", model(st({"w": entry(), "v": entry()}, W)), CorruptCheckpointError,
         ("tensor 'v' starts inside the bytes of another tensor", "may not share bytes", REFUSE)),
    Case("overlap", model(st({"w": entry(), "v": entry(offsets=(8, 24))}, W + W[:8])), CorruptCheckpointError,
         ("tensor 'v' starts inside the bytes of another tensor", REFUSE)),
    Case("gap", model(st({"w": entry(), "v": entry(offsets=(20, 36))}, W + b"\0" * 4 + W)), CorruptCheckpointError,
         ("tensor 'v' starts after a gap", REFUSE)),
    Case("gap-at-start", model(st({"w": entry(offsets=(4, 20))}, b"\0" * 4 + W)), CorruptCheckpointError,
         ("tensor 'w' starts after a gap", REFUSE)),
    Case("trailing-bytes", model(VALID + b"hidden"), CorruptCheckpointError,
         ("unused bytes follow the data of the last tensor", REFUSE)),
    # -- the index -----------------------------------------------------------------------------------------------------
    Case("index-not-object", files(model__safetensors__index__json="[]", a__safetensors=VALID), CorruptCheckpointError,
         ("'model.safetensors.index.json'", "JSON list, not an object", BAD_INDEX)),
    Case("index-not-json", files(model__safetensors__index__json="{", a__safetensors=VALID), CorruptCheckpointError,
         ("'model.safetensors.index.json'", "not valid JSON", BAD_INDEX)),
    Case("index-without-weight-map", files(model__safetensors__index__json={"metadata": {}}, a__safetensors=VALID),
         CorruptCheckpointError, ("weight_map is not a non-empty object", BAD_INDEX)),
    Case("weight-map-not-object", index(["a.safetensors"], a__safetensors=VALID), CorruptCheckpointError,
         ("'model.safetensors.index.json'", "weight_map is not a non-empty object", BAD_INDEX)),
    Case("weight-map-value-not-str", index({"w": 1}, a__safetensors=VALID), CorruptCheckpointError,
         ("weight_map", "tensor name -> shard file name", BAD_INDEX)),
    Case("weight-map-duplicate-tensor",
         files(model__safetensors__index__json='{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}',
               a__safetensors=VALID, b__safetensors=VALID),
         CorruptCheckpointError, ("key 'w' appears twice", BAD_INDEX)),
    Case("index-names-missing-shard", index({"w": "a.safetensors", "v": "b.safetensors"}, a__safetensors=VALID),
         CorruptCheckpointError, ("'b.safetensors'", "does not exist", INCOMPLETE)),
    Case("tensor-missing-from-shard", index({"w": "a.safetensors", "x": "a.safetensors"}, a__safetensors=VALID),
         CorruptCheckpointError, ("'a.safetensors'", "does not hold 1 of the tensors the index lists in it", "'x'",
                                  INCOMPLETE)),
    Case("only-other-safetensors", files(weights__safetensors=VALID), FileNotFoundError,
         ("'weights.safetensors'", "Rename a single-file checkpoint to model.safetensors",
          "add a model.safetensors.index.json")),
    # -- paths -------------------------------------------------------------------------------------------------------
    Case("index-dotdot-escape", index({"w": "../secret.safetensors"}), CorruptCheckpointError,
         ("'../secret.safetensors'", "leads outside the model folder", OUTSIDE)),
    Case("index-dotdot-in-the-middle", index({"w": "sub/../../secret.safetensors"}), CorruptCheckpointError,
         ("'sub/../../secret.safetensors'", "leads outside", OUTSIDE)),
    Case("index-absolute-path", index({"w": "/etc/hostname"}), CorruptCheckpointError,
         ("'/etc/hostname'", "leads outside the model folder", OUTSIDE)),
    Case("index-token-file", lambda tmp: index({"w": str(tmp / "token")})(tmp), CorruptCheckpointError,
         ("token'", "leads outside the model folder", OUTSIDE)),
    Case("index-dev-stdin", index({"w": "/dev/stdin"}), CorruptCheckpointError,
         ("'/dev/stdin'", "leads outside", OUTSIDE)),
    Case("fifo-model", then(files(), lambda f, t: os.mkfifo(f / "model.safetensors")), CorruptCheckpointError,
         ("'model.safetensors'", "not a regular file", OUTSIDE)),
    Case("fifo-shard", then(index({"w": "a.safetensors"}), lambda f, t: os.mkfifo(f / "a.safetensors")),
         CorruptCheckpointError, ("'a.safetensors'", "not a regular file", OUTSIDE)),
    Case("fifo-index", then(files(a__safetensors=VALID), lambda f, t: os.mkfifo(f / "model.safetensors.index.json")),
         CorruptCheckpointError, ("'model.safetensors.index.json'", "not a regular file", OUTSIDE)),
    Case("folder-as-weights", then(files(), lambda f, t: (f / "model.safetensors").mkdir()), CorruptCheckpointError,
         ("'model.safetensors'", "not a regular file", OUTSIDE)),
    Case("symlink-outside", then(files(), lambda f, t: (f / "model.safetensors").symlink_to(t / "secret.safetensors")),
         CorruptCheckpointError, ("'model.safetensors'", "link to a file outside the model folder", OUTSIDE)),
    Case("symlink-to-dev-zero", then(files(), lambda f, t: (f / "model.safetensors").symlink_to("/dev/zero")),
         CorruptCheckpointError, ("'model.safetensors'", "outside the model folder", OUTSIDE)),
    Case("symlink-loop", then(files(), lambda f, t: (f / "model.safetensors").symlink_to("model.safetensors")),
         CorruptCheckpointError, ("'model.safetensors'", "symlinks cannot be resolved", OUTSIDE)),
    Case("hub-link-to-another-repos-blob",
         hub_snapshot(lambda t: t / "hub" / "models--other--repo" / "blobs" / "0123abcd"),
         CorruptCheckpointError, ("'model.safetensors'", "link to a file outside", OUTSIDE)),
    Case("blobs-outside-a-hub-repo", hub_snapshot(lambda t: t / "hub" / "models--org--name" / "blobs" / "0123abcd",
                                                  repo="not-a-repo"),
         CorruptCheckpointError, ("'model.safetensors'", "link to a file outside", OUTSIDE)),
    # -- pickles -------------------------------------------------------------------------------------------------------
    Case("pickle-refused-by-default", saved_pickle({"w": torch.ones(2)}), FileNotFoundError,
         ("pytorch_model.bin", "allow_pickle=True")),
    Case("malicious-pickle", evil_pickle(zipped=False), CorruptCheckpointError, ("'pytorch_model.bin'", UNPICKLER),
         allow_pickle=True),
    Case("malicious-torch-save", evil_pickle(zipped=True), CorruptCheckpointError, ("'pytorch_model.bin'", UNPICKLER),
         allow_pickle=True),
    Case("truncated-pickle", saved_pickle({"w": torch.ones(64)}, cut=True), CorruptCheckpointError,
         ("'pytorch_model.bin'", REFETCH), allow_pickle=True),
    Case("pickle-not-a-dict", saved_pickle([torch.ones(2)]), CorruptCheckpointError,
         ("'pytorch_model.bin'", "holds a list, not a dict", "deltakit refuses it"), allow_pickle=True),
    Case("pickle-fifo", then(files(), lambda f, t: os.mkfifo(f / "pytorch_model.bin")), CorruptCheckpointError,
         ("'pytorch_model.bin'", "not a regular file", OUTSIDE), allow_pickle=True),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_hostile_checkpoint_is_refused(case: Case, tmp_path: Path) -> None:
    folder = case.build(tmp_path)
    start = time.monotonic()
    with pytest.raises(case.error) as caught:
        TensorReader(folder, allow_pickle=case.allow_pickle)
    assert time.monotonic() - start < SECONDS
    message = str(caught.value)
    for pattern in case.says:
        assert _search(pattern, message), f"{pattern!r} not in: {message}"
    assert SECRET[:8] not in message and "hidden" not in message  # never the file's bytes
    assert str(struct.unpack("<Q", SECRET[:8].encode())[0]) not in message  # nor a "header length" read from it
    assert not (tmp_path / MARKER).exists(), "the malicious pickle ran"


def _search(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.DOTALL) is not None


@dataclass(frozen=True)
class Accepted:
    """A checkpoint the reader must accept, the values it must read and the files it must ignore."""

    id: str
    build: Build
    values: dict[str, list[float]]
    ignored: tuple[str, ...] = ()


def two_shards(tmp: Path) -> Path:
    """``w`` is stored in both shards (1..4 in a, 10..40 in b); the index says a."""
    b = st({"w": entry(), "x": entry(offsets=(16, 32))}, struct.pack("<4f", 10, 20, 30, 40) + W)
    return index({"w": "a.safetensors", "x": "b.safetensors"}, a__safetensors=VALID, b__safetensors=b)(tmp)


def with_extra(tmp: Path) -> Path:
    folder = files(model__safetensors=VALID, zz__safetensors=st({"w": entry()}, struct.pack("<4f", 7, 7, 7, 7)))(tmp)
    (folder / "old.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "zz.safetensors"}}))
    return folder


ACCEPTED = [
    Accepted("valid-file", model(VALID), {"w": [1, 2, 3, 4]}),
    Accepted("safetensors-header-padding", model(st(json.dumps({"w": entry()}).encode() + b"   ", W)),
             {"w": [1, 2, 3, 4]}),
    Accepted("metadata-str-to-str", model(st({"__metadata__": {"format": "pt"}, "w": entry()}, W)),
             {"w": [1, 2, 3, 4]}),
    Accepted("empty-tensors-share-an-offset", model(st({"e": entry(shape=(0,), offsets=(0, 0)),
                                                        "f": entry(shape=(0, 3), offsets=(0, 0)), "w": entry()}, W)),
             {"w": [1, 2, 3, 4], "e": [], "f": []}),
    Accepted("u32-dtype", model(st({"u": entry(dtype="U32", shape=(2,), offsets=(0, 8))}, struct.pack("<2I", 7, 9))),
             {"u": [7, 9]}),
    Accepted("tensor-in-two-shards-weight-map-wins", two_shards, {"w": [1, 2, 3, 4], "x": [1, 2, 3, 4]}),
    Accepted("unlisted-tensor-in-shard-ignored", index({"w": "a.safetensors"}, a__safetensors=st(
        {"w": entry(), "junk": entry(offsets=(16, 32))}, W + W)), {"w": [1, 2, 3, 4]}),
    Accepted("extra-safetensors-ignored", with_extra, {"w": [1, 2, 3, 4]},
             ("old.safetensors.index.json", "zz.safetensors")),
    Accepted("model-safetensors-before-index", index({"w": "a.safetensors"}, model__safetensors=VALID,
                                                     a__safetensors=st({"w": entry()}, W[::-1])),
             {"w": [1, 2, 3, 4]}, ("a.safetensors", "model.safetensors.index.json")),
    Accepted("symlink-inside-folder", then(files(real__safetensors=VALID),
                                           lambda f, t: (f / "model.safetensors").symlink_to("real.safetensors")),
             {"w": [1, 2, 3, 4]}, ("real.safetensors",)),
    Accepted("hub-cache-blob-link", hub_snapshot(lambda t: t / "hub" / "models--org--name" / "blobs" / "0123abcd"),
             {"w": [1, 2, 3, 4]}),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_valid_checkpoint_is_read(case: Accepted, tmp_path: Path) -> None:
    folder = case.build(tmp_path)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = TensorReader(folder)
    assert {n: reader.read(n).tolist() for n in reader.names()} == case.values
    assert time.monotonic() - start < SECONDS
    assert [p.name for p in reader.ignored_files] == list(case.ignored)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if case.ignored:
        assert len(notes) == 1 and all(repr(name) in notes[0] for name in case.ignored)
        assert "model.safetensors" in notes[0] and "move them away" in notes[0]
    else:
        assert not notes
    assert all(p.parent == folder for p in reader.files)
    assert {reader.info(n).file for n in reader.names()} <= set(reader.files)


@pytest.mark.timeout(20)
def test_file_changed_after_the_header_was_read(tmp_path: Path) -> None:
    folder = model(VALID)(tmp_path)
    reader = TensorReader(folder)
    (folder / "model.safetensors").write_bytes(VALID[:-4])
    with pytest.raises(CorruptCheckpointError, match=r"'model.safetensors'.*ends inside tensor 'w'.*fetch it again"):
        reader.read("w")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    start = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        reader.read("w")
    assert time.monotonic() - start < SECONDS


# -- pairing -----------------------------------------------------------------------------------------------------------
def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embeddings.word_embeddings.weight": torch.randn(50, 8, generator=g),
        "embeddings.LayerNorm.weight": torch.ones(8),
        "encoder.layer.0.intermediate.dense.weight": torch.randn(16, 8, generator=g),
        "classifier.weight": torch.randn(3, 8, generator=g),
        "embeddings.position_ids": torch.arange(16).unsqueeze(0),
    }


def _edit(**changes: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {n: t + 0.01 if t.is_floating_point() else t for n, t in _base().items()}
    for key, change in changes.items():
        name = next(n for n in out if n.replace(".", "_").endswith(key))
        out[name] = change(out[name]).contiguous()
    return out


@dataclass(frozen=True)
class PairCase:
    """A fine-tune of :func:`_base`; ``says`` None means pairing must succeed with ``rows`` compared rows."""

    id: str
    base: dict[str, torch.Tensor]
    ft: dict[str, torch.Tensor]
    shared_rows: bool
    says: tuple[str, ...] | None
    rows: dict[str, int] | None = None


PAIR_CASES = [
    PairCase("float-relabelled-as-int", _base(), _edit(intermediate_dense_weight=lambda t: t.view(torch.int32)), False,
             ("encoder.layer.0.intermediate.dense.weight: base torch.float32 vs fine-tune torch.int32", "re-save")),
    PairCase("int-in-base-float-in-ft", {**_base(), "embeddings.LayerNorm.weight": torch.ones(8, dtype=torch.int32)},
             _edit(), False, ("embeddings.LayerNorm.weight: base torch.int32 vs fine-tune torch.float32",)),
    PairCase("shared-rows-on-layernorm", _base(), _edit(LayerNorm_weight=lambda t: torch.ones(10)), True,
             (r"embeddings.LayerNorm.weight: base \(8,\) vs fine-tune \(10,\)",
              "shared_rows covers vocabulary rows only")),
    PairCase("shared-rows-on-2d-ffn", _base(), _edit(intermediate_dense_weight=lambda t: t.repeat(2, 1)[:20]), True,
             ("intermediate.dense.weight", "shared_rows covers vocabulary rows only")),
    PairCase("layernorm-mismatch-without-shared-rows", _base(), _edit(LayerNorm_weight=lambda t: torch.ones(10)), False,
             ("shared_rows covers vocabulary rows only", "pick the base")),
    PairCase("embedding-rows-without-shared-rows", _base(), _edit(word_embeddings_weight=lambda t: t.repeat(2, 1)[:52]),
             False, ("word_embeddings.weight", "pass shared_rows=True")),
    PairCase("shared-rows-on-embeddings", _base(), _edit(word_embeddings_weight=lambda t: t.repeat(2, 1)[:52]), True,
             None, {"embeddings.word_embeddings.weight": 50}),
    PairCase("shared-rows-on-head", _base(), _edit(classifier_weight=lambda t: t[:2]), True,
             None, {"classifier.weight": 2}),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", PAIR_CASES, ids=[c.id for c in PAIR_CASES])
def test_pairing_refuses_silent_wrong_numbers(case: PairCase, tmp_path: Path) -> None:
    snaps = []
    for name, tensors in (("base", case.base), ("ft", case.ft)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "bert"}')
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        snaps.append(resolve(str(tmp_path / name)))
    start = time.monotonic()
    if case.says is None:
        pairing = pair_models(*snaps, shared_rows=case.shared_rows)
        assert {p.name: p.rows for p in pairing.pairs if p.rows is not None} == case.rows
        assert pairing.skipped == ("embeddings.position_ids",)
    else:
        with pytest.raises(PairingError) as caught:
            pair_models(*snaps, shared_rows=case.shared_rows)
        for pattern in case.says:
            assert _search(pattern, str(caught.value)), f"{pattern!r} not in: {caught.value}"
    assert time.monotonic() - start < SECONDS
