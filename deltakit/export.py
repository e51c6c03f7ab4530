"""Export what was pruned: a loadable Hub-style model folder, or a compact seeded delta, and push either to a Hub.

Two ways to hand a pruned fine-tune to someone else:

* **A model folder** (:func:`export_model`, :func:`export_pruned`): what ``save_pretrained`` writes (safetensors
  only) plus the tokenizer and a ``README.md`` card whose YAML front matter carries ``base_model``,
  ``base_model_relation`` (``finetune`` for a pruned fine-tune, ``merge`` for a merged model), ``library_name`` and a
  ``deltakit`` mapping with the method, its parameters, rate, seed and the measured metrics.
  ``transformers.AutoModelForSequenceClassification.from_pretrained(folder)`` loads it, and the weights are exactly
  the resident model's parameters after :meth:`deltakit.resident.ResidentModel.apply`: the sweep point, bit for bit.
* **A compact seeded delta** (:func:`save_compact_delta`, :func:`load_compact_delta`,
  :func:`materialise_compact_delta`; DESIGN item 12). DARE-style pruning keeps entry ``i`` of tensor ``name`` iff
  the counter-based uniform number ``u(seed, name, i) >= rate`` (:mod:`deltakit.masks`), so the mask is a function
  and need not be stored. ``delta.safetensors`` holds, for every pruned tensor, only the fine-tuned values at the
  kept positions (1-D, in the checkpoint's own dtype, so exact), and every other tensor (classifier head, excluded
  tensors, tensors only the fine-tune has, buffers) in full. Its ``__metadata__`` holds one JSON document
  (:data:`COMPACT_FORMAT`) with the method, rate, seed, q, scale, the base's reference, content fingerprint and the
  sha256 of the base values the rebuild uses, the sha256 of the stored tensors, and per pruned tensor its shape,
  dtype, kept count and 8-byte Philox key. Each sha256 runs over the tensors in the document's order, each fed as
  ``f"{name}\\0{dtype}\\0{shape}\\0"`` (dtype as safetensors spells it, shape as a Python tuple), then its
  bytes. At rate 0.9 the file is about a tenth of the fine-tune. On load the masks are regenerated and each pruned
  tensor is rebuilt as::

      ft_filled = base.clone();  ft_filled.view(-1)[mask.view(-1)] = values
      apply_method(out, base, ft_filled, method=..., rate=..., seed=..., name=..., q=...)

  which equals ``apply_method(out, base, ft, ...)`` bit for bit: a dropped entry becomes ``base`` whatever ``ft``
  held there, a kept one is computed from the stored fine-tuned value. Only element-wise random plans (``dare``,
  ``drop_only``, ``darex_q`` with one float q) are stored this way; other methods are refused.

Everything is written into a staging folder beside the target and renamed into place, so a failure never leaves a
half-written or half-overwritten folder; an existing non-empty target is refused unless ``overwrite=True``.
A compact delta is untrusted input when loaded: the file is read with deltakit's strict safetensors reader, the
JSON document against its schema and version, the base against the recorded fingerprint, and every count, dtype
and shape against the base and the regenerated masks; no pickle is ever read. No token is ever written: cards carry
only the facts passed in (a string that looks like a Hugging Face token is refused), and :func:`push_to_hub` passes
the token to huggingface_hub in memory only.

References: Yu et al. 2024, "Language Models are Super Mario" (DARE), arXiv:2311.03099; Deng et al. 2025, "DARE the
Extreme" (DAREx-q), arXiv:2410.09344; Salmon et al. 2011, Philox (counter-based random numbers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from deltakit import masks
from deltakit.families.card import write_card
from deltakit.methods import get_method
from deltakit.methods.registry import check_rate
from deltakit.pairing import DEFAULT_PRESET, pair_models
from deltakit.prune import apply_method, check_finite_delta
from deltakit.refs import Snapshot
from deltakit.safetensors_format import (
    DTYPES,
    MAX_HEADER,
    CorruptCheckpointError,
    Invalid,
    Problem,
    Truncated,
    load_json,
    parse_header,
    show,
)
from deltakit.store import fingerprint
from deltakit.tensors import TensorReader

__all__ = [
    "COMPACT_FILE",
    "COMPACT_FORMAT",
    "COMPACT_METHODS",
    "CompactDeltaError",
    "ExportError",
    "export_merged",
    "export_model",
    "export_pruned",
    "load_compact_delta",
    "materialise_compact_delta",
    "push_to_hub",
    "save_compact_delta",
]

#: The one weights file of a compact delta folder.
COMPACT_FILE = "delta.safetensors"
#: Format name and version of the JSON document in its ``__metadata__`` (key :data:`_META_KEY`).
COMPACT_FORMAT = "deltakit.compact-delta/1"
#: Methods a compact delta can store: element-wise random plans, whose mask is a function of (seed, name, index).
COMPACT_METHODS = ("dare", "drop_only", "darex_q")
#: The relations a card may declare, as the Hub defines ``base_model_relation`` for these two cases.
RELATIONS = ("finetune", "merge")

_META_KEY = "deltakit"
# What travels beside the weights: the configs and every tokenizer file transformers' tokenizers read.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
               "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja")
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Hugging Face access tokens ("hf_" + 34 letters/digits); older ones were "api_...". A card must never carry one.
_TOKEN_RE = re.compile(r"\b(?:hf|api)_[A-Za-z0-9]{30,}\b")
_CARD_KEYS = ("base_model", "base_model_relation", "method", "params", "rate", "rates", "seed", "seeds", "lambda",
              "metrics", "fine_tune", "fine_tunes", "preset", "include", "exclude", "tags", "title")


class ExportError(ValueError):
    """An export cannot be written as asked: the target exists, is a source, or the request is malformed."""


class CompactDeltaError(ValueError):
    """A compact delta cannot be written for this method, or one being loaded is invalid, altered, or was made
    against another base. The message says which and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------------------------------------------


def export_model(model: torch.nn.Module, tokenizer: Any, folder: str | os.PathLike[str], *, card: Mapping[str, Any],
                 overwrite: bool = False) -> Path:
    """Write a model as a Hub-style folder that ``transformers``' ``from_pretrained`` loads.

    The folder holds what ``model.save_pretrained`` writes (config and safetensors weights: no pickle), the
    tokenizer's files, and ``README.md``: YAML front matter with ``base_model``, ``base_model_relation``,
    ``library_name: transformers``, ``tags: [deltakit, <method>, pruned|merged, ...]`` and a ``deltakit`` mapping of
    the facts in ``card``, then a short description stating the same facts.

    Args:
        model: A transformers model (``PreTrainedModel``), saved as it is now (e.g. after ``ResidentModel.apply``).
        tokenizer: Its tokenizer, or None to write none.
        folder: The target folder. Written in a staging folder beside it, then renamed into place.
        card: The facts of the card. Required: ``base_model`` (the base's Hub id or reference, or a list of them),
            ``base_model_relation`` (``"finetune"`` for a pruned fine-tune, ``"merge"`` for a merged model) and
            ``method``. Optional: ``params`` (the method's parameters), ``rate`` or ``rates``, ``seed`` or ``seeds``,
            ``lambda``, ``metrics`` (name -> value, as measured by the caller), ``fine_tune`` or ``fine_tunes``,
            ``preset``, ``include``, ``exclude``, ``tags`` (extra tags), ``title``.
        overwrite: Replace an existing non-empty ``folder`` (CLI ``--force``). The old folder stays whole until the
            new one is complete.

    Returns:
        ``folder`` as a Path.

    Raises:
        ExportError: ``folder`` exists and is not empty (without ``overwrite``) or is a file; the card lacks a
            required fact, has an unknown key, an unknown relation, or a string that looks like an access token.
        TypeError: ``model`` has no ``save_pretrained``.
    """
    folder = Path(folder)
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"model must be a transformers model with save_pretrained, got {type(model).__name__}; "
                        "load it with AutoModelForSequenceClassification.from_pretrained or ResidentModel.")
    front, body = _model_card(card, model)
    _check_target(folder, overwrite)
    with _staged(folder, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        pickles = sorted(p.name for p in staging.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        weights = (staging / "model.safetensors").is_file() or (staging / "model.safetensors.index.json").is_file()
        if pickles or not weights:
            raise ExportError(f"save_pretrained wrote {pickles or 'no safetensors weights'} for {folder}; deltakit "
                              "exports safetensors only. Upgrade transformers or save the model yourself.")
        write_card(staging, front, body)
    return folder


def export_pruned(base: str | os.PathLike[str] | Snapshot, fine_tune: str | os.PathLike[str] | Snapshot,
                  folder: str | os.PathLike[str], *, method: str, rate: float, seed: int,
                  params: Mapping[str, Any] | None = None, preset: str = DEFAULT_PRESET, include: Sequence[str] = (),
                  exclude: Sequence[str] = (), metrics: Mapping[str, float] | None = None,
                  overwrite: bool = False) -> Path:
    """Prune a fine-tune as a sweep point does and write it as a loadable model folder (:func:`export_model`).

    The fine-tune is loaded as a :class:`~deltakit.resident.ResidentModel`, rewritten once with
    ``.apply(method, rate=rate, seed=seed, **params)`` and saved: the weights written are exactly the resident
    model's parameters after the apply, i.e. the sweep point bit for bit. The card says ``base_model_relation:
    finetune``.

    Args:
        base: The base model: a reference (``family:...``, a folder, ``org/name[@rev]``) or a resolved snapshot.
        fine_tune: The fine-tune, likewise.
        folder: The target folder.
        method: A registered tensor method (``deltakit.methods.available_methods()``).
        rate: Fraction of delta entries dropped, in [0, 1].
        seed: The mask seed (recorded only for random methods).
        params: The method's own parameters (e.g. ``{"q": 0.2}`` for ``darex_q``).
        preset / include / exclude: The prunable set (:mod:`deltakit.pairing`).
        metrics: Measured metrics to record in the card (name -> value).
        overwrite: Replace an existing non-empty folder.

    Returns:
        ``folder`` as a Path.

    Raises:
        KeyError: Unknown method or preset.
        ExportError: The target exists and is not empty, or is one of the source folders; ``method`` is a prepared
            entry (run its search and export the method it applies as, with the chosen parameters).
        ValueError: Bad rate or parameters (from the method), or base and fine-tune are not homologous.
        deltakit.sources.SourceError: A reference cannot be resolved.
    """
    folder = Path(folder)
    params = dict(params or {})
    info = _tensor_method(method)
    check_rate(rate)
    _check_target(folder, overwrite)
    base_snap, ft_snap = _resolve(base), _resolve(fine_tune)
    _check_not_source(folder, base_snap, ft_snap)
    from deltakit.resident import ResidentModel  # loads transformers: only when a model is exported

    resident = ResidentModel(base_snap, ft_snap, preset=preset, include=list(include), exclude=list(exclude))
    resident.apply(method, rate=rate, seed=seed, **params)
    card = {
        "base_model": _hub_name(base_snap),
        "base_model_relation": "finetune",
        "method": method,
        "params": params,
        "rate": float(rate),
        "seed": seed if info.random else None,
        "fine_tune": _hub_name(ft_snap),
        "preset": resident.pairing.preset,
        "include": list(include),
        "exclude": list(exclude),
        "metrics": dict(metrics or {}),
    }
    return export_model(resident.model, resident.tokenizer, folder, card=card, overwrite=overwrite)


def export_merged(base: str | os.PathLike[str] | Snapshot, fine_tunes: Sequence[str | os.PathLike[str] | Snapshot],
                  folder: str | os.PathLike[str], *, method: str, rate: float, seed: int, lam: float = 1.0,
                  params: Mapping[str, Any] | None = None, head: int = 0, preset: str = DEFAULT_PRESET,
                  include: Sequence[str] = (), exclude: Sequence[str] = (),
                  metrics: Mapping[str, float] | None = None, overwrite: bool = False) -> Path:
    """Merge fine-tunes as a merge-sweep point does and write the merged model with one task's head.

    The fine-tunes are loaded as a :class:`~deltakit.merge.MergedModel`, merged once with ``.apply(method,
    rate=rate, seed=seed, lam=lam, **params)``, and the model of fine-tune ``head`` (the merged body with that
    fine-tune's own head and every tensor outside the merged set) is saved: the merge-sweep point for that task,
    bit for bit. The card says ``base_model_relation: merge``.

    Args:
        base / fine_tunes: references or snapshots (2 to 8 fine-tunes; their order keys the masks, as in the sweep).
        folder: the target folder.
        method: a merge method (``deltakit.methods.merge_methods()``). rate / seed / lam / params: the point.
        head: the position of the fine-tune whose head (task) the exported model carries.
        preset / include / exclude: the merged set. metrics: measured metrics for the card. overwrite: replace.

    Returns:
        ``folder`` as a Path.

    Raises:
        KeyError: unknown merge method. ExportError: a bad target or ``head``. ValueError: bad rate, lambda or
            parameters, or fine-tunes that cannot be merged.
    """
    from deltakit.merge import MergedModel  # loads transformers: only when a model is exported
    from deltakit.methods import get_merge

    folder = Path(folder)
    params = dict(params or {})
    info = get_merge(method)
    check_rate(rate)
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < len(fine_tunes):
        raise ExportError(f"head must be the position of one of the {len(fine_tunes)} fine-tunes (0 to "
                          f"{len(fine_tunes) - 1}), got {head!r}")
    _check_target(folder, overwrite)
    base_snap, ft_snaps = _resolve(base), [_resolve(ft) for ft in fine_tunes]
    _check_not_source(folder, base_snap, *ft_snaps)
    merged = MergedModel(base_snap, ft_snaps, preset=preset, include=list(include), exclude=list(exclude))
    merged.apply(method, rate=rate, seed=seed, lam=lam, **params)
    card = {
        "base_model": _hub_name(base_snap),
        "base_model_relation": "merge",
        "method": method,
        "params": params,
        "rate": float(rate),
        "seed": seed if info.random else None,
        "lambda": float(lam),
        "fine_tunes": [_hub_name(ft) for ft in ft_snaps],
        "preset": merged.preset,
        "include": list(include),
        "exclude": list(exclude),
        "metrics": dict(metrics or {}),
        "title": f"Merged model with the head of {ft_snaps[head].label}",
    }
    return export_model(merged.models[head], merged.tokenizers[head], folder, card=card, overwrite=overwrite)


def _model_card(card: Mapping[str, Any], model: torch.nn.Module) -> tuple[dict[str, Any], str]:
    """The card's front matter and body from the caller's facts (validated first, before anything is written)."""
    if not isinstance(card, Mapping):
        raise ExportError(f"card must be a mapping of facts, got {type(card).__name__}")
    unknown = sorted(set(card) - set(_CARD_KEYS))
    if unknown:
        raise ExportError(f"card has unknown keys {unknown}; allowed: {list(_CARD_KEYS)}")
    facts = {k: v for k, v in ((k, _plain(v)) for k, v in card.items()) if v is not None and v != [] and v != {}}
    _refuse_tokens(facts)
    base_model = facts.get("base_model")
    if not base_model or not all(isinstance(b, str) and b for b in _as_list(base_model)):
        raise ExportError(f"card['base_model'] must name the base (a Hub id or reference, or a list of them), got "
                          f"{base_model!r}")
    relation = facts.get("base_model_relation")
    if relation not in RELATIONS:
        raise ExportError(f"card['base_model_relation'] must be one of {list(RELATIONS)} ('finetune' for a pruned "
                          f"fine-tune, 'merge' for a merged model), got {relation!r}")
    method = facts.get("method")
    if not isinstance(method, str) or not method:
        raise ExportError(f"card['method'] must name the method, got {method!r}")
    extra = [str(t) for t in _as_list(facts.get("tags"))]
    tags = list(dict.fromkeys(["deltakit", method, "pruned" if relation == "finetune" else "merged", *extra]))
    deltakit_facts = {k: facts[k] for k in _CARD_KEYS
                      if k in facts and k not in ("base_model", "base_model_relation", "tags", "title")}
    front: dict[str, Any] = {"base_model": base_model, "base_model_relation": relation,
                             "library_name": "transformers", "tags": tags}
    if type(model).__name__.endswith("ForSequenceClassification"):
        front["pipeline_tag"] = "text-classification"
    front["deltakit"] = deltakit_facts
    return front, _model_body(facts, relation)


def _method_label(method: str) -> str:
    """A method's name, label and paper for a card: a pruning method, else a merge method, else just the name."""
    try:
        info = get_method(method)
    except KeyError:
        try:
            from deltakit.methods import get_merge

            info = get_merge(method)
        except (ImportError, KeyError):  # registered elsewhere: its name is all the card can say
            return f"`{method}`"
    return f"**{info.pretty_name}** (`{method}`; {info.reference})"


def _model_body(facts: Mapping[str, Any], relation: str) -> str:
    named = _method_label(facts["method"])
    bases = ", ".join(f"`{b}`" for b in _as_list(facts["base_model"]))
    sources = _as_list(facts.get("fine_tunes") or facts.get("fine_tune"))
    what = (f"the fine-tune `{sources[0]}`" if len(sources) == 1 else
            "the fine-tunes " + ", ".join(f"`{s}`" for s in sources) if sources else "a fine-tune")
    title = facts.get("title") or ("Pruned fine-tune" if relation == "finetune" else "Merged model")
    lines = [f"# {title}", ""]
    if relation == "finetune":
        lines.append(f"This model is {what} of {bases} with its delta (fine-tuned minus base weights) pruned by "
                     f"{named}. It loads like any transformers checkpoint.")
    else:
        lines.append(f"This model merges {what} of {bases} with {named}. It loads like any transformers checkpoint.")
    lines += ["", "| fact | value |", "| --- | --- |"]
    for key in ("rate", "rates", "seed", "seeds", "lambda", "params", "preset", "include", "exclude"):
        if key in facts:
            value = facts[key] if isinstance(facts[key], str) else json.dumps(facts[key], default=str)
            lines.append(f"| {key} | `{value}` |")
    lines += ["", "`rate` is the fraction of delta entries dropped."]
    if "seed" in facts or "seeds" in facts:
        lines[-1] += (" The mask of tensor `name` is a function of (seed, name) (counter-based Philox, "
                      "`deltakit.masks`), so the same facts give the same model, bit for bit.")
    if facts.get("metrics"):
        lines += ["", "Metrics measured on this model:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in facts["metrics"].items()]
    lines += ["", "Written by deltakit; the `deltakit` mapping in the front matter holds the same facts."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Compact seeded deltas
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor of a compact delta: stored ``"kept"`` (values at kept positions) or ``"full"``."""

    name: str
    stored: str
    shape: tuple[int, ...]
    dtype: str
    base_name: str | None = None
    kept: int | None = None
    key: int | None = None


@dataclasses.dataclass(frozen=True)
class _Document:
    """The validated JSON document of a compact delta."""

    method: str
    rate: float
    seed: int
    q: float | None
    scale: float
    base_ref: str
    base_fingerprint: str
    base_digest: str
    stored_digest: str
    entries: tuple[_Entry, ...]
    raw: dict[str, Any]


def save_compact_delta(base: str | os.PathLike[str] | Snapshot, fine_tune: str | os.PathLike[str] | Snapshot,
                       folder: str | os.PathLike[str], *, method: str = "dare", rate: float, seed: int,
                       q: float | None = None, preset: str = DEFAULT_PRESET, include: Sequence[str] = (),
                       exclude: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Write a DARE-pruned fine-tune as a compact seeded delta: kept values only, masks regenerated on load.

    The folder holds ``delta.safetensors`` (see the module docstring), the fine-tune's ``config.json`` and tokenizer
    files, and a ``README.md`` card (``base_model``, ``base_model_relation: finetune``, method, rate, seed and the
    format). The base's content fingerprint (:func:`deltakit.store.fingerprint` of its files, whatever the reference)
    and the sha256 of the base values of the pruned tensors are recorded, so that loading against another base, or
    one whose weights changed, is refused.

    Args:
        base: The base model (reference or snapshot).
        fine_tune: The fine-tune (reference or snapshot).
        folder: The target folder.
        method: ``"dare"`` (scale ``1 / (1 - rate)``), ``"drop_only"`` (scale 1) or ``"darex_q"`` (scale ``1 / q``).
        rate: Fraction of delta entries dropped, in [0, 1].
        seed: The mask seed.
        q: DAREx-q's q, one float with ``1 - rate <= q <= 1``; only for ``darex_q``.
        preset / include / exclude: The prunable set (:mod:`deltakit.pairing`); other tensors are stored in full.
        overwrite: Replace an existing non-empty folder.

    Returns:
        ``folder`` as a Path.

    Raises:
        CompactDeltaError: ``method`` is not an element-wise random plan (e.g. ``magnitude``), or ``q`` is missing,
            superfluous or not one float.
        ExportError: The target exists and is not empty, or is one of the source folders.
        ValueError: Bad rate or q, non-finite deltas, or base and fine-tune are not homologous.
        KeyError: Unknown method or preset.
    """
    folder = Path(folder)
    params = _compact_params(method, q)
    masks.tensor_key(seed, "")  # a TypeError for a seed that is not an int, before any work
    rate = check_rate(rate)  # the Python float apply_method uses for the scale (the mask compares float32)
    scale = _compact_scale(method, rate, params)
    _check_target(folder, overwrite)
    base_snap, ft_snap = _resolve(base), _resolve(fine_tune)
    _check_not_source(folder, base_snap, ft_snap)
    base_reader, ft_reader = TensorReader(base_snap.path), TensorReader(ft_snap.path)
    pairing = pair_models(base_snap, ft_snap, preset=preset, include=list(include), exclude=list(exclude),
                          base_reader=base_reader, ft_reader=ft_reader)
    prunable = {p.name: p for p in pairing.prunable()}
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    kept_total = pruned_total = 0
    base_digest = hashlib.sha256()  # the exact base values the rebuild starts from (the fingerprint only samples)
    stored_digest = hashlib.sha256()  # what the file holds: a flipped bit in a stored value is caught on load
    for name in ft_reader.names():
        ft_t = ft_reader.read(name)
        pair = prunable.get(name)
        if pair is None:
            tensors[name] = ft_t
            _hash_tensor(stored_digest, name, ft_t)
            entries.append({"name": name, "stored": "full", "shape": list(ft_t.shape), "dtype": _dtype_name(ft_t)})
            continue
        base_t = base_reader.read(pair.base_name).to(ft_t.dtype)  # as ResidentModel holds it: in the model's dtype
        check_finite_delta(base_t, ft_t, name)
        _hash_tensor(base_digest, name, base_t)
        keep = masks.keep_mask(seed, name, ft_t.shape, rate)  # (shape) bool, u >= float32(rate)
        values = ft_t.reshape(-1)[keep.reshape(-1)]  # (kept,) fine-tuned values, native dtype: exact
        tensors[name] = values
        _hash_tensor(stored_digest, name, values)
        kept_total, pruned_total = kept_total + values.numel(), pruned_total + ft_t.numel()
        entries.append({"name": name, "stored": "kept", "shape": list(ft_t.shape), "dtype": _dtype_name(ft_t),
                        "base_name": pair.base_name, "kept": values.numel(), "key": masks.tensor_key(seed, name)})
    document = {
        "format": COMPACT_FORMAT,
        "method": method,
        "rate": rate,
        "seed": int(seed),
        "q": params.get("q"),
        "scale": scale,
        "base": {"ref": base_snap.ref, "repo_id": base_snap.repo_id, "fingerprint": _content_fingerprint(base_snap),
                 "digest": f"sha256:{base_digest.hexdigest()}"},
        "fine_tune": {"ref": ft_snap.ref, "repo_id": ft_snap.repo_id},
        "preset": pairing.preset,
        "include": list(include),
        "exclude": list(exclude),
        "stored_digest": f"sha256:{stored_digest.hexdigest()}",
        "tensors": entries,
    }
    from safetensors.torch import save_file

    with _staged(folder, overwrite) as staging:
        save_file(tensors, str(staging / COMPACT_FILE),
                  metadata={_META_KEY: json.dumps(document, allow_nan=False, separators=(",", ":"))})
        copied = _copy_side_files(ft_snap.path, staging)
        ft_bytes = sum(f.stat().st_size for f in ft_reader.files)
        write_card(staging, *_compact_card(document, base_snap, ft_snap, kept_total, pruned_total,
                                           (staging / COMPACT_FILE).stat().st_size, ft_bytes, copied))
    return folder


def load_compact_delta(folder: str | os.PathLike[str], base: str | os.PathLike[str] | Snapshot
                       ) -> dict[str, torch.Tensor]:
    """Rebuild the full pruned state dict from a compact delta and its base, exactly.

    Everything in the folder is treated as untrusted: ``delta.safetensors`` is read with deltakit's strict reader
    (header rules, no pickle, files inside the folder only), its JSON document checked against the schema and
    :data:`COMPACT_FORMAT`, the base's content fingerprint compared with the recorded one (before reading it) and
    the sha256 of its values (after), and every tensor's dtype, shape, Philox key and kept count compared with the
    base and the regenerated mask before any value is placed.

    Args:
        folder: A folder written by :func:`save_compact_delta`.
        base: The base it was made against (reference or snapshot).

    Returns:
        Tensor name -> tensor, keyed and ordered like the fine-tune's checkpoint: pruned tensors equal
        ``apply_method(base, ft, ...)`` (the sweep point) bit for bit, the others equal the fine-tune's.

    Raises:
        FileNotFoundError: The folder has no ``delta.safetensors``.
        deltakit.tensors.CorruptCheckpointError: The file is truncated or not a valid safetensors file.
        CompactDeltaError: The document is missing, malformed, of another format version or altered (a count,
            scale, key, dtype or shape that does not match), or the base is not the one it was made against.
    """
    return _rebuild(Path(folder), _resolve(base))[0]


def _rebuild(folder: Path, base_snap: Snapshot) -> tuple[dict[str, torch.Tensor], _Document]:
    """:func:`load_compact_delta`, also returning the validated document.

    Order of the checks: the file and its document; the base's fingerprint; every stored tensor against the document
    and all of them against the recorded sha256 (a corrupt file is named as such before any rebuild); then per pruned
    tensor its base tensor, key and mask count; last, the sha256 of the base values used.
    """
    reader, metadata = _open_compact(folder)
    doc = _parse_document(metadata, folder)
    found = _content_fingerprint(base_snap)
    if found != doc.base_fingerprint:
        raise CompactDeltaError(
            f"compact delta {folder} was made against base {doc.base_ref!r} (fingerprint {doc.base_fingerprint}), "
            f"but the given base {base_snap.ref!r} has fingerprint {found}: its weights differ. Pass the base the "
            "delta was made from."
        )
    names = set(reader.names())
    listed = {e.name for e in doc.entries}
    if listed != names:
        extra, missing = sorted(names - listed), sorted(listed - names)
        raise _altered(folder, f"the file holds tensors the document does not list ({[show(n) for n in extra[:3]]}) "
                               f"or lacks listed ones ({[show(n) for n in missing[:3]]})")
    stored: dict[str, torch.Tensor] = {}
    stored_digest = hashlib.sha256()
    for entry in doc.entries:
        info = reader.info(entry.name)
        shape = entry.shape if entry.stored == "full" else (entry.kept,)
        if _DTYPE_NAMES.get(info.dtype) != entry.dtype or tuple(info.shape) != shape:
            raise _altered(folder, f"tensor {show(entry.name)} is stored as {info.dtype} {tuple(info.shape)}, but the "
                                   f"document says {entry.dtype} {shape}")
        stored[entry.name] = reader.read(entry.name)
        _hash_tensor(stored_digest, entry.name, stored[entry.name])
    if f"sha256:{stored_digest.hexdigest()}" != doc.stored_digest:
        raise CorruptCheckpointError(
            f"file {COMPACT_FILE} in {folder} is corrupt: the tensors it holds do not match the sha256 recorded when "
            "it was written (a changed byte in its data). Fetch it or write it again."
        )
    base_reader = TensorReader(base_snap.path)
    params = {"q": doc.q} if doc.method == "darex_q" else {}
    out: dict[str, torch.Tensor] = {}
    base_digest = hashlib.sha256()
    for entry in doc.entries:
        if entry.stored == "full":
            out[entry.name] = stored[entry.name]
            continue
        base_t = _base_tensor(base_reader, entry, folder)
        _hash_tensor(base_digest, entry.name, base_t)
        if masks.tensor_key(doc.seed, entry.name) != entry.key:
            raise _altered(folder, f"the Philox key of {show(entry.name)} is not the one (seed, name) derive; the "
                                   "delta was altered or written by an incompatible deltakit")
        keep = masks.keep_mask(doc.seed, entry.name, entry.shape, doc.rate).reshape(-1)  # (numel,) bool
        if int(keep.sum()) != entry.kept:
            raise _altered(folder, f"tensor {show(entry.name)} records {entry.kept} kept values, but its mask "
                                   f"(seed {doc.seed}, rate {doc.rate}) keeps {int(keep.sum())}")
        ft_filled = base_t.clone()  # dropped entries: base, so their delta is zero whatever the fine-tune held
        ft_filled.view(-1)[keep] = stored[entry.name]  # (kept,) fine-tuned values back in place
        pruned = torch.empty_like(base_t)
        try:
            apply_method(pruned, base_t, ft_filled, method=doc.method, rate=doc.rate, seed=doc.seed,
                         name=entry.name, **params)
        except ValueError as err:  # e.g. non-finite stored values
            raise _altered(folder, f"tensor {show(entry.name)} cannot be rebuilt ({err})") from None
        out[entry.name] = pruned
    if f"sha256:{base_digest.hexdigest()}" != doc.base_digest:
        raise CompactDeltaError(
            f"compact delta {folder} was made against base {doc.base_ref!r}; the given base {base_snap.ref!r} has the "
            "same fingerprint but different values in the pruned tensors (their sha256 differs), so the rebuilt "
            "weights would be wrong. Pass the base the delta was made from."
        )
    return out, doc


def materialise_compact_delta(folder: str | os.PathLike[str], base: str | os.PathLike[str] | Snapshot,
                              out_folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Rebuild a compact delta (:func:`load_compact_delta`) and write it as a loadable model folder.

    ``out_folder`` gets ``model.safetensors`` (the full pruned state dict), the config and tokenizer files saved
    with the delta, and a ``README.md`` card (``base_model``, ``base_model_relation: finetune``, the method, rate and
    seed). ``transformers``' ``from_pretrained`` loads it.

    Args:
        folder: A compact delta folder.
        base: The base it was made against.
        out_folder: The target folder.
        overwrite: Replace an existing non-empty ``out_folder``.

    Returns:
        ``out_folder`` as a Path.

    Raises:
        ExportError: ``out_folder`` exists and is not empty, or is the compact delta's own folder; the compact delta
            has no ``config.json``, or one of its side files is a link leading outside it.
        The errors of :func:`load_compact_delta`.
    """
    folder, out_folder = Path(folder), Path(out_folder)
    _check_target(out_folder, overwrite)
    if _overlaps(out_folder, folder):
        raise ExportError(f"out_folder {out_folder} is the compact delta's folder (or holds it): pick another folder")
    base_snap = _resolve(base)
    state, doc = _rebuild(folder, base_snap)
    fine_tune = doc.raw.get("fine_tune")
    fine_tune = (fine_tune.get("repo_id") or fine_tune.get("ref")) if isinstance(fine_tune, dict) else None
    fine_tune = fine_tune if isinstance(fine_tune, str) else None  # untrusted: text only, into the card
    from safetensors.torch import save_file

    with _staged(out_folder, overwrite) as staging:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if "config.json" not in _copy_side_files(folder, staging):
            raise ExportError(f"compact delta {folder} carries no config.json, so the rebuilt weights would not load "
                              "as a model; copy the fine-tune's config.json into it (save_compact_delta does).")
        front = {
            "base_model": _hub_name(base_snap),
            "base_model_relation": "finetune",
            "library_name": "transformers",
            "tags": ["deltakit", doc.method, "pruned"],
            "deltakit": {"method": doc.method, "rate": doc.rate, "seed": doc.seed, "q": doc.q, "scale": doc.scale,
                         "fine_tune": fine_tune, "materialised_from": COMPACT_FORMAT},
        }
        body = (f"# Pruned fine-tune (materialised from a compact delta)\n\nRebuilt by deltakit from a "
                f"`{COMPACT_FORMAT}` compact delta and its base `{_hub_name(base_snap)}`: {doc.method} at rate "
                f"{doc.rate:g} with seed {doc.seed}"
                + (f" and q = {doc.q:g}" if doc.q is not None else "") + ". The weights equal the pruned fine-tune "
                "bit for bit.")
        write_card(staging, front, body)
    return out_folder


def _compact_params(method: str, q: float | None) -> dict[str, Any]:
    """The method's parameters for a compact delta; refuse methods whose mask is not a function of (seed, name)."""
    if method not in COMPACT_METHODS:
        get_method(method)  # an unknown name: the registry's KeyError lists the methods
        raise CompactDeltaError(
            f"method {method!r} cannot be stored as a compact seeded delta: only element-wise random plans "
            f"{list(COMPACT_METHODS)} keep entries by a counter-based mask that is a function of (seed, tensor "
            "name), so it can be regenerated on load. Export a model folder instead (export_pruned)."
        )
    if method == "darex_q":
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise CompactDeltaError(f"darex_q needs one float q with 1 - rate <= q <= 1, got {q!r}; a per-row q cannot "
                                    "be stored in a compact delta (export a model folder instead)")
        return {"q": float(q)}
    if q is not None:
        raise CompactDeltaError(f"q is a parameter of darex_q only; {method} takes none (got q={q!r})")
    return {}


def _compact_scale(method: str, rate: float, params: Mapping[str, Any]) -> float:
    """The plan's scale (validates q against the rate): what kept deltas are multiplied by."""
    plan = get_method(method).plan(torch.empty(0), rate=rate, **params)
    if plan.axis != "element" or not isinstance(plan.scale, float):
        raise CompactDeltaError(f"{method} is not an element-wise plan with one scale; it cannot be stored compactly")
    return plan.scale


def _compact_card(doc: Mapping[str, Any], base: Snapshot, ft: Snapshot, kept: int, pruned: int, delta_bytes: int,
                  ft_bytes: int, copied: list[str]) -> tuple[dict[str, Any], str]:
    n_pruned = sum(1 for e in doc["tensors"] if e["stored"] == "kept")
    n_full = len(doc["tensors"]) - n_pruned
    front = {
        "base_model": _hub_name(base),
        "base_model_relation": "finetune",
        "tags": ["deltakit", "compact-delta", doc["method"]],
        "deltakit": {
            "format": COMPACT_FORMAT,
            "method": doc["method"],
            "rate": doc["rate"],
            "seed": doc["seed"],
            "q": doc["q"],
            "scale": doc["scale"],
            "fine_tune": _hub_name(ft),
            "base_fingerprint": doc["base"]["fingerprint"],
            "tensors_pruned": n_pruned,
            "tensors_full": n_full,
            "entries_pruned": pruned,
            "entries_kept": kept,
            "delta_bytes": delta_bytes,
            "fine_tune_bytes": ft_bytes,
        },
    }
    q = f", q = {doc['q']:g}" if doc["q"] is not None else ""
    body = f"""# Compact seeded delta of `{_hub_name(ft)}`

The fine-tune `{_hub_name(ft)}` of `{_hub_name(base)}`, pruned with `{doc['method']}` at rate {doc['rate']:g}
(fraction of delta entries dropped), seed {doc['seed']}{q}, kept-delta scale {doc['scale']!r}, stored in
`{COMPACT_FILE}` ({delta_bytes:,} bytes; the fine-tune's weights take {ft_bytes:,} bytes).

**Format `{COMPACT_FORMAT}`.** For each of the {n_pruned} pruned tensors, only the fine-tuned values at the kept
positions ({kept:,} of {pruned:,} entries), 1-D and in the checkpoint's own dtype; the other {n_full} tensors
(classifier head, excluded tensors, buffers) in full. The safetensors `__metadata__` key `{_META_KEY}` holds a JSON
document: the method, rate, seed, q, scale, the base's reference, content fingerprint and the sha256 of the base
values the rebuild uses, and per pruned tensor its shape, dtype, kept count and 8-byte Philox key.

**The index costs nothing but 8 bytes of key per tensor.** Entry `i` of tensor `name` is kept iff its
counter-based uniform number `u >= rate` (Philox4x32-10 keyed by `blake2b(seed, name)`, `deltakit.masks`): the
mask is a function of (seed, tensor name), regenerated on load; a bitmask would cost one bit per entry, a list of
indices 4 bytes per kept entry.

**Loading** needs deltakit and the base: `deltakit.export.load_compact_delta(folder, base)` rebuilds every pruned
tensor as `apply_method(base, ft_filled)`, where `ft_filled` is the base with the kept values put back, which equals
the pruned fine-tune bit for bit; `materialise_compact_delta(folder, base, out)` writes a loadable model folder.
The base is checked against the recorded fingerprint. Files copied from the fine-tune: {', '.join(copied) or 'none'}.
"""
    return front, body


def _open_compact(folder: Path) -> tuple[TensorReader, dict[str, str]]:
    """The strict reader of ``folder/delta.safetensors`` and its ``__metadata__`` (header validated twice, equal)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"compact delta folder {folder} does not exist; write one with save_compact_delta.")
    if not os.path.lexists(folder / COMPACT_FILE):
        raise FileNotFoundError(f"{folder} holds no {COMPACT_FILE}: it is not a compact delta written by "
                                "save_compact_delta.")
    reader = _CompactReader(folder)
    try:
        metadata, entries, data_start = _read_header(folder / COMPACT_FILE)
    except Problem as problem:
        raise problem.error(COMPACT_FILE, folder) from None
    now = {k: (dtype, shape, data_start + begin, end - begin) for k, (dtype, shape, begin, end) in entries.items()}
    then = {k: (i.dtype, tuple(i.shape), i.start, i.nbytes) for k, i in ((k, reader.info(k)) for k in reader.names())}
    if now != then:
        raise CorruptCheckpointError(f"file {COMPACT_FILE} in {folder} changed while it was being read; read it again "
                                     "once nothing writes to it.")
    return reader, metadata


class _CompactReader(TensorReader):
    """deltakit's strict safetensors reader (header rules, regular files inside the folder, no pickle) applied to the
    one file ``delta.safetensors`` instead of ``model.safetensors``."""

    def _select(self) -> tuple[list[str], dict[str, str] | None, set[str]]:
        return [COMPACT_FILE], None, {COMPACT_FILE}


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple], int]:
    """``(__metadata__, entries, data start)`` of a safetensors file, checked by the format's rules."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never wait on a FIFO swapped in after the reader's checks
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Invalid("it is not a regular file")
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise Truncated("the file ends inside the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER:
            raise Invalid(f"its header length exceeds the format's limit of {MAX_HEADER:,} bytes")
        if length > st.st_size - 8:
            raise Truncated("the file ends inside its header")
        raw = os.pread(fd, length, 8)
    finally:
        os.close(fd)
    if len(raw) < length:
        raise Truncated("the file ends inside its header")
    entries = parse_header(raw, st.st_size - 8 - length)  # the format's rules, as the reader applies them
    metadata = load_json(raw, "the header").get("__metadata__", {})
    return metadata, entries, 8 + length


def _parse_document(metadata: Mapping[str, str], folder: Path) -> _Document:
    """Validate the JSON document of a compact delta against its schema; every fault is a CompactDeltaError."""
    text = metadata.get(_META_KEY)
    if not isinstance(text, str):
        raise _altered(folder, f"its __metadata__ has no {_META_KEY!r} document; it is not a compact delta")
    try:
        raw = load_json(text.encode("utf-8"), "the document")
    except Problem as problem:
        raise _altered(folder, str(problem)) from None
    if not isinstance(raw, dict):
        raise _altered(folder, "the document is not a JSON object")
    fmt = raw.get("format")
    if fmt != COMPACT_FORMAT:
        ours = str(fmt).partition("/")[0] == COMPACT_FORMAT.partition("/")[0]
        hint = ("written by another deltakit version: this one reads version 1; upgrade deltakit or write it again"
                if ours else "not a deltakit compact delta")
        raise CompactDeltaError(f"compact delta {folder} has format {show(fmt)}, expected {COMPACT_FORMAT!r} ({hint}).")
    method = raw.get("method")
    if method not in COMPACT_METHODS:
        raise _altered(folder, f"method {show(method)} is not one of {list(COMPACT_METHODS)}")
    rate, seed, q, scale = raw.get("rate"), raw.get("seed"), raw.get("q"), raw.get("scale")
    if not _is_number(rate) or not 0.0 <= rate <= 1.0:
        raise _altered(folder, f"rate {show(rate)} is not a number in [0, 1]")
    if type(seed) is not int:
        raise _altered(folder, f"seed {show(seed)} is not an integer")
    if not _is_number(scale):
        raise _altered(folder, f"scale {show(scale)} is not a number")
    if (q is None) != (method != "darex_q") or (q is not None and not _is_number(q)):
        raise _altered(folder, f"q {show(q)} does not fit method {method} (a number for darex_q only)")
    try:
        expected = _compact_scale(method, float(rate), {"q": float(q)} if q is not None else {})
    except ValueError as err:
        raise _altered(folder, f"rate {rate!r} and q {q!r} are inconsistent ({err})") from None
    if float(scale) != expected:
        raise _altered(folder, f"scale {scale!r} is not the scale {expected!r} that {method} at rate {rate!r}"
                               + (f" with q {q!r}" if q is not None else "") + " gives")
    base = raw.get("base")
    if not (isinstance(base, dict) and isinstance(base.get("ref"), str)
            and isinstance(base.get("fingerprint"), str) and base["fingerprint"]
            and isinstance(base.get("digest"), str) and base["digest"]):
        raise _altered(folder, "base is not an object with a ref, a fingerprint and a digest")
    stored_digest = raw.get("stored_digest")
    if not isinstance(stored_digest, str) or not stored_digest:
        raise _altered(folder, "stored_digest is not a string")
    tensors = raw.get("tensors")
    if not isinstance(tensors, list):
        raise _altered(folder, "tensors is not a list")
    entries = tuple(_parse_entry(t, folder) for t in tensors)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise _altered(folder, "a tensor is listed twice")
    return _Document(method, float(rate), seed, float(q) if q is not None else None, float(scale), base["ref"],
                     base["fingerprint"], base["digest"], stored_digest, entries, raw)


def _parse_entry(item: object, folder: Path) -> _Entry:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise _altered(folder, "a tensors entry is not an object with a name")
    name, stored, shape, dtype = item["name"], item.get("stored"), item.get("shape"), item.get("dtype")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _altered(folder, f"the shape of {show(name)} is not a list of non-negative integers")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _altered(folder, f"the dtype of {show(name)} is {show(dtype)}, not one of {', '.join(DTYPES)}")
    if stored == "full":
        return _Entry(name, stored, tuple(shape), dtype)
    if stored != "kept":
        raise _altered(folder, f"{show(name)} is stored as {show(stored)}, not 'kept' or 'full'")
    kept, key, base_name = item.get("kept"), item.get("key"), item.get("base_name")
    if not DTYPES[dtype].is_floating_point:
        raise _altered(folder, f"pruned tensor {show(name)} has the non-float dtype {dtype}")
    if type(kept) is not int or not 0 <= kept <= math.prod(shape):
        raise _altered(folder, f"the kept count of {show(name)} is {show(kept)}, not an integer in [0, numel]")
    if type(key) is not int or not isinstance(base_name, str):
        raise _altered(folder, f"pruned tensor {show(name)} lacks its integer key or its base_name")
    return _Entry(name, stored, tuple(shape), dtype, base_name, kept, key)


def _base_tensor(reader: TensorReader, entry: _Entry, folder: Path) -> torch.Tensor:
    """The base tensor of a pruned entry, in the entry's dtype, after checking name, kind and shape."""
    if entry.base_name not in reader:
        raise _altered(folder, f"pruned tensor {show(entry.name)} names base tensor {show(entry.base_name)}, which "
                               f"the base {reader.folder} does not have")
    info = reader.info(entry.base_name)
    if not info.is_float or tuple(info.shape) != entry.shape:
        raise _altered(folder, f"pruned tensor {show(entry.name)} has shape {entry.shape}, but base tensor "
                               f"{show(entry.base_name)} is {info.dtype} {tuple(info.shape)}")
    return reader.read(entry.base_name).to(DTYPES[entry.dtype])


def _altered(folder: Path, detail: str) -> CompactDeltaError:
    return CompactDeltaError(f"compact delta {folder / COMPACT_FILE} is invalid: {detail}. It was not written by "
                             "save_compact_delta or was altered since; write it again from the fine-tune.")


def _is_number(value: object) -> bool:
    """A finite JSON number that converts to float exactly enough (bool and 400-digit integers are not)."""
    return (type(value) is int and abs(value) < 2**53) or (type(value) is float and math.isfinite(value))


def _hash_tensor(digest: Any, name: str, t: torch.Tensor) -> None:
    """Feed one tensor's name, dtype, shape and bytes to a hash."""
    digest.update(f"{name}\0{_dtype_name(t)}\0{tuple(t.shape)}\0".encode())
    digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _dtype_name(t: torch.Tensor) -> str:
    return _DTYPE_NAMES[t.dtype]


def _content_fingerprint(snapshot: Snapshot) -> str:
    """The fingerprint of a snapshot's files, whatever reference reached them (a Hub commit pins only one repo)."""
    return fingerprint(dataclasses.replace(snapshot, commit=None))


# ----------------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------------


def push_to_hub(folder: str | os.PathLike[str], repo_id: str, *, token: str | None = None,
                private: bool | None = None, revision: str | None = None, endpoint: str | None = None) -> str:
    """Upload an exported folder to a Hub repo (created if missing) in one commit, with huggingface_hub's own client.

    One ``HfApi(endpoint=...).create_repo(repo_id, exist_ok=True)`` and one ``upload_folder``. The token is passed to
    huggingface_hub in memory only; None uses the user's login (``hf auth login``) or ``HF_TOKEN``. Requests are
    bounded in time (:func:`deltakit.hubhttp.bound_hub_requests`).

    Args:
        folder: A folder written by :func:`export_model`, :func:`export_pruned` or :func:`save_compact_delta`.
        repo_id: ``org/name`` or ``name``.
        token: An access token with write permission, or None.
        private: Create the repo private (ignored when it exists); None: the namespace's default.
        revision: An existing branch to commit to; None: ``main``.
        endpoint: The Hub's URL; None: ``HF_ENDPOINT`` or huggingface.co.

    Returns:
        The pushed model pinned to the new commit, ``repo_id@<sha>``: a reference :func:`deltakit.sources.resolve`
        accepts.

    Raises:
        ExportError: ``folder`` is not a non-empty folder.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused (its message says why: permission, missing branch).
        deltakit.sources.SourceError: the Hub did not answer in time.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ExportError(f"{folder} is not a non-empty folder; export a model first (export_pruned).")
    from huggingface_hub import HfApi

    from deltakit.hubhttp import bound_hub_requests

    bound_hub_requests()
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                             commit_message=f"Upload {folder.name} (deltakit export)")
    return f"{repo_id}@{info.oid}"


# ----------------------------------------------------------------------------------------------------------------
# Folders, references and cards
# ----------------------------------------------------------------------------------------------------------------


def _check_target(folder: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder unless ``overwrite``; before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"target {folder} is a file, not a folder; pass another folder or move the file away.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ExportError(f"target folder {folder} exists and is not empty; pass overwrite=True (CLI: --force) to "
                          "replace it, or pick another folder.")


@contextmanager
def _staged(folder: Path, overwrite: bool) -> Iterator[Path]:
    """Write into a staging folder beside ``folder``, then rename it into place; remove it on any failure.

    An existing target is moved aside only once the new folder is complete, and removed after the rename; if that
    rename fails the old folder is put back. A reader never sees a half-written folder at ``folder``. A full disk while
    safetensors writes (its ``SafetensorError``) is raised as an ``OSError`` naming the folder, like any other write.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = folder.parent / f".{folder.name}.staging-{tag}"
    staging.mkdir()  # honours the umask, unlike mkdtemp's 0700: the export is a normal folder
    try:
        try:
            yield staging
        except SafetensorError as err:  # safetensors reports a full disk as its own error, not an OSError
            raise OSError(f"could not write {folder}: {err}. Free disk space (or raise the file size limit) and "
                          f"export again; nothing was written to {folder}.") from err
        _check_target(folder, overwrite)  # it may have been filled while we wrote
        if folder.is_dir() and any(folder.iterdir()):
            aside = folder.parent / f".{folder.name}.replaced-{tag}"
            os.rename(folder, aside)
            try:
                os.rename(staging, folder)
            except BaseException:
                os.rename(aside, folder)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, folder)  # an empty target directory is replaced by rename(2)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _resolve(ref: str | os.PathLike[str] | Snapshot) -> Snapshot:
    if isinstance(ref, Snapshot):
        return ref
    from deltakit.sources import resolve

    return resolve(ref)


def _hub_name(snapshot: Snapshot) -> str:
    """How a card names a model: its Hub id (or the card's model_id), else the reference."""
    return snapshot.repo_id or snapshot.ref


def _overlaps(a: Path, b: Path) -> bool:
    ra, rb = a.resolve(), b.resolve()
    return ra == rb or rb.is_relative_to(ra)


def _check_not_source(folder: Path, *snapshots: Snapshot) -> None:
    """Refuse writing over a folder the export reads (``overwrite=True`` would delete the source)."""
    for snap in snapshots:
        if _overlaps(folder, snap.path):
            raise ExportError(f"target {folder} is (or holds) the folder of {snap.label!r}, which this export reads; "
                              "pick another folder.")


def _tensor_method(method: str):
    info = get_method(method)
    if info.applies_as is not None or info.reference_rate is not None or info.unchecked is None:
        raise ExportError(f"{method!r} is a sweep entry, not a tensor method: export the method it applies as "
                          f"({info.applies_as or method!r}) with the parameters its search chose.")
    return info


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the config and tokenizer files of ``src`` that exist; only regular files inside it (or its Hub blobs)."""
    roots = [src.resolve()]
    if src.resolve().parent.name == "snapshots" and src.resolve().parent.parent.name.startswith("models--"):
        roots.append(src.resolve().parent.parent / "blobs")  # a Hub cache snapshot links its files there
    copied = []
    for name in _SIDE_FILES:
        path = src / name
        if not os.path.lexists(path):
            continue
        real = path.resolve()
        if not any(real.is_relative_to(r) for r in roots) or not stat.S_ISREG(real.stat().st_mode):
            raise ExportError(f"{name} in {src} is not a regular file inside the folder (a link outside, a FIFO or a "
                              "device); refusing to copy it.")
        shutil.copyfile(real, dst / name)
        copied.append(name)
    return copied


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _plain(value: object) -> object:
    """A card value as plain YAML data: tensors and NumPy scalars become numbers or short lists, paths text."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.item()
        return value.tolist() if value.numel() <= 64 else f"tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    return str(value)


def _refuse_tokens(value: object) -> None:
    if isinstance(value, str) and _TOKEN_RE.search(value):
        raise ExportError("a card value looks like a Hugging Face access token; deltakit never writes tokens. "
                          "Remove it from the card.")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_tokens(k)
            _refuse_tokens(v)
    elif isinstance(value, list):
        for v in value:
            _refuse_tokens(v)
