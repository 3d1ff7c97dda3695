"""`gns.ln_backend=auto`: the LayerNorm backend measured faster in the recorded situation nearest this one.

The per-example LayerNorm norms (the paper's Sec. 3, p. 4: the LayerNorm weight and bias gradients of each
example, their squared norms summed over the sequence) have two implementations. `torch` is F.layer_norm with
the per-example sums in a few PyTorch ops (gnsrepro.pegn), which torch.compile fuses into inductor's own
kernels; `triton` is one fused Triton kernel forward and backward, residual add included
(gnsrepro.kernels.layer_norm), opaque to inductor and with the host cost of a custom autograd Function. Which
is faster depends on the situation: compiled at 111M (d = 768) the two are within 1% of gns=off; compiled at
20M (d = 256) the Triton path's fixed host cost doubles a 15 ms step; in eager mode the PyTorch path's unfused
ops cost 21% at 111M where the fused kernel makes the step 8% faster than gns=off. Replaying the step from a
CUDA graph (cuda_graphs=true, gnsrepro.cuda_graphs) removes the host cost, so only GPU time counts: compiled
at 20M the two paths are then within 3% of gns=off and 2% of each other (one H200, micro-batch 16: torch 9.70,
triton 9.64 ms against 9.45 ms; micro-batch 64: 0.996x and 1.015x). No rule of thumb predicts this, so auto
reads the choice from measurements: ln_backend.csv beside this module, one row per situation, written by
`gnsrepro bench overhead ... record=true` from its "ln torch" and "ln triton" variants (median step times of
the whole training step, the variants interleaved; gnsrepro.benchmarks.train).

Columns of ln_backend.csv (TABLE_COLUMNS):
  device            torch.cuda.get_device_name() of the GPU measured on, e.g. "NVIDIA H200"
  compile           whether the step was torch.compile'd (True / False)
  cuda_graphs       whether the step was replayed from a CUDA graph (True / False; gnsrepro.cuda_graphs)
  n_embd            the model's width d
  micro_batch_size  sequences per forward/backward
  seq_len           tokens per sequence
  torch_ms          median step time with gns=ln, gns.ln_backend=torch, in milliseconds
  triton_ms         the same with gns.ln_backend=triton
  faster            "torch" or "triton": the smaller of the two (torch on a tie: no custom kernel)
  date              the day of the measurement (ISO 8601)
  commit            the code's git commit (short), "-dirty" appended when tracked files differed; "unknown"
  command           the command that measured it
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from gnsrepro.kernels.backend_table import (  # noqa: F401 - gpu_model, GPU_FAMILIES: part of this module's API
    GPU_FAMILIES,
    check_measured_rows,
    faster_backend,
    gpu_family,
    gpu_model,
    replace_rows,
    rows_of_device,
)

LN_BACKEND_TABLE = Path(__file__).with_name("ln_backend.csv")
TABLE_COLUMNS = ("device", "compile", "cuda_graphs", "n_embd", "micro_batch_size", "seq_len", "torch_ms", "triton_ms",
                 "faster", "date", "commit", "command")
SITUATION_KEY = ("device", "compile", "cuda_graphs", "n_embd", "micro_batch_size", "seq_len")  # one row per situation
FLAG_COLUMNS = ("compile", "cuda_graphs")  # True / False
DEFAULT_CUDA_BACKEND = "triton"  # where nothing is recorded for the GPU's family (the behaviour before the table)


def read_table(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """ln_backend.csv (LN_BACKEND_TABLE unless path is given) as a DataFrame of TABLE_COLUMNS; an empty one when
    the file does not exist. Raises ValueError for a malformed table (check_table)."""
    path = Path(LN_BACKEND_TABLE if path is None else path)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in TABLE_COLUMNS})
    df = pd.read_csv(path, dtype={"device": str, "faster": str, "date": str, "commit": str, "command": str},
                     keep_default_na=False)
    check_table(df, str(path))
    return df


def check_table(df: pd.DataFrame, where: str = "ln_backend table") -> None:
    """Raise ValueError naming the first problem of a table: its columns, a compile or cuda_graphs flag that is
    not a boolean, a width, micro-batch or context that is not a positive integer, a time that is not a positive
    number, a `faster` that is not the backend with the smaller time, an empty device, date or command, or two
    rows for one situation (SITUATION_KEY)."""
    check_measured_rows(df, where, TABLE_COLUMNS, SITUATION_KEY, FLAG_COLUMNS,
                        ("n_embd", "micro_batch_size", "seq_len"))


def _measurement_name(compile: bool, cuda_graphs: bool | None) -> str:
    """"compiled measurement with CUDA graphs", "eager measurement without CUDA graphs"; cuda_graphs None: either."""
    graphs = {True: " with CUDA graphs", False: " without CUDA graphs", None: ""}[cuda_graphs]
    return ("compiled" if compile else "eager") + " measurement" + graphs


def choose_ln_backend(device_name: str, compile: bool, n_embd: int | None, micro_batch_size: int | None,
                      table: str | os.PathLike | pd.DataFrame | None = None, *,
                      cuda_graphs: bool = False) -> tuple[str, str]:
    """(backend, why) for a CUDA GPU: the `faster` of the nearest recorded situation.

    Rows of the same compile mode and CUDA-graph mode only; of those, the rows of this device name, else of its
    GPU model (gpu_model: "NVIDIA H100 PCIe" and "NVIDIA H100 80GB HBM3" are both H100), else of its family
    (GPU_FAMILIES: H100 and H200 are one, sm90); of those, the nearest n_embd on a log scale (|log(d/d_row)|),
    then the nearest micro-batch on a log scale, then the latest date, then the row last in the table. A graphed
    step (cuda_graphs) with no graphed row for the family takes the rows without graphs of its compile mode, and
    `why` says so: the nearest evidence there is, though their times include the host cost that graphs remove,
    which weighs against triton at small widths. No row for the family in this compile mode:
    DEFAULT_CUDA_BACKEND (triton, the choice before measurements were recorded).
    """
    df = table if isinstance(table, pd.DataFrame) else read_table(table)
    same_mode = df[df["compile"].astype(str) == str(bool(compile))]
    graphed = same_mode["cuda_graphs"].astype(str) == "True"
    rows = rows_of_device(same_mode[graphed == bool(cuda_graphs)], device_name)
    measured, fallback = _measurement_name(compile, bool(cuda_graphs)), ""
    if rows.empty and cuda_graphs:
        rows = rows_of_device(same_mode[~graphed], device_name)
        fallback = f"no {measured} for {device_name} ({gpu_family(device_name)}) in ln_backend.csv, so one without: "
        measured = _measurement_name(compile, False)
    if rows.empty:
        either = _measurement_name(compile, None if cuda_graphs else False)
        return DEFAULT_CUDA_BACKEND, (f"no {either} for {device_name} ({gpu_family(device_name)}) in ln_backend.csv"
                                      + (", with or without CUDA graphs" if cuda_graphs else "")
                                      + f": {DEFAULT_CUDA_BACKEND}")

    def log_distance(column: str, value: int | None):
        if value is None:
            return pd.Series(0.0, index=rows.index)
        return (rows[column].astype(float) / float(value)).map(math.log).abs()

    for column, value in (("n_embd", n_embd), ("micro_batch_size", micro_batch_size)):
        distance = log_distance(column, value)
        rows = rows[distance <= distance.min() + 1e-12]
    row = rows.sort_values("date", kind="stable").iloc[-1]
    return str(row["faster"]), (f"{fallback}{measured} on {row['device']} at n_embd {row['n_embd']}, "
                                f"micro-batch {row['micro_batch_size']}, seq_len {row['seq_len']} ({row['date']}): "
                                f"torch {float(row['torch_ms']):.1f} ms, triton {float(row['triton_ms']):.1f} ms")


def record_ln_backend(rows: list[dict], path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Write rows (dicts of TABLE_COLUMNS) into ln_backend.csv, each replacing the row of its situation
    (SITUATION_KEY) if there is one; the table sorted by situation, written atomically. Returns the table."""
    path = Path(LN_BACKEND_TABLE if path is None else path)
    return replace_rows(path, read_table(path), rows, TABLE_COLUMNS, SITUATION_KEY, FLAG_COLUMNS, check_table)
