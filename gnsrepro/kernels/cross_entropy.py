"""Mean token cross-entropy for the 50304-wide head (Triton): two kernels by default, or one that writes
d loss / d logits in the forward.

For logits z (N, V), targets y (N,) and the n_valid rows whose target is not ignore_index:

    loss  = (1 / n_valid) · Σ_{i valid} ℓ_i,      ℓ_i = lse_i − z_{i, y_i},   lse_i = log Σ_j exp z_{ij}
    ∂loss/∂z_{ij} = (softmax(z_i)_j − [j = y_i]) / n_valid   (valid rows; ignored rows: ℓ_i = 0, gradient 0)

which is F.cross_entropy(z.float(), y, ignore_index=..., reduction="mean"). The gradient is the softmax's
Jacobian applied to the log-likelihood's (docs/method.md, section 2, "The contract": a GPT's loss is this mean over its
B·T tokens; example b's gradient is that of its own mean token loss, over B). Every row's log-sum-exp is
computed in fp32 in blocks of BLOCK_V columns: a running maximum m (a scalar: one reduction per block) and
per-lane sums of exp(z − m) rescaled when m grows (the "online softmax" of Milakov & Gimelshein 2018,
"Online normalizer calculation for softmax", algorithm 3), ``_row_lse``, shared by both designs.

Two-kernel design (the default, ``grad_in_forward=False``):
- ``_cross_entropy_lse_kernel`` (forward), a program per row: one read of the row, writes ℓ_i and lse_i
  (fp32, N values each). No gradient is written.
- ``_cross_entropy_bwd_kernel`` (backward), a program per row: reads the row again with lse_i, y_i and
  the incoming gradient d(outer)/d loss (a 0-d device tensor, read on the device: no host sync), and
  writes  g_ij = (exp(z_ij − lse_i) − [j = y_i]) · (d(outer)/d loss / n_valid),  computed in fp32 and
  rounded once to the logits' dtype, into a new tensor or in place over the logits (``inplace``): one
  read and one write of the (N, V) buffer, whatever the scale. Ignored rows get exactly 0.
The product by the incoming gradient is inside the backward kernel, so gradient accumulation's
``(loss / m).backward()`` costs no extra pass, and under torch.compile inductor, which sees both kernels
as opaque custom ops, has no pointwise product of its own to add.

One-kernel design (``grad_in_forward=True``, ``_cross_entropy_fwd_kernel``): a program per row (or a few
per SM looping over rows, PROGRAMS_PER_SM) makes two passes over each row, the first for lse, the second
(re-reading the row, from L2 where it is still there: one row is 100 KB in bf16) writing the gradient
above for a scale of 1 (the approach of Liger-Kernel's cross-entropy: compute the gradient in the
forward). Its backward then multiplies that buffer by the incoming gradient in place
(``_scale_rows_kernel``, whose programs read the scale on the device and return at once when it is 1,
a plain ``loss.backward()``); any other scale is one more read and write of the (N, V) buffer, and under
torch.compile inductor makes the product itself, always.

n_valid is counted on the device ((targets != ignore_index).sum()): nothing here waits for the GPU. All
rows ignored (n_valid = 0): loss NaN (0/0) and gradient 0, as F.cross_entropy gives. A target outside
[0, V) that is not ignore_index gives a NaN row loss (torch raises instead; the check would need a sync).

``inplace=True`` (eager mode) writes the gradient into the logits tensor itself (saving one (N, V)
buffer: 1.6 GB at 16 × 1024 tokens of bf16 over 50304 classes), in the backward (two kernels: the
logits are saved for it and read there for the last time) or in the forward (one kernel: each program
reads its row's target logit before it overwrites the row). The caller guarantees that the logits are
not read afterwards (GPT.forward does so when it does not return them); with it, a second backward
through the same loss (retain_graph=True) raises, since the saved logits are gone.

Paths: eager calls go through a ``torch.autograd.Function`` (the cheapest on the host); under
torch.compile through ``torch.library.custom_op``s with fake kernels and registered autograd formulas
(as gnsrepro.kernels.layer_norm does), opaque nodes without a graph break: ``gnsrepro::cross_entropy_lse``
(whose autograd setup saves the logits and lse) and ``gnsrepro::cross_entropy_bwd`` (which takes the
incoming gradient as an input), or ``gnsrepro::cross_entropy_fwd`` for the one-kernel design. A custom op
with a registered autograd formula cannot mutate its inputs, so under torch.compile ``inplace`` is not
used and the backward op returns a new tensor. CPU tensors (unless TRITON_INTERPRET=1, the tests) and
float64 logits go to F.cross_entropy itself, the reference. Without autograd (evaluation) both designs run
the forward kernel of the two-kernel design alone: the loss in one pass over the logits.

Speed (one H200, torch 2.11, triton 3.6; (16 · 1024, 50304) bf16; a program per row): the one-kernel
design's forward 1.24-1.27 ms (a copy of its 3.3 GB read + write: 0.78 ms; the loss alone 0.51 ms),
its backward's scale 0.014 ms at 1 and 0.84 ms at 1/4 (triton.testing.do_bench); forward + backward
1.42 ms eagerly at scale 1, 2.31 ms at scale 1/4 and 2.33 ms compiled at any scale, against 2.26 ms for
inductor's two kernels on F.cross_entropy(z.float()) (docs/benchmarks.md). The two-kernel design should
take about the loss alone plus a copy (0.5 + 0.8 ms) at every scale, eager or compiled: not yet measured.
`pytest -m gpu -s tests/test_cross_entropy.py -k real_shape` prints all of these.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from gnsrepro.kernels import sm_count

# Triton decides at definition time whether its kernels run in the CPU interpreter (tests/conftest.py sets
# the variable before this module is imported); CPU tensors can use the kernels only then.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _row_lse(z_row, V, BLOCK_V: tl.constexpr):
    """log Σ_j exp z_j over one row (fp32): running max m (scalar), per-lane Σ exp(z − m) rescaled by
    exp(m_old − m_new) as m grows (Milakov & Gimelshein 2018, algorithm 3)."""
    cols0 = tl.arange(0, BLOCK_V)
    m = float("-inf")
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block holds at least one column
        acc = acc * tl.exp(m - m_new) + tl.exp(z - m_new)  # masked lanes add exp(−inf) = 0
        m = m_new
    return m + tl.log(tl.sum(acc, axis=0))


@triton.jit
def _cross_entropy_row(
    LOGITS, GRAD, TARGETS, N_VALID, ROW_LOSS, row, stride_logits, stride_grad, V, ignore_index,
    BLOCK_V: tl.constexpr, DOWNCAST: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One row of _cross_entropy_fwd_kernel (its arguments are described there)."""
    z_row = LOGITS + row * stride_logits
    g_row = GRAD + row * stride_grad
    target = tl.load(TARGETS + row)
    cols0 = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=GRAD.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                tl.store(g_row + cols, zero, mask=cols < V)
        tl.store(ROW_LOSS + row, 0.0)
    else:
        # the target's logit first: with GRAD == LOGITS the second pass overwrites it
        in_range = (target >= 0) & (target < V)
        z_target = tl.load(z_row + target, mask=in_range, other=float("nan")).to(tl.float32)
        lse = _row_lse(z_row, V, BLOCK_V)  # pass 1
        # pass 2: (softmax − onehot) / n_valid, in fp32 then rounded once to GRAD's dtype
        if WRITE_GRAD:
            n_valid = tl.load(N_VALID).to(tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                mask = cols < V
                z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(z - lse)
                g = tl.where(cols == target, p - 1.0, p) / n_valid
                if DOWNCAST:
                    g = g.to(GRAD.dtype.element_ty, fp_downcast_rounding="rtne")
                tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=mask)
        tl.store(ROW_LOSS + row, lse - z_target)


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS,  # (N, V) rows of unit column stride, fp32 | bf16 | fp16
    GRAD,  # (N, V) output in GRAD's dtype (LOGITS' own): (softmax − onehot) / n_valid; may be LOGITS itself
    TARGETS,  # (N,) integer class ids, or ignore_index
    N_VALID,  # () integer: rows whose target is not ignore_index
    ROW_LOSS,  # (N,) fp32 output: lse − logit at the target; 0 for an ignored row
    N,
    stride_logits,  # elements between rows of LOGITS
    stride_grad,  # ... of GRAD
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,  # columns per block of the loops over a row
    DOWNCAST: tl.constexpr,  # GRAD narrower than fp32: round to nearest even, as torch's .to() does
    WRITE_GRAD: tl.constexpr,  # False: the loss alone (no gradient wanted), one pass over the row
):
    """Rows pid, pid + programs, ...: a grid of a few programs per SM bounds the rows between their two
    passes, so that they stay in L2 for the second one."""
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        _cross_entropy_row(LOGITS, GRAD, TARGETS, N_VALID, ROW_LOSS, tl.cast(row, tl.int64), stride_logits, stride_grad,
                           V, ignore_index, BLOCK_V, DOWNCAST, WRITE_GRAD)


@triton.jit
def _scale_rows_kernel(
    GRAD,  # (N, V) scaled in place
    SCALE,  # () the incoming gradient d(outer)/d loss, any float dtype
    stride,  # elements between rows of GRAD
    V,
    BLOCK_V: tl.constexpr,
    DOWNCAST: tl.constexpr,
):
    """GRAD *= SCALE, one program per row; every program returns at once when SCALE is 1 (read on the
    device, so the host never waits to find out)."""
    s = tl.load(SCALE).to(tl.float32)
    if s != 1.0:
        g_row = GRAD + tl.program_id(0).to(tl.int64) * stride
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32) * s
            if DOWNCAST:
                g = g.to(GRAD.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_lse_kernel(
    LOGITS,  # (N, V) rows of unit column stride, fp32 | bf16 | fp16
    TARGETS,  # (N,) integer class ids, or ignore_index
    ROW_LOSS,  # (N,) fp32 output: lse − logit at the target; 0 for an ignored row
    LSE,  # (N,) fp32 output: log Σ_j exp z_ij; 0 for an ignored row (not computed: its row is not read)
    stride,  # elements between rows of LOGITS
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,  # columns per block of the loop over a row
):
    """The two-kernel design's forward: row pid's loss and log-sum-exp, one read of the row."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        tl.store(ROW_LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
    else:
        z_row = LOGITS + row * stride
        in_range = (target >= 0) & (target < V)
        z_target = tl.load(z_row + target, mask=in_range, other=float("nan")).to(tl.float32)
        lse = _row_lse(z_row, V, BLOCK_V)
        tl.store(ROW_LOSS + row, lse - z_target)
        tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    LOGITS,  # (N, V) rows of unit column stride, fp32 | bf16 | fp16
    GRAD,  # (N, V) output in LOGITS' dtype; may be LOGITS itself (each block is read before it is written)
    TARGETS,  # (N,) integer class ids, or ignore_index
    LSE,  # (N,) fp32 from _cross_entropy_lse_kernel
    DLOSS,  # () the incoming gradient d(outer)/d loss, any float dtype
    N_VALID,  # () integer: rows whose target is not ignore_index
    stride_logits,  # elements between rows of LOGITS
    stride_grad,  # ... of GRAD
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    DOWNCAST: tl.constexpr,  # GRAD narrower than fp32: round to nearest even, as torch's .to() does
):
    """The two-kernel design's backward, row pid: GRAD = (exp(z − lse) − onehot) · DLOSS / N_VALID in fp32,
    rounded once to GRAD's dtype; 0 for an ignored row. One read and one write of the row."""
    row = tl.program_id(0).to(tl.int64)
    g_row = GRAD + row * stride_grad
    target = tl.load(TARGETS + row)
    cols0 = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        zero = tl.zeros([BLOCK_V], dtype=GRAD.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            tl.store(g_row + cols, zero, mask=cols < V)
    else:
        z_row = LOGITS + row * stride_logits
        lse = tl.load(LSE + row)
        # one division per program; n_valid ≥ 1 here (this row is valid)
        scale = tl.load(DLOSS).to(tl.float32) / tl.load(N_VALID).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            g = tl.where(cols == target, p - 1.0, p) * scale
            if DOWNCAST:
                g = g.to(GRAD.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _block_v(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps). On a GPU 4096 columns (16 per thread at 8 warps) keeps enough loads in flight
    per program; the interpreter runs a block as one numpy operation, so there larger blocks are faster."""
    if device.type != "cuda":
        return triton.next_power_of_2(min(V, 1 << 16)), 1
    block = min(triton.next_power_of_2(V), 4096)
    return block, max(1, min(8, block // 512))

# The one-kernel design's grid on a GPU: None, a program per row (the configuration timed in the module docstring); or
# this many programs per SM looping over rows, which bounds the rows between their two passes so that the
# second finds them in L2 (written, tested for correctness, not yet timed: `programs=` to try it).
PROGRAMS_PER_SM: int | None = None


@functools.cache
def _programs(device: torch.device) -> int:
    if device.type != "cuda" or PROGRAMS_PER_SM is None:
        return 1 << 62  # min(N, this): a program per row
    return PROGRAMS_PER_SM * sm_count(device)


def _check(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2 or logits.dtype not in KERNEL_DTYPES:
        raise ValueError(f"logits must be 2-D (N, V) in float32, bfloat16 or float16, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if targets.shape != logits.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 of shape ({logits.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")


def _grad_buffer(logits: Tensor, grad_out: Tensor | None) -> Tensor:
    """Where a kernel writes d loss / d logits: grad_out (the logits themselves, in place) or a new tensor."""
    if grad_out is None:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    if grad_out.shape != logits.shape or grad_out.dtype != logits.dtype or grad_out.stride(1) != 1:
        raise ValueError(f"grad_out must be {logits.dtype} {tuple(logits.shape)} with unit column stride")
    return grad_out


def cross_entropy_forward(
    logits: Tensor, targets: Tensor, ignore_index: int = -1, grad_out: Tensor | None = None,
    write_grad: bool = True, block_v: int | None = None, num_warps: int | None = None, programs: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, grad): the mean cross-entropy (0-d fp32) and d loss / d logits (logits' dtype), one kernel.

    logits (N, V) with unit column stride; targets (N,) int64. grad_out: where to write the gradient,
    (N, V) of logits' dtype (logits itself for the in-place use); default a new tensor. write_grad=False:
    the loss alone (one pass over the logits) and an empty grad. block_v, num_warps: override the launch
    (tests use small blocks to run several iterations of the loop over a row); programs: the grid.
    No autograd here: the gradient is an output.
    """
    _check(logits, targets)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    grad = _grad_buffer(logits, grad_out) if write_grad else logits.new_empty(0)
    targets = targets.contiguous()
    n_valid = (targets != ignore_index).sum()  # on the device: no sync
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N > 0:
        block, warps = _block_v(V, logits.device)
        _cross_entropy_fwd_kernel[(min(N, programs or _programs(logits.device)),)](
            logits, grad, targets, n_valid, row_loss, N, logits.stride(0), grad.stride(0) if write_grad else 0, V,
            ignore_index, BLOCK_V=block_v or block, DOWNCAST=logits.dtype != torch.float32, WRITE_GRAD=write_grad,
            num_warps=num_warps or warps,
        )
    return row_loss.sum() / n_valid, grad


def scale_grad_(grad: Tensor, scale: Tensor, block_v: int | None = None) -> Tensor:
    """grad *= scale in place (grad (N, V) with unit column stride, scale a 0-d device tensor); no work
    is done when scale is 1, found out on the device. Returns grad."""
    N, V = grad.shape
    if N > 0:
        block, warps = _block_v(V, grad.device)
        _scale_rows_kernel[(N,)](grad, scale, grad.stride(0), V, BLOCK_V=block_v or block,
                                 DOWNCAST=grad.dtype != torch.float32, num_warps=warps)
    return grad


def cross_entropy_lse(
    logits: Tensor, targets: Tensor, ignore_index: int = -1, block_v: int | None = None, num_warps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, n_valid): the two-kernel design's forward, one read of the logits.

    loss: the mean cross-entropy (0-d fp32, module docstring); lse (N,) fp32: each row's log Σ_j exp z_ij
    (0 for an ignored row); n_valid: the 0-d int64 count of rows whose target is not ignore_index.
    logits (N, V) with unit column stride; targets (N,) int64. block_v, num_warps: override the launch (tests
    use small blocks to run several iterations of the loop over a row). No autograd here.
    """
    _check(logits, targets)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    targets = targets.contiguous()
    n_valid = (targets != ignore_index).sum()  # on the device: no sync
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N > 0:
        block, warps = _block_v(V, logits.device)
        _cross_entropy_lse_kernel[(N,)](logits, targets, row_loss, lse, logits.stride(0), V, ignore_index,
                                        BLOCK_V=block_v or block, num_warps=num_warps or warps)
    return row_loss.sum() / n_valid, lse, n_valid


def cross_entropy_backward(
    dloss: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, n_valid: Tensor, ignore_index: int = -1,
    grad_out: Tensor | None = None, block_v: int | None = None, num_warps: int | None = None,
) -> Tensor:
    """d(outer)/d logits = dloss · (softmax − onehot) / n_valid in logits' dtype: the two-kernel design's backward.

    dloss: the 0-d gradient of the outer objective with respect to the loss (read on the device); logits,
    targets, lse and n_valid as given to / returned by cross_entropy_lse. grad_out: where to write, (N, V)
    of logits' dtype with unit column stride (logits itself for the in-place use); default a new tensor.
    Returns the gradient; rows whose target is ignore_index get 0.
    """
    _check(logits, targets)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    if lse.shape != (N,) or lse.dtype != torch.float32 or dloss.numel() != 1 or n_valid.numel() != 1:
        raise ValueError(f"lse must be float32 of shape ({N},) and dloss, n_valid single values, got lse "
                         f"{lse.dtype} {tuple(lse.shape)}, dloss {tuple(dloss.shape)}, n_valid {tuple(n_valid.shape)}")
    grad = _grad_buffer(logits, grad_out)
    if N > 0:
        block, warps = _block_v(V, logits.device)
        _cross_entropy_bwd_kernel[(N,)](
            logits, grad, targets.contiguous(), lse.contiguous(), dloss, n_valid, logits.stride(0), grad.stride(0),
            V, ignore_index, BLOCK_V=block_v or block, DOWNCAST=logits.dtype != torch.float32,
            num_warps=num_warps or warps,
        )
    return grad


# --------------------------------------------------------------------------------------------------
# Autograd: torch.autograd.Functions in eager mode, torch.library custom ops under torch.compile
# --------------------------------------------------------------------------------------------------


class _CrossEntropyTwoKernels(torch.autograd.Function):
    """The two-kernel design: lse in the forward, the gradient (times the incoming one) in the backward."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, inplace: bool):
        loss, lse, n_valid = cross_entropy_lse(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index, ctx.inplace, ctx.overwritten = ignore_index, inplace, False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        if ctx.overwritten:  # the saved logits hold the first backward's gradient
            raise RuntimeError("gnsrepro cross_entropy: backward through the same loss twice (retain_graph=True) "
                               "is not supported with inplace=True; compute the loss again")
        logits, targets, lse, n_valid = ctx.saved_tensors
        grad = cross_entropy_backward(dloss, logits, targets, lse, n_valid, ctx.ignore_index,
                                      grad_out=logits if ctx.inplace else None)
        ctx.overwritten = ctx.inplace
        return grad, None, None, None


class _CrossEntropy(torch.autograd.Function):
    """The one-kernel design: the gradient for a scale of 1 in the forward, multiplied in the backward."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, inplace: bool):
        loss, grad = cross_entropy_forward(logits, targets, ignore_index, grad_out=logits if inplace else None)
        ctx.save_for_backward(grad)
        ctx.scaled = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        if ctx.scaled:  # the buffer was scaled in place by the first backward
            raise RuntimeError("gnsrepro cross_entropy: backward through the same loss twice (retain_graph=True) "
                               "is not supported with grad_in_forward=True; compute the loss again")
        ctx.scaled = True
        (grad,) = ctx.saved_tensors
        return scale_grad_(grad, dloss), None, None, None


# ---- the two-kernel design's ops: inductor keeps them as two opaque nodes, with no product between ----


@torch.library.custom_op("gnsrepro::cross_entropy_lse", mutates_args=())
def _cross_entropy_lse_op(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    return cross_entropy_lse(logits, targets, ignore_index)


@_cross_entropy_lse_op.register_fake
def _(logits, targets, ignore_index):
    f32 = torch.float32
    return (logits.new_empty((), dtype=f32), logits.new_empty(logits.shape[:1], dtype=f32),
            targets.new_empty((), dtype=torch.int64))


@torch.library.custom_op("gnsrepro::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(
    dloss: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, n_valid: Tensor, ignore_index: int,
) -> Tensor:
    return cross_entropy_backward(dloss, logits, targets, lse, n_valid, ignore_index)


@_cross_entropy_bwd_op.register_fake
def _(dloss, logits, targets, lse, n_valid, ignore_index):
    return logits.new_empty(logits.shape)  # contiguous, as cross_entropy_backward's new tensor


def _lse_setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    _, lse, n_valid = output
    ctx.save_for_backward(logits, targets, lse, n_valid)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse, n_valid)


def _lse_backward(ctx, dloss, _dlse, _dn_valid):
    logits, targets, lse, n_valid = ctx.saved_tensors
    # the incoming gradient goes into the op, which applies it itself: no product for inductor to add
    grad = torch.ops.gnsrepro.cross_entropy_bwd(dloss, logits, targets, lse, n_valid, ctx.ignore_index)
    return grad, None, None


_cross_entropy_lse_op.register_autograd(_lse_backward, setup_context=_lse_setup_context)


# ---- the one-kernel design's op ----


@torch.library.custom_op("gnsrepro::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int, write_grad: bool) -> tuple[Tensor, Tensor]:
    return cross_entropy_forward(logits, targets, ignore_index, write_grad=write_grad)


@_cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, write_grad):
    grad = torch.empty_like(logits) if write_grad else logits.new_empty(0)
    return logits.new_empty((), dtype=torch.float32), grad


def _fwd_setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _fwd_backward(ctx, dloss, _dgrad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and ctx.needs_input_grad[0]:
        raise RuntimeError("gnsrepro cross_entropy: the loss was computed without its gradient (write_grad=False)")
    return grad * dloss, None, None, None  # a 0-d fp32 factor keeps grad's dtype; inductor makes it one kernel


_cross_entropy_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def uses_kernel(logits: Tensor) -> bool:
    """Whether cross_entropy runs the Triton kernels for these logits (else F.cross_entropy)."""
    return logits.dtype in KERNEL_DTYPES and (logits.is_cuda or (_INTERPRET and logits.device.type == "cpu"))


def cross_entropy(
    logits: Tensor, targets: Tensor, ignore_index: int = -1, inplace: bool = False, grad_in_forward: bool = False,
) -> Tensor:
    """Mean cross-entropy over the rows whose target is not ignore_index (0-d float32), the value and
    gradient of F.cross_entropy(logits.float(), targets, ignore_index=ignore_index) (module docstring).

    logits (N, V) in bf16 / fp16 / fp32; targets (N,) int64. The backward gives d loss / d logits in the
    logits' dtype. inplace: write that gradient into logits (eager mode only), when they are not read
    afterwards. grad_in_forward: the one-kernel design (the gradient written in the forward; the fastest
    eagerly when the loss is backpropagated unscaled) instead of the two-kernel one. CPU tensors (unless
    TRITON_INTERPRET=1) and float64 go to F.cross_entropy.
    """
    if not uses_kernel(logits):
        upcast = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(upcast, targets, ignore_index=ignore_index)
    if logits.stride(1) != 1:
        logits, inplace = logits.contiguous(), False
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    if torch.compiler.is_compiling():
        return cross_entropy_op(logits, targets, ignore_index, write_grad=want_grad, grad_in_forward=grad_in_forward)
    if not want_grad:  # evaluation: the loss alone, one pass over the logits
        return cross_entropy_lse(logits, targets, int(ignore_index))[0]
    function = _CrossEntropy if grad_in_forward else _CrossEntropyTwoKernels
    return function.apply(logits, targets, int(ignore_index), bool(inplace))


def cross_entropy_op(
    logits: Tensor, targets: Tensor, ignore_index: int = -1, write_grad: bool = True, grad_in_forward: bool = False,
) -> Tensor:
    """The same through the registered custom ops, also in eager mode (what torch.compile records).
    write_grad=False: the one-kernel design's forward writes no gradient (the two-kernel one never does)."""
    if grad_in_forward:
        return torch.ops.gnsrepro.cross_entropy_fwd(logits, targets, int(ignore_index), bool(write_grad))[0]
    return torch.ops.gnsrepro.cross_entropy_lse(logits, targets, int(ignore_index))[0]
