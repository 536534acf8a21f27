"""Rotary position embedding (RoPE) as a Triton kernel, forward and backward.

Reference it must equal (half-split / ``rotate_half`` convention of Hugging Face Llama, math in
fp32, result in ``x.dtype``)::

    def apply_rotary_ref(x, cos, sin):          # x (B, T, H, Dh); cos, sin (B, T, Dh/2)
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos.float()[:, :, None, :], sin.float()[:, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

The rotation by angle a has the rotation by -a as its transpose, so the backward pass is the same
kernel with ``sin`` negated: ``dx1 = dy1*cos + dy2*sin``, ``dx2 = dy2*cos - dy1*sin``.

Strides: ``x`` (and the incoming gradient) may be any strided view, e.g. q/k sliced out of a fused
qkv projection, so the kernel reads through explicit strides and never copies its input.
``cos``/``sin`` may be broadcast over the batch (a ``[1, T, Dh/2]`` table is expanded with
stride 0).
The output is a fresh contiguous ``(B, T, H, Dh)`` tensor.

Layout: one program per (b, t) position, handling all heads of that position as an
``(H, Dh/2)`` tile, so each cos/sin row is loaded once and reused across heads.
"""

import torch
import triton
import triton.language as tl

from model.kernels.triton_utils import cast_rtne


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr, T, H, HALF,
    sxb, sxt, sxh, sxd,
    sob, sot, soh, sod,
    scb, sct, scd,
    ssb, sst, ssd,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < HALF
    mask = (heads[:, None] < H) & dmask[None, :]

    c = tl.load(cos_ptr + b * scb + t * sct + dims * scd, mask=dmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b * ssb + t * sst + dims * ssd, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s
    c = c[None, :]
    s = s[None, :]

    x_off = b * sxb + t * sxt + heads[:, None] * sxh + dims[None, :] * sxd
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF * sxd, mask=mask, other=0.0).to(tl.float32)

    o_off = b * sob + t * sot + heads[:, None] * soh + dims[None, :] * sod
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o_off, cast_rtne(x1 * c - x2 * s, out_ty), mask=mask)
    tl.store(out_ptr + o_off + HALF * sod, cast_rtne(x2 * c + x1 * s, out_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Launch the kernel on ``x`` (B, T, H, Dh) with tables (B, T, Dh/2); returns a new tensor."""
    B, T, H, Dh = x.shape
    out = torch.empty((B, T, H, Dh), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = Dh // 2
    block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(half)
    _rope_kernel[(B * T,)](
        x, out, cos, sin, T, H, half,
        *x.stride(), *out.stride(), *cos.stride(), *sin.stride(),
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=min(8, max(1, block_h * block_half // 256)),
    )
    return out


class _ApplyRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, H, Dh) by ``cos``/``sin`` (B, T, Dh/2), half-split; see module doc."""
    B, T, H, Dh = x.shape
    assert Dh % 2 == 0, f"apply_rotary: head dim {Dh} must be even"
    assert cos.shape[-1] == Dh // 2 and sin.shape == cos.shape, (
        f"apply_rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} vs x {tuple(x.shape)}"
    )
    cos = cos.expand(B, T, Dh // 2)
    sin = sin.expand(B, T, Dh // 2)
    return _ApplyRotary.apply(x, cos, sin)
