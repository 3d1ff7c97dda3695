"""A run's logs: the two parquet tables (columns declared once, here), the smoothed GNS and the console line.

Tables are crash-safe: a flush writes the whole table to a temporary file and renames it over the old one, so a
run killed at any moment leaves a readable file holding every row up to its last flush. On resume the rows
logged after the checkpoint being resumed are dropped (the resumed run logs those steps again), so the table has
no duplicated or missing steps. Tables here are small (a row per step, or per step and group), so rewriting is
cheap next to a training step.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pandas as pd
import torch

from gnsrepro.errors import DivergedError
from gnsrepro.gns import EMAGNS, HampelFilter
from gnsrepro.schema import GNS_COLUMNS, METRIC_COLUMNS


class ParquetLog:
    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, columns: dict[str, str] | None = None):
        """Open `path`; with resume_step, keep only the existing rows with step <= resume_step. columns: name ->
        dtype of every row (METRIC_COLUMNS, GNS_COLUMNS); None takes the rows' own keys."""
        self.path = Path(path)
        self.columns = columns
        self._frames: list[pd.DataFrame] = []
        self._pending: list[dict] = []
        if resume_step is not None and self.path.exists():
            old = pd.read_parquet(self.path)
            self._frames.append(old[old["step"] <= resume_step])
            self.flush()

    def append(self, rows: list[dict]) -> None:
        self._pending.extend(rows)

    def frame(self) -> pd.DataFrame:
        if self._pending:
            new = pd.DataFrame(self._pending, columns=list(self.columns) if self.columns else None)
            new = new.astype(self.columns) if self.columns else new
            self._frames.append(new)
            self._pending = []
        if len(self._frames) > 1:
            self._frames = [pd.concat(self._frames, ignore_index=True)]
        if self._frames:
            return self._frames[0]
        return pd.DataFrame(columns=list(self.columns or [])).astype(self.columns or {})

    def flush(self) -> None:
        df = self.frame()
        if df.empty and not self.path.exists():
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.path)


def fmt_count(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunLogger:
    """Owns a run's metrics and GNS tables, the smoothed GNS (console and GNS-driven schedules) and the console.

    `record` takes a finished step's row with the loss and gradient norm still on the device; `flush` fetches a
    log interval's values in one transfer each, logs them and prints one line. Every rank keeps the smoothed GNS
    (its inputs are all-reduced, so every rank has the same, and a GNS-driven schedule chooses the same batch on
    every rank); only the writer (rank 0) writes files and prints.
    """

    def __init__(self, out: Path, tracker, ema_alpha: float, resume_step: int, writer: bool, flops_per_token: float,
                 peak_flops: float | None, world_size: int, total_tokens: int, start_tokens: int,
                 outlier_guard: bool = True):
        self.out, self.tracker, self.writer = out, tracker, writer
        # the smoothed GNS that the console shows and a GNS-driven schedule acts on; with outlier_guard a step's
        # component far outside its recent history is clipped first (gnsrepro.gns.HampelFilter), so one gradient
        # spike does not move it for the rest of the run. The logs keep the raw components.
        self.ema = EMAGNS(ema_alpha, guard=HampelFilter() if outlier_guard else None)
        self.ema_alpha = ema_alpha
        self.smoothed: dict[tuple[str, str], float] = {}  # (source, group) -> smoothed GNS, guarded
        self.metrics = self.gns = None
        if writer:
            self.metrics = ParquetLog(out / "metrics.parquet", resume_step, METRIC_COLUMNS)
            self.gns = ParquetLog(out / "gns.parquet", resume_step, GNS_COLUMNS)
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak_flops, world_size
        self.total_tokens, self.start_tokens = total_tokens, start_tokens
        self.t_start = time.perf_counter()
        self.pending: list[dict] = []  # the interval's rows, loss and grad_norm on the device until the flush
        self.flushing = False  # inside flush (an interrupt there must not log the rows twice)

    def record(self, row: dict) -> None:
        self.pending.append(row)

    def gns_of(self, source: str, group: str) -> float | None:
        return self.smoothed.get((source, group))

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])

    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOP utilisation at this throughput (NaN without a known peak)."""
        return self.flops_per_token * tokens_per_s / (self.peak * self.world_size) if self.peak else math.nan

    def flush(self, val_loss: float | None = None, checkpointed: bool = False, print_line: bool = True) -> None:
        """Log the interval's steps and print one line; a non-finite loss logs the steps before it, then stops
        the run with DivergedError (`checkpointed`: whether a checkpoint exists to continue from)."""
        if not self.pending:
            return
        self.flushing = True
        pending = self.pending
        fetched = torch.stack([torch.stack([r["loss"], r["grad_norm"]]) for r in pending]).float().cpu().tolist()
        steps = [(r["step"], r["tokens"]) for r in pending]
        gns_rows = self.tracker.drain_rows(steps) if self.tracker is not None else []
        bad = next((i for i, (loss, _) in enumerate(fetched) if not math.isfinite(loss)), None)
        bad_step = pending[bad]["step"] if bad is not None else None
        if bad is not None:
            pending, fetched = pending[:bad], fetched[:bad]
            gns_rows = [r for r in gns_rows if r["step"] < bad_step]
        for r, (loss, grad_norm) in zip(pending, fetched):
            r["loss"], r["grad_norm"] = loss, grad_norm
        for row in gns_rows:
            self.smoothed[(row["source"], row["group"])] = self.ema.update(f"{row['source']}/{row['group']}",
                                                                           row["gtg"], row["trsigma"])
        if self.writer and pending:
            self.metrics.append(pending)
            self.gns.append(gns_rows)
            self.metrics.flush()
            self.gns.flush()
            if print_line:
                print(self._line(pending, val_loss), flush=True)
        self.pending = []
        self.flushing = False
        if bad is not None:
            how = (f"the last checkpoint is kept: 'gnsrepro train out_dir={self.out} resume=true optim.lr=...' "
                   "continues from it with a lower learning rate" if checkpointed else
                   "no checkpoint was written yet: start again with a lower optim.lr or more optim.warmup_tokens")
            raise DivergedError(f"the loss is not finite at step {bad_step}; stopping ({how})")

    def _line(self, pending: list[dict], val_loss: float | None) -> str:
        last = pending[-1]
        # throughput over the interval: on a GPU one step's host time is not its device time (the host runs
        # ahead, then waits at the flush), but an interval's sum is
        tok_s = sum(r["tokens_per_s"] * r["step_time_s"] for r in pending) / sum(r["step_time_s"] for r in pending)
        line = (f"step {last['step']:>6} | tokens {fmt_count(last['tokens']):>7} | loss {last['loss']:.4f} | "
                f"lr {last['lr']:.2e} | bs {last['batch_size']} | {fmt_count(tok_s)} tok/s")
        if self.peak:
            line += f" | mfu {100 * self.flops_per_token * tok_s / (self.peak * self.world_size):.1f}%"
        if val_loss is not None:
            line += f" | val {val_loss:.4f}"
        if self.tracker is not None:
            source = self.tracker.sources[0]  # per_example when instrumented, else microbatch or ddp
            shown = [(g, self.smoothed[(source, g)]) for g in ("total", "layernorm") if (source, g) in self.smoothed]
            line += f" | gns({source}, ema {self.ema_alpha}) " + " ".join(f"{g} {v:.4g}" for g, v in shown)
        elapsed = time.perf_counter() - self.t_start
        done = (last["tokens"] - self.start_tokens) / max(1, self.total_tokens - self.start_tokens)
        if 0 < done < 1:
            line += f" | eta {fmt_time(elapsed / done * (1 - done))}"
        return line
