"""deltakit.testing: synthetic Llama families -- valid files, exact sizes, deterministic bytes, realistic deltas."""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import deltakit.testing as synthetic
from deltakit.refs import read_card_front_matter
from deltakit.tensors import TensorReader
from deltakit.testing import SHAPES, LlamaShape, family_bytes, write_synthetic_family

SMALL_SHARDS = 100_000  # the tiny model (441 kB per model) in several shards


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic_family(tmp_path_factory.mktemp("synthetic"), "tiny", finetunes=2, shard_bytes=SMALL_SHARDS)


@pytest.mark.parametrize("size", list(SHAPES))
def test_parameter_counts_equal_transformers_llama(size):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_dict(SHAPES[size].config()))
    assert SHAPES[size].num_parameters == sum(p.numel() for p in model.parameters())
    assert {n: tuple(p.shape) for n, p in model.state_dict().items()
            if not (SHAPES[size].tie_embeddings and n == "lm_head.weight")} == dict(SHAPES[size].tensors())


def test_named_sizes_are_what_they_claim():
    assert SHAPES["7b"].num_parameters == 6_738_415_616  # Llama-2-7B
    assert 0.49e9 < SHAPES["0.5b"].num_parameters < 0.5e9 and 1.5e9 < SHAPES["1.5b"].num_parameters < 1.6e9
    assert family_bytes("7b") == pytest.approx(2 * 2 * 6_738_415_616, rel=1e-4)


def test_every_file_passes_the_strict_reader_and_safe_open(family):
    from safetensors import safe_open

    expected = dict(SHAPES["tiny"].tensors())
    for folder in family.values():
        reader = TensorReader(folder)
        assert reader.ignored_files == [] and len(reader.files) > 1
        assert {n: (reader.info(n).shape, reader.info(n).dtype) for n in reader.names()} == {
            n: (s, torch.bfloat16) for n, s in expected.items()}
        for file in reader.files:
            raw = file.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            assert n % 8 == 0 and raw[8:8 + n].decode().endswith(("}", " "))
            header = json.loads(raw[8:8 + n])
            assert header.pop("__metadata__") == {"format": "pt"}
            names = list(header)
            assert names == sorted(names)  # data in name order, as the safetensors library writes it
            with safe_open(str(file), "pt") as f:
                assert sorted(f.keys()) == names
                for name in names:
                    assert torch.equal(f.get_tensor(name), reader.read(name))


def test_index_maps_every_tensor_to_its_shard_and_totals_the_bytes(family):
    folder = family["ft0"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    reader = TensorReader(folder)
    assert index["weight_map"] == {n: reader.info(n).file.name for n in reader.names()}
    assert index["metadata"]["total_size"] == sum(reader.info(n).nbytes for n in reader.names())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sum((folder / s).stat().st_size for s in shards) * 3 == family_bytes("tiny", finetunes=2,
                                                                                  shard_bytes=SMALL_SHARDS)


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    folder = write_synthetic_family(tmp_path, "tiny", finetunes=0)["base"]
    assert not (folder / "model.safetensors.index.json").exists()
    assert TensorReader(folder).files == [folder / "model.safetensors"]


def test_cards_and_config(family):
    from transformers import AutoConfig

    base_card = read_card_front_matter(family["base"])
    assert base_card["model_id"] == "deltakit-synthetic/llama-tiny-seed0" and "base_model" not in base_card
    for ft in ("ft0", "ft1"):
        card = read_card_front_matter(family[ft])
        assert card["base_model"] == base_card["model_id"] and card["base_model_relation"] == "finetune"
    config = AutoConfig.from_pretrained(family["ft0"])
    shape = SHAPES["tiny"]
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.intermediate_size,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == (
        "llama", shape.hidden_size, shape.num_layers, shape.intermediate_size, shape.num_heads, shape.num_kv_heads,
        shape.vocab_size, shape.tie_embeddings)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fine_tune_loads_into_transformers_and_runs(tmp_path, tied):
    from transformers import LlamaForCausalLM

    shape = dataclasses.replace(SHAPES["tiny"], tie_embeddings=tied)
    ft = write_synthetic_family(tmp_path, shape, shard_bytes=SMALL_SHARDS)["ft0"]
    model, info = LlamaForCausalLM.from_pretrained(ft, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert model.dtype == torch.bfloat16
    reader = TensorReader(ft)
    assert torch.equal(model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                       reader.read("model.layers.1.mlp.down_proj.weight"))
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, shape.vocab_size) and torch.isfinite(logits).all()


def test_two_writes_give_identical_bytes(tmp_path, family):
    again = write_synthetic_family(tmp_path / "again", "tiny", finetunes=2, shard_bytes=SMALL_SHARDS, workers=1)
    for model, folder in family.items():
        assert _files(again[model]) == _files(folder)


def test_values_depend_on_seed_model_and_name_only(tmp_path, family):
    # Another shard size, fewer fine-tunes, more workers: the same tensors, byte for byte.
    other = write_synthetic_family(tmp_path / "other", "tiny", finetunes=1, workers=3)
    for model in ("base", "ft0"):
        a, b = TensorReader(family[model]), TensorReader(other[model])
        for name in a.names():
            assert torch.equal(a.read(name).view(torch.int16), b.read(name).view(torch.int16)), (model, name)
    seeded = TensorReader(write_synthetic_family(tmp_path / "seed1", "tiny", finetunes=0, seed=1)["base"])
    assert not torch.equal(seeded.read("model.embed_tokens.weight"),
                           TensorReader(family["base"]).read("model.embed_tokens.weight"))


def _deltas(family: dict[str, Path], ft: str) -> dict[str, torch.Tensor]:
    base, tuned = TensorReader(family["base"]), TensorReader(family[ft])
    return {n: tuned.read(n).float() - base.read(n).float() for n in base.names()}


def test_base_has_a_realistic_scale(family):
    base = TensorReader(family["base"])
    for name in base.names():
        w = base.read(name).float()
        if w.dim() == 2:
            assert w.std().item() == pytest.approx(synthetic.BASE_STD, rel=0.05) and abs(w.mean().item()) < 1e-3
        else:
            assert w.mean().item() == pytest.approx(1.0, abs=0.01)


def test_deltas_are_mostly_small_with_outlier_rows(family):
    deltas = _deltas(family, "ft0")
    flat = torch.cat([d.reshape(-1) for d in deltas.values()])
    below = (flat.abs() < 0.005).float().mean().item()
    assert 0.98 < below < 1.0  # "typically within 0.005", the outlier rows hold the rest
    n_outliers = n_rows = 0
    for name, d in deltas.items():
        if d.dim() != 2:
            continue
        row_std = d.std(dim=1)  # [rows]
        typical = row_std.median()
        assert typical == pytest.approx(synthetic.DELTA_STD, rel=0.25), name
        outliers = row_std > 5 * typical
        assert outliers.any(), name  # at least one per matrix, each ~10-30x larger
        assert (row_std[outliers] / typical).min() > 5 and (row_std[outliers] / typical).max() < 40
        n_outliers, n_rows = n_outliers + int(outliers.sum()), n_rows + d.shape[0]
    assert n_outliers / n_rows < 5 * synthetic.OUTLIER_ROW_FRACTION + 0.01


def test_fine_tunes_have_independent_deltas(family):
    a, b = _deltas(family, "ft0"), _deltas(family, "ft1")
    da = torch.cat([d.reshape(-1) for d in a.values()]).double()
    db = torch.cat([d.reshape(-1) for d in b.values()]).double()
    cosine = (da @ db / (da.norm() * db.norm())).item()
    assert abs(cosine) < 0.05 and not torch.equal(da, db)


def test_a_complete_family_is_reused_without_writing(family, monkeypatch):
    before = {m: _files(f) for m, f in family.items()}

    def fail(*args, **kwargs):
        raise AssertionError("a complete family must not be rewritten")

    monkeypatch.setattr(synthetic, "_write_weights", fail)
    again = write_synthetic_family(family["base"].parent, "tiny", finetunes=2, shard_bytes=SMALL_SHARDS)
    assert again == family and {m: _files(f) for m, f in family.items()} == before


def test_an_interrupted_write_leaves_nothing_and_the_next_run_completes(tmp_path, monkeypatch, family):
    calls = {"n": 0}
    emit = synthetic._emit

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # a kill in the middle of the weights
        emit(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_emit", dying)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_family(tmp_path, "tiny", finetunes=2, shard_bytes=SMALL_SHARDS)
    assert list(tmp_path.iterdir()) == []  # no partial folder under a final name, no staging folder left
    monkeypatch.setattr(synthetic, "_emit", emit)
    done = write_synthetic_family(tmp_path, "tiny", finetunes=2, shard_bytes=SMALL_SHARDS)
    assert {m: _files(f) for m, f in done.items()} == {m: _files(f) for m, f in family.items()}


def test_leftovers_of_a_killed_run_and_stale_folders_are_rewritten(tmp_path, family):
    root = tmp_path / "fam"
    shutil.copytree(family["base"].parent, root)
    (root / ".ft0.partial").mkdir()  # what a SIGKILL leaves
    (root / ".ft0.partial" / "model-00001-of-00004.safetensors").write_bytes(b"junk")
    (root / "ft0" / ".complete").unlink()  # a folder without its marker
    shard = sorted((root / "ft1").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard under a valid marker
    marker = json.loads((root / "base" / ".complete").read_text())
    marker["params"]["seed"] = 7  # written with other parameters
    (root / "base" / ".complete").write_text(json.dumps(marker))
    done = write_synthetic_family(root, "tiny", finetunes=2, shard_bytes=SMALL_SHARDS)
    assert sorted(p.name for p in root.iterdir()) == ["base", "ft0", "ft1"]
    assert {m: _files(f) for m, f in done.items()} == {m: _files(f) for m, f in family.items()}


def test_refused_before_writing_when_the_disk_is_too_small(tmp_path, monkeypatch):
    real = shutil.disk_usage

    def small(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr(shutil, "disk_usage", small)
    target = tmp_path / "nested" / "fam"
    with pytest.raises(OSError) as err:
        write_synthetic_family(target, "7b", finetunes=1)
    assert err.value.errno == errno.ENOSPC
    message = str(err.value)
    needed = int(re.search(r"needs ([\d,]+) bytes", message).group(1).replace(",", ""))
    assert str(target) in message and needed >= family_bytes("7b") and "1,000 free" in message
    assert not target.exists()


@pytest.mark.parametrize("kwargs, error", [
    (dict(size="13b"), KeyError),
    (dict(finetunes=-1), ValueError),
    (dict(shard_bytes=0), ValueError),
    (dict(workers=0), ValueError),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, error):
    with pytest.raises(error):
        write_synthetic_family(tmp_path, **{"size": "tiny", **kwargs})


@pytest.mark.parametrize("change", [dict(hidden_size=0), dict(num_heads=5), dict(num_kv_heads=3),
                                    dict(head_dim=-1), dict(vocab_size=1.5)])
def test_shape_is_validated(change):
    with pytest.raises(ValueError):
        dataclasses.replace(SHAPES["tiny"], **change)


def test_custom_shape_with_explicit_head_dim(tmp_path):
    shape = LlamaShape(hidden_size=48, num_layers=1, intermediate_size=64, num_heads=4, num_kv_heads=1,
                       vocab_size=100, tie_embeddings=True, head_dim=16)
    base = write_synthetic_family(tmp_path, shape, finetunes=0)["base"]
    assert TensorReader(base).info("model.layers.0.self_attn.q_proj.weight").shape == (64, 48)
    assert read_card_front_matter(base)["model_id"].startswith("deltakit-synthetic/llama-custom-")


def test_more_fine_tunes_later_writes_only_the_new_ones(tmp_path, family):
    first = write_synthetic_family(tmp_path, "tiny", finetunes=1, shard_bytes=SMALL_SHARDS)
    stamps = {p: p.stat().st_mtime_ns for m in ("base", "ft0") for p in first[m].iterdir()}
    more = write_synthetic_family(tmp_path, "tiny", finetunes=2, shard_bytes=SMALL_SHARDS)
    assert {p: p.stat().st_mtime_ns for m in ("base", "ft0") for p in more[m].iterdir()} == stamps
    assert _files(more["ft1"]) == _files(family["ft1"])
