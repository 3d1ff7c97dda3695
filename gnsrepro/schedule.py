"""Batch-size schedules: the training loop asks one for the batch size (sequences) at every step."""

from __future__ import annotations

from gnsrepro.config import ScheduleConfig
from gnsrepro.errors import ConfigError

SCHEDULES = ("constant",)


class ConstantBatch:
    """The same number of sequences at every step (the paper's fixed-batch baseline: 120)."""

    def __init__(self, batch_size: int):
        self.size = batch_size

    def batch_size(self, step: int, tokens: int) -> int:
        return self.size

    def max_batch_size(self) -> int:
        return self.size


def build_schedule(cfg: ScheduleConfig) -> ConstantBatch:
    if cfg.name == "constant":
        return ConstantBatch(cfg.batch_size)
    raise ConfigError(f"schedule={cfg.name!r} is not known; accepted: {', '.join(SCHEDULES)}")
