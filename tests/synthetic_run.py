"""A synthetic run directory with the exact schema of `gnsrepro train`'s (README, "Logs"), for analysis tests.

`write_synthetic_run(path)` writes config.yaml, meta.json, metrics.parquet (a falling loss curve) and
gns.parquet in seconds, without training, so tests of the sweep and the figures can read a realistic run.

The GNS rows follow the model the estimators assume (McCandlish et al. 2018, appendix A.1): each parameter
group g has a true |G_g|²(t), falling over training, and tr Σ_g(t), slowly rising; a batch of B sequences
has E|G_B|² = |G|² + tr Σ / B, observed with multiplicative noise. The squared norms of the four groups add
up to the total's (squared norms add over disjoint parameter sets), and gtg, trsigma are computed from them
with the same estimators training uses, so the noisy components can be negative as in real logs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from gnsrepro.config import TrainConfig
from gnsrepro.gns import PARAM_GROUPS, gtg_estimate, trsigma_estimate

# per group: (|G|² at the start, |G|² at the end, tr Σ at the start, tr Σ at the end); the GNS tr Σ / |G|²
# rises over training, by a different factor per group
TRUE_COMPONENTS = {
    "attention": (1.0, 0.02, 4.0, 6.0),
    "mlp": (2.0, 0.05, 10.0, 12.0),
    "layernorm": (0.05, 0.002, 0.1, 0.2),
    "embedding": (0.5, 0.02, 3.0, 3.5),
}
VOCAB = 50304


def batch_sizes(steps: int, batch_size: int, micro_batch_size: int, schedule: str) -> np.ndarray:
    """Sequences per step: `constant`, or `linear` from one micro-batch to batch_size over the run (rounded
    to a whole number of micro-batches, as gnsrepro.schedule's linear schedule does)."""
    if schedule == "constant":
        return np.full(steps, batch_size, dtype=np.int64)
    if schedule == "linear":
        ramp = micro_batch_size + (batch_size - micro_batch_size) * np.arange(steps) / max(steps - 1, 1)
        return np.maximum(micro_batch_size, micro_batch_size * np.round(ramp / micro_batch_size)).astype(np.int64)
    raise ValueError(f"schedule={schedule!r}: expected constant or linear")


def _true_components(group: str, progress: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g0, g1, s0, s1 = TRUE_COMPONENTS[group]
    return g0 * (g1 / g0) ** progress, s0 + (s1 - s0) * progress  # |G|² falls geometrically, tr Σ linearly


def write_synthetic_run(path, steps: int = 200, seed: int = 0,
                        groups=("attention", "mlp", "layernorm", "embedding", "total"),
                        sources=("per_example", "microbatch"), batch_size: int = 8, micro_batch_size: int = 2,
                        seq_len: int = 64, schedule: str = "constant", write_gns: bool = True,
                        noise: float = 0.03) -> Path:
    """Write a run directory at `path` (created) and return it as a Path.

    groups: the gns.parquet groups, any of PARAM_GROUPS and "total" (the total always sums all four).
    sources: any of per_example (b_small = 1) and microbatch (b_small = micro_batch_size; no row on a step
    of a single micro-batch, as in training). write_gns=False leaves gns.parquet out, as a gns=off run does.
    noise: the relative (log-normal) noise of each observed squared norm; at 0.03 one step's |G|² estimate
    is about as noisy as it is large late in the run, as in real logs, and the EMA at α = 0.99 steadies it.
    """
    rng = np.random.default_rng(seed)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    step = np.arange(1, steps + 1)
    progress = (step - 1) / max(steps - 1, 1)
    batch = batch_sizes(steps, batch_size, micro_batch_size, schedule)
    tokens = np.cumsum(batch * seq_len)

    cfg = OmegaConf.to_container(OmegaConf.structured(TrainConfig()))
    cfg.update(run_name="synthetic", out_dir=str(out), seq_len=seq_len, max_steps=steps)
    cfg["gns"]["mode"] = "all" if write_gns else "off"
    cfg["schedule"].update(name=schedule, batch_size=batch_size, micro_batch_size=micro_batch_size)
    if schedule == "linear":
        cfg["schedule"].update(start=micro_batch_size, ramp_tokens=int(tokens[-1]))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    meta = {"git_commit": None, "started": "2026-01-01T00:00:00+00:00", "argv": ["synthetic"], "python": "3",
            "torch": "-", "triton": "-", "gnsrepro": "0.1.0", "device": "cpu", "world_size": 1,
            "hostname": "synthetic", "synthetic": True}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))

    lr_max = cfg["optim"]["lr"]
    lr = lr_max * (1 - (1 - cfg["optim"]["min_lr_ratio"]) * progress)
    # from ln(vocab) (a uniform guess) down towards 3 nats, with step-to-step noise
    loss = 3.0 + (math.log(VOCAB) - 3.0) * np.exp(-5.0 * progress) + rng.normal(0, 0.02, steps)
    evaluated = (step % 50 == 0) | (step == steps)
    val_loss = np.where(evaluated, loss + 0.05, np.nan)
    step_time = 0.05 * rng.lognormal(0, 0.1, steps)
    pd.DataFrame({"step": step, "tokens": tokens, "batch_size": batch, "lr": lr, "loss": loss,
                  "val_loss": val_loss, "step_time_s": step_time, "tokens_per_s": batch * seq_len / step_time,
                  "mfu": np.nan}).to_parquet(out / "metrics.parquet", index=False)
    if not write_gns:
        return out

    rows = []
    for source in sources:
        b_small = np.ones(steps, dtype=np.int64) if source == "per_example" else np.full(steps, micro_batch_size)
        has_small = b_small < batch
        sq_big, sq_small = {}, {}
        for group in PARAM_GROUPS:
            true_gtg, true_trsigma = _true_components(group, progress)
            noise_big, noise_small = rng.lognormal(0, noise, (2, steps))
            sq_big[group] = (true_gtg + true_trsigma / batch) * noise_big
            sq_small[group] = (true_gtg + true_trsigma / b_small) * noise_small
        sq_big["total"] = sum(sq_big[g] for g in PARAM_GROUPS)
        sq_small["total"] = sum(sq_small[g] for g in PARAM_GROUPS)
        for group in groups:
            big, small = sq_big[group][has_small], sq_small[group][has_small]
            b, bs = batch[has_small], b_small[has_small]
            rows.append(pd.DataFrame({
                "step": step[has_small], "tokens": tokens[has_small], "group": group, "source": source,
                "b_big": b, "b_small": bs, "sqnorm_big": big, "sqnorm_small": small,
                "gtg": gtg_estimate(b, big, bs, small), "trsigma": trsigma_estimate(b, big, bs, small),
            }))
    # training logs a step's rows together: sources and groups within each step
    gns = pd.concat(rows, ignore_index=True).sort_values("step", kind="stable").reset_index(drop=True)
    gns.to_parquet(out / "gns.parquet", index=False)
    return out
