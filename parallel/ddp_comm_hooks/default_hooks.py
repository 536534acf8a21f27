"""The comm-hook interface and the plain hooks: all-reduce and reduce-scatter.

A comm hook is any callable ``hook(bucket: GradBucket) -> PendingReduction``. It receives one
bucket's flat gradient tensor (a view into the DDP grad buffer, padding included), launches its
collective(s) asynchronously and returns at once; ``PendingReduction.wait()`` blocks until the
communication is done and returns the AVERAGED gradient (normally ``bucket.buffer`` itself,
updated in place). The DDP bucket group calls the hook as soon as the bucket's gradients are
ready (``overlap_grad_reduce``) and calls ``wait()`` in ``finish_grad_sync``.

Averaging (``GradBucket.average_in_collective``):
  True  → the collective averages (``ReduceOp.AVG``; NCCL pre-multiplies by 1/N inside the
          kernel, gloo divides after summing).
  False → the buffer is scaled by 1/N *before* a SUM collective, which keeps low-precision
          partial sums in range (Megatron's "gradient scaling factor").
Compression hooks always pre-scale, because their narrow dtype could overflow in the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from parallel.dist_context import all_reduce, reduce_scatter

if TYPE_CHECKING:  # a runtime import would be circular (the DDP package imports the hooks)
    from parallel.distributed_data_parallel.param_and_grad_buffer import Range


@dataclass
class GradBucket:
    """What a hook sees of one bucket.

    ``buffer``: 1-D gradient tensor of the bucket (dtype = the DDP grad dtype), padded to a
    multiple of ``world_size``; padding entries are zero. ``param_ranges``/``param_shapes``: for
    every parameter of the bucket, its range inside ``buffer`` and its shape (PowerSGD views each
    one as a matrix). ``is_last``: the last bucket of a synchronisation, so stateful hooks can
    count iterations.
    """

    index: int
    buffer: torch.Tensor
    param_ranges: Sequence[Range]
    param_shapes: Sequence[torch.Size]
    is_last: bool
    rank: int
    world_size: int
    average_in_collective: bool = False


class Waitable(Protocol):
    def wait(self) -> object: ...


class PendingReduction:
    """An in-flight reduction: ``wait()`` waits for ``works`` and returns ``finish()``.

    ``finish`` runs on the caller's thread after the collectives completed (decompression, the
    second PowerSGD round, ...) and returns the averaged gradient tensor.
    """

    def __init__(self, works: Sequence[Waitable], finish: Callable[[], torch.Tensor]) -> None:
        self._works = works
        self._finish = finish

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        return self._finish()


CommHook = Callable[[GradBucket], PendingReduction]


def allreduce_hook(bucket: GradBucket) -> PendingReduction:
    """Average ``bucket.buffer`` over ranks in place with one all-reduce (the default hook)."""
    buf = bucket.buffer
    if bucket.average_in_collective:
        work = all_reduce(buf, bucket.world_size, op="avg", async_op=True)
    else:
        buf.mul_(1.0 / bucket.world_size)
        work = all_reduce(buf, bucket.world_size, op="sum", async_op=True)
    return PendingReduction([work], lambda: buf)


def reduce_scatter_hook(bucket: GradBucket) -> PendingReduction:
    """Average only this rank's shard of the bucket (ZeRO-1): chunk ``rank`` of ``buffer``.

    After ``wait()`` the shard ``buffer[rank*n:(rank+1)*n]`` (n = numel / world_size) holds the
    average over ranks; the rest of the buffer is stale and must not be used.
    """
    buf = bucket.buffer
    n = buf.numel() // bucket.world_size
    assert n * bucket.world_size == buf.numel(), "bucket must be padded to the world size"
    buf.mul_(1.0 / bucket.world_size)
    shard = buf[bucket.rank * n : (bucket.rank + 1) * n]
    work = reduce_scatter(shard, buf, bucket.world_size, async_op=True)
    return PendingReduction([work], lambda: buf)
