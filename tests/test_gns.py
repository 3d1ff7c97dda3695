"""GNS estimators on synthetic gradients whose |G|² and tr(Σ) are known, EMA smoothing, the outlier guard,
parameter groups."""

import copy
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from gnsrepro.gns import (
    EMAGNS,
    MAD_TO_SIGMA,
    PARAM_GROUPS,
    HampelFilter,
    OnlineHampelFilter,
    ema,
    gns_from_components,
    gns_table,
    group_index,
    group_of,
    gtg_estimate,
    trsigma_estimate,
)
from gnsrepro.model import GPT, GPTConfig

# Synthetic per-example gradients g_b = G + ε_b, ε_b ~ N(0, diag(σ²)) in D dimensions.
D, B_BIG, DRAWS = 16, 32, 4000
G = np.full(D, 0.5)
SIGMA = np.linspace(0.5, 2.0, D)
TRUE_GTG, TRUE_TRSIGMA = float(G @ G), float(SIGMA @ SIGMA)


@pytest.fixture(scope="module")
def per_example_grads() -> np.ndarray:
    rng = np.random.default_rng(0)
    return G + SIGMA * rng.standard_normal((DRAWS, B_BIG, D))  # (draws, B, D)


def estimates(grads: np.ndarray, b_small: int) -> tuple[np.ndarray, np.ndarray]:
    """(|G|², S) per draw from small batches of b_small examples (1 = per-example norms)."""
    big = grads.mean(axis=1)  # (draws, D)
    small = grads.reshape(DRAWS, B_BIG // b_small, b_small, D).mean(axis=2)  # (draws, k, D)
    sqnorm_big = (big**2).sum(-1)
    sqnorm_small = (small**2).sum(-1).mean(-1)  # mean over the k small batches
    args = (B_BIG, sqnorm_big, b_small, sqnorm_small)
    return gtg_estimate(*args), trsigma_estimate(*args)


@pytest.mark.parametrize("b_small", [1, 4, 8])  # per-example, and micro-batches of B_big / k
def test_estimators_are_unbiased(per_example_grads, b_small):
    gtg, trsigma = estimates(per_example_grads, b_small)
    for draws, truth in ((gtg, TRUE_GTG), (trsigma, TRUE_TRSIGMA)):
        standard_error = draws.std(ddof=1) / np.sqrt(DRAWS)
        assert abs(draws.mean() - truth) < 4 * standard_error


def test_per_example_estimate_has_the_smallest_spread(per_example_grads):
    """The paper's estimator-variance figure: the standard error falls as B_small falls.

    With these shapes the std over draws of S is about 2.2 / 4.6 / 7.0 for B_small = 1 / 4 / 8, and
    of the per-draw GNS S/|G|² about 2.3 / 2.8 / 3.6; the margins below are far outside the sampling
    error of a std over 4000 draws (about 1%).
    """
    trsigma_std, gns_std = {}, {}
    for b_small in (1, 4, 8):
        gtg, trsigma = estimates(per_example_grads, b_small)
        trsigma_std[b_small], gns_std[b_small] = trsigma.std(), (trsigma / gtg).std()
    assert trsigma_std[1] < 0.7 * trsigma_std[4] < 0.7 * trsigma_std[8]
    assert gns_std[1] < 0.9 * gns_std[4] < 0.9 * gns_std[8]


def test_estimators_by_hand_on_floats_series_and_tensors():
    # B_big = 4, B_small = 1: |G|² = (4·2 − 1·5) / 3 = 1, S = (5 − 2) / (1 − 1/4) = 4
    assert gtg_estimate(4, 2.0, 1, 5.0) == pytest.approx(1.0)
    assert trsigma_estimate(4, 2.0, 1, 5.0) == pytest.approx(4.0)
    series = gtg_estimate(pd.Series([4, 8]), pd.Series([2.0, 2.0]), 1, pd.Series([5.0, 5.0]))
    assert isinstance(series, pd.Series)
    np.testing.assert_allclose(series, [1.0, (16 - 5) / 7])
    tensor = trsigma_estimate(4, torch.tensor([2.0, 1.0]), 1, torch.tensor([5.0, 4.0]))
    assert isinstance(tensor, torch.Tensor)
    torch.testing.assert_close(tensor, torch.tensor([4.0, 4.0]))


@pytest.mark.parametrize("estimator", [gtg_estimate, trsigma_estimate])
def test_estimators_reject_b_small_not_below_b_big(estimator):
    with pytest.raises(ValueError, match="b_small"):
        estimator(8, 1.0, 8, 2.0)
    with pytest.raises(ValueError, match="b_big"):
        estimator(4, 1.0, 8, 2.0)
    with pytest.raises(ValueError, match="b_small"):
        estimator(pd.Series([8, 4]), 1.0, pd.Series([1, 4]), 2.0)
    with pytest.raises(ValueError, match="b_small"):
        estimator(torch.tensor(2), 1.0, 2, 2.0)


def test_ema_of_a_constant_is_the_constant_from_the_first_step():
    np.testing.assert_allclose(ema([3.0] * 50, 0.99), 3.0)


def test_ema_two_steps_by_hand():
    # α = 0.5: m1 = 0.5·1 = 0.5, corrected 0.5 / (1 − 0.5) = 1;
    #          m2 = 0.5·0.5 + 0.5·3 = 1.75, corrected 1.75 / (1 − 0.25) = 7/3
    np.testing.assert_allclose(ema([1.0, 3.0], 0.5), [1.0, 7.0 / 3.0])
    smoothed = ema(pd.Series([1.0, 3.0], index=[10, 20], name="trsigma"), 0.5)
    assert list(smoothed.index) == [10, 20] and smoothed.name == "trsigma"
    np.testing.assert_allclose(ema([1.0, 3.0], 0.0), [1.0, 3.0])  # α = 0: no smoothing


def test_ema_rejects_alpha_outside_unit_interval():
    for alpha in (1.0, -0.1):
        with pytest.raises(ValueError, match="alpha"):
            ema([1.0], alpha)
        with pytest.raises(ValueError, match="alpha"):
            EMAGNS(alpha)


def test_gns_from_components_smooths_each_component_then_divides():
    # α = 0.5: ema(S) = [4, (0.5·2 + 0.5·8) / 0.75] = [4, 20/3]; ema(|G|²) = [2, 2]
    np.testing.assert_allclose(gns_from_components([2.0, 2.0], [4.0, 8.0], 0.5), [2.0, 10.0 / 3.0])


def test_emagns_matches_gns_from_components_per_key():
    rng = np.random.default_rng(1)
    gtg, trsigma = 1.0 + rng.standard_normal((2, 30)), 5.0 + rng.standard_normal((2, 30))
    running, last = EMAGNS(0.9), {}
    for step in range(30):
        for key in ("layernorm", "total"):  # interleaved keys must not share state
            row = 0 if key == "layernorm" else 1
            last[key] = running.update(key, torch.tensor(gtg[row, step]), trsigma[row, step])
    assert isinstance(last["total"], float)
    for row, key in enumerate(("layernorm", "total")):
        assert last[key] == pytest.approx(gns_from_components(gtg[row], trsigma[row], 0.9)[-1])


def ema_by_loop(values, alpha: float) -> np.ndarray:
    """The EMA as documented, step by step: m ← α·m + (1−α)·x and the normaliser w ← α·w + (1−α) over
    the non-NaN steps only (w = 1 − α^t, t of them), reported as m / w; a NaN step repeats the last."""
    m = w = 0.0
    out = []
    for x in values:
        if not math.isnan(x):
            m, w = alpha * m + (1.0 - alpha) * x, alpha * w + (1.0 - alpha)
        out.append(m / w if w > 0 else math.nan)
    return np.array(out)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 0.99, 0.999])
def test_ema_equals_the_loop_on_random_input_with_nan_steps(alpha):
    rng = np.random.default_rng(3)
    x = 3.0 + rng.standard_normal(500)
    x[:3] = np.nan  # no measurement yet: NaN until the first one
    x[rng.choice(np.arange(3, 500), 60, replace=False)] = np.nan  # gaps are skipped
    expected = ema_by_loop(x, alpha)
    assert np.isnan(expected[:3]).all() and np.isfinite(expected[3:]).all()
    np.testing.assert_allclose(ema(x, alpha), expected, rtol=1e-12, atol=0)
    series = pd.Series(x.astype(np.float32), index=np.arange(500) * 10, name="gtg")
    smoothed = ema(series, alpha)
    assert smoothed.dtype == np.float64 and smoothed.name == "gtg" and (smoothed.index == series.index).all()
    np.testing.assert_allclose(smoothed, ema_by_loop(x.astype(np.float32).astype(np.float64), alpha), rtol=1e-12)
    # several series at once are smoothed along the first axis (steps), each on its own
    both = ema(np.stack([x, x[::-1]], axis=1), alpha)
    np.testing.assert_allclose(both, np.stack([expected, ema_by_loop(x[::-1], alpha)], axis=1), rtol=1e-12)


def test_ema_a_nan_step_is_skipped_by_hand():
    # α = 0.5: the NaN step neither enters nor ages the average: [1, nan, 3] averages 1 and 3 as two
    # consecutive steps, (0.5·1 + 3) / 1.5 = 7/3, and the NaN step repeats the average before it
    np.testing.assert_allclose(ema([1.0, np.nan, 3.0], 0.5), [1.0, 1.0, 7.0 / 3.0])
    assert ema(np.array([]), 0.9).shape == (0,)
    with pytest.raises(ValueError, match="scalar"):
        ema(3.0, 0.9)


def test_ema_sweep_over_alphas_on_a_long_run_is_fast():
    x = pd.Series(np.random.default_rng(4).standard_normal(100_000))
    alphas = np.linspace(0.5, 0.999, 10)
    start = time.perf_counter()
    for alpha in alphas:
        ema(x, alpha)
    per_alpha = (time.perf_counter() - start) / len(alphas)
    assert per_alpha < 0.1, f"{per_alpha:.3f} s per alpha on 100k steps"  # ~2 ms here; the old loop ~40 ms


def test_hampel_filter_by_hand():
    # window 5, at least 3 values of history, k = 2
    guard = HampelFilter(window=5, n_sigmas=2.0, min_history=3)
    x = np.array([1.0, 2.0, 9.0, 4.0, np.nan, 5.0, 100.0, -50.0])
    out = guard.apply(x)
    # steps 0-2 have fewer than 3 values behind them: unchanged, even the 9
    np.testing.assert_array_equal(out[:3], x[:3])
    # step 3: history 1, 2, 9: median 2, MAD median(1, 0, 7) = 1; bound 2 ± 2·1.4826 = [-0.9652, 4.9652]
    assert out[3] == 4.0
    assert np.isnan(out[4])  # NaN stays NaN and is no history
    # step 5: history 1, 2, 9, 4 (NaN dropped): median 3, MAD median(2, 1, 6, 1) = 1.5; 5 is inside
    assert out[5] == 5.0
    # step 6: history 2, 9, 4, 5 (window of 5 steps, one NaN): median 4.5, MAD median(2.5, 4.5, 0.5, 0.5) = 1.5
    assert out[6] == pytest.approx(4.5 + 2.0 * MAD_TO_SIGMA * 1.5)
    # step 7: history 9, 4, 5, 100 (the raw 100, not its clipped value): median 7, MAD median(2, 3, 2, 93) = 2.5
    assert out[7] == pytest.approx(7.0 - 2.0 * MAD_TO_SIGMA * 2.5)
    series = guard.apply(pd.Series(x, index=np.arange(8) * 3, name="trsigma"))
    assert series.name == "trsigma" and list(series.index) == list(np.arange(8) * 3)
    np.testing.assert_array_equal(series.to_numpy(), out)


@pytest.mark.parametrize("settings", [HampelFilter(), HampelFilter(window=7, n_sigmas=3.0, min_history=1),
                                      HampelFilter(window=1, n_sigmas=1.0, min_history=1)])
def test_hampel_filter_online_equals_offline_on_random_series_with_spikes(settings):
    rng = np.random.default_rng(5)
    n = 3000
    x = 5.0 + rng.standard_t(df=3, size=n)  # heavy-tailed noise
    x[1500:] += 20.0  # a level shift
    spikes = rng.choice(n, 30, replace=False)
    x[spikes] *= rng.choice([-1000.0, 1000.0], 30)
    x[rng.choice(n, 100, replace=False)] = np.nan
    x[[2200, 2210, 2600]] = [np.inf, -np.inf, np.inf]  # overflowed steps: the two paths must agree there too
    offline = settings.apply(x)
    assert np.count_nonzero((offline != x) & ~np.isnan(x)) >= 20  # the filter acted (the spikes, at least)
    online = settings.online()
    assert isinstance(online, OnlineHampelFilter)
    stepwise = []
    for step, value in enumerate(x):
        if step == 1700:  # a checkpoint mid-run: a fresh filter continues from the saved history
            resumed = OnlineHampelFilter(settings)
            resumed.load_state_dict(copy.deepcopy(online.state_dict()))
            online = resumed
        stepwise.append(online.update(torch.tensor(value, dtype=torch.float64) if step % 2 else value))
    np.testing.assert_array_equal(np.array(stepwise), offline)  # the same bits


def test_hampel_filter_clips_the_injected_spikes_of_the_random_series():
    rng = np.random.default_rng(6)
    x = 5.0 + rng.standard_normal(2000)
    spikes = np.arange(100, 2000, 97)
    x[spikes] *= 1000.0
    out = HampelFilter().apply(x)
    # clipped to the bound, median + 5 estimated sigmas (σ = 1; its MAD estimate from 50 values has a
    # relative standard error of about 0.23, so within ±50%)
    assert ((out[spikes] > 5.0 + 5 * 0.5) & (out[spikes] < 5.0 + 5 * 1.5)).all()
    others = np.setdiff1d(np.arange(2000), spikes)
    assert (out[others] == x[others]).mean() > 0.999  # normal noise is (almost) never touched


def test_hampel_filter_hardly_changes_unbiased_per_example_estimates(per_example_grads):
    """The guard must not bias the estimators it protects (the docstring's claim): on 4000 steps of the
    synthetic per-example estimates it clips under 0.1% of steps and moves each component's mean by
    under 0.01% (here 1 of the 4000 |G|² steps, none of tr(Σ))."""
    gtg, trsigma = estimates(per_example_grads, 1)
    for raw in (gtg, trsigma):
        guarded = HampelFilter().apply(raw)
        assert (guarded != raw).mean() < 0.001
        assert abs(guarded.mean() - raw.mean()) < 1e-4 * abs(raw.mean())


def test_hampel_filter_rejects_bad_settings():
    for kwargs, name in (({"window": 0}, "window"), ({"window": 2.5}, "window"), ({"n_sigmas": 0.0}, "n_sigmas"),
                         ({"n_sigmas": math.inf}, "n_sigmas"), ({"min_history": 0}, "min_history"),
                         ({"window": 10, "min_history": 11}, "min_history")):
        with pytest.raises(ValueError, match=name):
            HampelFilter(**kwargs)
    with pytest.raises(ValueError, match="1-D"):
        HampelFilter().apply(np.ones((4, 2)))


# A constant true GNS of 50 / 5 = 10 with single-step noise of 20% on each component; α = 0.99 as in
# the paper. The smoothed GNS then has a relative standard deviation of about √2·0.2·√((1−α)/(1+α)) ≈ 2%.
TRUE_GTG_LEVEL, TRUE_TRSIGMA_LEVEL, STEPS, SPIKE_STEP = 5.0, 50.0, 1500, 600


def noisy_components(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gtg = TRUE_GTG_LEVEL * (1.0 + 0.2 * rng.standard_normal(STEPS))
    trsigma = TRUE_TRSIGMA_LEVEL * (1.0 + 0.2 * rng.standard_normal(STEPS))
    return gtg, trsigma


def test_guard_keeps_the_smoothed_gns_at_the_truth_after_a_one_step_spike():
    """The issue's failure: one example's huge gradient raises the mean per-example norm, so tr(Σ)
    spikes (x1000 here) while |G|² does not; later one step's |G|² spikes too."""
    gtg, trsigma = noisy_components(7)
    trsigma[SPIKE_STEP] *= 1000.0
    gtg[SPIKE_STEP + 300] *= 1000.0
    truth = TRUE_TRSIGMA_LEVEL / TRUE_GTG_LEVEL
    unguarded = gns_from_components(gtg, trsigma, 0.99)
    guarded = gns_from_components(gtg, trsigma, 0.99, guard=HampelFilter())
    relative = lambda gns: np.abs(gns / truth - 1.0)
    after = slice(SPIKE_STEP, SPIKE_STEP + 100)
    assert relative(unguarded[after]).min() > 2.0  # tripled and more, for 100 steps
    assert relative(unguarded[SPIKE_STEP + 300:SPIKE_STEP + 400]).min() > 0.5  # the |G|² spike: under half
    assert relative(guarded[200:]).max() < 0.1  # after the EMA's warm-up, within 10% of the truth throughout
    # before the spike the guard changed (almost) nothing
    np.testing.assert_allclose(guarded[200:SPIKE_STEP], unguarded[200:SPIKE_STEP], rtol=0.01)


def test_guard_follows_a_genuine_level_shift_after_about_a_window():
    gtg, trsigma = noisy_components(8)
    shift = 700
    trsigma[shift:] *= 3.0  # the GNS steps from 10 to 30 and stays there
    settings = HampelFilter()
    guarded_trsigma = settings.apply(trsigma)
    clipped = np.flatnonzero(guarded_trsigma != trsigma)
    assert len(clipped) > 0 and (clipped >= shift).all() and (clipped < shift + settings.window).all()
    np.testing.assert_array_equal(guarded_trsigma[shift + settings.window:], trsigma[shift + settings.window:])
    guarded = gns_from_components(gtg, trsigma, 0.99, guard=settings)
    unguarded = gns_from_components(gtg, trsigma, 0.99)
    late = slice(shift + 500, None)  # the EMA's own memory of the old level has faded (0.99^500 < 1%)
    assert np.abs(guarded[late] / 30.0 - 1.0).max() < 0.1
    np.testing.assert_allclose(guarded[late], unguarded[late], rtol=0.01)


def test_emagns_with_guard_matches_gns_from_components_and_resumes_from_its_state_dict():
    gtg, trsigma = noisy_components(9)
    trsigma[[300, 800]] *= 1000.0
    gtg[[500]] *= -1000.0
    gtg[[40, 41, 900]] = np.nan  # a missing component is skipped, as ema skips it
    trsigma[[41, 1200]] = np.nan
    settings = HampelFilter()
    expected = {"total": gns_from_components(gtg, trsigma, 0.99, guard=settings),
                "layernorm": gns_from_components(gtg[::-1], trsigma[::-1], 0.99, guard=settings)}
    running = EMAGNS(0.99, guard=settings)
    got = {"total": [], "layernorm": []}
    for step in range(STEPS):
        if step == 1000:  # a checkpoint mid-run (train.py saves state_dict() with torch.save)
            resumed = EMAGNS(0.99, guard=settings)
            resumed.load_state_dict(copy.deepcopy(running.state_dict()))
            running = resumed
        got["total"].append(running.update("total", gtg[step], trsigma[step]))
        got["layernorm"].append(running.update("layernorm", gtg[::-1][step], torch.tensor(trsigma[::-1][step])))
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10)
    truth = TRUE_TRSIGMA_LEVEL / TRUE_GTG_LEVEL
    assert np.abs(np.array(got["total"][200:]) / truth - 1.0).max() < 0.1


def test_emagns_loads_a_state_dict_of_the_old_format():
    """Checkpoints written before the guard held (steps, m_gtg, m_trsigma) per key and no guard state."""
    gtg, trsigma = noisy_components(10)
    alpha, split = 0.9, 50
    m_gtg = m_trsigma = 0.0
    for step in range(split):  # the old EMAGNS.update, by hand
        m_gtg = alpha * m_gtg + (1 - alpha) * gtg[step]
        m_trsigma = alpha * m_trsigma + (1 - alpha) * trsigma[step]
    old_state = {"alpha": alpha, "state": {"total": (split, m_gtg, m_trsigma)}}
    plain, guarded = EMAGNS(alpha), EMAGNS(alpha, guard=HampelFilter())
    plain.load_state_dict(old_state)
    guarded.load_state_dict(old_state)
    for step in range(split, 200):
        last_plain = plain.update("total", gtg[step], trsigma[step])
        last_guarded = guarded.update("total", gtg[step], trsigma[step])
    assert last_plain == pytest.approx(gns_from_components(gtg[:200], trsigma[:200], alpha)[-1], rel=1e-12)
    # the guard starts with no history at the resume: the first steps pass, then it guards what follows
    steps_guarded = lambda c: np.concatenate([c[:split], HampelFilter().apply(c[split:200])])
    expected = gns_from_components(steps_guarded(gtg), steps_guarded(trsigma), alpha)[-1]
    assert last_guarded == pytest.approx(expected, rel=1e-12)


def test_gns_table_passes_the_guard_to_each_series():
    gtg, trsigma = noisy_components(11)
    trsigma[SPIKE_STEP] *= 1000.0
    df = pd.DataFrame({"step": np.arange(STEPS), "group": "total", "source": "per_example", "gtg": gtg,
                       "trsigma": trsigma, "b_big": 8, "b_small": 1, "sqnorm_big": 1.0, "sqnorm_small": 2.0})
    table = gns_table(df, alpha=0.99, guard=HampelFilter())
    np.testing.assert_allclose(table["gns_ema"], gns_from_components(gtg, trsigma, 0.99, guard=HampelFilter()))
    assert not np.allclose(table["gns_ema"], gns_table(df, alpha=0.99)["gns_ema"])


def test_group_of_covers_every_gpt_parameter():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    groups = {name: group_of(name) for name, _ in model.named_parameters()}
    assert set(groups.values()) == set(PARAM_GROUPS)
    assert sum(g == "layernorm" for g in groups.values()) == 2 * (2 * 2) + 2  # ln_1, ln_2 per block, ln_f
    assert groups["transformer.wte.weight"] == "embedding" and groups["transformer.wpe.weight"] == "embedding"
    assert groups["transformer.h.1.attn.c_proj.weight"] == "attention"
    assert groups["transformer.h.0.mlp.c_proj.bias"] == "mlp"
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        assert group_of(prefix + "transformer.h.0.ln_2.weight") == "layernorm"


@pytest.mark.parametrize(
    "name", ["lm_head.weight", "transformer.h.0.weight", "transformer.h.x.attn.c_attn.weight", "transformer.wte", ""]
)
def test_group_of_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown parameter name"):
        group_of(name)


def test_group_index_sums_into_groups_with_index_add():
    names = ["transformer.h.0.ln_1.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.bias"]
    groups, index = group_index(names)
    assert groups == ["mlp", "layernorm"]  # present groups only, in PARAM_GROUPS order
    assert index.dtype == torch.long and index.tolist() == [1, 0, 1]
    sums = torch.zeros(len(groups)).index_add_(0, index, torch.tensor([1.0, 2.0, 4.0]))
    assert sums.tolist() == [2.0, 5.0]


def test_gns_table_smooths_each_group_and_source_in_step_order():
    rng = np.random.default_rng(2)
    steps = np.arange(20)
    frames = []
    for group, source, b_small in (("layernorm", "per_example", 1), ("layernorm", "microbatch", 8),
                                   ("total", "per_example", 1)):
        sqnorm_small = 10.0 + rng.random(20)
        frames.append(pd.DataFrame({"step": steps, "tokens": steps * 512, "group": group, "source": source,
                                    "b_big": 32, "b_small": b_small, "sqnorm_big": 1.0 + rng.random(20),
                                    "sqnorm_small": sqnorm_small}))
    df = pd.concat(frames).sample(frac=1.0, random_state=0)  # logs need not be in step order
    table = gns_table(df, alpha=0.9)
    assert len(table) == 60 and table["gns_ema"].notna().all()
    for _, rows in table.groupby(["group", "source"]):
        rows = rows.sort_values("step")
        args = (rows["b_big"], rows["sqnorm_big"], rows["b_small"], rows["sqnorm_small"])
        expected = gns_from_components(gtg_estimate(*args), trsigma_estimate(*args), 0.9)
        np.testing.assert_allclose(rows["gns_ema"], expected)
    # logged gtg / trsigma columns are used as they are
    logged = gns_table(table.drop(columns="gns_ema").assign(gtg=1.0, trsigma=3.0), alpha=0.9)
    np.testing.assert_allclose(logged["gns_ema"], 3.0)


class FakeBucket:
    """What DDP hands a communication hook (torch.distributed.GradBucket), for the methods used."""

    def __init__(self, index, params, grads):
        self._index, self._params, self._grads = index, params, grads
        self._buffer = torch.cat([g.reshape(-1) for g in grads])

    def index(self):
        return self._index

    def parameters(self):
        return self._params

    def gradients(self):
        return self._grads

    def buffer(self):
        return self._buffer


def test_ddp_hook_follows_rebuilt_buckets(tmp_path):
    """DDP rebuilds its buckets after the first step (same index, other parameters and order); each
    rank-local squared norm must still land on its own parameter."""
    import torch.distributed as dist

    from gnsrepro.gns_tracker import GNSTracker

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=8))
        tracker = GNSTracker(model, world_size=2)
        params = tracker.params
        expected = torch.tensor([(i + 1) ** 2 * p.numel() for i, p in enumerate(params)], dtype=torch.float32)
        half = len(params) // 2
        layouts = [  # (bucket index, parameter positions): the first step's, then rebuilt ones
            [(0, list(range(len(params))))],
            [(0, list(reversed(range(len(params)))))],  # same size, other order: would be silently wrong
            [(0, list(reversed(range(half, len(params))))), (1, list(range(half)))],
        ]
        for buckets in layouts:
            tracker.begin_step()
            for index, order in buckets:
                grads = [torch.full_like(params[i], float(i + 1)) for i in order]  # value names the parameter
                tracker.ddp_comm_hook(None, FakeBucket(index, [params[i] for i in order], grads)).wait()
            torch.testing.assert_close(tracker._local_sq, expected)
    finally:
        dist.destroy_process_group()
