"""Per-step GNS components from three sources of small-batch gradients, reduced on the device.

For every optimizer step the tracker records, per parameter group, the squared norm of the big-batch
gradient |G_Bbig|² (B_big = the global batch) and the mean squared norm of small-batch gradients
|G_Bsmall|² from each source (docs/method.md, "The gradient noise scale"):

- per_example (B_small = 1): |g_b|² from the instrumented layers' sinks (gnsrepro.pegn), summed over
  every example of every micro-batch on every rank.
- microbatch (B_small = micro-batch size): the gradient of each gradient-accumulation micro-batch, read
  as the change of p.grad across its backward pass; needs two or more micro-batches per step (a step
  of one micro-batch, which a batch-size schedule may run, logs nothing for it).
- ddp (B_small = the per-rank batch): each rank's local gradient before DDP's all-reduce, read in a DDP
  communication hook; needs two or more ranks.

Nothing here calls .item(): each step leaves one small device tensor, and the host fetches the tensors
of a whole log interval at once (`drain`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from gnsrepro.gns import PARAM_GROUPS, group_of, gtg_estimate, trsigma_estimate

SOURCES = ("per_example", "microbatch", "ddp")


@dataclass(frozen=True)
class Row:
    """Which column of the per-step tensor is logged under which (source, group) name."""

    source: str
    group: str
    column: int


class GNSTracker:
    def __init__(
        self,
        model: nn.Module,
        collector=None,
        max_micro_steps: int = 1,
        world_size: int = 1,
        per_layer: bool = False,
    ):
        """model: the unwrapped model; collector: a gnsrepro.pegn.PerExampleNorms, or None;
        max_micro_steps: the most micro-batches per rank that any step will run (begin_step gives each
        step's own count)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.collector = collector
        self.world_size = world_size
        self.max_micro_steps = max_micro_steps
        self.micro_steps = 1  # this step's micro-batches per rank, set by begin_step
        device = self.params[0].device
        P, G = len(self.params), len(PARAM_GROUPS)
        group_ids = [PARAM_GROUPS.index(group_of(n)) for n in self.names]
        self._group_index = torch.tensor(group_ids, device=device)
        # columns of a step's tensor: the groups, then "total", then (optionally) one per parameter
        self._n_columns = G + 1 + (P if per_layer else 0)
        self.per_layer = per_layer

        self.sources = []
        if collector is not None:
            self.sources.append("per_example")
            position = {n: i for i, n in enumerate(self.names)}
            self._pe_index = torch.tensor([position[n] for n in collector.names], device=device)
            self._pe_covered = set(collector.names)
        if max_micro_steps > 1:
            self.sources.append("microbatch")
        if world_size > 1:
            self.sources.append("ddp")
        self.rows = self._rows(group_ids)
        self._steps: list[torch.Tensor] = []
        self._batches: list[tuple[int, int]] = []  # (batch size, micro-batch size) of each step in _steps
        if max_micro_steps > 1:
            self._prev = [torch.zeros_like(p) for p in self.params]
        self._micro_sq = torch.zeros(P, device=device)
        self._local_sq = torch.zeros(P, device=device)
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._last_micro = False
        self._bucket_index: dict[tuple[int, ...], torch.Tensor] = {}

    def _rows(self, group_ids: list[int]) -> list[Row]:
        """(source, group) pairs whose every parameter the source sees; per_example may cover only LN."""
        rows = []
        for s in self.sources:
            covered = self._pe_covered if s == "per_example" else set(self.names)
            for g, group in enumerate(PARAM_GROUPS):
                members = {n for n, gi in zip(self.names, group_ids) if gi == g}
                if members and members <= covered:
                    rows.append(Row(s, group, g))
            if covered == set(self.names):
                rows.append(Row(s, "total", len(PARAM_GROUPS)))
            if self.per_layer:
                rows += [Row(s, n, len(PARAM_GROUPS) + 1 + i) for i, n in enumerate(self.names) if n in covered]
        return rows

    # ---- during the step -------------------------------------------------------------------------
    def begin_step(self, micro_steps: int = 1) -> None:
        """Start a step of `micro_steps` micro-batches per rank (before its first forward)."""
        if not 1 <= micro_steps <= self.max_micro_steps:
            raise ValueError(f"a step of {micro_steps} micro-batches; the tracker was built for 1 to "
                             f"{self.max_micro_steps}")
        self.micro_steps = micro_steps
        self._micro_sq.zero_()
        self._local_sq.zero_()
        if self.micro_steps > 1:
            torch._foreach_zero_(self._prev)

    def before_backward(self, micro: int) -> None:
        self._last_micro = micro == self.micro_steps - 1

    def after_backward(self, micro: int) -> None:
        """Record micro-batch `micro`'s gradient as the change of p.grad (unless the DDP hook did)."""
        if self.micro_steps == 1 or (self.world_size > 1 and self._last_micro):
            return
        grads = [p.grad for p in self.params]
        deltas = torch._foreach_sub(grads, self._prev)
        self._micro_sq += torch.stack(torch._foreach_norm(deltas)) ** 2
        torch._foreach_copy_(self._prev, grads)

    def ddp_comm_hook(self, process_group, bucket):  # no annotations: DDP checks them, and they are strings here
        """DDP hook: note each rank's local gradient (and the last micro-batch's change), then all-reduce.

        bucket is a dist.GradBucket; returns a Future of the all-reduced bucket, as DDP's allreduce_hook.

        The bucket holds this rank's gradient summed over its micro-batches before averaging, which is
        the local-batch gradient of the ddp source. Register with ddp.register_comm_hook(None, hook).
        """
        grads = bucket.gradients()
        # DDP rebuilds its buckets after the first iteration (other members, other order, same indices):
        # key the device index by the bucket's parameters, so it is copied to the device once per layout
        positions = tuple(self._position[id(p)] for p in bucket.parameters())
        index = self._bucket_index.get(positions)
        if index is None:
            index = self._bucket_index[positions] = torch.tensor(positions, device=grads[0].device)
        self._local_sq.index_add_(0, index, torch.stack(torch._foreach_norm(grads)) ** 2)
        if self.micro_steps > 1:
            prev = [self._prev[i] for i in positions]
            deltas = torch._foreach_sub(grads, prev)
            self._micro_sq.index_add_(0, index, torch.stack(torch._foreach_norm(deltas)) ** 2)
        group = process_group if process_group is not None else dist.group.WORLD
        buffer = bucket.buffer().div_(self.world_size)
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])

    def end_step(self, batch_size: int, micro_batch_size: int, grad_sq: torch.Tensor) -> None:
        """Close the step: grad_sq (P,) holds |p.grad|² of the all-reduced, unclipped gradient.

        A source with no small batches this step (microbatch on a step of one micro-batch) gets NaN.
        """
        # Each source's sum over its small batches; divided into means below. Python-scalar arithmetic
        # only: a torch.tensor(list, device=...) here would copy from pageable host memory every step,
        # which makes the host wait for the backward to finish before it queues the optimizer.
        small, divisors = [], []
        if "per_example" in self.sources:
            n_local = batch_size // self.world_size  # the loss is a mean over this rank's examples
            per_param = torch.zeros_like(grad_sq)
            per_param[self._pe_index] = self.collector.stacked(n_local).sum(dim=1).to(per_param.dtype)
            small.append(per_param)  # summed over examples; all-reduced and divided by B below
            divisors.append(batch_size)
        if "microbatch" in self.sources:
            if self.micro_steps > 1:
                small.append(self._micro_sq * self.micro_steps**2)  # micro-batch k's mean gradient is m·Δ_k
            else:
                small.append(torch.full_like(grad_sq, float("nan")))
            divisors.append(self.micro_steps * self.world_size)
        if "ddp" in self.sources:
            small.append(self._local_sq.clone())
            divisors.append(self.world_size)
        if not small:
            return
        small_t = torch.stack(small)  # (S, P)
        if self.world_size > 1:
            dist.all_reduce(small_t)
        small_t = torch.stack([row / d for row, d in zip(small_t.unbind(0), divisors)])
        big_t = grad_sq.expand_as(small_t)
        both = torch.stack([small_t, big_t], dim=1)  # (S, 2, P)
        self._steps.append(self._columns(both))
        self._batches.append((batch_size, micro_batch_size))
        if self.collector is not None:
            self.collector.zero()

    def pop_step(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """Take back the last end_step's (values, (batch size, micro-batch size)): gnsrepro.cuda_graphs drops
        its warm-up steps' and keeps its capture's values, which each replay then overwrites."""
        return self._steps.pop(), self._batches.pop()

    def push_step(self, values: torch.Tensor, batch: tuple[int, int]) -> None:
        """Record a step's values as end_step does (a replayed graph's, cloned)."""
        self._steps.append(values)
        self._batches.append(batch)

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        """(S, 2, P) per-parameter values -> (S, 2, columns): group sums, total, per-parameter."""
        S = x.shape[0]
        groups = torch.zeros(S, 2, len(PARAM_GROUPS), device=x.device, dtype=x.dtype)
        groups.index_add_(2, self._group_index, x)
        parts = [groups, x.sum(dim=2, keepdim=True)]
        if self.per_layer:
            parts.append(x)
        return torch.cat(parts, dim=2)

    def b_small(self, source: str, batch_size: int, micro_batch_size: int) -> int:
        return {"per_example": 1, "microbatch": micro_batch_size, "ddp": batch_size // self.world_size}[source]

    def drain(self) -> torch.Tensor | None:
        """The (steps, S, 2, columns) values since the last drain, on the host (one transfer)."""
        if not self._steps:
            return None
        out = torch.stack(self._steps).cpu()
        self._steps = []
        self._batches = []
        return out

    def drain_rows(self, steps: list[tuple[int, int]]) -> list[dict]:
        """gns.parquet rows (gnsrepro.schema.GNS_COLUMNS) of the steps since the last drain; steps: their
        (step, tokens).

        One row per step, source and group, with the unbiased |G|² and tr(Σ) estimates of that step
        (gnsrepro.gns); a source with no small batches on a step (NaN) gets no row for it.
        """
        batches, values = self._batches, self.drain()
        self._batches = []
        if values is None:
            return []
        if len(steps) != len(batches):
            raise ValueError(f"{len(steps)} steps given for {len(batches)} recorded")
        values = values.tolist()  # (steps, S, 2, columns), one conversion for the whole interval
        rows = []
        for (step, tokens), (batch_size, micro), v in zip(steps, batches, values):
            for row in self.rows:
                s = self.sources.index(row.source)
                small, big = v[s][0][row.column], v[s][1][row.column]
                if small != small:  # NaN: no small batches from this source on this step
                    continue
                b_small = self.b_small(row.source, batch_size, micro)
                rows.append({"step": step, "tokens": tokens, "group": row.group, "source": row.source,
                             "b_big": batch_size, "b_small": b_small, "sqnorm_big": big, "sqnorm_small": small,
                             "gtg": gtg_estimate(batch_size, big, b_small, small),
                             "trsigma": trsigma_estimate(batch_size, big, b_small, small)})
        return rows
