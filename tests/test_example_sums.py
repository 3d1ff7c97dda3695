"""The one-read sum over examples and per-example squared norms (gnsrepro.kernels.example_sums) against float64.

The reference is torch's two reductions of the same G in float64: Σ_b G_b and Σ G_b² per example. The kernel
reads fp32 G and sums in fp32, so what is left is fp32 rounding of sums of at most a few thousand terms: about
1e-7 relative, checked at TOL. Shapes are odd and the blocks small (BLOCK_N 16, BLOCK_B 16 over B = 17 and 33),
so every edge of both block dimensions falls inside a tile. CPU runs the kernel in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); GPU tests are marked. The pegn path that calls it on a GPU (the
simultaneous method's torch backend) is checked against vmap per-example gradients in tests/test_pegn.py and
tests/test_per_example_grad.py's GPU tests.
"""

from __future__ import annotations

import pytest
import torch

from gnsrepro.kernels.example_sums import BLOCK_B, sum_and_sqnorms, sum_and_sqnorms_launch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-6


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def reference(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    G = G.double()
    return G.sum(0), G.square().flatten(1).sum(1)


def make(shape, seed=0, device=DEV) -> torch.Tensor:
    """fp32 G whose examples differ in scale (example b by b + 1) and whose mean is not zero, so that a sum over the
    wrong axis or a dropped example changes both outputs."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(shape, generator=gen) + 0.5
    G = G * torch.arange(1, shape[0] + 1, dtype=torch.float32).view(-1, *([1] * (len(shape) - 1)))
    return G.to(device)


@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 40, 97), (BLOCK_B + 1, 9, 13), (2 * BLOCK_B + 1, 3, 31), (4, 300)])
@pytest.mark.parametrize("block_n", [16, 0])
def test_sum_and_sqnorms_equal_float64_reductions(shape, block_n):
    G = make(shape)
    dW, sq = sum_and_sqnorms_launch(G, block_n=block_n)
    want_dW, want_sq = reference(G)
    assert dW.shape == G.shape[1:] and dW.dtype == torch.float32 and sq.shape == (shape[0],)
    assert rel(dW, want_dW) < TOL
    assert torch.allclose(sq.double(), want_sq, rtol=TOL, atol=0)


def test_known_answer_of_a_constant_gradient():
    """G_b = (b + 1) everywhere over N entries: Σ_b G_b = B(B + 1)/2 per entry, |G_b|² = (b + 1)² N."""
    B, L, K = BLOCK_B + 3, 6, 11
    G = torch.arange(1, B + 1, dtype=torch.float32, device=DEV).view(B, 1, 1).expand(B, L, K).contiguous()
    dW, sq = sum_and_sqnorms_launch(G, block_n=32)
    assert torch.equal(dW, torch.full((L, K), B * (B + 1) / 2, device=DEV))
    assert torch.equal(sq, torch.arange(1, B + 1, dtype=torch.float32, device=DEV) ** 2 * (L * K))


def test_non_contiguous_input_and_empty_batch():
    G = make((5, 13, 9)).transpose(1, 2)  # (5, 9, 13), not contiguous
    dW, sq = sum_and_sqnorms_launch(G, block_n=16)
    want_dW, want_sq = reference(G)
    assert dW.shape == (9, 13) and rel(dW, want_dW) < TOL
    assert torch.allclose(sq.double(), want_sq, rtol=TOL, atol=0)
    dW0, sq0 = sum_and_sqnorms_launch(torch.zeros(0, 4, 3, device=DEV))
    assert dW0.shape == (4, 3) and not dW0.any() and sq0.shape == (0,)


def test_rejects_other_dtypes_with_one_line():
    with pytest.raises(ValueError, match="float32"):
        sum_and_sqnorms_launch(torch.zeros(2, 3, 4, dtype=torch.float64, device=DEV))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(16, 768, 256), (16, 1024, 256), (64, 256, 1024), (3, 50304, 256), (16, 2304, 768)])
def test_gpu_sum_and_sqnorms_at_model_shapes(shape):
    """The automatic blocks at the small models' Linear shapes and a head chunk, eager and compiled."""
    G = make(shape, device="cuda")
    want_dW, want_sq = reference(G)
    for fn in (sum_and_sqnorms, torch.compile(sum_and_sqnorms, fullgraph=True)):
        dW, sq = fn(G)
        assert rel(dW, want_dW) < TOL
        assert torch.allclose(sq.double(), want_sq, rtol=TOL, atol=0)


def test_launchers_size_grids_by_the_devices_own_sm_count(monkeypatch):
    """gnsrepro.kernels.sm_count, which every launcher's grid uses: the indexed device's count, the current
    device's for torch.device("cuda"), each asked of CUDA once (no GPU needed: the properties are faked)."""
    import types

    import gnsrepro.kernels as kernels
    from gnsrepro.kernels.example_sums import MAX_BLOCK_N, MIN_BLOCK_N, _block_n

    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(multi_processor_count={0: 132, 1: 78}[index])

    kernels._sm_count.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    try:
        assert kernels.sm_count(torch.device("cuda", 0)) == 132
        assert kernels.sm_count(torch.device("cuda")) == 78
        assert kernels.sm_count(torch.device("cuda", 1)) == 78
        assert asked == [0, 1]
        # about four programs per SM: 132 SMs and 196,608 columns give blocks of 256 (768 programs)
        n = 256 * 768
        assert _block_n(n, torch.device("cuda", 0)) == 256
        assert MIN_BLOCK_N <= _block_n(n, torch.device("cuda")) <= MAX_BLOCK_N
    finally:
        kernels._sm_count.cache_clear()
