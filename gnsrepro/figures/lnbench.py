"""`figure=lnbench`: LayerNorm forward+backward time against hidden size, the Triton kernel with per-example
norms against PyTorch's own, per dtype (Gray et al. 2024, p. 8 right).

Reads the parquet that `gnsrepro bench layernorm` writes (gnsrepro/benchmarks/layernorm.py `run`; one
row per hidden size N and dtype). Its timings: eager (`torch_us`, `triton_us`, `torch_pe_us`: host time
included, which dominates below N = 4096), replayed from a CUDA graph (`graph_*_us`) and device time in
the stream right after another kernel (`stream_*_us`, as inside a training step). Solid lines are the
device time in the stream (graph replay, else eager, for an older table without it), dashed lines the
eager time; the dotted floor is the bytes any LayerNorm moves (5·M·N·b, `bytes`) at the measured copy
bandwidth (`copy_gbps`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from gnsrepro.errors import ConfigError
from gnsrepro.figures.common import new_figure, save

DEFAULT_TABLE = "outputs/bench/layernorm.parquet"  # gnsrepro.benchmarks.layernorm.DEFAULT_OUT
REQUIRED_COLUMNS = ("N", "dtype", "torch_us", "triton_us")
CONTENDERS = {"torch": ("PyTorch F.layer_norm", "tab:blue"), "triton": ("Triton + per-example norms", "tab:orange")}


def read_bench_table(table: str | os.PathLike) -> pd.DataFrame:
    """The benchmark table at `table`; ConfigError (one line) for a missing, unreadable or foreign file."""
    path = Path(table)
    if not path.exists():
        raise ConfigError(f"table={path} does not exist (gnsrepro bench layernorm writes {DEFAULT_TABLE} on a GPU)")
    if path.is_dir():
        raise ConfigError(f"table={path} is a directory; figure=lnbench takes the parquet file of "
                          "gnsrepro bench layernorm")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow's errors for a foreign file have no common base class
        raise ConfigError(f"table={path} is not a readable parquet table: {type(e).__name__}: {e}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"table={path} lacks the column(s) {', '.join(missing)}: it is not the output of "
                          "gnsrepro bench layernorm")
    return df


def device_time_kind(df: pd.DataFrame) -> tuple[str, str]:
    """(column prefix, description) of the best device-time measurement the table has."""
    if {"stream_torch_us", "stream_triton_us"} <= set(df.columns):
        return "stream_", "device time in the stream"
    if {"graph_torch_us", "graph_triton_us"} <= set(df.columns):
        return "graph_", "CUDA-graph replay"
    return "", "eager"


def lnbench_values(df: pd.DataFrame) -> pd.DataFrame:
    """The plotted values, long: dtype, N, series, time_us (series: torch / triton with _device or _eager,
    torch_pe_eager, copy_floor)."""
    prefix, _ = device_time_kind(df)
    rows = []
    for r in df.itertuples(index=False):
        r = r._asdict()
        series = {f"{c}_eager": r[f"{c}_us"] for c in CONTENDERS}
        if prefix:
            series |= {f"{c}_device": r[f"{prefix}{c}_us"] for c in CONTENDERS}
        if "torch_pe_us" in r:
            series["torch_pe_eager"] = r["torch_pe_us"]
        if "bytes" in r and "copy_gbps" in r:
            series["copy_floor"] = r["bytes"] / (r["copy_gbps"] * 1e9) * 1e6
        rows += [{"dtype": r["dtype"], "N": int(r["N"]), "series": k, "time_us": float(v)} for k, v in series.items()]
    return pd.DataFrame(rows)


def _title(df: pd.DataFrame) -> str:
    m = df.iloc[0]
    parts = ["LayerNorm forward+backward"]
    if "B" in df and "T" in df:
        parts[0] += f" over {int(m['B'])}x{int(m['T'])} rows"
    for key, fmt in (("device_name", "{}"), ("torch", "torch {}"), ("triton", "triton {}"), ("date", "{}")):
        if key in df:
            parts.append(fmt.format(m[key]))
    return ", ".join(parts)


def draw_lnbench(df: pd.DataFrame, values: pd.DataFrame):
    """One panel per dtype: time (µs, log) against hidden size (log2)."""
    _, device_kind = device_time_kind(df)
    dtypes = list(dict.fromkeys(df["dtype"]))
    fig = new_figure(5.6 * len(dtypes), 4.9)
    axes = np.atleast_1d(fig.subplots(1, len(dtypes), squeeze=False).ravel())
    for ax, dtype in zip(axes, dtypes):
        v = values[values["dtype"] == dtype]

        def line(series, ax=ax, v=v, **style):
            s = v[v["series"] == series].sort_values("N")
            if len(s):
                ax.plot(s["N"], s["time_us"], **style)

        for c, (label, colour) in CONTENDERS.items():
            if device_kind != "eager":
                line(f"{c}_device", color=colour, marker="o", label=f"{label} ({device_kind})")
                line(f"{c}_eager", color=colour, ls="--", lw=1, alpha=0.7, label=f"{label} (eager, host included)")
            else:
                line(f"{c}_eager", color=colour, marker="o", label=f"{label} (eager)")
        line("torch_pe_eager", color="tab:green", ls="--", lw=1, alpha=0.7,
             label="plain-PyTorch per-example norms (eager)")
        line("copy_floor", color="0.5", ls=":", label="bytes moved at copy bandwidth")
        sizes = sorted(v["N"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("hidden size N")
        ax.set_ylabel("forward + backward time (µs)")
        ax.set_title(dtype, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle(_title(df), fontsize=10)
    return fig


def lnbench(table: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """Draw the LayerNorm benchmark of `table` (a `gnsrepro bench layernorm` parquet) to `<out>.png`,
    `<out>.pdf` and the plotted values (`lnbench_values`) to `<out>.parquet`; return the paths."""
    df = read_bench_table(table)
    values = lnbench_values(df)
    return save(draw_lnbench(df, values), out, values)
