"""DAREx-q searches: choose the rescale q from data, then prune with ``darex_q`` (Deng et al. 2025, arXiv:2410.09344).

Three registry entries, each a prepare step that chooses q and applies as ``darex_q``:

* ``darex_q_labelled`` -- one global q by the two-stage grid search on *labelled validation* data, with one fixed
  mask (seed ``search_seed``) for the whole search; the point is then evaluated with its own seed.
* ``darex_q_unlabelled`` -- one global q minimising the output change: the mean |h_ref - h_pruned| of the last
  hidden states of the backbone over unlabelled calibration texts, averaged over ``n_seeds`` masks after dropping
  the value farthest from the mean. The search masks use seeds ``search_seed, search_seed + 1, ...``, disjoint from
  the evaluation seeds, so q is never tuned on the masks it is scored with (the seeds are recorded).
* ``darex_q_analytic`` -- a per-layer q from the analytical tail-bound objective (:func:`deltakit.darex.analytical_q`)
  on c = dW * mean(x) (mean calibration activations), with eta tuned by the two-stage grid search on labelled
  validation data; tensors without their own q use the mean layer q (:func:`deltakit.darex.q_for_tensor`).

A search depends on the rate but not on the evaluation seed, so its result is memoised per (entry, rate, params)
for the whole sweep and every seed of a rate reuses it.

Grid defaults: q from ``lo = 1 - rate`` (DARE itself is the first candidate) to 1 with ``step = (1 - lo) / 10``;
eta from 0.1 to 0.5 with step 0.1 (the DAREx authors' ranges for BERT).
"""

from __future__ import annotations

import math

import torch

from deltakit import darex
from deltakit.grid_search import two_stage_grid_search
from deltakit.methods.prepare import PrepareContext, Prepared
from deltakit.methods.registry import register_prepared
from deltakit.names import is_head, module_kind

__all__ = ["darex_q_labelled", "darex_q_unlabelled", "darex_q_analytic"]

_REFERENCE = "Deng et al. 2025, DARE the Extreme, arXiv:2410.09344"
#: The default seed of a search's masks: far from the small evaluation seeds users pick (0, 1, 2, ...).
SEARCH_SEED = 12345


def _metric(scores: dict[str, float], metric: str | None) -> float:
    if metric is not None:
        if metric not in scores:
            raise KeyError(f"metric {metric!r} is not among the evaluator's metrics {sorted(scores)}; pass one of them")
        return float(scores[metric])
    for m in ("score", "accuracy", "exact_match", "mcc", "pearson"):
        if m in scores:
            return float(scores[m])
    if "nll" in scores:  # perplexity: lower is better, and the search maximises
        return -float(scores["nll"])
    raise KeyError(f"no default metric in {sorted(scores)}; pass metric=NAME")


def _q_grid(rate: float, step: float | None, hi: float | None) -> tuple[float, float, float]:
    lo = 1.0 - rate
    hi = 1.0 if hi is None else float(hi)
    step = (1.0 - lo) / 10 if step is None else float(step)
    return lo, hi, step


def _global_q(q: float, record: dict) -> Prepared:
    return Prepared(params={"q": q}, q=q, record=dict(record, q=q))


def _nothing_to_search(rate: float) -> bool:
    """Rate 0 keeps every entry (q = 1) and rate 1 drops every entry (q is irrelevant): no search."""
    return rate in (0.0, 1.0)


def darex_q_labelled(ctx: PrepareContext, *, rate: float, seed: int, backend: str = "auto",
                     step: float | None = None, hi: float | None = None, search_seed: int = SEARCH_SEED,
                     metric: str | None = None) -> Prepared:
    """Global q by the two-stage grid search on labelled validation data (one fixed mask per search)."""
    def compute() -> Prepared:
        if _nothing_to_search(rate):
            return _global_q(1.0, {"evaluations": 0})
        lo, top, st = _q_grid(rate, step, hi)
        ev = ctx.search_evaluator()

        def objective(q: float) -> float:
            if q > 1.0 + 1e-12:
                return -math.inf
            ctx.apply("darex_q", rate=rate, seed=search_seed, backend=backend, q=min(q, 1.0))
            return _metric(ev(ctx.model), metric)

        res = two_stage_grid_search(objective, lo=lo, hi=top, step=st)
        return _global_q(min(res.best_x, 1.0), {"search_score": res.best_score, "evaluations": len(res.evaluated),
                                                "search_seed": search_seed})

    return ctx.memo(("labelled", rate, step, hi, search_seed, metric), compute)


def _output_change(ctx: PrepareContext, ref: list[torch.Tensor]) -> float:
    """Mean |h - h_ref| of the backbone's last hidden states over the calibration tokens (padding masked)."""
    backbone = ctx.model.base_model
    device = next(ctx.model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch, h_ref in zip(ctx.batches(), ref):
            dev = {k: v.to(device) for k, v in batch.items()}
            h = backbone(**dev).last_hidden_state.float()  # (batch, tokens, hidden)
            mask = dev["attention_mask"].bool()  # (batch, tokens)
            total += float((h - h_ref).abs()[mask].sum())
            count += int(mask.sum()) * h.shape[-1]
    return total / count


def _drop_outlier_mean(values: list[float]) -> float:
    if len(values) >= 3:
        mean = sum(values) / len(values)
        values = sorted(values, key=lambda v: abs(v - mean))[:-1]
    return sum(values) / len(values)


def darex_q_unlabelled(ctx: PrepareContext, *, rate: float, seed: int, backend: str = "auto",
                       step: float | None = None, hi: float | None = None, n_seeds: int = 4,
                       search_seed: int = SEARCH_SEED) -> Prepared:
    """Global q minimising the output change of the backbone's last hidden states (no labels needed)."""
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"darex_q_unlabelled: n_seeds must be an integer >= 1, got {n_seeds!r}")
    seeds = list(range(search_seed, search_seed + n_seeds))

    def compute() -> Prepared:
        if _nothing_to_search(rate):
            return _global_q(1.0, {"evaluations": 0})
        lo, top, st = _q_grid(rate, step, hi)
        ctx.restore()
        device = next(ctx.model.parameters()).device
        with torch.inference_mode():
            ref = [ctx.model.base_model(**{k: v.to(device) for k, v in b.items()}).last_hidden_state.float()
                   for b in ctx.batches()]

        def objective(q: float) -> float:
            if q > 1.0 + 1e-12:
                return -math.inf
            changes = []
            for s in seeds:
                ctx.apply("darex_q", rate=rate, seed=s, backend=backend, q=min(q, 1.0))
                changes.append(_output_change(ctx, ref))
            return -_drop_outlier_mean(changes)

        res = two_stage_grid_search(objective, lo=lo, hi=top, step=st)
        return _global_q(min(res.best_x, 1.0), {"output_change": -res.best_score,
                                                "evaluations": len(res.evaluated), "search_seeds": seeds})

    return ctx.memo(("unlabelled", rate, step, hi, tuple(seeds)), compute)


def _delta(ctx: PrepareContext, target) -> torch.Tensor:
    """A target's fp32 delta on the CPU."""
    base, ft = ctx.weights(target)
    return (ft.float() - base.float()).cpu()


def _layer_qs(ctx: PrepareContext, rate: float, eta: float) -> dict[str, float]:
    """The analytical q of every prunable Linear weight with activation statistics (not heads, norms, embeddings)."""
    acts = ctx.activations()
    targets = {t.name: t for t in ctx.targets}
    out: dict[str, float] = {}
    for name, x_mean in acts.mean.items():
        if name not in targets or is_head(name) or module_kind(name) in ("norm", "embedding"):
            continue
        bias = targets.get(name[: -len(".weight")] + ".bias")
        delta_b = _delta(ctx, bias) if bias is not None else None
        c = darex.influence(_delta(ctx, targets[name]), x_mean.cpu(), delta_b)
        out[name] = darex.analytical_q(c, rate=rate, eta=eta).layer_q
    if not out:
        raise ValueError("no Linear weight with activation statistics is prunable: the analytic q needs them.")
    return out


def darex_q_analytic(ctx: PrepareContext, *, rate: float, seed: int, backend: str = "auto", eta_lo: float = 0.1,
                     eta_hi: float = 0.5, eta_step: float = 0.1, search_seed: int = SEARCH_SEED,
                     metric: str | None = None) -> Prepared:
    """Per-layer analytic q with eta tuned on labelled validation data."""
    def per_tensor(qs: dict[str, float], mean_q: float, record: dict) -> Prepared:
        return Prepared(params_for=lambda name: {"q": qs[name]}, q=mean_q, record=dict(record, q=mean_q))

    def compute() -> Prepared:
        if _nothing_to_search(rate) or 1.0 - rate > 0.998:
            # For rate < 0.002 the analytic grid [1 - rate, 0.998] is empty: q = 1 - rate (DARE) is the only choice.
            q = 1.0 if _nothing_to_search(rate) else 1.0 - rate
            return per_tensor({t.name: q for t in ctx.targets}, q, {"eta": None, "evaluations": 0})
        ev = ctx.search_evaluator()
        lo_q = 1.0 - rate

        def qs_for(eta: float) -> dict[str, float]:
            layer_qs = _layer_qs(ctx, rate, eta)
            out = {}
            for t in ctx.targets:
                q = darex.q_for_tensor(t.name, layer_qs)
                out[t.name] = min(1.0, max(lo_q, 1.0 if q is None else q))
            return out

        def objective(eta: float) -> float:
            if eta <= 0:
                return -math.inf
            qs = qs_for(eta)
            ctx.apply("darex_q", rate=rate, seed=search_seed, backend=backend, params_for=lambda n: {"q": qs[n]})
            return _metric(ev(ctx.model), metric)

        res = two_stage_grid_search(objective, lo=eta_lo, hi=eta_hi, step=eta_step)
        qs = qs_for(res.best_x)
        return per_tensor(qs, sum(qs.values()) / len(qs), {"eta": res.best_x, "search_score": res.best_score,
                                                            "evaluations": len(res.evaluated)})

    return ctx.memo(("analytic", rate, eta_lo, eta_hi, eta_step, search_seed, metric), compute)


for _fn, _pretty in ((darex_q_labelled, "DAREx-q (labelled q search)"),
                     (darex_q_unlabelled, "DAREx-q (unlabelled q search)"),
                     (darex_q_analytic, "DAREx-q (analytic per-layer q)")):
    register_prepared(name=_fn.__name__, pretty_name=_pretty, reference=_REFERENCE, applies_as="darex_q",
                      random=True, prepare=_fn)
