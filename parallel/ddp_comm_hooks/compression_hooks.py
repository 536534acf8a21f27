"""fp16 / bf16 gradient compression: halve the bytes on the wire, decompress after.

Each rank scales its gradients by 1/N *before* casting (so the sum of N values is an average and
cannot exceed max|g|: no fp16 overflow unless a single gradient already exceeds 65504 — which
dynamic loss scaling catches as inf and skips), all-reduces the narrow copy with SUM and writes
it back into the (wider) bucket buffer. Expected error: one rounding of each g/N plus the
rounding of the partial sums: relative ~2^-11 (fp16) / ~2^-8 (bf16) per element.
"""

from __future__ import annotations

import torch

from parallel.dist_context import all_reduce
from parallel.ddp_comm_hooks.default_hooks import GradBucket, PendingReduction


def _compress_hook(bucket: GradBucket, wire_dtype: torch.dtype) -> PendingReduction:
    buf = bucket.buffer
    compressed = buf.mul(1.0 / bucket.world_size).to(wire_dtype)
    work = all_reduce(compressed, bucket.world_size, op="sum", async_op=True)

    def decompress() -> torch.Tensor:
        buf.copy_(compressed)
        return buf

    return PendingReduction([work], decompress)


def fp16_compress_hook(bucket: GradBucket) -> PendingReduction:
    """Average the bucket over ranks, communicating in float16."""
    return _compress_hook(bucket, torch.float16)


def bf16_compress_hook(bucket: GradBucket) -> PendingReduction:
    """Average the bucket over ranks, communicating in bfloat16."""
    return _compress_hook(bucket, torch.bfloat16)
