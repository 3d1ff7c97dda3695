"""`gnsrepro bench overhead` and `bench train` on CPU with the tiny model: variants, interleaved rounds, checks."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import gnsrepro.benchmarks.train as B
from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.errors import ConfigError

CPU_VARIANTS = ["off", "ln torch", "all simultaneous", "all ghost"]  # ln triton needs CUDA


def bench_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(Path(conf_dir())), version_base="1.3"):
        return compose("bench", overrides=["target=overhead", "model=tiny", "device=cpu", "compile=false",
                                           "seq_len=16", "micro_batch_size=2", "warmup=1", *overrides])


@pytest.fixture
def timed_calls(monkeypatch):
    """(variant label, steps) of every _timed call, in order."""
    labels, calls = {}, []
    prepare, timed = B._prepare, B._timed

    def _prepare(cfg, g, device):
        step, drain, model = prepare(cfg, g, device)
        key = (g.mode, g.method, g.ln_backend)
        labels[id(step)] = next(label for label, *spec in B.OVERHEAD_VARIANTS if tuple(spec) == key)
        return step, drain, model

    def _timed(step, drain, n, device):
        calls.append((labels[id(step)], n))
        return timed(step, drain, n, device)

    monkeypatch.setattr(B, "_prepare", _prepare)
    monkeypatch.setattr(B, "_timed", _timed)
    return calls


def test_overhead_interleaves_the_variants_in_rotated_rounds(timed_calls, capsys):
    results = B.bench_overhead(bench_cfg("steps=4", "rounds=2"))
    assert [r["variant"] for r in results] == CPU_VARIANTS
    assert all(r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in results)
    # round 0 in the listed order, round 1 starting from the second variant; 2 steps each time
    assert timed_calls == [(v, 2) for v in CPU_VARIANTS + CPU_VARIANTS[1:] + CPU_VARIANTS[:1]]
    out = capsys.readouterr().out
    assert "median of 4 steps per variant after 1, in 2 interleaved rounds" in out
    assert out.count("built and warmed up") == 4 and out.count("of gns=off") == 4


def test_overhead_one_round_runs_the_variants_one_after_another(timed_calls, capsys):
    results = B.bench_overhead(bench_cfg("steps=3", "rounds=1"))
    assert [r["variant"] for r in results] == CPU_VARIANTS
    assert timed_calls == [(v, 3) for v in CPU_VARIANTS]
    assert "interleaved" not in capsys.readouterr().out


def test_overhead_rounds_checked_before_any_compute(timed_calls):
    with pytest.raises(ConfigError, match=r"rounds=5: accepts 1 to steps=4"):
        B.bench_overhead(bench_cfg("steps=4", "rounds=5"))
    with pytest.raises(ConfigError, match=r"rounds=0: accepts 1 to steps=4"):
        B.bench_overhead(bench_cfg("steps=4", "rounds=0"))
    assert timed_calls == []


def test_train_times_the_configured_model(capsys):
    cfg = bench_cfg("target=train", "steps=2")
    r = B.bench_train(cfg)
    assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_time_s"])
    assert "bench train: model tiny | seq_len 16 | micro-batch 2 | compile False | gns=off" in capsys.readouterr().out


def test_overhead_writes_its_table_when_asked(tmp_path, capsys):
    import pandas as pd

    from gnsrepro.benchmarks import run_benchmark

    out = tmp_path / "bench" / "overhead.parquet"
    run_benchmark(bench_cfg("steps=2", "rounds=1", f"out={out}"))
    df = pd.read_parquet(out)
    assert df.variant.tolist() == CPU_VARIANTS and df.relative_step_time.iloc[0] == 1.0
    assert (df.relative_step_time == df.step_time_s / df.step_time_s.iloc[0]).all()
    assert set(df.model) == {"tiny"} and set(df.device) == {"cpu"}
