"""Delta statistics: what fine-tuning changed, per tensor, per layer, per module kind, and across fine-tunes.

Streaming: the base and each fine-tune are read one tensor at a time (each tensor read once); per tensor we
keep only *additive partials* (counts, sums of powers, an |delta| histogram), so every rollup -- by layer, by
module kind, global -- is computed from sums, never as an average of averages.

The quantities follow the DARE/DAREx papers' reporting (Yu et al. 2024, arXiv 2311.03099; Deng et al. 2025,
arXiv 2410.09344): mean |delta|, max |delta| and the fraction of entries below 0.002 / 0.005 / 0.01 / 0.03
(SFT deltas are "typically within 0.005"; continued pre-training reaches ~0.03).

Quantiles of |delta| (p50/p90/p99) come from a log-spaced histogram with 100 bins per decade over
[1e-10, 10) (values below 1e-10, zeros included, fall in the first bin; values >= 10 in the last): the reported
value is the bin's geometric centre, so it is within 1.2% (relative) of the exact quantile for |delta| >= 1e-10.
The threshold fractions are exact counts. Moments are accumulated in fp64 over finite entries; NaN/Inf entries
are counted (column ``nonfinite``) and excluded, never fatal.

With ``spectral=True`` every 2-D delta also gets the spectral statistics of :mod:`deltakit.spectral` (stable and
effective rank, top-k energy, rank at 90% / 99% of the energy, whether it looks like a merged LoRA), computed from
the delta already in memory; they are per-tensor quantities, so the module-kind rollup reports their plain means over
tensors and a count of low-rank tensors.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from deltakit.fileio import json_default, write_atomically
from deltakit.kernels import partials_triton, resolve_backend
from deltakit.pairing import DEFAULT_PRESET, Pairing, TensorPair, pair_models
from deltakit.partials import (
    BINS_PER_DECADE,
    HIST_LOG10_HI,
    HIST_LOG10_LO,
    N_BINS,
    THRESHOLDS,
    Partials,
    hist_edges,
    partials_fast,
    partials_torch,
)
from deltakit.hubstream import HubTensorReader, open_reader
from deltakit.sources import Snapshot, resolve
from deltakit.spectral import SPECTRAL_COLUMNS, spectral_stats
from deltakit.tensors import TensorReader

Reader = TensorReader | HubTensorReader

__all__ = ["Partials", "partials_torch", "DeltaStats", "delta_stats", "THRESHOLDS", "HIST_LOG10_LO",
           "HIST_LOG10_HI", "BINS_PER_DECADE", "N_BINS", "hist_edges"]

def _partials(base: torch.Tensor, ft: torch.Tensor) -> Partials:
    if resolve_backend("auto", base.device) == "triton":
        return partials_triton(base, ft)
    return partials_fast(base, ft) if base.device.type == "cpu" else partials_torch(base, ft)


@dataclass(frozen=True)
class _PairStats:
    dot: float
    sq_a: float
    sq_b: float
    agree: int
    both_nonzero: int
    topk_inter: int
    k: int

    def __add__(self, o: _PairStats) -> _PairStats:
        return _PairStats(*(a + b for a, b in zip(self.astuple(), o.astuple())))

    def astuple(self) -> tuple:
        return (self.dot, self.sq_a, self.sq_b, self.agree, self.both_nonzero, self.topk_inter, self.k)

    def row(self) -> dict[str, float]:
        denom = math.sqrt(self.sq_a * self.sq_b)
        return dict(
            cosine=self.dot / denom if denom > 0 else math.nan,
            sign_agreement=self.agree / self.both_nonzero if self.both_nonzero else math.nan,
            topk_overlap=self.topk_inter / self.k if self.k else math.nan,
        )


def _pair_stats(da: torch.Tensor, db: torch.Tensor, topk: float) -> _PairStats:
    a = torch.nan_to_num(da.reshape(-1), nan=0.0, posinf=0.0, neginf=0.0).double()
    b = torch.nan_to_num(db.reshape(-1), nan=0.0, posinf=0.0, neginf=0.0).double()
    both = (a != 0) & (b != 0)
    k = max(1, math.ceil(topk * a.numel()))
    ia = torch.topk(a.abs(), k, sorted=False).indices
    ib = torch.topk(b.abs(), k, sorted=False).indices
    inter = int(torch.isin(ia, ib).sum())
    return _PairStats(float(a @ b), float(a @ a), float(b @ b), int((torch.sign(a) == torch.sign(b))[both].sum()),
                      int(both.sum()), inter, k)


@dataclass(frozen=True)
class DeltaStats:
    """Tidy delta statistics of one base and its fine-tunes.

    Attributes:
        tensors: one row per (model, tensor).
        layers: one row per (model, layer) (tensors outside blocks have layer -1).
        kinds: one row per (model, kind).
        overall: one row per model (the global rollup).
        similarity: one row per (model_a, model_b, tensor) plus ``tensor == "__global__"`` rows; cosine of deltas,
            sign agreement (fraction of entries where both are nonzero and have the same sign) and the overlap of
            the top-k |delta| sets (|A and B| / k, k = ceil(topk * numel) per tensor).
        histograms: long format (model, kind, bin_lo, bin_hi, count), nonzero bins only; kind "all" is global.
        pairing: one row per (model, tensor) of the pre-flight (paired / unpaired / skipped, prunable).
        meta: base and fine-tune references and commits, preset, thresholds, ``spectral`` and ``spectral_k``,
            ``streamed`` (the references read by range requests).

    With spectral statistics (``delta_stats(..., spectral=True)``), ``tensors`` has the columns of
    :data:`deltakit.spectral.SPECTRAL_COLUMNS` (NaN / <NA> for tensors that are not 2-D; ``low_rank`` and
    ``spectral_exact`` are nullable booleans) and ``kinds`` has ``mean_stable_rank``, ``mean_effective_rank`` (plain
    means over the kind's 2-D tensors) and ``n_low_rank``.
    """

    tensors: pd.DataFrame
    layers: pd.DataFrame
    kinds: pd.DataFrame
    overall: pd.DataFrame
    similarity: pd.DataFrame
    histograms: pd.DataFrame
    pairing: pd.DataFrame
    meta: dict

    FRAMES = ("tensors", "layers", "kinds", "overall", "similarity", "histograms", "pairing")

    def save(self, out: str | Path) -> Path:
        """Write every frame as ``<out>/<name>.parquet``, plus ``summary.txt`` and ``summary.json``.

        Returns:
            The output folder.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.FRAMES:
            write_atomically(out / f"{name}.parquet", lambda tmp, name=name: getattr(self, name).to_parquet(tmp, index=False))
        write_atomically(out / "summary.txt", lambda tmp: tmp.write_text(self.summary() + "\n"))
        text = json.dumps(self.to_json(), indent=2, default=json_default) + "\n"
        write_atomically(out / "summary.json", lambda tmp: tmp.write_text(text))
        return out

    @classmethod
    def load(cls, out: str | Path) -> DeltaStats:
        """Read statistics written by :meth:`save`."""
        out = Path(out)
        frames = {name: pd.read_parquet(out / f"{name}.parquet") for name in cls.FRAMES}
        meta = json.loads((out / "summary.json").read_text())["meta"]
        return cls(**frames, meta=meta)

    def to_json(self) -> dict:
        """A machine-readable summary: meta, the global and per-module-kind rollups per fine-tune, similarity."""
        sim = self.similarity[self.similarity["tensor"] == "__global__"]
        return {
            "meta": self.meta,
            "global": {r["model"]: _clean(r) for r in self.overall.to_dict("records")},
            "kinds": {m: {r["kind"]: _clean(r) for r in g.to_dict("records")} for m, g in self.kinds.groupby("model")},
            "similarity": [_clean(r) for r in sim.to_dict("records")],
        }

    def summary(self) -> str:
        """A compact human-readable report."""
        lines = [f"base: {self.meta['base']}"]
        for r in self.overall.to_dict("records"):
            lines.append(
                f"  {r['model']}: {int(r['n_tensors'])} tensors, {int(r['numel']):,} params | mean|d| {r['mean_abs']:.3g}"
                f" max|d| {r['max_abs']:.3g} |d|/|W| {r['rel_norm']:.3g} below 0.005: {r['frac_below_0.005']:.1%}"
                f" p99|d| {r['p99_abs']:.3g}" + (f" NaN/Inf: {int(r['nonfinite'])}" if r["nonfinite"] else "")
            )
        lines.append("by module kind (mean |d|):")
        piv = self.kinds.pivot(index="kind", columns="model", values="mean_abs")
        lines.append(piv.to_string(float_format=lambda x: f"{x:.3g}"))
        if self.meta.get("spectral") and "low_rank" in self.tensors:
            matrices = self.tensors[self.tensors["spectral_exact"].notna()]  # the 2-D tensors
            counts = ", ".join(f"{m} {int(g['low_rank'].fillna(False).sum())} of {len(g)} 2-D tensors"
                               for m, g in matrices.groupby("model", sort=False))
            lines.append(f"low-rank deltas (look like a merged LoRA: rank_99 <= {self.meta['spectral_k']} and "
                         f"<= min(m, n)/8): {counts or 'no 2-D tensors'}")
        sim = self.similarity[self.similarity["tensor"] == "__global__"]
        if len(sim):
            lines.append("across fine-tunes (global):")
            for r in sim.to_dict("records"):
                lines.append(f"  {r['model_a']} vs {r['model_b']}: cosine {r['cosine']:.3f}, sign agreement "
                             f"{r['sign_agreement']:.1%}, top-1% overlap {r['topk_overlap']:.1%}")
        unp = self.pairing[self.pairing["status"] == "unpaired"]
        if len(unp):
            lines.append(f"unpaired (new in the fine-tune, not compared): {sorted(set(unp['name']))}")
        return "\n".join(lines)


def _clean(r: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}


def _labels(snaps: Sequence[Snapshot]) -> list[str]:
    labels: list[str] = []
    for s in snaps:
        label, n = s.label, 2
        while label in labels:  # the same model given twice: keep rows distinguishable
            label, n = f"{s.label}#{n}", n + 1
        labels.append(label)
    return labels


def delta_stats(
    base: str | Snapshot,
    fine_tunes: Sequence[str | Snapshot],
    *,
    preset: str = DEFAULT_PRESET,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    shared_rows: bool = False,
    topk: float = 0.01,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    progress: bool = True,
    on_progress: Callable[[int, int, str], None] | None = None,
    spectral: bool = False,
    spectral_k: int = 64,
    stream: bool = False,
) -> DeltaStats:
    """Compute delta statistics of one base and one or more fine-tunes, streaming one tensor at a time.

    Every fine-tune is paired with the base first (headers only), so a bad fine-tune is refused before any
    tensor data is read.

    Args:
        base: the pre-trained model (reference or snapshot; see :func:`deltakit.sources.resolve`).
        fine_tunes: one or more fine-tunes of that base.
        preset / include / exclude: the prunable set (recorded per tensor; statistics cover all paired tensors).
        shared_rows: compare the shared leading rows of tensors whose row counts differ (vocabulary).
        topk: the fraction of entries per tensor in the top-|delta| sets compared across fine-tunes.
        device: where to compute (``"cuda"`` uses the Triton statistics kernel when available).
        allow_pickle: accept pickled weights (unsafe for untrusted models).
        progress: show a progress bar (tqdm.auto) over the bytes of all paired tensors, base and fine-tunes,
            advanced after each tensor read; its postfix names the model and tensor just read.
        on_progress: called after each tensor read with (bytes read so far, bytes to read in all,
            ``"MODEL: TENSOR"``), for progress displays other than the bar (widgets).
        spectral: also compute the spectral statistics of every 2-D delta (:func:`deltakit.spectral.spectral_stats`,
            on ``device``, from the delta in memory: no second read).
        spectral_k: the k of the spectral statistics (top-k energy, randomized SVD, low-rank rule).
        stream: read Hub references by HTTP range requests (:mod:`deltakit.hubstream`): only their small files are
            downloaded, each tensor is read once into memory and no weights are written to disk. Local folders
            and family members are read from disk as always (``stream`` does not apply to them); snapshots handed
            in are read as they were resolved. ``meta["streamed"]`` lists the references that were streamed.

    Returns:
        The statistics.

    Raises:
        ValueError: no fine-tunes, topk outside (0, 1], or spectral_k < 1.
        deltakit.sources.SourceError / deltakit.pairing.PairingError: unresolvable or non-homologous models.
    """
    if not fine_tunes:
        raise ValueError("no fine-tunes given: pass at least one fine-tuned model to compare with the base.")
    if not 0 < topk <= 1:
        raise ValueError(f"topk={topk} must be in (0, 1] (a fraction of each tensor's entries).")
    if spectral and (isinstance(spectral_k, bool) or not isinstance(spectral_k, int) or spectral_k < 1):
        raise ValueError(f"spectral_k={spectral_k!r} must be an integer >= 1 (the number of top singular values).")
    base_snap = base if isinstance(base, Snapshot) else resolve(base, allow_pickle=allow_pickle, stream=stream)
    ft_snaps = [f if isinstance(f, Snapshot) else resolve(f, allow_pickle=allow_pickle, stream=stream)
                for f in fine_tunes]
    labels = _labels(ft_snaps)
    base_reader = open_reader(base_snap, allow_pickle=allow_pickle)
    ft_readers = [open_reader(s, allow_pickle=allow_pickle) for s in ft_snaps]
    pairings: list[Pairing] = [
        pair_models(base_snap, s, preset=preset, include=include, exclude=exclude, shared_rows=shared_rows,
                    base_reader=base_reader, ft_reader=r)
        for s, r in zip(ft_snaps, ft_readers)
    ]
    # base tensor name -> [(fine-tune index, pair)], in base checkpoint order.
    by_base: dict[str, list[tuple[int, TensorPair]]] = {}
    for i, pairing in enumerate(pairings):
        for p in pairing.pairs:
            by_base.setdefault(p.base_name, []).append((i, p))
    order = [n for n in base_reader.names() if n in by_base]
    dev = torch.device(device)

    def nbytes(reader: Reader, name: str) -> int:
        info = reader.info(name)  # header only; TensorInfo.nbytes is 0 for pickled weights, hence numel * itemsize
        return info.numel * info.dtype.itemsize

    total = sum(nbytes(base_reader, n) + sum(nbytes(ft_readers[i], p.name) for i, p in by_base[n]) for n in order)
    done = 0
    bar = tqdm(total=total, desc="delta stats", unit="B", unit_scale=True, disable=not progress)

    def read(reader: Reader, name: str, model: str) -> torch.Tensor:
        """Read one tensor onto ``dev``, then advance the progress by its bytes."""
        nonlocal done
        tensor = reader.read(name).to(dev)
        size, current = nbytes(reader, name), f"{model}: {name}"
        done += size
        bar.set_postfix_str(current, refresh=False)
        bar.update(size)
        if on_progress is not None:
            on_progress(done, total, current)
        return tensor

    rows: list[dict] = []
    parts: dict[tuple[str, str, object], Partials] = {}
    n_tensors: dict[tuple[str, str, object], int] = {}
    hist_rows: dict[tuple[str, str], np.ndarray] = {}
    sims: dict[tuple[int, int], _PairStats] = {}
    sim_rows: list[dict] = []
    with bar:
        for base_name in order:
            entries = by_base[base_name]
            base_t = read(base_reader, base_name, base_snap.label)
            deltas: dict[int, torch.Tensor] = {}
            for i, p in entries:
                ft_t = read(ft_readers[i], p.name, labels[i])
                b = base_t
                if p.rows is not None:
                    b, ft_t = base_t[: p.rows], ft_t[: p.rows]
                part = _partials(b, ft_t)
                delta = ft_t.to(torch.float32) - b.to(torch.float32) if len(entries) > 1 or spectral else None
                spec = {}
                if spectral:
                    spec = dict.fromkeys(SPECTRAL_COLUMNS, math.nan)
                    if delta.ndim == 2:
                        spec = spectral_stats(delta, k=spectral_k)
                rows.append(dict(model=labels[i], tensor=p.name, base_tensor=base_name, kind=p.kind,
                                 layer=-1 if p.layer is None else p.layer, prunable=p.prunable, **part.summary(),
                                 **spec))
                for key in ((labels[i], "layer", -1 if p.layer is None else p.layer), (labels[i], "kind", p.kind),
                            (labels[i], "all", "all")):
                    parts[key] = parts.get(key, Partials()) + part
                    n_tensors[key] = n_tensors.get(key, 0) + 1
                if len(entries) > 1:
                    deltas[i] = delta
                del delta
            for (i, da), (j, db) in itertools.combinations(sorted(deltas.items()), 2):
                ps = _pair_stats(da, db, topk)
                sims[(i, j)] = sims[(i, j)] + ps if (i, j) in sims else ps
                sim_rows.append(dict(model_a=labels[i], model_b=labels[j], tensor=base_name, **ps.row()))
            del deltas, base_t

    def rollup(scope: str, col: str) -> pd.DataFrame:
        out = []
        for (model, s, value), part in parts.items():
            if s == scope:
                out.append({"model": model, **({col: value} if col else {}),
                            "n_tensors": n_tensors[(model, s, value)], **part.summary()})
        return pd.DataFrame(out)

    for (model, s, value), part in parts.items():
        if s in ("kind", "all"):
            hist_rows[(model, value if s == "kind" else "all")] = part.hist
    edges = hist_edges()
    hist_df = pd.DataFrame(
        [dict(model=m, kind=k, bin_lo=edges[b], bin_hi=edges[b + 1], count=int(h[b]))
         for (m, k), h in hist_rows.items() for b in np.nonzero(h)[0]]
    )
    for (i, j), ps in sims.items():
        sim_rows.append(dict(model_a=labels[i], model_b=labels[j], tensor="__global__", **ps.row()))
    pairing_df = pd.concat([p.to_frame().assign(model=labels[i]) for i, p in enumerate(pairings)], ignore_index=True)
    meta = dict(
        base=base_snap.ref, base_commit=base_snap.commit, fine_tunes=[s.ref for s in ft_snaps], labels=labels,
        fine_tune_commits=[s.commit for s in ft_snaps], preset=pairings[0].preset, include=list(include or []),
        exclude=list(exclude or []), shared_rows=shared_rows, topk=topk, thresholds=list(THRESHOLDS),
        warnings=[w for p in pairings for w in p.warnings], spectral=spectral, spectral_k=spectral_k,
        streamed=[s.ref for s in (base_snap, *ft_snaps) if s.streamed],
    )
    layers = rollup("layer", "layer").sort_values(["model", "layer"], ignore_index=True)
    kinds = rollup("kind", "kind").sort_values(["model", "kind"], ignore_index=True)
    tensors = pd.DataFrame(rows)
    if spectral and len(tensors):
        tensors = tensors.astype({"low_rank": "boolean", "spectral_exact": "boolean"})
        kinds = kinds.merge(_spectral_rollup(tensors), on=["model", "kind"], how="left")
        kinds["n_low_rank"] = kinds["n_low_rank"].fillna(0).astype(int)
    sim_df = pd.DataFrame(sim_rows, columns=["model_a", "model_b", "tensor", "cosine", "sign_agreement",
                                             "topk_overlap"])
    return DeltaStats(tensors, layers, kinds, rollup("all", ""), sim_df, hist_df, pairing_df, meta)


def _spectral_rollup(tensors: pd.DataFrame) -> pd.DataFrame:
    """Per (model, kind): plain means over tensors of stable and effective rank, and the count of low-rank tensors."""
    return tensors.groupby(["model", "kind"], sort=False).agg(
        mean_stable_rank=("stable_rank", "mean"), mean_effective_rank=("effective_rank", "mean"),
        n_low_rank=("low_rank", lambda s: int(s.fillna(False).sum()))).reset_index()
