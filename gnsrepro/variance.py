"""`gnsrepro variance run=DIR`: the standard error of the GNS estimate against B_small and B_big.

Gray et al. 2024, section 2.1 and its estimator-variance figure: the single-step estimates of |G|² and
S = tr(Σ) (McCandlish et al. 2018, appendix A.1, eq. A.2; `gnsrepro.gns.gtg_estimate` and
`trsigma_estimate`) are noisier the larger B_small is, so per-example norms (B_small = 1) give the
lowest-variance GNS, while B_big matters little for the same amount of data. Per-example gradient
*norms*, which training logs, give
|G_Bsmall|² only for B_small = 1; this command measures every (B_small, B_big) from real per-example
gradients instead.

At two points of a run, its initialisation (rebuilt from config.yaml: `torch.manual_seed(seed)` and
the GPT, as `gnsrepro.train.open_run` builds it) and its last checkpoint (ckpt.pt), it
1. draws N = `examples` training sequences of the run's data and computes g_i, each one's gradient of its
   own mean token loss (float32, over every parameter or, `params=ln`, the LayerNorms'),
2. forms their Gram matrix K = g gᵀ (N × N, float64 sums of float32 products) per layer type
   (`gram_matrices`), from which the
   squared norm of the mean gradient of any multiset S of the examples is exact:
       |G_S|² = |(1/|S|) Σ_{i∈S} g_i|² = 1ᵀ K[S, S] 1 / |S|²,
3. for each B_big draws `resamples` big batches of B_big of the N examples, splits each into
   B_big / B_small consecutive small batches for every B_small, and computes the single-step gtg, trsigma
   and B_simple = trsigma / gtg of each (`resample_estimates`),
4. writes `<run>/variance.parquet`: per point, group, B_small and B_big the mean and standard deviation
   over resamples of each single-step estimate. "Standard error" is that standard deviation: the spread
   of the estimate one training step would log; `gns_rel_se` is it relative to the mean, gns_std / |gns_mean|.
   One step of a larger B_big reads more data, so `gns_rel_se_same_data` also compares the batch sizes at
   equal data: the relative standard error of the GNS from the N / B_big steps that read N sequences
   (`variance_table`).

Where the GNS is large against B_big, one step's |G|² estimate is often negative and its S / |G|² no batch
size: `gtg_nonpositive` gives the share of such resamples, and the spread of the ratio is then that of a
ratio whose denominator crosses zero (large, and itself noisy).

The big batches are drawn *with* replacement (the bootstrap, Efron 1979): a training step's batch is B_big
fresh sequences of a corpus far larger than N, and draws from the N examples' empirical distribution
imitate that. Without replacement, the batches of one pool overlap more the closer B_big comes to N, and
their spread falls below a fresh batch's by the finite-population factor of about (N − B_big) / (N − 1)
in variance (at B_big = N/2 the standard error would read 30% low). tests/test_variance.py checks the
resampled standard error against fresh Gaussian batches. The resampled estimates centre on the pool's own
plug-in |ḡ|², which exceeds |G|² by tr(Σ)/N on average (a GNS of 30 at N = 256 would read 12% low), so
they are moved to centre on the pool's unbiased estimates instead (`bootstrap_shift`).

Cost: (N + extra) forward/backward passes of one sequence per point, and N² × P multiply-adds for K.
The per-example gradients held at once are bounded by `memory_gb`: when all N rows do not fit, K is
built from a held block of rows against streamed chunks of the others, recomputing those (`gram_matrices`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gnsrepro.errors import ConfigError
from gnsrepro.gns import group_of, gtg_estimate, trsigma_estimate

POINTS = ("init", "final")  # the run's initialisation, and its last checkpoint
PARAMS = {"all": "every parameter", "ln": "the LayerNorm weights and biases"}
GROUP_ORDER = ("attention", "mlp", "layernorm", "embedding", "total")
COLUMNS = ("point", "step", "tokens", "group", "examples", "b_small", "b_big", "resamples", "gns_mean", "gns_std",
           "gns_rel_se", "gns_rel_se_same_data", "gtg_mean", "gtg_std", "trsigma_mean", "trsigma_std", "gns_of_means",
           "gtg_nonpositive")
TABLE_NAME = "variance.parquet"
# the sampled sequences come from their own random stream, not the run's (whose first sequences these would
# be when the two seeds are equal); gnsrepro.train's validation set uses 1_000_003
SAMPLE_SEED_OFFSET = 2_000_003
# float32 products of per-example gradient rows are summed over at most this many columns before they are
# added in float64: the rounding error of a product then stays near 2^-24 x sqrt(2^16) = 1.5e-5 relative
# (the random-walk estimate; a 20M model's K on a GPU and on a CPU agreed to 2e-6), against sampling errors
# of a percent and more
COLUMN_CHUNK = 2**16
_RESAMPLE_CHUNK_BYTES = 2**27  # the (resamples, B_big, B_big) float64 gather is done in chunks of about 128 MB


# ---- the Gram matrix ---------------------------------------------------------------------------------
def gram_matrices(rows: Callable[[int, int], torch.Tensor], n: int, columns: Mapping[str, Sequence[slice]],
                  block_rows: int | None = None) -> dict[str, np.ndarray]:
    """{name: K}, K[i, j] = ⟨g_i[c], g_j[c]⟩ over the columns c of each set in `columns`, float64 (n, n).

    rows(start, stop) returns the rows g_start, ..., g_{stop-1} of the (n, P) matrix as a (stop - start, P)
    tensor (for per-example gradients: computes them). Products are formed in the rows' dtype over at most
    COLUMN_CHUNK columns at a time and summed in float64, so float64 rows give K to float64 rounding.
    block_rows bounds how many rows exist at once: None or >= n computes all of them once; otherwise a
    held block of rows is multiplied with chunks of the rows after it (streamed, and recomputed for each
    held block), which costs n + about n·(n / held − 1)/2 rows instead of n. Needs block_rows >= 2.
    """
    if n < 1:
        raise ValueError(f"gram_matrices needs at least one row, got n={n}")
    if block_rows is not None and block_rows < 2:
        raise ValueError(f"block_rows must be at least 2 (a held row and a streamed one), got {block_rows}")
    K = {name: np.zeros((n, n), dtype=np.float64) for name in columns}
    if block_rows is None or block_rows >= n:
        held, streamed = n, n
    else:
        streamed = max(1, min(16, block_rows // 2))  # streamed chunks stay small: the held block is what is reused
        held = block_rows - streamed
    for a0 in range(0, n, held):
        a1 = min(n, a0 + held)
        A = rows(a0, a1)
        _add_products(K, A, A, a0, a0, columns)
        for b0 in range(a1, n, streamed):
            b1 = min(n, b0 + streamed)
            _add_products(K, A, rows(b0, b1), a0, b0, columns, mirror=True)
    return K


def _add_products(K: dict[str, np.ndarray], A: torch.Tensor, B: torch.Tensor, a0: int, b0: int,
                  columns: Mapping[str, Sequence[slice]], mirror: bool = False) -> None:
    """K[name][a0:a0+len(A), b0:b0+len(B)] += A[:, c] B[:, c]ᵀ over the column sets; also the transposed
    block when mirror (an off-diagonal block)."""
    for name, slices in columns.items():
        block = np.zeros((A.shape[0], B.shape[0]), dtype=np.float64)
        for s in slices:
            for c0 in range(s.start, s.stop, COLUMN_CHUNK):
                c = slice(c0, min(s.stop, c0 + COLUMN_CHUNK))
                block += (A[:, c] @ B[:, c].T).double().cpu().numpy()
        K[name][a0:a0 + A.shape[0], b0:b0 + B.shape[0]] += block
        if mirror:
            K[name][b0:b0 + B.shape[0], a0:a0 + A.shape[0]] += block.T


def mean_sqnorms(K: np.ndarray, index: np.ndarray, b_small: int) -> tuple[np.ndarray, np.ndarray]:
    """(|G_Bbig|², mean over small batches of |G_Bsmall|²) of each resample, from the Gram matrix K.

    index: (R, B_big) example indices of R big batches; small batches are the consecutive groups of
    b_small of each row. |mean_{i∈S} g_i|² = 1ᵀ K[S, S] 1 / |S|², exact for repeated indices too.
    """
    R, b_big = index.shape
    if b_big % b_small:
        raise ValueError(f"b_big={b_big} is not a multiple of b_small={b_small}")
    per = max(1, _RESAMPLE_CHUNK_BYTES // (8 * b_big * b_big))
    big, small = np.empty(R), np.empty(R)
    for r0 in range(0, R, per):
        idx = index[r0:r0 + per]
        sub = K[idx[:, :, None], idx[:, None, :]]  # (r, B_big, B_big)
        big[r0:r0 + per] = sub.sum(axis=(1, 2)) / b_big**2
        g = b_big // b_small
        # the diagonal blocks of sub: each small batch's own 1ᵀ K[S, S] 1
        blocks = np.einsum("rgagb->rg", sub.reshape(len(idx), g, b_small, g, b_small))
        small[r0:r0 + per] = blocks.mean(axis=1) / b_small**2
    return big, small


def bootstrap_shift(K: np.ndarray) -> float:
    """c = tr(Σ̂)/N: how far the bootstrap's |G|² lies above the pool's unbiased |G|² (and its S below).

    Resampled from the N examples, the estimators are unbiased for the pool's own plug-in values, |ḡ|² and
    tr Σ̂ = mean_i |g_i|² − |ḡ|²; but |ḡ|² = |G|² + tr(Σ)/N on average, which at a GNS near N is far off.
    The pool's unbiased estimates are eq. A.2 over all of it (B_big = N, B_small = 1):
        gtg = |ḡ|² − c,   trsigma = tr Σ̂ + c,   c = (mean_i |g_i|² − |ḡ|²) / (N − 1).
    """
    n = K.shape[0]
    return float((np.trace(K) / n - K.sum() / n**2) / (n - 1))


def resample_estimates(K: np.ndarray, index: np.ndarray, b_small: int, recenter: bool = True) -> dict[str, np.ndarray]:
    """Per resample (row of index): sqnorm_big, sqnorm_small, the single-step gtg and trsigma estimates
    (McCandlish et al. 2018, eq. A.2) and gns = trsigma / gtg (B_simple of that one step).

    recenter: move every resample's gtg down and trsigma up by `bootstrap_shift(K)`, so that they centre on
    the pool's unbiased estimates instead of its plug-in values (a bias-corrected bootstrap: the spread of
    each component is unchanged; the ratio's follows from the moved components).
    """
    b_big = index.shape[1]
    big, small = mean_sqnorms(K, index, b_small)
    gtg = gtg_estimate(b_big, big, b_small, small)
    trsigma = trsigma_estimate(b_big, big, b_small, small)
    if recenter:
        shift = bootstrap_shift(K)
        gtg, trsigma = gtg - shift, trsigma + shift
    with np.errstate(divide="ignore", invalid="ignore"):
        gns = trsigma / gtg
    return {"sqnorm_big": big, "sqnorm_small": small, "gtg": gtg, "trsigma": trsigma, "gns": gns}


def batch_pairs(b_small: Sequence[int], b_big: Sequence[int]) -> list[tuple[int, int]]:
    """The (B_small, B_big) pairs measured: every B_small below every B_big (sorted)."""
    return [(s, b) for b in sorted(set(b_big)) for s in sorted(set(b_small)) if s < b]


def variance_table(grams: Mapping[tuple[str, str], np.ndarray], b_small: Sequence[int], b_big: Sequence[int],
                   resamples: int, seed: int = 0) -> pd.DataFrame:
    """The table of `<run>/variance.parquet` (without the step and tokens columns) from the Gram matrices.

    grams: {(point, group): K}, all (N, N) over the same N examples. For each B_big, `resamples` big batches
    are drawn with replacement from rng([seed, B_big]), the same for every point, group and B_small (common
    random numbers, so the curves differ by B_small and the point, not by the draws), and their estimates
    centred on the pool's unbiased ones (`resample_estimates`, `bootstrap_shift`). Per point, group and
    (B_small, B_big) pair: mean and std (ddof=1) over resamples of gns, gtg and trsigma; gns_rel_se =
    gns_std / |gns_mean|, the relative standard error of one step's GNS; gns_of_means = trsigma_mean /
    gtg_mean (what smoothing the components over many steps estimates); gtg_nonpositive = the share of
    resamples whose gtg <= 0 (their single-step GNS is not a batch size).

    gns_rel_se_same_data compares batch sizes at the same data: the relative standard error of
    mean(trsigma) / mean(gtg) over the k = N / B_big independent steps that together process as many
    sequences as the N examples, by the delta method for a ratio of means (Cochran 1977, "Sampling
    Techniques", chapter 6, the ratio estimator): with R = gns_of_means,
        std(trsigma − R·gtg) / (|trsigma_mean| · √k).
    One step of a larger B_big is less noisy because it reads more sequences; at equal data that advantage
    is gone, and what remains is the choice of B_small.
    """
    sizes = {K.shape for K in grams.values()}
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise ValueError(f"the Gram matrices must be square and of one size, got shapes {sorted(sizes)}")
    n = next(iter(sizes))[0]
    rows = []
    draws = {bb: np.random.default_rng([seed, bb]).integers(0, n, size=(resamples, bb)) for bb in set(b_big)}
    for (point, group), K in grams.items():
        for bs, bb in batch_pairs(b_small, b_big):
            e = resample_estimates(K, draws[bb], bs)
            gns_mean, gns_std = float(np.mean(e["gns"])), float(np.std(e["gns"], ddof=1))
            gtg_mean, trsigma_mean = float(np.mean(e["gtg"])), float(np.mean(e["trsigma"]))
            ratio = trsigma_mean / gtg_mean if gtg_mean != 0 else math.nan
            residual_std = float(np.std(e["trsigma"] - ratio * e["gtg"], ddof=1))
            rows.append({
                "point": point, "group": group, "examples": n, "b_small": bs, "b_big": bb, "resamples": resamples,
                "gns_mean": gns_mean, "gns_std": gns_std,
                "gns_rel_se": gns_std / abs(gns_mean) if gns_mean != 0 else math.inf,
                "gns_rel_se_same_data": residual_std / (abs(trsigma_mean) * math.sqrt(n / bb)),
                "gtg_mean": gtg_mean, "gtg_std": float(np.std(e["gtg"], ddof=1)),
                "trsigma_mean": trsigma_mean, "trsigma_std": float(np.std(e["trsigma"], ddof=1)),
                "gns_of_means": ratio,
                "gtg_nonpositive": float(np.mean(e["gtg"] <= 0)),
            })
    return pd.DataFrame(rows)


# ---- per-example gradients of a run's model -------------------------------------------------------------
def parameter_columns(model: torch.nn.Module, params: str) -> tuple[list[torch.nn.Parameter], dict[str, list[slice]]]:
    """(the parameters whose gradients are taken, {group: column slices of their flat gradient}).

    params="all": every parameter (the tied embedding / output weight once), grouped by layer type
    (gnsrepro.gns.group_of); "ln": the LayerNorm weights and biases, the group "layernorm".
    """
    chosen, columns, offset = [], {}, 0
    for name, p in model.named_parameters():
        group = group_of(name)
        if params == "ln" and group != "layernorm":
            continue
        chosen.append(p)
        columns.setdefault(group, []).append(slice(offset, offset + p.numel()))
        offset += p.numel()
    return chosen, {g: columns[g] for g in GROUP_ORDER if g in columns}


def per_example_gradients(model: torch.nn.Module, params: list[torch.nn.Parameter], x: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor:
    """(B, P) float32: row b is the gradient of example b's own mean token loss, model(x[b:b+1], y[b:b+1]),
    with respect to `params`, flattened and concatenated in their order.

    One forward and backward per example (on a CPU four times faster than torch.func's vmap over examples,
    and with the activation memory of one sequence); the batch gradient of training is the mean of these rows.
    """
    out = torch.empty(x.shape[0], sum(p.numel() for p in params), dtype=torch.float32, device=x.device)
    for b in range(x.shape[0]):
        loss = model(x[b:b + 1], y[b:b + 1])[1]
        grads = torch.autograd.grad(loss, params)
        torch.cat([g.reshape(-1) for g in grads], out=out[b])
    return out


def model_gram_matrices(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, params: str = "all",
                        block_rows: int | None = None) -> dict[str, np.ndarray]:
    """{group: K}: the Gram matrices (`gram_matrices`) of the per-example gradients of `model` on the
    sequences x (inputs) and y (targets), per group of `parameter_columns(model, params)`, and for
    params="all" "total", their sum (inner products add over disjoint sets of parameters).

    The parameters left out stop requiring gradients (no weight gradients are computed for them).
    """
    chosen, columns = parameter_columns(model, params)
    keep = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    K = gram_matrices(lambda a, b: per_example_gradients(model, chosen, x[a:b], y[a:b]), x.shape[0], columns,
                      block_rows)
    if params == "all":
        K["total"] = sum(K.values())
    return K


# ---- the command ----------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What `run_variance` checked before any work, and computes from."""

    run: Path
    run_cfg: object  # the run's config.yaml (an OmegaConf DictConfig)
    points: list[str]
    device: torch.device
    data_dir: Path
    seq_len: int
    num_params: int
    block_rows: int | None
    final: tuple[dict, int, int] | None = None  # the checkpoint's (model state, step, tokens) for points=final


def _int_list(value, key: str) -> list[int]:
    items = [value] if isinstance(value, int) else list(value or [])
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ConfigError(f"{key}={list(items)} must be a non-empty list of positive integers such as [1,2,4,8]")
    return sorted(set(items))


def _device(setting: str) -> torch.device:
    setting = str(setting)
    index = setting.removeprefix("cuda:")
    if setting not in ("auto", "cpu", "cuda") and not (setting.startswith("cuda:") and index.isdigit()):
        raise ConfigError(f"device={setting!r} is not known; accepted: auto, cpu, cuda, cuda:N")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={setting!r} but no CUDA GPU is visible; use device=auto or device=cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def check_settings(cfg) -> _Plan:
    """Every check of `gnsrepro variance` that needs no computation: the run, its checkpoint and data set,
    the batch-size grids against the examples, the memory budget. Raises ConfigError (one line)."""
    import json

    from omegaconf import OmegaConf

    from gnsrepro.config import DataConfig
    from gnsrepro.data.prepare import check_prepared_settings, data_identity, dataset_dir, prepare_command
    from gnsrepro.model import GPT, gpt_config
    from gnsrepro.runs import check_run_dir

    if cfg.run is None or str(cfg.run) == "":
        raise ConfigError("run= is not set; give the run directory of a `gnsrepro train` run: run=DIR")
    run = check_run_dir(Path(str(cfg.run)).expanduser(), need_gns=False)
    points = list(cfg.points) if not isinstance(cfg.points, str) else [cfg.points]
    if not points or any(p not in POINTS for p in points) or len(set(points)) != len(points):
        raise ConfigError(f"points={points} must be a list of distinct points of {', '.join(POINTS)} (the run's "
                          "initialisation and its last checkpoint), e.g. points=[init,final]")
    if "final" in points and not (run / "ckpt.pt").is_file():
        raise ConfigError(f"run directory {run} has no ckpt.pt (its last checkpoint), which points=final needs; "
                          "train it further, or give points=[init]")
    if cfg.params not in PARAMS:
        raise ConfigError(f"params={cfg.params} is not known; accepted: all (every parameter, per layer type and in "
                          "total), ln (the LayerNorm parameters only)")
    for key in ("examples", "resamples"):
        if isinstance(cfg[key], bool) or cfg[key] < 2:
            raise ConfigError(f"{key}={cfg[key]} must be an integer of at least 2")
    b_small, b_big = _int_list(cfg.b_small, "b_small"), _int_list(cfg.b_big, "b_big")
    if b_big[-1] > cfg.examples:
        raise ConfigError(f"b_big={b_big[-1]} is more than examples={cfg.examples}: big batches are drawn from the "
                          "sampled examples; raise examples or lower b_big")
    for bb in b_big:
        bad = [bs for bs in b_small if bs < bb and bb % bs]
        if bad:
            raise ConfigError(f"b_big={bb} is not a multiple of b_small={bad[0]}: small batches partition the big "
                              "one, so every b_big must be a multiple of every smaller b_small")
    if not batch_pairs(b_small, b_big):
        raise ConfigError(f"b_small={b_small} and b_big={b_big} make no pair with b_small < b_big")
    if not (cfg.memory_gb > 0 and math.isfinite(cfg.memory_gb)):
        raise ConfigError(f"memory_gb={cfg.memory_gb} must be a positive number (GB of per-example gradients held)")
    device = _device(cfg.device)

    run_cfg = OmegaConf.load(run / "config.yaml")
    data = DataConfig(**{k: v for k, v in OmegaConf.to_container(run_cfg.data, resolve=True).items()
                         if k in DataConfig.__dataclass_fields__})
    if cfg.data_dir is not None:
        data.data_dir = str(cfg.data_dir)
    data_dir = dataset_dir(data)  # data_dir/<name>, or <name>-v<V> for a small vocabulary
    if check_prepared_settings(data) is None:
        raise ConfigError(f"the run's data set {data_dir} is not prepared here; run `{prepare_command(data)}`, or "
                          "give data_dir=DIR where it is")
    seq_len = run_cfg.seq_len if run_cfg.get("seq_len") is not None else run_cfg.model.block_size
    with torch.device("meta"):
        model = GPT(gpt_config(run_cfg.model))
    num_params = sum(p.numel() for p in parameter_columns(model, cfg.params)[0])
    row_bytes = 4 * num_params
    rows = int(cfg.memory_gb * 1e9 // row_bytes)
    if rows < 2:
        raise ConfigError(f"memory_gb={cfg.memory_gb} holds fewer than 2 per-example gradients of params={cfg.params} "
                          f"({num_params:,} parameters, {row_bytes / 1e9:.2g} GB each); raise memory_gb")
    final = None
    if "final" in points:
        try:
            ckpt = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
            state, step, tokens = ckpt["model"], int(ckpt["step"]), int(ckpt["tokens"])
        except Exception as e:  # a truncated or foreign file: say which, in one line
            raise ConfigError(f"cannot read {run / 'ckpt.pt'} as a gnsrepro checkpoint: {type(e).__name__}: "
                              f"{' '.join(str(e).split())}") from None
        identity = data_identity(json.loads((data_dir / "meta.json").read_text()))
        if ckpt.get("data") is not None and ckpt["data"] != identity:
            raise ConfigError(f"{run} trained on other token files than {data_dir} holds now (its checkpoint records "
                              f"{ckpt['data'].get('splits')}); restore that data set or give data_dir=DIR")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if {k: tuple(v.shape) for k, v in state.items()} != shapes:
            raise ConfigError(f"{run / 'ckpt.pt'} holds another model than {run / 'config.yaml'} describes (parameter "
                              "names or shapes differ)")
        final = (state, step, tokens)
    return _Plan(run, run_cfg, points, device, data_dir, int(seq_len), num_params,
                 None if rows >= cfg.examples else rows, final)


def _model_at(plan: _Plan, point: str):
    """(the run's GPT at `point` on the plan's device, float32, eval mode; step; tokens)."""
    from gnsrepro.model import GPT, gpt_config

    torch.manual_seed(plan.run_cfg.seed)  # as gnsrepro.train.open_run before it builds the model
    model = GPT(gpt_config(plan.run_cfg.model))
    step = tokens = 0
    if point == "final":
        state, step, tokens = plan.final
        model.load_state_dict(state)
    return model.to(plan.device).float().eval(), step, tokens  # eval: no dropout, the gradients are deterministic


def _write_atomically(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def run_variance(cfg) -> pd.DataFrame:
    """`gnsrepro variance run=DIR`: check every setting, compute the Gram matrices at each point, resample,
    print the relative standard errors and write `<run>/variance.parquet`; return the table."""
    from gnsrepro.data.dataset import batch_offsets, open_split, read_batch

    plan = check_settings(cfg)
    train_tokens = open_split(plan.data_dir, "train")
    offsets = batch_offsets(len(train_tokens), plan.seq_len, cfg.examples, cfg.seed + SAMPLE_SEED_OFFSET, 0)
    x, y = read_batch(train_tokens, offsets, plan.seq_len, plan.device)
    where = (f"{cfg.examples} sequences of {plan.seq_len} tokens from {plan.data_dir}/train.bin, gradients of "
             f"{PARAMS[cfg.params]} ({plan.num_params:,} parameters) on {plan.device}")
    print(f"{plan.run}: {where}" + (f", {plan.block_rows} rows held at once (memory_gb={cfg.memory_gb:g})"
                                     if plan.block_rows else ""), flush=True)
    grams, positions = {}, {}
    for point in plan.points:
        start = time.perf_counter()
        model, step, tokens = _model_at(plan, point)
        K = model_gram_matrices(model, x, y, cfg.params, plan.block_rows)
        for group, gram in K.items():
            grams[(point, group)] = gram
        positions[point] = (step, tokens)
        print(f"  {point} (step {step}, {tokens:,} tokens): Gram matrices of {', '.join(K)} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    table = variance_table(grams, _int_list(cfg.b_small, "b_small"), _int_list(cfg.b_big, "b_big"), cfg.resamples,
                           cfg.seed)
    table.insert(1, "step", table["point"].map(lambda p: positions[p][0]).astype("int64"))
    table.insert(2, "tokens", table["point"].map(lambda p: positions[p][1]).astype("int64"))
    table = table[list(COLUMNS)]
    _print_table(table)
    path = plan.run / TABLE_NAME
    _write_atomically(table, path)
    print(f"wrote {path}")
    return table


def _print_table(table: pd.DataFrame) -> None:
    """The GNS's relative standard error per B_small (rows) and B_big (columns), per point and group."""
    for (point, group), t in table.groupby(["point", "group"], sort=False):
        pivot = t.pivot(index="b_small", columns="b_big", values="gns_rel_se")
        pivot.columns = [f"B_big={c}" for c in pivot.columns]
        gns = t.loc[t["b_small"] == t["b_small"].min(), "gns_of_means"].iloc[-1]
        print(f"\n{point}, {group}: GNS (ratio of the mean components, B_small={t['b_small'].min()}, "
              f"B_big={t['b_big'].max()}) {gns:.4g}; relative standard error of one step's GNS:")
        print(pivot.rename_axis("B_small").to_string(float_format=lambda v: f"{v:.3f}"))
