"""gns.linear_backend=auto: the per-shape table (gnsrepro.kernels.linear_backend), the layers it builds, the
kernel's recorded tiles, and the tuning tool's candidates. The norms of either backend against float64 per-example
gradients are tests/test_per_example_grad.py's; here a model with a per-shape mix is checked against the same
reference (CPU: the kernel in Triton's interpreter, tests/conftest.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_pegn import assert_norms, batch, reference, twins

import gnsrepro.kernels.linear_backend as LB
from gnsrepro.config import GNSConfig, ModelConfig
from gnsrepro.kernels.per_example_grad import MAX_TILE_ELEMENTS, Tiles, _launch_tiles, _tiles
from gnsrepro.pegn import PerExampleLinear, PerExampleTiedEmbedding, instrumented_layers, per_example_sqnorms
from gnsrepro.train import build_model, linear_backends, resolve_linear_backend


def row(**changes) -> dict:
    base = {"device": "NVIDIA H200", "dtype": "bfloat16", "batch": 16, "seq_len": 1024, "in_features": 256,
            "out_features": 50304, "tied_head": True, "torch_ms": 1.876, "triton_ms": 1.459, "faster": "triton",
            "block_l": 64, "block_k": 256, "block_t": 64, "num_warps": 8, "num_stages": 3, "date": "2026-12-02",
            "commit": "abc1234", "command": "python -m benchmarks.tuning.per_example_grad --record"}
    return {**base, **changes}


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "linear_backend.csv"
    monkeypatch.setattr(LB, "LINEAR_BACKEND_TABLE", path)
    LB.recorded_tiles.cache_clear()
    yield path
    LB.recorded_tiles.cache_clear()


def test_the_committed_table_is_well_formed():
    df = LB.read_table()
    assert tuple(df.columns) == LB.TABLE_COLUMNS


def test_record_replaces_the_row_of_a_situation_and_reads_back(table):
    LB.record_linear_backend([row(), row(in_features=768, torch_ms=9.437, triton_ms=6.889)])
    LB.record_linear_backend([row(torch_ms=1.2, triton_ms=1.459, faster="torch", date="2026-12-03")])
    df = LB.read_table()
    assert len(df) == 2
    assert df.set_index("in_features").loc[256, "faster"] == "torch"
    assert not (table.parent / "linear_backend.csv.tmp").exists()


@pytest.mark.parametrize("changes,message", [
    ({"dtype": "bf16"}, "dtype='bf16' is not one of"),
    ({"tied_head": "yes"}, "tied_head='yes' is not True or False"),
    ({"block_t": 0}, "block_t=0 is not a positive integer"),
    ({"torch_ms": -1.0}, "must be positive numbers"),
    ({"faster": "torch"}, "faster='torch' but torch_ms=1.876 and triton_ms=1.459"),
    ({"command": " "}, "command is empty"),
])
def test_a_malformed_row_is_refused_with_its_problem(table, changes, message):
    with pytest.raises(ValueError, match=message):
        LB.record_linear_backend([row(**changes)])
    assert not table.exists()  # nothing written


def test_two_rows_of_one_situation_are_refused():
    with pytest.raises(ValueError, match="a second row for the situation"):
        LB.check_table(pd.DataFrame([row(), row(torch_ms=2.0)], columns=LB.TABLE_COLUMNS))


def test_choice_by_shape_dtype_and_gpu_family(table):
    LB.record_linear_backend([row(), row(in_features=448, torch_ms=1.0, triton_ms=2.0, faster="torch")])
    assert LB.choose_linear_backend("NVIDIA H200", "bfloat16", 256, 50304, True)[0] == "triton"
    backend, why = LB.choose_linear_backend("NVIDIA H100 80GB HBM3", "bfloat16", 256, 50304, True)  # same family
    assert backend == "triton" and "NVIDIA H200" in why and "torch 1.88 ms, triton 1.46 ms" in why
    assert LB.choose_linear_backend("NVIDIA H200", "bfloat16", 448, 50304, True)[0] == "torch"
    for args in (("NVIDIA H200", "float32", 256, 50304, True),  # another dtype
                 ("NVIDIA H200", "bfloat16", 256, 768, False),  # another shape
                 ("NVIDIA H200", "bfloat16", 256, 50304, False),  # a plain Linear of the head's shape
                 ("NVIDIA A100-SXM4-80GB", "bfloat16", 256, 50304, True)):  # another family
        backend, why = LB.choose_linear_backend(*args)
        assert backend == "torch" and "in linear_backend.csv: torch" in why, args


def test_the_latest_row_of_a_shape_wins(table):
    LB.record_linear_backend([row(batch=64, date="2026-12-03", torch_ms=5.0, triton_ms=6.0, faster="torch",
                                  block_l=128, block_k=128), row()])
    assert LB.choose_linear_backend("NVIDIA H200", "bfloat16", 256, 50304, True)[0] == "torch"
    assert LB.recorded_tiles("NVIDIA H200", "bfloat16", 256, 50304) == (128, 128, 64, 8, 3)


def test_the_launcher_takes_recorded_tiles_on_cuda_only(table, monkeypatch):
    import gnsrepro.kernels.per_example_grad as PG

    LB.record_linear_backend([row(block_l=128, block_k=64, block_t=32, num_warps=4, num_stages=2)])
    monkeypatch.setattr(PG, "_device_name", lambda index: "NVIDIA H200")
    cuda_like = type("CudaTensor", (), {"is_cuda": True, "dtype": torch.bfloat16,
                                        "device": torch.device("cuda", 0), "element_size": lambda self: 2})()
    assert _launch_tiles(cuda_like, 256, 50304) == Tiles(128, 64, 32, 4, 2)
    assert _launch_tiles(cuda_like, 256, 768) == _tiles(256, 768, 2)  # no row for this shape: the heuristic
    assert _launch_tiles(torch.zeros(1, dtype=torch.bfloat16), 256, 50304) == _tiles(256, 50304, 2)  # a CPU


def test_auto_is_torch_off_cuda_and_a_per_shape_choice_builds_each_layer_with_its_backend():
    assert resolve_linear_backend(GNSConfig(mode="all"), torch.device("cpu")) == "torch"
    model, _ = build_model(ModelConfig(vocab_size=64), GNSConfig(mode="all", ln_backend="torch"), torch.device("cpu"))
    assert set(linear_backends(model).values()) == {"torch"}
    asked = []

    def per_shape(K, L, tied_head):
        asked.append((K, L, tied_head))
        return "triton" if tied_head else "torch"

    layers = instrumented_layers("all", method="simultaneous", linear_backend=per_shape)
    _, model = twins(layers)
    built = {m.backend for m in model.modules() if isinstance(m, PerExampleLinear)}
    head = [m for m in model.modules() if isinstance(m, PerExampleTiedEmbedding)]
    assert built == {"torch"} and [m.backend for m in head] == ["triton"]
    V, d = head[0].weight.shape
    assert (d, V, True) in asked and (d, 3 * d, False) in asked and (4 * d, d, False) in asked
    assert linear_backends(model)[f"tied head {d} -> {V}"] == "triton"
    idx, targets = batch(2)
    got = per_example_sqnorms(model, idx, targets)
    assert_norms(got, reference(2, own_loss=True), list(got), rtol=1e-5)  # float64 vmap per-example gradients


def test_the_tuning_tools_candidates_fit_and_include_the_heuristic():
    from benchmarks.tuning.per_example_grad import SHARED_MEMORY_BYTES, candidates, shapes

    for K, L in ((256, 50304), (768, 50304), (256, 768), (3072, 768), (16, 16)):
        tiles = candidates(K, L)
        assert tiles[0] == _tiles(K, L, 2) and len(set(tiles)) == len(tiles)
        for t in tiles[1:]:
            assert t.block_l * t.block_k <= MAX_TILE_ELEMENTS
            assert 2 <= t.num_stages and t.num_stages * t.block_t * (t.block_l + t.block_k) * 2 <= SHARED_MEMORY_BYTES
    assert shapes("20M", layers=True) == [(256, 50304, True), (256, 768, False), (256, 256, False),
                                         (256, 1024, False), (1024, 256, False)]


@pytest.mark.parametrize("argv", [["--record-layers"], ["--record", "--record-layers"],
                                  ["--layers", "--record-layers"]])
def test_the_tuning_tool_records_layers_only_when_it_tunes_and_records_them(argv):
    """--record-layers without --record and --layers is refused before any work (no GPU needed to see it)."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "benchmarks.tuning.per_example_grad", *argv],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--record-layers needs --record and --layers" in done.stderr


@pytest.mark.gpu
def test_gpu_auto_builds_what_the_table_says():
    """On the GPU, a model of gns.linear_backend=auto in bf16 is built with each shape's recorded choice."""
    model, _ = build_model(ModelConfig(vocab_size=50304, n_embd=256, n_head=4, n_layer=2, block_size=64),
                           GNSConfig(mode="all"), torch.device("cuda"), dtype=torch.bfloat16)
    name = torch.cuda.get_device_name()
    for key, backend in linear_backends(model).items():
        tied = key.startswith("tied head ")
        K, L = (int(v) for v in key.removeprefix("tied head ").split(" -> "))
        assert backend == LB.choose_linear_backend(name, "bfloat16", K, L, tied)[0], key


def test_meta_json_names_each_linear_shapes_backend(tmp_path):
    import json
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import gnsrepro.train as T
    from gnsrepro.config import TrainConfig

    cfg = OmegaConf.structured(TrainConfig)
    cfg.gns.mode, cfg.gns.ln_backend = "all", "torch"
    model, _ = build_model(ModelConfig(vocab_size=64, n_embd=32, n_head=2, n_layer=1, block_size=8),
                           GNSConfig(mode="all", ln_backend="torch", linear_backend="triton"), torch.device("cpu"))
    run = SimpleNamespace(out=tmp_path / "run", cfg=cfg, step=0, changed={}, device=torch.device("cpu"),
                          parts=SimpleNamespace(raw_model=model, graphed=None), d=SimpleNamespace(world_size=1))
    T._write_run_record(run, torch.float32)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["linear_backends"] == {"32 -> 96": "triton", "32 -> 32": "triton", "32 -> 128": "triton",
                                       "128 -> 32": "triton", "tied head 32 -> 64": "triton"}
