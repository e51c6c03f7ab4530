"""Streaming statistics from the local Hub by byte ranges: the same numbers as a download, and no weights on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from deltakit.hubstream import HubTensorReader, PREFIX_BYTES
from deltakit.sources import SourceError, resolve
from deltakit.stats import delta_stats
from deltakit.tensors import TensorReader


def _weights_in_cache(home: Path) -> list[Path]:
    """Every weight file of the HF cache: snapshot entries named *.safetensors and the blobs they link to."""
    return sorted(p for p in (home / "hub").rglob("*") if p.name.endswith(".safetensors"))


def _blob_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "hub").rglob("blobs/*") if p.is_file())


def test_streamed_stats_equal_downloaded_stats_and_write_no_weights(local_hub, published, tiny, hf_home):
    refs = [published["base"], published["sentiment3"], published["sentiment3-hot"]]
    snaps = [resolve(ref, stream=True) for ref in refs]
    assert all(s.streamed and len(s.commit) == 40 for s in snaps)
    before = local_hub.requests
    streamed = delta_stats(snaps[0], snaps[1:], progress=False)
    requests = local_hub.requests - before
    assert _weights_in_cache(hf_home) == []
    weights = (tiny / "base" / "model.safetensors").stat().st_size
    assert 0 < _blob_bytes(hf_home) < weights  # config, card, tokenizer of three repos: less than one weight file
    assert streamed.meta["streamed"] == refs
    # One request per weight file for its first bytes (the header fits in them), then one per tensor read: the base
    # tensors once each, every fine-tune's paired tensors once each.
    assert requests == len(snaps) + streamed.tensors["tensor"].nunique() + len(streamed.tensors), requests

    downloaded = delta_stats(refs[0], refs[1:], progress=False)
    assert downloaded.meta["streamed"] == []
    for name in downloaded.FRAMES:
        pd.testing.assert_frame_equal(getattr(streamed, name), getattr(downloaded, name), check_exact=True)
    by_flag = delta_stats(refs[0], refs[1:2], progress=False, stream=True)  # the flag resolves with stream=True
    assert by_flag.meta["streamed"] == refs[:2]
    assert by_flag.overall["mean_abs"].tolist() == downloaded.overall["mean_abs"].tolist()[:1]


def test_reader_reads_the_same_tensors_with_one_request_each(published, tiny, hf_home):
    snap = resolve(published["sentiment3"], stream=True)
    assert snap.streamed and snap.commit == snap.path.name
    assert not (snap.path / "model.safetensors").exists() and (snap.path / "config.json").is_file()
    remote, local = HubTensorReader(snap), TensorReader(tiny / "sentiment3")
    assert remote.names() == local.names() and remote.requests == 1  # the header came with the first bytes
    for name in local.names():
        assert remote.info(name).shape == local.info(name).shape and remote.info(name).dtype == local.info(name).dtype
        assert remote.read(name).equal(local.read(name))
    nonempty = sum(1 for n in local.names() if local.info(n).nbytes)
    assert remote.requests == 1 + nonempty
    assert remote.bytes_read == PREFIX_BYTES + sum(local.info(n).nbytes for n in local.names())


def test_sharded_checkpoint_streams_its_shards(local_hub, tiny, hf_home):
    """An index and two shards: the index's weight_map picks each tensor's shard; values match the folder."""
    from safetensors.torch import save_file

    local = TensorReader(tiny / "base")
    names = local.names()
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    files: dict[str, bytes] = {"config.json": (tiny / "base" / "config.json").read_bytes()}
    tmp = hf_home / "shards"
    tmp.mkdir()
    for shard, keys in halves.items():
        save_file({k: local.read(k).clone() for k in keys}, tmp / shard)
        files[shard] = (tmp / shard).read_bytes()
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}).encode()
    local_hub.commit("stream-sharded/base", files)
    reader = HubTensorReader(resolve("stream-sharded/base", stream=True))
    assert sorted(reader.names()) == sorted(names)
    assert [p.name for p in reader.files] == sorted(halves)
    for name in names:
        assert reader.read(name).equal(local.read(name))


def test_stream_refusals_name_the_fix(local_hub, published, tiny, hf_home, hub_offline):
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set.*drop --stream"):
        resolve(published["base"], stream=True)


def test_stream_of_pickle_only_repo_says_to_drop_stream(local_hub, hf_home):
    local_hub.commit("stream-pickle/model", {"config.json": b'{"model_type": "bert"}', "pytorch_model.bin": b"x"})
    with pytest.raises(SourceError, match=r"only pickled weights.*streaming reads safetensors only. Drop --stream"):
        resolve("stream-pickle/model", stream=True, allow_pickle=True)


def test_stream_ignores_local_folders(published, tiny, hf_home):
    """--stream applies to Hub references; a family member next to a streamed fine-tune is read from disk."""
    stats = delta_stats("family:tiny/base", [published["sentiment3"]], progress=False, stream=True)
    assert stats.meta["streamed"] == [published["sentiment3"]]
    assert _weights_in_cache(hf_home) == []
    local = delta_stats("family:tiny/base", [str(tiny / "sentiment3")], progress=False)
    assert stats.overall["mean_abs"].tolist() == local.overall["mean_abs"].tolist()


def test_cli_stream_flag(published, hf_home, capsys):
    from deltakit.cli import main

    assert main(["stats", published["base"], published["sentiment3"], "--stream", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["meta"]["streamed"] == [published["base"], published["sentiment3"]]
    assert _weights_in_cache(hf_home) == []


def test_pair_models_opens_streamed_snapshots_by_range(published, tiny, hf_home):
    from deltakit.pairing import pair_models

    streamed = pair_models(resolve(published["base"], stream=True), resolve(published["sentiment3"], stream=True))
    local = pair_models(resolve("family:tiny/base"), resolve("family:tiny/sentiment3"))
    assert streamed.pairs == local.pairs
    assert _weights_in_cache(hf_home) == []


def test_a_streamed_snapshot_is_refused_by_sweeps_and_merges_naming_the_fix(published, tiny, hf_home):
    from deltakit.merge import MergedModel
    from deltakit.resident import ResidentModel

    base, ft = (resolve(published[m], stream=True) for m in ("base", "sentiment3"))
    for build in (lambda: ResidentModel(base, ft), lambda: MergedModel(base, [ft, ft])):
        with pytest.raises(SourceError, match=r"stream=True.*without stream="):
            build()
