"""The kernel seam: one place that decides which implementation of each fused op the model uses.

Per op there is a pure-torch reference (`torch_ref.py`, the oracle and the CPU path) and a
Triton kernel with forward and backward (`triton_*.py`), plus an attention backend
(`attention.py`: flash-attn 2 or PyTorch SDPA). `get_kernels(mode)` picks once and logs the
choice:

- `torch`: the references everywhere, SDPA attention (the debugging baseline).
- `triton`: the Triton kernels; needs CUDA, or `TRITON_INTERPRET=1` to run them on CPU in
  Triton's interpreter (how the tests check them); anything missing is a ConfigError.
- `auto`: Triton on a CUDA machine when it imports (per op: a kernel that fails to import
  falls back to torch with a warning), else torch. In this mode a fused op called on a CPU
  tensor (a CPU model on a GPU machine) still runs the reference.
  Attention: flash-attn 2 when installed and CUDA is present, else SDPA.

Contracts (every implementation must satisfy them; tests/test_kernel_seam.py and the Triton
tests check the fused ones against `torch_ref`):

- `rms_norm(x [..., D], weight [D], eps) -> [..., D]`, HF Llama numerics (fp32 statistics).
- `apply_rotary(x [B, T, H, Dh], cos [B, T, Dh/2] fp32, sin) -> [B, T, H, Dh]`, half-split.
- `swiglu(gate, up) -> silu(gate) * up`.
- `linear_cross_entropy(hidden [N, D], weight [V, D], targets [N], ignore_index=-100)`
  -> fp32 scalar, the SUM of CE over non-ignored rows.
- `attention(q [B, Tq, H, Dh], k [B, Tk, Hkv, Dh], v, layout: AttentionLayout) -> [B, Tq, H, Dh]`.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from model.kernels import torch_ref
from model.kernels.attention import flash_attention, flash_attn_available, sdpa_attention
from utils.errors import ConfigError
from utils.logging_utils import get_logger, log_rank0

logger = get_logger(__name__)

MODES = ("auto", "torch", "triton")
# op name -> module in this package that defines a function of that name in Triton
TRITON_MODULES = {
    "rms_norm": "triton_rmsnorm",
    "apply_rotary": "triton_rope",
    "swiglu": "triton_swiglu",
    "linear_cross_entropy": "triton_cross_entropy",
}


@dataclass(frozen=True, eq=False)
class Kernels:
    """The chosen implementation of each op, plus the backend name per op for logging."""

    rms_norm: Callable[..., torch.Tensor]
    apply_rotary: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]
    linear_cross_entropy: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]
    backends: Mapping[str, str]  # op name -> "torch" | "triton" | "sdpa" | "flash_attn"

    def describe(self) -> str:
        return ", ".join(f"{op}={name}" for op, name in self.backends.items())


def get_kernels(mode: str = "auto") -> Kernels:
    """Select the kernels for `mode` (auto | torch | triton); the result is cached per set-up."""
    if mode not in MODES:
        raise ConfigError(f"kernels={mode!r} is not valid; choose one of {MODES}")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _select_kernels(mode, torch.cuda.is_available(), interpret)


@functools.cache
def _select_kernels(mode: str, has_cuda: bool, interpret: bool) -> Kernels:
    if mode == "triton" and not (has_cuda or interpret):
        raise ConfigError(
            "kernels=triton needs a CUDA device; to run the Triton kernels on CPU "
            "(slowly, in Triton's interpreter) set TRITON_INTERPRET=1 before "
            "starting Python, or use kernels=auto or kernels=torch"
        )
    ops: dict[str, Callable[..., torch.Tensor]] = {
        op: getattr(torch_ref, op) for op in TRITON_MODULES
    }
    backends = {op: "torch" for op in TRITON_MODULES}
    if mode == "triton" or (mode == "auto" and has_cuda):
        for op, module in TRITON_MODULES.items():
            fused = _import_triton_op(op, module, required=mode == "triton")
            if fused is not None:
                ops[op] = fused if mode == "triton" else _on_cuda(fused, ops[op])
                backends[op] = "triton"
    if mode != "torch" and has_cuda and flash_attn_available():
        attention, backends["attention"] = flash_attention, "flash_attn"
    else:
        attention, backends["attention"] = sdpa_attention, "sdpa"
    kernels = Kernels(attention=attention, backends=MappingProxyType(backends), **ops)
    log_rank0(logger, "kernels (mode=%s): %s", mode, kernels.describe())
    return kernels


def _import_triton_op(op: str, module: str, required: bool) -> Callable[..., torch.Tensor] | None:
    """model.kernels.<module>.<op>, imported lazily (Triton is optional on CPU machines)."""
    try:
        return getattr(importlib.import_module(f"model.kernels.{module}"), op)
    except (ImportError, AttributeError) as e:
        if required:
            raise ConfigError(
                f"kernels=triton: cannot load model.kernels.{module}.{op} ({e}); "
                "install triton or use kernels=auto / kernels=torch"
            ) from None
        logger.warning("Triton %s unavailable (%s); using the torch reference", op, e)
        return None


def _on_cuda(
    fused: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """Run `fused` on CUDA tensors and `reference` otherwise (auto mode on a GPU machine)."""

    @functools.wraps(fused)
    def op(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return fused(x, *args, **kwargs) if x.is_cuda else reference(x, *args, **kwargs)

    return op
