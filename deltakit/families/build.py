"""Homologous model families built here, offline: the registry, the build, and the paths.

A *family* is one pre-trained base plus several full fine-tunes of it, each written as a Hub-style repository
folder (``config.json``, ``model.safetensors``, tokenizer files, ``README.md`` card with YAML front matter carrying
``base_model``, ``base_model_relation: finetune``, the dataset, the recipe and the measured metrics), plus the
family's dataset as a Hub-style dataset folder. Since nothing can reach the Hugging Face Hub at run time, these
families are the default subjects of deltakit: a delta is ``fine-tune - base`` between two folders of one family.

Layout under :func:`deltakit_home` (``$DELTAKIT_HOME``, default ``~/.cache/deltakit``)::

    families/<family>/data/              dataset repository (see deltakit.families.data)
    families/<family>/base/              the base: a bare BertModel (keys without the "bert." prefix)
    families/<family>/<fine-tune>/       BertForSequenceClassification (keys under "bert.", plus "classifier.*")

Every folder is built under a temporary name and renamed into place after its ``.complete`` marker is written,
so a folder that exists under its final name is complete. The marker holds a fingerprint of everything that
defines the folder (data split, base builder and its config, recipe); a folder whose fingerprint no longer
matches the registry is rebuilt, so changing a recipe can never leave a stale member behind. A file lock keeps
two processes from building one family at once.

The two registered families share every line of code and differ only in their :class:`Family` entries below:
``tiny`` (tests; seconds, bit-identical rebuilds) and ``minilm-tweets`` (the real all-MiniLM-L6-v2 demo).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from deltakit.families import minilm, tiny
from deltakit.families.card import read_card, write_card
from deltakit.families.data import TASKS, DataSpec, read_split, write_dataset
from deltakit.families.train import Recipe, evaluate_accuracy, fine_tune, seeded, torch_threads

if TYPE_CHECKING:
    import datasets

# Bump when the folder layout or the card schema changes: every fingerprint changes, every folder is rebuilt.
FORMAT_VERSION = 1
MARKER = ".complete"
DATA_FOLDER = "data"
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
HEAD_KEYS = frozenset({"classifier.weight", "classifier.bias"})

BaseBuilder = Callable[..., dict[str, Any]]
"""``(folder, *, config, data_folder, progress) -> card facts``: writes a base member's files into ``folder``."""


@dataclass(frozen=True)
class MemberSpec:
    """One fine-tuned member of a family.

    Attributes:
        name: Folder and member name, e.g. ``sentiment3``.
        task: Key of :data:`deltakit.families.data.TASKS` (which labels, which rows).
        recipe: The fine-tuning recipe.
        summary: One sentence for the card and the listing.
    """

    name: str
    task: str
    recipe: Recipe
    summary: str

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"Member name must be a plain folder name, got {self.name!r}.")
        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r} for member {self.name!r}; available tasks: {list(TASKS)}.")


@dataclass(frozen=True)
class Family:
    """A homologous family: one base member plus fine-tunes of it, and its dataset.

    Attributes:
        name: Registry key and folder name, e.g. ``tiny``.
        description: One sentence.
        build_base: Writes the base member (the only family-specific code), see :data:`BaseBuilder`.
        base_config: Frozen dataclass handed to ``build_base``; part of the base's fingerprint.
        finetunes: The fine-tuned members, built in this order.
        data: How the corpus is split (and subsampled) for this family.
        license: License of the members' weights.
        threads: torch intra-op threads while building (None: torch's default, all physical cores).
        base: Name of the base member.
    """

    name: str
    description: str
    build_base: BaseBuilder
    base_config: Any
    finetunes: tuple[MemberSpec, ...]
    data: DataSpec
    license: str
    threads: int | None = None
    base: str = "base"

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.finetunes]
        if len(set(names)) != len(names) or self.base in names or DATA_FOLDER in names + [self.base]:
            raise ValueError(
                f"Family {self.name!r}: member names must be unique and differ from {DATA_FOLDER!r}; "
                f"got base {self.base!r} and fine-tunes {names}."
            )

    @property
    def members(self) -> tuple[str, ...]:
        """All member names, base first."""
        return (self.base,) + tuple(spec.name for spec in self.finetunes)

    def finetune(self, member: str) -> MemberSpec:
        """The spec of a fine-tuned member.

        Raises:
            KeyError: If ``member`` is not a fine-tune of this family (the message lists them).
        """
        for spec in self.finetunes:
            if spec.name == member:
                return spec
        raise KeyError(
            f"{member!r} is not a fine-tuned member of family {self.name!r}; fine-tunes: "
            f"{', '.join(s.name for s in self.finetunes)} (the base is {self.base!r})."
        )

    def model_id(self, member: str) -> str:
        """Repository-style id of a member, ``deltakit/<family>-<member>``."""
        return f"deltakit/{self.name}-{member}"

    @property
    def dataset_id(self) -> str:
        """Repository-style id of the family's dataset, ``deltakit/<family>-data``."""
        return f"deltakit/{self.name}-data"


_SENTIMENT3 = "3-way tweet sentiment (negative / neutral / positive)"
_POLARITY = "tweet polarity (negative / positive; neutral tweets left out)"

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="tiny",
            description="A tiny BERT (2 layers, hidden 64) and three fine-tunes on tweets; builds in seconds, "
            "bit-identically. For tests.",
            build_base=tiny.build_base,
            base_config=tiny.TinyBaseConfig(),
            finetunes=(
                MemberSpec(
                    "sentiment3", "sentiment3", Recipe(learning_rate=2e-3, steps=100, max_length=48), f"{_SENTIMENT3}."
                ),
                MemberSpec(
                    "polarity", "polarity", Recipe(learning_rate=2e-3, steps=100, max_length=48), f"{_POLARITY}."
                ),
                MemberSpec(
                    "sentiment3-hot",
                    "sentiment3",
                    # 2.5x the learning rate; a longer warm-up keeps this small model from collapsing onto the
                    # majority class (it does at 6e-3 with the default 6% warm-up).
                    Recipe(learning_rate=5e-3, steps=100, max_length=48, warmup_fraction=0.2),
                    f"{_SENTIMENT3} at a 2.5x larger learning rate: larger deltas.",
                ),
            ),
            data=DataSpec(seed=0, max_rows=(4000, 600, 600)),
            license="apache-2.0",
            # One thread: tiny matrices gain nothing from more, and a fixed count keeps rebuilds bit-identical.
            threads=1,
        ),
        Family(
            name="minilm-tweets",
            description="all-MiniLM-L6-v2 and four full fine-tunes on tweet sentiment: small deltas (lr 5e-5), "
            "large deltas (lr 1e-3) and AdamR-regularised deltas. The real demo.",
            build_base=minilm.build_base,
            base_config=minilm.MiniLMBaseConfig(),
            finetunes=(
                MemberSpec("sentiment3", "sentiment3", Recipe(learning_rate=5e-5, steps=200), f"{_SENTIMENT3}."),
                MemberSpec("polarity", "polarity", Recipe(learning_rate=5e-5, steps=200), f"{_POLARITY}."),
                MemberSpec(
                    "sentiment3-hot",
                    "sentiment3",
                    # A 25% warm-up: with the default 6% this run reached only 57% validation accuracy (macro-F1
                    # 0.40; sentiment3: 74%), with 25% it reaches 72% -- comparable accuracy, ~10x larger deltas.
                    Recipe(learning_rate=1e-3, steps=200, warmup_fraction=0.25),
                    f"{_SENTIMENT3} at a 20x larger learning rate: large deltas, the regime where DARE breaks.",
                ),
                MemberSpec(
                    "sentiment3-adamr",
                    "sentiment3",
                    Recipe(learning_rate=5e-5, steps=200, optimizer="adamr", weight_decay=0.1),
                    f"{_SENTIMENT3}, trained with AdamR-L2 (DAREx-L2, lambda=0.1): the delta is pulled toward zero, "
                    "so that DARE can drop more of it.",
                ),
            ),
            data=DataSpec(seed=0),
            license="apache-2.0",
        ),
    )
}


def deltakit_home() -> Path:
    """The root of deltakit's cache: ``$DELTAKIT_HOME`` if set, else ``~/.cache/deltakit``."""
    value = os.environ.get("DELTAKIT_HOME", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "deltakit"


def get_family(name: str) -> Family:
    """The registered family called ``name``.

    Raises:
        KeyError: If no family has that name (the message lists the registered ones).
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(
            f"Unknown family {name!r}; available families: {', '.join(FAMILIES)}. "
            "A new family is one more Family entry in deltakit.families.build.FAMILIES."
        ) from None


def _check_member(family: Family, member: str) -> None:
    if member not in family.members:
        raise KeyError(
            f"Unknown member {member!r} of family {family.name!r}; available members: {', '.join(family.members)}."
        )


def family_path(name: str, *, home: Path | None = None) -> Path:
    """The folder of a family, ``<home>/families/<name>``, whether built or not.

    Raises:
        KeyError: If the family is unknown.
    """
    family = get_family(name)
    return Path(home if home is not None else deltakit_home()) / "families" / family.name


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _fingerprint(family: Family, member: str) -> str:
    """Hash of everything that defines a folder; reprs of frozen dataclasses are stable across processes."""
    data = _digest(str(FORMAT_VERSION), repr(family.data))
    if member == DATA_FOLDER:
        return data
    builder = f"{family.build_base.__module__}.{family.build_base.__qualname__}"
    base = _digest(data, builder, repr(family.base_config))
    if member == family.base:
        return base
    spec = family.finetune(member)  # the summary is prose, not part of what defines the weights
    return _digest(base, spec.name, spec.task, repr(spec.recipe))


def _is_complete(folder: Path, fingerprint: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_marker(folder: Path, fingerprint: str, seconds: float) -> None:
    (folder / MARKER).write_text(json.dumps({"fingerprint": fingerprint, "seconds": round(seconds, 3)}) + "\n")


def _missing(family: Family, folder: Path, names: Sequence[str]) -> list[str]:
    """The folders of ``names`` (data first, then members in build order) that are absent, incomplete or stale."""
    return [n for n in names if not _is_complete(folder / n, _fingerprint(family, n))]


@contextlib.contextmanager
def _staged(final: Path, fingerprint: str) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success write the marker and move it to ``final`` in one rename."""
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    start = time.perf_counter()
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(0o644)  # save_pretrained writes weights 0600 (a temp file renamed); a repo is world-readable
        _write_marker(staging, fingerprint, time.perf_counter() - start)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and weight-loading bars while building; restore them after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _software() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "threads": torch.get_num_threads(),
    }


def _build_base(family: Family, staging: Path, data_folder: Path, progress: bool) -> None:
    start = time.perf_counter()
    facts = family.build_base(staging, config=family.base_config, data_folder=data_folder, progress=progress)
    summary = facts.pop("summary")
    front: dict[str, Any] = {
        "model_id": family.model_id(family.base),
        "family": family.name,
        "member": family.base,
        "role": "base",
        "library_name": "transformers",
        "pipeline_tag": facts.pop("pipeline_tag", "feature-extraction"),
        "license": family.license,
        "language": ["en"],
        "tags": ["deltakit", "bert"],
    }
    if "pretraining" in facts:  # pre-trained here, on the family's own data
        front["datasets"] = [family.dataset_id]
    front |= facts
    front["build_seconds"] = round(time.perf_counter() - start, 2)
    front["software"] = _software()
    body = f"""# {front['model_id']}

The pre-trained base of the deltakit family `{family.name}`. {summary}

Its fine-tunes ({', '.join(f'`{family.model_id(s.name)}`' for s in family.finetunes)}) are
`BertForSequenceClassification` models whose keys sit under `bert.`; deltakit pairs them with these prefix-less keys
and reports the new `classifier.*` head as unpaired.
"""
    write_card(staging, front, body)


def _build_finetune(
    family: Family, spec: MemberSpec, staging: Path, base_folder: Path, data_folder: Path, progress: bool
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    start = time.perf_counter()
    labels = TASKS[spec.task]
    train_ds = read_split(data_folder, "train", task=spec.task)
    validation = read_split(data_folder, "validation", task=spec.task)
    tokenizer = AutoTokenizer.from_pretrained(base_folder, trust_remote_code=False)
    history: list[float] = []
    with seeded(spec.recipe.seed):  # the classifier head's initialisation and dropout draw from this seed
        model, info = AutoModelForSequenceClassification.from_pretrained(
            base_folder,
            trust_remote_code=False,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            problem_type="single_label_classification",
            output_loading_info=True,
        )
        if set(info["missing_keys"]) != HEAD_KEYS or info["unexpected_keys"] or info["mismatched_keys"]:
            raise RuntimeError(
                f"Loading the base {base_folder} into a sequence classifier should add only {sorted(HEAD_KEYS)}; "
                f"got missing {sorted(info['missing_keys'])}, unexpected {sorted(info['unexpected_keys'])}, "
                f"mismatched {sorted(info['mismatched_keys'])}."
            )
        fine_tune(model, tokenizer, train_ds, spec.recipe, progress, desc=f"{family.name}/{spec.name}", history=history)
    metrics = evaluate_accuracy(model, tokenizer, validation, max_length=spec.recipe.max_length)
    model.save_pretrained(staging)
    # The fine-tune uses its base's tokenizer unchanged: ship the very same files.
    for name in TOKENIZER_FILES:
        if (base_folder / name).is_file():
            shutil.copyfile(base_folder / name, staging / name)
    tail = history[-max(1, len(history) // 10) :]
    front: dict[str, Any] = {
        "model_id": family.model_id(spec.name),
        "family": family.name,
        "member": spec.name,
        "role": "finetune",
        "base_model": family.model_id(family.base),
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "license": family.license,
        "language": ["en"],
        "datasets": [family.dataset_id],
        "tags": ["deltakit", "bert", "sentiment-analysis"],
        "task": spec.task,
        "labels": list(labels),
        "recipe": spec.recipe.to_card(),
        "train_loss": {"first": round(history[0], 4), "last_10pct_mean": round(sum(tail) / len(tail), 4)},
        "metrics": {
            "validation_accuracy": round(metrics["accuracy"], 4),
            "validation_macro_f1": round(metrics["macro_f1"], 4),
            "validation_majority_baseline": round(metrics["majority_baseline"], 4),
            "validation_examples": metrics["examples"],
        },
        "build_seconds": round(time.perf_counter() - start, 2),
        "software": _software(),
    }
    recipe = spec.recipe
    body = f"""# {front['model_id']}

{spec.summary} A full fine-tune of [`{front['base_model']}`](../{family.base}) in the deltakit family `{family.name}`,
on the train split of `{family.dataset_id}` (labels: {', '.join(labels)}).

| validation accuracy | macro-F1 | majority-class baseline | examples |
|---|---|---|---|
| {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} | {metrics['majority_baseline']:.4f} | {metrics['examples']} |

Recipe: full fine-tuning with AdamW, learning rate {recipe.learning_rate:g}, {recipe.steps} steps of batch
{recipe.batch_size}{" grouped by length" if recipe.group_by_length else ""}, max length {recipe.max_length}, linear
warm-up over {recipe.warmup_steps} steps then linear decay to 0, weight decay {recipe.weight_decay:g} (not on biases
and LayerNorm), gradient clipping at {recipe.max_grad_norm:g}, seed {recipe.seed}.
Built in {front['build_seconds']:.1f} s.

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")
```
"""
    write_card(staging, front, body)


def _build_dataset(family: Family, final: Path) -> None:
    with _staged(final, _fingerprint(family, DATA_FOLDER)) as staging:
        write_dataset(staging, family.data, dataset_id=family.dataset_id)


def build_family(name: str, *, members: Sequence[str] | None = None, home: Path | None = None, force: bool = False,
                 progress: bool = True) -> Path:
    """Build every missing member of a family (and its dataset); return the family folder.

    Idempotent: when every folder carries a ``.complete`` marker matching the registry, nothing is read or
    written and the call returns at once.

    Args:
        name: A key of :data:`FAMILIES`.
        members: Build only these members (the base and the dataset always come with them); default: all.
        home: deltakit home (default :func:`deltakit_home`).
        force: Rebuild everything asked for, even complete folders.
        progress: Show tqdm bars (one over members, one per training run).

    Returns:
        ``<home>/families/<name>``.

    Raises:
        KeyError: If the family or a member is unknown.
        FileNotFoundError: If a source (corpus package, base checkpoint) is missing.
    """
    from filelock import FileLock

    family = get_family(name)
    for member in members or ():
        _check_member(family, member)
    wanted = [DATA_FOLDER, *(m for m in family.members if members is None or m == family.base or m in members)]
    folder = family_path(name, home=home)
    if not force and not _missing(family, folder, wanted):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")), _quiet_transformers(), torch_threads(family.threads):
        # Re-check under the lock: another process may have built it while this one waited.
        todo = wanted if force else _missing(family, folder, wanted)
        if DATA_FOLDER in todo:
            _build_dataset(family, folder / DATA_FOLDER)
        models = [m for m in todo if m != DATA_FOLDER]
        bar = tqdm(models, desc=f"building {name}", unit="member", disable=not progress or not models)
        for member in bar:
            bar.set_postfix_str(member)
            with _staged(folder / member, _fingerprint(family, member)) as staging:
                if member == family.base:
                    _build_base(family, staging, folder / DATA_FOLDER, progress)
                else:
                    spec = family.finetune(member)
                    _build_finetune(family, spec, staging, folder / family.base, folder / DATA_FOLDER, progress)
    return folder


def _not_built(family: Family, what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} of family {family.name!r} is not built (expected at {path}). Build it with "
        f"`deltakit family build {family.name}` or `deltakit.families.build_family({family.name!r})`."
    )


def member_path(family: str, member: str, *, home: Path | None = None, build: bool = True) -> Path:
    """The Hub-style folder of one family member.

    Args:
        family: A key of :data:`FAMILIES`.
        member: One of the family's members (``base`` or a fine-tune).
        home: deltakit home (default :func:`deltakit_home`).
        build: Build the family first if this member is missing.

    Returns:
        ``<home>/families/<family>/<member>``.

    Raises:
        KeyError: If the family or member is unknown (the message lists the available ones).
        FileNotFoundError: If the member is not built and ``build`` is False (the message names the command).
    """
    spec = get_family(family)
    _check_member(spec, member)
    path = family_path(family, home=home) / member
    if not _is_complete(path, _fingerprint(spec, member)):
        if not build:
            raise _not_built(spec, f"Member {member!r}", path)
        build_family(family, members=[member], home=home)
    return path


def dataset_path(family: str, *, home: Path | None = None, build: bool = True) -> Path:
    """The Hub-style dataset folder of a family (README.md card plus ``data/<split>-00000-of-00001.parquet``).

    Args:
        family: A key of :data:`FAMILIES`.
        home: deltakit home (default :func:`deltakit_home`).
        build: Write the dataset (seconds; no model is built) if it is missing.

    Returns:
        ``<home>/families/<family>/data``.

    Raises:
        KeyError: If the family is unknown.
        FileNotFoundError: If the dataset is not built and ``build`` is False.
    """
    from filelock import FileLock

    spec = get_family(family)
    folder = family_path(family, home=home)
    path = folder / DATA_FOLDER
    fingerprint = _fingerprint(spec, DATA_FOLDER)
    if not _is_complete(path, fingerprint):
        if not build:
            raise _not_built(spec, "The dataset", path)
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / ".lock")):
            if not _is_complete(path, fingerprint):
                _build_dataset(spec, path)
    return path


def load_split(
    family: str, split: str, *, task: str = "sentiment3", home: Path | None = None, build: bool = True
) -> datasets.Dataset:
    """One split of a family's dataset, for one task.

    Args:
        family: A key of :data:`FAMILIES`.
        split: ``train``, ``validation`` or ``test``.
        task: ``sentiment3`` (3 labels, every row) or ``polarity`` (2 labels, neutral rows dropped); a fine-tuned
            member's task is ``FAMILIES[family].finetune(member).task`` and the ``task`` field of its card.
        home: deltakit home (default :func:`deltakit_home`).
        build: Write the dataset if it is missing.

    Returns:
        A ``datasets.Dataset`` with columns ``text`` and ``label`` (``ClassLabel``).

    Raises:
        KeyError: If the family, split or task is unknown.
        FileNotFoundError: If the dataset is not built and ``build`` is False.
    """
    return read_split(dataset_path(family, home=home, build=build), split, task=task)


def list_families(home: Path | None = None) -> pd.DataFrame:
    """One row per (family, member) with its build status and, when built, the metrics on its card.

    Args:
        home: deltakit home (default :func:`deltakit_home`).

    Returns:
        Columns ``family, member, model_id, role, built, path, base_model, task, validation_accuracy,
        validation_macro_f1, validation_majority_baseline, validation_examples, build_seconds``; metric columns
        are missing values for the base and for members not built.
    """
    rows = []
    for family in FAMILIES.values():
        for member in family.members:
            path = family_path(family.name, home=home) / member
            built = _is_complete(path, _fingerprint(family, member))
            card = read_card(path) if built else {}
            metrics = card.get("metrics", {})
            rows.append(
                {
                    "family": family.name,
                    "member": member,
                    "model_id": family.model_id(member),
                    "role": "base" if member == family.base else "finetune",
                    "built": built,
                    "path": str(path),
                    "base_model": None if member == family.base else family.model_id(family.base),
                    "task": None if member == family.base else family.finetune(member).task,
                    "validation_accuracy": metrics.get("validation_accuracy"),
                    "validation_macro_f1": metrics.get("validation_macro_f1"),
                    "validation_majority_baseline": metrics.get("validation_majority_baseline"),
                    "validation_examples": metrics.get("validation_examples"),
                    "build_seconds": card.get("build_seconds"),
                }
            )
    return pd.DataFrame(rows)
