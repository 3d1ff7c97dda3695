"""Gradient noise scale (GNS) estimators: pure math on numbers, no training code.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), appendix A.1:
with G the true gradient, Σ the per-example gradient covariance and G_B a gradient averaged over B
examples, E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes B_small < B_big give unbiased estimates of |G|²
and S = tr(Σ), and the simple noise scale is B_simple = tr(Σ)/|G|². Both estimates are noisy and can
be negative on a single step, so each is smoothed with an EMA before taking the ratio (as the paper
does, α = 0.99 in the authors' analysis). A single step's outlier enters that EMA with weight 1−α and
then decays only as α^t, so an optional guard (`HampelFilter`, a causal Hampel filter) can clip
one-step outliers of each component before it is smoothed.

The estimators are plain arithmetic, so they take Python floats, numpy arrays, pandas Series and torch
tensors alike, and return the same kind.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

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
    value that creeps up from zero. That is pandas' `ewm(alpha=1−α, adjust=True)`, which computes
        y_t = Σ_{i≤t} α^{t−i}·x_i / Σ_{i≤t} α^{t−i},   and   Σ_{i=1..t} α^{t−i} = (1 − α^t) / (1 − α),
    so y_t = (1−α)·Σ α^{t−i}·x_i / (1 − α^t) = m_t / (1 − α^t): the same numbers, vectorised.

    A NaN step (a missing measurement) is skipped, pandas' `ignore_na=True`: it neither enters the
    average nor ages the steps before it, as if it had not been logged, so t counts the non-NaN steps.
    The output at a NaN step repeats the average so far (NaN before the first non-NaN step). An
    infinity is a value, not a gap, and stays in the average. `EMAGNS` treats NaN the same way.

    Returns a float64 Series with the same index and name for a Series, else a float64 numpy array;
    an array of more than one dimension is averaged along its first axis (steps).
    """
    _check_alpha(alpha)
    if isinstance(values, pd.Series):
        return values.astype(np.float64).ewm(alpha=1.0 - alpha, adjust=True, ignore_na=True).mean()
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError(f"ema needs a sequence of steps, got a scalar {values!r}")
    columns = pd.DataFrame(x.reshape(x.shape[0], math.prod(x.shape[1:])))  # a column per series, rows are steps
    return columns.ewm(alpha=1.0 - alpha, adjust=True, ignore_na=True).mean().to_numpy().reshape(x.shape)


# Consistency constant of the median absolute deviation: 1/Φ⁻¹(3/4), so that 1.4826·MAD estimates the
# standard deviation of normal data (Hampel 1974; Pearson et al. 2016).
MAD_TO_SIGMA = 1.4826

# Rows of (steps, window) history that `HampelFilter.apply` sorts at once: bounds its memory to a
# few copies of 2^15 · window · 8 bytes (13 MB at window 50) whatever the length of the run.
_HAMPEL_CHUNK_ROWS = 2**15


@dataclass(frozen=True)
class HampelFilter:
    """A causal Hampel filter: the guard of the GNS components against one-step outliers.

    Hampel 1974 ("The influence curve and its role in robust estimation", JASA 69:383) and, as a
    moving-window filter, Pearson, Neuvo, Astola & Gabbouj 2016 ("Generalized Hampel filters",
    EURASIP J. Adv. Signal Process. 2016:87). For each step t, from the `window` steps
    before it (never step t itself or later steps, so the filter is causal and the online
    `OnlineHampelFilter` gives the same numbers step by step):
        m_t = median(x_{t−W}, …, x_{t−1}),   σ_t = 1.4826 · median(|x_{t−W} − m_t|, …, |x_{t−1} − m_t|)
        x̃_t = clip(x_t, m_t − k·σ_t, m_t + k·σ_t)
    The history is the raw values, not the filtered ones, so a genuine level shift enters the median
    and is followed, clipped only until it fills about half of the window (about W/2 steps; after W
    steps the window holds only the new level), instead of being held back for ever. NaN steps stay
    NaN and do not count as history; steps with fewer than `min_history` non-NaN values behind them
    pass through unchanged.
    Unlike the classic filter, which replaces an outlier by the median, an outlier is clipped to the
    bound (winsorised): the value keeps its direction, and on a skewed noise distribution the rare
    clipped tail value moves less than it would to the median, so the average is less biased.

    Why this is needed: one step's spike (|G_B|² = 10289 against about 5 around it on a CPU run)
    enters an EMA with α = 0.99 with weight 0.01 and then decays as 0.99^t, so it held the smoothed
    GNS far off for hundreds of steps. Apply it to each raw component (|G|², tr(Σ)) before the EMA:
    `gns_from_components(..., guard=HampelFilter())`, `EMAGNS(alpha, guard=HampelFilter())`.

    Defaults, and why:
    - window = 50 steps: short against the EMA's memory (1/(1−α) = 100 steps at α = 0.99), so a
      genuine change is followed well before the EMA would have absorbed it, and against the slow
      drift of the GNS over training; long enough that the median and MAD of single-step estimates
      are stable (the MAD's efficiency is 37% of the standard deviation's, so the relative standard
      error of 1.4826·MAD from n normal values is about 1/√(2·0.37·n): 0.16 at n = 50).
    - n_sigmas = k = 5: wider than Hampel's usual 3, because the single-step |G|² and tr(Σ) estimates
      are noisy by nature and their averages are what we want: on normal noise a 5σ bound clips a
      fraction 6e-7 of steps (the uncertainty of σ_t raises that: on the synthetic per-example
      estimates of tests/test_gns.py it clips 1 of 4000 |G|² steps and no tr(Σ) step, and moves
      their mean by under 0.01%), while the spike above is thousands of σ out. A noise-free linear
      trend is never clipped: the newest value is about W/2 slopes above the median and the MAD of
      a linear ramp is about W/4 slopes, so the bound k·1.4826·W/4 exceeds W/2 slopes for k > 1.35.
    - min_history = 20 steps: a median and MAD from fewer values are too unreliable to act on (at 20
      the relative standard error of σ_t is about 0.26, which k = 5 still absorbs).
    """

    window: int = 50
    n_sigmas: float = 5.0
    min_history: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"HampelFilter window must be a positive integer (steps), got window={self.window!r}")
        if not (isinstance(self.n_sigmas, int | float) and math.isfinite(self.n_sigmas) and self.n_sigmas > 0):
            raise ValueError(f"HampelFilter n_sigmas must be a positive number, got n_sigmas={self.n_sigmas!r}")
        if (isinstance(self.min_history, bool) or not isinstance(self.min_history, int)
                or not 1 <= self.min_history <= self.window):
            raise ValueError(f"HampelFilter min_history must be an integer in [1, window={self.window}], "
                             f"got min_history={self.min_history!r}")

    def apply(self, values):
        """The filter over a whole series at once (vectorised; for the analysis and figures).

        Returns a float64 Series with the same index and name for a Series, else a float64 numpy array.
        """
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"HampelFilter.apply needs a 1-D series of steps, got shape {x.shape}")
        padded = np.concatenate([np.full(self.window, np.nan), x])  # NaN: no history before the first step
        history = np.lib.stride_tricks.sliding_window_view(padded, self.window)[: len(x)]  # (steps, W), x_{t−W..t−1}
        out = np.empty_like(x)
        for start in range(0, len(x), _HAMPEL_CHUNK_ROWS):
            rows = slice(start, start + _HAMPEL_CHUNK_ROWS)
            out[rows] = self._guard(x[rows], history[rows])
        return pd.Series(out, index=values.index, name=values.name) if isinstance(values, pd.Series) else out

    def online(self) -> OnlineHampelFilter:
        """A step-by-step filter with these settings (for the training loop and the console)."""
        return OnlineHampelFilter(self)

    def _guard(self, x: np.ndarray, history: np.ndarray) -> np.ndarray:
        """x: (m,) one value per step; history: (m, W) the W values before each, NaN where there are none.

        `OnlineHampelFilter.update` does the same float64 operations in the same order on one step, in
        plain Python (about 8 µs a call instead of numpy's 50), so the two agree to the bit.
        """
        out = x.copy()
        enough = (np.count_nonzero(~np.isnan(history), axis=1) >= self.min_history) & ~np.isnan(x)
        if enough.any():
            past = history[enough]
            median = _nanmedian_of_rows(past)
            with np.errstate(invalid="ignore"):  # inf − inf where the history holds an overflowed step: NaN
                sigma = MAD_TO_SIGMA * _nanmedian_of_rows(np.abs(past - median[:, None]))
            out[enough] = np.clip(x[enough], median - self.n_sigmas * sigma, median + self.n_sigmas * sigma)
        return out


def _nanmedian_of_rows(a: np.ndarray) -> np.ndarray:
    """Median of each row of a 2-D array, ignoring NaN (each row has at least one value).

    By sorting (NaN sorts last), so a row's median is the same bits whether it is one row of many or
    alone, which np.nanmedian does not promise across its code paths.
    """
    ordered = np.sort(a, axis=1)
    count = np.count_nonzero(~np.isnan(a), axis=1)
    rows = np.arange(len(a))
    return 0.5 * (ordered[rows, (count - 1) // 2] + ordered[rows, count // 2])


def _median(values: list[float]) -> float:
    """`_nanmedian_of_rows` of one row without NaN, in plain Python: the same operations, the same bits."""
    ordered = sorted(values)
    count = len(ordered)
    return 0.5 * (ordered[(count - 1) // 2] + ordered[count // 2])


class OnlineHampelFilter:
    """`HampelFilter` one step at a time: `update(x)` returns the guarded x_t and records the raw x_t.

    Gives exactly the numbers `HampelFilter.apply` gives on the whole series; its state (the last
    `window` raw values) goes into checkpoints through `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, settings: HampelFilter | None = None):
        self.settings = settings if settings is not None else HampelFilter()
        self._history: deque[float] = deque(maxlen=self.settings.window)

    def update(self, x) -> float:
        """x: a float or a 0-d tensor (read to the host). Returns the guarded value as a float."""
        value = float(x)
        guarded = value
        past = [v for v in self._history if not math.isnan(v)]
        if len(past) >= self.settings.min_history and not math.isnan(value):
            median = _median(past)
            sigma = MAD_TO_SIGMA * _median([abs(v - median) for v in past])
            low, high = median - self.settings.n_sigmas * sigma, median + self.settings.n_sigmas * sigma
            # np.clip's result, NaN bounds included (an infinite history can make them NaN)
            guarded = math.nan if math.isnan(low) or math.isnan(high) else min(max(value, low), high)
        self._history.append(value)  # the raw value: a level shift must reach the median
        return guarded

    def state_dict(self) -> dict:
        return {"window": self.settings.window, "n_sigmas": self.settings.n_sigmas,
                "min_history": self.settings.min_history, "history": list(self._history)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from saved history; this object's settings apply from here on (the newest `window`
        saved values are kept if the window changed)."""
        self._history = deque((float(v) for v in state["history"]), maxlen=self.settings.window)


def gns_from_components(gtg, trsigma, alpha: float, guard: HampelFilter | None = None):
    """B_simple = ema(S) / ema(|G|²): each noisy component is smoothed first, then the ratio is taken.

    The ratio of two smoothed estimates is far steadier than a smoothed ratio, whose single-step
    values blow up whenever the |G|² estimate crosses zero (the paper does this, as do McCandlish et
    al. 2018, appendix A.1, who average the numerator and denominator separately).

    guard: None (the default) smooths the raw components, as before; a `HampelFilter` first clips
    one-step outliers of each component (see there), e.g. `guard=HampelFilter()`.
    """
    if guard is not None:
        gtg, trsigma = guard.apply(gtg), guard.apply(trsigma)
    return ema(trsigma, alpha) / ema(gtg, alpha)


class EMAGNS:
    """Running bias-corrected EMAs of |G|² and S per key (e.g. a parameter group), for the console line.

    `update(key, gtg, trsigma)` takes one step's raw estimates (floats, or 0-d tensors, which are read
    to the host) and returns the smoothed GNS of that key, the same value `gns_from_components` gives
    on the whole history with the same `guard` (None, or a `HampelFilter` whose online state per key
    and component is kept here); NaN components are skipped as `ema` skips them. The logs keep the raw
    components, so this is for display (and for a schedule that acts on the GNS while training).
    """

    def __init__(self, alpha: float, guard: HampelFilter | None = None):
        _check_alpha(alpha)
        self.alpha = alpha
        self.guard = guard
        # key -> (non-NaN steps of |G|², m_gtg, non-NaN steps of S, m_trsigma)
        self._state: dict[str, tuple[int, float, int, float]] = {}
        self._guards: dict[str, tuple[OnlineHampelFilter, OnlineHampelFilter]] = {}  # key -> (|G|², S)

    def update(self, key: str, gtg, trsigma) -> float:
        gtg, trsigma = float(gtg), float(trsigma)
        if self.guard is not None:
            if key not in self._guards:
                self._guards[key] = (self.guard.online(), self.guard.online())
            gtg, trsigma = self._guards[key][0].update(gtg), self._guards[key][1].update(trsigma)
        n_gtg, m_gtg, n_trsigma, m_trsigma = self._state.get(key, (0, 0.0, 0, 0.0))
        if not math.isnan(gtg):
            n_gtg, m_gtg = n_gtg + 1, self.alpha * m_gtg + (1.0 - self.alpha) * gtg
        if not math.isnan(trsigma):
            n_trsigma, m_trsigma = n_trsigma + 1, self.alpha * m_trsigma + (1.0 - self.alpha) * trsigma
        self._state[key] = (n_gtg, m_gtg, n_trsigma, m_trsigma)
        if n_gtg == 0 or n_trsigma == 0 or m_gtg == 0.0:
            return math.nan
        if n_gtg == n_trsigma:  # the bias corrections (1 − α^t) of numerator and denominator cancel
            return m_trsigma / m_gtg
        return (m_trsigma / (1.0 - self.alpha**n_trsigma)) / (m_gtg / (1.0 - self.alpha**n_gtg))

    def state_dict(self) -> dict:
        """For checkpoints, so a resumed run's console line continues the same averages."""
        return {"alpha": self.alpha, "state": dict(self._state),
                "guard": {k: (g.state_dict(), s.state_dict()) for k, (g, s) in self._guards.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved averages; the α and guard this object was built with apply from here on (a
        resumed run may change gns.ema_alpha). Loads the older format too, whose entries were
        (steps, m_gtg, m_trsigma) and had no guard (a guard then starts with an empty history)."""
        self._state = {}
        for key, entry in state["state"].items():
            if len(entry) == 3:  # before NaN steps were skipped: both components counted every step
                steps, m_gtg, m_trsigma = entry
                entry = (steps, m_gtg, steps, m_trsigma)
            self._state[key] = tuple(entry)
        self._guards = {}
        if self.guard is not None:
            for key, (gtg_state, trsigma_state) in state.get("guard", {}).items():
                self._guards[key] = (self.guard.online(), self.guard.online())
                self._guards[key][0].load_state_dict(gtg_state)
                self._guards[key][1].load_state_dict(trsigma_state)


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


def gns_table(df: pd.DataFrame, alpha: float, guard: HampelFilter | None = None) -> pd.DataFrame:
    """gns.parquet rows with a gns_ema column: the smoothed GNS of each (group, source) over its steps.

    Rows need step, group, source, b_big, b_small, sqnorm_big, sqnorm_small; gtg and trsigma are
    computed from the squared norms where the frame lacks them. Each (group, source) series is ordered
    by step and smoothed with `gns_from_components` (with `guard`, None by default: no outlier guard).
    Returns a new frame with a fresh RangeIndex.
    """
    out = df.reset_index(drop=True)
    if "gtg" not in out or "trsigma" not in out:
        args = (out["b_big"], out["sqnorm_big"], out["b_small"], out["sqnorm_small"])
        out = out.assign(gtg=gtg_estimate(*args), trsigma=trsigma_estimate(*args))
    gns = pd.Series(np.nan, index=out.index)
    for _, rows in out.sort_values("step", kind="stable").groupby(["group", "source"], sort=False):
        gns[rows.index] = gns_from_components(rows["gtg"], rows["trsigma"], alpha, guard=guard).to_numpy()
    return out.assign(gns_ema=gns)
