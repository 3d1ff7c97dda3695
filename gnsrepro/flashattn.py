"""`gnsrepro flashattn experiment=flashattn/tiny`: fused against plain attention in a teacher/student experiment.

Gray et al. 2024 (arXiv 2411.00999, appendix, p. 18) report that training diverged with flash (fused) attention,
study it with a teacher network whose attention QKV bias has noise added and students trained to match it, one
with fused attention and one without, and fix it with L2-normalised ("cosine") query and key in the first block
(`model.cosine_attn_blocks=[0]`). This command rebuilds that experiment; docs/flashattn.md has the commands.

The design, for each sigma of `sigmas`:
1. The teacher: the GPT of `model` from `torch.manual_seed` of the seed (`init_seed(seed, TEACHER)`), float32,
   with N(0, sigma²) added to its c_attn biases: every entry (`noise=qkv`, the query, key and value biases: the
   paper's "QKV bias") or the query and key thirds (`noise=qk`). A query bias b_q and key bias b_k of std sigma
   give attention logits whose size grows as sigma² (b_q·b_k over head_dim terms, times 1/sqrt(head_dim));
   `teacher_logit_max` logs the largest |logit| on a batch. The noise is one standard-normal draw scaled by sigma,
   the same for every sigma, so the teachers differ by sigma alone.
2. Its targets: the teacher's next-token distributions p = softmax(c · z) on random token sequences (uniform
   over the vocabulary), c scaling its logits z to `teacher_logit_std` (their spread about each position's mean,
   measured once on a batch of its own): a GPT's initial output logits have a std of about 0.02·sqrt(n_embd),
   whose softmax is nearly uniform and would leave the students little to learn.
3. Two students from one initialisation (`init_seed(seed, STUDENT)`): with `student_init=noisy` (the default)
   it gets its own N(0, sigma²) draw on the same biases, so that the students' own attention logits are as large
   as the teacher's from the first step (a student of the plain init, `student_init=fresh`, would need far more
   steps than a short run has to grow biases of that size); they differ only in `model.attention`: `sdpa`
   (F.scaled_dot_product_attention, the flash kernel on a GPU) and `math` (the same attention written out in
   float32, `gnsrepro.model.math_attention`).
4. Both are trained in lock step on the same sequences for `steps` AdamW steps of the project's settings
   (`optim`: β, weight decay on matrices, clipping, the warm-up and linear decay in tokens; `gnsrepro.train`'s
   optimizer and clipping), each minimising the mean over tokens of KL(p_teacher ‖ p_student) (the distillation
   loss of Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", with soft targets; it is the
   cross-entropy to the soft targets less their entropy, so it is 0 at a perfect match and has the same
   gradient), under bf16 autocast on a GPU (`dtype`; float32 on a CPU unless dtype=bfloat16).
5. Per step and student: the loss, the unclipped gradient norm, the learning rate, and the relative distance of
   the two students' parameters, ‖θ_sdpa − θ_math‖ / ‖θ_math‖ (over every parameter, after the step's update).
   A student whose loss is non-finite or above `divergence_loss` (default ln(vocab_size): worse than predicting
   the uniform distribution, whose KL to any target is at most ln V) is marked diverged at that step and stops;
   the distance is NaN from then on.

`<out_dir>/flashattn.parquet` (COLUMNS), `config.yaml` (the resolved settings) and `meta.json` (device, dtype,
torch version, seconds) hold the result; `gnsrepro plot figure=flashattn run=<out_dir>` draws it. A second
command with the same settings on the same kind of device and dtype keeps the table (force=true runs it again).

What it shows: how far fused attention's rounding moves training away from float32 attention given identical
inputs (both students' q, k, v come out of the same autocast matmuls, so the two differ only inside the
attention kernel), and how that depends on the attention logits' size (sigma), at the model, precision and
number of steps run. In float32 on a CPU the two agree to rounding (distances of 1e-6 to 5e-5 after 100 steps);
under bf16 the flash kernel rounds the softmax's probabilities to bf16 before their product with v (Dao et al.
2022, "FlashAttention", algorithm 1), and on an H200 the students moved 1-13% apart in 300 steps (docs/
flashattn.md has the numbers). With `noise=qkv` the value-bias noise adds one large constant vector to every
position's residual stream, which then dominates it: the teacher's output hardly depends on its input and both
students learn that near-constant target, so the small scale uses `noise=qk`. What it does not show: that a long
run diverges (the paper's runs were of a 111M model over many steps; a run here is minutes), nor which rounding
inside the kernel is at fault: Golden et al. 2024 ("Is Flash Attention Stable?") measure flash attention's numeric
deviation, and Qiu and Yao 2025 ("Why Low-Precision Transformer Training Fails: An Analysis on Flash Attention")
trace such a divergence to biased bf16 rounding in its P·V product.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gnsrepro.errors import ConfigError

COLUMNS = ("sigma", "attention", "step", "lr", "loss", "grad_norm", "distance", "diverged", "teacher_logit_max")
TABLE_NAME = "flashattn.parquet"
STUDENTS = ("sdpa", "math")  # the distance is ‖θ_0 − θ_1‖ / ‖θ_1‖: from the fused student to the reference
NOISE = {"qkv": "the query, key and value biases (the paper's QKV bias)",
         "qk": "the query and key biases only (the value's kept: the teacher's output keeps depending on its input)"}
STUDENT_INITS = {"noisy": "the plain init plus its own N(0, sigma²) on the c_attn biases",
                 "fresh": "the plain GPT init"}
# the random streams of one seed: inits through torch.manual_seed, the rest through their own generators
TEACHER, STUDENT, TEACHER_NOISE, STUDENT_NOISE, TOKENS, CALIBRATION = range(6)
_STREAMS = 8


def init_seed(seed: int, stream: int) -> int:
    """The seed of one random stream of `seed` (TEACHER, STUDENT, ...): distinct for every (seed, stream)."""
    return seed * _STREAMS + stream


def generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(init_seed(seed, stream))


# ---- the pieces ---------------------------------------------------------------------------------------------
def add_bias_noise(model: torch.nn.Module, sigma: float, gen: torch.Generator, noise: str = "qkv") -> None:
    """Add sigma · N(0, 1) to every entry of every block's attention c_attn bias, in place: its query, key and
    value thirds (noise="qkv"), or the query and key thirds only ("qk").

    The standard-normal draws come from `gen` on the CPU in block order, a whole bias each (the value third's
    drawn and dropped for "qk"), so one generator state gives the same direction for every sigma and mode.
    """
    if noise not in NOISE:
        raise ValueError(f"noise={noise!r} is not known; accepted: {', '.join(NOISE)}")
    with torch.no_grad():
        for block in model.transformer.h:
            bias = block.attn.c_attn.bias
            draw = torch.randn(bias.shape, generator=gen, dtype=torch.float32)
            if noise == "qk":
                draw[2 * block.attn.n_embd:] = 0
            bias.add_((sigma * draw).to(device=bias.device, dtype=bias.dtype))


def attention_logit_max(model: torch.nn.Module, x: torch.Tensor) -> float:
    """max |q·k · scale| over every block, head and causal (query, key) pair of `model` on the tokens x: the
    attention logits that softmax sees (cosine blocks: unit q, k and scale sqrt(head_dim), as the model's)."""
    qkv = []
    hooks = [block.attn.c_attn.register_forward_hook(lambda _m, _i, out: qkv.append(out.detach().float()))
             for block in model.transformer.h]
    try:
        with torch.no_grad():
            model(x, x)
    finally:
        for hook in hooks:
            hook.remove()
    largest = 0.0
    for block, out in zip(model.transformer.h, qkv):
        B, T, C3 = out.shape
        heads, hs = block.attn.n_head, C3 // 3 // block.attn.n_head
        q, k, _ = (t.reshape(B, T, heads, hs).transpose(1, 2) for t in out.split(C3 // 3, dim=2))
        scale = 1 / math.sqrt(hs)
        if block.attn.cosine:
            q, k, scale = F.normalize(q, dim=-1), F.normalize(k, dim=-1), math.sqrt(hs)
        logits = (q @ k.transpose(-2, -1)) * scale
        causal = torch.ones(T, T, dtype=torch.bool, device=out.device).tril()
        largest = max(largest, float(logits.abs().masked_fill(~causal, 0).max()))
    return largest


def all_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (B, T, V) next-token logits of every position. GPT.forward returns them only with targets, so x
    itself is passed as targets and the cross-entropy it computes against them is left unused."""
    return model(x, x)[0]


def teacher_scale(teacher: torch.nn.Module, x: torch.Tensor, logit_std: float) -> float:
    """c such that c · z has a std of `logit_std` about each position's mean, z the teacher's logits on x."""
    with torch.no_grad():
        z = all_logits(teacher, x).double()
        spread = float((z - z.mean(dim=-1, keepdim=True)).std())
    return logit_std / spread


def distillation_loss(student_logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), p = exp(target_logp) the teacher's
    distribution, q = softmax(student_logits) the student's; in float32 (at least) whatever the logits' dtype."""
    logq = F.log_softmax(student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)), dim=-1)
    return (target_logp.exp() * (target_logp - logq)).sum(dim=-1).mean()


def relative_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """‖θ_a − θ_b‖ / ‖θ_b‖ over every parameter (in their order), summed in float64."""
    diff = ref = 0.0
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            diff += float((pa.double() - pb.double()).square().sum())
            ref += float(pb.double().square().sum())
    return math.sqrt(diff) / math.sqrt(ref)


def train_students(teacher: torch.nn.Module, students: Sequence[torch.nn.Module], batches: Sequence[torch.Tensor],
                   optim, scale: float, dtype: torch.dtype = torch.float32,
                   divergence_loss: float = math.inf) -> pd.DataFrame:
    """Train the students in lock step on `batches` (one (B, T) token tensor per step) to the teacher's soft
    targets softmax(scale · z_teacher); returns one row per step and student: attention (the student's
    model.attention), student (its index), step (1, 2, ...), lr, loss (`distillation_loss` before the step's
    update), grad_norm (unclipped), distance (`relative_distance(students[0], students[-1])` after the update;
    NaN once a student diverged) and diverged.

    optim: the project's AdamW settings (gnsrepro.config.OptimConfig); the learning rate follows
    gnsrepro.train.lr_at over the tokens of all batches. A loss that is non-finite or above divergence_loss marks
    the student diverged at that step; it takes no update then and no step after. The teacher runs in float32
    without autocast; the students under bf16 autocast when dtype is bfloat16.
    """
    from gnsrepro.train import clip_by_total_norm, grad_sqnorms, lr_at, make_optimizer

    device = next(teacher.parameters()).device
    optimizers = [make_optimizer(s, optim, device) for s in students]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    tokens_per_step = batches[0].numel() if len(batches) else 0
    total_tokens = tokens_per_step * len(batches)
    active = [True] * len(students)
    rows = []
    teacher.eval()
    for s in students:
        s.train()
    for step, x in enumerate(batches, 1):
        lr = lr_at((step - 1) * tokens_per_step, optim, total_tokens)
        with torch.no_grad():
            target_logp = F.log_softmax(scale * all_logits(teacher, x).float(), dim=-1)
        stepped = []
        for i, (student, optimizer) in enumerate(zip(students, optimizers)):
            if not active[i]:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                logits = all_logits(student, x)
            loss = distillation_loss(logits, target_logp)
            loss.backward()
            params = [p for p in student.parameters() if p.grad is not None]
            grad_norm = clip_by_total_norm(params, grad_sqnorms(params), optim.grad_clip)
            loss_value, norm_value = float(loss.detach()), float(grad_norm)
            diverged = not math.isfinite(loss_value) or loss_value > divergence_loss
            if diverged:
                active[i] = False
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stepped.append({"attention": student.config.attention, "student": i, "step": step, "lr": lr,
                            "loss": loss_value, "grad_norm": norm_value, "diverged": diverged})
        distance = relative_distance(students[0], students[-1]) if all(active) else math.nan
        rows += [{**row, "distance": distance} for row in stepped]
        if not any(active):
            break
    columns = ["attention", "student", "step", "lr", "loss", "grad_norm", "distance", "diverged"]
    return pd.DataFrame(rows, columns=columns)


# ---- the command --------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What `run_flashattn` checked before any work, and computes from."""

    out: Path
    sigmas: list[float]
    device: torch.device
    dtype: torch.dtype
    seq_len: int
    divergence_loss: float
    settings: dict  # the resolved settings as config.yaml records them (force left out)


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_settings(cfg) -> _Plan:
    """Every check of `gnsrepro flashattn` before any work; ConfigError (one line) for a bad setting. The model,
    optimizer, context, seed, device and dtype settings get the training command's checks (settings.validate)."""
    from omegaconf import OmegaConf

    from gnsrepro.config import TrainConfig
    from gnsrepro.settings import VOCAB, validate
    from gnsrepro.train import resolve_dtype

    sigmas = [cfg.sigmas] if _number(cfg.sigmas) else list(cfg.sigmas or [])
    if not sigmas or not all(_number(s) and s >= 0 for s in sigmas) or len(set(sigmas)) != len(sigmas):
        raise ConfigError(f"sigmas={sigmas} must be a non-empty list of distinct numbers >= 0 (the std of the noise "
                          "on the teacher's c_attn biases), e.g. sigmas=[0,1,4,16]")
    if cfg.noise not in NOISE:
        raise ConfigError(f"noise={cfg.noise!r} is not known; accepted: "
                          + ", ".join(f"{k} ({v})" for k, v in NOISE.items()))
    if cfg.student_init not in STUDENT_INITS:
        raise ConfigError(f"student_init={cfg.student_init!r} is not known; accepted: "
                          + ", ".join(f"{k} ({v})" for k, v in STUDENT_INITS.items()))
    for key in ("steps", "batch_size"):
        if isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer")
    if not (_number(cfg.teacher_logit_std) and cfg.teacher_logit_std > 0):
        raise ConfigError(f"teacher_logit_std={cfg.teacher_logit_std} must be a positive number (the std the "
                          "teacher's output logits are scaled to)")
    if cfg.divergence_loss is not None and not (_number(cfg.divergence_loss) and cfg.divergence_loss > 0):
        raise ConfigError(f"divergence_loss={cfg.divergence_loss} must be a positive number, or null for "
                          "ln(model.vocab_size)")
    m = cfg.model
    if not m.bias:
        raise ConfigError("model.bias=false: the experiment adds its noise to the attention's c_attn biases; set "
                          "model.bias=true")
    if m.dropout != 0:
        raise ConfigError(f"model.dropout={m.dropout} must be 0: the two students must see the same computation "
                          "but for the attention kernel, and their dropout masks would differ")
    if m.vocab_size < 2:
        raise ConfigError(f"model.vocab_size={m.vocab_size} must be at least 2")
    if str(cfg.out_dir) == "" or Path(str(cfg.out_dir)).is_file():
        raise ConfigError(f"out_dir={cfg.out_dir} must name a directory (it gets {TABLE_NAME}, config.yaml, "
                          "meta.json)")
    # the training command's checks of the settings this one shares with it, in a training config that holds
    # them (the rest valid: one batch of batch_size sequences, a data set whose vocabulary fits the model)
    shared = OmegaConf.merge(OmegaConf.structured(TrainConfig), {
        "model": cfg.model, "optim": cfg.optim, "seq_len": cfg.seq_len, "seed": cfg.seed, "device": cfg.device,
        "dtype": cfg.dtype, "max_steps": cfg.steps, "schedule": {"batch_size": cfg.batch_size,
                                                                 "micro_batch_size": cfg.batch_size},
        "data": {"vocab_limit": min(m.vocab_size, VOCAB)}})
    validate(shared)
    device = _device(str(cfg.device))
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.pop("force", None)
    return _Plan(out=Path(str(cfg.out_dir)).expanduser(), sigmas=[float(s) for s in sigmas], device=device,
                 dtype=resolve_dtype(cfg.dtype, device),
                 seq_len=int(cfg.seq_len if cfg.seq_len is not None else m.block_size),
                 divergence_loss=float(cfg.divergence_loss if cfg.divergence_loss is not None
                                       else math.log(m.vocab_size)),
                 settings=settings)


def _kept(plan: _Plan) -> pd.DataFrame | None:
    """The table in plan.out when it was computed with these settings on this kind of device and dtype."""
    from omegaconf import OmegaConf

    table, config, meta = plan.out / TABLE_NAME, plan.out / "config.yaml", plan.out / "meta.json"
    if not (table.is_file() and config.is_file() and meta.is_file()):
        return None
    try:
        saved = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        saved_meta = json.loads(meta.read_text())
        df = pd.read_parquet(table)
    except Exception:  # noqa: BLE001 - an unreadable file is a reason to run again, not an error
        return None
    saved.pop("force", None)
    same = (saved == plan.settings and saved_meta.get("device_type") == plan.device.type
            and saved_meta.get("dtype") == str(plan.dtype).removeprefix("torch.")
            and all(c in df.columns for c in COLUMNS))
    return df if same else None


def _build(model_cfg, attention: str, state: dict, device: torch.device):
    import dataclasses

    from gnsrepro.model import GPT, gpt_config

    with torch.device("meta"):  # the weights are loaded next: skip the init's random draws
        model = GPT(dataclasses.replace(gpt_config(model_cfg), attention=attention))
    model.to_empty(device=device)
    model.load_state_dict(state)
    return model


def _init_state(model_cfg, seed: int) -> dict:
    from gnsrepro.model import GPT, gpt_config

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in GPT(gpt_config(model_cfg)).state_dict().items()}


def run_flashattn(cfg) -> pd.DataFrame:
    """`gnsrepro flashattn`: check the settings, keep a table of the same settings (unless force), else train the
    two students per sigma, print a line per (sigma, student) and write `<out_dir>/flashattn.parquet`,
    config.yaml and meta.json; return the table."""
    from omegaconf import OmegaConf

    plan = check_settings(cfg)
    table_path = plan.out / TABLE_NAME
    if not cfg.force:
        kept = _kept(plan)
        if kept is not None:
            print(f"{table_path} holds the table of these settings ({len(kept)} rows, {plan.device.type}, "
                  f"{str(plan.dtype).removeprefix('torch.')}); kept (force=true runs it again)")
            return kept
    plan.out.mkdir(parents=True, exist_ok=True)
    table_path.unlink(missing_ok=True)  # a killed run must not leave an old table beside the new settings
    m, B, T = cfg.model, int(cfg.batch_size), plan.seq_len
    dtype_name = str(plan.dtype).removeprefix("torch.")
    print(f"flashattn: model {m.name} ({m.n_layer} layers, d={m.n_embd}, {m.n_head} heads, vocab {m.vocab_size}), "
          f"noise on the {cfg.noise} biases, students {' and '.join(STUDENTS)} ({cfg.student_init} init), "
          f"{cfg.steps} steps of {B} x {T} random tokens, sigmas {plan.sigmas}, on {plan.device.type} in {dtype_name}",
          flush=True)
    start = time.perf_counter()
    teacher_base = _init_state(m, init_seed(cfg.seed, TEACHER))
    student_base = _init_state(m, init_seed(cfg.seed, STUDENT))
    token_gen = generator(cfg.seed, TOKENS)
    batches = [torch.randint(0, m.vocab_size, (B, T), generator=token_gen).to(plan.device) for _ in range(cfg.steps)]
    calibration = torch.randint(0, m.vocab_size, (B, T), generator=generator(cfg.seed, CALIBRATION)).to(plan.device)
    tables = []
    for sigma in plan.sigmas:
        t0 = time.perf_counter()
        teacher = _build(m, m.attention, teacher_base, plan.device).float()
        add_bias_noise(teacher, sigma, generator(cfg.seed, TEACHER_NOISE), cfg.noise)
        teacher.eval()
        scale = teacher_scale(teacher, calibration, cfg.teacher_logit_std)
        logit_max = attention_logit_max(teacher, calibration)
        students = [_build(m, attention, student_base, plan.device) for attention in STUDENTS]
        if cfg.student_init == "noisy":
            for student in students:
                add_bias_noise(student, sigma, generator(cfg.seed, STUDENT_NOISE), cfg.noise)
        t = train_students(teacher, students, batches, cfg.optim, scale, plan.dtype, plan.divergence_loss)
        t.insert(0, "sigma", sigma)
        t["teacher_logit_max"] = logit_max
        tables.append(t)
        _print_sigma(t, sigma, logit_max, time.perf_counter() - t0)
    table = pd.concat(tables, ignore_index=True)[list(COLUMNS)]
    (plan.out / "config.yaml").write_text(OmegaConf.to_yaml(plan.settings))
    meta = {"device_type": plan.device.type, "dtype": dtype_name, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu",
            "seconds": round(time.perf_counter() - start, 1)}
    (plan.out / "meta.json").write_text(json.dumps(meta, indent=2))
    tmp = table_path.with_name(table_path.name + ".tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, table_path)  # last: a table present means a finished run of the settings beside it
    print(f"wrote {table_path} ({len(table)} rows) in {meta['seconds']} s")
    return table


def _print_sigma(t: pd.DataFrame, sigma: float, logit_max: float, seconds: float) -> None:
    """A line for one sigma (the teacher's largest attention logit, the students' last distance), then one per
    student: its steps, first and last loss or where it diverged, its largest gradient norm."""
    finite = t["distance"].dropna()
    at = f"{finite.iloc[-1]:.3g} after step {int(t.loc[finite.index[-1], 'step'])}" if len(finite) else "n/a"
    print(f"  sigma={sigma:g}: teacher's attention logits up to {logit_max:.3g}; distance sdpa-math {at} "
          f"({seconds:.1f} s)", flush=True)
    for attention, r in t.groupby("attention", sort=False):
        last = r.iloc[-1]
        end = (f"diverged at step {int(last['step'])} (loss {last['loss']:.4g})" if bool(last["diverged"])
               else f"loss {r['loss'].iloc[0]:.4g} -> {last['loss']:.4g}")
        print(f"    {attention}: {len(r)} steps, {end}, grad norm max {np.nanmax(r['grad_norm']):.3g}", flush=True)
