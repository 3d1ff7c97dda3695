"""GNS estimators on synthetic gradients whose |G|² and tr(Σ) are known, EMA smoothing, parameter groups."""

import numpy as np
import pandas as pd
import pytest
import torch

from gnsrepro.gns import (
    EMAGNS,
    PARAM_GROUPS,
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
