"""Where a training step's time goes: torch.profiler over a few compiled steps (a tuning tool, not a feature).

For each situation (model, sequence length, micro-batch, gns variant) it builds the real training step
(gnsrepro.train.build_step / train_step, as `gnsrepro bench train` does), warms it up, then prints:
- the step's wall time and the time the GPU spent in kernels, so launch-bound steps show as a gap;
- the device time by kind of kernel (matmuls, attention, Triton-fused pointwise, optimizer, copies, ...);
- the heaviest kernels by name;
- with --host N, the host's N heaviest Python functions over the profiled steps (cProfile), for eager steps that
  the GPU waits on.

    python -m benchmarks.profile_step --situations 20M:1024:16:off,20M:1024:16:all,111M:2048:16:off
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import re
import statistics
import time

import pandas as pd
import torch
from omegaconf import OmegaConf

from gnsrepro.config import GNSConfig, ModelConfig, OptimConfig, named_model
from gnsrepro.train import build_step
from gnsrepro.train import step as train_step

VARIANTS = {  # name: (gns.mode, gns.method, gns.ln_backend, gns.linear_backend)
    "off": ("off", "auto", "auto", "torch"),
    "ln_torch": ("ln", "auto", "torch", "torch"),
    "ln_triton": ("ln", "auto", "triton", "torch"),
    "all": ("all", "simultaneous", "torch", "auto"),  # gns.linear_backend=auto: by shape (linear_backend.csv)
    "all_torch_linear": ("all", "simultaneous", "torch", "torch"),
    "all_triton_linear": ("all", "simultaneous", "torch", "triton"),
}
KINDS = [  # (kind, regex on the kernel name), first match wins
    ("matmul", r"gemm|cutlass|nvjet|sm90_xmma|cublas|splitK"),
    ("attention", r"flash|fmha|attention|efficient_attention"),
    ("layernorm (gnsrepro triton)", r"_ln_|layer_norm|layernorm"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("reduction/loss", r"reduce|softmax|nll|cross_entropy|logsumexp|red_fused|per_"),
    ("triton fused", r"^triton_"),
    ("copy/fill", r"copy|memcpy|memset|fill|cat|elementwise"),
]


def model_config(name: str) -> ModelConfig:
    return OmegaConf.to_object(named_model(name, setting="--situations"))


def kind(name: str) -> str:
    for k, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return k
    return "other"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def print_host_profile(step, steps: int, device: torch.device, top: int, situation: str) -> None:
    """The host's side of `steps` steps: cProfile's heaviest `top` functions by their own time, then by their
    cumulative time (where an eager step's Python and dispatch time goes when the GPU waits for the host)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    _sync(device)
    prof.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(order).print_stats(top)
        body = out.getvalue()
        print(f"\n--- host profile of {situation}, {steps} steps, by {order} ---")
        print(body[body.find("ncalls"):].rstrip())


def profile(model: str, seq_len: int, micro: int, variant: str, steps: int, compile: bool,
            device: torch.device, graphs: bool = False, host: int = 0) -> dict:
    mode, method, backend, linear_backend = VARIANTS[variant]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gns = GNSConfig(mode=mode, method=method, ln_backend=backend, linear_backend=linear_backend)
    parts = build_step(model_config(model), gns, OptimConfig(),
                       device, dtype, compile, micro_batch_size=micro, cuda_graphs=graphs)
    x = torch.randint(0, min(50257, parts.raw_model.config.vocab_size), (micro, seq_len), device=device)
    y = torch.randint(0, min(50257, parts.raw_model.config.vocab_size), (micro, seq_len), device=device)
    drain = parts.tracker.drain if parts.tracker is not None else (lambda: None)

    def step():
        train_step(parts, [(x, y)], micro, 1e-4)

    t0 = time.perf_counter()
    for _ in range(5):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    wall = []
    for _ in range(20):
        t0 = time.perf_counter()
        step()
        _sync(device)
        wall.append(time.perf_counter() - t0)
        drain()
    if host:
        print_host_profile(step, steps, device, host, f"{model}:{seq_len}:{micro}:{variant}")
    on_gpu = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    # on a CPU (a smoke test of this tool) the top-level operators stand in for kernels
    rows = [(e.name, e.device_time_total if on_gpu else e.self_cpu_time_total) for e in prof.events()
            if e.device_type == (torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU)]
    df = pd.DataFrame(rows, columns=["kernel", "us"])
    df["us"] /= steps
    df["kind"] = df["kernel"].map(kind)
    by_kind = df.groupby("kind")["us"].sum().sort_values(ascending=False)
    by_name = df.groupby("kernel")["us"].agg(["sum", "count"]).sort_values("sum", ascending=False)
    step_ms = 1e3 * statistics.median(wall)
    busy_ms = df["us"].sum() / 1e3
    tokens = micro * seq_len
    flops = parts.raw_model.flops_per_token(seq_len) * tokens
    print(f"\n=== {model} seq {seq_len} micro {micro} gns={variant} compile={compile} graphs={graphs}: "
          f"step {step_ms:.2f} ms, "
          f"kernels {busy_ms:.2f} ms ({100 * busy_ms / step_ms:.0f}% busy), {len(df) / steps:.0f} kernels/step, "
          f"{tokens / step_ms * 1e3:,.0f} tok/s, MFU {100 * flops / (step_ms * 1e-3) / 989e12:.1f}% "
          f"(warm-up {warm_s:.0f} s)")
    for k, us in by_kind.items():
        print(f"  {k:<28} {us / 1e3:8.2f} ms  {100 * us / df['us'].sum():5.1f}%")
    print("  heaviest kernels (ms/step, launches/step):")
    for name, r in by_name.head(20).iterrows():
        print(f"    {r['sum'] / 1e3:7.3f} {r['count'] / steps:5.0f}  {name[:110]}")
    kernels = by_name.reset_index().rename(columns={"sum": "us", "count": "launches"})
    kernels["launches"] /= steps
    kernels.insert(0, "situation", f"{model}:{seq_len}:{micro}:{variant}")
    return {"model": model, "seq_len": seq_len, "micro": micro, "variant": variant, "compile": compile,
            "graphs": graphs, "step_ms": step_ms, "kernel_ms": busy_ms}, kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--situations", default="20M:1024:16:off,20M:1024:16:all,20M:1024:64:off,111M:2048:16:off",
                    help="comma list of MODEL:SEQ_LEN:MICRO_BATCH:VARIANT (variants: " + ", ".join(VARIANTS) + ")")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per situation")
    ap.add_argument("--eager", action="store_true", help="without torch.compile")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay each step from a CUDA graph")
    ap.add_argument("--host", type=int, default=0, metavar="N",
                    help="also cProfile the host over the profiled steps and print its N heaviest functions")
    ap.add_argument("--out", default=None, help="CSV of the step and kernel times")
    ap.add_argument("--kernels-out", default=None,
                    help="CSV of every kernel's device time (us a step) and launches a step, per situation: to diff "
                         "two variants kernel by kernel")
    a = ap.parse_args()
    results, kernels = [], []
    for s in a.situations.split(","):
        model, seq, micro, variant = s.split(":")
        result, per_kernel = profile(model, int(seq), int(micro), variant, a.steps, not a.eager,
                                     torch.device(a.device), a.cuda_graphs, a.host)
        results.append(result)
        kernels.append(per_kernel)
        gc.collect()  # this situation's model and compiled graphs, before the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    table = pd.DataFrame(results)
    print("\n" + table.to_string(index=False))
    if a.out:
        table.to_csv(a.out, index=False)
    if a.kernels_out:
        pd.concat(kernels).to_csv(a.kernels_out, index=False)


if __name__ == "__main__":
    main()
