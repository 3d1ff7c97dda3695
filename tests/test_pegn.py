"""Per-example gradient norms of the instrumented layers against torch.func per-example gradients.

The chain of checks: torch.func vmap(grad) of each example's own mean token loss, float64 (the reference)
-> the instrumented layers' sinks (plain-PyTorch per-example formulas) -> the Triton LayerNorm kernel.

Tolerances:
- float64, loss computed in float64 from the logits: rtol 1e-9 (sums over a few hundred terms).
- float64 through GPT's own loss: rtol 1e-5, because model.py computes the cross-entropy on
  logits.float(), so dlogits carry fp32 rounding, and differently for one example than for B.
- float32: rtol 1e-4 on norms (squares of fp32 sums), p.grad rtol 1e-5 / atol 1e-7 against plain.
- Triton kernel (fp32 statistics, TRITON_INTERPRET on CPU): rtol 1e-4 against the torch backend.
- bf16 autocast (CPU): rtol 5e-2 against fp32, a smoke test of the dtype handling; backward inside
  the autocast region bitwise equal to backward outside it.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gnsrepro.model import GPT, GPTConfig, Layers
from gnsrepro.pegn import (
    AUTO_CHUNK_BYTES,
    PerExampleEmbedding,
    PerExampleLayerNorm,
    PerExampleLinear,
    PerExampleNorms,
    instrumented_layers,
    per_example_sqnorms,
)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of sdpa

V, T = 64, 7  # vocabulary, an odd sequence length


def config(bias: bool = True) -> GPTConfig:
    return GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16, bias=bias)


def batch(B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with repeated tokens inside each example (the embedding's segment sums matter)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    idx[:, 3] = idx[:, 0]
    idx[:, 5] = idx[:, 0]
    idx[:, 6] = idx[:, 1]
    return idx, torch.randint(0, V, (B, T), generator=g)


def twins(layers: Layers, bias: bool = True, dtype=torch.float64, seed: int = 0) -> tuple[GPT, GPT]:
    """A plain GPT and one built from `layers`, with the same weights; LayerNorm gains and biases moved
    off 1 and 0, so that no gradient is special."""
    torch.manual_seed(seed)
    plain = GPT(config(bias))
    with torch.no_grad():  # drawn in float32 then cast, so every dtype gets the same weights
        for name, p in plain.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    plain = plain.to(dtype)
    model = GPT(config(bias), layers).to(dtype)
    model.load_state_dict(plain.state_dict())
    return plain, model


def loss64(model, idx, targets):
    """Mean token cross-entropy computed in float64 from the logits (GPT's own loss rounds to fp32)."""
    logits, _ = model(idx, targets)
    return F.cross_entropy(logits.reshape(-1, V).double(), targets.reshape(-1))


@functools.cache
def reference(B: int, bias: bool = True, seed: int = 0, own_loss: bool = False) -> dict[str, torch.Tensor]:
    """{name: (B,) |g_b|²} from torch.func: vmap over examples of grad of example b's mean token loss."""
    plain, _ = twins(Layers(), bias)
    idx, targets = batch(B, seed)
    params = {k: v.detach() for k, v in plain.named_parameters()}

    def example_loss(p, i, t):
        if own_loss:
            return functional_call(plain, p, (i[None], t[None]))[1]
        return loss64(lambda *a: functional_call(plain, p, a), i[None], t[None])

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, idx, targets)
    return {k: g.flatten(1).square().sum(1) for k, g in grads.items()}


def ln_names(model: GPT) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".ln_" in n]


def assert_norms(got: dict, want: dict, names, rtol: float) -> None:
    assert set(got) >= set(names) and names
    for n in names:
        torch.testing.assert_close(got[n].to(want[n].device, want[n].dtype), want[n], rtol=rtol, atol=0,
                                   msg=lambda m, n=n: f"{n}: {m}")


def assert_same_grads(plain: GPT, model: GPT, rtol: float = 1e-12, atol: float = 1e-15) -> None:
    for (n, p), (_, q) in zip(plain.named_parameters(), model.named_parameters()):
        assert q.grad is not None and q.grad.dtype == q.dtype, n
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


CASES = [("all", "simultaneous"), ("all", "ghost"), ("ln", "auto")]


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("mode,method,chunk_size,chunk_bytes",
                         [c + (0, AUTO_CHUNK_BYTES) for c in CASES] + [("all", "simultaneous", 2, AUTO_CHUNK_BYTES),
                                                                       ("all", "ghost", 2, AUTO_CHUNK_BYTES),
                                                                       ("all", "simultaneous", 0, 8 * 7 * 16)])
def test_sinks_match_vmap_reference(mode, method, chunk_size, chunk_bytes, B):
    """Every covered parameter; chunk_size=2 splits B=5 into 2+2+1 (the tied head's rows included); chunk_bytes of
    7 x 16 float64 values slices every example's per-example gradient by rows: 7 at a time for inputs of 16 (with
    a remainder: outputs of 48, 16 and the head's 64), one at a time for the MLP's inputs of 64 (the head's rows
    through _head_rows)."""
    plain, model = twins(instrumented_layers(mode, method=method, chunk_size=chunk_size, chunk_bytes=chunk_bytes))
    idx, targets = batch(B)
    norms = PerExampleNorms(model)
    norms.attach(B)
    loss64(model, idx, targets).backward()
    loss64(plain, idx, targets).backward()
    names = [n for n, _ in model.named_parameters()] if mode == "all" else ln_names(model)
    assert norms.names == names  # every parameter for "all" (tied weight once), every LN for "ln"
    got = norms.per_example(B)
    assert all(v.shape == (B,) for v in got.values())
    assert_norms(got, reference(B), names, rtol=1e-9)
    assert_same_grads(plain, model)


@pytest.mark.parametrize("mode,method", CASES)
def test_gradient_accumulation_sums_over_micro_batches(mode, method):
    """Two micro-batches of 3, each loss divided by 2: n = 6, sinks hold per-slot sums."""
    plain, model = twins(instrumented_layers(mode, method=method))
    idx, targets = batch(6)
    want = reference(6)
    norms = PerExampleNorms(model)
    norms.attach(3)
    for s in (slice(0, 3), slice(3, 6)):
        (loss64(model, idx[s], targets[s]) / 2).backward()
        (loss64(plain, idx[s], targets[s]) / 2).backward()
    got = norms.stacked(6).sum(1)
    for i, n in enumerate(norms.names):
        torch.testing.assert_close(got[i], want[n].sum(), rtol=1e-9, atol=0, msg=n)
    assert_same_grads(plain, model)
    norms.zero()
    assert all(m.sink.grad is None for m in norms.modules)


@pytest.mark.parametrize("layers", ["all", "ln"])
def test_per_example_sqnorms_contract(layers):
    """The entry point of docs/method.md's per-example norm contract, through GPT's own loss (float64 model,
    fp32 cross-entropy)."""
    plain, model = twins(instrumented_layers(layers))  # method "auto"
    idx, targets = batch(5)
    got = per_example_sqnorms(model, idx, targets, layers=layers)
    names = [n for n, _ in model.named_parameters()] if layers == "all" else ln_names(model)
    assert list(got) == names
    assert_norms(got, reference(5, own_loss=True), names, rtol=1e-5)
    plain(idx, targets)[1].backward()
    assert_same_grads(plain, model, rtol=1e-7, atol=1e-12)


def test_grads_equal_plain_backward_float32():
    plain, model = twins(instrumented_layers("all"), dtype=torch.float32)
    idx, targets = batch(5)
    got = per_example_sqnorms(model, idx, targets)
    assert all(v.dtype == torch.float32 for v in got.values())
    plain(idx, targets)[1].backward()
    assert_same_grads(plain, model, rtol=1e-5, atol=1e-7)
    want = reference(5, own_loss=True)
    assert_norms(got, want, list(got), rtol=1e-4)


def test_bias_free_model():
    plain, model = twins(instrumented_layers("all"), bias=False)
    idx, targets = batch(5)
    norms = PerExampleNorms(model)
    assert not any(n.endswith(".bias") for n in norms.names)
    norms.attach(5)
    loss64(model, idx, targets).backward()
    loss64(plain, idx, targets).backward()
    names = [n for n, _ in model.named_parameters()]
    assert_norms(norms.per_example(5), reference(5, bias=False), names, rtol=1e-9)
    assert_same_grads(plain, model)


def test_not_instrumented_raises():
    idx, targets = batch(2)
    with pytest.raises(ValueError, match=r"instrumented_layers\('ln'\)"):
        per_example_sqnorms(GPT(config()), idx, targets, layers="ln")
    ln_only = GPT(config(), instrumented_layers("ln"))
    with pytest.raises(ValueError, match=r"instrumented_layers\('all'\)"):
        per_example_sqnorms(ln_only, idx, targets, layers="all")


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
@pytest.mark.parametrize("shape", [(5, 4), (5, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("chunk_size", [0, 2])
def test_linear_alone(shape, method, chunk_size):
    """A Linear on its own: 2-D input (Goodfellow), 3-D input, chunks of 2 with a remainder of 1."""
    torch.manual_seed(1)
    layer = PerExampleLinear(4, 6, method=method, chunk_size=chunk_size).double()
    scale = torch.arange(1, 6, dtype=torch.float64).view(5, *[1] * (len(shape) - 1))  # examples of unlike scale
    x = torch.randn(shape, dtype=torch.float64) * scale
    w = torch.randn(6, dtype=torch.float64)

    def example_loss(p, xb):  # the layer's output fed through a nonlinearity, mean over the example
        return (torch.tanh(functional_call(layer, p, (xb,))) @ w).mean()

    params = {k: v.detach() for k, v in layer.named_parameters()}
    per_example = vmap(grad(example_loss), in_dims=(None, 0))(params, x)
    norms = PerExampleNorms(layer)
    norms.attach(5)
    (torch.tanh(layer(x)) @ w).reshape(5, -1).mean(1).mean().backward()
    got = norms.per_example(5)
    assert norms.names == ["weight", "bias"]
    for n in norms.names:
        torch.testing.assert_close(got[n], per_example[n].flatten(1).square().sum(1), rtol=1e-10, atol=0)
        torch.testing.assert_close(getattr(layer, n).grad, per_example[n].mean(0), rtol=1e-10, atol=1e-14)


def test_embedding_repeated_ids_and_padding():
    torch.manual_seed(2)
    emb = PerExampleEmbedding(10, 3, padding_idx=0).double()
    ids = torch.tensor([[1, 2, 1, 1, 0], [3, 3, 3, 0, 0], [4, 5, 6, 7, 8]])
    w = torch.randn(3, dtype=torch.float64)

    def example_loss(p, i):
        return torch.sin(functional_call(emb, p, (i,)) @ w).sum()

    params = {"weight": emb.weight.detach()}
    want = vmap(grad(example_loss), in_dims=(None, 0))(params, ids)["weight"].flatten(1).square().sum(1)
    norms = PerExampleNorms(emb)
    norms.attach(3)
    torch.sin(emb(ids) @ w).sum().backward()
    torch.testing.assert_close(norms.per_example(1)["weight"], want, rtol=1e-12, atol=0)
    assert emb.weight.grad[0].abs().sum() == 0  # the padding row gets no gradient


def test_inference_paths_are_plain():
    """No grad, or the last-position logits of generation, go through plain F.linear, stash cleared."""
    plain, model = twins(instrumented_layers("all"))
    idx, _ = batch(3)
    PerExampleNorms(model).attach(3)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], plain(idx)[0], rtol=0, atol=0)
    logits, _ = model(idx)  # grad enabled, targets None: unembed(x[:, [-1]]) does not match the stash
    torch.testing.assert_close(logits, plain(idx)[0], rtol=1e-12, atol=0)  # LayerNorms instrumented
    assert model.transformer.wte._pending is None


def test_attach_keeps_sinks_while_batch_size_holds():
    _, model = twins(instrumented_layers("all"))
    norms = PerExampleNorms(model)
    norms.attach(4)
    sinks = [m.sink for m in norms.modules]
    norms.attach(4)
    assert all(m.sink is s for m, s in zip(norms.modules, sinks))
    norms.attach(2)
    assert all(m.sink.shape[0] == 2 for m in norms.modules)
    idx, targets = batch(3)
    with pytest.raises(ValueError, match="attach"):
        model(idx, targets)


def test_wrapped_model_names():
    _, model = twins(instrumented_layers("all"))
    compiled = torch.compile(model)  # not run: only the ._orig_mod unwrapping is tested
    assert PerExampleNorms(compiled).names == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("chunk_bytes", [AUTO_CHUNK_BYTES, 4 * 7 * 16], ids=["chunks", "row-slices"])
def test_compile_fullgraph_same_norms(chunk_bytes):
    """The whole forward and backward in one graph (fullgraph=True fails on any graph break), the tied
    embedding's stash included, with examples in chunks or each example's gradient in slices of rows;
    aot_eager runs AOTAutograd's traced joint graph without codegen."""
    _, model = twins(instrumented_layers("all", method="simultaneous", chunk_bytes=chunk_bytes), dtype=torch.float32)
    idx, targets = batch(3)
    eager = per_example_sqnorms(model, idx, targets)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = per_example_sqnorms(compiled, idx, targets)
    assert_norms(got, eager, list(eager), rtol=1e-5)


def _autocast_step(model: GPT, idx, targets, backward_inside: bool):
    """Forward under CPU bf16 autocast, loss.backward() inside or after the autocast region; the
    per-example norms and a copy of every p.grad."""
    model.zero_grad()
    norms = PerExampleNorms(model)
    norms.attach(idx.shape[0])
    norms.zero()  # the sinks outlive a step while B holds
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    assert logits.dtype == torch.bfloat16
    return norms.per_example(idx.shape[0]), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_autocast_bf16_dtypes(method):
    """bf16 autocast: the forward casts like nn.Linear, norms and grads stay fp32. The backward turns
    autocast off, so calling loss.backward() inside the autocast region gives bit for bit what calling
    it outside does (its fp32 matmuls would otherwise be recast to bf16, rounding norms and dW)."""
    plain, model = twins(instrumented_layers("all", method=method), dtype=torch.float32)
    idx, targets = batch(3)
    want = per_example_sqnorms(model, idx, targets)  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_logits, _ = plain(idx, targets)
    assert plain_logits.dtype == torch.bfloat16
    outside, outside_grads = _autocast_step(model, idx, targets, backward_inside=False)
    inside, inside_grads = _autocast_step(model, idx, targets, backward_inside=True)
    assert all(g.dtype == torch.float32 for g in outside_grads.values())
    assert_norms(outside, want, list(want), rtol=5e-2)
    for n in outside:
        assert torch.equal(inside[n], outside[n]), n
    for n in outside_grads:
        assert torch.equal(inside_grads[n], outside_grads[n]), n


def _triton_available() -> bool:
    try:
        from gnsrepro.kernels.layer_norm import layer_norm_per_example  # noqa: F401
    except ImportError:
        return False
    return True


triton_ln = pytest.mark.skipif(not _triton_available(), reason="gnsrepro.kernels.layer_norm not importable")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET (tests/conftest.py)


@triton_ln
@pytest.mark.parametrize("bias", [True, False])
def test_triton_layer_norm_backend(bias):
    plain, model = twins(instrumented_layers("ln", ln_backend="triton"), bias=bias, dtype=torch.float32)
    model.to(TRITON_DEVICE)
    idx, targets = (t.to(TRITON_DEVICE) for t in batch(3))
    got = per_example_sqnorms(model, idx, targets, layers="ln")
    assert all(m.backend == "triton" for m in PerExampleNorms(model).modules)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = per_example_sqnorms(model, idx, targets, layers="ln", ln_backend="torch")
    assert_norms(got, want, ln_names(model), rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert_norms(got, reference(3, bias=bias, own_loss=True), ln_names(model), rtol=1e-4)


@triton_ln
def test_triton_layer_norm_module_two_d_input():
    torch.manual_seed(3)
    ln = PerExampleLayerNorm(12, backend="triton").to(TRITON_DEVICE)
    ref = PerExampleLayerNorm(12, backend="torch").to(TRITON_DEVICE)
    x = (torch.randn(4, 12) * torch.arange(1, 5).view(-1, 1)).to(TRITON_DEVICE)
    dy = torch.randn(4, 12, device=TRITON_DEVICE)
    out = []
    for layer in (ln, ref):
        norms = PerExampleNorms(layer)
        norms.attach(4)
        (layer(x) * dy).sum().backward()
        out.append(norms.stacked(1))
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_gpu_bf16_autocast_close_to_fp32(method):
    """CUDA bf16 autocast: fp32-output batched matmuls (out_dtype), fp32 p.grad, Triton LayerNorm."""
    _, model = twins(instrumented_layers("all", method=method, ln_backend="triton"), dtype=torch.float32)
    model.cuda()
    idx, targets = (t.cuda() for t in batch(4))
    want = per_example_sqnorms(model, idx, targets)
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = per_example_sqnorms(model, idx, targets)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert_norms(got, want, list(want), rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [{"ln_backend": "triton"}, {"method": "simultaneous", "linear_backend": "triton"},
                                    {"method": "simultaneous", "chunk_bytes": 4 * 7 * 16}],
                         ids=["layernorm", "linear", "row-slices"])
def test_gpu_compile_inductor_same_norms(kernel):
    """The compiled model (inductor) with a Triton kernel as an opaque custom op (the LayerNorm's, or the Linear
    layers' and the head's weight-gradient kernel), or with each example's per-example gradients in slices of
    rows: the eager norms."""
    _, model = twins(instrumented_layers("all", **kernel), dtype=torch.float32)
    model.cuda()
    idx, targets = (t.cuda() for t in batch(4))
    eager = per_example_sqnorms(model, idx, targets)
    torch._dynamo.reset()
    got = per_example_sqnorms(torch.compile(model, fullgraph=True), idx, targets)
    assert_norms(got, eager, list(eager), rtol=1e-4)

