"""Pretraining datasets over pretokenized ``.bin`` files (see ``docs/data_format.md``).

- :class:`PretokDatasetWithIndex`: map-style, one sample per index entry (``max_seq_len + 1``
  tokens, stride ``max_seq_len``), O(1) random access through memmaps, constant memory.
- :class:`PretokDataset`: iterable, endless random windows from the same sample grid, no index
  file needed (quick experiments; every rank and DataLoader worker draws its own seeded stream).
  It is also indexable: ``ds[i]`` is the same sample as the indexed dataset's, its start computed
  from the ``.bin`` sizes (train.py ``--use_dataset_with_index=false``).

Both share the train/valid split of :func:`split_sample_ids`: a seeded uniform choice of
``round(valid_ratio * num_samples)`` samples is the valid split, the rest is train. It depends
only on (num_samples, valid_ratio, seed), never on the world size, so resumed and differently
parallelised runs see the same split, and no sample is in both. Every rank computes it itself in
memory proportional to the valid split (:func:`distinct_uniform_ids`), never to the corpus.

:func:`check_pretrain_tokenizer` checks that a dataset was pretokenized with the tokenizer the
model is trained with (the fingerprint recorded in the sample index header).

Memmaps are opened lazily on first access and dropped when pickled, so a dataset built in the
main process works in DataLoader worker processes without copying token data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from data_preprocess.build_pretrain_sample_index_map import (
    TokenCorpus,
    index_path,
    load_token_corpus,
    num_samples_for,
    read_index,
    sample_starts,
    window_pieces,
)
from data_preprocess.token_file import open_tokens
from tokenizer.tokenization import tokenizer_fingerprint
from utils.errors import ConfigError, DataError
from utils.logging_utils import env_rank, env_world_size

DEFAULT_SEED = 1337
DEFAULT_VALID_RATIO = 0.01


def valid_sample_ids(num_samples: int, valid_ratio: float, seed: int) -> np.ndarray:
    """Sorted int64 ids of the valid split: ``round(valid_ratio * num_samples)`` seeded picks.

    At least one valid sample when ``valid_ratio > 0``; at least one train sample always.
    Memory is O(number of valid samples), not O(num_samples).
    """
    if not 0.0 <= valid_ratio < 1.0:
        raise ConfigError(f"valid_ratio must be in [0, 1), got {valid_ratio}")
    num_valid = 0 if valid_ratio == 0 else max(1, round(valid_ratio * num_samples))
    if num_valid >= num_samples:
        raise DataError(
            f"{num_samples} samples cannot be split with valid_ratio={valid_ratio}: nothing would "
            "be left for training; add data, lower max_seq_len or lower valid_ratio"
        )
    return distinct_uniform_ids(num_samples, num_valid, np.random.default_rng(seed))


def distinct_uniform_ids(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random k-subset of ``range(n)`` as sorted int64, in O(k) memory.

    ``rng.choice(n, k, replace=False)`` allocates ``arange(n)`` once ``k > n / 50``. Instead,
    draw ``m`` ids with replacement, where ``m = -n * log(1 - k / n)`` (plus 5%) is the number
    of draws that yield ``k`` distinct ids on average, keep the distinct ones (redrawing more in
    the rare case of fewer than ``k``), and pick ``k`` of them at random. The distinct values of
    i.i.d. uniform draws are a uniform subset, and so is a random part of it. For ``k <= n / 2``,
    ``m <= 1.4 k``; above that, the ``n - k`` ids left out are drawn instead and the rest
    returned (memory O(n) = O(k) there). Deterministic given the rng's seed.
    """
    assert 0 <= k <= n, (k, n)
    if 2 * k > n:
        keep = np.ones(n, dtype=bool)
        keep[distinct_uniform_ids(n, n - k, rng)] = False
        return np.flatnonzero(keep).astype(np.int64)
    draws = int(-n * math.log1p(-k / n) * 1.05) + 16
    while True:
        ids = np.sort(rng.integers(0, n, size=draws, dtype=np.int64))
        ids = ids[np.concatenate(([True], ids[1:] != ids[:-1]))]  # distinct; np.unique is slower
        if len(ids) >= k:
            break
        draws *= 2
    rng.shuffle(ids)
    return np.sort(ids[:k])


def split_sample_ids(
    num_samples: int, valid_ratio: float, seed: int
) -> tuple[SplitView, SplitView]:
    """``(train, valid)`` views mapping a split-local index to a global sample id."""
    valid = valid_sample_ids(num_samples, valid_ratio, seed)
    return SplitView(num_samples, valid, is_valid=False), SplitView(
        num_samples, valid, is_valid=True
    )


class SplitView:
    """One side of the split as a lazy sorted sequence of sample ids (O(log V) lookup).

    Train index ``k`` is the k-th sample id not in the sorted valid ids ``V``. With
    ``A[j] = V[j] - j`` (the number of train ids before ``V[j]``), the answer is ``k + j`` where
    ``j = #{A <= k}``, the number of valid ids that precede it.
    """

    def __init__(self, num_samples: int, valid_ids: np.ndarray, is_valid: bool) -> None:
        self.valid_ids = valid_ids
        self.is_valid = is_valid
        self._train_before = valid_ids - np.arange(len(valid_ids), dtype=np.int64)
        self._len = len(valid_ids) if is_valid else num_samples - len(valid_ids)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < self._len:
            raise IndexError(f"sample {k} out of range for a split of {self._len}")
        if self.is_valid:
            return int(self.valid_ids[k])
        return k + int(np.searchsorted(self._train_before, k, side="right"))


def _check_split(split: str) -> None:
    if split not in ("train", "valid"):
        raise ConfigError(f"split must be 'train' or 'valid', got {split!r}")


class _TokenStream:
    """The concatenated tokens of a :class:`TokenCorpus`, read through lazily opened memmaps."""

    def __init__(self, corpus: TokenCorpus) -> None:
        self.corpus = corpus
        self.cum = corpus.cum
        self._tokens: list[np.ndarray] | None = None

    def window(self, start: int, length: int) -> torch.Tensor:
        """Global tokens ``[start, start + length)`` as an int64 tensor (may span files)."""
        if self._tokens is None:
            self._tokens = [
                open_tokens(self.corpus.path(f), m) for f, m in enumerate(self.corpus.metas)
            ]
        parts = [self._tokens[f][lo:hi] for f, lo, hi in window_pieces(start, length, self.cum)]
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(arr.astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class PretokDatasetWithIndex(Dataset):
    """Map-style pretraining samples: ``x, y = ds[i]``, LongTensors of length ``max_seq_len``.

    ``y`` is ``x`` shifted by one token (``y[:-1] == x[1:]``): the targets, as the model expects.

    ``data_dir`` holds the ``.bin`` files and ``pretrain_index_seq{max_seq_len}.idx``; both are
    validated here (a stale index or a truncated ``.bin`` is a DataError), then only opened as
    memmaps on first access.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        max_seq_len: int,
        split: str = "train",
        seed: int = DEFAULT_SEED,
        valid_ratio: float = DEFAULT_VALID_RATIO,
    ) -> None:
        _check_split(split)
        index = read_index(data_dir, max_seq_len)
        self.data_dir = Path(data_dir)
        self.max_seq_len = max_seq_len
        self.split = split
        self.num_tokens = index.corpus.num_tokens
        self.vocab_size = index.header["vocab_size"]
        self.tokenizer_fingerprint = index.header["tokenizer_fingerprint"]
        self._stream = _TokenStream(index.corpus)
        self._index_file = index_path(data_dir, max_seq_len)
        self._starts_offset = index.starts.offset
        self._num_samples = len(index)
        self._starts: np.ndarray | None = None
        train, valid = split_sample_ids(len(index), valid_ratio, seed)
        self.ids = train if split == "train" else valid

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._starts is None:
            self._starts = np.memmap(
                self._index_file,
                dtype="<i8",
                mode="r",
                offset=self._starts_offset,
                shape=(self._num_samples,),
            )
        start = int(self._starts[self.ids[i]])
        tokens = self._stream.window(start, self.max_seq_len + 1)
        return tokens[:-1], tokens[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_starts": None}


class PretokDataset(IterableDataset):
    """Endless random ``(x, y)`` windows of the sample grid, without an index file.

    Samples are drawn uniformly with replacement from the chosen split (the same split as
    :class:`PretokDatasetWithIndex`). The stream is seeded by ``(seed, rank, DataLoader worker)``
    so ranks and workers draw different samples; ``rank``/``world_size`` default to torchrun's
    environment. Only the sidecars are read up front; tokens are read through memmaps.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        max_seq_len: int,
        split: str = "train",
        seed: int = DEFAULT_SEED,
        valid_ratio: float = DEFAULT_VALID_RATIO,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _check_split(split)
        corpus = load_token_corpus(data_dir)
        num_samples = num_samples_for(corpus.num_tokens, max_seq_len)
        if num_samples == 0:
            raise DataError(
                f"{data_dir}: {corpus.num_tokens} tokens are too few for one sample "
                f"of {max_seq_len + 1} tokens"
            )
        self.data_dir = Path(data_dir)
        self.max_seq_len = max_seq_len
        self.vocab_size = corpus.metas[0].vocab_size
        self.tokenizer_fingerprint = corpus.metas[0].tokenizer_fingerprint
        self.seed = seed
        self.rank = env_rank() if rank is None else rank
        self.world_size = env_world_size() if world_size is None else world_size
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)
        train, valid = split_sample_ids(num_samples, valid_ratio, seed)
        self.ids = train if split == "train" else valid
        self._stream = _TokenStream(corpus)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``i`` of the split, the same one as ``PretokDatasetWithIndex(...)[i]``: its
        start is computed from the .bin sizes instead of read from the index file (train.py
        ``--use_dataset_with_index=false``)."""
        tokens = self._stream.window(
            sample_starts(self.ids[i], self.max_seq_len), self.max_seq_len + 1
        )
        return tokens[:-1], tokens[1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        rng = np.random.default_rng([self.seed, self.rank, worker_id])
        while True:
            yield self[int(rng.integers(len(self)))]


def check_pretrain_tokenizer(dataset: Dataset, tokenizer_dir: str | os.PathLike) -> None:
    """Raise DataError unless every data directory behind ``dataset`` was pretokenized with the
    tokenizer in ``tokenizer_dir`` (same :func:`~tokenizer.tokenization.tokenizer_fingerprint`).

    ``dataset`` is a :class:`PretokDatasetWithIndex` (fingerprint from its index header), a
    :class:`PretokDataset` (from its sidecars), or a ``dataset.mixing.MixedDataset`` of them
    (each source is checked).
    """
    expected = tokenizer_fingerprint(tokenizer_dir)
    for source in getattr(dataset, "sources", [dataset]):
        if source.tokenizer_fingerprint != expected:
            raise DataError(
                f"{source.data_dir} was pretokenized with a different tokenizer than "
                f"{tokenizer_dir} (fingerprint {source.tokenizer_fingerprint[:12]}..., "
                f"{tokenizer_dir} has {expected[:12]}...); pass the --tokenizer_dir it was made "
                "with, or re-run `python -m data_preprocess.pretokenize_pretrain_data` with this "
                "tokenizer and --overwrite, then rebuild the sample index"
            )
