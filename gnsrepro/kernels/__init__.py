"""Triton kernels: the LayerNorm with per-example norms, the per-example Linear weight gradient, the read-once
per-example sums and the fused cross-entropy, each with its launcher; ``sm_count``, which the launchers size their
grids by; ``brief_inductor_fallback_log``, which keeps torch.compile from hanging on these kernels' custom ops."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The CUDA device's streaming multiprocessors (its process's current device when it has no index), cached."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _brief(arg) -> str:
    """One inductor argument as a short string: scalars and dtypes by value, IR nodes by name, dtype and size."""
    if isinstance(arg, (bool, int, float, str, torch.dtype, torch.device)) or arg is None:
        return repr(arg)
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_brief(a) for a in arg) + "]"
    # an IR node (TensorBox, StorageBox, a buffer): never its __str__, which prints the whole tree behind it
    try:
        described = f"{arg.get_dtype()}, size={list(arg.get_size())}"
    except Exception:
        return type(arg).__name__
    try:
        described = f"{arg.get_name()}, {described}"
    except Exception:
        pass  # not realised into a buffer yet: no name
    return f"{type(arg).__name__}({described})"


def _brief_operator_str(target, args, kwargs) -> str:
    lines = [f"target: {target}"] + [f"args[{i}]: {_brief(a)}" for i, a in enumerate(args)]
    if kwargs:
        lines.append("kwargs: {" + ", ".join(f"{k}: {_brief(v)}" for k, v in kwargs.items()) + "}")
    return "\n".join("  " + line for line in lines)


def brief_inductor_fallback_log() -> None:
    """Make inductor's message about a custom op it falls back to cheap to build (call before torch.compile).

    Inductor has no lowering for this package's custom ops, so it runs each as a fallback kernel, and torch 2.11
    builds the "Creating implicit fallback for" log line eagerly, whatever the log level, from ``str()`` of every
    argument's IR, which prints all the IR behind the argument. Compiling the 20M model's training step with the
    Triton LayerNorm (gns.ln_backend=triton) sat in that ``str()`` for minutes without finishing (faulthandler's
    stack, H200, torch 2.11.0, 2026-12-04); later torch builds the line lazily, and vLLM bounds the same message
    for its custom ops (vllm/env_override.py). Here each argument is named by its buffer, dtype and size instead,
    in that line and in inductor's lowering errors.
    """
    from torch._inductor import exc

    exc.OperatorIssue.operator_str = staticmethod(_brief_operator_str)
