"""Pretokenization throughput vs the tokenizer's raw batch encoder, and peak memory.

    python -m benchmarks.bench_pretokenize --tokenizer_dir=DIR [--size_mb=1024] [--workers=1,2]

Generates one ``--size_mb`` .jsonl file in ``--work_dir`` (under /tmp) by cycling the documents
of ``--source_dir`` (the bundled sample corpus), then prints a table:

- ``raw encode_batch``: only ``Tokenizer.encode_batch_fast`` on the same documents, read ahead
  of time in batches and not timed (the upper bound for pretokenization);
- ``pretokenize`` at each worker count: the full pipeline (read, parse, encode, write), run in
  a fresh subprocess; peak RSS is the sum over that process and its workers.

MB/s counts input-file bytes per second in every row, so the ratios compare like with like.
With ``--repeats=R`` the raw encoder and each worker count run once per round in an order that
rotates per round, and every cell is the median over the rounds (peak RSS: the maximum).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from data.readers import iter_documents, list_data_files
from data_preprocess.pretokenize_pretrain_data import batched_documents, load_backend_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# Runs in the subprocess: one pretokenize call, then its time and token count as JSON.
_CHILD = """
import json, sys, time
from data_preprocess.pretokenize_pretrain_data import pretokenize
raw, tok, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
s = pretokenize(raw, tok, out, num_workers=workers, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": s.num_tokens}))
"""


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc), in MB."""
    total_kb = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total_kb += int(status.split("VmRSS:")[1].split()[0])
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # the process ended (or is a zombie) while we looked
    return total_kb / 1024


def run_measured(cmd: list[str]) -> tuple[str, float]:
    """Run ``cmd``; return its stdout and the peak RSS of its whole process tree (MB).

    Sampled every 50 ms from /proc, because ``ru_maxrss`` is inherited across fork+exec and
    would report the parent's size; the tree sum counts every worker.
    """
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0.0
    sampler_done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampler_done.wait(0.05):
            peak = max(peak, tree_rss_mb(proc.pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    sampler_done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"pretokenize failed:\n{err}")
    return out, peak


def generate_input(source_dir: Path, path: Path, size_mb: float) -> int:
    """Write ``size_mb`` of .jsonl by cycling the source documents; return the byte size."""
    docs = [d for f in list_data_files(source_dir) for d in iter_documents(f)]
    if not docs:
        raise SystemExit(f"no documents in {source_dir}")
    target = int(size_mb * 2**20)
    written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        while written < target:
            for i, doc in enumerate(docs):
                line = (json.dumps({"text": doc, "id": i}, ensure_ascii=False) + "\n").encode()
                f.write(line)
                written += len(line)
                if written >= target:
                    break
    return written


def raw_encode_throughput(tokenizer_dir: Path, path: Path) -> tuple[float, int]:
    """Seconds spent in ``encode_batch_fast`` alone over the file's documents, and the tokens."""
    tok = load_backend_tokenizer(tokenizer_dir)
    tok.encode_special_tokens = True
    seconds, tokens = 0.0, 0
    for batch in batched_documents(iter_documents(path)):
        t0 = time.perf_counter()
        encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
        seconds += time.perf_counter() - t0
        tokens += sum(len(e.ids) for e in encodings) + len(batch)  # + one EOS per document
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer_dir", required=True)
    parser.add_argument("--size_mb", type=float, default=1024)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--source_dir", default=str(ROOT / "data" / "sample" / "pretrain"))
    parser.add_argument("--work_dir", default="/tmp/z2all_bench_pretokenize")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds; medians over rounds are printed"
    )
    args = parser.parse_args()

    work = Path(args.work_dir)
    raw = work / "raw"
    size = generate_input(Path(args.source_dir), raw / "corpus.jsonl", args.size_mb)
    mb = size / 2**20
    print(f"input: {raw / 'corpus.jsonl'} ({mb:.1f} MB), {args.repeats} round(s)", flush=True)

    # Each round times raw encoding and every worker count once, the order rotating per round,
    # so a busy spell on a shared machine does not land on one contestant only.
    contestants = ["raw"] + [int(w) for w in args.workers.split(",")]
    seconds: dict = {c: [] for c in contestants}
    peak_rss: dict = {c: 0.0 for c in contestants}
    token_counts = set()  # raw encoding and every pipeline run must agree
    for r in range(args.repeats):
        k = r % len(contestants)
        for c in contestants[k:] + contestants[:k]:
            if c == "raw":
                s, tokens = raw_encode_throughput(Path(args.tokenizer_dir), raw / "corpus.jsonl")
                seconds[c].append(s)
                token_counts.add(tokens)
                continue
            cmd = [sys.executable, "-c", _CHILD, str(raw), args.tokenizer_dir, str(work / "out")]
            out, rss_mb = run_measured(cmd + [str(c)])
            result = json.loads(out.strip().splitlines()[-1])
            seconds[c].append(result["seconds"])
            peak_rss[c] = max(peak_rss[c], rss_mb)
            token_counts.add(result["tokens"])
    assert len(token_counts) == 1, f"token counts differ: {token_counts}"
    raw_tokens = token_counts.pop()

    raw_s = statistics.median(seconds["raw"])
    print("\n| mode | workers | MB/s | Mtok/s | x raw | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for c in contestants:
        t = statistics.median(seconds[c])
        mode, workers, rss = ("raw encode_batch", "-", "-") if c == "raw" else (
            "pretokenize", str(c), f"{peak_rss[c]:.0f}"
        )
        print(
            f"| {mode} | {workers} | {mb / t:.2f} | {raw_tokens / t / 1e6:.2f} "
            f"| {raw_s / t:.2f} | {rss} |"
        )
    shutil.rmtree(work)

if __name__ == "__main__":
    main()
