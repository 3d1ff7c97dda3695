"""The per-example weight-gradient kernel's tiles and backend, per Linear shape (a tuning tool, not a feature).

    python -m benchmarks.tuning.per_example_grad [--models 20M,40M,111M] [--micro 16] [--layers] [--record]
        [--record-layers]

For each model's tied head (and with --layers its four Linear shapes), bf16 inputs of the shape x (B, T, K),
dy (B, T, L) at B = --micro and T = the model's block size, it times, each call replayed from a CUDA graph as
the training step is (gnsrepro.benchmarks.layernorm's capture and time_us):
  torch    the PyTorch path, gns.linear_backend=torch (pegn._weight_grad_and_sqnorms; for the head its rows at
           the example's ids gathered from the per-example gradients); for a Linear layer also the path with
           torch's two reductions of G in place of gnsrepro.kernels.example_sums' one
  triton   the kernel (gnsrepro.kernels.per_example_grad) at every candidate tile of `candidates` whose result
           matches the torch path's (dW, |G_b|² and the head's rows to 1e-3); for the head, the kernel that copies
           the rows out of its tiles (weight_grad_sqnorms_and_rows), as pegn runs it
and prints each. --record writes one row per tied head into gnsrepro/kernels/linear_backend.csv (the faster
backend and the fastest tiles): the measurements gns.linear_backend=auto and the kernel's launcher read
(gnsrepro.kernels.linear_backend). --layers' shapes are printed, and recorded only with --record-layers: at 20M and
40M the kernel beat the PyTorch path at every small layer alone and still made the whole compiled step slower
(docs/benchmarks.md, "The per-shape Linear backend"), so a layer's row belongs in the table only for a model whose
whole step was measured faster with its layers on the kernel (`gnsrepro bench overhead`, variant "all triton
linear").
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import shlex
import sys

import torch

from gnsrepro.benchmarks.layernorm import capture, time_us
from gnsrepro.config import named_model
from gnsrepro.kernels.backend_table import faster_backend
from gnsrepro.kernels.per_example_grad import (
    MAX_TILE_ELEMENTS,
    Tiles,
    _tiles,
    weight_grad_and_sqnorms_launch,
    weight_grad_sqnorms_and_rows_launch,
)
from gnsrepro.pegn import _head_rows, _weight_grad_and_sqnorms

SHARED_MEMORY_BYTES = 200 * 1024  # what a Hopper SM's programs may use of its 228 KB: the stages must fit
MATCH_TOLERANCE = 1e-3  # relative distance of dW and |G_b|² to the torch path's (both accumulate in fp32)


def candidates(K: int, L: int, element_size: int = 2) -> list[Tiles]:
    """Tiles to try: BLOCK_L x BLOCK_K of 64-256 with at most MAX_TILE_ELEMENTS elements (two fp32 accumulators
    of that size in registers) and neither much wider than its dimension, BLOCK_T 32 or 64, 8 warps for a tile of
    8192 elements or more (4 would hold 128 accumulator registers a thread and spill) and 4 below, and as many
    pipeline stages (2-4) as fit SHARED_MEMORY_BYTES; and the launcher's heuristic tiles (per_example_grad._tiles),
    so that the fastest is never slower than what runs without a recorded row."""
    out = [_tiles(K, L, element_size)]
    for bl, bk, bt in itertools.product((64, 128, 256), (64, 128, 256), (32, 64)):
        if bl * bk > MAX_TILE_ELEMENTS or bl > max(64, 2 * L) or bk > max(64, 2 * K):
            continue
        stage = bt * (bl + bk) * element_size
        stages = min(4, SHARED_MEMORY_BYTES // stage)
        tiles = Tiles(bl, bk, bt, 8 if bl * bk >= 8192 else 4, stages)
        if stages >= 2 and tiles not in out:
            out.append(tiles)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _graphed_ms(fn) -> float:
    return time_us(capture(fn).replay, warmup=2, steps=20) / 1e3


def _two_reads(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path as it was before gnsrepro.kernels.example_sums: G materialised, then torch's two reductions
    (along different axes, so each reads G), for one chunk of all B examples."""
    G = torch.bmm(dy.transpose(1, 2), x, out_dtype=torch.float32)
    return G.sum(0), G.square().sum((1, 2))


def _head_rows_sorted(x: torch.Tensor, dy: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """pegn._head_rows with each example's ids in ascending order (a gather whose neighbouring reads are close in
    memory), the rows put back in the examples' order after."""
    ids_sorted, order = ids.sort(dim=1)
    rows_sorted = _head_rows(x, dy, ids_sorted, 0)
    return torch.empty_like(rows_sorted).scatter_(1, order[..., None].expand_as(rows_sorted), rows_sorted)


def tune_shape(B: int, T: int, K: int, L: int, tied_head: bool, label: str) -> dict:
    """The torch path's time and the kernel's fastest matching tiles and time at this shape (module docstring)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, K, device="cuda", generator=gen).bfloat16()
    dy = (torch.randn(B, T, L, device="cuda", generator=gen) / L**0.5).bfloat16()
    ids = torch.randint(0, L, (B, T), device="cuda", generator=gen) if tied_head else None
    torch_ms = _graphed_ms(lambda: _weight_grad_and_sqnorms(x, dy, "simultaneous", 0, ids=ids))
    ref = _weight_grad_and_sqnorms(x, dy, "simultaneous", 0, ids=ids)
    two_reads = "" if tied_head else (f" (G read twice, by torch's two reductions: "
                                      f"{_graphed_ms(lambda: _two_reads(x, dy)):.3f} ms)")
    print(f"{label}: B={B} T={T} K={K} L={L}{' (tied head)' if tied_head else ''} | torch {torch_ms:.3f} ms"
          f"{two_reads}", flush=True)
    best = None
    for tiles in candidates(K, L):
        # what pegn runs: for the head, the kernel that also copies out its rows
        launch = (functools.partial(weight_grad_sqnorms_and_rows_launch, x, dy, ids, tiles=tiles) if tied_head
                  else functools.partial(weight_grad_and_sqnorms_launch, x, dy, tiles=tiles))
        try:
            err = max(_rel(got, want) for got, want in zip(launch(), ref) if want is not None)
            ms = _graphed_ms(launch) if err < MATCH_TOLERANCE else float("nan")
        except Exception as e:  # a tile that does not compile or launch here (shared memory, registers)
            print(f"  {tuple(tiles)}: failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        print(f"  {tuple(tiles)}: {ms:.3f} ms (rel. diff {err:.1e})", flush=True)
        if ms == ms and (best is None or ms < best[1]):
            best = (tiles, ms)
    if best is None:
        raise RuntimeError(f"{label}: no tile of the kernel matched the torch path")
    tiles, triton_ms = best
    print(f"  fastest {tuple(tiles)}: triton {triton_ms:.3f} ms against torch {torch_ms:.3f} ms "
          f"({triton_ms / torch_ms:.2f}x)", flush=True)
    if tied_head:  # what the rows copied out of the tiles save: the kernel without them, the rows gathered from dy
        without = _graphed_ms(functools.partial(weight_grad_and_sqnorms_launch, x, dy, tiles=tiles))
        gather = _graphed_ms(lambda: _head_rows(x, dy, ids, 0))
        sorted_gather = _graphed_ms(lambda: _head_rows_sorted(x, dy, ids))
        print(f"  the kernel without the rows {without:.3f} ms, the rows gathered from dy {gather:.3f} ms "
              f"(at each example's ids sorted: {sorted_gather:.3f} ms)", flush=True)
    return {"batch": B, "seq_len": T, "in_features": K, "out_features": L, "tied_head": tied_head,
            "torch_ms": round(torch_ms, 3), "triton_ms": round(triton_ms, 3),
            "faster": faster_backend(round(torch_ms, 3), round(triton_ms, 3)), "block_l": tiles.block_l,
            "block_k": tiles.block_k, "block_t": tiles.block_t, "num_warps": tiles.num_warps,
            "num_stages": tiles.num_stages}


def shapes(name: str, layers: bool) -> list[tuple[int, int, bool]]:
    """(K, L, tied_head) of model `name`'s tied head and, with layers, of its four Linear layers (gnsrepro.model:
    attention's qkv and projection, the MLP's two)."""
    m = named_model(name)
    d = m.n_embd
    return [(d, m.vocab_size, True)] + ([(d, 3 * d, False), (d, d, False), (d, 4 * d, False), (4 * d, d, False)]
                                        if layers else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="20M,40M,111M")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--layers", action="store_true", help="the models' Linear layers too, not only the tied head")
    ap.add_argument("--record", action="store_true",
                    help="write the tied heads' rows into gnsrepro/kernels/linear_backend.csv")
    ap.add_argument("--record-layers", action="store_true",
                    help="with --record and --layers, the Linear layers' rows too (for a model whose whole step was "
                         "measured faster with its layers on the kernel)")
    ap.add_argument("--commit", default=None, help="the code's commit for the recorded rows (default: git's)")
    a = ap.parse_args()
    if a.record_layers and not (a.record and a.layers):
        ap.error("--record-layers needs --record and --layers")
    device = torch.cuda.get_device_name()
    print(f"{device} | torch {torch.__version__}", flush=True)
    day = datetime.date.today().isoformat()
    if a.commit is None:
        from gnsrepro.benchmarks.train import _commit

        a.commit = _commit()
    command = "python -m benchmarks.tuning.per_example_grad " + shlex.join(
        arg for arg in sys.argv[1:] if not arg.startswith("--commit") and arg != a.commit)
    rows, seen = [], set()
    for name in a.models.split(","):
        T = named_model(name).block_size
        for K, L, tied in shapes(name, a.layers):
            if (K, L, tied) in seen:
                continue
            seen.add((K, L, tied))
            row = tune_shape(a.micro, T, K, L, tied, f"{name} {'head' if tied else 'linear'}")
            rows.append({"device": device, "dtype": "bfloat16", **row, "date": day, "commit": a.commit,
                         "command": command})
            # each shape as it is done, so a call cut short keeps the shapes finished; the layers only when asked
            # (the module docstring: a small layer's isolated time misleads auto)
            if a.record and (tied or a.record_layers):
                from gnsrepro.kernels.linear_backend import record_linear_backend

                record_linear_backend([rows[-1]])
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
