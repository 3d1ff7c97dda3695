"""Typed configuration schemas.

Every Hydra config under conf/ is merged into these dataclasses (stored in Hydra's ConfigStore), so a
misspelt key or a wrong type fails when the config is composed, before any data is read. Value checks
that a type cannot express (a positive learning rate, a known model name) live in `validate_*` and run
right after composition, also before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    """GPT shape, with nanoGPT's field names."""

    name: str = "tiny"
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 128
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    bias: bool = True
    dropout: float = 0.0
    # blocks whose attention L2-normalises query and key (the paper's stability fix: [0])
    cosine_attn_blocks: list[int] = field(default_factory=list)
    attention: str = "sdpa"  # sdpa (F.scaled_dot_product_attention: flash on a GPU) | math (written out, float32)
    # attention=sdpa's kernel: auto (cudnn on a Hopper GPU, else PyTorch's pick) | flash | cudnn (that one first)
    sdpa_backend: str = "auto"
    # torch (F.cross_entropy) | triton (gnsrepro/kernels/cross_entropy.py) | auto (triton on CUDA, torch elsewhere)
    loss_kernel: str = "auto"


def named_model(name: str, setting: str = "model") -> Any:
    """conf/model/<name>.yaml as a ModelConfig (an OmegaConf structured config), read directly rather than
    composed: the commands that need several models (bench overhead models=..., the report's cost numbers) run
    inside a Hydra app, where hydra.compose cannot start. An unknown name is a ConfigError naming `setting`."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from gnsrepro.cli import conf_dir
    from gnsrepro.errors import ConfigError

    path = Path(conf_dir()) / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"{setting}={name} is not known (no conf/model/{name}.yaml); accepted: {', '.join(known)}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))


@dataclass
class DataConfig:
    """A corpus and where its prepared token files live (data_dir/name/{train,val}.bin)."""

    name: str = "pycode"  # pycode | openwebtext | textdir
    path: Optional[str] = None  # source: a directory (textdir), or a local OpenWebText copy
    data_dir: str = "data"
    max_bytes: int = 64_000_000  # pycode: byte budget of Python source read
    val_fraction: float = 0.005  # share of documents held out for validation
    num_proc: int = 0  # tokenisation processes; 0 = one per CPU core
    hf_dataset: str = "Skylion007/openwebtext"  # openwebtext when online
    # V: keep the V - 1 most frequent GPT-2 tokens of the train split, the rest as one rare token (ids < V), in
    # data_dir/<name>-v<V>; the tiny scale's, whose step the 50304-wide output head would dominate. None: GPT-2's
    vocab_limit: Optional[int] = None


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule, counted in tokens."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # linear decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_tokens: int = 0
    decay_tokens: Optional[int] = None  # where the decay reaches its floor; None = end of the run


@dataclass
class ScheduleConfig:
    """Batch size (sequences per optimizer step), asked for at every step; each schedule has its own class."""

    name: str = "constant"  # constant | linear | gns
    batch_size: int = 8  # constant: the batch; linear and gns: the largest batch they may ask for
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    lr_scaling: str = "none"  # none | sqrt | linear: lr x (batch / lr_reference_batch)^(0, 1/2, 1)
    lr_reference_batch: Optional[int] = None  # default: batch_size


@dataclass
class LinearScheduleConfig(ScheduleConfig):
    """The paper's ramp: from `start` to `batch_size` sequences, linearly in tokens over `ramp_tokens`."""

    name: str = "linear"
    start: Optional[int] = None  # default: one micro-batch on every rank
    ramp_tokens: Optional[int] = None  # default: the whole run (max_tokens)


@dataclass
class GNSScheduleConfig(ScheduleConfig):
    """The batch follows the smoothed GNS measured while training (docs/schedules.md)."""

    name: str = "gns"
    min_batch_size: Optional[int] = None  # default: one micro-batch on every rank; also the first batch
    multiplier: float = 1.0  # batch = multiplier x GNS (x total_ratio)
    source: str = "per_example"  # per_example | microbatch | ddp
    group: str = "layernorm"  # the gns.parquet group whose GNS drives the batch
    total_ratio: Optional[float] = None  # e.g. a fitted total/layernorm GNS ratio; default 1
    interval: int = 10  # steps between changes (and between the host's reads of the GNS)
    max_factor: float = 2.0  # the most the batch changes by in one change (at least one micro-batch)
    allow_decrease: bool = False
    warmup_steps: int = 0  # steps before the GNS may move the batch (the GNS of the first steps is noisy)


SCHEDULE_SCHEMAS = {"constant": ScheduleConfig, "linear": LinearScheduleConfig, "gns": GNSScheduleConfig}


@dataclass
class GNSConfig:
    """What is instrumented for per-example gradient norms and how GNS is reported."""

    mode: str = "off"  # off | ln | all
    method: str = "auto"  # Linear layers: simultaneous | ghost | auto (by the cost model)
    ln_backend: str = "auto"  # torch | triton | auto (measured faster: gnsrepro/kernels/ln_backend.py; torch on CPU)
    # simultaneous method: auto | torch | triton (gnsrepro/kernels/per_example_grad.py); auto: per Linear shape, the
    # backend measured faster on the GPU (gnsrepro/kernels/linear_backend.csv), torch where none is recorded
    linear_backend: str = "auto"
    ema_alpha: float = 0.99  # smoothing of the console's GNS and of a GNS-driven schedule; logs keep raw components
    outlier_guard: bool = True  # clip one-step outliers of the components before that smoothing (HampelFilter)
    per_layer: bool = False  # also log one row per parameter
    chunk_size: int = 0  # examples per chunk in the simultaneous method; 0 = automatic
    # automatic chunks: the per-example tensor of a chunk within this many MiB (one example's sliced by rows);
    # 256 by measurement: L2-sized slices (8-32 MiB) made the head's path 1.4-2.1x slower (docs/benchmarks.md)
    chunk_mb: int = 256


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    gns: GNSConfig = field(default_factory=GNSConfig)
    run_name: str = "run"
    out_dir: Optional[str] = None  # default: outputs/<run_name>
    seq_len: Optional[int] = None  # default: model.block_size
    max_steps: Optional[int] = None
    max_tokens: Optional[int] = None
    eval_interval: int = 100  # steps; 0 disables
    eval_batches: int = 8
    log_interval: int = 10
    checkpoint_interval: int = 100  # steps; 0 = only at the end
    resume: bool = False
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    # replay each step from a CUDA graph: auto | true | false (auto: on one CUDA GPU without dropout; the small
    # models' steps are bound by kernel launches, so graphed they run 1.4-2.4x faster: gnsrepro/cuda_graphs.py)
    cuda_graphs: str = "auto"
    prepare_missing: bool = True  # prepare the data set when its token files are missing


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    force: bool = False  # rebuild even when data_dir/name holds an intact set prepared with the same settings


@dataclass
class BenchConfig:
    target: str = "train"  # train | overhead | layernorm
    model: ModelConfig = field(default_factory=ModelConfig)
    gns: GNSConfig = field(default_factory=GNSConfig)
    seq_len: Optional[int] = None
    micro_batch_size: int = 16
    steps: int = 20
    warmup: int = 5
    rounds: int = 5  # overhead: the variants' timed steps in this many interleaved rounds
    compile: bool = True
    cuda_graphs: str = "false"  # auto | true | false, as train's (gnsrepro/cuda_graphs.py)
    dtype: str = "auto"
    device: str = "auto"
    out: Optional[str] = None  # parquet of the results (layernorm: default outputs/bench/layernorm.parquet)
    # overhead over situations: every (model, micro-batch, compile) of these lists; an empty list means the single
    # model= / micro_batch_size= / compile= above (models are read from conf/model/<name>.yaml)
    models: list[str] = field(default_factory=list)
    micro_batch_sizes: list[int] = field(default_factory=list)
    compiles: list[bool] = field(default_factory=list)
    # overhead: the variants to time, by label (gnsrepro/benchmarks/train.py OVERHEAD_VARIANTS); empty: all of
    # them; gns=off is always timed (the baseline)
    variants: list[str] = field(default_factory=list)
    record: bool = False  # overhead: write the ln torch / ln triton times into gnsrepro/kernels/ln_backend.csv


@dataclass
class CostConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seq_len: Optional[int] = None  # default: model.block_size
    batch_size: int = 1
    bytes_per_element: int = 2


@dataclass
class SweepConfig:
    """`gnsrepro sweep ema_alpha=0.9,0.99 run=DIR`: each group's smoothed GNS against the total's (gnsrepro.sweep)."""

    # run directories: run=DIR, run=DIR1,DIR2 or run=[DIR1,DIR2] (the CLI brackets a bare comma list); Any, not
    # list[str], so that a single directory is accepted as typed also through hydra.compose
    run: Any = None
    ema_alpha: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.99, 0.995, 0.999])
    reference: str = "total"  # the group every other group is compared with
    group: list[str] = field(default_factory=list)  # groups compared with the reference; [] = every logged one
    source: list[str] = field(default_factory=list)  # per_example | microbatch | ddp; [] = every logged one
    skip_fraction: float = 0.1  # share of the first steps left out of every statistic (initialisation)
    diff_every: Optional[int] = None  # detrended r: steps between evaluation points; None = about 32 points
    out: Optional[str] = None  # one parquet for all runs; default <run>/sweep.parquet for each
    # only the steps up to this many tokens (a stretch of a run: before an instability, the first epoch); the
    # default file is then <run>/sweep-until<N>.parquet, beside the whole run's
    max_tokens: Optional[float] = None
    outlier_guard: bool = True  # clip one-step outliers of each component before smoothing, as training does


@dataclass
class VarianceConfig:
    """`gnsrepro variance run=DIR`: standard error of the GNS estimate against B_small, B_big (gnsrepro.variance)."""

    run: Optional[str] = None  # a `gnsrepro train` run directory
    points: list[str] = field(default_factory=lambda: ["init", "final"])  # init (from its seed), final (ckpt.pt)
    examples: int = 256  # N sequences sampled from the run's training data; big batches are drawn from them
    resamples: int = 1000  # big batches per B_big (the std over them is known to about 1/sqrt(2 x 1000) = 2%)
    b_small: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    b_big: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # each <= examples
    params: str = "all"  # all (per layer type and total) | ln (the LayerNorm parameters only)
    seed: int = 0  # the sampled sequences and the resamples
    memory_gb: float = 2.0  # per-example gradients held at once; fewer rows than examples: some are recomputed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data_dir: Optional[str] = None  # where the run's data set is prepared; default the run's data.data_dir


@dataclass
class FlashAttnConfig:
    """`gnsrepro flashattn experiment=flashattn/tiny`: fused against plain attention in a teacher/student
    experiment (gnsrepro.flashattn, docs/flashattn.md)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "outputs/flashattn/run"  # flashattn.parquet, config.yaml and meta.json
    sigmas: list[float] = field(default_factory=lambda: [0.0, 1.0, 4.0, 16.0])  # std of the teacher's c_attn bias noise
    noise: str = "qkv"  # the c_attn biases noised: qkv (the paper's QKV bias) | qk (query and key: not the value's)
    student_init: str = "noisy"  # noisy (own N(0, sigma²) on the c_attn biases) | fresh (the plain GPT init)
    steps: int = 100  # optimizer steps per student
    batch_size: int = 8  # random token sequences per step
    seq_len: Optional[int] = None  # default: model.block_size
    teacher_logit_std: float = 2.0  # the teacher's output logits are scaled to this std (a sharper target)
    divergence_loss: Optional[float] = None  # a loss above it (or non-finite) stops a student; None: ln(vocab_size)
    seed: int = 0  # the teacher's init (seed), the students' (seed + 1), the noise and the token sequences
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    force: bool = False  # run again even when out_dir holds the table of these settings


@dataclass
class PlotConfig:
    """`gnsrepro plot figure=NAME run=DIR out=PATH`: the names and their inputs are gnsrepro.figures.FIGURES."""

    figure: Optional[str] = None  # a key of gnsrepro.figures.FIGURES; unset: list them
    # run directories: run=DIR, or run=[DIR1,DIR2] (Hydra takes a key once per command line); Any, not
    # list[str], so that the single-directory form is accepted as it is typed
    run: Any = None
    table: Optional[str] = None  # figure=lnbench: the parquet of `gnsrepro bench layernorm`
    out: Optional[str] = None  # path stem of the PNG and PDF; default outputs/figures/<figure>
    alpha: float = 0.99  # EMA smoothing of |G|² and S (phase)
    alphas: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.99, 0.995, 0.999])  # correlation
    outlier_guard: bool = True  # the GNS figures clip one-step outliers before smoothing, as training does
    source: Optional[str] = None  # per_example | microbatch | ddp; default per_example, else microbatch
    model: ModelConfig = field(default_factory=ModelConfig)  # figure=cost: the model costed
    seq_len: Optional[int] = None  # figure=cost: Table 1's sequence length; default model.block_size
    batch_size: int = 1  # figure=cost
    bytes_per_element: int = 2  # figure=cost
    reference: Optional[int] = None  # figure=schedule: the fixed batch (sequences) the savings are against


@dataclass
class ReproduceConfig:
    """`gnsrepro reproduce plan=tiny|small|paper [part=NAME]`: a plan of conf/plan/ (gnsrepro.reproduce)."""

    plan: Any = None  # the parts, figures and report inputs of one scale (conf/plan/<scale>.yaml)
    part: Optional[str] = None  # run this part alone (or `report`: only rebuild REPORT.md); None: every part
    force: bool = False  # run a plan marked run_here: false (the paper's scale: days of GPU time)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="reproduce_schema", node=ReproduceConfig)
    for name, node in SCHEDULE_SCHEMAS.items():
        cs.store(group="schedule", name=f"{name}_schema", node=node)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="bench_schema", node=BenchConfig)
    cs.store(name="cost_schema", node=CostConfig)
    cs.store(name="sweep_schema", node=SweepConfig)
    cs.store(name="plot_schema", node=PlotConfig)
    cs.store(name="variance_schema", node=VarianceConfig)
    cs.store(name="flashattn_schema", node=FlashAttnConfig)
