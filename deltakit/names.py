"""Tensor names: module kinds, block indices, and the one rule for what counts as the output head.

A "module kind" is a small closed set (:data:`MODULE_KINDS`) derived from the tensor name by the first matching
rule; a "layer" is the transformer block index parsed from the name. Layouts covered: BERT-style encoders,
Llama / Qwen / Mistral / SmolLM (``q_proj`` ... ``down_proj``), GPT-2 (``c_attn``: fused q/k/v, ``c_fc``, ``c_proj``),
Phi-3 / Falcon (fused ``qkv_proj``, ``query_key_value``), DistilBERT.
"""

from __future__ import annotations

import re

__all__ = ["MODULE_KINDS", "module_kind", "layer_index", "is_buffer", "is_head"]

MODULE_KINDS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "ffn_in", "ffn_out", "embedding", "norm", "head",
                "other")

# Order matters: the first matching rule wins (norms inside attention output blocks are norms, not attn_o).
_KIND_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("head", r"(^|\.)(classifier|lm_head|score|qa_outputs)(\.|$)"),
        ("norm", r"(layer_?norm|LayerNorm|(^|\.)ln_\w*|(^|\.)norm(\.|$)|_norm(\.|$)|rms_?norm)"),
        ("embedding", r"(embed|(^|\.)wte(\.|$)|(^|\.)wpe(\.|$))"),
        ("attn_qkv", r"((^|\.)c_attn(\.|$)|qkv_proj|query_key_value|Wqkv)"),  # fused q, k, v (GPT-2, Phi-3, Falcon)
        ("attn_q", r"(\.query(\.|$)|q_proj|\.q_lin\.|\.wq\.)"),
        ("attn_k", r"(\.key(\.|$)|k_proj|\.k_lin\.|\.wk\.)"),
        ("attn_v", r"(\.value(\.|$)|v_proj|\.v_lin\.|\.wv\.)"),
        ("attn_o", r"(attention\.output\.dense|o_proj|out_proj|attn\.c_proj|\.out_lin\.|\.wo\.)"),
        ("ffn_in", r"(intermediate\.dense|up_proj|gate_proj|gate_up_proj|(^|\.)fc1(\.|$)|c_fc|lin1|w1|w3)"),
        ("ffn_out", r"((^|\.)output\.dense|down_proj|(^|\.)fc2(\.|$)|mlp\.c_proj|lin2|w2)"),
    )
)
# Float tensors some checkpoints store that are not weights: rotary frequencies, GPT-2's causal-mask buffers.
_BUFFER_RE = re.compile(r"((^|\.)rotary_emb\.inv_freq|(^|\.)attn\.(masked_)?bias)$")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def module_kind(name: str) -> str:
    """The module kind of a tensor name, one of :data:`MODULE_KINDS`."""
    for kind, pattern in _KIND_RULES:
        if pattern.search(name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer block index parsed from a tensor name (``encoder.layer.3.`` -> 3), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def is_buffer(name: str) -> bool:
    """Whether a checkpoint tensor is a buffer stored beside the weights (``rotary_emb.inv_freq``, GPT-2's
    ``attn.bias`` / ``attn.masked_bias`` causal masks): never a delta, never pruned, skipped by pairing."""
    return _BUFFER_RE.search(name) is not None


def is_head(name: str) -> bool:
    """Whether a tensor belongs to the output head (``classifier``, ``score``, ``qa_outputs``, ``lm_head``).

    The one head rule: encoder presets do not prune the head (a classification fine-tune adds it, so it has no
    base value), the DAREx analysis gives it no q, and AdamR gives it no pull toward the base.
    """
    return module_kind(name) == "head"
