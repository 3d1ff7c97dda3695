"""`figure=lrsweep`: learning-rate sweeps, the final validation loss against the peak learning rate per model
with each model's optimum marked (Gray et al. 2024, appendix, p. 16: the sweeps for 70M, 111M and 161M).

From each run's metrics.parquet and config.yaml: the run's final validation loss is the last logged non-null
val_loss (training evaluates at its last step), its learning rate `optim.lr` and its model the shape in
`model` (name, layers, heads, width), so widths of one named model (e.g. `model.n_embd=32,64,128` of the
tiny model) are models of their own. A run that stopped before its max_steps / max_tokens (a non-finite
loss, or killed) is drawn as a cross at its last validation loss and takes no part in the optimum, which is
the lowest final validation loss among each model's finished runs; an optimum at either end of the swept
range is flagged, as the true one may lie beyond it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.lines import Line2D

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import format_count, new_figure, save

COLUMNS = ["run", "model", "model_name", "n_layer", "n_head", "n_embd", "approx_params", "lr", "val_loss",
           "val_step", "val_tokens", "last_step", "last_tokens", "finished", "optimum"]


def approx_params(model: dict) -> float:
    """12·n_layer·d² (the blocks' attention and MLP matrices; Kaplan et al. 2020, section 2.1) plus the token
    and position embeddings, (vocab_size + block_size)·d; biases and LayerNorms left out (under 1% here).
    Orders the models and labels them; the run's own count is printed when it starts."""
    d = int(model["n_embd"])
    return 12.0 * int(model["n_layer"]) * d * d + (int(model["vocab_size"]) + int(model["block_size"])) * d


def model_label(model: dict) -> str:
    """'20M (9 layers, 4 heads, d=256, ≈20.2M parameters)'."""
    return (f"{model.get('name', '?')} ({model['n_layer']} layers, {model['n_head']} heads, d={model['n_embd']}, "
            f"≈{format_count(approx_params(model))} parameters)")


def run_finished(run) -> bool:
    """Whether the run's last logged step reached its max_steps or max_tokens (config.yaml)."""
    m = run.metrics
    if m.empty:
        return False
    max_steps, max_tokens = run.config.get("max_steps"), run.config.get("max_tokens")
    return bool((max_steps is not None and m["step"].max() >= max_steps)
                or (max_tokens is not None and m["tokens"].max() >= max_tokens))


def final_val_loss(metrics: pd.DataFrame) -> tuple[float, float, float]:
    """(val_loss, step, tokens) of the last row of metrics.parquet with a finite val_loss; NaNs when none."""
    m = metrics.sort_values("step")
    logged = m[np.isfinite(m["val_loss"].to_numpy(dtype=float))]
    if logged.empty:
        return math.nan, math.nan, math.nan
    last = logged.iloc[-1]
    return float(last["val_loss"]), float(last["step"]), float(last["tokens"])


def lrsweep_values(runs) -> pd.DataFrame:
    """One row per run (COLUMNS), by model (smallest first) and learning rate; `optimum` marks each model's
    finished run of the lowest final validation loss. ConfigError for two runs of one model and lr."""
    rows, seen = [], {}
    for run in runs:
        model = run.config.get("model", {})
        missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size") if k not in model]
        if missing:
            raise ConfigError(f"run {run.path}: config.yaml has no model.{missing[0]} (figure=lrsweep groups runs "
                              "by model shape)")
        lr = float(run.config.get("optim", {}).get("lr", math.nan))
        key = (model.get("name"), model["n_layer"], model["n_head"], model["n_embd"], lr)
        if key in seen:
            raise ConfigError(f"runs {seen[key]} and {run.path} are both model {model_label(model)} at "
                              f"optim.lr={lr:g}; give one run per model and learning rate")
        seen[key] = run.path
        val_loss, val_step, val_tokens = final_val_loss(run.metrics)
        rows.append({"run": str(run.path), "model": model_label(model), "model_name": str(model.get("name", "?")),
                     "n_layer": int(model["n_layer"]), "n_head": int(model["n_head"]), "n_embd": int(model["n_embd"]),
                     "approx_params": approx_params(model), "lr": lr, "val_loss": val_loss, "val_step": val_step,
                     "val_tokens": val_tokens, "last_step": int(run.metrics["step"].max()) if len(run.metrics) else 0,
                     "last_tokens": int(run.metrics["tokens"].max()) if len(run.metrics) else 0,
                     "finished": run_finished(run)})
    values = pd.DataFrame(rows, columns=COLUMNS[:-1])
    values = values.sort_values(["approx_params", "model", "lr"], kind="stable").reset_index(drop=True)
    values["optimum"] = False
    candidates = values[values["finished"] & np.isfinite(values["val_loss"].to_numpy(dtype=float))]
    if not candidates.empty:
        values.loc[candidates.groupby("model", sort=False)["val_loss"].idxmin().to_numpy(), "optimum"] = True
    return values[COLUMNS]


def draw_lrsweep(values: pd.DataFrame, title: str):
    """Final validation loss against learning rate (log x), a line per model through its finished runs, its
    optimum a star; runs that stopped early crosses."""
    fig = new_figure(8.6, 5.8)
    ax = fig.subplots()
    models = list(dict.fromkeys(values["model"]))
    palette = colormaps["tab10"]
    handles, without_val = [], []
    for i, model in enumerate(models):
        colour = palette(i % 10)
        v = values[values["model"] == model]
        done = v[v["finished"] & np.isfinite(v["val_loss"].to_numpy(dtype=float))]
        stopped = v[~v["finished"] & np.isfinite(v["val_loss"].to_numpy(dtype=float))]
        without_val += [Path(r).name for r in v.loc[~np.isfinite(v["val_loss"].to_numpy(dtype=float)), "run"]]
        label = model
        if not done.empty:
            best = done[done["optimum"]].iloc[0]
            edge = " (at the sweep's edge)" if best["lr"] in (v["lr"].min(), v["lr"].max()) else ""
            label = f"{model}: best η={best['lr']:g}{edge}, val loss {best['val_loss']:.3f}"
            ax.plot(done["lr"], done["val_loss"], "o-", color=colour, lw=1.5, ms=5, zorder=2)
            # smaller for each later model and drawn above the earlier ones, so optima at one learning rate and
            # nearly one loss stay visible as concentric stars (the legend names each optimum's η)
            ax.plot([best["lr"]], [best["val_loss"]], marker="*", ms=max(20 - 4 * i, 8), color=colour,
                    markeredgecolor="black", markeredgewidth=0.8, ls="none", zorder=3 + i)
        if not stopped.empty:
            ax.plot(stopped["lr"], stopped["val_loss"], "x", color=colour, ms=8, mew=1.8, ls="none", zorder=2)
        handles.append(Line2D([], [], color=colour, marker="o", ms=5, lw=1.5, label=label))
    handles.append(Line2D([], [], marker="*", ms=13, color="0.6", markeredgecolor="black", ls="none",
                          label="optimum: lowest final validation loss of the model's finished runs"))
    if (~values["finished"] & np.isfinite(values["val_loss"].to_numpy(dtype=float))).any():
        handles.append(Line2D([], [], marker="x", ms=8, mew=1.8, color="0.3", ls="none",
                              label="stopped before its budget (e.g. a non-finite loss): last validation loss"))
    ax.set_xscale("log")
    lrs = sorted(set(values["lr"]))
    if len(lrs) <= 10:
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs])
        ax.minorticks_off()
    ax.set_xlabel("peak learning rate η (optim.lr)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="best")
    if without_val:
        fig.text(0.005, 0.005, f"no validation loss logged, left out: {', '.join(without_val)}", fontsize=7,
                 color="0.4", ha="left", va="bottom")
    fig.suptitle(title, fontsize=10)
    return fig


def _shared(values: list, fmt=str) -> str:
    """The one value all runs share, else 'a-b' from the smallest to the largest."""
    distinct = sorted(set(values))
    return fmt(distinct[0]) if len(distinct) == 1 else f"{fmt(distinct[0])}-{fmt(distinct[-1])}"


def sweep_description(runs) -> str:
    """'12 runs, 65.5k tokens a run, batch 16 x 128 tokens, on cpu' from the runs' configs, metrics and
    meta.json (ranges where the runs differ; the tokens of the finished runs)."""
    finished = [r for r in runs if run_finished(r)] or runs  # a run that stopped early has not its budget's tokens
    tokens = _shared([int(r.metrics["tokens"].max()) if len(r.metrics) else 0 for r in finished], format_count)
    batch = _shared([int(r.config.get("schedule", {}).get("batch_size", 0)) for r in runs])
    seq_len = _shared([int(r.config.get("seq_len") or r.config.get("model", {}).get("block_size", 0)) for r in runs])
    parts = [f"{len(runs)} runs", f"{tokens} tokens a run", f"batch {batch} x {seq_len} tokens"]
    devices = sorted({str(r.meta.get("device")) for r in runs if r.meta.get("device")})
    if devices:
        parts.append(f"on {', '.join(devices)}")
    return ", ".join(parts)


def lrsweep(run_dirs, out: str | os.PathLike) -> list[Path]:
    """Draw the learning-rate sweep of the runs in `run_dirs` (any models, one run per model and learning rate)
    to `<out>.png`, `<out>.pdf` and the plotted values to `<out>.parquet` (`lrsweep_values`); return the paths."""
    from gnsrepro.runs import load_run

    runs = [load_run(r, need_gns=False) for r in run_dirs]
    if not runs:
        raise ConfigError("figure=lrsweep needs run directories: run=[DIR1,DIR2,...]")
    values = lrsweep_values(runs)
    n_models = values["model"].nunique()
    # two lines: the description alone is as wide as the figure
    title = (f"Learning-rate sweep, final validation loss of {n_models} model{'s' if n_models > 1 else ''}\n"
             f"{sweep_description(runs)}")
    fig = draw_lrsweep(values, title)
    return save(fig, out, values)
