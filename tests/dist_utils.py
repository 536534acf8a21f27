"""Run a function on N gloo ranks (CPU processes) for distributed tests.

    def _check(ctx: DistContext, scale: float) -> float:   # module level (picklable for spawn)
        ...
        return value                                       # any picklable result

    results = run_distributed(_check, 2.0, world_size=2)   # [rank0_result, rank1_result]

Each rank is a forked process (``start_method="spawn"`` for a fresh interpreter) with torchrun's
environment variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT on a
free port), so ``parallel.dist_context.init_distributed()`` creates the gloo group exactly as
under torchrun. The module also holds the toy model and batches the DDP / ZeRO tests share.
An exception in any rank fails the test with that rank's traceback; a hang fails after
``timeout`` seconds instead of blocking the suite.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Optimizers import torch._dynamo lazily (~5 s per fresh process on a busy machine): import it
# once here so the forked ranks share it.
import torch._dynamo  # noqa: F401
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    local_rank: int, fn: Callable[..., Any], args: tuple, world_size: int, port: int, out_dir: str
) -> None:
    for path in (str(ROOT), str(ROOT / "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from parallel.dist_context import destroy_distributed, init_distributed

    ctx = init_distributed()
    try:
        result = fn(ctx, *args)
        with open(os.path.join(out_dir, f"rank{local_rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        destroy_distributed()


def run_distributed(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 120.0,
    start_method: str = "fork",
) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker,
            args=(fn, args, world_size, free_port(), out_dir),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):  # raises if a rank failed, with its traceback
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"distributed test did not finish within {timeout} s")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


# ---------------------------------------------------------------------------------------------
# A tiny model of awkward sizes and a deterministic global batch, shared by the DDP / ZeRO tests.

VOCAB, DIM, HIDDEN, SEQ = 37, 24, 50, 5


class ToyModel(torch.nn.Module):
    """Embedding → Linear → tanh → LayerNorm → Linear(no bias) → CE loss; 4,088 parameters.

    Largest parameter: the 50 × 37 output matrix (1,850 elements).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.fc1 = torch.nn.Linear(DIM, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.fc1(self.emb(x))))  # (B, T, HIDDEN)
        logits = self.out(h)  # (B, T, VOCAB)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def toy_batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: (x, y) LongTensors of shape (batch_size, SEQ)."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def local_micro_batches(
    x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int, accum: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s ``accum`` equal micro-batches of the global batch (rank-major split)."""
    xs, ys = x.chunk(world_size * accum), y.chunk(world_size * accum)
    return [(xs[i], ys[i]) for i in range(rank * accum, (rank + 1) * accum)]


def assert_mean_within_rounding(result: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                rel: float) -> None:
    """|result - (a+b)/2| ≤ rel · (|a|+|b|)/2 elementwise (+ a subnormal floor): the error of
    rounding a/2, b/2 and their sum in a narrow dtype — relative to the two ranks' inputs, not to
    their (possibly cancelled) mean. Also checks that some rounding did happen."""
    err = (result.float() - (a + b) / 2).abs()
    bound = rel * (a.abs() + b.abs()) / 2 + 1e-7
    assert (err <= bound).all(), f"error up to {(err / bound).max():.2f}× the rounding bound"
    assert err.max() > 0, "no rounding at all: did the values go through the narrow dtype?"
