"""Training-step throughput: `gnsrepro bench train` (tokens/s, MFU) and `gnsrepro bench overhead`.

Both time the real training step (the model, per-example-norm layers and GNS tracker that `train`
uses) on random tokens, bf16 autocast and torch.compile by default, with CUDA synchronisation only
around the timed block. MFU counts 6N + 12·L·d·T FLOPs per token (GPT.flops_per_token) against the
device's dense bf16 peak.

`bench overhead` times each variant of OVERHEAD_VARIANTS (or those that variants= names) against gns=off
(time_overhead: interleaved rounds) in every situation, a (model, micro-batch, compile) of the lists models=,
micro_batch_sizes= and compiles= (an empty list: the single model=, micro_batch_size=, compile=;
`models=20M,111M` is bracketed by the CLI), one situation after another, memory and compiled graphs freed
between them. A situation that runs out of GPU memory is "OOM" in the table and the others go on. cuda_graphs=
applies to every situation (a situation's step is graphed where gnsrepro.train.use_cuda_graphs says so). At the
end it prints one table (rows: model, seq_len, micro-batch, compile, cuda_graphs; columns: gns=off's step time
and MFU, each variant's step time as a multiple of gns=off's, and the LayerNorm backend gns.ln_backend=auto
picks there) and, with out=, writes a parquet of one row per situation and variant:

  model, n_embd, seq_len, micro_batch_size, compile   the situation
  cuda_graphs         whether each step was replayed from a CUDA graph (gnsrepro.cuda_graphs)
  variant             an OVERHEAD_VARIANTS label: off, ln torch, ln triton, all simultaneous, all ghost,
                      "all torch linear", "all triton linear" (gns.linear_backend=torch, triton; "all
                      simultaneous" has auto's per-shape choice), "all simultaneous 16 MiB"
                      (gns.chunk_mb=16), "off torch loss" (gns=off with model.loss_kernel=torch in place of
                      auto's Triton loss) and "off flash attention" (gns=off with model.sdpa_backend=flash);
                      these four and ln triton on CUDA only
  status              "ok", or "OOM" when the situation ran out of GPU memory (its times NaN)
  step_time_s         median step time in seconds
  tokens_per_s        micro_batch_size * seq_len / step_time_s
  mfu                 model FLOPs utilisation (NaN off CUDA and for a GPU of unknown peak)
  relative_step_time  step_time_s / gns=off's in the same situation
  ln_backend_auto     the backend gns.ln_backend=auto picks in the situation (after record=true's update)
  steps, warmup, rounds                                 how it was timed
  device, torch, triton, date, git_commit, git_dirty    where, and with which code (gnsrepro.provenance)

record=true writes each situation's "ln torch" and "ln triton" step times into gnsrepro/kernels/ln_backend.csv
(replacing the rows of the same situations, cuda_graphs one of their keys): the measurements
gns.ln_backend=auto chooses by (gnsrepro.kernels.ln_backend).

The whole table on one GPU, every model of conf/model from 20M to 1.3B at the 111M recipe's micro-batch 8
and at 16 and 64, compiled and eager (a few hours, most of it compiling; a situation that does not fit
comes out "OOM"; rounds=1 holds one model at a time instead of five, for the largest):

    gnsrepro bench overhead models=20M,40M,70M,111M,161M,1.3B micro_batch_sizes=8,16,64 compiles=true,false \
        steps=60 rounds=5 warmup=5 record=true out=outputs/bench/overhead.parquet
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import statistics
import time
from datetime import date, datetime, timezone
from typing import NamedTuple

import torch

from gnsrepro.data.tokenizer import EOT
from gnsrepro.errors import ConfigError
from gnsrepro.train import build_step, peak_flops, resolve_dtype, use_cuda_graphs
from gnsrepro.train import step as step_once


class Variant(NamedTuple):
    """One column of `bench overhead`: a label and the settings it changes from gns=off's."""

    label: str
    mode: str  # gns.mode
    method: str = "auto"  # gns.method
    ln_backend: str = "auto"  # gns.ln_backend
    linear_backend: str = "auto"  # gns.linear_backend (the simultaneous method's Linear layers and head)
    loss_kernel: str = "auto"  # model.loss_kernel (auto, the default: the Triton loss on CUDA)
    sdpa_backend: str = "auto"  # model.sdpa_backend (auto, the default: cuDNN's attention first on a Hopper GPU)
    chunk_mb: int = 256  # gns.chunk_mb (the default: per-example gradients of at most 256 MiB a chunk)

    @property
    def cuda_only(self) -> bool:
        """A Triton kernel that the CPU runs only in the interpreter, or a backend, loss or attention kernel that on
        a CPU is auto's own (so the variant would time gns=off or "all simultaneous" again)."""
        return (self.ln_backend == "triton" or self.linear_backend != "auto" or self.loss_kernel != "auto"
                or self.sdpa_backend != "auto" or self.chunk_mb != 256)


OVERHEAD_VARIANTS = (
    Variant("off", "off"),
    Variant("ln torch", "ln", ln_backend="torch"),
    Variant("ln triton", "ln", ln_backend="triton"),
    Variant("all simultaneous", "all", "simultaneous"),  # gns.linear_backend=auto: by shape, as measured
    # every layer on the PyTorch path (batched matmul of the per-example gradients), the head included
    Variant("all torch linear", "all", "simultaneous", linear_backend="torch"),
    Variant("all ghost", "all", "ghost"),
    # every layer with the Triton weight-gradient kernel (gnsrepro/kernels/per_example_grad.py), which never
    # writes the per-example gradients that the torch path materialises (824 MB a micro-batch for the 20M head)
    Variant("all triton linear", "all", "simultaneous", linear_backend="triton"),
    # every layer with chunks of at most 16 MiB of per-example gradients, one example's sliced by rows, so that
    # each chunk can stay in the GPU's L2 between the matmul that writes it and the reductions that read it
    Variant("all simultaneous 16 MiB", "all", "simultaneous", chunk_mb=16),
    # not a GNS variant: gns=off with PyTorch's loss (inductor's, compiled) in place of the default's fused
    # cross-entropy kernels (gnsrepro/kernels/cross_entropy.py): what those save in the whole step
    Variant("off torch loss", "off", loss_kernel="torch"),
    # not a GNS variant either: gns=off with flash attention (model.sdpa_backend=flash) against auto's cuDNN
    # attention on a Hopper GPU
    Variant("off flash attention", "off", sdpa_backend="flash"),
)


def overhead_variants(cfg, device: torch.device) -> list[Variant]:
    """The OVERHEAD_VARIANTS that cfg.variants names (empty: all), gns=off first whether named or not (the
    baseline); the Triton ones only on CUDA. ConfigError, before any work, for a label that is not one."""
    known = {v.label: v for v in OVERHEAD_VARIANTS}
    unknown = [label for label in cfg.variants if label not in known]
    if unknown:
        raise ConfigError(f"variants: {unknown[0]!r} is not a variant; accepted: {', '.join(known)}")
    wanted = set(cfg.variants) | {"off"} if cfg.variants else set(known)
    return [v for v in OVERHEAD_VARIANTS if v.label in wanted and not (v.cuda_only and device.type != "cuda")]


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
                       micro_batch_size=cfg.micro_batch_size,
                       cuda_graphs=use_cuda_graphs(cfg.cuda_graphs, device, 1, cfg.model.dropout))
    tokens = min(cfg.model.vocab_size, EOT + 1)  # GPT-2's ids, or all of a smaller model's (data.vocab_limit)
    x = torch.randint(0, tokens, (cfg.micro_batch_size, seq_len), device=device)
    y = torch.randint(0, tokens, (cfg.micro_batch_size, seq_len), device=device)
    lr = OptimConfig().lr

    def step():
        step_once(parts, [(x, y)], cfg.micro_batch_size, lr)

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


def _check_cuda_graphs(cfg, device: torch.device) -> None:
    if str(cfg.cuda_graphs).lower() == "true" and device.type != "cuda":
        raise ConfigError("cuda_graphs=true needs a CUDA GPU; use cuda_graphs=auto, which captures only on one")


def bench_train(cfg) -> dict:
    device = _device(cfg)
    _check_cuda_graphs(cfg, device)
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


def model_config(name: str):
    """conf/model/<name>.yaml as a ModelConfig (gnsrepro.config.named_model), an unknown one named as models=."""
    from gnsrepro.config import named_model

    return named_model(name, setting="models")


def situations(cfg) -> list:
    """The situations bench overhead times: copies of cfg, one per (model, micro-batch, compile) of
    models x micro_batch_sizes x compiles in that order (each list's repeats dropped; an empty list stands for
    cfg's own model, micro_batch_size or compile), their list settings emptied. Raises ConfigError, before any
    work, for an unknown model, a micro-batch below 1, or a seq_len longer than a model's context."""
    models = [model_config(name) for name in dict.fromkeys(cfg.models)] or [cfg.model]
    micros = list(dict.fromkeys(cfg.micro_batch_sizes)) or [cfg.micro_batch_size]
    compiles = list(dict.fromkeys(cfg.compiles)) or [cfg.compile]
    key = "micro_batch_sizes" if cfg.micro_batch_sizes else "micro_batch_size"
    for micro in micros:
        if micro < 1:
            raise ConfigError(f"{key}={micro}: accepts positive integers (sequences per forward/backward)")
    out = []
    for model, micro, compile in itertools.product(models, micros, compiles):
        if cfg.seq_len is not None and cfg.seq_len > model.block_size:
            raise ConfigError(f"seq_len={cfg.seq_len} is longer than model {model.name}'s context "
                              f"model.block_size={model.block_size}")
        situation = copy.deepcopy(cfg)
        situation.model, situation.micro_batch_size, situation.compile = model, micro, compile
        situation.models, situation.micro_batch_sizes, situation.compiles = [], [], []
        out.append(situation)
    return out


def time_overhead(cfg, device: torch.device) -> list[dict]:
    """Step time of each OVERHEAD_VARIANTS entry in cfg's one situation: [{variant, step_time_s, tokens_per_s,
    mfu}], gns=off first.

    With cfg.rounds > 1 every variant is built and warmed up (compiled) first; then each of cfg.rounds
    rounds times cfg.steps // cfg.rounds steps of every variant, in an order rotated from round to
    round, so that a drift of the GPU's clocks over the minutes of the run falls on every variant
    alike. With rounds=1 the variants run one after another, one model in memory at a time (for
    models too large to hold five copies). A variant's step time is the median of its timed steps.
    """
    per_round = cfg.steps // cfg.rounds
    results = []

    def build(v: Variant):
        g = copy.deepcopy(cfg.gns)
        g.mode, g.method, g.ln_backend, g.linear_backend = v.mode, v.method, v.ln_backend, v.linear_backend
        g.chunk_mb = v.chunk_mb
        c = copy.deepcopy(cfg)
        c.model.loss_kernel, c.model.sdpa_backend = v.loss_kernel, v.sdpa_backend
        t0 = time.perf_counter()
        step, drain, model = _warmed_up(c, g, device)
        if cfg.rounds > 1:
            print(f"  {v.label:<18} built and warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
        return step, drain, model

    def report(label, model, times):
        res = _result(cfg, model, times, device)
        res["variant"] = label
        results.append(res)
        base = results[0]["step_time_s"]
        print(f"  {label:<18} step {1e3 * res['step_time_s']:8.1f} ms | {res['tokens_per_s']:>11,.0f} tokens/s | "
              f"x{res['step_time_s'] / base:.3f} of gns=off", flush=True)

    specs = overhead_variants(cfg, device)
    if cfg.rounds == 1:
        for spec in specs:
            step, drain, model = build(spec)
            report(spec.label, model, _timed(step, drain, cfg.steps, device))
            del step, drain, model
            _free_memory(device, cfg.compile)  # this variant's model and graphs, before the next one
        return results
    built = [(spec.label, *build(spec), []) for spec in specs]
    for r in range(cfg.rounds):
        k = r % len(built)
        for _label, step, drain, _, times in built[k:] + built[:k]:
            times += _timed(step, drain, per_round, device)
    for label, _, _, model, times in built:
        report(label, model, times)
    return results


def _free_memory(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:  # dynamo's caches hold the compiled graphs (and count against its recompile limit)
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(error: BaseException | None) -> bool:
    """Whether error, or an error it was raised from (inductor wraps its own), is CUDA running out of memory."""
    while error is not None:
        if isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _situation_rows(cfg, results: list[dict] | None, labels: list[str], cuda_graphs: bool = False) -> list[dict]:
    """The parquet rows of one situation (the module docstring's columns before ln_backend_auto); results None:
    it ran out of memory. cuda_graphs: whether its steps were replayed from CUDA graphs."""
    seq_len = cfg.seq_len or cfg.model.block_size
    situation = {"model": cfg.model.name, "n_embd": int(cfg.model.n_embd), "seq_len": int(seq_len),
                 "micro_batch_size": int(cfg.micro_batch_size), "compile": bool(cfg.compile),
                 "cuda_graphs": bool(cuda_graphs)}
    timing = {"steps": int(cfg.steps), "warmup": int(cfg.warmup), "rounds": int(cfg.rounds)}
    nan = float("nan")
    if results is None:
        return [{**situation, "variant": label, "status": "OOM", "step_time_s": nan, "tokens_per_s": nan, "mfu": nan,
                 "relative_step_time": nan, **timing} for label in labels]
    base = results[0]["step_time_s"]
    return [{**situation, "variant": r["variant"], "status": "ok", "step_time_s": r["step_time_s"],
             "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"], "relative_step_time": r["step_time_s"] / base,
             **timing} for r in results]


def ln_backend_rows(rows: list[dict], device_name: str, commit: str, day: str) -> list[dict]:
    """ln_backend.csv rows (gnsrepro.kernels.ln_backend.TABLE_COLUMNS) of the situations in bench overhead's rows
    where both "ln torch" and "ln triton" were timed, each with the command that measures that situation again."""
    from gnsrepro.kernels.backend_table import faster_backend

    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["status"] == "ok" and r["variant"] in ("ln torch", "ln triton"):
            key = (r["model"], r["n_embd"], r["seq_len"], r["micro_batch_size"], r["compile"], r["cuda_graphs"],
                   r["steps"], r["warmup"], r["rounds"])
            times.setdefault(key, {})[r["variant"].removeprefix("ln ")] = 1e3 * r["step_time_s"]
    out = []
    for (model, n_embd, seq_len, micro, compile, graphs, steps, warmup, rounds), ms in times.items():
        if len(ms) < 2:
            continue
        out.append({"device": device_name, "compile": compile, "cuda_graphs": graphs, "n_embd": n_embd,
                    "micro_batch_size": micro, "seq_len": seq_len, "torch_ms": round(ms["torch"], 2),
                    "triton_ms": round(ms["triton"], 2),
                    "faster": faster_backend(round(ms["torch"], 2), round(ms["triton"], 2)), "date": day,
                    "commit": commit, "command": f"gnsrepro bench overhead model={model} seq_len={seq_len} "
                    f"micro_batch_size={micro} compile={str(compile).lower()} cuda_graphs={str(graphs).lower()} "
                    f"steps={steps} warmup={warmup} rounds={rounds}"})
    return out


def _commit() -> str:
    from gnsrepro.provenance import code_version

    commit, dirty = code_version()
    return "unknown" if commit is None else commit[:7] + ("-dirty" if dirty else "")


def overhead_table(rows: list[dict]) -> str:
    """bench overhead's rows as one table: a line per situation (model, seq_len, micro-batch, compile,
    cuda_graphs) with gns=off's step time and MFU, each variant's step time as a multiple of gns=off's ("OOM"
    for a situation that ran out of memory), and gns.ln_backend=auto's pick there."""
    import pandas as pd

    df = pd.DataFrame(rows)
    labels = [label for label in dict.fromkeys(df["variant"]) if label != "off"]
    lines = []
    situation = ["model", "seq_len", "micro_batch_size", "compile", "cuda_graphs"]
    for (model, seq_len, micro, compile, graphs), group in df.groupby(situation, sort=False):
        line = {"model": model, "seq_len": seq_len, "micro": micro, "compile": compile, "cuda_graphs": graphs}
        by_variant = group.set_index("variant")
        if (group["status"] == "OOM").any():
            line |= {"off ms": "OOM", "MFU": ""} | {label: "" for label in labels}
        else:
            off = by_variant.loc["off"]
            line["off ms"] = f"{1e3 * off['step_time_s']:.1f}"
            line["MFU"] = f"{100 * off['mfu']:.1f}%" if math.isfinite(off["mfu"]) else "-"
            for label in labels:
                rel = by_variant["relative_step_time"].get(label)
                line[label] = f"{rel:.3f}x" if rel is not None and math.isfinite(rel) else "-"
        line["auto"] = group["ln_backend_auto"].iloc[0] if "ln_backend_auto" in group else ""
        lines.append(line)
    return pd.DataFrame(lines).to_string(index=False)


def bench_overhead(cfg) -> list[dict]:
    """Every situation's step time of each variant against gns=off (time_overhead), then the whole table
    (overhead_table); with record=true, the ln torch / ln triton times into ln_backend.csv. Returns the rows of
    the module docstring's parquet (less device and versions, which run_benchmark adds)."""
    from gnsrepro.config import GNSConfig
    from gnsrepro.train import ln_backend_choice

    device = _device(cfg)
    if not 1 <= cfg.rounds <= cfg.steps:
        raise ConfigError(f"rounds={cfg.rounds}: accepts 1 to steps={cfg.steps} (each round times at least one "
                          "step of every variant)")
    todo = situations(cfg)
    _check_cuda_graphs(cfg, device)
    if cfg.record and device.type != "cuda":
        raise ConfigError("record=true writes the ln torch / ln triton step times into gnsrepro/kernels/"
                          "ln_backend.csv and needs a CUDA GPU (ln triton runs only there); accepted here: "
                          "record=false")
    labels = [v.label for v in overhead_variants(cfg, device)]
    print(_header(device))
    rows = []
    for k, situation in enumerate(todo, start=1):
        seq_len = situation.seq_len or situation.model.block_size
        per_round = situation.steps // situation.rounds
        count = f" [{k}/{len(todo)}]" if len(todo) > 1 else ""
        graphed = use_cuda_graphs(situation.cuda_graphs, device, 1, situation.model.dropout)  # as _prepare builds it
        print(f"bench overhead{count}: model {situation.model.name} | seq_len {seq_len} | micro-batch "
              f"{situation.micro_batch_size} | compile {situation.compile} | cuda_graphs {graphed} | median of "
              f"{per_round * situation.rounds} steps per variant after {situation.warmup}"
              + (f", in {situation.rounds} interleaved rounds" if situation.rounds > 1 else ""), flush=True)
        try:
            results = time_overhead(situation, device)
        except Exception as e:  # noqa: BLE001 - out of memory is a result; any other error is raised
            if not _is_oom(e):
                raise
            results = None
        _free_memory(device, situation.compile)  # its models and graphs (after OOM too), before the next situation
        if results is None:
            print(f"  OOM: model {situation.model.name} at micro-batch {situation.micro_batch_size} does not fit "
                  f"(rounds={situation.rounds} holds all {len(labels)} variants at once; rounds=1 holds one)",
                  flush=True)
        rows += _situation_rows(situation, results, labels, graphed)
    if cfg.record:
        from gnsrepro.kernels.ln_backend import LN_BACKEND_TABLE, record_ln_backend

        new = ln_backend_rows(rows, torch.cuda.get_device_name(device), _commit(),
                              datetime.now(timezone.utc).date().isoformat())
        if new:
            record_ln_backend(new)
        print(f"recorded {len(new)} situation(s) in {LN_BACKEND_TABLE} (gns.ln_backend=auto reads it)", flush=True)
    auto = GNSConfig(mode="ln", ln_backend="auto")
    for row in rows:
        row["ln_backend_auto"] = ln_backend_choice(auto, device, row["n_embd"], row["compile"],
                                                   row["micro_batch_size"], row["cuda_graphs"])[0]
    print(f"bench overhead: {len(todo)} situation(s); x = step time / gns=off's in the same situation; "
          "auto = what gns.ln_backend=auto picks there")
    print(overhead_table(rows), flush=True)
    return rows
