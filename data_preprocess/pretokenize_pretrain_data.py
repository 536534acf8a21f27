"""Pretokenize a raw pretraining corpus into ``.bin`` token files (one per input file).

    python -m data_preprocess.pretokenize_pretrain_data --data_dir=DIR --tokenizer_dir=DIR \\
        [--out_dir=DIR] [--num_workers=N] [--overwrite] [--add_bos] [--text_field=NAME]

Every .jsonl / .json / .parquet / .txt under ``--data_dir`` is streamed (``data.readers``) and
written to ``OUT_DIR/<same relative path>.bin`` plus its ``.bin.meta`` sidecar
(``data_preprocess/token_file.py``, ``docs/data_format.md``): documents in input order, each
followed by EOS (and preceded by BOS with ``--add_bos``). ``--out_dir`` defaults to the sibling
directory ``<DATA_DIR>_tokens``, so the raw directory stays untouched.

Resumable: an output whose sidecar matches the source's size and mtime, the tokenizer
fingerprint and the options is skipped; ``--overwrite`` forces. Outputs are written under a
scratch name and renamed into place, the sidecar last, so a killed run leaves no output that
looks finished and a re-run redoes exactly the unfinished files. An existing output made with
a different tokenizer is an error unless ``--overwrite`` (so two corpora never get mixed up).

Stale outputs are removed: the sidecar records the source's directory (``source.data_dir``), so
at the end of a run an output made from a file of this ``--data_dir`` that is no longer among its
inputs (renamed, deleted) is deleted with its sidecar and logged; otherwise the sample index
would still train on it. Outputs of other data directories sharing ``--out_dir`` are kept.

Parallelism (``--num_workers > 1``): a process pool over chunks. Files are cut into byte
ranges (row groups for parquet) of at most ``--chunk_mb``, and small enough that every worker
gets about four chunks (:func:`chunk_size`), so one big file keeps all workers busy. Each chunk
is tokenized into its own part file and the parts are concatenated in order, so the output is
byte-identical to a one-worker run. A worker's exception is re-raised here, never swallowed.

Documents are encoded with the tokenizer's Rust batch encoder with special-token parsing off
(untrusted text: a literal ``<|im_end|>`` in a document is ordinary text).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import multiprocessing as mp
import os
import queue
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm

from data.readers import ReadStats, iter_documents, list_data_files, split_ranges
from data_preprocess.token_file import (
    BIN_SUFFIX,
    TMP_SUFFIX,
    TokenFileMeta,
    TokenWriter,
    atomic_rename,
    meta_path,
    read_meta,
    tmp_path,
    token_dtype,
    write_meta,
)
from tokenizer.tokenization import (
    BOS_ID,
    EOS_ID,
    SPECIAL_TOKENS,
    load_backend_tokenizer,
    tokenizer_fingerprint,
)
from utils.errors import ConfigError, DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

BATCH_CHARS = 1 << 18  # encode documents in batches of about 256K characters (bounds memory)
BATCH_DOCS = 1024


# ---------------------------------------------------------------------------------------------
# Encoding (runs in the main process or in pool workers).


@dataclass(frozen=True)
class EncoderConfig:
    """What a worker needs to encode documents: the serialized tokenizer and the framing ids."""

    tokenizer_json: str
    vocab_size: int
    eos_id: int
    bos_id: int | None  # None: no BOS
    text_field: str | None


class DocumentEncoder:
    """Batch-encodes documents into one flat id array with BOS?/EOS framing."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self.dtype = token_dtype(config.vocab_size)
        self.tokenizer = tokenizers.Tokenizer.from_str(config.tokenizer_json)
        self.tokenizer.encode_special_tokens = True  # special-token strings are plain text

    def encode(self, docs: list[str]) -> np.ndarray:
        """``[bos?] doc0 eos [bos?] doc1 eos ...`` as a 1-D array of the token dtype."""
        encodings = self.tokenizer.encode_batch_fast(docs, add_special_tokens=False)
        bos, eos = self.config.bos_id, self.config.eos_id
        flat: list[int] = []
        for enc in encodings:  # `enc.ids` builds a new list on every access: read it once
            if bos is not None:
                flat.append(bos)
            flat.extend(enc.ids)
            flat.append(eos)
        return np.array(flat, dtype=self.dtype)


def batched_documents(docs: Iterable[str]) -> Iterator[list[str]]:
    """Group documents into batches of about ``BATCH_CHARS`` characters (a huge one alone)."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass(frozen=True)
class ChunkTask:
    """Tokenize ``byte_range`` of ``source`` (None: the whole file) into ``part``."""

    source: Path
    part: Path
    byte_range: tuple[int, int] | None
    approx_bytes: int  # share of the source's size, for progress


@dataclass
class ChunkResult:
    num_tokens: int
    stats: ReadStats


Progress = Callable[[int, int], None]  # (bytes, tokens) done since the last call


def run_chunk(task: ChunkTask, encoder: DocumentEncoder, progress: Progress) -> ChunkResult:
    """Stream one chunk's documents through the encoder into its part file."""
    stats = ReadStats()
    writer = TokenWriter(task.part, encoder.dtype)
    reported = 0
    try:
        docs = iter_documents(task.source, encoder.config.text_field, stats, task.byte_range)
        for batch in batched_documents(docs):
            ids = encoder.encode(batch)
            writer.write(ids)
            step = min(stats.bytes - reported, task.approx_bytes - reported)
            reported += max(step, 0)
            progress(max(step, 0), ids.size)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    progress(task.approx_bytes - reported, 0)
    return ChunkResult(writer.num_tokens, stats)


# Pool workers: one encoder per process, built once by the initializer.
_worker_encoder: DocumentEncoder | None = None
_worker_progress: mp.Queue | None = None


def _init_worker(config: EncoderConfig, progress_queue: mp.Queue) -> None:
    global _worker_encoder, _worker_progress
    _worker_encoder = DocumentEncoder(config)
    _worker_progress = progress_queue


def _run_chunk_in_worker(task: ChunkTask) -> ChunkResult:
    assert _worker_encoder is not None and _worker_progress is not None
    return run_chunk(task, _worker_encoder, lambda b, t: _worker_progress.put((b, t)))


# ---------------------------------------------------------------------------------------------
# Planning: which files need work, split into which chunks.


@dataclass
class FileJob:
    """One input file and its output; ``tasks`` are its chunks in document order."""

    source: Path
    out_bin: Path
    source_stat: dict  # size and mtime when planned: a source edited mid-run is redone next time
    tasks: list[ChunkTask] = field(default_factory=list)
    results: dict[int, ChunkResult] = field(default_factory=dict)


def output_path(source: Path, data_dir: Path, out_dir: Path) -> Path:
    """``DATA_DIR/a/b.jsonl`` -> ``OUT_DIR/a/b.jsonl.bin`` (the input's name is kept whole, so
    ``b.json`` and ``b.jsonl`` never collide)."""
    rel = source.relative_to(data_dir)
    return out_dir / rel.parent / (rel.name + BIN_SUFFIX)


SOURCE_STAMP = ("path", "size", "mtime_ns")  # the sidecar's source fields an output must match


def source_info(source: Path, data_dir: Path) -> dict:
    """The sidecar's ``source``: the stamp plus the absolute data directory it was read from."""
    st = source.stat()
    return {
        "path": source.relative_to(data_dir).as_posix(),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "data_dir": str(data_dir.resolve()),
    }


def is_up_to_date(job: FileJob, expected: dict) -> bool:
    """True when ``job``'s output is complete and was made from this source with these settings.

    ``expected`` holds the sidecar fields that must match (fingerprint, options). An output
    from a different tokenizer is a DataError (the caller passes ``--overwrite`` to replace it).
    """
    if not meta_path(job.out_bin).is_file():
        return False
    try:
        meta = read_meta(job.out_bin)
    except DataError:
        return False  # corrupt or old sidecar: redo
    if meta.tokenizer_fingerprint != expected["tokenizer_fingerprint"]:
        raise DataError(
            f"{job.out_bin}: was tokenized with a different tokenizer (fingerprint "
            f"{meta.tokenizer_fingerprint[:12]}..., "
            f"now {expected['tokenizer_fingerprint'][:12]}...); "
            "pass --overwrite to re-tokenize, or choose another --out_dir"
        )
    if any(getattr(meta, k) != v for k, v in expected.items()):
        return False
    if any(meta.source.get(k) != job.source_stat[k] for k in SOURCE_STAMP):
        return False  # data_dir may differ: a moved corpus is still up to date
    return job.out_bin.is_file() and job.out_bin.stat().st_size == meta.num_bytes


MIN_CHUNK_BYTES = 1 << 20


def chunk_size(total_bytes: int, num_workers: int, max_chunk_bytes: int) -> int:
    """Bytes per chunk: about four chunks per worker over all the work (load balance), but at
    most ``max_chunk_bytes`` (progress granularity) and at least 1 MB (per-chunk overhead)."""
    balanced = total_bytes // (4 * num_workers)
    return max(min(balanced, max_chunk_bytes), min(MIN_CHUNK_BYTES, max_chunk_bytes))


def plan_chunks(job: FileJob, num_workers: int, chunk_bytes: int) -> None:
    """Fill ``job.tasks``: one whole-file task, or byte/row-group ranges with part files."""
    size = job.source.stat().st_size
    num_chunks = 1 if num_workers == 1 else max(1, math.ceil(size / chunk_bytes))
    ranges = split_ranges(job.source, num_chunks) if num_chunks > 1 else []
    if len(ranges) <= 1:
        job.tasks = [ChunkTask(job.source, tmp_path(job.out_bin), None, size)]
        return
    total = ranges[-1][1]  # bytes, or row groups for parquet
    job.tasks = [
        ChunkTask(
            job.source, tmp_path(job.out_bin, f"part{k:05d}"), r, size * (r[1] - r[0]) // total
        )
        for k, r in enumerate(ranges)
    ]


def remove_scratch(out_bin: Path) -> None:
    """Delete the scratch files of ``out_bin`` (left by an interrupted or failed run)."""
    for p in out_bin.parent.glob(glob.escape(out_bin.name) + ".*" + TMP_SUFFIX):
        p.unlink(missing_ok=True)
    tmp_path(out_bin).unlink(missing_ok=True)


def finalize(job: FileJob, meta_fields: dict) -> TokenFileMeta:
    """Concatenate the parts in order, rename the ``.bin`` into place, then write the sidecar."""
    results = [job.results[k] for k in range(len(job.tasks))]
    final_tmp = tmp_path(job.out_bin)
    if len(job.tasks) > 1:
        with open(final_tmp, "wb") as out:
            for task in job.tasks:
                with open(task.part, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
            out.flush()
            os.fsync(out.fileno())
        for task in job.tasks:
            task.part.unlink()
    stats = ReadStats()
    for r in results:
        stats.merge(r.stats)
    meta = TokenFileMeta(
        num_tokens=sum(r.num_tokens for r in results),
        num_documents=stats.docs,
        source=job.source_stat,
        skipped=dict(sorted(stats.skipped.items())),
        **meta_fields,
    )
    meta_path(job.out_bin).unlink(missing_ok=True)  # the old completion marker goes first
    atomic_rename(final_tmp, job.out_bin)
    write_meta(job.out_bin, meta)
    if stats.num_skipped:
        logger.warning("%s: %s", job.source, stats.summary())
    return meta


def record_data_dir(job: FileJob) -> None:
    """Rewrite an up-to-date output's sidecar whose ``source`` lacks this run's data directory
    (written before it was recorded, or the corpus moved), so stale-output removal knows it."""
    meta = read_meta(job.out_bin)
    if meta.source != job.source_stat:
        write_meta(job.out_bin, dataclasses.replace(meta, source=job.source_stat))


def remove_stale_outputs(out_dir: Path, data_dir: Path, sources: list[Path]) -> list[Path]:
    """Delete every output in ``out_dir`` made from a file of ``data_dir`` not in ``sources``.

    The sidecar's ``source`` (``data_dir`` + relative ``path``) says where an output came from.
    Outputs of another data directory, and ``.bin`` files without a readable sidecar or
    without a recorded ``data_dir``, are left alone. Returns the removed ``.bin`` paths.
    """
    root = data_dir.resolve()
    current = {root / src.relative_to(data_dir) for src in sources}
    removed = []
    for out_bin in sorted(out_dir.rglob("*" + BIN_SUFFIX)):
        if not (out_bin.is_file() and meta_path(out_bin).is_file()):
            continue
        try:
            source = read_meta(out_bin).source
        except DataError:
            continue  # not one of our outputs
        made_from = Path(str(source.get("data_dir", "")), str(source.get("path", "")))
        if made_from.is_absolute() and made_from.is_relative_to(root) and made_from not in current:
            meta_path(out_bin).unlink()  # the completion marker goes first
            out_bin.unlink()
            logger.warning(
                "removed stale output %s: its source %s is no longer an input file",
                out_bin,
                made_from,
            )
            removed.append(out_bin)
    return removed


# ---------------------------------------------------------------------------------------------
# Running the plan.


class ProgressBar:
    """tqdm over input bytes (MB/s) with a tokens/s postfix."""

    def __init__(self, total_bytes: int) -> None:
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="pretokenize",
            mininterval=0.5,
        )
        self.tokens = 0
        self.start = time.perf_counter()
        self.last_postfix = 0.0

    def update(self, num_bytes: int, num_tokens: int) -> None:
        self.bar.update(num_bytes)
        self.tokens += num_tokens
        now = time.perf_counter()
        if now - self.last_postfix > 0.5:
            self.bar.set_postfix_str(
                f"{self.tokens / max(now - self.start, 1e-9) / 1e6:.2f}M tok/s"
            )
            self.last_postfix = now

    def close(self) -> None:
        self.bar.close()


def run_serial(
    jobs: list[FileJob], config: EncoderConfig, meta_fields: dict, bar: ProgressBar
) -> list[TokenFileMeta]:
    encoder = DocumentEncoder(config)
    metas = []
    for job in jobs:
        for k, task in enumerate(job.tasks):
            job.results[k] = run_chunk(task, encoder, bar.update)
        metas.append(finalize(job, meta_fields))
    return metas


def run_pool(
    jobs: list[FileJob],
    config: EncoderConfig,
    meta_fields: dict,
    bar: ProgressBar,
    num_workers: int,
) -> list[TokenFileMeta]:
    """Run every chunk in a spawn pool; finalize a file once all its chunks are done.

    The first worker exception cancels the remaining chunks and is re-raised here.
    """
    ctx = mp.get_context("spawn")  # no fork of a process that may hold tokenizer threads
    progress_queue = ctx.Queue()
    metas = []
    with ProcessPoolExecutor(
        num_workers, mp_context=ctx, initializer=_init_worker, initargs=(config, progress_queue)
    ) as pool:
        pending: dict[Future, tuple[FileJob, int]] = {
            pool.submit(_run_chunk_in_worker, task): (job, k)
            for job in jobs
            for k, task in enumerate(job.tasks)
        }
        try:
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, bar)
                for future in done:
                    job, k = pending.pop(future)
                    job.results[k] = future.result()  # re-raises the worker's exception
                    if len(job.results) == len(job.tasks):
                        metas.append(finalize(job, meta_fields))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        _drain(progress_queue, bar)
    return metas


def _drain(progress_queue: mp.Queue, bar: ProgressBar) -> None:
    while True:
        try:
            num_bytes, num_tokens = progress_queue.get_nowait()
        except queue.Empty:
            return
        bar.update(num_bytes, num_tokens)


@dataclass
class PretokenizeSummary:
    out_dir: Path
    files_written: int
    files_skipped: int
    files_removed: int  # stale outputs whose source left data_dir
    num_tokens: int
    stats: ReadStats
    seconds: float


def default_out_dir(data_dir: Path) -> Path:
    """``data/corpus`` -> ``data/corpus_tokens`` (a sibling, so the raw directory stays raw)."""
    data_dir = data_dir.resolve()
    return data_dir.with_name(data_dir.name + "_tokens")


def pretokenize(
    data_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
    add_bos: bool = False,
    text_field: str | None = None,
    chunk_mb: float = 64,
) -> PretokenizeSummary:
    """Tokenize every input file under ``data_dir`` that has no up-to-date output, then remove
    the outputs of files that left ``data_dir`` (:func:`remove_stale_outputs`)."""
    if num_workers < 1:
        raise ConfigError(f"--num_workers must be at least 1, got {num_workers}")
    if not (math.isfinite(chunk_mb) and chunk_mb > 0):
        raise ConfigError(f"--chunk_mb must be a positive number of megabytes, got {chunk_mb}")
    start = time.perf_counter()
    data_dir = Path(data_dir)
    out_dir = default_out_dir(data_dir) if out_dir is None else Path(out_dir)
    sources = list_data_files(data_dir)  # outputs (.bin, .meta, .tmp) are never input files
    if not sources:
        raise DataError(f"{data_dir}: no .txt/.jsonl/.json/.parquet files to pretokenize")
    backend = load_backend_tokenizer(tokenizer_dir)
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    config = EncoderConfig(
        backend.to_str(), vocab_size, EOS_ID, BOS_ID if add_bos else None, text_field
    )
    expected = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir),
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "add_bos": add_bos,
        "text_field": text_field,
    }
    meta_fields = {**expected, "special_ids": {t: i for i, t in enumerate(SPECIAL_TOKENS)}}

    jobs = [
        FileJob(src, output_path(src, data_dir, out_dir), source_info(src, data_dir))
        for src in sources
    ]
    todo = []
    for job in jobs:
        if overwrite or not is_up_to_date(job, expected):
            todo.append(job)
        else:
            record_data_dir(job)
    logger.info(
        "%d input files in %s: %d up to date, %d to tokenize into %s (%d workers)",
        len(jobs),
        data_dir,
        len(jobs) - len(todo),
        len(todo),
        out_dir,
        num_workers,
    )
    total_bytes = sum(job.source_stat["size"] for job in todo)
    chunk_bytes = chunk_size(total_bytes, num_workers, max(1, int(chunk_mb * 2**20)))
    for job in todo:
        job.out_bin.parent.mkdir(parents=True, exist_ok=True)
        remove_scratch(job.out_bin)
        plan_chunks(job, num_workers, chunk_bytes)

    bar = ProgressBar(total_bytes)
    try:
        if num_workers == 1:
            metas = run_serial(todo, config, meta_fields, bar)
        else:
            metas = run_pool(todo, config, meta_fields, bar, num_workers)
    except BaseException:
        for job in todo:
            remove_scratch(job.out_bin)  # finished files stay; nothing partial remains
        raise
    finally:
        bar.close()
    removed = remove_stale_outputs(out_dir, data_dir, sources)

    stats = ReadStats()
    for job in todo:
        for result in job.results.values():
            stats.merge(result.stats)
    return PretokenizeSummary(
        out_dir,
        len(todo),
        len(jobs) - len(todo),
        len(removed),
        sum(m.num_tokens for m in metas),
        stats,
        time.perf_counter() - start,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="raw corpus directory (recursive)")
    parser.add_argument("--tokenizer_dir", required=True, help="a zero2all tokenizer directory")
    parser.add_argument(
        "--out_dir", default=None, help="output directory (default: <data_dir>_tokens)"
    )
    parser.add_argument("--num_workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument(
        "--overwrite", action="store_true", help="re-tokenize up-to-date outputs too"
    )
    parser.add_argument("--add_bos", action="store_true", help="also put BOS before every document")
    parser.add_argument(
        "--text_field", default=None, help="JSON/parquet text field (default: text, content)"
    )
    parser.add_argument(
        "--chunk_mb", type=float, default=64, help="split files larger than this across workers"
    )
    args = parser.parse_args(argv)
    setup_logging()
    summary = pretokenize(
        args.data_dir,
        args.tokenizer_dir,
        args.out_dir,
        args.num_workers,
        args.overwrite,
        args.add_bos,
        args.text_field,
        args.chunk_mb,
    )
    logger.info(
        "done in %.1fs: %d files written, %d up to date, %d stale removed, %d tokens; %s",
        summary.seconds,
        summary.files_written,
        summary.files_skipped,
        summary.files_removed,
        summary.num_tokens,
        summary.stats.summary(),
    )
    logger.info(
        "next: python -m data_preprocess.build_pretrain_sample_index_map --data_dir=%s "
        "--max_seq_len=N",
        summary.out_dir,
    )


if __name__ == "__main__":
    run_cli(main)
