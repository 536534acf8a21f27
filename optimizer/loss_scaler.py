"""Loss scaling for float16 training (Micikevicius et al., 2018, https://arxiv.org/abs/1710.03740).

fp16 gradients underflow for small values, so the loss is multiplied by ``scale`` before backward
and the gradients divided by it before the step. When any gradient overflows (inf/nan) the step
is skipped and the scale halved; after ``growth_interval`` clean steps it doubles again.
bfloat16 and float32 have fp32's exponent range and use :class:`ConstantLossScaler` (scale 1).
"""

from __future__ import annotations

from typing import Any


class ConstantLossScaler:
    """No scaling: the loss scale is fixed (1.0 for fp32/bf16)."""

    dynamic = False

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def scale_loss(self, loss: "torch.Tensor") -> "torch.Tensor":
        """The loss times the current scale, to call ``backward()`` on (unchanged at scale 1)."""
        return loss * self.scale if self.scale != 1.0 else loss

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler(ConstantLossScaler):
    """Halve on overflow, double after ``growth_interval`` consecutive good steps."""

    dynamic = True

    def __init__(
        self,
        initial_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
    ) -> None:
        super().__init__(initial_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state.get("good_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
