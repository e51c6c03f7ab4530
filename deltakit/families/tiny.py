"""The base of the ``tiny`` family: a tiny BERT with its own vocabulary, pre-trained for a few seconds.

The ``tiny`` family exists for tests: it has the same shape as ``minilm-tweets`` (a bare ``BertModel`` base and
``BertForSequenceClassification`` fine-tunes of it, on the same tweets) but builds in seconds and bit-identically.

- Vocabulary: the five BERT special tokens, every character frequent in the training tweets both as a word start
  and as a ``##`` continuation (so any word can be spelled with WordPiece), then the most frequent whole words,
  ties broken alphabetically. Words come from the same normaliser and pre-tokeniser as BERT's tokenizer
  (lower-cased, accents stripped, split on whitespace and punctuation), so the vocabulary is deterministic.
- Model: a random-init BERT (Devlin et al., 2019; 2 layers, hidden 64, ~340k parameters, most of them in
  the 4096-entry embedding), "pre-trained" by a short masked-language-model run on the training tweets
  (:func:`deltakit.families.train.pretrain_mlm`). The encoder of the MLM model plus a freshly initialised pooler
  is saved as a bare ``BertModel`` (keys without the ``bert.`` prefix, with ``pooler.*``), exactly the layout
  of the real all-MiniLM-L6-v2 checkpoint.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltakit.families.data import read_split
from deltakit.families.train import Recipe, pretrain_mlm, seeded

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class TinyBaseConfig:
    """Size of the tiny BERT and its pre-training run.

    Attributes:
        vocab_size: Total vocabulary entries (specials + characters + words), >= 64.
        min_char_count: A character enters the vocabulary if it occurs at least this often in the training tweets.
        hidden_size: Width of the encoder.
        num_hidden_layers: Transformer blocks.
        num_attention_heads: Heads per block; must divide ``hidden_size``.
        intermediate_size: Width of the feed-forward layer.
        max_position_embeddings: Longest input in tokens.
        dropout: Hidden and attention dropout, in [0, 1); written to config.json, so fine-tunes inherit it.
        pretrain: The masked-LM pre-training recipe.
    """

    vocab_size: int = 4096
    min_char_count: int = 20
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 64
    # No dropout: with 64 hidden units and ~100 steps it mostly slows learning (measured: a 3-way fine-tune
    # stayed at the majority class with dropout 0.1 and reached ~60% without).
    dropout: float = 0.0
    pretrain: Recipe = field(default_factory=lambda: Recipe(learning_rate=2e-3, steps=40, max_length=48))

    def __post_init__(self) -> None:
        if self.vocab_size < 64:
            raise ValueError(f"vocab_size must be >= 64, got {self.vocab_size}.")
        if self.min_char_count < 1:
            raise ValueError(f"min_char_count must be >= 1, got {self.min_char_count}.")
        if min(self.hidden_size, self.num_hidden_layers, self.num_attention_heads, self.intermediate_size) < 1:
            raise ValueError(
                "hidden_size, num_hidden_layers, num_attention_heads and intermediate_size must all be >= 1, got "
                f"{self.hidden_size}, {self.num_hidden_layers}, {self.num_attention_heads}, {self.intermediate_size}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})."
            )
        if self.pretrain.max_length > self.max_position_embeddings:
            raise ValueError(
                f"pretrain.max_length ({self.pretrain.max_length}) exceeds max_position_embeddings "
                f"({self.max_position_embeddings})."
            )


def build_vocab(texts: Sequence[str], *, vocab_size: int, min_char_count: int) -> list[str]:
    """A deterministic WordPiece vocabulary from texts: specials, characters, ``##`` characters, frequent words.

    Args:
        texts: The corpus.
        vocab_size: Maximum number of entries.
        min_char_count: Minimum occurrences for a character to get its own two entries.

    Returns:
        The vocabulary in id order (``[PAD]`` is id 0).

    Raises:
        ValueError: If ``vocab_size`` cannot even hold the specials and the characters.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars: Counter[str] = Counter()
    for word, count in words.items():
        for char in word:
            chars[char] += count
    # Sort by (-count, token) so equal counts never depend on dict or hash order.
    frequent_chars = [c for c, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_char_count]
    vocab = list(SPECIAL_TOKENS) + frequent_chars + ["##" + c for c in frequent_chars]
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {len(vocab)} special and character entries; raise vocab_size "
            f"or min_char_count (now {min_char_count})."
        )
    taken = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) == vocab_size:
            break
        if word not in taken:
            vocab.append(word)
            taken.add(word)
    return vocab


def build_base(folder: Path, *, config: TinyBaseConfig, data_folder: Path, progress: bool = True) -> dict[str, Any]:
    """Write the tiny base member into ``folder``: vocabulary, tokenizer files, pre-trained bare ``BertModel``.

    Args:
        folder: Destination folder (exists, empty).
        config: Model size and pre-training recipe.
        data_folder: The family's dataset folder; its train split is the pre-training text.
        progress: Show a progress bar for the pre-training run.

    Returns:
        Facts for the model card (architecture, vocabulary, pre-training recipe and final loss).

    Raises:
        RuntimeError: If the encoder weights do not map onto the bare ``BertModel`` as expected.
    """
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

    folder = Path(folder)
    texts = list(read_split(data_folder, "train")["text"])
    vocab = build_vocab(texts, vocab_size=config.vocab_size, min_char_count=config.min_char_count)
    tokenizer = BertTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, model_max_length=config.max_position_embeddings
    )
    bert_config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=vocab.index("[PAD]"),
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
    )
    history: list[float] = []
    with seeded(config.pretrain.seed):
        mlm = BertForMaskedLM(bert_config)
        pretrain_mlm(mlm, tokenizer, texts, config.pretrain, progress, desc="tiny/base (MLM)", history=history)
        # BertForMaskedLM has no pooler; the base keeps BERT's full layout, so its pooler is a seeded random init
        # (it first learns during fine-tuning, as a pooler does when a sentence-embedding model is fine-tuned).
        base = BertModel(bert_config, add_pooling_layer=True)
        result = base.load_state_dict(mlm.bert.state_dict(), strict=False)
    if result.unexpected_keys or any(not key.startswith("pooler.") for key in result.missing_keys):
        raise RuntimeError(
            f"Encoder weights did not map onto BertModel: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}."
        )
    base.eval()
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Also the classic BERT tokenizer files, as the real MiniLM checkpoint ships them.
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
    specials = {f"{name}_token": f"[{name.upper()}]" for name in ("unk", "sep", "pad", "cls", "mask")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    tail = history[-max(1, len(history) // 10) :]
    return {
        "pipeline_tag": "feature-extraction",
        "architecture": {
            key: value for key, value in asdict(config).items() if key not in {"pretrain", "min_char_count", "dropout"}
        }
        | {"vocab_size": len(vocab), "parameters": sum(p.numel() for p in base.parameters())},
        "vocabulary": {
            "entries": len(vocab),
            "built_from": "train split: special tokens, characters seen >= "
            f"{config.min_char_count} times (plain and ##), then the most frequent words",
        },
        "pretraining": {
            "objective": "masked-lm",
            "mask_fraction": 0.15,
            "text": "train split of the family dataset",
            "recipe": config.pretrain.to_card(),
            "loss_first": round(history[0], 4),
            "loss_last": round(sum(tail) / len(tail), 4),
        },
        "summary": (
            f"A tiny BERT ({config.num_hidden_layers} layers, hidden {config.hidden_size}, {len(vocab)}-entry "
            f"vocabulary) initialised at random and pre-trained for {config.pretrain.steps} masked-LM steps on the "
            "training tweets. Saved as a bare `BertModel` (no `bert.` prefix), like all-MiniLM-L6-v2."
        ),
    }
