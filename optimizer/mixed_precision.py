"""AdamW with fp32 master weights, dynamic loss scaling and global-norm clipping.

The model's parameters live in the training dtype (fp32, bf16 or fp16). For bf16/fp16 this
wrapper keeps an fp32 *master* copy of every parameter; the optimizer (and its state) only ever
sees the masters, and after each step the masters are copied back into the model. For fp32 the
masters are the model parameters themselves: no copies.

Gradients are read from ``param.main_grad`` when a data-parallel wrapper provides it (a view into
its contiguous, usually fp32, gradient buffer — the Megatron-LM convention) and from
``param.grad`` otherwise.

One step reads (Megatron's ``prepare_grads → clip_grad_norm → step_with_ready_grads``)::

    prepare_grads()        model grads → master grads (fp32), divided by the loss scale
    clip_grad_norm()       global L2 norm; inf/nan means fp16 overflow → skip the step
    step_with_ready_grads  AdamW on the masters, then masters → model params
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optimizer.loss_scaler import ConstantLossScaler, DynamicLossScaler


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (linear and embedding weights), none on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_loss_scaler(dtype: torch.dtype, initial_scale: float = 2.0**16) -> ConstantLossScaler:
    return DynamicLossScaler(initial_scale) if dtype == torch.float16 else ConstantLossScaler(1.0)


@dataclass
class StepResult:
    stepped: bool  # False when the step was skipped for an fp16 overflow
    grad_norm: float  # global L2 norm before clipping (inf/nan when skipped)
    loss_scale: float  # the scale used for this step's backward


def model_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient of a model parameter: the DDP buffer view when present, else ``.grad``."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


class MixedPrecisionOptimizer:
    """AdamW over fp32 master weights of ``model`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        grad_clip: float = 0.0,
        loss_scaler: ConstantLossScaler | None = None,
    ) -> None:
        self.grad_clip = grad_clip
        self.loss_scaler = loss_scaler if loss_scaler is not None else ConstantLossScaler()
        self.model_groups = param_groups(model, weight_decay)
        self.model_params = [p for g in self.model_groups for p in g["params"]]
        self.keeps_masters = any(p.dtype != torch.float32 for p in self.model_params)
        if self.keeps_masters:
            master_groups = [
                {**g, "params": [nn.Parameter(p.detach().float().clone()) for p in g["params"]]}
                for g in self.model_groups
            ]
        else:
            master_groups = self.model_groups
        self.master_params = [p for g in master_groups for p in g["params"]]
        fused = all(p.is_cuda for p in self.master_params)
        self.optimizer = torch.optim.AdamW(
            master_groups, lr=lr, betas=betas, eps=eps, fused=fused or None
        )

    # -- the loss side ---------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.loss_scaler.scale_loss(loss)

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None
        if self.keeps_masters:
            for m in self.master_params:
                m.grad = None

    # -- the step ----------------------------------------------------------------------------
    def prepare_grads(self) -> list[torch.Tensor]:
        """Move model grads onto the masters (fp32) and undo the loss scale. Returns the grads."""
        grads = []
        for p, m in zip(self.model_params, self.master_params):
            g = model_grad(p)
            if g is None:
                m.grad = None
                continue
            m.grad = g if g.dtype == torch.float32 else g.float()
            grads.append(m.grad)
        if self.loss_scaler.scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scaler.scale)
        return grads

    def global_grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm over all gradients (full gradients are present on every rank with DDP)."""
        if not grads:
            return torch.zeros((), device=self.master_params[0].device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)

    def clip_grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        norm = self.global_grad_norm(grads)
        if self.grad_clip > 0 and torch.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_(
                [m for m in self.master_params if m.grad is not None], self.grad_clip, norm, foreach=True
            )
        return norm

    @torch.no_grad()
    def step_with_ready_grads(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.keeps_masters:
            torch._foreach_copy_(self.model_params, self.master_params)

    def step(self, lr: float) -> StepResult:
        """One optimizer step; skipped (and counted by the loss scaler) on an fp16 overflow."""
        scale = self.loss_scaler.scale
        grads = self.prepare_grads()
        norm = self.clip_grad_norm(grads)
        found_inf = not bool(torch.isfinite(norm))
        if found_inf and not self.loss_scaler.dynamic:
            raise FloatingPointError(
                f"gradient norm is {norm.item()} in {self._dtype_name()} training: the loss diverged"
            )
        self.loss_scaler.update(found_inf)
        if not found_inf:
            self.step_with_ready_grads(lr)
        return StepResult(stepped=not found_inf, grad_norm=float(norm), loss_scale=scale)

    def _dtype_name(self) -> str:
        return str(self.model_params[0].dtype).replace("torch.", "")

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "loss_scaler": self.loss_scaler.state_dict()}
        if self.keeps_masters:
            state["master_params"] = [m.detach().clone() for m in self.master_params]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        if self.keeps_masters:
            masters = state["master_params"]
            assert len(masters) == len(self.master_params), (len(masters), len(self.master_params))
            for m, saved in zip(self.master_params, masters):
                m.copy_(saved)
            torch._foreach_copy_(self.model_params, self.master_params)
