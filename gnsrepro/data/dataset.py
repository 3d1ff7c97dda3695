"""Random (x, y) batches from a prepared split, as pure functions of a seed and a position.

Training reads by sequence index: the n-th training sequence of a run starts at `sequence_offsets(..., n, 1,
seed)`, whatever the batch-size schedule, so a schedule comparison is not also a data comparison, and a resumed
run reads exactly the sequences it would have read without stopping. A global batch is the same however it is
divided: compute the offsets of the whole global batch, then let each DDP rank and micro-batch read its own
slice of them with `read_batch`. Validation uses a fixed set drawn once by `batch_offsets`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gnsrepro.data.prepare import DTYPE, DataError


def open_split(directory: str | os.PathLike, split: str) -> np.memmap:
    """The tokens of data_dir/name/<split>.bin as a read-only uint16 memmap (nothing is read until indexed)."""
    path = Path(directory) / f"{split}.bin"
    redo = f"re-run `gnsrepro prepare data={Path(directory).name}`"
    if not path.is_file():
        raise DataError(f"{path} is missing; {redo}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; {redo}")
    return np.memmap(path, dtype=DTYPE, mode="r")


def batch_offsets(num_tokens: int, seq_len: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """(batch_size,) int64 start offsets in [0, num_tokens - seq_len - 1], drawn from rng([seed, step]).

    Each offset leaves room for seq_len + 1 tokens: the inputs and the targets shifted by one.
    """
    if num_tokens < seq_len + 1:
        raise DataError(
            f"the split has {num_tokens:,} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or a larger corpus (e.g. data.max_bytes for pycode)"
        )
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len, size=batch_size, dtype=np.int64)


SEQUENCE_BLOCK = 4096  # sequence offsets are drawn in blocks of this many, each from rng([seed, block])


def sequence_offsets(num_tokens: int, seq_len: int, start: int, count: int, seed: int) -> np.ndarray:
    """(count,) int64 start offsets of training sequences start, ..., start + count - 1 of a run.

    Sequence n's offset is element n % SEQUENCE_BLOCK of the block rng([seed, n // SEQUENCE_BLOCK]) draws, so it
    depends on (seed, n) only: not on how the sequences are grouped into steps.
    """
    first, last = start // SEQUENCE_BLOCK, (start + count - 1) // SEQUENCE_BLOCK
    blocks = [batch_offsets(num_tokens, seq_len, SEQUENCE_BLOCK, seed, b) for b in range(first, last + 1)]
    flat = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    begin = start - first * SEQUENCE_BLOCK
    return flat[begin:begin + count]


def read_batch(
    tokens: np.ndarray, offsets: np.ndarray, seq_len: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): int64 tensors of shape (len(offsets), seq_len) on device; y[:, t] is the token after x[:, t].

    On CUDA the host copy is pinned and transferred asynchronously, so reading overlaps the previous step.
    """
    window = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    rows = tokens[window].astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
