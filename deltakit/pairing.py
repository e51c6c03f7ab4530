"""Homology pre-flight: which tensors of a fine-tune correspond to which tensors of its base.

Checks, before any tensor data is read (headers only):

* architecture: ``config.model_type`` must agree (a BERT fine-tune against a Llama base is refused);
* names, allowing one prefix difference: a bare ``BertModel`` base has keys ``encoder.layer.0...`` while its
  ``BertForSequenceClassification`` fine-tunes have ``bert.encoder.layer.0...``. The prefix pair that matches
  the most names wins;
* non-float tensors (``embeddings.position_ids``) are skipped; fine-tune tensors with no base counterpart
  (a new classifier head) are reported as unpaired and never pruned;
* dtypes: a tensor stored as a float in one checkpoint and as a non-float in the other (a weight relabelled as
  ``I32``) is refused rather than skipped as a buffer, which would drop it from the statistics unnoticed;
* shapes: a mismatch is refused, unless ``shared_rows=True`` asks to compare the leading rows both tensors have.
  That covers vocabulary rows only: 2-D tensors of module kind ``embedding`` or ``head`` (a tokenizer with added
  tokens); any other shape difference (a LayerNorm of 64 vs 80) means the models are not homologous;
* the card: a warning when the fine-tune's model card names a ``base_model`` other than the given base.

Which paired tensors are *prunable* is a named preset, as in the papers (MergeLM for DARE, arXiv:2311.03099; DAREx, arXiv:2410.09344), refined by
user include/exclude regexes. Excluded tensors keep their fine-tuned values bit for bit.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from deltakit.names import MODULE_KINDS, is_buffer, is_head, layer_index, module_kind
from deltakit.refs import Snapshot
from deltakit.hubstream import HubTensorReader, open_reader
from deltakit.tensors import TensorReader

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "is_causal_lm", "resolve_preset", "prunable_selector", "TensorPair",
           "Pairing", "PairingError", "pair_models",
           "module_kind", "layer_index", "MODULE_KINDS"]


class PairingError(ValueError):
    """Base and fine-tune are not homologous (or the request cannot be honoured)."""


@dataclass(frozen=True)
class Preset:
    """A named prunable set: a tensor is prunable iff its module kind is one of ``kinds`` (or kinds is empty), it
    matches some ``include`` (or include is empty), no ``exclude`` regex (``re.fullmatch`` on the fine-tune's tensor
    name), and is not the output head unless ``heads`` (:func:`deltakit.names.is_head`)."""

    name: str
    description: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    heads: bool = True
    kinds: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("mergelm_encoder", "MergeLM encoders: every parameter except the classifier head", heads=False),
        Preset("mergelm_decoder", "MergeLM decoders: every parameter, embeddings and lm_head included"),
        Preset("darex_encoder", "DAREx encoders: same as mergelm_encoder", heads=False),
        Preset("darex_decoder", "DAREx decoders: attention and MLP weights and biases only; embeddings, norms, "
               "lm_head keep fine-tuned values",
               kinds=("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "ffn_in", "ffn_out")),
    )
}

#: The preset used when none is named: ``auto`` resolves per fine-tune (:func:`resolve_preset`).
DEFAULT_PRESET = "auto"
_VOCAB_KINDS = ("embedding", "head")  # kinds whose dim 0 may be vocabulary rows (``shared_rows``)


@dataclass(frozen=True)
class TensorPair:
    """One fine-tune tensor and its base counterpart.

    Attributes:
        name: the fine-tune's tensor name (the name used everywhere downstream, and for mask keys).
        base_name: the base checkpoint's name for it.
        shape: the compared shape (the shared leading rows if ``rows`` is set).
        rows: when shapes differ in dim 0 and shared rows were requested, the number of rows compared.
        prunable: whether the preset and regexes select it for pruning.
        kind: module kind; layer: block index or None.
    """

    name: str
    base_name: str
    shape: tuple[int, ...]
    prunable: bool
    kind: str
    layer: int | None
    rows: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Pairing:
    """The result of the pre-flight for one (base, fine-tune).

    Attributes:
        pairs: the paired float tensors, in the fine-tune's order.
        unpaired: fine-tune float tensors with no base counterpart (e.g. a new head); never pruned.
        base_only: base float tensors absent from the fine-tune.
        skipped: non-float tensors (buffers such as ``position_ids``) and float buffers (``rotary_emb.inv_freq``,
            GPT-2's ``attn.bias``), ignored.
        base_prefix / ft_prefix: the name prefixes stripped to match.
        warnings: human-readable notes (card mismatch, shared rows).
        preset: the preset that chose the prunable tensors (``auto`` resolved, :func:`resolve_preset`).
    """

    pairs: tuple[TensorPair, ...]
    unpaired: tuple[str, ...]
    base_only: tuple[str, ...]
    skipped: tuple[str, ...]
    base_prefix: str
    ft_prefix: str
    warnings: tuple[str, ...] = field(default=())
    preset: str = DEFAULT_PRESET

    def prunable(self) -> list[TensorPair]:
        return [p for p in self.pairs if p.prunable]

    def to_frame(self) -> pd.DataFrame:
        """One row per fine-tune tensor: name, base_name, status (paired/unpaired/skipped), prunable, kind, layer."""
        rows = [dict(name=p.name, base_name=p.base_name, status="paired", prunable=p.prunable, kind=p.kind,
                     layer=p.layer, numel=p.numel) for p in self.pairs]
        rows += [dict(name=n, base_name=None, status="unpaired", prunable=False, kind=module_kind(n),
                      layer=layer_index(n), numel=None) for n in self.unpaired]
        rows += [dict(name=n, base_name=None, status="skipped", prunable=False, kind=module_kind(n),
                      layer=layer_index(n), numel=None) for n in self.skipped]
        return pd.DataFrame(rows)


def _prefixes(names: list[str]) -> set[str]:
    out = {""}
    for n in names:
        if "." in n:
            out.add(n.split(".", 1)[0] + ".")
    return out


def _strip(name: str, prefix: str) -> str | None:
    if not prefix:
        return name
    return name[len(prefix):] if name.startswith(prefix) else None


def _best_prefixes(base_names: list[str], ft_names: list[str]) -> tuple[str, str, dict[str, str]]:
    """Choose (base_prefix, ft_prefix) maximising matched names; return the ft->base name map."""
    best: tuple[int, str, str, dict[str, str]] = (-1, "", "", {})
    base_set = set(base_names)
    for bp in sorted(_prefixes(base_names)):
        for fp in sorted(_prefixes(ft_names)):
            mapping: dict[str, str] = {}
            for n in ft_names:
                core = _strip(n, fp)
                if core is None:
                    # A name outside the prefix (e.g. "classifier.weight") may still match verbatim.
                    core = n
                candidate = bp + core
                if candidate in base_set:
                    mapping[n] = candidate
            if len(mapping) > best[0]:
                best = (len(mapping), bp, fp, mapping)
    return best[1], best[2], best[3]


def is_causal_lm(snapshot: Snapshot) -> bool:
    """Whether a checkpoint is a decoder LM (its config names a ``*ForCausalLM`` or ``*LMHeadModel`` class)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in snapshot.config.get("architectures") or ())


def resolve_preset(preset: str, fine_tune: Snapshot) -> str:
    """The preset ``auto`` stands for: ``darex_decoder`` for a decoder LM fine-tune (as the DAREx paper prunes
    decoders), else ``mergelm_encoder`` (MergeLM's encoders: all but the head). Other names are returned as given."""
    if preset != "auto":
        return preset
    return "darex_decoder" if is_causal_lm(fine_tune) else "mergelm_encoder"


def prunable_selector(preset: str, include: Sequence[str] | None = None,
                      exclude: Sequence[str] | None = None) -> Callable[[str], bool]:
    """The prunable-set predicate of a preset refined by include/exclude regexes (``re.fullmatch`` on names).

    Raises:
        KeyError: unknown preset (the message lists them). ValueError: a regex that does not compile.
    """
    if preset == "auto":  # resolved per fine-tune by pair_models; here: checking names and regexes only
        preset = "mergelm_encoder"
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; available: {['auto', *sorted(PRESETS)]}. Or pass include/exclude "
                       "regexes.")
    p = PRESETS[preset]
    try:
        inc = [re.compile(r) for r in (*p.include, *(include or ()))]
        exc = [re.compile(r) for r in (*p.exclude, *(exclude or ()))]
    except re.error as err:
        raise ValueError(f"bad include/exclude regex {err.pattern!r}: {err}; regexes fullmatch tensor names, e.g. "
                         "'.*classifier.*'.") from err

    def prunable(name: str) -> bool:
        if (inc and not any(r.fullmatch(name) for r in inc)) or (not p.heads and is_head(name)):
            return False
        if p.kinds and module_kind(name) not in p.kinds:
            return False
        return not any(r.fullmatch(name) for r in exc)

    return prunable


def _check_architecture(base: Snapshot, ft: Snapshot) -> None:
    bt, ftt = base.config.get("model_type"), ft.config.get("model_type")
    if bt and ftt and bt != ftt:
        raise PairingError(
            f"different architectures: base {base.label!r} is model_type {bt!r}, fine-tune {ft.label!r} is {ftt!r}. "
            "Deltas only make sense between a model and its own fine-tune; pick the base the fine-tune was trained from."
        )


def _check_dtype_kinds(base: Snapshot, ft: Snapshot, br: TensorReader | HubTensorReader,
                       fr: TensorReader | HubTensorReader, mapping: dict[str, str]) -> None:
    """Refuse paired names stored as a float on one side and a non-float on the other (a relabelled weight)."""
    relabelled = [f"{n}: base {br.info(b).dtype} vs fine-tune {fr.info(n).dtype}" for n, b in mapping.items()
                  if br.info(b).is_float != fr.info(n).is_float]
    if relabelled:
        raise PairingError(
            f"{len(relabelled)} tensors have a float dtype in one checkpoint and a non-float dtype in the other "
            f"(base {base.label!r}, fine-tune {ft.label!r}): {relabelled[:5]}. Their values cannot be compared "
            "(a weight relabelled as an integer dtype would be read as integers); re-save the checkpoint with each "
            "weight in a float dtype, or pick a base and fine-tune whose dtypes agree."
        )


def _card_warning(base: Snapshot, ft: Snapshot) -> str | None:
    named = ft.card.get("base_model")
    if not named:
        return None
    named_list = [named] if isinstance(named, str) else list(named)
    known = {x for x in (base.repo_id, base.card.get("model_id"), base.ref) if x}
    if known and not known.intersection(named_list):
        return (f"the card of {ft.label!r} names base_model {named_list} but the given base is {sorted(known)}; "
                "deltas against the wrong base are large and meaningless for DARE (check you picked the right base).")
    return None


def pair_models(
    base: Snapshot,
    ft: Snapshot,
    *,
    preset: str = DEFAULT_PRESET,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = None,
    shared_rows: bool = False,
    base_reader: TensorReader | HubTensorReader | None = None,
    ft_reader: TensorReader | HubTensorReader | None = None,
    allow_pickle: bool = False,
) -> Pairing:
    """Run the homology pre-flight for one fine-tune against its base (headers only).

    Args:
        base: the pre-trained snapshot.
        ft: the fine-tuned snapshot.
        preset: the named prunable set (:data:`PRESETS`), or ``auto`` (:func:`resolve_preset`).
        include: extra regexes a tensor must fullmatch to be prunable.
        exclude: extra regexes that make a tensor not prunable.
        shared_rows: when a 2-D embedding or head tensor differs only in dim 0 (vocabulary rows), compare the
            shared leading rows instead of refusing. Other shape differences are always refused.
        base_reader / ft_reader: readers to reuse (opened from the snapshots otherwise, by range requests for
            snapshots resolved with ``stream=True``).
        allow_pickle: passed to the readers.

    Returns:
        The pairing.

    Raises:
        PairingError: different architectures, no common tensors, a tensor float in one checkpoint and non-float
            in the other, or shape mismatches (the message lists them and says whether shared rows would apply).
        KeyError: unknown preset.
    """
    _check_architecture(base, ft)
    preset = resolve_preset(preset, ft)
    is_prunable = prunable_selector(preset, include, exclude)
    br = base_reader or open_reader(base, allow_pickle=allow_pickle)
    fr = ft_reader or open_reader(ft, allow_pickle=allow_pickle)
    base_float = [n for n in br.names() if br.info(n).is_float and not is_buffer(n)]
    ft_names = fr.names()
    skipped = tuple(n for n in ft_names if not fr.info(n).is_float or is_buffer(n))
    ft_float = [n for n in ft_names if fr.info(n).is_float and not is_buffer(n)]
    bp, fp, mapping = _best_prefixes(br.names(), ft_names)
    _check_dtype_kinds(base, ft, br, fr, mapping)
    mapping = {n: b for n, b in mapping.items() if fr.info(n).is_float and not is_buffer(n)}
    if not mapping:
        raise PairingError(
            f"no common tensors between base {base.label!r} ({len(base_float)} tensors, e.g. {base_float[:2]}) and "
            f"fine-tune {ft.label!r} ({len(ft_float)} tensors, e.g. {ft_float[:2]}). Are these the same architecture?"
        )
    notes: list[str] = []
    if (w := _card_warning(base, ft)) is not None:
        warnings.warn(w, stacklevel=2)
        notes.append(w)
    pairs: list[TensorPair] = []
    mismatches: list[str] = []
    rows_only = True  # every mismatch is in the vocabulary rows of an embedding or head
    for n in ft_float:
        if n not in mapping:
            continue
        bs, fs = br.info(mapping[n]).shape, fr.info(n).shape
        rows = None
        shape = fs
        if bs != fs:
            vocab_rows = len(bs) == len(fs) == 2 and bs[1] == fs[1] and module_kind(n) in _VOCAB_KINDS
            if shared_rows and vocab_rows:
                rows = min(bs[0], fs[0])
                shape = (rows, *fs[1:])
                notes.append(f"{n}: base has {bs[0]} rows, fine-tune {fs[0]}; comparing the first {rows}")
            else:
                rows_only = rows_only and vocab_rows
                mismatches.append(f"{n}: base {tuple(bs)} vs fine-tune {tuple(fs)}")
                continue
        pairs.append(TensorPair(n, mapping[n], tuple(shape), is_prunable(n), module_kind(n), layer_index(n), rows))
    if mismatches:
        hint = (" Shapes differ only in the number of vocabulary rows: pass shared_rows=True (CLI: --shared-rows) to "
                "compare the rows both have." if rows_only else
                " shared_rows covers vocabulary rows only (2-D embedding and head tensors); any other shape difference "
                "means these checkpoints are not homologous: pick the base this fine-tune was trained from.")
        raise PairingError(f"{len(mismatches)} tensors differ in shape between base {base.label!r} and fine-tune "
                           f"{ft.label!r}: {mismatches[:5]}.{hint}")
    unpaired = tuple(n for n in ft_float if n not in mapping)
    matched_base = set(mapping.values())
    base_only = tuple(n for n in base_float if n not in matched_base)
    return Pairing(tuple(pairs), unpaired, base_only, skipped, bp, fp, tuple(notes), preset)
