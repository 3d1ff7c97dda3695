"""Per-example squared gradient norms, produced inside the backward pass of instrumented layers.

Why: the gradient noise scale needs |g_b|², the squared norm of each example's own gradient (docs/method.md,
"Three sources of small batches": B_small = 1 is the lowest-variance estimator). Materialising every g_b costs
B copies of the model; each layer type below gets |g_b|² from the tensors its backward pass already
holds (docs/method.md, section 2, "Per-example gradient norms"):

- Linear, 3-D input (B, T, K): "simultaneous" (the paper, section 3): G_b = dy_bᵀ x_b by one batched
  matmul, |G_b|² from it and the weight gradient dW = Σ_b G_b from the same matmul; or "ghost" (Li et
  al. 2022, "Large Language Models Can Be Strong Differentially Private Learners", section 4):
  |G_b|² = ⟨x_b x_bᵀ, dy_b dy_bᵀ⟩_F plus the ordinary dW = dyᵀx. "auto" picks the one with fewer FLOPs
  (gnsrepro.cost.choose_linear_method). 2-D input (B, K): |x_b|²·|dy_b|² (Goodfellow 2015, "Efficient
  per-example gradient computations"), which is the ghost formula at T = 1. Bias: |Σ_t dy_b,t|².
  Simultaneous's dW and |G_b|² come from the batched matmul (linear backend "torch") or from the Triton
  kernel gnsrepro.kernels.per_example_grad (backend "triton", gns.linear_backend), which never writes G_b.
- LayerNorm: dγ_b = Σ_t dy ⊙ x̂, dβ_b = Σ_t dy, reduced over T before squaring; in plain PyTorch here
  or fused into the Triton kernel gnsrepro.kernels.layer_norm.layer_norm_per_example.
- Embedding: g_b adds dy_b,t into row id_b,t, so rows hit twice must be summed before squaring; done
  with static shapes (sort, segment ids, index_add into a (B·T, d) buffer), never a dense (B·V, d).
- Tied token embedding + output head: one weight, two uses; |g_b|² is the norm of the *sum*
  |H_b + E_b|² = |H_b|² + 2⟨H_b, E_b⟩ + |E_b|² (head part H_b, embedding part E_b), see
  PerExampleTiedEmbedding.

The sink: how the norms leave the backward pass. Every instrumented module owns `sink`, a (B, k) leaf
tensor with requires_grad=True (k = the module's parameter count: column 0 weight, column 1 bias),
allocated by PerExampleNorms.attach. Each autograd.Function takes the sink as an extra input, ignores
its value, and returns the (B, k) per-example squared norms of its raw incoming gradient as the
sink's *gradient*. Autograd accumulates them into sink.grad: nothing is written as a side effect, so
torch.compile traces it into the backward graph, and gradient accumulation over micro-batches (of one
size) sums the norms per example slot for free. Without a sink (before attach) or with grad mode off,
every instrumented layer is exactly its plain parent class.

Scale: with the backpropagated loss L = (1/n)·Σ_b ℓ_b (ℓ_b = example b's mean token loss: GPT's mean
over B·T tokens has n = B; gradient accumulation over m micro-batches that divides each micro loss by
m has n = B·m), each example's raw contribution is g_b / n, so |g_b|² = n² × sink value;
PerExampleNorms.stacked(n) applies the n².

Precision: the norms and the per-example sums behind them are fp32 (fp64 for a float64 model, so that
tests can check to 1e-9); under bf16 autocast the batched matmuls write fp32 (`out_dtype` on CUDA, an
upcast elsewhere), so dW = Σ_b G_b is summed in fp32 and returned in the parameter's dtype, not
rounded to bf16 per example, also when loss.backward() is called inside the autocast region (the
Linear and head backward passes turn autocast off). Autocast: Linear and the head cast x and W to the
autocast dtype like nn.Linear does; LayerNorm computes in fp32 and returns x's dtype, as the Triton
kernel does (F.layer_norm returns fp32 under CUDA autocast; in a GPT x is the fp32 residual stream, so
both agree there).

DDP: sinks are plain attributes, not parameters or buffers, so DDP neither all-reduces nor broadcasts
them: each rank's sink.grad holds its own examples' norms, with n the rank's local B·m.

torch.compile: a GPT built from these layers compiles with fullgraph=True (no graph break, the tied
embedding's stash included; tests/test_pegn.py) and gives the eager norms on torch 2.11 and 2.13. The
micro-batch size is specialised (the sink shape check and the chunk loop): one graph per micro-batch
size. Step time with gns=ln / all relative to gns=off: `gnsrepro bench overhead` (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gnsrepro.errors import ConfigError
from gnsrepro.model import LayerNorm, Layers, TiedEmbedding

# Default upper bound on the transient per-chunk tensor of a batched per-example matmul ((chunk, L, K) for the
# simultaneous method, two (chunk, T, T) Grams for ghost), when chunk_size=0 ("automatic"); gns.chunk_mb sets it.
AUTO_CHUNK_BYTES = 256 * 2**20

LINEAR_METHODS = ("auto", "simultaneous", "ghost")
LN_BACKENDS = ("torch", "triton")
LINEAR_BACKENDS = ("torch", "triton")  # the simultaneous method's dW and norms (_weight_grad_and_sqnorms)
MODES = ("all", "ln")


# --------------------------------------------------------------------------------------------------
# Shared math (plain functions on tensors, used inside the backward passes)
# --------------------------------------------------------------------------------------------------


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype sums and norms are kept in: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in: the autocast dtype inside an autocast region, else x's."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _matmul_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b (2-D or batched 3-D) with the result in `acc`, so sums over tokens are not rounded to bf16.

    CUDA has matmuls with fp32 output for fp16/bf16 inputs (`out_dtype`, torch >= 2.8) at the speed of
    the half-precision matmul; elsewhere (CPU autocast) the operands are upcast.
    """
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and acc == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def _autocast_off(backward):
    """Runs an autograd.Function's backward with autocast off: backward inherits the autocast state of
    the caller of loss.backward(), and inside an autocast region _matmul_acc's fp32 matmuls would be
    recast to bf16, rounding the norms and dW. The backward picks its dtypes itself (see Precision)."""

    @functools.wraps(backward)
    def wrapped(ctx, grad, *grads):
        device = grad.device.type
        if device not in ("cuda", "cpu"):  # no autocast to turn off (torch.autocast rejects e.g. meta)
            return backward(ctx, grad, *grads)
        with torch.autocast(device, enabled=False):
            return backward(ctx, grad, *grads)

    return wrapped


def _chunk(chunk_size: int, per_example_bytes: int, chunk_bytes: int = AUTO_CHUNK_BYTES) -> int:
    return chunk_size if chunk_size > 0 else max(1, chunk_bytes // per_example_bytes)


def _resolve_method(method: str, T: int, K: int, L: int) -> str:
    """"auto" -> the cheaper of simultaneous and ghost for this shape; T = 1 (2-D input) is always ghost,
    which there is Goodfellow's |x_b|²·|dy_b|² and needs no (L, K) tensor per example."""
    if T == 1:
        return "ghost"
    if method != "auto":
        return method
    from gnsrepro.cost import choose_linear_method

    return choose_linear_method(T, K, L)


def _uses_triton_weight_grad(x: torch.Tensor, dy: torch.Tensor, method: str, backend: str) -> bool:
    """Whether the simultaneous method runs gnsrepro.kernels.per_example_grad (backend "triton"): for fp32 /
    bf16 / fp16 inputs of one dtype; float64 (the exact tests) stays on the PyTorch path."""
    if method != "simultaneous" or backend != "triton":
        return False  # (and Triton is not imported)
    from gnsrepro.kernels.per_example_grad import KERNEL_DTYPES

    return x.dtype == dy.dtype and x.dtype in KERNEL_DTYPES


def _weight_grad_and_sqnorms(
    x: torch.Tensor, dy: torch.Tensor, method: str, chunk_size: int, ids: torch.Tensor | None = None,
    backend: str = "torch", chunk_bytes: int = AUTO_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dW = Σ_b dy_bᵀ x_b (L, K), |G_b|² (B,), both in fp32/fp64, for x (B, T, K) and dy (B, T, L).

    With ids (B, T) (the tied output head) also rows (B, T, K): rows[b, t] = G_b[ids[b, t]], the head
    gradient's rows at the example's own token ids, which the embedding's cross term needs.
    Examples are processed in chunks so the transient per-example tensor stays within chunk_bytes (or chunk_size
    examples at a time); where one example's (L, K) tensor alone is larger (simultaneous, chunk_size=0), each
    example's is computed in slices of its L rows, and the head's rows as the ghost branch gets them (_head_rows),
    so that a slice small enough for the GPU's L2 is read back from there. backend "triton"
    (method simultaneous): dW and |G_b|² from the Triton kernel, which never materialises G_b
    (gnsrepro.kernels.per_example_grad), and the head's rows copied out of the kernel's G_b tiles.
    """
    B, T, K = x.shape
    L = dy.shape[-1]
    acc = _acc_dtype(x)
    elem = torch.finfo(acc).bits // 8
    if _uses_triton_weight_grad(x, dy, method, backend):
        from gnsrepro.kernels.per_example_grad import weight_grad_and_sqnorms, weight_grad_sqnorms_and_rows

        if ids is None:
            return (*weight_grad_and_sqnorms(x, dy), None)
        return weight_grad_sqnorms_and_rows(x, dy, ids)  # the rows copied out of the kernel's tiles: no gather
    simultaneous = method == "simultaneous"
    if simultaneous and chunk_size == 0 and L * K * elem > chunk_bytes:
        return _weight_grad_and_sqnorms_sliced(x, dy, ids, max(1, chunk_bytes // (K * elem)), chunk_bytes)
    c = _chunk(chunk_size, (L * K if simultaneous else 2 * T * T) * elem, chunk_bytes)
    sq, rows, dW = [], [], None
    for s in range(0, B, c):
        xc, dyc = x[s : s + c], dy[s : s + c]
        if simultaneous:
            G = _matmul_acc(dyc.transpose(1, 2), xc, acc)  # (c, L, K): per-example weight gradients
            G_sum, G_sq = _sum_and_sqnorms(G)
            sq.append(G_sq)
            dW = G_sum if dW is None else dW + G_sum
            if ids is not None:
                rows.append(G.gather(1, ids[s : s + c, :, None].expand(-1, -1, K)))  # (c, T, K)
        else:
            gram_x = _matmul_acc(xc, xc.transpose(1, 2), acc)  # (c, T, T)
            gram_dy = _matmul_acc(dyc, dyc.transpose(1, 2), acc)
            sq.append((gram_x * gram_dy).sum((1, 2)))
            if ids is not None:
                rows.append(_head_rows(xc, dyc, ids[s : s + c], c))
    if not simultaneous:
        dW = _matmul_acc(dy.reshape(-1, L).t(), x.reshape(-1, K), acc)
    return dW, torch.cat(sq), (torch.cat(rows) if ids is not None else None)


def _sum_and_sqnorms(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_b G_b, |G_b|²) of per-example gradients G (c, L, K): on a CUDA GPU in fp32 one Triton kernel that reads G
    once (gnsrepro.kernels.example_sums; G is the backward's largest tensor, and torch's two reductions, along
    different axes, read it twice), elsewhere (CPU, float64) torch's reductions."""
    if G.is_cuda and G.dtype == torch.float32:
        from gnsrepro.kernels.example_sums import sum_and_sqnorms

        return sum_and_sqnorms(G)
    return G.sum(0), G.square().sum((1, 2))


def _weight_grad_and_sqnorms_sliced(
    x: torch.Tensor, dy: torch.Tensor, ids: torch.Tensor | None, rows_per_slice: int, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The simultaneous branch of _weight_grad_and_sqnorms, rows_per_slice of the L rows at a time and, within a
    slice, one example at a time: G_b[r] = dy_b[:, r]ᵀ x_b, |G_b|² summed over the slices, dW[r] = Σ_b G_b[r].
    Slices outside, examples inside: the slice's running dW[r] and each G_b[r] are the working set (2 slices),
    which stays in L2 for a small enough slice, instead of the whole dW once per example."""
    B, T, K = x.shape
    L = dy.shape[-1]
    acc = _acc_dtype(x)
    dW, sq = [], [[] for _ in range(B)]
    for r in range(0, L, rows_per_slice):
        dW_r = None
        for b in range(B):
            G = _matmul_acc(dy[b, :, r : r + rows_per_slice].t(), x[b], acc)  # (rows, K) of example b's gradient
            sq[b].append(G.square().sum())
            dW_r = G if dW_r is None else dW_r + G
        dW.append(dW_r)
    sq = torch.stack([torch.stack(parts).sum() for parts in sq])
    return torch.cat(dW), sq, (_head_rows(x, dy, ids, 0, chunk_bytes) if ids is not None else None)


def _head_rows(x: torch.Tensor, dy: torch.Tensor, ids: torch.Tensor, chunk_size: int,
               chunk_bytes: int = AUTO_CHUNK_BYTES) -> torch.Tensor:
    """rows (B, T, K) in fp32/fp64, rows[b, t] = G_b[ids[b, t]] with G_b = dy_bᵀ x_b, without G_b: row i of G_b is
    Σ_t' dy_b,t'[i] · x_b,t', so rows_b = A_bᵀ x_b with A_b[t', t] = dy_b,t'[ids_b,t], a (T, T) gather of dy and
    an O(T²·K) matmul per example. Chunks of examples bound the transient (c, T, T) tensor as for ghost."""
    B, T, K = x.shape
    acc = _acc_dtype(x)
    c = _chunk(chunk_size, 2 * T * T * (torch.finfo(acc).bits // 8), chunk_bytes)
    rows = []
    for s in range(0, B, c):
        A = dy[s : s + c].gather(2, ids[s : s + c, None, :].expand(-1, T, -1))  # (c, T', T)
        rows.append(_matmul_acc(A.transpose(1, 2), x[s : s + c], acc))
    return torch.cat(rows)


def _embedding_grad_and_sqnorms(
    ids: torch.Tensor, dy: torch.Tensor, num_embeddings: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dW (V, d), |E_b|² (B,) and dy as (B, T, d) in fp32/fp64, for the lookup of ids (B, ...) -> dy.

    Example b's gradient adds dy_b,t into row id_b,t, so |E_b|² = Σ_i |Σ_{t: id_t = i} dy_b,t|². Static
    shapes and no host sync (torch.unique would need both): sort each example's ids, mark where a new
    id starts, number the segments by a cumsum, index_add every dy row into its segment's row of a
    (B·T, d) buffer, square and sum per example.
    """
    B = ids.shape[0]
    ids = ids.reshape(B, -1)
    T = ids.shape[1]
    d = dy.shape[-1]
    dy = dy.reshape(B, T, d).to(_acc_dtype(dy))
    dW = dy.new_zeros(num_embeddings, d).index_add_(0, ids.reshape(-1), dy.reshape(-1, d))
    sorted_ids, order = ids.sort(dim=1)
    first = torch.ones_like(sorted_ids[:, :1], dtype=torch.bool)
    starts = torch.cat([first, sorted_ids[:, 1:] != sorted_ids[:, :-1]], 1)  # (B, T): a new id starts here
    segment_sorted = starts.cumsum(1) - 1  # (B, T): segment number of each sorted position
    segment = torch.empty_like(segment_sorted).scatter_(1, order, segment_sorted)  # ... of each position
    segment = segment + torch.arange(B, device=ids.device)[:, None] * T  # distinct rows across examples
    summed = dy.new_zeros(B * T, d).index_add_(0, segment.reshape(-1), dy.reshape(-1, d))
    return dW, summed.view(B, T * d).square().sum(1), dy


# --------------------------------------------------------------------------------------------------
# autograd Functions: the sink's gradient is the (B, k) per-example squared norms
# --------------------------------------------------------------------------------------------------


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sink, method: str, chunk_size: int, chunk_bytes: int, backend: str):
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.method, ctx.chunk_size, ctx.chunk_bytes, ctx.backend, ctx.x_dtype = (method, chunk_size, chunk_bytes,
                                                                                 backend, x.dtype)
        ctx.has_bias = bias is not None
        return F.linear(xc, wc, None if bias is None else bias.to(dtype))

    @staticmethod
    @_autocast_off
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        B, K, L = x.shape[0], x.shape[-1], dy.shape[-1]
        x3, dy3 = x.reshape(B, -1, K), dy.reshape(B, -1, L)  # (B, T, K), (B, T, L); T = 1 for 2-D
        dW, sq_w, _ = _weight_grad_and_sqnorms(x3, dy3, ctx.method, ctx.chunk_size, backend=ctx.backend,
                                               chunk_bytes=ctx.chunk_bytes)
        columns, db = [sq_w], None
        if ctx.has_bias:
            db_b = dy3.sum(1, dtype=dW.dtype)  # (B, L) per-example bias gradients
            columns.append(db_b.square().sum(1))
            db = db_b.sum(0)
        dx = (dy @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, dW, db, torch.stack(columns, 1), None, None, None, None


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sink, eps: float):
        acc = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
        xf = x.to(acc)
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
        y = (xf - mean) * rstd * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        # y in x's dtype, as the Triton kernel: in a GPT x is the fp32 residual stream even under autocast.
        # No .to() when the dtype already matches: torch 2.11's dynamo loses every gradient through a
        # Function whose output is such a no-op .to() (an alias of an intermediate); 2.13 does not.
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        acc = mean.dtype
        B, N = x.shape[0], x.shape[-1]
        xhat = (x.to(acc) - mean) * rstd  # recomputed, as fused LayerNorm kernels do
        dyf = dy.to(acc)
        dg_b = (dyf * xhat).reshape(B, -1, N).sum(1)  # (B, N): reduce over the example's rows first
        columns, db = [dg_b.square().sum(1)], None
        if ctx.has_bias:
            db_b = dyf.reshape(B, -1, N).sum(1)
            columns.append(db_b.square().sum(1))
            db = db_b.sum(0)
        wdy = dyf * weight.to(acc)
        dx = rstd * (wdy - wdy.mean(-1, keepdim=True) - xhat * (wdy * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dg_b.sum(0), db, torch.stack(columns, 1), None


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, sink, padding_idx):
        ctx.save_for_backward(ids)
        ctx.num_embeddings, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        if ctx.padding_idx is not None:  # the padding row never receives a gradient
            dy = dy.masked_fill((ids == ctx.padding_idx)[..., None], 0)
        dW, sq, _ = _embedding_grad_and_sqnorms(ids, dy, ctx.num_embeddings)
        return None, dW, sq[:, None], None


class _TiedEmbeddingFn(torch.autograd.Function):
    """The embedding use of a tied weight. Besides the embeddings it outputs two "carriers", zeros
    whose gradients come from the head's backward: rows (B, T, d) = H_b[id_b,t] and head_sq (B,) =
    |H_b|², the head's share of |g_b|². Autograd always runs this backward after the head's (the
    embeddings feed the whole network), so both are there when the full norm is assembled."""

    @staticmethod
    def forward(ctx, ids, weight, sink):
        ctx.save_for_backward(ids)
        ctx.num_embeddings = weight.shape[0]
        acc = _acc_dtype(weight)
        zero = torch.zeros((), dtype=acc, device=weight.device)  # expanded: the carriers take no memory
        return F.embedding(ids, weight), zero.expand(*ids.shape, weight.shape[1]), zero.expand(ids.shape[0])

    @staticmethod
    def backward(ctx, demb, d_rows, d_head_sq):
        (ids,) = ctx.saved_tensors
        dW, emb_sq, demb3 = _embedding_grad_and_sqnorms(ids, demb, ctx.num_embeddings)
        # ⟨H_b, E_b⟩ = Σ_t ⟨H_b[id_t], dyemb_b,t⟩: the head gradient is needed only at the example's ids
        cross = (d_rows.reshape(demb3.shape) * demb3).sum((1, 2))
        return None, dW, (d_head_sq + 2 * cross + emb_sq)[:, None]


class _TiedHeadFn(torch.autograd.Function):
    """The output-head use of a tied weight: logits = x Wᵀ; its backward sends |H_b|² and the rows
    H_b[id_b,t] to the embedding's backward as the gradients of the carriers it took as inputs."""

    @staticmethod
    def forward(ctx, x, weight, ids, rows_carrier, head_sq_carrier, method: str, chunk_size: int, chunk_bytes: int,
                backend: str):
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc, ids)
        ctx.method, ctx.chunk_size, ctx.chunk_bytes, ctx.backend, ctx.x_dtype = (method, chunk_size, chunk_bytes,
                                                                                 backend, x.dtype)
        return F.linear(xc, wc)

    @staticmethod
    @_autocast_off
    def backward(ctx, dlogits):
        x, w, ids = ctx.saved_tensors
        B, d, V = x.shape[0], x.shape[-1], w.shape[0]
        x3, dy3 = x.reshape(B, -1, d), dlogits.reshape(B, -1, V)
        dW, sq, rows = _weight_grad_and_sqnorms(x3, dy3, ctx.method, ctx.chunk_size, ids=ids.reshape(B, -1),
                                                backend=ctx.backend, chunk_bytes=ctx.chunk_bytes)
        dx = (dlogits @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, dW, None, rows.reshape(*ids.shape, d), sq, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Instrumented modules (subclasses of the plain ones, so GPT._init_weights and state dicts still apply)
# --------------------------------------------------------------------------------------------------


class _SinkOwner:
    """Mixin: the (B, k) sink and the parameters its columns stand for."""

    sink: torch.Tensor | None = None

    def sink_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) per sink column: weight, then bias when there is one."""
        bias = getattr(self, "bias", None)
        return [("weight", self.weight)] + ([("bias", bias)] if bias is not None else [])

    def sink_dtype(self) -> torch.dtype:
        return _acc_dtype(self.weight)

    def _use_sink(self, batch_size: int) -> bool:
        if self.sink is None or not torch.is_grad_enabled():
            return False
        if self.sink.shape[0] != batch_size:
            raise ValueError(
                f"per-example sink holds {self.sink.shape[0]} examples but the input has {batch_size}: "
                "call PerExampleNorms.attach(batch_size) when the micro-batch size changes"
            )
        return True


class PerExampleLinear(_SinkOwner, nn.Linear):
    """nn.Linear whose backward also returns per-example |dW_b|², |db_b|² (see the module docstring).

    method: "simultaneous" | "ghost" | "auto" for a 3-D input; chunk_size: examples per batched matmul,
    0 = automatic (the transient tensor bounded by chunk_bytes, default AUTO_CHUNK_BYTES); backend: the simultaneous
    method's
    "torch" (batched matmul) or "triton" (gnsrepro.kernels.per_example_grad, no per-example tensor).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, method: str = "auto",
                 chunk_size: int = 0, backend: str = "torch", chunk_bytes: int = AUTO_CHUNK_BYTES, **factory_kwargs):
        super().__init__(in_features, out_features, bias=bias, **factory_kwargs)
        self.method, self.chunk_size = _check_choice("method", method, LINEAR_METHODS), chunk_size
        self.chunk_bytes = chunk_bytes
        self.backend = _check_choice("linear_backend", backend, LINEAR_BACKENDS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or not self._use_sink(x.shape[0]):
            return super().forward(x)
        T = x[0].numel() // self.in_features
        method = _resolve_method(self.method, T, self.in_features, self.out_features)
        return _LinearFn.apply(x, self.weight, self.bias, self.sink, method, self.chunk_size, self.chunk_bytes,
                               self.backend)


class PerExampleEmbedding(_SinkOwner, nn.Embedding):
    """nn.Embedding (the position table) whose backward also returns per-example |dW_b|².

    Ids (B, T) may repeat within an example; rows hit twice are summed before squaring. For GPT's
    positions every id is distinct, where this equals Σ_t |dy_b,t|².
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, **kwargs):
        if kwargs.get("max_norm") is not None or kwargs.get("scale_grad_by_freq") or kwargs.get("sparse"):
            raise NotImplementedError("PerExampleEmbedding supports neither max_norm, scale_grad_by_freq nor sparse")
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() < 2 or not self._use_sink(ids.shape[0]):
            return super().forward(ids)
        return _EmbeddingFn.apply(ids, self.weight, self.sink, self.padding_idx)


class PerExampleTiedEmbedding(_SinkOwner, TiedEmbedding):
    """Token embedding + output head with one weight W (V, d); per-example |g_b|² of the *sum* of both uses.

    |g_b|² = |H_b|² + 2⟨H_b, E_b⟩ + |E_b|² with H_b = dyhead_bᵀ xh_b (the head) and E_b = Σ_t e_{id_t} ⊗
    dyemb_b,t (the embedding). The head backward computes |H_b|² (simultaneous or ghost, as a Linear)
    and H_b's rows at the example's ids; autograd carries both to the embedding backward, which adds
    |E_b|² and the cross term. Both Functions return their part of dW; autograd sums them into W.grad.

    The stash: GPT calls wte(idx) and later wte.unembed(x); forward() keeps (idx, carriers) in
    `self._pending` and unembed() takes and clears it. Under torch.compile this is an attribute
    mutation inside one frame, which dynamo replays without a graph break (tests/test_pegn.py compiles
    a GPT with fullgraph=True). unembed falls back to a plain F.linear when nothing is pending or the
    shapes differ (inference on x[:, [-1]]), or under torch.no_grad.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, method: str = "auto", chunk_size: int = 0,
                 backend: str = "torch", chunk_bytes: int = AUTO_CHUNK_BYTES):
        super().__init__(num_embeddings, embedding_dim)
        self.method, self.chunk_size = _check_choice("method", method, LINEAR_METHODS), chunk_size
        self.chunk_bytes = chunk_bytes
        self.backend = _check_choice("linear_backend", backend, LINEAR_BACKENDS)  # the head's, as PerExampleLinear's
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() < 2 or not self._use_sink(idx.shape[0]):
            self._pending = None
            return super().forward(idx)
        emb, rows, head_sq = _TiedEmbeddingFn.apply(idx, self.weight, self.sink)
        self._pending = (idx, rows, head_sq)
        return emb

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is None or not torch.is_grad_enabled() or x.shape[:-1] != pending[0].shape:
            return super().unembed(x)
        idx, rows, head_sq = pending
        T = x[0].numel() // x.shape[-1]
        method = _resolve_method(self.method, T, self.weight.shape[1], self.weight.shape[0])
        return _TiedHeadFn.apply(x, self.weight, idx, rows, head_sq, method, self.chunk_size, self.chunk_bytes,
                                 self.backend)


class PerExampleLayerNorm(_SinkOwner, LayerNorm):
    """gnsrepro.model.LayerNorm whose backward also returns per-example |dγ_b|², |dβ_b|².

    backend "torch": the plain-PyTorch Function above, which torch.compile fuses into one LayerNorm
    backward; "triton": the hand-fused kernel gnsrepro.kernels.layer_norm.layer_norm_per_example (one
    pass over x and dy, fp32 sink). Under autocast the triton backend returns the autocast dtype (see
    forward), the torch backend x's dtype.
    """

    eps = 1e-5  # as gnsrepro.model.LayerNorm

    def __init__(self, ndim: int, bias: bool = True, backend: str = "torch"):
        super().__init__(ndim, bias=bias)
        self.backend = _check_choice("ln_backend", backend, LN_BACKENDS)

    def sink_dtype(self) -> torch.dtype:
        return torch.float32 if self.backend == "triton" else _acc_dtype(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """LayerNorm(x), or (LayerNorm(s), s) for s = residual + x, as gnsrepro.model.LayerNorm."""
        if x.dim() < 2 or not self._use_sink(x.shape[0]):
            return super().forward(x, residual)
        if self.backend == "triton":
            from gnsrepro.kernels.layer_norm import layer_norm_per_example

            # Under autocast y is written in the autocast dtype: its consumers (Linear layers, the output
            # head) cast it to that dtype anyway, so the values are the same and a cast pass is saved.
            # The residual add is fused into the kernel (s in the promoted dtype, as residual + x).
            out_dtype = _compute_dtype(x) if torch.is_autocast_enabled(x.device.type) else None
            return layer_norm_per_example(
                x, self.weight, self.bias, self.eps, self.sink, out_dtype=out_dtype, residual=residual
            )
        if residual is None:
            return _LayerNormFn.apply(x, self.weight, self.bias, self.sink, self.eps)
        s = residual + x
        return _LayerNormFn.apply(s, self.weight, self.bias, self.sink, self.eps), s


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def instrumented_layers(mode: str = "all", method: str = "auto", ln_backend: str = "torch",
                        chunk_size: int = 0, linear_backend: str | Callable[[int, int, bool], str] = "torch",
                        chunk_bytes: int = AUTO_CHUNK_BYTES) -> Layers:
    """The layer classes for GPT(config, layers=...): every layer type ("all") or LayerNorm only ("ln").
    linear_backend: the simultaneous method's backend in the Linear layers and the tied head (torch | triton), or
    a function (in_features, out_features, tied_head) -> backend choosing it per layer (gns.linear_backend=auto:
    gnsrepro.train.resolve_linear_backend); chunk_size, chunk_bytes: how the per-example tensors are chunked
    (_weight_grad_and_sqnorms)."""
    _check_choice("mode", mode, MODES)
    _check_choice("method", method, LINEAR_METHODS)
    if not callable(linear_backend):
        _check_choice("linear_backend", linear_backend, LINEAR_BACKENDS)
    layer_norm = functools.partial(PerExampleLayerNorm, backend=_check_choice("ln_backend", ln_backend, LN_BACKENDS))
    if mode == "ln":
        return Layers(layer_norm=layer_norm)
    common = dict(method=method, chunk_size=chunk_size, chunk_bytes=chunk_bytes)
    backend = linear_backend if callable(linear_backend) else lambda K, L, tied_head: linear_backend

    def linear(in_features: int, out_features: int, *args, **kwargs) -> PerExampleLinear:
        return PerExampleLinear(in_features, out_features, *args, **common, **kwargs,
                                backend=backend(in_features, out_features, False))

    def tied_embedding(num_embeddings: int, embedding_dim: int) -> PerExampleTiedEmbedding:
        # the head maps embedding_dim -> num_embeddings
        return PerExampleTiedEmbedding(num_embeddings, embedding_dim, **common,
                                       backend=backend(embedding_dim, num_embeddings, True))

    return Layers(linear=linear, layer_norm=layer_norm, embedding=PerExampleEmbedding, tied_embedding=tied_embedding)


# --------------------------------------------------------------------------------------------------
# Collecting the norms
# --------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class PerExampleNorms:
    """The sinks of a model's instrumented layers, and their per-example norms after backward.

    Per step: attach(B) once per micro-batch size (the sinks stay the same tensors while B does; a new B
    means new sinks and a new compiled graph), forward and backward over the micro-batches, stacked(n) or
    per_example(n), then zero(). Under gradient accumulation the sinks hold per-slot sums over the
    micro-batches: stacked(n).sum(1) / (B·m) is the mean |g_b|² over all B·m examples.
    """

    def __init__(self, model: nn.Module):
        model = _unwrap(model)
        self.modules: list[_SinkOwner] = []
        self.names: list[str] = []  # parameter names as in model.named_parameters(), sink column order
        for prefix, module in model.named_modules():
            if isinstance(module, _SinkOwner):
                self.modules.append(module)
                self.names += [f"{prefix}.{name}" if prefix else name for name, _ in module.sink_params()]

    def attach(self, batch_size: int) -> None:
        """(Re)allocate each sink as zeros (batch_size, k) on its parameters' device, if it differs."""
        for m in self.modules:
            shape, dtype, device = (batch_size, len(m.sink_params())), m.sink_dtype(), m.weight.device
            s = m.sink
            if s is None or s.shape != shape or s.dtype != dtype or s.device != device:
                m.sink = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)

    def stacked(self, n: int) -> torch.Tensor:
        """(P, B) per-example |g_b|² per covered parameter (rows in `names` order), n² applied; no sync."""
        grads = []
        for m in self.modules:
            if m.sink is None or m.sink.grad is None:
                raise RuntimeError(
                    f"no per-example norms in {type(m).__name__}: call attach(batch_size) before the forward, "
                    "then backward, and read before zero()"
                )
            grads.append(m.sink.grad.t())
        return torch.cat(grads) * float(n) ** 2

    def per_example(self, n: int) -> dict[str, torch.Tensor]:
        """{parameter name: (B,) per-example |g_b|²}, n² applied."""
        return dict(zip(self.names, self.stacked(n).unbind(0)))

    def zero(self) -> None:
        for m in self.modules:
            if m.sink is not None:
                m.sink.grad = None


def per_example_sqnorms(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, layers: str = "all",
                        ln_backend: str | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: (B,) |g_b|²}, g_b = the gradient of example b's own mean token loss.

    One forward and backward through the model's instrumented layers (docs/method.md, section 2,
    "The contract"); p.grad accumulates as after loss.backward(). layers="all" covers every trainable
    parameter (the tied embedding as one), "ln" every LayerNorm weight and bias. ln_backend overrides
    the LayerNorms' backend for this call (None: as built). The model's own sinks (training state) are
    set aside and restored. Values are float32 (float64 for a float64 model).
    """
    _check_choice("layers", layers, MODES)
    collector = PerExampleNorms(model)
    inner = _unwrap(model)
    covered = set(collector.names)
    if layers == "all":
        wanted = [n for n, p in inner.named_parameters() if p.requires_grad]
    else:
        wanted = [f"{prefix}.{name}" for prefix, m in inner.named_modules() if isinstance(m, (LayerNorm, nn.LayerNorm))
                  for name, p in m.named_parameters(recurse=False)]
    missing = [n for n in wanted if n not in covered]
    if missing or not wanted:
        raise ValueError(
            f"the model is not instrumented for layers={layers!r} (no per-example norms for {missing[:3] or 'any'}"
            f"{' ...' if len(missing) > 3 else ''}); build it with "
            f"GPT(config, layers=gnsrepro.pegn.instrumented_layers({layers!r}))"
        )
    if bool((targets < 0).any()):
        raise ValueError("targets hold ignored (-1) tokens: example b's mean token loss is then not defined here")
    saved = [(m, m.sink, getattr(m, "backend", None)) for m in collector.modules]
    try:
        for m in collector.modules:
            m.sink = None
            if isinstance(m, PerExampleLayerNorm) and ln_backend is not None:
                m.backend = _check_choice("ln_backend", ln_backend, LN_BACKENDS)
        collector.attach(idx.shape[0])
        _, loss = model(idx, targets, return_logits=False)
        loss.backward()
        norms = collector.per_example(idx.shape[0])  # GPT's loss is the mean over B examples: n = B
    finally:
        for m, sink, backend in saved:
            m.sink = sink
            if backend is not None:
                m.backend = backend
    return {n: norms[n].detach() for n in wanted}


__all__ = [
    "PerExampleEmbedding",
    "PerExampleLayerNorm",
    "PerExampleLinear",
    "PerExampleNorms",
    "PerExampleTiedEmbedding",
    "instrumented_layers",
    "per_example_sqnorms",
]
