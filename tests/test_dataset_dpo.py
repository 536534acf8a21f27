"""dataset/dataset_dpo.py: replies are assistant turns, only they are labelled, batch layout."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from data.build_sft_data import build
from dataset.dataset_dpo import DPODataset, dpo_collate
from tokenizer.tokenization import load_tokenizer
from utils.conversation import IGNORE_INDEX
from utils.dpo import compute_reference_logps, concatenated_logps, dpo_loss, frozen_copy
from utils.errors import DataError

MAX_SEQ_LEN = 128

TRAIN = [
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
    {
        "prompt": [
            {"role": "system", "content": "Answer in Chinese."},
            {"role": "user", "content": "1 加 1 等于几？"},
        ],
        "chosen": "二",
        "rejected": "三",
    },
    {
        "conversations": [
            {"from": "human", "value": "Say hi"},
            {"from": "gpt", "value": "hi"},
            {"from": "human", "value": "Louder"},
        ],
        "chosen": "HI",
        "rejected": "hi",
    },
    {"messages": [{"role": "user", "content": "Reverse abc"}], "chosen": "cba", "rejected": "abc"},
]
HELDOUT = [{"prompt": "What is 4 + 4?", "chosen": "8", "rejected": "9"}]


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    _write(d / "train.jsonl", TRAIN)
    _write(d / "heldout.jsonl", HELDOUT)
    return d


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def train_ds(data_dir, tokenizer_dir):
    return DPODataset(data_dir, MAX_SEQ_LEN, "train", tokenizer_dir=tokenizer_dir)


def _prompt_messages(record):
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    if "prompt" in record:
        return record["prompt"]
    if "messages" in record:
        return record["messages"]
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]]


def test_replies_are_assistant_turns_and_only_they_are_labelled(train_ds, tok):
    assert len(train_ds) == len(TRAIN)
    for i, record in enumerate(TRAIN):
        item = train_ds[i]
        assert int(item["index"]) == i
        for side in ("chosen", "rejected"):
            reply = {"role": "assistant", "content": record[side]}
            expected = tok.apply_chat_template([*_prompt_messages(record), reply], tokenize=True)[
                "input_ids"
            ]
            x, y = item[f"{side}_input_ids"], item[f"{side}_labels"]
            assert x.tolist() == list(expected)[:-1]
            # Shifted labels: y[t] is the token after x[t]; only the reply + <|im_end|> count.
            assert tok.decode(y[y != IGNORE_INDEX].tolist()) == record[side] + "<|im_end|>"
            labelled = (y != IGNORE_INDEX).nonzero().flatten()
            assert tok.decode(x[: labelled[0] + 1].tolist()).endswith("<|im_start|>assistant\n")
    # The earlier assistant turn of the ShareGPT prompt ("hi") is context, not a target.
    y = train_ds[2]["chosen_labels"]
    assert tok.decode(y[y != IGNORE_INDEX].tolist()) == "HI<|im_end|>"


def test_collate_layout(train_ds):
    items = [train_ds[0], train_ds[2]]
    batch = train_ds.collate(items)
    T = max(len(it[k]) for it in items for k in ("chosen_input_ids", "rejected_input_ids"))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, T)
    assert batch["index"].tolist() == [0, 2]
    for row, (item, side) in enumerate(
        [(items[0], "chosen"), (items[1], "chosen"), (items[0], "rejected"), (items[1], "rejected")]
    ):
        n = len(item[f"{side}_input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item[f"{side}_input_ids"])
        assert torch.equal(batch["labels"][row, :n], item[f"{side}_labels"])
        assert (batch["input_ids"][row, n:] == train_ds.pad_id).all() and (
            batch["labels"][row, n:] == IGNORE_INDEX
        ).all()


def test_heldout_split(data_dir, tokenizer_dir):
    valid = DPODataset(data_dir, MAX_SEQ_LEN, "valid", tokenizer_dir=tokenizer_dir)
    assert len(valid) == 1


@pytest.mark.parametrize(
    "record,match",
    [
        (
            {"prompt": "q", "chosen": ["x"], "rejected": "y"},
            r"p\.jsonl:2: 'chosen' must be a string",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "x",
                "rejected": "y",
            },
            r"p\.jsonl:2: the prompt must end with a user message",
        ),
        ({"question": "q", "chosen": "x", "rejected": "y"}, r"p\.jsonl:2: no prompt"),
        (
            {"prompt": [{"role": "human", "content": "q"}], "chosen": "x", "rejected": "y"},
            r"p\.jsonl:2: prompt: message 0",
        ),
        ({"prompt": "q", "chosen": "x \ud800", "rejected": "y"},  # lone surrogate
         r"p\.jsonl:2: 'chosen' must be a string"),
        ({"prompt": "q \udfff", "chosen": "x", "rejected": "y"}, r"p\.jsonl:2: prompt: message 0"),
    ],
)
def test_malformed_pairs_name_file_and_line(tmp_path, tokenizer_dir, record, match):
    _write(tmp_path / "p.jsonl", [TRAIN[0], record])
    with pytest.raises(DataError, match=match):
        DPODataset(tmp_path, MAX_SEQ_LEN, tokenizer_dir=tokenizer_dir)


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids).cumsum(1))))


def test_end_to_end_with_dataloader_and_reference_table(train_ds, tok):
    torch.manual_seed(0)
    policy = TinyLM(len(tok))
    reference = frozen_copy(policy)
    loader = DataLoader(
        train_ds,
        batch_size=2,
        shuffle=True,
        collate_fn=train_ds.collate,
        generator=torch.Generator().manual_seed(0),
    )
    table = compute_reference_logps(reference, loader, num_samples=len(train_ds))
    assert not torch.isnan(table).any()
    for batch in loader:
        pc, pr = concatenated_logps(policy, batch)
        rc, rr = table[batch["index"]].unbind(1)
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
        torch.testing.assert_close(
            losses, torch.full_like(losses, math.log(2)), rtol=1e-5, atol=1e-6
        )
    # Padding is invisible: a pair's log-probs do not depend on what it is batched with.
    alone = dpo_collate([train_ds[1]], train_ds.pad_id)
    pc_alone, pr_alone = concatenated_logps(reference, alone)
    torch.testing.assert_close(
        torch.stack([pc_alone[0], pr_alone[0]]), table[1], rtol=1e-5, atol=1e-5
    )


def test_bundled_dpo_data(tokenizer_dir):
    root = Path(__file__).resolve().parent.parent / "data" / "sample_dpo"
    splits = build(seed=0)
    for split in ("train", "heldout"):
        on_disk = [
            json.loads(line)
            for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        assert on_disk == splits[f"dpo_{split}"], (
            f"{root} is stale: re-run python -m data.build_sft_data"
        )
        assert all(r["chosen"] != r["rejected"] and r["chosen"] and r["rejected"] for r in on_disk)
    train_prompts = {
        r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
        for r in splits["dpo_train"]
    }
    assert not train_prompts & {r["prompt"] for r in splits["dpo_heldout"]}
    valid = DPODataset(root, 256, "valid", tokenizer_dir=tokenizer_dir)
    assert len(valid) == len(splits["dpo_heldout"])
