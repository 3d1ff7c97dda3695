"""Crash-safe parquet logs: one file per table, rewritten atomically at every flush.

A flush writes the whole table to a temporary file and renames it over the old one, so a run killed at
any moment leaves a readable file holding every row up to its last flush. On resume the rows logged
after the checkpoint being resumed are dropped (the resumed run logs those steps again), so the table
has no duplicated or missing steps. Tables here are small (a row per step, or per step and group), so
rewriting is cheap next to a training step.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


class ParquetLog:
    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        """Open `path`; with resume_step, keep only the existing rows with step <= resume_step."""
        self.path = Path(path)
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
            self._frames.append(pd.DataFrame(self._pending))
            self._pending = []
        if len(self._frames) > 1:
            self._frames = [pd.concat(self._frames, ignore_index=True)]
        return self._frames[0] if self._frames else pd.DataFrame()

    def flush(self) -> None:
        df = self.frame()
        if df.empty and not self.path.exists():
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.path)
