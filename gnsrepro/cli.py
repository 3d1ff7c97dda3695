"""`gnsrepro <command> [key=value ...]`: a thin dispatcher in front of Hydra.

The subcommand is popped from argv and the matching config (conf/<command>.yaml) is run through
`hydra.main`, so every command takes Hydra overrides, `--help`, `--cfg job` and `-m` multirun. The
decorated functions only convert the config; the work is done by plain functions that tests call.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

COMMANDS = {
    "prepare": "tokenise a corpus into data/<name>/{train,val}.bin",
    "train": "train a GPT and log metrics.parquet and gns.parquet",
    "bench": "benchmarks: bench train | overhead | layernorm",
    "cost": "FLOPs and bytes of the per-example-norm methods (the paper's Table 1)",
    "plot": "figures from run directories: plot figure=NAME run=DIR (plot alone lists them)",
    "sweep": "each layer type's GNS against the total's over EMA factors: sweep ema_alpha=0.9,0.99 run=DIR",
    "variance": "standard error of the GNS estimate against B_small and B_big from a run's model: variance run=DIR",
    "flashattn": "fused against plain attention, students of a teacher with noisy QKV biases: flashattn experiment=...",
    "reproduce": "every experiment, figure and REPORT.md of a scale: reproduce plan=tiny|small|paper [part=NAME]",
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


# ---- composing before Hydra runs: one line for a bad override, every job of a sweep checked first -------
# Hydra's own errors for a bad override are several lines (exit 1), and a sweep finds a bad job only when
# that job starts, after the jobs before it ran. So the command's config is composed here first, with
# hydra's compose API, once per job of a sweep: a user error is one line, exit 2, and nothing is written.

# Hydra flags after which nothing is composed here: they print help or use another config than ours
_HYDRA_ONLY_FLAGS = ("help", "hydra_help", "version", "shell_completion", "info", "config_path", "config_name",
                     "config_dir", "experimental_rerun")


def _hydra_args(argv: list[str]) -> argparse.Namespace | None:
    """The command line as Hydra's own parser reads it, or None when it does not parse (Hydra reports it)."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, unknown = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return None
    return None if unknown else args


def _is_multirun(args: argparse.Namespace) -> bool:
    return not args.run and (args.multirun or any(o.replace(" ", "") == "hydra.mode=MULTIRUN" for o in args.overrides))


def sweep_jobs(command: str, overrides: list[str]) -> list[list[str]] | None:
    """The overrides of each job of `gnsrepro <command> -m <overrides>`, as Hydra's basic sweeper forms them.

    Within an initialized Hydra (initialize_config_dir). None when the config picks another sweeper,
    whose jobs only it knows.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    loader = GlobalHydra.instance().config_loader()
    sweeper = loader.load_configuration(command, overrides, run_mode=RunMode.MULTIRUN).hydra.sweeper
    if sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]  # BasicSweeper.sweep's
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _check_train_jobs(jobs: list[tuple[list[str], object]]) -> None:
    """Refuse a sweep of `gnsrepro train` in which any job would be refused: its settings as train() will
    see them (a resumed run's own, changed by the job's overrides) pass gnsrepro.train.validate, and its
    data set is prepared with its settings or, unless prepare_missing=false, not prepared yet; no two jobs
    ask for one data set with different settings.
    """
    from omegaconf import OmegaConf

    from gnsrepro.data.prepare import (
        DataError,
        check_prepared_settings,
        check_source,
        dataset_dir,
        prepare_command,
        source_settings,
    )
    from gnsrepro.errors import ConfigError
    from gnsrepro.train import resume_settings, validate

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # a job is named by the overrides that tell it from the others (the swept ones), or by all of them
    swept = {o for o in {o for overrides, _ in jobs for o in overrides} if not all(o in j for j, _ in jobs)}
    problems, data_sets = [], {}
    for num, (overrides, cfg) in enumerate(jobs):
        named = [o for o in overrides if o in swept] or overrides
        job = f"job {num} ({' '.join(named) or 'no overrides'})"
        try:
            out = None if _default_out_dir(cfg) else Path(cfg.out_dir)  # None: a new sweep subdir
            if out is not None and cfg.resume and (out / "config.yaml").exists():  # as gnsrepro.train.open_run
                cfg, _ = resume_settings(cfg, OmegaConf.load(out / "config.yaml"), overrides, out)
            validate(cfg, world)
            if check_prepared_settings(cfg.data) is None:  # not prepared: the job will prepare it
                if not cfg.prepare_missing:
                    raise DataError(f"no prepared data in {dataset_dir(cfg.data)} and "
                                    f"prepare_missing=false; run `{prepare_command(cfg.data)}` first")
                check_source(cfg.data)
        except (ConfigError, DataError) as e:
            problems.append(f"{job}: {e}")
            continue
        where = str(dataset_dir(cfg.data).resolve())
        settings = source_settings(cfg.data)
        first = data_sets.setdefault(where, (job, settings))
        if first[1] != settings:
            differ = ", ".join(f"{k}={first[1].get(k)} vs {settings.get(k)}" for k in sorted({*first[1], *settings})
                               if first[1].get(k) != settings.get(k))
            problems.append(f"{first[0]} and {job} need {where} prepared with different settings ({differ}); "
                            "one data directory holds one prepared set: give the jobs their own data.data_dir")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"the sweep's {problems[0]}{more}; no job was run")


# per command, a check of a sweep's composed jobs run before the first starts (a single run checks itself)
JOB_CHECKS = {"train": _check_train_jobs}


def precompose(command: str, argv: list[str]) -> None:
    """Compose `gnsrepro <command> <argv>`'s config (each job's, for -m) before Hydra runs it.

    Raises ConfigError with one line for a bad override (an unknown config-group option, a misspelt key,
    a badly typed value), or, in a sweep, for a job that JOB_CHECKS refuses, naming its overrides. With
    HYDRA_FULL_ERROR=1 a composition error is left to Hydra, which reports it in full. Does nothing for
    a command without conf/<command>.yaml and for the flags that print help or pick another config.
    """
    if not (Path(conf_dir()) / f"{command}.yaml").is_file():
        return
    args = _hydra_args(argv)
    if args is None or any(getattr(args, flag, None) for flag in _HYDRA_ONLY_FLAGS):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gnsrepro.config import register_configs
    from gnsrepro.errors import ConfigError, hydra_error_line

    register_configs()
    overrides = list(args.overrides)
    multirun = _is_multirun(args)
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name=command):
            jobs = sweep_jobs(command, overrides) if multirun else [overrides]
            composed = [(job, compose(command, overrides=job)) for job in jobs or []]
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return  # Hydra composes the same config next and reports the error with its stack trace
        raise ConfigError(hydra_error_line(e, overrides, conf_dir())) from None
    if multirun and not args.cfg and command in JOB_CHECKS:
        JOB_CHECKS[command](composed)


def _prepare(cfg) -> None:
    from gnsrepro.data.prepare import run_prepare

    run_prepare(cfg.data, force=cfg.force)


def _train(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from gnsrepro.train import train

    hydra_cfg = HydraConfig.get()
    job_dir = None
    if hydra_cfg.mode == RunMode.MULTIRUN and _default_out_dir(cfg):
        # the default out_dir is named by the start time, which Hydra resolves once for the whole
        # sweep: each job gets its own directory of the sweep instead (outputs/multirun/<time>/<job>);
        # an out_dir that the command line or an experiment names (e.g. by schedule and seed) is kept
        cfg.out_dir = job_dir = hydra_cfg.runtime.output_dir
    try:
        train(cfg, overrides=list(hydra_cfg.overrides.task))
    except BaseException:
        if job_dir is not None:
            _remove_unused_sweep_dirs(Path(job_dir), Path(hydra_cfg.sweep.dir), first=hydra_cfg.job.num == 0)
        raise


def _default_out_dir(cfg) -> bool:
    """Whether out_dir is still conf/train.yaml's outputs/${run_name} with its time-stamped run_name."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False)
    return raw.get("out_dir") == "outputs/${run_name}" and "${now:" in str(raw.get("run_name"))


def _remove_unused_sweep_dirs(job_dir: Path, sweep_dir: Path, first: bool) -> None:
    """After a sweep job was refused, remove what Hydra made for it and the job wrote nothing into.

    Hydra creates the sweep directory with its multirun.yaml before the first job, and each job's directory
    before that job starts. Every job was checked before the first started (precompose), so this is a
    refusal found at run time (e.g. an empty corpus); a sweep whose first job is refused leaves nothing.
    """
    with contextlib.suppress(OSError):
        job_dir.rmdir()  # only when empty
        if first and [p.name for p in sweep_dir.iterdir()] == ["multirun.yaml"]:
            (sweep_dir / "multirun.yaml").unlink()
            sweep_dir.rmdir()


def _bench(cfg) -> None:
    from gnsrepro.benchmarks import run_benchmark

    run_benchmark(cfg)


def _cost(cfg) -> None:
    from gnsrepro.cost import run_cost

    run_cost(cfg)


def _plot(cfg) -> None:
    from gnsrepro.figures import run_plot

    run_plot(cfg)


def _reproduce(cfg) -> None:
    from gnsrepro.reproduce import run_reproduce

    run_reproduce(cfg)


def _sweep(cfg) -> None:
    from gnsrepro.sweep import run_sweep

    run_sweep(cfg)


def _variance(cfg) -> None:
    from gnsrepro.variance import run_variance

    run_variance(cfg)


def _flashattn(cfg) -> None:
    from gnsrepro.flashattn import run_flashattn

    run_flashattn(cfg)


TASKS = {"prepare": _prepare, "train": _train, "bench": _bench, "cost": _cost, "plot": _plot, "sweep": _sweep,
         "reproduce": _reproduce}
TASKS["variance"] = _variance
TASKS["flashattn"] = _flashattn


# settings that take lists, per command: the CLI turns `key=a,b` into `key=[a,b]` (bracket_list_overrides);
# the second tuple holds the numeric ones (the others are quoted: paths and names)
LIST_KEYS = {"sweep": (("ema_alpha", "run", "group", "source"), ("ema_alpha",)),
             "plot": (("run", "alphas"), ("alphas",))}
LIST_KEYS["variance"] = (("points", "b_small", "b_big"), ("b_small", "b_big"))
LIST_KEYS["flashattn"] = (("sigmas",), ("sigmas",))
LIST_KEYS["bench"] = (("models", "micro_batch_sizes", "compiles", "variants"), ("micro_batch_sizes", "compiles"))


def bracket_list_overrides(argv: list[str], command: str = "sweep") -> list[str]:
    """`key=a,b` -> `key=[a,b]` (and `key=a` -> `key=[a]`) for the list keys of `command` (LIST_KEYS).

    Hydra reads a bare comma list as a sweep, which it accepts only under -m, and a single value as a scalar
    that a list setting refuses; lists such as the sweep's are written most naturally as `ema_alpha=0.9,0.99`
    and `run=DIR`, so those are rewritten into Hydra's list syntax. Values already in brackets pass through;
    directory and group names are quoted, so a path may hold characters Hydra's grammar reserves.
    """
    keys, numeric = LIST_KEYS.get(command, ((), ()))
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+")
        if not sep or name not in keys or value.startswith("["):
            out.append(arg)
            continue
        items = [v for v in value.split(",") if v != ""]
        if name not in numeric:
            items = ["'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in items]
        out.append(f"{key}=[{','.join(items)}]")
    return out


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
    argv = bracket_list_overrides(argv, command)  # ema_alpha=0.9,0.99, run=DIR: lists, not a sweep or a scalar
    sys.argv = [f"gnsrepro {command}", *argv]
    from gnsrepro.errors import exit_on_user_error

    exit_on_user_error(command)(precompose)(command, argv)
    _run_hydra(command, exit_on_user_error(command)(TASKS[command]))


if __name__ == "__main__":
    main()
