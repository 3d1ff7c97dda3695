"""Cost model of per-example norms: FLOP formulas against torch's FLOP counter, method choice, model table."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gnsrepro.config import ModelConfig
from gnsrepro.cost import (
    METHODS,
    choose_linear_method,
    ghost,
    layernorm_only,
    model_costs,
    ordinary_weight_grad,
    run_cost,
    seq_len_sweep,
    simultaneous,
)
from gnsrepro.errors import ConfigError
from gnsrepro.model import GPT, GPTConfig

B, T, K, L = 3, 7, 5, 11  # small odd shapes: every term of the formulas differs
GPT_111M = GPTConfig(n_layer=10, n_head=12, n_embd=768, block_size=2048, vocab_size=50304)


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture
def activations():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(B, T, K, generator=gen), torch.randn(B, T, L, generator=gen)  # x, dy


def test_ordinary_weight_grad_flops_match_linear_backward(activations):
    x, dy = activations  # x does not require grad: the backward computes dW (and db, a sum) only
    linear = torch.nn.Linear(K, L)
    y = linear(x)
    assert counted_flops(lambda: y.backward(dy)) == ordinary_weight_grad(B, T, K, L).flops


def test_simultaneous_batched_matmul_flops(activations):
    x, dy = activations
    per_example = counted_flops(lambda: torch.bmm(dy.transpose(1, 2), x))  # (B, L, K)
    assert per_example == ordinary_weight_grad(B, T, K, L).flops  # the batched matmul replaces dW's
    assert simultaneous(B, T, K, L).flops == per_example + 3 * B * K * L


def test_ghost_gram_flops(activations):
    x, dy = activations

    def ghost_norms():
        grams_x, grams_dy = x @ x.transpose(1, 2), dy @ dy.transpose(1, 2)  # (B, T, T) each
        return torch.einsum("bij,bij->b", grams_x, grams_dy)

    norms = ghost_norms()
    torch.testing.assert_close(norms, (torch.bmm(dy.transpose(1, 2), x) ** 2).sum((1, 2)))  # same |G_b|²
    assert ghost(B, T, K, L).flops == counted_flops(ghost_norms) + ordinary_weight_grad(B, T, K, L).flops


def test_bytes_grow_by_the_per_example_tensors():
    bpe = 2
    base = ordinary_weight_grad(B, T, K, L, bpe).bytes
    assert base == (B * T * K + B * T * L + K * L) * bpe
    assert simultaneous(B, T, K, L, bpe).bytes - base == 2 * B * K * L * bpe + 4 * B  # (B, L, K) out and in
    assert ghost(B, T, K, L, bpe).bytes - base == (B * T * (K + L) + 4 * B * T * T) * bpe + 4 * B
    assert layernorm_only(B, T, 768).bytes == layernorm_only(B, 2 * T, 768).bytes  # O(B·N), not O(B·T·N)


def test_choose_linear_method_at_111M_shapes():
    assert choose_linear_method(2048, 768, 3072) == "simultaneous"
    assert choose_linear_method(16, 768, 3072) == "ghost"
    assert choose_linear_method(16, 3072, 768) == "ghost"
    assert choose_linear_method(2048, 768, 50304) == "simultaneous"  # the output head


def test_model_costs_table_111M():
    T_111M = 2048
    costs = model_costs(GPT_111M, seq_len=T_111M, batch_size=2)
    assert list(costs.index) == list(METHODS)
    for column in ("flops", "bytes", "flops_fraction", "bytes_fraction"):
        assert (costs[column] > 0).all(), column
    # Bound: the extra is 3·B·Σ K·L and the model costs ≥ 6·N_matmul·B·T ≥ 6·B·T·Σ K·L FLOPs, so the
    # simultaneous method's extra fraction is at most 1/(2T) = 0.024% at T = 2048 (it is 0.019%).
    assert 0 < costs.loc["simultaneous", "extra_flops_fraction"] <= 1 / (2 * T_111M)
    # The paper's first claim: at long sequences the Gram matrices cost far more than that
    assert costs.loc["ghost", "extra_flops_fraction"] > 0.5
    assert costs.loc["layernorm_only", "extra_flops_fraction"] < 1e-4
    # dW is a third of each Linear's 6·K·L per token, and the model has attention FLOPs besides
    assert 0.2 < costs.loc["ordinary", "flops_fraction"] < 1 / 3


def test_model_costs_use_the_model_flops_per_token():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    costs = model_costs(config, seq_len=8, batch_size=4)
    model_flops = GPT(config).flops_per_token(8) * 4 * 8
    assert costs.attrs["model_flops"] == model_flops
    assert costs.loc["ordinary", "flops_fraction"] == pytest.approx(costs.loc["ordinary", "flops"] / model_flops)


def cost_cfg(**overrides):
    model = ModelConfig(name="111M", n_layer=10, n_head=12, n_embd=768, block_size=2048, vocab_size=50304,
                        bias=True, dropout=0.0, cosine_attn_blocks=[0])  # as the CLI's `model` node
    return SimpleNamespace(**{"model": model, "seq_len": None, "batch_size": 1, "bytes_per_element": 2, **overrides})


def test_run_cost_prints_the_table_and_the_sweep(capsys):
    table, sweep = run_cost(cost_cfg())
    printed = capsys.readouterr().out
    assert "seq_len=2048" in printed and "Li et al." in printed and "LayerNorm only" in printed
    assert sorted(sweep["seq_len"].unique()) == [128, 256, 512, 1024, 2048, 4096]
    by_len = sweep[sweep["method"] == "simultaneous"].set_index("seq_len")["extra_flops_fraction"]
    assert by_len.is_monotonic_decreasing  # 3·K·L per example against a model cost growing with T
    assert table.loc["ghost", "extra_flops"] > table.loc["simultaneous", "extra_flops"]


def test_run_cost_rejects_a_non_positive_seq_len():
    with pytest.raises(ConfigError, match="seq_len"):
        run_cost(cost_cfg(seq_len=0))


def test_seq_len_sweep_absolute_columns_match_the_table():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    sweep = seq_len_sweep(config, seq_lens=(8, 32), batch_size=3).set_index(["seq_len", "method"])
    for T in (8, 32):
        costs = model_costs(config, T, batch_size=3)
        for method in ("simultaneous", "ghost", "layernorm_only"):
            row = sweep.loc[(T, method)]
            assert row["extra_flops"] == costs.loc[method, "extra_flops"]
            assert row["extra_bytes"] == costs.loc[method, "extra_bytes"]
            assert row["model_flops"] == costs.attrs["model_flops"]
            assert row["extra_flops_fraction"] == pytest.approx(row["extra_flops"] / row["model_flops"])
            assert row["extra_bytes_fraction"] == pytest.approx(row["extra_bytes"] / row["model_bytes"])
