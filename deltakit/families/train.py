"""The one training loop behind every embedded family, plus the metrics written into the cards.

Fine-tuning follows the standard BERT recipe (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding"): full fine-tuning with AdamW (Loshchilov & Hutter, 2019), decoupled
weight decay on every weight except biases and norms, a short linear warm-up then linear decay to zero,
gradient-norm clipping. The learning rate is what separates the regimes that deltakit studies: a small rate gives
the small deltas of ordinary supervised fine-tuning, a rate ~20x larger gives the large deltas where DARE breaks
(Yu et al., 2024, "Language Models are Super Mario"; Deng et al., 2025, "DAREx").

The tiny family's base is "pre-trained" by the same loop with a masked-language-model objective
(:func:`pretrain_mlm`), so both objectives share one optimiser, schedule and seeding path.

Determinism: every run happens inside :func:`seeded`, which forks torch's global RNG (callers' RNG state is left
untouched), seeds it (dropout, classifier-head initialisation), and draws the data order and MLM masks from
explicit ``torch.Generator`` objects. On one machine with a fixed thread count the same recipe gives bit-identical
weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deltakit.families.data import majority_accuracy
from deltakit.names import module_kind

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_OPTIMIZERS = ("adamw", "adamr")
_SCHEDULES = ("linear",)


@dataclass(frozen=True)
class Recipe:
    """A training recipe: everything that defines a run except the model and the data.

    Attributes:
        learning_rate: Peak learning rate, > 0 and <= 1.
        steps: Number of optimiser steps, >= 1.
        batch_size: Examples per step, >= 1.
        max_length: Tokens per example after truncation (including [CLS]/[SEP]), >= 8.
        warmup_fraction: Fraction of ``steps`` with linearly rising learning rate, in [0, 1).
        weight_decay: AdamW decoupled weight decay (not applied to biases and norms), in [0, 1); with
            ``optimizer="adamr"`` the delta-regularisation strength λ of AdamR-L2 (pulls θ toward the pre-trained
            θ_pre, every parameter but the new classifier head), in [0, 100].
        max_grad_norm: Gradient-norm clipping threshold, > 0.
        seed: Seeds dropout, head initialisation, data order and MLM masks, >= 0.
        group_by_length: Batch examples of similar token length together (as ``transformers.Trainer``'s
            ``group_by_length``): the data are still drawn in a seeded random order, but inside each window of
            ``50 * batch_size`` examples they are sorted by length, cut into batches, and the batches shuffled.
            Padding, and so compute, roughly halves on tweets; the examples seen are the same.
        optimizer: ``"adamw"``, or ``"adamr"`` (DAREx-L2: :class:`deltakit.adamr.AdamR`, Deng et al. 2025).
        schedule: Only ``"linear"`` (warm-up then linear decay to zero).
    """

    learning_rate: float
    steps: int
    batch_size: int = 32
    max_length: int = 64
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    group_by_length: bool = True
    optimizer: str = "adamw"
    schedule: str = "linear"

    def __post_init__(self) -> None:
        checks = [
            ("learning_rate", self.learning_rate, 0.0 < self.learning_rate <= 1.0, "(0, 1]"),
            ("steps", self.steps, self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("max_length", self.max_length, self.max_length >= 8, ">= 8"),
            ("warmup_fraction", self.warmup_fraction, 0.0 <= self.warmup_fraction < 1.0, "[0, 1)"),
            ("weight_decay", self.weight_decay,
             0.0 <= self.weight_decay <= 100.0 if self.optimizer == "adamr" else 0.0 <= self.weight_decay < 1.0,
             "[0, 100] for adamr, [0, 1) for adamw"),
            ("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0.0, "> 0"),
            ("seed", self.seed, self.seed >= 0, ">= 0"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"Recipe.{name} must be {allowed}, got {value!r}.")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"Recipe.optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"Recipe.schedule must be one of {_SCHEDULES}, got {self.schedule!r}.")

    @property
    def warmup_steps(self) -> int:
        """Number of warm-up steps: ``round(warmup_fraction * steps)``."""
        return round(self.warmup_fraction * self.steps)

    def to_card(self) -> dict[str, Any]:
        """The recipe as plain data for a model card (adds the derived warm-up steps and decay exclusions)."""
        return {
            **asdict(self),
            "warmup_steps": self.warmup_steps,
            "no_weight_decay": ["bias", "norm"],
            "fine_tuning": "full",
        }


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global CPU RNG seeded, restoring the caller's RNG state afterwards.

    Args:
        seed: Seed for ``torch.manual_seed`` inside the block.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(threads)``, restoring the previous count afterwards.

    Args:
        threads: Intra-op threads; None leaves torch's setting alone.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}.")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def example_order(n_examples: int, recipe: Recipe, lengths: Sequence[int] | None = None) -> np.ndarray:
    """Indices of the training examples in the order they are used, ``steps * batch_size`` of them.

    Each epoch is a fresh permutation from a generator seeded with ``recipe.seed``, so the order depends on
    nothing but the recipe, the dataset size and (with ``group_by_length``) the example lengths.

    Args:
        n_examples: Number of examples in the training set, >= 1.
        recipe: Supplies seed, steps, batch size and ``group_by_length``.
        lengths: Token length of every example; needed for ``group_by_length`` (ignored when None).

    Returns:
        An int64 array of length ``recipe.steps * recipe.batch_size``; consecutive ``batch_size`` slices are
        the batches.

    Raises:
        ValueError: If ``n_examples`` < 1 or ``lengths`` does not have ``n_examples`` entries.
    """
    if n_examples < 1:
        raise ValueError(f"Cannot train on an empty dataset (n_examples={n_examples}).")
    if lengths is not None and len(lengths) != n_examples:
        raise ValueError(f"lengths has {len(lengths)} entries for {n_examples} examples; give one per example.")
    needed = recipe.steps * recipe.batch_size
    generator = torch.Generator().manual_seed(recipe.seed)
    epochs = [torch.randperm(n_examples, generator=generator) for _ in range(math.ceil(needed / n_examples))]
    order = torch.cat(epochs)[:needed].numpy()
    if not recipe.group_by_length or lengths is None:
        return order
    lengths = np.asarray(lengths)
    window = 50 * recipe.batch_size
    # Longest first inside each window; a stable sort keeps ties in their random order.
    grouped = np.concatenate(
        [chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order, range(window, needed, window))]
    )
    batches = grouped.reshape(recipe.steps, recipe.batch_size)
    return batches[torch.randperm(recipe.steps, generator=generator).numpy()].reshape(-1)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length`` (special tokens included), in one tokenizer call."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def _pad(tokenizer: PreTrainedTokenizerBase, sequences: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to the longest one: the tensors ``tokenizer(..., padding="longest")`` returns.

    Tokenising once and padding per batch gives the same tensors as tokenising every batch, without paying the
    tokenizer's per-call overhead at every step.
    """
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (batch, seq)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in tokenizer.model_input_names:
        batch["token_type_ids"] = torch.zeros_like(input_ids)  # single-segment inputs
    return batch


def _run(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    recipe: Recipe,
    *,
    progress: bool,
    desc: str,
    history: list[float] | None,
) -> None:
    """The optimisation loop: ``recipe.steps`` AdamW (or AdamR) steps on the loss the model returns for each batch."""
    from transformers import get_linear_schedule_with_warmup

    if recipe.optimizer == "adamr":
        from deltakit.adamr import AdamR, adamr_param_groups

        # The model starts at the pre-trained weights (plus a fresh head, which gets no pull): those are the θ_pre
        # AdamR pulls toward.
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = AdamR(*adamr_param_groups(model, start), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    else:
        decay, no_decay = [], []
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                (no_decay if name.endswith("bias") or module_kind(name) == "norm" else decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.learning_rate,
        )
    scheduler = get_linear_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
    model.train()
    bar = tqdm(total=recipe.steps, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"Training diverged at step {bar.n + 1}: loss is {value}. Lower the learning rate "
                    f"(now {recipe.learning_rate}) or raise warmup_fraction (now {recipe.warmup_fraction})."
                )
            if history is not None:
                history.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    finally:
        bar.close()
    model.eval()


def fine_tune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_ds: datasets.Dataset,
    recipe: Recipe,
    progress: bool = True,
    *,
    desc: str = "fine-tune",
    history: list[float] | None = None,
) -> PreTrainedModel:
    """Fully fine-tune a sequence classifier in place.

    Texts are tokenised once (truncated to ``recipe.max_length``) and each batch is padded to its longest
    example, which is exact (padding is masked) and much cheaper than padding every batch to the maximum; with
    ``recipe.group_by_length`` batches also hold examples of similar length (see :func:`example_order`).

    Args:
        model: A ``*ForSequenceClassification`` model whose forward returns ``.loss`` given ``labels``.
        tokenizer: The model's tokenizer.
        train_ds: A dataset with columns ``text`` (str) and ``label`` (int).
        recipe: The training recipe.
        progress: Show a tqdm progress bar.
        desc: Label of the progress bar.
        history: If given, the loss of every step is appended to it.

    Returns:
        The same model object, trained, in eval mode. Run it inside :func:`seeded` for reproducibility.
    """
    encoded = _encode(tokenizer, train_ds["text"], recipe.max_length)
    labels = torch.as_tensor(np.asarray(train_ds["label"], dtype=np.int64))
    order = example_order(len(encoded), recipe, [len(ids) for ids in encoded])

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for rows in order.reshape(recipe.steps, recipe.batch_size):
            batch = _pad(tokenizer, [encoded[i] for i in rows])
            batch["labels"] = labels[rows]  # (batch,)
            yield batch

    _run(model, batches(), recipe, progress=progress, desc=desc, history=history)
    return model


def fine_tune_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    recipe: Recipe,
    progress: bool = True,
    *,
    desc: str = "fine-tune (LM)",
    history: list[float] | None = None,
) -> PreTrainedModel:
    """Fully fine-tune a causal LM in place on prompt -> target pairs (supervised fine-tuning).

    Prompt and target are tokenised together (as the LM evaluators score them, see
    :mod:`deltakit.lm_eval`) and the end-of-sequence token is appended; the loss is the next-token loss of the
    target tokens and the end-of-sequence token only (prompt and padding positions are ignored). An empty prompt
    makes this plain language-model training on the targets (how a tiny decoder base is "pre-trained").

    Args:
        model: A ``*ForCausalLM`` model whose forward returns ``.loss`` given ``labels``.
        tokenizer: Its tokenizer (needs an end-of-sequence token; padding uses it when there is no pad token).
        prompts / targets: The pairs, one target per prompt (a target usually starts with a space).
        recipe: The training recipe; ``max_length`` truncates prompt + target from the left, keeping the target.
        progress: Show a tqdm progress bar. desc: its label. history: the loss of every step is appended to it.

    Returns:
        The same model object, trained, in eval mode. Run it inside :func:`seeded` for reproducibility.

    Raises:
        ValueError: prompts and targets differ in number, or the tokenizer has no end-of-sequence token.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets: give one target per prompt.")
    if tokenizer.eos_token_id is None:
        raise ValueError("fine_tune_lm needs a tokenizer with an end-of-sequence token; this one has none.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = tokenizer([p + t for p, t in zip(prompts, targets)], add_special_tokens=False)["input_ids"]
    context = tokenizer([p for p in prompts], add_special_tokens=False)["input_ids"] if any(prompts) else \
        [[] for _ in prompts]
    encoded, starts = [], []
    for ids, ctx in zip(full, context):
        ids = ids + [tokenizer.eos_token_id]
        start = len(ctx) if ids[: len(ctx)] == ctx else len(ctx) - 1  # a merge across the boundary: one earlier
        cut = max(0, len(ids) - recipe.max_length)  # drop prompt tokens from the left, never target tokens
        encoded.append(ids[cut:])
        starts.append(max(start - cut, 1))
    order = example_order(len(encoded), recipe, [len(ids) for ids in encoded])

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for rows in order.reshape(recipe.steps, recipe.batch_size):
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (batch, seq), right-padded
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, seq)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (batch, seq): target tokens only
            for row, i in enumerate(rows):
                ids = torch.as_tensor(encoded[i])
                input_ids[row, : len(ids)] = ids
                attention_mask[row, : len(ids)] = 1
                labels[row, starts[i] : len(ids)] = ids[starts[i] :]
            yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    _run(model, batches(), recipe, progress=progress, desc=desc, history=history)
    return model


def pretrain_mlm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    recipe: Recipe,
    progress: bool = True,
    *,
    mask_fraction: float = 0.15,
    desc: str = "pre-train (MLM)",
    history: list[float] | None = None,
) -> PreTrainedModel:
    """Pre-train a masked language model in place (BERT's MLM objective, simplified).

    A ``mask_fraction`` of the real (non-special, non-padding) tokens of each batch is replaced by [MASK] and
    predicted; BERT's 80/10/10 replacement split is left out because this only warms up a tiny random model.

    Args:
        model: A ``*ForMaskedLM`` model whose forward returns ``.loss`` given ``labels``.
        tokenizer: Its tokenizer (must have a mask token).
        texts: Training texts.
        recipe: The training recipe (its seed also seeds the masks).
        progress: Show a tqdm progress bar.
        mask_fraction: Fraction of real tokens to mask, in (0, 1).
        desc: Label of the progress bar.
        history: If given, the loss of every step is appended to it.

    Returns:
        The same model object, trained, in eval mode.

    Raises:
        ValueError: If ``mask_fraction`` is outside (0, 1) or the tokenizer has no mask token.
    """
    if not 0.0 < mask_fraction < 1.0:
        raise ValueError(f"mask_fraction must be in (0, 1), got {mask_fraction}.")
    if tokenizer.mask_token_id is None:
        raise ValueError("pretrain_mlm needs a tokenizer with a mask token; this one has none.")
    encoded = _encode(tokenizer, texts, recipe.max_length)
    order = example_order(len(encoded), recipe, [len(ids) for ids in encoded])
    # Masks come from their own generator so they do not depend on how much dropout consumed of the global RNG.
    mask_generator = torch.Generator().manual_seed(recipe.seed + 1)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for rows in order.reshape(recipe.steps, recipe.batch_size):
            batch = _pad(tokenizer, [encoded[i] for i in rows])
            input_ids = batch["input_ids"]  # (batch, seq)
            candidates = ~torch.isin(input_ids, special)  # (batch, seq) real tokens only
            chosen = (torch.rand(input_ids.shape, generator=mask_generator) < mask_fraction) & candidates
            if not chosen.any():  # an all-ignored batch would give a NaN loss
                chosen = candidates & (candidates.cumsum(dim=1) == 1)
            batch["labels"] = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
            batch["input_ids"] = torch.where(chosen, torch.full_like(input_ids, tokenizer.mask_token_id), input_ids)
            yield batch

    _run(model, batches(), recipe, progress=progress, desc=desc, history=history)
    return model


def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 128,
) -> np.ndarray:
    """Predicted class index of each text.

    Texts are processed in order of length so each batch pads little; predictions come back in input order.

    Args:
        model: A sequence classifier.
        tokenizer: Its tokenizer.
        texts: The texts to classify.
        max_length: Truncation length in tokens.
        batch_size: Texts per forward pass.

    Returns:
        An int64 array with one class index per text.
    """
    model.eval()
    encoded = _encode(tokenizer, texts, max_length)
    by_length = np.argsort([len(ids) for ids in encoded], kind="stable")
    predictions = np.empty(len(encoded), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            rows = by_length[start : start + batch_size]
            logits = model(**_pad(tokenizer, [encoded[i] for i in rows])).logits  # (batch, num_labels)
            predictions[rows] = logits.argmax(dim=-1).numpy()
    return predictions


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    *,
    max_length: int = 64,
    batch_size: int = 128,
) -> dict[str, float | int]:
    """The metrics a family card reports for one evaluation split.

    Args:
        model: A sequence classifier.
        tokenizer: Its tokenizer.
        dataset: Columns ``text`` and ``label`` (int).
        max_length: Truncation length in tokens.
        batch_size: Texts per forward pass.

    Returns:
        ``accuracy``, ``macro_f1``, ``majority_baseline`` (accuracy of always predicting the split's most
        frequent label) and ``examples``.

    Raises:
        ValueError: If the dataset is empty.
    """
    from sklearn.metrics import accuracy_score, f1_score

    labels = np.asarray(dataset["label"], dtype=np.int64)
    if labels.size == 0:
        raise ValueError("evaluate_accuracy needs a non-empty dataset.")
    predictions = predict(model, tokenizer, list(dataset["text"]), max_length=max_length, batch_size=batch_size)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
        "majority_baseline": majority_accuracy(labels),
        "examples": int(labels.size),
    }


__all__ = [
    "Recipe",
    "evaluate_accuracy",
    "example_order",
    "fine_tune",
    "fine_tune_lm",
    "predict",
    "pretrain_mlm",
    "seeded",
    "torch_threads",
]
