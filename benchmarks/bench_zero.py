"""Per-rank optimizer memory and step time: our ZeRO-1 vs our DDP + full AdamW vs torch's ZeRO.

    python -m benchmarks.bench_zero [--world_size=2] [--steps=6] [--dim=256] [--n_layers=4]

Spawns ``world_size`` gloo ranks (CPU; NCCL + one GPU per rank when CUDA has enough devices) and
trains the same fp32 Llama-style model for a few steps with each of

* ``zero1``: our DDP (reduce-scatter hook) + :class:`DistributedOptimizer`;
* ``ddp+adamw``: our DDP (all-reduce) + the full :class:`MixedPrecisionOptimizer` on every rank;
* ``torch-zero``: ``torch.nn.parallel.DistributedDataParallel`` + ``ZeroRedundancyOptimizer``.

Reported per rank (rank 0 shown; all ranks own the same amount up to padding): optimizer state
elements and MiB (Adam moments + separate fp32 masters), the time of the grad sync + optimizer
step after backward (``step ms``; torch DDP reduces during backward, so its number is the step
plus the broadcast of the updated shards only), and the whole iteration (``iter ms``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from parallel.dist_context import DistContext, barrier, destroy_distributed, init_distributed
from utils.errors import ConfigError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

IMPLS = ("zero1", "ddp+adamw", "torch-zero")
LR, WD = 1e-3, 0.1


def _build_model(args: argparse.Namespace, ctx: DistContext) -> torch.nn.Module:
    from model.configuration_z2all import Z2allConfig
    from model.modeling_z2all import Z2allForCausalLM

    torch.manual_seed(0)
    config = Z2allConfig.from_preset("debug", vocab_size=args.vocab_size, dim=args.dim,
                                     n_layers=args.n_layers, n_heads=4, n_kv_heads=4,
                                     max_seq_len=args.seq_len, kernels="torch")
    return Z2allForCausalLM(config).to(ctx.device)


def _tensor_bytes(tensors: Any) -> tuple[int, int]:
    """(elements, bytes) of every tensor in an optimizer's ``state`` values."""
    ts = [t for state in tensors for t in state.values() if torch.is_tensor(t) and t.numel() > 1]
    return sum(t.numel() for t in ts), sum(t.numel() * t.element_size() for t in ts)


def _setup(impl: str, model: torch.nn.Module, ctx: DistContext) -> tuple[Any, Any, Any]:
    """(module to call, optimizer, step function) for one implementation."""
    from optimizer.mixed_precision import MixedPrecisionOptimizer, param_groups
    from parallel.distributed_data_parallel import DistributedDataParallel
    from parallel.distributed_optimizer import DistributedOptimizer

    if impl == "zero1":
        ddp = DistributedDataParallel(model, ctx, bucket_size=1_000_000)
        opt = DistributedOptimizer(ddp, lr=LR, weight_decay=WD, grad_clip=1.0)
        return ddp, opt, lambda: (opt.step(LR), ddp.zero_grad_buffer())  # step, then reset
    if impl == "ddp+adamw":
        ddp = DistributedDataParallel(model, ctx, bucket_size=1_000_000)
        opt = MixedPrecisionOptimizer(model, lr=LR, weight_decay=WD, grad_clip=1.0)

        def step() -> None:
            ddp.finish_grad_sync()
            opt.step(LR)
            ddp.zero_grad_buffer()

        return ddp, opt, step
    from torch.distributed.optim import ZeroRedundancyOptimizer

    wrapped = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=4)
    opt = ZeroRedundancyOptimizer(param_groups(model, WD), optimizer_class=torch.optim.AdamW, lr=LR)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # full grads are on every rank
        opt.step()
        opt.zero_grad()

    return wrapped, opt, step


def _state_size(impl: str, opt: Any) -> tuple[int, int]:
    if impl == "zero1":
        return 2 * opt.state_numel(), opt.state_bytes()
    if impl == "ddp+adamw":
        return _tensor_bytes(opt.optimizer.state.values())
    return _tensor_bytes(opt.optim.state.values())


def _run_impl(impl: str, args: argparse.Namespace, ctx: DistContext) -> dict[str, float]:
    model = _build_model(args, ctx)
    module, opt, step = _setup(impl, model, ctx)
    g = torch.Generator().manual_seed(1234 + ctx.rank)
    step_times, iter_times = [], []
    for it in range(args.steps + 1):  # iteration 0 warms up (allocates the Adam state)
        x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
        barrier(ctx.world_size)
        t0 = time.perf_counter()
        module(x[:, :-1].to(ctx.device), labels=x[:, 1:].to(ctx.device)).loss.backward()
        t1 = time.perf_counter()
        step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if it:
            step_times.append(t2 - t1)
            iter_times.append(t2 - t0)
    elements, nbytes = _state_size(impl, opt)
    return {"elements": elements, "mib": nbytes / 2**20,
            "step_ms": 1000 * statistics.median(step_times),
            "iter_ms": 1000 * statistics.median(iter_times),
            "params": sum(p.numel() for p in model.parameters())}


def _worker(rank: int, args: argparse.Namespace, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size),
                      LOCAL_WORLD_SIZE=str(args.world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = init_distributed()
    try:
        results = {impl: _run_impl(impl, args, ctx) for impl in args.impls}
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
    finally:
        destroy_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(per_rank: list[dict[str, dict[str, float]]], world_size: int) -> str:
    n_params = int(next(iter(per_rank[0].values()))["params"])
    lines = [f"{n_params:,} parameters, {world_size} ranks, fp32, AdamW (optimizer state per rank)",
             f"{'impl':<12} {'state elems r0':>15} {'state MiB r0':>13} {'MiB max rank':>13}"
             f" {'step ms':>9} {'iter ms':>9}"]
    for impl in per_rank[0]:
        r0 = per_rank[0][impl]
        lines.append(f"{impl:<12} {int(r0['elements']):>15,} {r0['mib']:>13.2f}"
                     f" {max(r[impl]['mib'] for r in per_rank):>13.2f}"
                     f" {max(r[impl]['step_ms'] for r in per_rank):>9.1f}"
                     f" {max(r[impl]['iter_ms'] for r in per_rank):>9.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help="comma-separated subset of " + ", ".join(IMPLS))
    args = parser.parse_args()
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown or args.world_size < 1 or args.steps < 1:
        raise ConfigError(f"--impls must be among {', '.join(IMPLS)} (got {unknown}); "
                          "--world_size and --steps must be ≥ 1")
    if torch.cuda.is_available() and torch.cuda.device_count() < args.world_size:
        raise ConfigError(f"--world_size={args.world_size} needs one GPU per rank; "
                          f"{torch.cuda.device_count()} visible")
    setup_logging()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(args, _free_port(), out_dir), nprocs=args.world_size)
        per_rank = []
        for rank in range(args.world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                per_rank.append(pickle.load(f))
    print(format_table(per_rank, args.world_size))


if __name__ == "__main__":
    run_cli(main)
