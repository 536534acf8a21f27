"""SwiGLU gating ``silu(gate) * up`` as a Triton kernel, forward and backward.

Reference it must equal::

    def swiglu_ref(gate, up):
        return torch.nn.functional.silu(gate) * up

``gate`` and ``up`` have the same shape and dtype (any shape, e.g. ``(B, T, hidden_dim)``); the
result has that shape and dtype. The math runs in fp32 and is rounded once, so in bf16 it can
differ from the reference (which rounds ``silu(gate)`` before the product) by one rounding step.

With ``s = sigmoid(gate)``::

    d_up   = dy * gate * s
    d_gate = dy * up * s * (1 + gate * (1 - s))

Inputs that are not contiguous (e.g. the two halves of a fused gate/up projection) are copied
to contiguous memory first; the kernel itself walks a flat array in blocks of ``BLOCK``.
"""

import torch
import triton
import triton.language as tl

from model.kernels.triton_utils import cast_rtne

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + offs, cast_rtne(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dup = dy * g * s
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dgate_ptr + offs, cast_rtne(dgate, dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, cast_rtne(dup, dup_ptr.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        if n > 0:
            _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n > 0:
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                dy, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=4
            )
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise for same-shape, same-dtype tensors; see module doc."""
    assert gate.shape == up.shape and gate.dtype == up.dtype, (
        f"swiglu: gate {tuple(gate.shape)} {gate.dtype} vs up {tuple(up.shape)} {up.dtype}"
    )
    return _SwiGLU.apply(gate, up)
