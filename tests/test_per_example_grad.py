"""The Triton weight gradient with per-example norms (gnsrepro.kernels.per_example_grad) against references.

The chain of checks: torch.func vmap per-example gradients of ⟨x_b Wᵀ, dy_b⟩ in float64 (whose gradient in W
is G_b = dy_bᵀ x_b; an independent reference) -> the kernel, and the kernel against the PyTorch path it
replaces (gnsrepro.pegn's simultaneous method with backend torch; the tied head's rows included), at odd
shapes with the default tiles and with 16 × 16 × 16 tiles and example groups that put edges inside every
dimension; then a tiny GPT with gns.linear_backend=triton against the torch backend. CPU runs the kernel in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small; GPU tests are marked.

Tolerances: the references run on the inputs already rounded to the dtype, so what is left is fp32 rounding in
the kernel's sums (bf16 × bf16 products are exact in fp32; fp32 × fp32 ones round once in ieee mode): about
1e-7 relative at these sizes, checked at TOL (dW as ‖Δ‖/‖dW‖, each |G_b|² elementwise).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_pegn import assert_norms, batch, reference, twins
from test_train import make_cfg
from torch.func import grad, vmap

import gnsrepro.kernels.per_example_grad as PG
from gnsrepro.errors import ConfigError
from gnsrepro.kernels.per_example_grad import (
    Tiles,
    weight_grad_and_sqnorms,
    weight_grad_and_sqnorms_launch,
    weight_grad_and_sqnorms_reference,
    weight_grad_sqnorms_and_rows,
    weight_grad_sqnorms_and_rows_launch,
)
from gnsrepro.pegn import (
    PerExampleLinear,
    PerExampleNorms,
    PerExampleTiedEmbedding,
    _head_rows,
    _weight_grad_and_sqnorms,
    instrumented_layers,
    per_example_sqnorms,
)
from gnsrepro.settings import validate

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET (tests/conftest.py)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
SHAPES = list(itertools.product((1, 3), (1, 7, 33), (5, 24), (3, 40, 97)))  # (B, T, K, L)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of sdpa
SMALL_TILES = Tiles(block_l=16, block_k=16, block_t=16, num_warps=4, num_stages=1)  # tl.dot's smallest


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make(B, T, K, L, dtype, seed=0, device=DEV):
    """x (B, T, K), dy (B, T, L); example b scaled by b + 1, so that examples' norms differ."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, B + 1, dtype=torch.float32).view(-1, 1, 1)
    x = torch.randn(B, T, K, generator=g) * scale
    dy = torch.randn(B, T, L, generator=g) * scale
    return x.to(device, dtype), dy.to(device, dtype)


def vmap_reference(x, dy):
    """(dW, sq) in float64 from torch.func per-example gradients of ⟨x_b Wᵀ, dy_b⟩ with respect to W."""
    x64, dy64 = x.double().cpu(), dy.double().cpu()
    W = torch.zeros(dy.shape[-1], x.shape[-1], dtype=torch.float64)
    G = vmap(grad(lambda W, xb, dyb: (F.linear(xb, W) * dyb).sum()), in_dims=(None, 0, 0))(W, x64, dy64)
    return G.sum(0), G.square().sum((1, 2))


def assert_close_to(dW, sq, want_dW, want_sq, tol, what=""):
    assert dW.dtype == torch.float32 and sq.dtype == torch.float32, what
    assert dW.shape == want_dW.shape and sq.shape == want_sq.shape, what
    assert rel(dW.cpu(), want_dW) <= tol, f"{what} dW: {rel(dW.cpu(), want_dW):.2e}"
    torch.testing.assert_close(sq.cpu().double(), want_sq.double(), rtol=tol, atol=0, msg=lambda m: f"{what} sq: {m}")


# ---- the kernel against float64 per-example gradients and against pegn's torch path ------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles,groups", [(None, 0), (SMALL_TILES, 2)], ids=["default_tiles", "16x16x16_2groups"])
def test_kernel_matches_vmap_and_torch_path(dtype, tiles, groups):
    """Every (B, T, K, L) of SHAPES: against float64 vmap gradients, and against pegn's simultaneous torch path
    and this module's reference (chunks of 2 examples) at the same dtype."""
    for B, T, K, L in SHAPES:
        what = f"{dtype} B={B} T={T} K={K} L={L}"
        x, dy = make(B, T, K, L, dtype, seed=B * T + K + L)
        dW, sq = weight_grad_and_sqnorms_launch(x, dy, tiles, groups)
        assert_close_to(dW, sq, *vmap_reference(x, dy), TOL[dtype], what)
        torch_dW, torch_sq, _ = _weight_grad_and_sqnorms(x, dy, "simultaneous", 2)
        assert_close_to(dW, sq, torch_dW, torch_sq, TOL[dtype], what + " vs pegn torch")
        assert_close_to(dW, sq, *weight_grad_and_sqnorms_reference(x, dy, chunk_size=2), TOL[dtype], what + " vs ref")


def test_reference_matches_vmap_float64():
    x, dy = make(3, 7, 5, 40, torch.float64)
    want_dW, want_sq = vmap_reference(x, dy)
    dW, sq = weight_grad_and_sqnorms_reference(x, dy, chunk_size=2)
    torch.testing.assert_close(dW.cpu(), want_dW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sq.cpu(), want_sq, rtol=1e-12, atol=0)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_example_groups_and_strided_inputs(groups):
    """Examples split over 1, 2 or 3 groups (each with its own partial dW), on non-contiguous views: x and dy
    stored time-major (T, B, ·) and dy a column slice of a wider tensor."""
    B, T, K, L = 3, 33, 24, 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, K, generator=g).to(DEV).transpose(0, 1)  # (B, T, K), strides (K, B·K, 1)
    dy = torch.randn(T, B, L + 7, generator=g).to(DEV).transpose(0, 1)[..., 3 : 3 + L]
    assert not x.is_contiguous() and not dy.is_contiguous()
    dW, sq = weight_grad_and_sqnorms_launch(x, dy, SMALL_TILES, groups)
    assert_close_to(dW, sq, *vmap_reference(x, dy), TOL[torch.float32], f"groups={groups}")


def test_kernel_rejects_mixed_or_unsupported_dtypes():
    x, dy = make(2, 3, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="one dtype of float32, bfloat16, float16"):
        weight_grad_and_sqnorms(x, dy.bfloat16())
    with pytest.raises(ValueError, match="one dtype of float32, bfloat16, float16"):
        weight_grad_and_sqnorms(x.double(), dy.double())
    with pytest.raises(ValueError, match=r"x must be \(B, T, K\)"):
        weight_grad_and_sqnorms(x, dy[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_head_rows_without_per_example_gradients(dtype):
    """The head's dispatch in pegn: dW, |G_b|² and rows[b, t] = G_b[ids[b, t]] from backend triton (rows by
    Aᵀx) equal those from the materialised G of backend torch; ids repeat within an example."""
    B, T, K, V = 3, 33, 24, 97
    x, dy = make(B, T, K, V, dtype, seed=5)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2)).to(DEV)
    ids[:, 5] = ids[:, 0]
    got = _weight_grad_and_sqnorms(x, dy, "simultaneous", 2, ids=ids, backend="triton")
    want = _weight_grad_and_sqnorms(x, dy, "simultaneous", 2, ids=ids, backend="torch")
    assert_close_to(got[0], got[1], want[0], want[1], TOL[dtype], "head")
    assert got[2].shape == (B, T, K) and got[2].dtype == torch.float32
    assert rel(got[2], want[2]) <= TOL[dtype]


def vmap_rows(x, dy, ids):
    """rows[b, t] = G_b[ids[b, t]] in float64 from the vmap per-example gradients."""
    x64, dy64 = x.double().cpu(), dy.double().cpu()
    W = torch.zeros(dy.shape[-1], x.shape[-1], dtype=torch.float64)
    G = vmap(grad(lambda W, xb, dyb: (F.linear(xb, W) * dyb).sum()), in_dims=(None, 0, 0))(W, x64, dy64)
    return G.gather(1, ids.cpu()[:, :, None].expand(-1, -1, x.shape[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles,groups", [(None, 0), (SMALL_TILES, 2)], ids=["default_tiles", "16x16x16_2groups"])
def test_kernel_rows_match_vmap(dtype, tiles, groups):
    """weight_grad_sqnorms_and_rows: dW and |G_b|² as without rows, and rows[b, t] = G_b[ids[b, t]] against float64
    vmap gradients, with ids repeating within an example, ids in the last partial L-tile and at 0 and L - 1, and
    16-row tiles that put an example's ids in many tiles."""
    for B, T, K, L in [(1, 1, 5, 3), (3, 33, 24, 97), (2, 7, 40, 40), (3, 40, 5, 24)]:
        what = f"{dtype} B={B} T={T} K={K} L={L}"
        x, dy = make(B, T, K, L, dtype, seed=B + T + K + L)
        ids = torch.randint(0, L, (B, T), generator=torch.Generator().manual_seed(T))
        ids[:, 0], ids[:, -1] = L - 1, 0
        if T > 5:
            ids[:, 5] = ids[:, 1]
        ids = ids.to(DEV)
        dW, sq, rows = weight_grad_sqnorms_and_rows_launch(x, dy, ids, tiles, groups)
        assert_close_to(dW, sq, *vmap_reference(x, dy), TOL[dtype], what)
        assert rows.shape == (B, T, K) and rows.dtype == torch.float32, what
        err = rel(rows.cpu(), vmap_rows(x, dy, ids))
        assert err <= TOL[dtype], f"{what} rows: {err:.2e}"
        rows32 = weight_grad_sqnorms_and_rows_launch(x, dy, ids.int(), tiles, groups)[2]
        assert torch.equal(rows32, rows), what  # int32 ids: the same rows


def test_kernel_rows_reject_bad_ids():
    x, dy = make(2, 3, 5, 4, torch.float32)
    with pytest.raises(ValueError, match=r"ids must be \(B, T\) int32 or int64"):
        weight_grad_sqnorms_and_rows(x, dy, torch.zeros(2, 4, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match=r"ids must be \(B, T\) int32 or int64"):
        weight_grad_sqnorms_and_rows(x, dy, torch.zeros(2, 3, device=DEV))


# ---- in a model --------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the kernel's entry points that pegn's dispatch makes: (dy's shape, whether it asked for
    the tied head's rows)."""
    calls = []

    def counted(x, dy):
        calls.append((tuple(dy.shape), False))
        return weight_grad_and_sqnorms(x, dy)

    def counted_rows(x, dy, ids):
        calls.append((tuple(dy.shape), True))
        return weight_grad_sqnorms_and_rows(x, dy, ids)

    monkeypatch.setattr(PG, "weight_grad_and_sqnorms", counted)
    monkeypatch.setattr(PG, "weight_grad_sqnorms_and_rows", counted_rows)
    return calls


def test_gpt_triton_backend_same_norms_as_torch(kernel_calls):
    """A tiny GPT (2 layers of 4 Linear layers, the tied 64-wide head), gns=all, method simultaneous: every
    parameter's per-example norms and p.grad with linear_backend=triton equal the torch backend's, and the
    float64 vmap reference's; every Linear layer and the head went through the kernel."""
    layers = {b: instrumented_layers("all", method="simultaneous", linear_backend=b) for b in ("torch", "triton")}
    _, model = twins(layers["triton"], dtype=torch.float32)
    _, ref_model = twins(layers["torch"], dtype=torch.float32)
    model.to(DEV), ref_model.to(DEV)
    assert {m.backend for m in model.modules() if isinstance(m, (PerExampleLinear, PerExampleTiedEmbedding))} == {
        "triton"}
    idx, targets = (t.to(DEV) for t in batch(3))
    got = per_example_sqnorms(model, idx, targets)
    assert len(kernel_calls) == 2 * 4 + 1
    assert [c for c in kernel_calls if c[1]] == [((3, 7, 64), True)]  # the head, dy (B, T, V), its rows in the kernel
    want = per_example_sqnorms(ref_model, idx, targets)
    assert_norms(got, want, list(want), rtol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert_norms(got, reference(3, own_loss=True), list(want), rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU autocast")
def test_gpt_triton_backend_bf16_autocast(kernel_calls):
    """CPU bf16 autocast: the kernel gets bf16 x and dy; its norms equal the torch backend's on the same bf16
    tensors (fp32 sums of the same exact products)."""
    out = {}
    for backend in ("torch", "triton"):
        _, model = twins(instrumented_layers("all", method="simultaneous", linear_backend=backend),
                         dtype=torch.float32)
        idx, targets = batch(3)
        norms = PerExampleNorms(model)
        norms.attach(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets, return_logits=False)
        loss.backward()
        out[backend] = norms.per_example(3)
    assert len(kernel_calls) == 9
    assert_norms(out["triton"], out["torch"], list(out["torch"]), rtol=1e-5)


def test_compile_fullgraph_same_norms():
    """torch.compile(fullgraph=True) through AOTAutograd without codegen (aot_eager's graphs, run as traced):
    no graph break, the backward graph calls the custom op once per Linear layer and the rows' op once for the head
    (their fake kernels traced), and the compiled norms equal the eager ones."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    op_calls = []

    def run_as_traced(gm, example_inputs):
        op_calls.append((gm.code.count("torch.ops.gnsrepro.weight_grad_and_sqnorms."),
                         gm.code.count("torch.ops.gnsrepro.weight_grad_sqnorms_and_rows.")))
        return make_boxed_func(gm.forward)

    _, model = twins(instrumented_layers("all", method="simultaneous", linear_backend="triton"), dtype=torch.float32)
    model.to(DEV)
    idx, targets = (t.to(DEV) for t in batch(3))
    eager = per_example_sqnorms(model, idx, targets)
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=run_as_traced, bw_compiler=run_as_traced)
    got = per_example_sqnorms(torch.compile(model, backend=backend, fullgraph=True), idx, targets)
    assert op_calls == [(0, 0), (2 * 4, 1)]  # forward graph; backward graph: the Linear layers, the head
    assert_norms(got, eager, list(eager), rtol=1e-5)


def test_float64_stays_on_the_torch_path(kernel_calls):
    """The kernel takes fp32 / bf16 / fp16; a float64 model with backend triton computes with PyTorch."""
    _, model = twins(instrumented_layers("all", method="simultaneous", linear_backend="triton"))
    idx, targets = batch(2)
    got = per_example_sqnorms(model, idx, targets)
    assert kernel_calls == []
    assert_norms(got, reference(2, own_loss=True), list(got), rtol=1e-5)


def test_build_model_passes_the_linear_backend():
    from gnsrepro.config import GNSConfig, ModelConfig
    from gnsrepro.train import build_model

    gns = GNSConfig(mode="all", linear_backend="triton", ln_backend="torch")
    model, _ = build_model(ModelConfig(vocab_size=64), gns, torch.device("cpu"))
    backends = [m.backend for m in model.modules() if isinstance(m, (PerExampleLinear, PerExampleTiedEmbedding))]
    assert backends and set(backends) == {"triton"}


# ---- settings ----------------------------------------------------------------------------------------------


def test_bad_linear_backend_is_a_one_line_config_error(monkeypatch):
    validate(make_cfg("gns=all", "gns.linear_backend=triton", "max_steps=1"))  # TRITON_INTERPRET=1 or a GPU
    with pytest.raises(ConfigError, match=r"^gns.linear_backend='cuda' is not known; accepted: auto, torch, triton$"):
        validate(make_cfg("gns=all", "gns.linear_backend=cuda", "max_steps=1"))
    with pytest.raises(ConfigError, match=r"^linear_backend must be one of torch, triton; got 'cuda'$"):
        instrumented_layers("all", linear_backend="cuda")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ConfigError) as err:
            validate(make_cfg("gns=all", "gns.linear_backend=triton", "device=cpu", "max_steps=1"))
        assert str(err.value).startswith("gns.linear_backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1")
        assert "\n" not in str(err.value)
        validate(make_cfg("gns=ln", "gns.linear_backend=triton", "device=cpu", "max_steps=1"))  # no Linear norms


# ---- GPU: the real shapes ----------------------------------------------------------------------------------


def _time_ms(fn) -> float:
    """Median device time of fn() in ms over 20 calls after 3 warm-up calls (CUDA events)."""
    from gnsrepro.benchmarks.layernorm import time_us

    return time_us(fn, warmup=3, steps=20) / 1e3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tiles,groups", [(None, 0), (SMALL_TILES, 2)], ids=["default_tiles", "16x16x16_2groups"])
def test_gpu_odd_shapes_match_float64(dtype, tiles, groups, monkeypatch):
    """The compiled kernel (not the interpreter) at the odd shapes, fp32 in ieee mode (allow_tf32 off)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the trainer turns it on
    for B, T, K, L in SHAPES + [(5, 300, 256, 1000), (4, 129, 300, 260), (2, 65, 520, 520)]:
        x, dy = make(B, T, K, L, dtype, seed=B + T + K + L)
        dW, sq = weight_grad_and_sqnorms_launch(x, dy, tiles, groups)
        assert_close_to(dW, sq, *vmap_reference(x, dy), 1e-5, f"{dtype} B={B} T={T} K={K} L={L}")


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,K,V", [(16, 1024, 256, 50304), (3, 129, 300, 1000)])
def test_gpu_kernel_rows_match_the_torch_path(B, T, K, V):
    """The compiled kernel's rows (and dW, |G_b|²) at the 20M head's bf16 shape and an odd one, against pegn's
    torch path, which gathers them from the materialised per-example gradients; prints the times of the rows
    in the kernel and of the kernel without them plus the rows gathered from dy (pegn._head_rows); asserts
    nothing about the times."""
    x, dy = make(B, T, K, V, torch.bfloat16, seed=3)
    x, dy = x / K**0.5, dy / V**0.5
    ids = torch.randint(0, V, (B, T), device=DEV, generator=torch.Generator(DEV).manual_seed(4))
    want_dW, want_sq, want_rows = _weight_grad_and_sqnorms(x, dy, "simultaneous", 0, ids=ids)
    dW, sq, rows = weight_grad_sqnorms_and_rows(x, dy, ids)
    assert rel(dW, want_dW) <= 1e-4 and rel(rows, want_rows) <= 1e-4
    torch.testing.assert_close(sq, want_sq, rtol=1e-4, atol=0)
    in_kernel = _time_ms(lambda: weight_grad_sqnorms_and_rows(x, dy, ids))
    gathered = _time_ms(lambda: (weight_grad_and_sqnorms(x, dy), _head_rows(x, dy, ids, 0)))
    print(f"\nrows at ({B}, {T}, {K}) -> {V}: in the kernel {in_kernel:.3f} ms, kernel + gather {gathered:.3f} ms")


@pytest.mark.gpu
@pytest.mark.parametrize("name,B,T,K,L", [
    ("20M head (micro-batch 16)", 16, 1024, 256, 50304),
    ("111M c_fc (micro-batch 8, context 2048)", 8, 2048, 768, 3072),
    ("111M mlp c_proj", 8, 2048, 3072, 768),
    ("20M c_attn (micro-batch 16)", 16, 1024, 256, 768),
])
def test_gpu_real_shapes_bf16_match_torch_and_times(name, B, T, K, L):
    """bf16 at the head's and Linear layers' real shapes: against pegn's torch path (bmm with fp32 output,
    chunks bounded by AUTO_CHUNK_BYTES); prints both median times; asserts nothing about them."""
    x, dy = make(B, T, K, L, torch.bfloat16, seed=0)
    x, dy = x / K**0.5, dy / L**0.5
    torch_path = lambda: _weight_grad_and_sqnorms(x, dy, "simultaneous", 0)  # noqa: E731
    kernel = lambda: weight_grad_and_sqnorms(x, dy)  # noqa: E731
    want_dW, want_sq, _ = torch_path()
    dW, sq = kernel()
    assert rel(dW, want_dW) <= 1e-4
    torch.testing.assert_close(sq, want_sq, rtol=1e-4, atol=0)
    ms_torch, ms_kernel = _time_ms(torch_path), _time_ms(kernel)
    cfg = PG._tiles(K, L, 2)
    print(f"\n{name}: x ({B}, {T}, {K}) dy ({B}, {T}, {L}) bf16, tiles {tuple(cfg)}: "
          f"torch {ms_torch:.3f} ms, triton {ms_kernel:.3f} ms ({ms_kernel / ms_torch:.2f}x)")
