"""`gnsrepro <command> [key=value ...]`: a thin dispatcher in front of Hydra.

The subcommand is popped from argv and the matching config (conf/<command>.yaml) is run through
`hydra.main`, so every command takes Hydra overrides, `--help`, `--cfg job` and `-m` multirun. The
decorated functions only convert the config; the work is done by plain functions that tests call.
"""

from __future__ import annotations

import sys
from pathlib import Path

COMMANDS = {
    "prepare": "tokenise a corpus into data/<name>/{train,val}.bin",
    "train": "train a GPT and log metrics.parquet and gns.parquet",
    "bench": "benchmarks: bench train | overhead | layernorm",
    "cost": "FLOPs and bytes of the per-example-norm methods (the paper's Table 1)",
}
# `gnsrepro bench layernorm ...` and `gnsrepro cost ...`: a bare word after the command is its target
POSITIONAL = {"bench": "target"}


def conf_dir() -> str:
    """The Hydra config directory: conf/ of a source checkout, else the copy installed with the package."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    return str(package / "conf")  # pyproject.toml installs conf/ as the package data gnsrepro/conf


def _usage() -> str:
    lines = ["usage: gnsrepro <command> [key=value ...]  (Hydra overrides; --help for a command's config)", ""]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "examples:", "  gnsrepro prepare data=pycode", "  gnsrepro train model=tiny data=pycode max_steps=50",
              "  gnsrepro bench layernorm", "  gnsrepro cost model=111M seq_len=2048"]
    return "\n".join(lines)


def _run_hydra(command: str, task) -> None:
    import hydra

    from gnsrepro.config import register_configs

    register_configs()
    hydra.main(version_base="1.3", config_path=conf_dir(), config_name=command)(task)()


def _prepare(cfg) -> None:
    from gnsrepro.data.prepare import run_prepare

    run_prepare(cfg.data)


def _train(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from gnsrepro.train import train

    hydra_cfg = HydraConfig.get()
    given = {o.split("=", 1)[0].lstrip("+~") for o in hydra_cfg.overrides.task}
    if hydra_cfg.mode == RunMode.MULTIRUN and "out_dir" not in given:
        # the default out_dir is named by the start time, which Hydra resolves once for the whole
        # sweep: each job gets its own directory of the sweep instead (outputs/multirun/<time>/<job>)
        cfg.out_dir = hydra_cfg.runtime.output_dir
    train(cfg, overrides=list(hydra_cfg.overrides.task))


def _bench(cfg) -> None:
    from gnsrepro.benchmarks import run_benchmark

    run_benchmark(cfg)


def _cost(cfg) -> None:
    from gnsrepro.cost import run_cost

    run_cost(cfg)


TASKS = {"prepare": _prepare, "train": _train, "bench": _bench, "cost": _cost}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command = argv.pop(0)
    if command not in TASKS:
        sys.exit(f"gnsrepro: unknown command {command!r}; accepted: {', '.join(TASKS)}\n\n{_usage()}")
    if command in POSITIONAL and argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv[0] = f"{POSITIONAL[command]}={argv[0]}"
    sys.argv = [f"gnsrepro {command}", *argv]
    from gnsrepro.errors import exit_on_user_error

    _run_hydra(command, exit_on_user_error(command)(TASKS[command]))


if __name__ == "__main__":
    main()
