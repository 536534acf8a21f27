"""Pure-PyTorch reference implementations of the fused ops.

These are the oracles: the obvious, slow-but-correct code the Triton kernels
(`triton_*.py`) must equal, and the path every CPU run takes. Each function follows the
Hugging Face Llama numerics exactly, so a model built from them matches
`transformers.LlamaForCausalLM` to float rounding. One exception to "obvious":
`linear_cross_entropy` is chunked with a hand-written backward (the CPU training hot spot
besides the matmuls); its docstring gives the one-line formula it equals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467).

    x: [..., D] any float dtype; weight: [D]. The statistics are taken in fp32 (bf16 squares
    lose too many bits), the normalised value is cast back to x.dtype and then scaled by
    weight, in that order, as HF Llama does.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864).

    x: [B, T, H, Dh]; cos, sin: [B, T, Dh // 2] in fp32 (one angle per token and frequency,
    so packed sequences with per-document positions work). Uses the "half-split" pairing
    (dimension i rotates with i + Dh/2, HF's `rotate_half`), computed in fp32, returned in
    x.dtype:  out = [x1 * cos - x2 * sin,  x2 * cos + x1 * sin]  with x = [x1, x2].
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # (B, T, H, Dh/2) each
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, Dh/2): broadcast over heads
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation (Shazeer 2020, https://arxiv.org/abs/2002.05202): silu(gate) * up."""
    return F.silu(gate) * up


# Rows per chunk in linear_cross_entropy: CHUNK_LOGITS // V, so one chunk's fp32 logits take
# 16 MiB (512 rows at V = 8192), small enough to stay in a server CPU's last-level cache across
# the softmax passes, large enough that the chunk matmuls run at full speed.
CHUNK_LOGITS = 2**22


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype when autocast is on, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


# One chunk's loss and logit gradient: (hidden rows (C, D), their targets (C,)) ->
# (summed fp32 loss of the chunk's non-ignored rows, dlogits (C, V) in the compute dtype, or
# None when no gradient is needed). dlogits = softmax - onehot(target), zero rows if ignored.
ChunkStep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
    need_grad: bool, chunk_step: ChunkStep,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop shared by the torch and Triton fused linear cross-entropy.

    Walks the rows of ``hidden`` (N, D) ``chunk_rows`` at a time; ``chunk_step`` turns each
    chunk into its loss and logit gradient (torch ops here, Triton kernels in
    triton_cross_entropy.py), which are multiplied straight into the gradients of hidden and of
    the LM head ``weight`` (V, D). Returns (fp32 loss sum, grad_hidden (N, D) in the compute
    dtype, grad_weight (V, D) accumulated in fp32 so that many chunks do not pile up bf16
    rounding); the gradients are None without ``need_grad``.
    """
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h = hidden[rows]  # (C, D)
        chunk_loss, dlogits = chunk_step(h, targets[rows])
        loss += chunk_loss
        if need_grad:
            torch.mm(dlogits, weight, out=grad_hidden[rows])  # (C, D)
            if dlogits.dtype == grad_weight.dtype:
                grad_weight.addmm_(dlogits.T, h)  # (V, D)
            else:
                grad_weight += dlogits.T @ h
    return loss, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`chunked_linear_cross_entropy`: the gradients are finished in
    the forward pass, backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: int,
                need_grad: bool, chunk_step: ChunkStep, targets: torch.Tensor) -> torch.Tensor:
        loss, grad_hidden, grad_weight = chunked_linear_cross_entropy(
            hidden, weight, targets, chunk_rows, need_grad, chunk_step)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        assert grad_hidden is not None, "linear_cross_entropy: forward ran without gradients"
        g = grad_output.detach()
        # Inside the Function hidden and weight share the compute dtype.
        return grad_hidden * g, (grad_weight * g).to(grad_hidden.dtype), None, None, None, None


def _torch_chunk_step(weight: torch.Tensor, ignore_index: int, need_grad: bool) -> ChunkStep:
    """The per-chunk loss and logit gradient in torch ops (fp32 logits for the softmax)."""

    def step(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        keep = t != ignore_index
        t = torch.where(keep, t, 0)  # any valid index; these rows are masked below
        probs = (h @ weight.T).float()  # (C, V) logits, fp32 for the softmax
        target_logit = probs.gather(1, t[:, None])  # (C, 1), read before probs is reused
        shift = probs.amax(1, keepdim=True)
        probs.sub_(shift).exp_()  # in place: exp(logits - max)
        total = probs.sum(1, keepdim=True)
        row_loss = (total.log() + shift - target_logit).squeeze(1)  # logsumexp - logit[t]
        loss = torch.where(keep, row_loss, 0.0).sum()
        if not need_grad:
            return loss, None
        probs.div_(total)  # softmax
        probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d loss / d logits
        probs.mul_(keep[:, None])  # ignored rows: no gradient
        return loss, probs.to(h.dtype)  # (C, V) compute dtype for the matmuls

    return step


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """SUM over rows with targets != ignore_index of CE(hidden @ weight.T, targets).

    hidden: [N, D]; weight: [V, D] (the LM head); targets: [N] int64. Returns an fp32 scalar,
    equal to ``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")``.

    Same algorithm as the Triton kernel (model/kernels/triton_cross_entropy.py), in torch ops:
    the rows are walked in chunks of ``CHUNK_LOGITS // V``; per chunk the logits are computed,
    turned in place into ``softmax - onehot(target)``, and multiplied straight into the gradients
    of hidden and weight, which backward only scales by the incoming gradient. The plain formula
    holds three [N, V] fp32 tensors (logits, log-probabilities, their gradient) and makes about
    six passes over them; on a CPU that was ~10% of a training step of a small model.

    Under autocast the matmuls run in the autocast dtype (as F.linear would), the softmax in
    fp32; gradients come back in the inputs' dtypes.
    """
    device_type = hidden.device.type
    dtype = matmul_dtype(hidden)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # The casts sit outside the Function so autograd returns gradients in the callers' dtypes.
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(
            hidden, weight, max(1, CHUNK_LOGITS // weight.shape[0]), need_grad,
            _torch_chunk_step(weight, ignore_index, need_grad), targets.reshape(-1),
        )
