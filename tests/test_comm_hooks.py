"""Comm hooks (all-reduce, reduce-scatter, fp16/bf16, PowerSGD) and per-bucket optimizer stepping.

Hooks are checked on 2 gloo ranks against the exact mean of known per-rank tensors; everything
distributed runs in one forked pair of processes (module fixture), the tests then compare.
"""

import io

import pytest
import torch
from dist_utils import (
    ToyModel,
    assert_mean_within_rounding,
    local_micro_batches,
    run_distributed,
    toy_batch,
)

from parallel.dist_context import DistContext
from parallel.ddp_comm_hooks import (
    GradBucket,
    PowerSGDHook,
    allreduce_hook,
    bf16_compress_hook,
    fp16_compress_hook,
    make_comm_hook,
    reduce_scatter_hook,
)
from parallel.ddp_comm_hooks.optimizer_hooks import BucketwiseOptimizer, clip_coefficient
from parallel.ddp_comm_hooks.powersgd_hook import should_compress
from parallel.distributed_data_parallel import DistributedDataParallel, Range
from utils.errors import ConfigError

SHAPES = [torch.Size([6, 4]), torch.Size([5]), torch.Size([3, 7])]  # 24 + 5 + 21 = 50 (+2 pad)
WORLD = 2


def _bucket(values: torch.Tensor, rank: int, is_last: bool = True, avg: bool = False) -> GradBucket:
    ranges, offset = [], 0
    for shape in SHAPES:
        ranges.append(Range(offset, offset + shape.numel()))
        offset += shape.numel()
    return GradBucket(index=0, buffer=values, param_ranges=ranges, param_shapes=SHAPES,
                      is_last=is_last, rank=rank, world_size=WORLD, average_in_collective=avg)


def _grads(rank: int, it: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Rank ``rank``'s bucket at iteration ``it``: 50 values + 2 zero padding."""
    g = torch.Generator().manual_seed(100 * it + rank)
    return torch.cat([torch.randn(50, generator=g) * scale, torch.zeros(2)])


def _mean(it: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (_grads(0, it, scale) + _grads(1, it, scale)) / 2


def _run_hook(hook, rank: int, it: int = 0, scale: float = 1.0, avg: bool = False):
    return hook(_bucket(_grads(rank, it, scale), rank, avg=avg)).wait().clone()


def _hooks_on_ranks(ctx: DistContext) -> dict:
    r = ctx.rank
    out = {
        "allreduce_prescale": _run_hook(allreduce_hook, r),
        "allreduce_avg": _run_hook(allreduce_hook, r, avg=True),
        "fp16": _run_hook(fp16_compress_hook, r),
        "bf16": _run_hook(bf16_compress_hook, r),
        # |g| up to ~6e4: a plain fp16 sum would overflow
        "fp16_large": _run_hook(fp16_compress_hook, r, scale=2e4),
        "reduce_scatter": _run_hook(reduce_scatter_hook, r),
    }
    full = PowerSGDHook(matrix_approximation_rank=8, start_iter=0, min_compression_rate=0.0)
    out["powersgd_full"] = [_run_hook(full, r, it) for it in range(3)]
    low = PowerSGDHook(matrix_approximation_rank=1, start_iter=2, min_compression_rate=0.0)
    out["powersgd_low"] = [_run_hook(low, r, it) for it in range(4)]
    # resume: save after 4 iterations, continue 3 more; a fresh hook loaded from the file must
    # reproduce those 3 results bit for bit (error feedback, warm-started Q, RNG, iteration)
    saved = io.BytesIO()
    torch.save(low.state_dict(), saved)
    out["powersgd_continued"] = [_run_hook(low, r, it) for it in range(4, 7)]
    resumed = PowerSGDHook(matrix_approximation_rank=1, start_iter=2, min_compression_rate=0.0)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved))
    out["powersgd_resumed"] = [_run_hook(resumed, r, it) for it in range(4, 7)]
    out["ddp_grads"] = {name: _ddp_grads(ctx, name) for name in ("fp16", "bf16", "powersgd")}
    out["optimizer"] = {clip: _bucketwise_training(ctx, clip) for clip in (0.0, 0.05)}
    out["losses"] = {name: _losses(ctx, name) for name in ("allreduce", "powersgd")}
    return out


def _losses(ctx: DistContext, hook_name: str, steps: int = 40) -> list[float]:
    """Global-batch losses of a short training run (4 fixed batches, cycled) with the hook;
    PowerSGD at rank 2 after 5 plain steps."""
    model = ToyModel()
    hook = make_comm_hook(hook_name, powersgd_rank=2, powersgd_start_iter=5)
    ddp = DistributedDataParallel(model, ctx, bucket_size=1000, overlap_grad_reduce=True,
                                  comm_hook=hook)
    optimizer = _adamw(model.parameters())
    losses = []
    for step in range(steps):
        (x, y), = local_micro_batches(*toy_batch(step % 4, 16), ctx.rank, ctx.world_size, 1)
        loss = ddp(x, y)
        loss.backward()
        ddp.finish_grad_sync()
        for p in model.parameters():
            p.grad = p.main_grad
        optimizer.step()
        ddp.zero_grad_buffer()
        losses.append(loss.item())
    return losses


def _ddp_grads(ctx: DistContext, hook_name: str) -> dict[str, torch.Tensor]:
    """Averaged grads of one step of the toy model through DDP with the named hook."""
    model = ToyModel()
    hook = make_comm_hook(hook_name, powersgd_rank=64, powersgd_start_iter=0,
                          powersgd_min_compression_rate=0.0)
    ddp = DistributedDataParallel(model, ctx, bucket_size=1000, overlap_grad_reduce=True,
                                  comm_hook=hook)
    x, y = toy_batch(0, 8)
    (xm, ym), = local_micro_batches(x, y, ctx.rank, ctx.world_size, 1)
    ddp(xm, ym).backward()
    ddp.finish_grad_sync()
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}


def _adamw(groups):
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)


def _bucketwise_training(ctx: DistContext, clip: float) -> dict[str, dict]:
    """3 steps with BucketwiseOptimizer vs the plain way (full sync, torch clipping, one AdamW),
    and vs the WRONG way (clipping each bucket by its own norm) to show the test can fail."""
    results = {}
    for mode in ("bucketwise", "plain", "per_bucket_clip"):
        model = ToyModel()
        ddp = DistributedDataParallel(model, ctx, bucket_size=600, overlap_grad_reduce=True)
        groups = [{"params": [model.emb.weight, model.fc1.weight, model.out.weight]},
                  {"params": [model.fc1.bias, *model.norm.parameters()], "weight_decay": 0.0}]
        bucketwise = BucketwiseOptimizer(ddp, groups, _adamw, grad_clip=clip)
        plain = _adamw(groups)
        norms = []
        for step in range(3):
            x, y = toy_batch(step, 8)
            (xm, ym), = local_micro_batches(x, y, ctx.rank, ctx.world_size, 1)
            ddp(xm, ym).backward()
            if mode == "bucketwise":
                norms.append(bucketwise.step())
            else:
                ddp.finish_grad_sync()
                for p in model.parameters():
                    p.grad = p.main_grad
                if mode == "plain" and clip > 0:
                    norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                elif clip > 0:
                    for bucket in ddp.buckets:
                        torch.nn.utils.clip_grad_norm_(bucket.params, clip)
                plain.step()
            ddp.zero_grad_buffer()
        results[mode] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                         "norms": norms, "n_buckets": len(ddp.buckets)}
    return results


def _fp16_overflow_under_powersgd(ctx: DistContext) -> list[tuple[bool, float]]:
    """fp16 + dynamic loss scaling: one overflowed step (skipped) must not poison the later ones
    through PowerSGD's error feedback or warm-start Q."""
    from optimizer.loss_scaler import DynamicLossScaler
    from optimizer.mixed_precision import MixedPrecisionOptimizer
    from parallel.distributed_data_parallel import wrap_model

    model = ToyModel().half()
    ddp = wrap_model(model, ctx, ddp_impl="my", bucket_size=1000, grad_reduce_in_fp32=True,
                     comm_hook="powersgd", powersgd_rank=1, powersgd_start_iter=0)
    opt = MixedPrecisionOptimizer(model, lr=1e-3, weight_decay=0.0,
                                  loss_scaler=DynamicLossScaler(2.0**10))
    log = []
    for step in range(5):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        (x, y), = local_micro_batches(*toy_batch(step, 8), ctx.rank, ctx.world_size, 1)
        opt.scale_loss(ddp(x, y)).backward()
        if step == 1 and ctx.rank == 1:  # one overflow, on one rank, in one step
            model.fc1.weight.main_grad[0, 0] = float("inf")
        ddp.finish_grad_sync()
        result = opt.step(1e-3)
        log.append((result.stepped, result.loss_scale))
    return log


def test_powersgd_recovers_after_an_fp16_overflow():
    for log in run_distributed(_fp16_overflow_under_powersgd, world_size=WORLD):
        assert [stepped for stepped, _ in log] == [True, False, True, True, True], log
        assert log[2][1] == log[0][1] / 2  # backed off once, then steps again


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_hooks_on_ranks, world_size=WORLD)


def test_allreduce_both_averaging_modes(ranks):
    for out in ranks:
        torch.testing.assert_close(out["allreduce_prescale"], _mean(), rtol=0, atol=1e-7)
        torch.testing.assert_close(out["allreduce_avg"], _mean(), rtol=0, atol=1e-7)


REL = {"fp16": 2**-10, "bf16": 2**-7}  # ≈ two roundings of unit roundoff 2^-11 / 2^-8


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_compression_within_rounding_tolerance(ranks, name):
    for out in ranks:
        assert_mean_within_rounding(out[name], _grads(0), _grads(1), REL[name])


def test_fp16_prescaling_prevents_overflow(ranks):
    a, b = _grads(0, scale=2e4), _grads(1, scale=2e4)
    assert (a + b).abs().max() > 65504  # a plain fp16 sum would be inf
    for out in ranks:
        assert torch.isfinite(out["fp16_large"]).all()
        assert_mean_within_rounding(out["fp16_large"], a, b, REL["fp16"])


def test_reduce_scatter_averages_own_shard(ranks):
    for rank, out in enumerate(ranks):
        shard = slice(rank * 26, (rank + 1) * 26)
        torch.testing.assert_close(out["reduce_scatter"][shard], _mean()[shard], rtol=0,
                                   atol=1e-7)


def test_powersgd_full_rank_equals_plain_average(ranks):
    for out in ranks:
        for it, result in enumerate(out["powersgd_full"]):
            torch.testing.assert_close(result, _mean(it), rtol=0, atol=1e-5)


def test_powersgd_low_rank(ranks):
    for out in ranks:
        results = out["powersgd_low"]
        for it in range(2):  # before start_iter: the plain average
            torch.testing.assert_close(results[it], _mean(it), rtol=0, atol=1e-7)
        for it in (2, 3):  # compressed: every matrix has rank 1, vectors stay exact
            result = results[it]
            assert torch.linalg.matrix_rank(result[:24].view(6, 4)) == 1
            assert torch.linalg.matrix_rank(result[29:50].view(3, 7)) == 1
            torch.testing.assert_close(result[24:29], _mean(it)[24:29], rtol=0, atol=1e-6)
            assert not torch.allclose(result, _mean(it), atol=1e-3)
    torch.testing.assert_close(ranks[0]["powersgd_low"], ranks[1]["powersgd_low"], rtol=0,
                               atol=0)


def test_powersgd_resume_is_exact(ranks):
    for out in ranks:
        for a, b in zip(out["powersgd_continued"], out["powersgd_resumed"]):
            assert torch.equal(a, b)


def _rank_grads(rank: int) -> dict[str, torch.Tensor]:
    """What rank ``rank`` computes locally in ``_ddp_grads`` (before any communication)."""
    model = ToyModel()
    (x, y), = local_micro_batches(*toy_batch(0, 8), rank, WORLD, 1)
    model(x, y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["fp16", "bf16", "powersgd"])
def test_hooks_through_ddp(ranks, name):
    g0, g1 = _rank_grads(0), _rank_grads(1)
    for out in ranks:
        for key in g0:
            result = out["ddp_grads"][name][key]
            if name == "powersgd":  # full rank: the plain average
                torch.testing.assert_close(result, (g0[key] + g1[key]) / 2, rtol=0, atol=1e-5)
            else:
                assert_mean_within_rounding(result, g0[key], g1[key], REL[name])


def test_should_compress():
    assert not should_compress(torch.Size([1000]), 1, 2.0)  # vectors never
    assert should_compress(torch.Size([100, 100]), 4, 2.0)  # 800 × 2 < 10,000
    assert not should_compress(torch.Size([8, 8]), 4, 2.0)  # 64 × 2 ≥ 64
    assert should_compress(torch.Size([8, 8]), 8, 0.0)  # rate 0: always (tests use full rank)
    assert should_compress(torch.Size([64, 4, 4]), 1, 2.0)  # viewed as 64 × 16


def test_make_comm_hook_rejects_unknown_name():
    with pytest.raises(ConfigError, match="comm_hook.*allreduce"):
        make_comm_hook("fp8")


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_bucketwise_step_equals_normal_step(ranks, clip):
    for out in ranks:
        res = out["optimizer"][clip]
        assert res["bucketwise"]["n_buckets"] > 1
        for key, value in res["plain"]["params"].items():
            torch.testing.assert_close(res["bucketwise"]["params"][key], value, rtol=0, atol=1e-6)
        if clip > 0:
            for mine, torchs in zip(res["bucketwise"]["norms"], res["plain"]["norms"]):
                torch.testing.assert_close(mine, torchs, rtol=1e-6, atol=0)
                assert torchs > clip  # clipping was really active
            wrong = res["per_bucket_clip"]["params"]
            assert any((wrong[k] - v).abs().max() > 1e-4 for k, v in res["plain"]["params"].items())


def test_clip_coefficient_formula():
    assert clip_coefficient(torch.tensor(0.5), 1.0) == 1.0
    torch.testing.assert_close(clip_coefficient(torch.tensor(4.0), 1.0), torch.tensor(1 / 4.000001))


def test_powersgd_low_rank_still_trains(ranks):
    """Rank-2 PowerSGD with error feedback lowers the loss about as much as exact averaging."""
    losses = ranks[0]["losses"]
    first, plain = losses["allreduce"][0], losses["allreduce"][-1]
    compressed = losses["powersgd"][-1]
    assert plain < 0.7 * first
    assert first - compressed > 0.8 * (first - plain), (first, plain, compressed)


def test_ddp_exposes_comm_hook_state_for_checkpoints():
    ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    hook = make_comm_hook("powersgd", powersgd_start_iter=1, powersgd_min_compression_rate=0.0)
    ddp = DistributedDataParallel(ToyModel(), ctx, bucket_size=1000, comm_hook=hook)
    for step in range(3):
        ddp(*toy_batch(step, 4)).backward()
        ddp.finish_grad_sync()
        ddp.zero_grad_buffer()
    state = ddp.comm_hook_state_dict()
    assert state["iteration"] == 3 and len(state["errors"]) == len(ddp.buckets)
    fresh = DistributedDataParallel(ToyModel(), ctx, bucket_size=1000,
                                    comm_hook=make_comm_hook("powersgd"))
    fresh.load_comm_hook_state_dict(state)
    assert fresh.comm_hook_state_dict()["iteration"] == 3
    assert DistributedDataParallel(ToyModel(), ctx).comm_hook_state_dict() == {}
