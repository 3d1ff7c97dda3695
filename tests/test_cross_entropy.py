"""The fused cross-entropy kernels (gnsrepro.kernels.cross_entropy) against F.cross_entropy in float64.

Both designs: the two-kernel one (the default: lse in the forward, the gradient times the incoming one in the
backward) and the one-kernel one (grad_in_forward=True: the gradient in the forward, scaled in the backward).

The reference is F.cross_entropy and its autograd on the float64 upcast of the very (rounded) logits the
kernel sees, so only the kernel's own arithmetic is measured. Tolerances:
- loss: fp32 arithmetic on exact inputs, rtol 1e-6 whatever the logits' dtype.
- gradient in float32: fp32 arithmetic, rtol 1e-5 plus atol 1e-6 / N (entries are at most 1 / n_valid).
- gradient in bf16 / fp16: the fp32 value rounded once to that dtype, a relative error of at most 2^-8
  (bf16) or 2^-11 (fp16) when rounding to nearest, as a GPU does; Triton's interpreter (triton 3.7, the
  CPU tests) truncates fp32 to bf16 instead, up to 2^-7. rtol 1/128 and 1/512, atol 2^-24 for fp16's
  subnormals (one unit there). The one-kernel design rounds a second time in its backward's product when
  the scale is not a power of 2 (1 and 1/4 are exact): twice those.
- the two designs against each other: one fp32 product by dloss / n_valid against a division by n_valid,
  then a product by dloss, so fp32 values a unit or so apart, rounded: rtol 2 units of the dtype (plus
  the one-kernel design's second rounding); their losses come from the same code (``_row_lse``) and are
  compared bit for bit.
CPU runs the kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the real shape
(16 × 1024 tokens, 50304 classes, bf16) is in the gpu-marked tests, which print the kernel's and
PyTorch's times.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from test_pegn import assert_norms, batch, twins
from test_train import make_cfg

from gnsrepro.errors import ConfigError
from gnsrepro.kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_backward,
    cross_entropy_forward,
    cross_entropy_lse,
    cross_entropy_op,
    scale_grad_,
    uses_kernel,
)
from gnsrepro.model import GPT, GPTConfig
from gnsrepro.pegn import instrumented_layers, per_example_sqnorms
from gnsrepro.settings import validate

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1 / 128, torch.float16: 1 / 512}
SCALES = (1.0, 0.25, 3.0)  # d(outer)/d loss: a plain backward, gradient accumulation's 1/4, and not a power of 2
SHAPES = [(1, 5, None), (7, 97, None), (7, 97, 16), (33, 1000, 128), (33, 1000, None)]
DESIGNS = {"two_kernels": False, "grad_in_forward": True}  # id -> cross_entropy's grad_in_forward


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


def run(logits, targets, scale: float = 1.0, inplace: bool = False, op: bool = False, grad_in_forward: bool = False):
    """(loss, logits.grad) after (scale · loss).backward() through the autograd Function (or the custom ops)."""
    z = logits.detach().clone().requires_grad_()
    if op:
        loss = cross_entropy_op(z, targets, grad_in_forward=grad_in_forward)
    else:
        loss = cross_entropy(z, targets, inplace=inplace, grad_in_forward=grad_in_forward)
    (scale * loss).backward()
    return loss.detach(), z.grad


def assert_grad_close(got, want, dtype, n_rows, roundings: int = 1):
    """got (dtype) against the float64 want, allowing `roundings` roundings to dtype (module docstring)."""
    assert got.dtype == dtype and got.shape == want.shape
    atol = 1e-6 / n_rows if dtype == torch.float32 else (2.0**-24 if dtype == torch.float16 else 0.0)
    torch.testing.assert_close(got.double(), want, rtol=roundings * GRAD_RTOL[dtype], atol=roundings * atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,V,block_v", SHAPES)
def test_loss_and_gradient_match_float64_reference(N, V, block_v, dtype):
    """The one-kernel design. block_v 16 / 128: several iterations of both loops over a row, the last one
    partly masked."""
    ignored = (0, 3) if N > 1 else ()
    logits, targets = make(N, V, dtype, ignored)
    loss, grad = cross_entropy_forward(logits, targets, block_v=block_v)
    want_loss, want_grad = reference(logits, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    assert_grad_close(grad, want_grad, dtype, N)
    assert not grad[list(ignored)].any()  # an ignored row's gradient is exactly 0
    # and through autograd, with the backward's scale (gradient accumulation's 1/m)
    loss2, grad2 = run(logits, targets, scale=0.25, grad_in_forward=True)
    assert torch.equal(loss2, loss)
    assert_grad_close(grad2, 0.25 * want_grad, dtype, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,V,block_v", SHAPES)
def test_two_kernels_loss_lse_and_gradient_match_float64_reference(N, V, block_v, dtype):
    """The two-kernel design's launchers: lse against torch.logsumexp, the loss, and the backward kernel's
    gradient for each incoming gradient in SCALES, in a new tensor and in place over a copy of the logits."""
    ignored = (0, 3) if N > 1 else ()
    valid = [i for i in range(N) if i not in ignored]
    logits, targets = make(N, V, dtype, ignored)
    loss, lse, n_valid = cross_entropy_lse(logits, targets, block_v=block_v)
    want_loss = reference(logits, targets)[0]
    assert loss.dtype == torch.float32 and loss.dim() == 0 and n_valid.item() == len(valid)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    assert lse.dtype == torch.float32 and lse.shape == (N,)
    torch.testing.assert_close(lse[valid].double(), torch.logsumexp(logits[valid].double(), dim=1), rtol=1e-6, atol=0)
    for scale in SCALES:
        dloss = torch.full((), scale, device=DEV)
        grad = cross_entropy_backward(dloss, logits, targets, lse, n_valid, block_v=block_v)
        assert_grad_close(grad, reference(logits, targets, scale)[1], dtype, N)
        assert not grad[list(ignored)].any()  # an ignored row's gradient is exactly 0
        buffer = logits.clone()
        assert cross_entropy_backward(dloss, buffer, targets, lse, n_valid, grad_out=buffer, block_v=block_v) is buffer
        assert torch.equal(buffer, grad)  # in place: each block read before it is overwritten


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_both_designs_give_the_reference_and_each_others_values(scale, dtype):
    """Through autograd, eager Functions and the custom ops, at an odd shape with ignored rows: both designs
    against the float64 reference, their losses bit for bit, their gradients within one rounding."""
    N, V = 33, 1000
    logits, targets = make(N, V, dtype, ignored=(5, 6, 32), seed=1)
    want_loss, want_grad = reference(logits, targets, scale)
    got = {(name, op): run(logits, targets, scale, op=op, grad_in_forward=gif)
           for name, gif in DESIGNS.items() for op in (False, True)}
    # the one-kernel design rounds its buffer, then the product by a scale that is not a power of 2
    one_kernel_roundings = 1 if scale in (1.0, 0.25) else 2
    for (name, op), (loss, grad) in got.items():
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0, msg=f"{name} op={op}")
        assert_grad_close(grad, want_grad, dtype, N, one_kernel_roundings if name == "grad_in_forward" else 1)
        assert not grad[[5, 6, 32]].any()
    two, one = got["two_kernels", False], got["grad_in_forward", False]
    assert torch.equal(got["two_kernels", True][1], two[1])  # the custom ops run the very kernels eagerly
    assert torch.equal(two[0], one[0])
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(one[1], two[1], rtol=(1 + one_kernel_roundings) * eps,
                               atol=2.0**-24 if dtype == torch.float16 else 0.0)


def test_fewer_programs_than_rows_loop_over_rows():
    """A grid of 4 programs for 33 rows (what a GPU's few programs per SM do at 16k rows): the same bits."""
    logits, targets = make(33, 97, torch.bfloat16, ignored=(4, 32))
    want = cross_entropy_forward(logits, targets, block_v=32)
    got = cross_entropy_forward(logits, targets, block_v=32, programs=4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("grad_in_forward", DESIGNS.values(), ids=DESIGNS)
def test_all_rows_ignored_give_nan_loss_and_zero_gradient_as_torch(grad_in_forward):
    logits, targets = make(7, 97, ignored=range(7))
    loss, grad = run(logits, targets, grad_in_forward=grad_in_forward)
    want_loss, want_grad = reference(logits, targets)
    assert torch.isnan(loss) and torch.isnan(want_loss)
    assert torch.equal(grad.double(), want_grad) and not grad.any()


@pytest.mark.parametrize("grad_in_forward", DESIGNS.values(), ids=DESIGNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_equals_out_of_place(dtype, grad_in_forward):
    logits, targets = make(33, 1000, dtype, ignored=(5,))
    want_loss, want_grad = run(logits, targets, scale=0.5, grad_in_forward=grad_in_forward)
    z = logits.detach().clone().requires_grad_()
    work = z * 1  # a non-leaf, as the head's output is: its gradient flows on to z
    loss = cross_entropy(work, targets, inplace=True, grad_in_forward=grad_in_forward)
    # the two-kernel design overwrites the logits in the backward, the one-kernel design in the forward
    assert torch.equal(work.detach(), logits) != grad_in_forward
    (0.5 * loss).backward()
    assert torch.equal(loss.detach(), want_loss)
    assert torch.equal(z.grad, want_grad)
    assert torch.equal(work.detach(), want_grad)  # the logits now hold the (scaled) gradient


def test_backward_scale_of_one_leaves_the_forward_buffer_and_a_second_backward_raises():
    """The one-kernel design's backward scales its forward's buffer in place: once only."""
    logits, targets = make(7, 97, ignored=(2,))
    _, grad = cross_entropy_forward(logits, targets)
    buffer = grad.clone()
    assert scale_grad_(buffer, torch.ones((), device=DEV)) is buffer and torch.equal(buffer, grad)
    scale_grad_(buffer, torch.full((), 3.0, device=DEV), block_v=16)
    torch.testing.assert_close(buffer, 3 * grad, rtol=1e-7, atol=0)
    z = logits.clone().requires_grad_()
    loss = cross_entropy(z, targets, grad_in_forward=True)
    loss.backward(retain_graph=True)
    assert torch.equal(z.grad, grad)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_two_kernels_second_backward_works_unless_inplace():
    """The two-kernel design keeps the logits, so retain_graph=True works, unless the first backward
    overwrote them (inplace=True), which then raises rather than reading the gradient as logits."""
    logits, targets = make(7, 97, ignored=(2,))
    z = logits.clone().requires_grad_()
    loss = cross_entropy(z, targets)
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    (0.5 * loss).backward()
    torch.testing.assert_close(z.grad, 1.5 * first, rtol=1e-6, atol=0)
    z = logits.clone().requires_grad_()
    loss = cross_entropy(z * 1, targets, inplace=True)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(z.grad, first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_no_grad_computes_the_loss_alone():
    logits, targets = make(7, 97, ignored=(1,))
    with torch.no_grad():
        loss = cross_entropy(logits.requires_grad_(), targets)
    loss_only, empty = cross_entropy_forward(logits, targets, write_grad=False)
    assert empty.numel() == 0 and torch.equal(loss, loss_only)
    with torch.no_grad():  # the one-kernel design's no-grad path is the two-kernel forward too
        assert torch.equal(cross_entropy(logits, targets, grad_in_forward=True), loss)
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
    _, lse, n_valid = cross_entropy_lse(logits, targets)
    with pytest.raises(ValueError, match=r"lse must be float32 of shape \(7,\)"):
        cross_entropy_backward(torch.ones((), device=DEV), logits, targets, lse[:3], n_valid)


@pytest.mark.parametrize("grad_in_forward", DESIGNS.values(), ids=DESIGNS)
def test_custom_op_eager_and_under_torch_compile(grad_in_forward):
    """The registered ops give the Functions' values; opcheck tests their fake kernels and autograd formulas
    against the real ops; torch.compile(fullgraph=True) keeps them as opaque nodes (a graph break would fail)."""
    logits, targets = make(7, 97, ignored=(3,))
    want = run(logits, targets, scale=0.5, grad_in_forward=grad_in_forward)
    got = run(logits, targets, scale=0.5, op=True, grad_in_forward=grad_in_forward)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    z = logits.clone().requires_grad_()
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    if grad_in_forward:
        forward_op = "cross_entropy_fwd"
        torch.library.opcheck(torch.ops.gnsrepro.cross_entropy_fwd.default, (z, targets, -1, True), test_utils=checks)
    else:
        forward_op = "cross_entropy_lse"
        torch.library.opcheck(torch.ops.gnsrepro.cross_entropy_lse.default, (z, targets, -1), test_utils=checks)
        _, lse, n_valid = cross_entropy_lse(logits, targets)
        torch.library.opcheck(torch.ops.gnsrepro.cross_entropy_bwd.default,
                              (torch.full((), 0.5), logits, targets, lse, n_valid, -1),
                              test_utils=("test_schema", "test_faketensor"))

    def step(z, t):  # inplace is not used under torch.compile
        return 0.5 * cross_entropy(z * 1, t, inplace=True, grad_in_forward=grad_in_forward)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(logits.clone().requires_grad_(), targets)
    assert explained.graph_break_count == 0 and f"gnsrepro.{forward_op}" in explained.graphs[0].code
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z = logits.clone().requires_grad_()
    loss = compiled(z, targets)
    loss.backward()
    torch.testing.assert_close(2 * loss.detach(), want[0], rtol=0, atol=0)
    torch.testing.assert_close(z.grad, want[1], rtol=1e-6, atol=0)  # 0.5 inside the graph, then the product


def quarter_loss(z, t, grad_in_forward):
    return 0.25 * cross_entropy(z, t, grad_in_forward=grad_in_forward)


def test_compiled_two_kernels_backward_has_no_product_after_the_op():
    """(0.25 · loss).backward() under torch.compile: the AOT backward graph's gradient for the logits is the
    backward op's own output (the 1/4 enters the op as its dloss, a 0-d product), with no (N, V) pointwise
    op after it; the one-kernel design's backward graph instead ends in an (N, V) product, inductor's pass."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    logits, targets = make(7, 97, ignored=(3,))
    graphs = {}

    def capture(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward"))
    for name, grad_in_forward in DESIGNS.items():
        torch._dynamo.reset()
        compiled = torch.compile(functools.partial(quarter_loss, grad_in_forward=grad_in_forward), backend=backend,
                                 fullgraph=True)
        z = logits.clone().requires_grad_()
        compiled(z, targets).backward()
        assert_grad_close(z.grad, reference(logits, targets, 0.25)[1], torch.float32, 7)
        nodes = list(graphs["backward"].graph.nodes)
        (grads,) = next(n for n in nodes if n.op == "output").args
        full_size = [n.target for n in nodes if n.op == "call_function" and n.meta["val"].shape == logits.shape]
        if grad_in_forward:
            assert full_size == [torch.ops.aten.mul.Tensor], name
        else:
            assert grads[0].target == torch.ops.gnsrepro.cross_entropy_bwd.default
            assert full_size == [torch.ops.gnsrepro.cross_entropy_bwd.default], name
            assert "gnsrepro.cross_entropy_lse" in graphs["forward"].code


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


def test_auto_loss_on_a_cpu_is_torchs(monkeypatch):
    """loss_kernel=auto (the default) off CUDA: F.cross_entropy, the Triton kernels never called (not even in the
    interpreter), and the same loss and gradients as loss_kernel=torch."""
    import gnsrepro.kernels.cross_entropy as CE

    def refuse(*args, **kwargs):
        raise AssertionError("auto called the Triton loss on a CPU")

    monkeypatch.setattr(CE, "cross_entropy", refuse)
    assert GPTConfig().loss_kernel == "auto"
    cfg = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)
    idx = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    got = {}
    for kernel in ("auto", "torch"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**cfg.__dict__, "loss_kernel": kernel}))
        _, loss = model(idx, idx)
        loss.backward()
        got[kernel] = loss.detach(), [p.grad for p in model.parameters()]
    assert torch.equal(got["auto"][0], got["torch"][0])
    assert all(torch.equal(a, b) for a, b in zip(got["auto"][1], got["torch"][1]))


def test_gpt_rejects_an_unknown_loss_kernel():
    with pytest.raises(ValueError, match="loss_kernel='cuda' is not known; accepted: auto, torch, triton"):
        GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8, loss_kernel="cuda"))


def test_settings_check_loss_kernel():
    validate(make_cfg("model.loss_kernel=triton", "max_steps=1"))  # TRITON_INTERPRET=1 on a CPU, or a GPU
    with pytest.raises(ConfigError, match="^model.loss_kernel='cuda' is not known; accepted: auto, torch, triton"):
        validate(make_cfg("model.loss_kernel=cuda", "max_steps=1"))


# ---- GPU: the real shape -----------------------------------------------------------------------------


def _time_ms(fn) -> float:
    """Median device time of fn() in ms over 20 calls after 3 warm-up calls (CUDA events)."""
    from gnsrepro.benchmarks.layernorm import time_us

    return time_us(fn, warmup=3, steps=20) / 1e3


@pytest.mark.gpu
def test_gpu_real_shape_bf16_matches_torch_and_times():
    """(16 · 1024, 50304) bf16 logits, 1% of rows ignored, backward scale 1/4 (gradient accumulation over 4
    micro-batches): both designs' loss and gradient against the float64 reference and PyTorch's own bf16
    gradient, and the compiled two-kernel design against its eager self. Prints the forward + backward times
    of both designs, eager and compiled, and of PyTorch's loss, at scales 1 and 1/4; asserts nothing about
    them (a benchmark, not a test)."""
    N, V = 16 * 1024, 50304
    logits, targets = make(N, V, torch.bfloat16, ignored=range(0, N, 100))
    got = {name: run(logits, targets, scale=0.25, grad_in_forward=gif) for name, gif in DESIGNS.items()}
    want_loss, want_grad = reference(logits, targets, scale=0.25)
    for name, (loss, grad) in got.items():
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0, msg=name)
        assert_grad_close(grad, want_grad, torch.bfloat16, N)
    del want_grad
    grad = got["two_kernels"][1]
    z = logits.detach().clone().requires_grad_()
    F.cross_entropy(z.float(), targets, ignore_index=-1).mul(0.25).backward()
    torch.testing.assert_close(grad, z.grad, rtol=1 / 128, atol=0)  # torch rounds its fp32 gradient once too
    torch.testing.assert_close(got["grad_in_forward"][1], grad, rtol=2 / 128, atol=0)

    z = logits.detach().clone().requires_grad_()
    losses = {
        "two kernels": lambda z, t, s: s * cross_entropy(z, t),
        "one kernel": lambda z, t, s: s * cross_entropy(z, t, grad_in_forward=True),
        "torch": lambda z, t, s: s * F.cross_entropy(z.float(), t, ignore_index=-1),
    }
    compiled = {name: torch.compile(fn) for name, fn in losses.items()}
    (dz,) = torch.autograd.grad(compiled["two kernels"](z, targets, 0.25), z)
    torch.testing.assert_close(dz, grad, rtol=0, atol=0)  # the same kernels, 1/4 reaching the op as its dloss

    def step(loss_fn, s):  # autograd.grad: no accumulation into z.grad, whose extra pass would be timed too
        return lambda: torch.autograd.grad(loss_fn(z, targets, s), z)

    times = {}
    for s in (1.0, 0.25):
        for name in losses:
            times[f"{name} eager, scale {s}"] = _time_ms(step(losses[name], s))
            times[f"{name} compiled, scale {s}"] = _time_ms(step(compiled[name], s))
    print("\ncross-entropy forward + backward, (16·1024, 50304) bf16, median ms:")
    for name, ms in times.items():
        print(f"  {name:40s} {ms:7.3f}")


@pytest.mark.gpu
def test_gpu_compiled_gpt_step_same_loss_and_grads():
    """A compiled bf16-autocast GPT with the Triton loss (the custom op under inductor) against the torch loss, and
    loss_kernel=auto's (the default) against the Triton one."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)
    idx = torch.randint(0, 50304, (4, 64), device="cuda")
    grads = {}
    for kernel in ("torch", "triton", "auto"):
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
    # auto (the default) is the Triton loss on CUDA, compiled too: the same kernels, the same loss bits; the
    # gradients agree to the rounding of atomic adds (inductor's embedding backward, the attention backward),
    # which are not bitwise repeatable, far inside the 2e-2 that tells the Triton loss from PyTorch's
    assert torch.equal(grads["auto"][0], grads["triton"][0])
    for n, g in grads["triton"][1].items():
        torch.testing.assert_close(grads["auto"][1][n], g, rtol=1e-4, atol=1e-7, msg=n)
