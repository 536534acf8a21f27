"""Length statistics of the documents of a corpus, in characters and optionally in tokens.

    python -m data.max_sentence_length --data_dir=DIR [--tokenizer_dir=DIR] [--text_field=F]

Prints, per file and overall: document count, mean, p50, p90, p99 and max length. Lengths are
Unicode code points (``len(text)``); with ``--tokenizer_dir`` (a zero2all tokenizer, loaded by
``tokenizer.tokenization.load_tokenizer``) also token counts, without bos/eos and with the
documents encoded as untrusted text (``encode_untrusted_batch``), exactly as pretokenization
encodes them: a literal ``<|im_end|>`` in a document counts as the several tokens it becomes.
Useful to choose ``max_seq_len`` and to see how much of a corpus a context window cuts off.

Percentiles use linear interpolation between order statistics (numpy's default), so p50 of
``[1, 2, 3, 4]`` is 2.5. All lengths are kept in memory as int64 (8 bytes per document).
"""

from __future__ import annotations

import argparse
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.readers import ReadStats, iter_documents, list_data_files
from tokenizer.tokenization import encode_untrusted_batch, load_tokenizer
from utils.errors import DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class LengthStats:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: int

    @classmethod
    def of(cls, lengths: Iterable[int] | np.ndarray) -> "LengthStats":
        arr = np.asarray(lengths, dtype=np.int64)
        if arr.size == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99])
        return cls(int(arr.size), float(arr.mean()), float(p50), float(p90), float(p99),
                   int(arr.max()))


def load_token_counter(tokenizer_dir: str | os.PathLike) -> Callable[[list[str]], list[int]]:
    """A function mapping a batch of texts to their token counts, encoded as pretokenization
    does (untrusted text, no special tokens added); DataError for a non-tokenizer directory."""
    tok = load_tokenizer(tokenizer_dir)

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in encode_untrusted_batch(tok, texts)]

    return count


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def file_lengths(
    path: Path,
    text_field: str | None,
    count_tokens: Callable[[list[str]], list[int]] | None,
    stats: ReadStats,
) -> tuple[array, array]:
    """(character lengths, token lengths) of one file's documents; tokens empty without a
    tokenizer."""
    chars, tokens = array("q"), array("q")
    for batch in _batches(iter_documents(path, text_field, stats), TOKENIZE_BATCH):
        chars.extend(len(d) for d in batch)
        if count_tokens is not None:
            tokens.extend(count_tokens(batch))
    return chars, tokens


def format_row(name: str, unit: str, s: LengthStats) -> str:
    return (f"{name:<40} {unit:<6} {s.count:>9} {s.mean:>10.1f} {s.p50:>9.0f} {s.p90:>9.0f} "
            f"{s.p99:>9.0f} {s.max:>9}")


def length_report(
    data_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
    text_field: str | None = None,
) -> dict[str, dict[str, LengthStats]]:
    """``{file or "overall": {"chars": stats, "tokens": stats}}`` (tokens with a tokenizer)."""
    files = list_data_files(data_dir)
    if not files:
        raise DataError(f"no .txt/.jsonl/.json/.parquet files under {str(data_dir)!r}")
    count_tokens = load_token_counter(tokenizer_dir) if tokenizer_dir is not None else None
    root = Path(data_dir)
    report: dict[str, dict[str, LengthStats]] = {}
    all_chars, all_tokens = array("q"), array("q")
    stats = ReadStats()
    for path in tqdm(files, desc="files", unit="file", disable=None):
        chars, tokens = file_lengths(path, text_field, count_tokens, stats)
        all_chars.extend(chars)
        all_tokens.extend(tokens)
        entry = {"chars": LengthStats.of(chars)}
        if count_tokens is not None:
            entry["tokens"] = LengthStats.of(tokens)
        report[str(path.relative_to(root))] = entry
    overall = {"chars": LengthStats.of(all_chars)}
    if count_tokens is not None:
        overall["tokens"] = LengthStats.of(all_tokens)
    report["overall"] = overall
    logger.info("read: %s", stats.summary())
    return report


def format_report(report: dict[str, dict[str, LengthStats]]) -> str:
    header = (f"{'file':<40} {'unit':<6} {'docs':>9} {'mean':>10} {'p50':>9} {'p90':>9} "
              f"{'p99':>9} {'max':>9}")
    rows = [header]
    for name, entry in report.items():
        for unit, s in entry.items():
            rows.append(format_row(name, unit, s))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="corpus directory (searched recursively)")
    parser.add_argument("--tokenizer_dir", default=None,
                        help="also count tokens with this tokenizer")
    parser.add_argument("--text_field", default=None,
                        help="JSON/parquet text field (default: text, then content)")
    args = parser.parse_args()
    setup_logging()
    print(format_report(length_report(args.data_dir, args.tokenizer_dir, args.text_field)))


if __name__ == "__main__":
    run_cli(main)
