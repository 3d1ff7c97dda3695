"""`gns.linear_backend=auto`: per Linear shape, the simultaneous method's backend measured faster, and its tiles.

The simultaneous method's per-example weight-gradient norms (docs/method.md, section 2) have two
implementations: `torch`, which materialises each chunk of per-example gradients G_b = dy_bᵀ x_b in fp32 with a
batched matmul and reads it back for |G_b|² and dW (gnsrepro.pegn._weight_grad_and_sqnorms), and `triton`, one
kernel that keeps each G_b tile in registers (gnsrepro.kernels.per_example_grad). Which is faster depends on the
shape: for the 50304-wide tied head the torch path writes 824 MB a micro-batch of 16 at 20M and reads it twice,
which the kernel does not (on one H200, replayed from a CUDA graph: 1.07 against 1.87 ms at 20M, 5.57 against
9.34 ms at 111M, docs/benchmarks.md); for the small Linear layers of a small model the kernel is faster alone but
the whole compiled step is slower with it (20M: 1.170x gns=off's step with every layer on it, 1.141x with none).
So auto reads the choice from measurements: linear_backend.csv beside this module, one row per shape, written by
the tuning tool `python -m benchmarks.tuning.per_example_grad --record`, which also sweeps the kernel's tiles for
the shape and records the fastest (the tied heads only: the small layers' isolated times mislead, as above). A
shape with no row on this GPU (or its family) takes torch, the package's path before the kernel existed;
the kernel's tiles then come from its heuristic (per_example_grad._tiles).

Columns of linear_backend.csv (TABLE_COLUMNS):
  device        torch.cuda.get_device_name() of the GPU measured on, e.g. "NVIDIA H200"
  dtype         the inputs' dtype: bfloat16 | float16 | float32
  batch         examples B of x (B, T, K) and dy (B, T, L)
  seq_len       T
  in_features   K, the layer's input width
  out_features  L, its output width (the vocabulary for the tied head)
  tied_head     True where the timings include the head's rows at the example's ids, as the tied head computes
                them (torch: gathered from the per-example gradients; triton: copied out of the kernel's tiles);
                False for a plain Linear layer
  torch_ms      median time of the torch path (dW, |G_b|² and, for the head, its rows), replayed from a CUDA graph
  triton_ms     the same with the kernel at the tiles below
  faster        "torch" or "triton": the smaller time (torch on a tie)
  block_l, block_k, block_t, num_warps, num_stages   the kernel's fastest tiles in the sweep (per_example_grad.Tiles)
  date, commit, command   when, at which code (git short hash, "-dirty" when tracked files differed), and how
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pandas as pd

from gnsrepro.kernels.backend_table import check_measured_rows, gpu_family, replace_rows, rows_of_device

LINEAR_BACKEND_TABLE = Path(__file__).with_name("linear_backend.csv")
TILE_COLUMNS = ("block_l", "block_k", "block_t", "num_warps", "num_stages")
TABLE_COLUMNS = ("device", "dtype", "batch", "seq_len", "in_features", "out_features", "tied_head", "torch_ms",
                 "triton_ms", "faster", *TILE_COLUMNS, "date", "commit", "command")
SITUATION_KEY = ("device", "dtype", "batch", "seq_len", "in_features", "out_features", "tied_head")
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_BACKEND = "torch"  # a shape with no measurement: the path that needs no kernel


def read_table(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """linear_backend.csv (LINEAR_BACKEND_TABLE unless path is given) as a DataFrame of TABLE_COLUMNS; an empty one
    when the file does not exist. Raises ValueError for a malformed table (check_table)."""
    path = Path(LINEAR_BACKEND_TABLE if path is None else path)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in TABLE_COLUMNS})
    df = pd.read_csv(path, dtype={c: str for c in ("device", "dtype", "faster", "date", "commit", "command")},
                     keep_default_na=False)
    check_table(df, str(path))
    return df


def check_table(df: pd.DataFrame, where: str = "linear_backend table") -> None:
    """Raise ValueError naming the first problem: the columns, a dtype not in DTYPES, a tied_head that is not a
    boolean, a shape or tile that is not a positive integer, a time that is not a positive number, a `faster` that
    is not the backend with the smaller time, an empty device, date or command, or two rows for one situation."""
    for i, dtype in enumerate(df["dtype"] if "dtype" in df else [], start=1):
        if dtype not in DTYPES:
            raise ValueError(f"{where} row {i}: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    check_measured_rows(df, where, TABLE_COLUMNS, SITUATION_KEY, ("tied_head",),
                        ("batch", "seq_len", "in_features", "out_features", *TILE_COLUMNS))


def nearest_row(device_name: str, dtype: str, in_features: int, out_features: int, tied_head: bool | None = None,
                table: str | os.PathLike | pd.DataFrame | None = None) -> dict | None:
    """The recorded row for this shape (K, L), dtype and (unless None) tied_head on this device name, else its GPU
    model, else its family (backend_table.rows_of_device: H100 and H200 stand in for each other); of several (other
    B, T), the latest date, then the row last in the table. None when there is no such row."""
    df = table if isinstance(table, pd.DataFrame) else read_table(table)
    same = ((df["dtype"] == dtype) & (df["in_features"].astype(int) == in_features)
            & (df["out_features"].astype(int) == out_features))
    if tied_head is not None:
        same &= df["tied_head"].astype(str) == str(bool(tied_head))
    rows = rows_of_device(df[same], device_name)
    if rows.empty:
        return None
    return rows.sort_values("date", kind="stable").iloc[-1].to_dict()


def choose_linear_backend(device_name: str, dtype: str, in_features: int, out_features: int, tied_head: bool,
                          table: str | os.PathLike | pd.DataFrame | None = None) -> tuple[str, str]:
    """(backend, why) for a Linear layer (or the tied head) K -> L on a CUDA GPU: the `faster` of the recorded row
    (nearest_row), or DEFAULT_BACKEND (torch) where none is recorded."""
    row = nearest_row(device_name, dtype, in_features, out_features, tied_head, table)
    shape = ("the tied head " if tied_head else "") + f"{in_features} -> {out_features}"
    if row is None:
        return DEFAULT_BACKEND, (f"no {dtype} measurement of {shape} for {device_name} ({gpu_family(device_name)}) "
                                 f"in linear_backend.csv: {DEFAULT_BACKEND}")
    return str(row["faster"]), (f"{shape}: {row['device']}, B {row['batch']}, T {row['seq_len']} ({row['date']}): "
                                f"torch {float(row['torch_ms']):.2f} ms, triton {float(row['triton_ms']):.2f} ms")


@functools.cache
def recorded_tiles(device_name: str, dtype: str, in_features: int, out_features: int) -> tuple[int, ...] | None:
    """The kernel's tiles (TILE_COLUMNS, in order) recorded for this shape and dtype on this GPU or its family, or
    None. Cached: the kernel's launcher asks once per shape, not per call."""
    row = nearest_row(device_name, dtype, in_features, out_features)
    return None if row is None else tuple(int(row[c]) for c in TILE_COLUMNS)


def record_linear_backend(rows: list[dict], path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Write rows (dicts of TABLE_COLUMNS) into linear_backend.csv, each replacing the row of its situation
    (SITUATION_KEY) if there is one; sorted by situation, written atomically. Returns the table."""
    path = Path(LINEAR_BACKEND_TABLE if path is None else path)
    table = replace_rows(path, read_table(path), rows, TABLE_COLUMNS, SITUATION_KEY, ("tied_head",), check_table)
    recorded_tiles.cache_clear()
    return table
