"""benchmarks/plain_gpt.py: the plain nanoGPT-shaped reference is the same function as gnsrepro's GPT, so their
step times compare at one FLOP count, and the tool runs end to end (on a CPU, eagerly)."""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks.plain_gpt import PlainGPT, compare, model_config, ours_flops_per_token
from gnsrepro.model import GPT, gpt_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_plain_model_has_gnsrepros_parameters(name):
    c = model_config(name)
    with torch.device("meta"):
        ours, plain = GPT(gpt_config(c)), PlainGPT(c)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    plain_shapes = {k: v.shape for k, v in plain.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    assert plain_shapes == shapes
    assert sum(p.numel() for p in plain.parameters()) == ours.num_params()


def test_plain_model_computes_gnsrepros_loss_and_gradients():
    torch.manual_seed(0)
    c = model_config("tiny")
    c.n_layer, c.vocab_size = 3, 101  # odd sizes
    ours = GPT(gpt_config(c)).double()
    plain = PlainGPT(c).double()
    plain.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randint(0, c.vocab_size, (3, 37))
    y = torch.randint(0, c.vocab_size, (3, 37))
    loss = ours(x, y)[1]
    plain_loss = plain(x, y)
    torch.testing.assert_close(plain_loss, loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    plain_loss.backward()
    theirs = dict(plain.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(theirs[k].grad, p.grad, rtol=1e-10, atol=1e-12, msg=k)


def test_compare_times_each_variant_interleaved_on_a_cpu():
    rows = compare("tiny", 16, 2, ["gnsrepro no graphs", "plain"], steps=2, rounds=2, warmup=1,
                   device=torch.device("cpu"), compile=False)
    assert [r["variant"] for r in rows] == ["gnsrepro no graphs", "plain"]
    for r in rows:
        assert r["ms"] > 0 and 0 <= r["spread_ms"] and math.isnan(r["mfu"])  # no datasheet peak for a CPU
    c = model_config("tiny")
    assert ours_flops_per_token(c, 16) == GPT(gpt_config(c)).flops_per_token(16)


def test_coordinate_descent_variant_compiles_under_its_inductor_option(monkeypatch):
    """The option is set while the variant is built and warmed up (when inductor compiles), and only then."""
    from torch._inductor import config as inductor_config

    import benchmarks.plain_gpt as P

    seen = []
    real = P.ours_step

    def recording(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(x, y):
            seen.append(inductor_config.coordinate_descent_tuning)
            return step(x, y)

        wrapped.model = step.model
        return wrapped

    monkeypatch.setattr(P, "ours_step", recording)
    before = inductor_config.coordinate_descent_tuning
    compare("tiny", 16, 2, ["gnsrepro no graphs", "gnsrepro coordinate descent"], steps=1, rounds=1, warmup=2,
            device=torch.device("cpu"), compile=False)
    # warm-up calls: 2 without the option, 2 with it; then the timed calls, outside any patch
    assert seen[:4] == [before, before, True, True] and seen[4:] == [before, before]
    assert inductor_config.coordinate_descent_tuning == before


def test_command_line_writes_its_table(tmp_path):
    out = tmp_path / "plain.csv"
    done = subprocess.run([sys.executable, "-m", "benchmarks.plain_gpt", "--situations", "tiny:16:2", "--device", "cpu",
                           "--eager", "--steps", "1", "--rounds", "1", "--warmup", "1",
                           "--variants", "gnsrepro no graphs,plain", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out)
    assert list(table.variant) == ["gnsrepro no graphs", "plain"] and (table.ms > 0).all()
    bad = subprocess.run([sys.executable, "-m", "benchmarks.plain_gpt", "--variants", "plain,fast"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown variant(s) ['fast']" in bad.stderr
