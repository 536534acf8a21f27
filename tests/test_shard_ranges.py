"""ZeRO-1 shard ranges (pure functions) against an element-by-element ownership oracle."""

import math
import random

import pytest

from parallel.distributed_data_parallel.param_and_grad_buffer import Range, compute_buffer_layout
from parallel.distributed_optimizer.shard_ranges import (
    ParamShard,
    compute_shard_ranges,
    intersect,
    merge_runs,
    shard_numel,
)


def test_worked_example_from_module_docstring():
    layout = compute_buffer_layout([6, 3, 5], bucket_size=None, world_size=4, bucket_align=4)
    assert layout.numel == 16 and shard_numel(layout, 4) == 4
    ranks = [compute_shard_ranges(layout, 4, r)[0] for r in range(4)]
    assert ranks[0].params == (ParamShard(2, Range(0, 4), Range(0, 4), Range(0, 4)),)
    assert ranks[1].params == (
        ParamShard(2, Range(4, 5), Range(4, 5), Range(0, 1)),
        ParamShard(1, Range(5, 8), Range(0, 3), Range(1, 4)),
    )
    assert ranks[2].params == (ParamShard(0, Range(8, 12), Range(0, 4), Range(0, 4)),)
    assert ranks[3].params == (ParamShard(0, Range(12, 14), Range(4, 6), Range(0, 2)),)
    assert [s.buffer for s in ranks] == [Range(0, 4), Range(4, 8), Range(8, 12), Range(12, 16)]


def _owner_oracle(layout, world_size: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(param index, element) → (rank, position in that rank's flat shard), element by element."""
    owners = {}
    for bucket in layout.bucket_ranges:
        per_rank = bucket.size // world_size
        for e in range(bucket.start, bucket.end):
            rank = (e - bucket.start) // per_rank
            position = bucket.start // world_size + (e - bucket.start) % per_rank
            for i, r in enumerate(layout.param_ranges):
                if r.start <= e < r.end:
                    owners[(i, e - r.start)] = (rank, position)
    return owners


@pytest.mark.parametrize("seed", range(12))
def test_shards_partition_every_parameter_exactly_once(seed):
    rng = random.Random(seed)
    numels = [rng.randint(1, 60) for _ in range(rng.randint(1, 8))]
    world_size = rng.choice([1, 2, 3, 4, 5])
    bucket_size = rng.choice([None, 1, 17, 40, 100])
    layout = compute_buffer_layout(numels, bucket_size, world_size, bucket_align=rng.choice([1, 4]))
    oracle = _owner_oracle(layout, world_size)
    found = {}
    for rank in range(world_size):
        shards = compute_shard_ranges(layout, world_size, rank)
        # a rank's bucket shards tile [0, shard_numel) in order, each 1/world of its bucket
        assert [s.shard.start for s in shards] == [0] + [s.shard.end for s in shards[:-1]]
        assert shards[-1].shard.end == shard_numel(layout, world_size)
        for shard, bucket in zip(shards, layout.bucket_ranges, strict=True):
            assert shard.buffer.size == shard.shard.size == bucket.size // world_size
            for ps in shard.params:
                assert intersect(ps.buffer, shard.buffer) == ps.buffer
                assert ps.buffer.size == ps.param.size == ps.shard.size
                for k in range(ps.param.size):
                    key = (ps.param_index, ps.param.start + k)
                    assert key not in found, f"element {key} owned twice"
                    found[key] = (rank, ps.shard.start + k)
    assert found == oracle  # every element of every parameter, owned once, at the right place
    assert len(found) == sum(numels)


def test_shard_size_is_ceil_n_over_world_plus_padding():
    numels = [37 * 24, 24 * 50, 50, 50, 50, 50 * 37, 3]  # 4,091: odd, and not a multiple of 3
    n = sum(numels)
    for world_size in (2, 3, 4):
        layout = compute_buffer_layout(numels, 1000, world_size, bucket_align=64)
        divisor = math.lcm(world_size, 64)
        per_rank = shard_numel(layout, world_size)
        assert per_rank * world_size == layout.numel
        assert math.ceil(n / world_size) <= per_rank
        padding_share = len(layout.bucket_ranges) * divisor / world_size
        assert per_rank - math.ceil(n / world_size) < padding_share


def test_parameter_split_across_ranks():
    layout = compute_buffer_layout([10], bucket_size=None, world_size=2, bucket_align=4)
    (r0,), (r1,) = (compute_shard_ranges(layout, 2, r)[0].params for r in range(2))
    assert (r0.param, r1.param) == (Range(0, 6), Range(6, 10))  # padded 10 → 12


def test_merge_runs():
    pieces = [(Range(3, 5), 0.1), (Range(0, 3), 0.1), (Range(5, 6), 0.0), (Range(6, 9), 0.1)]
    assert merge_runs(pieces) == [(Range(0, 5), 0.1), (Range(5, 6), 0.0), (Range(6, 9), 0.1)]
    assert merge_runs([]) == []
