"""`figure=correlation`: how well each layer type's GNS predicts the total GNS, across EMA smoothing factors
(Gray et al. 2024, section 4 and p. 8; again p. 21).

From one run's gns.parquet, through `gnsrepro.sweep`: `smoothed_gns` gives each group's GNS at each α
(top row: the groups' GNS over tokens with the total's) and `correlation_table` the statistics against
α (bottom row): Pearson r (and the detrended r of log-GNS changes), the slope of total = slope × group,
and the held-out relative error of that slope fitted on the first half of the steps. The statistics
leave out the first `gnsrepro.sweep.DEFAULT_SKIP_FRACTION` of the steps; the top row shades them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import NullLocator

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import (
    choose_source,
    new_figure,
    output_stem,
    positive,
    readable_log_axis,
    run_description,
    save,
    tokens_axis,
)
from gnsrepro.figures.phase import check_alpha

DEFAULT_ALPHAS = (0.9, 0.95, 0.99, 0.995, 0.999)
REFERENCE = "total"
COLOURS = {"attention": "tab:red", "mlp": "tab:green", "layernorm": "tab:blue", "embedding": "tab:purple"}
LABELS = {"attention": "attention", "mlp": "MLP", "layernorm": "LayerNorm", "embedding": "embedding"}


def correlation_values(gns: pd.DataFrame, alphas, source: str, guard=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(smoothed, table) for one source: `smoothed_gns` at every α (with an alpha column) and
    `correlation_table` against the total, both through `guard` (None, or a gnsrepro.gns.HampelFilter)."""
    from gnsrepro.sweep import correlation_table, smoothed_gns

    rows = gns[gns["source"] == source]
    smoothed = pd.concat([smoothed_gns(rows, a, guard).assign(alpha=a) for a in alphas], ignore_index=True)
    table = correlation_table(rows, alphas, reference=REFERENCE, guard=guard)
    return smoothed, table


def draw_correlation(smoothed: pd.DataFrame, table: pd.DataFrame, alphas, title: str):
    """Top: per α, each group's GNS and the total's over tokens (log GNS). Bottom: r, slope and held-out
    error against α (log α's distance from 1, so 0.99 and 0.999 do not crowd together)."""
    from gnsrepro.sweep import DEFAULT_SKIP_FRACTION

    groups = [g for g in dict.fromkeys(table["group"])]
    n = len(alphas)
    fig = new_figure(max(3.3 * n, 13.5), 8.4)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.05])
    axes = top.subplots(1, n, sharey=True, squeeze=False)[0]
    steps = np.sort(smoothed["step"].unique())
    skip_until = steps[math.ceil(DEFAULT_SKIP_FRACTION * len(steps))] if len(steps) else None
    for ax, alpha in zip(axes, alphas):
        s = smoothed[smoothed["alpha"] == alpha]
        for group in [REFERENCE, *groups]:
            g = s[s["group"] == group].sort_values("step")
            style = dict(color="black", lw=2.0) if group == REFERENCE else dict(color=COLOURS.get(group), lw=1.2)
            ax.plot(g["tokens"], positive(g["gns"]), label=LABELS.get(group, group), **style)
        if skip_until is not None:
            first = s[s["step"] <= skip_until]["tokens"]
            if len(first):
                ax.axvspan(s["tokens"].min(), first.max(), color="0.9", zorder=0,
                           label="left out of the statistics")
        ax.set_yscale("log")
        tokens_axis(ax.xaxis)
        ax.set_xlabel("tokens seen")
        ax.set_title(f"α = {alpha:g}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    readable_log_axis(axes[0].yaxis)
    axes[0].set_ylabel("GNS (sequences)")
    top.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    top.suptitle("GNS of each layer type and of the whole model over training", fontsize=10)

    r_ax, slope_ax, err_ax = bottom.subplots(1, 3)
    for group in groups:
        t = table[table["group"] == group].sort_values("alpha")
        x = 1.0 - t["alpha"].to_numpy()
        colour, label = COLOURS.get(group), LABELS.get(group, group)
        r_ax.plot(x, t["pearson_r"], "o-", color=colour, label=label)
        r_ax.plot(x, t["detrended_r"], "s--", color=colour, alpha=0.6, ms=4)
        slope_ax.plot(x, t["slope"], "o-", color=colour)
        err_ax.plot(x, 100 * t["heldout_median_rel_err"], "o-", color=colour)
        err_ax.plot(x, 100 * t["heldout_p90_rel_err"], "^:", color=colour, alpha=0.6, ms=4)
    r_ax.set_ylabel("correlation with the total GNS")
    r_ax.set_title("Pearson r (solid), r of log-GNS changes (dashed)", fontsize=10)
    slope_ax.set_ylabel("slope k of total GNS = k × group GNS")
    slope_ax.set_yscale("log")
    slope_ax.set_title("regression slope (least squares through 0)", fontsize=10)
    err_ax.set_ylabel("held-out |k·group − total| / total (%)")
    err_ax.set_yscale("log")
    err_ax.set_title("held-out error, median (solid) and 90th pct (dotted)", fontsize=10)
    bottom.legend(*r_ax.get_legend_handles_labels(), loc="outside right center", fontsize=8)
    bottom.suptitle(f"Against the total's GNS, first {DEFAULT_SKIP_FRACTION:.0%} of the steps left out; held-out: "
                    "k fitted on the first half of the steps, error on the second", fontsize=10)
    ticks = sorted({1.0 - a for a in alphas})
    for ax in (r_ax, slope_ax, err_ax):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{1 - t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())  # only the α given are ticked
        ax.invert_xaxis()  # α grows to the right
        ax.set_xlabel("EMA factor α")
        ax.grid(True, which="major", alpha=0.3)
    readable_log_axis(slope_ax.yaxis)
    readable_log_axis(err_ax.yaxis)
    fig.suptitle(title, fontsize=11)
    return fig


def correlation(run_dir: str | os.PathLike, out: str | os.PathLike, alphas=DEFAULT_ALPHAS,
                source: str | None = None, outlier_guard: bool = True) -> list[Path]:
    """Draw the correlation figure of the run in `run_dir` to `<out>.png` and `<out>.pdf`, the plotted GNS
    series to `<out>.parquet` and the correlation table (`gnsrepro.sweep.correlation_table`) to
    `<out>-table.parquet`; return the paths. source: default per_example when it logs the total (gns=all),
    else microbatch."""
    from gnsrepro.runs import load_run

    alphas = [check_alpha(float(a), "alphas") for a in alphas]
    if not alphas:
        raise ConfigError("alphas=[]: give at least one EMA factor, e.g. alphas=[0.9,0.99] (each in [0, 1))")
    alphas = sorted(set(alphas))
    run = load_run(run_dir)
    source = choose_source(run.gns, source, run.path, needed=(REFERENCE, "layernorm"))
    logged = set(run.gns.loc[run.gns["source"] == source, "group"])
    if REFERENCE not in logged or len(logged & set(COLOURS)) == 0:
        raise ConfigError(f"run {run.path}: source {source} logs the groups {', '.join(sorted(logged))}; "
                          f"figure=correlation needs {REFERENCE} and at least one layer type (a gns=all run, "
                          "or source=microbatch)")
    from gnsrepro.gns import HampelFilter

    smoothed, table = correlation_values(run.gns, alphas, source, HampelFilter() if outlier_guard else None)
    title = f"Layer-type GNS against total GNS, {source}: {run.path.name}: {run_description(run)}"
    fig = draw_correlation(smoothed, table, alphas, title)
    paths = save(fig, out, smoothed)
    stem = output_stem(out)
    table_path = stem.with_name(stem.name + "-table.parquet")
    table.to_parquet(table_path, index=False)
    return [*paths, table_path]
