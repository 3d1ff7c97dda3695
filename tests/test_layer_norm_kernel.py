"""Triton LayerNorm with per-example gradient norms: a chain of checks, each stage against the one before it.

torch.func vmap per-example gradients (float64) -> plain-PyTorch reference formulas -> Triton kernel,
and the kernel against torch.nn.functional.layer_norm's autograd. CPU runs the kernels in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small; GPU tests are marked.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from gnsrepro.kernels import layer_norm as K
from gnsrepro.kernels.layer_norm import (
    TritonLayerNorm,
    layer_norm_per_example,
    layer_norm_per_example_reference,
)

EPS = 1e-5
# ‖a − b‖ / ‖b‖ against F.layer_norm run on the same (rounded) inputs: both compute in fp32 and round
# y and dx once to the input dtype, so the gap is about one rounding of that dtype.
TOL_VS_TORCH = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# per-example squared norms and dγ/dβ against the fp32 reference on the same inputs: fp32 arithmetic in
# both, only the summation order differs (fp32 outputs whatever the input dtype).
TOL_VS_REF = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make(shape, dtype=torch.float32, bias=True, scales=None, device=DEV, seed=0):
    """x, weight, bias, dy; `scales` multiplies example b's x and dy by scales[b]."""
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = torch.randn(shape, generator=g) + 0.5
    dy = torch.randn(shape, generator=g)
    if scales is not None:
        s = torch.tensor(scales, dtype=torch.float32).view(-1, *([1] * (len(shape) - 1)))
        x, dy = x * s, dy * s
    w = 1 + 0.3 * torch.randn(N, generator=g)
    b = 0.3 * torch.randn(N, generator=g) if bias else None
    to = lambda t, dt: t.to(device=device, dtype=dt) if t is not None else None
    return to(x, dtype), to(w, torch.float32), to(b, torch.float32), to(dy, dtype)


def run_op(x, w, b, dy, sink=True):
    """Forward + backward through the autograd path; returns y, dx, dw, db, sink.grad (or None)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    s = torch.zeros(x.shape[0], 2 if b is not None else 1, device=x.device, requires_grad=True) if sink else None
    y = layer_norm_per_example(x, w, b, EPS, s)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None), (s.grad if sink else None)


def run_torch(x, w, b, dy):
    """F.layer_norm forward + autograd. With x in bf16/fp16 and fp32 parameters (what autocast hands a
    LayerNorm), CUDA's F.layer_norm wants one dtype: it then runs in fp32, as under autocast, and y, dx
    are rounded back to x's dtype."""
    dt = w.dtype if w.element_size() > x.element_size() else x.dtype
    xs = x.detach().to(dt).requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = F.layer_norm(xs, (x.shape[-1],), w, b, EPS)
    y.backward(dy.to(dt))
    return y.detach().to(x.dtype), xs.grad.to(x.dtype), w.grad, (b.grad if b is not None else None)


def check_against_torch_and_reference(x, w, b, dy):
    y, dx, dw, db, sq = run_op(x, w, b, dy)
    ty, tdx, tdw, tdb = run_torch(x, w, b, dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape and dx.shape == x.shape
    assert dw.dtype == w.dtype and sq.dtype == torch.float32 and sq.shape == (x.shape[0], 2 if b is not None else 1)
    tol = TOL_VS_TORCH[x.dtype]
    assert rel(y, ty) < tol and rel(dx, tdx) < tol
    # F.layer_norm's dγ/dβ in low precision come from its own rounded x̂: compare at the same tolerance
    assert rel(dw, tdw) < max(tol, 1e-5)
    ref = layer_norm_per_example_reference(x, w, b, EPS, dy)
    rtol = TOL_VS_REF[x.dtype]
    ptol = max(rtol, TOL_VS_TORCH[w.dtype])  # dγ, dβ are rounded once to the parameters' dtype
    assert rel(dw, ref[2]) < ptol
    # every example on its own scale: relative error per example, not of the whole vector
    assert (sq[:, 0] - ref[4]).abs().le(rtol * ref[4].abs() + 1e-30).all()
    if b is not None:
        assert rel(db, tdb) < max(tol, 1e-5) and rel(db, ref[3]) < ptol
        assert (sq[:, 1] - ref[5]).abs().le(rtol * ref[5].abs() + 1e-30).all()
    else:
        assert db is None
    assert torch.isfinite(sq).all()
    return sq


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize(
    "shape",
    [(1, 5, 7), (3, 7, 33), (2, 5, 100), (4, 33), (1, 100), (2, 3, 1000)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_torch_and_reference(shape, bias, dtype):
    check_against_torch_and_reference(*make(shape, dtype, bias, seed=hash((shape, bias)) % 1000))


def test_fp16_and_large_hidden_size():
    check_against_torch_and_reference(*make((2, 3, 129), torch.float16))
    check_against_torch_and_reference(*make((1, 2, 8192), torch.float32))  # the largest N, one row per tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_examples_of_very_different_scale(dtype):
    # x and dy of example b scaled by s_b: |dγ_b|² and |dβ_b|² scale by s_b², over 12 orders of magnitude
    sq = check_against_torch_and_reference(*make((4, 7, 33), dtype, scales=[1e3, 1.0, 1e-3, 1e2]))
    assert sq[0, 1] / sq[2, 1] > 1e10


# (tail, depth, stages, sub, rows) of test_every_work_split_matches_reference
WORK_SPLIT_KNOBS = [(False, 1, 0, 0, 0), (True, 1, 0, 0, 0), (True, 2, 0, 0, 0), (False, 1, 3, 0, 0),
                    (True, 1, 0, 2, 0), (True, 1, 3, 3, 0), (True, 1, 0, 2, 1), (True, 1, 0, 0, 2)]


@pytest.mark.parametrize(
    "num_ex,T,N,block_m,target,mode",
    [
        (9, 1, 33, 2, 3, 0),  # 2-D input: rows are examples, several rows per program, last one partial
        (5, 7, 33, 2, 2, 1),  # several whole examples per program, the last program short of examples
        (3, 3, 33, 4, 64, 1),  # one program per example
        (2, 13, 33, 2, 6, 2),  # examples split into chunks, the last chunk short
        (1, 11, 100, 1, 5, 2),  # B = 1, T prime, one row per tile
        (4, 9, 34, 4, 6, 2),  # even N: the pipelined path's (even, odd) column pairs
        (6, 1, 34, 2, 4, 0),  # even N, 2-D input
        (70, 1, 33, 1, 70, 0),  # tail reduction: 9 programs per group, more than one load of 8 rows
        (10, 5, 1000, 1, 50, 2),  # tail reduction: 10 examples of 5 chunks, N = 1000 loads 4 rows at a time
        (65, 1, 34, 1, 65, 0),  # tail reduction: 8 groups of 9 programs, the last group of 2
    ],
)
@pytest.mark.parametrize(
    "tail,depth,stages,sub,rows",
    WORK_SPLIT_KNOBS,
    ids=["reduce_kernel", "tail", "tail_depth2", "pipelined", "tail_sub2", "tail_sub3_pipelined", "tail_sub2_rows1",
         "tail_rows2"],
)
def test_every_work_split_matches_reference(num_ex, T, N, block_m, target, mode, tail, depth, stages, sub, rows):
    """The three ways rows are split over programs, forced through the launchers' tuning knobs, with the
    partial sums reduced by a second kernel or by the main kernel's last programs (over two levels, or
    three: subgroups of `sub` programs, the last one short; `rows` partial rows per load, 0 the
    launcher's), loading one or two tiles ahead in registers, or (even N) through the compiler's
    pipelined loads.

    Where the knobs leave the launches (both plans, bias and not) those of a knob set earlier in
    WORK_SPLIT_KNOBS for the same shape (odd N: no pipelined loads; a group too small for subgroups), the
    kernels would run the same launches on the same inputs: the plan is checked here, the kernels run in that case."""
    assert K._bwd_plan(num_ex, T, block_m, target)[0] == mode
    shape = (num_ex, T, N) if T > 1 else (num_ex, N)
    launches = lambda t, d, st, su, r: [K._bwd_launch(num_ex, T, N, bias, target, block_m, 4, t, d, st, None, su, r)
                                        for bias in (True, False)]
    here = launches(tail, depth, stages, sub, rows)
    earlier = WORK_SPLIT_KNOBS[:WORK_SPLIT_KNOBS.index((tail, depth, stages, sub, rows))]
    run_kernels = all(launches(*knobs) != here for knobs in earlier)
    for bias, plan in zip((True, False), here):
        assert plan.main["TAIL_REDUCE"] == tail and (plan.reduce is None) == tail
        assert not rows or plan.main["BLOCK_R"] == rows
        assert plan.main["TAIL_SUB"] == (plan.NSG > 0)
        assert plan.NSG == (K._cdiv(plan.GP, sub) if tail and 1 < sub < plan.GP else 0)
        assert plan.main["STAGES"] == (stages if N % 2 == 0 else 0)  # odd N: the register path
        if not run_kernels:
            continue
        x, w, b, dy = make(shape, bias=bias, scales=[10.0 ** ((i % 5) - 2) for i in range(num_ex)])
        y, stats, _ = K.layer_norm_forward(x, w, b, EPS, block_m=block_m)
        dx, dw, db, sq, _ = K.layer_norm_backward(
            dy, x, w, b, stats, block_m=block_m, target_programs=target, tail_reduce=tail, depth=depth, stages=stages,
            tail_sub=sub, tail_rows=rows,
        )
        ry, rdx, rdw, rdb, rsw, rsb = layer_norm_per_example_reference(x, w, b, EPS, dy)
        assert rel(y, ry) < 1e-5 and rel(dx, rdx) < 1e-5 and rel(dw, rdw) < 1e-5
        assert (sq[:, 0] - rsw).abs().le(1e-5 * rsw).all()
        if bias:
            assert rel(db, rdb) < 1e-5 and (sq[:, 1] - rsb).abs().le(1e-5 * rsb).all()


@pytest.mark.parametrize(
    "tail,sub", [(False, 0), (True, 0), (True, 2)], ids=["reduce_kernel", "tail_reduce", "tail_sub"]
)
def test_backward_is_deterministic_and_leaves_its_counters_at_zero(tail, sub):
    """MODE 2 finishes the per-example norms in the last program to arrive (atomic counters)."""
    x, w, b, dy = make((2, 13, 33), scales=[1e2, 1e-2])
    _, stats, _ = K.layer_norm_forward(x, w, b, EPS)
    kw = dict(block_m=2, target_programs=6, tail_reduce=tail, tail_sub=sub)
    assert K._bwd_launch(2, 13, 33, True, 6, 2, 4, tail, 1, 0, None, sub).NSG == (2 if sub else 0)
    first = K.layer_norm_backward(dy, x, w, b, stats, **kw)
    for _ in range(3):
        again = K.layer_norm_backward(dy, x, w, b, stats, **kw)
        for a, c in zip(first[:4], again[:4]):
            assert torch.equal(a, c)
    assert not K._counters(x.device, 64).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,block_m,target", [((7, 34), 2, 3), ((3, 5, 34), 2, 2), ((2, 13, 66), 2, 6)],
                         ids=["rows", "examples", "chunks"])
def test_pipelined_loads_match_register_path(dtype, shape, block_m, target):
    """The pipelined path reads 16-bit tensors as 32-bit words of two values and works on even and odd
    columns: the same results as the register path, with the residual's gradient and a second dx."""
    x, w, b, dy = make(shape, dtype, scales=[10.0 ** ((i % 3) - 1) for i in range(shape[0])])
    ds = make(shape, dtype, seed=1)[3]
    _, stats, _ = K.layer_norm_forward(x, w, b, EPS)
    dx2_dtype = torch.float32 if dtype != torch.float32 else torch.bfloat16
    kw = dict(ds=ds, dx2_dtype=dx2_dtype, block_m=block_m, target_programs=target)
    ref = K.layer_norm_backward(dy, x, w, b, stats, **kw)
    got = K.layer_norm_backward(dy, x, w, b, stats, stages=3, **kw)
    assert K._bwd_launch(shape[0], shape[1] if len(shape) == 3 else 1, shape[-1], True, target, block_m, 4, False,
                         1, 3).main["STAGES"] == 3
    # dx in 16 bits: the row sums c1, c2 add even and odd columns apart, so a rounding may differ by an ulp
    ulp = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    for i in (0, 4):
        assert got[i].dtype == ref[i].dtype
        assert ((got[i].float() - ref[i].float()).abs() <= ulp * ref[i].float().abs() + 1e-6).all()
    for g, r in zip(got[1:4], ref[1:4]):
        assert rel(g, r) < 1e-6
    # a 16-bit view that starts at an odd element cannot be read as 32-bit words: the register path
    if dtype != torch.float32:
        xs = torch.cat([torch.zeros(1, dtype=dtype), x.flatten()])[1:].view(shape)
        assert xs.data_ptr() % 4 == 2
        odd = K.layer_norm_backward(dy, xs, w, b, stats, stages=3, **kw)
        assert torch.equal(odd[0], ref[0])


def test_tail_reduction_only_where_one_program_reads_little():
    # 8 × 2048 rows of 768 over 264 programs: 33 chunks per example, 8 examples; each level reads
    # at most 33 rows of 768 floats twice (203 KB): the tail reduction applies
    assert K._bwd_launch(8, 2048, 768, True, 264, 4, 4, True).main["TAIL_REDUCE"]
    # one example of N = 8192 in 264 chunks: one program would read 264 rows of 8192 floats twice
    plan = K._bwd_launch(1, 2048, 8192, True, 264, 1, 8, True)
    assert not plan.main["TAIL_REDUCE"] and plan.reduce is not None
    assert not K._bwd_launch(8, 2048, 768, True, 264, 4, 4, False).main["TAIL_REDUCE"]
    # 8 × 2048 rows of 768 in 376 programs: groups of 47 partials are too many for one program (289 KB),
    # but not with a middle level (subgroups of 4, 12 subgroups per group, 8 groups: 4-12 rows at a time)
    assert not K._bwd_launch(8, 2048, 768, True, 400, 4, 4, True, 1, 0, None, 0).main["TAIL_REDUCE"]
    plan = K._bwd_launch(8, 2048, 768, True, 400, 4, 4, True, 1, 0, None, -1)
    assert plan.main["TAIL_REDUCE"] and plan.reduce is None and (plan.P, plan.GP, plan.SG, plan.NSG) == (376, 47, 4, 12)


def test_tail_subgroups_where_they_shorten_the_chain_of_loads():
    # groups of 32 programs, 4 rows per load: 8 loads in a row, or 1 (subgroup of 4) + 2 (8 subgroups)
    assert K._subgroup(32, 4) == 4
    plan = K._bwd_launch(8, 2048, 768, True, 264, 4, 4, True, 1, 3, None, -1)
    assert (plan.GP, plan.NGRP, plan.SG, plan.NSG) == (32, 8, 4, 8) and plan.main["TAIL_SUB"]
    assert plan.work == 2 * (256 + 8 + 8 * 8) * 768  # partials, the groups' rows, the subgroups' rows
    # 9 programs, 8 rows per load: 2 loads either way, so no middle level (one atomic fewer)
    assert K._subgroup(9, 8) == 0 and K._subgroup(2, 1) == 0
    assert K._bwd_launch(70, 1, 33, True, 70, 1, 4, True, 1, 0, None, -1).NSG == 0
    assert K._bwd_launch(70, 1, 33, True, 70, 1, 4, True, 1, 0, None, 0).NSG == 0
    with pytest.raises(ValueError, match="tail_rows must be 0 or a power of two, got 3"):
        K._bwd_launch(70, 1, 33, True, 70, 1, 4, True, 1, 0, None, 0, 3)


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 33)], ids=["3d", "2d"])
def test_norms_match_vmap_per_example_gradients_float64(shape):
    """Per-example loss L_b = Σ y_b ⊙ dy_b, so ∂L_b/∂y_b = dy_b: vmap(grad) gives dγ_b, dβ_b exactly."""
    x, w, b, dy = make(shape, scales=[1e2, 1.0, 1e-2, 3.0][: shape[0]])

    def loss(w, b, xb, dyb):
        return (F.layer_norm(xb, (xb.shape[-1],), w, b, EPS) * dyb).sum()

    gw, gb = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        w.double(), b.double(), x.double(), dy.double()
    )
    _, _, dw, db, sq = run_op(x, w, b, dy)
    ref = layer_norm_per_example_reference(x, w, b, EPS, dy)
    for got, want in ((sq[:, 0], gw.pow(2).sum(-1)), (sq[:, 1], gb.pow(2).sum(-1)), (ref[4], gw.pow(2).sum(-1))):
        assert ((got.double() - want).abs() <= 1e-5 * want.abs()).all()
    assert rel(dw, gw.sum(0)) < 1e-5 and rel(db, gb.sum(0)) < 1e-5


def test_non_contiguous_input_and_gradient():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(33, 7, 3, generator=g)
    x = base.to(DEV).permute(2, 1, 0)  # (3, 7, 33), not contiguous
    dy = torch.randn(3, 33, 7, generator=g).to(DEV).transpose(1, 2)
    assert not x.is_contiguous() and not dy.is_contiguous()
    w, b = 1 + torch.randn(33, generator=g).to(DEV), torch.randn(33, generator=g).to(DEV)
    check_against_torch_and_reference(x, w, b, dy)
    check_against_torch_and_reference(x[:, 2], w, b, dy[:, 2])  # 2-D strided rows


def test_gradient_accumulation_adds_up_in_sink():
    x1, w, b, dy1 = make((3, 5, 33), seed=1)
    x2, _, _, dy2 = make((3, 5, 33), seed=2)
    w, b = w.requires_grad_(), b.requires_grad_()
    sink = torch.zeros(3, 2, device=DEV, requires_grad=True)
    for x, dy in ((x1, dy1), (x2, dy2)):
        layer_norm_per_example(x, w, b, EPS, sink).backward(dy)
    r1 = layer_norm_per_example_reference(x1, w.detach(), b.detach(), EPS, dy1)
    r2 = layer_norm_per_example_reference(x2, w.detach(), b.detach(), EPS, dy2)
    torch.testing.assert_close(sink.grad[:, 0], r1[4] + r2[4], rtol=1e-5, atol=0)
    torch.testing.assert_close(sink.grad[:, 1], r1[5] + r2[5], rtol=1e-5, atol=0)
    torch.testing.assert_close(w.grad, r1[2] + r2[2], rtol=1e-5, atol=1e-5)


def test_sink_is_optional_and_checked():
    x, w, b, dy = make((2, 3, 7))
    y, dx, dw, db, _ = run_op(x, w, b, dy, sink=False)
    ry, rdx, rdw, rdb, _, _ = layer_norm_per_example_reference(x, w, b, EPS, dy)
    assert rel(dx, rdx) < 1e-5 and rel(db, rdb) < 1e-5
    with pytest.raises(ValueError, match="sink"):
        layer_norm_per_example(x, w, b, EPS, torch.zeros(2, 1, device=DEV, requires_grad=True))


def test_module_behaves_like_nn_layer_norm():
    torch.manual_seed(0)
    ours, ref = TritonLayerNorm(33).to(DEV), torch.nn.LayerNorm(33).to(DEV)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), ref.parameters()):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    x = torch.randn(3, 5, 33, device=DEV)
    dy = torch.randn(3, 5, 33, device=DEV)
    ours(x).backward(dy)
    ref(x).backward(dy)
    assert rel(ours.weight.grad, ref.weight.grad) < 1e-5 and rel(ours.bias.grad, ref.bias.grad) < 1e-5
    r = layer_norm_per_example_reference(x, ref.weight.detach(), ref.bias.detach(), 1e-5, dy)
    torch.testing.assert_close(ours.last_sink.grad, torch.stack([r[4], r[5]], 1), rtol=1e-5, atol=0)
    assert TritonLayerNorm(8, bias=False).to(DEV)(torch.randn(2, 8, device=DEV)).shape == (2, 8)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels and the autograd registration, as torch.library checks them."""
    x, w, b, dy = make((2, 3, 7))
    sink = torch.zeros(2, 2, device=DEV, requires_grad=True)
    torch.library.opcheck(
        torch.ops.gnsrepro.layer_norm_pe_fwd.default, (x.requires_grad_(), None, w.requires_grad_(), b, sink, EPS, None)
    )
    torch.library.opcheck(torch.ops.gnsrepro.layer_norm_pe_fwd.default, (x, None, w, b, sink, EPS, torch.bfloat16))
    _, stats, _ = K.layer_norm_forward(x.detach(), w.detach(), b, EPS)
    bwd = torch.ops.gnsrepro.layer_norm_pe_bwd.default
    torch.library.opcheck(bwd, (dy, None, x.detach(), w.detach(), b, stats, None))
    torch.library.opcheck(bwd, (dy, None, x.detach(), w.detach(), None, stats, None))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_custom_op_path_matches_autograd_function_path(bias):
    """Eager calls use the autograd.Function, compiled graphs the custom ops: both give the same."""
    x, w, b, dy = make((2, 5, 33), bias=bias)
    outs = []
    for fn in (layer_norm_per_example, K.layer_norm_per_example_op):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = b.clone().requires_grad_() if bias else None
        sink = torch.zeros(2, 2 if bias else 1, device=DEV, requires_grad=True)
        fn(xs, ws, bs, EPS, sink).backward(dy)
        outs.append([xs.grad, ws.grad, sink.grad] + ([bs.grad] if bias else []))
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["function", "custom_op"])
def test_out_dtype_equals_casting_the_fp32_output(op):
    """y written in bf16 from fp32 x is y.to(bf16); a bf16 dy gives the same grads as its fp32 upcast."""
    fn = layer_norm_per_example if op == "function" else K.layer_norm_per_example_op
    x, w, b, dy = make((3, 5, 33))
    dy = dy.to(torch.bfloat16)
    grads = []
    for out_dtype in (None, torch.bfloat16):
        xs, ws, bs = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        sink = torch.zeros(3, 2, device=DEV, requires_grad=True)
        y = fn(xs, ws, bs, EPS, sink, out_dtype=out_dtype)
        if out_dtype is None:
            y_ref = y.detach().to(torch.bfloat16)
            y = y.to(torch.bfloat16)  # what a Linear under autocast does with an fp32 input
        else:
            assert y.dtype == torch.bfloat16
            # the GPU rounds to nearest even like torch; the CPU interpreter truncates (1 bf16 ulp)
            ulp = 2.0**-7 if os.environ.get("TRITON_INTERPRET") == "1" else 0.0
            torch.testing.assert_close(y.detach(), y_ref, rtol=ulp, atol=0)
        y.backward(dy)
        assert xs.grad.dtype == torch.float32
        grads.append([xs.grad, ws.grad, bs.grad, sink.grad])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def check_residual_against_unfused(shape, r_dtype, use_s, fn, device=DEV, scales=None):
    """Fused (y, s) = (LN(x + r), x + r) against torch's add then F.layer_norm, and the reference norms.

    The loss reads y through dy and, when use_s, s through ds (the next block's residual input).
    """
    x, w, b, dy = make(shape, scales=scales, device=device)
    r = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2).to(device=device, dtype=r_dtype)
    ds = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device) if use_s else None
    grads = []
    for fused in (True, False):
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        sink = torch.zeros(shape[0], 2, device=device, requires_grad=True)
        if fused:
            y, s = fn(xs, ws, bs, EPS, sink, residual=rs)
        else:
            s = xs + rs
            y = F.layer_norm(s, (shape[-1],), ws, bs, EPS)
        assert s.dtype == torch.promote_types(x.dtype, r_dtype)
        loss = (y * dy).sum() + ((s * ds).sum() if use_s else 0)
        loss.backward()
        grads.append((y.detach(), s.detach(), xs.grad, rs.grad, ws.grad, bs.grad, sink.grad))
    (y, s, gx, gr, gw, gb, sq), (ry, rs_, rgx, rgr, rgw, rgb, _) = grads
    torch.testing.assert_close(s, rs_, rtol=0, atol=0)  # the add in fp32, rounded once: as torch
    assert gx.dtype == x.dtype and gr.dtype == r_dtype
    assert rel(y, ry) < 1e-5 and rel(gx, rgx) < 1e-5 and rel(gw, rgw) < 1e-5 and rel(gb, rgb) < 1e-5
    assert rel(gr, rgr) < (1e-5 if r_dtype == torch.float32 else TOL_VS_TORCH[r_dtype])
    _, _, _, _, rsw, rsb = layer_norm_per_example_reference(rs_, w, b, EPS, dy)
    assert rel(sq[:, 0], rsw) < 1e-5 and rel(sq[:, 1], rsb) < 1e-5


@pytest.mark.parametrize("op", ["function", "custom_op"])
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16], ids=["r_fp32", "r_bf16"])
@pytest.mark.parametrize("use_s", [True, False], ids=["s_used", "s_unused"])
@pytest.mark.parametrize("shape", [(2, 13, 33), (5, 33)], ids=["3d", "2d"])
def test_fused_residual_add_matches_add_then_layer_norm(op, r_dtype, use_s, shape):
    fn = layer_norm_per_example if op == "function" else K.layer_norm_per_example_op
    check_residual_against_unfused(shape, r_dtype, use_s, fn, scales=[10.0 ** (i % 3 - 1) for i in range(shape[0])])


def test_fused_residual_without_bias_and_with_a_strided_residual():
    """A residual that is a transposed view (copied by the launcher) and a LayerNorm without bias."""
    x, w, _, dy = make((3, 7, 33), bias=False)
    r_t = torch.randn(3, 33, 7, device=DEV).requires_grad_()
    r = r_t.transpose(1, 2)  # (3, 7, 33), not contiguous
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    sink = torch.zeros(3, 1, device=DEV, requires_grad=True)
    y, s = layer_norm_per_example(xs, ws, None, EPS, sink, residual=r)
    (y * dy).sum().backward()
    xr, rr, wr = x.clone().requires_grad_(), r.detach().clone().requires_grad_(), w.clone().requires_grad_()
    yr = F.layer_norm(xr + rr, (33,), wr, None, EPS)
    (yr * dy).sum().backward()
    torch.testing.assert_close(s, (x + r).detach(), rtol=0, atol=0)
    assert rel(y, yr) < 1e-5 and rel(xs.grad, xr.grad) < 1e-5 and rel(ws.grad, wr.grad) < 1e-5
    assert rel(r_t.grad.transpose(1, 2), rr.grad) < 1e-5
    _, _, _, _, rsw, _ = layer_norm_per_example_reference((x + r).detach(), w, None, EPS, dy)
    assert rel(sink.grad[:, 0], rsw) < 1e-5


def test_residual_of_another_shape_is_refused():
    x, w, b, _ = make((2, 3, 8))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        layer_norm_per_example(x, w, b, EPS, None, residual=torch.zeros(2, 8, device=DEV))


def test_custom_ops_with_residual_pass_opcheck():
    x, w, b, dy = make((2, 3, 7))
    r = torch.randn(2, 3, 7, device=DEV).to(torch.bfloat16)
    sink = torch.zeros(2, 2, device=DEV, requires_grad=True)
    torch.library.opcheck(
        torch.ops.gnsrepro.layer_norm_pe_fwd.default,
        (x.requires_grad_(), r.requires_grad_(), w.requires_grad_(), b, sink, EPS, torch.bfloat16),
    )
    _, stats, s = K.layer_norm_forward(x.detach(), w.detach(), b, EPS, residual=r.detach())
    ds = torch.randn_like(s)
    torch.library.opcheck(
        torch.ops.gnsrepro.layer_norm_pe_bwd.default, (dy, ds, s, w.detach(), b, stats, torch.bfloat16)
    )


def test_torch_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(33, 33)
            self.ln = TritonLayerNorm(33)

        def forward(self, x, sink):
            return self.ln(self.lin(x), sink).square().mean()

    torch.manual_seed(0)
    net = Net().to(DEV)
    x = torch.randn(3, 5, 33, device=DEV)
    sink = torch.zeros(3, 2, device=DEV, requires_grad=True)
    assert torch._dynamo.explain(net)(x, sink).graph_break_count == 0
    compiled = torch.compile(net, fullgraph=True)
    compiled(x, sink).backward()
    got = (sink.grad.clone(), net.lin.weight.grad.clone())
    net.zero_grad()
    sink_eager = torch.zeros(3, 2, device=DEV, requires_grad=True)
    net(x, sink_eager).backward()
    torch.testing.assert_close(got[0], sink_eager.grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1], net.lin.weight.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.fixture(params=["base", "nopdl_depth2", "tail_pipelined"])
def launch_variant(request, monkeypatch):
    """Each GPU test three times: the tuned launch table as it is (with programmatic dependent launch);
    without PDL and with two tiles loaded ahead in registers (reduce kernel); the loads pipelined through
    shared memory and the tail reduction at every shape (not only where it is the faster choice), over
    three levels where the table says two and two where it says three."""
    cfg = {
        "base": dict(),
        "nopdl_depth2": dict(depth=2, tail=False),
        "tail_pipelined": dict(stages=3, tail=True),
    }[request.param]
    flip = request.param == "tail_pipelined"
    monkeypatch.setattr(K, "PDL", request.param != "nopdl_depth2")
    monkeypatch.setattr(K, "_BWD_CONFIG", {
        k: c._replace(**cfg, **({"tail_sub": not c.tail_sub} if flip else {})) for k, c in K._BWD_CONFIG.items()
    })
    if cfg.get("tail"):
        monkeypatch.setattr(K, "_TAIL_MAX_BYTES", 1 << 40)
    K._bwd_launch.cache_clear()
    request.addfinalizer(K._bwd_launch.cache_clear)
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("N", [768, 999, 1000, 2048, 4096, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gpu_matches_torch_and_reference(N, dtype, launch_variant):
    scales = [1e3, 1.0, 1e-3, 10.0]
    check_against_torch_and_reference(*make((4, 257, N), dtype, scales=scales, device="cuda"))  # chunked examples
    check_against_torch_and_reference(*make((4, 3, N), dtype, bias=False, scales=scales, device="cuda"))
    check_against_torch_and_reference(*make((1000, N), dtype, scales=[1e2, 1e-2] * 500, device="cuda"))  # 2-D


@pytest.mark.gpu
@pytest.mark.parametrize("N", [768, 1000, 4096])
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16], ids=["r_fp32", "r_bf16"])
def test_gpu_fused_residual_add(N, r_dtype, launch_variant):
    for op in (layer_norm_per_example, K.layer_norm_per_example_op):
        check_residual_against_unfused((4, 257, N), r_dtype, True, op, device="cuda", scales=[1e2, 1.0, 1e-2, 10.0])
        check_residual_against_unfused((300, N), r_dtype, False, op, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_weight_in_input_dtype_and_many_examples(dtype, launch_variant):
    x, w, b, dy = make((600, 5, 768), dtype, device="cuda")  # one program owns several whole examples
    check_against_torch_and_reference(x, w.to(dtype), b.to(dtype), dy)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [768, 2048])
def test_gpu_benchmark_shape_matches_torch_and_repeats_bitwise(N, launch_variant):
    x, w, b, dy = make((8, 2048, N), torch.bfloat16, device="cuda")
    check_against_torch_and_reference(x, w, b, dy)
    # a race in a last-program count (reduce kernel or tail reduction) would show as runs that differ
    _, stats, _ = K.layer_norm_forward(x, w, b, EPS)
    first = K.layer_norm_backward(dy, x, w, b, stats)
    for _ in range(20):
        again = K.layer_norm_backward(dy, x, w, b, stats)
        for a, c in zip(first[:4], again[:4]):
            assert torch.equal(a, c)
    assert not K._counters(x.device, 1).any()
    # the same calls replayed from a CUDA graph (how the benchmark times them) give the same bits
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        K.layer_norm_backward(dy, x, w, b, stats)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        y_g, stats_g, _ = K.layer_norm_forward(x, w, b, EPS)
        out_g = K.layer_norm_backward(dy, x, w, b, stats_g)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(stats_g, stats)
        for a, c in zip(first[:4], out_g[:4]):
            assert torch.equal(a, c)
    assert not K._counters(x.device, 1).any()
    cfg = K._bwd_config(K._next_pow2(N), 2)
    target = K._target_programs(x.device, cfg.per_sm)
    plan = K._bwd_launch(8, 2048, N, True, target, cfg.block_m, cfg.num_warps, cfg.tail, cfg.depth, cfg.stages,
                         cfg.maxnreg, -1 if cfg.tail_sub else 0)
    if launch_variant == "tail_pipelined":  # the tail reduction did run at this shape, and its middle level
        assert plan.reduce is None and (plan.NSG > 0) == cfg.tail_sub  # where the variant has one
    if launch_variant == "base" and N == 768 and target == 264:  # 132 SMs: three levels of 4, 8, 8 rows
        assert plan.reduce is None and (plan.GP, plan.NGRP, plan.SG, plan.NSG) == (32, 8, 4, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error message")
def test_benchmark_says_it_needs_cuda():
    from types import SimpleNamespace

    from gnsrepro.benchmarks.layernorm import run

    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run(SimpleNamespace(device="auto", out=None, steps=2, warmup=1))


def test_benchmark_runs_every_case_on_a_stub_device(monkeypatch, tmp_path):
    """`gnsrepro bench layernorm`'s bookkeeping on CPU: every size and dtype reaches the kernel (in the
    interpreter), with stand-ins for the CUDA timers (the graph timer counts its calls). The tuning tools'
    own checks are in tests/test_tuning.py."""
    from types import SimpleNamespace

    import gnsrepro.benchmarks.layernorm as L

    calls = []
    monkeypatch.setattr(L, "_device", lambda name="auto": torch.device("cpu"))
    monkeypatch.setattr(L, "graph_time_us", lambda f, steps, flush=None: calls.append(f()) or float(len(calls)))
    monkeypatch.setattr(L, "copy_bandwidth_gbps", lambda device, *a, **k: 1.0)
    monkeypatch.setattr(L, "BATCH", 2)
    monkeypatch.setattr(L, "SEQ", 8)
    monkeypatch.setattr(L, "time_us", lambda f, warmup, steps, flush=None: (f(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(multi_processor_count=2, name="stub"))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(16, dtype=torch.uint8) if a == (256 << 20,)
                        else real_empty(*a, **k))
    # the benchmark itself: a parquet row per size and dtype, with the backward's launch configuration
    monkeypatch.setattr(L, "SIZES", (34, 1000))
    monkeypatch.setattr(L, "stream_time_us", lambda f, steps, flush: calls.append(f()) or float(len(calls)))
    monkeypatch.setattr(L, "graph_launch_us", lambda device, flush: 3.0)
    out = tmp_path / "ln.parquet"
    table = L.run(SimpleNamespace(device="auto", out=str(out), steps=1, warmup=1))
    assert len(table) == 4 and out.exists()
    assert table.rel_err_sq.max() < 1e-5 and table.bwd_block_m.notna().all()
    # each row's (a) then (b): graph, graph, stream, stream calls of the stand-in timer, numbered
    assert (table.stream_torch_us == table.graph_torch_us + 2).all()
    assert (table.stream_ratio == table.stream_triton_us / table.stream_torch_us).all()
    assert (table.graph_launch_us == 3.0).all() and "sB%copy" in L.format_table(table)


def test_stream_time_is_the_call_less_the_flush(monkeypatch):
    """stream_time_us replays (flush, fn) and the flush alone; their difference is fn's time: here on a
    stand-in clock where the flush takes 85 µs and fn 55 µs, and capture replays the function itself."""
    from types import SimpleNamespace

    import gnsrepro.benchmarks.layernorm as L

    clock = [0.0]

    def tick(us):
        clock[0] += us

    def timed(f, warmup, steps, flush=None):
        start = clock[0]
        f()
        return clock[0] - start

    flush = SimpleNamespace(zero_=lambda: tick(85.0))
    monkeypatch.setattr(L, "capture", lambda f: SimpleNamespace(replay=f))
    monkeypatch.setattr(L, "time_us", timed)
    assert L.stream_time_us(lambda: tick(55.0), 5, flush) == 55.0

    def fail(f):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(L, "capture", fail)
    assert math.isnan(L.stream_time_us(lambda: tick(55.0), 5, flush))


def test_every_kernel_variant_compiles_for_sm90():
    """Lowering and ptxas for an H100, on any machine: what the interpreter cannot check (tests/sm90_compile.py).

    The pipelined variants must really use the compiler's asynchronous copies (that is their point), of
    16 bytes for 16-bit tensors where the shape allows, and the PDL variants the grid-dependency
    instructions: the wait before any load, the trigger for the next kernel after the main work.
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 60
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed[0]
    bwd = [r for r in rows if r["kind"] == "bwd"]
    assert {r["MODE"] for r in bwd} == {0, 1, 2} and {r["STAGES"] for r in bwd} == {0, 3}
    assert all(r["cp_async"] > 0 for r in bwd if r["STAGES"] > 0)
    assert all(r["cp_async"] == 0 for r in bwd if r["STAGES"] == 0)
    # 16-bit x and dy at the benchmark shape: their tiles come as 16-byte copies (4 words of 2 values)
    wide = [r for r in bwd if r["STAGES"] > 0 and r["x"] == r["dy"] != "fp32"]
    assert wide and all(r["cp_async16"] >= 2 * r["STAGES"] for r in wide)
    assert all(r["griddepcontrol"] == r["USE_PDL"] for r in rows)
    assert all(r["pdl_order"] for r in rows if r["USE_PDL"])
    assert {r["TAIL_SUB"] for r in bwd if r["TAIL_REDUCE"]} == {False, True}
