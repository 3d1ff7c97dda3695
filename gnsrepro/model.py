"""A nanoGPT-style GPT: pre-LayerNorm, learned positions, GELU MLP of 4d, biases, tied embeddings.

The layer classes are passed in (`Layers`), so per-example-norm instrumented layers replace the plain
ones without touching any forward(). Each residual add is handed to the LayerNorm that follows it
(`ln(h, residual)`, see LayerNorm), so a fused LayerNorm kernel can do the add in the same pass over
memory; the values are those of the usual ``x = x + branch(ln(x))``. Read top to bottom: LayerNorm ->
attention -> MLP -> Block -> config -> GPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias).

    ``ln(x)`` returns LayerNorm(x). ``ln(x, residual)`` first adds x into the residual stream and
    returns (LayerNorm(s), s) with s = residual + x: the pre-LN block's residual add, given to the
    LayerNorm that reads its result so that a fused kernel can do both in one pass over memory (the
    interface of vLLM's and flash-attn's fused add + norm layers).
    """

    def __init__(self, ndim: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)
        s = residual + x
        return F.layer_norm(s, self.weight.shape, self.weight, self.bias, 1e-5), s


class TiedEmbedding(nn.Module):
    """Token embedding whose weight is also the output head (GPT-2's weight tying).

    `forward(idx)` embeds token ids; `unembed(x)` gives logits x @ Wᵀ with the same weight. One module
    owns both uses so that an instrumented version can see the whole gradient of the shared weight.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


@dataclass(frozen=True)
class Layers:
    """The classes a GPT is built from; pegn.instrumented_layers() returns per-example-norm ones."""

    linear: type[nn.Module] = nn.Linear  # linear(in_features, out_features, bias=...)
    layer_norm: type[nn.Module] = LayerNorm  # layer_norm(ndim, bias=...)
    embedding: type[nn.Module] = nn.Embedding  # position embedding: embedding(num, dim)
    tied_embedding: type[nn.Module] = TiedEmbedding  # token embedding + output head


ATTENTIONS = ("sdpa", "math")  # GPTConfig.attention: the fused kernels, or plain attention written out
SDPA_BACKENDS = ("auto", "flash", "cudnn")  # GPTConfig.sdpa_backend: the fused kernel attention=sdpa runs
# The kernel orders of sdpa_backend=flash and =cudnn, set around each call (sdpa_kernel(..., set_priority=True)):
# each falls back along the rest for inputs its first cannot take (cuDNN's runs bf16/fp16 only; flash attention
# needs a GPU). flash's leaves cuDNN's kernel out: PyTorch (torch 2.11, sdp_utils.cpp priority_order) installs its
# own cuDNN-first order on a Hopper GPU at the first attention call, over an order set before it.
SDPA_ORDERS = {
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


def sdpa_order(sdpa_backend: str, q: torch.Tensor) -> list | None:
    """The kernel order attention=sdpa runs under, or None for PyTorch's own. auto is cudnn's on a Hopper GPU
    (compute capability 9.x): cuDNN's kernel is 1.5-1.8x faster than flash attention at the models' shapes on an
    H200, and the whole compiled step 0.92-0.95x (docs/benchmarks.md). PyTorch's own order would pick it there too,
    but only until something restores an order saved before its first call (sdpa_kernel does, on exit), so auto
    sets it on every call. torch.compile folds the device query to a constant."""
    if sdpa_backend == "auto":
        # (a ROCm GPU of the gfx9 family also reports major 9; cuDNN is NVIDIA's)
        hopper = q.is_cuda and torch.version.hip is None and torch.cuda.get_device_properties(q.device).major == 9
        return SDPA_ORDERS["cudnn"] if hopper else None
    return SDPA_ORDERS[sdpa_backend]


LOSS_KERNELS = ("auto", "torch", "triton")  # GPTConfig.loss_kernel


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """Causal self-attention written out: softmax(q kᵀ · scale + M) v, M = -inf above the diagonal (Vaswani et
    al. 2017, eq. 1; scale defaults to 1/sqrt(head_dim), as F.scaled_dot_product_attention's).

    The reference that fused kernels (flash attention) are compared with: the logits, the softmax and its
    product with v are computed in at least float32 with autocast off (float64 for float64 inputs), so none of
    it rounds to bf16; the result is cast back to v's dtype. Memory is (B, heads, T, T) in that dtype.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
        logits = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.size(-1)))
        T = logits.size(-1)  # queries and keys are the same positions (the model's self-attention)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        if dropout_p > 0:
            att = F.dropout(att, p=dropout_p)
        return (att @ v32).to(v.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layers: Layers, cosine: bool = False):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = layers.linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = layers.linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # Cosine attention: unit-length q and k, logits cos(q, k) * sqrt(head_dim), i.e. the range that
        # sdpa's default 1/sqrt(head_dim) scale gives unit-variance q, k. Bounded logits cannot blow up.
        self.cosine = cosine
        if config.attention not in ATTENTIONS:
            raise ValueError(f"attention={config.attention!r} is not known; accepted: {', '.join(ATTENTIONS)}")
        self.attention = config.attention
        if config.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend={config.sdpa_backend!r} is not known; accepted: {', '.join(SDPA_BACKENDS)}")
        self.sdpa_backend = config.sdpa_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence, embedding
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        scale = None
        if self.cosine:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = math.sqrt(hs)
        dropout_p = self.dropout if self.training else 0.0
        if self.attention == "math":
            y = math_attention(q, k, v, scale=scale, dropout_p=dropout_p)
        elif (order := sdpa_order(self.sdpa_backend, q)) is not None:
            with sdpa_kernel(order, set_priority=True):
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, layers: Layers):
        super().__init__()
        self.c_fc = layers.linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = layers.linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layers: Layers, cosine: bool = False):
        super().__init__()
        self.ln_1 = layers.layer_norm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layers, cosine=cosine)
        self.ln_2 = layers.layer_norm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, layers)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x ← x + attn(ln_1(x)); x ← x + mlp(ln_2(x)), with each add done by the LayerNorm after it.

        The residual stream x is carried as (h, residual): x = residual + h, where h is the previous
        branch's output not yet added (residual None: x = h, the embeddings). Returns the same pair
        after this block: (mlp output, stream before it).
        """
        if residual is None:
            y, residual = self.ln_1(h), h
        else:
            y, residual = self.ln_1(h, residual)
        y, residual = self.ln_2(self.attn(y), residual)
        return self.mlp(y), residual


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    cosine_attn_blocks: tuple[int, ...] = field(default_factory=tuple)
    attention: str = "sdpa"  # ATTENTIONS: sdpa (F.scaled_dot_product_attention: flash on a GPU) | math (written out)
    sdpa_backend: str = "auto"  # SDPA_BACKENDS: auto | flash | cudnn (sdpa_order)
    # LOSS_KERNELS: torch (F.cross_entropy) | triton (gnsrepro.kernels.cross_entropy) | auto (triton on CUDA)
    loss_kernel: str = "auto"


def gpt_config(m) -> GPTConfig:
    """The GPTConfig of a model config: a gnsrepro.config.ModelConfig or the `model` node of a Hydra config (the
    same field names)."""
    return GPTConfig(block_size=m.block_size, vocab_size=m.vocab_size, n_layer=m.n_layer, n_head=m.n_head,
                     n_embd=m.n_embd, dropout=m.dropout, bias=m.bias, cosine_attn_blocks=tuple(m.cosine_attn_blocks),
                     attention=m.attention, sdpa_backend=m.sdpa_backend, loss_kernel=m.loss_kernel)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, layers: Layers = Layers()):
        super().__init__()
        if config.loss_kernel not in LOSS_KERNELS:
            raise ValueError(f"loss_kernel={config.loss_kernel!r} is not known; accepted: {', '.join(LOSS_KERNELS)}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=layers.tied_embedding(config.vocab_size, config.n_embd),
                wpe=layers.embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(
                    [Block(config, layers, cosine=i in config.cosine_attn_blocks) for i in range(config.n_layer)]
                ),
                ln_f=layers.layer_norm(config.n_embd, bias=config.bias),
            )
        )
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, TiedEmbedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; the tied weight counted once. non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True):
        """(logits, loss); loss None without targets (then logits of the last position only). Training passes
        return_logits=False and gets (None, loss): a compiled graph that returned the (B, T, V) logits would
        also take a gradient for them in its backward, which autograd fills with zeros (a B·T·V write)."""
        B, T = idx.size()  # batch, sequence
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        # (B, T), not (T,): the position embedding then sees each example's own gradient
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device).expand(B, T)
        h, residual = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos)), None
        for block in self.transformer.h:
            h, residual = block(h, residual)
        x = self.transformer.ln_f(h, residual)[0] if residual is not None else self.transformer.ln_f(h)
        if targets is None:  # inference: logits of the last position only
            return self.transformer.wte.unembed(x[:, [-1], :]), None
        logits = self.transformer.wte.unembed(x)
        # mean over all B*T tokens: example b's gradient is that of its own mean token loss, over B
        kernel = self.config.loss_kernel
        # auto: the kernels on CUDA, eager or compiled. In the whole compiled gns=off step on an H200 (bench
        # overhead, CUDA graphs, docs/benchmarks.md) they take 0.914-0.925x the step time with inductor's own loss at
        # 20M (micro-batch 16, 64) and 0.976-0.998x at 111M; alone, (16·1024, 50304) bf16 forward + backward, 1.33 ms
        # against inductor's 2.10 and eager F.cross_entropy's 10.7
        if kernel == "triton" or (kernel == "auto" and logits.is_cuda):
            from gnsrepro.kernels.cross_entropy import cross_entropy

            # the same value and gradient from two fused kernels (loss and log-sum-exp; the gradient); it overwrites
            # the logits when they are not returned (float64 and CPU logits without TRITON_INTERPRET go to
            # F.cross_entropy)
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                                 inplace=not return_logits)
            return (logits if return_logits else None), loss
        # at least fp32 (bf16 logits under autocast), and fp64 for a float64 model
        logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits32.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return (logits if return_logits else None), loss

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention (PaLM, appendix B).

        N counts every matrix that a token's activations multiply, the output head included and the
        embedding lookups excluded.
        """
        c = self.config
        n_matmul = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n_matmul + 12 * c.n_layer * c.n_embd * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on matrices (dim >= 2) only, not on biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
