"""Build the pretraining sample index over a directory of ``.bin`` token files.

    python -m data_preprocess.build_pretrain_sample_index_map --data_dir=DIR --max_seq_len=N

The token stream is the concatenation of every ``.bin`` under ``DIR`` (recursive, sorted by
relative path). Sample ``i`` is the window of ``N + 1`` tokens starting at global offset ``i * N``:
inputs are its first ``N`` tokens, targets its last ``N``. Consecutive samples share exactly one
token, so every token after the first is a target exactly once per epoch. A window may cross
from one file into the next; the last incomplete window is dropped.

Worked example (``N = 4``; files of 7, 0 and 6 tokens; ``docs/data_format.md`` has more)::

    cumulative offsets   [0, 7, 7, 13]           file f holds global tokens [cum[f], cum[f+1])
    num_samples          (13 - 1) // 4 = 3
    starts               [0, 4, 8]               sample 1 = global tokens 4..8
                                                 = file0[4:7] + file2[0:2]
    locate(8)            (file 2, offset 1)      the empty file 1 is skipped

The index file ``DIR/pretrain_index_seq{N}.idx`` has a header (magic, version, seq len, the
files with their sizes and token counts) and the sample starts as int64 global offsets. Readers
compare the header with the files on disk, so a stale index is an error, never silent garbage.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_preprocess.token_file import (
    BIN_SUFFIX,
    TokenFileMeta,
    atomic_rename,
    check_bin_size,
    read_meta,
    tmp_path,
)
from utils.errors import DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

INDEX_MAGIC = b"Z2ALLIDX"
INDEX_VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header length in bytes
_ALIGN = 8
BUILD_HINT = "rebuild it with `python -m data_preprocess.build_pretrain_sample_index_map`"


# ---------------------------------------------------------------------------------------------
# Index maths: pure functions of token counts, tested without any file.


def num_samples_for(num_tokens: int, max_seq_len: int) -> int:
    """How many ``max_seq_len + 1`` windows with stride ``max_seq_len`` fit in the stream."""
    assert max_seq_len > 0, max_seq_len
    return max(0, (num_tokens - 1) // max_seq_len)


def sample_starts(sample_ids: np.ndarray | int, max_seq_len: int) -> np.ndarray | int:
    """Global offset of each sample's first token: sample i starts at ``i * max_seq_len``."""
    return sample_ids * max_seq_len


def cumulative_offsets(token_counts: list[int]) -> np.ndarray:
    """int64 ``[0, n0, n0+n1, ...]`` (length F+1): file f holds global tokens [cum[f], cum[f+1])."""
    return np.concatenate([[0], np.cumsum(np.asarray(token_counts, dtype=np.int64))]).astype(
        np.int64
    )


def locate(global_offset: int, cum: np.ndarray) -> tuple[int, int]:
    """``(file id, offset in that file)`` of a global token offset; empty files are skipped."""
    assert 0 <= global_offset < cum[-1], (global_offset, int(cum[-1]))
    file_id = int(np.searchsorted(cum, global_offset, side="right")) - 1
    return file_id, int(global_offset - cum[file_id])


def window_pieces(start: int, length: int, cum: np.ndarray) -> list[tuple[int, int, int]]:
    """The ``(file id, lo, hi)`` slices that make up global tokens ``[start, start + length)``."""
    assert length > 0 and start + length <= cum[-1], (start, length, int(cum[-1]))
    pieces = []
    file_id, lo = locate(start, cum)
    remaining = length
    while remaining > 0:
        take = min(remaining, int(cum[file_id + 1] - cum[file_id]) - lo)
        if take > 0:
            pieces.append((file_id, lo, lo + take))
            remaining -= take
        file_id, lo = file_id + 1, 0
    return pieces


# ---------------------------------------------------------------------------------------------
# The token files of a directory.


@dataclass
class TokenCorpus:
    """The validated ``.bin`` files of a data directory, in stream order."""

    data_dir: Path
    files: list[str]  # relative posix paths
    metas: list[TokenFileMeta]

    @property
    def cum(self) -> np.ndarray:
        return cumulative_offsets([m.num_tokens for m in self.metas])

    @property
    def num_tokens(self) -> int:
        return sum(m.num_tokens for m in self.metas)

    def path(self, file_id: int) -> Path:
        return self.data_dir / self.files[file_id]


def list_token_files(data_dir: str | os.PathLike) -> list[str]:
    """Relative posix paths of all ``.bin`` files under ``data_dir``, sorted (the stream order)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} does not exist or is not a directory")
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*" + BIN_SUFFIX) if p.is_file()
    )


def load_token_corpus(data_dir: str | os.PathLike) -> TokenCorpus:
    """Read and cross-check the sidecars of every ``.bin``: one tokenizer, one dtype, full files."""
    root = Path(data_dir)
    files = list_token_files(root)
    if not files:
        raise DataError(
            f"{root}: no .bin token files; run `python -m "
            "data_preprocess.pretokenize_pretrain_data` and point --data_dir at its output "
            "directory"
        )
    metas = []
    for rel in files:
        meta = read_meta(root / rel)
        check_bin_size(root / rel, meta)
        first = metas[0] if metas else meta
        for key in ("tokenizer_fingerprint", "vocab_size", "dtype"):
            if getattr(meta, key) != getattr(first, key):
                raise DataError(
                    f"{root / rel}: {key} {getattr(meta, key)!r} differs from "
                    f"{getattr(first, key)!r} of {root / files[0]}: the files were made with "
                    "different tokenizers; re-tokenize them with one tokenizer"
                )
        metas.append(meta)
    return TokenCorpus(root, files, metas)


# ---------------------------------------------------------------------------------------------
# The index file.


def index_path(data_dir: str | os.PathLike, max_seq_len: int) -> Path:
    return Path(data_dir) / f"pretrain_index_seq{max_seq_len}.idx"


def _header_for(corpus: TokenCorpus, max_seq_len: int) -> dict[str, Any]:
    return {
        "max_seq_len": max_seq_len,
        "num_tokens": corpus.num_tokens,
        "num_samples": num_samples_for(corpus.num_tokens, max_seq_len),
        "dtype": corpus.metas[0].dtype,
        "vocab_size": corpus.metas[0].vocab_size,
        "tokenizer_fingerprint": corpus.metas[0].tokenizer_fingerprint,
        "files": [
            {"path": rel, "num_tokens": m.num_tokens, "size_bytes": m.num_bytes}
            for rel, m in zip(corpus.files, corpus.metas)
        ],
    }


def build_index(data_dir: str | os.PathLike, max_seq_len: int) -> Path:
    """Write ``pretrain_index_seq{max_seq_len}.idx`` in ``data_dir`` atomically; return its path."""
    if max_seq_len <= 0:
        raise DataError(f"--max_seq_len must be positive, got {max_seq_len}")
    corpus = load_token_corpus(data_dir)
    header = _header_for(corpus, max_seq_len)
    if header["num_samples"] == 0:
        raise DataError(
            f"{data_dir}: {corpus.num_tokens} tokens are too few for one sample of "
            f"max_seq_len + 1 = {max_seq_len + 1} tokens"
        )
    blob = json.dumps(header, sort_keys=True).encode("utf-8")
    blob += b" " * (-(_PREFIX.size + len(blob)) % _ALIGN)  # so the int64 array is aligned
    final = index_path(data_dir, max_seq_len)
    tmp = tmp_path(final)
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(INDEX_MAGIC, INDEX_VERSION, len(blob)))
        f.write(blob)
        chunk = 1 << 20
        for lo in range(0, header["num_samples"], chunk):
            hi = min(lo + chunk, header["num_samples"])
            starts = sample_starts(np.arange(lo, hi, dtype=np.int64), max_seq_len)
            f.write(starts.astype("<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())
    atomic_rename(tmp, final)
    logger.info(
        "%s: %d samples of %d+1 tokens over %d tokens in %d files",
        final,
        header["num_samples"],
        max_seq_len,
        corpus.num_tokens,
        len(corpus.files),
    )
    return final


@dataclass
class SampleIndex:
    """A validated index: its header, the token corpus it was built over and the sample starts."""

    header: dict[str, Any]
    corpus: TokenCorpus
    starts: np.ndarray  # int64 [num_samples], memmap: global offset of each sample's first token

    @property
    def max_seq_len(self) -> int:
        return self.header["max_seq_len"]

    def __len__(self) -> int:
        return len(self.starts)


def read_index(data_dir: str | os.PathLike, max_seq_len: int) -> SampleIndex:
    """Open and validate the index of ``data_dir`` for ``max_seq_len`` against the files on disk."""
    path = index_path(data_dir, max_seq_len)
    if not path.is_file():
        others = sorted(p.name for p in Path(data_dir).glob("pretrain_index_seq*.idx"))
        found = f" (found {', '.join(others)})" if others else ""
        raise DataError(
            f"{path}: no sample index for max_seq_len={max_seq_len}{found}; build it "
            f"with `python -m data_preprocess.build_pretrain_sample_index_map "
            f"--data_dir={data_dir} --max_seq_len={max_seq_len}`"
        )
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:8] != INDEX_MAGIC:
            raise DataError(f"{path}: not a zero2all sample index (bad magic); {BUILD_HINT}")
        _, version, header_len = _PREFIX.unpack(prefix)
        if version != INDEX_VERSION:
            raise DataError(
                f"{path}: index version {version}, expected {INDEX_VERSION}; {BUILD_HINT}"
            )
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: corrupt index header ({e}); {BUILD_HINT}") from e
    if header.get("max_seq_len") != max_seq_len:
        raise DataError(
            f"{path}: built for max_seq_len={header.get('max_seq_len')}, "
            f"requested {max_seq_len}; {BUILD_HINT}"
        )
    corpus = load_token_corpus(data_dir)
    if _header_for(corpus, max_seq_len) != header:
        raise DataError(f"{path}: stale index: {_describe_change(header, corpus)}; {BUILD_HINT}")
    offset = _PREFIX.size + header_len
    num_samples = header["num_samples"]
    if path.stat().st_size != offset + 8 * num_samples:
        raise DataError(
            f"{path}: truncated index ({path.stat().st_size} bytes, expected "
            f"{offset + 8 * num_samples}); {BUILD_HINT}"
        )
    starts = np.memmap(path, dtype="<i8", mode="r", offset=offset, shape=(num_samples,))
    assert starts[-1] + max_seq_len + 1 <= corpus.num_tokens, (int(starts[-1]), corpus.num_tokens)
    return SampleIndex(header, corpus, starts)


def _describe_change(header: dict[str, Any], corpus: TokenCorpus) -> str:
    """A human-readable reason why an index header no longer matches the files on disk."""
    indexed = {f["path"]: f for f in header.get("files", [])}
    for rel, meta in zip(corpus.files, corpus.metas):
        if rel not in indexed:
            return f"{rel} is not in the index"
        if (
            indexed[rel]["size_bytes"] != meta.num_bytes
            or indexed[rel]["num_tokens"] != meta.num_tokens
        ):
            return (
                f"{rel} changed ({indexed[rel]['size_bytes']} -> {meta.num_bytes} bytes, "
                f"{indexed[rel]['num_tokens']} -> {meta.num_tokens} tokens)"
            )
    missing = sorted(set(indexed) - set(corpus.files))
    if missing:
        return f"{missing[0]} is in the index but no longer on disk"
    return "the tokenizer or dtype of the token files changed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="directory of .bin token files")
    parser.add_argument("--max_seq_len", type=int, required=True, help="tokens per sample input")
    args = parser.parse_args(argv)
    setup_logging()
    build_index(args.data_dir, args.max_seq_len)


if __name__ == "__main__":
    run_cli(main)
