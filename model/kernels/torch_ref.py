"""Pure-PyTorch reference implementations of the fused ops.

These are the oracles: the obvious, slow-but-correct code the Triton kernels
(`triton_*.py`) must equal, and the path every CPU run takes. Each function follows the
Hugging Face Llama numerics exactly, so a model built from them matches
`transformers.LlamaForCausalLM` to float rounding.
"""

from __future__ import annotations

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


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """SUM over rows with targets != ignore_index of CE(hidden @ weight.T, targets).

    hidden: [N, D]; weight: [V, D] (the LM head); targets: [N] int64. Returns an fp32 scalar.
    This reference materialises the full [N, V] logits in fp32; the fused Triton version
    computes the same sum chunk by chunk without ever holding them.
    """
    logits = F.linear(hidden, weight).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
