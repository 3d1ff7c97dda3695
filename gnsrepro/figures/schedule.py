"""`figure=schedule`: batch-size schedules compared (Gray et al. 2024, p. 9; again p. 21): the loss
against tokens of each arm (mean and min-max band over seeds), the batch size each arm used against
tokens, and the tokens each schedule saved against the fixed batch, per loss level.

An arm is every run with the same `schedule.name` in its config.yaml (constant, the paper's fixed batch;
linear, its ramp; gns, the batch driven by the measured GNS), its seeds the runs' `seed`; fixed-batch runs of
several batch sizes (a swept fixed batch) are one arm per size, "fixed B" (`gnsrepro.analysis.schedule_arm`).
The seeds of an arm are averaged on a common token grid (the tokens that all of them reached), by linear
interpolation of each run's per-step values. Tokens saved come from `gnsrepro.analysis.tokens_saved`, against
the reference fixed arm's run of the same seed: the fixed batch `reference=B`, by default the one equal to the
schedules' largest batch (the paper's comparison, p. 9), else the largest (`gnsrepro.analysis.reference_fixed_arm`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from gnsrepro.analysis import fixed_arm_batches, reference_fixed_arm, schedule_arm, smoothing_window
from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import (
    format_count,
    new_figure,
    output_stem,
    readable_log_axis,
    run_description,
    save,
    tokens_axis,
)

REFERENCE_ARM = "constant"
ARM_LABELS = {"constant": "fixed batch", "linear": "linear ramp", "gns": "GNS-driven"}
ARM_COLOURS = {"constant": "black", "linear": "tab:blue", "gns": "tab:orange"}
GRID_POINTS = 400


def group_arms(runs) -> dict[str, dict[int, object]]:
    """{arm: {seed: run}} in the order the runs were given, arms by `gnsrepro.analysis.schedule_arm`;
    ConfigError for two runs of one arm and seed (which of them is meant is unknown)."""
    configs = [run.config for run in runs]
    arms: dict[str, dict[int, object]] = {}
    for run in runs:
        arm = schedule_arm(run.config, configs)
        seed = int(run.config.get("seed", 0))
        if seed in arms.setdefault(arm, {}):
            name = str(run.config.get("schedule", {}).get("name", "?"))
            batch = f" schedule.batch_size={run.config['schedule']['batch_size']}" if arm != name else ""
            raise ConfigError(f"runs {arms[arm][seed].path} and {run.path} are both schedule.name={name}{batch} "
                              f"seed={seed}; give one run per schedule and seed")
        arms[arm][seed] = run
    return arms


def arm_styles(configs, reference_arm: str | None = None) -> tuple[dict[str, str], dict[str, object]]:
    """(labels, colours) of the arms of these runs' configs: ARM_LABELS and ARM_COLOURS, and for a swept fixed
    batch "fixed B": the reference black (by default the largest batch), the others lighter greys, darker as the
    batch grows."""
    labels, colours = dict(ARM_LABELS), dict(ARM_COLOURS)
    fixed = {arm: b for arm, b in fixed_arm_batches(configs).items() if arm != REFERENCE_ARM}
    reference_arm = reference_arm if reference_arm in fixed else next(reversed(fixed), None)
    others = [arm for arm in fixed if arm != reference_arm]
    for shade, arm in zip(np.linspace(0.75, 0.35, len(others)), others):
        labels[arm], colours[arm] = f"fixed {fixed[arm]}", str(round(float(shade), 3))
    if reference_arm is not None:
        labels[reference_arm], colours[reference_arm] = f"fixed {fixed[reference_arm]}", "0.0"
    return labels, colours


def _band(curves: list[tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """mean, min and max over curves (x, y) on a grid of the x range that every curve covers."""
    lo = max(float(x.min()) for x, _ in curves)
    hi = min(float(x.max()) for x, _ in curves)
    grid = np.linspace(lo, hi, GRID_POINTS) if hi > lo else np.array([lo])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return pd.DataFrame({"tokens": grid, "mean": ys.mean(0), "min": ys.min(0), "max": ys.max(0),
                         "n_seeds": len(curves)})


def arm_curves(arms: dict[str, dict[int, object]], column: str) -> pd.DataFrame:
    """Per arm, the seeds' `column` of metrics.parquet against tokens: arm, tokens, mean, min, max, n_seeds."""
    frames = []
    for arm, seeds in arms.items():
        curves = []
        for run in seeds.values():
            m = run.metrics.sort_values("step")
            m = m[np.isfinite(m[column].to_numpy(dtype=float))]
            curves.append((m["tokens"].to_numpy(dtype=float), m[column].to_numpy(dtype=float)))
        frames.append(_band(curves).assign(arm=arm))
    return pd.concat(frames, ignore_index=True)


def saved_tokens(arms: dict[str, dict[int, object]], reference_arm: str = REFERENCE_ARM
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(levels, finals): `gnsrepro.analysis.tokens_saved` of each run of every other arm (the other fixed
    batches too) against the reference arm's run of the same seed (else its first seed). levels: the
    TokensSaved.levels rows with arm, seed, reference_arm, reference_seed and window columns; finals: one row
    per run, the TokensSaved.final fields (at the reference's final smoothed loss) and its messages."""
    from gnsrepro.analysis import tokens_saved

    reference = arms[reference_arm]
    levels, finals = [], []
    for arm, seeds in arms.items():
        if arm == reference_arm:
            continue
        for seed, run in seeds.items():
            ref_seed = seed if seed in reference else next(iter(reference))
            ref = reference[ref_seed]
            window = smoothing_window(ref.metrics, run.metrics)
            result = tokens_saved(ref.metrics, run.metrics, window=window)
            tags = {"arm": arm, "seed": seed, "reference_arm": reference_arm, "reference_seed": ref_seed,
                    "window": window}
            levels.append(result.levels.assign(**tags))
            finals.append({**tags, **result.final.to_dict(), "final_loss": result.final_loss,
                           "messages": " ".join(result.messages)})
    return pd.concat(levels, ignore_index=True), pd.DataFrame(finals)


def draw_schedule(loss: pd.DataFrame, batch: pd.DataFrame, levels: pd.DataFrame | None,
                  finals: pd.DataFrame | None, title: str, labels: dict | None = None, colours: dict | None = None,
                  reference_label: str = "the fixed batch", fixed_arms=()):
    """Loss against tokens, batch size against tokens and (with a fixed arm) tokens saved against loss.

    labels, colours: per arm (default ARM_LABELS, ARM_COLOURS); reference_label: what the savings are against;
    fixed_arms: the fixed arms other than the reference, whose savings are drawn dashed, one legend entry per
    arm (the mean over its seeds), while each schedule arm has one entry per seed.
    """
    labels = ARM_LABELS if labels is None else labels
    colours = ARM_COLOURS if colours is None else colours
    n = 3 if levels is not None else 2
    fig = new_figure(5.4 * n, 5.0)
    axes = fig.subplots(1, n)
    loss_ax, batch_ax = axes[0], axes[1]
    for arm in dict.fromkeys(loss["arm"]):
        colour, label = colours.get(arm), labels.get(arm, arm)
        a = loss[loss["arm"] == arm]
        seeds = int(a["n_seeds"].iloc[0])
        style = "--" if arm in fixed_arms else "-"  # fixed batches other than the reference
        loss_ax.plot(a["tokens"], a["mean"], color=colour, lw=1.2, ls=style,
                     label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''}: mean, min-max)")
        loss_ax.fill_between(a["tokens"], a["min"], a["max"], color=colour, alpha=0.2, lw=0)
        b = batch[batch["arm"] == arm]
        batch_ax.plot(b["tokens"], b["mean"], color=colour, lw=1.4, ls=style, label=label)
        batch_ax.fill_between(b["tokens"], b["min"], b["max"], color=colour, alpha=0.2, lw=0)
    loss_ax.set_yscale("log")
    readable_log_axis(loss_ax.yaxis)
    loss_ax.set_ylabel("training loss (nats/token)")
    loss_ax.set_title("loss against tokens (per step, as logged)", fontsize=10)
    batch_ax.set_ylim(0, 1.45 * float(batch["max"].max()))  # room above the largest batch for the legend
    batch_ax.set_ylabel("batch size (sequences per step)")
    batch_ax.set_title("batch size used", fontsize=10)
    for ax in (loss_ax, batch_ax):
        tokens_axis(ax.xaxis)
        ax.set_xlabel("tokens seen")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if levels is not None:
        ax = axes[2]
        for (arm, seed), s in levels.groupby(["arm", "seed"], sort=False):
            f = finals[(finals["arm"] == arm) & (finals["seed"] == seed)].iloc[0]
            if arm in fixed_arms:
                of_arm = finals[finals["arm"] == arm]
                first = seed == of_arm["seed"].iloc[0]
                mean = of_arm["tokens_saved_pct"].mean()  # NaN when a seed did not reach the final loss
                label = (f"{labels.get(arm, arm)} ({len(of_arm)} seed{'s' if len(of_arm) > 1 else ''}): "
                         + (f"{mean:.1f}% at the final loss (mean)" if np.isfinite(mean) else "final loss not reached"))
                ax.plot(s["loss"], s["tokens_saved"], color=colours.get(arm), lw=1.0, ls="--",
                        label=label if first else "_nolegend_")
            else:
                at_final = (f"{format_count(f['tokens_saved'])} ({f['tokens_saved_pct']:.1f}%) at the final loss"
                            if np.isfinite(f["tokens_saved"]) else "final loss not reached")
                ax.plot(s["loss"], s["tokens_saved"], color=colours.get(arm), lw=1.2,
                        label=f"{labels.get(arm, arm)}, seed {seed}: {at_final}")
            ax.plot([f["final_loss"]], [f["tokens_saved"]], "o", color=colours.get(arm), ms=5)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.invert_xaxis()  # training runs from high loss to low
        tokens_axis(ax.yaxis)
        ax.set_xlabel("smoothed training loss first reached (nats/token)")
        ax.set_ylabel(f"tokens saved against {reference_label}")
        window = int(levels["window"].max())
        ax.set_title(f"tokens saved per loss level (smoothing window {window} steps)", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    return fig


def schedule(run_dirs, out: str | os.PathLike, reference: int | None = None) -> list[Path]:
    """Draw the schedule comparison of the runs in `run_dirs` (any number of arms and seeds) to `<out>.png`,
    `<out>.pdf`, the plotted curves to `<out>.parquet` (panel, arm, tokens, mean, min, max, n_seeds) and,
    with a fixed arm and another, the tokens saved against the reference fixed arm to
    `<out>-tokens-saved.parquet` (per loss level) and `<out>-tokens-saved-final.parquet` (at the reference's
    final smoothed loss); return the paths.

    reference: the batch size of the fixed arm the savings are against (`gnsrepro.analysis.reference_fixed_arm`:
    by default the one equal to the schedules' largest batch, else the largest fixed batch); ConfigError, before
    anything is drawn, when no fixed-batch run has it.
    """
    from gnsrepro.runs import load_run

    runs = [load_run(r, need_gns=False) for r in run_dirs]
    if not runs:
        raise ConfigError("figure=schedule needs run directories: run=[DIR1,DIR2,...]")
    configs = [run.config for run in runs]
    reference_arm = reference_fixed_arm(configs, reference)
    fixed = fixed_arm_batches(configs)  # smallest batch first
    grouped = group_arms(runs)
    arms = {arm: grouped[arm] for arm in [*fixed, *grouped] if arm in grouped}  # the fixed arms by batch, then the rest
    labels, colours = arm_styles(configs, reference_arm)
    loss, batch = arm_curves(arms, "loss"), arm_curves(arms, "batch_size")
    levels = finals = None
    if reference_arm is not None and len(arms) > 1:
        levels, finals = saved_tokens(arms, reference_arm)
    reference_label = "the fixed batch"
    if reference_arm is not None and reference_arm != REFERENCE_ARM:
        labels[reference_arm] += " (reference)"
        reference_label = f"fixed {fixed[reference_arm]}"
    seeds = sorted({s for a in arms.values() for s in a})
    longest = format_count(max(r.metrics["tokens"].max() for r in runs))
    title = (f"Batch-size schedules ({', '.join(labels.get(a, a) for a in arms)}; seeds "
             f"{', '.join(map(str, seeds))}): {run_description(runs[0], tokens=f'up to {longest}')}")
    fig = draw_schedule(loss, batch, levels, finals, title, labels, colours, reference_label,
                        fixed_arms=[a for a in fixed if a != reference_arm])
    values = pd.concat([loss.assign(panel="loss"), batch.assign(panel="batch_size")], ignore_index=True)
    paths = save(fig, out, values)
    if levels is not None:
        stem = output_stem(out)
        for suffix, frame in (("-tokens-saved", levels), ("-tokens-saved-final", finals)):
            paths.append(stem.with_name(stem.name + suffix + ".parquet"))
            frame.to_parquet(paths[-1], index=False)
    return paths
