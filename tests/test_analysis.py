"""Tokens saved on synthetic loss curves whose saving is known exactly, and the multi-seed statistics.

The reference run follows loss(t) = A + B/t in tokens t; the other follows A + B/(1.25·t), so it reaches
every loss at t/1.25 = 80% of the reference's tokens: 20% of the tokens saved at every level. The other
takes twice the reference's tokens per step and 1.5 times its time per step, so it reaches a loss in
0.8 / 2 = 40% of the steps (60% of the steps saved) and 40% · 1.5 = 60% of the time (40% saved).
"""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from gnsrepro.analysis import (
    ABOVE_START,
    NEVER_REACHED,
    REACHED,
    loss_curve,
    one_sided_t_test,
    student_t_sf,
    tokens_saved,
    tokens_saved_over_seeds,
)
from gnsrepro.errors import ConfigError

STEPS, TOKENS_PER_STEP = 3000, 1000.0
A, B = 3.0, 0.5 * STEPS * TOKENS_PER_STEP  # the reference ends near A + 0.5
SPEEDUP = 1.25


def run(speedup=1.0, tokens_per_step=TOKENS_PER_STEP, step_time_s=1.0, offset=0.0, noise=0.0, seed=0,
        steps=STEPS) -> pd.DataFrame:
    """A metrics.parquet-like frame: step from 1, tokens seen after it, the loss, each step's time."""
    step = np.arange(1, steps + 1)
    tokens = step * tokens_per_step
    loss = A + offset + B / (speedup * tokens) + noise * np.random.default_rng(seed).standard_normal(steps)
    return pd.DataFrame({"step": step, "tokens": tokens, "loss": loss, "step_time_s": step_time_s,
                         "val_loss": np.where(step % 100 == 0, loss, np.nan)})


def reference_and_schedule(noise=0.0, seed=0):
    return run(noise=noise, seed=seed), run(SPEEDUP, 2 * TOKENS_PER_STEP, 1.5, noise=noise, seed=seed + 1000)


def test_saving_at_the_final_loss_is_known_in_tokens_steps_and_time():
    result = tokens_saved(*reference_and_schedule())
    final = result.final
    # the smoothed curve keeps the points whose windows (51 points, a median then a mean) lie inside the
    # run: the reference's last kept point is step 3000 − 2·25, where it reaches its final loss
    assert final["tokens_reference"] == (STEPS - 50) * TOKENS_PER_STEP and final["steps_reference"] == STEPS - 50
    assert result.final_loss == pytest.approx(A + B / ((STEPS - 50) * TOKENS_PER_STEP), rel=1e-4)
    assert final["tokens_saved_pct"] == pytest.approx(20.0, abs=0.05)
    assert final["steps_saved_pct"] == pytest.approx(60.0, abs=0.05)
    assert final["time_saved_pct"] == pytest.approx(40.0, abs=0.05)
    assert final["time_saved_s"] == pytest.approx(0.4 * (STEPS - 50), rel=1e-3)
    assert final["tokens_saved"] == pytest.approx(0.2 * (STEPS - 50) * TOKENS_PER_STEP, rel=1e-3)
    assert result.other_reaches_final and final["other_status"] == REACHED
    # the schedule ran twice the tokens and went lower than the reference ever did: flagged, not compared
    assert not result.reference_reaches_other_final and "not compared" in result.messages[0]


def test_saving_is_known_at_every_loss_level():
    levels = tokens_saved(*reference_and_schedule()).levels
    assert len(levels) == 100 and (levels["reference_status"] == REACHED).all()
    assert (levels["other_status"] == REACHED).all() and (np.diff(levels["loss"]) < 0).all()
    assert (np.diff(levels["tokens_reference"]) > 0).all()
    # Smoothing delays a crossing at a run's k-th point by a fraction of about (h/k)²/3 of its tokens
    # (h = 25, the module docstring); the schedule has half the points per token, so it is delayed more.
    k_other = levels["steps_other"]
    predicted = 100 * (1 - (1 + (25 / k_other) ** 2 / 3) / (1 + (25 / levels["steps_reference"]) ** 2 / 3) / SPEEDUP)
    late = k_other >= 10 * 25  # from about 20% of the reference's run on
    assert late.sum() >= 10
    np.testing.assert_allclose(levels.loc[late, "tokens_saved_pct"], 20.0, atol=0.3)
    np.testing.assert_allclose(levels.loc[late, "tokens_saved_pct"], predicted[late], atol=0.02)
    np.testing.assert_allclose(levels.loc[late, "steps_saved_pct"], 60.0, atol=0.3)
    # early levels, where the curve bends sharply within a window: the saving comes out low, by < 7 points
    assert (levels["tokens_saved_pct"] > 13.0).all() and (levels["tokens_saved_pct"] < 20.05).all()
    np.testing.assert_allclose(levels["tokens_saved_pct"], predicted, atol=2.0)  # the formula's higher orders


def test_smoothing_recovers_the_saving_from_noisy_curves_with_outlier_steps():
    reference, schedule = reference_and_schedule(noise=0.02, seed=1)
    reference.loc[[500, 1500, 2000, 2500], "loss"] -= 1.0  # single bad steps, far below the curve
    schedule.loc[[300, 800, 1200], "loss"] += 2.0
    smoothed = tokens_saved(reference, schedule)
    assert smoothed.final_loss == pytest.approx(A + B / ((STEPS - 50) * TOKENS_PER_STEP), abs=0.005)
    assert smoothed.final["tokens_saved_pct"] == pytest.approx(20.0, abs=1.5)
    assert smoothed.final["steps_saved_pct"] == pytest.approx(60.0, abs=1.0)
    # without smoothing the running minimum keeps the lowest outlier as the reference's "final" loss
    # (step 2500's 2.6, far below the true end near 3.5), which the schedule never reaches
    raw = tokens_saved(reference, schedule, window=1)
    assert raw.final_loss < A and raw.other_final_status == NEVER_REACHED


def test_loss_curve_is_smoothed_monotone_and_trimmed():
    frame = run(noise=0.05, seed=2)
    curve = loss_curve(frame, window=11)
    assert len(curve) == STEPS - 2 * 10 and curve["step"].iloc[0] == 11 and curve["step"].iloc[-1] == STEPS - 10
    assert (np.diff(curve["loss_monotone"]) <= 0).all()
    np.testing.assert_array_equal(curve["loss_monotone"], np.minimum.accumulate(curve["loss_smoothed"]))
    # the median of 11, then the mean of 11 medians, by hand at one point
    medians = [np.median(frame["loss"].iloc[i - 5:i + 6]) for i in range(1000 - 5, 1000 + 6)]
    row = curve.index[curve["step"] == 1001][0]
    assert curve.loc[row, "loss_smoothed"] == pytest.approx(np.mean(medians), rel=1e-12)
    assert curve.loc[row, "time_s"] == 1001.0  # cumulative step_time_s, counted from the first step
    # a Series of losses indexed by tokens: tokens only
    series_curve = loss_curve(frame.set_index("tokens")["loss"], window=11)
    np.testing.assert_allclose(series_curve["loss_monotone"], curve["loss_monotone"])
    assert series_curve["step"].isna().all() and series_curve["time_s"].isna().all()
    # validation losses are logged every 100 steps; NaN rows are dropped before smoothing
    assert len(loss_curve(frame, window=3, loss_column="val_loss")) == STEPS // 100 - 4


def test_a_run_without_step_or_step_time_gives_tokens_only():
    reference, schedule = reference_and_schedule()
    result = tokens_saved(reference[["tokens", "loss"]], schedule.drop(columns=["step_time_s"]))
    assert result.final["tokens_saved_pct"] == pytest.approx(20.0, abs=0.05)
    assert math.isnan(result.final["steps_saved"]) and math.isnan(result.final["time_saved_s"])


def test_curves_that_never_meet_give_nan_and_a_flag():
    reference = run()
    worse = run(SPEEDUP, offset=0.3)  # ends near A + 0.3 + 0.4, above the reference's final A + 0.5
    result = tokens_saved(reference, worse)
    assert not result.other_reaches_final and result.other_final_status == NEVER_REACHED
    for column in ("tokens_other", "tokens_saved", "tokens_saved_pct", "steps_saved", "time_saved_s"):
        assert math.isnan(result.final[column])
    assert result.final["tokens_reference"] > 0  # the reference did reach its own final loss
    assert any("never reached" in m for m in result.messages)
    # the default levels stop at the lowest loss both reached, so every level there is defined
    assert result.levels["loss"].iloc[-1] == pytest.approx(result.other["loss_monotone"].iloc[-1])
    assert result.levels["tokens_saved"].notna().all()
    # explicit levels: below the other's lowest, below both, above both first kept points
    levels = tokens_saved(reference, worse, levels=[3.6, 2.9, 100.0]).levels
    assert list(levels["reference_status"]) == [REACHED, NEVER_REACHED, ABOVE_START]
    assert list(levels["other_status"]) == [NEVER_REACHED, NEVER_REACHED, ABOVE_START]
    assert levels["tokens_saved"].isna().all() and levels["tokens_reference"].notna().tolist() == [True, False, False]


def test_the_opposite_case_the_other_goes_lower_than_the_reference_ever_does():
    worse, better = run(offset=0.3), run(SPEEDUP)
    result = tokens_saved(worse, better)
    assert result.other_reaches_final and not result.reference_reaches_other_final
    assert result.final["tokens_saved_pct"] > 20.0  # a better curve and a worse reference: more saved
    assert result.levels["loss"].iloc[-1] == pytest.approx(result.final_loss)  # the grid stops at the reference's


def test_curves_that_share_no_level():
    reference, far_below = run(), run(offset=-40.0)  # the other starts below the reference's final loss
    result = tokens_saved(reference, far_below)
    assert len(result.levels) == 0 and result.other_final_status == ABOVE_START
    assert math.isnan(result.final["tokens_saved"])
    assert any("share no loss level" in m for m in result.messages)
    assert any("not known" in m for m in result.messages)


def test_bad_inputs_are_one_line_errors_naming_the_setting():
    reference, schedule = reference_and_schedule()
    with pytest.raises(ConfigError, match="reference has no loss column"):
        tokens_saved(reference.drop(columns="loss"), schedule)
    with pytest.raises(ConfigError, match="other has no tokens column"):
        tokens_saved(reference, schedule.drop(columns="tokens"))
    for window in (0, 4, 2.0, True):
        with pytest.raises(ConfigError, match="window"):
            tokens_saved(reference, schedule, window=window)
    with pytest.raises(ConfigError, match="needs at least 102"):
        tokens_saved(reference.head(101), schedule)
    with pytest.raises(ConfigError, match="tokens must be finite and never fall"):
        tokens_saved(reference.assign(tokens=reference["tokens"][::-1].to_numpy()), schedule)
    with pytest.raises(ConfigError, match="n_levels"):
        tokens_saved(reference, schedule, n_levels=1)
    with pytest.raises(ConfigError, match="DataFrame"):
        tokens_saved(reference["loss"].to_numpy(), schedule)


def test_student_t_tail_against_table_values_and_closed_forms():
    # one-sided critical values of Student's t (any statistics table): P(T >= t_{1-p, dof}) = p
    for t, dof, p in ((1.812461, 10, 0.05), (2.776445, 4, 0.025), (3.364930, 5, 0.01), (6.313752, 1, 0.05),
                      (2.919986, 2, 0.05), (1.644854, 1e9, 0.05)):
        assert student_t_sf(t, dof) == pytest.approx(p, abs=2e-6)
        assert student_t_sf(-t, dof) == pytest.approx(1.0 - p, abs=2e-6)
    for t in (0.0, 0.3, 1.0, 7.0):
        assert student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12)  # Cauchy
        assert student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-12)
    assert student_t_sf(math.inf, 3) == 0.0 and student_t_sf(-math.inf, 3) == 1.0
    with pytest.raises(ValueError, match="dof"):
        student_t_sf(1.0, 0)


def test_one_sided_t_test_by_hand():
    # [1, 2, 3, 4, 5]: mean 3, s = √2.5, t = 3 / (√2.5 / √5) = 3√2; 4 degrees of freedom, where
    # P(T ≤ t) = 1/2 + (3/8)·u·(1 − t²/(12(1 + t²/4))), u = t / √(1 + t²/4) (the t distribution at ν = 4)
    t, p = one_sided_t_test([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t == pytest.approx(3 * math.sqrt(2), rel=1e-12)
    w = 1 + t * t / 4
    assert p == pytest.approx(0.5 - 3 / 8 * t / math.sqrt(w) * (1 - t * t / (12 * w)), rel=1e-10)
    assert one_sided_t_test([-1.0, -2.0, -3.0, -4.0, -5.0])[1] == pytest.approx(1 - p, rel=1e-10)
    assert one_sided_t_test([2.0, 2.0, 2.0]) == (math.inf, 0.0)
    assert all(math.isnan(v) for v in one_sided_t_test([1.0]))


def test_saving_over_seeds_is_paired_by_seed():
    references, schedules = {}, {}
    for seed in (3, 1, 2):  # any order: pairs go by seed
        references[seed], schedules[seed] = reference_and_schedule(noise=0.02, seed=10 * seed)
    result = tokens_saved_over_seeds(references, schedules)
    assert list(result.per_seed.index) == [1, 2, 3]
    for seed in (1, 2, 3):
        alone = tokens_saved(references[seed], schedules[seed]).final["tokens_saved_pct"]
        assert result.per_seed.loc[seed, "tokens_saved_pct"] == alone
    row = result.summary.loc["tokens_saved_pct"]
    savings = result.per_seed["tokens_saved_pct"].to_numpy()
    assert row["n"] == 3 and row["n_undefined"] == 0
    assert row["mean"] == pytest.approx(20.0, abs=1.0)
    assert row["mean"] == pytest.approx(savings.mean()) and row["std"] == pytest.approx(savings.std(ddof=1))
    assert row["min"] == savings.min() and row["max"] == savings.max() and 0 < row["std"] < 2.0
    assert row["t_statistic"] == pytest.approx(savings.mean() / (savings.std(ddof=1) / math.sqrt(3)))
    t = row["t_statistic"]
    assert row["p_value"] == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-10)  # ν = 2, closed form
    assert row["p_value"] < 0.01
    assert set(result.summary.index) == {"tokens_saved", "tokens_saved_pct", "steps_saved", "steps_saved_pct",
                                         "time_saved_s", "time_saved_pct"}
    assert result.summary.loc["steps_saved_pct", "mean"] == pytest.approx(60.0, abs=1.0)


def test_saving_over_seeds_with_a_seed_that_never_meets_and_unpaired_seeds():
    references = {seed: run(noise=0.02, seed=seed) for seed in (1, 2, 3)}
    schedules = {1: run(SPEEDUP, noise=0.02, seed=11), 2: run(SPEEDUP, noise=0.02, seed=12),
                 3: run(SPEEDUP, offset=0.3, noise=0.02, seed=13)}
    result = tokens_saved_over_seeds(references, schedules)
    row = result.summary.loc["tokens_saved_pct"]
    assert row["n"] == 2 and row["n_undefined"] == 1 and math.isnan(row["p_value"])
    assert row["mean"] == pytest.approx(result.per_seed.loc[[1, 2], "tokens_saved_pct"].mean())
    assert result.per_seed.loc[3, "other_status"] == NEVER_REACHED
    with pytest.raises(ConfigError, match=r"unpaired: \[4\]"):
        tokens_saved_over_seeds(references, {**schedules, 4: schedules[1]})
    with pytest.raises(ConfigError, match="empty"):
        tokens_saved_over_seeds({}, {})


def test_analysis_imports_no_training_code():
    code = ("import sys, gnsrepro.analysis; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('gnsrepro.train', 'gnsrepro.model', "
            "'gnsrepro.pegn', 'gnsrepro.kernels', 'triton'))]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
