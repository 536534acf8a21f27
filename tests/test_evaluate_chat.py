"""utils/evaluate_chat.py: exact-match counting, batched generation vs one-at-a-time, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import evaluate_chat
from utils.errors import DataError
from utils.evaluate_chat import Example, generate_replies, load_examples, score

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = [  # (question, task, lang); several prompt lengths so batches need padding
    ("What is 12 + 30?", "add", "en"),
    ("计算 7 + 8。", "add", "zh"),
    ("Reverse the string 'abc'.", "reverse", "en"),
    ("把字符串“hello”倒过来写，然后再告诉我它有几个字母。", "reverse", "zh"),
    ("Which is larger, 31 or 87?", "larger", "en"),
]


def test_score_counts_exact_matches_per_task_and_language():
    examples = [Example([{"role": "user", "content": q}], a, t, lang) for (q, t, lang), a in
                zip(QUESTIONS, ["42", "15", "cba", "olleh", "87"], strict=True)]
    # right (whitespace differs), wrong, right, wrong (case counts), right
    predictions = [" 42\n", "16", "cba", "OLLEH", "87"]
    report = score(examples, predictions)
    assert (report["correct"], report["total"]) == (3, 5)
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["by_task"] == {
        "add": {"correct": 1, "total": 2, "accuracy": 0.5},
        "larger": {"correct": 1, "total": 1, "accuracy": 1.0},
        "reverse": {"correct": 1, "total": 2, "accuracy": 0.5},
    }
    assert report["by_lang"]["en"] == {"correct": 3, "total": 3, "accuracy": 1.0}
    assert report["by_lang"]["zh"] == {"correct": 0, "total": 2, "accuracy": 0.0}
    assert [s["correct"] for s in report["samples"]] == [True, False, True, False, True]
    assert report["samples"][1]["question"] == "计算 7 + 8。"


def test_load_examples_drops_the_reference_reply_and_reads_every_format(tmp_path):
    path = tmp_path / "heldout.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "1 + 1 = ?"},
                      {"role": "assistant", "content": "2"}],
         "task": "add", "lang": "en", "answer": "2"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"instruction": "Uppercase", "input": "abc", "output": "ABC"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    examples = load_examples(path)
    assert [e.answer for e in examples] == ["2", "hello", "ABC"]
    assert examples[0].messages == [{"role": "user", "content": "1 + 1 = ?"}]
    assert examples[2].messages == [{"role": "user", "content": "Uppercase\n\nabc"}]
    assert (examples[0].task, examples[0].lang, examples[1].task) == ("add", "en", "all")
    assert len(load_examples(path, max_samples=2)) == 2

    path.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(DataError, match=r"heldout.jsonl:1: .*end with the assistant"):
        load_examples(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random tiny model saved in HF format next to a copy of the test tokenizer."""
    from model.configuration_z2all import Z2allConfig
    from model.modeling_z2all import Z2allForCausalLM
    from tokenizer.tokenization import load_tokenizer, padded_vocab_size

    torch.manual_seed(0)
    vocab = padded_vocab_size(len(load_tokenizer(tokenizer_dir)))
    cfg = Z2allConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64,
                      initializer_range=0.5, max_seq_len=160, kernels="torch")
    out = tmp_path_factory.mktemp("tiny_chat_model")
    Z2allForCausalLM(cfg).save_pretrained(out)
    return out


def reference_replies(model, tokenizer, questions, max_new_tokens):
    """The obvious way: one prompt at a time, no padding, full recomputation (no KV cache)."""
    from tokenizer.tokenization import IM_END_ID
    from utils.conversation import encode_generation_prompt

    replies = []
    for q in questions:
        ids = torch.tensor([encode_generation_prompt(tokenizer, [{"role": "user", "content": q}])])
        new = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=IM_END_ID,
                             use_cache=False)[0, ids.shape[1]:].tolist()
        new = new[: new.index(IM_END_ID)] if IM_END_ID in new else new
        replies.append(tokenizer.decode(new, skip_special_tokens=True))
    return replies


def test_batched_cached_generation_equals_one_at_a_time(tiny_model_dir, tokenizer_dir):
    from model.modeling_z2all import Z2allForCausalLM
    from tokenizer.tokenization import load_tokenizer

    model = Z2allForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    questions = [q for q, _, _ in QUESTIONS]
    expected = reference_replies(model, tokenizer, questions, max_new_tokens=6)
    assert len(set(expected)) > 1  # the random model does not answer everything alike
    got = generate_replies(model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                           batch_size=3, max_new_tokens=6)
    assert got == expected


def test_cli_scores_a_file_and_writes_the_report(tiny_model_dir, tokenizer_dir, tmp_path, capsys):
    from model.modeling_z2all import Z2allForCausalLM
    from tokenizer.tokenization import load_tokenizer

    model = Z2allForCausalLM.from_pretrained(tiny_model_dir).eval()
    questions = [q for q, _, _ in QUESTIONS]
    replies = reference_replies(model, load_tokenizer(tokenizer_dir), questions, max_new_tokens=5)
    # The model's own reply is the answer for the first three records, a wrong one for the rest.
    answers = [r if i < 3 else r + " (wrong)" for i, r in enumerate(replies)]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": "x"}],
                    "task": t, "lang": lang, "answer": a}, ensure_ascii=False) + "\n"
        for (q, t, lang), a in zip(QUESTIONS, answers, strict=True)), encoding="utf-8")
    output = tmp_path / "report.json"
    report = evaluate_chat.main([f"--model_dir={tiny_model_dir}",
                                 f"--tokenizer_dir={tokenizer_dir}", f"--data={data}",
                                 "--batch_size=2", "--max_new_tokens=5", f"--output={output}"])
    assert (report["correct"], report["total"]) == (3, 5)
    assert json.loads(output.read_text(encoding="utf-8"))["by_task"]["add"]["correct"] == 2
    assert [s["prediction"] for s in report["samples"]] == replies
    assert "exact match: 0.600 (3/5)" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["model", "data"])
def test_cli_missing_input_is_a_clear_error(bad, tiny_model_dir, tokenizer_dir, tmp_path):
    model_dir = tmp_path / "no_such_run" if bad == "model" else tiny_model_dir
    data = tmp_path / "missing.jsonl" if bad == "data" else ROOT / "data/sample_sft/heldout.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "utils.evaluate_chat", f"--model_dir={model_dir}", f"--data={data}",
         f"--tokenizer_dir={tokenizer_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(model_dir if bad == "model" else data) in proc.stderr
