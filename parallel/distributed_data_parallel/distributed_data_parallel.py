"""Hand-written data parallelism: a thin module wrapper over grad buffers and bucket groups.

Gradient contract (Megatron-style), what the optimizer wrapper relies on:

* every trainable parameter gets ``param.main_grad``, a view into a contiguous grad buffer whose
  dtype is fp32 when ``grad_reduce_in_fp32`` or the params are fp32, else the param dtype;
* a post-accumulate-grad hook moves ``param.grad`` into ``main_grad`` and frees ``param.grad``,
  so after backward ``param.grad is None`` and the optimizer must read ``param.main_grad``;
  the first gradient of a step is copied in, later ones (accumulation micro-steps) are added;
* after :meth:`finish_grad_sync` every ``main_grad`` holds the gradient averaged over ranks
  (summed over this step's micro-batches — the training loop scales the loss for accumulation);
* :meth:`zero_grad_buffer` starts the next step: the buffers are not zero-filled (a memory pass
  over every gradient per step, which PyTorch's DDP avoids too); instead the next step's first
  gradient overwrites each ``main_grad``, and a parameter that got no gradient by the time its
  bucket is reduced has its ``main_grad`` zeroed then. Bucket padding is zero from the start and
  stays zero (no gradient writes it; every collective of zeros gives zeros).

One training step::

    ddp.zero_grad_buffer()
    for micro in range(k):
        with ddp.no_sync() if micro < k - 1 else nullcontext():   # no communication
            loss = ddp(x[micro], labels=y[micro]).loss / k
            loss.backward()                                       # last one: buckets launch
    ddp.finish_grad_sync()                                        # wait for all buckets
    optimizer.step()                                              # reads param.main_grad
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from parallel.ddp_comm_hooks.default_hooks import CommHook, allreduce_hook
from parallel.dist_context import DistContext
from parallel.distributed_data_parallel.bucket_group import BucketGroup
from parallel.distributed_data_parallel.param_and_grad_buffer import Bucket, ParamAndGradBuffer

logger = logging.getLogger(__name__)


class DistributedDataParallel(nn.Module):
    """Wrap ``module`` for data-parallel training over ``ctx.world_size`` ranks.

    Args:
        module: the model; its parameters are moved into contiguous buffers (``param.data``
            becomes a view, values unchanged) and broadcast from rank 0.
        bucket_size: elements per bucket (≈; a bucket closes once it reaches this size);
            ``None`` = one bucket per buffer.
        overlap_grad_reduce: start each bucket's collective during backward, as soon as all its
            gradients are in; otherwise everything is communicated in ``finish_grad_sync``.
        grad_reduce_in_fp32: accumulate and reduce gradients in fp32 even for bf16/fp16 params.
        average_in_collective: average with ``ReduceOp.AVG`` (True) or scale by 1/N before a
            SUM (False); see ``parallel/ddp_comm_hooks/default_hooks.py``.
        comm_hook: how a bucket is reduced (default: all-reduce).
        bucket_align: every bucket is padded to a multiple of lcm(world_size, bucket_align).
    """

    def __init__(
        self,
        module: nn.Module,
        ctx: DistContext,
        bucket_size: int | None = 40_000_000,
        overlap_grad_reduce: bool = False,
        grad_reduce_in_fp32: bool = False,
        average_in_collective: bool = False,
        comm_hook: CommHook | None = None,
        bucket_align: int = 64,
    ) -> None:
        super().__init__()
        self.module = module
        self.ctx = ctx
        self.overlap_grad_reduce = overlap_grad_reduce
        self._sync_enabled = True
        self.buffers_by_dtype = self._build_buffers(bucket_size, grad_reduce_in_fp32, bucket_align)
        assert self.buffers_by_dtype, "DistributedDataParallel: the module has no trainable params"
        self.bucket_groups = [
            BucketGroup([b], comm_hook or allreduce_hook, ctx.rank, ctx.world_size,
                        average_in_collective)
            for b in self.buckets
        ]
        self.bucket_groups[-1].is_last = True
        self._group_of = {p: g for g in self.bucket_groups for p in g.params}
        self._next_group_to_start = 0
        self._grad_in_buffer: set[nn.Parameter] = set()  # params with a gradient this step
        for buffer in self.buffers_by_dtype.values():
            buffer.broadcast_params(ctx.world_size)
        self._hook_handles = [
            p.register_post_accumulate_grad_hook(self._on_grad_accumulated) for p in self._group_of
        ]
        logger.info(
            "DDP: %d bucket(s) of %s elements, grad dtype(s) %s, overlap_grad_reduce=%s",
            len(self.buckets), [b.grad_data.numel() for b in self.buckets],
            sorted({str(b.grad_data.dtype) for b in self.buckets}), overlap_grad_reduce,
        )

    def _build_buffers(
        self, bucket_size: int | None, grad_reduce_in_fp32: bool, bucket_align: int
    ) -> dict[torch.dtype, ParamAndGradBuffer]:
        params_by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.module.parameters():  # deduplicated: tied weights appear once
            if p.requires_grad:
                params_by_dtype.setdefault(p.dtype, []).append(p)
        buffers, n_buckets = {}, 0
        for dtype, params in params_by_dtype.items():
            grad_dtype = torch.float32 if grad_reduce_in_fp32 else dtype
            buffers[dtype] = ParamAndGradBuffer(
                params, grad_dtype, bucket_size, self.ctx.world_size,
                bucket_index_offset=n_buckets, bucket_align=bucket_align,
            )
            n_buckets += len(buffers[dtype].buckets)
        return buffers

    @property
    def buckets(self) -> list[Bucket]:
        """All buckets in launch order (per buffer: reverse parameter order)."""
        return [b for buffer in self.buffers_by_dtype.values() for b in buffer.buckets]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def comm_hook_state_dict(self) -> dict:
        """State of a stateful comm hook (PowerSGD: error buffers, Q, RNG, iteration), ``{}``
        for stateless ones. It differs per rank: checkpoint one per rank."""
        hook = self.bucket_groups[0].comm_hook
        return hook.state_dict() if hasattr(hook, "state_dict") else {}

    def load_comm_hook_state_dict(self, state: dict) -> None:
        if state:
            self.bucket_groups[0].comm_hook.load_state_dict(state)

    def _on_grad_accumulated(self, param: nn.Parameter) -> None:
        """Backward hook: move ``param.grad`` into the buffer; maybe launch its bucket."""
        if param in self._grad_in_buffer:
            param.main_grad.add_(param.grad)
        else:  # first gradient this step: overwrite last step's value (no zero-fill needed)
            param.main_grad.copy_(param.grad)
            self._grad_in_buffer.add(param)
        param.grad = None
        if self.overlap_grad_reduce and self._sync_enabled:
            self._group_of[param].register_grad_ready(param)
            self._launch_ready_groups()

    def _launch_ready_groups(self) -> None:
        """Start ready groups strictly in bucket order.

        Collectives must be issued in the same order on every rank (gloo and NCCL match them by
        order). Gradients usually become ready in bucket order anyway; if a later bucket is
        ready first, it waits for the earlier ones (as in PyTorch's DDP).
        """
        groups = self.bucket_groups
        while self._next_group_to_start < len(groups) and groups[self._next_group_to_start].ready:
            self._start_group(groups[self._next_group_to_start])
            self._next_group_to_start += 1

    def _start_group(self, group: BucketGroup) -> None:
        """Launch one group's reduction, first zeroing the ``main_grad`` of its parameters that
        got no gradient this step (unused in the forward): they still hold last step's value."""
        for p in group.params - self._grad_in_buffer:
            p.main_grad.zero_()
        group.start_grad_sync()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulation micro-steps: gradients accumulate into the buffer, nothing is sent."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def start_grad_sync(self) -> None:
        """Launch every group that has not started yet (in order); returns without waiting."""
        assert self._sync_enabled, "grad sync requested inside no_sync()"
        for group in self.bucket_groups[self._next_group_to_start :]:
            self._start_group(group)
        self._next_group_to_start = len(self.bucket_groups)

    def finish_grad_sync(self) -> None:
        """Block until every bucket holds the averaged gradient (``param.main_grad``)."""
        for _ in self.iter_finished_groups():
            pass

    def iter_finished_groups(self) -> Iterator[BucketGroup]:
        """``finish_grad_sync`` one group at a time, yielding each as soon as it is averaged.

        Lets a caller work on bucket k (e.g. step its parameters) while buckets k+1.. are still
        in flight; see ``parallel/ddp_comm_hooks/optimizer_hooks.py``.
        """
        self.start_grad_sync()
        for group in self.bucket_groups:
            group.finish_grad_sync()
            yield group
        self._next_group_to_start = 0

    def zero_grad_buffer(self) -> None:
        """Start a new step (call before each): the next gradients overwrite the buffers, which
        therefore need no zero-fill (see the module docstring); per-step state is forgotten."""
        self._grad_in_buffer.clear()
        for group in self.bucket_groups:
            group.reset()
        self._next_group_to_start = 0
        for p in self._group_of:
            p.grad = None
