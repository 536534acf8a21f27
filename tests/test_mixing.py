"""Weighted data mixing: --data_mix parsing, proportions, determinism, per-source epochs."""

from __future__ import annotations

import numpy as np
import pytest

from data_preprocess.build_pretrain_sample_index_map import build_index
from dataset.mixing import (
    MixedDataset,
    MixSchedule,
    apportion,
    mixed_pretrain_dataset,
    parse_data_mix,
)
from dataset.sampler import GlobalBatchSampler
from tests.test_sample_index import write_corpus
from utils.errors import ConfigError, DataError


class Source:
    """A stand-in dataset whose item i is (name, i)."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[str, int]:
        assert 0 <= i < self.n
        return self.name, i


def test_parse_data_mix():
    assert parse_data_mix("dirA:0.7, dirB:0.3") == [("dirA", 0.7), ("dirB", 0.3)]
    assert parse_data_mix("/a:b/c:2,d:1") == [("/a:b/c", 2.0), ("d", 1.0)]  # last ':' splits


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "empty"),
        ("dirA", "DIR:WEIGHT"),
        (":0.5", "DIR:WEIGHT"),
        ("dirA:x", "'x' is not a number"),
        ("dirA:0,dirB:1", "positive"),
        ("dirA:-1", "positive"),
        ("dirA:nan", "positive"),
        ("dirA:1,./dirA:1", "twice"),
    ],
)
def test_parse_data_mix_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_data_mix(spec)


def test_apportion():
    assert apportion([0.7, 0.3], 10).tolist() == [7, 3]
    assert apportion([1, 1, 1], 10).tolist() == [4, 3, 3]
    counts = apportion([0.5, 0.25, 0.125, 0.125], 4096)
    assert counts.sum() == 4096 and counts.tolist() == [2048, 1024, 512, 512]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.15, 0.05], [3.0, 1.0]])
def test_proportions_within_one_percent_over_100k(weights):
    ds = MixedDataset(
        [Source("a", 1000), Source("b", 50), Source("c", 7), Source("d", 3)][: len(weights)],
        weights,
        seed=11,
    )
    n = 100_000
    hits = np.bincount([ds.schedule.locate(g)[0] for g in range(n)], minlength=len(weights))
    expected = np.asarray(weights) / sum(weights)
    assert np.all(np.abs(hits / n - expected) < 0.01 * expected + 1e-12)
    assert np.array_equal(ds.schedule.counts(n), hits)


def test_each_source_read_once_per_source_epoch():
    ds = MixedDataset(
        [Source("a", 40), Source("b", 7)], [0.6, 0.4], seed=2, names=["a", "b"], block_size=50
    )
    drawn: dict[str, list[int]] = {"a": [], "b": []}
    for g in range(400):
        name, i = ds[g]
        drawn[name].append(i)
    for name, n in (("a", 40), ("b", 7)):
        full = len(drawn[name]) // n
        assert full >= 2
        for e in range(full):
            assert sorted(drawn[name][e * n : (e + 1) * n]) == list(range(n))
    epochs = ds.source_epochs(400)
    assert epochs == {"a": len(drawn["a"]) / 40, "b": len(drawn["b"]) / 7}
    assert "b (w=0.400)" in ds.describe(400)


def test_deterministic_and_resumable_with_sampler():
    def run(seed: int, stop: int | None = None, state=None) -> list:
        ds = MixedDataset([Source("a", 30), Source("b", 11)], [0.8, 0.2], seed=seed)
        sampler = GlobalBatchSampler(
            len(ds), micro_batch_size=4, grad_accum_steps=2, seed=seed, shuffle=False
        )
        if state is not None:
            sampler.load_state_dict(state)
        out = [[ds[i] for m in sampler.next_global_batch() for i in m] for _ in range(stop or 30)]
        return out, sampler.state_dict()

    full, _ = run(5)
    assert full == run(5)[0]
    assert full != run(6)[0]
    head, state = run(5, stop=12)
    tail, _ = run(5, stop=18, state=state)
    assert head + tail == full


def test_tiny_weight_rejected():
    with pytest.raises(ConfigError, match="below 1/4096"):
        MixSchedule([1.0, 1e-5], seed=0)


def test_mixed_pretrain_dataset(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_corpus(a, [41], start=0)
    write_corpus(b, [41], start=500)
    for d in (a, b):
        build_index(d, 4)
    ds = mixed_pretrain_dataset(f"{a}:3,{b}:1", 4, seed=0, valid_ratio=0.0)
    assert ds.names == [str(a), str(b)]
    n = ds.schedule.block_size  # one whole block holds exactly 3:1
    from_b = [int(ds[g][0][0]) >= 500 for g in range(n)]
    assert from_b == [ds.schedule.locate(g)[0] == 1 for g in range(n)]
    assert sum(from_b) == n // 4


@pytest.mark.parametrize("vocab_b", [1000, 70_000])  # same dtype; uint16 vs uint32
def test_mix_of_different_tokenizers_rejected(tmp_path, vocab_b):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_corpus(a, [41], fingerprint="tokenizer-one")
    write_corpus(b, [41], vocab_size=vocab_b, fingerprint="tokenizer-two")
    write_corpus(c, [41], fingerprint="tokenizer-one")
    for d in (a, b, c):
        build_index(d, 4)
    assert len(mixed_pretrain_dataset(f"{a}:1,{c}:1", 4, valid_ratio=0.0).sources) == 2
    with pytest.raises(DataError, match="different tokenizers") as e:
        mixed_pretrain_dataset(f"{a}:1,{c}:1,{b}:1", 4, valid_ratio=0.0)
    assert str(a) in str(e.value) and str(b) in str(e.value)
