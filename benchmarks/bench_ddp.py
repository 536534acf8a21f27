"""Step time and tokens/s of our DDP (overlap on/off, every comm hook) vs PyTorch's DDP.

    python -m benchmarks.bench_ddp [--nproc=2] [--rounds=5] [--steps=5] [--sizes=small,medium]
                                   [--configs="my, overlap on;my, overlap off"]

Re-launches itself under ``torchrun --standalone --nproc_per_node=NPROC`` (CPU: gloo). Two toy
token models (embedding → residual MLP blocks → LM head, cross-entropy) of different sizes are
trained with AdamW in every configuration ("step per bucket": our ``BucketwiseOptimizer`` steps
each bucket's parameters as soon as its all-reduce lands, overlapping the optimizer with the
communication still in flight). ``--configs`` picks some (torch DDP always runs). Configurations are INTERLEAVED — each round runs
``--steps`` steps of every configuration in turn — so slow drift of a shared machine hits them
all alike; the table shows the median step time over all timed steps (after one warm-up round).
Rank 0 prints the table; "vs torch" is the step-time ratio to torch DDP on the same model.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from parallel.ddp_comm_hooks.optimizer_hooks import BucketwiseOptimizer
from parallel.dist_context import DistContext, barrier, destroy_distributed, init_distributed
from parallel.distributed_data_parallel import wrap_model
from utils.errors import ConfigError, run_cli
from utils.logging_utils import setup_logging

SIZES = {  # name: (vocab, dim, n_blocks)
    "small": (512, 128, 2),
    "medium": (2048, 384, 4),
}
CONFIGS = [  # (label, ddp_impl, overlap_grad_reduce, comm_hook, AdamW stepped per bucket)
    ("torch DDP", "torch", True, "allreduce", False),
    ("my, overlap off", "my", False, "allreduce", False),
    ("my, overlap on", "my", True, "allreduce", False),
    ("my, overlap on, step per bucket", "my", True, "allreduce", True),
    ("my, overlap on, fp16", "my", True, "fp16", False),
    ("my, overlap on, bf16", "my", True, "bf16", False),
    ("my, overlap on, powersgd r4", "my", True, "powersgd", False),
]


class TokenMLP(nn.Module):
    """Embedding → n × (x + W2 gelu(W1 LN(x))) → LN → LM head; loss = mean CE."""

    def __init__(self, vocab: int, dim: int, n_blocks: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                          nn.Linear(4 * dim, dim))
            for _ in range(n_blocks)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)  # (B, T, dim)
        for block in self.blocks:
            h = h + block(h)
        logits = self.head(self.norm(h))  # (B, T, vocab)
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


@dataclass
class Run:
    """One (model size, configuration) under test, with its own model and optimizer."""

    size: str
    label: str
    impl: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float]
    phases: dict[str, list[float]] = field(default_factory=dict)  # phase -> seconds per step


def _make_run(ctx: DistContext, size: str, config: tuple, args: argparse.Namespace) -> Run:
    label, impl, overlap, hook, per_bucket = config
    model = TokenMLP(*SIZES[size])
    wrapped = wrap_model(model, ctx, ddp_impl=impl, bucket_size=args.bucket_size,
                         overlap_grad_reduce=overlap, comm_hook=hook, powersgd_rank=4,
                         powersgd_start_iter=0)
    if per_bucket:  # step each bucket's params as soon as its all-reduce lands
        optimizer = BucketwiseOptimizer(wrapped, [{"params": list(model.parameters())}],
                                        lambda groups: torch.optim.AdamW(groups, lr=1e-3))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Run(size, label, impl, wrapped, optimizer, [])


PHASES = ("forward+backward", "wait for grad sync", "optimizer", "zero grads")


def _step(run: Run, x: torch.Tensor, y: torch.Tensor, accum: int) -> list[float]:
    """One optimizer step of ``accum`` micro-batches (no_sync on all but the last); returns the
    seconds spent in each of :data:`PHASES`. Torch DDP waits for its gradients inside
    ``backward()``, so its second phase is 0 and its first includes the exposed communication;
    with the optimizer stepped per bucket the wait happens inside the optimizer phase."""
    t0 = time.perf_counter()
    for m, (xm, ym) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
        with run.model.no_sync() if m < accum - 1 else nullcontext():
            (run.model(xm, ym) / accum).backward()
    t1 = time.perf_counter()
    if isinstance(run.optimizer, BucketwiseOptimizer):  # waits for each bucket inside step()
        run.optimizer.step()
        t3 = time.perf_counter()
        run.optimizer.zero_grad()
        return [t1 - t0, 0.0, t3 - t1, time.perf_counter() - t3]
    if run.impl == "my":
        run.model.finish_grad_sync()
        for p in run.model.module.parameters():
            p.grad = p.main_grad
    t2 = time.perf_counter()
    run.optimizer.step()
    t3 = time.perf_counter()
    if run.impl == "my":
        run.model.zero_grad_buffer()
    else:
        run.optimizer.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def _benchmark(ctx: DistContext, args: argparse.Namespace) -> None:
    configs = [c for c in CONFIGS if c[1] == "torch" or args.configs is None or c[0] in args.configs]
    runs = [_make_run(ctx, size, c, args) for size in args.sizes for c in configs]
    g = torch.Generator().manual_seed(ctx.rank)
    for round_index in range(args.rounds + 1):  # round 0 is warm-up
        for run in runs:
            vocab = SIZES[run.size][0]
            for _ in range(args.steps):
                data = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g)
                barrier(ctx.world_size)
                start = time.perf_counter()
                phases = _step(run, data[:, :-1], data[:, 1:], args.accum)
                if round_index > 0:
                    run.times.append(time.perf_counter() - start)
                    for name, seconds in zip(PHASES, phases, strict=True):
                        run.phases.setdefault(name, []).append(seconds)
    if ctx.is_main:
        _print_table(runs, args, ctx.world_size)


def _print_table(runs: list[Run], args: argparse.Namespace, world_size: int) -> None:
    tokens = args.batch_size * args.seq_len * world_size  # per optimizer step, all ranks
    torch_ms = {r.size: statistics.median(r.times) * 1e3 for r in runs if r.impl == "torch"}
    print(f"\n{world_size} ranks, {args.batch_size}×{args.seq_len} tokens per rank per step, "
          f"accum {args.accum}, bucket {args.bucket_size} elements, "
          f"{torch.get_num_threads()} threads/rank, median of {args.rounds * args.steps} steps")
    print(f"| model | params | configuration | step ms | tokens/s | vs torch |")
    print("|---|---:|---|---:|---:|---:|")
    for r in runs:
        ms = statistics.median(r.times) * 1e3
        n_params = sum(p.numel() for p in r.model.parameters())
        print(f"| {r.size} | {n_params / 1e6:.2f}M | {r.label} | {ms:.1f} | "
              f"{tokens / ms * 1e3:,.0f} | {ms / torch_ms[r.size]:.2f}× |")
    print("\nWhere the time goes (median ms per step of each phase):")
    print("| model | configuration | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---:|" * len(PHASES))
    for r in runs:
        cells = " | ".join(f"{statistics.median(r.phases[name]) * 1e3:.2f}" for name in PHASES)
        print(f"| {r.size} | {r.label} | {cells} |")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks to launch (CPU processes)")
    parser.add_argument("--sizes", default="small,medium", help=f"of {','.join(SIZES)}")
    parser.add_argument("--configs", default=None,
                        help="semicolon-separated configuration labels to run besides torch DDP "
                             f"(default: all of {', '.join(c[0] for c in CONFIGS[1:])})")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--steps", type=int, default=5, help="steps per config per round")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--bucket_size", type=int, default=250_000, help="elements per bucket")
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",")
    if args.configs is not None:
        args.configs = args.configs.split(";")
        labels = [c[0] for c in CONFIGS]
        for label in args.configs:
            if label not in labels:
                raise ConfigError(f"--configs: unknown configuration {label!r}; expected some of "
                                  f"{labels}")
    for size in args.sizes:
        if size not in SIZES:
            raise ConfigError(f"--sizes: unknown size {size!r}; expected some of {list(SIZES)}")
    if args.batch_size % args.accum:
        raise ConfigError(f"--batch_size={args.batch_size} must divide by --accum={args.accum}")
    return args


def main() -> None:
    args = _parse_args()
    if "RANK" not in os.environ:  # not under torchrun yet: launch NPROC copies of ourselves
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc}", "-m", "benchmarks.bench_ddp", *sys.argv[1:]]
        sys.exit(subprocess.call(command))
    setup_logging(level=logging.WARNING)  # keep the table readable
    ctx = init_distributed()
    try:
        _benchmark(ctx, args)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    run_cli(main)
