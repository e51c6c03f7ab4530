"""deltakit's loaders against the local Hub server, through the unmodified huggingface_hub client."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltakit.sources import ModelRef, SourceError, resolve
from deltakit.stats import delta_stats


def test_stats_by_repo_id_match_local_folders(published, tiny, hf_home):
    by_id = delta_stats(published["base"], [published["sentiment3"], published["sentiment3-hot"]], progress=False)
    local = delta_stats(str(tiny / "base"), [str(tiny / "sentiment3"), str(tiny / "sentiment3-hot")], progress=False)
    a = by_id.overall.set_index("model")["mean_abs"].to_numpy()
    b = local.overall.set_index("model")["mean_abs"].to_numpy()
    assert a.tolist() == b.tolist()
    # The hot member's deltas are clearly larger (tiny: 2.5x the learning rate, ~2.4x the mean |delta|).
    assert a[1] > 1.5 * a[0]
    assert by_id.meta["base_commit"] is not None and len(by_id.meta["base_commit"]) == 40


def test_snapshot_fetches_only_safe_files_and_pins_the_commit(local_hub, published, hf_home):
    repo = published["sentiment3"]
    local_hub.commit(repo, {"pytorch_model.bin": b"not loaded", "train.py": b"print('x')"})
    snap = resolve(repo)
    names = {p.name for p in snap.path.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "README.md" in names
    assert "pytorch_model.bin" not in names and "train.py" not in names
    assert snap.kind == "hub" and snap.commit == snap.path.name and len(snap.commit) == 40
    assert snap.card["base_model"].endswith("tiny-base")


def test_revision_pinning(local_hub, published, tiny, hf_home):
    repo = published["sentiment3"]
    first = resolve(repo).commit
    hot = (tiny / "sentiment3-hot" / "model.safetensors").read_bytes()
    second = local_hub.commit(repo, {"model.safetensors": hot}, message="swap weights")
    local_hub.tag(repo, "v1", first)
    assert resolve(repo).commit == second
    assert resolve(f"{repo}@{first}").commit == first
    assert resolve(f"{repo}@v1").commit == first
    old = delta_stats(published["base"], [f"{repo}@v1"], progress=False).overall["mean_abs"].iloc[0]
    new = delta_stats(published["base"], [repo], progress=False).overall["mean_abs"].iloc[0]
    assert new > 1.5 * old


def test_missing_repo_revision_and_weights(local_hub, published, hf_home):
    with pytest.raises(SourceError, match=r"model repo 'nobody/nothing' not found"):
        resolve("nobody/nothing")
    with pytest.raises(SourceError, match=r"revision 'no-such-branch' not found"):
        resolve(f"{published['base']}@no-such-branch")
    local_hub.commit("weightless/model", {"config.json": b'{"model_type": "bert"}', "README.md": b"# none"})
    with pytest.raises(SourceError, match="no safetensors"):
        resolve("weightless/model")


def test_pickle_only_repo_is_refused_unless_allowed(local_hub, tiny, hf_home, tmp_path):
    from deltakit.tensors import TensorReader

    state = TensorReader(tiny / "sentiment3").read("classifier.weight")
    path = tmp_path / "pytorch_model.bin"
    torch.save({"classifier.weight": state}, path)
    local_hub.commit("pickly/model", {"config.json": b'{"model_type": "bert"}', "pytorch_model.bin": path})
    with pytest.raises(SourceError, match="only pickled weights.*allow_pickle=True"):
        resolve("pickly/model")
    snap = resolve("pickly/model", allow_pickle=True)
    assert torch.equal(TensorReader(snap.path, allow_pickle=True).read("classifier.weight"), state)


def test_offline_reuses_the_cache(local_hub, published, hf_home, request):
    online = resolve(published["polarity"])
    before = local_hub.requests
    request.getfixturevalue("hub_offline")
    offline = resolve(published["polarity"])
    assert offline.path == online.path and local_hub.requests == before
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        resolve(published["sentiment3-hot"])  # never downloaded


def test_corrupt_download_gives_clear_error(local_hub, published, tiny, hf_home):
    from deltakit.tensors import CorruptCheckpointError

    repo = published["polarity"]
    data = (tiny / "polarity" / "model.safetensors").read_bytes()
    local_hub.commit(repo, {"model.safetensors": data[: len(data) // 2]}, message="truncated upload")
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        delta_stats(published["base"], [repo], progress=False)


def test_different_architecture_refused(local_hub, published, tiny, hf_home):
    import json

    from deltakit.pairing import PairingError

    config = json.loads((tiny / "sentiment3" / "config.json").read_text())
    config["model_type"] = "roberta"
    local_hub.commit(published["sentiment3"], {"config.json": json.dumps(config).encode()})
    with pytest.raises(PairingError, match="different architectures"):
        delta_stats(published["base"], [published["sentiment3"]], progress=False)


@pytest.mark.parametrize(("files", "usable"), [
    (("model.safetensors",), True),
    (("model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"), True),
    (("adapter_model.safetensors",), False),
    (("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"), False),  # shards without their index
    ((), False),
], ids=["single", "sharded", "adapter-only", "shards-without-index", "none"])
def test_resolve_accepts_exactly_what_the_reader_reads(tmp_path, files, usable):
    import json

    from safetensors.torch import save_file

    from deltakit.tensors import CorruptCheckpointError, TensorReader

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    shards = [f for f in files if f.endswith(".safetensors")]
    for i, name in enumerate(shards):
        save_file({f"w{i}": torch.ones(2, 2)}, str(folder / name))
    if "model.safetensors.index.json" in files:
        index = {"metadata": {}, "weight_map": {f"w{i}": name for i, name in enumerate(shards)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if usable:
        assert resolve(str(folder)).path == folder
        assert len(TensorReader(folder)) == len(shards)
        return
    with pytest.raises((FileNotFoundError, CorruptCheckpointError)):
        TensorReader(folder)
    with pytest.raises(SourceError, match="model.safetensors") as err:
        resolve(str(folder))
    assert str(folder) in str(err.value)
    if shards:  # the stray files are named, with what to do about them
        assert str(shards) in str(err.value) and "rename it model.safetensors" in str(err.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("family:tiny/sentiment3", ModelRef("family", family="tiny", member="sentiment3")),
    ("org/name@v1", ModelRef("hub", repo_id="org/name", revision="v1")),
    ("gpt2", ModelRef("hub", repo_id="gpt2")),
    ("./checkpoints/base", ModelRef("local", path=Path("checkpoints/base"))),
], ids=["family", "hub-pinned", "hub-single-name", "local"])
def test_model_ref_parses_each_kind_and_spells_it_back(text, expected):
    ref = ModelRef.parse(text)
    assert ref == expected
    assert ModelRef.parse(str(ref)) == ref


@pytest.mark.parametrize(("make", "match"), [
    (lambda: ModelRef.parse("family:tiny"), r"'family:tiny': a family reference is 'family:FAMILY/MEMBER'"),
    (lambda: ModelRef.parse("org/a/b"), r"'org/a/b' is not a model reference\. Use 'org/name'"),
    (lambda: ModelRef("hub", repo_id="org/name", member="base"), "a hub reference has no member"),
    (lambda: ModelRef("zip"), "unknown reference kind 'zip'"),
], ids=["family-without-member", "hub-too-deep", "stray-part", "unknown-kind"])
def test_model_ref_is_checked_on_construction(make, match):
    with pytest.raises(SourceError, match=match):
        make()
