"""What differs between pretraining, SFT and DPO: the datasets, the batch and the loss.

A task gives train.py three things:

- ``train_set`` / ``valid_set``: map-style datasets (``len`` and ``[i]``);
- ``collate(samples) -> batch``: a dict of tensors for one micro-batch;
- ``loss(model, batch) -> LossSums``: the loss SUMMED over the batch's loss units (target tokens
  for pretrain/SFT, preference pairs for DPO), the number of units, and summed extra metrics.

Returning sums rather than means lets the training step divide by the number of units in the
whole global batch (all micro-batches on all ranks), so the loss and the gradients are the same
for every world size and every accumulation split — see ``train_step`` in train.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class LossSums:
    loss_sum: torch.Tensor  # fp32 scalar with grad: the loss summed over the batch's units
    count: int  # number of loss units (target tokens, or preference pairs)
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # detached sums


class Task(Protocol):
    train_set: Any
    valid_set: Any
    metric_names: tuple[str, ...]  # keys of LossSums.metric_sums, the same on every rank

    def collate(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]: ...

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSums: ...


def real_tokens(batch: dict[str, torch.Tensor], pad_id: int | None) -> int:
    """Input positions that hold a token, padding excluded (throughput counts these)."""
    ids = batch["input_ids"]
    return ids.numel() if pad_id is None else int((ids != pad_id).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class LanguageModelingTask:
    """Next-token prediction over ``labels != -100``: pretraining, and SFT on masked labels."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, train_set: Any, valid_set: Any, collate_fn: Any = None,
                 pad_id: int | None = None) -> None:
        self.train_set = train_set
        self.valid_set = valid_set
        self._collate = collate_fn
        self.pad_id = pad_id  # None: batches are never padded (pretraining windows)

    def collate(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if self._collate is not None:
            return self._collate(samples)
        xs, ys = zip(*samples)
        return {"input_ids": torch.stack(xs), "labels": torch.stack(ys)}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != -100).sum())

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return real_tokens(batch, self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSums:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, labels=batch["labels"], return_logits=False, loss_reduction="sum")
        return LossSums(out.loss.float(), self.count(batch))


class OffsetIndex:
    """A DPO split whose items' ``index`` is shifted by ``offset``, so the train and valid splits
    share one reference table (valid rows after the train rows)."""

    def __init__(self, dataset: Any, offset: int) -> None:
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[i])
        item["index"] = item["index"] + self.offset
        return item


class PreferenceTask:
    """DPO / IPO / hinge on (prompt, chosen, rejected) pairs; the loss unit is one pair.

    The reference log-probs come from a frozen copy of the ``--init_from`` weights — never the
    resumed policy — or, with ``precompute_ref_logps``, from a ``[pairs, 2]`` table computed once
    by that copy before it is dropped (rows indexed by each pair's ``index``).
    """

    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")

    def __init__(self, train_set: Any, valid_set: Any, collate_fn: Any, beta: float, loss_type: str,
                 label_smoothing: float, pad_id: int | None = None) -> None:
        from utils.dpo import uses_average_logps

        self.train_set = OffsetIndex(train_set, 0)
        self.valid_set = OffsetIndex(valid_set, len(train_set))
        self._collate = collate_fn
        self.pad_id = pad_id
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.average = uses_average_logps(loss_type)
        self.reference: nn.Module | None = None
        self.reference_table: torch.Tensor | None = None

    def set_reference(self, reference: nn.Module, precompute: bool, batch_size: int,
                      device: torch.device) -> None:
        """Freeze ``reference`` and use it directly, or only to fill the table and then drop it.

        ``reference`` must be its own copy of the weights, not the policy being trained.
        """
        from utils.dpo import compute_reference_logps

        reference.eval().requires_grad_(False)
        if not precompute:
            self.reference = reference
            return
        n = len(self.train_set) + len(self.valid_set)
        batches = (
            to_device(self.collate([split[i] for i in range(start, min(start + batch_size, len(split)))]), device)
            for split in (self.train_set, self.valid_set)
            for start in range(0, len(split), batch_size)
        )
        self.reference_table = compute_reference_logps(reference, batches, n, self.average)

    def collate(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        return self._collate(list(samples))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["index"].numel())

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return real_tokens(batch, self.pad_id)  # chosen and rejected rows both

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from utils.dpo import concatenated_logps

        if self.reference is not None:
            with torch.no_grad():
                return concatenated_logps(self.reference, batch, self.average)
        assert self.reference_table is not None, "set_reference() was not called"
        rows = self.reference_table[batch["index"].cpu()].to(batch["index"].device)
        return rows[:, 0], rows[:, 1]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSums:
        from utils.dpo import concatenated_logps, dpo_loss

        policy_chosen, policy_rejected = concatenated_logps(model, batch, self.average)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected,
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
        )
        margin = (chosen_rewards - rejected_rewards).float()
        metric_sums = {
            "rewards/chosen": chosen_rewards.float().sum(),
            "rewards/rejected": rejected_rewards.float().sum(),
            "rewards/accuracy": (margin > 0).float().sum(),
            "rewards/margin": margin.sum(),
        }
        return LossSums(losses.float().sum(), self.count(batch), metric_sums)
