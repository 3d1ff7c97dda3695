"""`figure=ddp`: the per-example GNS against the GNS from DDP ranks' local gradients (Gray et al. 2024,
p. 21: their 1.3B model trained with DDP on 8 H100s).

A run under `torchrun --nproc_per_node=N` logs two estimates of the same GNS each step (README, "Logs"):
`per_example` (B_small = 1, from the instrumented layers' per-example norms) and `ddp` (B_small = the
per-rank batch, from each rank's local gradient before DDP's all-reduce). Both are unbiased estimates of
|G|² and tr(Σ) (McCandlish et al. 2018, appendix A.1, eq. A.2), so their smoothed GNS should agree up to
noise, the per-example one having the lower variance. From one run's gns.parquet: the LayerNorm and total
GNS of both sources over tokens, each smoothed by `gnsrepro.sweep.smoothed_gns` (ema(S) / ema(|G|²)), and
the DDP one against the per-example one, as a scatter about the diagonal and as their ratio over tokens.
With gns=ln the per-example source logs only the LayerNorm group, so the total is drawn for ddp alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import (
    gns_over_tokens_axes,
    new_figure,
    positive,
    readable_log_axis,
    run_description,
    save,
    tokens_axis,
)
from gnsrepro.figures.phase import check_alpha

GROUPS = ("layernorm", "total")  # the groups compared, in drawing order
LABELS = {"layernorm": "LayerNorm", "total": "total (all parameters)"}
COLOURS = {"layernorm": "tab:blue", "total": "black"}
REFERENCE_SOURCES = ("per_example", "microbatch")  # what the ddp source can be compared with
VALUE_COLUMNS = ["group", "step", "tokens", "source", "b_small_ddp", "gns_reference", "gns_ddp", "ratio"]


def ddp_values(gns: pd.DataFrame, alpha: float, source: str = "per_example", guard=None) -> pd.DataFrame:
    """The plotted values: one row per group of GROUPS that the ddp source logs, and step.

    Columns: group, step, tokens; source (the reference source's name); b_small_ddp (the per-rank batch of
    that step); gns_reference and gns_ddp, `gnsrepro.sweep.smoothed_gns` of each source's (source, group)
    series at `alpha` (through `guard`, a gnsrepro.gns.HampelFilter, when given), NaN where the reference
    does not log the group (the total under gns=ln); ratio = gns_ddp / gns_reference.
    """
    from gnsrepro.sweep import smoothed_gns

    rows = gns[gns["group"].isin(GROUPS) & gns["source"].isin(("ddp", source))]
    smoothed = smoothed_gns(rows, alpha, guard)
    key = ["group", "step"]
    ddp = smoothed[smoothed["source"] == "ddp"][[*key, "tokens", "gns"]].rename(columns={"gns": "gns_ddp"})
    ref = smoothed[smoothed["source"] == source][[*key, "gns"]].rename(columns={"gns": "gns_reference"})
    b_small = rows[rows["source"] == "ddp"][[*key, "b_small"]].rename(columns={"b_small": "b_small_ddp"})
    values = ddp.merge(ref, on=key, how="left").merge(b_small, on=key, how="left")
    values["source"] = source
    values["ratio"] = values["gns_ddp"] / values["gns_reference"]
    order = {g: i for i, g in enumerate(GROUPS)}
    values = values.sort_values(["group", "step"], key=lambda c: c.map(order) if c.name == "group" else c)
    return values[VALUE_COLUMNS].reset_index(drop=True)


def _ranks_label(values: pd.DataFrame) -> str:
    sizes = sorted(set(values["b_small_ddp"].dropna().astype(int)))
    if not sizes:
        return "per-rank batch"
    shown = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return f"per-rank batch of {shown}"


def draw_ddp(values: pd.DataFrame, alpha: float, title: str):
    """Left: GNS over tokens per group, the reference source solid and ddp dashed (log GNS). Middle: the ddp
    GNS against the reference's, one point per step, with the diagonal (log-log). Right: their ratio over
    tokens, with the median over the second half of the steps in the legend. Returns the matplotlib Figure."""
    source = values["source"].iloc[0]
    ref_label = {"per_example": "per-example (B_small = 1)", "microbatch": "micro-batch"}[source]
    ddp_label = f"DDP ranks ({_ranks_label(values)})"
    fig = new_figure(15.5, 4.9)
    over_tokens, scatter, ratio_ax = fig.subplots(1, 3, width_ratios=[1.25, 1, 1.1])
    masked = False
    for group in dict.fromkeys(values["group"]):
        v = values[values["group"] == group]
        colour = COLOURS[group]
        ref, ddp = positive(v["gns_reference"]), positive(v["gns_ddp"])
        masked |= bool(np.isnan(ddp).any() or (np.isnan(ref).any() and v["gns_reference"].notna().any()))
        if v["gns_reference"].notna().any():
            over_tokens.plot(v["tokens"], ref, color=colour, lw=2.0, label=f"{LABELS[group]}, {ref_label}")
        over_tokens.plot(v["tokens"], ddp, color=colour, lw=1.4, ls="--", label=f"{LABELS[group]}, {ddp_label}")
        both = np.isfinite(ref) & np.isfinite(ddp)
        if both.any():
            scatter.scatter(ref[both], ddp[both], color=colour, s=8, alpha=0.6, label=LABELS[group])
            r = v["ratio"].to_numpy(dtype=float)
            late = r[len(r) // 2:]
            median = np.nanmedian(late) if np.isfinite(late).any() else np.nan
            ratio_ax.plot(v["tokens"], r, color=colour, lw=1.4,
                          label=f"{LABELS[group]}: median {median:.3f} over the second half")
    gns_over_tokens_axes(over_tokens, alpha, legend_size=7)

    if scatter.collections:
        scatter.set_xscale("log")
        scatter.set_yscale("log")
        lo = min(scatter.get_xlim()[0], scatter.get_ylim()[0])
        hi = max(scatter.get_xlim()[1], scatter.get_ylim()[1])
        scatter.plot([lo, hi], [lo, hi], ls=":", color="0.4", lw=1.0, label="equal")
        scatter.set_xlim(lo, hi)
        scatter.set_ylim(lo, hi)
        readable_log_axis(scatter.xaxis)
        readable_log_axis(scatter.yaxis)
        scatter.legend(fontsize=8, loc="best")
    scatter.set_xlabel(f"GNS, {ref_label}")
    scatter.set_ylabel("GNS, DDP ranks")
    scatter.set_title("DDP against the reference, one point per step", fontsize=10)
    scatter.grid(True, which="major", alpha=0.3)

    ratio_ax.axhline(1.0, ls=":", color="0.4", lw=1.0)
    tokens_axis(ratio_ax.xaxis)
    ratio_ax.set_xlabel("tokens seen")
    ratio_ax.set_ylabel("GNS ratio, DDP / reference")
    ratio_ax.set_title("ratio over training", fontsize=10)
    if ratio_ax.get_lines()[1:]:
        ratio_ax.legend(fontsize=7, loc="best")
    ratio_ax.grid(True, which="major", alpha=0.3)
    if masked:
        fig.text(0.005, 0.005, "non-positive smoothed estimates (noisy first steps) are left out of the log axes",
                 fontsize=7, color="0.4", ha="left", va="bottom")
    fig.suptitle(title, fontsize=11)
    return fig


def _check_source(source: str | None, gns: pd.DataFrame, run_path) -> str:
    present = sorted(set(gns["source"]))
    if "ddp" not in present:
        raise ConfigError(f"run {run_path} has no ddp rows in gns.parquet (it has {', '.join(present) or 'none'}): "
                          "a run of one process logs none; train it under `torchrun --nproc_per_node=N` with N >= 2 "
                          "and gns=ln or gns=all")
    source = "per_example" if source is None else source
    if source not in REFERENCE_SOURCES:
        raise ConfigError(f"source={source}: figure=ddp compares the ddp source with one of "
                          f"{', '.join(REFERENCE_SOURCES)}")
    if source not in present:
        raise ConfigError(f"source={source}: run {run_path} has no {source} rows; it has {', '.join(present)}")
    return source


def ddp(run_dir: str | os.PathLike, out: str | os.PathLike, alpha: float = 0.99, source: str | None = None,
        outlier_guard: bool = True) -> list[Path]:
    """Draw the ddp figure of the run in `run_dir` to `<out>.png`, `<out>.pdf` and its plotted values to
    `<out>.parquet` (`ddp_values`); return the paths. source: the source compared with ddp, per_example (the
    default) or microbatch. outlier_guard: smooth through `gnsrepro.gns.HampelFilter`, as the training
    console does. Raises ConfigError, one line, for a run without ddp rows or without the source's rows."""
    from gnsrepro.gns import HampelFilter
    from gnsrepro.runs import load_run

    alpha = check_alpha(alpha)
    run = load_run(run_dir)
    source = _check_source(source, run.gns, run.path)
    values = ddp_values(run.gns, alpha, source, HampelFilter() if outlier_guard else None)
    if values.empty:
        raise ConfigError(f"run {run.path} has no ddp rows of the groups {', '.join(GROUPS)} in gns.parquet")
    world = run.meta.get("world_size", "?")
    title = (f"Per-example against DDP-rank GNS ({world} ranks): {run.path.name}: {run_description(run)}"
             if source == "per_example" else
             f"Micro-batch against DDP-rank GNS ({world} ranks): {run.path.name}: {run_description(run)}")
    fig = draw_ddp(values, alpha, title)
    return save(fig, out, values)
