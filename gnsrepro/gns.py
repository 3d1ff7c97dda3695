"""Gradient noise scale (GNS) estimators: pure math on numbers, no training code.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), appendix A.1:
with G the true gradient, Σ the per-example gradient covariance and G_B a gradient averaged over B
examples, E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes B_small < B_big give unbiased estimates of |G|²
and S = tr(Σ), and the simple noise scale is B_simple = tr(Σ)/|G|². Both estimates are noisy and can
be negative on a single step, so each is smoothed with an EMA before taking the ratio (as the paper
does, α = 0.99 in the authors' analysis).

The estimators are plain arithmetic, so they take Python floats, numpy arrays, pandas Series and torch
tensors alike, and return the same kind.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

PARAM_GROUPS = ("attention", "mlp", "layernorm", "embedding")

# Wrappers whose attribute name prefixes every parameter name: DDP ("module.") and torch.compile
# ("_orig_mod."), in either order.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _check_batch_sizes(b_big, b_small) -> None:
    if isinstance(b_big, torch.Tensor) or isinstance(b_small, torch.Tensor):
        too_big = bool(torch.as_tensor(b_small >= b_big).any())
    else:
        too_big = bool(np.any(np.asarray(b_small) >= np.asarray(b_big)))
    if too_big:
        raise ValueError(f"b_small must be smaller than b_big, got b_small={b_small} and b_big={b_big}")


def gtg_estimate(b_big, sqnorm_big, b_small, sqnorm_small):
    """Unbiased estimate of |G|², the squared norm of the true gradient.

    McCandlish et al. 2018, appendix A.1, eq. A.2:
        |G|² ≈ (B_big·|G_Bbig|² − B_small·|G_Bsmall|²) / (B_big − B_small)
    sqnorm_big is |G_Bbig|² (the squared norm of the gradient averaged over B_big examples) and
    sqnorm_small is the mean over the B_big/B_small small batches of |G_Bsmall|²; with per-example
    norms B_small = 1 and sqnorm_small is the mean of |g_b|² over the examples.
    """
    _check_batch_sizes(b_big, b_small)
    return (b_big * sqnorm_big - b_small * sqnorm_small) / (b_big - b_small)


def trsigma_estimate(b_big, sqnorm_big, b_small, sqnorm_small):
    """Unbiased estimate of S = tr(Σ), the trace of the per-example gradient covariance.

    McCandlish et al. 2018, appendix A.1, eq. A.2:
        S ≈ (|G_Bsmall|² − |G_Bbig|²) / (1/B_small − 1/B_big)
    with the same arguments as `gtg_estimate`.
    """
    _check_batch_sizes(b_big, b_small)
    return (sqnorm_small - sqnorm_big) / (1.0 / b_small - 1.0 / b_big)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got alpha={alpha}")


def ema(values, alpha: float):
    """Bias-corrected exponential moving average of a sequence, x̄ ← α·x̄ + (1−α)·x.

    The running average m_t = α·m_{t−1} + (1−α)·x_t starts at m_0 = 0 and is reported divided by
    (1 − α^t), as Adam corrects its moments (Kingma & Ba 2015, section 3): the weights α^{t−i}(1−α)
    then sum to one, so a constant input gives that constant from the first step on instead of a
    value that creeps up from zero. Returns a Series with the same index for a Series, else a float64
    numpy array.
    """
    _check_alpha(alpha)
    x = np.asarray(values, dtype=np.float64)
    out = np.empty_like(x)
    m = 0.0
    for t, value in enumerate(x, start=1):
        m = alpha * m + (1.0 - alpha) * value
        out[t - 1] = m / (1.0 - alpha**t)
    return pd.Series(out, index=values.index, name=values.name) if isinstance(values, pd.Series) else out


def gns_from_components(gtg, trsigma, alpha: float):
    """B_simple = ema(S) / ema(|G|²): each noisy component is smoothed first, then the ratio is taken.

    The ratio of two smoothed estimates is far steadier than a smoothed ratio, whose single-step
    values blow up whenever the |G|² estimate crosses zero (the paper does this, as do McCandlish et
    al. 2018, appendix A.1, who average the numerator and denominator separately).
    """
    return ema(trsigma, alpha) / ema(gtg, alpha)


class EMAGNS:
    """Running bias-corrected EMAs of |G|² and S per key (e.g. a parameter group), for the console line.

    `update(key, gtg, trsigma)` takes one step's raw estimates (floats, or 0-d tensors, which are read
    to the host) and returns the smoothed GNS of that key, the same value `gns_from_components` gives
    on the whole history. The logs keep the raw components, so this is for display only.
    """

    def __init__(self, alpha: float):
        _check_alpha(alpha)
        self.alpha = alpha
        self._state: dict[str, tuple[int, float, float]] = {}  # key -> (steps, m_gtg, m_trsigma)

    def update(self, key: str, gtg, trsigma) -> float:
        t, m_gtg, m_trsigma = self._state.get(key, (0, 0.0, 0.0))
        t += 1
        m_gtg = self.alpha * m_gtg + (1.0 - self.alpha) * float(gtg)
        m_trsigma = self.alpha * m_trsigma + (1.0 - self.alpha) * float(trsigma)
        self._state[key] = (t, m_gtg, m_trsigma)
        # the bias corrections (1 − α^t) of numerator and denominator cancel in the ratio
        return m_trsigma / m_gtg if m_gtg != 0.0 else math.nan

    def state_dict(self) -> dict:
        """For checkpoints, so a resumed run's console line continues the same averages."""
        return {"alpha": self.alpha, "state": dict(self._state)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved averages; the α this object was built with applies from here on (a resumed
        run may change gns.ema_alpha)."""
        self._state = {k: tuple(v) for k, v in state["state"].items()}


def group_of(param_name: str) -> str:
    """The layer type ("attention", "mlp", "layernorm" or "embedding") of a gnsrepro.model.GPT parameter.

    Names are nanoGPT's: transformer.h.N.attn.*, transformer.h.N.mlp.*, transformer.h.N.ln_1.*,
    transformer.h.N.ln_2.*, transformer.ln_f.*, transformer.wte.weight (token embedding, tied to the
    output head) and transformer.wpe.weight (position embedding). DDP's "module." and torch.compile's
    "_orig_mod." prefixes are stripped. These are the paper's layer-type groups.
    """
    name = param_name
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "transformer":
        if parts[1] in ("wte", "wpe"):
            return "embedding"
        if parts[1] == "ln_f":
            return "layernorm"
        if parts[1] == "h" and len(parts) >= 5 and parts[2].isdigit():
            block_groups = {"attn": "attention", "mlp": "mlp", "ln_1": "layernorm", "ln_2": "layernorm"}
            if parts[3] in block_groups:
                return block_groups[parts[3]]
    raise ValueError(
        f"unknown parameter name {param_name!r}: expected a gnsrepro.model.GPT name such as "
        "transformer.h.0.attn.c_attn.weight, transformer.ln_f.weight or transformer.wte.weight"
    )


def group_index(names: Iterable[str]) -> tuple[list[str], torch.Tensor]:
    """The groups present among `names` (in PARAM_GROUPS order) and each name's position in that list.

    Lets the training loop sum per-parameter values into groups on the device without a host sync:
        groups, index = group_index(names)
        sums = torch.zeros(len(groups), device=dev).index_add_(0, index.to(dev), torch.stack(values))
    """
    groups_of_names = [group_of(n) for n in names]
    groups = [g for g in PARAM_GROUPS if g in groups_of_names]
    index = torch.tensor([groups.index(g) for g in groups_of_names], dtype=torch.long)
    return groups, index


def gns_table(df: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """gns.parquet rows with a gns_ema column: the smoothed GNS of each (group, source) over its steps.

    Rows need step, group, source, b_big, b_small, sqnorm_big, sqnorm_small; gtg and trsigma are
    computed from the squared norms where the frame lacks them. Each (group, source) series is ordered
    by step and smoothed with `gns_from_components`. Returns a new frame with a fresh RangeIndex.
    """
    out = df.reset_index(drop=True)
    if "gtg" not in out or "trsigma" not in out:
        args = (out["b_big"], out["sqnorm_big"], out["b_small"], out["sqnorm_small"])
        out = out.assign(gtg=gtg_estimate(*args), trsigma=trsigma_estimate(*args))
    gns = pd.Series(np.nan, index=out.index)
    for _, rows in out.sort_values("step", kind="stable").groupby(["group", "source"], sort=False):
        gns[rows.index] = gns_from_components(rows["gtg"], rows["trsigma"], alpha).to_numpy()
    return out.assign(gns_ema=gns)
