"""The training loop: the one place that calls each stage once per step.

data (sampled by (seed, step), so a resumed run reads the same batches) -> model with instrumented
layers -> per-example norms (sinks) and GNS components (GNSTracker) -> parquet logs -> checkpoint.
Runs as is on one device, and under `torchrun --nproc_per_node=N` with DDP (NCCL on GPU, gloo on CPU),
where the configured batch size stays the global one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from gnsrepro.config import GNSConfig, ModelConfig, TrainConfig
from gnsrepro.data.tokenizer import EOT
from gnsrepro.errors import ConfigError, DivergedError
from gnsrepro.logs import ParquetLog
from gnsrepro.model import GPT, GPTConfig, Layers
from gnsrepro.schedule import SCHEDULES, build_schedule

VOCAB = EOT + 1  # token ids of every prepared data set (GPT-2 BPE) are below this

DATA_NAMES = ("pycode", "openwebtext", "textdir")
GNS_MODES = ("off", "ln", "all")
LINEAR_METHODS = ("auto", "simultaneous", "ghost")
LN_BACKENDS = ("auto", "torch", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# dense bf16 peak FLOP/s of the datasheets, for MFU; matched against torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12}
EVAL_SEED_OFFSET = 1_000_003  # validation batches come from their own random stream


# ---- settings ---------------------------------------------------------------------------------------
def validate(cfg: TrainConfig | DictConfig, world_size: int = 1) -> None:
    """Reject bad settings with one line naming the setting and what it accepts, before any work."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    m, s, o, g = cfg.model, cfg.schedule, cfg.optim, cfg.gns
    need(cfg.data.name in DATA_NAMES,
         f"data={cfg.data.name!r} is not known; accepted: {', '.join(DATA_NAMES)}")
    need(cfg.data.name != "textdir" or bool(cfg.data.path),
         "data=textdir needs data.path=DIR (a directory of text files)")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        need(m[key] > 0, f"model.{key}={m[key]} must be a positive integer")
    need(m.n_embd % m.n_head == 0, f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    need(m.vocab_size >= VOCAB, f"model.vocab_size={m.vocab_size} must be >= {VOCAB} (the GPT-2 tokens of the data)")
    need(0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1)")
    need(all(0 <= b < m.n_layer for b in m.cosine_attn_blocks),
         f"model.cosine_attn_blocks={list(m.cosine_attn_blocks)} must name blocks in [0, {m.n_layer})")
    seq_len = cfg.seq_len if cfg.seq_len is not None else m.block_size
    need(seq_len > 0, f"seq_len={seq_len} must be a positive integer")
    need(seq_len <= m.block_size,
         f"seq_len={seq_len} is longer than the model's context model.block_size={m.block_size}")
    need(o.lr > 0 and math.isfinite(o.lr), f"optim.lr={o.lr} must be a positive number")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    need(o.warmup_tokens >= 0, f"optim.warmup_tokens={o.warmup_tokens} must be >= 0")
    need(o.decay_tokens is None or o.decay_tokens > o.warmup_tokens,
         f"optim.decay_tokens={o.decay_tokens} must be > optim.warmup_tokens={o.warmup_tokens} (or null: end of run)")
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    for key in ("beta1", "beta2"):
        need(0 <= o[key] < 1, f"optim.{key}={o[key]} must be in [0, 1)")
    need(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    need(cfg.seed >= 0, f"seed={cfg.seed} must be >= 0")
    need(cfg.max_steps is not None or cfg.max_tokens is not None,
         "set max_steps=N or max_tokens=N (a positive integer)")
    need(cfg.max_steps is None or cfg.max_steps > 0, f"max_steps={cfg.max_steps} must be a positive integer")
    need(cfg.max_tokens is None or cfg.max_tokens > 0, f"max_tokens={cfg.max_tokens} must be a positive integer")
    need(s.name in SCHEDULES, f"schedule={s.name!r} is not known; accepted: {', '.join(SCHEDULES)}")
    need(s.micro_batch_size > 0, f"schedule.micro_batch_size={s.micro_batch_size} must be a positive integer")
    need(s.batch_size > 0, f"schedule.batch_size={s.batch_size} must be a positive integer")
    per_step = s.micro_batch_size * world_size
    need(s.batch_size % per_step == 0,
         f"schedule.batch_size={s.batch_size} must be a multiple of schedule.micro_batch_size x world size = "
         f"{s.micro_batch_size} x {world_size} = {per_step}")
    need(g.mode in GNS_MODES, f"gns={g.mode!r} is not known; accepted: {', '.join(GNS_MODES)}")
    need(g.method in LINEAR_METHODS, f"gns.method={g.method!r} is not known; accepted: {', '.join(LINEAR_METHODS)}")
    need(g.ln_backend in LN_BACKENDS,
         f"gns.ln_backend={g.ln_backend!r} is not known; accepted: {', '.join(LN_BACKENDS)}")
    need(g.mode == "off" or s.batch_size >= 2,
         f"gns={g.mode} needs schedule.batch_size >= 2 (got {s.batch_size}): the GNS compares the gradients of "
         "smaller batches within each step's batch")
    need(0 <= g.ema_alpha < 1, f"gns.ema_alpha={g.ema_alpha} must be in [0, 1)")
    need(g.chunk_size >= 0, f"gns.chunk_size={g.chunk_size} must be >= 0 (0: automatic)")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    need(g.mode == "off" or g.ln_backend != "triton" or not on_cpu or os.environ.get("TRITON_INTERPRET") == "1",
         "gns.ln_backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's slow CPU interpreter); "
         "use gns.ln_backend=auto or torch on a CPU")
    need(cfg.dtype in ("auto", *DTYPES), f"dtype={cfg.dtype!r} is not known; accepted: auto, {', '.join(DTYPES)}")
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
         f"device={cfg.device!r} is not known; accepted: auto, cpu, cuda, cuda:N")
    need(not cfg.device.startswith("cuda") or torch.cuda.is_available(),
         f"device={cfg.device!r} but no CUDA GPU is visible; use device=auto or device=cpu")
    for key in ("log_interval", "eval_batches"):
        need(cfg[key] > 0, f"{key}={cfg[key]} must be a positive integer")
    for key in ("eval_interval", "checkpoint_interval"):
        need(cfg[key] >= 0, f"{key}={cfg[key]} must be >= 0 (0 disables)")


# Resuming: settings that define what is trained and measured cannot change (the checkpoint would not
# fit, or the logs would mix two experiments); those that only say how long the run goes and how it logs
# and executes change quietly; any other change (learning rate, batch size, ...) is allowed, as when a
# diverged run is restarted from its last checkpoint with a lower learning rate, and is announced.
FIXED_ON_RESUME = ("model", "data.name", "data.path", "data.max_bytes", "data.val_fraction", "data.hf_dataset",
                   "seq_len", "gns.mode", "gns.per_layer")
QUIET_ON_RESUME = ("max_steps", "max_tokens", "eval_interval", "log_interval", "checkpoint_interval", "compile",
                   "device", "prepare_missing", "resume", "out_dir", "run_name", "data.data_dir", "data.num_proc",
                   "gns.ema_alpha", "gns.ln_backend", "gns.method", "gns.chunk_size")


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def resume_settings(
    cfg: DictConfig, saved: DictConfig, given: list[str] | None, out: Path
) -> tuple[DictConfig, dict[str, tuple]]:
    """The settings of a resumed run, and what changed: {key: (the run's value, the new one)}.

    The run's saved settings, with those the command line gives (`given`, its overrides; None: every
    setting counts as given) on top. A given setting in FIXED_ON_RESUME that differs from the run's is
    a ConfigError.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    except Exception as e:  # noqa: BLE001 - an omegaconf error naming the unknown key or bad value
        raise ConfigError(f"{out / 'config.yaml'} does not fit this version's settings: {e}") from None
    now = _leaves(OmegaConf.to_container(cfg, resolve=True))
    then = _leaves(OmegaConf.to_container(merged, resolve=True))
    keys = tuple({o.split("=", 1)[0].lstrip("+~") for o in given}) if given is not None else ()
    # a group override without a key of its own (experiment=111M, scale=tiny) may set any setting
    every = given is None or any(k not in now and not any(n.startswith(k + ".") for n in now) for k in keys)
    fixed, changed = [], {}
    for key in sorted(now):
        if key in then and now[key] == then[key] or not (every or _matches(key, keys)):
            continue
        if _matches(key, FIXED_ON_RESUME):
            fixed.append(f"{key}={now[key]} (the run's: {then.get(key)})")
            continue
        OmegaConf.update(merged, key, now[key], merge=False)
        if not _matches(key, QUIET_ON_RESUME):
            changed[key] = (then.get(key), now[key])
    if fixed:
        raise ConfigError(f"resume=true continues the run in {out} ({out / 'config.yaml'}), but "
                          f"{', '.join(fixed[:4])}{' and more' if len(fixed) > 4 else ''}: the model, data, context "
                          "and what is measured cannot change within a run. Drop "
                          f"{'them' if len(fixed) > 1 else 'it'}, or start a new run in another out_dir")
    return merged, changed


# ---- building blocks (shared with the benchmarks) ---------------------------------------------------
def gpt_config(m: ModelConfig) -> GPTConfig:
    return GPTConfig(block_size=m.block_size, vocab_size=m.vocab_size, n_layer=m.n_layer, n_head=m.n_head,
                     n_embd=m.n_embd, dropout=m.dropout, bias=m.bias, cosine_attn_blocks=tuple(m.cosine_attn_blocks))


def resolve_ln_backend(g: GNSConfig, device: torch.device) -> str:
    if g.ln_backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return g.ln_backend


def build_model(m: ModelConfig, g: GNSConfig, device: torch.device):
    """A GPT with the layers that gns.mode asks for, and the collector of their per-example norms."""
    if g.mode == "off":
        return GPT(gpt_config(m), Layers()).to(device), None
    from gnsrepro.pegn import PerExampleNorms, instrumented_layers

    layers = instrumented_layers(g.mode, method=g.method, ln_backend=resolve_ln_backend(g, device),
                                 chunk_size=g.chunk_size)
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


# ---- the run ----------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

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
    return d, device


def run_metadata(device: torch.device, world_size: int) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import triton  # noqa: F401  (the version is part of the record)

    import gnsrepro

    return {
        "git_commit": commit,
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


def _fmt_count(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig | DictConfig, overrides: list[str] | None = None) -> Path:
    """Train as configured; returns the run directory. Raises ConfigError/DataError before any work.

    overrides: the command line's settings. With resume=true and a checkpoint in out_dir, the run's
    saved settings apply, and the command line changes some of them (resume_settings).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cfg.out_dir if cfg.out_dir else f"outputs/{cfg.run_name}")
    ckpt_path = out / "ckpt.pt"
    resuming = cfg.resume and ckpt_path.exists()
    changed: dict[str, tuple] = {}
    if resuming and (out / "config.yaml").exists():
        cfg, changed = resume_settings(cfg, OmegaConf.load(out / "config.yaml"), overrides, out)
    validate(cfg, world)
    from gnsrepro.data.dataset import batch_offsets, open_split, read_batch
    from gnsrepro.data.prepare import ensure_prepared

    d, device = setup_distributed(cfg.device)
    if d.main and not cfg.resume and ckpt_path.exists():
        raise ConfigError(f"out_dir={out} already holds a run; pass resume=true to continue it "
                          "or choose another out_dir")
    if d.main and cfg.resume and not resuming:
        print(f"resume=true: no checkpoint in {out} yet, starting the run from step 0", flush=True)

    # data: rank 0 prepares what is missing, the others wait for it
    if d.main:
        data_dir = ensure_prepared(cfg.data, cfg.prepare_missing)
    if d.world_size > 1:
        dist.barrier()
    if not d.main:
        data_dir = ensure_prepared(cfg.data, prepare_missing=False)
    train_tokens, val_tokens = open_split(data_dir, "train"), open_split(data_dir, "val")
    seq_len = cfg.seq_len if cfg.seq_len is not None else cfg.model.block_size

    torch.manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())

    model, collector = build_model(cfg.model, cfg.gns, device)
    optimizer = make_optimizer(model, cfg.optim, device)
    schedule = build_schedule(cfg.schedule)
    micro = cfg.schedule.micro_batch_size
    max_steps = cfg.max_steps if cfg.max_steps is not None else sys.maxsize
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else sys.maxsize
    total_tokens = min(max_tokens, max_steps * schedule.max_batch_size() * seq_len)

    step, tokens = 0, 0
    ema_state = None
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, tokens, ema_state = ckpt["step"], ckpt["tokens"], ckpt.get("ema")
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        if d.main:
            print(f"resuming {out} from step {step} ({_fmt_count(tokens)} tokens)", flush=True)
            for key, (old, new) in changed.items():
                print(f"  {key}: {old} -> {new} from step {step + 1} on", flush=True)

    n_params = model.num_params()
    flops_per_token = model.flops_per_token(seq_len)
    peak = peak_flops(device)
    if d.main:
        print(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters | device {device} x{d.world_size} | "
              f"{str(dtype).removeprefix('torch.')} | gns={cfg.gns.mode} | out {out}", flush=True)

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    ddp = None
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        model = ddp

    from gnsrepro.gns import EMAGNS, gtg_estimate, trsigma_estimate
    from gnsrepro.gns_tracker import GNSTracker

    tracker = None
    if cfg.gns.mode != "off":
        tracker = GNSTracker(raw_model, collector, max_micro_steps=schedule.max_batch_size() // (micro * d.world_size),
                             world_size=d.world_size, per_layer=cfg.gns.per_layer)
        if ddp is not None:
            ddp.register_comm_hook(None, tracker.ddp_comm_hook)
        if collector is not None:
            collector.attach(micro)
    ema = EMAGNS(cfg.gns.ema_alpha)  # console only: the logs keep the raw components
    smoothed: dict[tuple[str, str], float] = {}
    if ema_state:
        ema.load_state_dict(ema_state)
    params = [p for p in raw_model.parameters() if p.requires_grad]

    metrics_log = gns_log = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        meta = "meta.json" if step == 0 else f"meta-resumed-at-{step}.json"  # the first start's is kept
        record = run_metadata(device, d.world_size)
        if step:
            record["changed_settings"] = {k: {"before": old, "after": new} for k, (old, new) in changed.items()}
        (out / meta).write_text(json.dumps(record, indent=2, default=str))
        resume_step = step if cfg.resume else None
        metrics_log = ParquetLog(out / "metrics.parquet", resume_step=resume_step if resume_step else -1)
        gns_log = ParquetLog(out / "gns.parquet", resume_step=resume_step if resume_step else -1)

    # a fixed validation set of eval_batches x micro sequences, shared out over the ranks
    val_offsets = batch_offsets(len(val_tokens), seq_len, cfg.eval_batches * micro, cfg.seed + EVAL_SEED_OFFSET, 0)
    val_mine = val_offsets[d.rank::d.world_size]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, device=device)  # (sum of sequence losses, sequences)
        for i in range(0, len(val_mine), micro):
            x, y = read_batch(val_tokens, val_mine[i:i + micro], seq_len, device)
            with autocast:
                total[0] += raw_model(x, y)[1].float() * len(x)
            total[1] += len(x)
        if d.world_size > 1:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    def save_checkpoint() -> None:
        if d.main:
            _atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                          "tokens": tokens, "ema": ema.state_dict(), "rng_cpu": torch.get_rng_state(),
                          "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                          "config": OmegaConf.to_container(cfg, resolve=True)}, ckpt_path)
            metrics_log.flush()
            gns_log.flush()

    pending: list[dict] = []  # this log interval's metric rows, with device tensors until the flush
    t_last = time.perf_counter()
    t_start, tokens_start = t_last, tokens

    flushing = False  # inside flush_logs (an interrupt there must not log the rows twice)

    def flush_logs(val_loss: float | None = None) -> None:
        """Fetch the interval's losses and GNS components (one transfer each), log, print one line.

        A non-finite loss logs the steps before it, then stops the run with DivergedError.
        """
        nonlocal pending, flushing
        if not pending:
            return
        flushing = True
        losses = torch.stack([r["loss"] for r in pending]).float().cpu().tolist()
        gns_values = tracker.drain() if tracker is not None else None
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            bad_step = pending[bad]["step"]
            pending, losses = pending[:bad], losses[:bad]
            gns_values = gns_values[:bad] if gns_values is not None else None
        for r, v in zip(pending, losses):
            r["loss"] = v
        if d.main and pending:
            metrics_log.append(pending)
            if gns_values is not None:
                rows = []
                for i, r in enumerate(pending):
                    for row in tracker.rows:
                        s = tracker.sources.index(row.source)
                        small, big = gns_values[i, s, 0, row.column].item(), gns_values[i, s, 1, row.column].item()
                        if math.isnan(small):  # no small batches from this source on this step
                            continue
                        b_small = tracker.b_small(row.source, r["batch_size"], micro)
                        rows.append({"step": r["step"], "tokens": r["tokens"], "group": row.group,
                                     "source": row.source, "b_big": r["batch_size"], "b_small": b_small,
                                     "sqnorm_big": big, "sqnorm_small": small})
                for row in rows:
                    row["gtg"] = gtg_estimate(row["b_big"], row["sqnorm_big"], row["b_small"], row["sqnorm_small"])
                    row["trsigma"] = trsigma_estimate(row["b_big"], row["sqnorm_big"], row["b_small"],
                                                      row["sqnorm_small"])
                    smoothed[(row["source"], row["group"])] = ema.update(f"{row['source']}/{row['group']}",
                                                                         row["gtg"], row["trsigma"])
                gns_log.append(rows)
            metrics_log.flush()
            gns_log.flush()
            last = pending[-1]
            # throughput over the interval: on a GPU one step's host time is not its device time (the
            # host runs ahead, then waits at the flush), but an interval's sum is
            tok_s = sum(r["tokens_per_s"] * r["step_time_s"] for r in pending) / sum(r["step_time_s"] for r in pending)
            line = (f"step {last['step']:>6} | tokens {_fmt_count(last['tokens']):>7} | loss {last['loss']:.4f} | "
                    f"lr {last['lr']:.2e} | bs {last['batch_size']} | {_fmt_count(tok_s)} tok/s")
            if peak:
                line += f" | mfu {100 * flops_per_token * tok_s / (peak * d.world_size):.1f}%"
            if val_loss is not None:
                line += f" | val {val_loss:.4f}"
            if tracker is not None:
                source = tracker.sources[0]  # per_example when instrumented, else microbatch or ddp
                shown = [(g, smoothed[(source, g)]) for g in ("total", "layernorm") if (source, g) in smoothed]
                line += f" | gns({source}, ema {cfg.gns.ema_alpha}) " + " ".join(f"{g} {v:.4g}" for g, v in shown)
            elapsed = time.perf_counter() - t_start
            done = (last["tokens"] - tokens_start) / max(1, total_tokens - tokens_start)
            if 0 < done < 1:
                line += f" | eta {_fmt_time(elapsed / done * (1 - done))}"
            print(line, flush=True)
        pending = []
        flushing = False
        if bad is not None:
            if ckpt_path.exists():
                how = (f"the last checkpoint is kept: 'gnsrepro train out_dir={out} resume=true optim.lr=...' "
                       "continues from it with a lower learning rate")
            else:
                how = "no checkpoint was written yet: start again with a lower optim.lr or more optim.warmup_tokens"
            raise DivergedError(f"the loss is not finite at step {bad_step}; stopping ({how})")

    model.train()
    try:
        while step < max_steps and tokens < max_tokens:
            batch_size = schedule.batch_size(step, tokens)
            if batch_size % (micro * d.world_size):
                raise ConfigError(f"the batch schedule asked for {batch_size} sequences at step {step}, not a "
                                  f"multiple of schedule.micro_batch_size x world size = {micro * d.world_size}")
            accum = batch_size // (micro * d.world_size)
            lr = lr_at(tokens, cfg.optim, total_tokens)
            for group in optimizer.param_groups:
                group["lr"] = lr
            offsets = batch_offsets(len(train_tokens), seq_len, batch_size, cfg.seed, step)
            local = offsets[d.rank * micro * accum:(d.rank + 1) * micro * accum]
            if tracker is not None:
                tracker.begin_step(accum)
            loss_sum = torch.zeros((), device=device)
            for k in range(accum):
                x, y = read_batch(train_tokens, local[k * micro:(k + 1) * micro], seq_len, device)
                sync = ddp is None or k == accum - 1  # DDP all-reduces on the last micro-batch only
                with nullcontext() if sync else ddp.no_sync():
                    with autocast:
                        _, loss = model(x, y)
                    if tracker is not None:
                        tracker.before_backward(k)
                    (loss / accum).backward()
                if tracker is not None:
                    tracker.after_backward(k)
                loss_sum += loss.detach()
            sq = grad_sqnorms(params)
            clip_by_total_norm(params, sq, cfg.optim.grad_clip)
            if tracker is not None:
                tracker.end_step(batch_size, micro, sq)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_step = loss_sum / accum
            if d.world_size > 1:
                dist.all_reduce(loss_step)
                loss_step /= d.world_size
            step += 1
            tokens += batch_size * seq_len
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            tok_s = batch_size * seq_len / dt
            pending.append({"step": step, "tokens": tokens, "batch_size": batch_size, "lr": lr, "loss": loss_step,
                            "val_loss": None, "step_time_s": dt, "tokens_per_s": tok_s,
                            "mfu": flops_per_token * tok_s / (peak * d.world_size) if peak else float("nan")})
            last_step = step >= max_steps or tokens >= max_tokens
            val_loss = None
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or last_step:
                val_loss = evaluate()
                pending[-1]["val_loss"] = val_loss
            if step % cfg.log_interval == 0 or val_loss is not None or last_step:
                flush_logs(val_loss)
            if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or last_step:
                flush_logs()
                save_checkpoint()
            t_last = time.perf_counter()  # the next step's time leaves out evaluation, logging and checkpoints
    except KeyboardInterrupt:
        if not flushing:
            flush_logs()  # every finished step (a resumed run logs the steps after its checkpoint again)
        if d.main:
            print(f"interrupted after step {step}; logs hold every finished step, and resume=true continues "
                  "from the last checkpoint", flush=True)
        raise
    if d.main:
        print(f"done: {step} steps, {_fmt_count(tokens)} tokens; logs in {out}", flush=True)
    if d.world_size > 1:
        dist.barrier()
    return out
