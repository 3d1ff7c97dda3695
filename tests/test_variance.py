"""`gnsrepro variance` and `figure=variance`: the Gram matrix against explicit row means, per-example gradients
against the model's own per-example norms and its batch gradient, the resampled estimates on synthetic
Gaussian gradients with known G and Σ against fresh batches, and the command end to end on a tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gnsrepro.figures.variance import variance
from gnsrepro.gns import group_of, gtg_estimate, trsigma_estimate
from gnsrepro.model import GPT, GPTConfig
from gnsrepro.variance import (
    COLUMNS,
    batch_pairs,
    bootstrap_shift,
    gram_matrices,
    mean_sqnorms,
    model_gram_matrices,
    resample_estimates,
    variance_table,
)

REPO = Path(__file__).resolve().parent.parent


# ---- the Gram matrix ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block_rows", [None, 2, 3, 5, 40])
def test_gram_matrices_equal_explicit_products_and_give_exact_mean_sqnorms(block_rows):
    n, rng = 13, np.random.default_rng(0)
    g = rng.normal(size=(n, 30)) + 0.5
    columns = {"a": [slice(0, 10), slice(20, 30)], "b": [slice(10, 20)]}
    computed = []

    def rows(start, stop):
        computed.append((start, stop))
        return torch.from_numpy(g[start:stop])

    K = gram_matrices(rows, n, columns, block_rows)
    for name, slices in columns.items():
        cols = np.concatenate([np.arange(s.start, s.stop) for s in slices])
        np.testing.assert_allclose(K[name], g[:, cols] @ g[:, cols].T, rtol=1e-13, atol=1e-13)
    # every row is computed, never more than block_rows of them at once (a held block and a streamed chunk)
    assert {i for a, b in computed for i in range(a, b)} == set(range(n))
    if block_rows is not None and block_rows < n:
        assert max(b - a for a, b in computed) < block_rows

    # |mean of any multiset of rows|² from K, against the explicit mean; small batches are consecutive groups
    total = K["a"] + K["b"]
    index = rng.integers(0, n, size=(7, 8))  # repeats included: the resamples are drawn with replacement
    big, small = mean_sqnorms(total, index, b_small=2)
    np.testing.assert_allclose(big, [np.sum(g[i].mean(0) ** 2) for i in index], rtol=1e-12)
    np.testing.assert_allclose(small, [np.mean([np.sum(g[i[k:k + 2]].mean(0) ** 2) for k in range(0, 8, 2)])
                                       for i in index], rtol=1e-12)


def test_model_gram_matrices_match_per_example_norms_and_the_batch_gradient():
    from gnsrepro.pegn import instrumented_layers, per_example_sqnorms

    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
    plain, instrumented = GPT(config), GPT(config, layers=instrumented_layers("all"))
    instrumented.load_state_dict(plain.state_dict())
    x, y = torch.randint(0, 64, (6, 16)), torch.randint(0, 64, (6, 16))

    K = model_gram_matrices(plain, x, y, "all", block_rows=4)
    assert list(K) == ["attention", "mlp", "layernorm", "embedding", "total"]
    # the diagonal: each example's |g_b|² per group, from the instrumented layers' independent computation
    sq = per_example_sqnorms(instrumented, x, y, layers="all")
    for group in ("attention", "mlp", "layernorm", "embedding"):
        expected = sum(v.double() for name, v in sq.items() if group_of(name) == group).numpy()
        np.testing.assert_allclose(np.diag(K[group]), expected, rtol=1e-5)
    # the whole matrix: 1ᵀK1 / B² is the squared norm of the batch gradient of the mean loss over all tokens
    plain.zero_grad()
    for p in plain.parameters():
        p.requires_grad_(True)
    plain(x, y)[1].backward()
    batch_sqnorm = sum(float(p.grad.double().square().sum()) for p in plain.parameters())
    np.testing.assert_allclose(K["total"].sum() / 36, batch_sqnorm, rtol=1e-5)
    # params=ln: the LayerNorm group alone, the same numbers
    K_ln = model_gram_matrices(plain, x, y, "ln")
    assert list(K_ln) == ["layernorm"]
    np.testing.assert_allclose(K_ln["layernorm"], K["layernorm"], rtol=1e-5, atol=1e-12)


# ---- resampling on synthetic Gaussian gradients ------------------------------------------------------
def gaussian_gradients(n: int, rng, dim: int = 64) -> tuple[np.ndarray, float, float]:
    """(g, |G|², tr Σ): g_i = G + ε_i, ε_i ~ N(0, Σ) with Σ diagonal, |G|² = 1 and tr Σ = 8 (GNS 8)."""
    G = rng.normal(size=dim)
    G /= np.linalg.norm(G)
    scales = np.exp(rng.normal(size=dim) * 0.5)
    scales *= np.sqrt(8.0 / np.sum(scales**2))
    return G + scales * rng.normal(size=(n, dim)), 1.0, 8.0


def test_resampled_gns_estimates_its_truth_and_its_error_falls_with_b_small():
    rng = np.random.default_rng(1)
    n, resamples = 1024, 2000
    g, gtg_true, trsigma_true = gaussian_gradients(n, rng)
    b_small, b_big = [1, 2, 4, 8], [16, 32, 64]
    table = variance_table({("final", "total"): g @ g.T}, b_small, b_big, resamples, seed=0)
    assert len(table) == len(batch_pairs(b_small, b_big)) == 12

    # the recentred bootstrap's means are the pool's unbiased estimates (eq. A.2 over all n, B_small = 1, i.e.
    # |ḡ|² - tr Σ̂/n and the covariance's trace with 1/(n-1)): within 4 of their Monte Carlo standard errors;
    # the pool's values are the truth's within their sampling error (n = 1024)
    mean = g.mean(0)
    pool_trsigma = float(np.sum((g - mean) ** 2) / (n - 1))
    pool_gtg = float(mean @ mean) - pool_trsigma / n
    mc = np.sqrt(resamples)
    assert np.all(np.abs(table["gtg_mean"] - pool_gtg) < 4 * table["gtg_std"] / mc)
    assert np.all(np.abs(table["trsigma_mean"] - pool_trsigma) < 4 * table["trsigma_std"] / mc)
    assert abs(pool_gtg / gtg_true - 1) < 0.1 and abs(pool_trsigma / trsigma_true - 1) < 0.05
    # the GNS: the ratio of the means within 10% of tr Σ / |G|² = 8; the mean single-step ratio too (it is
    # biased upwards by the noise of its denominator, by about (rel. se of gtg)² ≈ 6% at B_big = 16)
    assert np.all(np.abs(table["gns_of_means"] / (trsigma_true / gtg_true) - 1) < 0.1)
    assert np.all(np.abs(table["gns_mean"] / (trsigma_true / gtg_true) - 1) < 0.2)

    # the paper's claims. One step's error grows with B_small at each B_big (B_small = 1 the lowest) and falls
    # with B_big, about as 1/sqrt(B_big) (x2 from 16 to 64); at the same data (N sequences in N / B_big steps)
    # the order in B_small stays and B_big matters little (in this model 0.031 at 16, 0.025 at 64)
    for column in ("gns_rel_se", "gns_rel_se_same_data"):
        for bb, t in table.groupby("b_big"):
            se = t.sort_values("b_small")[column].to_numpy()
            assert np.all(np.diff(se) > 0), (column, bb, se)
    ones = table[table["b_small"] == 1].set_index("b_big")
    assert ones.loc[16, "gns_rel_se"] / ones.loc[64, "gns_rel_se"] > 1.8
    assert ones["gns_rel_se_same_data"].max() / ones["gns_rel_se_same_data"].min() < 1.4

    # the resampled spread is that of fresh batches: draws with replacement imitate new data even at
    # B_big = N/16 (without replacement they would read low by the finite-population factor)
    fresh_rng = np.random.default_rng(2)
    for bs, bb in [(1, 16), (8, 64)]:
        G_fresh, _, _ = gaussian_gradients(resamples * bb, np.random.default_rng(1))  # the same G and Σ
        fresh = G_fresh[fresh_rng.permutation(resamples * bb)].reshape(resamples, bb, -1)
        sq_big = np.sum(fresh.mean(1) ** 2, -1)
        sq_small = np.sum(fresh.reshape(resamples, bb // bs, bs, -1).mean(2) ** 2, -1).mean(-1)
        gns_fresh = trsigma_estimate(bb, sq_big, bs, sq_small) / gtg_estimate(bb, sq_big, bs, sq_small)
        row = table[(table["b_small"] == bs) & (table["b_big"] == bb)].iloc[0]
        # relative errors: the pool's own GNS is 5% off the truth's, and a std from 2000 draws is known to ~2%
        fresh_rel_se = np.std(gns_fresh, ddof=1) / abs(np.mean(gns_fresh))
        assert abs(row["gns_rel_se"] / fresh_rel_se - 1) < 0.1, (bs, bb, row["gns_rel_se"], fresh_rel_se)


def test_bootstrap_imitates_fresh_batches_where_subsampling_the_pool_reads_low():
    """At B_big = N/2 the resampled batches of one pool overlap: drawn without replacement their spread is about
    sqrt(1 - B_big/N) = 0.71 of fresh batches'; drawn with replacement (gnsrepro.variance) it is a fresh batch's."""
    n, b_big, resamples = 128, 64, 4000
    g, _, _ = gaussian_gradients(n, np.random.default_rng(10))
    bootstrap = variance_table({("final", "total"): g @ g.T}, [1], [b_big], resamples, seed=0)["gns_rel_se"].iloc[0]
    rng = np.random.default_rng(11)
    without = resample_estimates(g @ g.T, np.stack([rng.permutation(n)[:b_big] for _ in range(resamples)]), 1)["gns"]
    fresh_g, _, _ = gaussian_gradients(resamples * b_big, np.random.default_rng(10))  # the same G and Σ
    fresh = fresh_g.reshape(resamples, b_big, -1)
    sq_big, sq_small = np.sum(fresh.mean(1) ** 2, -1), np.sum(fresh**2, -1).mean(-1)
    gns_fresh = trsigma_estimate(b_big, sq_big, 1, sq_small) / gtg_estimate(b_big, sq_big, 1, sq_small)

    def rel_se(x):
        return np.std(x, ddof=1) / abs(np.mean(x))

    # measured: 0.118 (bootstrap), 0.106 (fresh), 0.089 (without replacement); the bootstrap's own error is of
    # order GNS / N (its spread of |G|² comes from the pool's |ḡ|², which exceeds |G|² by about tr Σ / N)
    assert abs(bootstrap / rel_se(gns_fresh) - 1) < 0.15
    assert rel_se(without) / rel_se(gns_fresh) < 0.9


def test_resample_estimates_are_the_estimators_of_the_resampled_norms():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(20, 5)) + 1.0
    index = rng.integers(0, 20, size=(4, 8))
    e = resample_estimates(g @ g.T, index, b_small=4, recenter=False)
    big = np.sum(g[index].mean(1) ** 2, -1)
    small = np.mean([np.sum(g[index[:, k:k + 4]].mean(1) ** 2, -1) for k in (0, 4)], axis=0)
    np.testing.assert_allclose(e["gtg"], gtg_estimate(8, big, 4, small), rtol=1e-12)
    np.testing.assert_allclose(e["trsigma"], trsigma_estimate(8, big, 4, small), rtol=1e-12)
    np.testing.assert_allclose(e["gns"], e["trsigma"] / e["gtg"], rtol=1e-12)
    # recentred: moved by c, where |ḡ|² - c and tr Σ̂ + c are the estimators over the whole pool (B_big = 20)
    c = bootstrap_shift(g @ g.T)
    mean_sq, sq_mean = float(np.sum(g.mean(0) ** 2)), float(np.mean(np.sum(g**2, 1)))
    assert mean_sq - c == pytest.approx(gtg_estimate(20, mean_sq, 1, sq_mean), rel=1e-12)
    assert sq_mean - mean_sq + c == pytest.approx(trsigma_estimate(20, mean_sq, 1, sq_mean), rel=1e-12)
    moved = resample_estimates(g @ g.T, index, b_small=4)
    np.testing.assert_allclose(moved["gtg"], e["gtg"] - c, rtol=1e-12)
    np.testing.assert_allclose(moved["trsigma"], e["trsigma"] + c, rtol=1e-12)


# ---- the command and the figure, end to end ------------------------------------------------------------
def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gnsrepro", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory) -> Path:
    """A tiny run of 3 steps (the real vocabulary: the data's token ids need it; short sequences)."""
    from hydra import compose, initialize_config_dir

    from gnsrepro.cli import conf_dir
    from gnsrepro.config import register_configs
    from gnsrepro.train import train

    out = tmp_path_factory.mktemp("variance") / "run"
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=tiny", "data=pycode", f"data.data_dir={data_dir}", "data.max_bytes=1500000", f"out_dir={out}",
            "seq_len=16", "schedule.batch_size=4", "schedule.micro_batch_size=4", "max_steps=3", "eval_interval=0",
            "log_interval=1", "seed=5"])
    train(cfg)
    return out


def test_init_point_is_the_model_that_training_starts_from(tiny_run, data_dir, tmp_path):
    """The rebuilt initialisation (seed, then GPT) is the model gnsrepro.train.open_run builds before step 1."""
    from omegaconf import OmegaConf

    from gnsrepro.train import open_run
    from gnsrepro.variance import _model_at, _Plan

    cfg = OmegaConf.load(tiny_run / "config.yaml")
    cfg.out_dir, cfg.resume = str(tmp_path / "fresh"), False
    started = open_run(cfg).parts.raw_model.state_dict()
    plan = _Plan(tiny_run, cfg, ["init"], torch.device("cpu"), Path(data_dir) / "pycode", 16, 0, None)
    rebuilt = _model_at(plan, "init")[0].state_dict()
    assert started.keys() == rebuilt.keys()
    assert all(torch.equal(started[k], rebuilt[k]) for k in started)


def test_command_writes_the_table_and_the_figure_renders_it(tiny_run, tmp_path):
    r = run_cli(["variance", f"run={tiny_run}", "examples=16", "resamples=50", "b_small=1,2,4", "b_big=8,16",
                 "memory_gb=0.05"])  # 0.05 GB holds 3 of the 13 MB gradients: the held-and-streamed path
    assert r.returncode == 0, r.stderr
    assert "rows held at once" in r.stdout and "wrote" in r.stdout
    table = pd.read_parquet(tiny_run / "variance.parquet")
    assert list(table.columns) == list(COLUMNS)
    assert set(table["point"]) == {"init", "final"}
    assert set(table["group"]) == {"attention", "mlp", "layernorm", "embedding", "total"}
    assert sorted(set(zip(table["b_small"], table["b_big"]))) == [(1, 8), (1, 16), (2, 8), (2, 16), (4, 8), (4, 16)]
    final = table[table["point"] == "final"]
    assert set(final["step"]) == {3} and set(final["tokens"]) == {3 * 4 * 16}
    assert set(table.loc[table["point"] == "init", "step"]) == {0}
    assert np.all(table["gtg_std"] > 0) and np.all(table["trsigma_std"] > 0)
    np.testing.assert_allclose(table["gns_rel_se"], table["gns_std"] / table["gns_mean"].abs())
    # the groups' estimates add up to the total's (squared norms add over disjoint parameter sets)
    parts = table[table["group"] != "total"].groupby(["point", "b_small", "b_big"])[["gtg_mean", "trsigma_mean"]].sum()
    total = table[table["group"] == "total"].set_index(["point", "b_small", "b_big"])[["gtg_mean", "trsigma_mean"]]
    pd.testing.assert_frame_equal(parts.sort_index(), total.sort_index(), rtol=1e-9)

    paths = variance(tiny_run, tmp_path / "variance")
    for suffix in (".png", ".pdf", ".parquet"):
        assert (tmp_path / f"variance{suffix}") in paths and (tmp_path / f"variance{suffix}").stat().st_size > 1000
    plotted = pd.read_parquet(tmp_path / "variance.parquet")
    assert set(plotted["group"]) == {"total"} and len(plotted) == 12

    r = run_cli(["plot", "figure=variance", f"run={tiny_run}", f"out={tmp_path / 'cli'}"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli.png").is_file()


@pytest.mark.parametrize("args, message", [
    ([], "run= is not set"),
    (["run=/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    (["b_big=16,512"], "b_big=512 is more than examples=256"),
    (["b_small=1,3", "b_big=16"], "b_big=16 is not a multiple of b_small=3"),
    (["b_small=16", "b_big=16"], "make no pair with b_small < b_big"),
    (["params=mlp"], "params=mlp is not known; accepted: all"),
    (["points=[init,middle]"], "points=['init', 'middle'] must be a list of distinct points"),
    (["memory_gb=0.001"], "memory_gb=0.001 holds fewer than 2 per-example gradients"),
    (["examples=1"], "examples=1 must be an integer of at least 2"),
])
def test_bad_settings_stop_with_one_line_before_any_work(tiny_run, args, message):
    args = args if any(a.startswith("run=") for a in args) or not args else [f"run={tiny_run}", *args]
    before = sorted(p.name for p in tiny_run.iterdir())
    r = run_cli(["variance", *args])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gnsrepro variance: error: ") and message in lines[0], r.stderr
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_missing_checkpoint_and_missing_table_are_one_line_errors(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "no-ckpt"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("ckpt.pt", "variance.parquet"))
    r = run_cli(["variance", f"run={copy}"])
    assert r.returncode == 2 and "has no ckpt.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(["plot", "figure=variance", f"run={copy}", f"out={tmp_path / 'x'}"])
    assert r.returncode == 2 and "has no variance.parquet; `gnsrepro variance run=" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_a_checkpoint_of_another_model_is_a_one_line_error(tiny_run, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    copy = tmp_path / "other-model"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("variance.parquet"))
    cfg = OmegaConf.load(copy / "config.yaml")
    cfg.model.n_layer = 3
    (copy / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    r = run_cli(["variance", f"run={copy}"])
    assert r.returncode == 2 and "holds another model than" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (copy / "variance.parquet").exists()


def test_the_figure_keeps_every_drawn_point_inside_its_axes():
    """Hollow points (the same-data estimate whose mean |G|² is within 3 standard errors of 0) can be far above the
    filled ones; the shared y scale covers them, so none is drawn off the panel."""
    import matplotlib

    matplotlib.use("Agg")
    from gnsrepro.figures.variance import draw_variance

    rows = []
    for point, scale in (("init", 1.0), ("final", 30.0)):
        for b_small in (1, 2):
            for b_big in (8, 16):
                noisy = point == "final"  # every final point unusable: one step's left out, the same data hollow
                rows.append({"point": point, "group": "total", "b_small": b_small, "b_big": b_big, "step": 0,
                             "tokens": 0, "examples": 64, "resamples": 10, "gns_of_means": 1.0,
                             "gns_rel_se": 0.1 * b_small * scale, "gns_rel_se_same_data": 0.05 * b_small * scale,
                             "step_usable": not noisy, "same_data_usable": not noisy})
    fig = draw_variance(pd.DataFrame(rows), "test")
    drawn = 0
    for ax in fig.axes:
        low, high = ax.get_ylim()
        for line in ax.get_lines():
            for y in line.get_ydata():
                drawn += 1
                assert low <= y <= high, (ax.get_title(), y, (low, high))
    assert drawn >= 16  # the init rows' filled points and the final rows' hollow ones
