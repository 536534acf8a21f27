"""Preference pairs for DPO: a prompt conversation, a chosen and a rejected assistant reply.

Records (``.jsonl`` / ``.json`` / ``.parquet`` under a data directory, same file listing and
held-out naming as :mod:`dataset.dataset_sft`)::

    {"prompt": "question" | [{"role", "content"}, ...], "chosen": str, "rejected": str}
    {"conversations": [{"from", "value"}, ...], "chosen": str, "rejected": str}     (ShareGPT)
    {"messages": [{"role", "content"}, ...], "chosen": str, "rejected": str}

A string prompt is one user message. The prompt must end with a user message; ``chosen`` and
``rejected`` are each appended to it as an ASSISTANT message (the original llm-zero2all wrongly
formatted them as user turns) with :func:`utils.conversation.encode_preference_pair`, so both
share the same prompt tokens and only the reply (content + ``<|im_end|>``) is labelled. Pairs are
tokenized at start-up (preference sets are small) to at most ``max_seq_len + 1`` tokens; a pair
whose chosen or rejected reply has no token left after truncation is dropped and counted.

Item i: ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "index"}``
where ``*_input_ids = ids[:-1]`` and ``*_labels = labels[1:]`` (shifted for next-token
prediction) and ``index == i``. :func:`dpo_collate` builds the batch layout that
:func:`utils.dpo.concatenated_logps` reads: ``input_ids`` / ``labels`` ``[2B, T]`` (chosen rows
first, then rejected; right-padded with the pad id / -100) and ``index`` ``[B]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from dataset.dataset_sft import iter_records, list_sft_files, split_samples
from utils.conversation import (
    IGNORE_INDEX,
    Message,
    encode_preference_pair,
    is_unicode_text,
    record_to_messages,
    validate_messages,
)
from utils.errors import DataError
from utils.logging_utils import get_logger

logger = get_logger(__name__)

Pair = tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray
]  # chosen ids/labels, rejected ids/labels


def preference_record(record: Any, where: str) -> tuple[list[Message], str, str]:
    """``(prompt messages, chosen, rejected)`` of one record; DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if not is_unicode_text(record.get(key)):
            raise DataError(
                f"{where}: {key!r} must be a string (the assistant's reply; valid Unicode, no lone "
                f"surrogates), got {record.get(key)!r:.80}"
            )
    if "prompt" in record:
        raw = record["prompt"]
        if isinstance(raw, str):
            raw = [{"role": "user", "content": raw}]
        try:
            prompt = validate_messages(raw)
        except DataError as e:
            raise DataError(f"{where}: prompt: {e}") from None
    elif "conversations" in record or "messages" in record:
        prompt = record_to_messages(record, where)
    else:
        raise DataError(
            f"{where}: no prompt; expected 'prompt' (string or messages), 'conversations' or "
            f"'messages', got keys {sorted(record)[:8]}"
        )
    if prompt[-1]["role"] != "user":
        raise DataError(
            f"{where}: the prompt must end with a user message, not {prompt[-1]['role']!r}"
        )
    return prompt, record["chosen"], record["rejected"]


def tokenize_pairs(tokenizer: Any, path: Path, max_len: int) -> tuple[list[Pair], int]:
    """Encode every pair of ``path``; returns the pairs and the number dropped by truncation."""
    pairs, dropped = [], 0
    for where, record in tqdm(
        iter_records(path), desc=f"tokenize {path.name}", unit=" pair", leave=False
    ):
        prompt, chosen, rejected = preference_record(record, where)
        (c_ids, c_labels), (r_ids, r_labels) = encode_preference_pair(
            tokenizer, prompt, chosen, rejected, max_len=max_len
        )
        if all(l == IGNORE_INDEX for l in c_labels[1:]) or all(
            l == IGNORE_INDEX for l in r_labels[1:]
        ):
            dropped += 1
            continue
        pairs.append(
            tuple(np.asarray(a, dtype=np.int64) for a in (c_ids, c_labels, r_ids, r_labels))
        )
    return pairs, dropped


def dpo_collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack ``B`` items into ``input_ids`` / ``labels`` ``[2B, T]`` (chosen rows, then rejected
    rows, right-padded with ``pad_id`` / -100) and ``index`` ``[B]``."""
    rows = [
        (item[f"{side}_input_ids"], item[f"{side}_labels"])
        for side in ("chosen", "rejected")
        for item in items
    ]
    T = max(len(x) for x, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, (x, y) in enumerate(rows):
        input_ids[r, : len(x)] = x
        labels[r, : len(y)] = y
    return {
        "input_ids": input_ids,
        "labels": labels,
        "index": torch.stack([item["index"] for item in items]),
    }


class DPODataset(Dataset):
    """Tokenized preference pairs of one split (see the module docstring).

    Args:
        data_dir: directory of preference files; ``heldout*`` / ``valid*`` ... files are ``valid``.
        max_seq_len: model sequence length; each sequence holds at most this many tokens.
        split: ``"train"`` or ``"valid"``.
        tokenizer_dir: a zero2all tokenizer directory.
        valid_ratio, seed: random ``valid`` subset when no held-out files exist.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        max_seq_len: int,
        split: str = "train",
        *,
        tokenizer_dir: str | os.PathLike,
        valid_ratio: float = 0.0,
        seed: int = 1337,
    ) -> None:
        from tokenizer.tokenization import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
        self.pad_id: int = tokenizer.pad_token_id
        files = list_sft_files(data_dir)
        per_file, dropped = [], 0
        for path in files:
            pairs, n_dropped = tokenize_pairs(tokenizer, path, max_seq_len + 1)
            per_file.append(pairs)
            dropped += n_dropped
        positions = split_samples(files, [len(p) for p in per_file], split, valid_ratio, seed)
        self.pairs: list[Pair] = [per_file[f][s] for f, s in positions]
        if not self.pairs:
            raise DataError(f"{data_dir}: the DPO {split!r} split is empty")
        logger.info(
            "DPO %s split: %d pairs (%d dropped: no reply token left after truncation to %d)",
            split,
            len(self.pairs),
            dropped,
            max_seq_len + 1,
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c_ids, c_labels, r_ids, r_labels = (torch.from_numpy(a) for a in self.pairs[i])
        return {
            "chosen_input_ids": c_ids[:-1],
            "chosen_labels": c_labels[1:],
            "rejected_input_ids": r_ids[:-1],
            "rejected_labels": r_labels[1:],
            "index": torch.tensor(i),
        }

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """:func:`dpo_collate` with this dataset's pad id (use as a DataLoader ``collate_fn``)."""
        return dpo_collate(items, self.pad_id)
