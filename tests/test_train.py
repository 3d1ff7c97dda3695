"""The training loop end to end on CPU: configs, errors, logs, resume after a kill, DDP equivalence."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.errors import ConfigError, DivergedError
from gnsrepro.logs import ParquetLog
from gnsrepro.model import GPT
from gnsrepro.train import gpt_config, lr_at, train

REPO = Path(__file__).resolve().parent.parent
CONF = Path(conf_dir())
METRIC_COLUMNS = ["step", "tokens", "batch_size", "lr", "loss", "val_loss", "grad_norm", "schedule_gns", "step_time_s",
                  "tokens_per_s", "mfu"]  # README, "Logs"
GNS_COLUMNS = ["step", "tokens", "group", "source", "b_big", "b_small", "sqnorm_big", "sqnorm_small", "gtg", "trsigma"]


def make_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["model=tiny", "data=pycode", f"data.data_dir={data_dir}", "data.max_bytes=1500000", f"out_dir={out}",
            "seq_len=32", "schedule.batch_size=8", "schedule.micro_batch_size=4", "optim.lr=3e-3",
            "eval_batches=2", "log_interval=5", *extra]


def run_cli(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "gnsrepro", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600, **kw)


# ---- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_named_model_sizes_within_two_percent(name):
    cfg = make_cfg(f"model={name}")
    if name == "tiny":
        pytest.skip("tiny is not named by a parameter count")
    nominal = float(name[:-1]) * {"M": 1e6, "B": 1e9}[name[-1]]
    with torch.device("meta"):
        n = GPT(gpt_config(cfg.model)).num_params()
    assert abs(n / nominal - 1) < 0.02, f"{name}: {n / 1e6:.2f}M parameters"


@pytest.mark.parametrize("choice", [f"experiment={p.relative_to(CONF / 'experiment').with_suffix('').as_posix()}"
                                    for p in sorted((CONF / "experiment").rglob("*.yaml"))
                                    if p.parent.name != "flashattn"]  # not training runs: tests/test_flashattn.py
                         + [f"scale={p.stem}" for p in (CONF / "scale").glob("*.yaml")])
def test_every_experiment_and_scale_composes_and_runs_two_steps(choice, data_dir, tmp_path):
    from gnsrepro.train import validate

    cfg = make_cfg(choice)
    validate(cfg)  # the real settings are valid
    # two CPU steps of the same recipe (its batch schedule too), shrunk to the tiny model
    # (16 tokens a sequence: the recipe's batches of sequences are kept, each step's compute is halved)
    shrink = tiny(data_dir, tmp_path / "run", "max_steps=2", "compile=false", "data.name=pycode", "seq_len=16")
    small = make_cfg(choice, *[o for o in shrink if not o.startswith("schedule.")])
    out = train(small)
    assert len(pd.read_parquet(out / "metrics.parquet")) == 2


def test_typo_fails_at_compose():
    with pytest.raises(Exception, match="n_layr"):
        make_cfg("model.n_layr=3")


# ---- bad settings: one line before any work ---------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.batch_size=10", "schedule.batch_size=10 must be a multiple of schedule.micro_batch_size"),
        ("seq_len=4096", "seq_len=4096 is longer than the model's context model.block_size=128"),
        ("optim.lr=0", "optim.lr=0.0 must be a positive number"),
        ("optim.lr=-1e-3", "must be a positive number"),
        ("max_steps=0", "max_steps=0 must be a positive integer"),
        ("max_steps=null", "set max_steps=N or max_tokens=N"),
        ("data.name=imagenet", "data='imagenet' is not known; accepted: pycode, openwebtext, textdir"),
        ("gns.mode=some", "gns='some' is not known; accepted: off, ln, all"),
        ("data=textdir", "data=textdir needs data.path=DIR"),
        ("gns=ln schedule.batch_size=1 schedule.micro_batch_size=1", "gns=ln needs schedule.batch_size >= 2"),
        ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
        ("model.vocab_size=100", "model.vocab_size=100 must be >= 50257"),
        ("optim.beta2=1.0", "optim.beta2=1.0 must be in [0, 1)"),
        ("optim.eps=-1", "optim.eps=-1.0 must be > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
        ("optim.warmup_tokens=100 optim.decay_tokens=50", "optim.decay_tokens=50 must be > optim.warmup_tokens=100"),
        ("seed=-1", "seed=-1 must be >= 0"),
        ("gns.chunk_size=-1", "gns.chunk_size=-1 must be >= 0"),
    ],
)
def test_bad_setting_is_rejected_before_any_work(override, message, tmp_path):
    paths = f"data.data_dir={tmp_path / 'nodata'}", f"out_dir={tmp_path / 'run'}"
    cfg = make_cfg("max_steps=5", *paths, *override.split())
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg)
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "run").exists()


def test_multirun_gives_each_job_its_own_run(data_dir, tmp_path):
    args = [a for a in tiny(data_dir, tmp_path, "max_steps=2", "eval_interval=0")
            if not a.startswith(("out_dir=", "optim.lr="))]
    r = run_cli(["train", "-m", "optim.lr=1e-3,3e-3", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    for job, lr in enumerate((1e-3, 3e-3)):
        run = tmp_path / "sweep" / str(job)
        assert pd.read_parquet(run / "metrics.parquet")["step"].tolist() == [1, 2]
        assert f"lr: {lr}" in (run / "config.yaml").read_text()


def test_triton_backend_on_a_cpu_is_rejected_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = make_cfg("max_steps=5", f"data.data_dir={tmp_path / 'nodata'}", "device=cpu", "gns=ln",
                   "gns.ln_backend=triton")
    with pytest.raises(ConfigError, match="gns.ln_backend=triton needs a CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "nodata").exists()


def test_cli_error_is_one_line(tmp_path):
    r = run_cli(["train", "schedule.batch_size=10", "max_steps=3", f"out_dir={tmp_path}/run"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gnsrepro train: error: schedule.batch_size=10 must be a multiple of schedule.micro_batch_size x world size "
        "= 8 x 1 = 8"
    ]


def test_cli_unknown_model_names_the_options(tmp_path):
    r = run_cli(["train", "model=bogus", "max_steps=3"])
    assert r.returncode != 0 and "model/bogus" in r.stderr and "111M" in r.stderr


def test_missing_data_without_prepare_prints_the_command(tmp_path):
    cfg = make_cfg(*tiny(tmp_path / "empty", tmp_path / "run", "max_steps=2", "prepare_missing=false"))
    from gnsrepro.data.prepare import DataError

    with pytest.raises(DataError, match="gnsrepro prepare data=pycode"):
        train(cfg)


# ---- schedule and logs -------------------------------------------------------------------------------
def test_lr_warmup_then_linear_decay_to_a_tenth():
    o = make_cfg("optim.lr=1.0", "optim.warmup_tokens=100", "optim.decay_tokens=1100").optim
    assert lr_at(0, o, 10**9) == pytest.approx(1 / 101)
    assert lr_at(99, o, 10**9) == pytest.approx(100 / 101)
    assert lr_at(100, o, 10**9) == pytest.approx(1.0)
    assert lr_at(600, o, 10**9) == pytest.approx(0.55)
    assert lr_at(1100, o, 10**9) == pytest.approx(0.1)
    assert lr_at(5000, o, 10**9) == pytest.approx(0.1)


def test_parquet_log_drops_rows_after_the_resumed_step(tmp_path):
    log = ParquetLog(tmp_path / "m.parquet")
    log.append([{"step": s, "loss": float(s)} for s in range(1, 8)])
    log.flush()
    resumed = ParquetLog(tmp_path / "m.parquet", resume_step=5)
    assert pd.read_parquet(tmp_path / "m.parquet")["step"].tolist() == [1, 2, 3, 4, 5]
    resumed.append([{"step": 6, "loss": 6.5}])
    resumed.flush()
    assert pd.read_parquet(tmp_path / "m.parquet")["loss"].tolist() == [1, 2, 3, 4, 5, 6.5]


# ---- end to end -------------------------------------------------------------------------------------
def test_cli_tiny_run_logs_schema_and_falling_loss(data_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(["train", *tiny(data_dir, out, "max_steps=40", "gns=all", "eval_interval=20")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parameters" in r.stdout and "tok/s" in r.stdout and "gns" in r.stdout
    m = pd.read_parquet(out / "metrics.parquet")
    assert list(m.columns) == METRIC_COLUMNS
    assert m["step"].tolist() == list(range(1, 41))
    assert m["tokens"].iloc[-1] == 40 * 8 * 32
    assert m["loss"].head(5).mean() > m["loss"].tail(5).mean() + 0.5
    assert m["val_loss"].notna().sum() == 2
    g = pd.read_parquet(out / "gns.parquet")
    assert list(g.columns) == GNS_COLUMNS
    assert set(g["source"]) == {"per_example", "microbatch"}
    for source in ("per_example", "microbatch"):
        assert set(g[g.source == source]["group"]) == {"attention", "mlp", "layernorm", "embedding", "total"}
    assert len(g) == 40 * 10
    pe = g[g.source == "per_example"]
    assert (pe["b_small"] == 1).all() and (pe["b_big"] == 8).all()
    assert (g[g.source == "microbatch"]["b_small"] == 4).all()
    # per-example mean |g_b|² exceeds the batch gradient's |G_B|² (E|g_b|² = |G|² + trΣ)
    assert (pe["sqnorm_small"] > pe["sqnorm_big"]).mean() > 0.9
    # the total is the sum of the groups
    wide = pe.pivot(index="step", columns="group", values="sqnorm_small")
    parts = wide[["attention", "mlp", "layernorm", "embedding"]].sum(axis=1)
    assert (parts - wide["total"]).abs().max() <= 1e-5 * wide["total"].abs().max()
    for name in ("config.yaml", "meta.json", "ckpt.pt"):
        assert (out / name).exists()
    assert json.loads((out / "meta.json").read_text())["cuda_graphs"] is False  # a CPU never captures


def _read(out: Path):
    return pd.read_parquet(out / "metrics.parquet"), pd.read_parquet(out / "gns.parquet")


@pytest.fixture
def one_thread():
    """One torch thread, as in a subprocess with OMP_NUM_THREADS=1: a CPU matmul's rounding depends on how many
    threads split it, and the |G|² estimate (a difference of close numbers) magnifies that past a tolerance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_after_a_kill_equals_the_uninterrupted_run(data_dir, tmp_path, one_thread):
    args = ["max_steps=24", "checkpoint_interval=8", "log_interval=1", "gns=ln", "eval_interval=0"]
    ref = tmp_path / "ref"
    train(make_cfg(*tiny(data_dir, ref, *args)))

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gnsrepro", "train", *tiny(data_dir, out, *args)], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:  # kill it between two checkpoints, with rows logged after the last one
        while time.time() < deadline:
            try:
                steps = pd.read_parquet(out / "metrics.parquet")["step"]
                if steps.max() >= 11 and (out / "ckpt.pt").exists():
                    break
            except (FileNotFoundError, OSError, ValueError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    killed_at = pd.read_parquet(out / "metrics.parquet")["step"].max()
    assert 11 <= killed_at < 24, "the run was not killed mid-way"

    train(make_cfg(*tiny(data_dir, out, *args, "resume=true")))
    (m_ref, g_ref), (m, g) = _read(ref), _read(out)
    assert m["step"].tolist() == list(range(1, 25))
    pd.testing.assert_series_equal(m["loss"], m_ref["loss"], rtol=1e-6)
    pd.testing.assert_frame_equal(g.drop(columns=[]).reset_index(drop=True), g_ref.reset_index(drop=True), rtol=1e-5)


def test_the_loop_waits_for_the_device_before_every_pause_it_leaves_out_of_the_step_time(data_dir, tmp_path,
                                                                                          monkeypatch):
    """Step times leave out evaluation, logging and checkpoints, and the host runs ahead of the GPU (CUDA graphs:
    a whole interval ahead), so the loop waits for the device right before each pause: an interval's summed step
    times then cover its steps' device time. Here the waits are recorded where the pauses fall."""
    import gnsrepro.train as training

    waited, step = [], training.step
    calls = {"n": 0}

    def counted(*args):
        calls["n"] += 1
        return step(*args)

    monkeypatch.setattr(training, "step", counted)
    monkeypatch.setattr(training, "_wait_for", lambda device: waited.append(calls["n"]))
    train(make_cfg(*tiny(data_dir, tmp_path / "run", "max_steps=13", "log_interval=3", "eval_interval=5",
                         "checkpoint_interval=4")))
    assert waited == [3, 4, 5, 6, 8, 9, 10, 12, 13]  # log 3 6 9 12, eval 5 10, checkpoint 4 8 12, the end 13


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_cfg(*tiny(data_dir, out, "max_steps=12", "checkpoint_interval=4", "log_interval=2", "eval_interval=0"))
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, return_logits=True):
        logits, loss = forward(self, idx, targets, return_logits)
        calls["n"] += 1
        if loss is not None and calls["n"] > 2 * 5:  # from step 6 on (2 micro-batches a step)
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(DivergedError, match="not finite at step 6; stopping .the last checkpoint is kept"):
        train(cfg)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # step 5, after the checkpoint and before the bad step, is logged (in the interval 5-6 it stops in)
    assert pd.read_parquet(out / "metrics.parquet")["step"].tolist() == [1, 2, 3, 4, 5]


def test_interrupt_logs_every_finished_step_then_resume_continues(data_dir, tmp_path, monkeypatch):
    """Ctrl-C mid-run: the finished steps not yet flushed are logged; resume=true with the run's directory
    alone takes the run's settings from its config.yaml and ends where the uninterrupted run ends."""
    import gnsrepro.train as T

    args = ["max_steps=9", "checkpoint_interval=3", "log_interval=4", "gns=all", "eval_interval=0"]
    ref = train(make_cfg(*tiny(data_dir, tmp_path / "ref", *args)))
    out = tmp_path / "run"
    real_lr_at = T.lr_at

    def interrupt_at_step_8(tokens, o, total):
        if tokens >= 7 * 8 * 32:  # the 8th step's learning rate
            raise KeyboardInterrupt
        return real_lr_at(tokens, o, total)

    monkeypatch.setattr(T, "lr_at", interrupt_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*tiny(data_dir, out, *args)))
    monkeypatch.setattr(T, "lr_at", real_lr_at)
    assert pd.read_parquet(out / "metrics.parquet")["step"].max() == 7  # log_interval 4: step 7 was pending
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 6

    given = [f"out_dir={out}", "resume=true"]
    train(make_cfg(*given), overrides=given)
    (m_ref, g_ref), (m, g) = _read(ref), _read(out)
    assert m["step"].tolist() == list(range(1, 10))
    pd.testing.assert_series_equal(m["loss"], m_ref["loss"], rtol=1e-6)
    pd.testing.assert_frame_equal(g.reset_index(drop=True), g_ref.reset_index(drop=True), rtol=1e-5)
    assert (out / "meta.json").exists() and (out / "meta-resumed-at-6.json").exists()

    # another model cannot continue the run; a longer run with a lower learning rate can, and says so
    with pytest.raises(ConfigError, match=r"model.n_layer=3 \(the run's: 2\): the model, data"):
        train(make_cfg(*given, "model.n_layer=3"), overrides=[*given, "model.n_layer=3"])
    more = [*given, "max_steps=11", "optim.lr=1e-3"]
    train(make_cfg(*more), overrides=more)
    m = pd.read_parquet(out / "metrics.parquet")
    tokens_per_step = 8 * 32
    assert m["step"].max() == 11
    assert m["lr"].iloc[9] == pytest.approx(lr_at(9 * tokens_per_step, make_cfg("optim.lr=1e-3").optim,
                                                  11 * tokens_per_step))
    meta = json.loads((out / "meta-resumed-at-9.json").read_text())
    assert meta["changed_settings"] == {"optim.lr": {"before": 3e-3, "after": 1e-3}}


@pytest.mark.slow
def test_two_process_gloo_ddp_equals_one_process(data_dir, tmp_path):
    args = ["max_steps=6", "gns=all", "eval_interval=3", "schedule.batch_size=8", "schedule.micro_batch_size=2"]
    one = tmp_path / "one"
    train(make_cfg(*tiny(data_dir, one, *args)))
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "gnsrepro", "train", *tiny(data_dir, two, *args)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (m1, g1), (m2, g2) = _read(one), _read(two)
    pd.testing.assert_series_equal(m1["loss"], m2["loss"], rtol=1e-5)
    pd.testing.assert_series_equal(m1["val_loss"], m2["val_loss"], rtol=1e-5)
    # the per-example sums and the big-batch norms do not depend on how the batch is split
    key = ["step", "source", "group"]
    pe1 = g1[g1.source == "per_example"].set_index(key).sort_index()
    pe2 = g2[g2.source == "per_example"].set_index(key).sort_index()
    pd.testing.assert_frame_equal(pe1[["b_big", "b_small"]], pe2[["b_big", "b_small"]])
    pd.testing.assert_series_equal(pe1["sqnorm_small"], pe2["sqnorm_small"], rtol=1e-4)
    pd.testing.assert_series_equal(pe1["sqnorm_big"], pe2["sqnorm_big"], rtol=1e-4)
    # two ranks add the ddp source: B_small = 4 sequences per rank
    ddp = g2[g2.source == "ddp"]
    assert len(ddp) == 6 * 5 and (ddp["b_small"] == 4).all() and (ddp["b_big"] == 8).all()
    assert set(g2["source"]) == {"per_example", "microbatch", "ddp"}
    assert all(math.isfinite(v) for v in ddp["sqnorm_small"])


def test_per_layer_rows_sum_to_their_groups(data_dir, tmp_path):
    out = train(make_cfg(*tiny(data_dir, tmp_path / "run", "max_steps=3", "gns=all", "gns.per_layer=true")))
    g = pd.read_parquet(out / "gns.parquet")
    pe = g[(g.source == "per_example") & (g.step == 3)].set_index("group")
    names = [n for n in pe.index if n.startswith("transformer.")]
    model = GPT(gpt_config(make_cfg("model=tiny").model))
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    ln = [n for n in names if ".ln_" in n]
    assert pe.loc[ln, "sqnorm_small"].sum() == pytest.approx(pe.loc["layernorm", "sqnorm_small"], rel=1e-5)
    assert pe.loc[names, "sqnorm_big"].sum() == pytest.approx(pe.loc["total", "sqnorm_big"], rel=1e-5)


# ---- nothing lost, nothing mislabelled ----------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_is_not_overwritten_nor_resumed_with_defaults(data_dir, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(*tiny(data_dir, out, "max_steps=3", "gns=ln", "optim.lr=2e-3")))
    (out / "ckpt.pt").unlink()  # as if killed before its first checkpoint
    config = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make_cfg(*tiny(data_dir, out, "max_steps=3")))
    assert (out / "config.yaml").read_text() == config
    # resume=true without a checkpoint: the run's own settings (gns=ln, lr 2e-3), not the command line's defaults
    cfg = make_cfg("model=tiny", f"out_dir={out}", "resume=true")
    train(cfg, overrides=["model=tiny", f"out_dir={out}", "resume=true"])
    g = pd.read_parquet(out / "gns.parquet")
    assert set(g.group) >= {"layernorm"} and "per_example" in set(g.source)
    m = pd.read_parquet(out / "metrics.parquet")
    assert m.step.tolist() == [1, 2, 3] and (out / "ckpt.pt").exists()


def test_resume_refuses_token_files_other_than_those_it_trained_on(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        words = " ".join(f"word{(i * 7 + j) % 97}" for j in range(400))
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: {words}")
    data = tmp_path / "data"
    args = ["model=tiny", "data=textdir", f"data.path={corpus}", f"data.data_dir={data}", "seq_len=16",
            "schedule.batch_size=4", "schedule.micro_batch_size=4", "eval_batches=1", "log_interval=1",
            f"out_dir={tmp_path / 'run'}"]
    train(make_cfg(*args, "max_steps=2"))
    (corpus / "doc03.txt").write_text("the same settings, other text " * 200)
    from gnsrepro.config import DataConfig
    from gnsrepro.data.prepare import prepare

    prepare(DataConfig(name="textdir", path=str(corpus), data_dir=str(data), num_proc=1))  # rebuilt in place
    with pytest.raises(ConfigError, match="trained on other token files"):
        train(make_cfg(*args, "max_steps=4", "resume=true"), overrides=["max_steps=4", "resume=true"])


def test_resuming_a_finished_run_changes_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny(data_dir, out, "max_steps=3")
    train(make_cfg(*args))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a new default run_name (the time) and a group override, as `make reproduce` passes
    train(make_cfg(*args, "resume=true", "run_name=other"), overrides=["scale=tiny", "resume=true"])
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before
