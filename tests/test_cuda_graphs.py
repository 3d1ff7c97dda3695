"""The training step replayed from CUDA graphs (gnsrepro.cuda_graphs) against the same step run eagerly."""

import copy

import pytest
import torch

from gnsrepro.config import GNSConfig, ModelConfig, OptimConfig
from gnsrepro.errors import ConfigError
from gnsrepro.train import build_step, step, use_cuda_graphs

SMALL = ModelConfig(name="graphs", n_layer=3, n_head=4, n_embd=128, block_size=64, vocab_size=1000)


def test_auto_captures_only_on_one_gpu_without_dropout():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_cuda_graphs("auto", cuda, 1, 0.0) and use_cuda_graphs("true", cuda, 1, 0.0)
    assert not use_cuda_graphs("auto", cpu, 1, 0.0)
    assert not use_cuda_graphs("auto", cuda, 2, 0.0)  # DDP
    assert not use_cuda_graphs("auto", cuda, 1, 0.1)  # a replay would repeat one dropout mask
    assert not use_cuda_graphs("false", cuda, 1, 0.0) and not use_cuda_graphs(False, cuda, 1, 0.0)


def test_cuda_graphs_true_on_a_cpu_is_a_one_line_error():
    from omegaconf import OmegaConf

    from gnsrepro.config import TrainConfig
    from gnsrepro.settings import validate

    cfg = OmegaConf.structured(TrainConfig(max_steps=1, device="cpu", cuda_graphs="true"))
    with pytest.raises(ConfigError, match=r"^cuda_graphs=true needs one CUDA GPU and model.dropout=0 \(here: CPU"):
        validate(cfg)
    cfg.cuda_graphs = "sometimes"
    with pytest.raises(ConfigError, match="cuda_graphs='sometimes' is not known; accepted: auto, true, false"):
        validate(cfg)


def _steps(parts, layouts: list[int], micro: int, seq: int):
    """Losses, gradient norms, tracker values and parameters after len(layouts) steps of layouts[k] micro-batches."""
    device = parts.params[0].device
    gen = torch.Generator(device="cpu").manual_seed(1)
    losses, norms = [], []
    for k, accum in enumerate(layouts):
        batches = [(torch.randint(0, 1000, (micro, seq), generator=gen).to(device),
                    torch.randint(0, 1000, (micro, seq), generator=gen).to(device)) for _ in range(accum)]
        # the rate changes every step; powers of two, which the graph's float32 rate holds exactly
        loss, grad_norm = step(parts, batches, micro * accum, 2.0 ** -(10 + k % 3))
        losses.append(loss)
        norms.append(grad_norm)
    values = parts.tracker.drain() if parts.tracker is not None else None
    params = torch.cat([p.detach().float().flatten() for p in parts.raw_model.parameters()])
    return torch.stack(losses).cpu(), torch.stack(norms).cpu(), values, params.cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("mode,backend", [("off", "torch"), ("ln", "torch"), ("ln", "triton"), ("all", "torch")])
@pytest.mark.parametrize("compile", [False, True])
def test_a_graphed_run_equals_the_eager_one(mode, backend, compile):
    """Steps of 1, 2 and 3 micro-batches in a mixed order (three graphs sharing one pool, as a batch-size schedule
    would capture), a learning rate that changes every step: the same losses, gradient norms, GNS values and
    parameters as the same steps run eagerly from the same state with the same (compiled) model; the warm-up steps
    of each capture left no trace."""
    from gnsrepro.cuda_graphs import GraphedStep

    micro, seq, layouts = 4, 64, [1, 2, 2, 3, 1, 3, 2, 1]
    torch.manual_seed(0)
    parts = build_step(SMALL, GNSConfig(mode=mode, method="simultaneous", ln_backend=backend), OptimConfig(lr=3e-3),
                       torch.device("cuda"), torch.bfloat16, compile, max_micro_steps=max(layouts),
                       micro_batch_size=micro)
    start_model = copy.deepcopy(parts.raw_model.state_dict())
    start_optimizer = copy.deepcopy(parts.optimizer.state_dict())

    def from_start(graphed: bool):
        parts.raw_model.load_state_dict(start_model)  # in place: the compiled model keeps its parameters
        parts.optimizer.load_state_dict(start_optimizer)
        parts.graphed = GraphedStep(parts) if graphed else None
        return _steps(parts, layouts, micro, seq)

    eager, again, graphed = from_start(False), from_start(False), from_start(True)
    assert len(parts.graphed.graphs) == 3
    for name, a, b, g in zip(("loss", "grad_norm", "gns values", "parameters"), eager, again, graphed):
        if a is None:
            assert b is None and g is None
            continue
        a, b, g = (torch.nan_to_num(t.double(), nan=0.0) for t in (a, b, g))  # NaN: no micro-batch GNS that step
        # compiled kernels and the per-example paths' atomic adds are not bitwise repeatable: the graph may differ
        # from eager by what eager differs from itself (a warm-up step left in, a stale input or rate, a wrong
        # tracker row would differ by orders of magnitude more)
        spread, diff = (b - a).norm().item(), (g - a).norm().item()
        assert diff <= 10 * spread + 1e-6 * a.norm().item(), f"{name}: graphed - eager {diff:.3g}, eager spread " \
            f"{spread:.3g}"
    assert eager[0][0] > eager[0][-1] - 1.0  # it trains: losses near ln(1000) and falling, not NaN
    assert torch.isfinite(graphed[0]).all()


@pytest.mark.gpu
def test_a_training_run_with_cuda_graphs_matches_one_without_and_resumes(data_dir, tmp_path, monkeypatch):
    """The whole loop: a linear batch ramp (several micro-batch layouts, hence several graphs), evaluation and
    checkpoints between replays, and a resume from a checkpoint that re-captures on the loaded state: the losses,
    batch sizes and GNS rows of the graphed runs follow the eager run's (to the eager run's own repeatability)."""
    import pandas as pd
    from hydra import compose, initialize_config_dir

    from gnsrepro.cli import conf_dir
    from gnsrepro.config import register_configs
    from gnsrepro.train import train

    def cfg(out, *extra):
        register_configs()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("train", overrides=[
                "model=tiny", "data=pycode", f"data.data_dir={data_dir}", "data.max_bytes=1500000", f"out_dir={out}",
                "seq_len=64", "gns=ln", "schedule=linear", "schedule.batch_size=16", "schedule.micro_batch_size=4",
                "schedule.start=4", "optim.lr=2e-3", "eval_interval=6", "eval_batches=2",
                "log_interval=3", "checkpoint_interval=6", "compile=true", "device=cuda",
                # one LayerNorm backend for every run: auto picks by cuda_graphs (ln_backend.csv), and the two
                # backends' bf16 roundings differ by far more than a replay's (5e-3 after 18 steps on an H200)
                "gns.ln_backend=triton", *extra])

    runs = {}
    for name, extra in [("eager", ["cuda_graphs=false"]), ("again", ["cuda_graphs=false"]),
                        ("graphed", ["cuda_graphs=true"])]:
        train(cfg(tmp_path / name, "max_steps=18", *extra))
        runs[name] = pd.read_parquet(tmp_path / name / "metrics.parquet")
    # a graphed run interrupted in its 14th step (after the checkpoint of step 12), resumed with graphs
    import gnsrepro.train as training

    calls, real_step = [], training.step

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 14:
            raise KeyboardInterrupt
        return real_step(*args)

    with monkeypatch.context() as m:
        m.setattr(training, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(cfg(tmp_path / "resumed", "max_steps=18", "cuda_graphs=true"))
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)["step"] == 12
    train(cfg(tmp_path / "resumed", "max_steps=18", "cuda_graphs=true", "resume=true"))
    runs["resumed"] = pd.read_parquet(tmp_path / "resumed" / "metrics.parquet")
    eager, again = runs["eager"], runs["again"]
    assert len(set(eager["batch_size"])) > 1  # the schedule moved: more than one layout was captured
    spread = (again["loss"] - eager["loss"]).abs().max()
    for name in ("graphed", "resumed"):
        r = runs[name]
        assert list(r["step"]) == list(eager["step"]) and list(r["batch_size"]) == list(eager["batch_size"]), name
        diff = (r["loss"] - eager["loss"]).abs().max()
        # the captured AdamW is capturable (bias corrections from a device step count in float32, the eager one's
        # from a Python float), a rounding difference that training carries on: 3e-4 after 15 steps on an H200,
        # where the eager run repeats itself exactly. A replay with a stale rate or stale inputs would move it far
        # more: the loss falls about 0.15 a step here, and the rate changes by 5-10% a step.
        assert diff <= 10 * spread + 1e-4 * eager["loss"].abs().max(), \
            f"{name}: loss differs by {diff:.3g}, eager from itself by {spread:.3g}"
        assert r["val_loss"].notna().sum() == eager["val_loss"].notna().sum()


def test_bench_with_cuda_graphs_true_on_a_cpu_is_a_one_line_error():
    from omegaconf import OmegaConf

    from gnsrepro.benchmarks.train import bench_overhead, bench_train
    from gnsrepro.config import BenchConfig

    for target, bench in (("train", bench_train), ("overhead", bench_overhead)):
        cfg = OmegaConf.structured(BenchConfig(target=target, device="cpu", cuda_graphs="true"))
        with pytest.raises(ConfigError, match="^cuda_graphs=true needs a CUDA GPU; use cuda_graphs=auto"):
            bench(cfg)
