"""`figure=variance`: the standard error of the GNS estimate against B_small and B_big (Gray et al. 2024,
section 2.1, the estimator-variance figure).

From `<run>/variance.parquet` only, which `gnsrepro variance run=DIR` computes from *real per-example
gradients* of the run's model (at its initialisation and its last checkpoint) resampled into small and big
batches: per-example norms alone, as training logs them, give |G_Bsmall|² for B_small = 1 only. Per point,
two panels: the relative standard error of one step's GNS estimate (std over resampled big batches of
B_simple = S / |G|², divided by |mean|) against B_small, one line per B_big, and against B_big, one line per
B_small; log-log. The paper's claim: the error falls as B_small falls (B_small = 1 is lowest) and hardly
depends on B_big at a fixed B_small.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import format_count, new_figure, readable_log_axis, run_description, save

# the table's name and columns, from the module that writes it (whose module-level imports are numpy, pandas,
# torch and gnsrepro.gns: the training code it runs is imported only inside its command)
from gnsrepro.variance import COLUMNS, TABLE_NAME

GROUPS = ("total", "layernorm")  # the group drawn: the whole model's when measured (params=all), else LayerNorm's
POINT_NAMES = {"init": "initialisation", "final": "last checkpoint"}
# S / |G|² is a usable estimate only while its denominator stays clear of zero: where the |G|² estimate's standard
# error is above a third of its mean (zero within 3 standard errors) the ratio's spread is that of a ratio whose
# denominator crosses zero, dominated by the few draws nearest it
MAX_GTG_REL_SE = 1 / 3


def read_variance_table(run_dir: str | os.PathLike) -> pd.DataFrame:
    """`<run_dir>/variance.parquet`, checked for the columns `gnsrepro variance` writes. ConfigError otherwise."""
    path = Path(run_dir) / TABLE_NAME
    if not path.is_file():
        raise ConfigError(f"run directory {run_dir} has no {TABLE_NAME}; `gnsrepro variance run={run_dir}` writes it")
    from gnsrepro.runs import read_table

    table = read_table(path, COLUMNS, f"rewrite it with `gnsrepro variance run={run_dir}`")
    if table.empty:
        raise ConfigError(f"{path} has no rows")
    return table


def variance_values(table: pd.DataFrame) -> pd.DataFrame:
    """The plotted rows: those of the group drawn (GROUPS: total, else layernorm), sorted by point, B_big and
    B_small, with two flags. step_usable: one step's |G|² estimate has a relative standard error of at most
    MAX_GTG_REL_SE (gtg_std / |gtg_mean|); same_data_usable: so has its mean over the N / B_big steps of the
    same data (gtg_std / (|gtg_mean| · sqrt(N / B_big)))."""
    group = next((g for g in GROUPS if g in set(table["group"])), None)
    if group is None:
        raise ConfigError(f"variance.parquet has no {' or '.join(GROUPS)} rows (groups: "
                          f"{', '.join(sorted(set(table['group'])))})")
    order = {p: i for i, p in enumerate(POINT_NAMES)}
    rows = table[table["group"] == group].copy()
    gtg_rel_se = rows["gtg_std"] / rows["gtg_mean"].abs()
    rows["step_usable"] = gtg_rel_se <= MAX_GTG_REL_SE
    rows["same_data_usable"] = gtg_rel_se / np.sqrt(rows["examples"] / rows["b_big"]) <= MAX_GTG_REL_SE
    rows = rows.sort_values(["point", "b_big", "b_small"], key=lambda c: c.map(order) if c.name == "point" else c,
                            kind="stable")
    return rows.reset_index(drop=True)


def _batch_size_axis(ax, values) -> None:
    """A log2 x axis over every batch size measured (the same in every row), a tick at each, plain numbers."""
    ticks = sorted(set(int(v) for v in values))
    ax.set_xscale("log", base=2)
    ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)
    axis = ax.xaxis
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _limits(values: pd.Series) -> tuple[float, float] | None:
    finite = values[np.isfinite(values) & (values > 0)]
    return (finite.min() / 1.3, finite.max() * 1.3) if len(finite) else None


# the panels of a row: (y column, x column, a line per, title, the flag of the usable points, how the others
# are drawn: left out (one step's ratio of unusable components can be any size) or hollow)
PANELS = (
    ("gns_rel_se", "b_small", "b_big", "one step: against B_small", "step_usable", "omit"),
    ("gns_rel_se", "b_big", "b_small", "one step: against B_big", "step_usable", "omit"),
    ("gns_rel_se_same_data", "b_big", "b_small", "the same data, {n} sequences: against B_big", "same_data_usable",
     "hollow"),
)


def _draw_panel(ax, v: pd.DataFrame, y: str, x: str, per: str, usable: str, unusable: str, colours: dict) -> None:
    for key, r in v.groupby(per, sort=True):
        colour = colours[key]
        shown = r[r[usable]] if unusable == "omit" else r
        if shown.empty:
            continue
        ax.plot(shown[x], shown[y], color=colour, lw=1.4, marker="o", ms=5)
        hollow = r[~r[usable]] if unusable == "hollow" else r.iloc[:0]
        ax.plot(hollow[x], hollow[y], ls="none", marker="o", ms=5, mfc="white", color=colour)
    left_out = v[~v[usable]]
    if unusable == "omit" and not left_out.empty:
        bigs = ", ".join(str(b) for b in sorted(set(left_out["b_big"])))
        ax.text(0.02, 0.98, f"not drawn: B_big = {bigs}, where one step's |G|²\nestimate is within 3 standard errors "
                "of 0", transform=ax.transAxes, fontsize=7, color="0.35", ha="left", va="top")


def draw_variance(values: pd.DataFrame, title: str):
    """The figure: a row per point (init, final); left and middle, the relative standard error of one step's
    GNS against B_small (a line per B_big) and against B_big (a line per B_small); right, at the same data
    (the N sequences in N / B_big steps) against B_big. Returns the matplotlib Figure."""
    points = list(dict.fromkeys(values["point"]))
    fig = new_figure(15.0, 4.0 * len(points) + 1.5)
    *rows, key_area = fig.subfigures(len(points) + 1, 1, height_ratios=[4.0] * len(points) + [1.0])
    bigs, smalls = sorted(set(values["b_big"])), sorted(set(values["b_small"]))
    colours = {"b_big": {b: colormaps["viridis"](0.85 * i / max(len(bigs) - 1, 1)) for i, b in enumerate(bigs)},
               "b_small": {s: colormaps["plasma"](0.85 * i / max(len(smalls) - 1, 1)) for i, s in enumerate(smalls)}}
    # one y scale per kind of panel over every point, so the points compare by eye: over every point the panels
    # draw (the hollow ones too, which would otherwise fall off the axes; not those left out)
    limits = {y: _limits(values[y] if unusable == "hollow" else values.loc[values[usable], y])
              for y, _, _, _, usable, unusable in PANELS}
    n, resamples = int(values["examples"].iloc[0]), int(values["resamples"].iloc[0])
    for sub, point in zip(rows, points):
        v = values[values["point"] == point]
        first = v.iloc[0]
        reference = v[(v["b_small"] == v["b_small"].min()) & (v["b_big"] == v["b_big"].max())].iloc[0]
        sub.suptitle(f"{POINT_NAMES.get(point, point)}: step {first['step']}, {format_count(first['tokens'])} "
                     f"tokens, GNS ≈ {reference['gns_of_means']:.3g} sequences", fontsize=10)
        for ax, (y, x, per, panel, usable, unusable) in zip(sub.subplots(1, len(PANELS)), PANELS):
            _draw_panel(ax, v, y, x, per, usable, unusable, colours[per])
            _batch_size_axis(ax, values[x])
            ax.set_yscale("log")
            if limits[y] is not None:
                ax.set_ylim(*limits[y])
            readable_log_axis(ax.yaxis)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel(f"{x.replace('b_', 'B_')} (sequences)")
            ax.set_ylabel("relative standard error of the GNS")
            ax.set_title(panel.format(n=n), fontsize=9)
    # the colours are the same in every row: one legend for the lines of the left panels, one for the others
    for key, where, panels in (("b_big", "upper left", "left"), ("b_small", "upper right", "middle and right")):
        handles = [Line2D([], [], color=c, marker="o", ms=5, label=f"{k}") for k, c in colours[key].items()]
        key_area.legend(handles=handles, loc=where, ncol=len(handles), fontsize=8, frameon=False,
                        title=f"{key.replace('b_', 'B_')}, a line each ({panels} panels)", title_fontsize=8)
    hollow = Line2D([], [], ls="none", marker="o", mfc="white", color="0.3",
                    label=f"hollow: the mean |G|² estimate of those {n} sequences is within 3 standard errors of 0")
    if not values["same_data_usable"].all():
        key_area.legend(handles=[hollow], loc="upper center", fontsize=8, frameon=False)
    key_area.text(0.5, 0.02, f"From per-example gradients of {n} sequences of the run's data: {resamples} big "
                  "batches of B_big drawn with replacement per B_big, each split into B_big / B_small small batches. "
                  "One step: the std over resamples of that step's S / |G|² estimate, divided by |its mean|.\nThe "
                  f"same data: that of mean S / mean |G|² over the {n} / B_big steps that read {n} sequences (delta "
                  "method). GNS ≈: mean S / mean |G|² at the lowest B_small and the largest B_big.",
                  fontsize=7, color="0.3", ha="center", va="bottom")
    fig.suptitle(title, fontsize=11)
    return fig


def variance(run_dir: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """Draw the variance figure of the run in `run_dir` (its variance.parquet, config.yaml and meta.json) to
    `<out>.png`, `<out>.pdf` and its plotted values to `<out>.parquet` (`variance_values`); return the paths."""
    from gnsrepro.runs import load_run

    table = read_variance_table(run_dir)
    run = load_run(run_dir, need_gns=False)
    values = variance_values(table)
    group = values["group"].iloc[0]
    title = (f"Standard error of the GNS estimate, {'all parameters' if group == 'total' else group}: "
             f"{run.path.name}: {run_description(run)}")
    fig = draw_variance(values, title)
    return save(fig, out, values)
