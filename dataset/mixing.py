"""Weighted mixing of several datasets: ``--data_mix="dirA:0.7,dirB:0.3"``.

The mix is an endless, deterministic stream. Global sample ``g`` maps to ``(source s, index j
within s)`` through a :class:`MixSchedule`:

- the stream is cut into blocks of ``block_size`` (4096) samples; every block holds the same
  number of samples of each source, the weights apportioned by largest remainder (so the
  proportions are exact to 1/block_size);
- inside block ``b`` the sources' slots are shuffled by ``(seed, b)``;
- ``j`` counts the earlier samples of the same source, so source ``s`` is read in order
  ``0, 1, 2, ...``; position ``j`` is its sample ``perm_{s,e}[j mod len_s]`` in its epoch
  ``e = j // len_s``, with a fresh seeded permutation each source epoch.

Because ``g -> sample`` is a pure function, the mix works with :class:`~dataset.sampler.
GlobalBatchSampler` (use ``shuffle=False``: the mix is already shuffled, and its length is
effectively infinite) and resumes exactly from ``consumed_samples``. Per-source epochs at any
point are :meth:`MixedDataset.source_epochs` (upsampled sources go round several times).

All sources must come from one tokenizer (:func:`check_same_tokenizer`): token ids of
different tokenizers mean different things, so mixing them would train on garbage.

Worked example: weights 0.7 / 0.3, block_size 10 -> each block has 7 slots of A and 3 of B.
Say block 1 is arranged ``A A B B A A A B A A``. Global sample 13 is block 1, slot 3: source B,
the second B of its block, so ``j = 1 * 3 + 1 = 4`` (B's samples 0-2 were in block 0).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from dataset.dataset_pretrain import PretokDatasetWithIndex
from utils.errors import ConfigError, DataError
from utils.logging_utils import get_logger, log_rank0

logger = get_logger(__name__)

DEFAULT_BLOCK_SIZE = 4096
ENDLESS = 2**40  # the nominal length of a mix (samplers need a length; the stream never ends)


def parse_data_mix(spec: str) -> list[tuple[str, float]]:
    """Parse ``"dirA:0.7,dirB:0.3"`` into ``[(dir, weight), ...]`` (weights positive, any sum)."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ConfigError(f"data_mix {spec!r} is empty; expected 'dirA:0.7,dirB:0.3'")
    mix: list[tuple[str, float]] = []
    for entry in entries:
        path, sep, weight_text = entry.rpartition(":")
        if not sep or not path:
            raise ConfigError(
                f"data_mix entry {entry!r} needs the form DIR:WEIGHT, e.g. 'dirA:0.7'"
            )
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(
                f"data_mix entry {entry!r}: weight {weight_text!r} is not a number"
            ) from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"data_mix entry {entry!r}: weight must be a positive number")
        if any(os.path.normpath(path) == os.path.normpath(p) for p, _ in mix):
            raise ConfigError(f"data_mix lists {path!r} twice")
        mix.append((path, weight))
    return mix


def apportion(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    quotas = w / w.sum() * total
    counts = np.floor(quotas).astype(np.int64)
    order = np.argsort(-(quotas - counts), kind="stable")  # ties: earlier source first
    counts[order[: total - counts.sum()]] += 1
    return counts


class MixSchedule:
    """Pure map from a global sample index to ``(source, index within source)``."""

    def __init__(
        self, weights: Sequence[float], seed: int, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        self.block_counts = apportion(weights, block_size)
        if (self.block_counts == 0).any():
            s = int(np.argmin(self.block_counts))
            raise ConfigError(
                f"data_mix weight {weights[s]} of source {s} is below 1/{block_size} of the total; "
                "raise it or drop the source"
            )
        self.block_size = block_size
        self.seed = seed
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``b``'s ``(source of each slot, rank of the slot among its source's slots)``."""
        if self._block is None or self._block[0] != b:
            slots = np.repeat(np.arange(len(self.block_counts)), self.block_counts)
            np.random.default_rng([self.seed, 0, b]).shuffle(slots)
            rank = np.empty_like(slots)
            for s in range(len(self.block_counts)):
                where = np.flatnonzero(slots == s)
                rank[where] = np.arange(len(where))
            self._block = (b, slots, rank)
        return self._block[1], self._block[2]

    def locate(self, g: int) -> tuple[int, int]:
        b, p = divmod(g, self.block_size)
        slots, rank = self.block(b)
        s = int(slots[p])
        return s, b * int(self.block_counts[s]) + int(rank[p])

    def counts(self, g: int) -> np.ndarray:
        """How many of the first ``g`` samples come from each source."""
        b, p = divmod(g, self.block_size)
        slots, _ = self.block(b)
        return b * self.block_counts + np.bincount(slots[:p], minlength=len(self.block_counts))


class MixedDataset(Dataset):
    """Samples ``sources`` in proportion to ``weights``; ``ds[g]`` is sample ``g`` of the mix."""

    def __init__(
        self,
        sources: Sequence[Any],
        weights: Sequence[float],
        seed: int = 1337,
        names: Sequence[str] | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        assert len(sources) == len(weights) > 0, (len(sources), len(weights))
        for i, src in enumerate(sources):
            if len(src) == 0:
                raise ConfigError(f"data_mix source {names[i] if names else i} has no samples")
        self.sources = list(sources)
        self.names = list(names) if names is not None else [str(i) for i in range(len(sources))]
        self.weights = [w / sum(weights) for w in weights]
        self.seed = seed
        self.schedule = MixSchedule(weights, seed, block_size)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return ENDLESS

    def source_sample(self, g: int) -> tuple[int, int]:
        """``(source, sample index in that source)`` of global sample ``g``."""
        s, j = self.schedule.locate(g)
        epoch, pos = divmod(j, len(self.sources[s]))
        cached = self._orders.get(s)
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, 1, s, epoch]).permutation(
                len(self.sources[s])
            )
            self._orders[s] = cached = (epoch, order)
        return s, int(cached[1][pos])

    def __getitem__(self, g: int) -> Any:
        s, i = self.source_sample(g)
        return self.sources[s][i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_orders": {}}  # permutations are rebuilt, not shipped to workers

    def source_epochs(self, consumed_samples: int) -> dict[str, float]:
        """Epochs of each source completed after ``consumed_samples`` mixed samples (fractional)."""
        counts = self.schedule.counts(consumed_samples)
        return {name: int(c) / len(src) for name, c, src in zip(self.names, counts, self.sources)}

    def describe(self, consumed_samples: int) -> str:
        """One log line: each source's weight and epochs so far."""
        epochs = self.source_epochs(consumed_samples)
        return ", ".join(
            f"{n} (w={w:.3f}): {epochs[n]:.3f} ep" for n, w in zip(self.names, self.weights)
        )


def check_same_tokenizer(sources: Sequence[Any], names: Sequence[str]) -> None:
    """DataError naming two directories whose data comes from different tokenizers.

    ``sources`` have ``tokenizer_fingerprint`` and ``vocab_size`` (``PretokDatasetWithIndex``:
    read from each index header).
    """
    first, first_name = sources[0], names[0]
    for src, name in zip(sources[1:], names[1:]):
        if src.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise DataError(
                f"data_mix: {name} and {first_name} were pretokenized with different tokenizers "
                f"(fingerprints {src.tokenizer_fingerprint[:12]}... and "
                f"{first.tokenizer_fingerprint[:12]}..., vocab sizes {src.vocab_size} and "
                f"{first.vocab_size}); re-tokenize them with the one tokenizer you train with"
            )


def mixed_pretrain_dataset(
    data_mix: str,
    max_seq_len: int,
    split: str = "train",
    seed: int = 1337,
    valid_ratio: float = 0.01,
) -> MixedDataset:
    """A :class:`MixedDataset` of one ``PretokDatasetWithIndex`` per ``--data_mix`` directory."""
    mix = parse_data_mix(data_mix)
    sources = [
        PretokDatasetWithIndex(d, max_seq_len, split=split, seed=seed, valid_ratio=valid_ratio)
        for d, _ in mix
    ]
    check_same_tokenizer(sources, [d for d, _ in mix])
    mixed = MixedDataset(sources, [w for _, w in mix], seed=seed, names=[d for d, _ in mix])
    for (d, _), src, w in zip(mix, sources, mixed.weights):
        log_rank0(logger, "data_mix %s: %s, %d samples, weight %.3f", split, d, len(src), w)
    return mixed
