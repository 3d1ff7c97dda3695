"""The tied head's per-example weight-gradient norms in isolation: where gns=all's cost at small widths goes.

    python -m benchmarks.head_pegn [--models 20M,111M] [--micro 16] [--slice-mb 8,16,32]

gns=all's simultaneous method writes each example's head gradient G_b = dlogitsᵀ_b x_b (V x d, fp32; 824 MB a
micro-batch of 16 at 20M) and reads it back for |G_b|² and dW = Σ_b G_b (gnsrepro.pegn._weight_grad_and_sqnorms).
This times, for bf16 inputs of each model's head shape, each call replayed from a CUDA graph (as the training
step is) and checked against the package's path:

  dW only        dlogitsᵀ x in one matmul: what gns=off's backward computes (the floor)
  package        the package's path (examples in chunks of at most 256 MB of G, rows gathered from G)
  sliced S MB    the package's path with gns.chunk_mb=S: one example and a slice of the vocabulary at a time,
                 so that each G slice (S MB) can stay in L2 between the matmul that writes it and the
                 reductions that read it; the rows as the ghost branch gets them (pegn._head_rows, no G)
  triton         gns.linear_backend=triton's kernel (gnsrepro/kernels/per_example_grad.py), which never
                 writes G

A tuning tool, to choose gns.chunk_mb's default by measurement; not part of the package.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from gnsrepro.benchmarks.layernorm import capture, time_us
from gnsrepro.config import named_model
from gnsrepro.pegn import _matmul_acc, _weight_grad_and_sqnorms


def time_head(name: str, micro: int, slice_mbs: list[int]) -> None:
    """Print each variant's graphed time at model `name`'s head shape, and its distance to the package's path."""
    m = named_model(name)
    B, T, K, V = micro, m.block_size, m.n_embd, m.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, K, device="cuda", generator=gen).bfloat16()
    dy = (torch.randn(B, T, V, device="cuda", generator=gen) / V).bfloat16()
    ids = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    variants = {
        "dW only": lambda: _matmul_acc(dy.reshape(-1, V).t(), x.reshape(-1, K), torch.float32),
        "package": lambda: _weight_grad_and_sqnorms(x, dy, "simultaneous", 0, ids=ids),
        **{f"sliced {mb} MB": partial(_weight_grad_and_sqnorms, x, dy, "simultaneous", 0, ids=ids,
                                      chunk_bytes=mb * 2**20) for mb in slice_mbs},
        "triton": lambda: _weight_grad_and_sqnorms(x, dy, "simultaneous", 0, ids=ids, backend="triton"),
    }
    print(f"{name}: B={B} T={T} d={K} V={V}, G of the micro-batch {B * V * K * 4 / 2**20:.0f} MB")
    ref = None
    for label, fn in variants.items():
        ms = time_us(capture(fn).replay, warmup=2, steps=20) / 1e3  # replayed from a CUDA graph, as the step is
        out = fn()
        check = ""
        if label == "package":
            ref = out
        elif ref is not None:
            errs = [((a - b).norm() / b.norm()).item() for a, b in zip(out, ref)]
            check = "  rel. diff to package: dW {:.1e}, |G_b|² {:.1e}, rows {:.1e}".format(*errs)
        print(f"  {label:<14} {ms:8.3f} ms{check}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="20M,111M")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--slice-mb", default="8,16,32")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for name in args.models.split(","):
        time_head(name, args.micro, [int(mb) for mb in args.slice_mb.split(",")])


if __name__ == "__main__":
    main()
