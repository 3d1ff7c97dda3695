"""`figure=flashattn`: fused against plain attention in the teacher/student experiment (Gray et al. 2024, appendix,
p. 18; `gnsrepro flashattn`, docs/flashattn.md).

From `<run>/flashattn.parquet`, config.yaml and meta.json only. Left: each student's distillation loss (KL to
the teacher's soft targets) against step, a colour per sigma (the std of the noise on the teacher's c_attn biases),
the fused student (sdpa) solid and the plain one (math) dashed, a cross where a student diverged. Right: the
relative distance of the two students' parameters, ‖θ_sdpa − θ_math‖ / ‖θ_math‖, against step, log y: how far the
fused kernel's rounding has moved training from plain float32 attention.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.lines import Line2D

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import new_figure, positive, save

# the table's name and columns, from the module that writes it (whose module-level imports are numpy, pandas and
# torch: the training code it runs is imported only inside its command)
from gnsrepro.flashattn import COLUMNS, STUDENTS, TABLE_NAME

LINESTYLES = {"sdpa": "-", "math": "--"}
VALUE_COLUMNS = ("sigma", "attention", "step", "loss", "grad_norm", "distance", "diverged", "teacher_logit_max")


def drawable(values) -> np.ndarray:
    """The values as floats, NaN where a log axis cannot place them: non-positive (a distance of exactly 0) or
    non-finite (the loss of a diverged step)."""
    x = positive(values)
    x[~np.isfinite(x)] = np.nan
    return x


def check_input(figure: str, runs: list[str], table: str | None) -> Path:
    """The run directory of `figure=flashattn` (one, holding flashattn.parquet and config.yaml), checked before
    anything is read. ConfigError (one line) otherwise."""
    if table is not None:
        raise ConfigError(f"figure={figure} reads a run directory, not table={table} (table= is for figure=lnbench)")
    if len(runs) != 1:
        raise ConfigError(f"figure={figure} takes one directory of `gnsrepro flashattn`: run=DIR (got {len(runs)})")
    path = Path(runs[0]).expanduser()
    if not path.is_dir():
        raise ConfigError(f"run directory {path} does not exist" if not path.exists() else
                          f"run={path} is not a directory; figure={figure} takes a `gnsrepro flashattn` out_dir")
    for name in (TABLE_NAME, "config.yaml"):
        if not (path / name).is_file():
            raise ConfigError(f"{path} has no {name}; `gnsrepro flashattn out_dir={path}` writes it")
    return path


def read_flashattn_run(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict, dict]:
    """(flashattn.parquet checked for its columns, config.yaml as a dict, meta.json or {} without one)."""
    from omegaconf import OmegaConf

    from gnsrepro.runs import read_table

    path = check_input("flashattn", [str(run_dir)], None)
    table = read_table(path / TABLE_NAME, COLUMNS, f"rewrite it with `gnsrepro flashattn out_dir={path} force=true`")
    if table.empty:
        raise ConfigError(f"{path / TABLE_NAME} has no rows")
    try:
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
    except Exception as e:  # a malformed file: say which, in one line
        raise ConfigError(f"cannot read {path}'s config.yaml / meta.json: {type(e).__name__}: {e}") from None
    return table, config, meta


def flashattn_values(table: pd.DataFrame) -> pd.DataFrame:
    """The plotted rows: VALUE_COLUMNS sorted by sigma, student (sdpa, math) and step. The distance is that of
    the step (the same in both students' rows); the right panel draws it from the sdpa rows."""
    order = {a: i for i, a in enumerate(STUDENTS)}
    values = table[list(VALUE_COLUMNS)].copy()
    values["diverged"] = values["diverged"].astype(bool)
    values = values.sort_values(["sigma", "attention", "step"], kind="stable",
                                key=lambda c: c.map(order).fillna(len(order)) if c.name == "attention" else c)
    return values.reset_index(drop=True)


def draw_flashattn(values: pd.DataFrame, title: str):
    """The figure: loss against step per sigma and student (left), the students' distance against step (right).
    Returns the matplotlib Figure."""
    fig = new_figure(13.0, 5.0)
    loss_ax, dist_ax = fig.subplots(1, 2)
    sigmas = sorted(set(values["sigma"]))
    colours = {s: colormaps["viridis"](0.85 * i / max(len(sigmas) - 1, 1)) for i, s in enumerate(sigmas)}
    for sigma in sigmas:
        v = values[values["sigma"] == sigma]
        logit_max = v["teacher_logit_max"].iloc[0]
        for attention, r in v.groupby("attention", sort=False):
            loss_ax.plot(r["step"], drawable(r["loss"]), color=colours[sigma], ls=LINESTYLES.get(attention, ":"),
                         lw=1.3, label=f"σ={sigma:g} {attention}")
            hit = r[r["diverged"]]
            if not hit.empty:
                drawn = drawable(values["loss"])
                top = np.nanmax(drawn) if np.isfinite(drawn).any() else 1.0  # a non-finite loss: at the top
                y = np.where(np.isfinite(drawable(hit["loss"])), drawable(hit["loss"]), top)
                loss_ax.plot(hit["step"], y, ls="none", marker="x", ms=9, mew=2, color=colours[sigma],
                             label=f"σ={sigma:g} {attention} diverged")
        d = v[v["attention"] == v["attention"].iloc[0]]
        dist_ax.plot(d["step"], drawable(d["distance"]), color=colours[sigma], lw=1.4,
                     label=f"σ={sigma:g} (teacher's attention logits ≤ {logit_max:.3g})")
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("KL(teacher ‖ student) per token (nats)")
    loss_ax.set_title("distillation loss: sdpa (fused) solid, math (plain, float32) dashed", fontsize=9)
    # the colours are the right panel's legend; here only what the line styles mean
    styles = [Line2D([], [], color="0.3", ls=LINESTYLES[a], label=f"{a} student") for a in STUDENTS]
    styles.append(Line2D([], [], color="0.3", ls="none", marker="x", ms=8, mew=2, label="diverged"))
    loss_ax.legend(handles=styles, fontsize=8, loc="upper right")
    dist_ax.set_yscale("log")
    dist_ax.set_xlabel("step")
    dist_ax.set_ylabel("‖θ_sdpa − θ_math‖ / ‖θ_math‖")
    dist_ax.set_title("relative distance of the two students' parameters", fontsize=9)
    dist_ax.legend(fontsize=8, loc="lower right")
    for ax in (loss_ax, dist_ax):
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


def flashattn_title(config: dict, meta: dict, values: pd.DataFrame) -> str:
    """The figure's title: what was run (model, steps, tokens, noise, students) and on which device and dtype."""
    m = config.get("model", {})
    seq_len = config.get("seq_len") or m.get("block_size", "?")
    cosine = list(m.get("cosine_attn_blocks") or [])
    parts = [f"model {m.get('name', '?')} ({m.get('n_layer', '?')} layers, d={m.get('n_embd', '?')}, vocab "
             f"{m.get('vocab_size', '?')}{', cosine attention in blocks ' + str(cosine) if cosine else ''})",
             f"{int(values['step'].max())} steps of {config.get('batch_size', '?')} x {seq_len} random tokens",
             f"noise on the {config.get('noise', 'qkv')} biases, {config.get('student_init', '?')} students",
             f"on {meta.get('device', config.get('device', '?'))}, {meta.get('dtype', config.get('dtype', '?'))}"]
    return "Fused (sdpa) against plain (math) attention, teacher/student (paper p. 18)\n" + ", ".join(parts)


def flashattn(run_dir: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """Draw the flashattn figure of `gnsrepro flashattn`'s out_dir `run_dir` (its flashattn.parquet, config.yaml
    and meta.json) to `<out>.png`, `<out>.pdf` and its plotted values to `<out>.parquet`; return the paths."""
    table, config, meta = read_flashattn_run(run_dir)
    values = flashattn_values(table)
    fig = draw_flashattn(values, flashattn_title(config, meta, values))
    return save(fig, out, values)
