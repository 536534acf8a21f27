"""ZeRO-1 distributed optimizer (``--use_distributed_optimizer``): sharded fp32 AdamW state over
our DDP's buckets. Shard index maths in ``shard_ranges``; the optimizer in
``distributed_optimizer``; design, bytes per parameter and checkpoint format in parallel/README.md.
"""

from parallel.distributed_optimizer.distributed_optimizer import (
    STATE_FORMAT,
    STATE_VERSION,
    DistributedOptimizer,
    adamw_update_,
)
from parallel.distributed_optimizer.shard_ranges import (
    BucketShard,
    ParamShard,
    compute_shard_ranges,
    merge_runs,
    shard_numel,
)

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "BucketShard",
    "DistributedOptimizer",
    "ParamShard",
    "adamw_update_",
    "compute_shard_ranges",
    "merge_runs",
    "shard_numel",
]
