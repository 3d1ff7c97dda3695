"""LayerNorm whose backward pass also returns per-example squared gradient norms (Triton).

    y = x̂ ⊙ γ + β,   x̂ = (x − mean) · rstd   (per row of N features; statistics in fp32)

For x of shape (B, T, N) the per-example parameter gradients are (docs/method.md, section 2,
"LayerNorm"):

    dγ_b = Σ_t dy_{b,t} ⊙ x̂_{b,t},   dβ_b = Σ_t dy_{b,t}      (sum over the example's T rows first)

and the backward pass returns |dγ_b|² and |dβ_b|² next to dx, dγ = Σ_b dγ_b and dβ = Σ_b dβ_b, in the
same single pass over x and dy that any LayerNorm backward makes. A 2-D input (B, N) is B examples
of one row each (T = 1).

How the per-example norms come out: the caller passes a "sink", a float32 leaf tensor of shape
(B, k) (k = 2 with a bias, else 1) whose value is never read. The backward returns the squared norms
as the sink's *gradient* (column 0: |dγ_b|², column 1: |dβ_b|²), computed from the incoming dy as it
is. Autograd accumulates them into ``sink.grad``, so with gradient accumulation over micro-batches
the per-example sums simply add up.

Kernels (all in this file, beside their launchers, the autograd Function and the plain-PyTorch reference
``layer_norm_per_example_reference``):
- ``_layer_norm_fwd_kernel``: one tile of BLOCK_M rows per program; writes y and the fp32 (mean, rstd).
- ``_layer_norm_bwd_kernel``: each program owns a contiguous run of rows (whole examples, or one
  chunk of one example), keeps the partial dγ/dβ sums in fp32 registers while it writes dx, and
  prefetches the next tile (or two) of x and dy into registers before the current tile's arithmetic;
  or, for an even N (``stages``), lets the compiler pipeline the loads through shared memory, which
  it does for 16-bit tensors only when they are read as 32-bit words of two values (``_bwd_rows_pipelined``,
  which works on even and odd columns). It stores one (N,) fp32
  partial per program: the only extra memory traffic, O(programs · N) (about 2 SMs' worth of
  programs: 2-4% of the activation bytes at 16k rows). When a program owns whole examples (T = 1, or
  short sequences) it also finishes their squared norms in registers.
- ``_layer_norm_bwd_reduce_kernel``: sums the partials (per example first, then over examples) into
  dγ and dβ; when examples were split into chunks it also squares each example's sum, and the last
  of its programs to finish (an atomic counter) adds up the per-column-block pieces into |dγ_b|²,
  |dβ_b|² in a fixed order, so results are deterministic run to run.
- Or no reduce kernel (``tail_reduce``, ``_tail_reduce``): the last program of each group of backward
  programs to finish (the chunks of one example) sums the group's partials and squares them, and the
  last group sums the groups' sums into dγ, dβ (``tail_sub``: with a middle level of subgroups, which
  shortens the longest chain of serial loads). One launch and one kernel boundary fewer, at the cost
  of a serial tail; the launch table says where that pays (small N), the launcher where it applies.
No (B, N) or (B·T, N) tensor is written: per-example gradients exist only as fp32 register sums.
On sm90+ GPUs the kernels are launched as programmatic dependent launches (``PDL``, on by default): each
waits for the previous kernel's writes before its first load (``_pdl_wait``) and lets the next kernel
launch once its own main work is done (``_pdl_trigger``), which hides the launch gap between them.

Autograd: in eager mode a ``torch.autograd.Function`` (the cheapest on the host); under
torch.compile the forward and backward are ``torch.library.custom_op``s with fake (meta) kernels and
a registered autograd formula, so a compiled model keeps them as opaque nodes with no graph break.
Both call the same launchers. Autocast: the ops are not autocast-aware; they see the tensors as given
(typically x in bf16 from an autocast matmul and γ, β in fp32), compute in fp32 and return y in x's
dtype, dγ/dβ in the parameters' dtypes and the squared norms in fp32. (F.layer_norm under CUDA
autocast instead runs in fp32 and returns fp32.)

Fused residual add (``residual=``): a pre-LN transformer computes s = x + branch(...) and then
LayerNorm(s); passing the branch output as x and the stream as residual lets the forward kernel write
s and y in one pass, and the backward add s's incoming gradient into dx (and write the narrower
input's gradient in its own dtype), as inductor does when it fuses its own LayerNorm with the add.
Without it the kernel, an opaque op to inductor, costs an extra add kernel each way per LayerNorm.

Speed (docs/benchmarks.md has the commands and full tables; one H100, torch 2.11, triton 3.6):
8 × 2048 rows, forward + backward, device time in the stream (as inside a training step) 0.37-0.59×
PyTorch's at N = 768 ... 8192 in bf16 and fp32, 76-94.5% of the measured copy bandwidth. Called
eagerly, the Python host cost (autograd.Function, two or three Triton launches, the autograd engine's
device thread; 0.27-0.69 ms per forward + backward on that machine, varying from run to run, against
about 0.15 ms for PyTorch's C++ path) dominates below N = 4096. In the compiled 111M GPT, gns=ln with
this kernel takes 1.003-1.005× the step time of gns=off (`bench overhead`, variants interleaved).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from gnsrepro.kernels import sm_count

# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _pdl_wait(USE_PDL: tl.constexpr):
    """With programmatic dependent launch a kernel's programs may start before the previous kernel on
    the stream has finished: wait here, before any load, until that kernel's writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _pdl_trigger(USE_PDL: tl.constexpr):
    """Let the next kernel on the stream launch once every program has passed here (or exited): its
    programs then take SMs as this kernel's finish and wait in their own _pdl_wait, which hides the
    launch gap. Called after a kernel's main work, not at its start: launched early, the next kernel's
    programs would sit on SMs that this kernel's later programs need, and a persistent grid (the
    backward) would be placed unevenly."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input rows, contiguous, fp32 | bf16 | fp16
    RES,  # (M, N) residual rows added to x before normalising; a dummy pointer when HAS_RES is False
    S,  # (M, N) output x + residual (the new residual stream); a dummy pointer when HAS_RES is False
    W,  # (N,) weight γ, any float dtype
    BIAS,  # (N,) bias β; a dummy pointer when HAS_BIAS is False
    Y,  # (M, N) output, x's dtype or the out_dtype asked for
    STATS,  # (2, M) fp32: row 0 the means, row 1 the rstd = 1/sqrt(var + eps)
    M,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next power of two >= N: a whole row sits in registers
    DOWNCAST: tl.constexpr,  # Y narrower than fp32: round to nearest even, as torch's .to() does
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent launch (sm90+): see _pdl_wait
):
    _pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    # statistics in fp32 whatever the input dtype; two-pass variance on the row held in registers
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # the add in fp32 then one rounding to S's dtype: what torch's x + residual gives
        x = x + tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        if S.dtype.element_ty != tl.float32:
            x = x.to(S.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(S + offs, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        beta = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + beta[None, :]
    if DOWNCAST:
        y = y.to(Y.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(STATS + rows, mean, mask=rmask)
    tl.store(STATS + M + rows, rstd, mask=rmask)
    _pdl_trigger(USE_PDL)


@triton.jit
def _bwd_load(
    X,  # (M, N) input rows, contiguous
    DY,  # (M, N) incoming gradient rows, contiguous
    DRES,  # (M, N) gradient of the residual output s, added to dx; read only when HAS_DRES
    STATS,  # (2, M) fp32 mean and rstd from the forward
    rows,  # (BLOCK_M,) row indices of this tile
    rmask,  # (BLOCK_M,) which of them are real rows
    cols,  # (BLOCK_N,) column indices
    cmask,  # (BLOCK_N,) which of them are real columns
    M,
    N,
    HAS_DRES: tl.constexpr,
):
    """Issue one tile's loads: x, dy (and ds) in their own dtype, mean and rstd in fp32."""
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    dy = tl.load(DY + offs, mask=mask, other=0.0)
    if HAS_DRES:
        ds = tl.load(DRES + offs, mask=mask, other=0.0)
    else:
        ds = dy  # unused
    mean = tl.load(STATS + rows, mask=rmask, other=0.0)
    rstd = tl.load(STATS + M + rows, mask=rmask, other=0.0)
    return x, dy, ds, mean, rstd


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _row_sums2(a, b):
    """(Σ_j a[:, j], Σ_j b[:, j]) as one reduction: a row spread over several warps then crosses them
    once (one round through shared memory and its barriers) instead of once per sum."""
    return tl.reduce((a, b), axis=1, combine_fn=_add_pairs)


@triton.jit
def _bwd_rows(
    X,  # (M, N) input rows, contiguous
    DY,  # (M, N) incoming gradient rows, contiguous
    STATS,  # (2, M) fp32 mean and rstd
    DX,  # (M, N) gradient w.r.t. x, written here in x's dtype
    DRES,  # (M, N) gradient of the residual output, added to dx (HAS_DRES)
    DX2,  # (M, N) the same dx once more in a second dtype (HAS_DX2): the residual input's gradient
    SQ,  # (B, K) fp32 per-example squared norms; written only when PER_ROW_SQ (rows are examples)
    w,  # (BLOCK_N,) fp32 weight, 0 past N
    row_lo,  # first row of the run
    row_hi,  # one past its last row
    n_rows,  # rows the loop covers (>= row_hi - row_lo, a multiple of BLOCK_M; the rest is masked)
    M,
    N,
    PER_ROW_SQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_DX2: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DEPTH: tl.constexpr,  # tiles loaded ahead of the one being computed: 1 or 2
):
    """dx for rows [row_lo, row_hi); returns Σ dy ⊙ x̂ and Σ dy over them, per column (fp32 registers).

    The loads of the next DEPTH tiles are issued before this tile's arithmetic (software prefetch), so
    each program keeps DEPTH + 1 tiles of x and dy in flight instead of waiting on every load. (Triton's
    own pipelining through shared memory does not take 16-bit loads that feed no matmul.)
    """
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # partial dγ, reduced over rows at the end
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # partial dβ
    rows = row_lo + tl.arange(0, BLOCK_M)
    rmask = rows < row_hi
    x, dy, ds, mean, rstd = _bwd_load(X, DY, DRES, STATS, rows, rmask, cols, cmask, M, N, HAS_DRES)
    # with DEPTH 2, the tile after the next one (with DEPTH 1 these stay unused and are dropped)
    rows1 = rows + BLOCK_M
    mask1 = rows1 < row_hi
    x1, dy1, ds1, mean1, rstd1 = x, dy, ds, mean, rstd
    if DEPTH == 2:
        x1, dy1, ds1, mean1, rstd1 = _bwd_load(X, DY, DRES, STATS, rows1, mask1, cols, cmask, M, N, HAS_DRES)
    for _ in range(0, n_rows, BLOCK_M):
        nrows = rows + DEPTH * BLOCK_M
        nmask = nrows < row_hi
        nx, ndy, nds, nmean, nrstd = _bwd_load(X, DY, DRES, STATS, nrows, nmask, cols, cmask, M, N, HAS_DRES)
        # this tile, in fp32
        mask = rmask[:, None] & cmask[None, :]
        xf = x.to(tl.float32)
        dyf = dy.to(tl.float32)
        xhat = tl.where(mask, (xf - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dyf
        c1, c2 = _row_sums2(xhat * wdy, wdy)
        c1 = c1 / N  # mean over the row of dy·γ ⊙ x̂
        c2 = c2 / N  # mean over the row of dy·γ
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx = dx + ds.to(tl.float32)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + offs, dx.to(DX2.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
        gw = dyf * xhat
        acc_w += gw
        if HAS_BIAS:
            acc_b += dyf
        if PER_ROW_SQ:
            tl.store(SQ + rows * K, tl.sum(gw * gw, axis=1), mask=rmask)
            if HAS_BIAS:
                tl.store(SQ + rows * K + 1, tl.sum(dyf * dyf, axis=1), mask=rmask)
        if DEPTH == 2:
            x, dy, ds, mean, rstd, rows, rmask = x1, dy1, ds1, mean1, rstd1, rows1, mask1
            x1, dy1, ds1, mean1, rstd1, rows1, mask1 = nx, ndy, nds, nmean, nrstd, nrows, nmask
        else:
            x, dy, ds, mean, rstd, rows, rmask = nx, ndy, nds, nmean, nrstd, nrows, nmask
    return acc_w, acc_b


@triton.jit
def _load_pairs(PTR, pairs, mask):
    """fp32 (even, odd) columns of a tile given by the indices of its column pairs (rows * N/2 + c).

    A 16-bit tensor is read as int32 words of two values: Triton pipelines only loads of 32-bit
    elements through shared memory, and this way they are.
    """
    if PTR.dtype.element_ty.primitive_bitwidth == 16:
        v = tl.load(PTR.to(tl.pointer_type(tl.int32)) + pairs, mask=mask, other=0)
        if PTR.dtype.element_ty == tl.bfloat16:  # bf16 → fp32 is a shift into the high half
            lo = (v << 16).to(tl.float32, bitcast=True)
            hi = (v & -65536).to(tl.float32, bitcast=True)
        else:
            lo = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        two = tl.arange(0, 2)
        v = tl.load(PTR + (pairs[:, :, None] * 2 + two[None, None, :]), mask=mask[:, :, None], other=0.0)
        lo, hi = tl.split(v.to(tl.float32))
    return lo, hi


@triton.jit
def _store_pairs(PTR, pairs, mask, lo, hi):
    """Store fp32 (even, odd) columns into PTR's dtype (round to nearest even), the inverse of _load_pairs."""
    ty = PTR.dtype.element_ty
    if ty.primitive_bitwidth == 16:
        a = lo.to(ty, fp_downcast_rounding="rtne").to(tl.int16, bitcast=True).to(tl.int32) & 65535
        b = hi.to(ty, fp_downcast_rounding="rtne").to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(PTR.to(tl.pointer_type(tl.int32)) + pairs, a | (b << 16), mask=mask)
    else:
        two = tl.arange(0, 2)
        tl.store(PTR + (pairs[:, :, None] * 2 + two[None, None, :]), tl.join(lo, hi).to(ty), mask=mask[:, :, None])


@triton.jit
def _bwd_rows_pipelined(
    X, DY, STATS, DX, DRES, DX2, SQ, w, row_lo, row_hi, n_rows, M, N,
    PER_ROW_SQ: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_DX2: tl.constexpr,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """_bwd_rows for an even N, with the loads pipelined by the compiler (STAGES tiles in flight in
    shared memory, cp.async) instead of held in registers: each tile is worked on as its even and odd
    columns (one 32-bit word of a 16-bit tensor holds one of each). Returns the same accumulators."""
    BLOCK_H: tl.constexpr = BLOCK_N // 2
    H = N // 2
    c = tl.arange(0, BLOCK_H)
    cmask = c < H
    we, wo = tl.split(tl.reshape(w, [BLOCK_H, 2]))
    acc_we = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc_wo = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc_be = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc_bo = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for i in tl.range(0, n_rows, BLOCK_M, num_stages=STAGES):
        rows = row_lo + i + tl.arange(0, BLOCK_M)
        rmask = rows < row_hi
        mask = rmask[:, None] & cmask[None, :]
        pairs = rows.to(tl.int64)[:, None] * H + c[None, :]
        xe, xo = _load_pairs(X, pairs, mask)
        dye, dyo = _load_pairs(DY, pairs, mask)
        mean = tl.load(STATS + rows, mask=rmask, other=0.0)
        rstd = tl.load(STATS + M + rows, mask=rmask, other=0.0)
        he = tl.where(mask, (xe - mean[:, None]) * rstd[:, None], 0.0)
        ho = tl.where(mask, (xo - mean[:, None]) * rstd[:, None], 0.0)
        wde = we[None, :] * dye
        wdo = wo[None, :] * dyo
        c1, c2 = _row_sums2(he * wde + ho * wdo, wde + wdo)
        c1 = c1 / N
        c2 = c2 / N
        dxe = (wde - (he * c1[:, None] + c2[:, None])) * rstd[:, None]
        dxo = (wdo - (ho * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dse, dso = _load_pairs(DRES, pairs, mask)
            dxe += dse
            dxo += dso
        _store_pairs(DX, pairs, mask, dxe, dxo)
        if HAS_DX2:
            _store_pairs(DX2, pairs, mask, dxe, dxo)
        gwe = dye * he
        gwo = dyo * ho
        acc_we += gwe
        acc_wo += gwo
        if HAS_BIAS:
            acc_be += dye
            acc_bo += dyo
        if PER_ROW_SQ:
            tl.store(SQ + rows * K, tl.sum(gwe * gwe, axis=1) + tl.sum(gwo * gwo, axis=1), mask=rmask)
            if HAS_BIAS:
                tl.store(SQ + rows * K + 1, tl.sum(dye * dye, axis=1) + tl.sum(dyo * dyo, axis=1), mask=rmask)
    acc_w = tl.reshape(tl.join(acc_we, acc_wo), [BLOCK_M, BLOCK_N])
    acc_b = tl.reshape(tl.join(acc_be, acc_bo), [BLOCK_M, BLOCK_N])
    return acc_w, acc_b


@triton.jit
def _bwd_rows_any(
    X, DY, STATS, DX, DRES, DX2, SQ, w, row_lo, row_hi, n_rows, M, N,
    PER_ROW_SQ: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_DX2: tl.constexpr,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr, STAGES: tl.constexpr,
):
    """_bwd_rows_pipelined when STAGES > 0, else _bwd_rows with DEPTH tiles of register prefetch."""
    if STAGES > 0:
        acc_w, acc_b = _bwd_rows_pipelined(
            X, DY, STATS, DX, DRES, DX2, SQ, w, row_lo, row_hi, n_rows, M, N, PER_ROW_SQ, HAS_BIAS, HAS_DRES,
            HAS_DX2, K, BLOCK_M, BLOCK_N, STAGES,
        )
    else:
        acc_w, acc_b = _bwd_rows(
            X, DY, STATS, DX, DRES, DX2, SQ, w, row_lo, row_hi, n_rows, M, N, PER_ROW_SQ, HAS_BIAS, HAS_DRES,
            HAS_DX2, K, BLOCK_M, BLOCK_N, DEPTH,
        )
    return acc_w, acc_b


@triton.jit
def _layer_norm_bwd_kernel(
    X,  # (M, N) input rows, contiguous; M = NUM_EX * T
    DY,  # (M, N) incoming gradient, contiguous
    W,  # (N,) weight γ
    STATS,  # (2, M) fp32 mean and rstd from the forward
    DX,  # (M, N) output gradient w.r.t. x, x's dtype (+ DRES when HAS_DRES)
    DRES,  # (M, N) gradient of the residual output s (HAS_DRES); a dummy pointer otherwise
    DX2,  # (M, N) dx again in the residual input's dtype (HAS_DX2); a dummy pointer otherwise
    PART,  # (K, P, N) fp32: per program, Σ dy ⊙ x̂ (and Σ dy) over its rows (MODE 2: program b*C + c);
    #        with TAIL_REDUCE followed by (K, NGRP, N) fp32 for the groups' sums, then (TAIL_SUB)
    #        (K, NGRP * NSG, N) for the subgroups' sums
    SQ,  # (NUM_EX, K) fp32: per-example |dγ_b|², |dβ_b|² (MODE 0 and 1; MODE 2 with TAIL_REDUCE only)
    DW,  # (N,) dγ, weight dtype (TAIL_REDUCE only)
    DB,  # (N,) dβ, bias dtype (TAIL_REDUCE and HAS_BIAS only)
    CNT,  # (NGRP + 1 + NGRP * NSG,) int32, zero between launches (TAIL_REDUCE): arrivals per group, groups
    #       done, then (TAIL_SUB) arrivals per subgroup
    M,
    N,
    T,  # rows per example
    NUM_EX,  # examples B
    P,  # programs
    G,  # MODE 1: examples per program
    C,  # MODE 2: chunks per example
    R,  # MODE 0: rows per program; MODE 2: rows per chunk (both multiples of BLOCK_M)
    GP,  # TAIL_REDUCE: programs per group (MODE 2: C, a group is an example)
    NGRP,  # TAIL_REDUCE: groups
    SG,  # TAIL_SUB: programs per subgroup
    NSG,  # TAIL_SUB: subgroups per group (the last group may have fewer)
    HAS_BIAS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_DX2: tl.constexpr,
    K: tl.constexpr,  # columns of SQ: 2 with a bias, else 1
    MODE: tl.constexpr,  # 0: T == 1, rows are examples; 1: G whole examples; 2: one chunk of one example
    TAIL_REDUCE: tl.constexpr,  # the last programs to finish sum the partials (no reduce kernel)
    TAIL_SUB: tl.constexpr,  # TAIL_REDUCE over three levels: subgroups of SG programs within each group
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,  # TAIL_REDUCE: partial rows summed per load
    DEPTH: tl.constexpr,  # tiles of x and dy loaded ahead (software prefetch depth)
    STAGES: tl.constexpr,  # > 0: even N, loads pipelined by the compiler over this many stages instead
    USE_PDL: tl.constexpr,
):
    _pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if MODE == 0:
        # a run of R rows, each its own example: squared norms straight from each row
        lo = pid * R
        tot_w, tot_b = _bwd_rows_any(
            X, DY, STATS, DX, DRES, DX2, SQ, w, lo, tl.minimum(lo + R, M), R, M, N, True, HAS_BIAS, HAS_DRES,
            HAS_DX2, K, BLOCK_M, BLOCK_N, DEPTH, STAGES,
        )
    elif MODE == 1:
        # G whole examples per program: each example's sum over its T rows completes in registers
        tot_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        tot_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        t_pad = tl.cdiv(T, BLOCK_M) * BLOCK_M
        for e in range(0, G):
            b = pid * G + e
            lo = b * T
            hi = tl.where(b < NUM_EX, lo + T, lo)  # past the last example: nothing to do
            acc_w, acc_b = _bwd_rows_any(
                X, DY, STATS, DX, DRES, DX2, SQ, w, lo, hi, t_pad, M, N, False, HAS_BIAS, HAS_DRES, HAS_DX2, K,
                BLOCK_M, BLOCK_N, DEPTH, STAGES,
            )
            ex_w = tl.sum(acc_w, axis=0)  # dγ_b
            tl.store(SQ + b * K, tl.sum(ex_w * ex_w, axis=0), mask=b < NUM_EX)
            tot_w += acc_w
            if HAS_BIAS:
                ex_b = tl.sum(acc_b, axis=0)  # dβ_b
                tl.store(SQ + b * K + 1, tl.sum(ex_b * ex_b, axis=0), mask=b < NUM_EX)
                tot_b += acc_b
    else:
        # chunk c (R rows) of example b; the per-example sum is finished by the reduce kernel
        b = pid // C
        c = pid % C
        lo = b * T + c * R
        hi = b * T + tl.minimum(c * R + R, T)
        tot_w, tot_b = _bwd_rows_any(
            X, DY, STATS, DX, DRES, DX2, SQ, w, lo, hi, R, M, N, False, HAS_BIAS, HAS_DRES, HAS_DX2, K, BLOCK_M,
            BLOCK_N, DEPTH, STAGES,
        )
    part = pid * N + cols  # P * N stays far below 2**31 (P is about 2-4 programs per SM)
    tl.store(PART + part, tl.sum(tot_w, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(PART + P * N + part, tl.sum(tot_b, axis=0), mask=cmask)
    _pdl_trigger(USE_PDL)  # the tail below runs on few programs: the next kernel may take the other SMs
    if TAIL_REDUCE:
        _tail_reduce(
            PART, SQ, DW, DB, CNT, pid, N, P, GP, NGRP, SG, NSG, cols, cmask, HAS_BIAS, K, MODE, TAIL_SUB, BLOCK_R,
            BLOCK_N,
        )


@triton.jit
def _sum_rows(
    A, B, row_lo, n_rows, N, cols, cmask, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Σ of rows [row_lo, row_lo + n_rows) of the row-major (·, N) fp32 arrays A (and B when HAS_B).

    The rows were stored by other programs: loads go through L2 (.cg), where those stores are visible;
    the next tile is loaded before the current one is added. Always the same order (deterministic).
    """
    r = tl.arange(0, BLOCK_R)
    acc_a = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    cur_a, cur_b = _load_rows(A, B, row_lo, r, n_rows, N, cols, cmask, acc_b, HAS_B)
    for r0 in range(0, n_rows, BLOCK_R):
        nxt_a, nxt_b = _load_rows(A, B, row_lo, r0 + BLOCK_R + r, n_rows, N, cols, cmask, acc_b, HAS_B)
        acc_a += cur_a
        acc_b += cur_b
        cur_a, cur_b = nxt_a, nxt_b
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _load_rows(A, B, row_lo, rows, n_rows, N, cols, cmask, zeros, HAS_B: tl.constexpr):
    """Rows row_lo + rows (those < n_rows) of A and of B (zeros when not HAS_B), through L2."""
    m = (rows < n_rows)[:, None] & cmask[None, :]
    offs = (row_lo + rows).to(tl.int64)[:, None] * N + cols[None, :]
    a = tl.load(A + offs, mask=m, other=0.0, cache_modifier=".cg")
    b = zeros
    if HAS_B:
        b = tl.load(B + offs, mask=m, other=0.0, cache_modifier=".cg")
    return a, b


@triton.jit
def _tail_reduce(
    PART, SQ, DW, DB, CNT, pid, N, P, GP, NGRP, SG, NSG, cols, cmask,
    HAS_BIAS: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr, SUB: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The backward's reduction without a second kernel: a tree of "last to arrive" programs.

    Programs form NGRP groups of GP consecutive programs (MODE 2: the C chunks of one example). The last
    program of a group to store its partials (an atomic count per group) sums the group's partials, in
    program order, into the group's row; in MODE 2 that row is the example's whole dγ_b (and dβ_b), so
    it also writes |dγ_b|², |dβ_b|². The last group to finish sums the groups' rows into dγ and dβ.
    With SUB, a group is first split into subgroups of SG programs (NSG per group at most): the last
    of a subgroup sums its SG partials, and the group's last subgroup sums the subgroups' rows, so the
    longest chain of serial loads is SG + NSG + NGRP rows instead of GP + NGRP.
    Nobody waits on anybody (no spinning, safe whatever the number of resident programs), and every
    sum runs in a fixed order, so results repeat bitwise. Each counter is reset by the program that
    saw it complete, ready for the next launch on the stream. Ordering: every thread's stores, a CTA
    barrier, then one gpu-scope acq_rel atomic (as CUTLASS's semaphore); readers load through L2.
    """
    GPART = PART + K * P * N  # (K, NGRP, N): the groups' sums, then (SUB) (K, NGRP * NSG, N) the subgroups'
    grp = pid // GP
    lo = grp * GP
    n = tl.minimum(GP, P - lo)
    tl.debug_barrier()
    if SUB:
        SPART = GPART + K * NGRP * N
        NS = NGRP * NSG
        s = (pid - lo) // SG
        slo = lo + s * SG
        sid = grp * NSG + s
        sn = tl.minimum(SG, lo + n - slo)  # programs in this subgroup (the group's last may be short)
        arrived = tl.atomic_add(CNT + NGRP + 1 + sid, 1, sem="acq_rel", scope="gpu")
        if arrived == sn - 1:
            sw, sb = _sum_rows(PART, PART + P * N, slo, sn, N, cols, cmask, HAS_BIAS, BLOCK_R, BLOCK_N)
            tl.store(SPART + sid * N + cols, sw, mask=cmask)
            if HAS_BIAS:
                tl.store(SPART + (NS + sid) * N + cols, sb, mask=cmask)
            tl.store(CNT + NGRP + 1 + sid, 0)
            tl.debug_barrier()
            n_sub = tl.cdiv(n, SG)
            if tl.atomic_add(CNT + grp, 1, sem="acq_rel", scope="gpu") == n_sub - 1:
                gw, gb = _sum_rows(SPART, SPART + NS * N, grp * NSG, n_sub, N, cols, cmask, HAS_BIAS, BLOCK_R,
                                   BLOCK_N)
                _group_done(GPART, SQ, DW, DB, CNT, grp, gw, gb, N, NGRP, cols, cmask, HAS_BIAS, K, MODE, BLOCK_R,
                            BLOCK_N)
    else:
        arrived = tl.atomic_add(CNT + grp, 1, sem="acq_rel", scope="gpu")
        if arrived == n - 1:
            gw, gb = _sum_rows(PART, PART + P * N, lo, n, N, cols, cmask, HAS_BIAS, BLOCK_R, BLOCK_N)
            _group_done(GPART, SQ, DW, DB, CNT, grp, gw, gb, N, NGRP, cols, cmask, HAS_BIAS, K, MODE, BLOCK_R,
                        BLOCK_N)


@triton.jit
def _group_done(
    GPART, SQ, DW, DB, CNT, grp, gw, gb, N, NGRP, cols, cmask,
    HAS_BIAS: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A group's sums gw (and gb) are complete: store them (MODE 2: and the example's squared norms); the
    last group to get here sums the groups' rows into dγ and dβ."""
    tl.store(GPART + grp * N + cols, gw, mask=cmask)
    if MODE == 2:
        tl.store(SQ + grp * K, tl.sum(gw * gw, axis=0))
    if HAS_BIAS:
        tl.store(GPART + (NGRP + grp) * N + cols, gb, mask=cmask)
        if MODE == 2:
            tl.store(SQ + grp * K + 1, tl.sum(gb * gb, axis=0))
    tl.store(CNT + grp, 0)
    tl.debug_barrier()
    done = tl.atomic_add(CNT + NGRP, 1, sem="acq_rel", scope="gpu")
    if done == NGRP - 1:
        tw, tb = _sum_rows(GPART, GPART + NGRP * N, 0, NGRP, N, cols, cmask, HAS_BIAS, BLOCK_R, BLOCK_N)
        tl.store(DW + cols, tw.to(DW.dtype.element_ty), mask=cmask)
        if HAS_BIAS:
            tl.store(DB + cols, tb.to(DB.dtype.element_ty), mask=cmask)
        tl.store(CNT + NGRP, 0)


@triton.jit
def _layer_norm_bwd_reduce_kernel(
    PART,  # (K, NG, NC, N) fp32 partial sums (Σ dy ⊙ x̂, then Σ dy): NG groups (examples) of NC each
    DW,  # (N,) dγ, weight dtype
    DB,  # (N,) dβ, bias dtype; dummy when HAS_BIAS is False
    SQPART,  # (NG, K, NB) fp32 scratch: Σ over one program's columns of (Σ_c PART)²; only when HAS_SQ
    SQ,  # (NG, K) fp32 output: per-example squared norms; only when HAS_SQ
    COUNTER,  # (1,) int32, zero between launches: programs done, for the last one to finish SQ
    NG,
    NC,
    N,
    NB,  # number of column blocks = programs
    HAS_BIAS: tl.constexpr,
    HAS_SQ: tl.constexpr,
    K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NB: tl.constexpr,  # next power of two >= NB
    USE_PDL: tl.constexpr,
):
    _pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    bias_off = NG * NC * N  # where the Σ dy partials start (NG * NC = P programs: no int32 overflow)
    tot_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    tot_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(0, NG, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        gmask = gs < NG
        acc_w = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, NC, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            m = gmask[:, None, None] & (cs < NC)[None, :, None] & cmask[None, None, :]
            offs = (gs[:, None, None] * NC + cs[None, :, None]) * N + cols[None, None, :]
            acc_w += tl.sum(tl.load(PART + offs, mask=m, other=0.0), axis=1)
            if HAS_BIAS:
                acc_b += tl.sum(tl.load(PART + bias_off + offs, mask=m, other=0.0), axis=1)
        tot_w += tl.sum(acc_w, axis=0)
        if HAS_SQ:
            tl.store(SQPART + (gs * K) * NB + pid, tl.sum(acc_w * acc_w, axis=1), mask=gmask)
        if HAS_BIAS:
            tot_b += tl.sum(acc_b, axis=0)
            if HAS_SQ:
                tl.store(SQPART + (gs * K + 1) * NB + pid, tl.sum(acc_b * acc_b, axis=1), mask=gmask)
    tl.store(DW + cols, tot_w.to(DW.dtype.element_ty), mask=cmask)
    if HAS_BIAS:
        tl.store(DB + cols, tot_b.to(DB.dtype.element_ty), mask=cmask)
    _pdl_trigger(USE_PDL)
    if HAS_SQ:
        # The last program to finish adds up the column blocks' partial squared norms, in a fixed
        # order (deterministic). The usual semaphore: every thread's stores, a CTA barrier, then one
        # gpu-scope acq_rel atomic (as CUTLASS's GenericBarrier); the reader loads through L2 (.cg).
        tl.debug_barrier()
        done = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")
        if done == NB - 1:
            nbs = tl.arange(0, BLOCK_NB)
            for g0 in range(0, NG, BLOCK_G):
                gs = g0 + tl.arange(0, BLOCK_G)
                gmask = gs < NG
                m = gmask[:, None] & (nbs < NB)[None, :]
                for k in tl.static_range(K):
                    tile = tl.load(
                        SQPART + (gs[:, None] * K + k) * NB + nbs[None, :], mask=m, other=0.0, cache_modifier=".cg"
                    )
                    tl.store(SQ + gs * K + k, tl.sum(tile, axis=1), mask=gmask)
            tl.store(COUNTER, 0)  # ready for the next launch (same stream: launches are ordered)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------

MAX_N = 8192  # the largest hidden size the row-in-registers kernels are built and tested for


class _BwdConfig(NamedTuple):
    """Launch configuration of the backward for one (BLOCK_N, bytes per element)."""

    block_m: int  # rows per tile
    num_warps: int
    per_sm: int  # programs per SM: more put more loads in flight, but each writes its own partial sums
    tail: bool  # reduce the partial sums in the main kernel's last programs (no second kernel), where
    #             each of its levels reads at most _TAIL_MAX_BYTES (one program reads them)
    depth: int  # tiles loaded ahead in registers (software prefetch): 1 or 2
    stages: int = 0  # > 0: for an even N, the compiler pipelines the loads over this many stages of
    #                  shared memory instead (_bwd_rows_pipelined); depth is then unused
    maxnreg: Optional[int] = None  # registers per thread at most (more programs fit on an SM)
    tail_sub: bool = False  # the tail reduction over three levels where that saves loads: each group of
    #                         programs first in subgroups (_subgroup; a shorter chain of loads, one more atomic)


# The tuned launch configurations by (BLOCK_N, bytes per element), with where each value came from (the
# device, date, commit and command of the sweep that chose it, and what it measured): package data that
# `python -m benchmarks.tuning.layernorm --sweep --write-table PATH` writes (docs/benchmarks.md).
LAUNCH_TABLE = Path(__file__).with_name("launch_table.json")
_FWD_FIELDS = ("block_m", "num_warps")
_SOURCE_FIELDS = ("device", "date", "commit", "command")


def _is_pow2(v) -> bool:
    return type(v) is int and v > 0 and v & (v - 1) == 0


# what each field of an entry may hold: (check, what it accepts)
_FIELD_CHECKS = {
    "block_m": (_is_pow2, "a power of two"),
    "num_warps": (_is_pow2, "a power of two"),
    "per_sm": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "tail": (lambda v: type(v) is bool, "true or false"),
    "depth": (lambda v: type(v) is int and v in (1, 2), "1 or 2"),
    "stages": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "maxnreg": (lambda v: v is None or (type(v) is int and v > 0), "null or a positive integer"),
    "tail_sub": (lambda v: type(v) is bool, "true or false"),
}


def launch_table_keys() -> set[tuple[int, int]]:
    """Every (BLOCK_N, bytes per element) the launchers look up in the table: BLOCK_N = 1024 ... MAX_N (below
    1024 a rule in _fwd_config / _bwd_config decides), 2 bytes (bf16, fp16) and 4 (fp32)."""
    return {(1 << k, nbytes) for k in range(10, MAX_N.bit_length()) for nbytes in (2, 4)}


def _table_entries(table: dict, name: str, fields: tuple[str, ...], fail) -> dict[tuple[int, int], dict]:
    """{(block_n, bytes): {field: value}} of table[name], each entry checked; fail(message) raises."""
    entries = table.get(name)
    if not isinstance(entries, list):
        fail(f"{name!r} must be a list of entries")
    keys, out = launch_table_keys(), {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("chosen_by", {}), dict):
            fail(f"each {name} entry must be an object, its chosen_by an object; got {entry!r}")
        key = (entry.get("block_n"), entry.get("bytes"))
        where = f"{name} entry (block_n, bytes) = {key}"
        if key not in keys:
            fail(f"{where}: block_n must be a power of two from 1024 to {MAX_N} and bytes 2 or 4")
        if key in out:
            fail(f"{where} is given twice")
        given = set(entry) - {"block_n", "bytes", "chosen_by"}
        if given != set(fields):
            fail(f"{where}: fields must be {', '.join(fields)}; got {', '.join(sorted(given))}")
        for field in fields:
            check, accepts = _FIELD_CHECKS[field]
            if not check(entry[field]):
                fail(f"{where}: {field} must be {accepts}, got {entry[field]!r}")
        for field, source in entry.get("chosen_by", {}).items():
            if field not in fields or source not in table["sources"]:
                fail(f"{where}: chosen_by must map its fields to names in 'sources', got {field!r}: {source!r}")
        out[key] = {field: entry[field] for field in fields}
    if missing := sorted(keys - set(out)):
        fail(f"{name!r} has no entry for (block_n, bytes) {missing}")
    return out


def load_launch_table(path=LAUNCH_TABLE) -> tuple[dict, dict]:
    """(forward, backward) launch configurations by (BLOCK_N, bytes per element) from a launch_table.json.

    Checked before use, so that a table written by hand or by the sweep cannot leave a size without a
    configuration: an entry for every key of launch_table_keys() in each of "forward" (block_m, num_warps)
    and "backward" (_BwdConfig's fields, all of them), values the kernels accept, and every source that an
    entry's chosen_by names described in "sources" (device, date, commit, command). ValueError otherwise.
    """

    def fail(message: str):
        raise ValueError(f"launch table {path}: {message}")

    try:
        table = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        fail(f"not JSON ({e})")
    sources = table.get("sources") if isinstance(table, dict) else None
    if not isinstance(sources, dict):
        fail("'sources' must map each source's name to its description")
    for name, source in sources.items():
        if missing := [k for k in _SOURCE_FIELDS if k not in source]:
            fail(f"source {name!r} lacks {', '.join(missing)}")
    forward = _table_entries(table, "forward", _FWD_FIELDS, fail)
    backward = _table_entries(table, "backward", _BwdConfig._fields, fail)
    return ({k: (e["block_m"], e["num_warps"]) for k, e in forward.items()},
            {k: _BwdConfig(**e) for k, e in backward.items()})


# (BLOCK_M rows per program, num_warps) of the forward and _BwdConfig of the backward, by (BLOCK_N, bytes)
_FWD_CONFIG, _BWD_CONFIG = load_launch_table()
_TAIL_MAX_BYTES = 256 << 10
_CPU_TARGET_PROGRAMS = 4  # the interpreter runs programs one after another: a handful is plenty
# Launch the kernels with programmatic dependent launch where the GPU has it (sm90+). Each kernel lets
# the next one launch after its main work (_pdl_trigger): the launch gap is hidden and a persistent grid
# is still placed evenly (docs/benchmarks.md: on an H100 0-1.5 µs fewer, and nothing slower).
PDL = True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv from Python goes through a slow constexpr wrapper)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _fwd_config(block_n: int, elem_size: int) -> tuple[int, int]:
    if block_n < 1024:  # small rows: several per program, 4 warps
        return max(1, min(16, 4096 // block_n)), 4
    return _FWD_CONFIG[(block_n, 2 if elem_size <= 2 else 4)]


def _bwd_config(block_n: int, elem_size: int) -> _BwdConfig:
    if block_n < 1024:
        return _BwdConfig(max(1, min(16, 4096 // block_n)), 4, 2, False, 1)
    return _BWD_CONFIG[(block_n, 2 if elem_size <= 2 else 4)]


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _pdl(device: torch.device) -> bool:
    if not PDL or device.type != "cuda":
        return False
    return _has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def _target_programs(device: torch.device, progs_per_sm: int) -> int:
    if device.type != "cuda":
        return _CPU_TARGET_PROGRAMS
    return sm_count(device) * progs_per_sm


def _bwd_plan(num_ex: int, T: int, block_m: int, target: int) -> tuple[int, int, int, int, int, int]:
    """Split rows over about `target` programs: returns (MODE, P programs, G, C, R, BLOCK_M).

    MODE 0 (T == 1): R rows (= examples) per program. MODE 1: G whole examples per program (few rows
    per example, or one program per example). MODE 2: each example split into C chunks of R rows.
    """
    M = num_ex * T
    if T == 1:
        R = _cdiv(_cdiv(M, target), block_m) * block_m
        return 0, _cdiv(M, R), 1, 1, R, block_m
    block_m = min(block_m, _next_pow2(T))
    C = min(_cdiv(target, num_ex), _cdiv(T, block_m))
    if C <= 1:
        G = _cdiv(num_ex, target)
        return 1, _cdiv(num_ex, G), G, 1, T, block_m
    R = _cdiv(_cdiv(T, C), block_m) * block_m
    C = _cdiv(T, R)
    if C == 1:
        return 1, num_ex, 1, 1, T, block_m
    return 2, num_ex * C, 1, C, R, block_m


def _tail_groups(mode: int, P: int, C: int, num_ex: int) -> tuple[int, int]:
    """(programs per group, groups) of the tail reduction: MODE 2 groups an example's C chunks."""
    if mode == 2:
        return C, num_ex
    gp = max(1, math.isqrt(P - 1) + 1)  # about √P programs per group and √P groups
    return gp, _cdiv(P, gp)


def _subgroup(GP: int, block_r: int) -> int:
    """Programs per subgroup for a group of GP: the fewest loads of block_r rows in a row (a subgroup's
    then the group's), the smallest such size; 0 (two levels) unless that saves two loads or more."""
    loads = {s: _cdiv(s, block_r) + _cdiv(_cdiv(GP, s), block_r) for s in range(2, GP)}
    best = min(loads, key=lambda s: (loads[s], s), default=0)
    return best if best and loads[best] + 2 <= _cdiv(GP, block_r) else 0


class _BwdLaunch(NamedTuple):
    """Everything the backward launches need for one shape."""

    P: int  # programs of the main kernel
    G: int  # MODE 1: examples per program
    C: int  # MODE 2: chunks per example
    R: int  # MODE 0: rows per program; MODE 2: rows per chunk
    GP: int  # tail reduction: programs per group (1 without it)
    NGRP: int  # tail reduction: groups (1 without it)
    SG: int  # tail reduction over three levels: programs per subgroup (1 without it)
    NSG: int  # tail reduction over three levels: subgroups per group (0 without it)
    work: int  # fp32 workspace elements: partial sums, then the groups' (and subgroups') sums or the partial norms
    main: dict  # the main kernel's constexprs and launch options
    reduce: Optional[tuple]  # (NG, NC, NB, has_sq, constexprs) of the reduce kernel; None with the tail


@functools.lru_cache(maxsize=256)
def _bwd_launch(
    num_ex: int, T: int, N: int, has_bias: bool, target: int, block_m: int, num_warps: int, tail: bool,
    depth: int = 1, stages: int = 0, maxnreg: Optional[int] = None, sub: int = 0, tail_rows: int = 0,
) -> _BwdLaunch:
    """The plan for one shape (cached: Python arithmetic costs µs on every call).

    sub: with the tail reduction, programs per subgroup of its middle level (-1: _subgroup's choice;
    0 or ≥ GP: no middle level); tail_rows: partial rows per load of the tail reduction, a power of two
    (0: rows of 32 fp32 per thread, at most 8).
    """
    if tail_rows < 0 or tail_rows & (tail_rows - 1):
        raise ValueError(f"tail_rows must be 0 or a power of two, got {tail_rows}")
    K = 2 if has_bias else 1
    block_n = _next_pow2(N)
    mode, P, G, C, R, bm = _bwd_plan(num_ex, T, block_m, target)
    GP, NGRP = _tail_groups(mode, P, C, num_ex)
    block_r = tail_rows or max(1, min(8, 1024 * num_warps // block_n))  # tail reduction: partial rows per load
    SG = (_subgroup(GP, block_r) if sub < 0 else sub) if tail else 0
    NSG = _cdiv(GP, SG) if 1 < SG < GP else 0
    most = max(SG, NSG, NGRP) if NSG else max(GP, NGRP)  # rows one program of the tail reduction reads
    tail = tail and most * K * N * 4 <= _TAIL_MAX_BYTES
    SG, NSG = (SG, NSG) if tail and NSG else (1, 0)
    main = dict(
        HAS_BIAS=has_bias, K=K, MODE=mode, TAIL_REDUCE=tail, TAIL_SUB=NSG > 0, BLOCK_M=bm, BLOCK_N=block_n,
        BLOCK_R=block_r, DEPTH=depth, STAGES=stages if N % 2 == 0 else 0,
        num_warps=num_warps,
    )
    if maxnreg:
        main["maxnreg"] = maxnreg
    if tail:
        return _BwdLaunch(P, G, C, R, GP, NGRP, SG, NSG, K * (P + NGRP + NGRP * NSG) * N, main, None)
    has_sq = mode == 2  # MODE 2 reduces (B, C, N) per example, then squares; otherwise sums (1, P, N)
    NG, NC = (num_ex, C) if has_sq else (1, P)
    block_n2 = min(block_n, 16)
    NB = _cdiv(N, block_n2)
    block_c = min(_next_pow2(NC), 256)
    block_g = max(1, min(_next_pow2(NG), 4096 // (block_c * block_n2)))
    reduce = dict(
        HAS_BIAS=has_bias, HAS_SQ=has_sq, K=K, BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_N=block_n2,
        BLOCK_NB=_next_pow2(NB), num_warps=4,
    )
    work = K * P * N + (num_ex * K * NB if has_sq else 0)  # then (MODE 2) the (B, K, NB) partial norms
    return _BwdLaunch(P, G, C, R, 1, 1, 1, 0, work, main, (NG, NC, NB, has_sq, reduce))


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> Tensor:
    """At least n zero int32 per device for the atomic arrival counts; every launch leaves them zero.

    One LayerNorm backward at a time per device (launches on one stream are ordered).
    """
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = _COUNTERS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


# --------------------------------------------------------------------------------------------------
# Launchers (plain functions on tensors; the autograd Function and the custom ops below call them)
# --------------------------------------------------------------------------------------------------


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (B, N) or (B, T, N), got shape {tuple(x.shape)}")
    N = x.shape[-1]
    # plain int comparisons: comparing torch.Size with a tuple costs µs on every call
    if weight.dim() != 1 or weight.shape[0] != N or (bias is not None and (bias.dim() != 1 or bias.shape[0] != N)):
        raise ValueError(f"weight/bias must be ({N},)")
    if N > MAX_N:
        raise ValueError(f"hidden size {N} > {MAX_N} is not supported by the row-in-registers kernel")


def layer_norm_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, *, residual: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None, block_m: Optional[int] = None, num_warps: Optional[int] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(y, stats, s): LayerNorm of s = x + residual (of x alone when residual is None).

    y has x's shape and out_dtype (default x's dtype); stats (2, M) fp32 = (mean, rstd) of the M rows;
    s = x + residual in torch's promoted dtype, or None without a residual.
    """
    _check(x, weight, bias)
    N = x.shape[-1]
    x2 = x.contiguous()  # a copy only when x is not contiguous
    M = x2.numel() // N
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        residual = residual.contiguous()
        s = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        s = None
    y = torch.empty_like(x2, dtype=out_dtype)
    stats = torch.empty((2, M), dtype=torch.float32, device=x.device)
    block_n = _next_pow2(N)
    bm, nw = _fwd_config(block_n, x.element_size())
    bm = block_m or bm
    if M > 0:
        pdl = _pdl(x.device)
        _layer_norm_fwd_kernel[(_cdiv(M, bm),)](
            x2, residual if s is not None else x2, s if s is not None else x2, weight,
            bias if bias is not None else weight, y, stats, M, N, eps,
            HAS_RES=s is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=block_n,
            DOWNCAST=y.dtype != torch.float32, USE_PDL=pdl, num_warps=num_warps or nw, launch_pdl=pdl,
        )
    return y, stats, s


def layer_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stats: Tensor, *, ds: Optional[Tensor] = None,
    dx2_dtype: Optional[torch.dtype] = None, block_m: Optional[int] = None, num_warps: Optional[int] = None,
    target_programs: Optional[int] = None, tail_reduce: Optional[bool] = None, depth: Optional[int] = None,
    stages: Optional[int] = None, maxnreg: Optional[int] = None, tail_sub: Optional[int] = None,
    tail_rows: Optional[int] = None, partials_only: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """(dx, dweight, dbias or None, per-example squared norms (B, k) fp32, dx2 or None).

    x is what was normalised (s with a residual). ds: the gradient of s from its other uses, added
    into dx. dx is in x's dtype; dx2_dtype, when given, asks for the same values once more in that
    dtype (the gradient of a residual input narrower than s), written by the same pass.
    block_m, num_warps, target_programs (about how many programs share the rows), tail_reduce (sum the
    partials in the main kernel's last programs instead of a second kernel), tail_sub (programs per
    subgroup of the tail reduction's middle level; 0: two levels; -1: _subgroup's choice), tail_rows
    (partial rows per load of the tail reduction), depth (tiles loaded ahead in registers, 1 or 2),
    stages (> 0: pipeline the loads through shared memory, even N only) and maxnreg (registers per
    thread at most; 0: no cap) override the tuned launch configuration (_BWD_CONFIG), for the sweep and
    the tests. partials_only: launch the main kernel alone, without
    any reduction after its loop; dx is complete but dweight, dbias and the norms are left unset (the
    fixed-cost benchmark times what that reduction costs).
    """
    N = x.shape[-1]
    num_ex = x.shape[0]
    T = x.shape[1] if x.dim() == 3 else 1
    has_bias = bias is not None
    x2 = x.contiguous()
    dy2 = dy.contiguous()
    ds2 = ds.contiguous() if ds is not None else None
    M = num_ex * T
    dev = x.device
    dx = torch.empty_like(x2)
    dx2 = torch.empty_like(x2, dtype=dx2_dtype) if dx2_dtype is not None else None
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias) if has_bias else None
    if M == 0:
        dw.zero_()
        if db is not None:
            db.zero_()
        return dx, dw, db, torch.zeros(num_ex, 2 if has_bias else 1, dtype=torch.float32, device=dev), dx2
    cfg = _bwd_config(_next_pow2(N), x.element_size())
    tail_reduce = (cfg.tail if tail_reduce is None else tail_reduce) and not partials_only
    target = target_programs or _target_programs(dev, cfg.per_sm)
    stages = cfg.stages if stages is None else stages
    if stages and any(t.data_ptr() % 4 for t in (x2, dy2, ds2) if t is not None):
        stages = 0  # _bwd_rows_pipelined reads pairs of 16-bit values as 32-bit words
    plan = _bwd_launch(
        num_ex, T, N, has_bias, target, block_m or cfg.block_m, num_warps or cfg.num_warps, tail_reduce,
        depth or cfg.depth, stages, cfg.maxnreg if maxnreg is None else maxnreg,
        (-1 if cfg.tail_sub else 0) if tail_sub is None else tail_sub, tail_rows or 0,
    )
    P = plan.P
    work = torch.empty(plan.work, dtype=torch.float32, device=dev)
    sq = torch.empty((num_ex, 2 if has_bias else 1), dtype=torch.float32, device=dev)
    cnt = _counters(dev, plan.NGRP + 1 + plan.NGRP * plan.NSG)
    pdl = _pdl(dev)
    _layer_norm_bwd_kernel[(P,)](
        x2, dy2, weight, stats, dx, ds2 if ds2 is not None else dx, dx2 if dx2 is not None else dx, work, sq,
        dw, db if has_bias else dw, cnt, M, N, T, num_ex, P, plan.G, plan.C, plan.R, plan.GP, plan.NGRP,
        plan.SG, plan.NSG, HAS_DRES=ds2 is not None, HAS_DX2=dx2 is not None, USE_PDL=pdl, launch_pdl=pdl,
        **plan.main,
    )
    if plan.reduce is not None and not partials_only:
        NG, NC, NB, has_sq, consts = plan.reduce
        KPN = consts["K"] * P * N
        _layer_norm_bwd_reduce_kernel[(NB,)](
            work, dw, db if has_bias else dw, work[KPN:] if has_sq else work, sq, cnt, NG, NC, N, NB,
            USE_PDL=pdl, launch_pdl=pdl, **consts,
        )
    return dx, dw, db, sq, dx2


# --------------------------------------------------------------------------------------------------
# Autograd: a torch.autograd.Function in eager mode (the cheapest on the host: every µs of Python
# here is paid on each call), and torch.library custom ops with the same launchers for torch.compile,
# which keeps them as opaque nodes (fake kernels for tracing, a registered autograd formula).
# --------------------------------------------------------------------------------------------------


def _grad_dtypes(s_dtype: torch.dtype, x_dtype: torch.dtype, r_dtype: Optional[torch.dtype]):
    """The second dx dtype the backward kernel writes: the input of the add that is narrower than s."""
    if x_dtype != s_dtype:
        return x_dtype
    if r_dtype is not None and r_dtype != s_dtype:
        return r_dtype
    return None


def _input_grads(dx: Tensor, dx2: Optional[Tensor], x_dtype: torch.dtype, r_dtype: Optional[torch.dtype]):
    """(grad of x, grad of residual or None) from the backward's dx (s's dtype) and dx2."""
    def pick(dtype):
        if dtype == dx.dtype:
            return dx
        return dx2 if dx2 is not None and dx2.dtype == dtype else dx.to(dtype)

    return pick(x_dtype), (pick(r_dtype) if r_dtype is not None else None)


def _save_for_backward(ctx, x, residual, weight, bias, sink, s, stats) -> None:
    """What both autograd paths keep: the normalised input (s with a residual), γ, β, stats, dtypes."""
    has_res = residual is not None
    ctx.save_for_backward(s if has_res else x, weight, bias, stats)
    ctx.has_sink = sink is not None
    ctx.dtypes = (x.dtype, residual.dtype if has_res else None)
    ctx.set_materialize_grads(False)  # ds stays None when s has no other use: nothing to add


def _input_grads_from(ctx, dy, ds, backward) -> tuple:
    """Gradients of (x, residual, weight, bias, sink, eps, out_dtype) from those of y and s.

    backward(dy, ds, xs, weight, bias, stats, dx2_dtype) -> (dx, dw, db, sq, dx2): the launcher in eager
    mode, the custom op under torch.compile (which returns empty tensors for an absent db or dx2).
    """
    xs, weight, bias, stats = ctx.saved_tensors
    x_dtype, r_dtype = ctx.dtypes
    if dy is None:  # y unused (only s is): the LayerNorm passes no gradient
        dy = torch.zeros_like(xs)
    dx2_dtype = _grad_dtypes(xs.dtype, x_dtype, r_dtype)
    dx, dw, db, sq, dx2 = backward(dy, ds if r_dtype is not None else None, xs, weight, bias, stats, dx2_dtype)
    gx, gr = _input_grads(dx, dx2 if dx2_dtype is not None else None, x_dtype, r_dtype)
    return gx, gr, dw, (db if bias is not None else None), (sq if ctx.has_sink else None), None, None


def _launch_backward(dy, ds, xs, weight, bias, stats, dx2_dtype):
    return layer_norm_backward(dy, xs, weight, bias, stats, ds=ds, dx2_dtype=dx2_dtype)


class _LayerNormPerExample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, sink, eps, out_dtype):
        # sink is an input only so that autograd routes the per-example norms to it; it is never read
        y, stats, s = layer_norm_forward(x, weight, bias, eps, residual=residual, out_dtype=out_dtype)
        _save_for_backward(ctx, x, residual, weight, bias, sink, s, stats)
        return y if s is None else (y, s)

    @staticmethod
    def backward(ctx, dy, ds=None):
        return _input_grads_from(ctx, dy, ds, _launch_backward)


@torch.library.custom_op("gnsrepro::layer_norm_pe_fwd", mutates_args=())
def _layer_norm_pe_fwd(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], sink: Optional[Tensor],
    eps: float, out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor]:
    y, stats, s = layer_norm_forward(x, weight, bias, eps, residual=residual, out_dtype=out_dtype)
    # a custom op cannot return None: an empty tensor stands for "no residual, no s"
    return y, stats, s if s is not None else x.new_empty(0)


@_layer_norm_pe_fwd.register_fake
def _(x, residual, weight, bias, sink, eps, out_dtype):
    M = x.numel() // x.shape[-1]
    s = x.new_empty(0)
    if residual is not None:
        s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), x.new_empty((2, M), dtype=torch.float32), s


@torch.library.custom_op("gnsrepro::layer_norm_pe_bwd", mutates_args=())
def _layer_norm_pe_bwd(
    dy: Tensor, ds: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor], stats: Tensor,
    dx2_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, sq, dx2 = layer_norm_backward(dy, x, weight, bias, stats, ds=ds, dx2_dtype=dx2_dtype)
    # empty tensors stand for "no bias" and "no second dx"
    return dx, dw, db if db is not None else weight.new_empty(0), sq, dx2 if dx2 is not None else x.new_empty(0)


@_layer_norm_pe_bwd.register_fake
def _(dy, ds, x, weight, bias, stats, dx2_dtype):
    K = 2 if bias is not None else 1
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    sq = x.new_empty((x.shape[0], K), dtype=torch.float32)
    dx2 = x.new_empty(x.shape, dtype=dx2_dtype) if dx2_dtype is not None else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db, sq, dx2


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, sink, eps, out_dtype = inputs
    _, stats, s = output
    _save_for_backward(ctx, x, residual, weight, bias, sink, s, stats)
    ctx.mark_non_differentiable(stats)
    if residual is None:
        ctx.mark_non_differentiable(s)


def _backward(ctx, dy, _dstats, ds):
    return _input_grads_from(ctx, dy, ds, torch.ops.gnsrepro.layer_norm_pe_bwd)


_layer_norm_pe_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm_per_example(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, sink: Optional[Tensor],
    out_dtype: Optional[torch.dtype] = None, residual: Optional[Tensor] = None,
):
    """LayerNorm over the last dim of x ((B, T, N) or (B, N)) whose backward writes per-example norms.

    sink: float32 leaf (B, k), requires_grad, k = 2 with a bias else 1; its value is unused. After
    backward, sink.grad[:, 0] += |dγ_b|² and sink.grad[:, 1] += |dβ_b|² (from dy as it arrives).
    Pass None to skip the per-example output (the kernel still runs the same way).
    out_dtype: y's dtype (default x's). Writing y straight in bf16 when its consumer casts to bf16
    anyway (a Linear under autocast) gives the same values and saves the cast's pass over memory;
    dy then arrives in out_dtype, and dx is still in x's dtype.
    residual: fused pre-LN residual add. Returns (y, s) with s = x + residual (torch's promoted dtype)
    and y = LayerNorm(s): one pass writes both, and the backward adds s's incoming gradient into dx
    and writes the gradients of x and residual in their own dtypes (the transformer block's
    ``s = x + branch(...)`` followed by a LayerNorm, as fused LayerNorm libraries and inductor do).
    Without a residual, returns y.
    Eager calls go through a torch.autograd.Function; under torch.compile through the custom ops (with torch
    2.11, call gnsrepro.kernels.brief_inductor_fallback_log() before compiling a deep model: its docstring says why).
    """
    if sink is not None:
        k = 2 if bias is not None else 1
        if sink.dim() != 2 or sink.shape[0] != x.shape[0] or sink.shape[1] != k or sink.dtype != torch.float32:
            raise ValueError(f"sink must be float32 of shape ({x.shape[0]}, {k}), got {sink.dtype} {tuple(sink.shape)}")
    if torch.compiler.is_compiling():
        return layer_norm_per_example_op(x, weight, bias, eps, sink, out_dtype, residual)
    return _LayerNormPerExample.apply(x, residual, weight, bias, sink, float(eps), out_dtype)


def layer_norm_per_example_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, sink: Optional[Tensor],
    out_dtype: Optional[torch.dtype] = None, residual: Optional[Tensor] = None,
):
    """The same through the registered custom ops, also in eager mode (what torch.compile records)."""
    y, _, s = torch.ops.gnsrepro.layer_norm_pe_fwd(x, residual, weight, bias, sink, float(eps), out_dtype)
    return y if residual is None else (y, s)


@torch.compiler.disable
def _new_sink(num_ex: int, k: int, device: torch.device) -> Tensor:
    """A fresh float32 zero leaf (B, k) that requires grad (outside any compiled graph)."""
    return torch.zeros(num_ex, k, dtype=torch.float32, device=device, requires_grad=True)


class TritonLayerNorm(nn.Module):
    """nn.LayerNorm over the last dimension, with per-example gradient norms in ``last_sink.grad``.

    Every forward allocates a fresh zero sink of shape (B, k); after backward, ``self.last_sink.grad``
    holds |dγ_b|² (column 0) and |dβ_b|² (column 1, with bias) for that forward's examples. Dynamo
    cannot create a leaf that requires grad inside a graph, so under torch.compile(fullgraph=True)
    pass the sink in: ``ln(x, sink)`` (it is then also kept in ``last_sink``).
    """

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps
        self.last_sink: Optional[Tensor] = None

    def forward(self, x: Tensor, sink: Optional[Tensor] = None, residual: Optional[Tensor] = None):
        """y = LayerNorm(x); with a residual, (y, s) = (LayerNorm(s), s) for s = x + residual."""
        if sink is None:
            sink = _new_sink(x.shape[0], 2 if self.bias is not None else 1, x.device)
        self.last_sink = sink
        return layer_norm_per_example(x, self.weight, self.bias, self.eps, sink, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (explicit formulas, fp32)
# --------------------------------------------------------------------------------------------------


def layer_norm_per_example_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, dy: Tensor
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """(y, dx, dweight, dbias, sq_weight (B,), sq_bias (B,) or None), all in fp32 from explicit formulas.

    x̂ = (x − mean)·rstd;  y = x̂γ + β;  dx = rstd·(dy·γ − mean(dy·γ) − x̂·mean(dy·γ ⊙ x̂));
    dγ_b = Σ_t dy ⊙ x̂, dβ_b = Σ_t dy (per example, T = 1 for a 2-D x); sq = Σ_N of their squares.
    """
    x3 = (x if x.dim() == 3 else x.unsqueeze(1)).float()  # (B, T, N)
    dy3 = (dy if dy.dim() == 3 else dy.unsqueeze(1)).float()
    w = weight.float()
    mean = x3.mean(-1, keepdim=True)
    var = ((x3 - mean) ** 2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (x3 - mean) * rstd
    y = xhat * w + (bias.float() if bias is not None else 0.0)
    wdy = dy3 * w
    dx = rstd * (wdy - wdy.mean(-1, keepdim=True) - xhat * (wdy * xhat).mean(-1, keepdim=True))
    gw = (dy3 * xhat).sum(1)  # (B, N) per-example dγ_b
    gb = dy3.sum(1)  # (B, N) per-example dβ_b
    sq_w = gw.pow(2).sum(-1)
    sq_b = gb.pow(2).sum(-1) if bias is not None else None
    db = gb.sum(0) if bias is not None else None
    return y.view(x.shape), dx.view(x.shape), gw.sum(0), db, sq_w, sq_b
