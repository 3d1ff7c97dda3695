"""Tokens saved by a batch-size schedule: two runs' loss curves compared at equal loss.

The paper's batch-size-schedule experiment (its section on the linear batch schedule, and the figures
of loss against tokens and of tokens saved against loss): for each loss level, the tokens the
fixed-batch (reference) run needed minus the tokens the schedule (other) run needed to first reach it,
on monotone-interpolated loss curves, averaged over seeds; the abstract's 18% is that saving at the
end of training. Tokens, optimizer steps and wall time saved are three different claims (a schedule
with small early batches takes more, cheaper steps per token), so each is reported.

Pure functions on pandas frames as `gnsrepro.runs.load_run` returns them from metrics.parquet (README,
"Logs": one row per optimizer step with step, tokens seen after it, the loss of its batch and its
step_time_s); nothing here imports training code. The curve of one run, `loss_curve`:
1. rows ordered by step (by tokens without a step column), NaN losses dropped;
2. smoothed: a centred rolling median over `window` logged points (robust to a single bad step), then
   a centred rolling mean over the same window (averages the noise the median leaves). Only points
   whose windows lie wholly inside the run are kept (the median and then the mean each reach
   window//2 points to either side, so 2·(window//2) points at each end are dropped): a window cut
   short at the end of a falling curve would average only earlier, higher losses and bias the final
   loss upwards, and that is the loss the headline saving is measured at. Centred, not an EMA: an
   EMA lags, shifting a curve to later tokens by its time constant;
3. made monotone non-increasing, the running minimum of the smoothed curve: the loss a run has
   reached by then, so "first reached" is well defined.
Where the loss bends sharply within a window (the first few per cent of a run) the rolling mean of a
convex curve lies above it (Jensen's inequality), which delays a run's crossings: on loss = a + b/t
logged at equal token steps, by a fraction of about (h/k)²/3 of the tokens at the k-th point, h =
window//2; 0.3% at k = 10·h. A run with fewer points over the same tokens (a larger batch) is delayed
more, so levels early in a run are compared less exactly than the final loss (tests/test_analysis.py
measures both); a smaller window trades that bias for noise. The noise the smoothing leaves moves
the crossings (a running minimum first reaches a level at a downward excursion): on the tests'
curves with per-step loss noise 0.02 and window 51, the final saving of 20% came out 20.09% on
average over 40 seeds, with a standard deviation of 0.5 percentage points from seed to seed.
Where a level falls between two logged points, tokens, steps and wall time are linearly interpolated
between them. Wall time is the cumulative sum of step_time_s (time spent training, not evaluating
or restarting).

A comparison may sweep the fixed batch (issue #18: a saving against a fixed batch far above the early
critical batch is inflated): `schedule_arm` names each run's arm (one per fixed batch size when there are
several), `reference_fixed_arm` the fixed arm the savings are against, and `fixed_batch_losses` each fixed
batch's final loss at the sweep's common token budget, so a schedule can be compared with the best of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import mpmath
import numpy as np
import pandas as pd

from gnsrepro.errors import ConfigError

# Logged points per smoothing window: about 0.5% of a 9,000-step 111M run (120 sequences per step over
# 2.2B tokens), small against the run so the end-of-run trim and the curvature bias above stay small.
SMOOTH_WINDOW = 51
LEVELS = 100  # loss levels on the default grid

# What the curves are compared in: quantity -> its column in `loss_curve`'s frame
QUANTITIES = {"tokens": "tokens", "steps": "step", "time": "time_s"}

REACHED, NEVER_REACHED, ABOVE_START = "reached", "never_reached", "above_start"


def smoothing_window(*metrics: pd.DataFrame) -> int:
    """The loss-curve smoothing window of `loss_curve` for these runs: its default
    SMOOTH_WINDOW, or an odd window of at most an eighth of the shortest run's logged losses, so that
    the curve keeps at least half of its points after the windows' reach is trimmed at both ends."""
    n = min(int(np.isfinite(m["loss"].to_numpy(dtype=float)).sum()) for m in metrics)
    window = min(SMOOTH_WINDOW, max(1, n // 8))
    return window if window % 2 else window - 1


def loss_curve(metrics: pd.DataFrame | pd.Series, window: int = SMOOTH_WINDOW, loss_column: str = "loss",
               name: str = "curve") -> pd.DataFrame:
    """One run's smoothed, monotone loss curve (the module docstring says how).

    metrics: a metrics.parquet frame (columns tokens, the loss column, and optionally step and
    step_time_s), or a Series of losses indexed by tokens. loss_column="val_loss" compares validation
    losses (logged every eval_interval steps only: use a small window). name: how errors call this curve.
    Returns a frame with a fresh index and columns tokens, step, time_s (NaN where the input lacks step /
    step_time_s), loss (raw), loss_smoothed and loss_monotone (non-increasing), for the points kept.
    """
    _check_window(window)
    frame = _as_frame(metrics, loss_column, name)
    step = frame["step"] if "step" in frame else pd.Series(np.nan, index=frame.index)
    time_s = frame["step_time_s"].cumsum() if "step_time_s" in frame else pd.Series(np.nan, index=frame.index)
    curve = pd.DataFrame({"tokens": frame["tokens"].astype(np.float64), "step": step.astype(np.float64),
                          "time_s": time_s.astype(np.float64), "loss": frame[loss_column].astype(np.float64)})
    curve = curve[curve["loss"].notna()].reset_index(drop=True)  # after the cumulative sum: every step's time counts
    needed = 2 * (window - 1) + 2  # two points left after trimming the windows' reach at both ends
    if len(curve) < needed:
        raise ConfigError(f"{name} has {len(curve)} logged points with a {loss_column}; smoothing window={window} "
                          f"needs at least {needed} (use a smaller window)")
    median = curve["loss"].rolling(window, center=True, min_periods=window).median()
    curve["loss_smoothed"] = median.rolling(window, center=True, min_periods=window).mean()
    curve = curve[curve["loss_smoothed"].notna()].reset_index(drop=True)
    curve["loss_monotone"] = curve["loss_smoothed"].cummin()
    return curve


@dataclass
class TokensSaved:
    """The comparison of a reference (fixed-batch) run and another (schedule) run, from `tokens_saved`.

    levels: one row per loss level: loss; for each quantity q in tokens, steps, time: q_reference,
      q_other (first reached, interpolated), q_saved = reference − other and q_saved_pct = 100·saved /
      reference (time in seconds: time_reference_s, ..., time_saved_s); reference_status and
      other_status, "reached", "never_reached" (the run's curve never got that low) or "above_start"
      (the run was already below it at its first kept point, so when it got there is not known); the
      quantities are NaN unless both are "reached".
    final_loss: the reference's final smoothed loss (its lowest, which is the last smoothed value while
      the curve still falls at the end), where the headline saving is measured.
    final: the levels row at final_loss (a Series with the same fields).
    other_final_status: other's status at final_loss; other_reaches_final is it == "reached".
    reference_reaches_other_final: False when the other run ended below any loss the reference
      reached (the levels grid then stops at final_loss: below it there is no reference to compare).
    messages: one sentence per case above that left something undefined, for a report.
    reference, other: the two curves from `loss_curve`.
    """

    levels: pd.DataFrame
    final_loss: float
    final: pd.Series
    other_final_status: str
    reference_reaches_other_final: bool
    messages: list[str] = field(default_factory=list)
    reference: pd.DataFrame | None = None
    other: pd.DataFrame | None = None

    @property
    def other_reaches_final(self) -> bool:
        return self.other_final_status == REACHED


def tokens_saved(reference: pd.DataFrame | pd.Series, other: pd.DataFrame | pd.Series, levels=None,
                 n_levels: int = LEVELS, window: int = SMOOTH_WINDOW, loss_column: str = "loss") -> TokensSaved:
    """Tokens (and steps, wall time) the other run saved against the reference to first reach each loss.

    levels: the loss levels to compare at; by default n_levels levels evenly spaced between the highest
    loss both curves start at or above and the lowest both reach (none when the curves never overlap).
    The saving at the reference's final smoothed loss is always computed (`TokensSaved.final`). A level a
    run never reached gives NaN and a status, never an exception or an extrapolation.
    """
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
        raise ConfigError(f"n_levels must be an integer of at least 2, got n_levels={n_levels!r}")
    ref = loss_curve(reference, window, loss_column, name="reference")
    oth = loss_curve(other, window, loss_column, name="other")
    ref_loss, oth_loss = ref["loss_monotone"].to_numpy(), oth["loss_monotone"].to_numpy()
    if levels is None:
        top, bottom = min(ref_loss[0], oth_loss[0]), max(ref_loss[-1], oth_loss[-1])
        grid = np.linspace(top, bottom, n_levels) if top >= bottom else np.empty(0)
    else:
        grid = np.atleast_1d(np.asarray(levels, dtype=np.float64))
        if grid.ndim != 1 or not np.isfinite(grid).all():
            raise ConfigError(f"levels must be a 1-D sequence of finite losses, got {levels!r}")
    final_loss = float(ref_loss[-1])
    table = _compare(ref, oth, np.append(grid, final_loss))
    final = table.iloc[-1]
    messages = []
    if final["other_status"] == NEVER_REACHED:
        messages.append(f"the other run never reached the reference's final {loss_column} {final_loss:.4g} (its "
                        f"lowest smoothed {loss_column} is {oth_loss[-1]:.4g}): the savings at the final loss are NaN")
    elif final["other_status"] == ABOVE_START:
        messages.append(f"the other run was below the reference's final {loss_column} {final_loss:.4g} from its "
                        f"first kept point on ({oth_loss[0]:.4g}): when it got there is not known, the savings at "
                        "the final loss are NaN")
    reference_reaches_other_final = bool(ref_loss[-1] <= oth_loss[-1])
    if not reference_reaches_other_final:
        messages.append(f"the other run went on below the reference's final {loss_column} {final_loss:.4g} to "
                        f"{oth_loss[-1]:.4g}: levels below the reference's are not compared")
    if levels is None and len(grid) == 0:
        messages.append("the two curves share no loss level: the levels table is empty")
    return TokensSaved(levels=table.iloc[:-1].reset_index(drop=True), final_loss=final_loss,
                       final=final.rename(None), other_final_status=str(final["other_status"]),
                       reference_reaches_other_final=reference_reaches_other_final, messages=messages,
                       reference=ref, other=oth)


@dataclass
class SeedComparison:
    """`tokens_saved_over_seeds`: per_seed (one row per seed: the `TokensSaved.final` fields), summary (one
    row per saving: n (seeds where it is defined), n_undefined, mean, std (sample, ddof=1), min, max,
    t_statistic and p_value of the one-sided paired t-test that the mean saving is above zero), and
    each seed's full `TokensSaved` in results."""

    per_seed: pd.DataFrame
    summary: pd.DataFrame
    results: dict = field(default_factory=dict)


def tokens_saved_over_seeds(reference_runs: Mapping, other_runs: Mapping, **kwargs) -> SeedComparison:
    """The saving at the reference's final loss over several seeds per arm, runs paired by seed.

    reference_runs, other_runs: seed -> metrics frame (or loss Series), the same seeds in both;
    kwargs go to `tokens_saved`. Each seed's saving is already a paired difference (the two arms'
    tokens at one seed's loss), so the paired t-test is a one-sample test of those differences:
    t = mean / (s / √n) with n − 1 degrees of freedom, p = P(T ≥ t) (Student 1908; `student_t_sf`).
    A seed whose other run never reached its reference's final loss has an undefined saving: it is
    counted in n_undefined, left out of mean, std, min and max, and makes the p-value NaN (it is
    evidence against the saving that a t-test cannot weigh).
    """
    unpaired = sorted(set(reference_runs) ^ set(other_runs), key=str)
    if unpaired:
        raise ConfigError(f"reference_runs and other_runs must hold the same seeds; unpaired: {unpaired} "
                          f"(reference {sorted(reference_runs, key=str)}, other {sorted(other_runs, key=str)})")
    if not reference_runs:
        raise ConfigError("reference_runs and other_runs are empty: give at least one seed's run in each")
    results = {seed: tokens_saved(reference_runs[seed], other_runs[seed], **kwargs)
               for seed in sorted(reference_runs, key=str)}
    per_seed = pd.DataFrame([r.final.to_dict() for r in results.values()],
                            index=pd.Index(list(results), name="seed")).infer_objects()
    per_seed = per_seed.drop(columns="loss").assign(final_loss=[r.final_loss for r in results.values()])
    rows = {}
    for column in [c for c in per_seed.columns if "_saved" in c]:
        values = per_seed[column].to_numpy(dtype=np.float64)
        defined = values[np.isfinite(values)]
        n, n_undefined = len(defined), len(values) - len(defined)
        t_statistic, p_value = one_sided_t_test(defined) if n_undefined == 0 else (math.nan, math.nan)
        rows[column] = {"n": n, "n_undefined": n_undefined,
                        "mean": defined.mean() if n else math.nan,
                        "std": defined.std(ddof=1) if n > 1 else math.nan,
                        "min": defined.min() if n else math.nan, "max": defined.max() if n else math.nan,
                        "t_statistic": t_statistic, "p_value": p_value}
    summary = pd.DataFrame.from_dict(rows, orient="index")
    summary.index.name = "saving"
    return SeedComparison(per_seed=per_seed, summary=summary, results=results)


def one_sided_t_test(samples) -> tuple[float, float]:
    """(t, p) of Student's one-sample t-test of H0: mean ≤ 0 against H1: mean > 0.

    t = x̄ / (s / √n), s the sample standard deviation (ddof = 1), p = P(T_{n−1} ≥ t). NaN for fewer than
    two samples; with s = 0, t = ±∞ and p = 0 or 1 (NaN if every sample is 0).
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or not np.isfinite(x).all():
        raise ValueError(f"one_sided_t_test needs a 1-D sequence of finite samples, got {samples!r}")
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    mean, std = float(x.mean()), float(x.std(ddof=1))
    if std == 0.0:
        if mean == 0.0:
            return math.nan, math.nan
        return math.copysign(math.inf, mean), 0.0 if mean > 0 else 1.0
    t = mean / (std / math.sqrt(n))
    return t, student_t_sf(t, n - 1)


def student_t_sf(t: float, dof: float) -> float:
    """P(T ≥ t) for Student's t with dof degrees of freedom, by the regularised incomplete beta function.

    Abramowitz & Stegun 26.7.1 and 26.5.27: for t ≥ 0, P(T ≥ t) = ½·I_x(ν/2, ½) with x = ν / (ν + t²);
    for t < 0 it is 1 − P(T ≥ −t). I_x by mpmath.betainc(..., regularized=True).
    """
    if not dof > 0:
        raise ValueError(f"student_t_sf needs dof > 0, got dof={dof!r}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    x = dof / (dof + t * t)
    upper = 0.5 * float(mpmath.betainc(dof / 2.0, 0.5, 0.0, x, regularized=True))
    return upper if t >= 0 else 1.0 - upper


# ---- the fixed-batch arms of a schedule comparison ---------------------------------------------------------
# A saving against one fixed batch measures how far that batch is above the critical batch early in training as
# much as it measures the schedule (docs/schedules.md, "A fair baseline"): the paper's 18% is against the 111M
# recipe's 120 sequences (p. 9), which it did not sweep. These functions let a comparison hold several fixed
# batches, name the one the savings are measured against, and find the best of them.
FIXED_SCHEDULE = "constant"  # schedule.name of a fixed-batch run


def _schedule_of(config: Mapping) -> tuple[str, int]:
    """(schedule.name, schedule.batch_size) of a run's config.yaml as a dict."""
    schedule = config.get("schedule", {}) or {}
    return str(schedule.get("name", "?")), int(schedule.get("batch_size", 0))


def schedule_arm(config: Mapping, all_configs: Iterable[Mapping]) -> str:
    """The arm a run belongs to in a comparison of the runs whose config.yaml dicts are `all_configs`.

    linear and gns runs: their schedule.name. Fixed-batch runs (schedule.name=constant): "constant" when every
    fixed-batch run of all_configs (and this one) has one schedule.batch_size, the arm of a comparison that
    did not sweep it; else "constant-b<B>", one arm per batch size B. Seeds are not part of the arm.
    """
    name, batch = _schedule_of(config)
    if name != FIXED_SCHEDULE:
        return name
    batches = {b for n, b in map(_schedule_of, [*all_configs, config]) if n == FIXED_SCHEDULE}
    return FIXED_SCHEDULE if len(batches) == 1 else f"{FIXED_SCHEDULE}-b{batch}"


def fixed_arm_batches(configs: Iterable[Mapping]) -> dict[str, int]:
    """{arm: schedule.batch_size} of the fixed-batch arms among the runs of `configs` (arms by
    `schedule_arm`), in increasing batch size."""
    configs = list(configs)
    batches = {schedule_arm(c, configs): _schedule_of(c)[1] for c in configs if _schedule_of(c)[0] == FIXED_SCHEDULE}
    return dict(sorted(batches.items(), key=lambda item: item[1]))


def reference_fixed_arm(configs: Iterable[Mapping], reference: int | None = None) -> str | None:
    """The fixed-batch arm the schedules' savings are measured against; None without a fixed-batch run.

    reference: its batch size (sequences). By default, the fixed arm whose batch equals the largest
    schedule.batch_size of the other (linear, gns) runs, which is the paper's comparison: a ramp up to the fixed
    batch against that batch (p. 9); without one, the largest fixed batch. ConfigError when `reference` is not the
    batch of a fixed-batch run.
    """
    configs = list(configs)
    fixed = fixed_arm_batches(configs)
    if reference is not None:
        if isinstance(reference, bool) or not isinstance(reference, int):
            raise ConfigError(f"reference={reference!r} must be a batch size (an integer number of sequences)")
        arm = next((a for a, b in fixed.items() if b == reference), None)
        if arm is None:
            accepted = ", ".join(map(str, fixed.values())) or "none: no run has schedule.name=constant"
            raise ConfigError(f"reference={reference} is not the batch size of a fixed-batch run; accepted: {accepted}")
        return arm
    if not fixed:
        return None
    others = [b for n, b in map(_schedule_of, configs) if n != FIXED_SCHEDULE]
    largest_other = max(others, default=None)
    return next((a for a, b in fixed.items() if b == largest_other), next(reversed(fixed)))


def losses_at(runs: Mapping, tokens: float, window: int, name: str = "run") -> dict:
    """{seed: the smoothed, monotone loss (`loss_curve`) each seed's run had reached at `tokens`}, linearly
    interpolated between logged points, as `fixed_batch_losses` reads each fixed batch at the sweep's budget.
    runs: {seed: metrics frame}. A run whose smoothed curve starts after `tokens` is a ConfigError; one that ends
    before it gives its last value (np.interp)."""
    return {seed: _loss_at(loss_curve(metrics, window, name=f"{name} seed {seed}"), tokens, f"{name} seed {seed}")
            for seed, metrics in runs.items()}


def _loss_at(curve: pd.DataFrame, tokens: float, name: str) -> float:
    """A `loss_curve`'s monotone loss at `tokens`, interpolated (its last value past its end)."""
    if curve["tokens"].iloc[0] > tokens:
        raise ConfigError(f"{name}'s smoothed loss starts at {curve['tokens'].iloc[0]:.0f} tokens, after "
                          f"{tokens:.0f}: the runs' token ranges do not overlap")
    return float(np.interp(tokens, curve["tokens"], curve["loss_monotone"]))


def fixed_batch_losses(fixed_runs: Mapping[int, Mapping], window: int | None = None) -> pd.DataFrame:
    """The final smoothed loss of each batch size of a swept fixed batch at the sweep's common token budget.

    fixed_runs: batch size -> {seed: metrics frame}; the batch sizes may have different seeds (each is
    averaged over the seeds it has). window: the `loss_curve` smoothing of every run, by default
    `smoothing_window` of them all. The common budget is the fewest tokens at which any run's smoothed curve
    ends (the curves are trimmed by the window's reach, and a larger batch's window spans more tokens), so
    every batch is read at the same tokens; each run's loss there is its monotone curve (the loss it had
    reached) linearly interpolated at the budget.
    Returns one row per batch size (index batch_size, increasing): seeds (a list), n_seeds, final_loss (the
    mean over its seeds), final_loss_std (ddof=1; NaN for one seed), budget_tokens, and best (True for the
    lowest final_loss: the batch a fair fixed baseline uses).
    """
    if not fixed_runs or not all(fixed_runs.values()):
        raise ConfigError("fixed_runs must map each batch size to at least one seed's metrics")
    metrics = [m for seeds in fixed_runs.values() for m in seeds.values()]
    window = smoothing_window(*metrics) if window is None else window
    curves = {(int(batch), seed): loss_curve(run, window, name=f"fixed batch {batch} seed {seed}")
              for batch, seeds in fixed_runs.items() for seed, run in seeds.items()}
    budget = min(float(c["tokens"].iloc[-1]) for c in curves.values())
    rows = {}
    for batch in sorted({b for b, _ in curves}):
        seeds = sorted((s for b, s in curves if b == batch), key=str)
        losses = [_loss_at(curves[(batch, seed)], budget, f"fixed batch {batch} seed {seed}") for seed in seeds]
        rows[batch] = {"seeds": seeds, "n_seeds": len(seeds), "final_loss": float(np.mean(losses)),
                       "final_loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else math.nan,
                       "budget_tokens": budget}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "batch_size"
    table["best"] = table.index == table["final_loss"].idxmin()
    return table


def cost_to_reach(arms: Mapping[str, Mapping], target: str, window: int) -> pd.DataFrame:
    """Tokens and optimizer steps each arm took to first reach the `target` arm's final loss, seed by seed.

    arms: arm name -> {seed: metrics frame}; every curve smoothed with `window` (`loss_curve`). The level at a
    seed is the target arm's final smoothed, monotone loss at that seed; each arm's run of the same seed is read
    where its monotone curve first reaches it (interpolated as `tokens_saved` reads crossings). This puts a
    swept fixed batch beside a schedule on both axes at once: a small fixed batch may need fewer tokens and more
    steps. Returns one row per (arm, seed) of the seeds the target has: arm, seed, level, tokens, steps (NaN
    where the arm did not reach the level: never, or it started below it) and reached.
    """
    levels = {seed: float(loss_curve(m, window, name=f"{target} seed {seed}")["loss_monotone"].iloc[-1])
              for seed, m in arms[target].items()}
    rows = []
    for arm, runs in arms.items():
        for seed in sorted(set(runs) & set(levels), key=str):
            curve = loss_curve(runs[seed], window, name=f"{arm} seed {seed}")
            values, status = _first_reached(curve, np.array([levels[seed]]))  # NaN where not reached
            rows.append({"arm": arm, "seed": seed, "level": levels[seed], "tokens": float(values["tokens"][0]),
                         "steps": float(values["steps"][0]), "reached": bool(status[0] == REACHED)})
    return pd.DataFrame(rows, columns=["arm", "seed", "level", "tokens", "steps", "reached"])


def _check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ConfigError(f"window must be an odd positive number of logged points (1: no smoothing), "
                          f"got window={window!r}")


def _as_frame(metrics, loss_column: str, name: str) -> pd.DataFrame:
    """The rows of a metrics frame (or a loss Series indexed by tokens) in step order, checked."""
    if isinstance(metrics, pd.Series):
        metrics = pd.DataFrame({"tokens": metrics.index.to_numpy(), loss_column: metrics.to_numpy()})
    if not isinstance(metrics, pd.DataFrame):
        raise ConfigError(f"{name} must be a pandas DataFrame of metrics.parquet rows or a Series of losses "
                          f"indexed by tokens, got {type(metrics).__name__}")
    missing = [c for c in ("tokens", loss_column) if c not in metrics]
    if missing:
        present = ", ".join(map(str, metrics.columns))
        raise ConfigError(f"{name} has no {' or '.join(missing)} column (it has {present}); metrics.parquet has "
                          "tokens, loss, val_loss, step, step_time_s")
    frame = metrics.sort_values("step" if "step" in metrics else "tokens", kind="stable")
    tokens = frame["tokens"].to_numpy(dtype=np.float64)
    if not np.isfinite(tokens).all() or (np.diff(tokens) < 0).any():
        raise ConfigError(f"{name}'s tokens must be finite and never fall from one step to the next")
    return frame


def _first_reached(curve: pd.DataFrame, levels: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """For each level, every quantity's value where curve's monotone loss first reaches it, and a status.

    loss_monotone is non-increasing, so the first point at or below a level is a binary search; between
    that point and the one before (above the level) the quantities are linearly interpolated.
    """
    loss = curve["loss_monotone"].to_numpy()
    status = np.where(levels > loss[0], ABOVE_START, np.where(levels < loss[-1], NEVER_REACHED, REACHED))
    first = np.searchsorted(-loss, -levels, side="left")  # first index with loss <= level
    reached = status == REACHED
    after = np.minimum(first, len(loss) - 1)
    before = np.maximum(after - 1, 0)
    drop = loss[before] - loss[after]  # > 0 where after > 0, since loss[before] > level >= loss[after]
    fraction = np.where(after > 0, (loss[before] - levels) / np.where(drop > 0, drop, 1.0), 0.0)
    values = {}
    for quantity, column in QUANTITIES.items():
        q = curve[column].to_numpy()
        values[quantity] = np.where(reached, q[before] + fraction * (q[after] - q[before]), np.nan)
    return values, status


def _compare(ref: pd.DataFrame, oth: pd.DataFrame, levels: np.ndarray) -> pd.DataFrame:
    ref_values, ref_status = _first_reached(ref, levels)
    oth_values, oth_status = _first_reached(oth, levels)
    columns: dict[str, object] = {"loss": levels}
    for quantity in QUANTITIES:
        unit = "_s" if quantity == "time" else ""
        saved = ref_values[quantity] - oth_values[quantity]
        with np.errstate(divide="ignore", invalid="ignore"):
            percent = 100.0 * saved / ref_values[quantity]
        columns |= {f"{quantity}_reference{unit}": ref_values[quantity],
                    f"{quantity}_other{unit}": oth_values[quantity],
                    f"{quantity}_saved{unit}": saved, f"{quantity}_saved_pct": percent}
    columns |= {"reference_status": ref_status, "other_status": oth_status}
    return pd.DataFrame(columns)
