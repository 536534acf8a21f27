"""Autoregressive generation: greedy or sampled (temperature, top-k, top-p), batched, KV cache.

Prompts of different lengths are batched with LEFT padding and an attention mask, so every
row's next token sits in the last column. The model derives positions from the mask (a padded
prompt gets the same positions as the unpadded one) and never attends to padding. With
`use_cache=False` every step recomputes the whole sequence: slow, but the obvious reference the
KV-cache path is tested against.

This module only needs a model with `forward(input_ids, attention_mask=, kv_cache=)` returning
`.logits` and `make_kv_cache(batch_size, max_len)`; `Z2allForCausalLM.generate` is this function.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B].

    temperature 0: greedy (argmax). Otherwise softmax(logits / temperature) restricted to the
    top_k most likely tokens and to the smallest set whose probability reaches top_p
    (nucleus sampling, Holtzman et al. 2019, https://arxiv.org/abs/1904.09751).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        sorted_logits = sorted_logits.masked_fill(
            mass_before >= top_p, float("-inf")
        )  # keeps top-1
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Each row must be 0...0 1...1 (padding only on the left) with at least one real token."""
    m = attention_mask.long()
    if (m[:, 1:] < m[:, :-1]).any() or (m[:, -1] == 0).any():
        raise ValueError(
            "generate() needs LEFT-padded prompts: every attention_mask row must be "
            "zeros followed by ones, ending in a real token"
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each prompt row; returns [B, T + n] (prompt and new tokens, n <= max_new_tokens).

    input_ids [B, T] left-padded prompts, attention_mask [B, T] (None: no padding).
    A row that produced `eos_token_id` is finished: its later positions hold `pad_token_id`
    (default model.config.pad_token_id); generation stops when every row is finished.
    """
    if (
        temperature < 0
        or (top_k is not None and top_k < 1)
        or (top_p is not None and not 0 < top_p <= 1)
    ):
        raise ValueError(
            f"bad sampling settings: temperature={temperature} (>= 0), "
            f"top_k={top_k} (>= 1), top_p={top_p} (in (0, 1])"
        )
    B, T = input_ids.shape
    if T == 0:
        raise ValueError(
            f"generate() needs a prompt of at least one token per row, got input_ids of shape "
            f"{tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_left_padded(attention_mask)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    kv_cache = model.make_kv_cache(B, T + max_new_tokens) if use_cache else None

    tokens, mask = input_ids, attention_mask
    step_input = input_ids  # the whole prompt first (prefill), then one token per step
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        if kv_cache is not None:
            logits = model(step_input, attention_mask=mask, kv_cache=kv_cache).logits
        else:
            logits = model(tokens, attention_mask=mask).logits
        next_token = sample_next_token(
            logits[:, -1, :], temperature, top_k, top_p, generator
        )  # (B,)
        next_token = next_token.masked_fill(finished, pad_token_id)
        if eos_token_id is not None:
            finished = finished | (next_token == eos_token_id)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        step_input = next_token[:, None]
        if finished.all():
            break
    return tokens
