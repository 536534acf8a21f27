"""Bucket layout and padding rules (pure functions) and the buffer's views into its memory."""

import math
import random

import pytest
import torch

from parallel.distributed_data_parallel.param_and_grad_buffer import (
    ParamAndGradBuffer,
    Range,
    bucket_pad_divisor,
    compute_buffer_layout,
    pad_to_multiple,
    shard_range,
)


def test_pad_to_multiple():
    assert [pad_to_multiple(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 4, 4, 8, 8]
    assert bucket_pad_divisor(6, 64) == 192
    assert bucket_pad_divisor(2, 64) == 64


def test_worked_example_from_module_docstring():
    layout = compute_buffer_layout([6, 10, 3], bucket_size=8, world_size=4, bucket_align=4)
    assert layout.param_ranges == (Range(16, 22), Range(3, 13), Range(0, 3))
    assert layout.bucket_ranges == (Range(0, 16), Range(16, 24))
    assert layout.bucket_param_indices == ((2, 1), (0,))
    assert layout.numel == 24
    shards = [shard_range(layout.bucket_ranges[0], 4, r) for r in range(4)]
    assert shards == [Range(0, 4), Range(4, 8), Range(8, 12), Range(12, 16)]


def _check_layout(numels, bucket_size, world_size, bucket_align, param_align):
    layout = compute_buffer_layout(numels, bucket_size, world_size, bucket_align, param_align)
    divisor = math.lcm(world_size, bucket_align)
    # buckets tile [0, numel) and are padded to the divisor
    starts = [b.start for b in layout.bucket_ranges]
    ends = [b.end for b in layout.bucket_ranges]
    assert starts[0] == 0 and ends[-1] == layout.numel and starts[1:] == ends[:-1]
    assert all(b.size % divisor == 0 and b.size > 0 for b in layout.bucket_ranges)
    # every parameter exactly once, in reverse registration order, inside its bucket
    order = [i for group in layout.bucket_param_indices for i in group]
    assert order == list(reversed(range(len(numels))))
    previous_end = 0
    for bucket, group in zip(layout.bucket_ranges, layout.bucket_param_indices):
        for i in group:
            r = layout.param_ranges[i]
            assert r.size == numels[i]
            assert r.start % param_align == 0 and r.start >= previous_end
            assert bucket.start <= r.start and r.end <= bucket.end
            previous_end = r.end
        # a bucket closes as soon as it reaches bucket_size, not earlier, not later
        used = layout.param_ranges[group[-1]].end - bucket.start
        used_before_last = layout.param_ranges[group[-1]].start - bucket.start
        if bucket_size is not None:
            assert used_before_last < bucket_size
            if bucket is not layout.bucket_ranges[-1]:
                assert used >= bucket_size
    if bucket_size is None:
        assert len(layout.bucket_ranges) == 1
    for bucket in layout.bucket_ranges:
        shards = [shard_range(bucket, world_size, r) for r in range(world_size)]
        assert shards[0].start == bucket.start and shards[-1].end == bucket.end
        assert len({s.size for s in shards}) == 1


@pytest.mark.parametrize("seed", range(20))
def test_layout_invariants_random(seed):
    rng = random.Random(seed)
    numels = [rng.choice([1, 3, 7, 64, 100, 1000, 4097]) for _ in range(rng.randint(1, 12))]
    bucket_size = rng.choice([None, 1, 50, 500, 3000, 10**6])
    _check_layout(numels, bucket_size, rng.choice([1, 2, 3, 4, 8]), rng.choice([1, 4, 64]),
                  rng.choice([1, 16]))


def test_param_larger_than_bucket_size_gets_closed_bucket():
    # numels in registration order; reverse: 5, 1000, 5 with bucket_size 100
    layout = compute_buffer_layout([5, 1000, 5], bucket_size=100, world_size=2, bucket_align=1)
    assert layout.bucket_param_indices == ((2, 1), (0,))
    assert layout.bucket_ranges == (Range(0, 1006), Range(1006, 1012))


def _toy_params(dtype):
    torch.manual_seed(0)
    shapes = [(3, 5), (7,), (4, 2, 3)]
    return [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in shapes]


def test_buffer_views_share_memory_and_keep_values():
    params = _toy_params(torch.float32)
    originals = [p.detach().clone() for p in params]
    buf = ParamAndGradBuffer(params, torch.float32, bucket_size=20, world_size=2, bucket_align=4)
    for p, original, r in zip(params, originals, buf.layout.param_ranges):
        torch.testing.assert_close(p.data, original, rtol=0, atol=0)
        assert p.data.data_ptr() == buf.param_data[r.start:].data_ptr()
        assert p.main_grad.data_ptr() == buf.grad_data[r.start:].data_ptr()
        assert p.main_grad.shape == p.shape and not p.main_grad.any()
    for bucket in buf.buckets:
        for p, r in bucket.param_ranges.items():
            p.main_grad.fill_(bucket.index + 1.0)
            assert torch.equal(bucket.grad_data[r.start:r.end], p.main_grad.flatten())
    assert [b.offset for b in buf.buckets] == [r.start for r in buf.layout.bucket_ranges]
    # padding (never written by a gradient) is zero: the DDP wrapper relies on it
    padding = torch.ones(buf.layout.numel, dtype=torch.bool)
    for r in buf.layout.param_ranges:
        padding[r.start:r.end] = False
    assert padding.any() and not buf.grad_data[padding].any()


@pytest.mark.parametrize("param_dtype,grad_dtype", [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
])
def test_grad_dtype_is_what_was_asked(param_dtype, grad_dtype):
    params = _toy_params(param_dtype)
    buf = ParamAndGradBuffer(params, grad_dtype, bucket_size=None, world_size=1)
    assert buf.param_data.dtype == param_dtype
    assert all(p.main_grad.dtype == grad_dtype and p.dtype == param_dtype for p in params)
