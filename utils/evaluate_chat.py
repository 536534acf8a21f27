"""Held-out exact match of a chat model: batched greedy generation with the KV cache.

    python -m utils.evaluate_chat --model_dir=RUN_OR_HF_DIR --data=data/sample_sft/heldout.jsonl \\
        [--max_samples=N] [--batch_size=B] [--max_new_tokens=32] [--output=REPORT.json] \\
        [--tokenizer_dir=DIR] [--device=auto] [--dtype=auto]

Each record of ``--data`` is a conversation in any SFT format (``messages``, ShareGPT
``conversations``, ``instruction``/``output``; see :mod:`utils.conversation`) that ends with the
assistant's reference reply. The prompt is the conversation WITHOUT that final reply, rendered with
the generation prompt (:func:`utils.conversation.encode_generation_prompt`); the model answers
greedily until ``<|im_end|>``. The reference is the record's ``answer`` field when present, else
the final reply's content; the score is :func:`data.build_sft_data.exact_match` (whitespace
normalised, case and punctuation count). Records may carry ``task`` and ``lang`` fields (the
bundled held-out sets do): accuracy is reported overall and per task and per language.

The JSON report (default ``<model_dir>/eval_<data file stem>.json``) holds the accuracies and
every prediction, so a wrong answer can be read next to its question.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.errors import ConfigError, DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger("evaluate_chat")


@dataclass
class Example:
    """One held-out question: the prompt messages and the reference answer."""

    messages: list[dict[str, str]]  # the conversation up to (not including) the final reply
    answer: str
    task: str = "all"
    lang: str = "all"


def load_examples(path: str | Path, max_samples: int | None = None) -> list[Example]:
    """The first ``max_samples`` records of ``path`` as :class:`Example` s.

    DataError naming the record when it does not end with an assistant reply (the reference).
    """
    from dataset.dataset_sft import iter_records
    from utils.conversation import record_to_messages

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data={path}: no such file (expected a .jsonl/.json/.parquet SFT file)")
    examples = []
    for where, record in iter_records(path):
        if max_samples is not None and len(examples) >= max_samples:
            break
        messages = record_to_messages(record, where)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(
                f"{where}: the conversation must end with the assistant's reference reply "
                "(after at least one prompt message)"
            )
        answer = record.get("answer", messages[-1]["content"])
        if not isinstance(answer, str):
            raise DataError(f"{where}: 'answer' must be a string, got {answer!r:.80}")
        examples.append(Example(messages[:-1], answer, str(record.get("task", "all")),
                                str(record.get("lang", "all"))))
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids [B, T], attention_mask [B, T]), padded on the
    LEFT so every row's next token sits in the last column (what ``generate`` expects)."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, T - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    batch_size: int = 32,
    max_new_tokens: int = 32,
) -> list[str]:
    """The model's greedy reply to each conversation (text up to ``<|im_end|>``), in input order.

    Prompts are sorted by length before batching, so a batch holds little padding.
    """
    from tqdm import tqdm

    from model.generation import generate
    from tokenizer.tokenization import IM_END_ID
    from utils.conversation import encode_generation_prompt

    room = model.config.max_seq_len - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"--max_new_tokens={max_new_tokens} leaves no room for a prompt "
            f"(max_seq_len {model.config.max_seq_len})"
        )
    prompts = [encode_generation_prompt(tokenizer, m, max_len=room) for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = model.lm_head.weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else IM_END_ID
    replies: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], pad_id)
        out = generate(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                       eos_token_id=IM_END_ID, pad_token_id=pad_id)
        for i, new in zip(rows, out[:, ids.shape[1] :].tolist(), strict=True):
            new = new[: new.index(IM_END_ID)] if IM_END_ID in new else new
            replies[i] = tokenizer.decode(new, skip_special_tokens=True)
    return replies


def _ratio(correct: int, total: int) -> dict[str, float | int]:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


def score(examples: Iterable[Example], predictions: Iterable[str]) -> dict[str, Any]:
    """Exact-match accuracy overall, per task and per language.

    Returns ``{"correct", "total", "accuracy", "by_task": {task: {...}}, "by_lang": {lang: {...}},
    "samples": [{question, prediction, answer, correct, task, lang}, ...]}``.
    """
    from data.build_sft_data import exact_match

    samples = []
    groups: dict[str, dict[str, list[bool]]] = {"by_task": defaultdict(list),
                                                "by_lang": defaultdict(list)}
    for ex, pred in zip(examples, predictions, strict=True):
        ok = exact_match(pred, ex.answer)
        groups["by_task"][ex.task].append(ok)
        groups["by_lang"][ex.lang].append(ok)
        samples.append({"question": ex.messages[-1]["content"], "prediction": pred,
                        "answer": ex.answer, "correct": ok, "task": ex.task, "lang": ex.lang})
    correct = sum(s["correct"] for s in samples)
    report: dict[str, Any] = _ratio(correct, len(samples))
    for name, group in groups.items():
        report[name] = {key: _ratio(sum(oks), len(oks)) for key, oks in sorted(group.items())}
    report["samples"] = samples
    return report


def format_report(report: dict[str, Any]) -> str:
    """The accuracy table printed at the end of a run."""
    lines = [f"exact match: {report['accuracy']:.3f} ({report['correct']}/{report['total']})"]
    for name in ("by_task", "by_lang"):
        for key, r in report[name].items():
            counts = f"({r['correct']}/{r['total']})"
            lines.append(f"  {name[3:]:<5} {key:<10} {r['accuracy']:.3f}  {counts}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Held-out exact match of a chat model (greedy).")
    p.add_argument("--model_dir", required=True, help="train.py run dir or Hugging Face Llama dir")
    p.add_argument("--data", required=True,
                   help="held-out SFT file whose records end with the reference reply")
    p.add_argument("--tokenizer_dir", default=None, help="default: found next to the model")
    p.add_argument("--max_samples", type=int, default=None,
                   help="evaluate only the first N records")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--output", default=None,
                   help="JSON report (default: MODEL_DIR/eval_<data stem>.json)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    args = p.parse_args(argv)
    too_small = args.max_samples is not None and args.max_samples < 1
    if too_small or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--batch_size, --max_new_tokens and --max_samples must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sample import load_model_and_tokenizer, pick_device_and_dtype

    args = parse_args(argv)
    setup_logging()
    examples = load_examples(args.data, args.max_samples)
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    args.chat = True  # load_model_and_tokenizer: insist on the zero2all chat token ids
    model, tokenizer = load_model_and_tokenizer(args, device, dtype)
    predictions = generate_replies(model, tokenizer, [ex.messages for ex in examples],
                                   args.batch_size, args.max_new_tokens)
    report = {"model_dir": str(args.model_dir), "data": str(args.data),
              **score(examples, predictions)}
    default_output = Path(args.model_dir) / f"eval_{Path(args.data).stem}.json"
    output = Path(args.output) if args.output else default_output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(format_report(report), flush=True)
    logger.info("report written to %s", output)
    return report


if __name__ == "__main__":
    run_cli(main)
