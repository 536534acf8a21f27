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

    def collate(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]: ...

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSums: ...


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class LanguageModelingTask:
    """Next-token prediction over ``labels != -100``: pretraining, and SFT on masked labels."""

    def __init__(self, train_set: Any, valid_set: Any, collate_fn: Any = None) -> None:
        self.train_set = train_set
        self.valid_set = valid_set
        self._collate = collate_fn

    def collate(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if self._collate is not None:
            return self._collate(samples)
        xs, ys = zip(*samples)
        return {"input_ids": torch.stack(xs), "labels": torch.stack(ys)}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != -100).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSums:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, labels=batch["labels"], return_logits=False, loss_reduction="sum")
        return LossSums(out.loss.float(), self.count(batch))
