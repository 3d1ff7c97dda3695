"""The GPT's forward against the textbook pre-LN formulation it restructures."""

import pytest
import torch
import torch.nn.functional as F

from gnsrepro.model import GPT, GPTConfig, LayerNorm


def classic_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's forward, written out: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)); ln_f; tied head."""
    t = model.transformer
    pos = torch.arange(idx.shape[1]).expand_as(idx)
    x = t.wte(idx) + t.wpe(pos)
    for block in t.h:
        x = x + block.attn(block.ln_1(x))
        x = x + block.mlp(block.ln_2(x))
    return t.wte.unembed(t.ln_f(x))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_residual_carried_into_layer_norms_gives_the_classic_forward(bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=16, bias=bias)).double()
    idx = torch.randint(0, 64, (3, 11))
    logits, _ = model(idx, targets=idx)
    torch.testing.assert_close(logits, classic_forward(model, idx), rtol=0, atol=0)


def test_layer_norm_with_residual_returns_the_sum_and_its_norm():
    ln = LayerNorm(8).double()
    x, r = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    y, s = ln(x, r)
    torch.testing.assert_close(s, r + x, rtol=0, atol=0)
    torch.testing.assert_close(y, F.layer_norm(r + x, (8,), ln.weight, ln.bias, 1e-5), rtol=0, atol=0)
