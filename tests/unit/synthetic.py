"""Synthetic Hub-style checkpoint folders for unit tests (no network, no real models)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], *, model_type: str = "bert",
                     card: dict | None = None, shards: int = 1) -> Path:
    """Write ``tensors`` as a Hub-style folder (config.json, safetensors, optional card), sharded if asked."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    if card is not None:
        (folder / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n# model\n")
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def bert_like(seed: int = 0, *, prefix: str = "", head: bool = False, scale: float = 1.0,
              base: dict[str, torch.Tensor] | None = None, vocab: int = 50) -> dict[str, torch.Tensor]:
    """A tiny BERT-shaped state dict; with ``base``, returns base + scale * noise (a synthetic fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embeddings.word_embeddings.weight": (vocab, 8),
        "embeddings.LayerNorm.weight": (8,),
        "encoder.layer.0.attention.self.query.weight": (8, 8),
        "encoder.layer.0.attention.self.key.weight": (8, 8),
        "encoder.layer.0.attention.output.dense.weight": (8, 8),
        "encoder.layer.0.attention.output.LayerNorm.weight": (8,),
        "encoder.layer.0.intermediate.dense.weight": (16, 8),
        "encoder.layer.0.output.dense.weight": (8, 16),
        "encoder.layer.1.attention.self.value.weight": (8, 8),
    }
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if base is not None:
            src = base[name] if name in base else base[name.removeprefix(prefix)]
            value = src[: shape[0]] if src.shape != shape else src
            out[prefix + name] = (value + scale * noise).contiguous()
        else:
            out[prefix + name] = noise * 0.05
    out[prefix + "embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    if head:
        out["classifier.weight"] = torch.randn(3, 8, generator=g)
        out["classifier.bias"] = torch.zeros(3)
    return out
