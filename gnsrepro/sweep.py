"""`gnsrepro sweep`: how well each layer type's GNS predicts the total GNS, across EMA smoothing factors.

Gray et al. 2024, the correlation figure (arXiv 2411.00999, p. 8; again p. 21): the GNS of each parameter
group, smoothed with an EMA of factor α, is compared over training with the GNS of the whole model: Pearson
r, and the slope of the regression of total on group, both as functions of α.
Everything here reads a run's gns.parquet (README, "Logs"); nothing is trained.

A trend the groups share (GNS grows over training) puts every group's r near 1: on a 20M run attention,
MLP and LayerNorm give r = 0.998, 0.999, 0.998. So `correlation_table` adds two tests of prediction: the
slope fitted on the first half of the steps, applied to the second half (held-out relative error), and the
Pearson r of the changes of log GNS between evaluation points spaced over the run (detrended r), which a
shared exponential trend does not raise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gnsrepro.errors import ConfigError
from gnsrepro.gns import HampelFilter, gns_from_components

# The first 10% of each series' steps is left out of every statistic: the GNS there reflects the random
# initialisation rather than the training that follows (|G|² is large and falls fast while the loss leaves
# ln(vocab)), and the bias-corrected EMA's first values average only a few steps, so they keep the
# single-step noise the smoothing exists to remove.
DEFAULT_SKIP_FRACTION = 0.1
# Detrended r compares log-GNS changes between about this many evaluation points (between 21 and 47 by the
# rounding of the spacing): enough changes for r's standard error to be near 1/sqrt(32) = 0.18, few enough
# that each change spans a stretch of training (1/32 of it) rather than the EMA's step-to-step wiggle.
DETRENDED_POINTS = 32

SMOOTHED_COLUMNS = ["step", "tokens", "source", "group", "gns"]
TABLE_COLUMNS = ["alpha", "source", "group", "n_steps", "pearson_r", "slope", "affine_slope", "affine_intercept",
                 "heldout_median_rel_err", "heldout_p90_rel_err", "diff_every", "n_changes", "detrended_r"]


def smoothed_gns(gns: pd.DataFrame, alpha: float, guard: HampelFilter | None = None) -> pd.DataFrame:
    """The smoothed GNS of every (source, group) series of a gns.parquet frame, at EMA factor `alpha`.

    Each series is ordered by step, and B_simple = ema(tr Σ) / ema(|G|²) is taken with
    `gnsrepro.gns.gns_from_components` (each component smoothed separately, then the ratio; McCandlish et al.
    2018, appendix A.1), each component first through `guard` when given (`gnsrepro.gns.HampelFilter`: the
    console's and a GNS-driven schedule's guard against one-step outliers). Needs columns step, tokens,
    source, group, gtg, trsigma. Returns columns step,
    tokens, source, group, gns, the series in their order of first appearance, each by step.
    """
    ordered = gns.sort_values("step", kind="stable")
    parts = []
    for (source, group), rows in ordered.groupby(["source", "group"], sort=False):
        parts.append(pd.DataFrame({
            "step": rows["step"].to_numpy(),
            "tokens": rows["tokens"].to_numpy(),
            "source": source,
            "group": group,
            "gns": np.asarray(gns_from_components(rows["gtg"], rows["trsigma"], alpha, guard=guard), dtype=np.float64),
        }))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c == "gns" else "object") for c in SMOOTHED_COLUMNS})
    return pd.concat(parts, ignore_index=True)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN for fewer than two points or a constant series."""
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    return float(np.dot(dx, dy)) / denominator if denominator > 0 else math.nan


def _slope_through_origin(x: np.ndarray, y: np.ndarray) -> float:
    """k minimising Σ (y − k·x)²: k = Σxy / Σx²."""
    xx = float(np.dot(x, x))
    return float(np.dot(x, y)) / xx if len(x) and xx > 0 else math.nan


def auto_diff_every(n_steps: int) -> int:
    """The detrended r's spacing in steps when none is given: about DETRENDED_POINTS points over n_steps."""
    return max(1, round(n_steps / DETRENDED_POINTS))


def pair_statistics(group: np.ndarray, total: np.ndarray, diff_every: int | None = None) -> dict:
    """The statistics of one group's smoothed GNS against the reference's, aligned step by step.

    The steps to use have been chosen (warm-up already dropped); non-finite pairs are dropped here.
    - pearson_r: Pearson r of the two series over the steps.
    - slope: least squares of total = k × group through the origin (total regressed on group: the group is
      what is measured and total what is predicted; through the origin because a group GNS of zero should
      predict none, and "total = k × group" is the prediction a GNS-driven batch schedule uses). affine_slope and
      affine_intercept: the ordinary fit total = a × group + b, for comparison.
    - heldout_median_rel_err, heldout_p90_rel_err: k fitted through the origin on the first half of the
      steps predicts total on the second half; the median and 90th percentile of |k·group − total| / |total|.
    - detrended_r: Pearson r of the changes of log GNS between points `diff_every` steps apart
      (auto_diff_every by default); points whose GNS (either series) is not positive are dropped first.
      A shared trend exp(c·step) adds the same constant to every change and so leaves r unchanged.
    """
    group, total = np.asarray(group, dtype=np.float64), np.asarray(total, dtype=np.float64)
    finite = np.isfinite(group) & np.isfinite(total)
    x, y = group[finite], total[finite]
    n = len(x)
    out = {"n_steps": n, "pearson_r": _pearson(x, y), "slope": _slope_through_origin(x, y)}
    if n >= 2 and np.ptp(x) > 0:
        out["affine_slope"], out["affine_intercept"] = (float(v) for v in np.polyfit(x, y, 1))
    else:
        out["affine_slope"] = out["affine_intercept"] = math.nan
    half = n // 2
    k_first_half = _slope_through_origin(x[:half], y[:half])
    if half >= 1 and math.isfinite(k_first_half):
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_err = np.abs(k_first_half * x[half:] - y[half:]) / np.abs(y[half:])
        out["heldout_median_rel_err"] = float(np.median(rel_err))
        out["heldout_p90_rel_err"] = float(np.quantile(rel_err, 0.9))
    else:
        out["heldout_median_rel_err"] = out["heldout_p90_rel_err"] = math.nan
    every = diff_every if diff_every is not None else auto_diff_every(n)
    xs, ys = x[::every], y[::every]
    positive = (xs > 0) & (ys > 0)
    dlog_x, dlog_y = np.diff(np.log(xs[positive])), np.diff(np.log(ys[positive]))
    out.update(diff_every=every, n_changes=len(dlog_x), detrended_r=_pearson(dlog_x, dlog_y))
    return out


def _check_alphas(alphas: Sequence[float]) -> list[float]:
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ConfigError("ema_alpha: no smoothing factor given; pass e.g. ema_alpha=0.9,0.99 (each in [0, 1))")
    bad = [a for a in alphas if not 0.0 <= a < 1.0]
    if bad:
        raise ConfigError(f"ema_alpha={bad[0]:g} must be in [0, 1) (the EMA's factor; 1 would never move)")
    return alphas


def _check_skip_fraction(skip_fraction: float) -> None:
    if not 0.0 <= skip_fraction < 1.0:
        raise ConfigError(f"skip_fraction={skip_fraction:g} must be in [0, 1) (the share of the first steps left out)")


def _check_diff_every(diff_every: int | None) -> None:
    if diff_every is not None and diff_every < 1:
        raise ConfigError(f"diff_every={diff_every} must be a positive number of steps, or null (automatic)")


def correlation_table(gns: pd.DataFrame, alphas: Sequence[float], reference: str = "total",
                      skip_fraction: float = DEFAULT_SKIP_FRACTION, diff_every: int | None = None,
                      guard: HampelFilter | None = None) -> pd.DataFrame:
    """One row per (alpha, source, group ≠ reference): how well the group's GNS predicts the reference's.

    For each α, `smoothed_gns` of every series; each group is aligned with the reference group of the same
    source on their common steps, the first `skip_fraction` of those steps is dropped (DEFAULT_SKIP_FRACTION
    says why), and `pair_statistics` gives the row (Gray et al. 2024's correlation figure: Pearson r and
    regression slope against α). A source without the reference group (gns=ln logs only layernorm per example) gives
    no rows. guard: as in `smoothed_gns`. Columns: TABLE_COLUMNS.
    """
    alphas = _check_alphas(alphas)
    _check_skip_fraction(skip_fraction)
    _check_diff_every(diff_every)
    rows = []
    for alpha in alphas:
        smoothed = smoothed_gns(gns, alpha, guard=guard)
        for source, of_source in smoothed.groupby("source", sort=False):
            ref = of_source[of_source["group"] == reference]
            if ref.empty:
                continue
            ref_gns = ref.set_index("step")["gns"]
            for group, series in of_source.groupby("group", sort=False):
                if group == reference:
                    continue
                pair = pd.concat({"group": series.set_index("step")["gns"], "reference": ref_gns}, axis=1,
                                 join="inner").sort_index()
                # the epsilon: 0.07 x 100 = 7.000000000000001 drops 7 steps, not 8
                kept = pair.iloc[math.ceil(skip_fraction * len(pair) - 1e-9):]
                stats = pair_statistics(kept["group"].to_numpy(), kept["reference"].to_numpy(), diff_every)
                rows.append({"alpha": alpha, "source": source, "group": group, **stats})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str) or not hasattr(value, "__iter__"):  # run=123 arrives from Hydra as an int
        return [value]
    return list(value)


def _write_atomically(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def format_table(table: pd.DataFrame) -> str:
    """The console form of a correlation table: aligned columns, relative errors in %."""
    shown = pd.DataFrame({
        "alpha": table["alpha"].map(lambda v: f"{v:g}"),
        "source": table["source"],
        "group": table["group"],
        "steps": table["n_steps"],
        "r": table["pearson_r"].map(lambda v: f"{v:.4f}"),
        "slope": table["slope"].map(lambda v: f"{v:.4g}"),
        "held-out median %": (100 * table["heldout_median_rel_err"]).map(lambda v: f"{v:.1f}"),
        "held-out p90 %": (100 * table["heldout_p90_rel_err"]).map(lambda v: f"{v:.1f}"),
        "detrended r": table["detrended_r"].map(lambda v: f"{v:.3f}"),
        "changes": table["n_changes"],
    })
    return shown.to_string(index=False)


def run_sweep(cfg) -> dict[str, pd.DataFrame]:
    """`gnsrepro sweep ema_alpha=0.9,0.99 run=DIR`: print each run's correlation table and write it as parquet.

    Each table goes to `<run>/sweep.parquet`, or all of them (one after the other) to `out` when it is given;
    the written tables carry a `run` column (the directory as given) before TABLE_COLUMNS. Every setting and
    every run is checked before any table is computed. Returns {run directory: its table}.
    """
    from gnsrepro.runs import check_run_dir, load_run

    runs = [str(r) for r in _as_list(cfg.run)]
    if not runs:
        raise ConfigError("run: no run directory given; pass run=DIR or run=DIR1,DIR2 "
                          "(directories holding gns.parquet)")
    alphas = _check_alphas(_as_list(cfg.ema_alpha))
    _check_skip_fraction(cfg.skip_fraction)
    _check_diff_every(cfg.diff_every)
    max_tokens = cfg.get("max_tokens")
    if max_tokens is not None and not max_tokens > 0:
        raise ConfigError(f"max_tokens={max_tokens:g} must be a positive number of tokens, or null (the whole run)")
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None and out.is_dir():
        raise ConfigError(f"out={cfg.out} is a directory; give the parquet file to write, "
                          "e.g. out=outputs/sweep.parquet")
    paths = [check_run_dir(Path(r).expanduser()) for r in runs]  # every run's files exist before any is read
    wanted_groups, wanted_sources = [str(g) for g in _as_list(cfg.group)], [str(s) for s in _as_list(cfg.source)]
    selected = {}
    for run, path in zip(runs, paths):
        gns = load_run(path).gns
        if max_tokens is not None:
            if not (gns["tokens"] <= max_tokens).any():
                raise ConfigError(f"max_tokens={max_tokens:g}: run {run} logged no step within it (its first at "
                                  f"{gns['tokens'].min():,.0f} tokens)")
            gns = gns[gns["tokens"] <= max_tokens]
        logged_groups, logged_sources = list(dict.fromkeys(gns["group"])), list(dict.fromkeys(gns["source"]))
        for setting, wanted, logged in (("group", wanted_groups, logged_groups),
                                        ("source", wanted_sources, logged_sources),
                                        ("reference", [cfg.reference], logged_groups)):
            missing = [w for w in wanted if w not in logged]
            if missing:
                raise ConfigError(f"{setting}={missing[0]}: run {run} did not log it; its gns.parquet has "
                                  f"{setting if setting != 'reference' else 'group'}s {', '.join(logged)}")
        keep = gns["source"].isin(wanted_sources or logged_sources)
        keep &= gns["group"].isin([*(wanted_groups or logged_groups), cfg.reference])
        selected[run] = gns[keep]

    tables = {}
    for run, gns in selected.items():
        table = correlation_table(gns, alphas, reference=cfg.reference, skip_fraction=cfg.skip_fraction,
                                  diff_every=cfg.diff_every, guard=HampelFilter() if cfg.outlier_guard else None)
        tables[run] = table
        n_steps = gns["step"].nunique()
        until = f" (up to {max_tokens:,.0f} tokens)" if max_tokens is not None else ""
        print(f"run {run}: {n_steps} steps{until}; GNS of each group against {cfg.reference}'s, the first "
              f"{100 * cfg.skip_fraction:g}% of the steps left out")
        no_reference = [s for s in dict.fromkeys(gns["source"]) if s not in set(table["source"])]
        if no_reference:
            print(f"  source(s) {', '.join(no_reference)}: no {cfg.reference} rows logged (with gns=ln the "
                  "per_example source sees LayerNorm only), left out")
        print(f"  slope: {cfg.reference} = slope x group, least squares through the origin; held-out: the slope "
              "fitted on "
              f"the first half of the steps,\n  |error| / |{cfg.reference}| on the second half; detrended r: "
              "Pearson r of "
              "the log-GNS changes between evaluation points (changes: how many)")
        print(format_table(table) if len(table) else "  (no group to compare)")
        if out is None:
            name = "sweep.parquet" if max_tokens is None else f"sweep-until{max_tokens:.0f}.parquet"
            target = paths[runs.index(run)] / name
            _write_atomically(table.assign(run=run)[["run", *TABLE_COLUMNS]], target)
            print(f"wrote {target}")
    if out is not None:
        combined = pd.concat([t.assign(run=r)[["run", *TABLE_COLUMNS]] for r, t in tables.items()], ignore_index=True)
        _write_atomically(combined, out)
        print(f"wrote {out}")
    return tables
