"""The ``topic`` members: a fine-tune on BBC News topics beside the tweet fine-tunes, for multi-task merges.

The tiny family's topic member is built with the rest of the family (seconds); the MiniLM one behind ``slow``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltakit.families import FAMILIES, build_family, family_split, member_path, read_model_card
from deltakit.families.data import TOPIC_LABELS, split_file


def test_both_classifier_families_have_a_topic_member() -> None:
    for family in (f for f in FAMILIES.values() if f.model_kind == "classifier"):
        spec = family.finetune("topic")
        assert spec.task == "topic"
        assert "BBC" in spec.summary and "non-commercial research" in spec.summary
        assert family.task_of(family.base) == "sentiment3"  # the base is still judged on the first fine-tune's task


def test_tiny_topic_member_beats_the_majority_class(tiny_home: Path) -> None:
    folder = member_path("tiny", "topic", home=tiny_home, build=False)
    card = read_model_card(folder)
    assert card["task"] == "topic" and card["labels"] == list(TOPIC_LABELS)
    assert card["base_model"] == "deltakit/tiny-base" and card["datasets"] == ["deltakit/tiny-data"]
    assert "non-commercial research" in (folder / "README.md").read_text(encoding="utf-8")
    metrics = card["metrics"]
    validation = family_split("tiny", "validation", task="topic", home=tiny_home)
    assert metrics["validation_examples"] == len(validation)
    assert metrics["validation_majority_baseline"] < 0.3  # five topics, roughly balanced
    assert metrics["validation_accuracy"] >= metrics["validation_majority_baseline"] + 0.10, metrics

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert [model.config.id2label[i] for i in range(5)] == list(TOPIC_LABELS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        assert model(**tokenizer(["Shares fell after the merger."], return_tensors="pt")).logits.shape == (1, 5)
    # Homologous with the base: the same encoder keys under `bert.`, and a 5-way head.
    base = load_file(member_path("tiny", "base", home=tiny_home, build=False) / "model.safetensors")
    fine = load_file(folder / "model.safetensors")
    assert {key.removeprefix("bert.") for key in fine if key.startswith("bert.")} == set(base)
    assert fine["classifier.weight"].shape[0] == 5


def test_a_cache_from_before_the_topic_task_keeps_its_members(tiny_home: Path, tmp_path: Path) -> None:
    """A family folder built before the topic task existed: its members are kept; only the dataset is rewritten.

    The dataset folder's fingerprint covers the corpora the family's members use, so an old folder (tweets only, with
    the fingerprint of those days) is stale: building rewrites it (the tweet files byte-identical) and builds the
    topic member; no other member is touched.
    """
    from deltakit.families import get_family
    from deltakit.families.layout import FORMAT_VERSION, MARKER, _digest

    old = tmp_path / "families" / "tiny"
    shutil.copytree(tiny_home / "families" / "tiny", old)
    shutil.rmtree(old / "topic")
    shutil.rmtree(old / "data" / "data" / "topic")  # what a dataset folder written before the topic task lacks
    marker = json.loads((old / "data" / MARKER).read_text())
    marker["fingerprint"] = _digest(str(FORMAT_VERSION), repr(get_family("tiny").data))  # the fingerprint back then
    (old / "data" / MARKER).write_text(json.dumps(marker))
    kept = {member: (old / member / "model.safetensors").stat().st_mtime_ns for member in ("base", "sentiment3")}
    tweets = (old / "data" / split_file("train")).read_bytes()

    build_family("tiny", home=tmp_path, progress=False)

    assert (old / "data" / split_file("train")).read_bytes() == tweets
    assert (old / "data" / "data" / "topic").is_dir()
    assert {member: (old / member / "model.safetensors").stat().st_mtime_ns for member in kept} == kept
    new_weights = (tiny_home / "families" / "tiny" / "topic" / "model.safetensors").read_bytes()
    assert (old / "topic" / "model.safetensors").read_bytes() == new_weights


@pytest.mark.slow
def test_minilm_topic_member_beats_majority(tmp_path: Path) -> None:
    build_family("minilm-tweets", members=["topic"], home=tmp_path, progress=False)
    metrics = read_model_card(member_path("minilm-tweets", "topic", home=tmp_path, build=False))["metrics"]
    assert metrics["validation_accuracy"] >= metrics["validation_majority_baseline"] + 0.30, metrics
