"""More than one process: data-parallel training and sharded certification.

Launch any command under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE`` and the rendezvous
variables), e.g. ``torchrun --nproc_per_node 4 -m dualgraph.cli certify ...``; the process
group is created on first use (gloo on CPU, NCCL on CUDA). Without those variables every
function here is the single-process identity.

* Training: every rank draws the same batch order; each takes a contiguous share of every
  batch and backpropagates ``sum of its examples' losses / batch size``; summing the
  gradients over ranks (:func:`all_reduce_gradients`) gives exactly the single-process
  gradient of the batch mean (up to the order of floating-point additions).
* Certification: each rank certifies a contiguous slice of the data; rank 0 gathers the
  per-example results (:func:`gather`) and reports as one process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous part of ``range(n)`` (the first ``n % size`` ranks get one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def world(device: str = "cpu") -> World:
    """The current process group (created from torchrun's environment on first use)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def all_reduce_gradients(model: torch.nn.Module, w: World) -> None:
    """Sum every parameter's gradient over the ranks."""
    if w.size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def all_reduce_sum(values: torch.Tensor, w: World) -> torch.Tensor:
    if w.size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather(t: torch.Tensor, w: World) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order (on every rank; sizes may differ)."""
    if w.size == 1:
        return t
    if t.dtype == torch.bool:  # not every backend reduces bools
        return gather(t.to(torch.uint8), w).bool()
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(w.size)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long))
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype)
    padded[:t.shape[0]] = t.cpu()
    parts = [torch.zeros_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def barrier(w: World) -> None:
    if w.size > 1:
        dist.barrier()
