"""DDP communication hooks: how one bucket of gradients is averaged over ranks.

``--comm_hook=allreduce|fp16|bf16|powersgd`` selects one through :func:`make_comm_hook`.
The interface (``GradBucket`` in, ``PendingReduction`` out) is documented in ``default_hooks``.
"""

from __future__ import annotations

from parallel.ddp_comm_hooks.compression_hooks import bf16_compress_hook, fp16_compress_hook
from parallel.ddp_comm_hooks.default_hooks import (
    CommHook,
    GradBucket,
    PendingReduction,
    allreduce_hook,
    reduce_scatter_hook,
)
from parallel.ddp_comm_hooks.powersgd_hook import PowerSGDHook
from utils.errors import ConfigError

COMM_HOOKS = ("allreduce", "fp16", "bf16", "powersgd")


def make_comm_hook(
    name: str,
    powersgd_rank: int = 1,
    powersgd_start_iter: int = 10,
    powersgd_min_compression_rate: float = 2.0,
    seed: int = 0,
) -> CommHook:
    """The hook for ``--comm_hook=name`` (PowerSGD: a fresh stateful :class:`PowerSGDHook`)."""
    if name == "allreduce":
        return allreduce_hook
    if name == "fp16":
        return fp16_compress_hook
    if name == "bf16":
        return bf16_compress_hook
    if name == "powersgd":
        return PowerSGDHook(
            matrix_approximation_rank=powersgd_rank,
            start_iter=powersgd_start_iter,
            min_compression_rate=powersgd_min_compression_rate,
            seed=seed,
        )
    raise ConfigError(f"comm_hook: unknown value {name!r}; expected one of {', '.join(COMM_HOOKS)}")


__all__ = [
    "COMM_HOOKS",
    "CommHook",
    "GradBucket",
    "PendingReduction",
    "PowerSGDHook",
    "allreduce_hook",
    "bf16_compress_hook",
    "fp16_compress_hook",
    "make_comm_hook",
    "reduce_scatter_hook",
]
