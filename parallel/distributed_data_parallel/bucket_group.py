"""The per-bucket communication state machine: collect ready grads → start → finish.

States of a :class:`BucketGroup` during one synchronisation::

    IDLE ──(all params' grads in, or the DDP's start_grad_sync())──▶ IN_FLIGHT
    IN_FLIGHT (hook's PendingReduction held) ──finish_grad_sync()──▶ IDLE

With ``overlap_grad_reduce`` the DDP wrapper calls :meth:`register_grad_ready` from the backward
hooks and starts the collective the moment the last parameter of the group reports in (subject to
launch order, see ``DistributedDataParallel._launch_ready_groups``). Without overlap everything
is started and waited for in ``finish_grad_sync``.
"""

from __future__ import annotations

import torch

from parallel.ddp_comm_hooks.default_hooks import CommHook, GradBucket, PendingReduction
from parallel.distributed_data_parallel.param_and_grad_buffer import Bucket


class BucketGroup:
    """Buckets whose gradients are communicated together by one comm hook call each."""

    def __init__(
        self,
        buckets: list[Bucket],
        comm_hook: CommHook,
        rank: int,
        world_size: int,
        average_in_collective: bool,
    ) -> None:
        self.buckets = buckets
        self.comm_hook = comm_hook
        self.rank, self.world_size = rank, world_size
        self.average_in_collective = average_in_collective
        self.is_last = False  # set by the DDP wrapper on the group launched last
        self.params = {p for b in buckets for p in b.params}
        self.params_with_grad: set[torch.nn.Parameter] = set()
        self.pending: list[PendingReduction] | None = None

    @property
    def started(self) -> bool:
        return self.pending is not None

    @property
    def ready(self) -> bool:
        """All of this group's parameters have their gradient accumulated for this step."""
        return len(self.params_with_grad) == len(self.params)

    def register_grad_ready(self, param: torch.nn.Parameter) -> None:
        assert param in self.params, "parameter does not belong to this bucket group"
        assert not self.started, "gradient arrived after the bucket's reduction started"
        self.params_with_grad.add(param)

    def _hook_view(self, bucket: Bucket, is_last: bool) -> GradBucket:
        ranges = list(bucket.param_ranges.values())
        return GradBucket(
            index=bucket.index,
            buffer=bucket.grad_data,
            param_ranges=ranges,
            param_shapes=[p.shape for p in bucket.param_ranges],
            is_last=is_last,
            rank=self.rank,
            world_size=self.world_size,
            average_in_collective=self.average_in_collective,
        )

    def start_grad_sync(self) -> None:
        """Launch the comm hook on every bucket (async); returns without waiting."""
        assert not self.started, "grad sync already in flight for this bucket group"
        self.pending = [
            self.comm_hook(self._hook_view(b, self.is_last and i == len(self.buckets) - 1))
            for i, b in enumerate(self.buckets)
        ]

    def finish_grad_sync(self) -> None:
        """Wait for this group's reductions; afterwards ``grad_data`` holds averaged grads."""
        assert self.started, "finish_grad_sync before start_grad_sync (the DDP wrapper starts it)"
        for bucket, pending in zip(self.buckets, self.pending, strict=True):
            result = pending.wait()
            if result.data_ptr() != bucket.grad_data.data_ptr():
                bucket.grad_data.copy_(result)
        self.reset()

    def reset(self) -> None:
        """Back to IDLE for the next synchronisation (drops a reduction that was never awaited)."""
        self.params_with_grad.clear()
        self.pending = None
