"""RMSNorm as a Triton kernel, forward and backward.

Reference it must equal (Hugging Face Llama order: normalise in fp32, cast back, then scale)::

    def rms_norm_ref(x, weight, eps):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

Shapes: ``x`` is ``[..., D]`` (any leading dims), ``weight`` is ``[D]``; the output has ``x``'s
shape and dtype ``torch.result_type(x, weight)``, like the reference.

Layout: one program per row in the forward pass; the reciprocal RMS of every row (fp32, ``[R]``)
is saved for the backward pass so it is not recomputed. The backward pass runs a fixed number of
programs, each walking a strided set of rows; each program keeps its own fp32 partial sum of
``dweight`` and the partials are summed with torch afterwards. That avoids atomics (so the same
code runs in Triton's CPU interpreter) and keeps ``dweight`` deterministic.

Gradients (n = x * rstd, g = dy * weight)::

    dweight = sum_rows(dy * n)
    dx      = rstd * (g - n * mean(g * n))
"""

import torch
import triton
import triton.language as tl

from model.kernels.triton_utils import cast_rtne

# Rows are held in registers whole; wider rows would need a looped kernel.
MAX_D = 16384
# Upper bound on the number of programs (and fp32 partial rows of dweight) in the backward pass.
MAX_BWD_PROGRAMS = 512


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, D, eps, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x_raw = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    # Round the normalised value to x's dtype before scaling, as the reference does; torch then
    # forms the product with the weight in fp32 and rounds it once, and so do we.
    n = cast_rtne(x * rstd, x_raw.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, cast_rtne(n * w, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, D,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for row in range(pid, n_rows, n_programs):
        offs = tl.cast(row, tl.int64) * D + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        g = dy * w
        dw += dy * n
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / D))
        tl.store(dx_ptr + offs, cast_rtne(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * D + cols, dw, mask=mask)


def _block_d(D: int) -> int:
    assert D <= MAX_D, f"rms_norm: row width {D} > MAX_D={MAX_D}"
    return triton.next_power_of_2(D)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        D = x.shape[-1]
        assert weight.shape == (D,), f"rms_norm: weight {tuple(weight.shape)} vs x {tuple(x.shape)}"
        x2 = x.reshape(-1, D).contiguous()  # (R, D)
        rows = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = _block_d(D)
        if rows > 0:
            _rms_norm_fwd_kernel[(rows,)](
                x2, weight.contiguous(), y, rstd, D, eps, BLOCK_D=block, num_warps=_num_warps(block)
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, D = x2.shape
        dy2 = dy.reshape(rows, D).contiguous()
        dx = torch.empty_like(x2)
        n_programs = max(1, min(rows, MAX_BWD_PROGRAMS))
        dw_partial = torch.empty(n_programs, D, dtype=torch.float32, device=x2.device)
        block = _block_d(D)
        if rows > 0:
            _rms_norm_bwd_kernel[(n_programs,)](
                dy2, x2, weight.contiguous(), rstd, dx, dw_partial, rows, D,
                BLOCK_D=block, num_warps=_num_warps(block),
            )
        else:
            dw_partial.zero_()
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` ``[..., D]`` with ``weight`` ``[D]``; see module doc."""
    return _RMSNorm.apply(x, weight, eps)
