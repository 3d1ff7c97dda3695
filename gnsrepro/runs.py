"""Read a run directory back: its resolved config, metadata and the two parquet tables.

The analysis half (sweeps, figures) starts here and never imports training code, so this module needs only
pandas, omegaconf and json. A run directory is what `gnsrepro train` writes (README, "Logs"): config.yaml
(resolved), meta.json, metrics.parquet (one row per optimizer step) and gns.parquet (one row per step, group
and source), which a gns=off run lacks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from gnsrepro import schema
from gnsrepro.errors import ConfigError

# The columns a table must have (gnsrepro.schema, README "Logs"); a table may carry more.
METRICS_COLUMNS = tuple(c for c in schema.METRIC_COLUMNS if c not in schema.LATER_METRIC_COLUMNS)
GNS_COLUMNS = tuple(schema.GNS_COLUMNS)


@dataclass
class Run:
    """One training run as logged: `gns` is None for a run without gns.parquet loaded with need_gns=False."""

    path: Path
    config: dict
    metrics: pd.DataFrame
    gns: pd.DataFrame | None
    meta: dict


def check_run_dir(run_dir: str | os.PathLike, need_gns: bool = True) -> Path:
    """The run directory as a Path, after checking that the files `load_run` reads exist (no file is read).

    Raises ConfigError naming the directory and what is missing, so a command can check every run it was
    given before doing any work.
    """
    path = Path(run_dir)
    if not path.exists():
        raise ConfigError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a run directory (a directory written by gnsrepro train)")
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not a run directory: it has no config.yaml (gnsrepro train writes one)")
    needed = ["meta.json", "metrics.parquet"] + (["gns.parquet"] if need_gns else [])
    for name in needed:
        if not (path / name).is_file():
            why = " (a gns=off run logs none)" if name == "gns.parquet" else ""
            raise ConfigError(f"run directory {path} has no {name}{why}")
    return path


def read_table(path: Path, columns, hint: str = "README, 'Logs', has the schema") -> pd.DataFrame:
    """The parquet table at `path`, with every one of `columns`; one-line ConfigError otherwise (hint: how to
    get a right one)."""
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow's errors for a truncated or foreign file have no common base class
        raise ConfigError(f"{path} is not a readable parquet table: {type(e).__name__}: {e}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{path} lacks the column(s) {', '.join(missing)} ({hint})")
    return df


def load_run(run_dir: str | os.PathLike, need_gns: bool = True) -> Run:
    """The run in `run_dir`: config.yaml as a plain dict, meta.json, metrics.parquet and gns.parquet.

    With need_gns=False a missing gns.parquet (a gns=off run) gives `gns=None` instead of an error. A run replayed
    from CUDA graphs whose meta.json lacks step_time_synced (the loop did not wait for the device yet) has NaN
    step times, throughputs and MFU: its logged ones are the host's. Raises
    ConfigError, one line naming the path and what is wrong, for a directory that does not exist, is not a
    run, or lacks a table or one of its documented columns.
    """
    from omegaconf import OmegaConf

    path = check_run_dir(run_dir, need_gns=need_gns)
    try:
        # OmegaConf's loader, not yaml.safe_load: it reads the floats OmegaConf writes, such as 1.0e-08, as
        # floats (plain YAML 1.1 takes an exponent without a dot for a string)
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        meta = json.loads((path / "meta.json").read_text())
    except Exception as e:  # a malformed file: say which, in one line
        raise ConfigError(f"cannot read {path}'s config.yaml / meta.json: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path / 'config.yaml'} is not a mapping of settings")
    metrics = read_table(path / "metrics.parquet", METRICS_COLUMNS)
    if meta.get("cuda_graphs") and not meta.get("step_time_synced"):
        # replayed from CUDA graphs by a loop that did not yet wait for the device before its pauses: its step
        # times are the host's, which ran up to a whole logging interval ahead of the GPU; unknown, not wrong
        metrics = metrics.assign(step_time_s=float("nan"), tokens_per_s=float("nan"), mfu=float("nan"))
    gns_path = path / "gns.parquet"
    gns = read_table(gns_path, GNS_COLUMNS) if gns_path.is_file() else None
    return Run(path=path, config=config, metrics=metrics, gns=gns, meta=meta)
