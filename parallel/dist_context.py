"""Process-group set-up and the few collectives the project uses, all in one greppable place.

A training run is either a single process (``python train.py``) or one process per device under
``torchrun``. :func:`init_distributed` reads torchrun's environment and returns a frozen
:class:`DistContext` that is passed explicitly to everything that needs the rank or the device;
nothing else in the project reads ``RANK``/``WORLD_SIZE`` or calls ``torch.distributed`` directly.

Backend choice: CUDA available → ``nccl`` and ``cuda:LOCAL_RANK``; otherwise ``gloo`` and ``cpu``.
On CPU each rank gets ``max(1, cpu_count // LOCAL_WORLD_SIZE)`` intra-op threads, so N ranks on
one machine do not oversubscribe the cores (PyTorch's default is "all cores" in every rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the run. ``world_size == 1`` means no process group exists."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes files and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed() -> DistContext:
    """Create the process group when launched by torchrun, else describe a single process.

    Safe to call when a process group already exists (tests create one themselves): the existing
    group is reused.
    """
    use_cuda = torch.cuda.is_available()
    if not _launched_by_torchrun():
        device = torch.device("cuda:0" if use_cuda else "cpu")
        return DistContext(0, 1, 0, device, "nccl" if use_cuda else "gloo")

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if use_cuda:
        backend, device = "nccl", torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device, backend)


def destroy_distributed() -> None:
    """Tear down the process group if one exists (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class CompletedWork:
    """Stands in for a ``torch.distributed.Work`` when there is nothing to communicate (1 rank)."""

    def wait(self) -> bool:
        return True


def all_reduce(
    tensor: torch.Tensor, world_size: int, op: str = "sum", async_op: bool = False
) -> dist.Work | CompletedWork:
    """In-place all-reduce of ``tensor`` over the default group; ``op`` is sum | avg | max.

    Returns a work handle (call ``.wait()``); with ``async_op=False`` it is already complete.
    With one rank nothing happens (``avg``/``sum``/``max`` of one value is the value).
    """
    if world_size == 1:
        return CompletedWork()
    reduce_op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX}[op]
    work = dist.all_reduce(tensor, op=reduce_op, async_op=True)
    if not async_op:
        work.wait()
    return work


def reduce_scatter(
    output: torch.Tensor, input: torch.Tensor, world_size: int, async_op: bool = False
) -> dist.Work | CompletedWork:
    """Sum ``input`` (numel = world_size × output.numel()) over ranks; rank r keeps chunk r.

    ``output`` may be a view of chunk r of ``input`` (the ZeRO-1 in-place pattern).
    """
    if world_size == 1:
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)
        return CompletedWork()
    work = dist.reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, async_op=True)
    if not async_op:
        work.wait()
    return work


def all_gather(
    output: torch.Tensor, input: torch.Tensor, world_size: int, async_op: bool = False
) -> dist.Work | CompletedWork:
    """Concatenate every rank's ``input`` into ``output`` (numel = world_size × input.numel())."""
    if world_size == 1:
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)
        return CompletedWork()
    work = dist.all_gather_single(output, input, async_op=True)
    if not async_op:
        work.wait()
    return work


def broadcast(tensor: torch.Tensor, world_size: int, src: int = 0) -> None:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values (synchronous)."""
    if world_size > 1:
        dist.broadcast(tensor, src=src)


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
