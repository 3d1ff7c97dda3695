"""The schedule comparison against a swept fixed batch: arm keys, the reference fixed arm, the best fixed arm, the
report's rows and the figure, on synthetic runs whose savings are known exactly; one fixed arm as before.

Every synthetic run's loss falls linearly in tokens, loss = C − d·t, at a constant batch, so its logged points are
equally spaced in tokens and `gnsrepro.analysis.loss_curve`'s centred median and mean leave the curve as it is
(the mean of a linear sequence is its middle value). A run of slope d_o then reaches any loss ℓ at (C − ℓ)/d_o
tokens, one of slope d_r at (C − ℓ)/d_r: the saving of o against r is 1 − d_r/d_o of the tokens at every level,
whatever the smoothing window, and in steps 1 − (B_r/B_o)·d_r/d_o (a step of batch B covers B·SEQ tokens). Every
step takes one second, so wall time saved is steps saved.
"""

from __future__ import annotations

import importlib
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from synthetic_run import write_synthetic_run

from gnsrepro.analysis import (
    fixed_arm_batches,
    fixed_batch_losses,
    one_sided_t_test,
    reference_fixed_arm,
    schedule_arm,
    smoothing_window,
    tokens_saved_over_seeds,
)
from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.errors import ConfigError
from gnsrepro.figures import run_plot
from gnsrepro.figures.schedule import schedule
from gnsrepro.report import schedule_numbers, write_report

matplotlib.use("Agg")

SEQ, BUDGET = 4, 51_200  # tokens per sequence, tokens per run: 800 steps at batch 16, 200 at 64
C, D = 10.0, 1.0e-4  # loss = C − D·f·t: from 10 down to about 4.9 at f = 1
SCHEDULE_BATCH, SCHEDULE_STEP_BATCH = 64, 16  # the schedules' largest batch (config), and the batch they log
# the arms' slopes relative to D: fixed 32 falls fastest of the fixed batches (the best), both schedules faster
FACTORS = {("constant", 16): 1.10, ("constant", 32): 1.20, ("constant", 64): 1.00,
           ("linear", SCHEDULE_BATCH): 1.50, ("gns", SCHEDULE_BATCH): 1.80}
SEED_SPREAD = {("constant", 16): 1, ("constant", 32): 2, ("constant", 64): 3, ("linear", SCHEDULE_BATCH): -2,
               ("gns", SCHEDULE_BATCH): 4}  # seed s multiplies the slope by 1 + 0.01·s·spread
SEEDS = (0, 1, 2)


def slope(schedule_name: str, batch: int, seed: int) -> float:
    key = (schedule_name, batch)
    return D * FACTORS[key] * (1 + 0.01 * seed * SEED_SPREAD[key])


def write_run(root, schedule_name: str, batch: int, seed: int):
    """A run directory `<root>/<arm>-seed<seed>` (as the experiments name theirs) of loss C − slope·tokens."""
    step_batch = batch if schedule_name == "constant" else SCHEDULE_STEP_BATCH
    name = f"{schedule_name}-b{batch}" if schedule_name == "constant" else schedule_name
    path = write_synthetic_run(root / f"{name}-seed{seed}", steps=BUDGET // (step_batch * SEQ), seed=seed,
                               batch_size=step_batch, micro_batch_size=step_batch, seq_len=SEQ, write_gns=False)
    config = OmegaConf.load(path / "config.yaml")
    config.seed, config.schedule.name, config.schedule.batch_size = seed, schedule_name, batch
    OmegaConf.save(config, path / "config.yaml")
    metrics = pd.read_parquet(path / "metrics.parquet")
    metrics["loss"] = C - slope(schedule_name, batch, seed) * metrics["tokens"].to_numpy(dtype=float)
    metrics["step_time_s"] = 1.0
    metrics.to_parquet(path / "metrics.parquet", index=False)
    return path


def write_runs(root, fixed_seeds: dict[int, tuple] | None = None, schedules=("linear", "gns")) -> list:
    """Fixed batches {batch: seeds} (default 16, 32, 64 at seeds 0-2) and the schedules at seeds 0-2."""
    fixed_seeds = {16: SEEDS, 32: SEEDS, 64: SEEDS} if fixed_seeds is None else fixed_seeds
    runs = [write_run(root, "constant", b, s) for b, seeds in fixed_seeds.items() for s in seeds]
    return runs + [write_run(root, name, SCHEDULE_BATCH, s) for name in schedules for s in SEEDS]


def saved_pct(other: tuple, reference: tuple, seed: int) -> tuple[float, float]:
    """(tokens, steps) saved in % by `other` against `reference` at one seed, both (schedule name, batch)."""
    ratio = slope(*reference, seed) / slope(*other, seed)
    step_batch = {o: (o[1] if o[0] == "constant" else SCHEDULE_STEP_BATCH) for o in (other, reference)}
    return 100 * (1 - ratio), 100 * (1 - step_batch[reference] / step_batch[other] * ratio)


def expected_savings(other: tuple, reference: tuple, seeds=SEEDS) -> dict:
    tokens, steps = np.array([saved_pct(other, reference, s) for s in seeds]).T
    std = (lambda x: float(np.std(x, ddof=1))) if len(seeds) > 1 else (lambda x: math.nan)
    return {"tokens_saved": (tokens.mean(), std(tokens)), "steps_saved": (steps.mean(), std(steps)),
            "time_saved": (steps.mean(), std(steps)), "p": one_sided_t_test(tokens)[1], "seeds": len(seeds)}


def assert_savings(measured: dict, expected: dict) -> None:
    assert measured["seeds"] == expected["seeds"]
    for key in ("tokens_saved", "steps_saved", "time_saved"):
        assert measured[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    assert measured["p"] == pytest.approx(expected["p"], rel=1e-6, abs=1e-12, nan_ok=True)


def config(name: str, batch: int) -> dict:
    return {"schedule": {"name": name, "batch_size": batch}, "seed": 0}


# ---- arms and the reference ------------------------------------------------------------------------------
def test_arm_keys_name_each_fixed_batch_only_when_there_are_several():
    one = [config("constant", 64), config("constant", 64), config("linear", 64), config("gns", 64)]
    assert [schedule_arm(c, one) for c in one] == ["constant", "constant", "linear", "gns"]
    assert fixed_arm_batches(one) == {"constant": 64}
    swept = [config("constant", 128), config("constant", 16), config("constant", 64), config("linear", 64)]
    assert [schedule_arm(c, swept) for c in swept] == ["constant-b128", "constant-b16", "constant-b64", "linear"]
    assert list(fixed_arm_batches(swept).items()) == [("constant-b16", 16), ("constant-b64", 64),
                                                      ("constant-b128", 128)]


def test_the_default_reference_is_the_schedules_largest_batch_else_the_largest_fixed_one():
    fixed = [config("constant", b) for b in (16, 32, 64, 128)]
    assert reference_fixed_arm([*fixed, config("linear", 32), config("gns", 64)]) == "constant-b64"
    assert reference_fixed_arm([*fixed, config("linear", 48)]) == "constant-b128"  # no fixed arm of 48
    assert reference_fixed_arm(fixed) == "constant-b128"
    assert reference_fixed_arm([config("constant", 64), config("linear", 16)]) == "constant"
    assert reference_fixed_arm([config("linear", 64)]) is None
    assert reference_fixed_arm([*fixed, config("linear", 64)], reference=16) == "constant-b16"
    with pytest.raises(ConfigError, match=r"^reference=48 is not the batch size of a fixed-batch run; accepted: "
                                          r"16, 32, 64, 128$"):
        reference_fixed_arm(fixed, reference=48)
    with pytest.raises(ConfigError, match="reference=64 is not .*accepted: none: no run has schedule.name=constant"):
        reference_fixed_arm([config("linear", 64)], reference=64)


# ---- the best fixed batch --------------------------------------------------------------------------------
def test_fixed_batch_losses_read_every_batch_at_the_common_budget_and_find_the_best(tmp_path):
    from gnsrepro.runs import load_run

    runs = [load_run(p, need_gns=False) for p in write_runs(tmp_path, schedules=())]
    fixed = {}
    for run in runs:
        fixed.setdefault(run.config["schedule"]["batch_size"], {})[run.config["seed"]] = run.metrics
    table = fixed_batch_losses(fixed)
    # window 25 (an eighth of batch 64's 200 points): a curve keeps its points but the last 2·12; batch 64's
    # ends soonest in tokens, after its 176th step of 64·SEQ tokens
    assert smoothing_window(*(m for seeds in fixed.values() for m in seeds.values())) == 25
    budget = (200 - 24) * 64 * SEQ
    assert list(table.index) == [16, 32, 64] and (table["budget_tokens"] == budget).all()
    for batch, row in table.iterrows():
        losses = [C - slope("constant", batch, s) * budget for s in SEEDS]
        assert row["final_loss"] == pytest.approx(np.mean(losses), rel=1e-9)
        assert row["final_loss_std"] == pytest.approx(np.std(losses, ddof=1), rel=1e-6)
        assert row["seeds"] == list(SEEDS) and row["n_seeds"] == 3
    assert list(table.index[table["best"]]) == [32]
    # a batch with one seed is that seed's loss, and its spread unknown
    one = fixed_batch_losses({16: {0: fixed[16][0]}, 64: fixed[64]})
    assert one.loc[16, "final_loss"] == pytest.approx(C - slope("constant", 16, 0) * budget, rel=1e-9)
    assert math.isnan(one.loc[16, "final_loss_std"]) and list(one.index[one["best"]]) == [16]


# ---- the report ------------------------------------------------------------------------------------------
def report_of(runs_dir, out) -> str:
    plan = OmegaConf.create({"name": "test", "out_dir": str(out), "report": {"schedule_runs": str(runs_dir)},
                             "figures": []})
    return write_report(plan, {}).read_text()


def test_report_numbers_against_the_reference_and_the_best_fixed_batch(tmp_path):
    write_runs(tmp_path / "runs")
    numbers = schedule_numbers(tmp_path / "runs")
    assert set(numbers) == {"linear", "gns", "linear_vs_best", "gns_vs_best", "gns_vs_linear", "fixed_sweep"}
    assert_savings(numbers["gns_vs_linear"], expected_savings(("gns", 64), ("linear", 64)))
    for arm in ("linear", "gns"):
        assert_savings(numbers[arm], expected_savings((arm, 64), ("constant", 64)))
        assert_savings(numbers[f"{arm}_vs_best"], expected_savings((arm, 64), ("constant", 32)))
        assert numbers[f"{arm}_vs_best"]["batch"] == 32
    sweep = numbers["fixed_sweep"]
    assert sweep["swept"] and sweep["reference"] == 64 and sweep["best"] == 32 and sweep["note"] == ""
    assert list(sweep["batches"]) == [16, 32, 64] and sweep["budget_tokens"] == (200 - 24) * 64 * SEQ
    assert sweep["batches"][32]["final_loss"] == pytest.approx(
        np.mean([C - slope("constant", 32, s) * sweep["budget_tokens"] for s in SEEDS]), rel=1e-9)
    # the schedules read at the same budget: loss C - slope * budget, mean over seeds
    for arm in ("linear", "gns"):
        assert sweep["schedules"][arm]["seeds"] == list(SEEDS)
        assert sweep["schedules"][arm]["final_loss"] == pytest.approx(
            np.mean([C - slope(arm, 64, s) * sweep["budget_tokens"] for s in SEEDS]), rel=1e-9)
    # reference=B moves the 'linear' / 'gns' savings, not the best
    against_16 = schedule_numbers(tmp_path / "runs", reference=16)
    assert_savings(against_16["linear"], expected_savings(("linear", 64), ("constant", 16)))
    assert against_16["fixed_sweep"]["reference"] == 16 and against_16["fixed_sweep"]["best"] == 32
    # REPORT.md: a row per schedule and fixed batch, and the sweep's row
    report = report_of(tmp_path / "runs", tmp_path / "out")
    lin = expected_savings(("linear", 64), ("constant", 32))
    assert ("| Claim 4: linear schedule against the best fixed batch, 32, at its final loss (3 seeds) | tokens "
            f"{lin['tokens_saved'][0]:.1f} +- {lin['tokens_saved'][1]:.1f} % saved") in report
    assert "| Claim 4: gns schedule against the fixed batch 64 (the reference), at its final loss (3 seeds) |" in report
    losses = ", ".join(f"{b}: {v['final_loss']:.4f} (3 seeds)" for b, v in sweep["batches"].items())
    schedules = ", ".join(f"{arm} {sweep['schedules'][arm]['final_loss']:.4f} (3 seeds)" for arm in ("linear", "gns"))
    assert f"| at 45,056 tokens, batch {losses}; best: 32, reference: 64; the schedules there: {schedules} |" in report
    assert "the fixed batch was not swept" not in report
    g = expected_savings(("gns", 64), ("linear", 64))
    assert ("| Claim 4: gns schedule against the linear one, at the linear one's final loss (3 seeds) | tokens "
            f"{g['tokens_saved'][0]:.1f} +- {g['tokens_saved'][1]:.1f} % saved") in report


def test_a_batch_swept_with_fewer_seeds_uses_the_seeds_it_has_and_says_so(tmp_path):
    write_runs(tmp_path, fixed_seeds={16: (0,), 32: (1,), 64: SEEDS})
    numbers = schedule_numbers(tmp_path)
    sweep = numbers["fixed_sweep"]
    assert sweep["best"] == 32 and sweep["batches"][32]["seeds"] == [1] and sweep["batches"][64]["seeds"] == [0, 1, 2]
    assert sweep["note"] == ("the fixed batches have different seeds (16: seed 0; 32: seed 1; 64: seeds 0, 1, 2): "
                             "each batch's loss is the mean over the seeds it has")
    # against the best, over the one seed it shares with each schedule: no spread, no test
    for arm in ("linear", "gns"):
        assert_savings(numbers[f"{arm}_vs_best"], expected_savings((arm, 64), ("constant", 32), seeds=(1,)))
        assert_savings(numbers[arm], expected_savings((arm, 64), ("constant", 64)))
    report = report_of(tmp_path, tmp_path / "out")
    assert "against the best fixed batch, 32, at its final loss (1 seed) |" in report
    assert f"batch 16: {sweep['batches'][16]['final_loss']:.4f} (1 seed), 32: " in report and sweep["note"] in report


def test_one_fixed_arm_reports_as_before_and_says_it_was_not_swept(tmp_path):
    from gnsrepro.runs import load_run

    paths = write_runs(tmp_path / "runs", fixed_seeds={64: SEEDS})
    numbers = schedule_numbers(tmp_path / "runs")
    assert set(numbers) == {"linear", "gns", "gns_vs_linear", "fixed_sweep"}
    assert numbers["fixed_sweep"] == {"swept": False, "reference": 64}
    # the numbers of the comparison as it was: each arm against the constant arm, paired by seed
    runs = [load_run(p, need_gns=False) for p in paths]
    arm = {name: {r.config["seed"]: r.metrics for r in runs if r.config["schedule"]["name"] == name}
           for name in ("constant", "linear")}
    window = smoothing_window(*arm["constant"].values(), *arm["linear"].values())
    summary = tokens_saved_over_seeds(arm["constant"], arm["linear"], window=window).summary
    assert numbers["linear"]["tokens_saved"] == (summary.loc["tokens_saved_pct", "mean"],
                                                 summary.loc["tokens_saved_pct", "std"])
    assert_savings(numbers["linear"], expected_savings(("linear", 64), ("constant", 64)))
    report = report_of(tmp_path / "runs", tmp_path / "out")
    assert "| Claim 4: linear schedule against the fixed batch, at its final loss (3 seeds) | tokens " in report
    assert "| Claim 4: the fixed batch | 64 sequences: the fixed batch was not swept |" in report
    assert "best fixed batch" not in report


# ---- the figure ------------------------------------------------------------------------------------------
def test_figure_draws_every_fixed_arm_and_the_savings_against_the_reference(tmp_path, monkeypatch):
    module = importlib.import_module("gnsrepro.figures.schedule")  # the package's `schedule` is the function

    drawn = []
    save = module.save
    monkeypatch.setattr(module, "save", lambda fig, out, values: drawn.append(fig) or save(fig, out, values))
    runs = write_runs(tmp_path / "runs")
    out = tmp_path / "fig" / "schedule"
    schedule(runs, out)
    values = pd.read_parquet(out.with_name("schedule.parquet"))
    assert list(dict.fromkeys(values["arm"])) == ["constant-b16", "constant-b32", "constant-b64", "linear", "gns"]
    finals = pd.read_parquet(out.with_name("schedule-tokens-saved-final.parquet"))
    assert (finals["reference_arm"] == "constant-b64").all() and (finals["reference_seed"] == finals["seed"]).all()
    assert set(finals["arm"]) == {"constant-b16", "constant-b32", "linear", "gns"}
    names = {"constant-b16": ("constant", 16), "constant-b32": ("constant", 32), "linear": ("linear", 64),
             "gns": ("gns", 64)}
    for row in finals.itertuples():
        tokens, steps = saved_pct(names[row.arm], ("constant", 64), row.seed)
        assert row.tokens_saved_pct == pytest.approx(tokens, rel=1e-6)
        assert row.steps_saved_pct == pytest.approx(steps, rel=1e-6)
    # every fixed arm in grey, the largest black, labelled "fixed B"; the reference named; the other fixed
    # arms' savings dashed, one legend entry each (the mean over seeds), the schedules' one per seed
    (fig,) = drawn
    loss_ax, _, saved_ax = fig.axes[:3]
    loss_lines = {line.get_label(): line for line in loss_ax.get_lines()}
    fixed = ["fixed 16 (3 seeds: mean, min-max)", "fixed 32 (3 seeds: mean, min-max)",
             "fixed 64 (reference) (3 seeds: mean, min-max)"]
    greys = [matplotlib.colors.to_rgb(loss_lines[label].get_color()) for label in fixed]
    assert all(r == g == b for r, g, b in greys) and greys[0] > greys[1] > greys[2] == (0.0, 0.0, 0.0)
    assert saved_ax.get_ylabel() == "tokens saved against fixed 64"
    legend = [t.get_text() for t in saved_ax.get_legend().get_texts()]
    mean_16 = np.mean([saved_pct(("constant", 16), ("constant", 64), s)[0] for s in SEEDS])
    assert f"fixed 16 (3 seeds): {mean_16:.1f}% at the final loss (mean)" in legend
    assert sum(t.startswith("fixed 32") for t in legend) == 1 and sum(t.startswith("linear ramp, seed") for t in
                                                                      legend) == 3
    dashed = [line for line in saved_ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 6  # two fixed arms x three seeds


def test_figure_orders_fixed_arms_by_batch_and_marks_a_reference_that_is_not_the_largest(tmp_path, monkeypatch):
    """Runs given out of batch order (64, 16, 32, as a glob of constant-b<B>-seed<s> can give them): the
    fixed arms are drawn smallest batch first; the reference (32) is black and solid, the others grey and dashed."""
    module = importlib.import_module("gnsrepro.figures.schedule")
    drawn = []
    save = module.save
    monkeypatch.setattr(module, "save", lambda fig, out, values: drawn.append(fig) or save(fig, out, values))
    runs = write_runs(tmp_path / "runs", fixed_seeds={64: SEEDS, 16: SEEDS, 32: SEEDS}, schedules=("linear",))
    schedule(runs, tmp_path / "schedule", reference=32)
    values = pd.read_parquet(tmp_path / "schedule.parquet")
    assert list(dict.fromkeys(values["arm"])) == ["constant-b16", "constant-b32", "constant-b64", "linear"]
    (fig,) = drawn
    lines = {line.get_label().split(" (")[0]: line for line in fig.axes[0].get_lines()}
    reference, others = lines["fixed 32"], [lines["fixed 16"], lines["fixed 64"]]
    assert matplotlib.colors.to_rgb(reference.get_color()) == (0.0, 0.0, 0.0) and reference.get_linestyle() == "-"
    for line in others:
        rgb = matplotlib.colors.to_rgb(line.get_color())
        assert rgb[0] == rgb[1] == rgb[2] > 0.0 and line.get_linestyle() == "--"
    assert "fixed 32 (reference)" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]


def test_figure_reference_option_reaches_the_figure_from_the_command_line(tmp_path):
    runs = write_runs(tmp_path / "runs", schedules=("linear",))
    register_configs()
    out = tmp_path / "fig"
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("plot", overrides=["figure=schedule", f"run=[{','.join(map(str, runs))}]", "reference=32",
                                         f"out={out}"])
    run_plot(cfg)
    finals = pd.read_parquet(tmp_path / "fig-tokens-saved-final.parquet")
    assert (finals["reference_arm"] == "constant-b32").all()
    for row in finals[finals["arm"] == "linear"].itertuples():
        assert row.tokens_saved_pct == pytest.approx(saved_pct(("linear", 64), ("constant", 32), row.seed)[0],
                                                     rel=1e-6)
    with pytest.raises(ConfigError, match="reference=48 is not the batch size of a fixed-batch run; accepted: "
                                          "16, 32, 64"):
        schedule(runs, tmp_path / "bad", reference=48)
    assert not (tmp_path / "bad.png").exists()


def test_one_fixed_arm_figure_keeps_its_arm_and_labels(tmp_path):
    runs = write_runs(tmp_path / "runs", fixed_seeds={64: (0, 1)}, schedules=("linear",))
    schedule(runs, tmp_path / "schedule")
    finals = pd.read_parquet(tmp_path / "schedule-tokens-saved-final.parquet")
    assert set(finals["arm"]) == {"linear"} and (finals["reference_arm"] == "constant").all()
    values = pd.read_parquet(tmp_path / "schedule.parquet")
    assert list(dict.fromkeys(values["arm"])) == ["constant", "linear"]


# ---- the experiments and the plan ------------------------------------------------------------------------
def train_cfg(*overrides: str) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("scale, batches", [("small", (16, 32, 128)), ("tiny", (4, 8, 32))])
def test_sweep_experiments_change_only_the_batch_and_where_the_run_goes(scale, batches):
    base = train_cfg(f"experiment=schedule/{scale}", "seed=1")
    micro = base["schedule"]["micro_batch_size"]
    below = [b for b in batches if b < base["schedule"]["batch_size"]]
    assert len(below) == 2 and max(batches) > base["schedule"]["batch_size"]  # two below the comparison's, one above
    for batch in batches:
        cfg = train_cfg(f"experiment=schedule/{scale}_b{batch}", "seed=1")
        assert cfg["schedule"]["batch_size"] == batch and batch % micro == 0
        assert cfg["out_dir"] == f"outputs/schedule/{scale}/constant-b{batch}-seed1"
        assert cfg["run_name"] == f"schedule-{scale}-constant-b{batch}-seed1"
        for key in ("out_dir", "run_name"):
            cfg.pop(key), base.pop(key, None)
        cfg["schedule"]["batch_size"] = base["schedule"]["batch_size"]
        assert cfg == base  # the token budget, learning rate, model, data and the rest: schedule/<scale>'s


def test_the_small_plan_runs_the_sweep_where_its_figure_and_report_find_it():
    plan = OmegaConf.load(f"{conf_dir()}/plan/small.yaml")
    for seed in range(3):  # a part per seed: each under the plan's ten minutes
        part = next(p for p in plan.parts if p.name == f"fixed_sweep{seed}")
        assert part.minutes <= 10 and list(part.commands) == [
            f"train -m experiment=schedule/small_b16,schedule/small_b32,schedule/small_b128 seed={seed} resume=true"]
    figure = next(f for f in plan.figures if f.name == "schedule")
    assert "run=outputs/schedule/small/*-seed*" in figure.command  # every arm, constant-b<B>-seed<s> too
    assert plan.report.schedule_runs == "outputs/schedule/small"
    below = next(p for p in plan.parts if p.name == "fixed_sweep_b8")  # 8, below the schedules' smallest batch
    assert below.minutes <= 10
    assert list(below.commands) == ["train -m experiment=schedule/small_b8 seed=0,1,2 resume=true"]
    assert "swept over 8-128" in plan.gives_up


def test_a_schedule_that_never_reaches_the_best_fixed_batchs_loss_is_reported_as_no_saving():
    """At the tiny scale the smallest fixed batch is the best and no schedule reaches its final loss: the report
    says so instead of printing an undefined percentage."""
    from gnsrepro.report import _schedule_rows

    nan = float("nan")
    reached = {"tokens_saved": (30.0, 2.0), "steps_saved": (-5.0, 1.0), "time_saved": (20.0, 3.0), "p": 0.01,
               "seeds": 3, "not_reached": 0}
    never = {"tokens_saved": (nan, nan), "steps_saved": (nan, nan), "time_saved": (nan, nan), "p": nan, "seeds": 3,
             "not_reached": 3, "batch": 4}
    partly = {**reached, "p": nan, "not_reached": 1, "batch": 4}
    sweep = {"swept": True, "reference": 16, "best": 4, "budget_tokens": 1000.0, "note": "",
             "batches": {4: {"final_loss": 2.7, "seeds": [0, 1, 2]}, 16: {"final_loss": 3.2, "seeds": [0, 1, 2]}}}
    rows = dict((what, text) for what, text, _ in _schedule_rows(
        {"linear": reached, "linear_vs_best": never, "gns": reached, "gns_vs_best": partly, "fixed_sweep": sweep}))
    assert rows["Claim 4: linear schedule against the fixed batch 16 (the reference), at its final loss (3 seeds)"] \
        .startswith("tokens 30.0 +- 2.0 % saved (p = 0.01)")
    assert rows["Claim 4: linear schedule against the best fixed batch, 4, at its final loss (3 seeds)"] == (
        "none: at no seed did the schedule reach that fixed batch's final loss within the token budget (it ended "
        "worse; 3 of 3 seeds)")
    assert rows["Claim 4: gns schedule against the best fixed batch, 4, at its final loss (3 seeds)"].endswith(
        "; 1 of 3 seeds never reached its final loss (left out of the mean; no p-value)")


def test_losses_at_a_point_before_a_runs_smoothed_curve_is_a_one_line_error(tmp_path):
    from gnsrepro.analysis import losses_at
    from gnsrepro.runs import load_run

    run = load_run(write_run(tmp_path, "constant", 64, 0), need_gns=False)
    budget = 20_000
    assert losses_at({0: run.metrics}, budget, 5)[0] == pytest.approx(C - slope("constant", 64, 0) * budget, rel=1e-9)
    with pytest.raises(ConfigError, match="fixed seed 0's smoothed loss starts at .* tokens, after 1: the runs' token"):
        losses_at({0: run.metrics}, 1.0, 5, name="fixed")


def test_graphed_runs_of_a_loop_that_logged_host_times_count_in_tokens_and_steps_not_wall_time(tmp_path):
    """A run replayed from CUDA graphs before train's loop waited for the device at its pauses logged host step
    times (meta.json: cuda_graphs without step_time_synced): load_run reads them as unknown, and the report's wall
    time is over the other seeds and says so, while tokens and steps use every seed."""
    import json

    from gnsrepro.runs import load_run

    paths = write_runs(tmp_path / "runs")
    for path in paths:
        meta = json.loads((path / "meta.json").read_text())
        seed = OmegaConf.load(path / "config.yaml").seed
        meta |= {"cuda_graphs": seed == 2} | ({"step_time_synced": True} if seed == 1 else {})
        (path / "meta.json").write_text(json.dumps(meta))
    by_seed = {OmegaConf.load(p / "config.yaml").seed: load_run(p, need_gns=False).metrics for p in paths[:3]}
    assert by_seed[2][["step_time_s", "tokens_per_s", "mfu"]].isna().all().all()
    assert (by_seed[0]["step_time_s"] == 1.0).all() and (by_seed[1]["step_time_s"] == 1.0).all()
    numbers = schedule_numbers(tmp_path / "runs")
    full, two = expected_savings(("linear", 64), ("constant", 32)), expected_savings(("linear", 64), ("constant", 32),
                                                                                     seeds=(0, 1))
    got = numbers["linear_vs_best"]
    assert got["tokens_saved"] == pytest.approx(full["tokens_saved"]) and got["time_seeds"] == 2
    assert got["time_saved"] == pytest.approx(two["time_saved"])
    report = report_of(tmp_path / "runs", tmp_path / "out")
    assert ("| Claim 4: linear schedule against the best fixed batch, 32, at its final loss (3 seeds) | tokens "
            f"{full['tokens_saved'][0]:.1f} +- {full['tokens_saved'][1]:.1f} % saved") in report
    assert f"{two['time_saved'][0]:.1f} +- {two['time_saved'][1]:.1f} % (over 2 seeds: the others' step times are " \
           "unknown)" in report


def test_every_arms_tokens_and_steps_to_another_arms_final_loss(tmp_path):
    """Loss C - slope * tokens: an arm first reaches a level L after (C - L) / slope tokens, at that over (its
    step's batch * SEQ) steps; L is each seed's final smoothed loss of the target arm, and an arm falling more
    slowly than the target never reaches it (here every fixed batch, for the linear schedule's)."""
    from gnsrepro.analysis import cost_to_reach, loss_curve
    from gnsrepro.runs import load_run

    write_runs(tmp_path / "runs")
    runs = {}
    for path in sorted((tmp_path / "runs").glob("*-seed*")):
        run = load_run(path, need_gns=False)
        runs.setdefault(path.name.rsplit("-seed", 1)[0], {})[run.config["seed"]] = run.metrics
    window = 25  # as test_fixed_batch_losses_read_every_batch_at_the_common_budget_and_find_the_best computes
    # to the slowest arm's final loss (fixed 64): every arm gets there
    table = cost_to_reach(runs, "constant-b64", window)
    assert list(table.columns) == ["arm", "seed", "level", "tokens", "steps", "reached"] and len(table) == 5 * 3
    levels = {s: loss_curve(runs["constant-b64"][s], window)["loss_monotone"].iloc[-1] for s in SEEDS}
    arms = {"constant-b16": (("constant", 16), 16), "constant-b32": (("constant", 32), 32),
            "linear": (("linear", 64), SCHEDULE_STEP_BATCH), "gns": (("gns", 64), SCHEDULE_STEP_BATCH)}
    for (arm, seed), row in table.set_index(["arm", "seed"]).iterrows():
        assert row.level == pytest.approx(levels[seed]) and row.reached
        if arm in arms:
            key, step_batch = arms[arm]
            tokens = (C - levels[seed]) / slope(*key, seed)
            assert row.tokens == pytest.approx(tokens, rel=1e-6)
            assert row.steps == pytest.approx(tokens / (step_batch * SEQ), rel=1e-6)
    # the report's row: to the linear schedule's final loss, which only the faster gns schedule reaches
    to = schedule_numbers(tmp_path / "runs")["fixed_sweep"]["to_linear_loss"]
    assert list(to) == ["fixed 16", "fixed 32", "fixed 64", "linear", "gns"]
    linear = {s: loss_curve(runs["linear"][s], window)["loss_monotone"].iloc[-1] for s in SEEDS}
    gns_tokens = np.mean([(C - linear[s]) / slope("gns", 64, s) for s in SEEDS])
    assert to["gns"]["reached"] == to["gns"]["seeds"] == 3 and to["gns"]["tokens"] == pytest.approx(gns_tokens)
    assert to["gns"]["level"] == pytest.approx(np.mean(list(linear.values())))
    assert all(to[f"fixed {b}"]["reached"] == 0 and math.isnan(to[f"fixed {b}"]["tokens"]) for b in (16, 32, 64))
    report = report_of(tmp_path / "runs", tmp_path / "out")
    assert (f"| Claim 4: tokens and steps to the linear schedule's final loss ({to['linear']['level']:.4f}, mean over "
            "seeds of where each arm first reached it) | fixed 16: never; fixed 32: never; fixed 64: never; linear: "
            f"{to['linear']['tokens'] / 1e6:.1f}M tokens") in report
    assert f"; gns: {gns_tokens / 1e6:.1f}M tokens, {gns_tokens / (SCHEDULE_STEP_BATCH * SEQ):,.0f} steps |" in report
