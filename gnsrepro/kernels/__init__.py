"""Triton kernels: the LayerNorm with per-example norms, the per-example Linear weight gradient, the read-once
per-example sums and the fused cross-entropy, each with its launcher; ``sm_count``, which the launchers size their
grids by."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The CUDA device's streaming multiprocessors (its process's current device when it has no index), cached."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
