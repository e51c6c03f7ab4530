"""DAREx-q strategies: choose the rescale q from data, then prune with ``darex_q`` (Deng et al. 2025, arXiv 2410.09344).

Three strategies, usable as sweep methods (dpp_methods.md §5.2-§5.4):

* ``darex_q_labelled`` -- one global q by the two-stage grid search on *labelled validation* data (q_v), with
  one fixed mask (seed ``search_seed``) for the whole search; the point is then evaluated with its own seed.
* ``darex_q_unlabelled`` -- one global q maximising minus the output change (q_e): the mean |h_ref - h_pruned| of
  the last hidden states of the backbone over unlabelled calibration texts, averaged over 4 mask seeds after
  dropping the value farthest from the mean.
* ``darex_q_analytic`` -- a per-layer q from the analytical tail-bound objective (:func:`deltakit.darex.analytical_q`)
  on c = ΔW · x̄ (mean calibration activations), with η tuned by the two-stage grid search on labelled validation
  data; tensors without their own q use the mean layer q (:func:`deltakit.darex.q_for_tensor`).

A search depends on the rate but not on the evaluation seed, so its result is cached per (strategy, rate, params)
and every seed of a rate reuses it. The chosen q (and η) is recorded in the sweep rows.

Grid defaults: q from ``lo = 1 - rate`` (DARE itself is the first candidate) to 1 with ``step = (1 - lo) / 10``;
η from 0.1 to 0.5 with step 0.1 (the DAREx README's BERT ranges).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deltakit import darex
from deltakit.calibration import Activations, calibration_batches, collect_activations

__all__ = ["Chosen", "SearchContext", "STRATEGIES"]


@dataclass(frozen=True)
class Chosen:
    """What a strategy chose for one rate.

    Attributes:
        q: the global q (for per-layer q: the mean layer q).
        record: what to store in the results (q, eta, number of evaluations, ...).
        per_tensor: tensor name -> q (per-layer strategies), or None for one global q.
    """

    q: float
    record: dict[str, Any]
    per_tensor: dict[str, float] | None = None

    def params_for(self, name: str) -> dict[str, float]:
        if self.per_tensor is None:
            return {"q": self.q}
        return {"q": self.per_tensor[name]}


@dataclass
class SearchContext:
    """What the strategies need beyond the resident model, built lazily and cached.

    Attributes:
        rm: the resident model (``deltakit.sweep.ResidentModel``).
        make_search_evaluator: builds the labelled validation evaluator (called once, on first use).
        calibration_texts: builds the unlabelled calibration texts (called once, on first use).
    """

    rm: Any
    make_search_evaluator: Callable[[], Callable[[torch.nn.Module], dict[str, float]]]
    calibration_texts: Callable[[], list[str]]
    _cache: dict = field(default_factory=dict)

    def search_evaluator(self):
        if "ev" not in self._cache:
            self._cache["ev"] = self.make_search_evaluator()
        return self._cache["ev"]

    def batches(self) -> list[dict[str, torch.Tensor]]:
        if "batches" not in self._cache:
            max_length = min(128, int(getattr(self.rm.model.config, "max_position_embeddings", 128)))
            self._cache["batches"] = calibration_batches(self.rm.tokenizer, self.calibration_texts(),
                                                         max_length=max_length)
        return self._cache["batches"]

    def activations(self) -> Activations:
        """Activation statistics of the *fine-tuned* model (computed once)."""
        if "acts" not in self._cache:
            self.rm.restore()
            self._cache["acts"] = collect_activations(self.rm.model, self.batches())
        return self._cache["acts"]

    def memo(self, key: tuple, compute: Callable[[], Chosen]) -> Chosen:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def _metric(scores: dict[str, float], metric: str | None) -> float:
    if metric is not None:
        return float(scores[metric])
    for m in ("score", "accuracy", "mcc", "pearson"):
        if m in scores:
            return float(scores[m])
    raise KeyError(f"no default metric in {sorted(scores)}; pass metric=NAME")


def _q_grid(rate: float, step: float | None, hi: float | None) -> tuple[float, float, float]:
    lo = 1.0 - rate
    hi = 1.0 if hi is None else float(hi)
    step = (1.0 - lo) / 10 if step is None else float(step)
    return lo, hi, step


def darex_q_labelled(ctx: SearchContext, *, rate: float, seed: int, backend: str = "auto", step: float | None = None,
                     hi: float | None = None, search_seed: int = 12345, metric: str | None = None) -> Chosen:
    """Global q by the two-stage grid search on labelled validation data (one fixed mask per search)."""
    def compute() -> Chosen:
        if rate in (0.0, 1.0):  # nothing to search: rate 0 keeps all (q = 1), rate 1 drops all (q irrelevant)
            return Chosen(1.0, {"q": 1.0, "evaluations": 0})
        lo, top, st = _q_grid(rate, step, hi)
        ev = ctx.search_evaluator()

        def objective(q: float) -> float:
            if q > 1.0 + 1e-12:
                return -math.inf
            ctx.rm.apply("darex_q", rate=rate, seed=search_seed, backend=backend, q=min(q, 1.0))
            return _metric(ev(ctx.rm.model), metric)

        res = darex.two_stage_grid_search(objective, lo=lo, hi=top, step=st)
        q = min(res.best_x, 1.0)
        return Chosen(q, {"q": q, "search_score": res.best_score, "evaluations": len(res.evaluated)})

    return ctx.memo(("labelled", rate, step, hi, search_seed, metric), compute)


def _output_change(ctx: SearchContext, ref: list[torch.Tensor]) -> float:
    backbone = ctx.rm.model.base_model
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch, h_ref in zip(ctx.batches(), ref):
            dev = {k: v.to(ctx.rm.device) for k, v in batch.items()}
            h = backbone(**dev).last_hidden_state.float()
            mask = dev["attention_mask"].bool()
            total += float((h - h_ref).abs()[mask].sum())
            count += int(mask.sum()) * h.shape[-1]
    return total / count


def _drop_outlier_mean(values: list[float]) -> float:
    if len(values) >= 3:
        mean = sum(values) / len(values)
        values = sorted(values, key=lambda v: abs(v - mean))[:-1]
    return sum(values) / len(values)


def darex_q_unlabelled(ctx: SearchContext, *, rate: float, seed: int, backend: str = "auto",
                       step: float | None = None, hi: float | None = None, n_seeds: int = 4) -> Chosen:
    """Global q minimising the output change of the backbone's last hidden states (no labels needed)."""
    def compute() -> Chosen:
        if rate in (0.0, 1.0):
            return Chosen(1.0, {"q": 1.0, "evaluations": 0})
        lo, top, st = _q_grid(rate, step, hi)
        ctx.rm.restore()
        with torch.inference_mode():
            ref = [ctx.rm.model.base_model(**{k: v.to(ctx.rm.device) for k, v in b.items()}).last_hidden_state.float()
                   for b in ctx.batches()]

        def objective(q: float) -> float:
            if q > 1.0 + 1e-12:
                return -math.inf
            changes = []
            for s in range(n_seeds):
                ctx.rm.apply("darex_q", rate=rate, seed=s, backend=backend, q=min(q, 1.0))
                changes.append(_output_change(ctx, ref))
            return -_drop_outlier_mean(changes)

        res = darex.two_stage_grid_search(objective, lo=lo, hi=top, step=st)
        q = min(res.best_x, 1.0)
        return Chosen(q, {"q": q, "output_change": -res.best_score, "evaluations": len(res.evaluated)})

    return ctx.memo(("unlabelled", rate, step, hi, n_seeds), compute)


def _layer_qs(ctx: SearchContext, rate: float, eta: float) -> dict[str, float]:
    acts = ctx.activations()
    targets = {t.name: t for t in ctx.rm.targets}
    out: dict[str, float] = {}
    for name, x_mean in acts.mean.items():
        lowered = name.lower()
        if name not in targets or any(s in lowered for s in ("classifier", "lm_head", "layernorm", "embeddings")):
            continue
        t = targets[name]
        bias = targets.get(name[: -len(".weight")] + ".bias")
        delta_b = (bias.ft.float() - bias.base.float()).cpu() if bias is not None else None
        c = darex.influence((t.ft.float() - t.base.float()).cpu(), x_mean.cpu(), delta_b)
        out[name] = darex.analytical_q(c, rate=rate, eta=eta).layer_q
    if not out:
        raise ValueError("no Linear weight with activation statistics is prunable: the analytic q needs them.")
    return out


def darex_q_analytic(ctx: SearchContext, *, rate: float, seed: int, backend: str = "auto", eta_lo: float = 0.1,
                     eta_hi: float = 0.5, eta_step: float = 0.1, search_seed: int = 12345,
                     metric: str | None = None) -> Chosen:
    """Per-layer analytic q with η tuned on labelled validation data."""
    def compute() -> Chosen:
        if rate in (0.0, 1.0) or 1.0 - rate > 0.998:
            # No grid: rate 0 / 1 need no rescale search, and for rate < 0.002 the analytic grid [1-rate, 0.998]
            # is empty, so q = 1 - rate (DARE) is the only admissible value.
            q = 1.0 if rate in (0.0, 1.0) else 1.0 - rate
            return Chosen(q, {"q": q, "eta": None, "evaluations": 0}, {t.name: q for t in ctx.rm.targets})
        ev = ctx.search_evaluator()
        lo_q = 1.0 - rate

        def per_tensor(eta: float) -> dict[str, float]:
            layer_qs = _layer_qs(ctx, rate, eta)
            out = {}
            for t in ctx.rm.targets:
                q = darex.q_for_tensor(t.name, layer_qs)
                out[t.name] = min(1.0, max(lo_q, 1.0 if q is None else q))
            return out

        def objective(eta: float) -> float:
            if eta <= 0:
                return -math.inf
            qs = per_tensor(eta)
            ctx.rm.apply("darex_q", rate=rate, seed=search_seed, backend=backend, params_for=lambda n: {"q": qs[n]})
            return _metric(ev(ctx.rm.model), metric)

        res = darex.two_stage_grid_search(objective, lo=eta_lo, hi=eta_hi, step=eta_step)
        qs = per_tensor(res.best_x)
        mean_q = sum(qs.values()) / len(qs)
        return Chosen(mean_q, {"q": mean_q, "eta": res.best_x, "search_score": res.best_score,
                               "evaluations": len(res.evaluated)}, qs)

    return ctx.memo(("analytic", rate, eta_lo, eta_hi, eta_step, search_seed, metric), compute)


#: Strategy name -> function(ctx, *, rate, seed, backend, **params) -> Chosen.
STRATEGIES: dict[str, Callable[..., Chosen]] = {
    "darex_q_labelled": darex_q_labelled,
    "darex_q_unlabelled": darex_q_unlabelled,
    "darex_q_analytic": darex_q_analytic,
}
