"""ZeRO-1 on gloo ranks against single-process torch AdamW, fp16 overflow, bf16, resharding.

Reference: plain ``torch.optim.AdamW`` (decay/no-decay groups) + ``clip_grad_norm_`` on the
whole global batch in ONE process. One spawn per world size runs every flag combination
(process start-up dominates the cost). The toy model gets an extra 3-element parameter so the
parameter count (4,091) divides by neither 2 nor 3, and 1,000-element buckets so parameters
straddle shard boundaries.

Learning rate 1e-3: the fp32 single-process reference is itself only good to ~2e-6 (vs fp64) on
the embedding at lr 1e-2 (Adam turns the rounding of nearly cancelling gradient sums into
O(lr) relative noise), so a 1e-6 comparison needs the smaller rate. A sharding bug moves an
element by O(lr) = 1e-3, three orders above the tolerance.
"""

import itertools
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from dist_utils import ToyModel, local_micro_batches, run_distributed, toy_batch

from optimizer.loss_scaler import DynamicLossScaler
from optimizer.mixed_precision import param_groups
from parallel.dist_context import DistContext, all_reduce, init_distributed
from parallel.distributed_data_parallel import DistributedDataParallel
from parallel.distributed_optimizer import DistributedOptimizer, adamw_update_
from parallel.distributed_optimizer.distributed_optimizer import SHARDED_FORMAT, STATE_FORMAT
from utils.errors import DataError

STEPS, BATCH, LR, WD, BETAS = 5, 12, 1e-3, 0.1, (0.9, 0.95)
CLIP = 0.5  # below the toy model's gradient norm (~1.5), so clipping really rescales
FLAGS = [  # (overlap_param_gather, overlap_optim_step, grad_clip, overlap_grad_reduce, accum)
    (pg, os, clip, pg != os, 2 if clip else 1)
    for pg in (False, True) for os in (False, True) for clip in (CLIP, 0.0)
]


class OddToyModel(ToyModel):
    """ToyModel + a 3-element parameter: 4,091 parameters (odd, and ≢ 0 mod 3).

    The output matrix is read by the parent's forward, never through ``self.out(...)``, as a
    fused LM-head loss does: the overlapped param gather must still wait for it.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.extra = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.fc1(self.emb(x))))  # (B, T, HIDDEN)
        logits = torch.nn.functional.linear(h, self.out.weight)  # (B, T, VOCAB)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        return loss + (self.extra**2).sum()


class DeferredGather:
    """Stands in for ``all_gather``: other ranks' shards land in ``output`` only at ``wait()``.

    Real collectives on gloo finish almost at once, which would hide a missing wait; with this
    stand-in any read of a parameter before its gather is awaited sees the OLD value.
    """

    def __init__(self, real_all_gather) -> None:
        self.real = real_all_gather

    def __call__(self, output, input, world_size, async_op=False):
        staging = torch.empty_like(output)
        work = self.real(staging, input.clone(), world_size, async_op=True)
        real_wait = work.wait

        class Deferred:
            def wait(self) -> None:
                real_wait()
                output.copy_(staging)

        deferred = Deferred()
        if not async_op:
            deferred.wait()
        return deferred


N_PARAMS = sum(p.numel() for p in OddToyModel().parameters())


def _reference(clip: float, steps: range, model: torch.nn.Module | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, list, list]:
    """Single-process AdamW on the global batch: (final params, losses, grad norms)."""
    model = model or OddToyModel()
    optimizer = optimizer or torch.optim.AdamW(param_groups(model, WD), lr=LR, betas=BETAS)
    losses, norms = [], []
    for step in steps:
        loss = model(*toy_batch(step, BATCH))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        norms.append(norm.item())
    return _params(model), losses, norms


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero1_step(ctx: DistContext, ddp: DistributedDataParallel, opt: DistributedOptimizer,
                step: int, accum: int, finish_in_loop: bool = False, lr: float = LR):
    """One global step with ``accum`` micro-batches per rank; returns (global loss, StepResult)."""
    ddp.zero_grad_buffer()
    opt.zero_grad()
    x, y = toy_batch(step, BATCH)
    loss_sum = torch.zeros(())
    for m, (xm, ym) in enumerate(local_micro_batches(x, y, ctx.rank, ctx.world_size, accum)):
        with ddp.no_sync() if m < accum - 1 else nullcontext():
            loss = ddp(xm, ym) / accum
            opt.scale_loss(loss).backward()
        loss_sum += loss.detach()
    if finish_in_loop:  # what train.py does for plain DDP; ZeRO-1 must still be right
        ddp.finish_grad_sync()
    result = opt.step(lr)
    all_reduce(loss_sum, ctx.world_size, op="avg")
    return loss_sum.item(), result


def _build(ctx: DistContext, model: torch.nn.Module, bucket_size: int = 1000, **opts):
    ddp = DistributedDataParallel(model, ctx, bucket_size=bucket_size,
                                  overlap_grad_reduce=opts.pop("overlap_grad_reduce", False),
                                  grad_reduce_in_fp32=opts.pop("grad_reduce_in_fp32", False))
    opt = DistributedOptimizer(ddp, lr=LR, weight_decay=WD, betas=BETAS, **opts)
    return ddp, opt


def _flag_matrix(ctx: DistContext) -> list[dict]:
    import parallel.distributed_optimizer.distributed_optimizer as zero1

    zero1.all_gather = DeferredGather(zero1.all_gather)  # this rank process only
    results = []
    for pg, os, clip, ogr, accum in FLAGS:
        model = OddToyModel()
        ddp, opt = _build(ctx, model, overlap_param_gather=pg, overlap_optim_step=os,
                          grad_clip=clip, overlap_grad_reduce=ogr)
        norms, gathers_pending, gathers_left_after_forward = [], False, False
        for step in range(STEPS):
            _, result = _zero1_step(ctx, ddp, opt, step, accum, finish_in_loop=(step == 1))
            norms.append(result.grad_norm)
            if pg and step % 2 == 0:  # odd steps: the next training forward waits lazily
                gathers_pending |= any(sb.gather is not None for sb in opt.buckets)
                with torch.no_grad():
                    ddp(*toy_batch(0, 2))  # the forward pre-hooks wait for every bucket's gather
                gathers_left_after_forward |= any(sb.gather is not None for sb in opt.buckets)
        opt.finish_param_sync()
        results.append({
            "params": _params(model),
            "norms": norms,
            "state_numel": opt.state_numel(),
            "moment_numel": [sb.exp_avg.numel() for sb in opt.buckets],
            "buffer_numel": sum(b.layout.numel for b in ddp.buffers_by_dtype.values()),
            "owned": {opt.names[p] for sb in opt.buckets for p in sb.owners},
            "gathers_pending": gathers_pending,
            "gathers_left_after_forward": gathers_left_after_forward,
            "root_waits": len(opt._root_waits) if pg else None,
            "n_buckets": len(opt.buckets),
        })
    return results


@pytest.fixture(scope="module")
def references():
    return {clip: _reference(clip, range(STEPS)) for clip in (CLIP, 0.0)}


@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_single_process_adamw_for_every_flag_combination(world_size, references):
    ranks = run_distributed(_flag_matrix, world_size=world_size)
    for index, (pg, os, clip, _, _) in enumerate(FLAGS):
        ref_params, _, ref_norms = references[clip]
        for rank, results in enumerate(ranks):
            got = results[index]
            label = f"world {world_size} rank {rank} pg={pg} os={os} clip={clip}"
            for name, ref in ref_params.items():
                torch.testing.assert_close(got["params"][name], ref, rtol=0, atol=1e-6, msg=label)
            assert got["norms"] == pytest.approx(ref_norms, rel=1e-5), label
            if pg:
                assert got["gathers_pending"] and not got["gathers_left_after_forward"], label
                # only the bucket(s) of ``out`` (read outside its module) wait at the root
                assert 0 < got["root_waits"] < got["n_buckets"], label
    # per-rank optimizer state: ⌈N/world⌉ plus the rank's share of the bucket padding
    first = [results[0] for results in ranks]
    buffer_numel = first[0]["buffer_numel"]
    assert N_PARAMS % world_size != 0
    for got in first:
        assert got["state_numel"] == sum(got["moment_numel"]) == buffer_numel // world_size
        assert math.ceil(N_PARAMS / world_size) <= got["state_numel"] < N_PARAMS
    # some parameter is split between ranks (each updates only its slice)
    assert set.intersection(*(got["owned"] for got in first))


def test_adamw_update_matches_torch_adamw_bitwise():
    torch.manual_seed(0)
    p = torch.randn(50)
    ref = torch.nn.Parameter(p.clone())
    torch_opt = torch.optim.AdamW([ref], lr=LR, betas=BETAS, weight_decay=WD)
    mine, m, v = p.clone(), torch.zeros(50), torch.zeros(50)
    from parallel.distributed_data_parallel import Range

    for step in range(1, 4):
        grad = torch.randn(50)
        ref.grad = grad.clone()
        torch_opt.step()
        adamw_update_(mine, grad, m, v, step, LR, BETAS, 1e-8, [(Range(0, 50), WD)])
    assert torch.equal(mine, ref.detach())


# ---------------------------------------------------------------------------------------------
# fp16 overflow and bf16 masters


def _fp16_overflow(ctx: DistContext) -> dict:
    model = OddToyModel().half()
    ddp, opt = _build(ctx, model, loss_scaler=DynamicLossScaler(2.0**10), grad_clip=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    ddp.zero_grad_buffer()
    x, y = toy_batch(0, 4)
    (xm, ym), = local_micro_batches(x, y, ctx.rank, ctx.world_size, 1)
    opt.scale_loss(ddp(xm, ym)).backward()
    if ctx.rank == 1:  # overflow on rank 1 only, in an element that rank 0 owns
        opt.buckets[0].bucket.grad_data[0] = float("inf")
    skipped = opt.step(LR)
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    _, stepped = _zero1_step(ctx, ddp, opt, 1, 1)
    return {"skipped": skipped, "unchanged": unchanged, "stepped": stepped,
            "scale": opt.loss_scaler.scale, "skips": opt.loss_scaler.skipped_steps,
            "step_count": opt.step_count,
            "changed": not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))}


def test_fp16_overflow_skips_the_step_on_every_rank():
    for got in run_distributed(_fp16_overflow, world_size=2):
        assert not got["skipped"].stepped and not math.isfinite(got["skipped"].grad_norm)
        assert got["skipped"].loss_scale == 2.0**10 and got["unchanged"]
        assert got["stepped"].stepped and got["stepped"].loss_scale == 2.0**9
        assert got["scale"] == 2.0**9 and got["skips"] == 1 and got["step_count"] == 1
        assert got["changed"]


def _bf16(ctx: DistContext) -> dict:
    model = OddToyModel().to(torch.bfloat16)
    ddp, opt = _build(ctx, model, grad_clip=CLIP, grad_reduce_in_fp32=True,
                      overlap_param_gather=True)
    losses = [_zero1_step(ctx, ddp, opt, step % 2, 1, lr=1e-2)[0] for step in range(12)]
    state = opt.state_dict()
    checks = {
        "params_are_rounded_masters": all(
            torch.equal(state["params"][n]["master"].to(torch.bfloat16), p)
            for n, p in model.named_parameters()
        ),
        "masters_finer_than_bf16": any(
            not torch.equal(e["master"], e["master"].to(torch.bfloat16).float())
            for e in state["params"].values()
        ),
    }
    # a fresh optimizer loads the state and takes the same next step
    twin = OddToyModel().to(torch.bfloat16)
    twin_ddp, twin_opt = _build(ctx, twin, grad_clip=CLIP, grad_reduce_in_fp32=True)
    twin_opt.load_state_dict(state)
    _zero1_step(ctx, ddp, opt, 12, 1, lr=1e-2)
    _zero1_step(ctx, twin_ddp, twin_opt, 12, 1, lr=1e-2)
    opt.finish_param_sync()
    return checks | {
        "losses": losses,
        "master_dtypes": {sb.master.dtype for sb in opt.buckets},
        "twin_equal": all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters())),
        "state_bytes": opt.state_bytes(),
        "state_numel": opt.state_numel(),
    }


def test_bf16_params_with_fp32_master_shards_train():
    for got in run_distributed(_bf16, world_size=2):
        assert got["master_dtypes"] == {torch.float32}
        assert got["params_are_rounded_masters"] and got["masters_finer_than_bf16"]
        assert got["losses"][-1] < 0.8 * got["losses"][0], got["losses"]
        assert got["twin_equal"]
        assert got["state_bytes"] == 3 * 4 * got["state_numel"]  # master + 2 moments, fp32


# ---------------------------------------------------------------------------------------------
# checkpoints: gathered, layout-independent state → resume on 1, 2, 3, 4 ranks

SAVE_AT, TOTAL = 3, 5


def _save_then_continue(ctx: DistContext, path: str) -> dict:
    model = OddToyModel()
    ddp, opt = _build(ctx, model, grad_clip=CLIP, overlap_param_gather=True,
                      overlap_optim_step=True)
    for step in range(SAVE_AT):
        _zero1_step(ctx, ddp, opt, step, 1)
    state = opt.state_dict()  # waits for the pending gathers: params below are current
    torch.save(opt.sharded_state_dict(), f"{path}.rank{ctx.rank}")  # what train.py saves
    if ctx.rank == 0:
        torch.save({"optimizer": state, "model": model.state_dict(), "world_size": ctx.world_size},
                   path)
    losses = [_zero1_step(ctx, ddp, opt, step, 1)[0] for step in range(SAVE_AT, TOTAL)]
    opt.finish_param_sync()
    return {"losses": losses, "params": _params(model)}


def _resume(ctx: DistContext, path: str, sharded: bool) -> dict:
    saved = torch.load(path, weights_only=False)
    model = OddToyModel()
    model.load_state_dict(saved["model"])
    ddp, opt = _build(ctx, model, bucket_size=700, grad_clip=CLIP, overlap_optim_step=True)
    if sharded:  # every saved rank's file, read one at a time
        opt.load_sharded_state_dicts(torch.load(f"{path}.rank{r}", weights_only=False)
                                     for r in range(saved["world_size"]))
    else:
        opt.load_state_dict(saved["optimizer"])
    losses = [_zero1_step(ctx, ddp, opt, step, 1)[0] for step in range(SAVE_AT, TOTAL)]
    return {"losses": losses, "params": _params(model)}


def test_checkpoint_reshards_across_world_sizes(tmp_path: Path):
    path = str(tmp_path / "zero1.pt")
    original = run_distributed(_save_then_continue, path, world_size=2)[0]
    state = torch.load(path, weights_only=False)["optimizer"]
    assert state["format"] == STATE_FORMAT and state["step"] == SAVE_AT
    assert {k for e in state["params"].values() for k in e} == {"exp_avg", "exp_avg_sq"}  # fp32
    shards = [torch.load(f"{path}.rank{r}", weights_only=False) for r in range(2)]
    assert [s["format"] for s in shards] == [SHARDED_FORMAT] * 2
    n_state = sum(p.numel() for p in OddToyModel().parameters())
    assert sum(len(pc["exp_avg"]) for s in shards for pc in s["pieces"]) == n_state  # no overlap
    for world_size, sharded in itertools.product((2, 1, 3, 4), (False, True)):
        if world_size == 1:  # in this process: a forked single rank would run 2 OpenMP threads
            resumed = _resume(init_distributed(), path, sharded)  # after the parent's: can hang
        else:
            resumed = run_distributed(_resume, path, sharded, world_size=world_size)[0]
        if world_size == 2:  # same world size: exact
            assert resumed["losses"] == original["losses"]
            for name, p in original["params"].items():
                assert torch.equal(resumed["params"][name], p), name
            continue
        assert resumed["losses"] == pytest.approx(original["losses"], abs=1e-6), world_size
        for name, p in original["params"].items():
            torch.testing.assert_close(resumed["params"][name], p, rtol=0, atol=1e-6)


def test_load_rejects_a_foreign_state():
    ddp, opt = _build(init_distributed(), OddToyModel())
    with pytest.raises(DataError, match="not a ZeRO-1 checkpoint"):
        opt.load_state_dict({"optimizer": {}, "loss_scaler": {}})
    with pytest.raises(DataError, match="not a sharded ZeRO-1 checkpoint"):
        opt.load_sharded_state_dicts([opt.state_dict()])
    shard = opt.sharded_state_dict()
    shard["pieces"] = shard["pieces"][1:]  # as if a saved rank's file were missing
    with pytest.raises(DataError, match="cover"):
        opt.load_sharded_state_dicts([shard])
    state = opt.state_dict()
    state["params"]["fc1.weight"]["exp_avg"] = torch.zeros(3)
    with pytest.raises(DataError, match="fc1.weight"):
        opt.load_state_dict(state)
