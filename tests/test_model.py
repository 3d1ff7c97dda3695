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


# ---- attention=sdpa's kernel (GPTConfig.sdpa_backend) ---------------------------------------------------------
ATTN = dict(block_size=32, vocab_size=64, n_layer=2, n_head=3, n_embd=24)


def loss_and_grads(model: GPT, idx: torch.Tensor):
    _, loss = model(idx, targets=idx)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_sdpa_backend_falls_back_to_pytorchs_kernel_where_its_own_cannot_run():
    """On a CPU neither cuDNN's attention nor flash attention can run: flash and cudnn fall back along their
    orders to the kernel PyTorch picks itself (auto's on a CPU), bit for bit."""
    idx = torch.randint(0, 64, (3, 29), generator=torch.Generator().manual_seed(1))
    got = {}
    for backend in ("auto", "flash", "cudnn"):
        torch.manual_seed(0)
        got[backend] = loss_and_grads(GPT(GPTConfig(**ATTN, sdpa_backend=backend)), idx)
    for backend in ("flash", "cudnn"):
        assert torch.equal(got[backend][0], got["auto"][0])
        assert all(torch.equal(g, got["auto"][1][n]) for n, g in got[backend][1].items())


def test_sdpa_backend_context_compiles_without_a_graph_break():
    """torch.compile traces the cudnn-first sdpa_kernel context inside forward into one graph (fullgraph=True
    raises at a graph break), and gives the eager loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ATTN, sdpa_backend="cudnn"))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    _, loss = torch.compile(model, fullgraph=True, backend="eager")(idx, targets=idx)
    torch.testing.assert_close(loss, model(idx, targets=idx)[1], rtol=0, atol=0)


def test_unknown_sdpa_backend_is_refused_by_the_model_and_by_validate():
    from hydra import compose, initialize_config_dir

    from gnsrepro.cli import conf_dir
    from gnsrepro.config import register_configs
    from gnsrepro.errors import ConfigError
    from gnsrepro.settings import validate

    with pytest.raises(ValueError, match="sdpa_backend='fa3' is not known; accepted: auto, flash, cudnn"):
        GPT(GPTConfig(**ATTN, sdpa_backend="fa3"))
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["model.sdpa_backend=fa3", "max_steps=1"])
    want = r"^model.sdpa_backend='fa3' is not known; accepted: auto, flash, cudnn"
    with pytest.raises(ConfigError, match=want):
        validate(cfg)


def attention_ops(fn) -> set[str]:
    """The fused attention ops (aten::_scaled_dot_product_*_attention, forward and backward) that fn() ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product_")}


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_sdpa_backend_runs_its_kernel_and_matches_float64_attention(compiled):
    """bf16 attention at a real head size (64) and an odd length: sdpa_backend=flash and =cudnn run the kernel
    they name, eager and compiled, auto cuDNN's on a Hopper GPU (else PyTorch's pick, one fused kernel), and the
    output and q, k, v gradients of cuDNN's kernel are as close to float64 attention (math_attention of the same
    bf16 inputs) as flash attention's are."""
    from gnsrepro.model import SDPA_ORDERS, CausalSelfAttention, Layers, math_attention, sdpa_kernel

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=1024, n_layer=1, n_head=4, n_embd=256)
    x = torch.randn(3, 1000, 256, device="cuda")
    hopper = torch.cuda.get_device_properties(0).major == 9
    for backend in ("flash", "cudnn", "auto"):
        torch.manual_seed(1)
        attn = CausalSelfAttention(GPTConfig(**{**cfg.__dict__, "sdpa_backend": backend}), Layers()).cuda()
        step = torch.compile(attn) if compiled else attn
        torch._dynamo.reset()

        def fwd_bwd(step=step):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = step(x)
            y.float().square().mean().backward()

        ops = attention_ops(fwd_bwd)
        ran = {kernel for kernel in ("flash", "cudnn", "efficient") if any(f"_{kernel}_attention" in op for op in ops)}
        want = {"auto": {"cudnn"} if hopper else ran}.get(backend, {backend})
        assert ran == want and len(ran) == 1, (backend, ops)
    errors = {}
    for backend, order in SDPA_ORDERS.items():  # the numerics of each kernel, on the same bf16 q, k, v
        torch.manual_seed(2)
        q, k, v = (torch.randn(3, 4, 1000, 64, device="cuda").bfloat16().requires_grad_() for _ in range(3))
        with sdpa_kernel(order, set_priority=True):
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            dy = torch.randn_like(y)
            y.backward(dy)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        y64 = math_attention(q64, k64, v64)
        y64.backward(dy.double())
        errors[backend] = [(a.double() - b).abs().max().item() / b.abs().max().item()
                           for a, b in ((y, y64), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad))]
    for got, flash in zip(errors["cudnn"], errors["flash"]):
        assert got <= 2 * flash + 1e-3, errors
    print({b: [f"{e:.1e}" for e in errs] for b, errs in errors.items()})
