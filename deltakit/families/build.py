"""Building the embedded families: each missing member (and the dataset) is written once, on first use.

Each member is written as a Hub-style repository folder (``config.json``, ``model.safetensors``, tokenizer files,
``README.md`` card with YAML front matter carrying ``base_model``, ``base_model_relation: finetune``, the dataset,
the recipe and the measured metrics), the dataset as a Hub-style dataset folder. Since nothing can reach the
Hugging Face Hub at run time, these families are the default subjects of deltakit: a delta is
``fine-tune - base`` between two folders of one family.

What exists is :mod:`deltakit.families.registry`; where it lives and when a folder counts as complete is
:mod:`deltakit.families.layout`. :func:`member_path`, :func:`dataset_path` and :func:`family_split` hand out a
member, the dataset or one of its splits, building what is missing first. A file lock keeps two processes from
building one family at once.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from deltakit.families import lm
from deltakit.families.card import write_card
from deltakit.families.data import TASKS, read_split, write_dataset
from deltakit.families.layout import family_path, folder_fingerprint, is_built, missing, staged
from deltakit.families.registry import DATA_FOLDER, Family, MemberSpec, get_family
from deltakit.families.train import evaluate_accuracy, fine_tune, seeded, torch_threads
from deltakit.names import is_head

if TYPE_CHECKING:
    import datasets

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


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


def software() -> dict[str, Any]:
    """The software versions and thread count a card records."""
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
    front["software"] = software()
    members = ", ".join(f"`{family.model_id(s.name)}`" for s in family.finetunes)
    if family.model_kind == "causal_lm":
        layout = (f"Its fine-tunes ({members}) are full fine-tunes of this `LlamaForCausalLM` with the same keys and "
                  "tokenizer; the tied embedding is both the input embedding and the output head.")
    else:
        layout = (f"Its fine-tunes ({members}) are `BertForSequenceClassification` models whose keys sit under "
                  "`bert.`; deltakit pairs them with these prefix-less keys and reports the new `classifier.*` head "
                  "as unpaired.")
    body = f"""# {front['model_id']}

The pre-trained base of the deltakit family `{family.name}`. {summary}

{layout}
"""
    write_card(staging, front, body)


def finetune_front(family: Family, spec: MemberSpec, pipeline_tag: str) -> dict[str, Any]:
    """The card fields every fine-tuned member starts with: identity, base model and relation, license, language."""
    return {
        "model_id": family.model_id(spec.name),
        "family": family.name,
        "member": spec.name,
        "role": "finetune",
        "base_model": family.model_id(family.base),
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "pipeline_tag": pipeline_tag,
        "license": spec.license or family.license,
        "language": ["en"],
    }


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
        added = set(info["missing_keys"])
        if not added or not all(map(is_head, added)) or info["unexpected_keys"] or info["mismatched_keys"]:
            raise RuntimeError(
                f"Loading the base {base_folder} into a sequence classifier should add only the new head; "
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
        **finetune_front(family, spec, "text-classification"),
        "datasets": [family.dataset_id],
        "tags": ["deltakit", "bert", "topic-classification" if spec.task == "topic" else "sentiment-analysis"],
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
        "software": software(),
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
and norms), gradient clipping at {recipe.max_grad_norm:g}, seed {recipe.seed}.
Built in {front['build_seconds']:.1f} s.

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")
```
"""
    write_card(staging, front, body)


def _build_dataset(family: Family, final: Path) -> None:
    with staged(final, folder_fingerprint(family, DATA_FOLDER)) as staging:
        write_dataset(staging, family.data, dataset_id=family.dataset_id)


def build_family(name: str, *, members: Sequence[str] | None = None, home: Path | None = None, force: bool = False,
                 progress: bool = True) -> Path:
    """Build every missing member of a family (and its dataset); return the family folder.

    Idempotent: when every folder carries a ``.complete`` marker matching the registry, nothing is read or
    written and the call returns at once.

    Args:
        name: A key of :data:`deltakit.families.FAMILIES`.
        members: Build only these members (the base and the dataset always come with them); default: all.
        home: deltakit home (default :func:`deltakit.families.deltakit_home`).
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
        family.check_member(member)
    wanted = [DATA_FOLDER, *(m for m in family.members if members is None or m == family.base or m in members)]
    folder = family_path(name, home=home)
    if not force and not missing(family, folder, wanted):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")), _quiet_transformers(), torch_threads(family.threads):
        # Re-check under the lock: another process may have built it while this one waited.
        todo = wanted if force else missing(family, folder, wanted)
        if DATA_FOLDER in todo:
            _build_dataset(family, folder / DATA_FOLDER)
        models = [m for m in todo if m != DATA_FOLDER]
        bar = tqdm(models, desc=f"building {name}", unit="member", disable=not progress or not models)
        for member in bar:
            bar.set_postfix_str(member)
            with staged(folder / member, folder_fingerprint(family, member)) as staging:
                if member == family.base:
                    _build_base(family, staging, folder / DATA_FOLDER, progress)
                else:
                    build_member = lm.build_finetune if family.model_kind == "causal_lm" else _build_finetune
                    build_member(family, family.finetune(member), staging, folder / family.base, folder / DATA_FOLDER,
                                 progress)
    return folder


def _not_built(family: Family, what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} of family {family.name!r} is not built (expected at {path}). Build it with "
        f"`deltakit family build {family.name}` or `deltakit.families.build_family({family.name!r})`."
    )


def member_path(family: str, member: str, *, home: Path | None = None, build: bool = True) -> Path:
    """The Hub-style folder of one family member.

    Args:
        family: A key of :data:`deltakit.families.FAMILIES`.
        member: One of the family's members (``base`` or a fine-tune).
        home: deltakit home (default :func:`deltakit.families.deltakit_home`).
        build: Build the family first if this member is missing.

    Returns:
        ``<home>/families/<family>/<member>``.

    Raises:
        KeyError: If the family or member is unknown (the message lists the available ones).
        FileNotFoundError: If the member is not built and ``build`` is False (the message names the command).
    """
    spec = get_family(family)
    spec.check_member(member)
    folder = family_path(family, home=home)
    if not is_built(spec, folder, member):
        if not build:
            raise _not_built(spec, f"Member {member!r}", folder / member)
        build_family(family, members=[member], home=home)
    return folder / member


def dataset_path(family: str, *, home: Path | None = None, build: bool = True) -> Path:
    """The Hub-style dataset folder of a family (README.md card plus ``data/<split>-00000-of-00001.parquet``).

    Args:
        family: A key of :data:`deltakit.families.FAMILIES`.
        home: deltakit home (default :func:`deltakit.families.deltakit_home`).
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
    if not is_built(spec, folder, DATA_FOLDER):
        if not build:
            raise _not_built(spec, "The dataset", path)
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / ".lock")):
            if not is_built(spec, folder, DATA_FOLDER):
                _build_dataset(spec, path)
    return path


def family_split(
    family: str, split: str, *, task: str = "sentiment3", home: Path | None = None, build: bool = True
) -> datasets.Dataset:
    """One split of a family's dataset, for one task.

    Args:
        family: A key of :data:`deltakit.families.FAMILIES`.
        split: ``train``, ``validation`` or ``test``.
        task: a key of :data:`deltakit.families.data.TASKS`: ``sentiment3`` (3 labels, every tweet), ``polarity``
            (2 labels, neutral tweets dropped) or ``topic`` (5 BBC News topics); for a decoder family a key of
            :data:`deltakit.families.lm.LM_TASKS` (``arith``: columns ``question``, ``answer``). A fine-tuned
            member's task is ``get_family(family).task_of(member)`` and the ``task`` field of its card.
        home: deltakit home (default :func:`deltakit.families.deltakit_home`).
        build: Write the dataset if it is missing.

    Returns:
        A ``datasets.Dataset`` with columns ``text`` and ``label`` (``ClassLabel``), or ``question`` and ``answer``.

    Raises:
        KeyError: If the family, split or task is unknown.
        FileNotFoundError: If the dataset is not built and ``build`` is False.
    """
    folder = dataset_path(family, home=home, build=build)
    if get_family(family).model_kind == "causal_lm":
        return lm.lm_task(task).read(folder, split)
    return read_split(folder, split, task=task)
