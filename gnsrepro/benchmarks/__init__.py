"""Benchmarks (commands, not tests): `gnsrepro bench train | overhead | layernorm`."""

from __future__ import annotations

from gnsrepro.errors import ConfigError

TARGETS = ("train", "overhead", "layernorm")


def run_benchmark(cfg) -> None:
    if cfg.target == "train":
        from gnsrepro.benchmarks.train import bench_train

        bench_train(cfg)
    elif cfg.target == "overhead":
        from gnsrepro.benchmarks.train import bench_overhead

        bench_overhead(cfg)
    elif cfg.target == "layernorm":
        from gnsrepro.benchmarks.layernorm import run

        run(cfg)
    else:
        raise ConfigError(f"bench target {cfg.target!r} is not known; accepted: {', '.join(TARGETS)}")
