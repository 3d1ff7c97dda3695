"""Training settings: the checks that run before any work, and what a resumed run may change.

`validate` rejects a bad setting with one line naming it and what it accepts (gnsrepro.errors.ConfigError),
before any data is read or model built. `resume_settings` merges a run's saved settings with the command line's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gnsrepro.config import SCHEDULE_SCHEMAS, TrainConfig
from gnsrepro.data.tokenizer import EOT
from gnsrepro.errors import ConfigError
from gnsrepro.gns import PARAM_GROUPS
from gnsrepro.gns_tracker import SOURCES
from gnsrepro.model import ATTENTIONS, LOSS_KERNELS, SDPA_BACKENDS
from gnsrepro.schedule import LR_SCALINGS, SCHEDULES

VOCAB = EOT + 1  # token ids of every prepared data set (GPT-2 BPE) are below this

DATA_NAMES = ("pycode", "openwebtext", "textdir")
GNS_MODES = ("off", "ln", "all")
LINEAR_METHODS = ("auto", "simultaneous", "ghost")
LN_BACKENDS = ("auto", "torch", "triton")
LINEAR_BACKENDS = ("auto", "torch", "triton")
DTYPE_NAMES = ("float32", "bfloat16")


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
    limit = cfg.data.vocab_limit  # the data set's token ids are below it (gnsrepro.data.prepare.vocab_table)
    need(limit is None or 2 <= limit <= VOCAB,
         f"data.vocab_limit={limit} must be in [2, {VOCAB}] (tokens kept, the rare one included) or null (GPT-2's)")
    need(m.vocab_size >= (limit or VOCAB),
         f"model.vocab_size={m.vocab_size} must be >= {VOCAB} (the GPT-2 tokens of the data)" if limit is None else
         f"model.vocab_size={m.vocab_size} must be >= data.vocab_limit={limit} (the token ids of its data set)")
    need(0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1)")
    need(all(0 <= b < m.n_layer for b in m.cosine_attn_blocks),
         f"model.cosine_attn_blocks={list(m.cosine_attn_blocks)} must name blocks in [0, {m.n_layer})")
    need(m.attention in ATTENTIONS, f"model.attention={m.attention!r} is not known; accepted: {', '.join(ATTENTIONS)} "
         "(F.scaled_dot_product_attention's fused kernels, or attention written out in float32)")
    need(m.sdpa_backend in SDPA_BACKENDS, f"model.sdpa_backend={m.sdpa_backend!r} is not known; accepted: "
         f"{', '.join(SDPA_BACKENDS)} (auto: cuDNN's first on a Hopper GPU, else the kernel PyTorch picks)")
    need(m.loss_kernel in LOSS_KERNELS, f"model.loss_kernel={m.loss_kernel!r} is not known; accepted: "
         f"{', '.join(LOSS_KERNELS)} (auto: the fused Triton cross-entropy on CUDA, F.cross_entropy elsewhere)")
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
    validate_schedule(cfg, world_size)
    need(g.mode in GNS_MODES, f"gns={g.mode!r} is not known; accepted: {', '.join(GNS_MODES)}")
    need(g.method in LINEAR_METHODS, f"gns.method={g.method!r} is not known; accepted: {', '.join(LINEAR_METHODS)}")
    need(g.ln_backend in LN_BACKENDS,
         f"gns.ln_backend={g.ln_backend!r} is not known; accepted: {', '.join(LN_BACKENDS)}")
    need(g.linear_backend in LINEAR_BACKENDS,
         f"gns.linear_backend={g.linear_backend!r} is not known; accepted: {', '.join(LINEAR_BACKENDS)}")
    need(g.mode == "off" or s.batch_size >= 2 or s.name != "constant",
         f"gns={g.mode} needs schedule.batch_size >= 2 (got {s.batch_size}): the GNS compares the gradients of "
         "smaller batches within each step's batch")
    need(0 <= g.ema_alpha < 1, f"gns.ema_alpha={g.ema_alpha} must be in [0, 1)")
    need(g.chunk_size >= 0, f"gns.chunk_size={g.chunk_size} must be >= 0 (0: automatic)")
    need(g.chunk_mb >= 1, f"gns.chunk_mb={g.chunk_mb} must be >= 1 (MiB of per-example gradients a chunk)")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    need(g.mode == "off" or g.ln_backend != "triton" or not on_cpu or os.environ.get("TRITON_INTERPRET") == "1",
         "gns.ln_backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's slow CPU interpreter); "
         "use gns.ln_backend=auto or torch on a CPU")
    need(g.mode != "all" or g.linear_backend != "triton" or not on_cpu or os.environ.get("TRITON_INTERPRET") == "1",
         "gns.linear_backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's slow CPU interpreter); "
         "use gns.linear_backend=torch on a CPU")
    need(m.loss_kernel != "triton" or not on_cpu or os.environ.get("TRITON_INTERPRET") == "1",
         "model.loss_kernel=triton needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's slow CPU interpreter); "
         "use model.loss_kernel=auto or torch on a CPU")
    need(cfg.dtype in ("auto", *DTYPE_NAMES),
         f"dtype={cfg.dtype!r} is not known; accepted: auto, {', '.join(DTYPE_NAMES)}")
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
         f"device={cfg.device!r} is not known; accepted: auto, cpu, cuda, cuda:N")
    need(not cfg.device.startswith("cuda") or torch.cuda.is_available(),
         f"device={cfg.device!r} but no CUDA GPU is visible; use device=auto or device=cpu")
    graphs = str(cfg.cuda_graphs).lower()
    need(graphs in ("auto", "true", "false"),
         f"cuda_graphs={cfg.cuda_graphs!r} is not known; accepted: auto, true, false")
    need(graphs != "true" or (not on_cpu and world_size == 1 and m.dropout == 0),
         f"cuda_graphs=true needs one CUDA GPU and model.dropout=0 (here: {'CPU' if on_cpu else 'CUDA'}, world size "
         f"{world_size}, dropout {m.dropout}); use cuda_graphs=auto, which captures only where it can")
    for key in ("log_interval", "eval_batches"):
        need(cfg[key] > 0, f"{key}={cfg[key]} must be a positive integer")
    for key in ("eval_interval", "checkpoint_interval"):
        need(cfg[key] >= 0, f"{key}={cfg[key]} must be >= 0 (0 disables)")


def validate_schedule(cfg: TrainConfig | DictConfig, world_size: int = 1) -> None:
    """The batch-size schedule's own settings (gnsrepro.schedule), each with a one-line error."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    s, per_step = cfg.schedule, cfg.schedule.micro_batch_size * world_size
    need(s.lr_scaling in LR_SCALINGS,
         f"schedule.lr_scaling={s.lr_scaling!r} is not known; accepted: {', '.join(LR_SCALINGS)}")
    need(s.lr_reference_batch is None or s.lr_reference_batch > 0,
         f"schedule.lr_reference_batch={s.lr_reference_batch} must be a positive integer (or null: batch_size)")

    def batch(key: str, value: int | None) -> None:
        need(value is None or (0 < value <= s.batch_size and value % per_step == 0),
             f"schedule.{key}={value} must be a multiple of schedule.micro_batch_size x world size = {per_step} "
             f"from {per_step} to schedule.batch_size={s.batch_size}")

    if s.name == "linear":
        batch("start", s.start)
        need(s.ramp_tokens is None or s.ramp_tokens > 0, f"schedule.ramp_tokens={s.ramp_tokens} must be positive")
    if s.name == "gns":
        g = cfg.gns
        need(g.mode != "off", "schedule=gns follows the measured GNS, but gns=off measures none: set gns=ln or "
             "gns=all")
        batch("min_batch_size", s.min_batch_size)
        need(s.multiplier > 0 and math.isfinite(s.multiplier), f"schedule.multiplier={s.multiplier} must be > 0")
        need(s.total_ratio is None or s.total_ratio > 0, f"schedule.total_ratio={s.total_ratio} must be > 0")
        need(s.interval >= 1, f"schedule.interval={s.interval} must be a positive integer (steps)")
        need(s.max_factor > 1, f"schedule.max_factor={s.max_factor} must be > 1")
        need(s.warmup_steps >= 0, f"schedule.warmup_steps={s.warmup_steps} must be >= 0")
        need(s.source in SOURCES, f"schedule.source={s.source!r} is not known; accepted: {', '.join(SOURCES)}")
        groups = (*PARAM_GROUPS, "total")
        need(s.group in groups, f"schedule.group={s.group!r} is not known; accepted: {', '.join(groups)}")
        need(not (s.source == "per_example" and g.mode == "ln" and s.group != "layernorm"),
             f"schedule.group={s.group} with gns=ln: the per_example source sees the LayerNorm parameters only "
             "(schedule.group=layernorm, or gns=all)")
        need(s.source != "ddp" or world_size > 1, "schedule.source=ddp needs two or more ranks (torchrun)")
        low = s.min_batch_size if s.min_batch_size is not None else per_step
        need(s.source != "microbatch" or s.batch_size >= 2 * per_step,
             f"schedule.source=microbatch needs schedule.batch_size >= 2 micro-batches x ranks = {2 * per_step}")
        need(s.source != "microbatch" or low >= 2 * per_step,
             f"schedule.source=microbatch needs schedule.min_batch_size >= {2 * per_step}: a step of one micro-batch "
             "per rank measures no microbatch GNS")


# Resuming: settings that define what is trained and measured cannot change (the checkpoint would not
# fit, or the logs would mix two experiments); those that only say how long the run goes and how it logs
# and executes change quietly; any other change (learning rate, batch size, ...) is allowed, as when a
# diverged run is restarted from its last checkpoint with a lower learning rate, and is announced.
FIXED_ON_RESUME = ("model", "data.name", "data.path", "data.max_bytes", "data.val_fraction", "data.hf_dataset",
                   "data.vocab_limit", "seq_len", "gns.mode", "gns.per_layer")
QUIET_ON_RESUME = ("max_steps", "max_tokens", "eval_interval", "log_interval", "checkpoint_interval", "compile",
                   "device", "prepare_missing", "resume", "out_dir", "run_name", "data.data_dir", "data.num_proc",
                   "gns.ema_alpha", "gns.outlier_guard", "gns.ln_backend", "gns.method", "gns.chunk_size",
                   "gns.chunk_mb", "gns.linear_backend")
# where the run lives: always the run's own (a default run_name is the start time, new at every command)
KEPT_ON_RESUME = ("run_name", "out_dir")
# once the GNS drives the batch, the schedule and the smoothing that feeds it define the experiment
FIXED_WITH_GNS_SCHEDULE = ("schedule", "gns.ema_alpha", "gns.outlier_guard")


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
    base = OmegaConf.structured(TrainConfig)
    saved_schedule = saved.get("schedule", {}).get("name", "constant")
    if saved_schedule in SCHEDULE_SCHEMAS:  # each schedule has its own settings class
        base.schedule = OmegaConf.structured(SCHEDULE_SCHEMAS[saved_schedule])
    try:
        merged = OmegaConf.merge(base, saved)
    except Exception as e:  # noqa: BLE001 - an omegaconf error naming the unknown key or bad value
        raise ConfigError(f"{out / 'config.yaml'} does not fit this version's settings: {e}") from None
    now = _leaves(OmegaConf.to_container(cfg, resolve=True))
    then = _leaves(OmegaConf.to_container(merged, resolve=True))
    keys = tuple({o.split("=", 1)[0].lstrip("+~") for o in given}) if given is not None else ()
    # a group override without a key of its own (experiment=111M, scale=tiny) may set any setting
    every = given is None or any(k not in now and not any(n.startswith(k + ".") for n in now) for k in keys)
    fixed_keys = FIXED_ON_RESUME + (FIXED_WITH_GNS_SCHEDULE if saved_schedule == "gns" else ())
    fixed, changed = [], {}
    if now.get("schedule.name") != then.get("schedule.name") and (every or _matches("schedule.name", keys)) \
            and not _matches("schedule", fixed_keys):
        merged.schedule = cfg.schedule  # another schedule: its own settings replace the old one's
    for key in sorted(now):
        if key in then and now[key] == then[key] or not (every or _matches(key, keys)) or key in KEPT_ON_RESUME:
            continue
        if _matches(key, fixed_keys):
            fixed.append(f"{key}={now[key]} (the run's: {then.get(key)})")
            continue
        OmegaConf.update(merged, key, now[key], merge=False)
        if not _matches(key, QUIET_ON_RESUME):
            changed[key] = (then.get(key), now[key])
    if fixed:
        raise ConfigError(f"resume=true continues the run in {out} ({out / 'config.yaml'}), but "
                          f"{', '.join(fixed[:4])}{' and more' if len(fixed) > 4 else ''}: the model, data, context "
                          "and what is measured (and a GNS-driven schedule with its smoothing) cannot change within a "
                          "run. Drop "
                          f"{'them' if len(fixed) > 1 else 'it'}, or start a new run in another out_dir")
    return merged, changed


