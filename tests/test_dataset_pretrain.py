"""PretokDatasetWithIndex / PretokDataset against the plain-numpy window reference."""

from __future__ import annotations

import itertools
import json
import pickle
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_preprocess.build_pretrain_sample_index_map import build_index
from dataset.dataset_pretrain import (
    PretokDataset,
    PretokDatasetWithIndex,
    check_pretrain_tokenizer,
    split_sample_ids,
    valid_sample_ids,
)
from dataset.mixing import mixed_pretrain_dataset
from tests.test_sample_index import reference_windows, write_corpus
from tokenizer.tokenization import tokenizer_fingerprint
from utils.errors import ConfigError, DataError

SEQ = 4


@pytest.fixture
def corpus(tmp_path):
    stream = write_corpus(tmp_path, [8, 8, 0, 13, 1, 9])  # boundaries at multiples of SEQ too
    build_index(tmp_path, SEQ)
    return tmp_path, reference_windows(stream, SEQ)


def as_list(view) -> list[int]:
    return [view[k] for k in range(len(view))]


@pytest.mark.parametrize(
    "num_samples,ratio", [(10, 0.3), (1000, 0.01), (1000, 0.0), (7, 0.01), (50, 0.5)]
)
def test_split_is_a_partition(num_samples, ratio):
    train, valid = split_sample_ids(num_samples, ratio, seed=3)
    ref_valid = set(valid_sample_ids(num_samples, ratio, seed=3).tolist())
    assert as_list(valid) == sorted(ref_valid)
    assert as_list(train) == [
        i for i in range(num_samples) if i not in ref_valid
    ]  # set-difference reference
    assert len(valid) == (0 if ratio == 0 else max(1, round(ratio * num_samples)))
    with pytest.raises(IndexError):
        train[len(train)]


def test_split_depends_on_seed_only():
    a = valid_sample_ids(10_000, 0.05, seed=1)
    assert np.array_equal(a, valid_sample_ids(10_000, 0.05, seed=1))
    assert not np.array_equal(a, valid_sample_ids(10_000, 0.05, seed=2))


@pytest.mark.parametrize("num_valid", [5, 15])  # below and above half of the samples
def test_valid_ids_are_a_uniform_subset(num_valid):
    """Over many seeds every sample is valid with probability num_valid / num_samples."""
    n, seeds = 20, 2000
    hits = np.zeros(n, dtype=np.int64)
    for seed in range(seeds):
        ids = valid_sample_ids(n, num_valid / n, seed)
        assert ids.dtype == np.int64 and len(ids) == num_valid
        assert np.all(np.diff(ids) > 0) and 0 <= ids[0] and ids[-1] < n  # sorted, distinct
        hits[ids] += 1
    p = num_valid / n
    sigma = np.sqrt(seeds * p * (1 - p))
    assert np.all(np.abs(hits - seeds * p) < 5 * sigma), hits


@pytest.mark.parametrize("num_samples,ratio", [(10_000_000, 0.021), (10**12, 1e-7)])
def test_split_memory_is_proportional_to_the_valid_split(num_samples, ratio):
    """Every rank builds the split: it must not allocate 8 bytes per sample of the corpus."""
    tracemalloc.start()
    try:
        ids = valid_sample_ids(num_samples, ratio, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ids) == round(ratio * num_samples) and np.all(np.diff(ids) > 0)
    assert peak < 8 * 8 * len(ids)  # a few copies of the valid ids
    assert peak < num_samples  # far below 8 bytes per sample
    train, valid = split_sample_ids(num_samples, ratio, seed=0)
    assert len(train) + len(valid) == num_samples and valid[len(valid) - 1] == ids[-1]


def test_split_errors():
    with pytest.raises(ConfigError, match="valid_ratio"):
        valid_sample_ids(10, 1.0, seed=0)
    with pytest.raises(DataError, match="nothing would be left for training"):
        valid_sample_ids(1, 0.5, seed=0)


def test_items_match_reference_windows(corpus):
    data_dir, windows = corpus
    train = PretokDatasetWithIndex(data_dir, SEQ, split="train", seed=5, valid_ratio=0.25)
    valid = PretokDatasetWithIndex(data_dir, SEQ, split="valid", seed=5, valid_ratio=0.25)
    assert len(train) + len(valid) == len(windows) == 9
    seen = []
    for ds in (train, valid):
        for k in range(len(ds)):
            x, y = ds[k]
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (SEQ,)
            assert torch.equal(x[1:], y[:-1])
            sample = ds.ids[k]
            assert torch.equal(
                torch.cat([x, y[-1:]]), torch.from_numpy(windows[sample].astype(np.int64))
            )
            seen.append(sample)
    assert sorted(seen) == list(range(len(windows)))  # no sample in both splits


def test_pickle_and_dataloader_workers(corpus):
    data_dir, windows = corpus
    ds = PretokDatasetWithIndex(data_dir, SEQ, valid_ratio=0.0)
    ds[0]  # opens the memmaps in this process
    clone = pickle.loads(pickle.dumps(ds))  # what a spawn-context DataLoader worker receives
    assert clone._starts is None and clone._stream._tokens is None
    ref = torch.from_numpy(np.stack([w[:-1] for w in windows]).astype(np.int64))
    assert torch.equal(torch.stack([clone[k][0] for k in range(len(clone))]), ref)
    loader = DataLoader(ds, batch_size=3, num_workers=2)
    assert torch.equal(torch.cat([x for x, _ in loader]), ref)


def test_stale_index_detected_by_dataset(corpus):
    data_dir, _ = corpus
    write_corpus(data_dir, [8, 8, 0, 13, 1, 10])
    with pytest.raises(DataError, match="stale index"):
        PretokDatasetWithIndex(data_dir, SEQ)


def test_streaming_dataset_windows_and_seeding(corpus):
    data_dir, windows = corpus
    ref = {tuple(w.tolist()) for w in windows}
    ds = PretokDataset(data_dir, SEQ, seed=1, valid_ratio=0.0, rank=0, world_size=2)
    draws = [torch.cat([x, y[-1:]]) for x, y in itertools.islice(iter(ds), 50)]
    assert all(tuple(t.tolist()) in ref for t in draws)
    again = [torch.cat([x, y[-1:]]) for x, y in itertools.islice(iter(ds), 50)]
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    other_rank = PretokDataset(data_dir, SEQ, seed=1, valid_ratio=0.0, rank=1, world_size=2)
    other = [torch.cat([x, y[-1:]]) for x, y in itertools.islice(iter(other_rank), 50)]
    assert not all(torch.equal(a, b) for a, b in zip(draws, other))


def test_streaming_valid_split_matches_indexed(corpus):
    data_dir, windows = corpus
    indexed = PretokDatasetWithIndex(data_dir, SEQ, split="valid", seed=9, valid_ratio=0.3)
    allowed = {tuple(windows[indexed.ids[k]].tolist()) for k in range(len(indexed))}
    ds = PretokDataset(data_dir, SEQ, split="valid", seed=9, valid_ratio=0.3, rank=0, world_size=1)
    for x, y in itertools.islice(iter(ds), 30):
        assert tuple(torch.cat([x, y[-1:]]).tolist()) in allowed


def test_bad_split_name(corpus):
    with pytest.raises(ConfigError, match="split"):
        PretokDatasetWithIndex(corpus[0], SEQ, split="test")


def other_tokenizer(tokenizer_dir, dest):
    """A copy of ``tokenizer_dir`` with two ids swapped: a different token <-> id mapping."""
    shutil.copytree(tokenizer_dir, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    return dest


def test_check_pretrain_tokenizer(tmp_path, tokenizer_dir):
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        write_corpus(d, [8, 13], fingerprint=fingerprint)
        build_index(d, SEQ)
    datasets = [
        PretokDatasetWithIndex(a, SEQ),
        PretokDataset(a, SEQ, rank=0, world_size=1),
        mixed_pretrain_dataset(f"{a}:1,{b}:1", SEQ),
    ]
    other = other_tokenizer(tokenizer_dir, tmp_path / "other_tok")
    for ds in datasets:
        check_pretrain_tokenizer(ds, tokenizer_dir)
        with pytest.raises(DataError, match="different tokenizer") as e:
            check_pretrain_tokenizer(ds, other)
        assert str(a) in str(e.value) and str(other) in str(e.value)
