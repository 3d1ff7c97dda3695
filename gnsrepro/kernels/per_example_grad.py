"""The weight gradient of a Linear layer and its per-example squared norms in one pass (Triton).

For y = x Wᵀ with x (B, T, K) and the incoming gradient dy (B, T, L), example b's weight gradient is the
(L, K) matrix G_b = dy_bᵀ x_b = Σ_t dy_b,t x_b,tᵀ, the weight gradient is dW = Σ_b G_b, and the GNS needs
|G_b|²_F (docs/method.md, section 2, "Linear layers with 3-D inputs"; the paper's "simultaneous" method,
section 3 of arXiv 2411.00999). The PyTorch path (gnsrepro.pegn._weight_grad_and_sqnorms, and
``weight_grad_and_sqnorms_reference`` here) materialises G for a chunk of examples, (c, L, K) in fp32, and
reads it back twice, for the squares and for the sum over b. Here no G_b leaves the registers:

- ``_weight_grad_sqnorms_kernel``: a program per (L-tile, K-tile) of W (and per group of examples, below)
  loops over its examples b; for each it computes the tile of G_b, acc_b = dy[b, :, Ltile]ᵀ · x[b, :, Ktile],
  by tl.dot over T in blocks of BLOCK_T (fp32 accumulation, whatever the input dtype), adds acc_b into the
  tile's dW accumulator (fp32 registers) and writes the square sums of acc_b's rows (the tile's share of
  |G_b|², BLOCK_L values) into a (B, n_tiles · BLOCK_L) fp32 buffer of partials. dW's tile is written once,
  at the end.
- The partials are summed per example by torch's sum (a (B, n_tiles · BLOCK_L) tensor: 6 MB for the 40M head at
  micro-batch 16). Per row rather than per tile: the sum along a row of the accumulator stays within a warp
  (Hopper's warpgroup MMA gives each warp whole rows), while summing the tile's rows too makes the warps meet
  through shared memory once per example; on an H200 the per-row partials took the head kernel from 0.946 to
  0.900 ms at 20M, 1.863 to 1.676 ms at 40M and 5.026 to 4.360 ms at 111M (micro-batch 16, the rows below
  included, the two timed one after the other; docs/benchmarks.md). No atomics anywhere, so results are the same
  run to run.

Tile sizes: those the tuning sweep recorded for the shape, dtype and GPU (gnsrepro/kernels/linear_backend.csv,
``python -m benchmarks.tuning.per_example_grad --record``), else a heuristic (``_tiles``): for K ≤ 256 one
K-tile covers K (then dy, by far the larger input for the 50304-wide head, is read once); otherwise 128 × 128,
or a tile covering L when L ≤ 256 (x read once). Two fp32 accumulators (acc_b and dW's) of BLOCK_L × BLOCK_K
each sit in registers, so BLOCK_L · BLOCK_K ≤ 16384 (64 registers per thread each at 8 warps).
Every edge is masked (any B, T, K, L).

Example groups: with few tiles (a Linear layer of a small model: K = 256, L = 768 is 12 tiles) one program
per tile would leave most SMs idle, so the examples are split into S groups of consecutive examples, a
program per (tile, group), each writing its own partial dW; torch then sums the S partials (S = 1 writes dW
directly). A group holds whole examples, so each |G_b|² partial still comes from one program. S is the
smallest that gives about two programs per SM (``_example_groups``); the head at micro-batch 16 has S = 1.

Counts, for n_L = ⌈L / BLOCK_L⌉ and n_K = ⌈K / BLOCK_K⌉ tiles and e bytes per input element:
- FLOPs: 2·B·T·K·L for the products, the same as the ordinary dW = dyᵀx (a multiply-add counted as two),
  plus 3·B·K·L for the squares, their sum and the sum over b (in registers), independent of T.
- Bytes: dy read once per K-tile, n_K·B·T·L·e; x read once per L-tile, n_L·B·T·K·e (from L2, mostly: x is
  the small input); dW written once, 4·L·K (S·4·L·K written and read back with S > 1); the partials
  4·B·n_L·n_K·BLOCK_L written and read. The PyTorch path writes G, 4·B·L·K, and reads it twice, on top of
  reading dy and x: for the head at micro-batch 16 (L = 50304, K = 256) 824 MB written and 1.65 GB read
  that this kernel does not move.

Rows (``weight_grad_sqnorms_and_rows``, the tied head): the tied embedding's cross term needs rows[b, t] =
G_b[ids[b, t]], the rows of example b's head gradient at its own token ids. The PyTorch path gathers them from
its materialised G; without G they can be gathered as Aᵀ x_b from a (T, T) slice of dy per example
(pegn._head_rows, the ghost method's way: 0.38 ms at 20M's micro-batch of 16 on an H200, half the kernel's own
time). Here each program, after an example's G_b tile is complete in registers, stores the rows of the ids
that fall in its L-tile straight from its registers (a Triton program cannot index its registers by a runtime
value, but a store can scatter whole rows by a vector of row offsets, masked): the host side numbers the
(example, id) pairs that occur, present[b, i] = 1 where id i occurs in example b and INDEX[b, i] = the pair's rank
among all of them (a scatter and a cumsum over the (B, L) table, on the device, no sync), and each program loads
its tile's BLOCK_L entries of INDEX for example b and stores row r of the tile to row INDEX[b, r] of a (B·T, K)
buffer where that is not -1, skipping the example when none of its ids falls in the tile (ANY, the table's
maximum per tile). rows[b, t] is then read back from row INDEX[b, ids[b, t]] (one gather). Each pair's row is
written once per K-tile, by the one program whose L-tile holds it: no atomics, and a repeated id's row written
once, not once per occurrence. Before this the program stored the whole finished tile to a per-program scratch
slot and read the rows back from it (the slots, 100 MB at 40M's micro-batch of 16, spilled out of L2): on an
H200 the rows cost 0.30/0.45/0.67 ms over the kernel without them at the 20M/40M/111M heads; here 0.11 and
0.15 ms at 20M and 40M and, at 111M, less than the timing's noise; pegn._head_rows' gather takes 0.42/0.44/1.51 ms
(docs/benchmarks.md).

Precision: fp32 accumulation of exact products for bf16/fp16 inputs, as the PyTorch path's fp32-output
matmul; fp32 inputs use TF32 when torch.backends.cuda.matmul.allow_tf32 is set (as torch's own fp32
matmul then does; the trainer sets it on CUDA), full fp32 otherwise and always on a CPU (TRITON_INTERPRET=1).

torch.compile: ``weight_grad_and_sqnorms`` is called inside autograd backward functions (pegn's Linear and
tied-head Functions); under compile it goes through the ``gnsrepro::weight_grad_and_sqnorms`` custom op
(a fake kernel for tracing, no autograd formula: nothing differentiates through it), an opaque node
without a graph break; eager calls go straight to the launcher, as gnsrepro.kernels.layer_norm does.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gnsrepro.kernels import sm_count

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TILE_ELEMENTS = 128 * 128  # BLOCK_L · BLOCK_K: two fp32 accumulators of this size per program


@triton.jit
def _weight_grad_sqnorms_kernel(
    X,  # (B, T, K) input, any strides; fp32 | bf16 | fp16
    DY,  # (B, T, L) incoming gradient, any strides; X's dtype
    DW,  # (S, L, K) fp32 contiguous: the weight gradient (S = 1) or one partial per group of examples
    SQ,  # (B, N_TILES, BLOCK_L) fp32 contiguous: Σ over each row of the tile of G_b², per example, tile and row
    ROWS,  # (U, K) fp32 contiguous, HAS_ROWS: ROWS[INDEX[b, i]] = G_b[i] for each (example, id) pair present
    INDEX,  # (B, N_L_TILES · BLOCK_L) int32 contiguous, HAS_ROWS: ROWS' row of (b, i) if id i occurs in b, else -1
    ANY,  # (B, N_L_TILES) int32 contiguous, HAS_ROWS: whether any of example b's ids falls in L-tile j
    B,
    T,
    K,
    L,
    stride_xb,
    stride_xt,
    stride_xk,
    stride_yb,
    stride_yt,
    stride_yl,
    EXAMPLES_PER_GROUP,  # consecutive examples per program along grid axis 1
    N_TILES,  # tiles of W: n_L · n_K
    N_K_TILES,  # n_K; tile `pid` is (pid // n_K, pid % n_K), so the programs reading one dy strip are adjacent
    N_L_TILES,  # n_L
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" | "tf32" for fp32 inputs (ignored for 16-bit ones)
    UPCAST: tl.constexpr,  # dot in fp32 (the CPU interpreter, whose dot multiplies bf16's raw bits as integers)
    HAS_ROWS: tl.constexpr,  # also write the rows of G_b at the example's ids (module docstring, "Rows")
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    pid_l = pid // N_K_TILES
    pid_k = pid % N_K_TILES
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    lmask = offs_l < L
    kmask = offs_k < K
    b_lo = group * EXAMPLES_PER_GROUP
    b_hi = tl.minimum(b_lo + EXAMPLES_PER_GROUP, B)
    # pointers advance by the strides (64-bit pointer arithmetic), so B·T·L past 2³¹ elements is fine
    x_base = X + b_lo.to(tl.int64) * stride_xb
    dy_base = DY + b_lo.to(tl.int64) * stride_yb
    index_base = INDEX + b_lo.to(tl.int64) * (N_L_TILES * BLOCK_L)
    dw_acc = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        acc = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)  # this tile of G_b = dy_bᵀ x_b
        dy_ptrs = dy_base + offs_l[:, None] * stride_yl + offs_t[None, :] * stride_yt  # (BLOCK_L, BLOCK_T): dyᵀ
        x_ptrs = x_base + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk  # (BLOCK_T, BLOCK_K)
        for t0 in range(0, T, BLOCK_T):
            tmask = offs_t < T - t0
            dyt = tl.load(dy_ptrs, mask=lmask[:, None] & tmask[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=tmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:  # the products of 16-bit values are exact in fp32: the same sums as the 16-bit MMA's
                dyt = dyt.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(dyt, xt, acc, input_precision=INPUT_PRECISION)
            dy_ptrs += BLOCK_T * stride_yt
            x_ptrs += BLOCK_T * stride_xt
        dw_acc += acc
        # masked rows and columns of acc are exact zeros: they add nothing to the square sums. Per row, not per tile:
        # the sum along K stays within each warp; across the tile's rows it would need the warps to meet (module
        # docstring)
        tl.store(SQ + (b * N_TILES + pid) * BLOCK_L + tl.arange(0, BLOCK_L), tl.sum(acc * acc, axis=1))
        if HAS_ROWS:  # the rows of G_b at the ids of example b that fall in this L-tile, stored where INDEX says
            if tl.load(ANY + b * N_L_TILES + pid_l) != 0:
                index = tl.load(index_base + offs_l)
                tl.store(ROWS + index.to(tl.int64)[:, None] * K + offs_k[None, :], acc,
                         mask=(index >= 0)[:, None] & kmask[None, :])
        x_base += stride_xb
        dy_base += stride_yb
        index_base += N_L_TILES * BLOCK_L
    dw_ptrs = DW + group.to(tl.int64) * L * K + offs_l[:, None] * K + offs_k[None, :]
    tl.store(dw_ptrs, dw_acc, mask=lmask[:, None] & kmask[None, :])


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


class Tiles(NamedTuple):
    block_l: int
    block_k: int
    block_t: int
    num_warps: int
    num_stages: int


def _pow2_at_least(n: int, low: int = 16) -> int:
    """The next power of two >= n, and >= low (tl.dot needs every dimension >= 16)."""
    return max(low, triton.next_power_of_2(max(1, n)))


def _tiles(K: int, L: int, element_size: int) -> Tiles:
    """Tile sizes for x (B, T, K), dy (B, T, L) (module docstring, "Tile sizes") where the tuning sweep recorded
    none for the shape (_launch_tiles). BLOCK_T keeps a pipeline stage (BLOCK_T · (BLOCK_L + BLOCK_K) input
    elements) at 40 KB or less, so three stages fit in shared memory."""
    if K <= 256:
        block_k = _pow2_at_least(K)
        block_l = min(_pow2_at_least(L), max(16, MAX_TILE_ELEMENTS // block_k), 128)
    elif L <= 256:
        block_l = _pow2_at_least(L)
        block_k = min(max(16, MAX_TILE_ELEMENTS // block_l), 256)
    else:
        block_l = block_k = 128
    block_t = 64 if element_size <= 2 else 32
    num_warps = 8 if block_l * block_k >= 8192 else 4
    return Tiles(block_l, block_k, block_t, num_warps, 3)


def _launch_tiles(x: Tensor, K: int, L: int) -> Tiles:
    """The tiles recorded for this shape, dtype and GPU by the tuning sweep (gnsrepro/kernels/linear_backend.csv,
    `python -m benchmarks.tuning.per_example_grad --record`), else the heuristic's (_tiles)."""
    if x.is_cuda:
        from gnsrepro.kernels.linear_backend import recorded_tiles

        recorded = recorded_tiles(_device_name(x.device.index), str(x.dtype).removeprefix("torch."), K, L)
        if recorded is not None:
            return Tiles(*recorded)
    return _tiles(K, L, x.element_size())


@functools.cache
def _device_name(device_index: int | None) -> str:
    return torch.cuda.get_device_name(device_index)


def _example_groups(B: int, n_tiles: int, device: torch.device) -> int:
    """How many groups to split the B examples into: the fewest that give about two programs per SM (1 on a
    CPU, where the interpreter runs the programs one after another)."""
    if device.type != "cuda" or B <= 1:
        return 1
    target = 2 * sm_count(device)
    return max(1, min(B, math.ceil(target / n_tiles)))


def _input_precision(x: Tensor) -> str:
    """tl.dot's input_precision: "ieee" for fp32 unless torch's own fp32 matmul uses TF32 (module docstring,
    "Precision"); Triton's default "tf32" otherwise, which does not apply to 16-bit inputs."""
    if x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def weight_grad_and_sqnorms_launch(
    x: Tensor, dy: Tensor, tiles: Optional[Tiles] = None, example_groups: int = 0,
) -> tuple[Tensor, Tensor]:
    """(dW (L, K) fp32, sq (B,) fp32) by the Triton kernel; tiles and example_groups (0: automatic) override
    the launch configuration, for the tests. See weight_grad_and_sqnorms."""
    dw, sq, _ = _launch(x, dy, None, tiles, example_groups)
    return dw, sq


def weight_grad_sqnorms_and_rows_launch(
    x: Tensor, dy: Tensor, ids: Tensor, tiles: Optional[Tiles] = None, example_groups: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dW, sq, rows (B, T, K) fp32) by the Triton kernel, rows[b, t] = G_b[ids[b, t]]; see
    weight_grad_sqnorms_and_rows."""
    return _launch(x, dy, ids, tiles, example_groups)


def _launch(x: Tensor, dy: Tensor, ids: Optional[Tensor], tiles: Optional[Tiles],
            example_groups: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    _check_inputs(x, dy, ids)
    B, T, K = x.shape
    L = dy.shape[-1]
    if x.stride(-1) != 1:  # rows are read as vectors along the feature axis
        x = x.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    if B * T * K * L == 0:
        return (x.new_zeros((L, K), dtype=torch.float32), x.new_zeros((B,), dtype=torch.float32),
                None if ids is None else x.new_zeros((B, T, K), dtype=torch.float32))
    cfg = tiles or _launch_tiles(x, K, L)
    n_k = triton.cdiv(K, cfg.block_k)
    n_l = triton.cdiv(L, cfg.block_l)
    n_tiles = n_l * n_k
    groups = example_groups or _example_groups(B, n_tiles, x.device)
    per_group = triton.cdiv(B, min(groups, B))
    groups = triton.cdiv(B, per_group)  # no empty group
    dw = torch.empty((groups, L, K), dtype=torch.float32, device=x.device)
    partials = torch.empty((B, n_tiles * cfg.block_l), dtype=torch.float32, device=x.device)
    rows = unique_rows = index = any_in_tile = None
    if ids is not None:
        # number the (example, id) pairs that occur: present[b, i] = 1 where id i occurs in example b, index = the
        # pair's rank among all pairs (a cumsum over the flattened (B, L)), -1 elsewhere; the kernel stores the row of
        # G_b at id i to that rank, and rows[b, t] is read back from it (no sync: U stays at its bound B·T)
        ids2 = ids.reshape(B, T).long()
        present = torch.zeros((B, n_l * cfg.block_l), dtype=torch.int32, device=x.device).scatter_(1, ids2, 1)
        index = present.view(-1).cumsum(0, dtype=torch.int32).view(B, -1) * present - 1
        any_in_tile = present.view(B, n_l, cfg.block_l).amax(2)
        unique_rows = torch.empty((B * T, K), dtype=torch.float32, device=x.device)
    _weight_grad_sqnorms_kernel[(n_tiles, groups)](
        x, dy, dw, partials, *((unique_rows, index, any_in_tile) if ids is not None else (dw,) * 3),
        B, T, K, L, *x.stride(), *dy.stride(), per_group, n_tiles, n_k, n_l,
        BLOCK_L=cfg.block_l, BLOCK_K=cfg.block_k, BLOCK_T=cfg.block_t, INPUT_PRECISION=_input_precision(x),
        UPCAST=x.device.type == "cpu", HAS_ROWS=ids is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if ids is not None:
        rows = unique_rows.index_select(0, index.gather(1, ids2).view(-1)).view(B, T, K)
    return (dw[0] if groups == 1 else dw.sum(0)), partials.sum(1), rows


def _check_inputs(x: Tensor, dy: Tensor, ids: Optional[Tensor] = None) -> None:
    if x.dim() != 3 or dy.dim() != 3 or x.shape[:2] != dy.shape[:2]:
        raise ValueError(f"x must be (B, T, K) and dy (B, T, L); got {tuple(x.shape)} and {tuple(dy.shape)}")
    if ids is not None and (tuple(ids.shape) != tuple(x.shape[:2]) or ids.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"ids must be (B, T) int32 or int64 as x's (B, T); got {tuple(ids.shape)} {ids.dtype}")
    if x.dtype != dy.dtype or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x and dy must have one dtype of float32, bfloat16, float16; got {x.dtype} and {dy.dtype}")


# --------------------------------------------------------------------------------------------------
# torch.compile: a custom op with a fake kernel (no autograd formula: it is called inside backward functions)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("gnsrepro::weight_grad_and_sqnorms", mutates_args=())
def _weight_grad_and_sqnorms_op(x: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return weight_grad_and_sqnorms_launch(x, dy)


@_weight_grad_and_sqnorms_op.register_fake
def _(x, dy):
    return x.new_empty((dy.shape[-1], x.shape[-1]), dtype=torch.float32), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op("gnsrepro::weight_grad_sqnorms_and_rows", mutates_args=())
def _weight_grad_sqnorms_and_rows_op(x: Tensor, dy: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return weight_grad_sqnorms_and_rows_launch(x, dy, ids)


@_weight_grad_sqnorms_and_rows_op.register_fake
def _(x, dy, ids):
    return (x.new_empty((dy.shape[-1], x.shape[-1]), dtype=torch.float32),
            x.new_empty(x.shape[:1], dtype=torch.float32), x.new_empty(x.shape, dtype=torch.float32))


def weight_grad_sqnorms_and_rows(x: Tensor, dy: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """weight_grad_and_sqnorms's (dW, sq) and the tied head's rows (B, T, K) fp32, rows[b, t] = G_b[ids[b, t]]
    (the rows of example b's weight gradient at its own token ids, which the tied embedding's cross term needs;
    gnsrepro.pegn), copied out of the kernel's G_b tiles: no gather from dy. ids (B, T) int32 or int64 in
    [0, L). Eager calls launch the kernel; under torch.compile the custom op
    ``gnsrepro::weight_grad_sqnorms_and_rows`` is recorded instead.
    """
    if torch.compiler.is_compiling():
        return torch.ops.gnsrepro.weight_grad_sqnorms_and_rows(x, dy, ids)
    return weight_grad_sqnorms_and_rows_launch(x, dy, ids)


def weight_grad_and_sqnorms(x: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """dW = Σ_b dy_bᵀ x_b (L, K) and sq_b = |dy_bᵀ x_b|²_F (B,), both fp32, without materialising any dy_bᵀ x_b.

    x (B, T, K) and dy (B, T, L) in one dtype of float32, bfloat16, float16, on a CUDA GPU (or a CPU under
    TRITON_INTERPRET=1). Eager calls launch the kernel directly; under torch.compile the custom op
    ``gnsrepro::weight_grad_and_sqnorms`` is recorded instead.
    """
    if torch.compiler.is_compiling():
        return torch.ops.gnsrepro.weight_grad_and_sqnorms(x, dy)
    return weight_grad_and_sqnorms_launch(x, dy)


# --------------------------------------------------------------------------------------------------
# PyTorch reference: the simultaneous method as gnsrepro.pegn computes it with backend torch
# --------------------------------------------------------------------------------------------------


def weight_grad_and_sqnorms_reference(x: Tensor, dy: Tensor, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """(dW, sq) from the materialised per-example gradients G_b = dy_bᵀ x_b, (chunk, L, K) at a time.

    In fp32 (fp64 for float64 inputs) from the inputs as given: dW = Σ_b G_b, sq_b = Σ G_b². chunk_size: examples
    per batched matmul, 0 = all at once.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    B = x.shape[0]
    c = chunk_size or max(B, 1)
    dW = x.new_zeros((dy.shape[-1], x.shape[-1]), dtype=acc)
    sq = []
    for s in range(0, B, c):
        G = torch.bmm(dy[s : s + c].transpose(1, 2).to(acc), x[s : s + c].to(acc))  # (c, L, K)
        sq.append(G.square().sum((1, 2)))
        dW += G.sum(0)
    return dW, (torch.cat(sq) if sq else x.new_zeros((0,), dtype=acc))


__all__ = [
    "KERNEL_DTYPES",
    "Tiles",
    "weight_grad_and_sqnorms",
    "weight_grad_and_sqnorms_launch",
    "weight_grad_and_sqnorms_reference",
    "weight_grad_sqnorms_and_rows",
    "weight_grad_sqnorms_and_rows_launch",
]
