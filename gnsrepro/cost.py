"""FLOPs and bytes of per-example gradient norms: the paper's Table 1 and its FLOP / I/O figure.

For a Linear layer y = x Wᵀ with x: (B, T, K) and dy: (B, T, L), three ways to get the weight gradient
dW = Σ_b dy_bᵀ x_b and the per-example squared norms |G_b|²_F of G_b = dy_bᵀ x_b:
- ordinary: dW alone, one (L, B·T) @ (B·T, K) matmul, no norms (the baseline);
- simultaneous (the paper): G_b by a batched matmul, which costs the same FLOPs as the ordinary one
  and replaces it, then square, sum over K·L and sum over b;
- ghost (Li et al. 2022, "Large Language Models Can Be Strong Differentially Private Learners"):
  |G_b|²_F = ⟨x_b x_bᵀ, dy_b dy_bᵀ⟩_F from two (T, T) Gram matrices, plus the ordinary dW.
And for a LayerNorm y = x̂·γ + β over N features: per-example dγ_b, dβ_b reduced over T, then squared.

A multiply-add counts as two FLOPs, as torch.utils.flop_counter does. Bytes count reads and writes
of whole tensors to device memory at `bytes_per_element` each (2 for bf16); per-example norms and
statistics are fp32. Biases and the embedding lookups are left out: their per-example work is
O(B·T·L), too small for the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from gnsrepro.model import GPT, GPTConfig, gpt_config

FP32_BYTES = 4  # per-example norms and LayerNorm statistics are kept in fp32

METHODS = {
    "ordinary": "ordinary weight gradients",
    "simultaneous": "simultaneous (this paper)",
    "ghost": "Li et al. 2022 (ghost norm)",
    "layernorm_only": "LayerNorm only",
}

SWEEP_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def ordinary_weight_grad(B: int, T: int, K: int, L: int, bytes_per_element: int = 2) -> Cost:
    """dW = dyᵀ x over all B·T tokens: 2·B·T·K·L FLOPs; reads x and dy, writes dW."""
    return Cost(2 * B * T * K * L, (B * T * K + B * T * L + K * L) * bytes_per_element)


def simultaneous(B: int, T: int, K: int, L: int, bytes_per_element: int = 2) -> Cost:
    """Per-example G_b = dy_bᵀ x_b by a batched matmul, then |G_b|² and dW = Σ_b G_b.

    FLOPs: the batched matmul, 2·B·T·K·L (as many as the ordinary dW, which it replaces), plus
    3·B·K·L for squaring G, summing each G_b's K·L squares and summing G over b. Bytes: the ordinary
    reads of x, dy and the write of dW, plus the (B, L, K) tensor written and read back once, plus
    the B norms. Done in chunks of examples the transient tensor is smaller but the traffic the same.
    """
    extra = Cost(3 * B * K * L, 2 * B * K * L * bytes_per_element + B * FP32_BYTES)
    return ordinary_weight_grad(B, T, K, L, bytes_per_element) + extra


def ghost(B: int, T: int, K: int, L: int, bytes_per_element: int = 2) -> Cost:
    """Li et al. (2022): |G_b|²_F = ⟨x_b x_bᵀ, dy_b dy_bᵀ⟩_F, plus the ordinary dW.

    FLOPs: two (T, T) Gram matrices per example, 2·B·T²·(K + L), and their inner product, 2·B·T².
    Bytes: x and dy read again, both Gram matrices written and read back, the B norms written.
    """
    extra = Cost(
        2 * B * T * T * (K + L) + 2 * B * T * T,
        (B * T * K + B * T * L + 4 * B * T * T) * bytes_per_element + B * FP32_BYTES,
    )
    return ordinary_weight_grad(B, T, K, L, bytes_per_element) + extra


def layernorm_only(B: int, T: int, N: int) -> Cost:
    """Per-example dγ_b = Σ_t dy_b,t ⊙ x̂_b,t and dβ_b = Σ_t dy_b,t, and their squared norms.

    FLOPs: multiply dy·x̂ and add over T for dγ_b (2·B·T·N), add over T for dβ_b (B·T·N), and the sum
    over b of both into dγ, dβ (2·B·N), about 3·B·T·N, plus squaring both (2·B·N) and summing them over
    N (2·B·N). This counts the whole per-example reduction, although a fused LayerNorm backward
    computes dy·x̂ anyway; it is an upper bound on the extra work. Bytes: dy and x̂ are already in
    registers in the LayerNorm backward (docs/method.md, "The LayerNorm kernel"); what is added
    is the (B, N) fp32 partial sums of dγ_b and dβ_b, written and read back once, and 2·B norms.
    """
    flops = 3 * B * T * N + 2 * B * N + 4 * B * N
    return Cost(flops, 2 * 2 * B * N * FP32_BYTES + 2 * B * FP32_BYTES)


def choose_linear_method(T: int, K: int, L: int) -> str:
    """The per-example norm method with fewer FLOPs for a Linear layer K -> L at sequence length T.

    Rule: "ghost" when its extra work 2·T²·(K + L) + 2·T² is below the simultaneous method's 3·K·L,
    else "simultaneous" (both scale with B, so B cancels; both include the same dW matmul FLOPs).
    For 111M's c_fc (K=768, L=3072) ghost wins only up to T = 30. Li et al. (2022) switch on memory
    instead, 2·T² < K·L (two (T, T) Grams against one (K, L) gradient per example); we count FLOPs,
    which is what the paper's Table 1 compares.
    """
    return "ghost" if ghost(1, T, K, L).flops < simultaneous(1, T, K, L).flops else "simultaneous"


def linear_shapes(config: GPTConfig) -> list[tuple[str, int, int]]:
    """(name, K, L) of every Linear in a GPT: four per block and the tied output head (d -> V)."""
    d = config.n_embd
    shapes = []
    for i in range(config.n_layer):
        shapes += [
            (f"transformer.h.{i}.attn.c_attn", d, 3 * d),
            (f"transformer.h.{i}.attn.c_proj", d, d),
            (f"transformer.h.{i}.mlp.c_fc", d, 4 * d),
            (f"transformer.h.{i}.mlp.c_proj", 4 * d, d),
        ]
    return shapes + [("transformer.wte (output head)", d, config.vocab_size)]


def model_forward_backward(config: GPTConfig, seq_len: int, batch_size: int, bytes_per_element: int) -> Cost:
    """One forward+backward of the whole GPT over batch_size sequences of seq_len tokens.

    FLOPs: GPT.flops_per_token (6·N_matmul + 12·n_layer·d·T per token, PaLM appendix B) times tokens.
    Bytes, an approximation that counts the large tensors only: every Linear reads x and writes y in
    the forward, reads dy and W and writes dx in the backward, and reads x and dy and writes dW for
    the weight gradient, i.e. 3·B·T·(K + L) activations and 3·K·L weight elements (W read twice, dW
    written once); every LayerNorm moves 2·B·T·d forward and 3·B·T·d backward (docs/method.md, "The
    LayerNorm kernel"); flash attention reads q, k, v and writes o (4·B·T·d) forward and reads q, k,
    v, o, do and writes dq, dk, dv (8·B·T·d) backward; GELU moves 2·B·T·4d forward and 3·B·T·4d
    backward. Residual adds, dropout, the loss and the optimizer are left out.
    """
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        gpt = GPT(config)
    tokens = batch_size * seq_len
    flops = gpt.flops_per_token(seq_len) * tokens
    d, n_layer = config.n_embd, config.n_layer
    elements = sum(3 * tokens * (K + L) + 3 * K * L for _, K, L in linear_shapes(config))
    elements += (2 * n_layer + 1) * 5 * tokens * d  # LayerNorms: ln_1, ln_2 per block and ln_f
    elements += n_layer * (12 * tokens * d + 5 * tokens * 4 * d)  # attention core and GELU
    return Cost(flops, elements * bytes_per_element)


def model_costs(config: GPTConfig, seq_len: int, batch_size: int = 1, bytes_per_element: int = 2) -> pd.DataFrame:
    """The paper's Table 1 for a whole GPT: one row per method, indexed by METHODS' keys.

    flops, bytes: the weight-gradient and per-example-norm work of every Linear (ordinary,
    simultaneous, ghost), or the per-example work of every LayerNorm (layernorm_only).
    extra_flops, extra_bytes: what the method adds to training, i.e. beyond the ordinary weight
    gradients for the Linear methods and the whole per-example work for layernorm_only.
    *_fraction: each of these divided by the model's forward+backward (`model_forward_backward`).
    """
    B, T, bpe = batch_size, seq_len, bytes_per_element
    shapes = linear_shapes(config)
    linear_totals = {
        method: sum((fn(B, T, K, L, bpe) for _, K, L in shapes), Cost(0, 0))
        for method, fn in (("ordinary", ordinary_weight_grad), ("simultaneous", simultaneous), ("ghost", ghost))
    }
    n_layernorms = 2 * config.n_layer + 1
    ln = layernorm_only(B, T, config.n_embd)
    totals = {**linear_totals, "layernorm_only": Cost(n_layernorms * ln.flops, n_layernorms * ln.bytes)}
    base = linear_totals["ordinary"]
    extras = {
        "ordinary": Cost(0, 0),
        "simultaneous": Cost(totals["simultaneous"].flops - base.flops, totals["simultaneous"].bytes - base.bytes),
        "ghost": Cost(totals["ghost"].flops - base.flops, totals["ghost"].bytes - base.bytes),
        "layernorm_only": totals["layernorm_only"],
    }
    model = model_forward_backward(config, T, B, bpe)
    rows = [
        {
            "method": method,
            "flops": totals[method].flops,
            "bytes": totals[method].bytes,
            "extra_flops": extras[method].flops,
            "extra_bytes": extras[method].bytes,
            "flops_fraction": totals[method].flops / model.flops,
            "bytes_fraction": totals[method].bytes / model.bytes,
            "extra_flops_fraction": extras[method].flops / model.flops,
            "extra_bytes_fraction": extras[method].bytes / model.bytes,
        }
        for method in METHODS
    ]
    df = pd.DataFrame(rows).set_index("method")
    df.attrs["model_flops"], df.attrs["model_bytes"] = model.flops, model.bytes
    return df


def seq_len_sweep(
    config: GPTConfig, seq_lens=SWEEP_SEQ_LENS, batch_size: int = 1, bytes_per_element: int = 2
) -> pd.DataFrame:
    """Extra FLOPs and bytes of each per-example method, absolute and as a fraction of the model, against
    seq_len: the paper's FLOP / I/O figure (p. 5).

    Columns: seq_len, method, extra_flops, extra_bytes (`model_costs`' extras, for batch_size sequences),
    model_flops, model_bytes (`model_forward_backward`) and extra_{flops,bytes}_fraction (their ratios).
    The FLOP fractions do not depend on the batch size (every FLOP term scales with B); the byte
    fractions do, a little, because the weights are read once per step whatever B is.
    """
    rows = []
    for T in seq_lens:
        costs = model_costs(config, T, batch_size, bytes_per_element)
        for method in ("simultaneous", "ghost", "layernorm_only"):
            rows.append({"seq_len": T, "method": method,
                         "extra_flops": costs.loc[method, "extra_flops"],
                         "extra_bytes": costs.loc[method, "extra_bytes"],
                         "model_flops": costs.attrs["model_flops"], "model_bytes": costs.attrs["model_bytes"],
                         "extra_flops_fraction": costs.loc[method, "extra_flops_fraction"],
                         "extra_bytes_fraction": costs.loc[method, "extra_bytes_fraction"]})
    return pd.DataFrame(rows)


def run_cost(cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`gnsrepro cost model=111M seq_len=2048`: print the cost table and the seq_len sweep, return both."""
    from gnsrepro.errors import ConfigError

    seq_len = cfg.seq_len if cfg.seq_len is not None else cfg.model.block_size
    sizes = {"seq_len": seq_len, "batch_size": cfg.batch_size, "bytes_per_element": cfg.bytes_per_element}
    for key, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value}")
    config = gpt_config(cfg.model)
    table = model_costs(config, seq_len, cfg.batch_size, cfg.bytes_per_element)
    sweep = seq_len_sweep(config, batch_size=cfg.batch_size, bytes_per_element=cfg.bytes_per_element)

    print(f"model {cfg.model.name}: n_layer={config.n_layer} n_embd={config.n_embd} vocab={config.vocab_size}; "
          f"seq_len={seq_len} batch_size={cfg.batch_size} bytes/element={cfg.bytes_per_element}")
    print(f"model forward+backward: {table.attrs['model_flops'] / 1e9:.1f} GFLOPs, "
          f"{table.attrs['model_bytes'] / 1e9:.2f} GB (approximate; see cost.model_forward_backward); "
          "% columns are of these")
    shown = pd.DataFrame({
        "GFLOPs": table["flops"] / 1e9,
        "FLOPs %": 100 * table["flops_fraction"],
        "GB": table["bytes"] / 1e9,
        "bytes %": 100 * table["bytes_fraction"],
        "extra GFLOPs": table["extra_flops"] / 1e9,
        "extra FLOPs %": 100 * table["extra_flops_fraction"],
        "extra GB": table["extra_bytes"] / 1e9,
        "extra bytes %": 100 * table["extra_bytes_fraction"],
    }).rename(index=METHODS)
    shown.index.name = None
    print(shown.to_string(float_format=lambda v: f"{v:.4g}"))
    print("\nextra FLOPs as % of the model's forward+backward, against seq_len (batch size cancels):")
    pivot = sweep.pivot(index="seq_len", columns="method", values="extra_flops_fraction") * 100
    print(pivot[["simultaneous", "ghost", "layernorm_only"]].rename(columns=METHODS).to_string(
        float_format=lambda v: f"{v:.4g}"))
    return table, sweep
