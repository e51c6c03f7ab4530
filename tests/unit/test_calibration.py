"""Calibration batches and per-Linear activation statistics (deltakit.calibration) on a tiny random BERT.

The model and the tokenizer are built in the test from a config and a word list: nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

from deltakit.calibration import calibration_batches, collect_activations

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
TEXTS = ["the cat sat on the mat", "a dog", "the dog ran", "a cat sat", "the mat"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)})


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return BertModel(config)


def test_batches_are_padded_truncated_and_masked(tokenizer):
    batches = calibration_batches(tokenizer, TEXTS, batch_size=2, max_length=6)
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (2, 5), (1, 4)]
    assert all(b["attention_mask"].shape == b["input_ids"].shape for b in batches)
    # "the cat sat on the mat" is cut to [CLS] + 4 words + [SEP]; "a dog" is padded after its [SEP]
    first = batches[0]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert first["input_ids"][0, -1] == tokenizer.sep_token_id
    assert first["input_ids"][1, 4:].tolist() == [tokenizer.pad_token_id] * 2
    with pytest.raises(ValueError, match="no calibration texts"):
        calibration_batches(tokenizer, [])


def test_statistics_cover_every_linear_with_its_input_shape(model, tokenizer):
    batches = calibration_batches(tokenizer, TEXTS, batch_size=2)
    acts = collect_activations(model, batches)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(acts.mean) == set(acts.l2) == set(acts.n_tokens) == set(linears)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for name, linear in linears.items():
        assert acts.mean[name].shape == acts.l2[name].shape == (linear.in_features,)
        assert acts.mean[name].dtype == acts.l2[name].dtype == torch.float32
        # the pooler sees one [CLS] row per text; every other Linear sees the real (non-padding) tokens
        assert acts.n_tokens[name] == (len(TEXTS) if name == "pooler.dense.weight" else real_tokens)


def test_statistics_equal_a_hand_computation_on_the_first_attention_inputs(model, tokenizer):
    batches = calibration_batches(tokenizer, TEXTS, batch_size=2)
    acts = collect_activations(model, batches)  # also puts the model in eval mode (no dropout) for the line below
    with torch.inference_mode():  # query, key and value of the first block read the embeddings' output
        x = torch.cat([model.embeddings(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"])
                       [b["attention_mask"].bool()] for b in batches]).double()  # (real tokens, hidden)
    for projection in ("query", "key", "value"):
        name = f"encoder.layer.0.attention.self.{projection}.weight"
        assert acts.n_tokens[name] == len(x)
        torch.testing.assert_close(acts.mean[name], x.mean(0).float())
        torch.testing.assert_close(acts.l2[name], x.square().sum(0).sqrt().float())


def test_padding_is_masked_out(model, tokenizer):
    padded = calibration_batches(tokenizer, TEXTS, batch_size=len(TEXTS))
    alone = calibration_batches(tokenizer, TEXTS, batch_size=1)  # one text per batch: no padding at all
    assert not padded[0]["attention_mask"].all()
    with_padding, without = collect_activations(model, padded), collect_activations(model, alone)
    assert with_padding.n_tokens == without.n_tokens
    for name in with_padding.mean:
        torch.testing.assert_close(with_padding.mean[name], without.mean[name])
        torch.testing.assert_close(with_padding.l2[name], without.l2[name])


def test_collection_is_deterministic_in_eval_mode_and_removes_its_hooks(model, tokenizer):
    batches = calibration_batches(tokenizer, TEXTS, batch_size=2)
    runs = []
    for _ in range(2):
        model.train()  # dropout on: collect_activations must switch it off itself
        runs.append(collect_activations(model, batches))
    first, second = runs
    assert not model.training and first.n_tokens == second.n_tokens
    for name in first.mean:
        assert torch.equal(first.mean[name], second.mean[name]) and torch.equal(first.l2[name], second.l2[name])
    assert not any(m._forward_hooks for m in model.modules())
