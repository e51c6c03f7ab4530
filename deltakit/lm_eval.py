"""Evaluators for decoder LLMs: multiple choice by log-likelihood, generation by exact match, perplexity.

Each evaluator is a callable ``model -> dict[str, float]`` (see :mod:`deltakit.evaluate`), built once per split
(the split is tokenized at construction, because sweeps evaluate the same split many times) and carrying a
``fingerprint`` string that identifies the data and every setting, for the keys of sweep points.

The metrics mean what lm-evaluation-harness (Gao et al., "A framework for few-shot language model evaluation",
2023) means by them, so a deltakit curve can be compared with a number a user already knows:

* :class:`MultipleChoiceEvaluator` -- the score of a choice is the sum of the log-probabilities of the
  continuation's tokens given the context. The continuation is ``target_delimiter + choice``; context and
  continuation are tokenized *together* and split after the context's own token count, and trailing whitespace of
  the context moves to the continuation first. ``accuracy`` is lm-eval's ``acc`` (argmax of the summed
  log-likelihood), ``accuracy_norm`` is its ``acc_norm`` (argmax of the log-likelihood divided by the number of
  *characters* of the choice, without the delimiter). Ties go to the first choice.
* :class:`GenerationEvaluator` -- greedy decoding on left-padded batches with an attention mask, cut at the first
  ``until`` stop string, an answer extracted by a regex or a callable, normalised, compared exactly:
  ``exact_match``, and ``extracted`` (the share of generations in which the extractor found an answer).
  :func:`gsm8k_task` is the GSM8K preset (Cobbe et al., "Training Verifiers to Solve Math Word Problems", 2021).
* perplexity -- :class:`deltakit.evaluate.PerplexityEvaluator`, built through :class:`LMTask`.

:class:`LMTask` is a small, storable task description; :func:`infer_lm_task` picks one from a split's columns.

No BOS token is added unless the tokenizer itself adds one (SmolLM2's does not); the chat template is applied only
when asked, and then the delimiter before the choices is dropped. Both settings change scores a lot, so both are
part of every fingerprint.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import datasets

__all__ = [
    "DEFAULT_EXTRACT",
    "EXTRACTORS",
    "GenerationEvaluator",
    "LMTask",
    "MultipleChoiceEvaluator",
    "choice_metrics",
    "cut_at_stop",
    "encode_pair",
    "extract_answer",
    "gsm8k_extract",
    "gsm8k_gold",
    "gsm8k_task",
    "infer_lm_task",
    "normalise_answer",
    "register_extractor",
]

#: The default answer extractor of :class:`GenerationEvaluator`: the whole generation (after the stop-string cut),
#: stripped. An empty generation counts as "not extracted".
DEFAULT_EXTRACT = r"^\s*(.*?)\s*$"

_DEFAULT_MAX_LENGTH = 2048


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers: columns, templates, tokenization, fingerprints
# ---------------------------------------------------------------------------------------------------------------

def _columns(dataset) -> list[str]:
    return list(dataset.column_names)


def _require_columns(dataset, needed: Sequence[str], hint: str) -> None:
    missing = [c for c in dict.fromkeys(needed) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing}; available: {_columns(dataset)}. {hint}")


def _require_rows(dataset) -> int:
    n = len(dataset)
    if n == 0:
        raise ValueError("the evaluation split is empty (0 rows); pass a split with at least one example.")
    return n


def _template_fields(template: str) -> list[str]:
    """Column names a ``str.format`` template reads (``{text}``, ``{row[0]}`` and ``{a.b}`` read ``text``, ``row``,
    ``a``)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if root == "" or root.isdigit():
            raise ValueError(f"template {template!r} has a positional field {{{name}}}; name the column instead, "
                             "e.g. 'Tweet: {text}\\nSentiment:'.")
        names.append(root)
    return list(dict.fromkeys(names))


def _texts(dataset, n: int, *, column: str | None, template: str | None, what: str) -> list[str]:
    """One input text per row: ``template.format(**row)`` or the column's values."""
    if template is not None:
        fields = _template_fields(template)
        _require_columns(dataset, fields, f"The template {template!r} reads them; fix the template or the split.")
        cols = {f: list(dataset[f]) for f in fields}
        return [template.format(**{f: cols[f][i] for f in fields}) for i in range(n)]
    if column is None:
        raise ValueError(f"no {what} column and no template; pass {what}_column= or template=.")
    _require_columns(dataset, [column], f"Pass {what}_column= naming the {what} column, or template= to build it "
                                        "from other columns.")
    values = list(dataset[column])
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise ValueError(f"column {column!r} must hold strings; row {bad[0]} holds {values[bad[0]]!r}.")
    return values


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with no special tokens (a BOS, when wanted, is prepended separately)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _bos_prefix(tokenizer, add_bos: bool | None) -> list[int]:
    """The token ids the tokenizer itself puts before a text (``[]`` for SmolLM2, ``[bos]`` for Llama-2).

    Args:
        add_bos: ``None`` follows the tokenizer; ``True`` forces ``[bos_token_id]``; ``False`` adds nothing.
    """
    if add_bos is False:
        return []
    if add_bos is True:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token; pass add_bos=None or False.")
        return [int(tokenizer.bos_token_id)]
    probe = "hello world"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


def _pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its EOS token (padded positions are masked, so any id works;
    the caller's tokenizer is never modified)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise ValueError("the tokenizer has neither a pad_token nor an eos_token, so batches cannot be padded; set one, "
                     "e.g. tokenizer.pad_token = tokenizer.eos_token or tokenizer.add_special_tokens("
                     "{'pad_token': '<pad>'}).")


def _apply_chat_template(tokenizer, text: str) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template; pass chat_template=False or "
                         "use the instruct model's tokenizer.")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def _fingerprint(kind: str, readable: Mapping[str, Any], payload: Any) -> str:
    """``kind(k=v,...)#sha`` -- the readable settings, and a digest of the settings and the tokenized data."""
    digest = hashlib.sha256(json.dumps([dict(readable), payload], sort_keys=True, default=repr).encode()).hexdigest()
    return f"{kind}({','.join(f'{k}={v}' for k, v in readable.items())})#{digest[:16]}"


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


#: A batch stops growing when padding would exceed this fraction of its real tokens (the lengths of a split are
#: often spread widely: fixed-size batches of 100 tweets were 30% padding, these 10%).
_MAX_PADDING = 0.1


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches: longest first (memory errors show at once), at most
    ``batch_size`` per batch, and at most :data:`_MAX_PADDING` padding."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current and (len(current) >= batch_size
                        or lengths[current[0]] * (len(current) + 1) > (real + lengths[i]) * (1 + _MAX_PADDING)):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str, *,
                prefix: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """Split the joint tokenization of ``context + continuation`` into context and continuation tokens.

    Trailing whitespace of the context moves to the start of the continuation first; then the whole string is
    tokenized, and the continuation tokens are those after the context's own token count (lm-evaluation-harness's
    rule). The first continuation token is then e.g. ``"Ġpositive"``, not ``"positive"``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        context: the prompt.
        continuation: the scored text (usually ``delimiter + choice``).
        prefix: token ids put before the context (a BOS token when the tokenizer adds one).

    Returns:
        ``(context_ids, continuation_ids)``; the model reads ``context_ids + continuation_ids``.
    """
    (ctx,), (conts,) = _encode_examples(tokenizer, [context], [[continuation]], prefix)
    return ctx, conts[0]


def _encode_examples(tokenizer, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
                     prefix: Sequence[int]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """:func:`encode_pair` for many examples at once (two batched tokenizer calls)."""
    moved_ctx, moved_conts = [], []
    for ctx, conts in zip(contexts, continuations, strict=True):
        stripped = ctx.rstrip()
        tail = ctx[len(stripped):]
        moved_ctx.append(stripped)
        moved_conts.append([tail + c for c in conts])
    ctx_ids = _encode(tokenizer, moved_ctx)
    whole = iter(_encode(tokenizer, [c + cont for c, conts in zip(moved_ctx, moved_conts) for cont in conts]))
    # An empty context: the first continuation token is conditioned on a BOS/EOS token, as lm-eval does.
    empty_prefix = _empty_context_prefix(tokenizer) if not prefix and not all(moved_ctx) else []
    out_ctx, out_conts = [], []
    for ctx, conts in zip(ctx_ids, moved_conts):
        if not ctx and not prefix:
            out_ctx.append(list(empty_prefix))
        else:
            out_ctx.append(list(prefix) + ctx)
        out_conts.append([next(whole)[len(ctx):] for _ in conts])
    return out_ctx, out_conts


def _empty_context_prefix(tokenizer) -> list[int]:
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return [int(tok_id)]
    raise ValueError("an example has an empty context and the tokenizer has neither a bos_token nor an eos_token to "
                     "condition the first token on; give every example a context.")


def choice_metrics(loglikelihoods: Sequence[np.ndarray], choice_chars: Sequence[Sequence[int]],
                   labels: np.ndarray) -> dict[str, float]:
    """lm-eval's ``acc`` and ``acc_norm`` from per-choice log-likelihoods.

    Args:
        loglikelihoods: per example, the summed log-likelihood of each choice's continuation.
        choice_chars: per example, the number of characters of each choice, without the delimiter.
        labels: the index of the correct choice of each example.

    Returns:
        ``accuracy`` (argmax of the log-likelihood) and ``accuracy_norm`` (argmax of the log-likelihood divided by
        the number of characters); ties go to the first choice (``np.argmax``).
    """
    acc = [int(np.argmax(ll)) == int(y) for ll, y in zip(loglikelihoods, labels, strict=True)]
    norm = [int(np.argmax(np.asarray(ll) / np.asarray(c, dtype=np.float64))) == int(y)
            for ll, c, y in zip(loglikelihoods, choice_chars, labels, strict=True)]
    return {"accuracy": float(np.mean(acc)), "accuracy_norm": float(np.mean(norm))}


@dataclass(frozen=True)
class _Read:
    """Where a choice's log-likelihood is read: the logits at positions ``start, start + 1, ...`` of a request
    predict ``tokens``."""

    example: int
    choice: int
    start: int  # position of the logits that predict tokens[0]
    tokens: tuple[int, ...]


def _check_positions(model: torch.nn.Module, longest: int) -> None:
    """Refuse inputs longer than the model's position table (a clear message instead of garbage or an index error)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and longest > limit:
        raise ValueError(f"the longest input has {longest} tokens but the model has max_position_embeddings={limit}; "
                         f"build the evaluator with max_length={limit} (or less).")


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class MultipleChoiceEvaluator:
    """Multiple choice by log-likelihood (lm-eval ``acc`` / ``acc_norm``) on a split of a causal LM task.

    Each choice is scored by the summed log-probability of ``target_delimiter + choice`` after the context, with
    context and continuation tokenized together (see :func:`encode_pair`). The split is tokenized once here; an
    evaluation is then right-padded forward passes over requests grouped by length (longest first, little
    padding), reading only the logits needed.

    When the continuations of an example differ only in their last token -- above all when each is a single token
    (label words such as ``" positive"`` / ``" negative"`` / ``" neutral"``) -- every choice would feed the model
    the same input, so it is run once and all choices are read from it (``share_context``): the same numbers as one
    pass per choice, for a fraction of the cost.

    Args:
        dataset: a ``datasets.Dataset`` (or anything with ``column_names``, ``len`` and ``__getitem__(column)``).
        tokenizer: the model's tokenizer. It is never modified; without a pad token, EOS pads (padded positions
            are masked).
        context_column: the context (prompt) column, used when ``template`` is ``None``.
        choices_column: a column holding each example's list of choices, used when ``choices`` is ``None``.
        label_column: the correct choice: an index into the choices, or the choice's text.
        choices: fixed label words shared by every example (e.g. ``("negative", "neutral", "positive")`` with an
            integer label column: a classification split turned into prompt -> label word).
        template: ``str.format`` template over the row's columns building the context, e.g.
            ``"Tweet: {text}\\nSentiment:"``.
        target_delimiter: put before each choice (lm-eval's default is a space); dropped with ``chat_template``.
        chat_template: render the context as a user turn with the tokenizer's chat template and the generation
            prompt (lm-eval's ``--apply_chat_template``); the rendered template brings its own special tokens.
        add_bos: ``None`` (default) prepends what the tokenizer itself prepends (nothing for SmolLM2); ``True`` /
            ``False`` force a BOS token or none.
        batch_size: the most requests per forward pass (a batch also stops growing at 10% padding).
        max_length: the longest input in tokens; longer inputs lose tokens from the left of the context.
        share_context: use that shared pass where it applies (``False`` forces one request per choice).
        progress: show a progress bar per evaluation.

    Attributes:
        contexts: the context strings (after template / chat template).
        choices: each example's choices (without delimiter).
        labels: the correct choice indices.
        add_bos: whether a BOS (or other prefix token) was put before each context.
        shared: how many examples use the shared pass; n_requests: forward-pass rows per evaluation.
        fingerprint: a string identifying the tokenized data and every setting.

    Raises:
        ValueError: missing columns (the message lists the available ones), an empty split, an example without
            choices, a label outside its choices, an empty continuation, or a tokenizer that cannot pad.
    """

    def __init__(self, dataset, tokenizer, *, context_column: str = "context", choices_column: str = "choices",
                 label_column: str = "label", choices: Sequence[str] | None = None, template: str | None = None,
                 target_delimiter: str = " ", chat_template: bool = False, add_bos: bool | None = None,
                 batch_size: int = 32, max_length: int = _DEFAULT_MAX_LENGTH, share_context: bool = True,
                 progress: bool = False) -> None:
        n = _require_rows(dataset)
        if choices is None:
            _require_columns(dataset, [choices_column], "Pass choices_column= naming the list-of-choices column, or "
                                                        "choices=(...) with fixed label words.")
        _require_columns(dataset, [label_column], "Pass label_column= naming the correct-choice column.")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}.")
        contexts = _texts(dataset, n, column=context_column, template=template, what="context")
        if choices is not None:
            if isinstance(choices, str) or len(choices) == 0:
                raise ValueError(f"choices must be a non-empty sequence of strings, got {choices!r}; e.g. "
                                 "choices=('negative', 'neutral', 'positive').")
            per_example = [list(choices)] * n
        else:
            per_example = [c if isinstance(c, str) or not isinstance(c, Iterable) else list(c)
                           for c in dataset[choices_column]]
        self.choices: list[list[str]] = []
        for i, cs in enumerate(per_example):
            if not isinstance(cs, list) or not cs:
                raise ValueError(f"example {i} has no choices (got {cs!r}); every example needs a non-empty list "
                                 f"of choices in column {choices_column!r}, or pass choices=(...).")
            if not all(isinstance(c, str) and c for c in cs):
                raise ValueError(f"example {i} has an empty or non-string choice in {cs!r}; choices must be "
                                 "non-empty strings (acc_norm divides by their length).")
            self.choices.append(cs)
        self.labels = np.asarray([self._label_index(i, y, self.choices[i])
                                  for i, y in enumerate(dataset[label_column])], dtype=np.int64)

        if chat_template:
            contexts = [_apply_chat_template(tokenizer, c) for c in contexts]
        delimiter = "" if chat_template else target_delimiter
        prefix = [] if chat_template else _bos_prefix(tokenizer, add_bos)
        self.contexts: list[str] = contexts
        self.add_bos = bool(prefix)
        self.chat_template = chat_template
        self.target_delimiter = delimiter
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        self.n = n
        self._pad = _pad_id(tokenizer)

        ctx_ids, cont_ids = _encode_examples(tokenizer, contexts, [[delimiter + c for c in cs] for cs in self.choices],
                                             prefix)
        requests: list[tuple[list[int], list[_Read]]] = []
        self.shared = 0  # examples scored by one shared pass
        for i, (ctx, conts) in enumerate(zip(ctx_ids, cont_ids)):
            for j, cont in enumerate(conts):
                if not cont:
                    raise ValueError(f"example {i}, choice {self.choices[i][j]!r}: the continuation "
                                     f"{delimiter + self.choices[i][j]!r} has no tokens of its own.")
                if len(cont) > max_length:
                    raise ValueError(f"example {i}, choice {j}: the continuation has {len(cont)} tokens, more than "
                                     f"max_length={max_length}; raise max_length.")
            if share_context and len({tuple(c[:-1]) for c in conts}) == 1 and len({len(c) for c in conts}) == 1:
                # The continuations differ only in their last token (single-token label words; or e.g. "\n" + word
                # after a chat template): the general path's inputs, context + continuation minus its last token,
                # are then one and the same sequence -- run it once, read every choice from it.
                inp = (ctx + conts[0][:-1])[-max_length:]
                reads = [_Read(i, j, len(inp) - len(c), tuple(c)) for j, c in enumerate(conts)]
                requests.append((inp, reads))
                self.shared += 1
                continue
            for j, cont in enumerate(conts):
                whole = (ctx + cont)[-(max_length + 1):]
                inp = whole[:-1]  # the last token is predicted, never read
                requests.append((inp, [_Read(i, j, len(inp) - len(cont), tuple(cont))]))
        self.n_requests = len(requests)
        self._batches = [self._collate([requests[k] for k in idx])
                         for idx in _length_batches([len(inp) for inp, _ in requests], batch_size)]
        self.fingerprint = _fingerprint(
            "choice",
            {"n": n, "delimiter": json.dumps(delimiter), "chat_template": chat_template, "bos": self.add_bos,
             "max_length": max_length},
            {"contexts": ctx_ids, "continuations": cont_ids, "choices": self.choices,
             "labels": self.labels.tolist()})

    @staticmethod
    def _label_index(i: int, label: Any, choices: list[str]) -> int:
        if isinstance(label, str):
            if label not in choices:
                raise ValueError(f"example {i}: label {label!r} is not one of its choices {choices}; fix the label "
                                 "column or the choices.")
            return choices.index(label)
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"example {i}: label {label!r} is neither a choice index nor a choice's text.")
        if not 0 <= int(label) < len(choices):
            raise ValueError(f"example {i}: label {int(label)} is outside its choices (0..{len(choices) - 1}: "
                             f"{choices}); unlabelled test splits (label -1) cannot be scored -- pick a labelled "
                             "split or fix choices=.")
        return int(label)

    def _collate(self, requests: list[tuple[list[int], list[_Read]]]) -> dict[str, Any]:
        """Right-pad one batch and precompute where every choice's log-probs are read."""
        width = max(len(inp) for inp, _ in requests)
        ids = torch.full((len(requests), width), self._pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(requests), width), dtype=torch.long)  # (B, T)
        for r, (inp, _) in enumerate(requests):
            ids[r, :len(inp)] = torch.tensor(inp)
            mask[r, :len(inp)] = 1
        # Only the positions some read needs get logits (the vocabulary projection is a large share of the cost).
        positions = sorted({rd.start + t for _, reads in requests for rd in reads for t in range(len(rd.tokens))})
        column = {p: k for k, p in enumerate(positions)}
        rows, cols, toks, read_of = [], [], [], []
        reads_flat: list[_Read] = []
        for r, (_, reads) in enumerate(requests):
            for rd in reads:
                for t, tok in enumerate(rd.tokens):
                    rows.append(r)
                    cols.append(column[rd.start + t])
                    toks.append(tok)
                    read_of.append(len(reads_flat))
                reads_flat.append(rd)
        return {"input_ids": ids, "attention_mask": mask, "positions": torch.tensor(positions, dtype=torch.long),
                "rows": torch.tensor(rows), "cols": torch.tensor(cols), "tokens": torch.tensor(toks),
                "read_of": torch.tensor(read_of), "reads": reads_flat}

    @torch.inference_mode()
    def loglikelihoods(self, model: torch.nn.Module) -> list[np.ndarray]:
        """The summed log-likelihood of every choice of every example.

        Args:
            model: a causal LM returning ``.logits`` of shape (batch, positions, vocab).

        Returns:
            Per example, a float64 array with one log-likelihood per choice.
        """
        _check_positions(model, max(b["input_ids"].shape[1] for b in self._batches))
        was_training = model.training
        model.eval()
        device = _device(model)
        keep = _supports_logits_to_keep(model)
        out = [np.zeros(len(cs), dtype=np.float64) for cs in self.choices]
        try:
            for b in tqdm(self._batches, desc="multiple choice", leave=False, disable=not self.progress):
                kwargs = {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device)}
                positions = b["positions"].to(device)
                logits = None
                if keep:
                    try:
                        logits = model(**kwargs, logits_to_keep=positions).logits  # (B, P, V)
                    except TypeError:  # a model whose logits_to_keep takes an int only
                        keep = False
                if logits is None:
                    logits = model(**kwargs).logits  # (B, T, V)
                if logits.shape[1] != len(positions):  # all positions came back
                    logits = logits[:, positions]  # (B, P, V)
                logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, P, V)
                picked = logprobs[b["rows"].to(device), b["cols"].to(device), b["tokens"].to(device)]  # (R_tok,)
                sums = torch.zeros(len(b["reads"]), dtype=torch.float64, device=device)
                sums.index_add_(0, b["read_of"].to(device), picked.double())
                for rd, s in zip(b["reads"], sums.cpu().tolist()):
                    out[rd.example][rd.choice] = s
        finally:
            model.train(was_training)
        return out

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """``accuracy`` (lm-eval ``acc``) and ``accuracy_norm`` (lm-eval ``acc_norm``) of ``model`` on the split."""
        lls = self.loglikelihoods(model)
        return choice_metrics(lls, [[len(c) for c in cs] for cs in self.choices], self.labels)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

EXTRACTORS: dict[str, Callable[[str], str | None]] = {}


def register_extractor(name: str) -> Callable[[Callable[[str], str | None]], Callable[[str], str | None]]:
    """Register an answer extractor under ``name`` so that stored :class:`LMTask` s can refer to it.

    Args:
        name: the name (a registered name takes precedence over reading ``extract`` as a regex).
    """
    def wrap(fn: Callable[[str], str | None]) -> Callable[[str], str | None]:
        EXTRACTORS[name] = fn
        return fn
    return wrap


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            k = text.find(stop)
            if k != -1:
                cut = min(cut, k)
    return text[:cut]


def extract_answer(text: str, extract: str | re.Pattern | Callable[[str], str | None]) -> str | None:
    """Apply an extractor: a registered name, a regex (first capture group, or the whole match without groups;
    searched with ``re.DOTALL``) or a callable. Returns ``None`` when nothing (or only whitespace) is found."""
    if callable(extract) and not isinstance(extract, re.Pattern):
        found = extract(text)
    else:
        if isinstance(extract, str) and extract in EXTRACTORS:
            return extract_answer(text, EXTRACTORS[extract])
        pattern = extract if isinstance(extract, re.Pattern) else re.compile(extract, re.DOTALL)
        m = pattern.search(text)
        found = None if m is None else (m.group(1) if pattern.groups else m.group(0))
    if found is None or not str(found).strip():
        return None
    return str(found)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalise_answer(text: str) -> str:
    """The default normalisation before the exact comparison.

    Strips whitespace; if what is left is a number once thousands separators ``,``, a currency ``$`` and a
    trailing ``.`` are removed, returns that number (``" $1,234. "`` -> ``"1234"``); otherwise returns the stripped
    text unchanged (case and punctuation kept).
    """
    s = text.strip()
    number = s.replace(",", "").replace("$", "").removesuffix(".")
    return number if _NUMBER.fullmatch(number) else s


_GSM8K_MARKED = re.compile(r"####\s*(-?[$\d.,]*\d)")
_ANY_NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")


@register_extractor("gsm8k")
def gsm8k_extract(text: str) -> str | None:
    """GSM8K's "flexible extract": the number after ``#### `` if the generation has one, else its last number.

    The result is normalised by :func:`normalise_answer` (``"#### 1,234"`` -> ``"1234"``); ``None`` without any
    number.
    """
    marked = _GSM8K_MARKED.search(text)
    if marked:
        return normalise_answer(marked.group(1))
    numbers = _ANY_NUMBER.findall(text)
    return normalise_answer(numbers[-1]) if numbers else None


def gsm8k_gold(answer: str) -> str:
    """The gold answer of a GSM8K solution: the text after its (last) ``#### `` marker, normalised."""
    return normalise_answer(answer.split("####")[-1])


class _StopOnStrings:
    """A per-row stopping criterion for ``generate``: a row is done once its new text holds a stop string."""

    def __init__(self, tokenizer, start: int, until: Sequence[str]) -> None:
        self.tokenizer, self.start, self.until = tokenizer, start, [u for u in until if u]
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for r in range(input_ids.shape[0]):
            if not self.done[r]:
                text = self.tokenizer.decode(input_ids[r, self.start:], skip_special_tokens=True)
                self.done[r] = any(u in text for u in self.until)
        return self.done.clone()


class GenerationEvaluator:
    """Greedy generation scored by exact match (lm-eval ``generate_until`` + ``exact_match``).

    For each row: the prompt is tokenized once here (no BOS unless the tokenizer adds one). At evaluation, batches
    are left-padded with an attention mask (padding is done here, with the pad token or, without one, the EOS
    token: the caller's tokenizer and its ``padding_side`` are never touched) and decoded greedily
    (``do_sample=False``; a repetition penalty or n-gram ban in the model's ``generation_config`` is switched off)
    for at most ``max_new_tokens``, stopping at the model's and the tokenizer's EOS tokens and, per row, once a stop
    string appears. The text is cut before the first ``until`` stop string, the answer is extracted, normalised,
    and compared exactly with the gold answer (normalised the same way; a gold answer holding GSM8K's ``#### ``
    marker is reduced to the text after it first). Batched generation equals one-by-one generation.

    Args:
        dataset: a ``datasets.Dataset`` (or anything with ``column_names``, ``len`` and ``__getitem__(column)``).
        tokenizer: the model's tokenizer (never modified).
        prompt_column: the prompt column, used when ``template`` is ``None``.
        template: ``str.format`` template over the row's columns building the prompt, e.g.
            ``"Question: {question}\\nAnswer:"``.
        answer_column: the gold answer column.
        extract: a regex (first capture group, or the whole match), a callable ``str -> str | None``, or a name in
            :data:`EXTRACTORS` (``"gsm8k"``). The default takes the whole stripped generation.
        max_new_tokens: the most tokens generated per prompt.
        until: stop strings; the generation is cut before the earliest one.
        batch_size: the most prompts per ``generate`` call (a batch also stops growing at 10% padding).
        max_length: the longest prompt plus generation in tokens; longer prompts lose tokens from the left.
        normalise: applied to the extracted prediction and to the gold answer before comparing.
        chat_template: render the prompt as a user turn with the tokenizer's chat template and generation prompt.
        add_bos: as in :class:`MultipleChoiceEvaluator`.
        progress: show a progress bar per evaluation.

    Attributes:
        prompts: the prompt strings; answers: the normalised gold answers; fingerprint: see
            :class:`MultipleChoiceEvaluator`.

    Raises:
        ValueError: missing columns (the message lists the available ones), an empty split, a bad setting, or a
            tokenizer that cannot pad.
    """

    def __init__(self, dataset, tokenizer, *, prompt_column: str = "prompt", template: str | None = None,
                 answer_column: str = "answer", extract: str | Callable[[str], str | None] = DEFAULT_EXTRACT,
                 max_new_tokens: int = 16, until: Sequence[str] = ("\n",), batch_size: int = 32,
                 max_length: int = _DEFAULT_MAX_LENGTH, normalise: Callable[[str], str] = normalise_answer,
                 chat_template: bool = False, add_bos: bool | None = None, progress: bool = False) -> None:
        n = _require_rows(dataset)
        _require_columns(dataset, [answer_column], "Pass answer_column= naming the gold-answer column.")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if max_length <= max_new_tokens:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt with max_new_tokens="
                             f"{max_new_tokens}; raise max_length.")
        if isinstance(until, str):
            until = (until,)
        if isinstance(extract, str) and extract not in EXTRACTORS:
            try:
                re.compile(extract)
            except re.error as e:
                raise ValueError(f"extract={extract!r} is not a valid regex ({e}) nor a registered extractor "
                                 f"{sorted(EXTRACTORS)}.") from None
        prompts = _texts(dataset, n, column=prompt_column, template=template, what="prompt")
        if chat_template:
            prompts = [_apply_chat_template(tokenizer, p) for p in prompts]
        prefix = [] if chat_template else _bos_prefix(tokenizer, add_bos)
        self.prompts: list[str] = prompts
        self.answers: list[str] = [self._gold(a, normalise) for a in dataset[answer_column]]
        self.tokenizer = tokenizer
        self.extract = extract
        self.normalise = normalise
        self.max_new_tokens = max_new_tokens
        self.until = tuple(until)
        self.batch_size = batch_size
        self.add_bos = bool(prefix)
        self.chat_template = chat_template
        self.progress = progress
        self.n = n
        self._pad = _pad_id(tokenizer)
        eos = tokenizer.eos_token_id
        self._eos = None if eos is None else int(eos)
        room = max_length - max_new_tokens
        # An empty prompt starts from a BOS/EOS token (generation needs at least one input token).
        self._ids = [(prefix + ids or _empty_context_prefix(tokenizer))[-room:] for ids in _encode(tokenizer, prompts)]
        self._order = _length_batches([len(ids) for ids in self._ids], batch_size)
        extract_id = extract if isinstance(extract, str) else f"{extract.__module__}.{extract.__qualname__}"
        normalise_id = f"{normalise.__module__}.{normalise.__qualname__}"
        self.fingerprint = _fingerprint(
            "generate",
            {"n": n, "max_new_tokens": max_new_tokens, "until": json.dumps(list(self.until)),
             "chat_template": chat_template, "bos": self.add_bos, "max_length": max_length},
            {"prompts": self._ids, "answers": self.answers, "extract": extract_id, "normalise": normalise_id})

    @staticmethod
    def _gold(answer: Any, normalise: Callable[[str], str]) -> str:
        text = str(answer)
        if "#### " in text:
            text = text.split("####")[-1]
        return normalise(text)

    def _eos_ids(self, model: torch.nn.Module) -> list[int] | None:
        ids: list[int] = []
        for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), self._eos):
            if source is not None:
                ids.extend([source] if isinstance(source, int) else list(source))
        return list(dict.fromkeys(int(i) for i in ids)) or None

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module) -> list[str]:
        """Greedy generations for every prompt, cut at the first stop string (in the split's order).

        Args:
            model: a causal LM with ``generate`` (a transformers ``GenerationMixin``).

        Returns:
            One decoded continuation per row (special tokens skipped).
        """
        from transformers import GenerationConfig, StoppingCriteriaList

        _check_positions(model, max(len(ids) for ids in self._ids) + self.max_new_tokens)
        was_training = model.training
        model.eval()
        device = _device(model)
        # Plain greedy decoding: a penalty or n-gram ban in the model's own generation_config is switched off.
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens, min_length=0,
                                  repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=self._pad,
                                  eos_token_id=self._eos_ids(model))
        out: list[str] = [""] * self.n
        try:
            for rows in tqdm(self._order, desc="generate", leave=False, disable=not self.progress):
                width = max(len(self._ids[i]) for i in rows)
                ids = torch.full((len(rows), width), self._pad, dtype=torch.long)  # (B, T), left-padded
                mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
                for r, i in enumerate(rows):
                    ids[r, width - len(self._ids[i]):] = torch.tensor(self._ids[i])
                    mask[r, width - len(self._ids[i]):] = 1
                stops = StoppingCriteriaList([_StopOnStrings(self.tokenizer, width, self.until)] if self.until
                                             else [])
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config, stopping_criteria=stops)  # (B, T + new)
                for r, i in enumerate(rows):
                    text = self.tokenizer.decode(gen[r, width:].tolist(), skip_special_tokens=True)
                    out[i] = cut_at_stop(text, self.until)
        finally:
            model.train(was_training)
        return out

    def predictions(self, generations: Sequence[str]) -> list[str | None]:
        """Extracted, normalised answers of ``generations`` (``None`` where the extractor found nothing)."""
        found = [extract_answer(g, self.extract) for g in generations]
        return [None if f is None else self.normalise(f) for f in found]

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """``exact_match`` and ``extracted`` (the share of rows where the extractor found an answer)."""
        preds = self.predictions(self.generate(model))
        hits = [p is not None and p == a for p, a in zip(preds, self.answers, strict=True)]
        return {"exact_match": float(np.mean(hits)), "extracted": float(np.mean([p is not None for p in preds]))}


# ---------------------------------------------------------------------------------------------------------------
# Task descriptions
# ---------------------------------------------------------------------------------------------------------------

_KINDS = ("choice", "generate", "perplexity")
_DEFAULT_INPUT = {"choice": "context", "generate": "prompt", "perplexity": "text"}
_DEFAULT_TARGET = {"choice": "label", "generate": "answer"}


@dataclass(frozen=True)
class LMTask:
    """A named, storable description of a decoder-LM evaluation (no data, no run options).

    Attributes:
        kind: ``"choice"`` (:class:`MultipleChoiceEvaluator`), ``"generate"`` (:class:`GenerationEvaluator`) or
            ``"perplexity"`` (:class:`deltakit.evaluate.PerplexityEvaluator`).
        name: a label for reports (not part of the fingerprint).
        template: ``str.format`` template over a row's columns building the context / prompt / text.
        input_column: the context / prompt / text column when there is no template (default by kind:
            ``context``, ``prompt``, ``text``).
        target_column: the label (choice) or answer (generate) column (default ``label`` / ``answer``).
        choices: fixed label words for every example (choice tasks with an integer label column); ``None`` reads
            ``choices_column``.
        choices_column: the list-of-choices column.
        delimiter: put before each choice.
        extract: a regex or a name in :data:`EXTRACTORS` (generate tasks); ``None`` is :data:`DEFAULT_EXTRACT`.
        max_new_tokens / until: generation length and stop strings.
        chat_template: apply the tokenizer's chat template (choice and generate tasks).
    """

    kind: Literal["choice", "generate", "perplexity"]
    name: str = ""
    template: str | None = None
    input_column: str | None = None
    target_column: str | None = None
    choices: tuple[str, ...] | None = None
    choices_column: str = "choices"
    delimiter: str = " "
    extract: str | None = None
    max_new_tokens: int = 16
    until: tuple[str, ...] = field(default=("\n",))
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; available: {list(_KINDS)}.")
        if self.choices is not None:
            if isinstance(self.choices, str) or not self.choices:
                raise ValueError(f"choices must be a non-empty tuple of label words, got {self.choices!r}.")
            object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "until", (self.until,) if isinstance(self.until, str) else tuple(self.until))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        if self.extract is not None and self.extract not in EXTRACTORS:
            try:
                re.compile(self.extract)
            except re.error as e:
                raise ValueError(f"extract={self.extract!r} is neither a registered extractor {sorted(EXTRACTORS)} "
                                 f"nor a valid regex ({e}).") from None
        if self.template is not None:
            _template_fields(self.template)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` reads it back."""
        d = asdict(self)
        d["until"] = list(self.until)
        d["choices"] = None if self.choices is None else list(self.choices)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LMTask:
        """The task stored by :meth:`to_dict`.

        Raises:
            ValueError: unknown keys (the message lists the known ones).
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LMTask field(s) {unknown}; known: {sorted(known)}.")
        d = dict(data)
        for key in ("choices", "until"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def fingerprint(self) -> str:
        """A string identifying the task's definition (every field but ``name``)."""
        d = self.to_dict()
        d.pop("name")
        return _fingerprint(self.kind, {"chat_template": self.chat_template}, d)

    def evaluator(self, dataset, tokenizer, **kwargs: Any) -> Callable[[torch.nn.Module], dict[str, float]]:
        """Build this task's evaluator on ``dataset``.

        Args:
            dataset: the evaluation split.
            tokenizer: the model's tokenizer.
            **kwargs: run options for the evaluator (``batch_size``, ``max_length``, ``progress``, ...); an
                evaluator argument given here overrides the task's own (e.g. ``max_new_tokens=32``; the evaluator's
                fingerprint records the values used). Perplexity takes ``batch_size`` and ``max_length`` only;
                ``progress`` is ignored there.

        Returns:
            The evaluator; it has a ``fingerprint`` attribute.

        Raises:
            ValueError: missing columns, an empty split, bad labels (see the evaluators).
        """
        input_column = self.input_column or _DEFAULT_INPUT[self.kind]
        if self.kind == "choice":
            settings = {"context_column": input_column, "choices_column": self.choices_column,
                        "label_column": self.target_column or _DEFAULT_TARGET["choice"], "choices": self.choices,
                        "template": self.template, "target_delimiter": self.delimiter,
                        "chat_template": self.chat_template}
            return MultipleChoiceEvaluator(dataset, tokenizer, **(settings | kwargs))
        if self.kind == "generate":
            settings = {"prompt_column": input_column, "template": self.template,
                        "answer_column": self.target_column or _DEFAULT_TARGET["generate"],
                        "extract": DEFAULT_EXTRACT if self.extract is None else self.extract,
                        "max_new_tokens": self.max_new_tokens, "until": self.until,
                        "chat_template": self.chat_template}
            return GenerationEvaluator(dataset, tokenizer, **(settings | kwargs))
        from deltakit.evaluate import PerplexityEvaluator

        n = _require_rows(dataset)
        texts = _texts(dataset, n, column=input_column, template=self.template, what="text")
        kwargs.pop("progress", None)
        return PerplexityEvaluator(texts, tokenizer, **kwargs)  # its fingerprint covers the token ids


def gsm8k_task(*, chat_template: bool = False) -> LMTask:
    """The GSM8K preset: zero-shot ``"Question: {question}\\nAnswer:"``, greedy up to 256 tokens, stopped at the
    next ``"Question:"``; the prediction is the ``#### N`` number if present, else the last number
    (:func:`gsm8k_extract`); the gold answer is the text after ``#### `` (see :class:`GenerationEvaluator`).

    Args:
        chat_template: apply the tokenizer's chat template to the question.
    """
    return LMTask(kind="generate", name="gsm8k", template="Question: {question}\nAnswer:", target_column="answer",
                  extract="gsm8k", max_new_tokens=256, until=("Question:", "</s>", "<|im_end|>"),
                  chat_template=chat_template)


def infer_lm_task(dataset_or_columns: datasets.Dataset | Sequence[str]) -> LMTask:
    """Pick the task a split's columns call for.

    * a ``choices`` column -> multiple choice (context from ``context`` / ``query`` / ``prompt`` / ``question``,
      label from ``label`` / ``answer`` / ``gold``);
    * an ``answer`` column -> generation (prompt from ``prompt``, or GSM8K's template over ``question``); the GSM8K
      preset when the answers contain ``"#### "`` (this needs a dataset, not only its column names);
    * only a ``text`` column -> perplexity.

    Args:
        dataset_or_columns: a dataset (its first rows are read to recognise GSM8K) or its column names.

    Returns:
        The :class:`LMTask`.

    Raises:
        ValueError: no rule matches (the message lists the columns and what each task needs).
    """
    is_dataset = hasattr(dataset_or_columns, "column_names")
    columns = list(dataset_or_columns.column_names) if is_dataset else list(dataset_or_columns)

    def first(*names: str) -> str | None:
        return next((c for c in names if c in columns), None)

    if "choices" in columns:
        context = first("context", "query", "prompt", "question")
        label = first("label", "answer", "gold")
        if context is None or label is None:
            raise ValueError(f"a 'choices' column calls for a multiple-choice task, which also needs a context column "
                             f"(context / query / prompt / question) and a label column (label / answer / gold); "
                             f"available: {columns}. Build an LMTask(kind='choice', ...) naming them.")
        return LMTask(kind="choice", input_column=context, target_column=label)
    if "answer" in columns:
        if is_dataset and "question" in columns:
            head = list(dataset_or_columns["answer"])[:20]
            if any("#### " in str(a) for a in head):
                return gsm8k_task()
        if "prompt" in columns:
            return LMTask(kind="generate", input_column="prompt", target_column="answer")
        if "question" in columns:
            return LMTask(kind="generate", template="Question: {question}\nAnswer:", target_column="answer")
        raise ValueError(f"an 'answer' column calls for a generation task, which also needs a 'prompt' or 'question' "
                         f"column; available: {columns}.")
    if "text" in columns:
        return LMTask(kind="perplexity", input_column="text")
    raise ValueError(f"cannot tell the task from columns {columns}: multiple choice needs 'choices' (+ context and "
                     "label), generation needs 'answer' (+ 'prompt' or 'question'), perplexity needs 'text'. Rename "
                     "the columns or build an LMTask explicitly.")
