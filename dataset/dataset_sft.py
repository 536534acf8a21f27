"""Supervised fine-tuning data: conversations -> (input ids, labels), online or pretokenized.

Sources: every ``.jsonl`` / ``.json`` (array or one object a line) / ``.parquet`` file under a data
directory; each record is one conversation in any format of
:func:`utils.conversation.record_to_messages` (``messages``, ShareGPT ``conversations``, or
``instruction``/``input``/``output``). A malformed record is a :class:`DataError` naming the file
and line: SFT sets are small and curated, so a broken record is a bug to fix, not noise to skip.

Splits: files whose name starts with ``heldout``, ``valid``, ``validation``, ``val``, ``test``,
``eval`` or ``dev`` (then ``.``, ``-`` or ``_``) form the ``valid`` split, the others ``train``.
Without such files, ``valid_ratio`` moves a seeded random subset of the samples to ``valid``.

Tokenized samples (one set per source file)
--------------------------------------------
Each conversation is encoded with :func:`utils.conversation.encode_conversation` to at most
``max_seq_len + 1`` tokens (so ``x = ids[:-1]`` has ``max_seq_len``). Samples without any labelled
token after truncation are dropped and counted. Three flat files hold a file's samples::

    PREFIX.ids.bin    token ids, uint16 when the vocab fits (<= 65536) else uint32
    PREFIX.mask.bin   uint8, 1 where the label is the token itself, 0 where it is -100
    PREFIX.idx        header (magic b"Z2SFTIDX", uint32 version, uint32 0, uint64 n) +
                      int64 [n, 2] rows (offset, length) into the two files above

Labels are ``ids`` where ``mask`` else -100, so -100 is never squeezed into an unsigned dtype,
and the index is per file, so a sample can never be read from another file's tokens.

The same files serve two paths that give identical samples:

- pretokenized: ``python -m data_preprocess.pretokenize_sft_data`` writes them plus
  ``sft_meta.json`` (format version, tokenizer fingerprint, template version, max_seq_len,
  dtype, pad id, one entry per source file) into an output directory; pass that directory as
  ``data_dir`` and it is memory-mapped.
- online: ``data_dir`` holds the raw files; they are tokenized at start-up and cached under
  ``cache_dir`` (default ``$XDG_CACHE_HOME/zero2all/sft``) keyed by the file (path, size, mtime),
  the tokenizer fingerprint, :data:`utils.conversation.TEMPLATE_VERSION` and max_seq_len.

Items and batches
-----------------
Unpacked, item i is ``{"input_ids": x, "labels": y}`` with ``x = ids[:-1]``, ``y = labels[1:]``
(LongTensors of the sample's length - 1 <= max_seq_len). With ``packing=True``, consecutive samples
are packed greedily into rows of at most ``max_seq_len`` tokens; each sample is shifted on its
own (nothing is ever predicted across a boundary), and the item adds ``position_ids`` (restarting
at 0 per sample) and ``doc_ids`` (0, 1, ... per sample in the row). The model must mask attention
where ``doc_ids`` differ, so a sample never attends to another.

:func:`sft_collate` (``dataset.collate``) right-pads items to the longest in the batch (or to
``pad_to``): input ids with the pad id, labels with -100, position ids counting on from 0, doc ids
with one more fresh document id, so padding never shares a document with real tokens. Batch:
``{"input_ids", "labels"[, "position_ids", "doc_ids"]}``, each ``[B, T]`` long.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.conversation import (
    IGNORE_INDEX,
    TEMPLATE_VERSION,
    encode_conversation,
    record_to_messages,
)
from utils.errors import DataError
from utils.logging_utils import get_logger

logger = get_logger(__name__)

SFT_SUFFIXES = (".jsonl", ".json", ".parquet")
HELDOUT_NAMES = frozenset({"heldout", "valid", "validation", "val", "test", "eval", "dev"})
META_NAME = "sft_meta.json"
FORMAT_VERSION = 1
IDX_MAGIC = b"Z2SFTIDX"
_IDX_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, number of samples


# --- reading records --------------------------------------------------------------------------


def list_sft_files(data_dir: str | os.PathLike) -> list[Path]:
    """Every SFT source file under ``data_dir`` (recursive, sorted)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"SFT data directory {str(root)!r} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SFT_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no {'/'.join(SFT_SUFFIXES)} files found")
    return files


def is_heldout(path: str | os.PathLike) -> bool:
    """True for files named like ``heldout.jsonl``, ``valid-00001.parquet``, ``test_zh.json``."""
    first = Path(path).name.lower().replace("-", ".").replace("_", ".").split(".")[0]
    return first in HELDOUT_NAMES


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each record of a file; ``where`` is ``file:line`` / ``file[i]``."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from _iter_parquet(path)
        elif suffix == ".json" and _is_json_array(path):
            yield from _iter_json_array(path)
        else:
            yield from _iter_json_lines(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from e


RECORD_FORMATS = {"conversation": ("messages", "conversations"), "instruction": ("instruction",)}


def check_record_format(data_dir: str | os.PathLike, sft_type: str) -> None:
    """With ``--sft_type=conversation|instruction``, insist every record has that format.

    The dataset itself accepts any mix of formats (``auto``); naming one catches a data directory
    that holds the wrong files before any training time is spent. DataError names file:line.
    """
    if sft_type == "auto":
        return
    keys = RECORD_FORMATS[sft_type]
    for path in list_sft_files(data_dir):
        for where, record in iter_records(path):
            if not isinstance(record, dict) or not any(k in record for k in keys):
                found = sorted(record)[:6] if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{where}: sft_type={sft_type} expects records with "
                    f"{' or '.join(repr(k) for k in keys)}, found {found}; use --sft_type=auto for mixed data"
                )


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[:1] == b"["
    return False


def _iter_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                # removeprefix: a UTF-8 byte order mark, which some editors write first
                yield where, json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{where}: malformed JSON line ({e})") from None


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    import ijson

    with open(path, "rb") as f:
        i = -1
        try:
            for i, record in enumerate(ijson.items(f, "item", use_float=True)):
                yield f"{path}[{i}]", record
        except (ijson.JSONError, UnicodeDecodeError) as e:
            raise DataError(f"{path}[{i + 1}]: malformed JSON array ({e})") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            # Parquet gives every column to every row; drop the ones this row does not use.
            yield f"{path} row {row}", {k: v for k, v in record.items() if v is not None}
            row += 1


# --- tokenized samples ------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class TokenizedSamples:
    """The samples of one source file: flat ``ids`` / ``mask`` arrays + ``index`` [n, 2] int64."""

    ids: np.ndarray
    mask: np.ndarray
    index: np.ndarray
    skipped: int = 0  # conversations dropped for having no labelled token after truncation

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> np.ndarray:
        return self.index[:, 1]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Aligned ``(ids, labels)`` of sample i, int64 arrays; labels -100 where masked."""
        offset, length = (int(v) for v in self.index[i])
        ids = self.ids[offset : offset + length].astype(np.int64)
        labels = np.where(self.mask[offset : offset + length] != 0, ids, IGNORE_INDEX)
        return ids, labels


def tokenize_file(tokenizer: Any, path: Path, max_len: int, dtype: np.dtype) -> TokenizedSamples:
    """Encode every conversation of ``path`` to at most ``max_len`` tokens."""
    ids_parts, mask_parts, lengths, skipped = [], [], [], 0
    for where, record in tqdm(
        iter_records(path), desc=f"tokenize {path.name}", unit=" conv", leave=False
    ):
        messages = record_to_messages(record, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: conversation has no assistant message to train on")
        ids, labels = encode_conversation(tokenizer, messages, max_len=max_len)
        if all(label == IGNORE_INDEX for label in labels[1:]):  # nothing left to predict
            skipped += 1
            continue
        ids_parts.append(np.asarray(ids, dtype=dtype))
        mask_parts.append(np.asarray([label != IGNORE_INDEX for label in labels], dtype=np.uint8))
        lengths.append(len(ids))
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_arr)[:-1]]).astype(np.int64)
    return TokenizedSamples(
        ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=dtype),
        mask=np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=np.uint8),
        index=np.stack([offsets, lengths_arr], axis=1) if lengths else np.zeros((0, 2), np.int64),
        skipped=skipped,
    )


def _atomic_write(path: Path, data: bytes) -> None:
    # A per-process temp name: ranks that fill the same cache at once never share a half file.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_samples(prefix: Path, samples: TokenizedSamples) -> None:
    """Write ``PREFIX.ids.bin``, ``PREFIX.mask.bin`` and (last) ``PREFIX.idx``, each atomically."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(f"{prefix}.ids.bin"), samples.ids.tobytes())
    _atomic_write(Path(f"{prefix}.mask.bin"), samples.mask.tobytes())
    header = _IDX_HEADER.pack(IDX_MAGIC, FORMAT_VERSION, 0, len(samples))
    _atomic_write(Path(f"{prefix}.idx"), header + samples.index.astype("<i8").tobytes())


def read_samples(prefix: Path, dtype: np.dtype) -> TokenizedSamples:
    """Memory-map a sample set written by :func:`write_samples`; DataError if it is inconsistent."""
    idx_path, ids_path, mask_path = (
        Path(f"{prefix}{s}") for s in (".idx", ".ids.bin", ".mask.bin")
    )
    for p in (idx_path, ids_path, mask_path):
        if not p.is_file():
            raise DataError(f"{p}: missing; re-run python -m data_preprocess.pretokenize_sft_data")
    raw = idx_path.read_bytes()
    if len(raw) < _IDX_HEADER.size:
        raise DataError(f"{idx_path}: truncated SFT index")
    magic, version, _, n = _IDX_HEADER.unpack_from(raw)
    if magic != IDX_MAGIC or version != FORMAT_VERSION:
        raise DataError(
            f"{idx_path}: not a zero2all SFT index of version {FORMAT_VERSION} "
            f"(magic {magic!r}, version {version}); re-run the SFT pretokenization"
        )
    if len(raw) != _IDX_HEADER.size + 16 * n:
        raise DataError(
            f"{idx_path}: index holds {len(raw)} bytes, expected {_IDX_HEADER.size + 16 * n}"
        )
    index = np.frombuffer(raw, dtype="<i8", offset=_IDX_HEADER.size).reshape(n, 2).astype(np.int64)
    num_tokens = int(index[-1].sum()) if n else 0
    sizes = (ids_path.stat().st_size, mask_path.stat().st_size)
    if sizes != (num_tokens * dtype.itemsize, num_tokens):
        raise DataError(
            f"{prefix}: token/mask files hold {sizes} bytes but the index describes {num_tokens} "
            "tokens; the files are stale or truncated, re-run the SFT pretokenization"
        )
    empty = num_tokens == 0  # np.memmap refuses empty files
    ids = np.zeros(0, dtype) if empty else np.memmap(ids_path, dtype=dtype, mode="r")
    mask = np.zeros(0, np.uint8) if empty else np.memmap(mask_path, dtype=np.uint8, mode="r")
    return TokenizedSamples(ids=ids, mask=mask, index=index)


def tokenizer_meta(tokenizer_dir: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The loaded tokenizer and the facts every sample file depends on."""
    from tokenizer.tokenization import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(tokenizer_dir)
    return tokenizer, {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir),
        "template_version": TEMPLATE_VERSION,
        "vocab_size": len(tokenizer),
        "dtype": token_dtype(len(tokenizer)).name,
        "pad_id": tokenizer.pad_token_id,
    }


def source_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zero2all" / "sft"


def _online_samples(
    files: list[Path], tokenizer_dir: str | os.PathLike, max_seq_len: int, cache_dir: Path
) -> tuple[list[TokenizedSamples], dict[str, Any]]:
    """Tokenize (or load from the cache) every file; cache key = file stamp + tokenizer + template."""
    tokenizer, meta = tokenizer_meta(tokenizer_dir)
    dtype = np.dtype(meta["dtype"])
    parts = []
    for path in files:
        key_src = [str(path.resolve()), source_stamp(path), meta, max_seq_len, FORMAT_VERSION]
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
        prefix = cache_dir / f"{path.stem}-{key}"
        try:
            samples = read_samples(prefix, dtype)
            logger.info("%s: %d SFT samples from cache %s", path, len(samples), prefix)
        except DataError:
            samples = tokenize_file(tokenizer, path, max_seq_len + 1, dtype)
            write_samples(prefix, samples)
            logger.info(
                "%s: tokenized %d SFT samples (%d skipped: no label left after "
                "truncation), cached at %s",
                path,
                len(samples),
                samples.skipped,
                prefix,
            )
        parts.append(samples)
    return parts, meta


def _pretokenized_samples(
    data_dir: Path, tokenizer_dir: str | os.PathLike | None, max_seq_len: int
) -> tuple[list[Path], list[TokenizedSamples], dict[str, Any]]:
    meta_path = data_dir / META_NAME
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: unreadable SFT metadata ({e})") from e
    if (
        meta.get("format_version") != FORMAT_VERSION
        or meta.get("template_version") != TEMPLATE_VERSION
    ):
        raise DataError(
            f"{meta_path}: written with SFT format {meta.get('format_version')} / template "
            f"{meta.get('template_version')}, this code reads {FORMAT_VERSION} / {TEMPLATE_VERSION}; "
            "re-run python -m data_preprocess.pretokenize_sft_data"
        )
    if meta.get("max_seq_len") != max_seq_len:
        raise DataError(
            f"{meta_path}: pretokenized for max_seq_len={meta.get('max_seq_len')}, but "
            f"max_seq_len={max_seq_len}; re-run python -m data_preprocess.pretokenize_sft_data "
            f"--max_seq_len={max_seq_len}"
        )
    if tokenizer_dir is not None:
        from tokenizer.tokenization import tokenizer_fingerprint

        if tokenizer_fingerprint(tokenizer_dir) != meta["tokenizer_fingerprint"]:
            raise DataError(f"{meta_path}: tokenized with another tokenizer than {tokenizer_dir}")
    dtype = np.dtype(meta["dtype"])
    files = [Path(entry["source"]) for entry in meta["files"]]
    parts = [read_samples(data_dir / entry["prefix"], dtype) for entry in meta["files"]]
    return files, parts, meta


# --- packing and collation --------------------------------------------------------------------


def pack_greedy(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group consecutive samples into rows whose total length is <= capacity (order kept).

    Example: lengths [3, 4, 2, 5], capacity 6 -> [[0], [1, 2], [3]].
    """
    packs: list[list[int]] = []
    used = capacity + 1
    for i, n in enumerate(lengths):
        assert n <= capacity, (i, n, capacity)
        if used + n > capacity:
            packs.append([])
            used = 0
        packs[-1].append(i)
        used += n
    return packs


def sft_collate(
    items: list[dict[str, torch.Tensor]], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a list of items into ``[B, T]`` long tensors (see the module docstring)."""
    T = max(len(item["input_ids"]) for item in items)
    T = max(T, pad_to or 0)
    batch = {key: torch.empty(len(items), T, dtype=torch.long) for key in items[0]}
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        for key, value in item.items():
            batch[key][b, :n] = value
        batch["input_ids"][b, n:] = pad_id
        batch["labels"][b, n:] = IGNORE_INDEX
        if "position_ids" in batch:
            batch["position_ids"][b, n:] = torch.arange(T - n)
        if "doc_ids" in batch:
            batch["doc_ids"][b, n:] = (int(item["doc_ids"][-1]) + 1) if n else 0
    return batch


# --- the dataset ------------------------------------------------------------------------------


class SFTDataset(Dataset):
    """SFT samples of one split; online or pretokenized (see the module docstring).

    Args:
        data_dir: raw SFT files, or an output directory of ``pretokenize_sft_data`` (detected by
            its ``sft_meta.json``).
        max_seq_len: model sequence length; items hold at most this many tokens.
        split: ``"train"`` or ``"valid"``.
        tokenizer_dir: needed for raw files; for pretokenized data it is optional and, when
            given, must match the fingerprint the data was made with.
        packing: pack several samples per row (items gain ``position_ids`` and ``doc_ids``).
        cache_dir: where online tokenization is cached (default :func:`default_cache_dir`).
        valid_ratio, seed: random ``valid`` subset when no held-out files exist.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        max_seq_len: int,
        split: str = "train",
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        packing: bool = False,
        cache_dir: str | os.PathLike | None = None,
        valid_ratio: float = 0.0,
        seed: int = 1337,
    ) -> None:
        data_dir = Path(data_dir)
        if (data_dir / META_NAME).is_file():
            files, self.parts, meta = _pretokenized_samples(data_dir, tokenizer_dir, max_seq_len)
        else:
            if tokenizer_dir is None:
                raise DataError(f"{data_dir}: raw SFT data needs tokenizer_dir to be tokenized")
            files = list_sft_files(data_dir)
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            self.parts, meta = _online_samples(files, tokenizer_dir, max_seq_len, cache)
        self.pad_id: int = meta["pad_id"]
        self.max_seq_len = max_seq_len
        self.packing = packing
        self.samples = split_samples(files, [len(p) for p in self.parts], split, valid_ratio, seed)
        if not self.samples:
            raise DataError(
                f"{data_dir}: the SFT {split!r} split is empty (held-out files are named "
                f"heldout*/valid*/test*...; or set valid_ratio > 0)"
            )
        lengths = [int(self.parts[f].index[s, 1]) - 1 for f, s in self.samples]
        self.packs = pack_greedy(lengths, max_seq_len) if packing else None
        logger.info(
            "SFT %s split: %d samples, %d tokens%s",
            split,
            len(self.samples),
            sum(lengths),
            f", packed into {len(self.packs)} rows" if packing else "",
        )

    def __len__(self) -> int:
        return len(self.packs) if self.packs is not None else len(self.samples)

    def sample(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Aligned, unshifted ``(ids, labels)`` of the split's j-th conversation."""
        f, s = self.samples[j]
        return self.parts[f].sample(s)

    def _shifted(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = self.sample(j)
        return torch.from_numpy(ids[:-1]), torch.from_numpy(labels[1:])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.packs is None:
            x, y = self._shifted(i)
            return {"input_ids": x, "labels": y}
        pieces = [self._shifted(j) for j in self.packs[i]]
        return {
            "input_ids": torch.cat([x for x, _ in pieces]),
            "labels": torch.cat([y for _, y in pieces]),
            "position_ids": torch.cat([torch.arange(len(x)) for x, _ in pieces]),
            "doc_ids": torch.cat([torch.full((len(x),), d) for d, (x, _) in enumerate(pieces)]),
        }

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """:func:`sft_collate` with this dataset's pad id (use as a DataLoader ``collate_fn``)."""
        return sft_collate(items, self.pad_id)


def split_samples(
    files: list[Path], counts: list[int], split: str, valid_ratio: float, seed: int
) -> list[tuple[int, int]]:
    """``(file number, sample number)`` of every sample in ``split``, in file order.

    Held-out files (:func:`is_heldout`) make up ``valid``; without any, a seeded random
    ``valid_ratio`` share of all samples does. Shared with the DPO dataset.
    """
    if split not in ("train", "valid"):
        raise DataError(f"split must be 'train' or 'valid', got {split!r}")
    heldout = [is_heldout(p) for p in files]
    if any(heldout):
        return [
            (f, s)
            for f, n in enumerate(counts)
            if heldout[f] == (split == "valid")
            for s in range(n)
        ]
    everything = [(f, s) for f, n in enumerate(counts) for s in range(n)]
    num_valid = round(valid_ratio * len(everything))
    in_valid = np.zeros(len(everything), dtype=bool)
    in_valid[np.random.default_rng(seed).permutation(len(everything))[:num_valid]] = True
    return [pos for pos, v in zip(everything, in_valid) if v == (split == "valid")]
