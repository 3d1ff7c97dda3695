"""The training loop: the one place that calls each stage once per step.

open_run (settings, run directory, data, model, optimizer, schedule, GNS tracker, logs, resume) -> for each step:
the schedule's batch size -> the sequences it reads (by sequence index, so every schedule reads the same data)
-> train_step (forward and backward with the instrumented layers, gradient norms and clipping, GNS tracker,
AdamW) -> RunLogger (parquet logs, smoothed GNS, console) -> evaluation, checkpoints, and the GNS a GNS-driven
schedule reads. Runs as is on one device, and under `torchrun --nproc_per_node=N` with DDP (NCCL on GPU, gloo
on CPU), where the configured batch size stays the global one.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from gnsrepro.config import GNSConfig, ModelConfig, OptimConfig, TrainConfig
from gnsrepro.errors import ConfigError
from gnsrepro.logs import RunLogger, fmt_count
from gnsrepro.model import GPT, Layers, gpt_config
from gnsrepro.schedule import GNSBatch, build_schedule, lr_multiplier
from gnsrepro.settings import resume_settings, validate

__all__ = ["train", "train_step", "build_step", "validate", "lr_at", "gpt_config"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# dense bf16 peak FLOP/s of the datasheets, for MFU; matched against torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12}
EVAL_SEED_OFFSET = 1_000_003  # validation batches come from their own random stream
RUN_FILES = ("config.yaml", "metrics.parquet", "gns.parquet", "ckpt.pt")  # any of them: out_dir holds a run


# ---- building blocks (shared with the benchmarks) ---------------------------------------------------
def ln_backend_choice(g: GNSConfig, device: torch.device, n_embd: int | None = None, compile: bool = False,
                      micro_batch_size: int | None = None, cuda_graphs: bool = False) -> tuple[str, str]:
    """(backend, why): gns.ln_backend as set, or for auto torch on a CPU and on CUDA the backend measured faster
    in the nearest recorded situation of gnsrepro/kernels/ln_backend.csv (same GPU, else its family such as
    H100/H200; same compile mode; with CUDA graphs where the step is replayed from one, else without; nearest
    n_embd, then micro-batch: kernels.ln_backend.choose_ln_backend); triton, the choice before measurements were
    recorded, where the table has no row for the GPU's family."""
    if g.ln_backend != "auto":
        return g.ln_backend, f"gns.ln_backend={g.ln_backend}"
    if device.type != "cuda":
        return "torch", "auto: torch off CUDA (the Triton kernel runs on CUDA GPUs only)"
    from gnsrepro.kernels.ln_backend import choose_ln_backend

    backend, why = choose_ln_backend(torch.cuda.get_device_name(device), compile, n_embd, micro_batch_size,
                                     cuda_graphs=cuda_graphs)
    return backend, f"auto: {why}"


def resolve_ln_backend(g: GNSConfig, device: torch.device, n_embd: int | None = None, compile: bool = False,
                       micro_batch_size: int | None = None, cuda_graphs: bool = False) -> str:
    """The LayerNorm backend gns.ln_backend names, auto resolved by measurement (ln_backend_choice)."""
    return ln_backend_choice(g, device, n_embd, compile, micro_batch_size, cuda_graphs)[0]


def resolve_linear_backend(g: GNSConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    """gns.linear_backend as set, or for auto: torch off CUDA, and on CUDA a function (in_features, out_features,
    tied_head) -> backend that each Linear layer and the tied head is built with: the backend measured faster for
    that shape and dtype on this GPU (or its family) in gnsrepro/kernels/linear_backend.csv, torch where the table
    has no row (kernels.linear_backend.choose_linear_backend)."""
    if g.linear_backend != "auto":
        return g.linear_backend
    if device.type != "cuda":
        return "torch"
    from gnsrepro.kernels.linear_backend import choose_linear_backend, read_table

    name, dtype_name, table = torch.cuda.get_device_name(device), str(dtype).removeprefix("torch."), read_table()
    return lambda K, L, tied_head: choose_linear_backend(name, dtype_name, K, L, tied_head, table)[0]


def linear_backends(model: torch.nn.Module) -> dict[str, str]:
    """The simultaneous method's backend of each instrumented Linear shape and of the tied head, as built:
    {"768 -> 2304": "torch", ..., "tied head 768 -> 50304": "triton"} (empty for gns.mode other than all)."""
    from gnsrepro.pegn import PerExampleLinear, PerExampleTiedEmbedding

    out = {}
    for mod in model.modules():
        if isinstance(mod, PerExampleLinear):
            out[f"{mod.in_features} -> {mod.out_features}"] = mod.backend
        elif isinstance(mod, PerExampleTiedEmbedding):
            V, d = mod.weight.shape
            out[f"tied head {d} -> {V}"] = mod.backend
    return out


def build_model(m: ModelConfig, g: GNSConfig, device: torch.device, compile: bool = False,
                micro_batch_size: int | None = None, cuda_graphs: bool = False, dtype: torch.dtype = torch.float32):
    """A GPT with the layers that gns.mode asks for, and the collector of their per-example norms; compile,
    micro_batch_size and cuda_graphs (whether the step will be replayed from a CUDA graph) pick
    gns.ln_backend=auto's backend (resolve_ln_backend), dtype (the autocast dtype) gns.linear_backend=auto's
    (resolve_linear_backend)."""
    if g.mode == "off":
        return GPT(gpt_config(m), Layers()).to(device), None
    from gnsrepro.pegn import PerExampleNorms, instrumented_layers

    backend = resolve_ln_backend(g, device, n_embd=m.n_embd, compile=compile, micro_batch_size=micro_batch_size,
                                 cuda_graphs=cuda_graphs)
    layers = instrumented_layers(g.mode, method=g.method, ln_backend=backend, chunk_size=g.chunk_size,
                                 linear_backend=resolve_linear_backend(g, device, dtype),
                                 chunk_bytes=g.chunk_mb * 2**20)
    model = GPT(gpt_config(m), layers).to(device)
    return model, PerExampleNorms(model)


def make_optimizer(model: GPT, cfg_optim, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.param_groups(cfg_optim.weight_decay), lr=cfg_optim.lr,
                             betas=(cfg_optim.beta1, cfg_optim.beta2), eps=cfg_optim.eps,
                             fused=device.type == "cuda")


def lr_at(tokens: int, o, total_tokens: int) -> float:
    """Linear warm-up over o.warmup_tokens, then linear decay to lr·min_lr_ratio at decay_tokens."""
    if tokens < o.warmup_tokens:
        return o.lr * (tokens + 1) / (o.warmup_tokens + 1)
    end = o.decay_tokens if o.decay_tokens is not None else total_tokens
    if tokens >= end or end <= o.warmup_tokens:
        return o.lr * o.min_lr_ratio
    frac = (tokens - o.warmup_tokens) / (end - o.warmup_tokens)
    return o.lr * (1 - frac * (1 - o.min_lr_ratio))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def grad_sqnorms(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """(P,) squared norms of p.grad, on the device, in a few fused kernels."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return torch.stack(torch._foreach_norm(grads)).float() ** 2


def clip_by_total_norm(params: list[torch.nn.Parameter], sq: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their total norm is at most max_norm, without a host sync."""
    total = sq.sum().sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
    return total


def use_cuda_graphs(setting: str, device: torch.device, world_size: int, dropout: float) -> bool:
    """cuda_graphs=auto|true|false: auto captures the step on one CUDA GPU without dropout (gnsrepro.cuda_graphs
    says why those); true there too, and settings.validate refuses it elsewhere."""
    return str(setting).lower() in ("auto", "true") and device.type == "cuda" and world_size == 1 and dropout == 0


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    return DTYPES[setting] if setting != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)


@dataclass
class StepParts:
    """What one optimizer step touches, built once by build_step."""

    model: nn.Module  # what the forward runs: the GPT, compiled and/or wrapped in DDP
    raw_model: GPT
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    tracker: object | None  # a gnsrepro.gns_tracker.GNSTracker when gns.mode != off
    autocast: object
    grad_clip: float
    ddp: nn.Module | None = None
    world_size: int = 1
    graphed: object | None = None  # a gnsrepro.cuda_graphs.GraphedStep (cuda_graphs=true), which `step` replays


def build_step(model_cfg: ModelConfig, gns_cfg: GNSConfig, optim_cfg: OptimConfig, device: torch.device,
               dtype: torch.dtype, compile: bool = False, world_size: int = 1, max_micro_steps: int = 1,
               micro_batch_size: int = 1, cuda_graphs: bool = False) -> StepParts:
    """The model (instrumented as gns_cfg asks), AdamW, the GNS tracker, compile and DDP, for `step`; cuda_graphs:
    replay each step from a CUDA graph (gnsrepro.cuda_graphs; one GPU, settings.validate checks the rest)."""
    from gnsrepro.gns_tracker import GNSTracker

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw_model, collector = build_model(model_cfg, gns_cfg, device, compile, micro_batch_size, cuda_graphs, dtype)
    optimizer = make_optimizer(raw_model, optim_cfg, device)
    if compile:
        from gnsrepro.kernels import brief_inductor_fallback_log

        brief_inductor_fallback_log()  # else torch 2.11's inductor can hang on the custom ops' arguments
    model = torch.compile(raw_model) if compile else raw_model
    ddp = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    tracker = None
    if gns_cfg.mode != "off":
        tracker = GNSTracker(raw_model, collector, max_micro_steps=max_micro_steps, world_size=world_size,
                             per_layer=gns_cfg.per_layer)
        if ddp is not None:
            ddp.register_comm_hook(None, tracker.ddp_comm_hook)
        if collector is not None:
            collector.attach(micro_batch_size)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    params = [p for p in raw_model.parameters() if p.requires_grad]
    parts = StepParts(model, raw_model, optimizer, params, tracker, autocast, optim_cfg.grad_clip, ddp, world_size)
    if cuda_graphs:
        from gnsrepro.cuda_graphs import GraphedStep

        parts.graphed = GraphedStep(parts)
    return parts


def step(parts: StepParts, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
         lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: train_step, or its CUDA-graph replay when build_step captured one."""
    if parts.graphed is not None:
        return parts.graphed(micro_batches, batch_size, lr)
    return train_step(parts, micro_batches, batch_size, lr)


def train_step(parts: StepParts, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
               lr: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches: (mean loss over the global batch, unclipped gradient
    norm), both 0-d tensors on the device (nothing here waits for the device). lr: a float, or the device
    tensor that a captured step reads (gnsrepro.cuda_graphs)."""
    p, accum = parts, len(micro_batches)
    for group in p.optimizer.param_groups:
        group["lr"] = lr
    if p.tracker is not None:
        p.tracker.begin_step(accum)
    loss_sum = torch.zeros((), device=p.params[0].device)
    for k, (x, y) in enumerate(micro_batches):
        sync = p.ddp is None or k == accum - 1  # DDP all-reduces on the last micro-batch only
        with nullcontext() if sync else p.ddp.no_sync():
            with p.autocast:
                _, loss = p.model(x, y, return_logits=False)
            if p.tracker is not None:
                p.tracker.before_backward(k)
            (loss / accum).backward()
        if p.tracker is not None:
            p.tracker.after_backward(k)
        loss_sum += loss.detach()
    sq = grad_sqnorms(p.params)
    grad_norm = clip_by_total_norm(p.params, sq, p.grad_clip)
    if p.tracker is not None:
        p.tracker.end_step(batch_size, len(x), sq)
    p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    loss_step = loss_sum / accum
    if p.world_size > 1:
        dist.all_reduce(loss_step)
        loss_step /= p.world_size
    return loss_step, grad_norm


# ---- the run------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this run created the process group, so it destroys it at the end

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_setting: str) -> tuple[Dist, torch.device]:
    """Single process, or torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) -> DDP process group."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if device_setting == "auto":
            return Dist(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(), torch.device(device_setting)
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    use_cuda = torch.cuda.is_available() and device_setting != "cpu"
    if use_cuda:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        d.owns_group = True
    return d, device


def run_metadata(device: torch.device, world_size: int) -> dict:
    from gnsrepro.provenance import code_version

    commit, dirty = code_version()
    import triton  # noqa: F401  (the version is part of the record)

    import gnsrepro

    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": sys.modules["triton"].__version__,
        "gnsrepro": gnsrepro.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world_size,
        "hostname": platform.node(),
    }


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_tokens(schedule, max_steps: int | None, max_tokens: int | None, seq_len: int) -> int:
    """The tokens the run will have seen at its end (the learning rate's horizon): the first of max_steps and
    max_tokens, stepping the schedule where its batches do not depend on the measured GNS."""
    cap = max_tokens if max_tokens is not None else sys.maxsize
    if max_steps is None:
        return cap
    if isinstance(schedule, GNSBatch):
        return min(cap, max_steps * schedule.max_batch_size() * seq_len)
    tokens = 0
    for step in range(max_steps):
        if tokens >= cap:
            break
        tokens += schedule.batch_size(step, tokens) * seq_len
    return tokens


@dataclass
class Run:
    """Everything the step loop reads, built by open_run; step and tokens count what is done."""

    cfg: DictConfig
    d: Dist
    device: torch.device
    out: Path
    parts: StepParts
    schedule: object
    logger: RunLogger
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_offsets: np.ndarray  # this rank's share of the fixed validation set
    data_identity: dict
    seq_len: int
    micro: int
    max_steps: int
    max_tokens: int
    step: int = 0
    tokens: int = 0
    changed: dict = field(default_factory=dict)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "ckpt.pt"

    def finished(self) -> bool:
        return self.step >= self.max_steps or self.tokens >= self.max_tokens

    def micro_batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the step's global batch: sequences tokens/seq_len onwards of the run."""
        from gnsrepro.data.dataset import read_batch, sequence_offsets

        per_rank = batch_size // self.d.world_size
        offsets = sequence_offsets(len(self.train_tokens), self.seq_len, self.tokens // self.seq_len, batch_size,
                                   self.cfg.seed)[self.d.rank * per_rank:(self.d.rank + 1) * per_rank]
        return [read_batch(self.train_tokens, offsets[i:i + self.micro], self.seq_len, self.device)
                for i in range(0, per_rank, self.micro)]


def _refuse_or_announce(cfg: DictConfig, out: Path, resuming: bool) -> None:
    present = [f for f in RUN_FILES if (out / f).exists()]
    if not cfg.resume and present:
        raise ConfigError(f"out_dir={out} already holds a run ({', '.join(present)}); pass resume=true to continue "
                          "it or choose another out_dir")
    if cfg.resume and not resuming and int(os.environ.get("RANK", "0")) == 0:
        how = "with its own settings (config.yaml)" if present else "as configured"
        print(f"resume=true: no checkpoint in {out} yet, starting the run from step 0 {how}", flush=True)


def open_run(cfg: TrainConfig | DictConfig, overrides: list[str] | None = None) -> Run | Path:
    """Build a run as configured, or continue the one in out_dir (resume=true); a run that has already finished
    is returned as its directory, untouched. Raises ConfigError/DataError before anything is written."""
    from gnsrepro.data.dataset import batch_offsets, open_split
    from gnsrepro.data.prepare import data_identity, ensure_prepared

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cfg.out_dir if cfg.out_dir else f"outputs/{cfg.run_name}")
    ckpt_path = out / "ckpt.pt"
    resuming = cfg.resume and ckpt_path.exists()
    changed: dict[str, tuple] = {}
    if cfg.resume and (out / "config.yaml").exists():  # the run's own settings, also before its first checkpoint
        cfg, changed = resume_settings(cfg, OmegaConf.load(out / "config.yaml"), overrides, out)
        cfg.resume = True
    validate(cfg, world)
    _refuse_or_announce(cfg, out, resuming)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if resuming else None
    seq_len = cfg.seq_len if cfg.seq_len is not None else cfg.model.block_size
    max_steps = cfg.max_steps if cfg.max_steps is not None else sys.maxsize
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else sys.maxsize
    if ckpt is not None and (ckpt["step"] >= max_steps or ckpt["tokens"] >= max_tokens):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{out}: the run finished at step {ckpt['step']} ({fmt_count(ckpt['tokens'])} tokens); nothing "
                  "to do (raise max_steps or max_tokens to train on)", flush=True)
        return out

    d, device = setup_distributed(cfg.device)
    if d.main:  # data: rank 0 prepares what is missing, the others wait for it
        data_dir = ensure_prepared(cfg.data, cfg.prepare_missing)
    if d.world_size > 1:
        dist.barrier()
    if not d.main:
        data_dir = ensure_prepared(cfg.data, prepare_missing=False)
    identity = data_identity(json.loads((data_dir / "meta.json").read_text()))
    if ckpt is not None and ckpt.get("data") is not None and ckpt["data"] != identity:
        raise ConfigError(f"resume=true: {out} trained on other token files than {data_dir} holds now (its "
                          f"checkpoint records {ckpt['data'].get('splits')}); restore that data set or start a new "
                          "run in another out_dir")
    train_tokens, val_tokens = open_split(data_dir, "train"), open_split(data_dir, "val")

    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, device)
    micro = cfg.schedule.micro_batch_size
    schedule = build_schedule(cfg.schedule, d.world_size, cfg.max_tokens, cfg.max_steps, seq_len)
    parts = build_step(cfg.model, cfg.gns, cfg.optim, device, dtype, cfg.compile, d.world_size,
                       max_micro_steps=schedule.max_batch_size() // (micro * d.world_size), micro_batch_size=micro,
                       cuda_graphs=use_cuda_graphs(cfg.cuda_graphs, device, d.world_size, cfg.model.dropout))
    step = tokens = 0
    if ckpt is not None:
        parts.raw_model.load_state_dict(ckpt["model"])
        parts.optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt.get("schedule", {}))
        step, tokens = ckpt["step"], ckpt["tokens"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    total = run_tokens(schedule, cfg.max_steps, cfg.max_tokens, seq_len)
    logger = RunLogger(out, parts.tracker, cfg.gns.ema_alpha, resume_step=step, writer=d.main,
                       flops_per_token=parts.raw_model.flops_per_token(seq_len), peak_flops=peak_flops(device),
                       world_size=d.world_size, total_tokens=total, start_tokens=tokens,
                       outlier_guard=cfg.gns.outlier_guard)
    if ckpt is not None and ckpt.get("ema"):
        logger.load_state_dict({"ema": ckpt["ema"]})
    val_offsets = batch_offsets(len(val_tokens), seq_len, cfg.eval_batches * micro, cfg.seed + EVAL_SEED_OFFSET, 0)
    run = Run(cfg, d, device, out, parts, schedule, logger, train_tokens, val_tokens,
              val_offsets[d.rank::d.world_size], identity, seq_len, micro, max_steps, max_tokens, step, tokens, changed)
    if d.main:
        _write_run_record(run, dtype)
    return run


def _write_run_record(run: Run, dtype: torch.dtype) -> None:
    """config.yaml, meta.json (a resumed run adds meta-resumed-at-<step>.json) and the start's console lines."""
    out, cfg, step = run.out, run.cfg, run.step
    if step:
        print(f"resuming {out} from step {step} ({fmt_count(run.tokens)} tokens)", flush=True)
        for key, (old, new) in run.changed.items():
            print(f"  {key}: {old} -> {new} from step {step + 1} on", flush=True)
    print(f"model {cfg.model.name}: {run.parts.raw_model.num_params() / 1e6:.2f}M parameters | device {run.device} "
          f"x{run.d.world_size} | {str(dtype).removeprefix('torch.')} | gns={cfg.gns.mode} | "
          f"schedule={cfg.schedule.name} | out {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    record = run_metadata(run.device, run.d.world_size)
    record["cuda_graphs"] = run.parts.graphed is not None  # what cuda_graphs=auto resolved to
    record["step_time_synced"] = True  # step_time_s sums to device time over an interval (train's loop waits)
    if cfg.gns.mode != "off":  # the LayerNorm backend build_model chose, and why (gns.ln_backend=auto: by measurement)
        record["ln_backend"], record["ln_backend_why"] = ln_backend_choice(
            cfg.gns, run.device, cfg.model.n_embd, cfg.compile, cfg.schedule.micro_batch_size,
            cuda_graphs=run.parts.graphed is not None)
    if cfg.gns.mode == "all":  # the simultaneous method's backend per Linear shape (gns.linear_backend=auto: measured)
        record["linear_backends"] = linear_backends(run.parts.raw_model)
    if step:
        record["changed_settings"] = {k: {"before": old, "after": new} for k, (old, new) in run.changed.items()}
    meta = "meta.json" if step == 0 else f"meta-resumed-at-{step}.json"  # the first start's is kept
    (out / meta).write_text(json.dumps(record, indent=2, default=str))


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over the fixed validation set (the same sequences for every run with this seed)."""
    from gnsrepro.data.dataset import read_batch

    model, raw = run.parts.model, run.parts.raw_model
    model.eval()
    total = torch.zeros(2, device=run.device)  # (sum of sequence losses, sequences)
    for i in range(0, len(run.val_offsets), run.micro):
        x, y = read_batch(run.val_tokens, run.val_offsets[i:i + run.micro], run.seq_len, run.device)
        with run.parts.autocast:
            total[0] += raw(x, y)[1].float() * len(x)
        total[1] += len(x)
    if run.d.world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def save_checkpoint(run: Run) -> None:
    """The state a resumed run continues from, written atomically, with the logs flushed up to it."""
    if not run.d.main:
        return
    p = run.parts
    _atomic_save({"model": p.raw_model.state_dict(), "optimizer": p.optimizer.state_dict(), "step": run.step,
                  "tokens": run.tokens, "ema": run.logger.state_dict()["ema"],
                  "schedule": run.schedule.state_dict(), "data": run.data_identity,
                  "rng_cpu": torch.get_rng_state(),
                  "rng_cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
                  "config": OmegaConf.to_container(run.cfg, resolve=True)}, run.ckpt_path)


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pause_follows(run: Run) -> bool:
    """Whether evaluation, logging, a GNS update of the schedule or a checkpoint follows this step (train's loop)."""
    c, schedule = run.cfg, run.schedule
    return (run.finished() or any(_every(run.step, i) for i in (c.eval_interval, c.log_interval, c.checkpoint_interval))
            or (isinstance(schedule, GNSBatch) and schedule.wants_update(run.step)))


def train(cfg: TrainConfig | DictConfig, overrides: list[str] | None = None) -> Path:
    """Train as configured; returns the run directory. Raises ConfigError/DataError before any work.

    overrides: the command line's settings. With resume=true and a run in out_dir, the run's saved settings
    apply, and the command line changes some of them (gnsrepro.settings.resume_settings).
    """
    run = open_run(cfg, overrides)
    if isinstance(run, Path):
        return run
    cfg, log, schedule, quantum = run.cfg, run.logger, run.schedule, run.micro * run.d.world_size
    total_tokens = log.total_tokens
    run.parts.model.train()
    t_last = time.perf_counter()
    try:
        while not run.finished():
            batch_size = schedule.batch_size(run.step, run.tokens)
            if batch_size % quantum or batch_size > schedule.max_batch_size():
                raise ConfigError(f"the batch schedule asked for {batch_size} sequences at step {run.step}; it may ask "
                                  f"for multiples of {quantum} up to schedule.batch_size={schedule.max_batch_size()}")
            lr = lr_at(run.tokens, cfg.optim, total_tokens) * lr_multiplier(cfg.schedule, batch_size)
            loss, grad_norm = step(run.parts, run.micro_batches(batch_size), batch_size, lr)
            run.step += 1
            run.tokens += batch_size * run.seq_len
            if _pause_follows(run):
                # the host runs ahead of the GPU (replaying CUDA graphs, up to the whole interval ahead): the
                # interval's time ends when its steps have run, before the pause that the next step leaves out
                _wait_for(run.device)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            log.record({"step": run.step, "tokens": run.tokens, "batch_size": batch_size, "lr": lr, "loss": loss,
                        "val_loss": None, "grad_norm": grad_norm, "schedule_gns": getattr(schedule, "last_gns", None),
                        "step_time_s": dt, "tokens_per_s": batch_size * run.seq_len / dt,
                        "mfu": log.mfu(batch_size * run.seq_len / dt)})
            val_loss = evaluate(run) if _every(run.step, cfg.eval_interval) or run.finished() else None
            log.pending[-1]["val_loss"] = val_loss
            if _every(run.step, cfg.log_interval) or val_loss is not None or run.finished():
                log.flush(val_loss, checkpointed=run.ckpt_path.exists())
            if isinstance(schedule, GNSBatch) and schedule.wants_update(run.step):
                log.flush(checkpointed=run.ckpt_path.exists(), print_line=False)  # the GNS up to this step
                schedule.update(run.step, log.gns_of(cfg.schedule.source, cfg.schedule.group))
            if _every(run.step, cfg.checkpoint_interval) or run.finished():
                log.flush(checkpointed=run.ckpt_path.exists())
                save_checkpoint(run)
            t_last = time.perf_counter()  # the next step's time leaves out evaluation, logging and checkpoints
    except KeyboardInterrupt:
        if not log.flushing:
            log.flush(checkpointed=run.ckpt_path.exists())  # every finished step (a resume logs them again)
        if run.d.main:
            print(f"interrupted after step {run.step}; logs hold every finished step, and resume=true continues "
                  "from the last checkpoint", flush=True)
        raise
    if run.d.main:
        print(f"done: {run.step} steps, {fmt_count(run.tokens)} tokens; logs in {run.out}", flush=True)
    if run.d.world_size > 1:
        dist.barrier()
        if run.d.owns_group:  # a process that exits with gloo's threads still running can abort at teardown
            dist.destroy_process_group()
    return run.out
