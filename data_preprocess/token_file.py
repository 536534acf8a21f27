"""The pretokenized token file: a flat ``.bin`` of token ids plus a JSON ``.bin.meta`` sidecar.

Every reader and writer of pretraining tokens goes through this module, so the format lives in
one place (documented with an example in ``docs/data_format.md``).

``NAME.bin``
    Token ids, little-endian, no header: ``uint16`` when the vocabulary has at most 65536 ids,
    else ``uint32`` (so a vocabulary >= 65536 can never wrap around). Documents are concatenated
    in input order, each followed by EOS (and preceded by BOS when pretokenized with
    ``--add_bos``).

``NAME.bin.meta``
    A JSON object (:class:`TokenFileMeta`): magic + format version, dtype, vocab size, special
    ids, token and document counts, the tokenizer fingerprint and the source file's size and
    mtime. The sidecar is written last and atomically, so it is the completion marker: a ``.bin``
    without a valid sidecar is an unfinished write and is never read. The sidecar's suffix is
    not ``.json`` on purpose, so a data reader never mistakes it for a corpus file.

Writes are atomic: data goes to ``NAME.tmp`` first, is fsync'ed, then renamed over the target.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DataError

TOKEN_FILE_MAGIC = "zero2all-tokens"
TOKEN_FILE_VERSION = 1
BIN_SUFFIX = ".bin"
META_SUFFIX = ".meta"
TMP_SUFFIX = ".tmp"


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype for a vocabulary of ``vocab_size``: uint16 if it fits, else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocabulary size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def meta_path(bin_path: str | os.PathLike) -> Path:
    """``NAME.bin`` -> ``NAME.bin.meta``."""
    bin_path = Path(bin_path)
    return bin_path.with_name(bin_path.name + META_SUFFIX)


def tmp_path(path: str | os.PathLike, tag: str = "") -> Path:
    """The scratch name a file is written under before its atomic rename (``NAME[.tag].tmp``)."""
    path = Path(path)
    return path.with_name(path.name + (f".{tag}" if tag else "") + TMP_SUFFIX)


@dataclass
class TokenFileMeta:
    """Everything a reader must know about one ``.bin`` (the sidecar's content).

    ``source`` describes the raw input: ``{"path": relative path, "size": bytes,
    "mtime_ns": int, "data_dir": absolute input directory}``; an output is up to date when path,
    size, mtime and the tokenizer fingerprint match (``data_dir`` tells which run owns it).
    ``skipped`` counts bad input records by reason (see ``data.readers.ReadStats``).
    """

    dtype: str
    vocab_size: int
    num_tokens: int
    num_documents: int
    tokenizer_fingerprint: str
    special_ids: dict[str, int]
    add_bos: bool
    text_field: str | None
    source: dict[str, Any]
    skipped: dict[str, int] = field(default_factory=dict)
    magic: str = TOKEN_FILE_MAGIC
    format_version: int = TOKEN_FILE_VERSION

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def num_bytes(self) -> int:
        """Expected size of the ``.bin`` in bytes."""
        return self.num_tokens * self.np_dtype.itemsize


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_rename(tmp: Path, final: Path) -> None:
    """Rename a finished, fsync'ed scratch file over ``final`` and fsync the directory."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_meta(bin_path: str | os.PathLike, meta: TokenFileMeta) -> None:
    """Write the sidecar of ``bin_path`` atomically (call after the ``.bin`` is in place)."""
    final = meta_path(bin_path)
    tmp = tmp_path(final)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(meta), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    atomic_rename(tmp, final)


def read_meta(bin_path: str | os.PathLike) -> TokenFileMeta:
    """Parse and check the sidecar of ``bin_path``; a missing or foreign sidecar is a DataError."""
    path = meta_path(bin_path)
    hint = "re-run `python -m data_preprocess.pretokenize_pretrain_data` for its source"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{bin_path}: no metadata sidecar {path.name} (an unfinished or foreign token "
            f"file); {hint}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable token-file metadata ({e}); {hint}") from e
    if not isinstance(raw, dict) or raw.get("magic") != TOKEN_FILE_MAGIC:
        raise DataError(
            f"{path}: not a zero2all token-file sidecar (magic {TOKEN_FILE_MAGIC!r} missing)"
        )
    if raw.get("format_version") != TOKEN_FILE_VERSION:
        raise DataError(
            f"{path}: token-file format version {raw.get('format_version')!r}, this code reads "
            f"version {TOKEN_FILE_VERSION}; {hint} with --overwrite"
        )
    try:
        meta = TokenFileMeta(**raw)
    except TypeError as e:
        raise DataError(f"{path}: malformed token-file metadata ({e}); {hint}") from e
    if meta.np_dtype != token_dtype(meta.vocab_size):
        raise DataError(f"{path}: dtype {meta.dtype} does not fit vocab size {meta.vocab_size}")
    return meta


def check_bin_size(bin_path: str | os.PathLike, meta: TokenFileMeta) -> None:
    """A ``.bin`` whose size differs from its sidecar's token count is truncated or replaced."""
    try:
        size = Path(bin_path).stat().st_size
    except FileNotFoundError:
        raise DataError(f"{bin_path}: token file missing (its sidecar exists)") from None
    if size != meta.num_bytes:
        raise DataError(
            f"{bin_path}: {size} bytes on disk but its sidecar says {meta.num_tokens} tokens of "
            f"{meta.dtype} ({meta.num_bytes} bytes): the file is truncated or was replaced; "
            "re-run pretokenization with --overwrite"
        )


def open_tokens(bin_path: str | os.PathLike, meta: TokenFileMeta | None = None) -> np.ndarray:
    """Read-only memmap of a validated ``.bin`` (1-D, the sidecar's dtype; no data is loaded)."""
    meta = read_meta(bin_path) if meta is None else meta
    check_bin_size(bin_path, meta)
    if meta.num_tokens == 0:
        return np.empty(0, dtype=meta.np_dtype)  # np.memmap refuses empty files
    return np.memmap(bin_path, dtype=meta.np_dtype, mode="r", shape=(meta.num_tokens,))


class TokenWriter:
    """Append-only writer of token ids to a scratch file, fsync'ed on :meth:`close`.

    The caller renames the scratch file into place (:func:`atomic_rename`) and writes the
    sidecar afterwards; an exception leaves only the scratch file, which the next run overwrites.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.num_tokens = 0
        self._file = open(self.path, "wb")

    def write(self, ids: np.ndarray) -> None:
        assert ids.dtype == self.dtype, (ids.dtype, self.dtype)
        self._file.write(ids.tobytes())
        self.num_tokens += ids.size

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close and delete the scratch file (used on error, so no partial output remains)."""
        self._file.close()
        self.path.unlink(missing_ok=True)


def write_token_file(bin_path: str | os.PathLike, ids: np.ndarray, meta: TokenFileMeta) -> None:
    """Write a whole ``.bin`` + sidecar at once, atomically (tests, benchmarks, small outputs).

    ``meta.num_tokens`` and ``meta.dtype`` must describe ``ids``.
    """
    assert ids.ndim == 1 and ids.dtype == meta.np_dtype and ids.size == meta.num_tokens, (
        ids.shape,
        ids.dtype,
        meta.dtype,
        meta.num_tokens,
    )
    bin_path = Path(bin_path)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path(bin_path).unlink(missing_ok=True)  # the old completion marker goes first
    writer = TokenWriter(tmp_path(bin_path), meta.np_dtype)
    writer.write(ids)
    writer.close()
    atomic_rename(writer.path, bin_path)
    write_meta(bin_path, meta)
