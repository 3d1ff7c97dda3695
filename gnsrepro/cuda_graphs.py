"""The whole training step as a CUDA graph: forward, backward, gradient norms, the GNS tracker and AdamW.

Why: a small model's step is bound by the host, not the GPU. Profiled on one H200 (benchmarks/profile_step.py,
torch 2.11, compiled, bf16), the 20M model at micro-batch 16 launches about 660 kernels a step; the GPU is busy
for 9.9 ms of the 13.3 ms step, and 10.1 of the 17.8 ms (gns=ln, PyTorch LayerNorm path) or of the 30.4 ms (gns=ln,
Triton LayerNorm: every Triton launch and custom-op call costs host time). Replaying a captured graph costs
one launch, so the step takes what its kernels take, and per-example norms cost what their kernels cost.

How (the PyTorch CUDA-graphs notes, "whole network capture"): for each micro-batch layout of a step (how
many micro-batches, their shape; a batch-size schedule has a few), `train_step` is run `warmup` times eagerly
on a side stream (compilation, cuBLAS workspaces, AdamW's lazily created state), then captured once into a
graph with static token buffers. The learning rate is a device tensor that the captured AdamW (fused,
capturable) reads, so a replay takes the step's own rate. The eager warm-up steps train the model, so every
parameter and optimizer tensor is saved before them and written back (in place: the graph holds their
addresses) after the capture, and the GNS tracker forgets their rows: the run continues from exactly the state
it had, and a graphed run computes the same kernels on the same values as an eager one.

What a step leaves behind lives outside the graphs' shared memory pool: parameters, optimizer state (created
before the capture), and the loss, gradient norm and tracker values, which are cloned right after each
replay. Gradients and per-example sinks are created and dropped inside the step (zero_grad(set_to_none=True)),
so graphs of different layouts can share one pool and replay in any order.

Not for: DDP (NCCL inside graphs, per-bucket hooks), CPU runs, dropout > 0 (the graph would replay one mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[tuple[torch.Tensor, torch.Tensor]]  # static (x, y) per micro-batch
    loss: torch.Tensor
    grad_norm: torch.Tensor
    tracker_values: torch.Tensor | None  # the tracker's (S, 2, columns) of the step
    tracker_batch: tuple[int, int] | None


class GraphedStep:
    """train_step(parts, micro_batches, batch_size, lr) replayed from CUDA graphs, one per micro-batch layout."""

    def __init__(self, parts, warmup: int = 3):
        from gnsrepro.train import train_step

        self.parts, self.warmup, self._train_step = parts, warmup, train_step
        device = parts.params[0].device
        self.lr = torch.zeros((), dtype=torch.float32, device=device)  # read by the captured AdamW kernels
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                 lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        key = (batch_size, tuple((tuple(x.shape), tuple(y.shape)) for x, y in micro_batches))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(micro_batches, batch_size, lr)
        for (sx, sy), (x, y) in zip(captured.inputs, micro_batches):
            sx.copy_(x, non_blocking=True)
            sy.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        captured.graph.replay()
        tracker = self.parts.tracker
        if tracker is not None and captured.tracker_values is not None:
            tracker.push_step(captured.tracker_values.clone(), captured.tracker_batch)
        return captured.loss.clone(), captured.grad_norm.clone()

    def _step(self, inputs, batch_size: int):
        return self._train_step(self.parts, inputs, batch_size, self.lr)

    def _capture(self, micro_batches, batch_size: int, lr: float) -> _Captured:
        p = self.parts
        inputs = [(x.clone(), y.clone()) for x, y in micro_batches]
        for group in p.optimizer.param_groups:  # here, not once: a resumed checkpoint's groups replace them
            group["capturable"] = True
        self.lr.fill_(lr)
        params = [t for t in p.raw_model.state_dict().values()]
        fresh_optimizer = not p.optimizer.state  # AdamW creates its state on the first step
        saved_params = [t.detach().clone() for t in params]
        saved_state = {k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
                       for k, s in p.optimizer.state.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self._step(inputs, batch_size)
        torch.cuda.current_stream().wait_stream(stream)
        if p.tracker is not None:
            for _ in range(self.warmup):
                p.tracker.pop_step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss, grad_norm = self._step(inputs, batch_size)
        values, batch = p.tracker.pop_step() if p.tracker is not None else (None, None)
        # the warm-up steps trained the model: put every tensor back, in place (the graph holds the addresses)
        with torch.no_grad():
            for t, saved in zip(params, saved_params):
                t.copy_(saved)
            for k, s in p.optimizer.state.items():
                for n, v in s.items():
                    if not torch.is_tensor(v):
                        continue
                    if fresh_optimizer:
                        v.zero_()  # AdamW's initial state: step 0, zero moments
                    else:
                        v.copy_(saved_state[k][n])
        torch.cuda.synchronize()
        return _Captured(graph, inputs, loss, grad_norm, values, batch)
