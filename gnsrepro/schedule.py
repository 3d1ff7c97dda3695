"""Batch-size schedules: the training loop asks one for each step's batch size (sequences).

Three schedules, each typed by its own config class (gnsrepro.config, conf/schedule/):

- `constant`: `schedule.batch_size` sequences at every step (the paper's fixed-batch baseline, 120 at 111M).
- `linear`: the paper's schedule (Gray et al. 2024, the batch-size schedule experiment; the authors' nanoGNS
  code): the batch grows linearly in tokens seen from `start` to `batch_size` over `ramp_tokens`, rounded to a
  whole number of micro-batches x ranks.
- `gns`: beyond the paper. At most every `interval` steps the batch becomes `multiplier` x the smoothed GNS
  measured so far (docs/schedules.md has the control law and why it is stable).

For every schedule `schedule.batch_size` is the largest batch it may ask for: it sizes the GNS tracker and the
learning-rate horizon, and a request above it is an error, not a silent cap. Batch sizes are in sequences, the
unit of the GNS's b_big, so a GNS of 40 means 40 sequences. A schedule's state (the GNS schedule's current batch
and when it last changed) is in `state_dict()`, saved with each checkpoint, so a resumed run takes the batches
an uninterrupted one would.
"""

from __future__ import annotations

import math

from gnsrepro.config import ScheduleConfig
from gnsrepro.errors import ConfigError

SCHEDULES = ("constant", "linear", "gns")
LR_SCALINGS = ("none", "sqrt", "linear")


def round_to_quantum(size: float, quantum: int) -> int:
    """The nearest positive multiple of quantum (the sequences of one micro-batch on every rank)."""
    return max(quantum, quantum * round(size / quantum))


class ConstantBatch:
    """The same number of sequences at every step."""

    def __init__(self, batch_size: int):
        self.size = batch_size

    def batch_size(self, step: int, tokens: int) -> int:
        return self.size

    def max_batch_size(self) -> int:
        return self.size

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LinearBatch:
    """start + (end - start) * min(1, tokens / ramp_tokens) sequences, rounded to a multiple of quantum.

    The authors' setting at 111M: 16 -> 120 sequences over the whole run (2.22e9 tokens) with micro-batches of 8,
    an average batch of about 57 sequences (experiment=111M_linear).
    """

    def __init__(self, start: int, end: int, ramp_tokens: int, quantum: int):
        self.start, self.end, self.ramp_tokens, self.quantum = start, end, ramp_tokens, quantum

    def batch_size(self, step: int, tokens: int) -> int:
        frac = min(1.0, tokens / self.ramp_tokens)
        return min(self.end, round_to_quantum(self.start + (self.end - self.start) * frac, self.quantum))

    def max_batch_size(self) -> int:
        return self.end

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GNSBatch:
    """The batch follows the measured GNS: `multiplier` x GNS (x `total_ratio`), within [min, max].

    The loop calls `update(step, gns)` at the step boundaries where `wants_update(step)` is true, with the
    smoothed, outlier-guarded GNS of the configured source and group (None while it has none). The control law
    (docs/schedules.md):

        target = clamp(multiplier * total_ratio * gns, min, max), rounded to whole micro-batches x ranks
        new    = clamp(target, current / max_factor, current * max_factor)   (at most a factor per change)
        new    = max(new, current)  unless allow_decrease
    changed at most every `interval` steps and not before `warmup_steps`; a GNS that is missing, not finite or
    not positive changes nothing.
    """

    def __init__(self, min_size: int, max_size: int, quantum: int, multiplier: float, total_ratio: float,
                 interval: int, max_factor: float, allow_decrease: bool, warmup_steps: int = 0):
        self.min_size, self.max_size, self.quantum = min_size, max_size, quantum
        self.multiplier, self.total_ratio = multiplier, total_ratio
        self.interval, self.max_factor, self.allow_decrease = interval, max_factor, allow_decrease
        self.warmup_steps = warmup_steps
        self.size = min_size
        self.last_gns = math.nan  # the GNS the current batch was chosen from (NaN before the first change)

    def batch_size(self, step: int, tokens: int) -> int:
        return self.size

    def max_batch_size(self) -> int:
        return self.max_size

    def wants_update(self, step: int) -> bool:
        return step > 0 and step >= self.warmup_steps and step % self.interval == 0

    def target(self, gns: float) -> int:
        """The batch this law asks for at a GNS of `gns` sequences, before the rate limits."""
        wanted = min(self.max_size, max(self.min_size, self.multiplier * self.total_ratio * gns))
        return min(self.max_size, round_to_quantum(wanted, self.quantum))

    def update(self, step: int, gns: float | None) -> int:
        if gns is None or not math.isfinite(gns) or gns <= 0:
            return self.size
        new = self.target(gns)
        # at most a factor max_factor per change, but always at least one quantum (else a small batch could
        # never move: 8 x 1.5 = 12 rounds back down to 8)
        up = max(self.size + self.quantum, self.quantum * math.floor(self.size * self.max_factor / self.quantum))
        down = min(self.size - self.quantum, self.quantum * math.ceil(self.size / self.max_factor / self.quantum))
        new = min(max(new, down), up)
        if not self.allow_decrease:
            new = max(new, self.size)
        self.size, self.last_gns = new, gns
        return new

    def state_dict(self) -> dict:
        return {"size": self.size, "last_gns": self.last_gns}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.last_gns = int(state["size"]), float(state["last_gns"])


def smallest_batch(cfg: ScheduleConfig, world_size: int) -> int:
    return cfg.micro_batch_size * world_size


def ramp_over_steps(start: int, end: int, quantum: int, steps: int, seq_len: int) -> int:
    """The ramp length in tokens at which a linear ramp of `steps` steps ends as it reaches `end`.

    A run given in steps sees a number of tokens that depends on the ramp, so the ramp is the fixed point
    R = tokens(steps | ramp R): the tokens fall as R grows, so bisection finds the smallest R with
    tokens(R) <= R.
    """

    def tokens_after(ramp: int) -> int:
        law, tokens = LinearBatch(start, end, ramp, quantum), 0
        for step in range(steps):
            tokens += law.batch_size(step, tokens) * seq_len
        return tokens

    lo, hi = 1, end * steps * seq_len
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if tokens_after(mid) <= mid else (mid + 1, hi)
    return lo


def build_schedule(cfg: ScheduleConfig, world_size: int = 1, max_tokens: int | None = None,
                   max_steps: int | None = None, seq_len: int | None = None):
    """The schedule cfg names, for a run of max_tokens (or max_steps of seq_len tokens a sequence): the linear
    ramp's default length is the whole run."""
    quantum = smallest_batch(cfg, world_size)
    if cfg.name == "constant":
        return ConstantBatch(cfg.batch_size)
    if cfg.name == "linear":
        start = cfg.start if cfg.start is not None else quantum
        ramp = cfg.ramp_tokens if cfg.ramp_tokens is not None else max_tokens
        if ramp is None and max_steps is not None and seq_len is not None:
            ramp = ramp_over_steps(start, cfg.batch_size, quantum, max_steps, seq_len)
        if ramp is None:
            raise ConfigError("schedule=linear needs max_tokens=N, max_steps=N or schedule.ramp_tokens=N (the tokens "
                              "over which the batch grows)")
        return LinearBatch(start, cfg.batch_size, ramp, quantum)
    if cfg.name == "gns":
        low = cfg.min_batch_size if cfg.min_batch_size is not None else quantum
        ratio = cfg.total_ratio if cfg.total_ratio is not None else 1.0
        return GNSBatch(low, cfg.batch_size, quantum, cfg.multiplier, ratio, cfg.interval, cfg.max_factor,
                        cfg.allow_decrease, cfg.warmup_steps)
    raise ConfigError(f"schedule={cfg.name!r} is not known; accepted: {', '.join(SCHEDULES)}")


def lr_multiplier(cfg: ScheduleConfig, batch_size: int) -> float:
    """schedule.lr_scaling: the learning rate x (batch / reference)^p, p = 0 (none), 1/2 (sqrt) or 1 (linear).

    The reference batch is schedule.lr_reference_batch, by default schedule.batch_size (the largest batch, so a
    schedule's LR never exceeds the configured one). sqrt is what OLMo-core's batch-size scheduler does for Adam
    (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"); the paper's schedule
    keeps the learning rate as it is (none).
    """
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[cfg.lr_scaling]
    reference = cfg.lr_reference_batch if cfg.lr_reference_batch is not None else cfg.batch_size
    return (batch_size / reference) ** power
