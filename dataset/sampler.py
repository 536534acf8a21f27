"""Global-batch sampler: which sample indices every optimizer step uses, for any world size.

The training stream is the concatenation of epoch orders ``order_0, order_1, ...``, where
``order_e`` is a permutation of ``range(num_samples)`` seeded by ``(seed, e)`` (or the identity
with ``shuffle=False``). Global step ``k`` takes stream positions ``[k*G, (k+1)*G)`` with
``G = micro_batch_size * grad_accum_steps``, cut into ``grad_accum_steps`` micro-batches; a batch
may run from the end of one epoch into the next, so every sample is used once per epoch.

The whole position is one integer, ``consumed_samples``: saving and restoring it resumes
exactly, in O(1), without touching any consumed data.

Ranks: :func:`rank_micro_batches` gives rank ``r`` of ``W`` the micro-batches
``[r*m, (r+1)*m)`` with ``m = grad_accum_steps / W``. Example: G = 2 x 4 micro-batches
``[a, b, c, d]``; with W = 2, rank 0 runs ``[a, b]`` and rank 1 ``[c, d]``; with W = 1 one rank
runs all four. The global step sees the same samples either way (SPEC §10).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from utils.errors import ConfigError, DataError


class GlobalBatchSampler:
    """Deterministic, resumable source of global batches (lists of micro-batches of indices)."""

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int = 1337,
        shuffle: bool = True,
    ) -> None:
        if num_samples < 1:
            raise DataError(f"the dataset has {num_samples} samples; need at least one")
        if micro_batch_size < 1 or grad_accum_steps < 1:
            raise ConfigError(
                f"train_batch_size ({micro_batch_size}) and gradient_accumulation_steps "
                f"({grad_accum_steps}) must both be >= 1"
            )
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = 0
        self._cached_order: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def epoch(self) -> int:
        """The epoch of the next sample to be drawn (0-based)."""
        return self.consumed_samples // self.num_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of one epoch: int64 [num_samples] (a permutation when shuffling)."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples, dtype=np.int64)
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def _take(self, count: int) -> list[int]:
        """The next ``count`` stream positions' sample indices; advances the position."""
        out: list[int] = []
        while len(out) < count:
            epoch, pos = divmod(self.consumed_samples, self.num_samples)
            n = min(count - len(out), self.num_samples - pos)
            if self.shuffle:
                out.extend(self.epoch_order(epoch)[pos : pos + n].tolist())
            else:  # the identity order needs no array (mixed datasets can be very long)
                out.extend(range(pos, pos + n))
            self.consumed_samples += n
        return out

    def next_global_batch(self) -> list[list[int]]:
        """``grad_accum_steps`` micro-batches of ``micro_batch_size`` indices for the next step."""
        flat = self._take(self.global_batch_size)
        m = self.micro_batch_size
        return [flat[i * m : (i + 1) * m] for i in range(self.grad_accum_steps)]

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            yield self.next_global_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_samples": self.consumed_samples,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the data, seed and shuffle flag must match the saved run."""
        if state["num_samples"] != self.num_samples:
            raise DataError(
                f"the checkpoint's sampler was over {state['num_samples']} samples but the dataset "
                f"now has {self.num_samples}: the training data changed since the checkpoint"
            )
        for key in ("seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ConfigError(
                    f"sampler {key} is {getattr(self, key)!r} but the checkpoint used "
                    f"{state[key]!r}; resume with the original setting"
                )
        self.consumed_samples = int(state["consumed_samples"])


def rank_micro_batches(
    global_batch: list[list[int]], rank: int, world_size: int
) -> list[list[int]]:
    """Rank ``rank``'s share of a global batch: micro-batches ``[rank*m, (rank+1)*m)``."""
    if len(global_batch) % world_size != 0:
        raise ConfigError(
            f"gradient_accumulation_steps ({len(global_batch)}) must be divisible by the world "
            f"size ({world_size})"
        )
    assert 0 <= rank < world_size, (rank, world_size)
    m = len(global_batch) // world_size
    return global_batch[rank * m : (rank + 1) * m]
