"""Hand-written DDP on 2 gloo ranks trains to the same parameters as one process and torch DDP.

One pair of ranks runs every configuration (process start-up dominates); the parametrized
tests then check each configuration's result against a single-process reference on the same
global batch (5 AdamW steps, fp32, 1e-6).
"""

import os
from contextlib import nullcontext
from functools import cache

import pytest
import torch
from dist_utils import (
    ToyModel,
    assert_mean_within_rounding,
    local_micro_batches,
    run_distributed,
    toy_batch,
)

from parallel.dist_context import DistContext, init_distributed
from parallel.ddp_comm_hooks import GradBucket, PendingReduction, allreduce_hook
from parallel.distributed_data_parallel import DistributedDataParallel, wrap_model
from utils.errors import ConfigError

STEPS, MICRO_BS = 5, 2
# (name, ddp_impl, accum, DDP options); bucket 1000 < the largest parameter (1850), 64 ≪ it
CONFIGS = [
    (f"my-overlap{int(o)}-bucket{b}-accum{a}", "my", a,
     dict(overlap_grad_reduce=o, bucket_size=b))
    for o in (False, True) for b in (None, 1000, 64) for a in (1, 4)
] + [
    ("my-avg_in_collective", "my", 1, dict(overlap_grad_reduce=True, bucket_size=500,
                                           average_in_collective=True)),
    ("torch-accum1", "torch", 1, dict(overlap_grad_reduce=True, bucket_size=1000)),
    ("torch-accum4", "torch", 4, dict(overlap_grad_reduce=True, bucket_size=1000)),
]


def _make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(ctx: DistContext, impl: str, accum: int, opts: dict) -> dict[str, torch.Tensor]:
    """5 AdamW steps; returns the final parameters and (key ``grad.NAME``) the first step's
    averaged gradients — Adam is nearly invariant to a gradient scale, the gradients are not."""
    model = ToyModel()
    wrapped = wrap_model(model, ctx, ddp_impl=impl, **opts)
    optimizer = _make_optimizer(model)
    first_grads = {}
    for step in range(STEPS):
        x, y = toy_batch(step, ctx.world_size * accum * MICRO_BS)
        micro = local_micro_batches(x, y, ctx.rank, ctx.world_size, accum)
        for m, (xm, ym) in enumerate(micro):
            with wrapped.no_sync() if m < accum - 1 else nullcontext():
                (wrapped(xm, ym) / accum).backward()
        if impl == "my":
            wrapped.finish_grad_sync()
            for p in model.parameters():
                p.grad = p.main_grad
        if step == 0:
            first_grads = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        if impl == "my":
            wrapped.zero_grad_buffer()
        else:
            optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()} | first_grads


class _CountingHook:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, bucket: GradBucket) -> PendingReduction:
        self.calls += 1
        return allreduce_hook(bucket)


def _no_sync_and_unused_param(ctx: DistContext) -> dict:
    """no_sync sends nothing; a parameter without a gradient does not block the sync."""
    model = ToyModel()
    model.unused = torch.nn.Linear(3, 3)
    hook = _CountingHook()
    ddp = DistributedDataParallel(model, ctx, bucket_size=300, overlap_grad_reduce=True,
                                  comm_hook=hook)
    x, y = toy_batch(0, 4)
    with ddp.no_sync():
        ddp(x, y).backward()
        ddp(x, y).backward()
    calls_in_no_sync = hook.calls
    ddp(x, y).backward()
    calls_during_backward = hook.calls
    ddp.finish_grad_sync()
    return dict(no_sync=calls_in_no_sync, backward=calls_during_backward, total=hook.calls,
                buckets=len(ddp.buckets), unused_grad=model.unused.weight.main_grad.abs().sum())


class _SometimesExtra(ToyModel):
    """ToyModel plus a parameter that only some steps use."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Parameter(torch.ones(5))
        self.use_extra = True

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = super().forward(x, y)
        return loss + self.extra.square().sum() if self.use_extra else loss


def _no_stale_grads(ctx: DistContext) -> dict:
    """The buffer is not zero-filled between steps: step 2's gradients (2 micro-batches) must not
    contain step 1's, and a parameter used in step 1 only must come out of step 2 as zero."""
    out = {}
    for overlap in (False, True):
        model = _SometimesExtra()
        ddp = DistributedDataParallel(model, ctx, bucket_size=300, overlap_grad_reduce=overlap)
        for step, use_extra in ((0, True), (1, False)):
            ddp.zero_grad_buffer()
            model.use_extra = use_extra
            micro = local_micro_batches(*toy_batch(step, 8), ctx.rank, ctx.world_size, 2)
            for m, (xm, ym) in enumerate(micro):
                with ddp.no_sync() if m == 0 else nullcontext():
                    (ddp(xm, ym) / 2).backward()
            ddp.finish_grad_sync()
        out[overlap] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return out


def _bf16_grads(ctx: DistContext) -> dict:
    """A bf16 model's averaged grads, reduced in fp32 (as asked) and in bf16, and this rank's
    local grads (computed here: bf16 CPU matmuls depend on the thread count)."""
    (x, y), = local_micro_batches(*toy_batch(0, 8), ctx.rank, ctx.world_size, 1)
    plain = ToyModel().to(torch.bfloat16)
    plain(x, y).backward()
    out = {"local": {n: p.grad.float() for n, p in plain.named_parameters()}}
    for fp32 in (True, False):
        model = ToyModel().to(torch.bfloat16)
        ddp = DistributedDataParallel(model, ctx, bucket_size=1000, overlap_grad_reduce=True,
                                      grad_reduce_in_fp32=fp32)
        ddp(x, y).backward()
        ddp.finish_grad_sync()
        out[fp32] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return out


def _all_configs(ctx: DistContext) -> dict:
    results = {name: _train(ctx, impl, accum, opts) for name, impl, accum, opts in CONFIGS}
    results["no_sync"] = _no_sync_and_unused_param(ctx)
    results["bf16"] = _bf16_grads(ctx)
    results["no_stale_grads"] = _no_stale_grads(ctx)
    results["torch_hooks"] = {name: _torch_hook_grads(ctx, name) for name in ("fp16", "powersgd")}
    results["ctx"] = (ctx.world_size, ctx.backend, str(ctx.device), torch.get_num_threads())
    return results


def _torch_hook_grads(ctx: DistContext, comm_hook: str) -> dict[str, torch.Tensor]:
    """--ddp_impl=torch with PyTorch's own hook for ``comm_hook`` (one backward)."""
    model = ToyModel()
    wrapped = wrap_model(model, ctx, ddp_impl="torch", comm_hook=comm_hook)
    (x, y), = local_micro_batches(*toy_batch(0, 8), ctx.rank, ctx.world_size, 1)
    wrapped(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@cache
def _reference(accum: int) -> dict[str, torch.Tensor]:
    """One process, the whole global batch in one backward."""
    model = ToyModel()
    optimizer = _make_optimizer(model)
    first_grads = {}
    for step in range(STEPS):
        x, y = toy_batch(step, 2 * accum * MICRO_BS)
        model(x, y).backward()
        if step == 0:
            first_grads = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()} | first_grads


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(_all_configs, world_size=2)


@pytest.mark.parametrize("name,impl,accum", [c[:3] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_matches_single_process(distributed_results, name, impl, accum):
    reference = _reference(accum)
    initial = ToyModel().state_dict()
    assert all((reference[k] - initial[k]).abs().max() > 1e-3 for k in initial)  # it trained
    for rank_results in distributed_results:
        for key, value in reference.items():
            torch.testing.assert_close(rank_results[name][key], value, rtol=0, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")


def test_my_ddp_matches_torch_ddp(distributed_results):
    for rank_results in distributed_results:
        for accum in (1, 4):
            mine, theirs = rank_results[f"my-overlap1-bucket1000-accum{accum}"], rank_results[
                f"torch-accum{accum}"]
            for key in theirs:
                torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-6)


def test_no_sync_sends_nothing_and_unused_params_do_not_block(distributed_results):
    for r in distributed_results:
        assert r["no_sync"]["no_sync"] == 0
        # the bucket holding the unused Linear cannot launch during backward...
        assert r["no_sync"]["backward"] < r["no_sync"]["buckets"]
        # ...and finish_grad_sync launches it anyway
        assert r["no_sync"]["total"] == r["no_sync"]["buckets"]
        assert r["no_sync"]["unused_grad"] == 0


def test_gradients_of_an_earlier_step_never_leak_into_the_next(distributed_results):
    reference = _SometimesExtra()
    reference.use_extra = False
    reference(*toy_batch(1, 8)).backward()  # step 2's global batch, same (unstepped) params
    for r in distributed_results:
        for overlap, grads in r["no_stale_grads"].items():
            assert torch.equal(grads["extra"], torch.zeros(5)), overlap  # used in step 1 only
            for name, p in reference.named_parameters():
                if name != "extra":
                    torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-6,
                                               msg=lambda m: f"overlap={overlap} {name}: {m}")


def test_single_process_without_process_group():
    ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    model = ToyModel()
    ddp = DistributedDataParallel(model, ctx, bucket_size=100, overlap_grad_reduce=True)
    x, y = toy_batch(0, 4)
    ddp(x, y).backward()
    ddp.finish_grad_sync()
    reference = ToyModel()
    reference(x, y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is None, name
        torch.testing.assert_close(p.main_grad, q.grad, rtol=0, atol=0)


def test_grad_reduce_in_fp32_accumulates_bf16_grads_in_fp32():
    ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    model = ToyModel().to(torch.bfloat16)
    ddp = DistributedDataParallel(model, ctx, grad_reduce_in_fp32=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # never re-cast
    x, y = toy_batch(0, 4)
    for _ in range(8):  # 8 micro-steps: bf16 accumulation would lose low bits
        with ddp.no_sync():
            ddp(x, y).backward()
    for p in model.parameters():
        assert p.main_grad.dtype == torch.float32
    ref = ToyModel().to(torch.bfloat16)
    ref.load_state_dict(model.state_dict())
    ref(x, y).backward()
    grads_fp32 = {n: 8 * p.grad.float() for n, p in ref.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.main_grad, grads_fp32[n], rtol=0, atol=0)
    fp32_model = ToyModel()
    ddp32 = DistributedDataParallel(fp32_model, ctx)
    assert all(p.main_grad.dtype == torch.float32 for p in ddp32.module.parameters())
    bf16_ddp = DistributedDataParallel(ToyModel().to(torch.bfloat16), ctx)
    assert all(p.main_grad.dtype == torch.bfloat16 for p in bf16_ddp.module.parameters())


def test_bf16_params_reduce_in_the_dtype_asked_for(distributed_results):
    local = [out["bf16"]["local"] for out in distributed_results]
    for out in distributed_results:
        for key in local[0]:
            exact = (local[0][key] + local[1][key]) / 2
            in_fp32, in_bf16 = out["bf16"][True][key], out["bf16"][False][key]
            assert in_fp32.dtype == torch.float32 and in_bf16.dtype == torch.bfloat16
            torch.testing.assert_close(in_fp32, exact, rtol=0, atol=1e-7)
            assert_mean_within_rounding(in_bf16, local[0][key], local[1][key], rel=2**-8)


def test_tied_weights_get_one_gradient():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x)).square().mean()

    ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    model, reference = Tied(), Tied()
    ddp = DistributedDataParallel(model, ctx)
    assert len(ddp.buckets[0].params) == 1
    x = torch.tensor([[1, 2, 3, 2]])
    ddp(x).backward()
    ddp.finish_grad_sync()
    reference(x).backward()
    torch.testing.assert_close(model.emb.weight.main_grad, reference.emb.weight.grad, rtol=0,
                               atol=0)


def test_torch_reference_with_torch_hooks(distributed_results):
    """wrap_model(ddp_impl="torch") registers PyTorch's fp16 / PowerSGD hooks (PowerSGD is a
    plain all-reduce before its start iteration 10)."""
    local = [_local_grads(rank) for rank in range(2)]
    for out in distributed_results:
        for key in local[0]:
            exact = (local[0][key] + local[1][key]) / 2
            assert_mean_within_rounding(out["torch_hooks"]["fp16"][key], local[0][key],
                                        local[1][key], rel=2**-10)
            torch.testing.assert_close(out["torch_hooks"]["powersgd"][key], exact, rtol=0,
                                       atol=1e-6)


def _local_grads(rank: int) -> dict[str, torch.Tensor]:
    model = ToyModel()
    (x, y), = local_micro_batches(*toy_batch(0, 8), rank, 2, 1)
    model(x, y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_init_distributed(distributed_results, monkeypatch):
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(out["ctx"] == (2, "gloo", "cpu", threads) for out in distributed_results)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    assert not torch.distributed.is_initialized()


def test_wrap_model_rejects_unknown_impl():
    ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    with pytest.raises(ConfigError, match="ddp_impl"):
        wrap_model(ToyModel(), ctx, ddp_impl="fsdp")
