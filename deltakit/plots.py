"""DataFrame -> plotly Figure. No widgets, no I/O: the widgets update these figures' data, the report exports them.

Every function reads the tidy frames that :func:`deltakit.sweep.sweep` and :func:`deltakit.stats.delta_stats`
return, so a plot can always be re-drawn from saved parquet files.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from deltakit.methods import reference_methods
from deltakit.summary import summarise

__all__ = ["metric_curves", "delta_histogram", "layer_kind_heatmap", "similarity_matrix", "q_vs_rate"]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def metric_curves(results: pd.DataFrame, metric: str = "accuracy", *, interval: str = "ci95",
                  log_rate: bool = False, title: str | None = None, figure: go.Figure | None = None) -> go.Figure:
    """Metric versus pruning rate: one line per method (mean over seeds) with a shaded interval, plus dashed
    reference lines for the fine-tune and the base.

    Args:
        results: sweep rows.
        metric: the metric on the y axis.
        interval: see :func:`deltakit.summary.summarise`.
        log_rate: x = kept fraction 1 - rate on a reversed log axis, which spreads out rates near 1 (0.9, 0.99, 0.999).
        title: figure title.
        figure: draw into this figure (e.g. a ``go.FigureWidget``), replacing its traces.

    Returns:
        The figure.
    """
    data = summarise(results, metric, interval)
    fig = figure if figure is not None else go.Figure()
    traces: list[go.Scatter] = []
    references = reference_methods()
    refs = data[data["method"].isin(list(references))]
    curves = data[~data["method"].isin(list(references))]

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
