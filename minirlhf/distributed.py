"""Several processes, one model: data-parallel training under torchrun, and nothing at all alone.

    torchrun --standalone --nproc_per_node 4 train_sft.py                 # 4 GPUs (nccl)
    torchrun --standalone --nproc_per_node 2 train_dpo.py --device cpu    # 2 CPU processes (gloo)

torchrun starts N copies of a script and tells each its RANK (0..N−1), LOCAL_RANK (its GPU on this
machine) and WORLD_SIZE (N). Every copy holds the whole model. Each step, each copy runs forward
and backward on its own share of the batch, and DistributedDataParallel (DDP) averages the
gradients of the copies during backward, so all copies take the same optimizer step and their
weights stay the same. N processes on B/N examples each are then one process on B examples:
--batch-size stays the global batch, and learning rates and step counts mean what they mean alone.

Rank 0 is the one that talks: only it prints (the others' stdout goes to /dev/null; errors still
reach stderr), shows progress bars and writes files — checkpoints, metrics.jsonl, eval.json,
preference pairs. Without torchrun (WORLD_SIZE unset or 1) `setup` returns a `Dist` of one process
and every helper here hands its input back untouched, so a run alone is exactly what it was.

Left out on purpose: several machines (torchrun's --nnodes should work, but is untested), sharded
optimizer states or weights (ZeRO, FSDP): every model here fits one GPU.
"""
from __future__ import annotations

import atexit
import os
import sys
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from .masking import masked_mean, masked_sum, masked_var


class Dist(NamedTuple):
    """Who this process is among torchrun's processes."""
    rank: int             # 0..world_size−1; 0 when alone
    world_size: int       # how many processes train together; 1 when alone
    device: torch.device  # where this process computes: cuda:LOCAL_RANK under torchrun on GPUs

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0


def setup(device: torch.device) -> Dist:
    """Join torchrun's process group if WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); else nothing.

    The group is left when the process exits, not at the end of a stage: rank 0 still evaluates
    and writes when the others are done, and a process that runs several stages in a row (as
    tests/test_ddp.py does) keeps one group: the others wait for rank 0 at the next stage's first
    collective. (A group left and joined again while rank 0 is still busy breaks gloo.)
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(0, 1, device)
    if not tdist.is_available():
        raise ValueError("torch.distributed is not available in this PyTorch build")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} of this machine has no GPU of its own "
                             f"({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():  # a later stage in the same process reuses the group
        # rank 0 writes preference pairs and evaluates alone while the others wait: allow an hour
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                 timeout=timedelta(hours=1))
        atexit.register(tdist.destroy_process_group)
        if rank != 0:
            sys.stdout = open(os.devnull, "w")  # one copy of every log line: rank 0's
    return Dist(rank, world_size, device)


class _MethodAsForward(torch.nn.Module):
    """A module whose forward is another method of `model`, e.g. the reward model's `score`."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


def wrap(model: torch.nn.Module, dist: Dist, method: str = "forward"):
    """What a training step calls the model through: DDP(model) under torchrun, so that backward
    averages the gradients over the processes; the model itself when alone.

    DDP averages gradients only for calls of its own forward, so a model trained through another
    method (`method="score"`) is wrapped as a module whose forward is that method; alone, the
    bound method is returned. Checkpoints are saved from `model`, never from the wrapper, so
    their keys get no `module.` prefix.
    """
    if dist.world_size == 1:
        return model if method == "forward" else getattr(model, method)
    if method != "forward":
        model = _MethodAsForward(model, method)
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard(items, dist: Dist):
    """This process's share of a global batch: items rank, rank + N, rank + 2N, ... Strided, so
    that each share spans the batch's lengths (batches are grouped by length). Every share has
    the same size, so DDP's plain average of the ranks' gradients is the whole batch's."""
    if dist.world_size == 1:
        return items
    if len(items) % dist.world_size:
        raise ValueError(f"a batch of {len(items)} does not split evenly over "
                         f"{dist.world_size} processes")
    return items[dist.rank::dist.world_size]


def all_reduce_sum(x, dist: Dist):
    """Σ over the processes of a number, a list of numbers (-> floats) or a tensor."""
    if dist.world_size == 1:
        return x
    if isinstance(x, torch.Tensor):
        total = x.detach().clone()
        tdist.all_reduce(total)
        return total
    total = torch.tensor(x, dtype=torch.float64, device=dist.device)
    tdist.all_reduce(total)
    return total.tolist()


def mean_over_ranks(row: dict, dist: Dist) -> dict:
    """A row of numbers (a metrics line), each averaged over the processes; a None is left out
    of its average (None where no process has a number). Each process holds an equal share of
    the batch, so the mean of the processes' batch means is the whole batch's mean."""
    if dist.world_size == 1:
        return row
    keys = list(row)
    values = [0.0 if row[k] is None else float(row[k]) for k in keys]
    counts = [0.0 if row[k] is None else 1.0 for k in keys]
    totals = all_reduce_sum(values + counts, dist)
    sums, ns = totals[:len(keys)], totals[len(keys):]
    return {k: s / n if n else None for k, s, n in zip(keys, sums, ns)}


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, dist: Dist):
    """(mean, variance) of x's real entries over every process, as `masking.masked_var` computes
    them on one: PPO whitens advantages with the statistics of the whole rollout."""
    if dist.world_size == 1:
        return masked_mean(x, mask), masked_var(x, mask)
    n, total = all_reduce_sum(torch.stack([masked_sum(torch.ones_like(x), mask),
                                           masked_sum(x, mask)]), dist)
    mean = total / n.clamp(min=1)
    var = all_reduce_sum(masked_sum((x - mean) ** 2, mask), dist) / n.clamp(min=1)
    return mean, var


def broadcast(value, dist: Dist):
    """Rank 0's value (any picklable object) on every process, e.g. its early-stopping verdict."""
    if dist.world_size == 1:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: Dist) -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a file the others read)."""
    if dist.world_size == 1:
        return
    if dist.device.type == "cuda":
        tdist.barrier(device_ids=[dist.device.index])
    else:
        tdist.barrier()
