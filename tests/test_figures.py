"""`gnsrepro plot`: every figure renders from a small synthetic run, plots the numbers it claims, and a bad
command line stops with one line before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from synthetic_run import write_synthetic_run

from gnsrepro.config import ModelConfig
from gnsrepro.cost import model_costs, seq_len_sweep
from gnsrepro.errors import ConfigError
from gnsrepro.figures import FIGURES, INPUTS, check_inputs, figures_usage
from gnsrepro.figures.common import choose_source
from gnsrepro.figures.correlation import correlation, draw_correlation
from gnsrepro.figures.cost import _gpt_config, cost
from gnsrepro.figures.lnbench import lnbench
from gnsrepro.figures.phase import draw_phase, phase
from gnsrepro.figures.schedule import schedule
from gnsrepro.gns import gns_from_components
from gnsrepro.sweep import correlation_table, smoothed_gns

REPO = Path(__file__).resolve().parent.parent
STEPS = 120  # enough for the sweep's 10% warm-up cut and the schedule's smoothing window, and fast


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("runs") / "run", steps=STEPS, seed=0)


def assert_rendered(paths: list[Path], stem: Path) -> None:
    for suffix in (".png", ".pdf"):
        path = stem.with_name(stem.name + suffix)
        assert path in paths and path.is_file() and path.stat().st_size > 1000, path
    assert all(p.is_file() for p in paths)


def lines_of(fig, title_start: str) -> dict:
    ax = next(a for a in fig.axes if a.get_title().startswith(title_start))
    return {line.get_label(): line for line in ax.get_lines()}


# ---- phase -------------------------------------------------------------------------------------------
def test_phase_plots_gns_from_components_of_the_summed_groups(run_dir, tmp_path):
    alpha = 0.95
    paths = phase(run_dir, tmp_path / "phase", alpha=alpha)
    assert_rendered(paths, tmp_path / "phase")
    values = pd.read_parquet(tmp_path / "phase.parquet")
    assert list(dict.fromkeys(values["curve"])) == ["layernorm", "linear_embedding", "total"]

    gns = pd.read_parquet(run_dir / "gns.parquet")
    rows = gns[gns["source"] == "per_example"].sort_values("step", kind="stable")  # gns=all: per_example first
    ln = rows[rows["group"] == "layernorm"]
    expected_ln = gns_from_components(ln["gtg"], ln["trsigma"], alpha).to_numpy()
    linear = rows[rows["group"].isin(["attention", "mlp", "embedding"])].groupby("step")[["gtg", "trsigma"]].sum()
    expected_linear = gns_from_components(linear["gtg"], linear["trsigma"], alpha).to_numpy()
    got = {c: v.sort_values("step") for c, v in values.groupby("curve")}
    np.testing.assert_allclose(got["layernorm"]["gns"], expected_ln, rtol=1e-12)
    np.testing.assert_allclose(got["linear_embedding"]["gns"], expected_linear, rtol=1e-12)
    assert got["linear_embedding"]["groups"].iloc[0] == "attention,mlp,embedding"

    # and the GNS panel draws exactly those numbers against tokens
    drawn = lines_of(draw_phase(values, alpha, "t"), "GNS over training")
    np.testing.assert_allclose(drawn["LayerNorm"].get_ydata(), expected_ln, rtol=1e-12)
    np.testing.assert_array_equal(drawn["LayerNorm"].get_xdata(), ln["tokens"])
    np.testing.assert_allclose(drawn["Linear + Embedding"].get_ydata(), expected_linear, rtol=1e-12)


def test_choose_source_takes_per_example_only_when_it_has_the_total():
    def rows(source, groups):
        return pd.DataFrame({"source": source, "group": list(groups)})

    full = ("attention", "mlp", "layernorm", "embedding", "total")
    gns_ln = pd.concat([rows("per_example", ["layernorm"]), rows("microbatch", full)])  # a gns=ln run
    assert choose_source(gns_ln, None, "run") == "microbatch"
    gns_all = pd.concat([rows("microbatch", full), rows("per_example", full)])
    assert choose_source(gns_all, None, "run") == "per_example"
    assert choose_source(gns_ln, "per_example", "run") == "per_example"  # asked for: the layernorm panel only
    with pytest.raises(ConfigError, match="source=ddp: run run has no ddp rows"):
        choose_source(gns_ln, "ddp", "run")
    with pytest.raises(ConfigError, match="accepted: per_example, microbatch, ddp"):
        choose_source(gns_ln, "micro", "run")


# ---- correlation -------------------------------------------------------------------------------------
def test_correlation_draws_the_sweep_tables(run_dir, tmp_path):
    alphas = [0.9, 0.99]
    paths = correlation(run_dir, tmp_path / "corr", alphas=alphas)
    assert_rendered(paths, tmp_path / "corr")
    gns = pd.read_parquet(run_dir / "gns.parquet")
    per_example = gns[gns["source"] == "per_example"]
    table = pd.read_parquet(tmp_path / "corr-table.parquet")
    pd.testing.assert_frame_equal(table, correlation_table(per_example, alphas))
    assert set(table["group"]) == {"attention", "mlp", "layernorm", "embedding"}

    smoothed = pd.read_parquet(tmp_path / "corr.parquet")
    fig = draw_correlation(smoothed, table, alphas, "t")
    ln = smoothed_gns(per_example, 0.99).query("group == 'layernorm'")
    np.testing.assert_allclose(lines_of(fig, "α = 0.99")["LayerNorm"].get_ydata(), ln["gns"], rtol=1e-12)
    r_line = lines_of(fig, "Pearson r")["LayerNorm"]
    np.testing.assert_allclose(r_line.get_ydata(), table.query("group == 'layernorm'")["pearson_r"], rtol=1e-12)


# ---- cost --------------------------------------------------------------------------------------------
def test_cost_figure_and_table1_are_the_cost_module_numbers(tmp_path):
    model = ModelConfig(name="small-test", n_layer=2, n_head=2, n_embd=64, block_size=128)
    paths = cost(model, tmp_path / "cost.png", seq_len=128, seq_lens=(32, 64), batch_size=2)  # suffix is stripped
    assert_rendered(paths, tmp_path / "cost")
    expected = model_costs(_gpt_config(model), 128, batch_size=2)
    table = pd.read_parquet(tmp_path / "cost-table1.parquet").set_index("method")
    assert table.loc["layernorm_only", "extra_flops_fraction"] == expected.loc["layernorm_only", "extra_flops_fraction"]
    pd.testing.assert_frame_equal(table, expected, check_names=False)
    sweep = pd.read_parquet(tmp_path / "cost.parquet")
    assert sorted(sweep["seq_len"].unique()) == [32, 64, 128]  # Table 1's length joins the sweep
    pd.testing.assert_frame_equal(sweep, seq_len_sweep(_gpt_config(model), [32, 64, 128], batch_size=2))
    markdown = (tmp_path / "cost-table1.md").read_text()
    fraction = 100 * expected.loc["layernorm_only", "extra_flops_fraction"]
    assert "| LayerNorm only |" in markdown and f"| {fraction:.3g} |" in markdown and "sequence length 128" in markdown


def test_cost_rejects_a_non_positive_seq_len(tmp_path):
    with pytest.raises(ConfigError, match="seq_len=0 must be a positive integer"):
        cost(ModelConfig(), tmp_path / "cost", seq_len=0)
    assert not list(tmp_path.iterdir())


# ---- lnbench -----------------------------------------------------------------------------------------
def bench_table(path: Path, stream: bool = True) -> Path:
    """The columns `gnsrepro bench layernorm` writes (gnsrepro/benchmarks/layernorm.py `run`), made-up times."""
    rows = []
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        for n in (768, 2048, 4096):
            nbytes = 5 * 16384 * n * size
            row = dict(N=n, dtype=dtype, torch_us=100 + nbytes / 1e6, triton_us=150 + nbytes / 2e6,
                       torch_pe_us=300 + nbytes / 5e5, bytes=nbytes, copy_gbps=3000.0, B=8, T=2048,
                       device_name="NVIDIA H200", torch="2.11.0", triton="3.6.0", date="2026-12-01 10:00 UTC")
            if stream:
                row |= dict(stream_torch_us=nbytes / 1.2e6, stream_triton_us=nbytes / 2.6e6)
            rows.append(row)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def test_the_report_gives_the_kernel_ratio_in_device_time_and_eager(tmp_path):
    from gnsrepro.report import kernel_numbers

    df = pd.read_parquet(bench_table(tmp_path / "layernorm.parquet"))
    got = kernel_numbers(tmp_path / "layernorm.parquet")
    device, eager = df.stream_triton_us / df.stream_torch_us, df.triton_us / df.torch_us
    assert got["kind"] == "device time in the stream" and got["sizes"] == [768, 2048, 4096]
    assert got["min"] == pytest.approx(device.min()) and got["max"] == pytest.approx(device.max())
    assert got["eager_min"] == pytest.approx(eager.min()) and got["eager_max"] == pytest.approx(eager.max())
    assert got["max"] < got["eager_min"]  # the made-up table: the host time is added to the eager calls
    old = kernel_numbers(bench_table(tmp_path / "old.parquet", stream=False))
    assert old["kind"] == "eager" and old["max"] == pytest.approx(eager.max())


def test_lnbench_plots_device_time_eager_time_and_the_copy_floor(tmp_path):
    table = bench_table(tmp_path / "layernorm.parquet")
    assert_rendered(lnbench(table, tmp_path / "lnbench"), tmp_path / "lnbench")
    values = pd.read_parquet(tmp_path / "lnbench.parquet").set_index(["dtype", "N", "series"])["time_us"]
    df = pd.read_parquet(table).set_index(["dtype", "N"])
    for (dtype, n), r in df.iterrows():
        assert values[(dtype, n, "triton_device")] == r["stream_triton_us"]
        assert values[(dtype, n, "torch_eager")] == r["torch_us"]
        assert values[(dtype, n, "copy_floor")] == pytest.approx(r["bytes"] / (3000e9) * 1e6)
    # a table without the device-time columns is drawn from its eager times
    old = bench_table(tmp_path / "old.parquet", stream=False)
    assert_rendered(lnbench(old, tmp_path / "old"), tmp_path / "old")
    assert not pd.read_parquet(tmp_path / "old.parquet")["series"].str.endswith("_device").any()


def test_lnbench_rejects_a_table_of_another_kind(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="lacks the column.*not the output of gnsrepro bench layernorm"):
        lnbench(run_dir / "metrics.parquet", tmp_path / "lnbench")


# ---- schedule ----------------------------------------------------------------------------------------
def test_schedule_groups_arms_by_config_and_plots_tokens_saved(tmp_path):
    runs = []
    for arm in ("constant", "linear"):
        for seed in (0, 1):
            path = write_synthetic_run(tmp_path / f"{arm}-{seed}", steps=STEPS, seed=10 * seed + len(arm),
                                       schedule=arm, write_gns=False)
            config = OmegaConf.load(path / "config.yaml")
            config.seed = seed  # the arm's seed, as `gnsrepro train seed=...` records it
            OmegaConf.save(config, path / "config.yaml")
            runs.append(path)
    paths = schedule(runs, tmp_path / "fig" / "schedule")
    assert_rendered(paths, tmp_path / "fig" / "schedule")
    values = pd.read_parquet(tmp_path / "fig" / "schedule.parquet")
    loss = values[values["panel"] == "loss"]
    assert set(loss["arm"]) == {"constant", "linear"} and (loss["n_seeds"] == 2).all()
    # the band is the seeds' min and max: at the common grid's first token both seeds' interpolated losses
    first = loss[loss["arm"] == "constant"].iloc[0]
    seeds_at_first = [np.interp(first["tokens"], m["tokens"], m["loss"])
                      for m in (pd.read_parquet(tmp_path / f"constant-{s}" / "metrics.parquet") for s in (0, 1))]
    assert first["min"] == pytest.approx(min(seeds_at_first)) and first["max"] == pytest.approx(max(seeds_at_first))
    batch = values[values["panel"] == "batch_size"]
    assert (batch.loc[batch["arm"] == "constant", "mean"] == 8).all()
    finals = pd.read_parquet(tmp_path / "fig" / "schedule-tokens-saved-final.parquet")
    assert list(finals["seed"]) == [0, 1] and list(finals["reference_seed"]) == [0, 1]
    # the linear ramp's small early batches reach each loss in fewer tokens on the synthetic curves
    assert (finals["tokens_saved"] > 0).all()


def test_schedule_refuses_two_runs_of_one_arm_and_seed(tmp_path):
    a = write_synthetic_run(tmp_path / "a", steps=STEPS, write_gns=False)
    b = write_synthetic_run(tmp_path / "b", steps=STEPS, write_gns=False)
    with pytest.raises(ConfigError, match="both schedule.name=constant seed="):
        schedule([a, b], tmp_path / "schedule")


# ---- inputs, registry and the command line ------------------------------------------------------------
def test_usage_lists_every_figure_and_its_input():
    usage = figures_usage()
    for name, spec in FIGURES.items():
        assert f"  {name} " in usage and INPUTS[spec.inputs] in usage


@pytest.mark.parametrize("figure, runs, table, message", [
    ("nope", [], None, "figure=nope is not a figure; accepted: phase, correlation, cost, lnbench, schedule"),
    ("phase", [], None, "figure=phase needs one run directory holding gns.parquet: run=DIR"),
    ("phase", ["RUN", "RUN"], None, "figure=phase takes one run directory, got 2"),
    ("phase", ["RUN/metrics.parquet"], None, "is a file; figure=phase takes one run directory"),
    ("phase", ["RUN"], "t.parquet", "figure=phase reads run directories, not table=t.parquet"),
    ("correlation", ["NOGNS"], None, "has no gns.parquet (a gns=off run logs none)"),
    ("schedule", ["MISSING"], None, "does not exist"),
    ("lnbench", ["RUN"], None, "figure=lnbench reads no run directory"),
    ("lnbench", [], "MISSING.parquet", "table=MISSING.parquet does not exist"),
    ("cost", [], "t.parquet", "figure=cost reads no table"),
])
def test_check_inputs_rejects_the_wrong_kind_of_input(run_dir, tmp_path, figure, runs, table, message):
    no_gns = write_synthetic_run(tmp_path / "nogns", steps=10, write_gns=False)
    names = {"RUN": str(run_dir), "NOGNS": str(no_gns), "MISSING": str(tmp_path / "missing")}
    runs = [next((r.replace(k, v, 1) for k, v in names.items() if r.startswith(k)), r) for r in runs]
    table = names["MISSING"] + ".parquet" if table == "MISSING.parquet" else table
    with pytest.raises(ConfigError, match=message.replace("MISSING", ".*").replace("(", r"\(").replace(")", r"\)")):
        check_inputs(figure, runs, table)


def test_check_inputs_returns_what_the_figure_takes(run_dir):
    assert check_inputs("phase", [str(run_dir)], None) == [run_dir]
    assert check_inputs("schedule", [str(run_dir), str(run_dir)], None) == [[run_dir, run_dir]]
    assert check_inputs("cost", [], None) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gnsrepro", "plot", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["figure=phse"], "figure=phse is not a figure; accepted: phase, correlation, cost, lnbench, schedule"),
    (["figure=phase", "run=/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    (["figure=lnbench", "run=[RUN,RUN]"], "figure=lnbench reads no run directory"),
])
def test_cli_errors_are_one_line_before_any_work(run_dir, tmp_path, args, message):
    out = tmp_path / "fig"
    r = run_cli(*[a.replace("RUN", str(run_dir)) for a in args], f"out={out}")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(f"gnsrepro plot: error: {message}"), r.stderr
    assert not out.parent.joinpath("fig.png").exists()


def test_cli_draws_a_figure_to_out(tmp_path):
    r = run_cli("figure=cost", "model=tiny", "seq_len=64", f"out={tmp_path / 'cost'}")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'cost.png'}" in r.stdout
    assert (tmp_path / "cost.pdf").stat().st_size > 1000 and (tmp_path / "cost-table1.md").is_file()
