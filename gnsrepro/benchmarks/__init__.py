"""Benchmarks (commands, not tests): `gnsrepro bench train | overhead | layernorm`."""

from __future__ import annotations

import os

from gnsrepro.errors import ConfigError

TARGETS = ("train", "overhead", "layernorm")


def check_bench_settings(cfg) -> None:
    """Refuse, with one line, a target or device a benchmark cannot run on, before any work.

    bench layernorm times GPU kernels against each other and needs a CUDA GPU; bench train and overhead
    run on the CPU too, but device=cuda[:N] needs that GPU, and gns.ln_backend=triton needs a GPU or
    TRITON_INTERPRET=1 (as for `gnsrepro train`). The situation lists (models=, micro_batch_sizes=, compiles=)
    and record=true are bench overhead's alone.
    """
    import torch

    if cfg.target not in TARGETS:
        raise ConfigError(f"bench target {cfg.target!r} is not known; accepted: {', '.join(TARGETS)}")
    device = str(cfg.device)
    index = device.removeprefix("cuda:")
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and index.isdigit()):
        raise ConfigError(f"device={device!r} is not known; accepted: auto, cpu, cuda, cuda:N")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.target == "layernorm":
        if device == "cpu":
            raise ConfigError("bench layernorm times GPU kernels against each other: device=cpu is not accepted; "
                              "accepted: auto, cuda, cuda:N")
        if gpus == 0:
            raise ConfigError("bench layernorm needs a CUDA GPU (it times GPU kernels against each other) and "
                              "torch sees none; run it on a machine with a GPU")
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"device={device!r} but torch sees no CUDA GPU; use device=auto or device=cpu")
    if device.startswith("cuda:") and int(index) >= gpus:
        raise ConfigError(f"device={device!r} but torch sees {gpus} CUDA GPU(s); accepted: cuda:0 to cuda:{gpus - 1}")
    graphs = str(cfg.cuda_graphs).lower()
    if graphs not in ("auto", "true", "false"):
        raise ConfigError(f"cuda_graphs={cfg.cuda_graphs!r} is not known; accepted: auto, true, false")
    lists = [key for key in ("models", "micro_batch_sizes", "compiles") if cfg[key]]
    if lists and cfg.target != "overhead":
        raise ConfigError(f"{lists[0]}= lists situations for bench overhead; bench {cfg.target} takes one model=, "
                          "micro_batch_size=, compile=")
    if cfg.record and cfg.target != "overhead":
        raise ConfigError(f"record=true records bench overhead's ln torch / ln triton times; bench {cfg.target} "
                          "accepts record=false")
    on_cpu = device == "cpu" or gpus == 0
    if (cfg.target == "train" and cfg.gns.mode != "off" and cfg.gns.ln_backend == "triton" and on_cpu
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ConfigError("gns.ln_backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's slow CPU "
                          "interpreter); use gns.ln_backend=auto or torch on a CPU")


def _write_results(rows: list[dict], cfg) -> None:
    """bench train / overhead results as parquet at cfg.out (when given), with what was timed and where: the
    situation columns the rows lack (bench train's) from cfg, then the device, the torch and triton versions,
    the date and the code's git commit (gnsrepro.provenance)."""
    from datetime import datetime, timezone
    from pathlib import Path

    import pandas as pd
    import torch
    import triton

    from gnsrepro.provenance import code_version

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    commit, dirty = code_version()
    df = pd.DataFrame(rows)
    situation = {"model": cfg.model.name, "seq_len": cfg.seq_len or cfg.model.block_size,
                 "micro_batch_size": cfg.micro_batch_size, "compile": cfg.compile}
    df = df.assign(**{k: v for k, v in situation.items() if k not in df.columns})
    df = df.assign(device=device, torch=torch.__version__, triton=triton.__version__,
                   date=datetime.now(timezone.utc).date().isoformat(), git_commit=commit, git_dirty=dirty)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out)
    print(f"wrote {out}")


def run_benchmark(cfg) -> None:
    check_bench_settings(cfg)
    if cfg.target == "train":
        from gnsrepro.benchmarks.train import bench_train

        result = bench_train(cfg)
        if cfg.out:
            _write_results([{"variant": f"gns={cfg.gns.mode}", **result}], cfg)
    elif cfg.target == "overhead":
        from gnsrepro.benchmarks.train import bench_overhead

        rows = bench_overhead(cfg)  # relative_step_time: against gns=off of the same situation
        if cfg.out:
            _write_results(rows, cfg)
    else:
        from gnsrepro.benchmarks.layernorm import run

        run(cfg)
