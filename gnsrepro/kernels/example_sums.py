"""The sum over examples and each example's squared norm of materialised per-example gradients, in one read.

The simultaneous method's PyTorch path (gnsrepro.pegn._weight_grad_and_sqnorms, `gns.linear_backend=torch`)
computes a chunk of per-example weight gradients G (c, L, K) in fp32 with one batched matmul, then needs two
reductions of it: dW = Σ_b G_b over the examples and |G_b|² = Σ G_b² within each example. They run along
different axes, so torch (and inductor) read G once for each: twice the bytes of G, on top of the matmul's write
of it. G is the largest tensor of the step's backward (at 111M, micro-batch 16: 453 MB a transformer layer).
Here one kernel reads G once and writes both; in the whole compiled, graphed step on one H200 gns=all went from
1.105x to 1.041x gns=off's at 111M and from 1.125x to 1.102x at 20M (docs/benchmarks.md, "The overhead table"):

- ``_sum_and_sqnorms_kernel``: G is viewed as (B, N), N = L·K. A program owns a block of BLOCK_N columns and
  loads them for BLOCK_B examples at a time, a (BLOCK_B, BLOCK_N) tile, adding the tile's sum over examples
  into its fp32 accumulator of dW and writing each example's Σ g² over its columns into a (B, n_programs) fp32
  buffer of partials. torch sums the partials per example (a few hundred KB at most; under torch.compile outside
  the custom op, so that inductor fuses that sum into its neighbours). No atomics: results are the same run to
  run.
- Bytes: 4·B·N read, 4·N written (dW), 8·B·n_programs for the partials; FLOPs 3·B·N. Memory-bound.

torch.compile: ``sum_and_sqnorms`` is called inside autograd backward functions; under compile it goes through
the ``gnsrepro::sum_and_sqnorm_partials`` custom op (a fake kernel for tracing, no autograd formula), as
gnsrepro.kernels.per_example_grad does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from gnsrepro.kernels import sm_count

BLOCK_B = 16  # examples per load: a chunk of a micro-batch of 16 is one tile
MIN_BLOCK_N, MAX_BLOCK_N = 128, 1024


@triton.jit
def _sum_and_sqnorms_kernel(
    G,  # (B, N) fp32 contiguous: per-example gradients, one row per example
    DW,  # (N,) fp32: Σ_b G[b]
    SQ,  # (B, N_PROGRAMS) fp32: Σ over this program's columns of G[b]², per example
    B,
    N,
    N_PROGRAMS,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # 64-bit: B·N passes 2³¹ for a large chunk
    nmask = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs_b
        bmask = rows < B
        g = tl.load(G + rows.to(tl.int64)[:, None] * N + offs_n[None, :], mask=bmask[:, None] & nmask[None, :],
                    other=0.0)
        acc += tl.sum(g, axis=0)
        tl.store(SQ + rows * N_PROGRAMS + pid, tl.sum(g * g, axis=1), mask=bmask)
    tl.store(DW + offs_n, acc, mask=nmask)


def _block_n(N: int, device: torch.device) -> int:
    """Columns per program: the largest power of two in [MIN_BLOCK_N, MAX_BLOCK_N] that still gives about four
    programs per SM (a small model's layer, N = 256 · 768, is 196,608 columns: 768 programs of 256 on an H200's 132
    SMs), so that enough loads are in flight to fill the memory pipe."""
    if device.type != "cuda":
        return MIN_BLOCK_N
    target = 4 * sm_count(device)
    block = triton.next_power_of_2(max(1, N // target))
    if block > N // target:
        block //= 2
    return max(MIN_BLOCK_N, min(MAX_BLOCK_N, block))


def _n_programs(N: int, block_n: int, device: torch.device) -> tuple[int, int]:
    block = block_n or _block_n(N, device)
    return block, triton.cdiv(N, block)


def sum_and_partials_launch(G: Tensor, block_n: int = 0) -> tuple[Tensor, Tensor]:
    """(Σ_b G[b] (G.shape[1:]) fp32, the (B, n_programs) fp32 partials of |G[b]|²) of G (B, ...) fp32 by the
    Triton kernel. The partials' sum over programs is left to the caller: under torch.compile inductor fuses it
    into the kernel that stacks the layer's norms, where a sum inside the custom op would be a launch of its own
    (36 of them at 20M, 3-4 µs each on an H200). block_n (0: automatic, else a power of two >= 16) overrides the
    columns per program, for the tests."""
    if G.dtype != torch.float32 or G.dim() < 2:
        raise ValueError(f"G must be float32 (B, ...) with at least two dimensions; got {G.dtype} {tuple(G.shape)}")
    B, N = G.shape[0], G.shape[1:].numel()
    block, n_programs = _n_programs(N, block_n, G.device)
    if B * N == 0:
        return G.new_zeros(G.shape[1:]), G.new_zeros((B, n_programs))
    G2 = G.reshape(B, N)
    if not G2.is_contiguous():
        G2 = G2.contiguous()
    dw = torch.empty((N,), dtype=torch.float32, device=G.device)
    partials = torch.empty((B, n_programs), dtype=torch.float32, device=G.device)
    _sum_and_sqnorms_kernel[(n_programs,)](G2, dw, partials, B, N, n_programs, BLOCK_B=BLOCK_B, BLOCK_N=block,
                                          num_warps=8 if block >= 512 else 4)
    return dw.view(G.shape[1:]), partials


def sum_and_sqnorms_launch(G: Tensor, block_n: int = 0) -> tuple[Tensor, Tensor]:
    """(Σ_b G[b] (G.shape[1:]) fp32, |G[b]|² (B,) fp32) of G (B, ...) fp32 by the Triton kernel (sum_and_partials_launch
    and the partials' sum)."""
    dw, partials = sum_and_partials_launch(G, block_n)
    return dw, partials.sum(1)


@torch.library.custom_op("gnsrepro::sum_and_sqnorm_partials", mutates_args=())
def _sum_and_partials_op(G: Tensor) -> tuple[Tensor, Tensor]:
    return sum_and_partials_launch(G)


@_sum_and_partials_op.register_fake
def _(G):
    _, n_programs = _n_programs(G.shape[1:].numel(), 0, G.device)
    return G.new_empty(G.shape[1:]), G.new_empty((G.shape[0], n_programs))


def sum_and_sqnorms(G: Tensor) -> tuple[Tensor, Tensor]:
    """(G.sum(0), G.square().sum over all but the first axis) of fp32 G (B, ...) on a CUDA GPU (or a CPU under
    TRITON_INTERPRET=1), reading G once. Eager calls launch the kernel; under torch.compile the custom op
    ``gnsrepro::sum_and_sqnorm_partials`` is recorded instead, and the partials' sum beside it."""
    if torch.compiler.is_compiling():
        dw, partials = torch.ops.gnsrepro.sum_and_sqnorm_partials(G)
        return dw, partials.sum(1)
    return sum_and_sqnorms_launch(G)


__all__ = ["sum_and_partials_launch", "sum_and_sqnorms", "sum_and_sqnorms_launch"]
