"""The lazy tensor reader: headers without data, one tensor at a time, sharded checkpoints, bad files."""

from __future__ import annotations

import torch
import pytest

from deltakit.tensors import CorruptCheckpointError, TensorReader
from synthetic import bert_like, write_checkpoint


def test_reads_names_shapes_dtypes_and_values(tmp_path):
    sd = bert_like(0)
    sd["half"] = torch.randn(4, 3).to(torch.bfloat16)
    r = TensorReader(write_checkpoint(tmp_path / "m", sd))
    assert set(r.names()) == set(sd)
    info = r.info("half")
    assert info.dtype == torch.bfloat16 and info.shape == (4, 3) and info.numel == 12 and info.is_float
    assert not r.info("embeddings.position_ids").is_float
    for name, t in sd.items():
        got = r.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_sharded_index_is_followed(tmp_path):
    sd = bert_like(3)
    r = TensorReader(write_checkpoint(tmp_path / "m", sd, shards=3))
    assert set(r.names()) == set(sd)
    assert len({r.info(n).file for n in r.names()}) == 3
    assert torch.equal(r.read("encoder.layer.0.output.dense.weight"), sd["encoder.layer.0.output.dense.weight"])


def test_files_lists_exactly_the_files_read(tmp_path):
    single = TensorReader(write_checkpoint(tmp_path / "a", bert_like(0)))
    assert single.files == [tmp_path / "a" / "model.safetensors"] and single.ignored_files == []
    sharded = TensorReader(write_checkpoint(tmp_path / "b", bert_like(0), shards=3))
    assert [f.name for f in sharded.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert {sharded.info(n).file for n in sharded.names()} == set(sharded.files)
    assert sharded.ignored_files == []


def test_missing_shard_is_reported(tmp_path):
    folder = write_checkpoint(tmp_path / "m", bert_like(3), shards=2)
    next(folder.glob("model-00002*")).unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        TensorReader(folder)


def test_truncated_file_gives_clear_error(tmp_path):
    folder = write_checkpoint(tmp_path / "m", bert_like(0))
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        TensorReader(folder)


def test_garbage_header_gives_clear_error(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        TensorReader(folder)


def test_pickle_only_is_refused_unless_allowed(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    sd = {"w": torch.ones(2, 2)}
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="allow_pickle=True"):
        TensorReader(folder)
    r = TensorReader(folder, allow_pickle=True)
    assert torch.equal(r.read("w"), sd["w"])


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        TensorReader(tmp_path)


def test_unknown_tensor_name(tmp_path):
    r = TensorReader(write_checkpoint(tmp_path / "m", bert_like(0)))
    with pytest.raises(KeyError, match="nope"):
        r.read("nope")
