"""The fused cross-entropy kernel (gnsrepro.kernels.cross_entropy) against F.cross_entropy in float64.

The reference is F.cross_entropy and its autograd on the float64 upcast of the very (rounded) logits the
kernel sees, so only the kernel's own arithmetic is measured. Tolerances:
- loss: fp32 arithmetic on exact inputs, rtol 1e-6 whatever the logits' dtype.
- gradient in float32: fp32 arithmetic, rtol 1e-5 plus atol 1e-6 / N (entries are at most 1 / n_valid).
- gradient in bf16 / fp16: the fp32 value rounded once to that dtype, a relative error of at most 2^-9
  (bf16) or 2^-12 (fp16), and a second time by the backward's product with a scale other than 1: rtol
  1/128 and 1/512 (twice those bounds and more), atol 2^-24 for fp16's subnormals (one unit there).
CPU runs the kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the real shape
(16 × 1024 tokens, 50304 classes, bf16) is in the gpu-marked tests, which print the kernel's and
PyTorch's times.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_pegn import assert_norms, batch, twins
from test_train import make_cfg

from gnsrepro.errors import ConfigError
from gnsrepro.kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_forward,
    cross_entropy_op,
    scale_grad_,
    uses_kernel,
)
from gnsrepro.model import GPT, GPTConfig
from gnsrepro.pegn import instrumented_layers, per_example_sqnorms
from gnsrepro.settings import validate

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1 / 128, torch.float16: 1 / 512}


def make(N: int, V: int, dtype=torch.float32, ignored=(), seed: int = 0):
    """Logits of std 3 (softmaxes far from uniform) in `dtype`, targets with -1 at the rows `ignored`."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(DEV, dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignored)] = -1
    return logits, targets.to(DEV)


def reference(logits, targets, scale: float = 1.0):
    """(loss, d(scale · loss) / d logits) from F.cross_entropy on the float64 upcast of the logits."""
    z = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(z, targets, ignore_index=-1)
    (scale * loss).backward()
    return loss.detach(), z.grad


def run(logits, targets, scale: float = 1.0, inplace: bool = False, op: bool = False):
    """(loss, logits.grad) after (scale · loss).backward() through the autograd Function (or the custom op)."""
    z = logits.detach().clone().requires_grad_()
    loss = cross_entropy_op(z, targets) if op else cross_entropy(z, targets, inplace=inplace)
    (scale * loss).backward()
    return loss.detach(), z.grad


def assert_grad_close(got, want, dtype, n_rows):
    assert got.dtype == dtype and got.shape == want.shape
    atol = 1e-6 / n_rows if dtype == torch.float32 else (2.0**-24 if dtype == torch.float16 else 0.0)
    torch.testing.assert_close(got.double(), want, rtol=GRAD_RTOL[dtype], atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,V,block_v", [(1, 5, None), (7, 97, None), (7, 97, 16), (33, 1000, 128),
                                         (33, 1000, None)])
def test_loss_and_gradient_match_float64_reference(N, V, block_v, dtype):
    """block_v 16 / 128: several iterations of both loops over a row, the last one partly masked."""
    ignored = (0, 3) if N > 1 else ()
    logits, targets = make(N, V, dtype, ignored)
    loss, grad = cross_entropy_forward(logits, targets, block_v=block_v)
    want_loss, want_grad = reference(logits, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    assert_grad_close(grad, want_grad, dtype, N)
    assert not grad[list(ignored)].any()  # an ignored row's gradient is exactly 0
    # and through autograd, with the backward's scale (gradient accumulation's 1/m)
    loss2, grad2 = run(logits, targets, scale=0.25)
    assert torch.equal(loss2, loss)
    assert_grad_close(grad2, 0.25 * want_grad, dtype, N)


def test_fewer_programs_than_rows_loop_over_rows():
    """A grid of 4 programs for 33 rows (what a GPU's few programs per SM do at 16k rows): the same bits."""
    logits, targets = make(33, 97, torch.bfloat16, ignored=(4, 32))
    want = cross_entropy_forward(logits, targets, block_v=32)
    got = cross_entropy_forward(logits, targets, block_v=32, programs=4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_all_rows_ignored_give_nan_loss_and_zero_gradient_as_torch():
    logits, targets = make(7, 97, ignored=range(7))
    loss, grad = run(logits, targets)
    want_loss, want_grad = reference(logits, targets)
    assert torch.isnan(loss) and torch.isnan(want_loss)
    assert torch.equal(grad.double(), want_grad) and not grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_equals_out_of_place(dtype):
    logits, targets = make(33, 1000, dtype, ignored=(5,))
    want_loss, want_grad = run(logits, targets, scale=0.5)
    z = logits.detach().clone().requires_grad_()
    work = z * 1  # a non-leaf, as the head's output is: its gradient flows on to z
    loss = cross_entropy(work, targets, inplace=True)
    (0.5 * loss).backward()
    assert torch.equal(loss.detach(), want_loss)
    assert torch.equal(z.grad, want_grad)
    assert torch.equal(work.detach(), want_grad)  # the logits now hold the (scaled) gradient


def test_backward_scale_of_one_leaves_the_forward_buffer_and_a_second_backward_raises():
    logits, targets = make(7, 97, ignored=(2,))
    _, grad = cross_entropy_forward(logits, targets)
    buffer = grad.clone()
    assert scale_grad_(buffer, torch.ones((), device=DEV)) is buffer and torch.equal(buffer, grad)
    scale_grad_(buffer, torch.full((), 3.0, device=DEV), block_v=16)
    torch.testing.assert_close(buffer, 3 * grad, rtol=1e-7, atol=0)
    z = logits.clone().requires_grad_()
    loss = cross_entropy(z, targets)
    loss.backward(retain_graph=True)
    assert torch.equal(z.grad, grad)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_no_grad_computes_the_loss_alone():
    logits, targets = make(7, 97, ignored=(1,))
    with torch.no_grad():
        loss = cross_entropy(logits.requires_grad_(), targets)
    loss_only, empty = cross_entropy_forward(logits, targets, write_grad=False)
    assert empty.numel() == 0 and torch.equal(loss, loss_only)
    torch.testing.assert_close(loss.double(), reference(logits, targets)[0], rtol=1e-6, atol=0)


def test_float64_goes_to_torch():
    logits, targets = make(7, 97, torch.float64, ignored=(1,))
    assert not uses_kernel(logits) and uses_kernel(logits.float())
    assert torch.equal(cross_entropy(logits, targets), F.cross_entropy(logits, targets, ignore_index=-1))


def test_bad_shapes_raise():
    logits, targets = make(7, 97)
    with pytest.raises(ValueError, match="targets must be int64 of shape"):
        cross_entropy_forward(logits, targets[:3])
    with pytest.raises(ValueError, match="logits must be 2-D"):
        cross_entropy_forward(logits[None], targets)


def test_custom_op_eager_and_under_torch_compile():
    """The registered op gives the Function's values; opcheck tests its fake kernel and autograd formula
    against the real op; torch.compile(fullgraph=True) keeps it as one node (a graph break would fail)."""
    logits, targets = make(7, 97, ignored=(3,))
    want = run(logits, targets, scale=0.5)
    got = run(logits, targets, scale=0.5, op=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    z = logits.clone().requires_grad_()
    torch.library.opcheck(torch.ops.gnsrepro.cross_entropy_fwd.default, (z, targets, -1, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def step(z, t):
        return 0.5 * cross_entropy(z * 1, t, inplace=True)  # inplace is not used under torch.compile

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(logits.clone().requires_grad_(), targets)
    assert explained.graph_break_count == 0 and "gnsrepro.cross_entropy_fwd" in explained.graphs[0].code
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z = logits.clone().requires_grad_()
    loss = compiled(z, targets)
    loss.backward()
    torch.testing.assert_close(2 * loss.detach(), want[0], rtol=0, atol=0)
    torch.testing.assert_close(z.grad, want[1], rtol=1e-6, atol=0)  # 0.5 inside the graph, then the product


def test_gpt_triton_loss_gives_the_torch_loss_gradients_and_per_example_norms():
    """gns=all (the tied head's backward takes d logits from the loss): the Triton loss gives the per-example
    norms and p.grad of F.cross_entropy's, in float32 (the kernel through the interpreter on CPU)."""
    _, model = twins(instrumented_layers("all", method="simultaneous"), dtype=torch.float32)
    model.to(DEV)
    idx, targets = (t.to(DEV) for t in batch(3))
    got = {}
    for kernel in ("triton", "torch"):
        model.config.loss_kernel = kernel
        model.zero_grad()
        got[kernel] = per_example_sqnorms(model, idx, targets), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert_norms(got["triton"][0], got["torch"][0], list(got["torch"][0]), rtol=1e-5)
    for n, g in got["torch"][1].items():
        torch.testing.assert_close(got["triton"][1][n], g, rtol=1e-5, atol=1e-7, msg=n)
    model.config.loss_kernel = "triton"
    logits, loss = model(idx, targets)  # return_logits: the logits are not overwritten
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)),
                               rtol=1e-6, atol=0)


def test_gpt_rejects_an_unknown_loss_kernel():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8, loss_kernel="cuda"))
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_kernel='cuda' is not known; accepted: auto, torch, triton"):
        model(idx, idx)


def test_settings_check_loss_kernel():
    validate(make_cfg("model.loss_kernel=triton", "max_steps=1"))  # TRITON_INTERPRET=1 on a CPU, or a GPU
    with pytest.raises(ConfigError, match="^model.loss_kernel='cuda' is not known; accepted: auto, torch, triton"):
        validate(make_cfg("model.loss_kernel=cuda", "max_steps=1"))


# ---- GPU: the real shape -----------------------------------------------------------------------------


def _time_ms(fn, reps: int = 20) -> float:
    """Median device time of fn() over reps calls, CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@pytest.mark.gpu
def test_gpu_real_shape_bf16_matches_torch_and_times():
    """(16 · 1024, 50304) bf16 logits, 1% of rows ignored: loss and gradient against the float64 reference
    and PyTorch's own bf16 gradient; prints the forward + backward times of both (gradient scale 1 and
    1/4, the gradient accumulation of 4 micro-batches)."""
    N, V = 16 * 1024, 50304
    logits, targets = make(N, V, torch.bfloat16, ignored=range(0, N, 100))
    loss, grad = run(logits, targets, scale=0.25)
    want_loss, want_grad = reference(logits, targets, scale=0.25)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    assert_grad_close(grad, want_grad, torch.bfloat16, N)
    del want_grad
    z = logits.detach().clone().requires_grad_()
    F.cross_entropy(z.float(), targets, ignore_index=-1).mul(0.25).backward()
    torch.testing.assert_close(grad, z.grad, rtol=1 / 128, atol=0)  # torch rounds its fp32 gradient once too

    z = logits.detach().clone().requires_grad_()
    times = {}
    torch_loss = lambda z, t, s: s * F.cross_entropy(z.float(), t, ignore_index=-1)
    ours_loss = lambda z, t, s: s * cross_entropy(z, t)
    compiled = {"torch": torch.compile(torch_loss), "triton": torch.compile(ours_loss)}
    def step(loss_fn, s):  # autograd.grad: no accumulation into z.grad, whose extra pass would be timed too
        return lambda: torch.autograd.grad(loss_fn(z, targets, s), z)

    for s in (1.0, 0.25):
        times[f"triton eager, scale {s}"] = _time_ms(step(ours_loss, s))
        times[f"triton compiled, scale {s}"] = _time_ms(step(compiled["triton"], s))
        times[f"torch eager, scale {s}"] = _time_ms(step(torch_loss, s))
        times[f"torch compiled, scale {s}"] = _time_ms(step(compiled["torch"], s))
    print("\ncross-entropy forward + backward, (16·1024, 50304) bf16, median ms:")
    for name, ms in times.items():
        print(f"  {name:40s} {ms:7.3f}")


@pytest.mark.gpu
def test_gpu_compiled_gpt_step_same_loss_and_grads():
    """A compiled bf16-autocast GPT with the Triton loss (the custom op under inductor) against the torch loss."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)
    idx = torch.randint(0, 50304, (4, 64), device="cuda")
    grads = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**cfg.__dict__, "loss_kernel": kernel})).cuda()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(idx, idx, return_logits=False)
        (loss / 2).backward()
        grads[kernel] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=1e-5, atol=0)
    for n, g in grads["torch"][1].items():
        torch.testing.assert_close(grads["triton"][1][n], g, rtol=2e-2, atol=1e-5, msg=n)
