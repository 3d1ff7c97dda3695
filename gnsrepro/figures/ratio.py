"""`figure=ratio`: the GNS of runs that change the batch size B and the learning rate η, some of them together
(η/B fixed) and some one at a time (Gray et al. 2024, section 5 and p. 7: the GNS follows the learning rate,
not the batch size).

From each run's gns.parquet and config.yaml: per run, the smoothed GNS of the LayerNorm parameters (the
paper's per-example LayerNorm estimate) and of all parameters (`total`), B_simple = ema(S) / ema(|G|²)
(`gnsrepro.sweep.smoothed_gns`, i.e. `gnsrepro.gns.gns_from_components` per series; McCandlish et al. 2018,
appendix A.1), over tokens. Colour says η/B, line style says B, so runs of one colour hold the ratio fixed.
A third panel puts each run's GNS at its last step against η: if the GNS follows η, the runs of one η
coincide whatever their B.

Runs of different batch sizes take different numbers of steps for the same tokens, so one EMA factor per
step would average a B = 32 run over four times the tokens of a B = 8 run (and over estimates four times
less noisy each). The smoothing is matched in tokens instead: `alpha` is the factor per step of the
smallest batch among the runs, B_min, and a run of batch B takes alpha^(B / B_min) per step, so every
run's EMA forgets at the same rate per token (its memory, 1 / (1 − alpha) steps of B_min sequences, is the
same number of sequences in every run). With one batch size this is the plain per-step alpha.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.lines import Line2D

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import (
    choose_source,
    format_count,
    new_figure,
    positive,
    readable_log_axis,
    run_description,
    save,
    tokens_axis,
)
from gnsrepro.figures.lrsweep import final_val_loss
from gnsrepro.figures.phase import check_alpha

GROUPS = {"layernorm": "LayerNorm", "total": "total (all parameters)"}
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))  # by batch size, smallest first
MARKERS = ("o", "s", "^", "D", "v", "P")
COLUMNS = ["run", "batch_size", "lr", "lr_over_batch", "seed", "val_loss", "alpha", "source", "group", "step", "tokens",
           "gns", "last"]


def run_settings(run) -> dict:
    """batch_size, lr, lr_over_batch (η/B, per sequence) and seed of a run's config.yaml; ConfigError for a run
    whose batch changes during training (the figure compares fixed batches)."""
    schedule = run.config.get("schedule", {})
    name = schedule.get("name", "constant")
    if name != "constant":
        raise ConfigError(f"figure=ratio compares runs of a fixed batch size; run {run.path} has schedule.name={name} "
                          "(use figure=schedule for batch-size schedules)")
    batch_size, lr = int(schedule["batch_size"]), float(run.config["optim"]["lr"])
    return {"batch_size": batch_size, "lr": lr, "lr_over_batch": lr / batch_size,
            "seed": int(run.config.get("seed", 0))}


def token_matched_alphas(batch_sizes, alpha: float) -> dict[int, float]:
    """{B: alpha^(B / B_min)}: the EMA factor per step of each batch size that forgets at the same rate per
    token as `alpha` does per step of the smallest batch B_min (module docstring)."""
    smallest = min(batch_sizes)
    return {b: alpha ** (b / smallest) for b in sorted(set(batch_sizes))}


def ratio_values(runs, alpha: float, source: str | None = None, guard=None) -> pd.DataFrame:
    """The plotted values: one row per run, group (layernorm, total) and step. Columns: COLUMNS (run: the
    run directory; val_loss: its last logged validation loss, which the legend shows, as the GNS moves with
    training progress; alpha: the run's factor per step, `token_matched_alphas`; last: the row the end-of-run
    panel plots). source: one gns.parquet source for every run (default `choose_source`'s per run, which must
    agree). guard: None, or a `gnsrepro.gns.HampelFilter` applied to each component before smoothing."""
    from gnsrepro.sweep import smoothed_gns

    settings = [run_settings(run) for run in runs]
    shapes = {}
    for run in runs:
        model = run.config.get("model", {})
        shape = tuple(model.get(k) for k in ("name", "n_layer", "n_head", "n_embd")) + (run.config.get("seq_len"),)
        shapes.setdefault(shape, run.path)
    if len(shapes) > 1:
        (a, path_a), (b, path_b) = list(shapes.items())[:2]
        raise ConfigError(f"figure=ratio compares runs of one model and seq_len; runs {path_a} and {path_b} differ "
                          f"(model.name, n_layer, n_head, n_embd, seq_len: {a} and {b})")
    seen = {}
    for run, s in zip(runs, settings):
        key = (s["batch_size"], s["lr"], s["seed"])
        if key in seen:
            raise ConfigError(f"runs {seen[key]} and {run.path} both have schedule.batch_size={key[0]} "
                              f"optim.lr={key[1]:g} seed={key[2]}; give one run per setting")
        seen[key] = run.path
    sources = {choose_source(run.gns, source, run.path) for run in runs}
    if len(sources) > 1:
        raise ConfigError(f"the runs log different GNS sources ({', '.join(sorted(sources))}); pass one with "
                          "source=per_example|microbatch|ddp")
    chosen = sources.pop()
    alphas = token_matched_alphas([s["batch_size"] for s in settings], alpha)
    frames = []
    for run, s in zip(runs, settings):
        rows = run.gns[(run.gns["source"] == chosen) & run.gns["group"].isin(list(GROUPS))]
        if rows.empty:
            raise ConfigError(f"run {run.path} has no layernorm or total rows of source {chosen} in gns.parquet")
        run_alpha = alphas[s["batch_size"]]
        smoothed = smoothed_gns(rows, run_alpha, guard)
        last = smoothed.groupby("group")["step"].transform("max") == smoothed["step"]
        val_loss = final_val_loss(run.metrics)[0]
        frames.append(smoothed.assign(run=str(run.path), val_loss=val_loss, alpha=run_alpha, last=last, **s))
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def _sci(x: float) -> str:
    """2e-3, 1.25e-4: the configs' way of writing a learning rate (0.000125 is hard to compare at a glance)."""
    return np.format_float_scientific(x, precision=3, trim="-", exp_digits=1)


def _run_label(r: pd.Series, show_seed: bool) -> str:
    seed = f", seed {r['seed']}" if show_seed else ""
    val = f", final val loss {r['val_loss']:.2f}" if np.isfinite(r["val_loss"]) else ""
    return f"B={r['batch_size']}, η={_sci(r['lr'])} (η/B={_sci(r['lr_over_batch'])}{seed}){val}"


def draw_ratio(values: pd.DataFrame, alpha: float, title: str):
    """Left: per group, each run's GNS over tokens (log GNS), coloured by η/B and styled by B. Right: each
    run's last smoothed GNS against η (log-log), one marker shape per B, LayerNorm filled and total open."""
    runs = values.drop_duplicates("run")[["run", "batch_size", "lr", "lr_over_batch", "seed", "val_loss"]]
    runs = runs.sort_values(["lr_over_batch", "batch_size", "seed"]).reset_index(drop=True)
    ratios = sorted(set(runs["lr_over_batch"]))
    batches = sorted(set(runs["batch_size"]))
    cmap = colormaps["viridis"]
    colour = {r: cmap(0.1 + 0.75 * i / max(len(ratios) - 1, 1)) for i, r in enumerate(ratios)}
    style = {b: LINE_STYLES[i % len(LINE_STYLES)] for i, b in enumerate(batches)}
    marker = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(batches)}
    show_seed = runs["seed"].nunique() > 1
    groups = [g for g in GROUPS if g in set(values["group"])]

    fig = new_figure(5.0 * len(groups) + 5.0, 5.6)
    axes = fig.subplots(1, len(groups) + 1, width_ratios=[1.0] * len(groups) + [0.95])
    masked = False
    handles = []
    for ax, group in zip(axes, groups):
        for _, r in runs.iterrows():
            v = values[(values["run"] == r["run"]) & (values["group"] == group)]
            if v.empty:
                continue
            y = positive(v["gns"])
            masked |= bool(np.isnan(y).any())
            (line,) = ax.plot(v["tokens"], y, color=colour[r["lr_over_batch"]], ls=style[r["batch_size"]], lw=1.6,
                              label=_run_label(r, show_seed))
            if group == groups[0]:
                handles.append(line)
        ax.set_yscale("log")
        readable_log_axis(ax.yaxis)
        tokens_axis(ax.xaxis)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("GNS = ema(S) / ema(|G|²) (sequences)")
        ax.set_title(f"{GROUPS[group]} GNS over training", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)

    ax = axes[-1]
    last = values[values["last"]]
    for group in groups:
        filled = group == "layernorm"
        for b in batches:
            v = last[(last["group"] == group) & (last["batch_size"] == b)].sort_values("lr")
            y = positive(v["gns"])
            ax.plot(v["lr"], y, color="0.55", ls=style[b], lw=0.9, zorder=1)
            for (_, r), yi in zip(v.iterrows(), y):
                c = colour[r["lr_over_batch"]]
                ax.plot([r["lr"]], [yi], marker=marker[b], ms=7, ls="none", zorder=2, markeredgecolor=c,
                        markerfacecolor=c if filled else "white", markeredgewidth=1.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    lrs = sorted(set(runs["lr"]))
    ax.set_xticks(lrs, [_sci(x) for x in lrs])
    ax.minorticks_off()
    readable_log_axis(ax.yaxis)
    ax.set_xlabel("peak learning rate η")
    ax.set_ylabel("GNS at the last step (sequences)")
    ax.set_title("GNS at the end of each run against η", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    keys = [Line2D([], [], marker=marker[b], color="0.3", ls=style[b], label=f"B={b}") for b in batches]
    keys += [Line2D([], [], marker="o", color="0.3", ls="none", markerfacecolor="0.3" if g == "layernorm" else "white",
                    label=f"{GROUPS[g]} ({'filled' if g == 'layernorm' else 'open'})") for g in groups]
    fig.legend(handles=handles, loc="outside lower left", ncol=min(len(handles), 3), fontsize=8,
               title="colour: η/B (same colour, same ratio); line style: batch size B", title_fontsize=8)
    fig.legend(handles=keys, loc="outside lower right", ncol=2, fontsize=8, title="right panel",
               title_fontsize=8)
    note = (f"EMA matched in tokens: α={alpha:g} per step of B={batches[0]}, α^(B/{batches[0]}) per step of batch B"
            if len(batches) > 1 else f"EMA α={alpha:g} per step")
    if masked:
        note += "; non-positive smoothed estimates (noisy first steps) are left out of the log axes"
    fig.suptitle(f"{title}\n{note}", fontsize=10)
    return fig


def ratio(run_dirs, out: str | os.PathLike, alpha: float = 0.99, source: str | None = None,
          outlier_guard: bool = True) -> list[Path]:
    """Draw the batch-size / learning-rate figure of the fixed-batch runs in `run_dirs` to `<out>.png`,
    `<out>.pdf` and the plotted values to `<out>.parquet` (`ratio_values`); return the paths. alpha: the EMA
    factor per step of the smallest batch (module docstring). source: a gns.parquet source, default
    per_example when it logs the LayerNorm and total groups (gns=all), else microbatch. outlier_guard: smooth
    through `gnsrepro.gns.HampelFilter`, as the training console does."""
    from gnsrepro.gns import HampelFilter
    from gnsrepro.runs import load_run

    alpha = check_alpha(alpha)
    runs = [load_run(r) for r in run_dirs]
    if not runs:
        raise ConfigError("figure=ratio needs run directories: run=[DIR1,DIR2,...]")
    values = ratio_values(runs, alpha, source, HampelFilter() if outlier_guard else None)
    longest = format_count(max(r.metrics["tokens"].max() for r in runs))
    chosen = values["source"].iloc[0]
    title = (f"GNS against batch size B and learning rate η, {chosen} source ({len(runs)} runs): "
             f"{run_description(runs[0], tokens=f'up to {longest}')}")
    fig = draw_ratio(values, alpha, title)
    return save(fig, out, values)
