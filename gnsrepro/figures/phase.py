"""`figure=phase`: the |G|²-S phase plot and GNS over tokens per layer type (Gray et al. 2024, p. 6).

From one run's gns.parquet. Three curves: the LayerNorm parameters, the Linear and Embedding parameters
(the attention, MLP and embedding groups together) and the whole model (`total`). A curve that spans
several groups sums their raw per-step |G|² and S estimates first and smooths the sums: both estimates
are sums over parameters (|G|² = Σ_p |G_p|², tr(Σ) = Σ_p tr(Σ_p)), and smoothing is linear, so this is
the GNS of the union of the groups. Each component is smoothed with the bias-corrected EMA of
`gnsrepro.gns.ema` and GNS = ema(S) / ema(|G|²) (`gns_from_components`; McCandlish et al. 2018,
appendix A.1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.lines import Line2D

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import (
    LINEAR_GROUPS,
    choose_source,
    gns_over_tokens_axes,
    new_figure,
    positive,
    readable_log_axis,
    run_description,
    save,
)
from gnsrepro.gns import HampelFilter, ema, gns_from_components

# curve -> (legend label, the gns.parquet groups it sums)
CURVES = {
    "layernorm": ("LayerNorm", ("layernorm",)),
    "linear_embedding": ("Linear + Embedding", LINEAR_GROUPS),
    "total": ("total (all parameters)", ("total",)),
}
COLOURS = {"layernorm": "tab:blue", "linear_embedding": "tab:orange", "total": "black"}


def check_alpha(alpha: float, key: str = "alpha") -> float:
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"{key}={alpha} must be an EMA smoothing factor in [0, 1) (0.99 in the paper)")
    return float(alpha)


def phase_values(gns: pd.DataFrame, alpha: float, source: str, guard: HampelFilter | None = None) -> pd.DataFrame:
    """The plotted values: one row per curve and step.

    Columns: curve, groups (the gns.parquet groups summed, comma-separated), step, tokens, gtg and
    trsigma (the raw per-step sums), gtg_ema and trsigma_ema (`ema` of each) and gns
    (`gns_from_components` of the sums). A step enters a curve only when every group of the curve that
    the source logs is there, so a sum never covers a partial set of groups. guard: clips one-step outliers
    of each summed component before it is smoothed (`gnsrepro.gns.HampelFilter`); gtg and trsigma stay raw.
    """
    rows = gns[gns["source"] == source]
    frames = []
    for curve, (_, groups) in CURVES.items():
        present = [g for g in groups if g in set(rows["group"])]
        if not present:
            continue
        sel = rows[rows["group"].isin(present)]
        summed = (sel.groupby("step", sort=True)
                  .agg(tokens=("tokens", "first"), gtg=("gtg", "sum"), trsigma=("trsigma", "sum"),
                       n_groups=("group", "nunique"))
                  .reset_index())
        summed = summed[summed["n_groups"] == len(present)].drop(columns="n_groups").reset_index(drop=True)
        gtg, trsigma = summed["gtg"], summed["trsigma"]
        if guard is not None:
            gtg, trsigma = guard.apply(gtg), guard.apply(trsigma)
        frames.append(summed.assign(
            curve=curve, groups=",".join(present),
            gtg_ema=ema(gtg, alpha), trsigma_ema=ema(trsigma, alpha),
            gns=gns_from_components(gtg, trsigma, alpha),
        ))
    columns = ["curve", "groups", "step", "tokens", "gtg", "trsigma", "gtg_ema", "trsigma_ema", "gns"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _constant_gns_lines(ax) -> None:
    """Dotted diagonals |G|² = S / B at powers of ten of B (sequences), inside the current limits."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    k_lo, k_hi = math.floor(math.log10(x0 / y1)), math.ceil(math.log10(x1 / y0))
    step = max(1, math.ceil((k_hi - k_lo) / 8))  # at most about eight lines
    x = np.geomspace(x0, x1, 50)
    for k in range(k_lo, k_hi + 1, step):
        y = x / 10.0**k
        inside = (y >= y0) & (y <= y1)
        if inside.sum() < 2:
            continue
        ax.plot(x, y, ls=":", lw=0.8, color="0.6", zorder=0)
        xm, ym = x[inside][inside.sum() // 2], y[inside][inside.sum() // 2]
        ax.annotate(f"$10^{{{k}}}$", (xm, ym), fontsize=7, color="0.45", ha="center", va="bottom")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def draw_phase(values: pd.DataFrame, alpha: float, title: str):
    """The figure: top, a trajectory panel per curve (ema(|G|²) against ema(S), log-log, coloured by
    tokens); bottom, GNS over tokens (log GNS). Returns the matplotlib Figure."""
    curves = list(dict.fromkeys(values["curve"]))
    fig = new_figure(max(4.8 * len(curves) + 1.5, 8.0), 8.6)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.15, 0.85])
    axes = top.subplots(1, len(curves), squeeze=False)[0]
    tokens = values["tokens"].to_numpy(dtype=float)
    norm = LogNorm(max(tokens.min(), 1.0), tokens.max()) if tokens.min() > 0 else Normalize(0, tokens.max())
    masked = False
    for ax, curve in zip(axes, curves):
        v = values[values["curve"] == curve]
        x, y = positive(v["trsigma_ema"]), positive(v["gtg_ema"])
        masked |= bool(np.isnan(x).any() or np.isnan(y).any())
        ax.plot(x, y, color="0.75", lw=0.8, zorder=1)
        points = ax.scatter(x, y, c=v["tokens"], cmap="viridis", norm=norm, s=9, zorder=2,
                            label=f"(ema S, ema |G|²), α={alpha:g}, one point per step")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if np.isfinite(x).any() and np.isfinite(y).any():
            _constant_gns_lines(ax)
        readable_log_axis(ax.xaxis)
        readable_log_axis(ax.yaxis)
        ax.set_xlabel("S = tr(Σ) estimate, EMA (nats² · sequences)")
        ax.set_ylabel("|G|² estimate, EMA (nats²)")
        ax.set_title(f"{CURVES[curve][0]} [{v['groups'].iloc[0].replace(',', ', ')}]", fontsize=10)
    iso = Line2D([], [], ls=":", color="0.6", label="constant GNS = S / |G|², labelled in sequences")
    top.legend(handles=[points, iso], loc="outside lower center", ncol=2, fontsize=8)
    top.colorbar(points, ax=list(axes), label="tokens seen", shrink=0.85, pad=0.02)

    ax = bottom.subplots()
    for curve in curves:
        v = values[values["curve"] == curve]
        gns = positive(v["gns"])
        masked |= bool(np.isnan(gns).any())
        # total last and dashed: on a run where the Linear layers hold most parameters the two coincide
        style = dict(ls="--", lw=1.4) if curve == "total" else dict(lw=2.0)
        ax.plot(v["tokens"], gns, color=COLOURS[curve], label=CURVES[curve][0], **style)
    gns_over_tokens_axes(ax, alpha, ylabel="GNS = ema(S) / ema(|G|²)\n(sequences)")
    if masked:
        bottom.text(0.005, 0.005, "non-positive smoothed estimates (noisy first steps) are left out of the "
                    "log axes", fontsize=7, color="0.4", ha="left", va="bottom")
    fig.suptitle(title, fontsize=11)
    return fig


def phase(run_dir: str | os.PathLike, out: str | os.PathLike, alpha: float = 0.99,
          source: str | None = None, outlier_guard: bool = True) -> list[Path]:
    """Draw the phase figure of the run in `run_dir` to `<out>.png`, `<out>.pdf` and its plotted values to
    `<out>.parquet` (`phase_values`); return the paths. source: a gns.parquet source, default per_example
    when it logs the LayerNorm and total groups (gns=all), else microbatch. outlier_guard: smooth through
    `gnsrepro.gns.HampelFilter`, as the training console does."""
    from gnsrepro.runs import load_run

    alpha = check_alpha(alpha)
    run = load_run(run_dir)
    source = choose_source(run.gns, source, run.path)
    values = phase_values(run.gns, alpha, source, HampelFilter() if outlier_guard else None)
    if values.empty:
        raise ConfigError(f"run {run.path} has no layernorm, attention, mlp, embedding or total rows of source "
                          f"{source} in gns.parquet")
    title = f"Phase plot, {source} GNS: {run.path.name}: {run_description(run)}"
    fig = draw_phase(values, alpha, title)
    return save(fig, out, values)
