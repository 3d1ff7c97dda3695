"""DDP on CPU (gloo, torchrun): 2- and 4-process runs equal the one-process run on the same global batch, the ddp
GNS source equals an independent reference, a linear batch schedule splits over ranks, and figure=ddp plots what
it claims (docs/ddp.md).

Why the runs can be compared number for number: every run reads the same sequences in the same order (by sequence
index), rank r takes the r-th slice of each step's global batch (gnsrepro.train.Run.micro_batches), and DDP's
all-reduce averages the ranks' gradients, so only the order of float32 additions differs between the runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from synthetic_run import write_synthetic_run

from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.errors import ConfigError
from gnsrepro.figures import FIGURES, check_inputs, figures_usage
from gnsrepro.figures.common import positive
from gnsrepro.figures.ddp import GROUPS, ddp, ddp_values, draw_ddp
from gnsrepro.gns import PARAM_GROUPS, HampelFilter
from gnsrepro.settings import validate
from gnsrepro.sweep import smoothed_gns
from gnsrepro.train import train

REPO = Path(__file__).resolve().parent.parent
STEPS = 3  # step 1 runs DDP's first bucket layout, steps 2 and 3 the rebuilt one
BATCH = 8
ALL_GROUPS = (*PARAM_GROUPS, "total")
# float32 sums taken in another order (micro-batches accumulated on one rank and then all-reduced by gloo, against
# one process accumulating them all) differ by a few units of the last place, 6e-8 each, and three AdamW steps carry
# that into the weights: the squared norms and losses of these runs differed by at most 2.2e-7 (relative). 1e-5
# leaves a margin of 40, while every mistake a split can make (a micro-batch counted twice or not at all, a bucket
# missed by the hook, a wrong 1/world_size) moves a squared norm by more than 1e-2.
RTOL = 1e-5


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    # device=cpu: gloo and float32 on a GPU host too (there torchrun would pick NCCL, one GPU a rank, and bf16)
    return ["device=cpu", "model=tiny", "data=pycode", f"data.data_dir={data_dir}", "data.max_bytes=1500000",
            f"out_dir={out}", "seq_len=32", "optim.lr=3e-3", "eval_batches=2", "eval_interval=0", "log_interval=1",
            "gns=all", f"max_steps={STEPS}", *extra]


def make_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def train_one_process(data_dir: Path, out: Path, *extra: str) -> Path:
    """The reference run, in this process with one torch thread, as each torchrun rank under OMP_NUM_THREADS=1 (a
    CPU matmul's rounding depends on how many threads split it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(make_cfg(*train_args(data_dir, out, *extra)))
    finally:
        torch.set_num_threads(threads)


def train_processes(n: int, data_dir: Path, out: Path, *extra: str) -> Path:
    """`torchrun --standalone --nproc_per_node=n -m gnsrepro train ...` on the CPU: gloo, one thread a rank."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        "-m", "gnsrepro", "train", *train_args(data_dir, out, *extra)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out


def metrics(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "metrics.parquet").set_index("step")


def rows(run: Path, source: str) -> pd.DataFrame:
    g = pd.read_parquet(run / "gns.parquet")
    return g[g["source"] == source].set_index(["group", "step"]).sort_index()


def assert_same_estimates(got: pd.DataFrame, want: pd.DataFrame, rtol: float = RTOL) -> None:
    """The same (group, step) rows with the same batch sizes, squared norms within rtol, and |G|², tr(Σ) within
    rtol of the norms carried through the estimators (gnsrepro.gns, McCandlish et al. 2018, eq. A.2):
    gtg = (B|G_B|² - b|G_b|²) / (B - b) and trsigma = (|G_b|² - |G_B|²) / (1/b - 1/B) are differences of the two
    norms, so their error is bounded by rtol (B|G_B|² + b|G_b|²) / (B - b) and rtol (|G_b|² + |G_B|²) / (1/b - 1/B),
    not by rtol of themselves."""
    assert list(got.index) == list(want.index)
    for column in ("b_big", "b_small"):
        assert got[column].tolist() == want[column].tolist(), column
    for column in ("sqnorm_big", "sqnorm_small"):
        np.testing.assert_allclose(got[column], want[column], rtol=rtol, atol=0, err_msg=column)
    big_b, small_b = want["b_big"].to_numpy(float), want["b_small"].to_numpy(float)
    big, small = want["sqnorm_big"].to_numpy(), want["sqnorm_small"].to_numpy()
    gtg_tol = rtol * (big_b * big + small_b * small) / (big_b - small_b)
    trsigma_tol = rtol * (big + small) / (1 / small_b - 1 / big_b)
    assert (np.abs(got["gtg"].to_numpy() - want["gtg"].to_numpy()) <= gtg_tol).all()
    assert (np.abs(got["trsigma"].to_numpy() - want["trsigma"].to_numpy()) <= trsigma_tol).all()


def assert_same_losses(got: Path, want: Path) -> None:
    m_got, m_want = metrics(got), metrics(want)
    assert m_got.index.tolist() == m_want.index.tolist() == list(range(1, len(m_want) + 1))
    assert m_got["batch_size"].tolist() == m_want["batch_size"].tolist()
    assert m_got["tokens"].tolist() == m_want["tokens"].tolist()
    np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=RTOL, atol=0)
    # the validation loss of the last step: each rank evaluates its share of the fixed validation set
    np.testing.assert_allclose(m_got["val_loss"].iloc[-1], m_want["val_loss"].iloc[-1], rtol=RTOL, atol=0)


# ---- the runs (each trained once for the module) -----------------------------------------------------------
@pytest.fixture(scope="module")
def one_micro2(data_dir, tmp_path_factory) -> Path:
    """One process, 8 sequences a step in 4 micro-batches of 2."""
    return train_one_process(data_dir, tmp_path_factory.mktemp("ddp") / "one-micro2",
                             f"schedule.batch_size={BATCH}", "schedule.micro_batch_size=2")


@pytest.fixture(scope="module")
def one_micro4(data_dir, tmp_path_factory) -> Path:
    """One process, 8 sequences a step in 2 micro-batches of 4: the micro-batches are the 2-rank run's rank slices."""
    return train_one_process(data_dir, tmp_path_factory.mktemp("ddp") / "one-micro4",
                             f"schedule.batch_size={BATCH}", "schedule.micro_batch_size=4")


@pytest.fixture(scope="module")
def two_micro2(data_dir, tmp_path_factory) -> Path:
    """Two ranks of 4 sequences, each in 2 micro-batches of 2 (gradient accumulation under DDP's no_sync)."""
    return train_processes(2, data_dir, tmp_path_factory.mktemp("ddp") / "two-micro2",
                           f"schedule.batch_size={BATCH}", "schedule.micro_batch_size=2")


@pytest.fixture(scope="module")
def four_micro2(data_dir, tmp_path_factory) -> Path:
    """Four ranks of one micro-batch of 2 sequences each."""
    return train_processes(4, data_dir, tmp_path_factory.mktemp("ddp") / "four-micro2",
                           f"schedule.batch_size={BATCH}", "schedule.micro_batch_size=2")


# 4 -> 12 sequences in micro-batches of 2: 4, 8, 12, 12 sequences at steps 1-4 (the ramp ends after 8 sequences
# of 32 tokens), multiples of micro-batch x ranks = 4 on two ranks and the same batches in one process
LINEAR = ("schedule=linear", "schedule.batch_size=12", "schedule.micro_batch_size=2", "schedule.start=4",
          "schedule.ramp_tokens=256", "max_steps=4")


@pytest.fixture(scope="module")
def one_linear(data_dir, tmp_path_factory) -> Path:
    return train_one_process(data_dir, tmp_path_factory.mktemp("ddp") / "one-linear", *LINEAR)


@pytest.fixture(scope="module")
def two_linear(data_dir, tmp_path_factory) -> Path:
    return train_processes(2, data_dir, tmp_path_factory.mktemp("ddp") / "two-linear", *LINEAR)


# ---- several processes equal one ------------------------------------------------------------------------------
def test_two_processes_equal_one_process(one_micro2, two_micro2):
    assert_same_losses(two_micro2, one_micro2)
    assert_same_estimates(rows(two_micro2, "per_example"), rows(one_micro2, "per_example"))
    # the same micro-batches of 2 sequences: the one process's 4, or 2 on each rank (the last one's change of the
    # gradient read in the DDP hook, before the all-reduce)
    assert_same_estimates(rows(two_micro2, "microbatch"), rows(one_micro2, "microbatch"))
    assert set(pd.read_parquet(two_micro2 / "gns.parquet")["source"]) == {"per_example", "microbatch", "ddp"}


def test_four_processes_equal_one_process(one_micro2, four_micro2):
    assert_same_losses(four_micro2, one_micro2)
    assert_same_estimates(rows(four_micro2, "per_example"), rows(one_micro2, "per_example"))
    # one micro-batch per rank: no microbatch source (it needs two or more on a rank), the ddp source instead
    assert set(pd.read_parquet(four_micro2 / "gns.parquet")["source"]) == {"per_example", "ddp"}


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_rows_for_every_group_on_every_step(world, two_micro2, four_micro2):
    """Every group on step 1 (DDP's first bucket layout) and steps 2-3 (buckets rebuilt in the order the
    gradients arrived), with b_small = the per-rank batch, and the hook seeing every parameter once."""
    ddp_rows = rows({2: two_micro2, 4: four_micro2}[world], "ddp")
    assert list(ddp_rows.index) == [(g, s) for g in sorted(ALL_GROUPS) for s in range(1, STEPS + 1)]
    assert (ddp_rows["b_small"] == BATCH // world).all() and (ddp_rows["b_big"] == BATCH).all()
    assert np.isfinite(ddp_rows[["sqnorm_big", "sqnorm_small", "gtg", "trsigma"]].to_numpy()).all()
    # the total's squared norms are the sum of the four disjoint groups': no parameter missed or counted twice
    for column in ("sqnorm_small", "sqnorm_big"):
        by_group = ddp_rows[column].unstack("group")
        np.testing.assert_allclose(by_group[list(PARAM_GROUPS)].sum(axis=1), by_group["total"], rtol=RTOL)
    # each rank's local batch is a smaller batch than the global one: E|G_b|² = |G|² + tr(Σ)/b > E|G_B|²
    assert (ddp_rows.loc["total", "sqnorm_small"] > ddp_rows.loc["total", "sqnorm_big"]).all()


def test_ddp_source_equals_one_process_micro_batches_of_the_per_rank_batch(one_micro2, one_micro4, two_micro2,
                                                                            four_micro2):
    """An independent reference for the ddp source: its sqnorm_small is the mean over ranks of |local gradient|²,
    and a rank's local gradient is the gradient of its slice of the batch. A one-process run whose micro-batches
    are those slices logs the same mean as its microbatch source, through another code path (p.grad's change over
    each backward, not DDP's buckets), so the two sources must agree to rounding on every group and step."""
    # 2 ranks x (2 micro-batches of 2) against 2 micro-batches of 4: the hook reads the accumulated local gradient
    assert_same_estimates(rows(two_micro2, "ddp"), rows(one_micro4, "microbatch"))
    # 4 ranks x 1 micro-batch of 2 against 4 micro-batches of 2
    assert_same_estimates(rows(four_micro2, "ddp"), rows(one_micro2, "microbatch"))


def test_linear_schedule_splits_each_step_over_two_processes(one_linear, two_linear):
    batches = metrics(two_linear)["batch_size"]
    assert batches.tolist() == [4, 8, 12, 12] and (batches % (2 * 2) == 0).all()
    assert_same_losses(two_linear, one_linear)
    assert_same_estimates(rows(two_linear, "per_example"), rows(one_linear, "per_example"))
    ddp_rows = rows(two_linear, "ddp")
    assert list(ddp_rows.index) == [(g, s) for g in sorted(ALL_GROUPS) for s in range(1, 5)]
    assert (ddp_rows["b_small"] == ddp_rows["b_big"] // 2).all()
    assert ddp_rows.xs("total", level="group")["b_big"].tolist() == batches.tolist()
    # step 1 runs one micro-batch per rank: no microbatch rows; steps 2-4 the one process's micro-batches
    two_mb, one_mb = rows(two_linear, "microbatch"), rows(one_linear, "microbatch")
    assert sorted(set(two_mb.index.get_level_values("step"))) == [2, 3, 4]
    assert_same_estimates(two_mb, one_mb[one_mb.index.get_level_values("step") >= 2])
    # and at step 1 the ranks' batches of 2 are the one process's micro-batches of 2
    assert_same_estimates(ddp_rows.xs(1, level="step", drop_level=False),
                          one_mb.xs(1, level="step", drop_level=False))


def test_experiment_config_splits_over_one_two_and_four_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = make_cfg("experiment=ddp/tiny")
    assert (cfg.out_dir, cfg.gns.mode, cfg.model.name) == ("outputs/ddp/tiny-2ranks", "ln", "tiny")
    for world in (1, 2, 4):
        validate(cfg, world)  # batch 16 = micro-batch 4 x world x accumulation
    with pytest.raises(ConfigError, match="must be a multiple of schedule.micro_batch_size x world size"):
        validate(cfg, 3)


# ---- figure=ddp ---------------------------------------------------------------------------------------------
def expected_gns(run_dir: Path, alpha: float, guard) -> dict[tuple[str, str], pd.Series]:
    """(source, group) -> the series' smoothed GNS by step, from the whole of the run's gns.parquet."""
    smoothed = smoothed_gns(pd.read_parquet(run_dir / "gns.parquet"), alpha, guard)
    return {key: s.set_index("step")["gns"] for key, s in smoothed.groupby(["source", "group"])}


def assert_values_are_smoothed_gns(values: pd.DataFrame, run_dir: Path, alpha: float, guard) -> None:
    want = expected_gns(run_dir, alpha, guard)
    for group, v in values.groupby("group"):
        np.testing.assert_allclose(v["gns_ddp"], want["ddp", group].loc[v["step"]], rtol=1e-12)
        if ("per_example", group) in want:
            np.testing.assert_allclose(v["gns_reference"], want["per_example", group].loc[v["step"]], rtol=1e-12)
        else:
            assert v["gns_reference"].isna().all()
    np.testing.assert_allclose(values["ratio"], values["gns_ddp"] / values["gns_reference"], rtol=1e-12)


def assert_rendered(paths: list[Path], stem: Path) -> None:
    assert paths == [stem.with_name(stem.name + s) for s in (".png", ".pdf", ".parquet")]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_ddp_figure_from_a_two_process_run(two_micro2, tmp_path):
    alpha = 0.9
    for guard in (True, False):
        stem = tmp_path / f"ddp-guard-{guard}"
        assert_rendered(ddp(two_micro2, stem, alpha=alpha, outlier_guard=guard), stem)
        values = pd.read_parquet(stem.with_suffix(".parquet"))
        assert set(values["group"]) == set(GROUPS) and len(values) == len(GROUPS) * STEPS
        assert (values["b_small_ddp"] == BATCH // 2).all() and (values["source"] == "per_example").all()
        assert_values_are_smoothed_gns(values, two_micro2, alpha, HampelFilter() if guard else None)
    # the drawn curves are those values (non-positive ones left off the log axis)
    fig = draw_ddp(values, alpha, "title")
    curves = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    layernorm = values[values["group"] == "layernorm"]
    np.testing.assert_array_equal(curves["LayerNorm, per-example (B_small = 1)"], positive(layernorm["gns_reference"]))
    np.testing.assert_array_equal(curves["LayerNorm, DDP ranks (per-rank batch of 4)"], positive(layernorm["gns_ddp"]))


def test_ddp_figure_from_a_synthetic_gns_ln_run(tmp_path):
    # ddp rows of b_small 4 out of 8: two ranks; per_example only for the LayerNorms, as gns=ln logs it
    run_dir = write_synthetic_run(tmp_path / "run", steps=120, sources=("per_example", "ddp"), batch_size=8,
                                  micro_batch_size=4)
    g = pd.read_parquet(run_dir / "gns.parquet")
    g = g[(g["source"] == "ddp") | (g["group"] == "layernorm")]
    g.to_parquet(run_dir / "gns.parquet", index=False)
    meta = json.loads((run_dir / "meta.json").read_text())
    (run_dir / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))

    stem = tmp_path / "fig" / "ddp"
    assert_rendered(ddp(run_dir, stem), stem)
    values = pd.read_parquet(stem.with_suffix(".parquet"))
    assert_values_are_smoothed_gns(values, run_dir, 0.99, HampelFilter())
    total = values[values["group"] == "total"]
    assert total["gns_reference"].isna().all() and np.isfinite(total["gns_ddp"]).all()
    # both sources estimate the same true GNS (tests/synthetic_run.py's TRUE_COMPONENTS), so they agree late on
    late = values[(values["group"] == "layernorm") & (values["step"] > 60)]
    assert 0.7 < late["ratio"].median() < 1.3


def test_ddp_figure_refuses_a_run_without_ddp_rows_or_reference(tmp_path):
    one_process = write_synthetic_run(tmp_path / "one", steps=20)
    with pytest.raises(ConfigError, match="has no ddp rows in gns.parquet .*torchrun --nproc_per_node=N"):
        ddp(one_process, tmp_path / "fig")
    two = write_synthetic_run(tmp_path / "two", steps=20, sources=("per_example", "ddp"), micro_batch_size=4)
    with pytest.raises(ConfigError, match="source=ddp: figure=ddp compares the ddp source with one of"):
        ddp(two, tmp_path / "fig", source="ddp")
    with pytest.raises(ConfigError, match="source=microbatch: run .* has no microbatch rows"):
        ddp(two, tmp_path / "fig", source="microbatch")
    with pytest.raises(ConfigError, match="alpha=1.5 must be an EMA smoothing factor"):
        ddp(two, tmp_path / "fig", alpha=1.5)
    assert not list(tmp_path.glob("fig*"))


def test_ddp_figure_is_registered_and_drawn_by_the_cli(tmp_path):
    assert FIGURES["ddp"].function is ddp and FIGURES["ddp"].inputs == "gns_run"
    assert "  ddp " in figures_usage()
    run_dir = write_synthetic_run(tmp_path / "run", steps=40, sources=("per_example", "microbatch", "ddp"),
                                  micro_batch_size=4)
    assert check_inputs("ddp", [str(run_dir)], None) == [run_dir]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "fig" / "ddp"
    r = subprocess.run([sys.executable, "-m", "gnsrepro", "plot", "figure=ddp", f"run={run_dir}", f"out={out}",
                        "alpha=0.95", "source=microbatch"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}.png" in r.stdout
    values = pd.read_parquet(out.with_suffix(".parquet"))
    assert (values["source"] == "microbatch").all()
    want = ddp_values(pd.read_parquet(run_dir / "gns.parquet"), 0.95, "microbatch", HampelFilter())
    pd.testing.assert_frame_equal(values, want)
