"""Mean token cross-entropy whose forward also writes d loss / d logits (Triton), for the 50304-wide head.

For logits z (N, V), targets y (N,) and the n_valid rows whose target is not ignore_index:

    loss  = (1 / n_valid) · Σ_{i valid} ℓ_i,      ℓ_i = lse_i − z_{i, y_i},   lse_i = log Σ_j exp z_{ij}
    ∂loss/∂z_{ij} = (softmax(z_i)_j − [j = y_i]) / n_valid   (valid rows; ignored rows: ℓ_i = 0, gradient 0)

which is F.cross_entropy(z.float(), y, ignore_index=..., reduction="mean"). The gradient is the softmax's
Jacobian applied to the log-likelihood's (docs/method.md, section 2, "The contract": a GPT's loss is this mean over its
B·T tokens; example b's gradient is that of its own mean token loss, over B).

One kernel, ``_cross_entropy_fwd_kernel``: a program per row (or a few per SM looping over rows,
PROGRAMS_PER_SM), two passes over each row in blocks of BLOCK_V columns: the first keeps the running
maximum m (a scalar: one reduction per block) and per-lane sums of exp(z − m) rescaled when m grows (the
"online softmax" of Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", algorithm 3),
giving lse in fp32; the second re-reads the row (from L2 where it is still there: one row is 100 KB in
bf16) and writes the gradient above in the logits' dtype, rounded once from fp32.
The backward is then only the scalar d(outer)/d loss times that buffer (the approach of Liger-Kernel's
cross-entropy: compute the gradient in the forward), done in place by ``_scale_rows_kernel``, whose
programs read the scale on the device and return at once when it is 1 (a plain ``loss.backward()``).
With gradient accumulation (``(loss / m).backward()``) the scale is 1/m and that kernel is one more read
and write of the (N, V) buffer: the price of not knowing the scale in the forward. n_valid is counted on
the device ((targets != ignore_index).sum()): nothing here waits for the GPU.

All rows ignored (n_valid = 0): loss NaN (0/0) and gradient 0, as F.cross_entropy gives. A target outside
[0, V) that is not ignore_index gives a NaN row loss (torch raises instead; the check would need a sync).

``inplace=True`` writes the gradient into the logits tensor itself (saving one (N, V) buffer: 1.6 GB at
16 × 1024 tokens of bf16 over 50304 classes): the caller guarantees the logits are not read afterwards
(GPT.forward does so when it does not return them). Each program reads its row's target logit before it
overwrites the row.

Paths: eager calls go through a ``torch.autograd.Function`` (the cheapest on the host); under
torch.compile the forward is the ``torch.library.custom_op`` ``gnsrepro::cross_entropy_fwd`` (fake kernel
and registered autograd formula, as gnsrepro.kernels.layer_norm does), one opaque node without a graph
break, whose backward (gradient buffer × scalar) inductor fuses into one pointwise kernel. A custom op with
a registered autograd formula cannot mutate its inputs, so under torch.compile ``inplace`` is not used:
inductor frees the logits right after the op when nothing else reads them, so only the peak during the op
holds both buffers. CPU tensors (unless TRITON_INTERPRET=1, the tests) and float64 logits go to
F.cross_entropy itself, the reference. Without autograd (evaluation) the kernel makes the first pass only.

Speed (one H200, torch 2.11, triton 3.6; (16 · 1024, 50304) bf16; triton.testing.do_bench, a program per
row): the forward kernel 1.24-1.27 ms (a copy of its 3.3 GB read + write: 0.78 ms;
the loss alone 0.51 ms); the backward's scale 0.014 ms at 1 and 0.84 ms at 1/4; forward + backward 1.29 ms
eagerly against 2.09 ms for inductor's two kernels on F.cross_entropy(z.float()). Under torch.compile the
backward's product is inductor's and always costs its pass (2.33 ms in all), as does any scale other than
1 in eager mode (2.31 ms): the single-kernel design pays only where the loss is backpropagated unscaled.
`pytest -m gpu -s tests/test_cross_entropy.py` prints these times.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# Triton decides at definition time whether its kernels run in the CPU interpreter (tests/conftest.py sets
# the variable before this module is imported); CPU tensors can use the kernels only then.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


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
        # pass 1: running max m (scalar), per-lane Σ exp(z − m) rescaled by exp(m_old − m_new) as m grows
        m = float("-inf")
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block holds at least one column
            acc = acc * tl.exp(m - m_new) + tl.exp(z - m_new)  # masked lanes add exp(−inf) = 0
            m = m_new
        lse = m + tl.log(tl.sum(acc, axis=0))
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


# The forward's grid on a GPU: None, a program per row (the configuration timed in the module docstring); or
# this many programs per SM looping over rows, which bounds the rows between their two passes so that the
# second finds them in L2 (written, tested for correctness, not yet timed: `programs=` to try it).
PROGRAMS_PER_SM: int | None = None


@functools.cache
def _programs(device: torch.device) -> int:
    if device.type != "cuda" or PROGRAMS_PER_SM is None:
        return 1 << 62  # min(N, this): a program per row
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _check(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2 or logits.dtype not in KERNEL_DTYPES:
        raise ValueError(f"logits must be 2-D (N, V) in float32, bfloat16 or float16, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if targets.shape != logits.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 of shape ({logits.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")


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
    if not write_grad:
        grad = logits.new_empty(0)
    elif grad_out is None:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    else:
        grad = grad_out
        if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.stride(1) != 1:
            raise ValueError(f"grad_out must be {logits.dtype} {tuple(logits.shape)} with unit column stride")
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


# --------------------------------------------------------------------------------------------------
# Autograd: a torch.autograd.Function in eager mode, a torch.library custom op under torch.compile
# --------------------------------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
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
                               "is not supported; compute the loss again")
        ctx.scaled = True
        (grad,) = ctx.saved_tensors
        return scale_grad_(grad, dloss), None, None, None


@torch.library.custom_op("gnsrepro::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int, write_grad: bool) -> tuple[Tensor, Tensor]:
    return cross_entropy_forward(logits, targets, ignore_index, write_grad=write_grad)


@_cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, write_grad):
    grad = torch.empty_like(logits) if write_grad else logits.new_empty(0)
    return logits.new_empty((), dtype=torch.float32), grad


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _backward(ctx, dloss, _dgrad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and ctx.needs_input_grad[0]:
        raise RuntimeError("gnsrepro cross_entropy: the loss was computed without its gradient (write_grad=False)")
    return grad * dloss, None, None, None  # a 0-d fp32 factor keeps grad's dtype; inductor makes it one kernel


_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def uses_kernel(logits: Tensor) -> bool:
    """Whether cross_entropy runs the Triton kernel for these logits (else F.cross_entropy)."""
    return logits.dtype in KERNEL_DTYPES and (logits.is_cuda or (_INTERPRET and logits.device.type == "cpu"))


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -1, inplace: bool = False) -> Tensor:
    """Mean cross-entropy over the rows whose target is not ignore_index (0-d float32), the value and
    gradient of F.cross_entropy(logits.float(), targets, ignore_index=ignore_index) (module docstring).

    logits (N, V) in bf16 / fp16 / fp32; targets (N,) int64. The backward gives d loss / d logits in the
    logits' dtype. inplace: write that gradient into logits (eager mode only), when they are not read
    afterwards. CPU tensors (unless TRITON_INTERPRET=1) and float64 go to F.cross_entropy.
    """
    if not uses_kernel(logits):
        upcast = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(upcast, targets, ignore_index=ignore_index)
    if logits.stride(1) != 1:
        logits, inplace = logits.contiguous(), False
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    if torch.compiler.is_compiling():
        return cross_entropy_op(logits, targets, ignore_index, write_grad=want_grad)
    if not want_grad:  # evaluation: the loss alone, one pass over the logits
        return cross_entropy_forward(logits, targets, int(ignore_index), write_grad=False)[0]
    return _CrossEntropy.apply(logits, targets, int(ignore_index), bool(inplace))


def cross_entropy_op(logits: Tensor, targets: Tensor, ignore_index: int = -1, write_grad: bool = True) -> Tensor:
    """The same through the registered custom op, also in eager mode (what torch.compile records)."""
    return torch.ops.gnsrepro.cross_entropy_fwd(logits, targets, int(ignore_index), bool(write_grad))[0]
