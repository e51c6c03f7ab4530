"""Homology pre-flight: prefixes, heads, buffers, shapes, architectures, presets, module kinds."""

from __future__ import annotations

import pytest

from deltakit.pairing import PairingError, layer_index, module_kind, pair_models
from deltakit.sources import SourceError, resolve
from synthetic import bert_like, write_checkpoint


def test_bare_base_pairs_with_prefixed_finetune(pair_dirs):
    b, f, base, ft = pair_dirs
    p = pair_models(resolve(str(b)), resolve(str(f)))
    assert (p.base_prefix, p.ft_prefix) == ("", "bert.")
    assert {x.name for x in p.pairs} == {"bert." + n for n in base if n != "embeddings.position_ids"}
    assert all(x.base_name == x.name.removeprefix("bert.") for x in p.pairs)
    assert set(p.unpaired) == {"classifier.weight", "classifier.bias"}
    assert p.skipped == ("bert.embeddings.position_ids",)
    frame = p.to_frame()
    assert set(frame["status"]) == {"paired", "unpaired", "skipped"}
    assert not frame[frame["status"] == "unpaired"]["prunable"].any()


def test_presets_and_regexes_select_prunable(pair_dirs):
    b, f, *_ = pair_dirs
    base, ft = resolve(str(b)), resolve(str(f))
    assert all(x.prunable for x in pair_models(base, ft).pairs)
    dec = pair_models(base, ft, preset="darex_decoder")
    # Attention and MLP by module kind, whatever the layout: BERT's query/key/value/dense are in, embeddings and
    # LayerNorms out.
    assert {x.kind for x in dec.pairs if x.prunable} <= {"attn_q", "attn_k", "attn_v", "attn_o", "ffn_in", "ffn_out"}
    assert any(x.prunable for x in dec.pairs) and not any(x.prunable for x in dec.pairs if x.kind in ("embedding",
                                                                                                       "norm"))
    custom = pair_models(base, ft, exclude=[r".*LayerNorm.*"])
    assert {x.name for x in custom.pairs if not x.prunable} == {
        "bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.output.LayerNorm.weight"}
    only_q = pair_models(base, ft, include=[r".*query.*"])
    assert [x.name for x in only_q.pairs if x.prunable] == ["bert.encoder.layer.0.attention.self.query.weight"]
    with pytest.raises(KeyError, match="mergelm_encoder"):
        pair_models(base, ft, preset="nope")
    with pytest.raises(ValueError, match="regex"):
        pair_models(base, ft, include=["("])


def test_shape_mismatch_refused_or_shared_rows(tmp_path):
    base = bert_like(0, vocab=50)
    ft = bert_like(1, scale=1e-3, base=base)
    ft["embeddings.word_embeddings.weight"] = ft["embeddings.word_embeddings.weight"].repeat(2, 1)[:52].contiguous()
    b = resolve(str(write_checkpoint(tmp_path / "b", base)))
    f = resolve(str(write_checkpoint(tmp_path / "f", ft)))
    with pytest.raises(PairingError, match=r"word_embeddings.*\(50, 8\).*\(52, 8\).*shared_rows=True"):
        pair_models(b, f)
    p = pair_models(b, f, shared_rows=True)
    emb = next(x for x in p.pairs if "word_embeddings" in x.name)
    assert emb.rows == 50 and emb.shape == (50, 8)
    assert any("first 50" in w for w in p.warnings)


def test_different_architectures_refused(tmp_path):
    b = resolve(str(write_checkpoint(tmp_path / "b", bert_like(0))))
    f = resolve(str(write_checkpoint(tmp_path / "f", bert_like(1), model_type="llama")))
    with pytest.raises(PairingError, match="'bert'.*'llama'"):
        pair_models(b, f)


def test_no_common_tensors_refused(tmp_path):
    import torch

    b = resolve(str(write_checkpoint(tmp_path / "b", bert_like(0))))
    f = resolve(str(write_checkpoint(tmp_path / "f", {"foo.weight": torch.ones(2)})))
    with pytest.raises(PairingError, match="no common tensors"):
        pair_models(b, f)


def test_card_naming_another_base_warns(tmp_path):
    b = resolve(str(write_checkpoint(tmp_path / "b", bert_like(0), card={"model_id": "org/base"})))
    f = resolve(str(write_checkpoint(tmp_path / "f", bert_like(1), card={"base_model": "org/other"})))
    with pytest.warns(UserWarning, match="org/other"):
        p = pair_models(b, f)
    assert any("org/other" in w for w in p.warnings)


def test_local_reference_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="not a model reference"):
        resolve("a/b/c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no safetensors"):
        resolve(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "name,kind,layer",
    [
        ("bert.encoder.layer.3.attention.self.query.weight", "attn_q", 3),
        ("encoder.layer.0.attention.self.key.bias", "attn_k", 0),
        ("encoder.layer.0.attention.self.value.weight", "attn_v", 0),
        ("encoder.layer.1.attention.output.dense.weight", "attn_o", 1),
        ("encoder.layer.1.attention.output.LayerNorm.weight", "norm", 1),
        ("encoder.layer.1.intermediate.dense.weight", "ffn_in", 1),
        ("encoder.layer.5.output.dense.bias", "ffn_out", 5),
        ("encoder.layer.5.output.LayerNorm.bias", "norm", 5),
        ("embeddings.word_embeddings.weight", "embedding", None),
        ("classifier.weight", "head", None),
        ("pooler.dense.weight", "other", None),
        ("model.layers.7.self_attn.q_proj.weight", "attn_q", 7),
        ("model.layers.7.self_attn.o_proj.weight", "attn_o", 7),
        ("model.layers.7.mlp.gate_proj.weight", "ffn_in", 7),
        ("model.layers.7.mlp.down_proj.weight", "ffn_out", 7),
        ("model.layers.7.input_layernorm.weight", "norm", 7),
        ("model.norm.weight", "norm", None),
        ("model.embed_tokens.weight", "embedding", None),
        ("lm_head.weight", "head", None),
    ],
)
def test_module_kind_and_layer(name, kind, layer):
    assert module_kind(name) == kind
    assert layer_index(name) == layer
