"""DataFrame -> plotly Figure. No widgets, no I/O: the widgets update these figures' data, the report exports them.

Every function reads the tidy frames that :func:`deltakit.sweep.sweep` and :func:`deltakit.stats.delta_stats`
return, so a plot can always be re-drawn from saved parquet files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from deltakit.methods import reference_methods
from deltakit.summary import summarise

__all__ = ["metric_curves", "merge_curves", "merge_table", "lambda_slice", "delta_histogram", "layer_kind_heatmap",
           "similarity_matrix", "q_vs_rate", "spectral_figure"]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def metric_curves(results: pd.DataFrame, metric: str = "accuracy", *, interval: str = "ci95",
                  log_rate: bool = False, title: str | None = None, figure: go.Figure | None = None,
                  lines: tuple[str, ...] = ()) -> go.Figure:
    """Metric versus pruning rate: one line per method (mean over seeds) with a shaded interval, plus dashed
    reference lines for the fine-tune and the base.

    Args:
        results: sweep rows.
        metric: the metric on the y axis.
        interval: see :func:`deltakit.summary.summarise`.
        log_rate: x = kept fraction 1 - rate on a reversed log axis, which spreads out rates near 1 (0.9, 0.99, 0.999).
        title: figure title.
        figure: draw into this figure (e.g. a ``go.FigureWidget``), replacing its traces.
        lines: methods that do not depend on the rate (task arithmetic), drawn as dotted horizontal lines.

    Returns:
        The figure.
    """
    data = summarise(results, metric, interval)
    fig = figure if figure is not None else go.Figure()
    traces: list[go.Scatter] = []
    references = reference_methods()
    refs = data[data["method"].isin(list(references))]
    flat = data[data["method"].isin(list(lines))]
    curves = data[~data["method"].isin([*references, *lines])]

    def xs(rate: pd.Series) -> np.ndarray:
        r = rate.to_numpy(dtype=float)
        return np.maximum(1.0 - r, 1e-4) if log_rate else r

    for i, (label, g) in enumerate(curves.groupby("label", sort=False)):
        color = _PALETTE[i % len(_PALETTE)]
        g = g.sort_values("rate")
        x = xs(g["rate"])
        traces.append(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([g["hi"], g["lo"][::-1]]),
                                 fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0),
                                 hoverinfo="skip", showlegend=False, legendgroup=label, name=f"{label} interval"))
        traces.append(go.Scatter(x=x, y=g["mean"], mode="lines+markers", name=label, legendgroup=label,
                                 line=dict(color=color), customdata=g[["n_seeds", "lo", "hi"]].to_numpy(),
                                 hovertemplate="rate %{text}<br>mean %{y:.4f}<br>[%{customdata[1]:.4f}, "
                                               "%{customdata[2]:.4f}] over %{customdata[0]} seeds<extra>" + label +
                                               "</extra>", text=[f"{r:g}" for r in g["rate"]]))
    if len(data):
        x_all = xs((curves if len(curves) else data)["rate"])
        span = np.array([x_all.min(), x_all.max()])
        for _, r in refs.iterrows():  # horizontal reference lines as traces: they update with the data
            dark = references[r["method"]].reference_rate == 0.0  # the fine-tune dark, the base light
            traces.append(go.Scatter(x=span, y=[r["mean"], r["mean"]], mode="lines",
                                     name=f"{r['method']} ({r['mean']:.3f})",
                                     line=dict(dash="dash", color="#444" if dark else "#aaa")))
        for i, (_, r) in enumerate(flat.iterrows()):
            traces.append(go.Scatter(x=span, y=[r["mean"], r["mean"]], mode="lines", name=f"{r['label']} "
                                     f"({r['mean']:.3f})", line=dict(dash="dot", color=_PALETTE[-1 - i % 3])))
    with fig.batch_update():  # one update message for a FigureWidget
        fig.data = ()
        for t in traces:
            fig.add_trace(t)
        fig.update_layout(
            title=title or f"{metric} vs pruning rate (mean and {interval} over seeds)",
            xaxis_title="kept fraction 1 - rate (log scale)" if log_rate else "pruning rate (fraction of delta dropped)",
            yaxis_title=metric, template="plotly_white", height=420, legend=dict(orientation="h", y=-0.2),
        )
        fig.update_xaxes(type="log" if log_rate else "linear", autorange="reversed" if log_rate else True)
    return fig


def _merge_slice(results: pd.DataFrame, task: str, lam: float | None) -> pd.DataFrame:
    """The rows of one task at one lambda (references, which have no lambda, always)."""
    rows = results[results["task"] == task]
    if lam is not None:
        rows = rows[rows["lam"].isna() | np.isclose(rows["lam"].astype(float), lam)]
    return rows


def merge_curves(results: pd.DataFrame, task: str, metric: str = "accuracy", *, lam: float | None = None,
                 interval: str = "ci95", figure: go.Figure | None = None) -> go.Figure:
    """One task's metric versus pruning rate for every merge method, beside the fine-tune alone and the base.

    Args:
        results: merge sweep rows (:func:`deltakit.merge.merge_sweep`).
        task: which task (the ``task`` column: a fine-tune's label).
        metric: the metric on the y axis.
        lam: the merge weight to show (None: the largest in the results).
        interval / figure: as :func:`metric_curves`.

    Returns:
        The figure: a line per rate-dependent method (mean and interval over seeds), dotted lines for task
        arithmetic, dashed lines for this task's fine-tune and the base.
    """
    from deltakit.methods import get_merge

    if lam is None:
        lam = float(results["lam"].dropna().max())
    rows = _merge_slice(results, task, lam)
    flat = tuple(m for m in rows["method"].unique() if m not in reference_methods() and not get_merge(m).uses_rate)
    return metric_curves(rows, metric, interval=interval, figure=figure, lines=flat,
                         title=f"{task}: {metric} of the merged model vs pruning rate (lambda {lam:g})")


def merge_table(results: pd.DataFrame, metric: str = "accuracy", *, rate: float, lam: float) -> pd.DataFrame:
    """Task-by-task table at one (rate, lambda): mean over seeds per method and task, and each method's mean over
    tasks; the fine-tunes alone and the base as the first rows. Task arithmetic (rate-free) is shown at rate 0.

    Returns:
        A frame indexed by method label, one column per task plus ``mean``.
    """
    data = summarise(results, metric)
    refs = data[data["method"].isin(list(reference_methods()))]
    at = data[data["lam"].notna() & np.isclose(data["lam"].astype(float), lam)
              & (np.isclose(data["rate"], rate) | np.isclose(data["rate"], 0.0))]
    at = at.sort_values("rate").drop_duplicates(["label", "task"], keep="last")
    table = pd.concat([refs, at]).pivot_table(index="label", columns="task", values="mean", sort=False)
    table["mean"] = table.mean(axis=1)
    return table


def lambda_slice(results: pd.DataFrame, task: str, metric: str = "accuracy", *, rate: float,
                 figure: go.Figure | None = None) -> go.Figure:
    """One task's metric versus the merge weight lambda at one rate (task arithmetic at rate 0), one line per method.

    Returns:
        The figure, with dashed lines for the fine-tune alone and the base.
    """
    data = summarise(results[results["task"] == task], metric)
    refs = data[data["method"].isin(list(reference_methods()))]
    merged = data[data["lam"].notna() & (np.isclose(data["rate"], rate) | np.isclose(data["rate"], 0.0))]
    fig = figure if figure is not None else go.Figure()
    with fig.batch_update():
        fig.data = ()
        for i, (label, g) in enumerate(merged.groupby("label", sort=False)):
            g = g[np.isclose(g["rate"], g["rate"].max())].sort_values("lam")
            fig.add_trace(go.Scatter(x=g["lam"], y=g["mean"], mode="lines+markers", name=label,
                                     line=dict(color=_PALETTE[i % len(_PALETTE)]),
                                     error_y=dict(type="data", symmetric=False, array=g["hi"] - g["mean"],
                                                  arrayminus=g["mean"] - g["lo"])))
        span = [float(merged["lam"].min()), float(merged["lam"].max())] if len(merged) else [0.0, 1.0]
        for _, r in refs.iterrows():
            fig.add_trace(go.Scatter(x=span, y=[r["mean"]] * 2, mode="lines", name=f"{r['method']} ({r['mean']:.3f})",
                                     line=dict(dash="dash", color="#444" if r["method"] == "finetuned" else "#aaa")))
        fig.update_layout(title=f"{task}: {metric} vs merge weight lambda at rate {rate:g}", xaxis_title="lambda",
                          yaxis_title=metric, template="plotly_white", height=380,
                          legend=dict(orientation="h", y=-0.25))
    return fig


def delta_histogram(histograms: pd.DataFrame, *, kind: str = "all", title: str | None = None) -> go.Figure:
    """Distribution of |delta| (log x axis) per model, from ``DeltaStats.histograms``; densities per decade."""
    fig = go.Figure()
    sub = histograms[histograms["kind"] == kind]
    for i, (model, g) in enumerate(sub.groupby("model", sort=False)):
        centre = np.sqrt(g["bin_lo"].to_numpy() * g["bin_hi"].to_numpy())
        frac = g["count"].to_numpy() / g["count"].sum()
        fig.add_trace(go.Scatter(x=centre, y=frac, mode="lines", name=model, line=dict(color=_PALETTE[i % 9])))
    for t, side in ((0.002, "left"), (0.005, "right"), (0.01, "left"), (0.03, "right")):  # labels apart
        fig.add_vline(x=t, line_dash="dot", line_color="#bbb", annotation_text=f"{t:g}",
                      annotation_position=f"top {side}")
    fig.update_xaxes(type="log", title="|delta|")
    fig.update_layout(title=title or f"|delta| distribution ({kind})", yaxis_title="fraction of entries per bin",
                      template="plotly_white", height=380)
    return fig


def layer_kind_heatmap(tensors: pd.DataFrame, model: str, *, value: str = "mean_abs",
                       title: str | None = None) -> go.Figure:
    """Layer x module-kind heatmap of one model's delta statistic (``mean_abs`` weighted by numel)."""
    sub = tensors[tensors["model"] == model].copy()
    if sub.empty:
        raise ValueError(f"no tensors for model {model!r}; models: {sorted(tensors['model'].unique())}")
    sub["w"] = sub[value] * sub["numel"]
    agg = sub.groupby(["layer", "kind"]).agg(w=("w", "sum"), n=("numel", "sum")).reset_index()
    agg["v"] = agg["w"] / agg["n"]
    piv = agg.pivot(index="layer", columns="kind", values="v").sort_index()
    fig = go.Figure(go.Heatmap(z=piv.to_numpy(), x=list(piv.columns), y=[str(i) if i >= 0 else "outside blocks"
                                                                          for i in piv.index],
                               colorscale="Viridis", colorbar=dict(title=value)))
    fig.update_layout(title=title or f"{value} by layer and module kind: {model}", xaxis_title="module kind",
                      yaxis_title="layer", template="plotly_white", height=420)
    return fig


def similarity_matrix(similarity: pd.DataFrame, *, value: str = "cosine", title: str | None = None) -> go.Figure:
    """Symmetric matrix of the global cross-fine-tune similarity (cosine, sign_agreement or topk_overlap)."""
    g = similarity[similarity["tensor"] == "__global__"]
    models = sorted(set(g["model_a"]) | set(g["model_b"]))
    m = pd.DataFrame(np.eye(len(models)), index=models, columns=models)
    for _, r in g.iterrows():
        m.loc[r["model_a"], r["model_b"]] = m.loc[r["model_b"], r["model_a"]] = r[value]
    fig = go.Figure(go.Heatmap(z=m.to_numpy(), x=models, y=models, zmin=-1 if value == "cosine" else 0, zmax=1,
                               colorscale="RdBu" if value == "cosine" else "Blues", text=np.round(m.to_numpy(), 3),
                               texttemplate="%{text}"))
    fig.update_layout(title=title or f"delta {value} across fine-tunes", template="plotly_white", height=380)
    return fig


def q_vs_rate(results: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """The rescale q each method used, versus rate, with DARE's q = 1 - rate as reference."""
    sub = results[results["q"].notna() & (results["status"] == "ok")].drop_duplicates(["label", "rate", "seed"])
    fig = go.Figure()
    rates = np.linspace(0, 1, 101)
    fig.add_trace(go.Scatter(x=rates, y=1 - rates, mode="lines", name="DARE: q = 1 - rate",
                             line=dict(dash="dash", color="#999")))
    for i, (label, g) in enumerate(sub.groupby("label", sort=False)):
        g = g.groupby("rate")["q"].mean().reset_index()
        fig.add_trace(go.Scatter(x=g["rate"], y=g["q"], mode="lines+markers", name=label,
                                 line=dict(color=_PALETTE[i % 9])))
    fig.update_layout(title=title or "rescale q = 1/scale chosen per rate", xaxis_title="pruning rate",
                      yaxis_title="q", yaxis_type="log", template="plotly_white", height=380)
    return fig


def spectral_figure(tensors: pd.DataFrame, model: str | None = None, *, title: str | None = None) -> go.Figure:
    """Stable rank and effective rank of one fine-tune's 2-D deltas by layer, one colour per module kind, with the
    deltas that look like a merged LoRA (``low_rank``) ringed in red.

    Args:
        tensors: ``DeltaStats.tensors`` computed with spectral statistics (``delta_stats(..., spectral=True)``).
        model: the fine-tune shown (default: the first in the table).
        title: figure title.

    Returns:
        The figure: two panels sharing the layer axis (tensors outside the blocks at "outside blocks"), log y axes;
        a kind with one tensor per layer is drawn as a line.

    Raises:
        ValueError: the table has no spectral columns, or no rows for ``model``.
    """
    missing = [c for c in ("stable_rank", "effective_rank", "low_rank") if c not in tensors]
    if missing:
        raise ValueError(f"no spectral statistics in the table (missing columns {missing}); compute them with "
                         "delta_stats(..., spectral=True) or `deltakit stats ... --spectral`.")
    models = list(dict.fromkeys(tensors["model"]))
    model = models[0] if model is None and models else model
    if model not in models:
        raise ValueError(f"no tensors for model {model!r}; models: {sorted(models)}")
    sub = tensors[(tensors["model"] == model) & tensors["stable_rank"].notna()]
    panels = (("stable_rank", "stable rank ||dW||_F^2 / s_max^2"),
              ("effective_rank", "effective rank (Roy & Vetterli)"))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=[t for _, t in panels])
    colours = [c for c in _PALETTE if c != "#d62728"]  # red is the low-rank highlight
    for i, (kind, g) in enumerate(sub.groupby("kind", sort=True)):
        g = g.sort_values("layer")
        mode = "lines+markers" if g["layer"].is_unique else "markers"
        for row, (col, _) in enumerate(panels, start=1):
            fig.add_trace(go.Scatter(x=g["layer"], y=g[col], mode=mode, name=kind, legendgroup=kind,
                                     showlegend=row == 1, text=g["tensor"], line=dict(color=colours[i % len(colours)]),
                                     hovertemplate=f"%{{text}}<br>{col} %{{y:.3g}}<extra>{kind}</extra>"),
                          row=row, col=1)
    low = sub[sub["low_rank"].fillna(False).astype(bool)]
    for row, (col, _) in enumerate(panels, start=1):
        fig.add_trace(go.Scatter(x=low["layer"], y=low[col], mode="markers", legendgroup="low_rank",
                                 name=f"low rank (merged-LoRA-like): {len(low)}", showlegend=row == 1,
                                 text=low["tensor"],
                                 marker=dict(symbol="circle-open", size=15, color="#d62728", line=dict(width=2)),
                                 hovertemplate=f"%{{text}}<br>{col} %{{y:.3g}}<extra>low rank</extra>"),
                      row=row, col=1)
    layers = sorted(int(x) for x in sub["layer"].unique())
    fig.update_xaxes(tickvals=layers, ticktext=["outside blocks" if x < 0 else str(x) for x in layers])
    fig.update_xaxes(title_text="layer", row=2, col=1)
    fig.update_yaxes(type="log")
    fig.update_layout(title=title or f"spectral statistics of the deltas by layer: {model}", template="plotly_white",
                      height=560, legend=dict(orientation="h", y=-0.15))
    return fig
