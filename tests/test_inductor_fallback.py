"""gnsrepro.kernels.brief_inductor_fallback_log: inductor's message about a custom op is short and prints no IR."""

import logging

import pytest
import torch
from torch._inductor import exc

from gnsrepro.kernels import brief_inductor_fallback_log


@pytest.fixture
def brief_log(monkeypatch):
    """The patch applied for one test, then the original operator_str back."""
    monkeypatch.setattr(exc.OperatorIssue, "operator_str", exc.OperatorIssue.__dict__["operator_str"])
    brief_inductor_fallback_log()


class _NoStr:
    """An argument whose str() must not be taken (as the IR behind a deep graph)."""

    def __str__(self):
        raise AssertionError("str() of an argument")

    __repr__ = __str__


def test_message_names_arguments_without_str(brief_log):
    err = exc.MissingOperatorWithoutDecomp("gnsrepro::op", [_NoStr(), 3, torch.float32, None, [1, 2.5]], {"eps": 1e-5})
    msg = str(err)
    assert "args[0]: _NoStr" in msg
    assert "args[1]: 3" in msg and "args[2]: torch.float32" in msg and "args[3]: None" in msg
    assert "args[4]: [1, 2.5]" in msg and "kwargs: {eps: 1e-05}" in msg


def _compiled_fallback_lines(compiled, args, caplog):
    """(compiled(*args), inductor's "Creating implicit fallback" lines), compiled afresh with its log at INFO (so that
    the line is built, as torch 2.11 builds it at any level) and without the FX graph cache (a cached graph skips the
    lowering)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), caplog.at_level(logging.INFO, "torch._inductor.graph"):
        out = compiled(*args)
    return out, [r.getMessage() for r in caplog.records if "Creating implicit fallback for" in r.getMessage()]


@torch.library.custom_op("gnsrepro_test::scaled", mutates_args=())
def _scaled(x: torch.Tensor, s: float) -> torch.Tensor:
    return x * s


@_scaled.register_fake
def _(x, s):
    return torch.empty_like(x)


def test_compiled_custom_op_logs_buffer_names(brief_log, caplog):
    """A custom op inductor falls back to, fed by a chain of pointwise ops: same values as eager, and the
    fallback's log line names the argument's buffer, dtype and size."""

    def f(x):
        y = x
        for k in range(12):
            y = torch.sin(y) * 1.5 + y * 0.25 + k  # a long pointwise chain ahead of the op
        return torch.ops.gnsrepro_test.scaled(y, 2.0) + 1.0

    x = torch.randn(5, 7)
    got, lines = _compiled_fallback_lines(torch.compile(f, backend="inductor", fullgraph=True), (x,), caplog)
    torch.testing.assert_close(got, f(x))
    assert lines, "inductor did not log the fallback"
    assert "gnsrepro_test.scaled" in lines[0]
    assert "  args[0]: TensorBox(torch.float32, size=[5, 7])\n" in lines[0]  # not yet a buffer: no name
    assert lines[0].endswith("  args[1]: 2.0")


def _fallback_messages(model_cfg, caplog) -> list[str]:
    """The fallback lines inductor logs compiling a GPT's forward with the Triton LayerNorm and loss (on a CPU
    through Triton's interpreter, tests/conftest.py)."""
    from gnsrepro.config import GNSConfig
    from gnsrepro.train import build_model

    torch.manual_seed(0)
    model, collector = build_model(model_cfg, GNSConfig(mode="ln", ln_backend="triton"), torch.device("cpu"))
    collector.attach(2)
    idx = torch.randint(0, model_cfg.vocab_size, (2, 16))
    return _compiled_fallback_lines(torch.compile(model), (idx, idx), caplog)[1]


def test_gpt_with_triton_layernorm_and_loss_compiles_with_short_messages(brief_log, caplog):
    """The case that hung: the loss op's argument (the logits) sits behind every layer's LayerNorm op, and the
    unbounded message prints that IR as a tree, each op reached through both its outputs (y and the residual
    stream s): 0.7 MB at 2 layers, 17 MB at 4, more than 360 MB at 6 (torch 2.13 on a CPU, measured 2026-12-04)."""
    from gnsrepro.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, n_layer=4, n_embd=32, n_head=2, block_size=16, loss_kernel="triton")
    messages = _fallback_messages(cfg, caplog)
    ops = {line.split("target: ")[1].split("\n")[0] for line in messages}
    assert {"gnsrepro.layer_norm_pe_fwd.default", "gnsrepro.cross_entropy_lse.default"} <= ops
    assert max(len(m) for m in messages) < 1000


def test_compiled_training_step_applies_it(monkeypatch):
    from gnsrepro.config import GNSConfig, ModelConfig, OptimConfig
    from gnsrepro.kernels import _brief_operator_str
    from gnsrepro.train import build_step

    monkeypatch.setattr(exc.OperatorIssue, "operator_str", exc.OperatorIssue.__dict__["operator_str"])
    build_step(ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=16), GNSConfig(mode="ln"),
               OptimConfig(), torch.device("cpu"), torch.float32, compile=True)  # torch.compile is lazy: nothing runs
    assert exc.OperatorIssue.operator_str is _brief_operator_str
