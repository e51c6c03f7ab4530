"""DAREx analysis: why DARE fails at high drop rates, and how DAREx-q picks its rescale 1/q.

DAREx (Deng et al., "DARE the Extreme", arXiv 2410.09344, ICLR 2025) looks at one output neuron ``i`` of a linear
layer with delta ``ΔW`` (rows = output neurons, columns = input features) and mean input activation ``x̄``. The
*influence* terms are ``c_ij = ΔW_ij · x̄_j``, with ``S_i = Σ_j c_ij`` and ``Q_i = Σ_j c_ij²``. Dropping each delta
with probability ``rate`` (``p``; mask ``ω_j ~ Bernoulli(p)``, 1 = dropped) and rescaling the survivors by ``1/q``
changes the neuron's output by

    H_q = Σ_j c_j · (1 − (1−ω_j)/q),   E[H_q] = (1 − (1−p)/q)·S,   Var[H_q] = p(1−p)·Q/q².

DARE (Yu et al., arXiv 2311.03099) is ``q = 1−p``: unbiased, but the standard deviation ``√(p/(1−p))·√Q`` blows up
as ``p → 1``. DAREx-q takes ``1−p ≤ q ≤ 1``, trading a little bias for much less variance. This module holds the
pure maths of that trade-off:

* :func:`influence`, :func:`error_moments` and :func:`optimal_q` (the closed-form MSE-optimal ``q*``, a sanity
  reference that is not in the DAREx code);
* :func:`phi` (the Kearns–Saul constant) and :func:`analytical_q`, DAREx's per-layer analytical q with a tuned
  scalar ``η``;
* :func:`q_for_tensor`, the rule that spreads per-layer q's over every tensor of a checkpoint;
* DAREx's coarse-then-fine search for a global q or ``η`` is :func:`deltakit.grid_search.two_stage_grid_search`.

Every statistic is computed in fp64: the reference casts ``c`` to fp16 before squaring, and with ``c`` around
1e-4 the squares fall into fp16's subnormal range, which biases ``Q``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deltakit.grid_search import GRID_DECIMALS
from deltakit.names import is_head

__all__ = [
    "AnalyticalQ",
    "analytical_q",
    "error_moments",
    "influence",
    "optimal_q",
    "q_in_range",
    "phi",
    "q_for_tensor",
]

# Slack for float noise in range checks and grid rounding: 1 - 0.99 is 0.010000000000000009, and a user who
# passes q = 0.01 at rate 0.99 means DARE, not "below 1 - rate".
_EPS = 1e-9
#: Relative rounding slack of the q range (:func:`q_in_range`).
Q_RTOL = 1e-6


def _number(label: str, value: object) -> float:
    """``value`` as a finite float, or a ValueError naming it."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{label}={value!r} must be a number.") from None
    if not math.isfinite(number):
        raise ValueError(f"{label}={value!r} must be finite.")
    return number


def _check_rate(rate: float) -> float:
    rate = _number("rate", rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate!r} is outside [0, 1]; rate is the fraction of delta entries dropped.")
    return rate


def _as_c(c: Tensor) -> Tensor:
    """Validate an influence matrix (rows = output neurons) and return it as fp64."""
    if not isinstance(c, Tensor):
        raise ValueError(f"c must be a torch.Tensor of shape (rows, inputs), got {type(c).__name__}.")
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(
            f"c has shape {tuple(c.shape)}; expected a non-empty 2-D (rows, inputs) matrix. "
            "For a single neuron pass c.unsqueeze(0)."
        )
    c = c.detach().to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("c contains NaN or inf; check the delta and the activation statistics.")
    return c


def _row_sums(c: Tensor) -> tuple[Tensor, Tensor]:
    """S_i = Σ_j c_ij and Q_i = Σ_j c_ij², both (rows,) fp64."""
    return c.sum(dim=1), c.square().sum(dim=1)


def influence(delta_w: Tensor, x_mean: Tensor, delta_b: Tensor | None = None) -> Tensor:
    """The DAREx influence matrix ``c_ij = ΔW_ij · x̄_j`` of one linear layer, in fp64.

    A bias behaves like a weight whose input is always 1, so its delta is appended as one extra column.

    Args:
        delta_w: weight delta ``ΔW``, shape (out_features, in_features), any float dtype.
        x_mean: mean input activation per input feature ``x̄``, shape (in_features,), averaged over all tokens.
        delta_b: optional bias delta, shape (out_features,).

    Returns:
        fp64 tensor of shape (out_features, in_features), or (out_features, in_features + 1) with a bias delta,
        on ``delta_w``'s device.

    Raises:
        ValueError: if the shapes do not fit together.
    """
    if delta_w.ndim != 2:
        raise ValueError(f"delta_w has shape {tuple(delta_w.shape)}; expected 2-D (out_features, in_features).")
    m, n = delta_w.shape
    if tuple(x_mean.shape) != (n,):
        raise ValueError(
            f"x_mean has shape {tuple(x_mean.shape)}; expected ({n},), one mean activation per input feature "
            f"of delta_w {tuple(delta_w.shape)}."
        )
    dw = delta_w.detach().to(torch.float64)
    c = dw * x_mean.detach().to(device=dw.device, dtype=torch.float64)  # (m, n)
    if delta_b is None:
        return c
    if tuple(delta_b.shape) != (m,):
        raise ValueError(
            f"delta_b has shape {tuple(delta_b.shape)}; expected ({m},), one bias per output row of delta_w "
            f"{tuple(delta_w.shape)}."
        )
    db = delta_b.detach().to(device=dw.device, dtype=torch.float64)
    return torch.cat([c, db.unsqueeze(1)], dim=1)  # (m, n + 1)


def q_in_range(q: float | Tensor, rate: float) -> bool | Tensor:
    """The one q range check: ``1 - rate <= q <= 1`` (element-wise for a tensor; NaN is never in range).

    The slack is relative, :data:`Q_RTOL`: q = 1 - 0.9 in float64, or a float32 per-row q, may land a rounding error
    below the exact bound and must still count as DARE's q. Where q divides (the moments here), q > 0 is required
    on top; a pruning method at rate 1 keeps nothing, so its q is never used.
    """
    return (q >= (1.0 - rate) * (1.0 - Q_RTOL)) & (q <= 1.0 + Q_RTOL)


def _check_q(q: float | Tensor, rate: float, n_rows: int) -> float | Tensor:
    """q must be positive and lie in [1 - rate, 1] (DARE .. no rescale); a tensor q has one value per row."""
    lo = 1.0 - rate
    allowed = f"[1 - rate, 1] = [{lo:g}, 1] (and q > 0); q = 1 - rate is DARE, q = 1 is no rescaling."
    if isinstance(q, Tensor):
        if q.ndim > 1 or q.numel() not in (1, n_rows):
            raise ValueError(
                f"q has shape {tuple(q.shape)}; expected a scalar or ({n_rows},), one q per row of c."
            )
        qd = q.detach().to(torch.float64).reshape(-1)
        ok = q_in_range(qd, rate) & (qd > 0)  # NaN fails every comparison
        if not bool(ok.all()):
            row = int((~ok).nonzero()[0])
            raise ValueError(f"q contains {float(qd[row]):.6g} (entry {row}), outside {allowed}")
        return qd if q.ndim == 1 else qd[0]
    q = _number("q", q)
    if not (q_in_range(q, rate) and q > 0):
        raise ValueError(f"q={q!r} is outside {allowed}")
    return q


def error_moments(c: Tensor, *, rate: float, q: float | Tensor) -> tuple[Tensor, Tensor]:
    """Exact mean and variance, per row, of the output error ``H_q`` of drop-and-rescale-by-1/q.

    ``H_q = Σ_j c_j (1 − (1−ω_j)/q)`` with ``ω_j ~ Bernoulli(rate)`` (1 = dropped) is the original output
    minus the pruned output of one neuron. Its mean is ``b_q = (1 − (1−p)/q)·S`` (zero only for DARE,
    ``q = 1−p``) and its variance ``p(1−p)·Q/q²``.

    Args:
        c: influence matrix, shape (rows, inputs) (see :func:`influence`).
        rate: fraction of delta entries dropped, in [0, 1].
        q: rescale divisor, a float or a tensor broadcastable to (rows,); ``1 − rate ≤ q ≤ 1``.

    Returns:
        ``(mean, variance)``, two fp64 tensors of shape (rows,). ``E[H_q²] = mean² + variance``.

    Raises:
        ValueError: if ``c`` is not a finite 2-D matrix, ``rate`` is outside [0, 1] or ``q`` outside
            ``[1 − rate, 1]``.
    """
    rate = _check_rate(rate)
    c = _as_c(c)
    q = _check_q(q, rate, c.shape[0])
    if isinstance(q, Tensor):
        q = q.to(c.device)
    s, sq = _row_sums(c)  # (rows,), (rows,)
    mean = (1.0 - (1.0 - rate) / q) * s
    var = rate * (1.0 - rate) * sq / q**2
    return mean, var


def optimal_q(c: Tensor, *, rate: float) -> Tensor:
    """Closed-form q minimising the mean squared output error ``E[H_q²]``, per row (uncapped).

    Minimising ``E[H_q²] = (1 − (1−p)/q)²·S² + p(1−p)·Q/q²`` over ``u = 1/q`` gives

        q* = (1 − p) + p·Q/S²,

    which is always ``≥ 1 − p`` (DARE) and **exceeds 1** when the row's influences nearly cancel (``Q/S²``
    large): then the unbiased rescale costs more variance than it saves bias. The value is returned uncapped;
    a caller that needs a usable divisor clamps it, e.g. ``optimal_q(c, rate=p).clamp(1 - p, 0.998)`` (0.998 is
    the top of DAREx's analytical grid). This is a sanity reference, not DAREx's criterion
    (:func:`analytical_q` minimises a tail-bound surrogate).

    Edge cases: a row with ``S = 0`` (including an all-zero row) has no bias to trade, so its MSE keeps
    falling as q grows and ``q* = +inf``. At ``rate = 0`` nothing is dropped and ``q* = 1`` for every row. At
    ``rate = 1`` everything is dropped, ``E[H_q²] = S²`` does not depend on q, and the formula's ``Q/S²`` is
    returned as one of the (equally good) minimisers.

    Args:
        c: influence matrix, shape (rows, inputs).
        rate: fraction of delta entries dropped, in [0, 1].

    Returns:
        fp64 tensor of shape (rows,), values in ``[1 − rate, +inf]``.

    Raises:
        ValueError: if ``c`` is not a finite 2-D matrix or ``rate`` is outside [0, 1].
    """
    rate = _check_rate(rate)
    c = _as_c(c)
    if rate == 0.0:
        return torch.ones(c.shape[0], dtype=torch.float64, device=c.device)
    s, sq = _row_sums(c)
    ratio = torch.where(s != 0, sq / s.square(), torch.full_like(s, math.inf))
    return (1.0 - rate) + rate * ratio


def phi(rate: float) -> float:
    """Kearns–Saul sub-Gaussian constant of a Bernoulli(rate) variable.

    ``Φ(p) = (1 − 2p) / log((1 − p)/p)``, with ``Φ(1/2) = 1/2`` (the limit). It is symmetric about 1/2,
    maximal there, and tends to 0 at both ends; ``phi(0) = phi(1) = 0`` are returned explicitly (a constant
    variable has no spread). Near ``p = 1/2``, where the formula is 0/0, it is computed as the equivalent
    ``d / (2·atanh(d))`` with ``d = 1 − 2p``.

    Args:
        rate: the Bernoulli probability (the drop rate), in [0, 1].

    Returns:
        Φ(rate) in [0, 1/2].

    Raises:
        ValueError: if ``rate`` is outside [0, 1].
    """
    rate = _check_rate(rate)
    if rate in (0.0, 1.0):
        return 0.0
    d = 1.0 - 2.0 * rate
    if d == 0.0:
        return 0.5
    if abs(d) < 0.5:  # near 1/2 the log form is 0/0; atanh keeps it accurate
        return d / (2.0 * math.atanh(d))
    return d / (math.log1p(-rate) - math.log(rate))  # near 0 or 1, where d rounds to ±1


@dataclass(frozen=True, eq=False)
class AnalyticalQ:
    """Result of :func:`analytical_q` for one layer.

    Attributes:
        layer_q: the layer's q, the mean of ``row_q``.
        row_q: fp64 tensor (rows,), the q chosen for each output neuron (a grid point).
        n_grid_points_scanned: grid points evaluated before the early stop (or the whole grid).
    """

    layer_q: float
    row_q: Tensor
    n_grid_points_scanned: int


def _analytical_grid(rate: float, q_max: float, step: float) -> list[float]:
    # (1 - rate) rounded DOWN to the step; the slack keeps 1 - 0.9 = 0.09999999999999998 on 0.1 (the reference
    # truncates it to 0.099). q = 0 is unusable (1/q), so the first point is at least one step.
    k_lo = max(math.floor((1.0 - rate) / step + _EPS), 1)
    k_hi = math.floor(q_max / step + _EPS)
    return [round(k * step, GRID_DECIMALS) for k in range(k_lo, k_hi + 1)]


def analytical_q(
    c: Tensor,
    *,
    rate: float,
    eta: float,
    prob: float = 0.95,
    stop_iter: float = 0.8,
    q_max: float = 0.998,
    step: float = 0.001,
) -> AnalyticalQ:
    """DAREx's analytical per-layer q (Variant B, ``utils/analyticalq.py``), computed in fp64.

    For each row ``i`` (output neuron) and candidate q, with ``p = rate``, ``γ = 1 − prob`` and Φ from
    :func:`phi`::

        r_i(q) = | η·(1 − (1−p)/q)·S_i + η²·Φ(p)·Q_i/(4q²) + log(2/γ) |

    (the signed bias term, the Kearns–Saul variance term and the confidence term of a Chernoff bound). The q
    grid starts at ``1 − p`` rounded down to ``step`` (so it may sit up to one step below ``1 − p``, as in the
    reference) and goes up by ``step`` to ``q_max`` inclusive. The scan keeps, per row, the q with the smallest
    r so far, ties going to the later q. A row is marked *done* the first time ``r_i(q) ≥`` its best so far;
    the scan stops after the grid point at which a fraction ``≥ stop_iter`` of the rows is done. Done rows
    still take later improvements until the scan stops (as in the reference); early stopping limits the pull
    of outlier rows whose r keeps falling. The layer's q is the mean of the rows' q's.

    Deliberate differences from the reference: fp64 throughout (it compares in fp16), the running best starts
    at +inf (it starts at 10000, which can leave a row at ``q = 1 − p``), and the grid start is rounded with a
    small slack against float noise.

    Args:
        c: influence matrix, shape (rows, inputs), bias column included (see :func:`influence`).
        rate: fraction of delta entries dropped, in [0, 1).
        eta: the tuned balance ``η > 0`` (searched with :func:`deltakit.grid_search.two_stage_grid_search`).
        prob: confidence ``1 − γ`` of the bound, in (0, 1).
        stop_iter: fraction of rows that must be done to stop the scan, in (0, 1].
        q_max: last grid point, in (0, 1).
        step: grid spacing, > 0.

    Returns:
        An :class:`AnalyticalQ` with the layer q, the per-row q's and the number of grid points scanned.

    Raises:
        ValueError: if an argument is out of range or the grid is empty (``1 − rate`` above ``q_max``, i.e.
            so few entries dropped that DARE's own q is above the grid; use ``q = 1 − rate`` there).
    """
    rate = _check_rate(rate)
    c = _as_c(c)
    eta, prob = _number("eta", eta), _number("prob", prob)
    stop_iter, q_max, step = _number("stop_iter", stop_iter), _number("q_max", q_max), _number("step", step)
    if eta <= 0:
        raise ValueError(f"eta={eta!r} must be > 0; tune it with two_stage_grid_search.")
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob={prob!r} is outside (0, 1); it is the bound's confidence 1 - gamma (default 0.95).")
    if not 0.0 < stop_iter <= 1.0:
        raise ValueError(f"stop_iter={stop_iter!r} is outside (0, 1]; it is the fraction of rows done to stop.")
    if not 0.0 < q_max < 1.0:
        raise ValueError(f"q_max={q_max!r} is outside (0, 1); the reference uses 0.998.")
    if not 0.0 < step <= q_max:
        raise ValueError(f"step={step!r} must be in (0, q_max={q_max}]; the reference uses 0.001.")
    grid = _analytical_grid(rate, q_max, step)
    if not grid:
        raise ValueError(
            f"rate={rate!r} leaves 1 - rate = {1 - rate:g} above q_max={q_max}: the q grid is empty. "
            "At such low rates use DARE's q = 1 - rate, or raise q_max."
        )

    s, sq = _row_sums(c)  # (rows,), (rows,)
    n_rows = s.shape[0]
    var_coef = eta**2 * phi(rate) / 4.0
    confidence = math.log(2.0 / (1.0 - prob))
    best = torch.full_like(s, math.inf)
    row_q = torch.full_like(s, math.nan)
    done = torch.zeros_like(s, dtype=torch.bool)
    scanned = 0
    for q in grid:
        scanned += 1
        r = (eta * (1.0 - (1.0 - rate) / q) * s + (var_coef / q**2) * sq + confidence).abs()  # (rows,)
        done |= r >= best
        better = r <= best  # ties -> the later q
        best = torch.where(better, r, best)
        row_q = torch.where(better, torch.full_like(row_q, q), row_q)
        if int(done.sum()) / n_rows >= stop_iter:
            break
    return AnalyticalQ(layer_q=float(row_q.mean()), row_q=row_q, n_grid_points_scanned=scanned)


def q_for_tensor(name: str, layer_qs: dict[str, float]) -> float | None:
    """The q that DAREx's per-layer rescale applies to one checkpoint tensor (``rescale_q``).

    Rules, first match wins:

    1. the output head (:func:`deltakit.names.is_head`: classifier, score, lm_head) gets ``None`` (its delta is
       not pruned or rescaled; it keeps its fine-tuned value);
    2. a name with its own entry in ``layer_qs`` (a Linear ``.weight`` with an activation record, BERT's pooler
       included) uses it;
    3. a bias ``<module>.bias`` uses the q of ``<module>.weight`` when that weight has one;
    4. everything else (embeddings, LayerNorm weights and biases, biases of layers without a q) uses the mean
       of all layer q's.

    Names are checkpoint names exactly (``bert.encoder.layer.0.attention.self.query.weight``,
    ``model.layers.0.self_attn.q_proj.weight``); the ``.weight`` ↔ ``.bias`` pairing is by suffix of the same
    module. Which tensors are prunable at all is decided separately by the prunable-set preset; this rule only
    says which divisor a pruned tensor gets.

    Args:
        name: the tensor's name.
        layer_qs: per-layer q, keyed by weight name (e.g. ``AnalyticalQ.layer_q`` per Linear weight).

    Returns:
        The divisor q, or ``None`` for a head tensor.

    Raises:
        ValueError: if the mean is needed but ``layer_qs`` is empty, or a q is not a positive finite number.
    """
    if is_head(name):
        return None
    if name in layer_qs:
        return _valid_layer_q(name, layer_qs[name])
    if name.endswith(".bias"):
        weight_name = name[: -len(".bias")] + ".weight"
        if weight_name in layer_qs:
            return _valid_layer_q(weight_name, layer_qs[weight_name])
    if not layer_qs:
        raise ValueError(
            f"layer_qs is empty, so {name!r} has no q (it would get the mean of the layer q's). "
            "Compute analytical_q for at least one Linear weight first."
        )
    return math.fsum(_valid_layer_q(k, v) for k, v in layer_qs.items()) / len(layer_qs)


def _valid_layer_q(name: str, q: float) -> float:
    q = _number(f"layer_qs[{name!r}]", q)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"layer_qs[{name!r}]={q!r} is outside (0, 1]; a rescale divisor q must be in (0, 1].")
    return q
