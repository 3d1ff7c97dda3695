"""`gnsrepro bench overhead` and `bench train` on CPU with the tiny model: variants, interleaved rounds, checks."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import gnsrepro.benchmarks.train as B
from gnsrepro.cli import conf_dir
from gnsrepro.config import register_configs
from gnsrepro.errors import ConfigError

CPU_VARIANTS = ["off", "ln torch", "all simultaneous", "all ghost"]  # the other five: CUDA only


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
        key = (g.mode, g.method, g.ln_backend, g.linear_backend, cfg.model.loss_kernel, cfg.model.sdpa_backend,
               g.chunk_mb)
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


def test_overhead_times_the_named_variants_and_gns_off_first(timed_calls, capsys):
    from gnsrepro.cli import bracket_list_overrides

    argv = bracket_list_overrides(["variants=all simultaneous,ln torch", "steps=2", "rounds=1"], "bench")
    assert argv[0] == "variants=['all simultaneous','ln torch']"
    results = B.bench_overhead(bench_cfg(*argv))
    assert [r["variant"] for r in results] == ["off", "ln torch", "all simultaneous"]  # the table's order
    assert timed_calls == [("off", 2), ("ln torch", 2), ("all simultaneous", 2)]
    header, row = capsys.readouterr().out.splitlines()[-2:]
    assert header.split()[5:] == ["off", "ms", "MFU", "ln", "torch", "all", "simultaneous", "auto"]
    off = results[0]["step_time_s"]
    assert row.split()[-3:] == [f"{results[1]['step_time_s'] / off:.3f}x", f"{results[2]['step_time_s'] / off:.3f}x",
                                "torch"]


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


# ---- bench overhead over situations: lists, the table, the parquet, OOM --------------------------------
def test_the_lists_expand_to_every_situation_in_order():
    cfg = bench_cfg("models=[tiny,20M,tiny]", "micro_batch_sizes=[1,2]", "compiles=[false,true]")
    got = [(s.model.name, s.micro_batch_size, s.compile) for s in B.situations(cfg)]
    assert got == [(m, b, c) for m in ("tiny", "20M") for b in (1, 2) for c in (False, True)]  # repeats dropped
    s = B.situations(cfg)[4]
    # the model is conf/model/20M.yaml's shape, and the situation's own lists are emptied
    assert (s.model.n_layer, s.model.n_embd, s.model.block_size) == (9, 256, 1024)
    assert list(s.models) == list(s.micro_batch_sizes) == list(s.compiles) == []
    # empty lists: the single model= / micro_batch_size= / compile=
    single = B.situations(bench_cfg("micro_batch_size=3"))
    assert [(s.model.name, s.micro_batch_size, s.compile) for s in single] == [("tiny", 3, False)]


def test_the_cli_brackets_the_bench_lists():
    from gnsrepro.cli import bracket_list_overrides

    argv = bracket_list_overrides(["overhead", "models=20M,1.3B", "micro_batch_sizes=16,64", "compiles=true,false",
                                   "micro_batch_size=8"], "bench")
    assert argv == ["overhead", "models=['20M','1.3B']", "micro_batch_sizes=[16,64]", "compiles=[true,false]",
                    "micro_batch_size=8"]
    cfg = bench_cfg(*argv[1:])
    assert list(cfg.models) == ["20M", "1.3B"] and list(cfg.micro_batch_sizes) == [16, 64]
    assert list(cfg.compiles) == [True, False]


@pytest.mark.parametrize(("overrides", "message"), [
    (["models=[tiny,111m]"], r"^models=111m is not known \(no conf/model/111m.yaml\); accepted: 1.3B, 111M, .*tiny$"),
    (["micro_batch_sizes=[2,0]"], r"^micro_batch_sizes=0: accepts positive integers"),
    (["micro_batch_size=0"], r"^micro_batch_size=0: accepts positive integers"),
    (["models=[20M,tiny]", "seq_len=512"], r"^seq_len=512 is longer than model tiny's context model.block_size=128$"),
    (["record=true"], r"^record=true writes .* needs a CUDA GPU"),
    (["variants=[ln,off]"], r"^variants: 'ln' is not a variant; accepted: off, ln torch, ln triton, all "),
])
def test_bad_situations_are_refused_before_any_work(overrides, message, monkeypatch, capsys):
    monkeypatch.setattr(B, "time_overhead", lambda cfg, device: pytest.fail("timed a situation"))
    with pytest.raises(ConfigError, match=message):
        B.bench_overhead(bench_cfg(*overrides))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("overrides", [["models=[tiny]"], ["compiles=[true]"], ["record=true"]])
def test_train_refuses_the_overhead_settings(overrides):
    from gnsrepro.benchmarks import check_bench_settings

    with pytest.raises(ConfigError, match=r"bench train"):
        check_bench_settings(bench_cfg("target=train", *overrides))


def fake_times(cfg, device):
    """time_overhead's results, made up: gns=off takes micro_batch_size ms, each variant k (k/10 + 1) times that;
    the 20M model at micro-batch 2 runs out of GPU memory."""
    if cfg.model.name == "20M" and cfg.micro_batch_size == 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    off = 1e-3 * cfg.micro_batch_size
    return [{"variant": v, "step_time_s": off * (1 + k / 10), "tokens_per_s": 1.0, "mfu": 0.25 if cfg.compile else
             float("nan")} for k, v in enumerate(CPU_VARIANTS)]


PARQUET_COLUMNS = ["model", "n_embd", "seq_len", "micro_batch_size", "compile", "cuda_graphs", "variant", "status",
                   "step_time_s", "tokens_per_s", "mfu", "relative_step_time", "steps", "warmup", "rounds",
                   "ln_backend_auto", "device", "torch", "triton", "date", "git_commit", "git_dirty"]


def test_overhead_prints_the_whole_table_and_writes_every_row(monkeypatch, tmp_path, capsys):
    import pandas as pd

    from gnsrepro.benchmarks import run_benchmark

    monkeypatch.setattr(B, "time_overhead", fake_times)
    out = tmp_path / "overhead.parquet"
    run_benchmark(bench_cfg("models=[tiny,20M]", "micro_batch_sizes=[1,2]", "compiles=[false,true]", "steps=4",
                            "rounds=2", "seq_len=null", f"out={out}"))  # seq_len: each model's context
    printed = capsys.readouterr().out
    assert "bench overhead [1/8]: model tiny | seq_len 128 | micro-batch 1 | compile False | cuda_graphs False |" in (
        printed)
    assert "bench overhead [8/8]: model 20M | seq_len 1024 | micro-batch 2 | compile True | cuda_graphs False |" in (
        printed)
    table = printed[printed.index("8 situation(s)"):].splitlines()[1:]
    assert table[0].split() == ["model", "seq_len", "micro", "compile", "cuda_graphs", "off", "ms", "MFU", "ln",
                                "torch", "all", "simultaneous", "all", "ghost", "auto"]
    assert table[1].split() == ["tiny", "128", "1", "False", "False", "1.0", "-", "1.100x", "1.200x", "1.300x", "torch"]
    assert table[4].split() == ["tiny", "128", "2", "True", "False", "2.0", "25.0%", "1.100x", "1.200x", "1.300x",
                                "torch"]
    assert table[7].split()[:6] == ["20M", "1024", "2", "False", "False", "OOM"] and table[9].startswith("wrote ")
    assert printed.count("OOM: model 20M at micro-batch 2 does not fit") == 2  # compile false and true

    df = pd.read_parquet(out)
    assert list(df.columns) == PARQUET_COLUMNS and len(df) == 8 * len(CPU_VARIANTS)
    ok = df[df.status == "ok"]
    assert (ok.relative_step_time == ok.step_time_s / ok.micro_batch_size / 1e-3).all()  # off = micro ms
    oom = df[df.status == "OOM"]
    assert set(zip(oom.model, oom.micro_batch_size)) == {("20M", 2)} and oom.step_time_s.isna().all()
    assert len(oom) == 2 * len(CPU_VARIANTS) and list(oom.variant[:4]) == CPU_VARIANTS
    assert set(df.n_embd[df.model == "20M"]) == {256} and set(df.seq_len[df.model == "20M"]) == {1024}
    assert set(df.ln_backend_auto) == {"torch"} and set(df.device) == {"cpu"}  # auto off CUDA: torch
    assert not df.cuda_graphs.any()  # cuda_graphs=false (and a CPU never captures)
    assert (df.steps == 4).all() and (df.rounds == 2).all() and df.date.str.fullmatch(r"\d{4}-\d\d-\d\d").all()


def test_overhead_raises_errors_other_than_out_of_memory(monkeypatch):
    def broken(cfg, device):
        raise RuntimeError("a bug")

    monkeypatch.setattr(B, "time_overhead", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        B.bench_overhead(bench_cfg())


def test_out_of_memory_is_found_through_the_errors_that_wrap_it():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except RuntimeError as inner:
            raise ValueError("backend compiler failed") from inner
    except ValueError as wrapped:
        assert B._is_oom(wrapped)
    assert not B._is_oom(ValueError("backend compiler failed")) and not B._is_oom(None)


# ---- gns.ln_backend=auto by recorded measurement -------------------------------------------------------------
SYNTHETIC_TABLE = """\
device,compile,cuda_graphs,n_embd,micro_batch_size,seq_len,torch_ms,triton_ms,faster,date,commit,command
NVIDIA H200,True,False,256,16,1024,15.0,30.0,torch,2026-12-01,abc1234,synthetic
NVIDIA H200,True,False,768,16,2048,64.0,63.0,triton,2026-12-01,abc1234,synthetic
NVIDIA H200,True,False,768,64,2048,250.0,260.0,torch,2026-12-01,abc1234,synthetic
NVIDIA H200,False,False,256,16,1024,40.0,30.0,triton,2026-12-01,abc1234,synthetic
NVIDIA H100 80GB HBM3,False,False,768,16,2048,100.0,110.0,torch,2026-12-01,abc1234,synthetic
NVIDIA H200,True,True,256,16,1024,9.7,9.6,triton,2026-12-01,abc1234,synthetic graphed
NVIDIA H200,True,True,256,64,1024,34.2,34.8,torch,2026-12-01,abc1234,synthetic graphed
NVIDIA H200,True,True,768,16,2048,70.0,71.0,torch,2026-12-01,abc1234,synthetic graphed
"""
SYNTHETIC_ROWS = 8


@pytest.fixture
def on_gpu(monkeypatch, tmp_path):
    """resolve_ln_backend(device=cuda) against SYNTHETIC_TABLE, as if on the GPU named by set_name()."""
    import gnsrepro.kernels.ln_backend as L

    table = tmp_path / "ln_backend.csv"
    table.write_text(SYNTHETIC_TABLE)
    monkeypatch.setattr(L, "LN_BACKEND_TABLE", table)
    name = {"gpu": "NVIDIA H200"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name["gpu"])

    def set_name(gpu):
        name["gpu"] = gpu

    return set_name


def auto(device="cuda", **situation):
    from gnsrepro.config import GNSConfig
    from gnsrepro.train import resolve_ln_backend

    return resolve_ln_backend(GNSConfig(mode="ln", ln_backend="auto"), torch.device(device), **situation)


def test_auto_picks_the_faster_backend_of_the_nearest_recorded_situation(on_gpu):
    assert auto(n_embd=768, compile=True, micro_batch_size=16) == "triton"  # exact row
    assert auto(n_embd=768, compile=True, micro_batch_size=64) == "torch"  # exact row, other micro-batch
    assert auto(n_embd=256, compile=True, micro_batch_size=16) == "torch"
    # nearest width on a log scale: 448 is nearer 768 (ratio 1.71) than 256 (1.75); 384 nearer 256 (1.5 < 2)
    assert auto(n_embd=448, compile=True, micro_batch_size=16) == "triton"
    assert auto(n_embd=384, compile=True, micro_batch_size=16) == "torch"
    assert auto(n_embd=2048, compile=True, micro_batch_size=8) == "triton"  # width 768, then micro-batch 16
    assert auto(n_embd=768, compile=True, micro_batch_size=48) == "torch"  # width 768, then micro-batch 64
    # the compile mode is respected: eager rows only
    assert auto(n_embd=256, compile=False, micro_batch_size=16) == "triton"
    # the exact GPU first: eager at width 768 was measured on an H100 (torch), at 256 on an H200 (triton)
    on_gpu("NVIDIA H100 80GB HBM3")
    assert auto(n_embd=256, compile=False, micro_batch_size=16) == "torch"
    # an H100 PCIe: the H100 rows; compiled there are none, so the H200's (one family, sm90)
    on_gpu("NVIDIA H100 PCIe")
    assert auto(n_embd=256, compile=False, micro_batch_size=16) == "torch"
    assert auto(n_embd=256, compile=True, micro_batch_size=16) == "torch"
    assert auto(n_embd=768, compile=True, micro_batch_size=16) == "triton"


def test_auto_without_a_row_for_the_family_is_triton_and_on_a_cpu_torch(on_gpu):
    from gnsrepro.config import GNSConfig
    from gnsrepro.train import ln_backend_choice

    on_gpu("NVIDIA A100-SXM4-80GB")
    assert auto(n_embd=256, compile=True, micro_batch_size=16) == "triton"
    backend, why = ln_backend_choice(GNSConfig(ln_backend="auto"), torch.device("cuda"), 256, True, 16)
    assert backend == "triton" and "no compiled measurement without CUDA graphs for NVIDIA A100-SXM4-80GB (A100)" in why
    backend, why = ln_backend_choice(GNSConfig(ln_backend="auto"), torch.device("cuda"), 256, True, 16, True)
    assert backend == "triton" and why == ("auto: no compiled measurement for NVIDIA A100-SXM4-80GB (A100) in "
                                           "ln_backend.csv, with or without CUDA graphs: triton")
    assert auto("cpu", n_embd=256, compile=True, micro_batch_size=16) == "torch"
    on_gpu("NVIDIA H200")
    # a set backend is kept whatever the table says
    assert ln_backend_choice(GNSConfig(ln_backend="torch"), torch.device("cuda"), 768, True, 16)[0] == "torch"


def test_build_model_passes_the_situation_to_the_backend_choice(monkeypatch):
    import gnsrepro.train as T
    from gnsrepro.config import GNSConfig, ModelConfig

    calls = []

    def resolve(g, device, **situation):
        calls.append(situation)
        return "torch"

    monkeypatch.setattr(T, "resolve_ln_backend", resolve)
    model, _ = T.build_model(ModelConfig(vocab_size=64), GNSConfig(mode="ln"), torch.device("cpu"), compile=True,
                             micro_batch_size=4)
    assert calls == [{"n_embd": 64, "compile": True, "micro_batch_size": 4, "cuda_graphs": False}]
    assert all(m.backend == "torch" for m in model.modules() if hasattr(m, "backend"))
    T.build_model(ModelConfig(vocab_size=64), GNSConfig(mode="ln"), torch.device("cpu"), micro_batch_size=4,
                  cuda_graphs=True)
    assert calls[1] == {"n_embd": 64, "compile": False, "micro_batch_size": 4, "cuda_graphs": True}


def test_a_graphed_step_reads_the_graphed_rows_only(on_gpu):
    from gnsrepro.config import GNSConfig
    from gnsrepro.train import ln_backend_choice

    # SYNTHETIC_TABLE's graphed rows answer the opposite of the rows without graphs at 256/16 and 768/16
    assert auto(n_embd=256, compile=True, micro_batch_size=16, cuda_graphs=True) == "triton"
    assert auto(n_embd=256, compile=True, micro_batch_size=16, cuda_graphs=False) == "torch"
    assert auto(n_embd=768, compile=True, micro_batch_size=16, cuda_graphs=True) == "torch"
    assert auto(n_embd=768, compile=True, micro_batch_size=16, cuda_graphs=False) == "triton"
    assert auto(n_embd=256, compile=True, micro_batch_size=64, cuda_graphs=True) == "torch"
    # nearest width, then micro-batch, among the graphed rows alone: 768/64 has a row without graphs (torch) but
    # the graphed rows at 768 are at 16; 256/24 is nearer 16 (ratio 1.5) than 64 (2.67)
    assert auto(n_embd=256, compile=True, micro_batch_size=24, cuda_graphs=True) == "triton"
    assert auto(n_embd=448, compile=True, micro_batch_size=16, cuda_graphs=True) == "torch"  # 768 is nearer
    assert auto(n_embd=384, compile=True, micro_batch_size=16, cuda_graphs=True) == "triton"  # 256 is nearer
    backend, why = ln_backend_choice(GNSConfig(ln_backend="auto"), torch.device("cuda"), 768, True, 16, True)
    assert backend == "torch" and why == ("auto: compiled measurement with CUDA graphs on NVIDIA H200 at n_embd 768, "
                                          "micro-batch 16, seq_len 2048 (2026-12-01): torch 70.0 ms, triton 71.0 ms")
    why = ln_backend_choice(GNSConfig(ln_backend="auto"), torch.device("cuda"), 768, True, 16, False)[1]
    assert why.startswith("auto: compiled measurement without CUDA graphs on NVIDIA H200 at n_embd 768")
    # an H100 has no compiled rows of its own: its family's graphed rows (the H200's), no fallback
    on_gpu("NVIDIA H100 PCIe")
    backend, why = ln_backend_choice(GNSConfig(ln_backend="auto"), torch.device("cuda"), 256, True, 16, True)
    assert backend == "triton" and why.startswith("auto: compiled measurement with CUDA graphs on NVIDIA H200")


def test_a_graphed_step_without_graphed_rows_takes_those_without_and_says_so(on_gpu):
    import pandas as pd

    import gnsrepro.kernels.ln_backend as L

    # eager: the table has no graphed rows, so the eager rows without graphs (the exact GPU's first)
    assert auto(n_embd=256, compile=False, micro_batch_size=16, cuda_graphs=True) == "triton"
    on_gpu("NVIDIA H100 80GB HBM3")
    backend, why = L.choose_ln_backend("NVIDIA H100 80GB HBM3", False, 768, 16, cuda_graphs=True)
    assert backend == "torch" and why == (
        "no eager measurement with CUDA graphs for NVIDIA H100 80GB HBM3 (sm90) in ln_backend.csv, so one without: "
        "eager measurement without CUDA graphs on NVIDIA H100 80GB HBM3 at n_embd 768, micro-batch 16, seq_len 2048 "
        "(2026-12-01): torch 100.0 ms, triton 110.0 ms")
    # no fallback the other way: a step without graphs never reads a graphed row
    table = pd.read_csv(L.LN_BACKEND_TABLE)
    graphed_only = table[table.cuda_graphs]
    assert L.choose_ln_backend("NVIDIA H200", True, 768, 16, graphed_only, cuda_graphs=True)[0] == "torch"
    backend, why = L.choose_ln_backend("NVIDIA H200", True, 768, 16, graphed_only, cuda_graphs=False)
    assert (backend, why) == ("triton", "no compiled measurement without CUDA graphs for NVIDIA H200 (sm90) in "
                                        "ln_backend.csv: triton")


def test_build_step_tells_the_choice_whether_the_step_is_graphed(monkeypatch):
    import gnsrepro.cuda_graphs
    import gnsrepro.train as T
    from gnsrepro.config import GNSConfig, ModelConfig, OptimConfig

    calls = []

    def resolve(g, device, **situation):
        calls.append(situation["cuda_graphs"])
        return "torch"

    monkeypatch.setattr(T, "resolve_ln_backend", resolve)
    monkeypatch.setattr(gnsrepro.cuda_graphs, "GraphedStep", lambda parts: "graphed")  # capture needs a GPU
    m, g = ModelConfig(vocab_size=64), GNSConfig(mode="ln")
    plain = T.build_step(m, g, OptimConfig(), torch.device("cpu"), torch.float32, micro_batch_size=2)
    graphed = T.build_step(m, g, OptimConfig(), torch.device("cpu"), torch.float32, micro_batch_size=2,
                           cuda_graphs=True)
    assert calls == [False, True] and plain.graphed is None and graphed.graphed == "graphed"


@pytest.mark.parametrize("graphed", [False, True])
def test_meta_json_names_whether_the_step_is_graphed(graphed, on_gpu, tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import gnsrepro.train as T
    from gnsrepro.config import TrainConfig

    cfg = OmegaConf.structured(TrainConfig)
    cfg.gns.mode, cfg.compile, cfg.model.n_embd, cfg.schedule.micro_batch_size = "ln", True, 768, 16
    parts = SimpleNamespace(raw_model=SimpleNamespace(num_params=lambda: 1e6), graphed=object() if graphed else None)
    run = SimpleNamespace(out=tmp_path / "run", cfg=cfg, step=0, changed={}, parts=parts, device=torch.device("cuda"),
                          d=SimpleNamespace(world_size=1))
    T._write_run_record(run, torch.bfloat16)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    # SYNTHETIC_TABLE at compiled 768/16: torch with graphs, triton without
    assert meta["ln_backend"] == ("torch" if graphed else "triton")
    assert meta["ln_backend_why"].startswith("auto: compiled measurement " + ("with" if graphed else "without")
                                             + " CUDA graphs on NVIDIA H200 at n_embd 768, micro-batch 16")


def fake_gpu_times(cfg, device):
    """time_overhead's results on a GPU, made up: ln torch 12 ms, ln triton 10 ms."""
    return [{"variant": v, "step_time_s": t, "tokens_per_s": 1.0, "mfu": 0.25}
            for v, t in (("off", 0.009), ("ln torch", 0.012), ("ln triton", 0.010))]


def test_overhead_records_and_tables_its_cuda_graphs_setting(on_gpu, monkeypatch, tmp_path, capsys):
    import pandas as pd

    import gnsrepro.kernels.ln_backend as L
    from gnsrepro.benchmarks import run_benchmark

    # as if on an H200: record=true needs CUDA; time_overhead is made up, nothing runs on a device
    monkeypatch.setattr(B, "_device", lambda cfg: torch.device("cuda"))
    monkeypatch.setattr(B, "_free_memory", lambda device, compiled: None)
    monkeypatch.setattr(B, "_header", lambda device: "device NVIDIA H200")
    monkeypatch.setattr(B, "time_overhead", fake_gpu_times)
    out = tmp_path / "overhead.parquet"
    run_benchmark(bench_cfg("model=20M", "seq_len=1024", "micro_batch_size=16", "compile=true", "cuda_graphs=true",
                            "steps=4", "rounds=2", "record=true", f"out={out}"))
    printed = capsys.readouterr().out
    assert "| compile True | cuda_graphs True |" in printed
    table = printed[printed.index("bench overhead: 1 situation(s)"):].splitlines()[1:]
    assert table[0].split()[:5] == ["model", "seq_len", "micro", "compile", "cuda_graphs"]
    assert table[1].split()[:5] == ["20M", "1024", "16", "True", "True"]
    recorded = L.read_table(L.LN_BACKEND_TABLE)
    assert len(recorded) == SYNTHETIC_ROWS  # the graphed 256/16 row replaced; the one without graphs kept
    row = recorded[recorded.cuda_graphs & (recorded.n_embd == 256) & (recorded.micro_batch_size == 16)]
    assert row[["compile", "torch_ms", "triton_ms", "faster"]].values.tolist() == [[True, 12.0, 10.0, "triton"]]
    assert "compile=true cuda_graphs=true steps=4 warmup=1 rounds=2" in row.command.iloc[0]
    kept = recorded[~recorded.cuda_graphs & recorded.compile & (recorded.n_embd == 256)]
    assert kept[["torch_ms", "triton_ms", "faster"]].values.tolist() == [[15.0, 30.0, "torch"]]
    df = pd.read_parquet(out)
    assert df.cuda_graphs.all() and list(df.variant) == ["off", "ln torch", "ln triton"]
    assert set(df.ln_backend_auto) == {"triton"}  # the graphed row just recorded (without graphs it is torch)


def fake_overhead_rows(torch_s: float, triton_s: float, cuda_graphs: bool = False) -> list[dict]:
    situation = {"model": "20M", "n_embd": 256, "seq_len": 1024, "micro_batch_size": 16, "compile": True,
                 "cuda_graphs": cuda_graphs, "status": "ok", "steps": 60, "warmup": 5, "rounds": 5}
    return [{**situation, "variant": v, "step_time_s": t}
            for v, t in (("off", 0.015), ("ln torch", torch_s), ("ln triton", triton_s), ("all ghost", 0.05))]


def test_record_writes_rows_that_resolve_then_reads_back(on_gpu, tmp_path):
    import gnsrepro.kernels.ln_backend as L

    table = L.LN_BACKEND_TABLE  # the synthetic table: 20M compiled at micro-batch 16 is torch there
    rows = B.ln_backend_rows(fake_overhead_rows(0.0301, 0.0152), "NVIDIA H200", "abc1234", "2026-12-02")
    assert rows == [{"device": "NVIDIA H200", "compile": True, "cuda_graphs": False, "n_embd": 256,
                     "micro_batch_size": 16, "seq_len": 1024, "torch_ms": 30.1, "triton_ms": 15.2, "faster": "triton",
                     "date": "2026-12-02", "commit": "abc1234",
                     "command": "gnsrepro bench overhead model=20M seq_len=1024 micro_batch_size=16 compile=true "
                                "cuda_graphs=false steps=60 warmup=5 rounds=5"}]
    L.record_ln_backend(rows, table)
    df = L.read_table(table)
    assert len(df) == SYNTHETIC_ROWS  # the situation's row replaced, not added
    again = df[(df.n_embd == 256) & df.compile & (df.micro_batch_size == 16)]
    # the graphed row of the same (device, compile, width, micro-batch, context) is another situation: kept
    assert again[["cuda_graphs", "torch_ms", "triton_ms", "faster", "date"]].values.tolist() == [
        [False, 30.1, 15.2, "triton", "2026-12-02"], [True, 9.7, 9.6, "triton", "2026-12-01"]]
    assert auto(n_embd=256, compile=True, micro_batch_size=16) == "triton"
    # a new situation is added; the others are kept as they were
    new = B.ln_backend_rows(fake_overhead_rows(0.02, 0.03), "NVIDIA H200", "abc1234", "2026-12-02")
    new[0]["micro_batch_size"] = 8
    L.record_ln_backend(new, table)
    assert len(L.read_table(table)) == SYNTHETIC_ROWS + 1
    assert auto(n_embd=256, compile=True, micro_batch_size=8) == "torch"
    assert auto(n_embd=768, compile=True, micro_batch_size=16) == "triton"
    # a situation without both LayerNorm variants (an OOM, or a CPU run) records nothing
    assert B.ln_backend_rows([r for r in fake_overhead_rows(0.02, 0.03) if r["variant"] != "ln triton"],
                             "NVIDIA H200", "abc1234", "2026-12-02") == []


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("15.0,30.0,torch", "15.0,30.0,triton"), r"row 1: faster='triton' but torch_ms=15.0"),
    (lambda t: t + "NVIDIA H200,True,False,256,16,1024,1.0,2.0,torch,2026-12-02,abc1234,again\n",
     r"row 9: a second row .*'cuda_graphs': 'False'"),
    (lambda t: t + "NVIDIA H200,True,True,256,16,1024,1.0,2.0,torch,2026-12-02,abc1234,again\n",
     r"row 9: a second row .*'cuda_graphs': 'True'"),
    (lambda t: t.replace("H200,True,False,256", "H200,yes,False,256"), r"row 1: compile='yes' is not True or False"),
    (lambda t: t.replace("H200,True,False,256", "H200,True,maybe,256"),
     r"row 1: cuda_graphs='maybe' is not True or False"),
    (lambda t: t.replace(",cuda_graphs,", ",").replace(",True,False,", ",True,").replace(",False,False,", ",False,")
     .replace(",True,True,", ",True,"), r"columns .* expected \['device', 'compile', 'cuda_graphs'"),
    (lambda t: t.replace(",256,16,", ",0,16,"), r"row 1: n_embd=0 is not a positive integer"),
    (lambda t: t.replace(",command", ",cmd"), r"columns"),
])
def test_a_malformed_table_is_refused(edit, message, tmp_path):
    import gnsrepro.kernels.ln_backend as L

    path = tmp_path / "ln_backend.csv"
    path.write_text(edit(SYNTHETIC_TABLE))
    with pytest.raises(ValueError, match=message):
        L.read_table(path)


def test_the_committed_table_loads_and_every_row_is_well_formed():
    import math
    import re
    from datetime import date

    from omegaconf import OmegaConf

    import gnsrepro.kernels.ln_backend as L

    widths = {OmegaConf.load(path).n_embd for path in (Path(conf_dir()) / "model").glob("*.yaml")}
    df = L.read_table()  # check_table: columns, types, faster consistent, one row per situation
    assert list(df.columns) == list(L.TABLE_COLUMNS) and len(df) >= 4
    for row in df.to_dict("records"):
        assert isinstance(row["compile"], bool) and row["device"].startswith("NVIDIA ")
        assert isinstance(row["cuda_graphs"], bool)
        # a graphed row's command replays the step from CUDA graphs (bench overhead's or profile_step's flag)
        assert row["cuda_graphs"] == ("cuda_graphs=true" in row["command"] or "--cuda-graphs" in row["command"])
        assert re.fullmatch(r"[A-Z]+\d+[A-Z]*", L.gpu_model(row["device"])), row["device"]  # a GPU model is named
        assert row["n_embd"] in widths  # a width of conf/model
        assert row["faster"] == ("torch" if row["torch_ms"] <= row["triton_ms"] else "triton")
        assert math.isfinite(row["torch_ms"]) and row["torch_ms"] > 0 and row["triton_ms"] > 0
        date.fromisoformat(row["date"])
        assert row["commit"] and row["command"]
    # the measurements of issue #19 on an H200: compiled at 20M the Triton path's host cost doubles the step
    # (torch), eager at 111M the fused kernel wins (triton)
    assert L.choose_ln_backend("NVIDIA H200", True, 256, 16)[0] == "torch"
    assert L.choose_ln_backend("NVIDIA H100 80GB HBM3", False, 768, 16)[0] == "triton"
    # with CUDA graphs (the host cost gone) the two are within 3% at every width: at 20M triton 8.93 against
    # torch 9.04 ms at micro-batch 16; at 40M (448) torch 12.83 against triton 12.92 ms
    assert L.choose_ln_backend("NVIDIA H200", True, 256, 16, cuda_graphs=True)[0] == "triton"
    assert L.choose_ln_backend("NVIDIA H200", True, 448, 16, cuda_graphs=True)[0] == "torch"
    graphed = df[df.cuda_graphs & df.compile]
    assert len(graphed) >= 2 and {256, 448, 576, 768} <= set(graphed.n_embd)
    assert ((graphed.torch_ms - graphed.triton_ms).abs() <= 0.03 * graphed.torch_ms).all()
    # eager and graphed (train's default for compile=false on one GPU), 2026-12-03: at 20M the fused kernel beats the
    # unfused PyTorch ops by far (10.09 against 14.51 ms at micro-batch 16)
    assert L.choose_ln_backend("NVIDIA H200", False, 256, 16, cuda_graphs=True)[0] == "triton"
