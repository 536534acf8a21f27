"""Random-access speed of ``PretokDatasetWithIndex`` over a large token corpus.

    python -m benchmarks.bench_dataset [--size_mb=1024] [--seq_len=2048] [--samples=5000]

Writes ``--size_mb`` of random uint16 tokens as ``--num_files`` ``.bin`` files (so windows cross
file boundaries) in ``--work_dir`` (under /tmp), builds the index, then prints samples/s for
random and sequential ``ds[i]`` in this process and through a DataLoader with workers, plus the
index build time and this process's peak RSS. The files were just written, so reads come from
the page cache (the steady state of a run whose data fits in RAM).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from data_preprocess.build_pretrain_sample_index_map import build_index
from data_preprocess.token_file import (
    TokenFileMeta,
    TokenWriter,
    atomic_rename,
    tmp_path,
    write_meta,
)
from dataset.dataset_pretrain import PretokDatasetWithIndex


def write_random_corpus(work: Path, size_mb: float, num_files: int, vocab_size: int) -> int:
    """``size_mb`` of random tokens split over ``num_files`` .bin files; returns the token count."""
    rng = np.random.default_rng(0)
    per_file = int(size_mb * 2**20) // 2 // num_files
    for f in range(num_files):
        path = work / f"random{f:03d}.bin"
        writer = TokenWriter(tmp_path(path), np.dtype(np.uint16))
        for lo in range(0, per_file, 1 << 24):
            writer.write(rng.integers(0, vocab_size, min(1 << 24, per_file - lo), dtype=np.uint16))
        writer.close()
        atomic_rename(writer.path, path)
        write_meta(
            path,
            TokenFileMeta(
                dtype="uint16",
                vocab_size=vocab_size,
                num_tokens=per_file,
                num_documents=1,
                tokenizer_fingerprint="random",
                special_ids={},
                add_bos=False,
                text_field=None,
                source={"path": "generated", "size": 0, "mtime_ns": 0},
            ),
        )
    return per_file * num_files


def samples_per_sec(ds: PretokDatasetWithIndex, order: np.ndarray) -> float:
    t0 = time.perf_counter()
    for i in order:
        ds[int(i)]
    return len(order) / (time.perf_counter() - t0)


def loader_samples_per_sec(ds: PretokDatasetWithIndex, order: np.ndarray, workers: int) -> float:
    """Steady-state rate: the clock starts after the first batch (worker start-up excluded)."""
    batches = iter(DataLoader(ds, batch_size=8, sampler=order.tolist(), num_workers=workers))
    next(batches)
    t0 = time.perf_counter()
    count = sum(len(x) for x, _ in batches)
    return count / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size_mb", type=float, default=1024)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--num_files", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--loader_workers", type=int, default=2)
    parser.add_argument("--work_dir", default="/tmp/z2all_bench_dataset")
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    num_tokens = write_random_corpus(work, args.size_mb, args.num_files, args.vocab_size)
    t0 = time.perf_counter()
    build_index(work, args.seq_len)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = PretokDatasetWithIndex(work, args.seq_len, valid_ratio=0.0)
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    n = min(args.samples, len(ds))
    random_order = rng.integers(0, len(ds), n)
    sequential = np.arange(n)
    rows = [
        ("random ds[i]", samples_per_sec(ds, random_order)),
        ("sequential ds[i]", samples_per_sec(ds, sequential)),
        (
            f"DataLoader random, {args.loader_workers} workers, batch 8",
            loader_samples_per_sec(ds, random_order, args.loader_workers),
        ),
    ]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{num_tokens / 1e6:.1f}M tokens ({args.size_mb:.0f} MB) in {args.num_files} files, "
        f"{len(ds)} samples of seq {args.seq_len}; index built in {build_s:.2f}s, "
        f"dataset opened in {open_s * 1e3:.1f} ms; peak RSS {rss_mb:.0f} MB\n"
    )
    print("| access | samples/s | MB/s of tokens |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate * (args.seq_len + 1) * 2 / 2**20:,.0f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
