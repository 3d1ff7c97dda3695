"""figure=ratio and figure=lrsweep: the plotted numbers on synthetic runs with known answers, their refusals,
and the ratio/ and lrsweep/ experiment configs (each composes, the header's sweep names every run, and no two
runs share an out_dir)."""

from __future__ import annotations

import math
import re
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from synthetic_run import write_synthetic_run

from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.errors import ConfigError
from gnsrepro.figures import FIGURES, run_plot
from gnsrepro.figures.lrsweep import approx_params, draw_lrsweep, lrsweep
from gnsrepro.figures.ratio import draw_ratio, ratio, token_matched_alphas
from gnsrepro.gns import HampelFilter, gns_from_components

CONF = Path(conf_dir())
SEQ_LEN = 32
TOKENS = 96 * 4 * SEQ_LEN  # every synthetic ratio run sees the same tokens: 96 steps of 4 sequences, 12 of 32


def set_config(run: Path, **settings) -> Path:
    """Rewrite keys of a synthetic run's config.yaml, e.g. set_config(run, **{"optim.lr": 1e-3})."""
    config = OmegaConf.load(run / "config.yaml")
    for key, value in settings.items():
        OmegaConf.update(config, key, value)
    OmegaConf.save(config, run / "config.yaml")
    return run


def ratio_run(root: Path, batch: int, lr: float, seed: int = 0, **kw) -> Path:
    run = write_synthetic_run(root / f"bs{batch}-lr{lr:g}", steps=TOKENS // (batch * SEQ_LEN), seed=seed,
                              batch_size=batch, micro_batch_size=2, seq_len=SEQ_LEN, **kw)
    return set_config(run, **{"optim.lr": lr, "seed": seed})


# (B, η): a baseline, η/B held fixed with both halved and doubled, and η alone and B alone doubled
RATIO_RUNS = [(8, 2e-3), (4, 1e-3), (16, 4e-3), (8, 4e-3), (16, 2e-3)]


@pytest.fixture(scope="module")
def ratio_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ratio")
    return [ratio_run(root, b, lr, seed=i) for i, (b, lr) in enumerate(RATIO_RUNS)]


def test_token_matched_alphas_forget_at_one_rate_per_token():
    alphas = token_matched_alphas([16, 4, 8, 4], 0.99)
    assert alphas == pytest.approx({4: 0.99, 8: 0.99**2, 16: 0.99**4}, rel=1e-15)
    # after T tokens every batch's EMA has aged its first step by the same factor
    for b, a in alphas.items():
        assert a ** (TOKENS / b) == pytest.approx(0.99 ** (TOKENS / 4), rel=1e-12)
    assert token_matched_alphas([8, 8], 0.95) == {8: 0.95}


@pytest.mark.parametrize("outlier_guard", [False, True])
def test_ratio_plots_gns_from_components_at_the_token_matched_alpha(ratio_runs, tmp_path, outlier_guard):
    alpha = 0.95
    paths = ratio(ratio_runs, tmp_path / "ratio", alpha=alpha, outlier_guard=outlier_guard)
    for suffix in (".png", ".pdf", ".parquet"):
        path = tmp_path / f"ratio{suffix}"
        assert path in paths and path.stat().st_size > 1000
    values = pd.read_parquet(tmp_path / "ratio.parquet")
    assert set(values["source"]) == {"per_example"}  # gns=all: the per-example rows log layernorm and total
    assert set(values["group"]) == {"layernorm", "total"}
    for run, (b, lr) in zip(ratio_runs, RATIO_RUNS):
        gns = pd.read_parquet(run / "gns.parquet")
        for group in ("layernorm", "total"):
            rows = gns[(gns["source"] == "per_example") & (gns["group"] == group)].sort_values("step")
            expected = gns_from_components(rows["gtg"], rows["trsigma"], alpha ** (b / 4),
                                           guard=HampelFilter() if outlier_guard else None).to_numpy()
            got = values[(values["run"] == str(run)) & (values["group"] == group)].sort_values("step")
            np.testing.assert_allclose(got["gns"], expected, rtol=1e-12)
            np.testing.assert_array_equal(got["tokens"], rows["tokens"])
            assert (got["batch_size"] == b).all() and np.allclose(got["lr"], lr)
            assert np.allclose(got["lr_over_batch"], lr / b) and np.allclose(got["alpha"], alpha ** (b / 4))
            assert got["last"].tolist() == [False] * (len(got) - 1) + [True]
        # the legend's final validation loss: the run's last logged one
        final = pd.read_parquet(run / "metrics.parquet")["val_loss"].dropna().iloc[-1]
        assert np.allclose(values.loc[values["run"] == str(run), "val_loss"], final)


def test_ratio_draws_those_numbers_coloured_by_ratio_and_styled_by_batch(ratio_runs, tmp_path):
    ratio(ratio_runs, tmp_path / "ratio", alpha=0.9, outlier_guard=False)
    values = pd.read_parquet(tmp_path / "ratio.parquet")
    fig = draw_ratio(values, 0.9, "t")
    ax = next(a for a in fig.axes if a.get_title() == "LayerNorm GNS over training")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert len(lines) == len(RATIO_RUNS)
    by_setting = {}
    for run, (b, lr) in zip(ratio_runs, RATIO_RUNS):
        label = next(k for k in lines if k.startswith(f"B={b}, η={lr:.0e} (η/B=".replace("e-0", "e-")))
        assert label.endswith(f"final val loss {values.loc[values['run'] == str(run), 'val_loss'].iloc[0]:.2f}")
        line = lines[label]
        v = values[(values["run"] == str(run)) & (values["group"] == "layernorm")].sort_values("step")
        np.testing.assert_allclose(line.get_ydata(), v["gns"].where(v["gns"] > 0))
        np.testing.assert_array_equal(line.get_xdata(), v["tokens"])
        by_setting[(b, lr)] = line
    same_ratio = [by_setting[k] for k in [(8, 2e-3), (4, 1e-3), (16, 4e-3)]]
    assert len({line.get_color() for line in same_ratio}) == 1
    assert by_setting[(8, 4e-3)].get_color() != by_setting[(8, 2e-3)].get_color() != by_setting[(16, 2e-3)].get_color()
    assert by_setting[(16, 2e-3)].get_linestyle() == by_setting[(16, 4e-3)].get_linestyle()
    assert by_setting[(8, 2e-3)].get_linestyle() != by_setting[(16, 2e-3)].get_linestyle()

    # the end-of-run panel: each run's last smoothed GNS at its learning rate
    end = next(a for a in fig.axes if a.get_title().startswith("GNS at the end"))
    points = {(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in end.get_lines()
              if line.get_marker() not in ("None", None, "") and len(line.get_xdata()) == 1}
    last = values[values["last"]]
    assert points == {(float(r["lr"]), float(r["gns"])) for _, r in last.iterrows()}


def test_ratio_refuses_a_batch_schedule_a_gns_off_run_and_duplicates(ratio_runs, tmp_path):
    linear = ratio_run(tmp_path, 8, 1e-3, schedule="linear")
    with pytest.raises(ConfigError, match="figure=ratio compares runs of a fixed batch size; run .* has "
                                          "schedule.name=linear"):
        ratio([ratio_runs[0], linear], tmp_path / "fig")
    off = ratio_run(tmp_path / "off", 8, 1e-3, write_gns=False)
    with pytest.raises(ConfigError, match=r"has no gns.parquet \(a gns=off run logs none\)"):
        ratio([ratio_runs[0], off], tmp_path / "fig")
    other = set_config(ratio_run(tmp_path / "other", 8, 1e-3), **{"model.n_embd": 128})
    with pytest.raises(ConfigError, match="figure=ratio compares runs of one model and seq_len; runs .* differ"):
        ratio([ratio_runs[0], other], tmp_path / "fig")
    twin = ratio_run(tmp_path / "twin", 8, 2e-3, seed=0)
    with pytest.raises(ConfigError, match="both have schedule.batch_size=8 optim.lr=0.002 seed=0"):
        ratio([ratio_runs[0], twin], tmp_path / "fig")
    with pytest.raises(ConfigError, match=r"alpha=1.0 must be an EMA smoothing factor in \[0, 1\)"):
        ratio(ratio_runs, tmp_path / "fig", alpha=1.0)
    assert not list(tmp_path.glob("fig.*"))


def test_ratio_through_gnsrepro_plot(ratio_runs, tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("plot", overrides=["figure=ratio", f"run=[{','.join(map(str, ratio_runs))}]", "alpha=0.9",
                                         "source=microbatch", f"out={tmp_path / 'r'}"])
    assert FIGURES["ratio"].inputs == "runs" and FIGURES["lrsweep"].inputs == "runs"
    paths = run_plot(cfg)
    assert tmp_path / "r.png" in paths
    values = pd.read_parquet(tmp_path / "r.parquet")
    assert set(values["source"]) == {"microbatch"}
    assert np.allclose(values.groupby("batch_size")["alpha"].first(), [0.9, 0.9**2, 0.9**4])


# ---- lrsweep -------------------------------------------------------------------------------------------
# (model name, n_layer, n_embd, the learning rate of the lowest loss); the final validation loss of a run is
# 3 + width-dependent offset + (log10 lr - log10 best)², so the true argmin over the swept rates is known
MODELS = [("tiny", 2, 32, 1e-2), ("tiny", 2, 64, 3e-3), ("wide", 4, 128, 1e-3)]
LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def true_loss(n_embd: int, lr: float, best: float) -> float:
    return 3.0 + 64 / n_embd + (math.log10(lr) - math.log10(best)) ** 2


def sweep_run(root: Path, name: str, n_layer: int, n_embd: int, lr: float, loss: float, steps: int = 20) -> Path:
    run = write_synthetic_run(root / f"{name}-d{n_embd}-lr{lr:g}", steps=steps, write_gns=False)
    set_config(run, **{"model.name": name, "model.n_layer": n_layer, "model.n_embd": n_embd, "optim.lr": lr})
    metrics = pd.read_parquet(run / "metrics.parquet")
    # an earlier, lower validation loss must not count: the final one is the last logged
    metrics["val_loss"] = np.nan
    metrics.loc[metrics.index[len(metrics) // 2], "val_loss"] = loss - 1.0
    metrics.loc[metrics.index[-1], "val_loss"] = loss
    metrics.to_parquet(run / "metrics.parquet", index=False)
    return run


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("lrsweep")
    return [sweep_run(root, name, n_layer, d, lr, true_loss(d, lr, best))
            for (name, n_layer, d, best), lr in product(MODELS, LRS)]


def test_lrsweep_marks_the_true_argmin_of_each_model(sweep_runs, tmp_path):
    paths = lrsweep(sweep_runs[::-1], tmp_path / "lrsweep")  # the order given does not matter
    for suffix in (".png", ".pdf", ".parquet"):
        assert tmp_path / f"lrsweep{suffix}" in paths and (tmp_path / f"lrsweep{suffix}").stat().st_size > 1000
    values = pd.read_parquet(tmp_path / "lrsweep.parquet")
    assert len(values) == len(MODELS) * len(LRS) and values["finished"].all()
    # models ordered by size, each by learning rate
    assert values["n_embd"].tolist() == [d for _, _, d, _ in MODELS for _ in LRS]
    assert values["lr"].tolist() == LRS * len(MODELS)
    fig = draw_lrsweep(values, "t")
    ax = fig.axes[0]
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert len(stars) == len(MODELS)
    for (name, n_layer, d, best), star in zip(MODELS, stars):
        v = values[values["n_embd"] == d]
        np.testing.assert_allclose(v["val_loss"], [true_loss(d, lr, best) for lr in LRS], rtol=1e-12)
        optimum = v[v["optimum"]]
        assert len(optimum) == 1 and optimum["lr"].iloc[0] == best
        assert optimum["model"].iloc[0].startswith(f"{name} ({n_layer} layers, 2 heads, d={d}, ")
        assert (float(star.get_xdata()[0]), float(star.get_ydata()[0])) == (best, true_loss(d, best, best))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("d=32" in t and "best η=0.01, val loss 5.000" in t for t in legend)


def test_lrsweep_leaves_a_stopped_run_and_one_without_val_loss_out_of_the_optimum(sweep_runs, tmp_path):
    # a run that stopped before its max_steps (a non-finite loss) with the lowest last validation loss of all
    stopped = sweep_run(tmp_path, "tiny", 2, 64, 1e-1, loss=1.0)
    set_config(stopped, max_steps=40)
    never = sweep_run(tmp_path, "tiny", 2, 64, 1e-4, loss=0.5)
    metrics = pd.read_parquet(never / "metrics.parquet").assign(val_loss=np.nan)
    metrics.to_parquet(never / "metrics.parquet", index=False)
    runs = [r for r in sweep_runs if "-d64-" in r.name] + [stopped, never]
    lrsweep(runs, tmp_path / "fig")
    values = pd.read_parquet(tmp_path / "fig.parquet").set_index("lr")
    assert not values.loc[1e-1, "finished"] and values.loc[1e-1, "val_loss"] == 1.0
    assert math.isnan(values.loc[1e-4, "val_loss"])
    assert values.index[values["optimum"]].tolist() == [3e-3]


def test_lrsweep_refuses_two_runs_of_one_model_and_lr(sweep_runs, tmp_path):
    twin = sweep_run(tmp_path, "tiny", 2, 32, 1e-3, loss=4.0)
    with pytest.raises(ConfigError, match=r"both model tiny \(2 layers, 2 heads, d=32, .*\) at optim.lr=0.001; give "):
        lrsweep([sweep_runs[1], twin], tmp_path / "fig")
    assert not (tmp_path / "fig.png").exists()


def test_approx_params_is_within_one_percent_of_the_models_count():
    import torch

    from gnsrepro.model import GPT, GPTConfig

    for n_layer, n_head, n_embd, block in [(2, 2, 32, 128), (2, 2, 64, 128), (9, 4, 256, 1024)]:
        with torch.device("meta"):
            n = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block)).num_params()
        model = {"n_layer": n_layer, "n_embd": n_embd, "vocab_size": 50304, "block_size": block}
        assert abs(approx_params(model) / n - 1) < 0.01


# ---- the experiment configs -----------------------------------------------------------------------------
def make_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def header_sweep(path: Path) -> list[str]:
    """The `gnsrepro train -m ...` command of a config's header comment, as its override strings."""
    line = next(line for line in path.read_text().splitlines() if "gnsrepro train -m" in line)
    command = line.split("gnsrepro train -m", 1)[1].strip().rstrip("\\").split()
    # a continued line (torchrun's) carries on in the next comment line
    lines = path.read_text().splitlines()
    i = lines.index(line)
    while lines[i].rstrip().endswith("\\"):
        i += 1
        command += lines[i].lstrip("# ").rstrip("\\").split()
    return command


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of Hydra's basic sweeper for these overrides: the product of the comma lists."""
    keys, choices = zip(*[(o.split("=", 1)[0], o.split("=", 1)[1].split(",")) for o in overrides])
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in product(*choices)]


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_ratio_header_runs_every_file_with_its_own_out_dir(scale):
    from gnsrepro.train import validate

    base = CONF / "experiment" / "ratio" / f"{scale}.yaml"
    overrides = header_sweep(base)
    assert len(overrides) == 1 and overrides[0].startswith("experiment=")
    named = set(overrides[0].split("=", 1)[1].split(","))
    files = {f"ratio/{p.stem}" for p in base.parent.glob(f"{scale}*.yaml")}
    assert named == files
    settings = {}
    for job in sweep_jobs(overrides):
        cfg = make_cfg(*job)
        validate(cfg)
        assert cfg.gns.mode == "all" and cfg.schedule.name == "constant" and cfg.schedule.micro_batch_size == (
            8 if scale == "tiny" else 16)
        b, lr = cfg.schedule.batch_size, cfg.optim.lr
        assert cfg.out_dir == f"outputs/ratio/{scale}/bs{b}-lr{lr}"
        # the file's name says its settings
        stem = job[0].split("/", 1)[1]
        if stem != scale:
            assert stem == f"{scale}_b{b}_lr{lr:.0e}".replace("e-0", "e-")
        settings[(b, lr)] = (cfg.max_tokens, cfg.optim.warmup_tokens, cfg.seed)
    assert len(settings) == 5 and len(set(settings.values())) == 1  # one budget, warm-up and seed for all
    ratios = {b: lr / b for b, lr in settings}
    by_ratio = {}
    for (b, lr) in settings:
        by_ratio.setdefault(lr / b, []).append((b, lr))
    assert max(len(v) for v in by_ratio.values()) == 3, ratios  # three runs at one η/B
    lrs_at = {b: {lr for bb, lr in settings if bb == b} for b, _ in settings}
    bs_at = {lr: {b for b, ll in settings if ll == lr} for _, lr in settings}
    assert any(len(v) >= 2 for v in lrs_at.values()) and any(len(v) >= 2 for v in bs_at.values())


@pytest.mark.parametrize("scale, n_jobs", [("tiny", 12), ("small", 15), ("paper", 15)])
def test_lrsweep_header_sweep_composes_with_distinct_out_dirs(scale, n_jobs):
    from gnsrepro.train import validate

    path = CONF / "experiment" / "lrsweep" / f"{scale}.yaml"
    overrides = [o for o in header_sweep(path) if not o.startswith("schedule.micro_batch_size")]
    jobs = sweep_jobs(overrides)
    assert len(jobs) == n_jobs
    out_dirs = set()
    models = set()
    for job in jobs:
        cfg = make_cfg(*job)
        validate(cfg)
        assert cfg.gns.mode == "off"
        assert cfg.out_dir.startswith(f"outputs/lrsweep/{scale}/{cfg.model.name}-") and cfg.out_dir.endswith(
            f"-lr{cfg.optim.lr}")
        out_dirs.add(cfg.out_dir)
        models.add((cfg.model.name, cfg.model.n_layer, cfg.model.n_embd))
    assert len(out_dirs) == n_jobs and len(models) == 3
    if scale == "paper":
        assert {m[0] for m in models} == {"70M", "111M", "161M"}
        assert cfg.max_tokens == 2_219_950_080 and list(cfg.model.cosine_attn_blocks) == [0]
        assert re.search(r"schedule.micro_batch_size=15", path.read_text())
