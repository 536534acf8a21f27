"""Direct preference optimisation: sequence log-probs, the DPO / IPO / hinge losses, metrics.

Everything here is a pure function of tensors (or of a model and batches), so ``train.py`` builds
a DPO step from three calls::

    pc, pr = concatenated_logps(policy, batch, average=uses_average_logps(loss_type))
    rc, rr = reference log-probs: concatenated_logps(frozen_ref, batch, ...) under no_grad,
             or a row lookup ``ref_table[batch["index"]]`` of :func:`compute_reference_logps`
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)

Batch layout (built by :func:`dataset.dataset_dpo.dpo_collate`): ``input_ids`` and ``labels`` are
``[2B, T]`` LongTensors, rows ``0..B-1`` the chosen and rows ``B..2B-1`` the rejected sequences of
the same ``B`` pairs; labels are already shifted (``labels[t]`` is the token after position t)
and are -100 everywhere except on the assistant completion; ``index`` is ``[B]``, the dataset
index of each pair (the row to use in a precomputed reference table).

Reference model: the frozen copy must hold the weights training started from (``--init_from``),
never a resumed policy. :func:`compute_reference_logps` precomputes its log-probs once, so no
reference model has to stay in memory during training.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from utils.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
IGNORE_INDEX = -100


def uses_average_logps(loss_type: str) -> bool:
    """IPO is defined on per-token average log-probs; sigmoid and hinge on summed log-probs."""
    return loss_type == "ipo"


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Log-probability of each row's labelled tokens under ``logits``.

    Args:
        logits: ``[B, T, V]`` any float dtype (computed in float32 here).
        labels: ``[B, T]`` long, already shifted: ``labels[b, t]`` is the token predicted at
            position ``t``; -100 marks positions that do not count (prompt, padding).
        average: return the mean per-token log-prob (IPO) instead of the sum.

    Returns:
        ``[B]`` float32: ``sum_t log p(labels[b, t] | logits[b, t])`` over labels != -100, or that
        sum divided by the number of labelled tokens (a row with none gives 0).
    """
    assert logits.shape[:2] == labels.shape, (tuple(logits.shape), tuple(labels.shape))
    B, T, V = logits.shape
    # cross_entropy with reduction="none" is -log p(label) per position (0 at ignored ones) and
    # never materialises the full [B, T, V] log-softmax in float32 at once.
    token_logps = -F.cross_entropy(
        logits.reshape(B * T, V).float(),
        labels.reshape(B * T),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(B, T)
    total = token_logps.sum(dim=1)
    if not average:
        return total
    count = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return total / count


def _check_loss_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ConfigError(
            f"dpo_loss_type={loss_type!r} is not a DPO loss; expected one of {', '.join(LOSS_TYPES)}"
        )
    if not beta > 0:
        raise ConfigError(f"dpo_beta={beta} must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"DPO label_smoothing={label_smoothing} must be in [0, 0.5)")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ConfigError(
            f"DPO label_smoothing={label_smoothing} is only defined for loss_type='sigmoid' "
            f"(conservative DPO), not {loss_type!r}"
        )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards.

    All four inputs are ``[B]`` float tensors of sequence log-probs (:func:`sequence_logps`;
    per-token averages for IPO, see :func:`uses_average_logps`). With
    ``h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)``:

    - ``sigmoid`` (DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), with Mitchell's
      conservative label smoothing eps (cDPO, https://ericmitchell.ai/cdpo.pdf):
      ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``
    - ``ipo`` (Azar et al. 2023, https://arxiv.org/abs/2310.12036): ``(h - 1 / (2 * beta)) ** 2``
    - ``hinge`` (SLiC, Zhao et al. 2023, https://arxiv.org/abs/2305.10425):
      ``max(0, 1 - beta * h)``

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; the rewards are
        ``beta * (policy - reference)`` log-probs, detached (for logging only).
    """
    _check_loss_args(beta, loss_type, label_smoothing)
    h = (policy_chosen_logps - policy_rejected_logps) - (
        reference_chosen_logps - reference_rejected_logps
    )
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Batch means for logging, as 0-dim float32 tensors (all-reduce them, then ``.item()``).

    ``rewards/accuracy`` is the fraction of pairs whose chosen reward beats the rejected one;
    ``rewards/margin`` the mean of ``chosen - rejected``.
    """
    chosen = chosen_rewards.detach().float()
    rejected = rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
        "rewards/margin": (chosen - rejected).mean(),
    }


def concatenated_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the ``[2B, T]`` chosen+rejected batch -> ``([B] chosen, [B] rejected)``.

    ``model(input_ids).logits`` must be ``[2B, T, V]``. Gradients flow unless the caller is in
    ``torch.no_grad()``.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert input_ids.shape[0] % 2 == 0, (
        f"DPO batch needs chosen+rejected rows, got {input_ids.shape}"
    )
    logits = model(input_ids).logits
    logps = sequence_logps(logits, labels, average=average)
    half = input_ids.shape[0] // 2
    return logps[:half], logps[half:]


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with ``requires_grad=False``: the reference model for DPO."""
    reference = copy.deepcopy(model)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


@torch.no_grad()
def compute_reference_logps(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_samples: int | None = None,
    average: bool = False,
) -> torch.Tensor:
    """Reference log-probs of every pair, computed once so no reference model stays in memory.

    Args:
        model: the reference weights (e.g. the ``--init_from`` model before any DPO step). Run
            in eval mode; its training flag is restored afterwards.
        batches: DPO batches from :func:`dataset.dataset_dpo.dpo_collate`, in any order; each
            carries ``index`` ``[B]``, the dataset index of its pairs.
        num_samples: number of rows of the table (default: largest index + 1).
        average: per-token averages (IPO) instead of sums; must match the training loss.

    Returns:
        ``[N, 2]`` float32 on CPU: ``table[i, 0]`` / ``table[i, 1]`` are the chosen / rejected
        log-probs of pair ``i``; training looks up ``table[batch["index"]]``. Rows never seen are
        NaN, so a missing pair cannot pass silently.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    indices, values = [], []
    try:
        for batch in batches:
            on_device = {k: batch[k].to(device) for k in ("input_ids", "labels")}
            chosen, rejected = concatenated_logps(model, on_device, average=average)
            indices.append(batch["index"].cpu())
            values.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    finally:
        model.train(was_training)
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    n = num_samples if num_samples is not None else int(index.max()) + 1 if len(index) else 0
    table = torch.full((n, 2), float("nan"))
    if len(index):
        table[index] = torch.cat(values)
    return table
