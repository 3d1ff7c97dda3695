"""`gnsrepro plot figure=NAME run=DIR out=PATH`: the paper's figures from run directories.

Figures read a run's parquet tables and config.yaml / meta.json (`gnsrepro.runs.load_run`), a benchmark's
parquet, or, for the cost figure, nothing at all (it is arithmetic on the model's shapes); they never
import training code. One module per figure family; FIGURES maps each name to its function, a one-line
description and the kind of input it takes, and both the usage text (`gnsrepro plot` alone) and the
validation of a command line read it. Every figure function takes its input and an output path stem and
writes `<out>.png`, `<out>.pdf` and the plotted values as `<out>.parquet` (some write more, e.g. the cost
figure's Table 1), returning the paths.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from gnsrepro.errors import ConfigError
from gnsrepro.figures.correlation import correlation
from gnsrepro.figures.cost import cost
from gnsrepro.figures.ddp import ddp
from gnsrepro.figures.flashattn import flashattn
from gnsrepro.figures.lnbench import DEFAULT_TABLE, lnbench
from gnsrepro.figures.lrsweep import lrsweep
from gnsrepro.figures.phase import phase
from gnsrepro.figures.ratio import ratio
from gnsrepro.figures.schedule import schedule
from gnsrepro.figures.variance import variance

# the kinds of input a figure takes -> how the usage text and the errors describe them
INPUTS = {
    "gns_run": "one run directory holding gns.parquet: run=DIR",
    "runs": "run directories (every arm and seed): run=[DIR1,DIR2,...]",
    "bench_table": f"a `gnsrepro bench layernorm` parquet: table=PATH (default {DEFAULT_TABLE})",
    "model": "no run: computed from model=NAME [seq_len=T batch_size=B bytes_per_element=b]",
    "variance_run": "a run directory holding variance.parquet (gnsrepro variance run=DIR): run=DIR",
    "flashattn_run": "the out_dir of `gnsrepro flashattn` (flashattn.parquet, config.yaml): run=DIR",
}


class FigureSpec(NamedTuple):
    function: Callable[..., list[Path]]
    description: str
    inputs: str  # a key of INPUTS


FIGURES: dict[str, FigureSpec] = {
    "phase": FigureSpec(phase, "|G|² against S and GNS over tokens: LayerNorm, Linear + Embedding, total (paper "
                        "p. 6)", "gns_run"),
    "correlation": FigureSpec(correlation, "layer-type GNS against total GNS per EMA alpha; r, slope, held-out error "
                              "(p. 8)", "gns_run"),
    "cost": FigureSpec(cost, "FLOPs and bytes of the per-example-norm methods against sequence length; Table 1 "
                       "(p. 5)", "model"),
    "lnbench": FigureSpec(lnbench, "LayerNorm kernel time against hidden size, Triton with norms vs PyTorch (p. 8 "
                          "right)", "bench_table"),
    "schedule": FigureSpec(schedule, "loss, batch size and tokens saved against tokens per batch-size schedule "
                           "(p. 9)", "runs"),
    "ratio": FigureSpec(ratio, "LayerNorm and total GNS over tokens of fixed-batch runs that change the batch size, "
                        "the learning rate or both at a fixed ratio (p. 7)", "runs"),
    "lrsweep": FigureSpec(lrsweep, "final validation loss against learning rate per model, each optimum marked "
                          "(p. 16)", "runs"),
    "ddp": FigureSpec(ddp, "per-example against DDP-rank GNS over tokens, scatter and ratio (a torchrun run; the "
                      "1.3B 8-GPU check, p. 21)", "gns_run"),
    "variance": FigureSpec(variance, "standard error of the GNS estimate against B_small and B_big, from real "
                           "per-example gradients (section 2.1)", "variance_run"),
    "flashattn": FigureSpec(flashattn, "loss and the students' parameter distance against step, fused against plain "
                            "attention, teacher/student (p. 18)", "flashattn_run"),
}


def figures_usage() -> str:
    """The usage text of `gnsrepro plot`: every figure of FIGURES with its description and input."""
    width = max(map(len, FIGURES))
    lines = ["usage: gnsrepro plot figure=NAME [run=DIR | run=[DIR1,DIR2] | table=PATH] [out=PATH] [key=value ...]",
             "", "figures:"]
    for name, spec in FIGURES.items():
        lines += [f"  {name:<{width}}  {spec.description}", f"  {'':<{width}}  input: {INPUTS[spec.inputs]}"]
    lines += ["", "Writes <out>.png, <out>.pdf and the plotted values <out>.parquet (default out: "
              "outputs/figures/<figure>).",
              "Several runs are one list: run=DIR1,DIR2 or run=[DIR1,DIR2] (Hydra takes a key once per command line).",
              "Settings: alpha (phase, ddp), alphas (correlation), source (phase, correlation, ddp); model, seq_len,",
              "batch_size, bytes_per_element (cost); reference (schedule: the fixed batch the savings are against).",
              "`gnsrepro plot --cfg job` shows them."]
    return "\n".join(lines)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def check_inputs(figure: str, runs: list[str], table: str | None) -> list:
    """The positional inputs of FIGURES[figure].function, after checking that they are of the kind the
    figure takes and exist (nothing is read). Raises ConfigError, one line, otherwise."""
    from gnsrepro.runs import check_run_dir

    if figure not in FIGURES:
        raise ConfigError(f"figure={figure} is not a figure; accepted: {', '.join(FIGURES)}")
    kind = FIGURES[figure].inputs
    if kind == "flashattn_run":
        from gnsrepro.figures.flashattn import check_input

        return [check_input(figure, runs, table)]
    if kind in ("gns_run", "runs", "variance_run"):
        if table is not None:
            raise ConfigError(f"figure={figure} reads run directories, not table={table} (table= is for "
                              f"figure=lnbench); give {INPUTS[kind]}")
        if not runs:
            raise ConfigError(f"figure={figure} needs {INPUTS[kind]}")
        if kind != "runs" and len(runs) > 1:
            raise ConfigError(f"figure={figure} takes one run directory, got {len(runs)}: plot each on its own "
                              "(out=... names each figure)")
        for run in runs:
            if Path(run).is_file():
                raise ConfigError(f"run={run} is a file; figure={figure} takes {INPUTS[kind]}")
        paths = [check_run_dir(Path(run).expanduser(), need_gns=kind == "gns_run") for run in runs]
        if kind == "variance_run" and not (paths[0] / "variance.parquet").is_file():
            raise ConfigError(f"run directory {paths[0]} has no variance.parquet; `gnsrepro variance run={runs[0]}` "
                              "writes it")
        return [paths] if kind == "runs" else [paths[0]]
    if runs:
        raise ConfigError(f"figure={figure} reads no run directory (got run={runs[0]}); it takes {INPUTS[kind]}")
    if kind == "bench_table":
        path = Path(table if table is not None else DEFAULT_TABLE)
        if not path.exists():
            raise ConfigError(f"table={path} does not exist: `gnsrepro bench layernorm` writes it (on a GPU), or "
                              "give table=PATH")
        if not path.is_file():
            raise ConfigError(f"table={path} is not a file; figure=lnbench takes {INPUTS[kind]}")
        return [path]
    if table is not None:
        raise ConfigError(f"figure={figure} reads no table (got table={table}); it is {INPUTS[kind]}")
    return []


def run_plot(cfg) -> list[Path]:
    """`gnsrepro plot`: check the figure and its inputs, draw it, print and return the written paths.

    Without figure= it prints `figures_usage()` and draws nothing.
    """
    if cfg.figure is None:
        print(figures_usage())
        return []
    inputs = check_inputs(str(cfg.figure), _as_list(cfg.run), cfg.table)
    spec = FIGURES[cfg.figure]
    out = Path(cfg.out if cfg.out else f"outputs/figures/{cfg.figure}")
    if out.is_dir():
        raise ConfigError(f"out={out} is a directory; give the path stem of the figure, e.g. out={out / cfg.figure}")
    settings = {"alpha": cfg.alpha, "alphas": list(cfg.alphas), "source": cfg.source, "model": cfg.model,
                "outlier_guard": cfg.outlier_guard,
                "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "bytes_per_element": cfg.bytes_per_element,
                "reference": cfg.reference}
    accepted = inspect.signature(spec.function).parameters
    paths = spec.function(*inputs, out=out, **{k: v for k, v in settings.items() if k in accepted})
    for path in paths:
        print(f"wrote {path}")
    return paths
