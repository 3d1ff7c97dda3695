"""Which fused attention kernel F.scaled_dot_product_attention runs, and how fast, at the models' shapes.

    python -m benchmarks.attention_kernels [--models 20M,111M] [--micro 16]

For each model of conf/model (its heads, head size and context) at the micro-batch given: the SDPA priority order
PyTorch starts with, then for each kernel order (PyTorch's own; flash first; cuDNN first, as model.sdpa_backend=cudnn
asks) the aten op that ran (forward and backward) and the median forward + backward time of bf16 causal attention
over CUDA events. A tuning tool behind model.sdpa_backend=auto's choice, not part of the package.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from gnsrepro.benchmarks.layernorm import time_us
from gnsrepro.config import named_model
from gnsrepro.model import SDPA_ORDERS

ORDERS = {
    "pytorch": None,
    **SDPA_ORDERS,
}


def fwd_bwd(q, k, v, dy, order):
    def run():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.backward(dy)
    if order is None:
        return run()
    with sdpa_kernel(order, set_priority=True):
        run()


def ops_run(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.key.removeprefix("aten::") for e in prof.key_averages()
                   if e.key.startswith("aten::_scaled_dot_product_") or e.key.startswith("aten::_flash")
                   or e.key.startswith("aten::_efficient") or e.key.startswith("aten::_cudnn")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="20M,111M")
    ap.add_argument("--micro", type=int, default=16)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cuDNN {torch.backends.cudnn.version()} | "
          f"SDPA priority order at start: {torch._C._get_sdp_priority_order()}")
    for name in args.models.split(","):
        m = named_model(name)
        B, H, T, D = args.micro, m.n_head, m.block_size, m.n_embd // m.n_head
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dy = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        times = {}
        for label, order in ORDERS.items():
            ops = ops_run(partial(fwd_bwd, q, k, v, dy, order))
            times[label] = time_us(partial(fwd_bwd, q, k, v, dy, order), 3, 20) / 1e3
            print(f"{name:>5} B={B} H={H} T={T} D={D} | {label:<7} {times[label]:7.3f} ms fwd+bwd | {', '.join(ops)}")
        # interleaved repeat: the clocks drift between the blocks above
        again = {label: time_us(partial(fwd_bwd, q, k, v, dy, order), 3, 20) / 1e3 for label, order in ORDERS.items()}
        print(f"{name:>5} again: " + ", ".join(f"{label} {t:.3f} ms" for label, t in again.items()))


if __name__ == "__main__":
    main()
