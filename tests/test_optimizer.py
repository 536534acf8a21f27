"""Mixed-precision optimizer wrapper vs plain torch AdamW; loss scaling; LR schedule."""

import math

import pytest
import torch
from torch import nn

from optimizer.loss_scaler import DynamicLossScaler
from optimizer.lr_schedule import cosine_lr
from optimizer.mixed_precision import MixedPrecisionOptimizer, make_loss_scaler, param_groups


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 13), nn.LayerNorm(13), nn.Linear(13, 5))
    return model.to(dtype)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 11, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)


def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x).float(), y)


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_fp32_wrapper_equals_plain_adamw(grad_clip):
    ours, ref = make_model(), make_model()
    opt = MixedPrecisionOptimizer(ours, lr=1e-2, weight_decay=0.1, grad_clip=grad_clip)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    assert not opt.keeps_masters
    for step in range(5):
        lr = cosine_lr(step, 1e-2, 1e-3, 2, 5)
        opt.zero_grad()
        loss_fn(ours, step).backward()
        result = opt.step(lr)
        ref_opt.zero_grad()
        loss_fn(ref, step).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), grad_clip if grad_clip else math.inf)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
        assert result.stepped and result.grad_norm == pytest.approx(float(norm), rel=1e-6)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_decay_groups():
    groups = param_groups(make_model(), 0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_bf16_trains_with_fp32_masters():
    model = make_model(dtype=torch.bfloat16)
    opt = MixedPrecisionOptimizer(model, lr=1e-2, weight_decay=0.0, grad_clip=1.0,
                                  loss_scaler=make_loss_scaler(torch.bfloat16))
    assert opt.keeps_masters and all(m.dtype == torch.float32 for m in opt.master_params)
    before = [m.detach().clone() for m in opt.master_params]
    for step in range(3):
        opt.zero_grad()
        loss_fn(model, step).backward()
        assert opt.step(1e-3).stepped
    # Masters move by amounts far below bf16 resolution, and the model is their rounding.
    assert any(not torch.equal(a, b) for a, b in zip(before, opt.master_params))
    for p, m in zip(opt.model_params, opt.master_params):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))


def test_fp16_overflow_skips_step_and_lowers_scale():
    model = make_model(dtype=torch.float16)
    scaler = DynamicLossScaler(initial_scale=1024.0, growth_interval=2)
    opt = MixedPrecisionOptimizer(model, lr=1e-2, weight_decay=0.0, grad_clip=1.0, loss_scaler=scaler)
    opt.zero_grad()
    opt.scale_loss(loss_fn(model, 0)).backward()
    assert opt.step(1e-3).stepped
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    opt.scale_loss(loss_fn(model, 1)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")  # injected overflow
    result = opt.step(1e-3)
    assert not result.stepped and result.loss_scale == 1024.0
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for step in (2, 3):  # training continues, and the scale grows back after 2 good steps
        opt.zero_grad()
        opt.scale_loss(loss_fn(model, step)).backward()
        assert opt.step(1e-3).stepped
    assert scaler.scale == 1024.0


def test_state_dict_round_trip_continues_identically():
    def run(split: bool) -> list[torch.Tensor]:
        model = make_model(dtype=torch.bfloat16)
        opt = MixedPrecisionOptimizer(model, lr=1e-2, weight_decay=0.1, grad_clip=1.0)
        for step in range(4):
            if split and step == 2:
                state, weights = opt.state_dict(), [p.detach().clone() for p in model.parameters()]
                model = make_model(seed=9, dtype=torch.bfloat16)
                with torch.no_grad():
                    for p, w in zip(model.parameters(), weights):
                        p.copy_(w)
                opt = MixedPrecisionOptimizer(model, lr=1e-2, weight_decay=0.1, grad_clip=1.0)
                opt.load_state_dict(state)
            opt.zero_grad()
            loss_fn(model, step).backward()
            opt.step(1e-3)
        return [m.detach().clone() for m in opt.master_params]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_cosine_schedule_shape():
    lrs = [cosine_lr(i, 1.0, 0.1, 10, 110) for i in range(130)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lrs[110] == lrs[129] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
