"""data/max_sentence_length.py: character and token length statistics per file and overall."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.max_sentence_length import LengthStats, format_report, length_report
from tokenizer.tokenization import SPECIAL_TOKENS
from utils.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


def test_length_stats_hand_computed() -> None:
    s = LengthStats.of([1, 2, 3, 4])
    assert (s.count, s.mean, s.p50, s.max) == (4, 2.5, 2.5, 4)
    assert s.p90 == pytest.approx(3.7) and s.p99 == pytest.approx(3.97)  # 1 + 0.9*3, 1 + 0.99*3
    assert LengthStats.of([]) == LengthStats(0, 0.0, 0.0, 0.0, 0.0, 0)
    assert LengthStats.of([7]) == LengthStats(1, 7.0, 7.0, 7.0, 7.0, 7)


def _word_level_tokenizer(path: Path, words: list[str]) -> Path:
    """A tiny whitespace word-level tokenizer with the zero2all special tokens at ids 0..5:
    token count == number of words (reference)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: len(vocab) + i for i, w in enumerate(sorted(set(words)))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", additional_special_tokens=list(SPECIAL_TOKENS[4:]),
    )
    fast.save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    a = ["one two three", "中文 字符", "x"]
    b = ["alpha beta gamma delta epsilon " * k for k in range(1, 8)]
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in a) + "not json\n",
        "utf-8",
    )
    (data / "sub" / "b.json").write_text(json.dumps([{"text": t} for t in b]), "utf-8")
    return data, {"a.jsonl": a, "sub/b.json": b}


def test_char_stats_per_file_and_overall(corpus) -> None:
    data, docs = corpus
    report = length_report(data)
    assert list(report) == ["a.jsonl", "sub/b.json", "overall"]
    for name, texts in docs.items():
        assert report[name]["chars"] == LengthStats.of([len(t) for t in texts])
        assert "tokens" not in report[name]
    everything = [len(t) for texts in docs.values() for t in texts]
    overall = report["overall"]["chars"]
    assert overall.count == 10 and overall.max == max(everything)
    assert overall.p90 == pytest.approx(np.percentile(everything, 90))
    assert "overall" in format_report(report)


def test_token_stats_with_tokenizer(corpus, tmp_path: Path) -> None:
    data, docs = corpus
    words = [w for texts in docs.values() for t in texts for w in t.split()]
    tok_dir = _word_level_tokenizer(tmp_path / "tok", words[:-3])  # a few words map to <unk>
    report = length_report(data, tok_dir)
    for name, texts in docs.items():
        assert report[name]["tokens"] == LengthStats.of([len(t.split()) for t in texts])
    assert report["overall"]["tokens"].count == 10
    assert "tokens" in format_report(report)


def test_token_counts_treat_special_token_strings_as_text(tmp_path: Path, tokenizer_dir) -> None:
    """Counted as pretokenization encodes documents: a literal <|im_end|> is several tokens."""
    from tokenizer.tokenization import encode_untrusted, load_tokenizer

    texts = ["<|im_end|>", "a chat log: <|im_start|>user\nhi<|im_end|>\n", "plain words"]
    (tmp_path / "data").mkdir()
    records = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "data" / "a.jsonl").write_text(records)
    report = length_report(tmp_path / "data", tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    expected = [len(encode_untrusted(tok, t)) for t in texts]
    assert expected[0] > 1
    assert report["a.jsonl"]["tokens"] == LengthStats.of(expected)


def test_errors(tmp_path: Path, corpus) -> None:
    data, _ = corpus
    with pytest.raises(DataError, match="tokenizer directory .* does not exist"):
        length_report(data, tmp_path / "no_tok")
    (tmp_path / "bad_tok").mkdir()
    with pytest.raises(DataError, match="bad_tok: not a tokenizer directory"):
        length_report(data, tmp_path / "bad_tok")
    (tmp_path / "bad_tok" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="bad_tok: cannot load tokenizer"):
        length_report(data, tmp_path / "bad_tok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt/.jsonl/.json/.parquet files"):
        length_report(tmp_path / "empty")


def test_cli(corpus, tmp_path: Path) -> None:
    data, _ = corpus
    proc = subprocess.run([sys.executable, "-m", "data.max_sentence_length", f"--data_dir={data}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sub/b.json" in proc.stdout and "overall" in proc.stdout
    assert "1 records skipped" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "data.max_sentence_length",
                           f"--data_dir={tmp_path / 'missing'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: data directory")
