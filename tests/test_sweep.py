"""`gnsrepro sweep` and the run loader, on synthetic GNS logs whose answers are known."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from synthetic_run import write_synthetic_run

from gnsrepro.cli import bracket_list_overrides, conf_dir
from gnsrepro.config import register_configs
from gnsrepro.errors import ConfigError
from gnsrepro.runs import GNS_COLUMNS, METRICS_COLUMNS, load_run
from gnsrepro.sweep import (
    TABLE_COLUMNS,
    correlation_table,
    pair_statistics,
    run_sweep,
    smoothed_gns,
)

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gnsrepro", "sweep", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def reference_ema(x: np.ndarray, alpha: float) -> np.ndarray:
    """The bias-corrected EMA written out as its recurrence, m_t = α m_{t-1} + (1-α) x_t, reported m_t / (1-α^t)."""
    out, m = [], 0.0
    for t, value in enumerate(x, start=1):
        m = alpha * m + (1 - alpha) * value
        out.append(m / (1 - alpha**t))
    return np.array(out)


def gns_frame(series: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """A gns.parquet-like frame from {(source, group): (gtg, trsigma)}, one row per step (1, 2, ...)."""
    parts = [pd.DataFrame({"step": np.arange(1, len(g) + 1), "tokens": 64 * np.arange(1, len(g) + 1),
                           "source": source, "group": group, "gtg": g, "trsigma": s})
             for (source, group), (g, s) in series.items()]
    return pd.concat(parts, ignore_index=True)


def k_times_layernorm(steps: int, k: float, total_noise: float, seed: int = 0) -> pd.DataFrame:
    """layernorm's noisy components, and total's: the same |G|², k x layernorm's tr Σ (times 1 + noise).

    With total_noise = 0 total's smoothed GNS is exactly k x layernorm's at every α (the EMA is linear).
    Both GNS rise about 10x over the run (|G|² falls), as a real run's do, and each step's components carry
    30% noise.
    """
    rng = np.random.default_rng(seed)
    progress = np.linspace(0, 1, steps)
    true_gtg, true_trsigma = np.exp(-2.3 * progress), np.ones(steps)
    gtg = true_gtg + rng.normal(0, 0.3, steps) * true_gtg
    trsigma = true_trsigma * (1 + rng.normal(0, 0.3, steps))
    total_trsigma = k * trsigma * (1 + total_noise * rng.normal(0, 1, steps))
    return gns_frame({("per_example", "layernorm"): (gtg, trsigma), ("per_example", "total"): (gtg, total_trsigma)})


# ---- smoothing ------------------------------------------------------------------------------------------
def test_smoothed_gns_smooths_each_component_of_each_series_in_step_order():
    rng = np.random.default_rng(1)
    n = 300
    series = {(s, g): (1 + rng.normal(0, 0.5, n), 5 + rng.normal(0, 2, n))
              for s in ("per_example", "microbatch") for g in ("layernorm", "total")}
    shuffled = gns_frame(series).sample(frac=1.0, random_state=0)  # rows in no order: sorted by step inside
    for alpha in (0.0, 0.9, 0.99):
        out = smoothed_gns(shuffled, alpha)
        assert list(out.columns) == ["step", "tokens", "source", "group", "gns"] and len(out) == 4 * n
        for (source, group), (gtg, trsigma) in series.items():
            got = out[(out.source == source) & (out.group == group)]
            assert got["step"].tolist() == list(range(1, n + 1))
            assert got["tokens"].tolist() == [64 * s for s in range(1, n + 1)]
            expected = reference_ema(trsigma, alpha) / reference_ema(gtg, alpha)
            np.testing.assert_allclose(got["gns"].to_numpy(), expected, rtol=1e-10)


# ---- the correlation table ------------------------------------------------------------------------------
def test_total_exactly_k_times_layernorm_gives_slope_k_r_one_and_no_heldout_error():
    alphas = [0.9, 0.95, 0.99, 0.995, 0.999]
    table = correlation_table(k_times_layernorm(3000, k=2.5, total_noise=0.0), alphas)
    assert list(table.columns) == TABLE_COLUMNS
    assert table["alpha"].tolist() == alphas and set(table["group"]) == {"layernorm"}
    assert (table["n_steps"] == 3000 - 300).all()  # skip_fraction=0.1 of the 3000 steps
    np.testing.assert_allclose(table["slope"], 2.5, rtol=1e-9)
    np.testing.assert_allclose(table["affine_slope"], 2.5, rtol=1e-6)
    np.testing.assert_allclose(table["affine_intercept"], 0.0, atol=1e-6)
    np.testing.assert_allclose(table["pearson_r"], 1.0, atol=1e-9)
    np.testing.assert_allclose(table[["heldout_median_rel_err", "heldout_p90_rel_err"]], 0.0, atol=1e-9)
    np.testing.assert_allclose(table["detrended_r"], 1.0, atol=1e-9)


def test_noisy_total_k_times_layernorm_recovers_k_and_predicts_the_second_half():
    table = correlation_table(k_times_layernorm(4000, k=2.5, total_noise=0.2), [0.9, 0.99, 0.999]).set_index("alpha")
    # each step's total tr Σ is k x layernorm's x (1 + 20% noise): the smoothed ratio is k up to the EMA of
    # that noise, whose standard deviation is 0.2·sqrt((1-α)/(1+α)) relative: 3.2% at α = 0.9, 1% at 0.99
    np.testing.assert_allclose(table["slope"], 2.5, rtol=0.02)
    assert (table["pearson_r"] > 0.97).all()
    assert table.loc[0.9, "heldout_median_rel_err"] < 0.04 and table.loc[0.99, "heldout_median_rel_err"] < 0.015
    assert table.loc[0.999, "heldout_p90_rel_err"] < 0.03
    # a group whose GNS rises e^1.3 = 3.7x less than total's still has r near 1, but the slope fitted on the
    # first half under-predicts the second half: the held-out error sees what r does not
    drifting = k_times_layernorm(4000, k=2.5, total_noise=0.2)
    is_ln = drifting.group == "layernorm"
    drifting.loc[is_ln, "gtg"] *= np.exp(1.3 * (drifting.loc[is_ln, "step"] - 1) / 3999)
    worse = correlation_table(drifting, [0.99]).iloc[0]
    assert worse["pearson_r"] > 0.95
    assert worse["heldout_median_rel_err"] > 0.1 > 10 * table.loc[0.99, "heldout_median_rel_err"]


def shared_trend_frame(steps: int, seed: int) -> pd.DataFrame:
    """GNS series with |G|² = 1 exactly, so each smoothed GNS is the EMA of its tr Σ = the wanted GNS.

    total = exp(3·t + w_total), independent = 0.5·exp(3·t + w_independent) with independent random walks w
    (a small spread next to the 20x trend), follower = 0.5·total·exp(tiny noise).
    """
    rng = np.random.default_rng(seed)
    trend = 3.0 * np.linspace(0, 1, steps)
    walk = lambda: np.cumsum(rng.normal(0, 0.3 / math.sqrt(steps), steps))
    total = np.exp(trend + walk())
    one = np.ones(steps)
    return gns_frame({
        ("per_example", "total"): (one, total),
        ("per_example", "independent"): (one, 0.5 * np.exp(trend + walk())),
        ("per_example", "follower"): (one, 0.5 * total * np.exp(rng.normal(0, 0.001, steps))),
    })


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detrended_r_tells_a_shared_trend_from_shared_changes(seed):
    table = correlation_table(shared_trend_frame(4000, seed), [0.9]).set_index("group")
    independent, follower = table.loc["independent"], table.loc["follower"]
    # the shared trend makes the raw correlation high for both...
    assert independent["pearson_r"] > 0.9 and follower["pearson_r"] > 0.999
    # ...but only the follower's log-GNS changes go with total's: an exponential trend adds the same constant
    # to every change, and the walks' changes are independent (r's standard error 1/sqrt(31) = 0.18)
    assert abs(independent["detrended_r"]) < 0.55
    assert follower["detrended_r"] > 0.99
    assert 21 <= independent["n_changes"] <= 47


def test_warmup_steps_are_left_out_of_every_statistic():
    frame = k_times_layernorm(1000, k=2.0, total_noise=0.0)
    early = (frame.group == "total") & (frame.step <= 100)
    frame.loc[early, "trsigma"] *= -50  # an initialisation transient in total only
    alpha = [0.0]  # no smoothing, so the transient ends exactly at step 100
    kept = correlation_table(frame, alpha, skip_fraction=0.1).iloc[0]
    assert kept["n_steps"] == 900 and kept["slope"] == pytest.approx(2.0, rel=1e-9)
    everything = correlation_table(frame, alpha, skip_fraction=0.0).iloc[0]
    assert everything["n_steps"] == 1000 and everything["pearson_r"] < 0.5
    assert abs(everything["slope"] - 2.0) > 0.2 and everything["heldout_median_rel_err"] > 0.5


def test_detrended_spacing_and_non_positive_points():
    t = np.linspace(0, 1, 1000)
    x = np.exp(2 * t + np.sin(20 * t))  # log-GNS changes that vary, so their r is defined
    assert pair_statistics(x, 2 * x)["diff_every"] == round(1000 / 32)
    assert pair_statistics(x, 2 * x, diff_every=10)["n_changes"] == 99  # 100 points every 10 steps
    with_negative = x.copy()
    with_negative[[0, 10, 20]] = -1.0  # three of the evaluation points every 10 steps: dropped
    stats = pair_statistics(with_negative, 2 * x, diff_every=10)
    assert stats["n_changes"] == 96 and stats["detrended_r"] == pytest.approx(1.0)
    assert math.isnan(pair_statistics(x[:1], x[:1])["pearson_r"])  # too few points: NaN, not an error


def test_a_source_without_the_reference_gives_no_rows():
    frame = k_times_layernorm(200, k=2.0, total_noise=0.0)
    ln_only = frame[frame.group == "layernorm"].assign(source="microbatch")  # as gns=ln logs per example
    table = correlation_table(pd.concat([frame, ln_only]), [0.99])
    assert table["source"].tolist() == ["per_example"]


def test_100k_steps_times_5_alphas_in_seconds():
    frame = k_times_layernorm(100_000, k=2.0, total_noise=0.1)
    start = time.perf_counter()
    table = correlation_table(frame, [0.9, 0.95, 0.99, 0.995, 0.999])
    elapsed = time.perf_counter() - start
    assert len(table) == 5 and (table["n_steps"] == 90_000).all()
    assert elapsed < 30, f"{elapsed:.1f} s"  # generous: two shared CPU cores; vectorised, well under a second


# ---- the run loader -------------------------------------------------------------------------------------
def test_load_run_reads_a_synthetic_run(tmp_path):
    path = write_synthetic_run(tmp_path / "run", steps=120, schedule="linear", batch_size=8, micro_batch_size=2)
    run = load_run(path)
    assert run.path == path and run.meta["world_size"] == 1
    assert run.config["schedule"]["name"] == "linear" and run.config["optim"]["eps"] == 1e-8  # a float
    assert list(run.metrics.columns) == list(METRICS_COLUMNS) and list(run.gns.columns) == list(GNS_COLUMNS)
    assert run.metrics["step"].tolist() == list(range(1, 121))
    assert run.metrics["batch_size"].iloc[0] == 2 and run.metrics["batch_size"].iloc[-1] == 8
    loss = run.metrics["loss"].to_numpy()
    assert loss[:10].mean() > loss[-10:].mean() + 3  # falling from about ln(50304)
    assert set(run.gns["group"]) == {"attention", "mlp", "layernorm", "embedding", "total"}
    # microbatch rows only where a step has more than one micro-batch, as training logs them
    micro = run.gns[run.gns.source == "microbatch"]
    assert (micro["b_big"] > micro["b_small"]).all() and micro["step"].min() > 1
    # the total's squared norms sum the four groups' (disjoint parameter sets)
    per_step = run.gns[run.gns.source == "per_example"].pivot(index="step", columns="group", values="sqnorm_big")
    np.testing.assert_allclose(per_step["total"], per_step[["attention", "mlp", "layernorm", "embedding"]].sum(axis=1))


def test_load_run_errors_name_the_path_and_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"run directory .*nowhere does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty is not a run directory: it has no config.yaml"):
        load_run(tmp_path / "empty")
    off = write_synthetic_run(tmp_path / "off", steps=20, write_gns=False)
    with pytest.raises(ConfigError, match=r"off has no gns.parquet \(a gns=off run logs none\)"):
        load_run(off)
    assert load_run(off, need_gns=False).gns is None
    (off / "metrics.parquet").unlink()
    with pytest.raises(ConfigError, match=r"off has no metrics.parquet"):
        load_run(off, need_gns=False)
    bad = write_synthetic_run(tmp_path / "bad", steps=20)
    pd.read_parquet(bad / "gns.parquet").drop(columns=["trsigma"]).to_parquet(bad / "gns.parquet")
    with pytest.raises(ConfigError, match=r"gns.parquet lacks the column\(s\) trsigma"):
        load_run(bad)
    (bad / "metrics.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"metrics.parquet is not a readable parquet table"):
        load_run(bad)


# ---- configuration and the command ----------------------------------------------------------------------
def test_bare_comma_lists_become_hydra_lists():
    argv = ["ema_alpha=0.9,0.99", "run=outputs/a,/tmp/b c", "group=layernorm", "source=[per_example]",
            "skip_fraction=0.2", "--cfg", "run=it's"]
    assert bracket_list_overrides(argv) == [
        "ema_alpha=[0.9,0.99]", "run=['outputs/a','/tmp/b c']", "group=['layernorm']", "source=[per_example]",
        "skip_fraction=0.2", "--cfg", "run=['it\\'s']"]
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("sweep", overrides=bracket_list_overrides(["ema_alpha=0.9,0.99", "run=a b,it's"]))
        assert list(cfg.ema_alpha) == [0.9, 0.99] and list(cfg.run) == ["a b", "it's"]
        single = compose("sweep", overrides=["run=outputs/x"])  # Any: a single directory as typed
        assert single.run == "outputs/x" and list(single.ema_alpha) == [0.9, 0.95, 0.99, 0.995, 0.999]


def test_run_sweep_in_process_writes_each_run_or_one_out(tmp_path, capsys):
    runs = [write_synthetic_run(tmp_path / name, steps=300, seed=i) for i, name in enumerate(("a", "b"))]
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("sweep", overrides=[f"run=[{runs[0]},{runs[1]}]", "ema_alpha=[0.99]", "group=[layernorm]",
                                          "source=[per_example]"])
        out_cfg = compose("sweep", overrides=[f"run=[{runs[0]},{runs[1]}]", "ema_alpha=[0.9,0.99]",
                                              f"out={tmp_path / 'all' / 'sweep.parquet'}"])
    tables = run_sweep(cfg)
    for run in runs:
        written = pd.read_parquet(run / "sweep.parquet")
        assert list(written.columns) == ["run", *TABLE_COLUMNS] and written["run"].tolist() == [str(run)]
        pd.testing.assert_frame_equal(written.drop(columns="run"), tables[str(run)])
        assert written["group"].tolist() == ["layernorm"] and written["source"].tolist() == ["per_example"]
    printed = capsys.readouterr().out
    assert "held-out median %" in printed and "detrended r" in printed
    run_sweep(out_cfg)
    combined = pd.read_parquet(tmp_path / "all" / "sweep.parquet")
    # 2 runs x 2 alphas x 2 sources x 4 groups
    assert len(combined) == 32 and set(combined["run"]) == {str(r) for r in runs}
    assert not (tmp_path / "all" / "sweep.parquet.tmp").exists()


def test_cli_sweep_with_the_documented_forms(tmp_path):
    a = write_synthetic_run(tmp_path / "a", steps=200)
    b = write_synthetic_run(tmp_path / "b", steps=200, seed=1)
    r = run_cli("ema_alpha=0.9,0.99", f"run={a},{b}")
    assert r.returncode == 0, r.stderr
    assert f"run {a}: 200 steps" in r.stdout and f"wrote {b / 'sweep.parquet'}" in r.stdout
    table = pd.read_parquet(a / "sweep.parquet")
    assert sorted(set(table["alpha"])) == [0.9, 0.99] and len(table) == 2 * 2 * 4


def test_cli_errors_are_one_line_before_any_work(tmp_path):
    good = write_synthetic_run(tmp_path / "good", steps=50)
    off = write_synthetic_run(tmp_path / "off", steps=50, write_gns=False)
    ln_only = write_synthetic_run(tmp_path / "ln", steps=50, groups=("layernorm", "total"))
    cases = [
        ((), "run: no run directory given; pass run=DIR or run=DIR1,DIR2 (directories holding gns.parquet)"),
        ((f"run={good}", "ema_alpha=0.9,1.0"), "ema_alpha=1 must be in [0, 1) (the EMA's factor; 1 would never move)"),
        ((f"run={good},{off}",), f"run directory {off} has no gns.parquet (a gns=off run logs none)"),
        ((f"run={good},{tmp_path / 'missing'}",), f"run directory {tmp_path / 'missing'} does not exist"),
        ((f"run={good},{ln_only}", "group=mlp"), f"group=mlp: run {ln_only} did not log it; its gns.parquet has "
                                                 "groups layernorm, total"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.strip().splitlines() == [f"gnsrepro sweep: error: {message}"], (args, r.stderr)
        assert not (good / "sweep.parquet").exists(), args  # nothing written for the run that was fine


def test_run_sweep_says_which_source_lacks_the_reference(tmp_path, capsys):
    run = write_synthetic_run(tmp_path / "ln", steps=100)
    gns = pd.read_parquet(run / "gns.parquet")
    # as gns=ln logs: per_example rows for layernorm only, every group from the micro-batches
    gns[(gns.source == "microbatch") | (gns.group == "layernorm")].to_parquet(run / "gns.parquet", index=False)
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("sweep", overrides=[f"run={run}", "ema_alpha=[0.99]"])
    table = run_sweep(cfg)[str(run)]
    assert set(table["source"]) == {"microbatch"} and len(table) == 4
    assert "source(s) per_example: no total rows logged" in capsys.readouterr().out


def test_the_outlier_guard_keeps_one_spike_out_of_the_correlation():
    """A one-step spike in the total's components (as on the tiny CPU run) moves the unguarded slope; the guard,
    on by default in `gnsrepro sweep` as in training, leaves the slope at k."""
    from gnsrepro.gns import HampelFilter, gns_from_components

    frame = k_times_layernorm(2000, k=2.0, total_noise=0.02, seed=3)
    spike = (frame.group == "total") & (frame.step == 600)
    frame.loc[spike, "trsigma"] *= 1000.0
    raw = correlation_table(frame, [0.99])
    guarded = correlation_table(frame, [0.99], guard=HampelFilter())
    assert abs(guarded.slope.iloc[0] / 2.0 - 1) < 0.05
    assert abs(raw.slope.iloc[0] / 2.0 - 1) > 0.1
    smoothed = smoothed_gns(frame, 0.99, guard=HampelFilter())
    total = frame[frame.group == "total"].sort_values("step")
    expected = gns_from_components(total.gtg, total.trsigma, 0.99, guard=HampelFilter()).to_numpy()
    assert np.array_equal(smoothed[smoothed.group == "total"].gns.to_numpy(), expected)


def test_max_tokens_sweeps_a_prefix_of_the_run_into_its_own_file(tmp_path, capsys):
    """max_tokens=N: the table of the steps up to N tokens, the same as correlation_table on that prefix, written
    beside (not over) the whole run's sweep.parquet; a limit before the first logged step is a one-line error."""
    from gnsrepro.gns import HampelFilter

    run = write_synthetic_run(tmp_path / "a", steps=300)
    gns = load_run(run).gns
    limit = float(gns["tokens"].quantile(0.5))
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        whole = compose("sweep", overrides=[f"run={run}", "ema_alpha=[0.99]"])
        prefix = compose("sweep", overrides=[f"run={run}", "ema_alpha=[0.99]", f"max_tokens={limit}"])
        early = compose("sweep", overrides=[f"run={run}", "ema_alpha=[0.99]", "max_tokens=1"])
    run_sweep(whole)
    table = run_sweep(prefix)[str(run)]
    expected = correlation_table(gns[gns["tokens"] <= limit], [0.99], guard=HampelFilter())
    pd.testing.assert_frame_equal(table, expected)
    assert table["n_steps"].max() < pd.read_parquet(run / "sweep.parquet")["n_steps"].max()
    assert (run / f"sweep-until{limit:.0f}.parquet").exists()
    assert f"(up to {limit:,.0f} tokens)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="max_tokens=1: run .* logged no step within it"):
        run_sweep(early)
