"""Evaluation: a model -> ``dict[str, float]`` of metrics on a ``datasets`` split. No plotting here.

An *evaluator* is any callable ``model -> dict[str, float]``; sweeps call it once per point. deltakit provides:

* :class:`ClassificationEvaluator` -- sequence classification (and regression, e.g. STS-B): the split is
  tokenized once at construction, batches are padded dynamically, metrics come from scikit-learn / scipy:
  accuracy, macro-F1, MCC (classification), Pearson / Spearman (regression), and for GLUE tasks GLUE's own
  primary score (CoLA: MCC; MRPC/QQP: mean of accuracy and F1; STS-B: mean of Pearson and Spearman; others:
  accuracy), as in MergeLM's ``utils/metrics.py``. ``evaluate.load`` is never used: it fetches code from the Hub.
* :class:`PerplexityEvaluator` -- causal LMs: exp(mean next-token negative log-likelihood).

:func:`load_split` reads a split from an embedded family (``family:minilm-tweets/sentiment3``), a GLUE task
(``glue/sst2``: the official validation split is the usual test set, as in the DARE/DAREx papers), any Hub
dataset id, or a local parquet/csv/json file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from deltakit.sources import FAMILY_PREFIX, ModelRef

if TYPE_CHECKING:
    import datasets

__all__ = ["GLUE_TASKS", "Evaluator", "ClassificationEvaluator", "PerplexityEvaluator", "classification_metrics",
           "load_split"]

Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclass(frozen=True)
class GlueTask:
    """Columns and scoring of one GLUE task (test split = the official validation split)."""

    text: str
    text_pair: str | None
    score: str  # the GLUE primary score name
    split: str = "validation"
    regression: bool = False


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, "mcc"),
    "sst2": GlueTask("sentence", None, "accuracy"),
    "mrpc": GlueTask("sentence1", "sentence2", "accuracy_f1"),
    "stsb": GlueTask("sentence1", "sentence2", "pearson_spearman", regression=True),
    "qqp": GlueTask("question1", "question2", "accuracy_f1"),
    "mnli": GlueTask("premise", "hypothesis", "accuracy", split="validation_matched"),
    "qnli": GlueTask("question", "sentence", "accuracy"),
    "rte": GlueTask("sentence1", "sentence2", "accuracy"),
    "wnli": GlueTask("sentence1", "sentence2", "accuracy"),
}


def classification_metrics(labels: np.ndarray, outputs: np.ndarray, *, regression: bool = False,
                           glue_score: str | None = None) -> dict[str, float]:
    """Metrics from labels and model outputs.

    Args:
        labels: true labels (ints) or targets (floats, regression).
        outputs: predicted labels (ints) or predicted values (regression).
        regression: compute Pearson / Spearman instead of classification metrics.
        glue_score: add ``score`` with GLUE's primary score (``mcc``, ``accuracy``, ``accuracy_f1``,
            ``pearson_spearman``).

    Returns:
        ``accuracy``, ``macro_f1``, ``mcc`` (and ``f1`` for binary tasks), or ``pearson``, ``spearman``; plus
        ``score`` when ``glue_score`` is given.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if regression:
        out = {"pearson": float(pearsonr(outputs, labels)[0]), "spearman": float(spearmanr(outputs, labels)[0])}
    else:
        out = {"accuracy": float(accuracy_score(labels, outputs)),
               "macro_f1": float(f1_score(labels, outputs, average="macro")),
               "mcc": float(matthews_corrcoef(labels, outputs))}
        if len(np.unique(labels)) <= 2:
            out["f1"] = float(f1_score(labels, outputs, zero_division=0.0))
    if glue_score == "accuracy_f1":
        out["score"] = (out["accuracy"] + out["f1"]) / 2
    elif glue_score == "pearson_spearman":
        out["score"] = (out["pearson"] + out["spearman"]) / 2
    elif glue_score is not None:
        out["score"] = out[glue_score]
    return out


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


class ClassificationEvaluator:
    """Evaluate a sequence-classification model on a labelled split.

    The split is tokenized once here (sweeps evaluate the same split many times); batches are padded to their
    own longest sequence, with examples sorted by length so padding stays small.

    Args:
        dataset: a ``datasets.Dataset`` (or anything with ``column_names`` and ``__getitem__(column)``).
        tokenizer: the model's tokenizer.
        text_column / text_pair_column / label_column: column names.
        batch_size: examples per forward pass.
        max_length: truncation length in tokens.
        regression: a one-output regression head (STS-B).
        glue_score: GLUE's primary score to add as ``score`` (see :data:`GLUE_TASKS`).
        device: where to run; defaults to the model's device.
        progress: show a progress bar per evaluation.

    Raises:
        ValueError: missing columns (the message lists the available ones) or an empty split.
    """

    def __init__(self, dataset, tokenizer, *, text_column: str = "text", text_pair_column: str | None = None,
                 label_column: str = "label", batch_size: int = 64, max_length: int = 128,
                 regression: bool = False, glue_score: str | None = None, progress: bool = False) -> None:
        needed = [c for c in (text_column, text_pair_column, label_column) if c]
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise ValueError(f"dataset has no column(s) {missing}; available: {list(dataset.column_names)}. "
                             "Pass text_column= / label_column= to name the right ones.")
        if len(dataset) == 0:
            raise ValueError("the evaluation split is empty.")
        texts = list(dataset[text_column])
        pairs = list(dataset[text_pair_column]) if text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        features = [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]
        order = sorted(range(len(texts)), key=lambda i: len(features[i]["input_ids"]))
        # Padded once here: an evaluation is then forward passes only.
        self._batches = [(np.asarray([order[i] for i in idx]),
                          dict(tokenizer.pad([features[order[i]] for i in idx], return_tensors="pt")))
                         for idx in _batches(len(order), batch_size)]
        self.labels = np.asarray(dataset[label_column])
        self.batch_size = batch_size
        self.regression = regression
        self.glue_score = glue_score
        self.progress = progress
        self.n = len(texts)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model whose head cannot produce the split's labels.

        Raises:
            ValueError: labels outside ``range(num_labels)``, or a regression split with a classification head.
        """
        num_labels = int(getattr(model.config, "num_labels", 0))
        if self.regression:
            if num_labels != 1:
                raise ValueError(f"regression split but the model head has num_labels={num_labels} (expected 1).")
            return
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= num_labels:
            raise ValueError(
                f"the split's labels span {lo}..{hi} but the model head has num_labels={num_labels}: this model was "
                "not fine-tuned on this task (pick the matching split or model; test splits with label -1 are unlabelled)."
            )

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.check_model(model)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        outputs = np.empty(self.n, dtype=np.float64 if self.regression else np.int64)
        for rows, batch in tqdm(self._batches, desc="evaluate", leave=False, disable=not self.progress):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            pred = logits[:, 0] if self.regression else logits.argmax(-1)
            outputs[rows] = pred.cpu().numpy()
        model.train(was_training)
        return classification_metrics(self.labels, outputs, regression=self.regression, glue_score=self.glue_score)


class PerplexityEvaluator:
    """Perplexity of a causal LM on a list of texts: exp(mean next-token NLL over all predicted tokens).

    Texts are tokenized once here (with the tokenizer's own special tokens) and right-padded per batch by the
    evaluator itself, so the caller's tokenizer is never modified and positions are those of unpadded text.

    Args:
        texts: the evaluation texts.
        tokenizer: the model's tokenizer.
        max_length: truncation length; batch_size: texts per forward pass.

    Raises:
        ValueError: no texts, or none with at least two tokens (nothing to predict).
    """

    def __init__(self, texts: Sequence[str], tokenizer, *, max_length: int = 256, batch_size: int = 8) -> None:
        if not texts:
            raise ValueError("no texts to compute perplexity on.")
        self._ids = [ids for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
                     if len(ids) >= 2]
        if not self._ids:
            raise ValueError("every text is shorter than two tokens: there is no next token to predict.")
        self.batch_size = batch_size
        self.fingerprint = f"perplexity:{max_length}:{len(self._ids)}:{hash_ids(self._ids)}"

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        nll, count = 0.0, 0
        for idx in _batches(len(self._ids), self.batch_size):
            rows = [self._ids[i] for i in idx]
            width = max(map(len, rows))
            input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, seq), right-padded with 0
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, seq)
            for r, ids in enumerate(rows):
                input_ids[r, : len(ids)] = torch.as_tensor(ids)
                mask[r, : len(ids)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()[:, :-1]  # (batch, seq-1, vocab)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
            predicted = mask[:, 1:].bool()
            nll += float(loss[predicted].sum())
            count += int(predicted.sum())
        return {"perplexity": math.exp(nll / count), "nll": nll / count}


def hash_ids(rows: Sequence[Sequence[int]]) -> str:
    """A short stable digest of token id lists (for evaluator fingerprints)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    for ids in rows:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()


def load_split(source: str, split: str = "validation", *, limit: int | None = None,
               seed: int = 0) -> datasets.Dataset:
    """Load one split of an evaluation dataset.

    Args:
        source: ``family:FAMILY/MEMBER`` (the family's data for the member's own task, see
            :meth:`deltakit.families.Family.task_of`), ``glue/TASK``, a Hub dataset id (``org/name``, optionally
            ``org/name:config``), or a local ``.parquet`` / ``.csv`` / ``.json`` file.
        split: split name (GLUE: defaults to the task's test split, the official validation split).
        limit: keep a deterministic random subset of this many rows (seeded), for fast sweeps.
        seed: the subset's seed.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        ValueError: unknown GLUE task or unreadable source; a malformed family reference (a SourceError).
        KeyError: unknown family, member or split of an embedded family (the message lists the available ones).
    """
    import datasets

    if source.startswith(FAMILY_PREFIX):
        from deltakit.families import family_split, get_family

        ref = ModelRef.parse(source)
        ds = family_split(ref.family, split, task=get_family(ref.family).task_of(ref.member))
    elif source.startswith("glue/"):
        task = source[len("glue/"):]
        if task not in GLUE_TASKS:
            raise ValueError(f"unknown GLUE task {task!r}; available: {sorted(GLUE_TASKS)}.")
        ds = datasets.load_dataset("nyu-mll/glue", task, split=GLUE_TASKS[task].split if split == "validation"
                                   else split)
    elif Path(source).suffix in (".parquet", ".csv", ".json", ".jsonl"):
        kind = {".jsonl": "json"}.get(Path(source).suffix, Path(source).suffix[1:])
        ds = datasets.load_dataset(kind, data_files={split: source}, split=split)
    else:
        name, _, config = source.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split)
    if limit is not None and limit < len(ds):
        ds = ds.shuffle(seed=seed).select(range(limit))
    return ds
