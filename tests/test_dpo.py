"""utils/dpo.py against hand-computed values of the published formulas (math/numpy, not our code)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from utils.dpo import (
    compute_reference_logps,
    concatenated_logps,
    dpo_loss,
    dpo_metrics,
    frozen_copy,
    sequence_logps,
    uses_average_logps,
)
from utils.errors import ConfigError

# Four pairs of (policy chosen, policy rejected, reference chosen, reference rejected) log-probs.
PC = [-10.0, -3.0, -7.5, -20.0]
PR = [-12.0, -2.0, -7.5, -25.0]
RC = [-11.0, -2.5, -8.0, -19.0]
RR = [-11.5, -2.5, -7.0, -24.0]


def _inputs():
    return [torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _h(i: int) -> float:
    return (PC[i] - PR[i]) - (RC[i] - RR[i])


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.3)])
def test_sigmoid_with_label_smoothing_matches_cdpo_formula(beta, eps):
    losses, chosen, rejected = dpo_loss(
        *_inputs(), beta=beta, loss_type="sigmoid", label_smoothing=eps
    )
    expected = [
        -(1 - eps) * _log_sigmoid(beta * _h(i)) - eps * _log_sigmoid(-beta * _h(i))
        for i in range(4)
    ]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(
        chosen.numpy(), [beta * (PC[i] - RC[i]) for i in range(4)], rtol=1e-12
    )
    np.testing.assert_allclose(
        rejected.numpy(), [beta * (PR[i] - RR[i]) for i in range(4)], rtol=1e-12
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_azar_formula(beta):
    losses, _, _ = dpo_loss(*_inputs(), beta=beta, loss_type="ipo")
    expected = [(_h(i) - 1 / (2 * beta)) ** 2 for i in range(4)]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_hinge_matches_slic_formula(beta):
    losses, _, _ = dpo_loss(*_inputs(), beta=beta, loss_type="hinge")
    expected = [max(0.0, 1 - beta * _h(i)) for i in range(4)]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12)
    if beta == 2.0:  # pair 0 has h = 1.5, past the margin: no loss
        assert losses[0] == 0


def test_policy_equal_reference_gives_ln2():
    logps = torch.tensor([-5.0, -17.25, -0.5])
    losses, chosen, rejected = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.3)
    np.testing.assert_allclose(losses.numpy(), [math.log(2)] * 3, rtol=1e-6)
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_loss_gradient_pushes_chosen_up():
    pc = torch.tensor([-4.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1)
    losses.sum().backward()
    # d/dpc of -log sigmoid(beta*h) at h=0 is -beta/2.
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_type": "kto"}, "dpo_loss_type='kto'.*sigmoid, ipo, hinge"),
        ({"beta": 0.0}, "dpo_beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "only defined for loss_type='sigmoid'"),
    ],
)
def test_invalid_arguments_are_clear_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dpo_loss(*_inputs(), **kwargs)


def test_metrics():
    chosen = torch.tensor([1.0, 0.5, -1.0, 2.0])
    rejected = torch.tensor([0.0, 1.0, -2.0, 2.0])
    m = {k: v.item() for k, v in dpo_metrics(chosen, rejected).items()}
    assert m == pytest.approx(
        {
            "rewards/chosen": 0.625,
            "rewards/rejected": 0.25,
            "rewards/accuracy": 0.5,
            "rewards/margin": 0.375,
        }
    )


def test_sequence_logps_against_explicit_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, -100, -100], [6, -100, 0, 2, 5]])
    probs = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(-1, keepdims=True)
    sums, counts = [0.0, 0.0], [0, 0]
    for b in range(2):
        for t in range(5):
            if labels[b, t] != -100:
                sums[b] += math.log(probs[b, t, labels[b, t]])
                counts[b] += 1
    np.testing.assert_allclose(sequence_logps(logits, labels).numpy(), sums, rtol=1e-6)
    np.testing.assert_allclose(
        sequence_logps(logits, labels, average=True).numpy(),
        [s / c for s, c in zip(sums, counts)],
        rtol=1e-6,
    )
    assert uses_average_logps("ipo") and not uses_average_logps("sigmoid")


class TinyLM(torch.nn.Module):
    """Embedding -> one causal mixing step -> vocab logits; enough to give position-dependent logps."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        h = self.emb(input_ids).cumsum(dim=1)  # causal: position t sees tokens <= t
        return SimpleNamespace(logits=self.head(torch.tanh(h)))


def _batches(num_pairs: int = 6, batch_size: int = 2, seq: int = 6):
    gen = torch.Generator().manual_seed(1)
    out = []
    for start in range(0, num_pairs, batch_size):
        ids = torch.randint(0, 11, (2 * batch_size, seq), generator=gen)
        labels = ids.roll(-1, dims=1).clone()
        labels[:, :2] = -100  # prompt
        labels[:, -1] = -100
        out.append(
            {"input_ids": ids, "labels": labels, "index": torch.arange(start, start + batch_size)}
        )
    return out


@pytest.mark.parametrize("average", [False, True])
def test_precomputed_reference_equals_frozen_copy(average):
    torch.manual_seed(0)
    policy = TinyLM()
    reference = frozen_copy(policy)
    batches = _batches()
    table = compute_reference_logps(reference, list(reversed(batches)), average=average)
    assert table.shape == (6, 2) and not torch.isnan(table).any()
    assert not reference.training and all(not p.requires_grad for p in reference.parameters())

    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for batch in batches:  # a few DPO steps move the policy away from the reference
        pc, pr = concatenated_logps(policy, batch, average=average)
        with torch.no_grad():
            rc_live, rr_live = concatenated_logps(reference, batch, average=average)
        rc_pre, rr_pre = table[batch["index"]].unbind(dim=1)
        loss_live, _, _ = dpo_loss(pc, pr, rc_live, rr_live, beta=0.1)
        loss_pre, _, _ = dpo_loss(pc, pr, rc_pre, rr_pre, beta=0.1)
        torch.testing.assert_close(loss_pre, loss_live, rtol=1e-6, atol=1e-7)
        opt.zero_grad()
        loss_live.mean().backward()
        opt.step()
    # The policy did move, so the equality above is not trivially policy == reference.
    pc, _ = concatenated_logps(policy, batches[0], average=average)
    assert not torch.allclose(pc, table[batches[0]["index"], 0])


def test_precomputed_table_marks_missing_rows_nan():
    table = compute_reference_logps(TinyLM(), _batches()[:1], num_samples=4)
    assert not torch.isnan(table[:2]).any() and torch.isnan(table[2:]).all()
