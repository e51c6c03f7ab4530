"""The resident model of a sweep: loaded once, with the base and fine-tuned values of its prunable tensors beside it.

MergeLM reloads the model from disk for every pruning rate; here the fine-tuned model is loaded once onto its
device, the base and fine-tuned values of every prunable tensor are kept beside it, and a sweep point rewrites the
prunable parameters in place (``deltakit.prune.apply_method``: one fused pass per tensor, fp32 maths, one cast).
On CPU the uniform numbers of a seed are computed once per tensor and reused by every rate and random method
(masks are nested across rates by construction: common random numbers give smooth curves).

Loading is safe by default: built-in architectures only (``trust_remote_code`` is always False, and a checkpoint
that would need its own code is refused before loading), and a fine-tune lacking weights its architecture needs is
refused rather than completed with random values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakit import masks
from deltakit.names import is_head
from deltakit.pairing import DEFAULT_PRESET, is_causal_lm, pair_models
from deltakit.prune import apply_method, check_finite_delta
from deltakit.refs import Snapshot, SourceError
from deltakit.tensors import TensorReader

__all__ = ["ResidentModel", "load_model", "load_tokenizer", "refuse_remote_code"]


@dataclass
class _Target:
    name: str
    param: torch.nn.Parameter
    base: torch.Tensor
    ft: torch.Tensor
    u: dict[int, torch.Tensor] = field(default_factory=dict)


def refuse_remote_code(snapshot: Snapshot) -> None:
    """Refuse a checkpoint whose architecture transformers does not ship (loading it would need the repo's code).

    deltakit always passes ``trust_remote_code=False``; this check turns transformers' refusal (or, in older
    versions, its question on stdin) into a clear error before any loading starts.

    Raises:
        SourceError: naming the model type, whether ``config.json`` carries an ``auto_map``, and what to do.
    """
    from transformers import CONFIG_MAPPING

    model_type = snapshot.config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    code = " and its config.json maps it to the repository's own Python code (auto_map)" \
        if "auto_map" in snapshot.config else ""
    raise SourceError(
        f"{snapshot.label!r} has model_type {model_type!r}, which is not an architecture transformers ships{code}. "
        "deltakit never runs code from a checkpoint (trust_remote_code is always False): use a fine-tune of a "
        "built-in architecture, or load the model yourself and pass model_loader=."
    )


def load_model(snapshot: Snapshot) -> torch.nn.Module:
    """Load a fine-tune safely: built-in architectures only, every weight present.

    A decoder LM (:func:`deltakit.pairing.is_causal_lm`: its config names a ``*ForCausalLM`` / ``*LMHeadModel``)
    loads as ``AutoModelForCausalLM`` in the checkpoint's dtype (bf16 stays bf16); anything else as a sequence
    classifier. A tied ``lm_head`` absent from the checkpoint is not missing: it is the embedding.

    Raises:
        SourceError: the architecture needs the repository's code (:func:`refuse_remote_code`), or the checkpoint
            lacks weights the architecture needs (transformers would initialise them randomly).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    refuse_remote_code(snapshot)
    causal = is_causal_lm(snapshot)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model, info = auto.from_pretrained(snapshot.path, trust_remote_code=False, output_loading_info=True,
                                       **({"dtype": "auto"} if causal else {}))
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise SourceError(
            f"{snapshot.label!r} lacks {len(missing)} weight(s) its architecture needs (e.g. {missing[:3]}); "
            "transformers would initialise them randomly and every point would measure noise. Use the complete "
            "checkpoint (or pass model_loader= to load it your way)."
        )
    return model


def load_tokenizer(snapshot: Snapshot):
    """The snapshot's tokenizer (None when it ships none); never runs the repository's code.

    A tokenizer config that maps to the repository's own code (``auto_map``) is loaded from its ``tokenizer.json``
    by transformers' built-in backend when there is one; otherwise it cannot be loaded safely and is refused.

    Raises:
        SourceError: the tokenizer cannot be loaded without running the repository's code, or at all.
    """
    from transformers import AutoTokenizer

    config_file = snapshot.path / "tokenizer_config.json"
    if not config_file.exists():
        return None
    try:
        return AutoTokenizer.from_pretrained(snapshot.path, trust_remote_code=False)
    except (ValueError, OSError) as err:
        remote = "auto_map" in config_file.read_text(encoding="utf-8", errors="replace")
        why = ("it maps to the repository's own code (auto_map), which deltakit never runs (trust_remote_code is "
               "always False)" if remote else str(err).splitlines()[0])
        raise SourceError(f"cannot load the tokenizer of {snapshot.label!r}: {why}. Use a checkpoint with a "
                          "tokenizer.json or a built-in tokenizer class.") from None


class ResidentModel:
    """A fine-tuned model loaded once, with the base and fine-tuned values of its prunable tensors beside it.

    Args:
        base / fine_tune: snapshots (see :func:`deltakit.sources.resolve`).
        preset / include / exclude: the prunable set (:mod:`deltakit.pairing`).
        shared_rows: when the vocabularies differ, prune the rows both have; the fine-tune's extra rows keep their
            fine-tuned values (their delta is zero).
        device: where the model lives.
        model_loader: ``path -> nn.Module``; defaults to :func:`load_model` (never runs a checkpoint's code).
        cache_uniforms: keep each seed's uniform numbers per tensor (CPU; ~4 bytes per prunable parameter per seed).

    Raises:
        deltakit.pairing.PairingError: base and fine-tune are not homologous.
        deltakit.sources.SourceError: the fine-tune needs its own code, or lacks weights its architecture needs.
        ValueError: nothing is prunable, or a prunable tensor of the checkpoint is not a parameter of the model.
    """

    def __init__(self, base: Snapshot, fine_tune: Snapshot, *, preset: str = DEFAULT_PRESET,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 shared_rows: bool = False, device: str | torch.device = "cpu",
                 model_loader: Callable[[Path], torch.nn.Module] | None = None, cache_uniforms: bool = True) -> None:
        self.base_snapshot, self.ft_snapshot = base, fine_tune
        self.device = torch.device(device)
        base_reader = TensorReader(base.path)
        ft_reader = TensorReader(fine_tune.path)
        self.pairing = pair_models(base, fine_tune, preset=preset, include=include, exclude=exclude,
                                   shared_rows=shared_rows, base_reader=base_reader, ft_reader=ft_reader)
        if not self.pairing.prunable():
            raise ValueError(
                f"nothing to prune: preset {preset!r} with include={list(include or [])} and "
                f"exclude={list(exclude or [])} selects none of the {len(self.pairing.pairs)} paired tensors of "
                f"{fine_tune.label!r}, so every point would equal the fine-tune. Loosen --exclude / --include."
            )
        self.model = (model_loader(fine_tune.path) if model_loader else load_model(fine_tune)).to(self.device)
        self.model.eval()
        self.tokenizer = load_tokenizer(fine_tune)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self.targets: list[_Target] = []
        self.tied: list[str] = []  # prunable names that are another target's parameter (a tied lm_head)
        # Heads last: a tied lm_head stored beside its embedding is the embedding's parameter, keyed by its name.
        for pair in sorted(self.pairing.prunable(), key=lambda p: is_head(p.name)):
            param = params.get(pair.name)
            if param is None:
                raise ValueError(f"checkpoint tensor {pair.name!r} is not a parameter of the loaded model; exclude it.")
            if any(t.param is param for t in self.targets):  # written once, with the first name's mask
                self.tied.append(pair.name)
                continue
            base_t = base_reader.read(pair.base_name).to(self.device, param.dtype)
            ft_t = param.detach().clone()
            if pair.rows is not None:  # rows only the fine-tune has get a zero delta: they keep fine-tuned values
                shared = ft_t.clone()
                shared[: pair.rows] = base_t[: pair.rows]
                base_t = shared
            check_finite_delta(base_t, ft_t, pair.name)  # once here, so every point can skip the check
            self.targets.append(_Target(pair.name, param, base_t, ft_t))
        self.cache_uniforms = cache_uniforms and self.device.type == "cpu"

    def uniforms(self, target: _Target, seed: int) -> torch.Tensor | None:
        """The element-wise uniform numbers of (seed, tensor), cached on CPU (None when caching is off)."""
        if not self.cache_uniforms:
            return None
        if seed not in target.u:
            target.u[seed] = masks.uniform(masks.tensor_key(seed, target.name), target.param.numel())
        return target.u[seed]

    @torch.no_grad()
    def apply(self, method: str, *, rate: float, seed: int, backend: str = "auto",
              params_for: Callable[[str], dict[str, Any]] | None = None, **params: Any) -> None:
        """Rewrite every prunable parameter with base + pruned delta (in place, one pass per tensor).

        Args:
            method: a registered method name.
            rate: fraction dropped. seed: the mask seed. backend: ``auto`` / ``torch`` / ``triton``.
            params_for: per-tensor parameters (e.g. a per-layer ``q``) by tensor name, merged over ``params``.
            **params: the method's own parameters.
        """
        for t in self.targets:
            extra = dict(params, **(params_for(t.name) if params_for else {}))

            def cached(axis: str, t: _Target = t) -> torch.Tensor | None:  # the cache holds the element stream
                return self.uniforms(t, seed) if axis == "element" else None

            apply_method(t.param.data, t.base, t.ft, method=method, rate=rate, seed=seed, name=t.name,
                         backend=backend, u=cached, allow_nonfinite=True, **extra)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the fine-tuned values back."""
        for t in self.targets:
            t.param.data.copy_(t.ft)
