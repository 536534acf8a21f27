"""Sample up to N MB of text from a corpus into shuffled .txt shards for tokenizer training.

    python -m data.get_txt_for_train_tokenizer --data_dir=DIR --output_dir=DIR --max_mb=N \\
        [--shard_mb=M] [--seed=S] [--text_field=F]

Sources and quotas. A *source* is a top-level entry of ``data_dir``: each sub-directory (with
every supported file below it) and each file directly in ``data_dir``. Every source gets a fair
share of the byte budget; a source smaller than its share gives its whole text and the unused
share is redistributed over the others ("water filling", :func:`allocate_quotas`). So a small
Chinese source next to a huge English one is not drowned out.

Streaming, two passes, memory bounded by one shard:
1. count the UTF-8 bytes of every source's documents;
2. keep each document of a source with probability ``quota / size`` (never above the quota)
   and append it to one of the shard buckets chosen at random; then shuffle each bucket in
   memory and write it as ``shard_00000.txt``, ... .

Shards hold whole documents separated by one blank line (the ``.txt`` reader of
``data/readers.py`` reads them back paragraph by paragraph). ``summary.jsonc`` records the MB
available, the quota and the MB taken per source. It is plain JSON; the ``.jsonc`` suffix keeps
it out of :func:`data.readers.list_data_files` (which reads ``.json``), so the output directory
can be passed as ``--data_dir`` of ``tokenizer.train_tokenizer`` as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from data.readers import ReadStats, iter_documents, list_data_files
from tokenizer.train_tokenizer import check_out_dir
from utils.errors import DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

MB = 1_000_000
SHARD_PREFIX = "shard_"
DOC_SEPARATOR = b"\n\n"
SUMMARY_FILE = "summary.jsonc"  # not a data suffix: the readers never take it for text
_LEN = struct.Struct("<Q")  # bucket files: length-prefixed documents


@dataclass
class SourceSummary:
    source: str
    files: int
    docs_available: int
    mb_available: float
    mb_quota: float
    docs_taken: int = 0
    mb_taken: float = 0.0


def list_sources(data_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """Map source name -> its data files: one source per top-level sub-directory or file."""
    root = Path(data_dir)
    sources: dict[str, list[Path]] = {}
    for path in list_data_files(root):
        top = path.relative_to(root).parts[0]
        sources.setdefault(top, []).append(path)
    if not sources:
        raise DataError(f"no .txt/.jsonl/.json/.parquet files under {str(root)!r}")
    return sources


def allocate_quotas(sizes: dict[str, int], budget: int) -> dict[str, int]:
    """Split ``budget`` bytes fairly over sources of the given sizes (water filling).

    Sources are visited from smallest to largest; each gets ``min(size, remaining budget /
    remaining sources)``, so what a small source leaves unused goes to the larger ones.
    Example: sizes a=10, b=50, c=100 and budget 90 -> a=10, b=40, c=40.
    """
    quotas: dict[str, int] = {}
    remaining = budget
    order = sorted(sizes, key=lambda name: (sizes[name], name))
    for i, name in enumerate(order):
        share = remaining // (len(order) - i)
        quotas[name] = min(sizes[name], share)
        remaining -= quotas[name]
    return {name: quotas[name] for name in sizes}


def _encode(text: str, stats: ReadStats) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \\ud800 escape
        stats.skip("bad_utf8")
        return None


def count_source_bytes(files: list[Path], text_field: str | None) -> tuple[int, int]:
    """(documents, UTF-8 bytes) of one source: the first pass."""
    stats = ReadStats()
    total = 0
    for path in files:
        for text in iter_documents(path, text_field, stats):
            data = _encode(text, stats)
            total += len(data) if data is not None else 0
    return stats.docs, total


def _sample_into_buckets(
    sources: dict[str, list[Path]],
    summaries: dict[str, SourceSummary],
    sizes: dict[str, int],
    quotas: dict[str, int],
    text_field: str | None,
    buckets: list[Path],
    rng: random.Random,
) -> ReadStats:
    """Second pass: Bernoulli-sample each source up to its quota into random bucket files."""
    stats = ReadStats()
    handles = [open(b, "wb") for b in buckets]
    try:
        with tqdm(total=sum(quotas.values()), unit="B", unit_scale=True, desc="sampling",
                  disable=None) as bar:
            for name, files in sources.items():
                summary, quota = summaries[name], quotas[name]
                keep_prob = 1.0 if sizes[name] <= quota else quota / sizes[name]
                taken = 0
                for path in files:
                    for text in iter_documents(path, text_field, stats):
                        data = _encode(text, stats)
                        if data is None or rng.random() >= keep_prob or taken + len(data) > quota:
                            continue
                        handle = handles[rng.randrange(len(handles))]
                        handle.write(_LEN.pack(len(data)))
                        handle.write(data)
                        taken += len(data)
                        summary.docs_taken += 1
                        bar.update(len(data))
                summary.mb_taken = taken / MB
    finally:
        for h in handles:
            h.close()
    return stats


def _write_shards(buckets: list[Path], output_dir: Path, rng: random.Random) -> list[Path]:
    """Shuffle each bucket in memory and write it as one shard; remove the bucket."""
    shards = []
    for i, bucket in enumerate(buckets):
        raw, docs, pos = bucket.read_bytes(), [], 0
        while pos < len(raw):
            (n,) = _LEN.unpack_from(raw, pos)
            docs.append(raw[pos + _LEN.size : pos + _LEN.size + n])
            pos += _LEN.size + n
        rng.shuffle(docs)
        shard = output_dir / f"{SHARD_PREFIX}{i:05d}.txt"
        shard.write_bytes(DOC_SEPARATOR.join(docs) + b"\n" if docs else b"")
        bucket.unlink()
        shards.append(shard)
    return shards


def sample_text(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    max_mb: float,
    shard_mb: float = 100.0,
    seed: int = 42,
    text_field: str | None = None,
) -> list[SourceSummary]:
    """Sample up to ``max_mb`` MB (10**6 bytes) of documents into shuffled txt shards."""
    if max_mb <= 0 or shard_mb <= 0:
        raise DataError(f"--max_mb and --shard_mb must be positive (got {max_mb}, {shard_mb})")
    data_dir, output_dir = Path(data_dir).resolve(), Path(output_dir).resolve()
    if output_dir == data_dir or data_dir in output_dir.parents:
        raise DataError(f"--output_dir {str(output_dir)!r} lies inside --data_dir; choose another")
    check_out_dir(output_dir, "--output_dir")
    sources = list_sources(data_dir)

    summaries: dict[str, SourceSummary] = {}
    sizes: dict[str, int] = {}
    for name, files in tqdm(sources.items(), desc="counting", unit="source", disable=None):
        docs, sizes[name] = count_source_bytes(files, text_field)
        summaries[name] = SourceSummary(name, len(files), docs, sizes[name] / MB, 0.0)
    quotas = allocate_quotas(sizes, int(max_mb * MB))
    for name, quota in quotas.items():
        summaries[name].mb_quota = quota / MB

    output_dir.mkdir(parents=True, exist_ok=True)
    for old in output_dir.glob(f"{SHARD_PREFIX}*.txt"):
        old.unlink()
    tmp_dir = output_dir / ".buckets"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    num_shards = max(1, math.ceil(sum(quotas.values()) / (shard_mb * MB)))
    buckets = [tmp_dir / f"{i:05d}.bin" for i in range(num_shards)]
    rng = random.Random(seed)
    stats = _sample_into_buckets(sources, summaries, sizes, quotas, text_field, buckets, rng)
    shards = _write_shards(buckets, output_dir, rng)
    tmp_dir.rmdir()

    result = list(summaries.values())
    (output_dir / SUMMARY_FILE).write_text(
        json.dumps({"max_mb": max_mb, "seed": seed, "shards": [s.name for s in shards],
                    "sources": [asdict(s) for s in result]}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    logger.info("read: %s", stats.summary())
    return result


def format_summary(summaries: list[SourceSummary]) -> str:
    lines = [f"{'source':<32} {'files':>5} {'MB avail':>10} {'MB quota':>10} {'MB taken':>10} "
             f"{'docs':>9}"]
    for s in summaries:
        lines.append(f"{s.source:<32} {s.files:>5} {s.mb_available:>10.3f} {s.mb_quota:>10.3f} "
                     f"{s.mb_taken:>10.3f} {s.docs_taken:>9}")
    total = sum(s.mb_taken for s in summaries)
    lines.append(f"{'total':<32} {'':>5} {'':>10} {'':>10} {total:>10.3f} "
                 f"{sum(s.docs_taken for s in summaries):>9}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="corpus directory (searched recursively)")
    parser.add_argument("--output_dir", required=True,
                        help="where the txt shards and summary.jsonc are written")
    parser.add_argument("--max_mb", type=float, required=True,
                        help="text budget in MB (10**6 bytes)")
    parser.add_argument("--shard_mb", type=float, default=100.0, help="approximate MB per shard")
    parser.add_argument("--seed", type=int, default=42, help="sampling and shuffling seed")
    parser.add_argument("--text_field", default=None,
                        help="JSON/parquet text field (default: text, then content)")
    args = parser.parse_args()
    setup_logging()
    summaries = sample_text(args.data_dir, args.output_dir, args.max_mb, args.shard_mb,
                            args.seed, args.text_field)
    print(format_summary(summaries))


if __name__ == "__main__":
    run_cli(main)
