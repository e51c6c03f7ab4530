"""The embedded model families: build, idempotence, bit-identical rebuilds, Hub-style folders, cards, errors.

Only the ``tiny`` family is built here (seconds); the real ``minilm-tweets`` build is behind the ``slow`` marker.
Every build goes to a temporary deltakit home, never to the user's cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deltakit.families import (
    FAMILIES,
    Recipe,
    build_family,
    dataset_path,
    deltakit_home,
    family_split,
    list_families,
    member_path,
    read_model_card,
)
from deltakit.families.data import SPLITS, DataSpec, read_corpus, split_corpus, split_file

FINETUNES = ("sentiment3", "polarity", "sentiment3-hot")
MODEL_FILES = ("config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _files(folder: Path) -> dict[str, int]:
    """Relative path -> mtime in ns of every file under folder."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _mean_abs_delta(base: dict[str, torch.Tensor], fine: dict[str, torch.Tensor]) -> float:
    """Element-weighted mean |fine - base| over the paired float tensors (fine key == 'bert.' + base key)."""
    total, count = 0.0, 0
    for name, tensor in base.items():
        if tensor.is_floating_point() and f"bert.{name}" in fine:
            total += (fine[f"bert.{name}"] - tensor).abs().sum().item()
            count += tensor.numel()
    return total / count


def test_registry_members_and_names() -> None:
    for name in ("tiny", "minilm-tweets"):
        family = FAMILIES[name]
        assert family.name == name
        assert family.base == "base"
        assert family.members[: 1 + len(FINETUNES)] == ("base", *FINETUNES)
    assert FAMILIES["minilm-tweets"].members[-1] == "sentiment3-adamr"
    assert FAMILIES["minilm-tweets"].finetune("sentiment3-adamr").recipe.optimizer == "adamr"
    assert FAMILIES["tiny"].finetune("polarity").task == "polarity"


def test_build_writes_hub_style_folders(tiny_home: Path) -> None:
    family_dir = tiny_home / "families" / "tiny"
    for member in FAMILIES["tiny"].members:
        folder = family_dir / member
        assert folder == member_path("tiny", member, home=tiny_home, build=False)
        for name in MODEL_FILES:
            assert (folder / name).is_file(), f"{member} lacks {name}"
        assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    for split in SPLITS:
        assert (family_dir / "data" / split_file(split)).is_file()
    assert (family_dir / "data" / "README.md").is_file()
    assert not list(family_dir.glob(".*.partial")), "no staging folder may survive a build"


def test_second_build_is_instant_and_rewrites_nothing(tiny_home: Path) -> None:
    family_dir = tiny_home / "families" / "tiny"
    before = _files(family_dir)
    start = time.perf_counter()
    assert build_family("tiny", home=tiny_home, progress=False) == family_dir
    assert time.perf_counter() - start < 1.0
    assert _files(family_dir) == before


def test_rebuild_in_fresh_home_is_bit_identical(tiny_home: Path, tmp_path: Path) -> None:
    build_family("tiny", home=tmp_path, progress=False)
    first, second = tiny_home / "families" / "tiny", tmp_path / "families" / "tiny"
    for member in FAMILIES["tiny"].members:
        for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt"):
            assert (first / member / name).read_bytes() == (second / member / name).read_bytes(), f"{member}/{name}"
    for split in SPLITS:
        assert (first / "data" / split_file(split)).read_bytes() == (second / "data" / split_file(split)).read_bytes()

    # A member whose marker is gone is rebuilt -- and only that member, to the same bytes.
    (second / "polarity" / ".complete").unlink()
    before = _files(second)
    build_family("tiny", home=tmp_path, progress=False)
    after = _files(second)
    changed = {path.split("/")[0] for path in after if after[path] != before.get(path)}
    assert changed == {"polarity"}
    weights = "polarity/model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()


def test_folders_load_without_key_surprises(tiny_home: Path) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertModel

    base_dir = member_path("tiny", "base", home=tiny_home, build=False)
    base, info = AutoModel.from_pretrained(base_dir, output_loading_info=True)
    assert isinstance(base, BertModel)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for member in FINETUNES:
        folder = member_path("tiny", member, home=tiny_home, build=False)
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], member
        labels = FAMILIES["tiny"].finetune(member).task
        expected = ["negative", "positive"] if labels == "polarity" else ["negative", "neutral", "positive"]
        assert [model.config.id2label[i] for i in range(len(expected))] == expected
        assert model.config.label2id == {name: i for i, name in enumerate(expected)}
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with torch.inference_mode():
            logits = model(**tokenizer(["what a great flight"], return_tensors="pt")).logits
        assert logits.shape == (1, len(expected))


def test_key_prefixes_base_bare_finetunes_under_bert(tiny_home: Path) -> None:
    base = load_file(member_path("tiny", "base", home=tiny_home, build=False) / "model.safetensors")
    assert not any(key.startswith("bert.") for key in base)
    assert "pooler.dense.weight" in base and "embeddings.word_embeddings.weight" in base
    for member in FINETUNES:
        fine = load_file(member_path("tiny", member, home=tiny_home, build=False) / "model.safetensors")
        head = {key for key in fine if not key.startswith("bert.")}
        assert head == {"classifier.weight", "classifier.bias"}, member
        assert {key.removeprefix("bert.") for key in fine if key.startswith("bert.")} == set(base), member


def test_deltas_are_real_and_hot_is_larger(tiny_home: Path) -> None:
    base = load_file(member_path("tiny", "base", home=tiny_home, build=False) / "model.safetensors")
    deltas = {}
    for member in FINETUNES:
        fine = load_file(member_path("tiny", member, home=tiny_home, build=False) / "model.safetensors")
        deltas[member] = _mean_abs_delta(base, fine)
    assert all(value > 1e-4 for value in deltas.values()), deltas
    assert deltas["sentiment3-hot"] > 1.5 * deltas["sentiment3"], deltas


def test_cards_carry_lineage_recipe_and_metrics(tiny_home: Path) -> None:
    base_card = read_model_card(member_path("tiny", "base", home=tiny_home, build=False))
    assert base_card["model_id"] == "deltakit/tiny-base"
    assert base_card["library_name"] == "transformers"
    assert "base_model" not in base_card and base_card["role"] == "base"
    assert base_card["pretraining"]["objective"] == "masked-lm"
    for member in FINETUNES:
        card = read_model_card(member_path("tiny", member, home=tiny_home, build=False))
        assert card["model_id"] == f"deltakit/tiny-{member}"
        assert card["base_model"] == "deltakit/tiny-base"
        assert card["base_model_relation"] == "finetune"
        assert card["library_name"] == "transformers"
        assert card["pipeline_tag"] == "text-classification"
        assert card["datasets"] == ["deltakit/tiny-data"]
        recipe = card["recipe"]
        required = ("optimizer", "learning_rate", "steps", "batch_size", "max_length", "warmup_steps", "schedule")
        for key in (*required, "seed"):
            assert key in recipe, f"{member} recipe lacks {key}"
        assert recipe["learning_rate"] == FAMILIES["tiny"].finetune(member).recipe.learning_rate
        metrics = card["metrics"]
        assert 0.0 <= metrics["validation_accuracy"] <= 1.0
        assert 0.0 <= metrics["validation_macro_f1"] <= 1.0
        assert 0.3 < metrics["validation_majority_baseline"] < 0.8
        validation = family_split("tiny", "validation", task=card["task"], home=tiny_home)
        assert metrics["validation_examples"] == len(validation)
        assert card["build_seconds"] > 0
    assert read_model_card(dataset_path("tiny", home=tiny_home, build=False))["dataset_id"] == "deltakit/tiny-data"


def test_unknown_family_or_member_lists_the_options(tiny_home: Path) -> None:
    with pytest.raises(KeyError, match="tiny.*minilm-tweets"):
        build_family("no-such-family", home=tiny_home)
    with pytest.raises(KeyError, match="base, sentiment3, polarity, sentiment3-hot"):
        member_path("tiny", "no-such-member", home=tiny_home)
    with pytest.raises(KeyError, match="minilm-tweets"):
        member_path("nope", "base", home=tiny_home)
    with pytest.raises(KeyError, match="train, validation, test"):
        family_split("tiny", "dev", home=tiny_home)


def test_missing_member_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="deltakit family build tiny"):
        member_path("tiny", "sentiment3", home=tmp_path, build=False)
    with pytest.raises(FileNotFoundError, match="deltakit family build minilm-tweets"):
        dataset_path("minilm-tweets", home=tmp_path, build=False)


def test_a_member_builds_alone_with_its_base(tmp_path: Path) -> None:
    """A fresh home that needs one fine-tune builds it, the base and the dataset, not the whole family."""
    path = member_path("tiny", "sentiment3-hot", home=tmp_path)
    built = {p.name for p in path.parent.iterdir() if (p / ".complete").exists()}
    assert built == {"data", "base", "sentiment3-hot"}
    with pytest.raises(KeyError, match="sentiment3"):
        build_family("tiny", members=["no-such-member"], home=tmp_path)


def test_list_families_marks_built(tiny_home: Path) -> None:
    table = list_families(tiny_home)
    assert list(table.columns[:6]) == ["family", "member", "model_id", "role", "built", "path"]
    assert len(table) == sum(len(family.members) for family in FAMILIES.values())
    tiny = table[table["family"] == "tiny"]
    assert tiny["built"].all()
    assert tiny.loc[tiny["member"] == "sentiment3", "validation_accuracy"].notna().all()
    assert not table.loc[table["family"] == "minilm-tweets", "built"].any()


def test_deltakit_home_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path))
    assert deltakit_home() == tmp_path
    monkeypatch.delenv("DELTAKIT_HOME")
    assert deltakit_home() == Path.home() / ".cache" / "deltakit"


def test_splits_load_with_classlabels(tiny_home: Path, tmp_path: Path) -> None:
    import datasets

    train = family_split("tiny", "train", home=tiny_home)
    assert train.column_names == ["text", "label"]
    assert train.features["label"].names == ["negative", "neutral", "positive"]
    polarity = family_split("tiny", "validation", task="polarity", home=tiny_home)
    assert polarity.features["label"].names == ["negative", "positive"]
    assert set(polarity["label"]) == {0, 1}
    three_way = family_split("tiny", "validation", home=tiny_home)
    assert len(polarity) == sum(1 for label in three_way["label"] if label != 1)

    folder = dataset_path("tiny", home=tiny_home, build=False)
    files = {split: str(folder / split_file(split)) for split in SPLITS}
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    assert loaded["validation"].features["label"].names == ["negative", "neutral", "positive"]
    assert loaded["validation"]["text"] == three_way["text"]


def test_corpus_split_is_deterministic_stratified_and_disjoint() -> None:
    corpus = read_corpus()
    assert len(corpus) > 30_000 and not corpus["text"].duplicated().any()
    first, again = split_corpus(corpus, DataSpec(seed=0)), split_corpus(corpus, DataSpec(seed=0))
    for split in SPLITS:
        assert first[split].equals(again[split])
    texts = [set(first[split]["text"]) for split in SPLITS]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert sum(len(first[split]) for split in SPLITS) == len(corpus)
    shares = [np.bincount(first[split]["label"], minlength=3) / len(first[split]) for split in SPLITS]
    assert np.abs(shares[0] - shares[1]).max() < 0.005 and np.abs(shares[0] - shares[2]).max() < 0.005
    # A capped split is a subset of the uncapped split with the same seed.
    capped = split_corpus(corpus, DataSpec(seed=0, max_rows=(500, 100, None)))
    assert len(capped["train"]) == pytest.approx(500, abs=3) and set(capped["train"]["text"]) <= texts[0]
    assert capped["test"].equals(first["test"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.0, "steps": 10},
        {"learning_rate": 1e-3, "steps": 0},
        {"learning_rate": 1e-3, "steps": 10, "warmup_fraction": 1.0},
        {"learning_rate": 1e-3, "steps": 10, "optimizer": "sgd"},
    ],
)
def test_recipe_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Recipe"):
        Recipe(**kwargs)


@pytest.mark.slow
def test_minilm_tweets_members_beat_majority(tmp_path: Path) -> None:
    build_family("minilm-tweets", home=tmp_path, progress=False)
    base = load_file(member_path("minilm-tweets", "base", home=tmp_path, build=False) / "model.safetensors")
    assert not any(key.startswith("bert.") for key in base)
    for member in FINETUNES:
        metrics = read_model_card(member_path("minilm-tweets", member, home=tmp_path, build=False))["metrics"]
        assert metrics["validation_accuracy"] >= metrics["validation_majority_baseline"] + 0.10, (member, metrics)
