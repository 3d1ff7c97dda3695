"""The machine's reference for the MFU targets: a plain nanoGPT-shaped GPT's training step, timed interleaved with
gnsrepro's own untracked step at the same shapes (a tuning tool, not a feature).

The plain model is nanoGPT's model.py and its training step (Karpathy, github.com/karpathy/nanoGPT) reduced to what
a step times: learned position embeddings, pre-LN blocks with F.scaled_dot_product_attention (PyTorch's pick of
kernel) and an exact-GELU MLP, the head tied to the token embedding, F.cross_entropy on bf16-autocast logits,
gradient clipping at 1.0, fused AdamW, `torch.compile` in its default mode. It has the same parameters as
gnsrepro.model.GPT of the same conf/model (checked in tests/test_plain_gpt.py), so one FLOP count (GPT.flops_per_token)
serves both and the MFUs compare directly. Variants, each timed `--steps` steps a round, in turn, `--rounds` rounds:
- gnsrepro: `build_step` with gns=off, as `gnsrepro train` runs it on one GPU (compiled, cuDNN attention, the fused
  loss, CUDA graphs: `--graphs both` also times it without them);
- gnsrepro coordinate descent: the same with inductor's coordinate-descent tuning of its generated kernels
  (`torch._inductor.config.coordinate_descent_tuning`: each pointwise and reduction kernel's launch settings tried
  on the GPU at compile time), a candidate for the step's bandwidth-bound kernels (the LayerNorms, the GELU);
- plain: the nanoGPT step above;
- plain graphed: the same model compiled with mode="reduce-overhead" (PyTorch's own CUDA graphs).

    python -m benchmarks.plain_gpt --situations 20M:1024:16,20M:1024:64,111M:2048:16 --rounds 3 --steps 20
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor import config as inductor_config

from benchmarks.profile_step import model_config
from gnsrepro.config import GNSConfig, ModelConfig, OptimConfig
from gnsrepro.train import build_step, peak_flops
from gnsrepro.train import step as gnsrepro_step


class PlainAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class PlainMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class PlainBlock(nn.Module):
    """nanoGPT's Block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = PlainAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = PlainMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    """nanoGPT's GPT, with its module names (so gnsrepro.model.GPT's state_dict loads into it): token + position
    embeddings, the blocks, a final LayerNorm, the tied head, the mean loss."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),
            h=nn.ModuleList(PlainBlock(c) for _ in range(c.n_layer)),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as nanoGPT
        for m in self.modules():  # nanoGPT's _init_weights
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


VARIANTS = ("gnsrepro", "gnsrepro no graphs", "gnsrepro coordinate descent", "plain", "plain graphed")
INDUCTOR_OPTIONS = {"gnsrepro coordinate descent": {"coordinate_descent_tuning": True}}  # per variant, at compile


def plain_step(config: ModelConfig, device: torch.device, dtype: torch.dtype, mode: str | None) -> Callable:
    """nanoGPT's training step for one micro-batch: forward under autocast, backward, clip, AdamW, zero_grad.
    mode: torch.compile's mode (None: eager)."""
    model = PlainGPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    compiled = torch.compile(model, mode=mode) if mode is not None else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # each call a new step: its outputs may be overwritten
        with autocast:
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step.model = model
    return step


def ours_step(config: ModelConfig, device: torch.device, dtype: torch.dtype, micro: int, compile: bool,
              graphs: bool) -> Callable:
    """gnsrepro's untracked step (gns=off), as `gnsrepro bench train` builds it."""
    parts = build_step(config, GNSConfig(mode="off"), OptimConfig(), device, dtype, compile,
                       micro_batch_size=micro, cuda_graphs=graphs)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gnsrepro_step(parts, [(x, y)], micro, 1e-4)[0]

    step.model = parts.raw_model
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds_per_step(step: Callable, batch, n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(*batch)
    _sync(device)
    return (time.perf_counter() - t0) / n


def compare(model: str, seq_len: int, micro: int, variants: list[str], steps: int, rounds: int, warmup: int,
            device: torch.device, compile: bool = True) -> list[dict]:
    """Each variant built and warmed up, then timed in turn, `rounds` times: one row a variant, its median."""
    config = model_config(model)
    config.block_size = max(config.block_size, seq_len)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    x = torch.randint(0, 50257 if config.vocab_size > 50257 else config.vocab_size, (micro, seq_len), device=device)
    y = torch.roll(x, -1, dims=1)
    graphs = device.type == "cuda"
    builders = {
        "gnsrepro": lambda: ours_step(config, device, dtype, micro, compile, graphs=graphs),
        "gnsrepro coordinate descent": lambda: ours_step(config, device, dtype, micro, compile, graphs=graphs),
        "gnsrepro no graphs": lambda: ours_step(config, device, dtype, micro, compile, graphs=False),
        "plain": lambda: plain_step(config, device, dtype, "default" if compile else None),
        "plain graphed": lambda: plain_step(config, device, dtype, "reduce-overhead" if compile else None),
    }
    built = {}
    for name in variants:
        t0 = time.perf_counter()
        # inductor reads its config when it compiles, at the first calls: the warm-up is inside the patch
        with inductor_config.patch(INDUCTOR_OPTIONS.get(name, {})):
            built[name] = builders[name]()
            for _ in range(warmup):
                built[name](x, y)
            _sync(device)
        print(f"  {model}:{seq_len}:{micro} {name}: built and warmed up in {time.perf_counter() - t0:.0f} s",
              flush=True)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:  # interleaved: a drifting clock or a neighbour's load falls on every variant alike
            times[name].append(_seconds_per_step(built[name], (x, y), steps, device))
    flops = ours_flops_per_token(config, seq_len)
    peak = peak_flops(device)
    rows = []
    for name in variants:
        s = statistics.median(times[name])
        rows.append({"model": model, "seq_len": seq_len, "micro": micro, "variant": name, "ms": 1e3 * s,
                     "spread_ms": 1e3 * (max(times[name]) - min(times[name])),
                     "mfu": flops * micro * seq_len / s / peak if peak else float("nan")})
    del built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def ours_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """GPT.flops_per_token of this shape (the plain model has the same matrices)."""
    from gnsrepro.model import GPT, gpt_config

    with torch.device("meta"):
        return GPT(gpt_config(config)).flops_per_token(seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--situations", default="20M:1024:16,20M:1024:64,111M:2048:8,111M:2048:16",
                    help="comma list of MODEL:SEQ_LEN:MICRO_BATCH")
    ap.add_argument("--variants", default="gnsrepro,gnsrepro no graphs,plain,plain graphed",
                    help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps a variant a round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eager", action="store_true", help="without torch.compile (a smoke test on a CPU)")
    ap.add_argument("--out", default=None, help="CSV of the rows")
    a = ap.parse_args()
    variants = [v.strip() for v in a.variants.split(",")]
    if unknown := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variant(s) {unknown}; accepted: {', '.join(VARIANTS)}")
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | {a.rounds} rounds of {a.steps} steps a variant", flush=True)
    rows = []
    for s in a.situations.split(","):
        model, seq, micro = s.split(":")
        rows += compare(model, int(seq), int(micro), variants, a.steps, a.rounds, a.warmup, device, not a.eager)
        table = pd.DataFrame(rows)
        if a.out:  # after each situation, so a run cut short keeps what it measured
            table.to_csv(a.out, index=False)
    table["mfu"] = table["mfu"].map(lambda v: f"{100 * v:.1f}%")
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
