"""The base of the ``tiny-llm`` family: a tiny Llama with its own byte-level BPE, pre-trained for seconds.

``tiny-llm`` is to ``smollm2`` what ``tiny`` is to ``minilm-tweets``: the same members, tasks and code paths (a
Llama-architecture ``LlamaForCausalLM`` base with tied embeddings, prompt -> label-word sentiment scored by
multiple choice, arithmetic scored by generation), small enough to build in seconds, bit-identically, so that the
tests and the notebooks' CI runs exercise the decoder path without the SmolLM2 package.

- Tokenizer: a byte-level BPE (the GPT-2 / SmolLM2 scheme: any text can be encoded, a leading space belongs to
  the following word) trained with the ``tokenizers`` library on the family's training tweets and arithmetic
  problems, with one special token, ``<|endoftext|>``, used as end-of-sequence and padding. No BOS is added.
- Model: a random-init Llama (2 layers, hidden 64), "pre-trained" by a short language-model run on the same texts
  (:func:`deltakit.families.train.fine_tune_lm` with empty prompts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltakit.families.arith import arith_split
from deltakit.families.data import read_split
from deltakit.families.train import Recipe, fine_tune_lm, seeded

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinyLlamaConfig:
    """Size of the tiny Llama, its tokenizer and its pre-training run.

    Attributes:
        vocab_size: BPE vocabulary size (bytes + merges + the special token), >= 300.
        hidden_size / num_hidden_layers / num_attention_heads / num_key_value_heads / intermediate_size: the model.
        max_position_embeddings: Longest input in tokens.
        texts: How many training tweets and arithmetic problems the tokenizer and the pre-training see, each.
        pretrain: The language-model pre-training recipe.
    """

    vocab_size: int = 1024
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 128
    texts: int = 2000
    pretrain: Recipe = field(default_factory=lambda: Recipe(learning_rate=3e-3, steps=60, max_length=64))

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes plus merges), got {self.vocab_size}.")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                             f"({self.hidden_size}) and be a multiple of num_key_value_heads "
                             f"({self.num_key_value_heads}).")


def _texts(data_folder: Path, n: int) -> list[str]:
    tweets = list(read_split(data_folder, "train")["text"])[:n]
    problems = arith_split("train")
    arith = [f"{q} {a}" for q, a in zip(problems["question"][:n], problems["answer"][:n])]
    return [t for pair in zip(tweets, arith) for t in pair]  # interleaved: both kinds in every batch


def build_tokenizer(texts: list[str], vocab_size: int):
    """A deterministic byte-level BPE tokenizer trained on ``texts`` (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


def build_base(folder: Path, *, config: TinyLlamaConfig, data_folder: Path, progress: bool = True) -> dict[str, Any]:
    """Write the tiny Llama base into ``folder``: tokenizer files and a pre-trained ``LlamaForCausalLM``.

    Args:
        folder: Destination folder (exists, empty).
        config: Model size, tokenizer and pre-training recipe.
        data_folder: The family's dataset folder (training tweets); arithmetic problems are generated.
        progress: Show a progress bar for the pre-training run.

    Returns:
        Facts for the model card.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = _texts(Path(data_folder), config.texts)
    tokenizer = build_tokenizer(texts, config.vocab_size)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    history: list[float] = []
    with seeded(config.pretrain.seed):
        model = LlamaForCausalLM(llama)
        fine_tune_lm(model, tokenizer, [""] * len(texts), texts, config.pretrain, progress,
                     desc="tiny-llm/base (LM)", history=history)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tail = history[-max(1, len(history) // 10):]
    return {
        "pipeline_tag": "text-generation",
        "tags": ["deltakit", "llama"],
        "architecture": {k: v for k, v in asdict(config).items() if k not in {"pretrain", "texts"}}
        | {"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
           "tie_word_embeddings": True},
        "pretraining": {"objective": "causal language modelling", "recipe": config.pretrain.to_card(),
                        "texts": len(texts), "loss": {"first": round(history[0], 4),
                                                       "last_10pct_mean": round(sum(tail) / len(tail), 4)}},
        "summary": (
            f"A random-init Llama ({config.num_hidden_layers} layers, hidden {config.hidden_size}, byte-level BPE of "
            f"{len(tokenizer)} tokens trained here) pre-trained for {config.pretrain.steps} steps on the family's "
            "training tweets and arithmetic problems. For tests."
        ),
    }
