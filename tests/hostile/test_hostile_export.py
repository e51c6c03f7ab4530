"""Hostile or careless inputs to exports: altered compact deltas, broken files, wrong bases, occupied targets.

A compact delta is untrusted input when it is loaded. Each case here alters one written by ``save_compact_delta``
(on the synthetic BERT family of tests/conftest.py) and asserts a clear error of a ``ValueError`` type
(:class:`CompactDeltaError`, :class:`CorruptCheckpointError`) naming what is wrong, never a raw ``IndexError`` or
``RuntimeError`` from torch indexing, within a time bound. Tampering that keeps the file self-consistent (its
recorded sha256 recomputed, as a careful forger would) is used to reach the checks behind the digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltakit.export import (
    COMPACT_FILE,
    CompactDeltaError,
    ExportError,
    load_compact_delta,
    materialise_compact_delta,
    save_compact_delta,
)
from deltakit.sources import SourceError, resolve
from deltakit.store import fingerprint
from deltakit.tensors import CorruptCheckpointError, TensorReader

SECONDS = 10.0  # the time bound of every load
SEED, RATE = 4, 0.6
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


@pytest.fixture
def compact(bert_family: dict[str, Path], tmp_path: Path) -> Path:
    """A DARE compact delta of the synthetic ``ft1`` against its ``base``."""
    return save_compact_delta(bert_family["base"], bert_family["ft1"], tmp_path / "delta", rate=RATE, seed=SEED)


@pytest.fixture
def compact_q(bert_family: dict[str, Path], tmp_path: Path) -> Path:
    return save_compact_delta(bert_family["base"], bert_family["ft1"], tmp_path / "delta_q", method="darex_q",
                              rate=RATE, seed=SEED, q=0.5)


def _load(folder: Path, base: Path) -> None:
    start = time.monotonic()
    try:
        load_compact_delta(folder, base)
    finally:
        assert time.monotonic() - start < SECONDS


def _contents(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(folder / COMPACT_FILE), "pt") as fh:
        return json.loads(fh.metadata()["deltakit"]), {k: fh.get_tensor(k) for k in fh.keys()}


def _digest(doc: dict, tensors: dict[str, torch.Tensor]) -> str:
    """The stored tensors' sha256 as the format defines it (document order; name, dtype, shape, then bytes)."""
    h = hashlib.sha256()
    for e in doc["tensors"]:
        t = tensors[e["name"]]
        h.update(f"{e['name']}\0{DTYPE_NAMES[t.dtype]}\0{tuple(t.shape)}\0".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{h.hexdigest()}"


def _rewrite(folder: Path, edit: Callable[[dict, dict[str, torch.Tensor]], None], *, consistent: bool = True) -> None:
    """Rewrite the compact delta after ``edit(doc, tensors)``; ``consistent`` recomputes the stored sha256."""
    doc, tensors = _contents(folder)
    edit(doc, tensors)
    if consistent:
        try:
            doc["stored_digest"] = _digest(doc, tensors)
        except (KeyError, TypeError, AttributeError):  # the edit broke the list itself: the parser must say so
            pass
    save_file(tensors, str(folder / COMPACT_FILE), metadata={"deltakit": json.dumps(doc)})


def _first_pruned(doc: dict) -> dict:
    return next(e for e in doc["tensors"] if e["stored"] == "kept")


def _first_full(doc: dict) -> dict:
    return next(e for e in doc["tensors"] if e["stored"] == "full")


def _grow_values(doc: dict, tensors: dict) -> None:  # one more value, and a kept count that agrees with the file
    e = _first_pruned(doc)
    tensors[e["name"]] = torch.cat([tensors[e["name"]], tensors[e["name"]][:1]])
    e["kept"] += 1


def _shrink_values(doc: dict, tensors: dict) -> None:
    e = _first_pruned(doc)
    tensors[e["name"]] = tensors[e["name"]][:-3].clone()
    e["kept"] -= 3


def _nan_value(doc: dict, tensors: dict) -> None:
    e = _first_pruned(doc)
    tensors[e["name"]] = tensors[e["name"]].clone()
    tensors[e["name"]][0] = float("nan")


def _full_as_f16(doc: dict, tensors: dict) -> None:
    e = _first_full(doc)
    tensors[e["name"]] = tensors[e["name"]].half()


def _set(key: str, value: object, where: Callable[[dict], dict] | None = None) -> Callable[[dict, dict], None]:
    def edit(doc: dict, tensors: dict) -> None:
        (where(doc) if where else doc)[key] = value
    return edit


def _drop_entry(doc: dict, tensors: dict) -> None:
    doc["tensors"].remove(_first_full(doc))


def _duplicate_entry(doc: dict, tensors: dict) -> None:
    doc["tensors"].append(dict(_first_pruned(doc)))


def _base_field(key: str, value: object) -> Callable[[dict, dict], None]:
    return _set(key, value, lambda doc: doc["base"])


def _scale_nudged(doc: dict, tensors: dict) -> None:
    doc["scale"] *= 1.0001


def _kept_plus_one(doc: dict, tensors: dict) -> None:
    _first_pruned(doc)["kept"] += 1


TAMPERED = {
    "kept count changed": (_kept_plus_one, r"is stored as .* but the document says"),
    "kept count and values grown together": (_grow_values, r"records \d+ kept values, but its mask .* keeps \d+"),
    "values shortened with their count": (_shrink_values, r"records \d+ kept values, but its mask .* keeps \d+"),
    "format version changed": (_set("format", "deltakit.compact-delta/2"), "another deltakit version"),
    "another format": (_set("format", "someone.else/1"), "not a deltakit compact delta"),
    "format missing": (lambda doc, t: doc.pop("format"), "expected 'deltakit.compact-delta/1'"),
    "scale changed": (_scale_nudged, r"scale .* is not the scale"),
    "rate changed": (_set("rate", 0.7), r"scale .* is not the scale"),
    "rate out of range": (_set("rate", 1.5), r"rate 1.5 is not a number in \[0, 1\]"),
    "rate as text": (_set("rate", "0.6"), "is not a number"),
    "rate a 400-digit integer": (_set("rate", 10**400), "is not a number"),
    "scale a 400-digit integer": (_set("scale", 10**400), "is not a number"),
    "seed changed": (_set("seed", SEED + 1), "Philox key"),
    "seed as bool": (_set("seed", True), "is not an integer"),
    "q added to dare": (_set("q", 0.5), "does not fit method"),
    "method magnitude": (_set("method", "magnitude"), "is not one of"),
    "key changed": (lambda doc, t: _first_pruned(doc).__setitem__("key", 12345), "Philox key"),
    "dtype changed": (lambda doc, t: _first_pruned(doc).__setitem__("dtype", "F16"), "but the document says"),
    "dtype a list": (lambda doc, t: _first_pruned(doc).__setitem__("dtype", ["F32"]), "the dtype of"),
    "name a number": (lambda doc, t: _first_pruned(doc).__setitem__("name", 7), "not an object with a name"),
    "shape changed": (lambda doc, t: _first_pruned(doc).__setitem__("shape", [3, 7]), "but base tensor"),
    "negative shape": (lambda doc, t: _first_pruned(doc).__setitem__("shape", [-1]), "not a list of non-negative"),
    "negative kept count": (lambda doc, t: _first_pruned(doc).__setitem__("kept", -2), "kept count"),
    "base tensor name changed": (lambda doc, t: _first_pruned(doc).__setitem__("base_name", "nope.weight"),
                                 "does not have"),
    "pruned tensor marked full": (lambda doc, t: _first_pruned(doc).__setitem__("stored", "full"),
                                  "but the document says"),
    "unknown storage": (lambda doc, t: _first_pruned(doc).__setitem__("stored", "sparse"), "not 'kept' or 'full'"),
    "entry dropped": (_drop_entry, "does not list"),
    "entry duplicated": (_duplicate_entry, "listed twice"),
    "tensors not a list": (_set("tensors", {}), "tensors is not a list"),
    "non-finite stored value": (_nan_value, "cannot be rebuilt.*non-finite"),
    "full tensor's dtype changed": (_full_as_f16, "but the document says"),
    "base fingerprint changed": (_base_field("fingerprint", "sha256:" + "0" * 64), "made against base"),
    "base digest changed": (_base_field("digest", "sha256:" + "0" * 64), "different values in the pruned tensors"),
    "base missing": (lambda doc, t: doc.pop("base"), "base is not an object"),
}


@pytest.mark.parametrize("case", TAMPERED, ids=list(TAMPERED))
def test_altered_document_is_refused_clearly(compact, bert_family, case):
    edit, match = TAMPERED[case]
    _rewrite(compact, edit)
    with pytest.raises(ValueError, match=match) as err:
        _load(compact, bert_family["base"])
    assert isinstance(err.value, (CompactDeltaError, CorruptCheckpointError)), type(err.value)


def test_altered_q_of_darex_q_is_refused(compact_q, bert_family):
    _rewrite(compact_q, _set("q", 0.45))
    with pytest.raises(CompactDeltaError, match=r"scale .* is not the scale"):
        _load(compact_q, bert_family["base"])
    _rewrite(compact_q, _set("q", 0.1))  # outside [1 - rate, 1]
    with pytest.raises(CompactDeltaError, match=r"inconsistent.*q must be in"):
        _load(compact_q, bert_family["base"])


@pytest.mark.parametrize("metadata,match", [
    ({}, "has no 'deltakit' document"),
    ({"deltakit": "{not json"}, "not valid JSON"),
    ({"deltakit": '{"rate": NaN}'}, "not a JSON number"),
    ({"deltakit": "[1, 2]"}, "not a JSON object"),
    ({"deltakit": '{"format": "deltakit.compact-delta/1", "format": "x"}'}, "appears twice"),
])
def test_missing_or_malformed_document_is_refused(compact, bert_family, metadata, match):
    _, tensors = _contents(compact)
    save_file(tensors, str(compact / COMPACT_FILE), metadata=metadata)
    with pytest.raises(CompactDeltaError, match=match):
        _load(compact, bert_family["base"])


def test_a_changed_byte_in_the_data_is_caught(compact, bert_family):
    path = compact / COMPACT_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # inside the data of the last tensor: the header stays valid
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="is corrupt.*sha256"):
        _load(compact, bert_family["base"])


def test_values_changed_without_fixing_the_digest_are_caught(compact, bert_family):
    _rewrite(compact, _nan_value, consistent=False)
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        _load(compact, bert_family["base"])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[9:40] = b"#" * 31
    path.write_bytes(bytes(raw))


def _huge_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(raw))


BROKEN_FILES = {
    "truncated to half": (_truncate, "truncated or corrupt"),
    "header garbled": (_garble_header, "not a valid safetensors file"),
    "empty file": (lambda p: p.write_bytes(b""), "truncated or corrupt"),
    "header length beyond the limit": (_huge_header, "exceeds the format's limit"),
    "extra bytes after the data": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16), "unused bytes"),
}


@pytest.mark.parametrize("case", BROKEN_FILES, ids=list(BROKEN_FILES))
def test_broken_file_is_refused_clearly(compact, bert_family, case):
    damage, match = BROKEN_FILES[case]
    damage(compact / COMPACT_FILE)
    with pytest.raises(CorruptCheckpointError, match=match):
        _load(compact, bert_family["base"])


@pytest.mark.timeout(30)
def test_file_that_is_a_link_outside_a_fifo_or_a_folder_is_refused(compact, bert_family, tmp_path):
    path = compact / COMPACT_FILE
    outside = tmp_path / "elsewhere.safetensors"
    path.rename(outside)
    path.symlink_to(outside)
    with pytest.raises(CorruptCheckpointError, match="refused.*inside the model folder"):
        _load(compact, bert_family["base"])
    path.unlink()
    os.mkfifo(path)  # opening it for reading would block a careless reader for ever
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        _load(compact, bert_family["base"])
    path.unlink()
    path.mkdir()
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        _load(compact, bert_family["base"])
    path.rmdir()
    with pytest.raises(FileNotFoundError, match="holds no delta.safetensors"):
        _load(compact, bert_family["base"])


def test_side_file_linking_outside_is_not_copied(compact, bert_family, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("hf_" + "S" * 34)
    (compact / "config.json").unlink()
    (compact / "config.json").symlink_to(secret)
    with pytest.raises(ExportError, match="not a regular file inside the folder"):
        materialise_compact_delta(compact, bert_family["base"], tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]  # no staging left behind


def _changed_copy(src: Path, dst: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    import shutil

    shutil.copytree(src, dst)
    with safe_open(str(dst / "model.safetensors"), "pt") as fh:
        tensors, meta = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata=meta)
    return dst


def test_wrong_bases_are_refused(compact, bert_family, tmp_path):
    # Another model of the same architecture (a fine-tune of the family given as the base).
    with pytest.raises(CompactDeltaError, match=r"made against base .*given base .*fingerprint"):
        _load(compact, bert_family["ft2"])
    # The same base with every value changed (the sampled fingerprint sees it).
    def scaled(t: dict) -> None:
        for k, v in t.items():
            if v.is_floating_point():
                t[k] = v * 1.5
    with pytest.raises(CompactDeltaError, match="made against base"):
        _load(compact, _changed_copy(bert_family["base"], tmp_path / "scaled", scaled))
    # Not a model at all.
    with pytest.raises(SourceError, match="has no safetensors weights"):
        _load(compact, tmp_path)


def test_a_base_differing_only_where_the_fingerprint_does_not_sample_is_refused(tmp_path):
    """The content fingerprint samples 16 x 4 KiB of a weights file; the sha256 of the base values the rebuild uses
    catches a change between the samples, which would otherwise give wrong weights silently."""
    name = "encoder.layer.0.output.dense.weight"
    g = torch.Generator().manual_seed(0)
    base = {name: torch.randn(512, 512, generator=g)}  # 1 MiB: the samples cover ~6% of it
    ft = {"bert." + name: base[name] + 1e-3 * torch.randn(512, 512, generator=g)}
    for folder, tensors in (("base", base), ("ft", ft)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text('{"model_type": "bert"}')
        save_file(tensors, str(tmp_path / folder / "model.safetensors"))
    delta = save_compact_delta(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", rate=RATE, seed=SEED)
    reader = TensorReader(tmp_path / "base")
    size = (tmp_path / "base" / "model.safetensors").stat().st_size
    data_start, last = reader.info(name).start, size - 4096
    windows = [data_start + (last - data_start) * i // 15 for i in range(16)]
    offset = (windows[7] + 4096 + windows[8]) // 2  # between two samples
    assert all(not w <= offset < w + 4096 for w in windows)
    changed = base[name].clone()
    changed.view(-1)[(offset - data_start) // 4] += 1.0
    (tmp_path / "nudged").mkdir()
    (tmp_path / "nudged" / "config.json").write_text('{"model_type": "bert"}')
    save_file({name: changed}, str(tmp_path / "nudged" / "model.safetensors"))
    assert fingerprint(resolve(str(tmp_path / "nudged"))) == fingerprint(resolve(str(tmp_path / "base")))
    with pytest.raises(CompactDeltaError, match="different values in the pruned tensors"):
        _load(delta, tmp_path / "nudged")


def test_targets_that_exist_or_are_files_are_refused(compact, bert_family, tmp_path):
    with pytest.raises(ExportError, match=r"exists and is not empty.*overwrite=True \(CLI: --force\)"):
        save_compact_delta(bert_family["base"], bert_family["ft1"], compact, rate=RATE, seed=SEED)
    before = (compact / COMPACT_FILE).read_bytes()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        save_compact_delta(bert_family["base"], bert_family["ft1"], tmp_path / "file", rate=RATE, seed=SEED,
                           overwrite=True)
    with pytest.raises(ExportError, match="compact delta's folder"):
        materialise_compact_delta(compact, bert_family["base"], compact, overwrite=True)
    assert (compact / COMPACT_FILE).read_bytes() == before
    save_compact_delta(bert_family["base"], bert_family["ft2"], compact, rate=RATE, seed=SEED, overwrite=True)
    load_compact_delta(compact, bert_family["base"])  # replaced whole and loadable
    assert not [p for p in compact.parent.iterdir() if p.name.startswith(".delta.")]


@pytest.mark.parametrize("method", ["magnitude", "structural", "wanda"])
def test_non_seeded_methods_are_refused_before_anything_is_written(bert_family, tmp_path, method):
    with pytest.raises(CompactDeltaError, match="only element-wise random plans"):
        save_compact_delta(bert_family["base"], bert_family["ft1"], tmp_path / "d", method=method, rate=0.5, seed=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["model", "compact"])
def test_a_full_disk_mid_export_leaves_no_half_written_folder(kind, tiny, tmp_path):
    """A file size limit hit while writing (as a full disk would): one clear line, exit 2, and neither the target nor
    a staging folder is left behind; with room again the same command succeeds."""
    import subprocess
    import sys

    out = tmp_path / "exported"
    args = ["export", "family:tiny/base", "family:tiny/sentiment3", "--method", "dare", "--rate", "0.5", "--out",
            str(out)] + (["--compact"] if kind == "compact" else [])
    code = ("import resource, sys\n"
            "from deltakit.cli import main\n"
            "if sys.argv[1] != '0':\n"
            "    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)\n"
            "sys.exit(main(sys.argv[2:]))\n")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    full = subprocess.run([sys.executable, "-c", code, "100000", *args], capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)
    assert full.returncode == 2, full.stderr[-2000:]
    assert full.stderr.startswith("deltakit: error:") and "Traceback" not in full.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no target, no staging folder
    again = subprocess.run([sys.executable, "-c", code, "0", *args], capture_output=True, text=True, timeout=120,
                           env=env, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "README.md").is_file()
