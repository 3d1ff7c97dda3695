"""`gnsrepro flashattn` and `figure=flashattn`: plain attention (model.attention=math) against
F.scaled_dot_product_attention in float64, forward and gradients; the experiment's pieces against explicit
formulas; the harness (two identical students stay identical, bit for bit); the command end to end on a CPU,
its idempotence and its one-line errors; the figure from a synthetic table."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gnsrepro.cli import conf_dir
from gnsrepro.config import OptimConfig, register_configs
from gnsrepro.errors import ConfigError
from gnsrepro.figures.flashattn import draw_flashattn, flashattn, flashattn_values
from gnsrepro.flashattn import (
    COLUMNS,
    TABLE_NAME,
    add_bias_noise,
    attention_logit_max,
    check_settings,
    distillation_loss,
    relative_distance,
    run_flashattn,
    teacher_scale,
    train_students,
)
from gnsrepro.model import GPT, GPTConfig, math_attention

REPO = Path(__file__).resolve().parent.parent
# odd shapes: 3 heads of 5 dimensions, 11 of a 13-token context, a vocabulary of 37
ODD = dict(block_size=13, vocab_size=37, n_layer=2, n_head=3, n_embd=15)
TINY = ["experiment=flashattn/tiny", "steps=3", "sigmas=[0,4]", "batch_size=2", "seq_len=16", "model.n_embd=32",
        "model.vocab_size=64"]


def flashattn_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("flashattn", overrides=list(overrides))


def twin_models(attentions: tuple[str, str], dtype=torch.float64, seed: int = 0, **shape) -> list[GPT]:
    """Two GPTs of one initialisation that differ only in model.attention."""
    torch.manual_seed(seed)
    first = GPT(GPTConfig(**{**ODD, **shape}, attention=attentions[0])).to(dtype)
    second = GPT(GPTConfig(**{**ODD, **shape}, attention=attentions[1])).to(dtype)
    second.load_state_dict(first.state_dict())
    return [first, second]


# ---- model.attention=math against sdpa ------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [None, 0.7])
def test_math_attention_equals_sdpa_in_float64(scale):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 5, dtype=torch.float64, generator=gen) * 3 for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    torch.testing.assert_close(math_attention(q, k, v, scale=scale), expected, rtol=1e-12, atol=1e-12)
    # the first query sees its own key only: its output is v's first row, exactly
    assert torch.equal(math_attention(q, k, v, scale=scale)[..., 0, :], v[..., 0, :])


@pytest.mark.parametrize("cosine", [(), (0,), (0, 1)])
def test_gpt_with_math_attention_equals_sdpa_forward_and_gradients(cosine):
    sdpa, plain = twin_models(("sdpa", "math"), cosine_attn_blocks=cosine)
    with torch.no_grad():  # biases of the size the experiment gives them: large logits, a near one-hot softmax
        for model in (sdpa, plain):
            add_bias_noise(model, 4.0, torch.Generator().manual_seed(1))
    x = torch.randint(0, ODD["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, ODD["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(3))
    (logits_a, loss_a), (logits_b, loss_b) = sdpa(x, y), plain(x, y)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    loss_a.backward()
    loss_b.backward()
    for (name, pa), pb in zip(sdpa.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_math_attention_under_bf16_autocast_computes_in_float32_and_returns_bf16():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = math_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    # the float32 result rounded once to bf16: within half a bf16 ulp (2^-9 relative) of the exact one
    torch.testing.assert_close(out.double(), reference, rtol=2**-8, atol=1e-6)


def test_default_attention_is_sdpa_and_an_unknown_one_is_refused():
    assert GPTConfig().attention == "sdpa" and flashattn_cfg().model.attention == "sdpa"
    with pytest.raises(ValueError, match="attention='flash' is not known; accepted: sdpa, math"):
        GPT(GPTConfig(**ODD, attention="flash"))
    from gnsrepro.settings import validate

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["model.attention=flash", "max_steps=1"])
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith("model.attention='flash' is not known; accepted: sdpa, math")


# ---- the experiment's pieces ------------------------------------------------------------------------------------
def test_bias_noise_touches_the_c_attn_biases_only_and_scales_one_draw():
    base = twin_models(("sdpa", "sdpa"), dtype=torch.float32, n_embd=48, n_head=4)[0].state_dict()
    noised = {}
    for sigma, noise in ((1.0, "qkv"), (3.0, "qkv"), (3.0, "qk")):
        model = GPT(GPTConfig(**{**ODD, "n_embd": 48, "n_head": 4}))
        model.load_state_dict(base)
        add_bias_noise(model, sigma, torch.Generator().manual_seed(7), noise)
        noised[(sigma, noise)] = model.state_dict()
    for key, value in base.items():
        changed = {k: s[key] - value for k, s in noised.items()}
        if not key.endswith("attn.c_attn.bias"):
            assert all(torch.equal(d, torch.zeros_like(d)) for d in changed.values()), key
            continue
        torch.testing.assert_close(changed[(3.0, "qkv")], 3 * changed[(1.0, "qkv")], rtol=1e-5, atol=1e-5)
        assert torch.equal(changed[(3.0, "qk")][:96], changed[(3.0, "qkv")][:96])  # query and key thirds
        assert torch.equal(changed[(3.0, "qk")][96:], torch.zeros(48))  # the value third untouched
    one = noised[(1.0, "qkv")]
    draws = torch.cat([one[k] - base[k] for k in base if k.endswith("c_attn.bias")])
    assert len(draws) == 2 * 144 and abs(float(draws.std()) - 1.0) < 0.15  # 288 draws of N(0, 1)


def test_attention_logits_grow_with_sigma_and_cosine_attention_bounds_them():
    x = torch.randint(0, ODD["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    largest = {}
    for cosine in ((), (0, 1)):
        for sigma in (0.0, 4.0, 16.0):
            model = twin_models(("sdpa", "sdpa"), dtype=torch.float32, cosine_attn_blocks=cosine)[0]
            add_bias_noise(model, sigma, torch.Generator().manual_seed(1))
            largest[(cosine, sigma)] = attention_logit_max(model, x)
    hs = ODD["n_embd"] // ODD["n_head"]
    # b_q·b_k / sqrt(hs) with biases of std sigma: of order sigma², far above an init's logits (~0.1)
    assert largest[((), 0.0)] < 1 < largest[((), 4.0)] < largest[((), 16.0)]
    assert largest[((), 16.0)] > 16.0**2 / 4
    # unit q, k at scale sqrt(hs): |logit| <= sqrt(hs) whatever sigma
    assert all(largest[((0, 1), s)] <= math.sqrt(hs) * (1 + 1e-6) for s in (0.0, 4.0, 16.0))


def test_distillation_loss_is_the_kl_divergence_and_the_scale_sets_the_logit_spread():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(4, 6, 9, generator=gen, dtype=torch.float64), torch.randn(4, 6, 9, generator=gen,
                                                                                              dtype=torch.float64)
    p, q = teacher.softmax(-1).numpy(), student.softmax(-1).numpy()
    expected = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))
    loss = distillation_loss(student, teacher.log_softmax(-1))
    assert float(loss) == pytest.approx(expected, rel=1e-12) and float(loss) > 0
    assert float(distillation_loss(teacher, teacher.log_softmax(-1))) == pytest.approx(0, abs=1e-15)
    assert distillation_loss(student.float(), teacher.float().log_softmax(-1)).dtype == torch.float32

    model = twin_models(("sdpa", "sdpa"))[0]
    x = torch.randint(0, ODD["vocab_size"], (3, 11), generator=gen)
    c = teacher_scale(model, x, 2.0)
    with torch.no_grad():
        z = c * model(x, x)[0]
    assert float((z - z.mean(-1, keepdim=True)).std()) == pytest.approx(2.0, rel=1e-9)


def test_relative_distance_of_parameter_sets():
    a, b = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    flat_a = torch.cat([p.detach().reshape(-1) for p in a.parameters()])
    flat_b = torch.cat([p.detach().reshape(-1) for p in b.parameters()])
    assert relative_distance(a, b) == pytest.approx(float((flat_a - flat_b).norm() / flat_b.norm()), rel=1e-12)
    assert relative_distance(a, a) == 0.0


# ---- the harness --------------------------------------------------------------------------------------------------
def students_run(attentions, sigma=0.0, steps=6, dtype=torch.float32, divergence_loss=math.inf):
    torch.manual_seed(10)
    teacher = GPT(GPTConfig(**ODD))
    add_bias_noise(teacher, sigma, torch.Generator().manual_seed(11))
    students = twin_models(attentions, dtype=torch.float32, seed=12)
    gen = torch.Generator().manual_seed(13)
    batches = [torch.randint(0, ODD["vocab_size"], (2, 11), generator=gen) for _ in range(steps)]
    optim = OmegaConf.structured(OptimConfig(lr=1e-2, warmup_tokens=30))
    scale = teacher_scale(teacher, batches[0], 2.0)
    rows = train_students(teacher, students, batches, optim, scale, dtype, divergence_loss)
    return rows, students, (teacher, scale, batches[0])


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_two_students_of_one_attention_stay_identical(attention):
    rows, students, (teacher, scale, x) = students_run((attention, attention))
    assert len(rows) == 12 and list(rows["step"]) == [s for s in range(1, 7) for _ in range(2)]
    assert (rows["distance"] == 0.0).all()  # exactly: the harness adds no difference of its own
    first, second = rows[rows["student"] == 0], rows[rows["student"] == 1]
    assert first["loss"].tolist() == second["loss"].tolist()
    assert first["grad_norm"].tolist() == second["grad_norm"].tolist()
    assert not rows["diverged"].any()
    with torch.no_grad():  # it learns: the first batch's loss, logged before the first update, has come down
        after = distillation_loss(students[0](x, x)[0], F.log_softmax(scale * teacher(x, x)[0], dim=-1))
    assert float(after) < 0.95 * first["loss"].iloc[0]
    # the learning rate follows the project's warm-up (30 tokens = about 1.4 steps of 22) and linear decay
    from gnsrepro.train import lr_at

    optim = OmegaConf.structured(OptimConfig(lr=1e-2, warmup_tokens=30))
    np.testing.assert_allclose(first["lr"], [lr_at(22 * s, optim, 6 * 22) for s in range(6)], rtol=1e-12)


def test_math_and_sdpa_students_differ_by_rounding_in_float32():
    rows, students, _ = students_run(("sdpa", "math"), sigma=4.0)
    distance = rows.loc[rows["student"] == 0, "distance"].to_numpy()
    assert np.isfinite(distance).all() and distance[-1] > 0 and distance.max() < 1e-4
    assert distance[-1] == pytest.approx(relative_distance(*students), rel=1e-12)
    assert list(rows.loc[rows["student"] == 0, "attention"].unique()) == ["sdpa"]
    assert list(rows.loc[rows["student"] == 1, "attention"].unique()) == ["math"]


def test_a_diverged_student_stops_and_the_distance_is_nan_from_then_on():
    rows, _, _ = students_run(("sdpa", "math"), divergence_loss=1e-12)  # every loss is above it: step 1 diverges
    assert len(rows) == 2 and rows["diverged"].all() and set(rows["step"]) == {1}
    assert rows["distance"].isna().all()


# ---- the command ----------------------------------------------------------------------------------------------------
def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gnsrepro", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_command_writes_the_table_keeps_it_and_reruns_with_force(tmp_path, capsys):
    out = tmp_path / "fa"
    r = run_cli(["flashattn", *TINY, f"out_dir={out}", "sigmas=0,4"])  # the CLI's bare comma list is a list
    assert r.returncode == 0, r.stderr
    assert "sigma=4: teacher's attention logits up to" in r.stdout and "    math: 3 steps" in r.stdout
    table = pd.read_parquet(out / TABLE_NAME)
    assert list(table.columns) == list(COLUMNS) and len(table) == 2 * 2 * 3
    assert set(table["sigma"]) == {0.0, 4.0} and set(table["attention"]) == {"sdpa", "math"}
    assert sorted(set(table["step"])) == [1, 2, 3] and not table["diverged"].any()
    assert table.groupby("sigma")["teacher_logit_max"].nunique().eq(1).all()
    assert (table["distance"] > 0).all() and (table["distance"] < 1e-4).all()  # float32 on a CPU: rounding
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.steps == 3 and saved.model.n_embd == 32 and "force" not in saved
    assert (out / "meta.json").is_file()

    # the same settings in-process: kept, not run; force=true runs them again, to the same numbers
    kept = run_flashattn(flashattn_cfg(*TINY, f"out_dir={out}"))
    assert "kept (force=true runs it again)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(kept, table)
    again = run_flashattn(flashattn_cfg(*TINY, f"out_dir={out}", "force=true"))
    assert "wrote" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, table)
    # other settings in the same out_dir: run, not kept
    run_flashattn(flashattn_cfg(*TINY, f"out_dir={out}", "sigmas=[1]"))
    assert set(pd.read_parquet(out / TABLE_NAME)["sigma"]) == {1.0}

    # the figure through the CLI reads that directory
    from gnsrepro.figures import run_plot

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("plot", overrides=["figure=flashattn", f"run=[{out}]", f"out={tmp_path / 'fig'}"])
    paths = run_plot(cfg)
    assert tmp_path / "fig.png" in paths and (tmp_path / "fig.png").stat().st_size > 1000


@pytest.mark.parametrize("override, message", [
    ("sigmas=[-1]", "sigmas=[-1.0] must be a non-empty list of distinct numbers >= 0"),
    ("sigmas=[]", "sigmas=[] must be a non-empty list"),
    ("student_init=copy", "student_init='copy' is not known; accepted: noisy"),
    ("noise=v", "noise='v' is not known; accepted: qkv"),
    ("steps=0", "steps=0 must be a positive integer"),
    ("teacher_logit_std=0", "teacher_logit_std=0.0 must be a positive number"),
    ("divergence_loss=-1", "divergence_loss=-1.0 must be a positive number"),
    ("model.attention=flash", "model.attention='flash' is not known; accepted: sdpa, math"),
    ("model.dropout=0.1", "model.dropout=0.1 must be 0"),
    ("model.bias=false", "model.bias=false: the experiment adds its noise"),
    ("seq_len=1000", "seq_len=1000 is longer than the model's context model.block_size=128"),
    ("optim.lr=0", "optim.lr=0.0 must be a positive number"),
    ("dtype=fp16", "dtype='fp16' is not known; accepted: auto, float32, bfloat16"),
])
def test_bad_settings_are_one_line_errors_before_any_work(override, message, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as refused:
        run_flashattn(flashattn_cfg(*TINY, f"out_dir={out}", override))
    assert "\n" not in str(refused.value) and message in str(refused.value), str(refused.value)
    assert not out.exists()


def test_cli_error_is_one_line_and_both_experiments_pass_their_checks(tmp_path):
    r = run_cli(["flashattn", *TINY, f"out_dir={tmp_path / 'x'}", "sigmas=-1"])
    assert r.returncode == 2 and not (tmp_path / "x").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gnsrepro flashattn: error: sigmas=[-1.0] must be"), r.stderr
    for scale in ("tiny", "small"):
        plan = check_settings(flashattn_cfg(f"experiment=flashattn/{scale}"))
        assert plan.out == Path(f"outputs/flashattn/{scale}") and plan.sigmas[0] == 0.0
        assert plan.divergence_loss == pytest.approx(math.log(flashattn_cfg(f"experiment=flashattn/{scale}")
                                                              .model.vocab_size))


# ---- the figure ---------------------------------------------------------------------------------------------------
def synthetic_flashattn_dir(path: Path) -> pd.DataFrame:
    """A flashattn out_dir with known numbers: sigmas 0 and 8, 5 steps; the math student of sigma 8 diverges at
    step 4 (non-finite loss) and stops, the distance NaN from there; the distance of step 1 at sigma 0 is 0."""
    rows = []
    for sigma in (8.0, 0.0):  # written out of order: the figure sorts
        for attention in ("math", "sdpa"):
            for step in range(1, 6):
                diverged = sigma == 8.0 and attention == "math" and step == 4
                if sigma == 8.0 and attention == "math" and step > 4:
                    continue
                distance = math.nan if sigma == 8.0 and step >= 4 else (step - 1) * 10.0 ** (-6 + sigma / 4)
                rows.append({"sigma": sigma, "attention": attention, "step": step, "lr": 1e-3,
                             "loss": math.inf if diverged else 1.0 / step + sigma, "grad_norm": 0.5,
                             "distance": distance, "diverged": diverged, "teacher_logit_max": 0.1 + sigma**2})
    table = pd.DataFrame(rows)[list(COLUMNS)]
    path.mkdir(parents=True)
    table.to_parquet(path / TABLE_NAME, index=False)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(flashattn_cfg("experiment=flashattn/"
                                                                                            "tiny"))))
    (path / "meta.json").write_text('{"device": "cpu", "dtype": "float32", "device_type": "cpu"}')
    return table


def test_figure_renders_and_plots_the_table(tmp_path):
    table = synthetic_flashattn_dir(tmp_path / "run")
    paths = flashattn(tmp_path / "run", tmp_path / "fig")
    for suffix in (".png", ".pdf", ".parquet"):
        assert tmp_path / f"fig{suffix}" in paths and (tmp_path / f"fig{suffix}").stat().st_size > 1000
    values = pd.read_parquet(tmp_path / "fig.parquet")
    assert list(zip(values["sigma"], values["attention"]))[::5][:4] == [(0.0, "sdpa"), (0.0, "math"), (8.0, "sdpa"),
                                                                       (8.0, "math")]
    assert len(values) == len(table) == 19

    fig = draw_flashattn(flashattn_values(table), "title")
    loss_ax, dist_ax = fig.axes
    loss = {line.get_label(): line for line in loss_ax.get_lines()}
    np.testing.assert_allclose(loss["σ=0 sdpa"].get_ydata(), 1.0 / np.arange(1, 6))
    assert loss["σ=0 sdpa"].get_linestyle() == "-" and loss["σ=0 math"].get_linestyle() == "--"
    np.testing.assert_allclose(loss["σ=8 math"].get_ydata(), [9.0, 8.5, 8 + 1 / 3, np.nan])  # inf: not drawn
    cross = loss["σ=8 math diverged"]
    assert list(cross.get_xdata()) == [4] and cross.get_ydata()[0] == pytest.approx(9.0)  # at the top finite loss
    assert "σ=0 sdpa diverged" not in loss
    dist = {line.get_label().split(" ")[0]: line for line in dist_ax.get_lines()}
    # a distance of 0 has no place on the log axis: NaN, like the diverged steps
    np.testing.assert_allclose(dist["σ=0"].get_ydata(), [np.nan, 1e-6, 2e-6, 3e-6, 4e-6], rtol=1e-12)
    np.testing.assert_allclose(dist["σ=8"].get_ydata(), [np.nan, 1e-4, 2e-4, np.nan, np.nan], rtol=1e-12)
    assert dist_ax.get_yscale() == "log" and "teacher's attention logits ≤ 64.1" in dist["σ=8"].get_label()


def test_figure_input_errors_are_one_line(tmp_path):
    from gnsrepro.figures import check_inputs

    (tmp_path / "empty").mkdir()
    for runs, message in (([str(tmp_path / "nope")], "does not exist"),
                          ([str(tmp_path / "empty")], f"has no {TABLE_NAME}; `gnsrepro flashattn out_dir="),
                          ([], "takes one directory of `gnsrepro flashattn`")):
        with pytest.raises(ConfigError, match=message):
            check_inputs("flashattn", runs, None)
