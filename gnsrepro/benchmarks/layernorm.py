"""LayerNorm forward+backward timing: PyTorch vs the Triton per-example-norm kernel (claim 3 of the paper).

Three contenders over M = 8 × 2048 = 16,384 rows, hidden N ∈ {768, 1024, 2048, 4096, 8192}, bf16 and
fp32 (x, dy, γ, β all in that dtype):
  (a) ``torch``     torch.nn.functional.layer_norm, forward + autograd backward (dx, dγ, dβ);
  (b) ``triton``    gnsrepro.kernels.layer_norm.layer_norm_per_example: the same plus the per-example
                    squared norms |dγ_b|², |dβ_b|² (returned as the sink's gradient);
  (c) ``torch_pe``  what a user would write in plain PyTorch: F.layer_norm plus a hook on y that
                    recomputes x̂ in fp32 and reduces dy ⊙ x̂ and dy per example, then squares.

Time: median over ``cfg.steps`` calls (after ``cfg.warmup`` untimed ones); a 256 MB buffer is zeroed
before each call so that no input sits in L2 (50 MB on an H100). Three ways:
  eager   CUDA events around one forward + ``torch.autograd.grad`` call: below N = 4096 this is the
          host's time (Python, autograd, launches), not the GPU's;
  graph   the same call captured in a CUDA graph, events around its replay: device time plus the
          graph's launch latency (``graph_launch_us``, a graph of one tiny kernel, a few µs);
  stream  graphs of (flush, call) and (flush) alone, the difference of their replay times: the call's
          device time right after another kernel, as a layer runs inside a training step.
Bytes counted per forward+backward (docs/method.md, "The LayerNorm kernel"): forward 2·M·N·b (read x,
write y) + backward 3·M·N·b (read x and dy, write dx), b = bytes per element. Not counted: γ, β and
their gradients, the fp32 mean/rstd (8·M bytes each way), the kernel's fp32 partial sums (about
2 · programs · N · 4 bytes each way) and the (B, k) norms: all O(B·N + M), under 5% here.
Copy bandwidth: a 1 GiB device-to-device copy, bytes read + written over its median time.

The tuning tools behind the kernel's launch table (gnsrepro/kernels/launch_table.json) are not part of
the package: benchmarks/tuning/layernorm.py, run as ``python -m benchmarks.tuning.layernorm --sweep``
(and ``--sweep-bwd``, ``--variants``, ``--diagnose``, ``--fixed-costs``) from the repository root, uses
the timing helpers and cases here.
"""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
import torch.nn.functional as F

SIZES = (768, 1024, 2048, 4096, 8192)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCH, SEQ = 8, 2048  # 16,384 rows, the paper's 111M micro-batch shape
EPS = 1e-5
DEFAULT_OUT = "outputs/bench/layernorm.parquet"


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            "gnsrepro bench layernorm needs a CUDA GPU: it times GPU kernels against each other "
            f"(asked for device={name!r}, torch.cuda.is_available()={torch.cuda.is_available()})."
        )
    return dev


def time_us(fn: Callable[[], object], warmup: int, steps: int, flush: Optional[torch.Tensor] = None) -> float:
    """Median over `steps` calls of fn's GPU time in µs (CUDA events); L2 is flushed before each call."""
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for s, e in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after three warm-up calls on a side stream (as PyTorch's docs do)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_time_us(fn: Callable[[], object], steps: int, flush: Optional[torch.Tensor] = None) -> float:
    """Median GPU time of fn replayed from a CUDA graph, timed from before the graph's launch: the device
    work and that launch (graph_launch_us), no host overhead. NaN when fn cannot be captured.
    """
    graphs = _capture_or_report(fn)
    return time_us(graphs[0].replay, 2, steps, flush) if graphs else float("nan")


def _capture_or_report(*fns: Callable[[], object]) -> Optional[list[torch.cuda.CUDAGraph]]:
    """capture() of each fn, or None (with the reason printed) where one cannot be captured."""
    try:
        return [capture(fn) for fn in fns]
    except Exception as e:  # noqa: BLE001 - report, do not fail the eager numbers
        print(f"(CUDA graph capture failed: {type(e).__name__}: {e})")
        return None


def stream_time_us(fn: Callable[[], object], steps: int, flush: torch.Tensor, rounds: int = 3) -> float:
    """Median GPU time of fn in the stream right after another kernel, as inside a training step.

    Two CUDA graphs: the L2 flush then fn, and the flush alone; the difference of their replay times
    (median over `rounds` runs of `steps`) is fn's time after the flush, without the graph's launch
    latency, which graph_time_us counts in fn's time (a few µs: graph_launch_us). NaN when fn cannot
    be captured.
    """
    graphs = _capture_or_report(lambda: (flush.zero_(), fn()), flush.zero_)
    if graphs is None:
        return float("nan")
    both, alone = graphs
    t_both = statistics.median(time_us(both.replay, 2, steps) for _ in range(rounds))
    t_alone = statistics.median(time_us(alone.replay, 2, steps) for _ in range(rounds))
    return t_both - t_alone


def graph_launch_us(device: torch.device, flush: torch.Tensor, steps: int = 50) -> float:
    """What graph_time_us gives for a graph of one tiny kernel (a one-element add): mostly its launch.

    Flushed before each call as graph_time_us is, which also keeps the GPU behind the host: back to back,
    replays this short would time the host's launches instead.
    """
    one = torch.zeros(1, device=device)
    return time_us(capture(lambda: one.add_(1)).replay, 3, steps, flush)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, steps: int = 20) -> float:
    """Device-to-device copy: (bytes read + bytes written) / median time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), warmup=3, steps=steps)
    return 2 * nbytes / (us * 1e-6) / 1e9


def torch_per_example_layer_norm(x, weight, bias, eps, out: dict):
    """Plain PyTorch: F.layer_norm, and a hook on y that stores per-example |dγ_b|², |dβ_b|² in `out`."""
    N = x.shape[-1]
    y = F.layer_norm(x, (N,), weight, bias, eps)

    def hook(dy):
        with torch.no_grad():
            xhat = F.layer_norm(x.float(), (N,), None, None, eps)  # x̂ recomputed in fp32
            dyf = dy.float()
            out["sq_weight"] = (dyf * xhat).sum(1).pow(2).sum(-1)  # (B,)
            out["sq_bias"] = dyf.sum(1).pow(2).sum(-1)

    y.register_hook(hook)
    return y


def _cases(device, dtype, N, seed=0, batch=None, seq=None):
    batch, seq = batch or BATCH, seq or SEQ
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, seq, N, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(N, device=device, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(N, device=device, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(batch, seq, N, device=device, dtype=dtype, generator=g)
    sink = torch.zeros(batch, 2, device=device, dtype=torch.float32, requires_grad=True)
    return x, w, b, dy, sink


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _torch_fwd_bwd(x, w, b, dy) -> Callable[[], object]:
    """(a): F.layer_norm forward + autograd backward (dx, dγ, dβ)."""

    def f():
        y = F.layer_norm(x, (x.shape[-1],), w, b, EPS)
        return torch.autograd.grad(y, (x, w, b), dy)

    return f


def _bench_one(device, dtype, N: int, warmup: int, steps: int, flush) -> dict:
    from gnsrepro.kernels.layer_norm import layer_norm_per_example, layer_norm_per_example_reference

    x, w, b, dy, sink = _cases(device, dtype, N)
    M = BATCH * SEQ
    store: dict = {}

    f_torch = _torch_fwd_bwd(x, w, b, dy)

    def f_triton():
        y = layer_norm_per_example(x, w, b, EPS, sink)
        return torch.autograd.grad(y, (x, w, b, sink), dy)

    def f_torch_pe():
        y = torch_per_example_layer_norm(x, w, b, EPS, store)
        return torch.autograd.grad(y, (x, w, b), dy)

    # correctness at the benchmarked shape: Triton vs PyTorch (dx) and vs the fp32 reference (norms)
    gt, gk = f_torch(), f_triton()
    ref = layer_norm_per_example_reference(x.detach(), w.detach(), b.detach(), EPS, dy)
    err_dx = _rel(gk[0], gt[0])
    err_sq = max(_rel(gk[3][:, 0], ref[4]), _rel(gk[3][:, 1], ref[5]))
    del gt, gk, ref
    t_a = time_us(f_torch, warmup, steps, flush)
    t_b = time_us(f_triton, warmup, steps, flush)
    t_c = time_us(f_torch_pe, warmup, steps, flush)
    g_a = graph_time_us(f_torch, steps, flush)
    g_b = graph_time_us(f_triton, steps, flush)
    s_a = stream_time_us(f_torch, steps, flush)
    s_b = stream_time_us(f_triton, steps, flush)
    nbytes = 5 * M * N * x.element_size()
    return dict(
        graph_torch_us=g_a, graph_triton_us=g_b, graph_ratio=g_b / g_a,
        graph_triton_gbps=nbytes / (g_b * 1e-6) / 1e9,
        stream_torch_us=s_a, stream_triton_us=s_b, stream_ratio=s_b / s_a,
        stream_triton_gbps=nbytes / (s_b * 1e-6) / 1e9,
        B=BATCH, T=SEQ, rows=M, torch_us=t_a, triton_us=t_b, torch_pe_us=t_c, ratio_triton_torch=t_b / t_a,
        ratio_torch_pe_torch=t_c / t_a, bytes=nbytes, triton_gbps=nbytes / (t_b * 1e-6) / 1e9,
        torch_gbps=nbytes / (t_a * 1e-6) / 1e9, rel_err_dx=err_dx, rel_err_sq=err_sq,
    )


def run(cfg) -> pd.DataFrame:
    """Time (a) PyTorch, (b) Triton with per-example norms, (c) plain-PyTorch per-example; print and save."""
    device = _device(getattr(cfg, "device", "auto"))
    steps = int(getattr(cfg, "steps", 20) or 20)
    warmup = int(getattr(cfg, "warmup", 5) or 5)
    out_path = Path(getattr(cfg, "out", None) or DEFAULT_OUT)
    import triton

    from gnsrepro.kernels import layer_norm as K

    props = torch.cuda.get_device_properties(device)
    meta = {
        "device_name": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "pdl": K.PDL,
    }
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    copy_gbps = copy_bandwidth_gbps(device)
    meta["graph_launch_us"] = graph_launch_us(device, flush)
    rows = []
    for dname, dtype in DTYPES.items():
        for N in SIZES:
            r = _bench_one(device, dtype, N, warmup, steps, flush)
            # the backward's launch configuration at this size (the table in gnsrepro.kernels.layer_norm)
            bwd = {f"bwd_{k}": v for k, v in K._bwd_config(K._next_pow2(N), dtype.itemsize)._asdict().items()}
            rows.append(dict(N=N, dtype=dname, **r, copy_gbps=copy_gbps, pct_copy=100 * r["triton_gbps"] / copy_gbps,
                             steps=steps, **bwd, **meta))
    df = pd.DataFrame(rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out_path, index=False)
    print(format_table(df))
    print(f"written: {out_path}")
    return df


def format_table(df: pd.DataFrame) -> str:
    m = df.iloc[0]
    lines = [
        f"LayerNorm forward+backward, {int(m['B'])}x{int(m['T'])} rows; {m.device_name}; torch {m.torch}, "
        f"triton {m.triton}; {m.date}",
        f"copy bandwidth {m.copy_gbps:.0f} GB/s (1 GiB device copy, read+write); bytes counted 5*M*N*b "
        "(fwd: read x, write y; bwd: read x, dy, write dx)",
        "(a) F.layer_norm  (b) Triton + per-example norms  (c) plain-PyTorch per-example; median µs, each call "
        "after an L2 flush",
        "  a, b, c: eager (host overhead included); gA, gB: replayed from a CUDA graph, timed from before its "
        f"launch (a graph of one tiny kernel: {m.graph_launch_us:.1f} µs);",
        "  sA, sB: device time in the stream right after another kernel, as in a training step (graphs of "
        "flush + call less flush alone)",
        f"{'N':>6} {'dtype':>5} {'a_us':>8} {'b_us':>8} {'c_us':>8} {'b/a':>6} {'c/a':>6} "
        f"{'gA_us':>7} {'gB_us':>7} {'gB/gA':>6} {'gB%copy':>7} {'sA_us':>7} {'sB_us':>7} {'sB/sA':>6} "
        f"{'sB%copy':>7} {'err_dx':>8} {'err_sq':>8}",
    ]
    for r in df.itertuples():
        lines.append(
            f"{r.N:>6} {r.dtype:>5} {r.torch_us:8.1f} {r.triton_us:8.1f} {r.torch_pe_us:8.1f} "
            f"{r.ratio_triton_torch:6.2f} {r.ratio_torch_pe_torch:6.2f} "
            f"{r.graph_torch_us:7.1f} {r.graph_triton_us:7.1f} {r.graph_ratio:6.2f} "
            f"{100 * r.graph_triton_gbps / r.copy_gbps:7.1f} {r.stream_torch_us:7.1f} {r.stream_triton_us:7.1f} "
            f"{r.stream_ratio:6.2f} {100 * r.stream_triton_gbps / r.copy_gbps:7.1f} "
            f"{r.rel_err_dx:8.1e} {r.rel_err_sq:8.1e}"
        )
    return "\n".join(lines)
