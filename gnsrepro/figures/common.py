"""What every figure shares: saving PNG + PDF (+ the plotted values), titles, the GNS source to plot.

Figures are drawn on `matplotlib.figure.Figure` objects with an Agg canvas, never through pyplot, so
importing this package changes no global matplotlib state (a notebook keeps its own backend) and no
figure is left open.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from gnsrepro.errors import ConfigError

# gns.parquet sources in the order the figures prefer them: per-example norms give B_small = 1, the
# lowest-variance estimate (the paper's estimator-variance figure); micro-batches see every parameter
# even when only the LayerNorms are instrumented (gns=ln).
SOURCES = ("per_example", "microbatch", "ddp")
LINEAR_GROUPS = ("attention", "mlp", "embedding")  # the paper's "Linear/Embedding" layer types


def new_figure(width: float, height: float) -> Figure:
    """An empty figure with an Agg canvas and constrained layout (labels are not clipped)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def output_stem(out: str | os.PathLike) -> Path:
    """`out` without a .png / .pdf suffix: the stem that the figure's files are named from."""
    out = Path(out)
    return out.with_suffix("") if out.suffix.lower() in (".png", ".pdf") else out


def save(fig: Figure, out: str | os.PathLike, values: pd.DataFrame | None = None) -> list[Path]:
    """Write `<out>.png` and `<out>.pdf` (and the plotted values as `<out>.parquet`); return the paths."""
    stem = output_stem(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    if values is not None:
        paths.append(stem.with_name(stem.name + ".parquet"))
        values.to_parquet(paths[-1], index=False)
    return paths


def format_count(x: float) -> str:
    """12_345_678 -> '12.3M', as the training console prints token counts."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def run_description(run, tokens: str | None = None) -> str:
    """'model tiny (2 layers, d=64), 204.8k tokens, gns=all, on <device>' from config.yaml, metrics.parquet
    and meta.json; `tokens` replaces the run's token count (e.g. 'up to 1M' for several runs)."""
    model = run.config.get("model", {})
    shape = f" ({model['n_layer']} layers, d={model['n_embd']})" if "n_layer" in model and "n_embd" in model else ""
    if tokens is None:
        tokens = format_count(run.metrics["tokens"].max() if len(run.metrics) else 0)
    gns_mode = run.config.get("gns", {}).get("mode")
    parts = [f"model {model.get('name', '?')}{shape}", f"{tokens} tokens"]
    if gns_mode is not None:
        parts.append(f"gns={gns_mode}")
    device = run.meta.get("device")
    world = run.meta.get("world_size", 1)
    if device:
        parts.append(f"on {world}x {device}" if world and world > 1 else f"on {device}")
    return ", ".join(parts)


def choose_source(gns: pd.DataFrame, source: str | None, run_path, needed=("layernorm", "total")) -> str:
    """The gns.parquet source a figure plots: `source` if given, else the first of SOURCES whose rows have
    every group in `needed`, else the first present. Raises ConfigError when there is none."""
    present = [s for s in SOURCES if s in set(gns["source"])]
    if source is not None:
        if source not in SOURCES:
            raise ConfigError(f"source={source!r} is not a gns.parquet source; accepted: {', '.join(SOURCES)}")
        if source not in present:
            raise ConfigError(f"source={source}: run {run_path} has no {source} rows; it has "
                              f"{', '.join(present) or 'none'}")
        return source
    if not present:
        raise ConfigError(f"run {run_path} has no GNS rows of a known source ({', '.join(SOURCES)})")
    for s in present:
        if set(needed) <= set(gns.loc[gns["source"] == s, "group"]):
            return s
    return present[0]


def positive(values) -> np.ndarray:
    """The values as floats with the non-positive ones set to NaN: a log axis cannot place them, and a
    smoothed |G|² or S estimate is still negative on a run's first noisy steps."""
    x = np.asarray(values, dtype=np.float64).copy()
    x[~(x > 0)] = np.nan
    return x


def readable_log_axis(axis) -> None:
    """Plain-number tick labels on a log axis that spans few decades, where matplotlib's default labels
    either one tick or crowds its minor ticks' labels together. Call after the limits are final."""
    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and np.isfinite(hi)) or hi / lo >= 100:
        return
    # under a factor of 3 evenly spaced ticks read best; under a decade, 1-8 x 10^k; else 1, 2, 5 x 10^k
    if hi / lo < 3:
        axis.set_major_locator(MaxNLocator(4))
    else:
        axis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0) if hi / lo < 10
                                          else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def gns_over_tokens_axes(ax, alpha: float, ylabel: str = "GNS = ema(S) / ema(|G|²) (sequences)",
                         legend_size: int = 8) -> None:
    """The GNS-over-training panel's axes: log GNS in sequences against tokens seen, title, legend, grid."""
    ax.set_yscale("log")
    readable_log_axis(ax.yaxis)
    tokens_axis(ax.xaxis)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.set_title(f"GNS over training (EMA α={alpha:g})", fontsize=10)
    ax.legend(fontsize=legend_size, loc="best")
    ax.grid(True, which="major", alpha=0.3)


def tokens_axis(axis) -> None:
    """Token counts as 20k, 1.5M, ... instead of 20000 or an offset."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: format_count(v)))
