"""GlobalBatchSampler: epochs, exact resume, world-size independence of global steps."""

from __future__ import annotations

import numpy as np
import pytest

from dataset.sampler import GlobalBatchSampler, rank_micro_batches
from utils.errors import ConfigError, DataError


def flatten(batch: list[list[int]]) -> list[int]:
    return [i for micro in batch for i in micro]


def test_shapes_and_epoch_coverage():
    s = GlobalBatchSampler(num_samples=12, micro_batch_size=2, grad_accum_steps=3, seed=0)
    first = s.next_global_batch()
    assert len(first) == 3 and all(len(m) == 2 for m in first)
    second = s.next_global_batch()
    assert sorted(flatten(first) + flatten(second)) == list(range(12))  # one epoch, no repeats
    assert s.epoch == 1 and s.consumed_samples == 12


def test_batches_span_epochs_and_each_epoch_is_a_permutation():
    s = GlobalBatchSampler(num_samples=10, micro_batch_size=3, grad_accum_steps=1, seed=4)
    stream = [i for _ in range(10) for i in flatten(s.next_global_batch())]  # 30 samples = 3 epochs
    epochs = [stream[0:10], stream[10:20], stream[20:30]]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert epochs[0] == np.random.default_rng([4, 0]).permutation(10).tolist()


def test_no_shuffle_is_sequential():
    s = GlobalBatchSampler(num_samples=5, micro_batch_size=2, grad_accum_steps=2, shuffle=False)
    assert s.next_global_batch() == [[0, 1], [2, 3]]
    assert s.next_global_batch() == [[4, 0], [1, 2]]


def test_resume_is_exact():
    a = GlobalBatchSampler(num_samples=37, micro_batch_size=4, grad_accum_steps=2, seed=7)
    uninterrupted = [a.next_global_batch() for _ in range(20)]
    b = GlobalBatchSampler(num_samples=37, micro_batch_size=4, grad_accum_steps=2, seed=7)
    for _ in range(9):
        b.next_global_batch()
    state = b.state_dict()
    c = GlobalBatchSampler(num_samples=37, micro_batch_size=4, grad_accum_steps=2, seed=7)
    c.load_state_dict(state)
    assert c.epoch == 72 // 37
    assert [c.next_global_batch() for _ in range(11)] == uninterrupted[9:]


def test_resume_refuses_changed_data_or_seed():
    state = GlobalBatchSampler(37, 4, 2, seed=7).state_dict()
    with pytest.raises(DataError, match="dataset now has 38"):
        GlobalBatchSampler(38, 4, 2, seed=7).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        GlobalBatchSampler(37, 4, 2, seed=8).load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_global_step_samples_do_not_depend_on_world_size(world_size):
    ref = GlobalBatchSampler(100, micro_batch_size=3, grad_accum_steps=8, seed=1)
    ranks = [
        GlobalBatchSampler(100, micro_batch_size=3, grad_accum_steps=8, seed=1)
        for _ in range(world_size)
    ]
    for _ in range(10):
        expected = ref.next_global_batch()
        per_rank = [
            rank_micro_batches(s.next_global_batch(), r, world_size) for r, s in enumerate(ranks)
        ]
        assert all(len(p) == 8 // world_size for p in per_rank)
        assert [m for p in per_rank for m in p] == expected


def test_rank_slicing_and_errors():
    batch = [[0], [1], [2], [3]]
    assert rank_micro_batches(batch, 1, 2) == [[2], [3]]
    with pytest.raises(ConfigError, match="divisible by the world size"):
        rank_micro_batches(batch, 0, 3)
    with pytest.raises(ConfigError):
        GlobalBatchSampler(10, 0, 1)
    with pytest.raises(DataError):
        GlobalBatchSampler(0, 1, 1)
