"""Batch-size schedules: the linear ramp, the GNS control law, the data they read, their settings and resume."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_train import make_cfg, run_cli, tiny

from gnsrepro.config import ScheduleConfig
from gnsrepro.data.dataset import SEQUENCE_BLOCK, sequence_offsets
from gnsrepro.errors import ConfigError
from gnsrepro.gns import EMAGNS, HampelFilter
from gnsrepro.schedule import GNSBatch, LinearBatch, build_schedule, lr_multiplier
from gnsrepro.settings import validate
from gnsrepro.train import run_tokens, train


# ---- the schedules as functions ---------------------------------------------------------------------
def test_linear_ramp_rounds_to_micro_batches_and_reaches_the_end():
    s = LinearBatch(start=16, end=120, ramp_tokens=1000, quantum=8)
    sizes = [s.batch_size(0, t) for t in range(0, 1200, 10)]
    assert sizes[0] == 16 and s.batch_size(0, 1000) == 120 and s.batch_size(0, 5000) == 120
    assert all(b % 8 == 0 and 16 <= b <= 120 for b in sizes)
    assert sizes == sorted(sizes)  # never shrinks
    # halfway: 16 + 104 / 2 = 68 -> the nearest multiple of 8 is 72 (68 / 8 = 8.5 rounds to even 8 -> 64)
    assert s.batch_size(0, 500) in (64, 72)
    # the paper's 111M arm, 16 -> 120 over the run: the mean batch over the run's steps is about 57 sequences
    # (docs/schedules.md, "linear": about 57 sequences on average); count steps, as the run does
    paper = LinearBatch(16, 120, 2_219_950_080, 8)
    tokens, sizes = 0, []
    while tokens < 2_219_950_080:
        sizes.append(paper.batch_size(len(sizes), tokens))
        tokens += sizes[-1] * 2048
    assert 50 <= np.mean(sizes) <= 64


def test_gns_law_clamps_rounds_and_limits_each_change():
    s = GNSBatch(min_size=8, max_size=128, quantum=8, multiplier=2.0, total_ratio=1.0, interval=5, max_factor=2.0,
                 allow_decrease=False)
    assert s.batch_size(0, 0) == 8
    assert not s.wants_update(0) and not s.wants_update(3) and s.wants_update(5)
    assert s.update(5, 100.0) == 16  # target 200 -> clamp 128, but at most x2 per change
    assert s.update(10, 100.0) == 32
    assert s.update(15, 100.0) == 64
    assert s.update(20, 100.0) == 128
    assert s.update(25, 1e9) == 128  # never above the declared maximum
    assert s.update(30, 1.0) == 128  # never decreases unless asked
    for bad in (None, math.nan, -3.0, 0.0):
        assert s.update(35, bad) == 128
    down = GNSBatch(8, 128, 8, 1.0, 1.0, 1, 2.0, allow_decrease=True)
    down.size = 128
    assert down.update(1, 1.0) == 64  # halves at most per change
    small = GNSBatch(8, 64, 8, 1.0, 1.0, 1, 1.2, allow_decrease=False)
    assert small.update(1, 40.0) == 16  # 8 x 1.2 rounds to 8: a change of one micro-batch is always allowed
    assert GNSBatch(8, 64, 8, 1.0, 1.5, 1, 10.0, False).update(1, 20.0) == 32  # total_ratio 1.5: 30 -> 32


def test_gns_schedule_is_not_moved_by_a_one_step_spike():
    """The tiny reproduce run's spike (|G_B|^2 = 10289 against about 5) tripled the smoothed GNS for the rest of
    the run. The same series through the logger's guarded EMA leaves the batch the schedule chooses unchanged."""
    rng = np.random.default_rng(0)
    steps, b_big, true_gtg, true_s = 400, 16, 1.0, 30.0  # true GNS 30 sequences
    sq_small = true_gtg + true_s + rng.normal(0, 3, steps)  # B_small = 1
    sq_big = true_gtg + true_s / b_big + rng.normal(0, 0.2, steps)
    sq_big[54], sq_small[54] = 10289.0, 10289.0 * 1.5

    def chosen(guard):
        ema, law = EMAGNS(0.99, guard=guard), GNSBatch(8, 256, 8, 1.0, 1.0, 10, 2.0, allow_decrease=True)
        for t in range(steps):
            gtg = (b_big * sq_big[t] - sq_small[t]) / (b_big - 1)
            trsigma = (sq_small[t] - sq_big[t]) / (1 - 1 / b_big)
            gns = ema.update("k", gtg, trsigma)
            if law.wants_update(t + 1):
                law.update(t + 1, gns)
        return law.size, gns

    size_guarded, gns_guarded = chosen(HampelFilter())
    size_raw, gns_raw = chosen(None)
    assert abs(gns_guarded / 30.0 - 1) < 0.25
    assert abs(size_guarded - 32) <= 8
    assert abs(gns_raw / 30.0 - 1) > 0.5  # without the guard the spike still dominates
    assert size_raw != size_guarded


def test_lr_scaling_with_the_batch():
    cfg = ScheduleConfig(batch_size=64, lr_scaling="sqrt")
    assert lr_multiplier(cfg, 16) == pytest.approx(0.5)
    cfg.lr_scaling = "linear"
    assert lr_multiplier(cfg, 16) == pytest.approx(0.25)
    cfg.lr_scaling, cfg.lr_reference_batch = "linear", 32
    assert lr_multiplier(cfg, 64) == pytest.approx(2.0)
    cfg.lr_scaling = "none"
    assert lr_multiplier(cfg, 16) == 1.0


def test_linear_ramp_of_a_run_given_in_steps_ends_at_the_last_step():
    from gnsrepro.schedule import ramp_over_steps

    ramp = ramp_over_steps(8, 64, 8, steps=200, seq_len=128)
    law, tokens, sizes = LinearBatch(8, 64, ramp, 8), 0, []
    for step in range(200):
        sizes.append(law.batch_size(step, tokens))
        tokens += sizes[-1] * 128
    assert sizes[0] == 8 and sizes[-1] == 64 and sizes.index(64) >= 190  # the full batch only at the end
    assert abs(tokens - ramp) <= 64 * 128
    cfg = make_cfg("scale=tiny", "schedule=linear")  # 200 steps, no max_tokens
    validate(cfg)
    assert build_schedule(cfg.schedule, 1, None, 200, 128).ramp_tokens == ramp_over_steps(8, 16, 8, 200, 128)


def test_run_tokens_steps_the_schedule():
    lin = LinearBatch(8, 32, 10_000, 8)
    tokens, step = 0, 0
    while step < 50:
        tokens += lin.batch_size(step, tokens) * 10
        step += 1
    assert run_tokens(lin, 50, None, 10) == tokens
    assert run_tokens(lin, None, 777, 10) == 777
    assert run_tokens(build_schedule(ScheduleConfig(batch_size=16)), 10, None, 4) == 640


def test_sequence_offsets_do_not_depend_on_how_steps_group_them():
    whole = sequence_offsets(100_000, 16, 0, 3 * SEQUENCE_BLOCK + 5, seed=3)
    pieces, n = [], 0
    for size in [8, 16, 40, 8, SEQUENCE_BLOCK, 3, 2 * SEQUENCE_BLOCK - 70]:
        pieces.append(sequence_offsets(100_000, 16, n, size, seed=3))
        n += size
    assert np.array_equal(np.concatenate(pieces), whole[:n])
    assert whole.min() >= 0 and whole.max() <= 100_000 - 17
    assert not np.array_equal(whole, sequence_offsets(100_000, 16, 0, len(whole), seed=4))


# ---- settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule=gns"], "schedule=gns follows the measured GNS, but gns=off measures none"),
        (["schedule=linear", "schedule.batch_size=16", "schedule.start=12", "max_tokens=1000"],
         "schedule.start=12 must be a multiple of schedule.micro_batch_size x world size = 8"),
        (["schedule=gns", "gns=ln", "schedule.group=mlp"], "schedule.group=mlp with gns=ln"),
        (["schedule=gns", "gns=all", "schedule.source=ddp"], "schedule.source=ddp needs two or more ranks"),
        (["schedule=gns", "gns=all", "schedule.max_factor=1"], "schedule.max_factor=1.0 must be > 1"),
        (["schedule.lr_scaling=cube"], "schedule.lr_scaling='cube' is not known; accepted: none, sqrt, linear"),
        (["schedule=gns", "gns=all", "schedule.group=bogus"], "schedule.group='bogus' is not known"),
    ],
)
def test_bad_schedule_setting_is_one_line(overrides, message):
    cfg = make_cfg("max_steps=5", *overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


def test_schedule_settings_are_typed_per_schedule():
    with pytest.raises(Exception, match="schedule.start"):
        make_cfg("schedule.start=8")  # constant has no start
    assert make_cfg("schedule=linear", "schedule.start=8").schedule.start == 8
    cfg = make_cfg("schedule=gns", "scale=tiny")  # a scale's schedule.batch_size applies to every schedule
    assert cfg.schedule.name == "gns" and cfg.schedule.batch_size == 16


def test_bad_schedule_setting_via_the_cli_is_one_line(tmp_path):
    r = run_cli(["train", "schedule=gns", "max_steps=3", f"out_dir={tmp_path}/run"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "gnsrepro train: error: schedule=gns follows the measured GNS, but gns=off measures none: set gns=ln or "
        "gns=all"]
    assert not (tmp_path / "run").exists()


# ---- runs --------------------------------------------------------------------------------------------
def _metrics(out):
    return pd.read_parquet(out / "metrics.parquet")


def test_linear_and_gns_runs_log_the_batches_they_chose(data_dir, tmp_path):
    lin = train(make_cfg(*tiny(data_dir, tmp_path / "lin", "schedule=linear", "schedule.batch_size=16",
                               "schedule.start=4", "max_tokens=12000", "gns=ln")))
    m = _metrics(lin)
    assert m.batch_size.iloc[0] == 4 and m.batch_size.iloc[-1] in (12, 16)
    assert m.batch_size.is_monotonic_increasing and (m.batch_size % 4 == 0).all()
    assert m.schedule_gns.isna().all() and (m.grad_norm > 0).all()
    g = pd.read_parquet(lin / "gns.parquet")
    assert set(g.b_big) == set(m.batch_size)  # the GNS rows use each step's own batch size

    gns = train(make_cfg(*tiny(data_dir, tmp_path / "gns", "schedule=gns", "gns=ln", "schedule.batch_size=32",
                               "schedule.interval=5", "schedule.multiplier=100", "max_steps=30")))
    m = _metrics(gns)
    assert m.batch_size.iloc[0] == 4 and m.batch_size.is_monotonic_increasing
    assert m.batch_size.iloc[-1] > 4, "the GNS of a tiny model is several sequences: the batch grows"
    changes = m.step[m.batch_size.diff() > 0]
    assert ((changes - 1) % 5 == 0).all(), "the batch changes only right after an update step (every 5)"
    acted = m.schedule_gns.dropna()
    assert len(acted) and (acted > 0).all()
    # the batch it chose is the law applied to the GNS it logged
    law = build_schedule(make_cfg(*tiny(data_dir, tmp_path / "x", "schedule=gns", "gns=ln",
                                        "schedule.batch_size=32", "schedule.multiplier=100")).schedule)
    law.update(5, m.schedule_gns.iloc[5])
    assert law.size == m.batch_size.iloc[5]


def test_schedules_read_the_same_sequences(data_dir, tmp_path, monkeypatch):
    """The n-th training sequence is the same for every schedule with the same seed."""
    import gnsrepro.data.dataset as dataset

    seen: dict[str, list] = {}
    real = dataset.sequence_offsets

    def spy(num_tokens, seq_len, start, count, seed):
        out = real(num_tokens, seq_len, start, count, seed)
        seen.setdefault(current, []).append((start, out.copy()))
        return out

    monkeypatch.setattr(dataset, "sequence_offsets", spy)
    for current in ("constant", "linear"):
        extra = ["schedule=linear", "schedule.start=4", "max_tokens=4000"] if current == "linear" else ["max_steps=4"]
        train(make_cfg(*tiny(data_dir, tmp_path / current, "schedule.batch_size=8", *extra)))
    flat = {k: np.concatenate([o for _, o in v]) for k, v in seen.items()}
    n = min(len(f) for f in flat.values())
    assert n >= 32 and np.array_equal(flat["constant"][:n], flat["linear"][:n])


def test_gns_schedule_resume_takes_the_same_batches(data_dir, tmp_path):
    args = ["schedule=gns", "gns=ln", "schedule.batch_size=32", "schedule.interval=3", "schedule.multiplier=100",
            "checkpoint_interval=8", "log_interval=4", "optim.decay_tokens=20000"]  # one LR horizon for both
    whole = train(make_cfg(*tiny(data_dir, tmp_path / "whole", *args, "max_steps=20")))
    part = tmp_path / "part"
    train(make_cfg(*tiny(data_dir, part, *args, "max_steps=8")))
    train(make_cfg(*tiny(data_dir, part, *args, "max_steps=20", "resume=true")), overrides=["max_steps=20"])
    a, b = _metrics(whole), _metrics(part)
    assert a.batch_size.tolist() == b.batch_size.tolist()
    assert np.allclose(a.loss, b.loss, rtol=0, atol=0)
    assert np.array_equal(a.schedule_gns.to_numpy(), b.schedule_gns.to_numpy(), equal_nan=True)
    # the schedule's settings and smoothing define the experiment: they cannot change on resume
    for change in ("schedule.multiplier=8", "gns.ema_alpha=0.9"):
        with pytest.raises(ConfigError, match="cannot change within a run"):
            train(make_cfg(*tiny(data_dir, part, *args, "max_steps=30", "resume=true", change)),
                  overrides=["max_steps=30", change])
