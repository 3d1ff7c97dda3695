"""LayerNorm tuning tools: the experiments behind the Triton kernel's launch table (not a product feature).

Run from the repository root on a GPU machine (benchmarks/gpu_session.sh has a stage for each):
  python -m benchmarks.tuning.layernorm --sweep [--write-table PATH]   forward and backward launchers over
        (BLOCK_M, num_warps[, programs per SM, tail reduction]); --write-table writes the launch table with
        the fastest configuration of each entry the sweep covered and its provenance (write_sweep_table);
  ... --sweep-bwd     the backward's whole configuration (loads in flight, stages, register cap), two phases;
  ... --variants      forward + backward with and without the tail reduction, its middle level and PDL;
  ... --diagnose      host overheads, per-kernel CUDA times, the benchmark's graph against the launchers;
  ... --fixed-costs   each kernel's fixed cost and steady rate against PyTorch's copy and add.
With no mode it runs `gnsrepro bench layernorm`'s table. The timing helpers, test cases and constants are
the product benchmark's (gnsrepro.benchmarks.layernorm, imported as `bench`): the same numbers by the same
clocks. The launch table itself is package data, gnsrepro/kernels/launch_table.json, loaded and checked by
gnsrepro.kernels.layer_norm.load_launch_table; docs/benchmarks.md has the commands and what they printed.
"""

from __future__ import annotations

import copy
import datetime
import functools
import itertools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gnsrepro.benchmarks import layernorm as bench


def _gpu() -> tuple[torch.device, torch.Tensor, int]:
    """The CUDA device, a 256 MB buffer whose zeroing flushes L2 between timed calls, and its SM count."""
    device = bench._device("auto")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    return device, flush, torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1)
def _bwd_inputs(device: str, dname: str, N: int, batch: int, seq: int):
    """(x, w, b, dy, stats) of one benchmark case, detached: what a backward configuration runs on."""
    from gnsrepro.kernels import layer_norm as K

    x, w, b, dy, _ = bench._cases(torch.device(device), bench.DTYPES[dname], N, batch=batch, seq=seq)
    x, w, b = x.detach(), w.detach(), b.detach()
    return x, w, b, dy, K.layer_norm_forward(x, w, b, bench.EPS)[1]


def _compile_bwd(task: tuple) -> Optional[str]:
    """Run one backward configuration once, so that Triton compiles it into its on-disk cache.

    task = (device, dtype name, N, batch, seq, launcher keyword arguments); returns None, or the error.
    """
    from gnsrepro.kernels import layer_norm as K

    device, dname, N, batch, seq, cfg = task
    x, w, b, dy, stats = _bwd_inputs(device, dname, N, batch, seq)
    try:
        K.layer_norm_backward(dy, x, w, b, stats, **cfg)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported to the caller, which skips the configuration
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def precompile_bwd(tasks: list[tuple], jobs: int) -> list[Optional[str]]:
    """_compile_bwd over `tasks` in `jobs` processes: compiling dozens of variants one after another
    takes minutes of a GPU machine's time, and the timing loop then loads them from Triton's cache.

    jobs <= 1: nothing is compiled ahead (the timing loop compiles as it goes); returns no errors.
    """
    if jobs <= 1 or not tasks:
        return [None] * len(tasks)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from benchmarks.tuning import layernorm as this  # importable by the workers under this name

    t0 = time.perf_counter()
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = list(pool.map(this._compile_bwd, tasks))
    print(f"compiled {len(tasks)} configurations in {time.perf_counter() - t0:.0f} s ({jobs} processes)", flush=True)
    return errors


def sweep(
    sizes=bench.SIZES, dtypes=("bf16", "fp32"), steps: int = 15, out: Optional[str] = None,
    per_sms=(1, 2, 4), kinds=("fwd", "bwd"),
) -> pd.DataFrame:
    """Time forward and backward launchers over (BLOCK_M, num_warps[, programs per SM]); print the best.

    Device time (CUDA-graph replay): at small N a launcher's Python costs more than its kernel.
    """
    device, flush, nsm = _gpu()
    rows = []
    for dname in dtypes:
        for N in sizes:
            here = _sweep_one(device, dname, N, steps, flush, nsm, per_sms, kinds)
            for kind, gk in pd.DataFrame(here).groupby("kind"):
                top = gk.nsmallest(4, "us")
                desc = "; ".join(
                    f"bm={r.block_m} nw={r.num_warps} sm={r.per_sm}{' tail' if r.tail else ''}"
                    f": {r.us:.1f}" for r in top.itertuples()
                )
                print(f"best {kind} {dname} N={N}: {desc}", flush=True)
            rows += here
            if out:
                pd.DataFrame(rows).to_csv(out, index=False)
    return pd.DataFrame(rows)


def _sweep_one(device, dname: str, N: int, steps: int, flush, nsm: int, per_sms, kinds) -> list[dict]:
    import triton

    from gnsrepro.kernels import layer_norm as K

    x, w, b, dy, _ = bench._cases(device, bench.DTYPES[dname], N)
    x, w, b = x.detach(), w.detach(), b.detach()
    block_n = triton.next_power_of_2(N)
    _, stats, _ = K.layer_norm_forward(x, w, b, bench.EPS)

    def fwd(bm, nw):
        return lambda: K.layer_norm_forward(x, w, b, bench.EPS, block_m=bm, num_warps=nw)

    def bwd(bm, nw, per_sm, tail):
        return lambda: K.layer_norm_backward(
            dy, x, w, b, stats, block_m=bm, num_warps=nw, target_programs=nsm * per_sm, tail_reduce=tail
        )

    here = []
    for bm in (1, 2, 4, 8, 16):
        for nw in (1, 2, 4, 8, 16, 32):
            per_thread = bm * block_n // (32 * nw)
            if bm * block_n > 16384 or per_thread < 4 or per_thread > 32:
                continue
            cfg = dict(N=N, dtype=dname, block_m=bm, num_warps=nw)
            if "fwd" in kinds:
                try:
                    t = bench.graph_time_us(fwd(bm, nw), steps, flush)
                    here.append(dict(kind="fwd", per_sm=0, tail=False, us=t, **cfg))
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print("fwd fail", cfg, type(e).__name__, flush=True)
            if "bwd" not in kinds or bm * block_n > 8192:
                continue
            for per_sm in per_sms:
                for tail in (False, True):
                    if tail and K._bwd_launch(
                        bench.BATCH, bench.SEQ, N, True, nsm * per_sm, bm, nw, True
                    ).reduce is not None:
                        continue  # the tail reduction does not apply here (too much for one program)
                    try:
                        t = bench.graph_time_us(bwd(bm, nw, per_sm, tail), steps, flush)
                    except Exception as e:  # noqa: BLE001
                        print("bwd fail", cfg, type(e).__name__, flush=True)
                        continue
                    here.append(dict(kind="bwd", per_sm=per_sm, tail=tail, us=t, **cfg))
    return here


# how the backward keeps loads in flight: (depth, stages, maxnreg) — 1 or 2 tiles ahead in registers, or
# the compiler's pipeline through shared memory in 2-4 stages, with or without a cap of 128 registers
_BWD_LOADS = ((1, 0, 0), (2, 0, 0), (1, 2, 0), (1, 3, 0), (1, 4, 0), (1, 3, 128), (1, 4, 128))


def _time_bwd(case: tuple, cfgs: list[dict], phase: int, nsm: int, steps: int, flush, jobs: int) -> list[dict]:
    """One row per backward configuration of `case` (_bwd_inputs' arguments): its CUDA-graph time, NaN when
    it fails to compile or run."""
    from gnsrepro.kernels import layer_norm as K

    _, dname, N, _, _ = case
    x, w, b, dy, stats = _bwd_inputs(*case)
    rows = []
    for cfg, err in zip(cfgs, precompile_bwd([(*case, c) for c in cfgs], jobs)):
        us = float("nan")
        try:
            if err:
                raise RuntimeError(err)
            us = bench.graph_time_us(lambda cfg=cfg: K.layer_norm_backward(dy, x, w, b, stats, **cfg), steps, flush)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is skipped
            print("fail", cfg, type(e).__name__, e, flush=True)
        rows.append(dict(N=N, dtype=dname, phase=phase, per_sm=cfg["target_programs"] // nsm, **cfg, us=us))
    return rows


def sweep_bwd(
    sizes=(768, 1024), dtypes=("bf16", "fp32"), steps: int = 15, out: Optional[str] = None, top: int = 4,
    jobs: int = 1,
):
    """Backward launcher device time (CUDA graph) over its whole configuration, in two phases per size.

    Phase 1, at 2 programs per SM with the reduce kernel: rows per tile × warps × how loads are kept in
    flight (_BWD_LOADS). Phase 2: the `top` fastest of phase 1 at 1-4 programs per SM, with the reduce
    kernel and with the tail reduction. Prints the best of each phase. jobs > 1 compiles each phase's
    configurations in that many processes first (precompile_bwd).
    """
    from gnsrepro.kernels import layer_norm as K

    device, flush, nsm = _gpu()
    rows = []
    for dname in dtypes:
        for N in sizes:
            bn = K._next_pow2(N)
            case = (str(device), dname, N, bench.BATCH, bench.SEQ)
            cfgs = [
                dict(block_m=bm, num_warps=nw, depth=depth, stages=stages, maxnreg=maxnreg, tail_reduce=False,
                     target_programs=2 * nsm)
                for bm in (1, 2, 4, 8) for nw in (1, 2, 4, 8, 16)
                if bm * bn <= 8192 and 4 <= bm * bn // (32 * nw) <= 32
                for depth, stages, maxnreg in _BWD_LOADS
            ]
            phase1 = _time_bwd(case, cfgs, 1, nsm, steps, flush, jobs)
            best = pd.DataFrame(phase1).nsmallest(top, "us")
            print(f"phase 1 {dname} N={N}:", flush=True)
            print(best[["block_m", "num_warps", "depth", "stages", "maxnreg", "us"]].to_string(index=False), flush=True)
            cfgs = [
                dict(block_m=int(r.block_m), num_warps=int(r.num_warps), depth=int(r.depth), stages=int(r.stages),
                     maxnreg=int(r.maxnreg), tail_reduce=tail, target_programs=per_sm * nsm)
                for r in best.itertuples() for per_sm in (1, 2, 3, 4) for tail in (False, True)
            ]
            phase2 = _time_bwd(case, cfgs, 2, nsm, steps, flush, jobs)
            rows += phase1 + phase2
            cols = ["block_m", "num_warps", "depth", "stages", "maxnreg", "per_sm", "tail_reduce", "us"]
            print(f"phase 2 {dname} N={N}:", flush=True)
            print(pd.DataFrame(phase2).nsmallest(top, "us")[cols].to_string(index=False), flush=True)
            if out:
                pd.DataFrame(rows).to_csv(out, index=False)
    _bwd_inputs.cache_clear()
    return pd.DataFrame(rows)


def variants(
    sizes=bench.SIZES, dtypes=("bf16", "fp32"), steps: int = 20, per_sms=(1, 2), out: Optional[str] = None,
    subs=(0, -1), pdls=(False, True), stages=(None,), tail_rows=(0,),
):
    """Forward + backward device time (CUDA graph) of the tuned launch configuration, with and without
    the backward's tail reduction (over two levels, and three where that differs) and programmatic
    dependent launch, at 1 and 2 backward programs per SM. subs: the tail reduction's programs per
    subgroup to try (0: two levels; -1: the launcher's choice; each only where it applies); stages:
    the backward's pipeline stages to try (None: the table's; 0: loads in registers); tail_rows: the
    tail reduction's partial rows per load to try (0: the launcher's). Each line also gives the registers
    and spills per thread of the backward kernel it ran (-1: unknown).

    The experiment behind the tail columns of _BWD_CONFIG and the PDL default. As in
    `gnsrepro bench layernorm`, y stays allocated through the backward (dx does not take its memory).
    """
    from gnsrepro.kernels import layer_norm as K

    device, flush, _ = _gpu()
    copy_gbps = bench.copy_bandwidth_gbps(device)
    saved = K.PDL
    rows = []
    regs: dict = {}  # (registers, spills) per thread of the backward kernel each launch compiled to
    try:
        for dname in dtypes:
            for N in sizes:
                rows += _variants_one(
                    device, dname, N, steps, flush, per_sms, copy_gbps, subs, pdls, stages, tail_rows, regs
                )
                if out:
                    pd.DataFrame(rows).to_csv(out, index=False)
    finally:
        K.PDL = saved
    return pd.DataFrame(rows)


def _variants_one(
    device, dname: str, N: int, steps: int, flush, per_sms, copy_gbps: float, subs, pdls, stages_opts,
    tail_rows_opts=(0,), regs: Optional[dict] = None,
) -> list[dict]:
    from gnsrepro.kernels import layer_norm as K

    x, w, b, dy, _ = bench._cases(device, bench.DTYPES[dname], N)
    x, w, b = x.detach(), w.detach(), b.detach()
    nsm = torch.cuda.get_device_properties(device).multi_processor_count
    cfg = K._bwd_config(K._next_pow2(N), x.element_size())
    bm, nw = cfg.block_m, cfg.num_warps
    nbytes = 5 * x.numel() * x.element_size()

    def fwd_bwd(**kw):
        def f():
            y, stats, _ = K.layer_norm_forward(x, w, b, bench.EPS)
            return y, K.layer_norm_backward(dy, x, w, b, stats, **kw)

        return f

    here = []
    regs = {} if regs is None else regs  # a kernel compiled for an earlier size is not compiled again
    stages_opts = dict.fromkeys(cfg.stages if st is None else st for st in stages_opts)  # the table's, once
    for per_sm, st in itertools.product(per_sms, stages_opts):
        # the reduce kernel, then the tail reduction with each of `subs` (a middle level only where it applies)
        seen = set()
        tails = [(True, s, r) for s in subs for r in tail_rows_opts]
        for tail, sub, t_rows in [(False, 0, 0)] + tails:
            plan = K._bwd_launch(bench.BATCH, bench.SEQ, N, True, nsm * per_sm, bm, nw, tail, 1, 0, None, sub, t_rows)
            if tail and plan.reduce is not None:
                continue  # too much for one program: the launcher falls back to the reduce kernel
            block_r = plan.main["BLOCK_R"] if tail else 0
            if (tail, plan.SG, block_r) in seen:
                continue  # the same launch as a row above (no middle level at this shape)
            seen.add((tail, plan.SG, block_r))
            for pdl in pdls:
                K.PDL = pdl
                fn = fwd_bwd(target_programs=nsm * per_sm, tail_reduce=tail, tail_sub=sub, stages=st, tail_rows=t_rows)
                before = _compiled(K._layer_norm_bwd_kernel)
                us = bench.graph_time_us(fn, steps, flush)
                # what selects the backward's compiled kernel here: its dtype and constexprs
                key = (dname, K._next_pow2(N), tail, plan.NSG > 0, block_r, st, pdl)
                new = [k for i, k in _compiled(K._layer_norm_bwd_kernel).items() if i not in before]
                if len(new) == 1:
                    regs[key] = (getattr(new[0], "n_regs", -1), getattr(new[0], "n_spills", -1))
                n_regs, n_spills = regs.get(key, (-1, -1))
                pct = 100 * nbytes / (us * 1e-6) / 1e9 / copy_gbps
                levels = (3 if plan.NSG else 2) if tail else 0
                here.append(dict(N=N, dtype=dname, per_sm=per_sm, stages=st, tail=tail, tail_levels=levels,
                                 tail_sub=plan.SG, tail_rows=block_r, pdl=pdl, us=us, pct_copy=pct, regs=n_regs,
                                 spills=n_spills))
                print(f"{dname:4s} N={N:5d} per_sm={per_sm} stages={st} tail={tail!s:5s} levels={levels} "
                      f"sub={plan.SG:2d} rows={block_r:2d} pdl={pdl!s:5s} {us:8.1f} µs {pct:5.1f}% of copy "
                      f"(bwd regs {n_regs}, spills {n_spills})", flush=True)
    return here


def _compiled(kernel) -> dict:
    """id -> compiled kernel, for every specialisation of a Triton kernel compiled so far in this process
    (Triton's own per-device caches; empty where they are not there)."""
    out = {}
    for caches in getattr(kernel, "device_caches", {}).values():
        out.update((id(k), k) for k in caches[0].values())
    return out


def _host_us(fn, iters: int = 200) -> float:
    """Host time per call while the GPU keeps up (tiny tensors): Python + launch overhead."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return t


def host_overheads(device) -> dict:
    """Host µs per call of each layer on tiny tensors (the GPU keeps up, so this is Python + launches)."""
    from gnsrepro.kernels import layer_norm as K

    x = torch.randn(4, 8, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(768, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(768, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    sink = torch.zeros(4, 2, device=device, requires_grad=True)
    y0, stats, _ = K.layer_norm_forward(x.detach(), w.detach(), b.detach(), bench.EPS)

    class Identity(torch.autograd.Function):  # autograd's own cost, no kernels
        @staticmethod
        def forward(ctx, x, w, b, sink):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, dy):
            return dy, None, None, None

    fns = {
        "torch.empty": lambda: torch.empty(4, 8, 768, device=device),
        "tensor.sum(-1)": lambda: stats.sum(-1),
        "empty autograd.Function fwd+bwd": lambda: torch.autograd.grad(Identity.apply(x, w, b, sink), (x,), dy),
        "F.layer_norm fwd+bwd": lambda: torch.autograd.grad(F.layer_norm(x, (768,), w, b, bench.EPS), (x, w, b), dy),
        "triton Function fwd+bwd": lambda: torch.autograd.grad(
            K.layer_norm_per_example(x, w, b, bench.EPS, sink), (x, w, b, sink), dy
        ),
        "triton custom op fwd+bwd": lambda: torch.autograd.grad(
            K.layer_norm_per_example_op(x, w, b, bench.EPS, sink), (x, w, b, sink), dy
        ),
        "layer_norm_forward launcher": lambda: K.layer_norm_forward(x, w, b, bench.EPS),
        "layer_norm_backward launcher": lambda: K.layer_norm_backward(dy, x, w, b, stats),
        "fwd kernel launch only": lambda: K._layer_norm_fwd_kernel[(8,)](
            x, x, x, w, b, y0, stats, 32, 768, bench.EPS, HAS_RES=False, HAS_BIAS=True, BLOCK_M=4, BLOCK_N=1024,
            DOWNCAST=False, USE_PDL=False, num_warps=4,
        ),
    }
    out = {name: _host_us(fn) for name, fn in fns.items()}
    # the autograd engine runs CUDA backward passes on a device thread: the same two calls with the
    # backward on the calling thread show what that hand-over costs (a Python backward needs the GIL there)
    with torch.autograd.set_multithreading_enabled(False):
        for name in ("F.layer_norm fwd+bwd", "triton Function fwd+bwd"):
            out[name + ", same thread"] = _host_us(fns[name])
    return out


def diagnose(cases=((768, "bf16"), (4096, "bf16"), (4096, "fp32"))) -> None:
    """Host overhead of each layer (tiny tensors), then per-kernel CUDA times at the benchmark shape, and
    the benchmark's graph of forward + backward through autograd against the launchers alone."""
    from gnsrepro.kernels.layer_norm import layer_norm_per_example

    device, flush, _ = _gpu()
    for name, us in host_overheads(device).items():
        print(f"host {name:32s} {us:8.1f} µs/call", flush=True)
    one = torch.zeros(1, device=device)
    launch_us = bench.graph_launch_us(device, flush)
    kernel_us = _profiled_us(bench.capture(lambda: one.add_(1)), flush)
    print(f"graph of one tiny kernel: {launch_us:.1f} µs by events (graph_launch_us), the "
          f"kernel itself {kernel_us:.2f} µs (torch.profiler)", flush=True)
    for N, dname in cases:
        x, w, b, dy, sink = bench._cases(device, bench.DTYPES[dname], N)

        def f(x=x, w=w, b=b, dy=dy, sink=sink):
            y = layer_norm_per_example(x, w, b, bench.EPS, sink)
            return torch.autograd.grad(y, (x, w, b, sink), dy)

        for _ in range(3):
            f()
        torch.cuda.synchronize()
        prof = _profile(f)
        print(f"--- N={N} {dname}: back-to-back {_host_us(f, 20):.1f} µs/iter enqueue (GPU-bound if ≈ GPU sum)")
        _print_kernels(prof)
        _graph_paths(f, x, w, b, dy, flush)


def _profile(fn: Callable[[], object], replays: int = 10):
    """torch.profiler's CUDA events of `replays` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            fn()
        torch.cuda.synchronize()
    return prof


def _profiled_us(graph: torch.cuda.CUDAGraph, flush: torch.Tensor, replays: int = 10) -> float:
    """Sum of the durations of a graph's kernels per replay (torch.profiler), each replay after an L2 flush:
    the kernels of flush and replay, less those of the flush alone."""

    def total(fn) -> float:
        return sum(getattr(e, "device_time_total", 0) for e in _profile(fn, replays).key_averages()) / replays

    return total(lambda: (flush.zero_(), graph.replay())) - total(flush.zero_)


def _print_kernels(prof, top: int = 5) -> None:
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))[:top]:
        dt = getattr(e, "device_time_total", 0) / max(e.count, 1)
        print(f"   {e.key[:60]:60s} n={e.count:3d} {dt:8.1f} µs")


def _graph_paths(f_autograd, x, w, b, dy, flush, rounds: int = 3, steps: int = 50) -> None:
    """The benchmark's CUDA-graph time of forward + backward through autograd (gB) against the same
    launchers called directly, alternated, then each graph's kernels (profiled replays, L2 flushed); last,
    graph, kernel-duration and in-stream times of the autograd call and of F.layer_norm's."""
    from gnsrepro.kernels import layer_norm as K

    xd, wd, bd = x.detach(), w.detach(), b.detach()

    def f_launchers():
        _, stats, _ = K.layer_norm_forward(xd, wd, bd, bench.EPS)
        return K.layer_norm_backward(dy, xd, wd, bd, stats)

    graphs = {"autograd": bench.capture(f_autograd), "launchers": bench.capture(f_launchers)}
    for r in range(rounds):
        times = {name: bench.time_us(g.replay, 2, steps, flush) for name, g in graphs.items()}
        print(f"   graph round {r}: " + "  ".join(f"{k} {v:6.1f} µs" for k, v in times.items()), flush=True)
    for name, g in graphs.items():
        print(f"   kernels of the {name} graph (10 replays, each after an L2 flush):")
        _print_kernels(_profile(lambda g=g: (flush.zero_(), g.replay())))
    f_torch = bench._torch_fwd_bwd(x, w, b, dy)
    for name, fn, g in (("triton, autograd", f_autograd, graphs["autograd"]), ("F.layer_norm", f_torch, None)):
        g = g or bench.capture(fn)
        graph_us, kernels_us = bench.time_us(g.replay, 2, steps, flush), _profiled_us(g, flush)
        print(f"   {name}: graph {graph_us:.1f} µs (gA, gB), its kernels' durations {kernels_us:.1f} µs, in the stream "
              f"{bench.stream_time_us(fn, steps, flush):.1f} µs (sA, sB)", flush=True)


def fixed_costs(
    sizes=(768,), dtypes=("bf16",), seqs=(512, 2048, 8192), steps: int = 30, out: Optional[str] = None,
) -> pd.DataFrame:
    """Where a small LayerNorm's time goes, by rows (bench.BATCH examples of T rows for each T in seqs).

    Device time (CUDA graph, L2 flushed) of the forward, the backward, and the backward's main kernel
    alone (``partials_only``: no reduction after its loop), against PyTorch's copy (reads one tensor,
    writes one: the forward's bytes) and add (reads two, writes one: the backward's) of the same
    tensors, and the forward + backward against copy + add in one graph. A least-squares line over the
    row counts splits each into a fixed cost (the intercept, µs) and a steady rate (the slope, as % of
    the 1 GiB copy bandwidth).
    """
    import numpy as np

    device, flush, _ = _gpu()
    copy_gbps = bench.copy_bandwidth_gbps(device)
    tensors = {"copy": 2, "add": 3, "copy+add": 5, "fwd": 2, "bwd": 3, "bwd main": 3, "fwd+bwd": 5}
    rows = []
    for dname in dtypes:
        for N in sizes:
            here = []
            for T in seqs:
                times = _fixed_cost_times(device, dname, N, T, steps, flush)
                here.append(dict(N=N, dtype=dname, T=T, rows=bench.BATCH * T, **times))
                print(f"{dname} N={N} rows={bench.BATCH * T:6d}: " + " ".join(f"{k} {v:.1f}" for k, v in times.items()),
                      flush=True)
            df = pd.DataFrame(here)
            if len(df) > 1:
                for k, n in tensors.items():
                    slope, icpt = np.polyfit(df.rows, df[k], 1)
                    rate = n * N * bench.DTYPES[dname].itemsize / (slope * 1e-6) / 1e9  # bytes per row / µs per row
                    print(f"  {dname} N={N} {k:9s} fixed {icpt:5.1f} µs  steady {100 * rate / copy_gbps:5.1f}% of copy",
                          flush=True)
                    df[f"{k} fixed_us"] = icpt
                    df[f"{k} steady_pct"] = 100 * rate / copy_gbps
            rows.append(df)
    result = pd.concat(rows, ignore_index=True)
    if out:
        result.to_csv(out, index=False)
    return result


def _fixed_cost_times(device, dname: str, N: int, T: int, steps: int, flush) -> dict:
    """fixed_costs' device times (µs) at bench.BATCH examples of T rows."""
    from gnsrepro.kernels import layer_norm as K

    x, w, b, dy, _ = bench._cases(device, bench.DTYPES[dname], N, seq=T)
    x, w, b = x.detach(), w.detach(), b.detach()
    out = torch.empty_like(x)
    y, stats, _ = K.layer_norm_forward(x, w, b, bench.EPS)

    def fwd_bwd():
        y2, st, _ = K.layer_norm_forward(x, w, b, bench.EPS)
        return y2, K.layer_norm_backward(dy, x, w, b, st)

    fns = {
        "copy": lambda: out.copy_(x),
        "add": lambda: torch.add(x, dy, out=out),
        "copy+add": lambda: (out.copy_(x), torch.add(x, dy, out=out)),
        "fwd": lambda: K.layer_norm_forward(x, w, b, bench.EPS),
        "bwd": lambda: K.layer_norm_backward(dy, y, w, b, stats),
        "bwd main": lambda: K.layer_norm_backward(dy, y, w, b, stats, partials_only=True),
        "fwd+bwd": fwd_bwd,
    }
    return {k: bench.graph_time_us(f, steps, flush) for k, f in fns.items()}


def _int_list(text: str) -> tuple[int, ...]:
    """argparse type: "1,2,3" -> (1, 2, 3)."""
    return tuple(int(v) for v in text.split(","))


def _stages_list(text: str) -> tuple[Optional[int], ...]:
    """argparse type: "table,0,3" -> (None, 0, 3); "table" is the launch table's own stages."""
    return tuple(None if v == "table" else int(v) for v in text.split(","))


# --------------------------------------------------------------------------------------------------
# The launch table from a sweep, with its provenance (gnsrepro/kernels/launch_table.json)
# --------------------------------------------------------------------------------------------------

# the fields of each table that sweep() varies; the others keep the table's values (which the sweep ran with)
SWEPT_FIELDS = {"fwd": ("forward", ("block_m", "num_warps")),
                "bwd": ("backward", ("block_m", "num_warps", "per_sm", "tail"))}


def table_from_sweep(df: pd.DataFrame, table: dict, source_name: str, source: dict) -> dict:
    """`table` (a launch_table.json's content) with each entry that sweep()'s rows `df` cover set to the fastest.

    One entry serves every hidden size N with its BLOCK_N (next power of two) and bytes per element, so the
    fastest is the configuration with the least total time over the entry's swept (N, dtype) cases, among those
    timed (finite) at every one of them; ties go to the first in sorted order. Only SWEPT_FIELDS change; their
    chosen_by names `source_name`, whose description `source` gets "measured": per case, the chosen
    configuration's time and, where another was faster there, that one's. Sources no entry names any more are
    dropped. Cases with BLOCK_N below 1024 (the launcher's rule, not the table) are left out.
    """
    new = copy.deepcopy(table)
    measured = []
    entries = {name: {(e["block_n"], e["bytes"]): e for e in new[name]} for name in ("forward", "backward")}
    for kind, (name, fields) in SWEPT_FIELDS.items():
        rows = df[(df["kind"] == kind) & df["us"].notna()] if len(df) else df
        if not len(rows):
            continue
        rows = rows.assign(block_n=[1 << max(int(n) - 1, 0).bit_length() for n in rows["N"]],
                           bytes=[bench.DTYPES[d].itemsize for d in rows["dtype"]])
        for (block_n, nbytes), group in rows.groupby(["block_n", "bytes"]):
            entry = entries[name].get((int(block_n), int(nbytes)))
            if entry is None:
                print(f"(--write-table: {name} at BLOCK_N={block_n} is the launcher's rule, not the table's)")
                continue
            cases = group.groupby(["N", "dtype"]).ngroups
            timed = group.groupby(list(fields))["us"].agg(["sum", "count"])
            timed = timed[timed["count"] == cases]
            if not len(timed):
                continue
            best = timed["sum"].idxmin()
            best = best if isinstance(best, tuple) else (best,)
            chosen = {f: (bool(v) if isinstance(entry[f], bool) else int(v)) for f, v in zip(fields, best)}
            entry.update(chosen)
            entry.setdefault("chosen_by", {}).update(dict.fromkeys(fields, source_name))
            for (N, dname), case in group.groupby(["N", "dtype"]):
                mine = case[(case[list(fields)] == pd.Series(chosen)).all(axis=1)]
                fastest = case.loc[case["us"].idxmin()]
                records = [(chosen, float(mine["us"].iloc[0]), True)]
                if fastest["us"] < records[0][1]:
                    records.append(({f: _plain(fastest[f]) for f in fields}, float(fastest["us"]), False))
                measured += [dict(table=name, block_n=int(block_n), bytes=int(nbytes), N=int(N), dtype=dname,
                                  config=config, us=round(us, 3), chosen=was_chosen)
                             for config, us, was_chosen in records]
    new["sources"][source_name] = dict(source, measured=measured)
    named = {s for name in ("forward", "backward") for e in new[name] for s in e.get("chosen_by", {}).values()}
    new["sources"] = {k: v for k, v in new["sources"].items() if k in named}
    return new


def _plain(value):
    """A pandas/numpy scalar as the JSON type it stands for."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else int(value)


def sweep_source(device: torch.device, command: str, commit: Optional[str] = None) -> tuple[str, dict]:
    """(name, description) of a sweep run here and now, for the launch table's "sources": the device, the date,
    the commit of the code measured (git's, or `commit` where git cannot tell, as from a wheel), the versions,
    the command and what its times are."""
    import triton

    from gnsrepro.provenance import code_version

    props = torch.cuda.get_device_properties(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head, dirty = (commit, None) if commit else code_version()
    if head is None:
        print("(--write-table: the commit of the code is not known here; pass --commit)", flush=True)
    name = f"sweep {props.name.removeprefix('NVIDIA ').split(' ')[0]} {date}"
    return name, dict(
        device=props.name, sms=props.multi_processor_count, date=date, commit=head, dirty=dirty,
        torch=torch.__version__, triton=triton.__version__, command=command,
        timing=f"each launcher alone, CUDA-graph replay after an L2 flush, median µs at {bench.BATCH} x "
        f"{bench.SEQ} rows (sweep)",
    )


def launch_table_json(table, indent: int = 0) -> str:
    """JSON text of a launch table: an object on one line where it fits in 118 characters, else a key a line;
    a list an element a line, each element (an entry, a measured record) on its one line, as in a table."""
    flat = json.dumps(table, ensure_ascii=False)
    pad = " " * (indent + 2)
    if isinstance(table, list) and table:
        return "[\n" + ",\n".join(pad + json.dumps(v, ensure_ascii=False) for v in table) + "\n" + " " * indent + "]"
    if not isinstance(table, dict) or not table or len(flat) + indent <= 118:
        return flat
    items = [f"{pad}{json.dumps(k)}: {launch_table_json(v, indent + 2)}" for k, v in table.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def write_sweep_table(df: pd.DataFrame, path, command: str, commit: Optional[str] = None) -> dict:
    """The package's launch table updated by sweep()'s rows (table_from_sweep), with this run's provenance
    (sweep_source), written to `path` after the kernel's own loader has checked it; returns the table."""
    from gnsrepro.kernels import layer_norm as K

    base = json.loads(K.LAUNCH_TABLE.read_text())
    table = table_from_sweep(df, base, *sweep_source(bench._device("auto"), command, commit))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(launch_table_json(table) + "\n")
    try:
        K.load_launch_table(tmp)
    except ValueError:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    print(f"written: {path}")
    return table


def main(argv: Optional[list[str]] = None) -> None:
    """The command line (the module's docstring lists the modes)."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--variants", action="store_true", help="tail reduction and PDL on/off, fwd+bwd device time")
    p.add_argument("--sweep-bwd", action="store_true", help="the backward's whole configuration, two phases")
    p.add_argument("--fixed-costs", action="store_true",
                   help="fixed cost and steady rate of each kernel, against PyTorch's copy and add, over row counts")
    p.add_argument("--seqs", type=_int_list, default=(512, 2048, 8192), help="--fixed-costs: rows per example")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--sizes", type=_int_list, default=bench.SIZES, help="hidden sizes, comma-separated")
    p.add_argument("--dtypes", default="bf16,fp32", help="--sweep-bwd, --variants: dtypes, comma-separated")
    p.add_argument("--jobs", type=int, default=1, help="--sweep-bwd: processes that compile the configurations first")
    p.add_argument("--subs", type=_int_list, default=(0, -1),
                   help="--variants: tail reduction's programs per subgroup, comma-separated (0: two levels; -1: auto)")
    p.add_argument("--per-sms", type=_int_list, default=(1, 2),
                   help="--variants: backward programs per SM, comma-separated")
    p.add_argument("--pdls", type=_int_list, default=(0, 1),
                   help="--variants: programmatic dependent launch off (0) / on (1)")
    p.add_argument("--stages", type=_stages_list, default=(None,),
                   help="--variants: the backward's pipeline stages (table, 0, 3, ...)")
    p.add_argument("--tail-rows", type=_int_list, default=(0,),
                   help="--variants: the tail reduction's partial rows per load, comma-separated (0: the launcher's)")
    p.add_argument("--write-table", default=None, metavar="PATH",
                   help="--sweep: write the launch table with the sweep's choices and their provenance to PATH")
    p.add_argument("--commit", default=None,
                   help="--write-table: the commit of the code measured, where git cannot tell (a wheel install)")
    args = p.parse_args(argv)
    dtypes = tuple(args.dtypes.split(","))
    if unknown := set(dtypes) - set(bench.DTYPES):
        p.error(f"--dtypes: unknown {sorted(unknown)}; accepts {sorted(bench.DTYPES)}")
    if args.write_table and not (args.sweep and not (args.diagnose or args.fixed_costs or args.sweep_bwd
                                                     or args.variants)):
        p.error("--write-table: accepted with --sweep alone (the sweep chooses the table)")
    if args.write_table and not Path(args.write_table).parent.is_dir():
        p.error(f"--write-table: {args.write_table}'s directory does not exist")
    if args.diagnose:
        diagnose()
    elif args.fixed_costs:
        fixed_costs(sizes=args.sizes, dtypes=dtypes, seqs=args.seqs, out=args.out)
    elif args.sweep_bwd:
        sweep_bwd(sizes=args.sizes, dtypes=dtypes, out=args.out, jobs=args.jobs)
    elif args.variants:
        variants(
            sizes=args.sizes, dtypes=dtypes, out=args.out, subs=args.subs, per_sms=args.per_sms,
            pdls=tuple(bool(v) for v in args.pdls), stages=args.stages, tail_rows=args.tail_rows,
        )
    elif args.sweep:
        df = sweep(sizes=args.sizes, out=args.out or os.environ.get("SWEEP_OUT"))
        if args.write_table:
            command = shlex.join(["python", "-m", "benchmarks.tuning.layernorm", *argv])
            write_sweep_table(df, args.write_table, command, args.commit)
    else:
        bench.run(argparse.Namespace(device="auto", steps=args.steps, warmup=args.warmup, out=args.out))


if __name__ == "__main__":
    main()
