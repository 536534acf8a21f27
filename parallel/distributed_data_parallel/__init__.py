"""Hand-written DDP (contiguous buffers, buckets, overlapped reduction) and the ``wrap_model``
factory that picks it or PyTorch's DDP (``--ddp_impl=my|torch``)."""

from __future__ import annotations

import logging

from torch import nn

from parallel.ddp_comm_hooks import make_comm_hook
from parallel.dist_context import DistContext
from parallel.distributed_data_parallel.distributed_data_parallel import DistributedDataParallel
from parallel.distributed_data_parallel.param_and_grad_buffer import (
    Bucket,
    BufferLayout,
    ParamAndGradBuffer,
    Range,
    compute_buffer_layout,
    shard_range,
)
from utils.errors import ConfigError

logger = logging.getLogger(__name__)

DDP_IMPLS = ("my", "torch")


def _torch_comm_hook(model: nn.parallel.DistributedDataParallel, name: str, **hook_opts) -> None:
    """Register PyTorch's own hook matching ``--comm_hook=name`` on a torch DDP model."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif name == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=hook_opts.get("powersgd_rank", 1),
            start_powerSGD_iter=hook_opts.get("powersgd_start_iter", 10),
            min_compression_rate=hook_opts.get("powersgd_min_compression_rate", 2.0),
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif name != "allreduce":
        make_comm_hook(name)  # raises the ConfigError naming the valid values


def wrap_model(
    model: nn.Module,
    ctx: DistContext,
    ddp_impl: str = "my",
    bucket_size: int | None = 40_000_000,
    overlap_grad_reduce: bool = False,
    grad_reduce_in_fp32: bool = False,
    average_in_collective: bool = False,
    comm_hook: str = "allreduce",
    **hook_opts,
) -> nn.Module:
    """Wrap ``model`` (already on ``ctx.device``) for data parallelism.

    ``ddp_impl="my"``: our :class:`DistributedDataParallel` (also on one rank, so the gradient
    contract — ``param.main_grad`` — is the same everywhere). ``"torch"``: PyTorch's DDP with the
    equivalent hook (the reference implementation); on one rank the model is returned unwrapped
    (torch DDP needs a process group) and gradients stay in ``param.grad``. ``hook_opts``:
    ``powersgd_rank``, ``powersgd_start_iter``, ``powersgd_min_compression_rate``, ``seed``.
    """
    if ddp_impl == "my":
        return DistributedDataParallel(
            model,
            ctx,
            bucket_size=bucket_size,
            overlap_grad_reduce=overlap_grad_reduce,
            grad_reduce_in_fp32=grad_reduce_in_fp32,
            average_in_collective=average_in_collective,
            comm_hook=make_comm_hook(comm_hook, **hook_opts),
        )
    if ddp_impl != "torch":
        raise ConfigError(f"ddp_impl: unknown value {ddp_impl!r}; expected one of my, torch")
    if ctx.world_size == 1:
        logger.info("ddp_impl=torch on a single process: model left unwrapped")
        return model
    bucket_cap_mb = None
    if bucket_size is not None:
        element_size = next(model.parameters()).element_size()
        bucket_cap_mb = bucket_size * element_size / 2**20
    wrapped = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        gradient_as_bucket_view=True,
    )
    _torch_comm_hook(wrapped, comm_hook, **hook_opts)
    return wrapped


__all__ = [
    "DDP_IMPLS",
    "Bucket",
    "BufferLayout",
    "DistributedDataParallel",
    "ParamAndGradBuffer",
    "Range",
    "compute_buffer_layout",
    "shard_range",
    "wrap_model",
]
