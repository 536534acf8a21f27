"""Streaming document readers for raw text corpora: .txt, .jsonl, .json and .parquet.

Every reader yields plain ``str`` documents one at a time, so peak memory does not depend on the
file size: JSON arrays are parsed with ``ijson``, parquet files with pyarrow's ``iter_batches``,
line formats line by line in binary mode.

Bad records never stop a read. They are skipped and counted in :class:`ReadStats` under a
reason (``bad_json``, ``bad_field``, ``empty``, ``bad_utf8``, ``not_object``), so a caller can
print one summary at the end. A file that cannot be opened or parsed at all is a
:class:`~utils.errors.DataError` naming the file.

Formats
-------
- ``.txt``: one document per paragraph; paragraphs are separated by one or more blank lines.
- ``.jsonl``: one JSON object per line.
- ``.json``: a JSON array of objects, or one object per line (told apart by the first byte).
- ``.parquet``: one row per document.

Text field: ``text_field`` when given; otherwise ``text``, then ``content``. Records in the
original llm-zero2all layout (``title``, ``desc``, ``content``) are joined as
``title\\ndesc\\ncontent``, skipping empty parts, so no field's text is lost.

Byte ranges (parallel reading of one large file)
------------------------------------------------
``iter_documents(path, byte_range=(start, end))`` reads only the records whose first byte lies in
``[start, end)``; for parquet the range is in row groups instead of bytes. Splitting a file with
:func:`split_ranges` and reading the ranges in order yields exactly the documents of a whole read,
in the same order.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
DEFAULT_TEXT_FIELDS = ("text", "content")


@dataclass
class ReadStats:
    """Counts of documents read and records skipped, by reason; mergeable across workers."""

    docs: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def merge(self, other: "ReadStats") -> None:
        self.docs += other.docs
        self.bytes += other.bytes
        self.skipped.update(other.skipped)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.docs} documents read, {self.num_skipped} records skipped ({reasons})"


def list_data_files(data_dir: str | os.PathLike) -> list[Path]:
    """All supported files under ``data_dir`` (recursive), sorted for a deterministic order."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} does not exist or is not a directory")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
    )
    return files


def extract_text(record: Any, text_field: str | None) -> str | None:
    """The document text of one JSON/parquet record, or None when it has no usable text field."""
    if not isinstance(record, dict):
        return None
    if text_field is not None:
        value = record.get(text_field)
        return value if isinstance(value, str) else None
    for name in DEFAULT_TEXT_FIELDS:
        if name in record:
            if name == "content" and ("title" in record or "desc" in record):
                parts = [record.get(k) for k in ("title", "desc", "content")]
                if not all(p is None or isinstance(p, str) for p in parts):
                    return None
                return "\n".join(p for p in parts if p)
            value = record[name]
            return value if isinstance(value, str) else None
    return None


def split_ranges(path: str | os.PathLike, num_chunks: int) -> list[tuple[int, int]]:
    """Split a file into ``num_chunks`` contiguous ranges for :func:`iter_documents`.

    Byte ranges for line formats; row-group ranges for parquet. JSON arrays cannot be split
    (a record's boundaries are unknown without parsing) and come back as one range.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        total = pq.ParquetFile(path).metadata.num_row_groups
    elif path.suffix.lower() == ".json" and _first_byte(path) == b"[":
        return [(0, path.stat().st_size)]
    else:
        total = path.stat().st_size
    num_chunks = max(1, min(num_chunks, total))
    bounds = [total * i // num_chunks for i in range(num_chunks + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_chunks) if bounds[i] < bounds[i + 1]]


def iter_documents(
    path: str | os.PathLike,
    text_field: str | None = None,
    stats: ReadStats | None = None,
    byte_range: tuple[int, int] | None = None,
) -> Iterator[str]:
    """Yield the documents of one file in order, skipping (and counting) bad records."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {SUPPORTED_SUFFIXES}")
    try:
        if suffix == ".parquet":
            yield from _iter_parquet(path, text_field, stats, byte_range)
        elif suffix == ".txt":
            yield from _iter_txt(path, stats, byte_range)
        elif suffix == ".json" and _first_byte(path) == b"[":
            yield from _iter_json_array(path, text_field, stats)
        else:
            yield from _iter_jsonl(path, text_field, stats, byte_range)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from e


def _first_byte(path: Path) -> bytes:
    """The first non-whitespace byte of a file (b'' for an empty file)."""
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _iter_lines(path: Path, byte_range: tuple[int, int] | None) -> Iterator[bytes]:
    """Lines (with their newline) whose first byte lies in ``byte_range``."""
    start, end = byte_range if byte_range is not None else (0, None)
    with open(path, "rb") as f:
        if start > 0:
            # The line that contains byte start-1 belongs to the previous range.
            f.seek(start - 1)
            f.readline()
        pos = f.tell()
        while end is None or pos < end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            yield line


def _accept(text: str | None, stats: ReadStats, reason_if_none: str) -> str | None:
    if text is None:
        stats.skip(reason_if_none)
        return None
    if not text.strip():
        stats.skip("empty")
        return None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape: not Unicode text
        stats.skip("bad_utf8")
        return None
    stats.docs += 1
    stats.bytes += size
    return text


def _iter_jsonl(
    path: Path, text_field: str | None, stats: ReadStats, byte_range: tuple[int, int] | None
) -> Iterator[str]:
    for raw in _iter_lines(path, byte_range):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("bad_utf8")
            continue
        try:
            record = json.loads(line.removeprefix("\ufeff"))  # a UTF-8 BOM (editors write one)
        except json.JSONDecodeError:
            stats.skip("bad_json")
            continue
        if not isinstance(record, dict):
            stats.skip("not_object")
            continue
        text = _accept(extract_text(record, text_field), stats, "bad_field")
        if text is not None:
            yield text


def _iter_txt(path: Path, stats: ReadStats, byte_range: tuple[int, int] | None) -> Iterator[str]:
    """Paragraphs separated by blank lines. With a byte range, a paragraph belongs to the range
    that holds the first byte of its first line (it may read past the range's end)."""
    start, end = byte_range if byte_range is not None else (0, None)
    paragraph: list[bytes] = []

    def flush() -> Iterator[str]:
        raw = b"".join(paragraph).rstrip(b"\r\n")
        paragraph.clear()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("bad_utf8")
            return
        accepted = _accept(text, stats, "empty")
        if accepted is not None:
            yield accepted

    with open(path, "rb") as f:
        pos = 0
        if start > 0:
            f.seek(start - 1)
            f.readline()  # to the first line that starts at or after `start`
            pos = f.tell()
            if not _prev_line_blank(f, pos):
                # That line continues a paragraph owned by the previous range: skip it.
                while (line := f.readline()) and line.strip():
                    pos += len(line)
                pos = f.tell()
        for line in iter(f.readline, b""):
            line_start, pos = pos, pos + len(line)
            if not line.strip():
                if paragraph:
                    yield from flush()
                continue
            if not paragraph and end is not None and line_start >= end:
                break
            paragraph.append(line)
        if paragraph:
            yield from flush()


def _prev_line_blank(f, line_start: int) -> bool:
    """True when the line that ends just before ``line_start`` is blank (or there is none)."""
    pos = line_start - 1  # the newline that ends the previous line
    while pos > 0:
        block_start = max(0, pos - 4096)
        f.seek(block_start)
        block = f.read(pos - block_start)
        for byte in reversed(block):
            if byte == 0x0A:
                f.seek(line_start)
                return True
            if byte not in b" \t\r\x0b\x0c":  # the bytes that bytes.strip() strips
                f.seek(line_start)
                return False
        pos = block_start
    f.seek(line_start)
    return True


def _iter_json_array(path: Path, text_field: str | None, stats: ReadStats) -> Iterator[str]:
    import ijson

    with open(path, "rb") as f:
        try:
            for record in ijson.items(f, "item"):
                if not isinstance(record, dict):
                    stats.skip("not_object")
                    continue
                text = _accept(extract_text(record, text_field), stats, "bad_field")
                if text is not None:
                    yield text
        except (ijson.JSONError, UnicodeDecodeError) as e:
            # A JSON array cannot be resynchronised after a syntax error: the rest is lost.
            stats.skip("bad_json")
            raise DataError(
                f"{path}: malformed JSON array after {stats.docs} documents ({e}); "
                "fix the file or convert it to .jsonl so bad lines can be skipped"
            ) from e


def _iter_parquet(
    path: Path, text_field: str | None, stats: ReadStats, row_group_range: tuple[int, int] | None
) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    names = pf.schema_arrow.names
    if text_field is not None:
        columns = [text_field] if text_field in names else []
    elif "text" in names:
        columns = ["text"]
    else:
        columns = [c for c in ("title", "desc", "content") if c in names]
    if not columns:
        wanted = text_field or "text or content"
        raise DataError(f"{path}: no column {wanted!r}; columns are {names}")
    start, end = row_group_range if row_group_range is not None else (0, pf.num_row_groups)
    groups = list(range(start, end))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=columns):
        for record in batch.to_pylist():
            text = _accept(extract_text(record, text_field), stats, "bad_field")
            if text is not None:
                yield text
