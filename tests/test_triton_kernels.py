"""Our Triton kernels against plain-torch references, forward and gradients.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1, so the same kernels run on CPU through
Triton's interpreter. The references here are written independently of model/kernels/torch_ref.py;
when that module exists the kernels are also checked against it. Shapes are small (the interpreter
is slow) and mostly not powers of two, so every masked tail in the kernels is exercised.
"""

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from model.kernels import triton_cross_entropy as tce
from model.kernels.triton_cross_entropy import cross_entropy_sum, linear_cross_entropy
from model.kernels.triton_rmsnorm import rms_norm
from model.kernels.triton_rope import apply_rotary
from model.kernels.triton_swiglu import swiglu
from model.kernels.triton_utils import cast_rtne

# Tolerances for outputs and gradients per dtype (bf16: a couple of bf16 ulps).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
HAS_TORCH_REF = importlib.util.find_spec("model.kernels.torch_ref") is not None


def _rand_shapes(seed: int, n: int, *ranges: tuple[int, int]) -> list[tuple[int, ...]]:
    """``n`` shapes with dim i drawn uniformly from ``ranges[i]`` (inclusive), reproducibly."""
    rng = random.Random(seed)
    return [tuple(rng.randint(lo, hi) for lo, hi in ranges) for _ in range(n)]


def _grads(fn, inputs: list[torch.Tensor], dy: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Run ``fn(*inputs)`` on fresh leaf copies, backprop ``dy``; return (out, input grads)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ----------------------------------------------------------------------------- bf16 rounding


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, cast_rtne(x, y_ptr.dtype.element_ty), mask=mask)


def test_cast_rtne_rounds_like_torch():
    """fp32 -> bf16 bit for bit as torch rounds (nearest, ties to even), in both Triton modes."""
    hi = torch.tensor([0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x7F7F, 0x0001], dtype=torch.int32)
    lo = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int32)
    bits = ((hi[:, None] << 16) | lo[None, :]).flatten()  # exact ties, just below/above, odd/even
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, 3.4e38])
    x = torch.cat([bits.view(torch.float32), special, torch.randn(200) * 100])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


# ----------------------------------------------------------------------------- RMSNorm


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(2, 5, 37), (64, 96), (1, 1)] + _rand_shapes(0, 2, (1, 4), (1, 9), (1, 90))
)
def test_rms_norm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    w = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape, dtype=dtype)
    out, (dx, dw) = _grads(lambda a, b: rms_norm(a, b, 1e-6), [x, w], dy)
    ref, (rdx, rdw) = _grads(lambda a, b: rms_norm_ref(a, b, 1e-6), [x, w], dy)
    _assert_close(out, ref, dtype)
    _assert_close(dx, rdx, dtype)
    _assert_close(dw, rdw, dtype)


def test_rms_norm_bf16_input_fp32_weight_promotes_like_reference():
    """Under autocast the norm sees bf16 activations and an fp32 weight: output is fp32."""
    torch.manual_seed(1)
    x = torch.randn(7, 33, dtype=torch.bfloat16)
    w = torch.randn(33)
    dy = torch.randn(7, 33)
    out, (dx, dw) = _grads(lambda a, b: rms_norm(a, b, 1e-5), [x, w], dy)
    ref, (rdx, rdw) = _grads(lambda a, b: rms_norm_ref(a, b, 1e-5), [x, w], dy)
    _assert_close(out, ref, torch.float32)
    _assert_close(dx, rdx, torch.bfloat16)
    _assert_close(dw, rdw, torch.bfloat16)


# ----------------------------------------------------------------------------- RoPE


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos.float().unsqueeze(2), sin.float().unsqueeze(2)  # (B, T, 1, Dh/2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def _rope_tables(B: int, T: int, half: int, theta: float = 1e4) -> tuple[torch.Tensor, ...]:
    """fp32 (cos, sin) tables (B, T, half) for positions 0..T-1, expanded over the batch."""
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (T, half)
    return angles.cos().expand(B, T, half), angles.sin().expand(B, T, half)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,T,H,half",
    [(2, 5, 3, 5), (1, 7, 4, 8), (3, 2, 1, 1)]
    + _rand_shapes(1, 2, (1, 3), (1, 9), (1, 5), (1, 24)),
)
def test_apply_rotary_matches_reference(B, T, H, half, dtype):
    torch.manual_seed(0)
    Dh = 2 * half
    cos, sin = _rope_tables(B, T, half)
    x = torch.randn(B, T, H, Dh, dtype=dtype)
    dy = torch.randn(B, T, H, Dh, dtype=dtype)
    out, (dx,) = _grads(lambda a: apply_rotary(a, cos, sin), [x], dy)
    ref, (rdx,) = _grads(lambda a: apply_rotary_ref(a, cos, sin), [x], dy)
    _assert_close(out, ref, dtype)
    _assert_close(dx, rdx, dtype)


def test_apply_rotary_strided_views_and_noncontiguous_grad():
    """q sliced from a fused qkv projection (a strided view), per-sample positions, and an
    incoming gradient that is itself a transposed (non-contiguous) tensor."""
    torch.manual_seed(2)
    B, T, H, Dh = 2, 6, 3, 14
    qkv = torch.randn(B, T, 3 * H * Dh, requires_grad=True)
    ref_qkv = qkv.detach().clone().requires_grad_(True)
    angles = torch.rand(B, T, Dh // 2) * 6  # differs per batch row, like packed positions
    cos, sin = angles.cos(), angles.sin()
    r = torch.randn(B, H, T, Dh)

    def run(fn, t):
        q = t.view(B, T, 3, H, Dh)[:, :, 0]  # (B, T, H, Dh), non-contiguous
        assert not q.is_contiguous()
        out = fn(q, cos, sin)
        (out.transpose(1, 2) * r).sum().backward()
        return out.detach()

    out, ref = run(apply_rotary, qkv), run(apply_rotary_ref, ref_qkv)
    _assert_close(out, ref, torch.float32)
    _assert_close(qkv.grad, ref_qkv.grad, torch.float32)


def test_apply_rotary_broadcast_tables():
    torch.manual_seed(3)
    cos, sin = _rope_tables(1, 5, 6)
    x = torch.randn(3, 5, 2, 12)
    _assert_close(apply_rotary(x, cos, sin), apply_rotary_ref(x, cos.expand(3, 5, 6),
                                                              sin.expand(3, 5, 6)), torch.float32)


# ----------------------------------------------------------------------------- SwiGLU


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(2, 3, 37), (1500,), (64, 96)] + _rand_shapes(2, 2, (1, 40), (1, 90))
)
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(0)
    gate, up, dy = (torch.randn(shape, dtype=dtype) * 2 for _ in range(3))
    out, (dg, du) = _grads(swiglu, [gate, up], dy)
    ref, (rdg, rdu) = _grads(swiglu_ref, [gate, up], dy)
    _assert_close(out, ref, dtype)
    _assert_close(dg, rdg, dtype)
    _assert_close(du, rdu, dtype)


def test_swiglu_on_chunks_of_fused_projection():
    torch.manual_seed(4)
    fused = torch.randn(3, 5, 2 * 19, requires_grad=True)
    ref_fused = fused.detach().clone().requires_grad_(True)
    out = swiglu(*fused.chunk(2, dim=-1))
    ref = swiglu_ref(*ref_fused.chunk(2, dim=-1))
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    _assert_close(out.detach(), ref.detach(), torch.float32)
    _assert_close(fused.grad, ref_fused.grad, torch.float32)


# ----------------------------------------------------------------------------- cross-entropy


def linear_ce_ref(hidden, weight, targets, ignore_index=-100):
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def _ce_inputs(N: int, D: int, V: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.25] = -100
    return hidden, weight, targets


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocab blocks of 64 and chunks of 7 rows at V=300, so both loops repeat with ragged tails."""
    monkeypatch.setattr(tce, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(tce, "MAX_CHUNK_LOGITS", 7 * 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "N,V", [(37, 300), (1, 5), (16, 64)] + _rand_shapes(3, 2, (1, 40), (2, 300))
)
def test_cross_entropy_sum_matches_reference(N, V, dtype, small_blocks):
    logits = torch.randn(N, V).mul(4).to(dtype)
    targets = torch.randint(0, V, (N,))
    targets[::3] = -100
    ref_fn = lambda z: F.cross_entropy(z.float(), targets, ignore_index=-100, reduction="sum")
    out, (dz,) = _grads(lambda z: cross_entropy_sum(z, targets) * 1.7, [logits], torch.tensor(1.0))
    ref, (rdz,) = _grads(lambda z: ref_fn(z) * 1.7, [logits], torch.tensor(1.0))
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    _assert_close(dz, rdz, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "N,D,V",
    [(50, 40, 257), (64, 96, 300), (3, 8, 11)] + _rand_shapes(4, 2, (1, 40), (1, 96), (2, 300)),
)
def test_linear_cross_entropy_matches_reference(N, D, V, dtype, small_blocks):
    hidden, weight, targets = _ce_inputs(N, D, V, dtype)
    fn = lambda h, w: linear_cross_entropy(h, w, targets) * 2.5
    ref_fn = lambda h, w: linear_ce_ref(h, w, targets) * 2.5
    out, (dh, dw) = _grads(fn, [hidden, weight], torch.tensor(1.0))
    ref, (rdh, rdw) = _grads(ref_fn, [hidden, weight], torch.tensor(1.0))
    assert out.dtype == torch.float32 and out.shape == ()
    # Both sides softmax the same bf16 logits in fp32, so even in bf16 the sums agree closely.
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=1e-3 * N, rtol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    _assert_close(dh, rdh, dtype)
    _assert_close(dw, rdw, dtype)


def test_linear_cross_entropy_without_grad_and_all_ignored(small_blocks):
    hidden, weight, targets = _ce_inputs(20, 12, 70, torch.float32, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, targets), linear_ce_ref(hidden, weight, targets)
        )
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, torch.full((20,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_linear_cross_entropy_under_autocast_matches_reference(small_blocks):
    """CPU autocast: the matmul runs in bf16 like F.linear would, the softmax in fp32, and the
    gradients come back in the fp32 parameters' dtype."""
    hidden, weight, targets = _ce_inputs(24, 32, 130, torch.float32, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (dh, dw) = _grads(lambda h, w: linear_cross_entropy(h, w, targets), [hidden, weight],
                               torch.tensor(1.0))
        ref, (rdh, rdw) = _grads(lambda h, w: linear_ce_ref(h, w, targets), [hidden, weight],
                                 torch.tensor(1.0))
    torch.testing.assert_close(out, ref, atol=0.5, rtol=1e-2)
    _assert_close(dh, rdh, torch.bfloat16)
    _assert_close(dw, rdw, torch.bfloat16)


def test_cross_entropy_rejects_out_of_range_targets():
    hidden, weight, _ = _ce_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="outside"):
        cross_entropy_sum(torch.randn(2, 10), torch.tensor([-1, 3]))


# ----------------------------------------------------------------------------- seam reference


@pytest.mark.skipif(not HAS_TORCH_REF, reason="model/kernels/torch_ref.py not written yet")
def test_kernels_match_seam_torch_reference():
    from model.kernels import torch_ref

    torch.manual_seed(7)
    x, w = torch.randn(3, 4, 22), torch.randn(22)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), torch_ref.rms_norm(x, w, 1e-5))
    cos, sin = _rope_tables(3, 4, 5)
    q = torch.randn(3, 4, 2, 10)
    torch.testing.assert_close(apply_rotary(q, cos, sin), torch_ref.apply_rotary(q, cos, sin))
    g, u = torch.randn(3, 4, 29), torch.randn(3, 4, 29)
    torch.testing.assert_close(swiglu(g, u), torch_ref.swiglu(g, u))
    hidden, weight, targets = _ce_inputs(12, 22, 45, torch.float32)
    torch.testing.assert_close(
        linear_cross_entropy(hidden, weight, targets),
        torch_ref.linear_cross_entropy(hidden, weight, targets),
    )


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_cuda(dtype):
    """The compiled kernels (not the interpreter) on a GPU, at model-like sizes."""
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(4, 129, 1000, device=dev, dtype=dtype)
    w = torch.randn(1000, device=dev, dtype=dtype)
    dy = torch.randn_like(x)
    out, grads = _grads(lambda a, b: rms_norm(a, b, 1e-6), [x, w], dy)
    ref, rgrads = _grads(lambda a, b: rms_norm_ref(a, b, 1e-6), [x, w], dy)
    _assert_close(out, ref, dtype)
    _assert_close(grads[0], rgrads[0], dtype)
    # dweight sums 516 rows (|dw| ~ 25): in bf16 the two summation orders differ by ~1 ulp there.
    dw_tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    torch.testing.assert_close(grads[1].float(), rgrads[1].float(), **dw_tol)

    B, T, H, Dh = 2, 129, 12, 96
    cos, sin = (t.to(dev) for t in _rope_tables(B, T, Dh // 2))
    qkv = torch.randn(B, T, 3 * H * Dh, device=dev, dtype=dtype)
    dq = torch.randn(B, T, H, Dh, device=dev, dtype=dtype)
    q_of = lambda t: t.view(B, T, 3, H, Dh)[:, :, 0]  # strided view, as in the model
    out, (dx,) = _grads(lambda t: apply_rotary(q_of(t), cos, sin), [qkv], dq)
    ref, (rdx,) = _grads(lambda t: apply_rotary_ref(q_of(t), cos, sin), [qkv], dq)
    _assert_close(out, ref, dtype)
    _assert_close(dx, rdx, dtype)

    gate, up, dy = (torch.randn(3, 129, 1379, device=dev, dtype=dtype) for _ in range(3))
    out, grads = _grads(swiglu, [gate, up], dy)
    ref, rgrads = _grads(swiglu_ref, [gate, up], dy)
    _assert_close(out, ref, dtype)
    for a, b in zip(grads, rgrads):
        _assert_close(a, b, dtype)

    hidden, weight, targets = (t.to(dev) for t in _ce_inputs(1000, 256, 50257, dtype))
    out, (dh, dw) = _grads(lambda h, w: linear_cross_entropy(h, w, targets), [hidden, weight],
                           torch.tensor(1.0, device=dev))
    ref, (rdh, rdw) = _grads(lambda h, w: linear_ce_ref(h, w, targets), [hidden, weight],
                             torch.tensor(1.0, device=dev))
    torch.testing.assert_close(out, ref, atol=1e-3 * 1000, rtol=1e-3)
    _assert_close(dh, rdh, dtype)
    _assert_close(dw, rdw, dtype)
