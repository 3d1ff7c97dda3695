"""GNSTracker's logged norms against per-example gradients from torch.func (vmap of grad), in float64.

The tracker is driven as gnsrepro.train drives it (micro-batches with gradient accumulation, clipping
after the norms are taken, DDP's no_sync and communication hook); the reference computes every
example's gradient of the same model independently and forms each source's small-batch gradients
(one example, one micro-batch, one rank's batch) and the big-batch gradient from them.
"""

import gc
import os
import tempfile
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.func import functional_call, grad, vmap

from gnsrepro.gns import PARAM_GROUPS, group_of
from gnsrepro.gns_tracker import GNSTracker
from gnsrepro.model import GPT, GPTConfig
from gnsrepro.pegn import PerExampleNorms, instrumented_layers
from gnsrepro.train import clip_by_total_norm, grad_sqnorms

V, T = 64, 7
CFG = GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16)


def data(B: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def reference(plain: GPT, idx, tgt, micro: int, world: int) -> tuple[dict, dict]:
    """(big, small): per group and "total", |mean gradient|² and, per source, the mean over its small
    batches of |small-batch mean gradient|², from float64 per-example gradients."""
    P = {k: v.detach().double() for k, v in plain.named_parameters()}
    plain = plain.double()
    g = vmap(grad(lambda p, i, t: functional_call(plain, p, (i[None], t[None]))[1]), in_dims=(None, 0, 0))(P, idx, tgt)
    B = idx.shape[0]

    def per_group(fn) -> dict:
        out = dict.fromkeys((*PARAM_GROUPS, "total"), 0.0)
        for name, x in g.items():
            v = fn(x.flatten(1))
            out[group_of(name)] += v
            out["total"] += v
        return out

    def small(k: int) -> dict:  # B/k small batches of k consecutive examples
        return per_group(lambda x: x.reshape(B // k, k, -1).mean(1).square().sum(1).mean().item())

    big = per_group(lambda x: x.mean(0).square().sum().item())
    return big, {"per_example": small(1), "microbatch": small(micro), "ddp": small(B // world)}


def run_step(model, tracker, params, idx, tgt, micro: int, ddp=None) -> None:
    """One optimizer step's backward passes as in gnsrepro.train, without the optimizer."""
    accum = idx.shape[0] // micro
    tracker.begin_step(accum)
    for k in range(accum):
        with nullcontext() if ddp is None or k == accum - 1 else ddp.no_sync():
            _, loss = (ddp or model)(idx[k * micro:(k + 1) * micro], tgt[k * micro:(k + 1) * micro])
            tracker.before_backward(k)
            (loss / accum).backward()
        tracker.after_backward(k)
    sq = grad_sqnorms(params)
    clip_by_total_norm(params, sq, 1e-3)  # clipping changes p.grad after the norms were taken
    tracker.end_step(idx.shape[0] * tracker.world_size, micro, sq)
    for p in params:
        p.grad = None


def check(values: torch.Tensor, rows: list, sources: list, big: dict, small: dict, rtol: float) -> int:
    """Compare one step's (S, 2, columns) values with the reference; returns the rows compared."""
    for row in rows:
        s = sources.index(row.source)
        got_small, got_big = values[s, 0, row.column].item(), values[s, 1, row.column].item()
        assert got_small == pytest.approx(small[row.source][row.group], rel=rtol), row
        assert got_big == pytest.approx(big[row.group], rel=rtol), row
    return len(rows)


def models(mode: str):
    torch.manual_seed(0)
    plain = GPT(CFG)
    model = GPT(CFG, instrumented_layers(mode))
    model.load_state_dict(plain.state_dict())
    return plain, model


@pytest.mark.parametrize("mode", ["all", "ln"])
def test_per_example_and_microbatch_sources_match_vmap(mode):
    micro, accum = 3, 2
    plain, model = models(mode)
    plain, model = plain.double(), model.double()
    collector = PerExampleNorms(model)
    collector.attach(micro)
    tracker = GNSTracker(model, collector, max_micro_steps=accum)
    idx, tgt = data(micro * accum)
    run_step(model, tracker, list(model.parameters()), idx, tgt, micro)
    big, small = reference(plain, idx, tgt, micro, 1)
    # float32 accumulators in the tracker and in grad_sqnorms: 1e-6 relative
    n = check(tracker.drain()[0], tracker.rows, tracker.sources, big, small, rtol=1e-6)
    assert {r.source for r in tracker.rows} == {"per_example", "microbatch"}
    groups = len(PARAM_GROUPS) + 1  # and "total"
    assert n == (1 if mode == "ln" else groups) + groups  # gns=ln: per-example norms of the LayerNorms only


def test_each_step_uses_its_own_micro_batch_count():
    """A batch-size schedule changes the micro-batches per step: the microbatch source must be scaled
    by each step's count, and log nothing (NaN) on a step of one micro-batch."""
    micro = 2
    plain, model = models("all")
    plain, model = plain.double(), model.double()
    collector = PerExampleNorms(model)
    collector.attach(micro)
    tracker = GNSTracker(model, collector, max_micro_steps=4)
    params = list(model.parameters())
    for accum in (2, 4, 1):
        idx, tgt = data(micro * accum, seed=accum)
        run_step(model, tracker, params, idx, tgt, micro)
        values = tracker.drain()[0]
        big, small = reference(plain, idx, tgt, micro, 1)
        rows = tracker.rows
        if accum == 1:
            assert values[tracker.sources.index("microbatch"), 0].isnan().all()
            rows = [r for r in rows if r.source != "microbatch"]
        assert check(values, rows, tracker.sources, big, small, rtol=1e-6) > 0
    with pytest.raises(ValueError, match="built for 1 to 4"):
        tracker.begin_step(5)


WORLD, MICRO, ACCUM = 2, 2, 2


def _ddp_worker(rank: int, init_file: str, queue) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _, model = models("all")
        collector = PerExampleNorms(model)
        collector.attach(MICRO)
        ddp = DDP(model)
        tracker = GNSTracker(model, collector, max_micro_steps=ACCUM, world_size=WORLD)
        ddp.register_comm_hook(None, tracker.ddp_comm_hook)
        idx, tgt = data(WORLD * MICRO * ACCUM)
        mine = slice(rank * MICRO * ACCUM, (rank + 1) * MICRO * ACCUM)
        for _ in range(2):  # DDP rebuilds its buckets after the first step
            run_step(model, tracker, list(model.parameters()), idx[mine], tgt[mine], MICRO, ddp=ddp)
        if rank == 0:
            queue.put((tracker.drain().tolist(), tracker.rows, tracker.sources))
        # DDP's reducer must go before its process group: destroyed after it, it aborts the process at
        # exit now and then ("terminate called without an active exception")
        dist.barrier()
        del ddp, tracker
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_ddp_sources_match_vmap():
    """Under DDP (gloo, 2 ranks, float32 model) each rank sees half the batch; the per-example, microbatch
    and ddp sources and the big-batch norm must still be those of the whole batch, on both steps."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(os.path.join(tmp, "pg"), queue), nprocs=WORLD)
    values, rows, sources = queue.get()
    plain, _ = models("all")
    idx, tgt = data(WORLD * MICRO * ACCUM)
    big, small = reference(plain, idx, tgt, MICRO, WORLD)
    assert sources == ["per_example", "microbatch", "ddp"]
    for step in range(2):
        assert check(torch.tensor(values[step]), rows, sources, big, small, rtol=1e-4) == 3 * (len(PARAM_GROUPS) + 1)
