"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr``, then constant."""

from __future__ import annotations

import math


def cosine_lr(it: int, learning_rate: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """The learning rate for optimizer step ``it`` (0-based).

    Warmup ramps linearly from ``learning_rate / (warmup_iters + 1)`` so step 0 already moves;
    cosine decay runs from the end of warmup to ``decay_iters``; after that the rate stays at
    ``min_lr`` (as in nanoGPT and Chinchilla-style runs).
    """
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 → 0
    return min_lr + coeff * (learning_rate - min_lr)
