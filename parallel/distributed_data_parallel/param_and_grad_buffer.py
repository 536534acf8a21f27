"""Contiguous parameter and gradient buffers, split into buckets that are views into them.

Layout rules (pure functions, tested without a process group):

* Parameters are laid out in REVERSE registration order: backward produces the gradients of the
  last layers first, so bucket 0 (the start of the buffer) is ready first and its collective can
  start while the earlier layers are still being differentiated.
* A bucket is closed as soon as it holds at least ``bucket_size`` elements, so a parameter larger
  than ``bucket_size`` simply ends its bucket (parameters are never split across buckets).
* Every bucket's end is padded to a multiple of ``lcm(world_size, bucket_align)``. The padding makes
  each bucket divisible into ``world_size`` equal, aligned shards (ZeRO-1 reduce-scatters buckets
  and all-gathers them shard by shard) and keeps every bucket start aligned.
* Each parameter start is aligned to ``param_align`` elements (1 = packed).

Worked example: parameters with numels [6, 10, 3] (registration order), world_size 4,
bucket_align 4 (so pad to lcm(4, 4) = 4), bucket_size 8, param_align 1. Reverse order is
[3, 10, 6] (indices 2, 1, 0):

    param 2: [0, 3)    bucket 0 so far 3 < 8
    param 1: [3, 13)   bucket 0 holds 13 ≥ 8 → close, pad 13 → 16: bucket 0 = [0, 16)
    param 0: [16, 22)  last bucket, pad 22 → 24:                  bucket 1 = [16, 24)

    buffer (24 elements):  |p2 p2 p2|p1 ×10 ...|pad pad pad|p0 ×6|pad pad|
    ZeRO-1 shards of bucket 0 (4 ranks): [0,4) [4,8) [8,12) [12,16), each 4 elements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from parallel.dist_context import broadcast


@dataclass(frozen=True)
class Range:
    """Half-open element range ``[start, end)`` inside a flat buffer."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def shift(self, offset: int) -> Range:
        return Range(self.start + offset, self.end + offset)


@dataclass(frozen=True)
class BufferLayout:
    """Where every parameter and every bucket lives in one flat buffer.

    ``param_ranges[i]`` is the range of the i-th parameter *as given* (registration order);
    ``bucket_param_indices[b]`` lists, in buffer order, the parameters of bucket ``b``.
    """

    numel: int
    param_ranges: tuple[Range, ...]
    bucket_ranges: tuple[Range, ...]
    bucket_param_indices: tuple[tuple[int, ...], ...]


def pad_to_multiple(n: int, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is ≥ ``n``."""
    assert divisor > 0, divisor
    return -(-n // divisor) * divisor


def bucket_pad_divisor(world_size: int, bucket_align: int) -> int:
    """Every bucket's size is a multiple of this: divisible by the ranks and aligned."""
    return math.lcm(world_size, bucket_align)


def compute_buffer_layout(
    numels: Sequence[int],
    bucket_size: int | None,
    world_size: int,
    bucket_align: int = 64,
    param_align: int = 1,
) -> BufferLayout:
    """Lay out parameters of the given numels (registration order) into buckets; see module doc.

    ``bucket_size=None`` puts everything into one bucket.
    """
    assert all(n > 0 for n in numels), numels
    assert bucket_size is None or bucket_size > 0, bucket_size
    divisor = bucket_pad_divisor(world_size, bucket_align)
    param_ranges: dict[int, Range] = {}
    bucket_ranges: list[Range] = []
    bucket_params: list[tuple[int, ...]] = []
    offset, bucket_start, current = 0, 0, []

    def close_bucket() -> None:
        nonlocal offset, bucket_start, current
        end = pad_to_multiple(offset, divisor)
        bucket_ranges.append(Range(bucket_start, end))
        bucket_params.append(tuple(current))
        offset, bucket_start, current = end, end, []

    for index in reversed(range(len(numels))):
        start = pad_to_multiple(offset, param_align)
        param_ranges[index] = Range(start, start + numels[index])
        offset = start + numels[index]
        current.append(index)
        if bucket_size is not None and offset - bucket_start >= bucket_size:
            close_bucket()
    if current:
        close_bucket()
    return BufferLayout(
        numel=offset,
        param_ranges=tuple(param_ranges[i] for i in range(len(numels))),
        bucket_ranges=tuple(bucket_ranges),
        bucket_param_indices=tuple(bucket_params),
    )


def shard_range(bucket: Range, world_size: int, rank: int) -> Range:
    """The part of ``bucket`` (buffer coordinates) that ``rank`` owns under ZeRO-1."""
    assert bucket.size % world_size == 0, (bucket, world_size)
    shard = bucket.size // world_size
    return Range(bucket.start + rank * shard, bucket.start + (rank + 1) * shard)


class Bucket:
    """A set of parameters whose gradients are reduced by one collective.

    ``param_data`` / ``grad_data`` are 1-D views into the owning buffer (padding included);
    ``param_ranges[p]`` is parameter ``p``'s range *relative to the bucket start*;
    ``offset`` is the bucket's start in the buffer (ZeRO-1 needs it).
    """

    def __init__(
        self,
        index: int,
        params: list[torch.nn.Parameter],
        param_ranges: list[Range],
        param_data: torch.Tensor,
        grad_data: torch.Tensor,
        offset: int,
    ) -> None:
        self.index = index
        self.params = params
        self.param_ranges = dict(zip(params, param_ranges, strict=True))
        self.param_data = param_data
        self.grad_data = grad_data
        self.offset = offset

    @property
    def numel_unpadded(self) -> int:
        return sum(r.size for r in self.param_ranges.values())

    def __repr__(self) -> str:
        return (
            f"Bucket(index={self.index}, params={len(self.params)}, numel={self.grad_data.numel()},"
            f" unpadded={self.numel_unpadded}, offset={self.offset}, dtype={self.grad_data.dtype})"
        )


class ParamAndGradBuffer:
    """Owns one contiguous param buffer and one grad buffer for parameters of a single dtype.

    After construction every ``param.data`` is a view into ``param_data`` (values preserved) and
    every ``param.main_grad`` is a view into ``grad_data`` (zeros), so a bucket's parameters and
    gradients are each one contiguous slice that one collective can reduce or gather.

    ``grad_dtype`` is the accumulation/reduction dtype: fp32 when the caller asks for
    ``grad_reduce_in_fp32`` (or the params are fp32), else the param dtype — never silently lower.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        grad_dtype: torch.dtype,
        bucket_size: int | None,
        world_size: int,
        bucket_index_offset: int = 0,
        bucket_align: int = 64,
        param_align: int = 1,
    ) -> None:
        assert params, "a buffer needs at least one parameter"
        param_dtype = params[0].dtype
        assert all(p.dtype == param_dtype for p in params), "one buffer per param dtype"
        device = params[0].device
        self.params = params
        self.param_dtype, self.grad_dtype = param_dtype, grad_dtype
        self.layout = compute_buffer_layout(
            [p.numel() for p in params], bucket_size, world_size, bucket_align, param_align
        )
        self.param_data = torch.zeros(self.layout.numel, dtype=param_dtype, device=device)
        self.grad_data = torch.zeros(self.layout.numel, dtype=grad_dtype, device=device)
        for param, r in zip(params, self.layout.param_ranges, strict=True):
            view = self.param_data[r.start : r.end].view(param.shape)
            view.copy_(param.data)
            param.data = view
            param.main_grad = self.grad_data[r.start : r.end].view(param.shape)
        self.buckets = [
            self._make_bucket(bucket_index_offset + b, r, self.layout.bucket_param_indices[b])
            for b, r in enumerate(self.layout.bucket_ranges)
        ]

    def _make_bucket(self, index: int, r: Range, param_indices: tuple[int, ...]) -> Bucket:
        params = [self.params[i] for i in param_indices]
        ranges = [self.layout.param_ranges[i].shift(-r.start) for i in param_indices]
        return Bucket(
            index,
            params,
            ranges,
            self.param_data[r.start : r.end],
            self.grad_data[r.start : r.end],
            offset=r.start,
        )

    def broadcast_params(self, world_size: int, src: int = 0) -> None:
        """Make every rank start from ``src``'s parameter values (one collective per buffer)."""
        broadcast(self.param_data, world_size, src)
