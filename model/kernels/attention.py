"""Attention backends: PyTorch SDPA (always) and flash-attn 2 (CUDA, when installed).

Who may attend to whom is described once per forward by an `AttentionLayout` and shared by
every layer:

- plain causal (training on unpadded, unpacked rows): `is_causal=True`, no mask tensor, so
  SDPA and flash-attn use their fast causal kernels;
- anything else (left padding, packed documents, a KV cache with several new tokens): a
  boolean mask [B or 1, 1, Tq, Tk], True = may attend;
- packed documents on flash-attn: also `cu_seqlens`, the document boundaries of the
  flattened batch, for `flash_attn_varlen_func` (which then ignores the dense mask).

Packed-sequence helpers turn `doc_ids` [B, T] into segments and per-document positions.
A "document" is a maximal run of equal doc ids inside a row, so ids may repeat across rows
or even within a row (0, 0, 1, 1, 0 is three documents).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional: requirements-gpu.txt
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # CPU machines, or CUDA without flash-attn
    flash_attn_func = flash_attn_varlen_func = None


def flash_attn_available() -> bool:
    return flash_attn_func is not None


@dataclass(frozen=True)
class AttentionLayout:
    """Which keys each query may see. Built by `build_attention_layout`, read by the backends."""

    is_causal: bool = False  # query i sees keys 0..i (Tq == Tk, nothing else masked)
    mask: torch.Tensor | None = (
        None  # bool [B or 1, 1, Tq, Tk]; None with is_causal=False: all keys
    )
    cu_seqlens: torch.Tensor | None = None  # int32 [n_docs + 1] into the flattened B*T (flash)
    max_seqlen: int = 0  # longest document (flash varlen needs it as a Python int)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] -> bool [B, T], True where a document begins (t == 0 or the id changes)."""
    first = torch.ones_like(doc_ids[:, :1], dtype=torch.bool)
    return torch.cat((first, doc_ids[:, 1:] != doc_ids[:, :-1]), dim=1)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its own document: [B, T] int64, restarting at 0.

    Example: doc_ids [[7, 7, 7, 9, 9]] -> [[0, 1, 2, 0, 1]].
    """
    starts = document_starts(doc_ids)
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start_of_doc = torch.where(starts, idx, 0).cummax(dim=1).values  # index of my doc's first token
    return idx - start_of_doc


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flash varlen boundaries of the flattened batch: ([n_docs + 1] int32, longest doc).

    Example: doc_ids [[0, 0, 1], [5, 5, 5]] -> documents of 2, 1, 3 tokens -> [0, 2, 3, 6], 3.
    """
    starts = document_starts(doc_ids).flatten().nonzero().squeeze(1)
    total = torch.tensor([doc_ids.numel()], device=doc_ids.device)
    cu = torch.cat((starts, total)).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def build_attention_layout(
    q_len: int,
    past_len: int = 0,
    attention_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    varlen: bool = False,
) -> AttentionLayout:
    """Describe the attention pattern of one forward pass.

    q_len: new tokens this call; past_len: tokens already in the KV cache (keys = past + new).
    attention_mask: [B, past_len + q_len], 1 = real token, 0 = padding (left padding).
    doc_ids: [B, q_len] document id per token (packed rows; only without a KV cache).
    varlen: produce cu_seqlens for flash-attn instead of a dense mask for packed rows.
    """
    if doc_ids is not None and past_len:
        raise ValueError("doc_ids (packed sequences) cannot be combined with a KV cache")
    if attention_mask is None and doc_ids is None:
        if past_len == 0:
            return AttentionLayout(is_causal=True)
        if q_len == 1:
            return AttentionLayout()  # one new token sees every cached key

    q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(past_len + q_len, device=device)[None, :]  # (1, Tk)
    allowed = (k_pos <= q_pos)[None]  # (1, Tq, Tk) causal
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]  # (B, Tq, Tk) no padded keys
    if doc_ids is not None:
        seg = document_starts(doc_ids).cumsum(dim=1)  # (B, T) document number within the row
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])  # no attention across documents
    # A padding query has no real key before it; letting it see itself keeps its softmax row
    # finite (an all-False row gives NaN in SDPA). Its output is never used.
    allowed = allowed | (k_pos == q_pos)[None]
    if varlen and doc_ids is not None and attention_mask is None:
        # flash-attn reads cu_seqlens; the dense mask stays for an SDPA fallback (fp32 inputs).
        cu, max_len = cu_seqlens_from_doc_ids(doc_ids)
        return AttentionLayout(mask=allowed[:, None], cu_seqlens=cu, max_seqlen=max_len)
    return AttentionLayout(mask=allowed[:, None])  # (B or 1, 1, Tq, Tk)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout
) -> torch.Tensor:
    """q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh] -> [B, Tq, H, Dh] with PyTorch SDPA.

    Grouped-query attention through `enable_gqa` (no repeated K/V copies).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),  # (B, heads, T, Dh)
        attn_mask=layout.mask,
        is_causal=layout.is_causal,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)  # (B, Tq, H, Dh)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout
) -> torch.Tensor:
    """flash-attn 2 (Dao 2023, https://arxiv.org/abs/2307.08691); same contract as SDPA.

    Used for the causal and packed (varlen) layouts on CUDA in fp16/bf16. Other dense masks
    (padding, chunked prefill) and fp32 go to SDPA. flash-attn aligns the causal mask to the
    bottom right when Tq < Tk, which is what a KV-cache decode step needs.
    """
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return sdpa_attention(q, k, v, layout)
    if layout.cu_seqlens is not None:
        B, T, H, Dh = q.shape
        cu, n = layout.cu_seqlens, layout.max_seqlen
        out = flash_attn_varlen_func(
            q.reshape(B * T, H, Dh),
            k.reshape(B * T, -1, Dh),
            v.reshape(B * T, -1, Dh),
            cu,
            cu,
            n,
            n,
            causal=True,
        )
        return out.view(B, T, H, Dh)
    if layout.mask is not None:
        return sdpa_attention(q, k, v, layout)
    return flash_attn_func(q, k, v, causal=layout.is_causal)
