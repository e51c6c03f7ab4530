"""The resident model of a sweep: loaded once, rewritten in place per point from its base and fine-tuned values.

MergeLM reloads the model from disk for every pruning rate; here the fine-tuned model is loaded once onto its
device and a sweep point rewrites the prunable parameters in place (``deltakit.prune.apply_method``: one fused pass
per tensor, fp32 maths, one cast) from the base and fine-tuned values of each tensor. Those values are kept beside
the model, in host memory, or read from the files per point: the memory tier (:mod:`deltakit.memory`), chosen to fit
a budget before anything loads; every tier writes the same bits. On CPU the uniform numbers of a seed can be
computed once per tensor and reused by every rate and random method (masks are nested across rates by
construction: common random numbers give smooth curves). A checkpoint file that changes while the model is in use
(header or sampled data) stops the next point.

Loading is safe by default: built-in architectures only (``trust_remote_code`` is always False, and a checkpoint
that would need its own code is refused before loading), and a fine-tune lacking weights its architecture needs is
refused rather than completed with random values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from deltakit import masks
from deltakit.memory import TIER_NAMES, MemoryPlan, parse_budget, plan_memory
from deltakit.names import is_head
from deltakit.pairing import DEFAULT_PRESET, is_causal_lm, pair_models
from deltakit.prune import apply_method, check_finite_delta
from deltakit.refs import Snapshot, SourceError
from deltakit.tensors import TensorReader

__all__ = ["ResidentModel", "load_model", "load_tokenizer", "refuse_remote_code", "require_local"]


@dataclass
class _Target:
    """A prunable parameter; ``base`` / ``ft`` hold its values in the resident and host tiers (None: read them)."""

    name: str
    param: torch.nn.Parameter
    base_name: str
    rows: int | None
    base: torch.Tensor | None = None
    ft: torch.Tensor | None = None
    u: dict[int, torch.Tensor] = field(default_factory=dict)


def require_local(*snapshots: Snapshot) -> None:
    """Refuse snapshots resolved with ``stream=True``: their weights are not on disk, and a model must be loaded.

    Raises:
        SourceError: naming the snapshot and the fix.
    """
    for snapshot in snapshots:
        if snapshot.streamed:
            raise SourceError(f"{snapshot.label!r} was resolved with stream=True, so its weights are not on disk; "
                              "sweeps, merges and exports load the model: resolve it without stream= (the default "
                              "downloads it). Streaming serves delta statistics only.")


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
    _own_memory(model, snapshot.path)
    return model


def _own_memory(model: torch.nn.Module, folder: Path) -> None:
    """Give every parameter and buffer memory of its own, read with :class:`TensorReader` (same values, same cast).

    transformers leaves them in a private memory map of the safetensors files: a file truncated or rewritten in
    place while the model is in use would then kill the process (SIGBUS) or change weights not yet written to.
    Positioned reads never touch the map's pages, so the memory use stays one copy of the model.
    """
    try:
        reader = TensorReader(folder)
    except FileNotFoundError:  # no safetensors weights (a custom loader's folder): copies, same effect
        reader = None
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if reader is not None and name in reader and tuple(reader.info(name).shape) == tuple(tensor.shape):
                tensor.data = reader.read(name).to(tensor.dtype)
            else:
                tensor.data = tensor.data.clone()


def _load_dtype(snapshot: Snapshot, reader: TensorReader) -> torch.dtype:
    """The dtype :func:`load_model` loads in (transformers' ``dtype="auto"``): the config's, else the checkpoint's
    first floating-point tensor's."""
    named = snapshot.config.get("dtype") or snapshot.config.get("torch_dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    return next((reader.info(n).dtype for n in reader.names() if reader.info(n).is_float), torch.float32)


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
    """A fine-tuned model loaded once, with what it takes to rewrite its prunable tensors per point.

    Where the base and fine-tuned values of the prunable tensors live is the memory *tier*
    (:mod:`deltakit.memory`): beside the model (``resident``), in pinned host memory streamed to a CUDA device per
    tensor (``host``), or read per tensor per point from the safetensors files (``file``). All tiers write the same
    bits. Unless ``tier`` is given, the fastest that fits ``max_memory`` is chosen before the model loads, from the
    checkpoints' headers; :attr:`memory` holds the choice and the estimates.

    Args:
        base / fine_tune: snapshots (see :func:`deltakit.sources.resolve`).
        preset / include / exclude: the prunable set (:mod:`deltakit.pairing`).
        shared_rows: when the vocabularies differ, prune the rows both have; the fine-tune's extra rows keep their
            fine-tuned values (their delta is zero).
        device: where the model lives.
        model_loader: ``path -> nn.Module``; defaults to :func:`load_model` (never runs a checkpoint's code).
        max_memory: the budget (:func:`deltakit.memory.parse_budget`: ``"5GB"``, ``"cpu=32GB,cuda=20GB"``, a dict;
            None: 80% of the available host memory, 90% of a CUDA device's free memory).
        tier: force ``resident`` / ``host`` / ``file`` (still refused when it does not fit the budget).
        cache_uniforms: keep each seed's uniform numbers per tensor (CPU; 4 bytes per prunable parameter per seed);
            None: when the budget allows.
        n_seeds: how many seeds the caller will use (the cache's size). full_delta: whether a method will compute
            a whole tensor's delta in fp32 (magnitude, wanda, DAREx-q's analytic q) rather than in blocks.

    Raises:
        deltakit.pairing.PairingError: base and fine-tune are not homologous.
        deltakit.sources.SourceError: the fine-tune needs its own code, or lacks weights its architecture needs.
        deltakit.memory.MemoryBudgetError: no tier fits the budget (the message names the smallest that would).
        ValueError: nothing is prunable, or a prunable tensor of the checkpoint is not a parameter of the model.
    """

    def __init__(self, base: Snapshot, fine_tune: Snapshot, *, preset: str = DEFAULT_PRESET,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 shared_rows: bool = False, device: str | torch.device = "cpu",
                 model_loader: Callable[[Path], torch.nn.Module] | None = None,
                 max_memory: str | int | dict | None = None, tier: str | None = None,
                 cache_uniforms: bool | None = None, n_seeds: int = 1, full_delta: bool = True) -> None:
        require_local(base, fine_tune)
        self.base_snapshot, self.ft_snapshot = base, fine_tune
        self.device = torch.device(device)
        self._base_reader = base_reader = TensorReader(base.path)
        self._ft_reader = ft_reader = TensorReader(fine_tune.path)
        self.pairing = pair_models(base, fine_tune, preset=preset, include=include, exclude=exclude,
                                   shared_rows=shared_rows, base_reader=base_reader, ft_reader=ft_reader)
        if not self.pairing.prunable():
            raise ValueError(
                f"nothing to prune: preset {preset!r} with include={list(include or [])} and "
                f"exclude={list(exclude or [])} selects none of the {len(self.pairing.pairs)} paired tensors of "
                f"{fine_tune.label!r}, so every point would equal the fine-tune. Loosen --exclude / --include."
            )
        self.memory = self._plan(fine_tune, max_memory, tier, cache_uniforms, n_seeds, full_delta)
        self._digests = {**base_reader.digests(), **ft_reader.digests()}
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
            t = _Target(pair.name, param, pair.base_name, pair.rows)
            base_t, ft_t = self._read(t, torch.device("cpu") if self.tier == "host" else self.device)
            check_finite_delta(base_t, ft_t, pair.name)  # once here, so every point can skip the check
            if not torch.equal(ft_t.to(self.device), param.detach()):  # streamed tiers read what the model loaded
                raise ValueError(f"the loaded model's {pair.name!r} differs from the checkpoint's tensor of that name "
                                 "(the loader changed it), so points could not be rebuilt from the files; load the "
                                 "model without changing its weights.")
            if self.tier != "file":
                self._keep(t, base_t, ft_t)
            self.targets.append(t)

    # -- memory tiers ---------------------------------------------------------------------------------------------
    @property
    def tier(self) -> str:
        return self.memory.tier

    @property
    def cache_uniforms(self) -> bool:
        return self.memory.cache_uniforms and self.device.type == "cpu"

    def _plan(self, fine_tune: Snapshot, max_memory, tier, cache_uniforms, n_seeds: int,
              full_delta: bool) -> MemoryPlan:
        """Estimate each tier from the headers (before anything loads) and pick one (:func:`plan_memory`)."""
        dtype = _load_dtype(fine_tune, self._ft_reader)
        infos = [self._ft_reader.info(n) for n in self._ft_reader.names()]
        model_bytes = sum(i.numel * (dtype.itemsize if i.is_float else i.dtype.itemsize) for i in infos)
        tied = bool(fine_tune.config.get("tie_word_embeddings"))
        prunable = [p for p in self.pairing.prunable() if not (tied and is_head(p.name))]
        numel = sum(math.prod(self._ft_reader.info(p.name).shape) for p in prunable)
        largest = max(math.prod(self._ft_reader.info(p.name).shape) for p in prunable)
        stored = max(self._ft_reader.info(p.name).dtype.itemsize for p in prunable)
        working = largest * (2 * stored + 2 * dtype.itemsize + (20 if full_delta else 0))
        budget = parse_budget(max_memory, self.device)
        return plan_memory(model_bytes=model_bytes, prunable_bytes=numel * dtype.itemsize, prunable_numel=numel,
                           working_bytes=working, n_seeds=n_seeds, device=self.device, budget=budget, tier=tier,
                           cache_uniforms=cache_uniforms)

    def _read(self, t: _Target, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Base and fine-tuned values of ``t`` from the files, on ``device`` in the model's dtype."""
        dtype = t.param.dtype
        ft = self._ft_reader.read(t.name).to(device, dtype)
        base = self._base_reader.read(t.base_name).to(device, dtype)
        if t.rows is not None:  # rows only the fine-tune has get a zero delta: they keep fine-tuned values
            shared = ft.clone()
            shared[: t.rows] = base[: t.rows]
            base = shared
        return base, ft

    def _keep(self, t: _Target, base: torch.Tensor, ft: torch.Tensor) -> None:
        """Keep ``t``'s values as the tier holds them: beside the model, or in (pinned) host memory."""
        if self.tier == "host" and self.device.type == "cuda":
            base, ft = base.cpu().pin_memory(), ft.cpu().pin_memory()
        t.base, t.ft = base, ft

    def weights(self, t: _Target) -> tuple[torch.Tensor, torch.Tensor]:
        """Base and fine-tuned values of a target on the model's device (copied or read per call when streamed)."""
        if self.tier == "resident":
            return t.base, t.ft
        if self.tier == "host":
            return t.base.to(self.device, non_blocking=True), t.ft.to(self.device, non_blocking=True)
        return self._read(t, self.device)

    def _streamed(self) -> Iterator[tuple[_Target, torch.Tensor, torch.Tensor]]:
        """Every target with its base and fine-tuned values on the device. Host tier on CUDA: the next target's
        copies run on a side stream while the current one is computed."""
        if not (self.tier == "host" and self.device.type == "cuda"):
            for t in self.targets:
                yield (t, *self.weights(t))
            return
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)

        def fetch(t: _Target):
            side.wait_stream(main)  # the previous tensors' compute is queued before their memory is reused
            with torch.cuda.stream(side):
                pair = self.weights(t)
            done = torch.cuda.Event()
            done.record(side)
            return pair, done

        ahead = fetch(self.targets[0]) if self.targets else None
        for i, t in enumerate(self.targets):
            (base, ft), done = ahead
            ahead = fetch(self.targets[i + 1]) if i + 1 < len(self.targets) else None
            main.wait_event(done)
            base.record_stream(main)
            ft.record_stream(main)
            yield t, base, ft

    def check_files(self) -> None:
        """Refuse to go on when a checkpoint file changed since loading (header or sampled data differ).

        Raises:
            CheckpointChangedError: naming the file.
        """
        fix = ("Stop whatever rewrites it and rerun: finished points are kept, and points of the new weights get "
               "new keys.")
        self._base_reader.check_unchanged({f: d for f, d in self._digests.items() if f in self._base_reader.files},
                                          fix=fix)
        self._ft_reader.check_unchanged({f: d for f, d in self._digests.items() if f in self._ft_reader.files},
                                        fix=fix)

    def step_down(self, err: BaseException) -> str | None:
        """After running out of memory, move to the next tier down once (CPU: also drop the uniform cache).

        Returns:
            What changed, or None when there is no lower tier or the tier was already lowered once.
        """
        nxt = {"resident": "host" if self.device.type == "cuda" else "file", "host": "file"}.get(self.tier)
        if nxt is None or self.memory.fallbacks:
            return None
        before = self.memory.chosen.label
        kept = [(t, t.base, t.ft) for t in self.targets]
        self.memory = replace(self.memory, tier=nxt, cache_uniforms=False,
                              fallbacks=[f"{type(err).__name__} under {before}: moved to {TIER_NAMES[nxt]}"])
        for t, base, ft in kept:
            t.base = t.ft = None
            t.u.clear()
            if nxt == "host":
                self._keep(t, base, ft)
        del kept
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.memory.fallbacks[0]

    # -- points ---------------------------------------------------------------------------------------------------
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

        Raises:
            CheckpointChangedError: a checkpoint file changed since loading.
        """
        self.check_files()
        for t, base, ft in self._streamed():
            extra = dict(params, **(params_for(t.name) if params_for else {}))

            def cached(axis: str, t: _Target = t) -> torch.Tensor | None:  # the cache holds the element stream
                return self.uniforms(t, seed) if axis == "element" else None

            apply_method(t.param.data, base, ft, method=method, rate=rate, seed=seed, name=t.name,
                         backend=backend, u=cached, allow_nonfinite=True, **extra)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the fine-tuned values back.

        Raises:
            CheckpointChangedError: file tier only, when a checkpoint file changed since loading (the model keeps
                the last point's values).
        """
        if self.tier == "file":
            self.check_files()
        for t in self.targets:
            t.param.data.copy_(t.ft if self.tier != "file" else self._ft_reader.read(t.name), non_blocking=True)
