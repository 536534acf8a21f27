"""ZeRO-1 shard ranges: which elements of every bucket a rank owns (pure functions).

The DDP buffer pads every bucket to a multiple of the world size, so bucket ``b`` of ``n_b``
elements splits into ``world_size`` equal, contiguous shards of ``n_b / world_size`` elements;
rank ``r`` owns shard ``r`` of EVERY bucket (one reduce-scatter and one all-gather per bucket).
A parameter that straddles a shard boundary is split: each rank updates only its slice.

A rank keeps its shards of all buckets back to back in one flat fp32 tensor (the "shard"
coordinates below): bucket ``b``'s shard starts at ``bucket.start / world_size`` because every
bucket before it contributed exactly ``1 / world_size`` of its padded size.

Three coordinate systems, all half-open :class:`Range` values:

* buffer: element index in the DDP's flat param/grad buffer (the same on every rank);
* param:  flat element index inside one parameter (``param.view(-1)``);
* shard:  element index in this rank's flat shard (master weights, Adam moments).

Worked example (16 elements, 4 ranks, one bucket): parameters with numels [6, 3, 5] are laid
out by the DDP buffer in reverse order — p2 [0, 5), p1 [5, 8), p0 [8, 14) — and the bucket is
padded 14 → 16. Each rank owns 4 elements::

    buffer   0  1  2  3 | 4  5  6  7 | 8  9 10 11 | 12 13 14 15
    param   p2 p2 p2 p2 |p2 p1 p1 p1 |p0 p0 p0 p0 | p0 p0 -- --
    rank         0      |     1      |     2      |     3

    rank 0: p2 param [0, 4)  buffer [0, 4)    shard [0, 4)
    rank 1: p2 param [4, 5)  buffer [4, 5)    shard [0, 1)
            p1 param [0, 3)  buffer [5, 8)    shard [1, 4)
    rank 2: p0 param [0, 4)  buffer [8, 12)   shard [0, 4)
    rank 3: p0 param [4, 6)  buffer [12, 14)  shard [0, 2)   (shard [2, 4) is padding)

Rank 3 holds 4 shard elements of which 2 are padding; padding is zero in the grad buffer and
stays zero in the master shard and Adam moments, so stepping the whole flat shard is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.distributed_data_parallel.param_and_grad_buffer import (
    BufferLayout,
    Range,
    shard_range,
)


@dataclass(frozen=True)
class ParamShard:
    """The part of one parameter that a rank owns, in the three coordinate systems."""

    param_index: int  # index into the buffer's parameter list (registration order)
    buffer: Range
    param: Range
    shard: Range


@dataclass(frozen=True)
class BucketShard:
    """A rank's shard of one bucket: its buffer range, its place in the flat shard, its params."""

    bucket_index: int  # index into the buffer's bucket list
    buffer: Range
    shard: Range
    params: tuple[ParamShard, ...]


def intersect(a: Range, b: Range) -> Range | None:
    """The overlap of two ranges, or None when they share no element."""
    start, end = max(a.start, b.start), min(a.end, b.end)
    return Range(start, end) if start < end else None


def shard_numel(layout: BufferLayout, world_size: int) -> int:
    """Elements of a rank's flat shard: ``padded buffer numel / world_size`` (every rank equal).

    This is ⌈N / world_size⌉ plus the rank's share of the bucket padding.
    """
    assert layout.numel % world_size == 0, (layout.numel, world_size)
    return layout.numel // world_size


def compute_shard_ranges(layout: BufferLayout, world_size: int, rank: int) -> list[BucketShard]:
    """Rank ``rank``'s shard of every bucket of ``layout``, with the parameter slices inside it.

    Parameters are listed in buffer order; a bucket shard made only of padding has no params.
    """
    assert 0 <= rank < world_size, (rank, world_size)
    shards = []
    for b, (bucket, param_indices) in enumerate(
        zip(layout.bucket_ranges, layout.bucket_param_indices, strict=True)
    ):
        owned = shard_range(bucket, world_size, rank)
        shard_start = bucket.start // world_size
        params = []
        for index in param_indices:
            param_range = layout.param_ranges[index]
            overlap = intersect(param_range, owned)
            if overlap is None:
                continue
            params.append(
                ParamShard(
                    param_index=index,
                    buffer=overlap,
                    param=overlap.shift(-param_range.start),
                    shard=overlap.shift(shard_start - owned.start),
                )
            )
        shards.append(
            BucketShard(b, owned, Range(shard_start, shard_start + owned.size), tuple(params))
        )
    return shards


def merge_runs(pieces: list[tuple[Range, float]]) -> list[tuple[Range, float]]:
    """Merge adjacent ranges carrying the same value: [([0,3), .1), ([3,5), .1)] → [([0,5), .1)].

    Used for weight decay: one in-place multiply per run of decayed parameters instead of one per
    parameter slice.
    """
    runs: list[tuple[Range, float]] = []
    for r, value in sorted(pieces, key=lambda p: p[0].start):
        if runs and runs[-1][0].end == r.start and runs[-1][1] == value:
            runs[-1] = (Range(runs[-1][0].start, r.end), value)
        else:
            runs.append((r, value))
    return runs
