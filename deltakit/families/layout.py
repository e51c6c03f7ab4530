"""Where the embedded families live on disk, and which of their folders are complete.

Layout under :func:`deltakit_home` (``$DELTAKIT_HOME``, default ``~/.cache/deltakit``)::

    families/<family>/data/              dataset repository (see deltakit.families.data)
    families/<family>/base/              the base: a bare BertModel (keys without the "bert." prefix)
    families/<family>/<fine-tune>/       BertForSequenceClassification (keys under "bert.", plus "classifier.*")

Every folder is built under a temporary name and renamed into place after its ``.complete`` marker is written
(:func:`staged`), so a folder that exists under its final name is complete. The marker holds a fingerprint of
everything that defines the folder (data split, base builder and its config, recipe); a folder whose fingerprint
no longer matches the registry counts as missing and is rebuilt, so changing a recipe can never leave a stale
member behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from deltakit.families.card import read_model_card
from deltakit.families.registry import DATA_FOLDER, FAMILIES, Family, get_family

# Bump when the folder layout or the card schema changes: every fingerprint changes, every folder is rebuilt.
FORMAT_VERSION = 1
MARKER = ".complete"


def deltakit_home() -> Path:
    """The root of deltakit's cache: ``$DELTAKIT_HOME`` if set, else ``~/.cache/deltakit``."""
    value = os.environ.get("DELTAKIT_HOME", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "deltakit"


def family_path(name: str, *, home: Path | None = None) -> Path:
    """The folder of a family, ``<home>/families/<name>``, whether built or not.

    Raises:
        KeyError: If the family is unknown.
    """
    family = get_family(name)
    return Path(home if home is not None else deltakit_home()) / "families" / family.name


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def folder_fingerprint(family: Family, member: str) -> str:
    """Hash of everything that defines a folder; reprs of frozen dataclasses are stable across processes."""
    data = _digest(str(FORMAT_VERSION), repr(family.data))
    if member == DATA_FOLDER:  # the corpora too: a new task's corpus rewrites the data folder (seconds), no member
        from deltakit.families.data import TASK_SPECS

        return _digest(data, *sorted({TASK_SPECS[spec.task].corpus.config for spec in family.finetunes
                                      if spec.task in TASK_SPECS}))
    builder = f"{family.build_base.__module__}.{family.build_base.__qualname__}"
    base = _digest(data, builder, repr(family.base_config))
    if member == family.base:
        return base
    spec = family.finetune(member)  # the summary is prose, not part of what defines the weights
    if family.model_kind == "causal_lm":  # the prompts and the generated problems define a decoder member too
        from deltakit.families import arith
        from deltakit.families.lm import lm_task

        return _digest(base, spec.name, repr(lm_task(spec.task)), f"arith-v{arith.VERSION}", repr(spec.recipe))
    return _digest(base, spec.name, spec.task, repr(spec.recipe))


def is_built(family: Family, folder: Path, name: str) -> bool:
    """Whether ``folder/name`` (a member, or :data:`DATA_FOLDER`) is complete and matches the registry.

    Args:
        family: The registry entry.
        folder: The family's folder (:func:`family_path`).
        name: A member name or :data:`DATA_FOLDER`.
    """
    try:
        marker = json.loads((folder / name / MARKER).read_text())
        return marker["fingerprint"] == folder_fingerprint(family, name)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def missing(family: Family, folder: Path, names: Sequence[str]) -> list[str]:
    """The folders of ``names`` (data first, then members in build order) that are absent, incomplete or stale."""
    return [name for name in names if not is_built(family, folder, name)]


@contextlib.contextmanager
def staged(final: Path, fingerprint: str) -> Iterator[Path]:
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
        marker = {"fingerprint": fingerprint, "seconds": round(time.perf_counter() - start, 3)}
        (staging / MARKER).write_text(json.dumps(marker) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def list_families(home: Path | None = None) -> pd.DataFrame:
    """One row per (family, member) with its build status and, when built, the metrics on its card.

    Args:
        home: deltakit home (default :func:`deltakit_home`).

    Returns:
        Columns ``family, member, model_id, role, built, path, base_model, task, validation_accuracy,
        validation_exact_match, validation_macro_f1, validation_majority_baseline, validation_examples, build_seconds``; metric columns
        are missing values for the base and for members not built.
    """
    rows = []
    for family in FAMILIES.values():
        for member in family.members:
            folder = family_path(family.name, home=home)
            path = folder / member
            built = is_built(family, folder, member)
            card = read_model_card(path) if built else {}
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
                    "validation_exact_match": metrics.get("validation_exact_match"),  # decoder generation tasks
                    "validation_macro_f1": metrics.get("validation_macro_f1"),
                    "validation_majority_baseline": metrics.get("validation_majority_baseline"),
                    "validation_examples": metrics.get("validation_examples"),
                    "build_seconds": card.get("build_seconds"),
                }
            )
    return pd.DataFrame(rows)
