"""Training-step throughput: `gnsrepro bench train` (tokens/s, MFU) and `gnsrepro bench overhead`.

Both time the real training step (the model, per-example-norm layers and GNS tracker that `train`
uses) on random tokens, bf16 autocast and torch.compile by default, with CUDA synchronisation only
around the timed block. MFU counts 6N + 12·L·d·T FLOPs per token (GPT.flops_per_token) against the
device's dense bf16 peak.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from datetime import date

import torch

from gnsrepro.data.tokenizer import EOT
from gnsrepro.errors import ConfigError
from gnsrepro.train import build_step, peak_flops, resolve_dtype, train_step

OVERHEAD_VARIANTS = (  # (label, gns.mode, gns.method, gns.ln_backend)
    ("off", "off", "auto", "auto"),
    ("ln torch", "ln", "auto", "torch"),
    ("ln triton", "ln", "auto", "triton"),
    ("all simultaneous", "all", "simultaneous", "auto"),
    ("all ghost", "all", "ghost", "auto"),
)


def _device(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _prepare(cfg, gns_cfg, device: torch.device):
    """(step, drain, model): one training step (gnsrepro.train.train_step: forward, backward, gradient norms and
    clipping, the GNS tracker, AdamW) on fixed random tokens, the tracker's fetch of its device-side sums (a
    no-op without one), and the model it trains; nothing run yet."""
    from gnsrepro.config import OptimConfig

    torch.manual_seed(0)
    seq_len = cfg.seq_len or cfg.model.block_size
    parts = build_step(cfg.model, gns_cfg, OptimConfig(), device, resolve_dtype(cfg.dtype, device), cfg.compile,
                       micro_batch_size=cfg.micro_batch_size)
    tokens = min(cfg.model.vocab_size, EOT + 1)  # GPT-2's ids, or all of a smaller model's (data.vocab_limit)
    x = torch.randint(0, tokens, (cfg.micro_batch_size, seq_len), device=device)
    y = torch.randint(0, tokens, (cfg.micro_batch_size, seq_len), device=device)
    lr = OptimConfig().lr

    def step():
        train_step(parts, [(x, y)], cfg.micro_batch_size, lr)

    drain = parts.tracker.drain if parts.tracker is not None else (lambda: None)
    return step, drain, parts.raw_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, drain, n: int, device: torch.device) -> list[float]:
    """n step times in seconds, each step alone between two synchronisations."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        drain()  # outside the timed block: training fetches once per log interval
    return times


def _result(cfg, model, times: list[float], device: torch.device) -> dict:
    median = statistics.median(times)
    seq_len = cfg.seq_len or cfg.model.block_size
    tok_s = cfg.micro_batch_size * seq_len / median
    peak = peak_flops(device)
    mfu = model.flops_per_token(seq_len) * tok_s / peak if peak else float("nan")
    return {"step_time_s": median, "tokens_per_s": tok_s, "mfu": mfu}


def _warmed_up(cfg, gns_cfg, device: torch.device):
    """_prepare's (step, drain, model) after cfg.warmup untimed steps (torch.compile compiles in the first)."""
    step, drain, model = _prepare(cfg, gns_cfg, device)
    for _ in range(cfg.warmup):
        step()
    _sync(device)
    return step, drain, model


def time_steps(cfg, gns_cfg, device: torch.device) -> dict:
    """Median step time over cfg.steps steps (after cfg.warmup) of forward, backward, GNS and AdamW."""
    step, drain, model = _warmed_up(cfg, gns_cfg, device)
    return _result(cfg, model, _timed(step, drain, cfg.steps, device), device)


def _header(device: torch.device) -> str:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"device {name} | torch {torch.__version__} | triton {triton.__version__} | {date.today().isoformat()}"


def bench_train(cfg) -> dict:
    device = _device(cfg)
    seq_len = cfg.seq_len or cfg.model.block_size
    if seq_len > cfg.model.block_size:
        raise ConfigError(f"seq_len={seq_len} is longer than the model's context "
                          f"model.block_size={cfg.model.block_size}")
    print(_header(device))
    r = time_steps(cfg, cfg.gns, device)
    print(f"bench train: model {cfg.model.name} | seq_len {seq_len} | micro-batch {cfg.micro_batch_size} | "
          f"compile {cfg.compile} | gns={cfg.gns.mode}")
    print(f"  step {1e3 * r['step_time_s']:.1f} ms | {r['tokens_per_s']:,.0f} tokens/s | MFU {100 * r['mfu']:.1f}%")
    return r


def bench_overhead(cfg) -> list[dict]:
    """Step time of each OVERHEAD_VARIANTS entry against gns=off.

    With cfg.rounds > 1 every variant is built and warmed up (compiled) first; then each of cfg.rounds
    rounds times cfg.steps // cfg.rounds steps of every variant, in an order rotated from round to
    round, so that a drift of the GPU's clocks over the minutes of the run falls on every variant
    alike. With rounds=1 the variants run one after another, one model in memory at a time (for
    models too large to hold five copies). A variant's step time is the median of its timed steps.
    """
    device = _device(cfg)
    seq_len = cfg.seq_len or cfg.model.block_size
    if not 1 <= cfg.rounds <= cfg.steps:
        raise ConfigError(f"rounds={cfg.rounds}: accepts 1 to steps={cfg.steps} (each round times at least one "
                          "step of every variant)")
    per_round = cfg.steps // cfg.rounds
    print(_header(device))
    print(f"bench overhead: model {cfg.model.name} | seq_len {seq_len} | micro-batch {cfg.micro_batch_size} | "
          f"compile {cfg.compile} | median of {per_round * cfg.rounds} steps per variant after {cfg.warmup}"
          + (f", in {cfg.rounds} interleaved rounds" if cfg.rounds > 1 else ""), flush=True)
    results = []

    def build(label, mode, method, backend):
        g = copy.deepcopy(cfg.gns)
        g.mode, g.method, g.ln_backend = mode, method, backend
        t0 = time.perf_counter()
        step, drain, model = _warmed_up(cfg, g, device)
        if cfg.rounds > 1:
            print(f"  {label:<18} built and warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
        return step, drain, model

    def report(label, model, times):
        res = _result(cfg, model, times, device)
        res["variant"] = label
        results.append(res)
        base = results[0]["step_time_s"]
        print(f"  {label:<18} step {1e3 * res['step_time_s']:8.1f} ms | {res['tokens_per_s']:>11,.0f} tokens/s | "
              f"x{res['step_time_s'] / base:.3f} of gns=off", flush=True)

    specs = [v for v in OVERHEAD_VARIANTS if not (v[3] == "triton" and device.type != "cuda")]
    if cfg.rounds == 1:
        for spec in specs:
            step, drain, model = build(*spec)
            report(spec[0], model, _timed(step, drain, cfg.steps, device))
            del step, drain, model
            gc.collect()  # free this variant's model and compiled graphs before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return results
    built = [(spec[0], *build(*spec), []) for spec in specs]
    for r in range(cfg.rounds):
        k = r % len(built)
        for _label, step, drain, _, times in built[k:] + built[:k]:
            times += _timed(step, drain, per_round, device)
    for label, _, _, model, times in built:
        report(label, model, times)
    return results
