"""Step the optimizer bucket by bucket, as soon as each bucket's averaged gradient is ready.

:class:`BucketwiseOptimizer` keeps one optimizer per DDP bucket group (same hyper-parameters,
param groups split by bucket). ``step()`` waits for bucket 0's reduction, steps bucket 0's
parameters while buckets 1.. are still in flight, and so on: the optimizer maths of early buckets
overlaps the communication of later ones.

When stepping must NOT happen per bucket — global-norm clipping (``grad_clip > 0``) or loss
scaling (``loss_scale`` given) — the step is deferred: all buckets are reduced first, the grads
are unscaled, the global norm over every parameter is computed, a non-finite norm skips the step
(the loss scaler then backs off), and only then is each bucket stepped with the GLOBAL clip
coefficient. Clipping each bucket by its own norm (a bug of the original llm-zero2all) changes
the update direction and is never done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from parallel.distributed_data_parallel.distributed_data_parallel import DistributedDataParallel


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm over all ``param.main_grad`` (fp32 scalar). DDP grads are replicated on every
    rank after the sync, so no collective is needed."""
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.main_grad.float()) for p in params])
    )


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Same formula as ``torch.nn.utils.clip_grad_norm_``: min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


class BucketwiseOptimizer:
    """One optimizer per DDP bucket group, stepped as each group's reduction finishes.

    Args:
        ddp: the wrapped model; its grads are read from ``param.main_grad``.
        param_groups: torch-style groups (``{"params": [...], "weight_decay": ...}``) covering
            the model's trainable parameters.
        make_optimizer: builds an optimizer from param groups, e.g.
            ``lambda groups: torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))``.
        grad_clip: global-norm clipping threshold (0 = off).
    """

    def __init__(
        self,
        ddp: DistributedDataParallel,
        param_groups: list[dict[str, Any]],
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        grad_clip: float = 0.0,
    ) -> None:
        self.ddp = ddp
        self.grad_clip = grad_clip
        self.params = [p for g in ddp.bucket_groups for b in g.buckets for p in b.params]
        self.optimizers = []
        for bucket_group in ddp.bucket_groups:
            groups = [
                {**g, "params": [p for p in g["params"] if p in bucket_group.params]}
                for g in param_groups
            ]
            self.optimizers.append(make_optimizer([g for g in groups if g["params"]]))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every sub-optimizer's groups (set ``lr`` on all of them for a schedule)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    def _step_group(self, index: int, scale: torch.Tensor | None = None) -> None:
        params = [p for b in self.ddp.bucket_groups[index].buckets for p in b.params]
        for p in params:
            grad = p.main_grad if scale is None else p.main_grad * scale
            p.grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)
        self.optimizers[index].step()
        for p in params:
            p.grad = None  # never let autograd accumulate into the buffer view

    def step(self, loss_scale: float | None = None) -> torch.Tensor | None:
        """Finish the grad sync and step; returns the global grad norm when it was computed.

        Per-bucket (overlapped) when neither clipping nor loss scaling is active; otherwise
        deferred until the global norm is known (a non-finite norm skips the step).
        """
        if self.grad_clip <= 0 and loss_scale is None:
            for index, _ in enumerate(self.ddp.iter_finished_groups()):
                self._step_group(index)
            return None
        self.ddp.finish_grad_sync()
        if loss_scale is not None:
            for p in self.params:
                p.main_grad.mul_(1.0 / loss_scale)
        norm = global_grad_norm(self.params)
        if not torch.isfinite(norm):
            return norm
        scale = clip_coefficient(norm, self.grad_clip) if self.grad_clip > 0 else None
        for index in range(len(self.optimizers)):
            self._step_group(index, scale)
        return norm

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert len(state["optimizers"]) == len(self.optimizers), "bucket layout changed"
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
