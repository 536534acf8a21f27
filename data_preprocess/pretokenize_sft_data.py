"""Pretokenize SFT conversations into memory-mappable ids + label masks + a per-file index.

    python -m data_preprocess.pretokenize_sft_data --data_dir=DIR --tokenizer_dir=DIR \\
        --max_seq_len=N [--out_dir=DIR] [--overwrite]

For every ``.jsonl`` / ``.json`` / ``.parquet`` file under ``data_dir`` (path ``REL``), writes
``out_dir/REL.ids.bin``, ``REL.mask.bin`` and ``REL.idx`` (format: ``dataset/dataset_sft.py``) and,
last, ``out_dir/sft_meta.json``. Pass ``out_dir`` as ``data_dir`` to ``SFTDataset`` (or to
``train.py --task_type=sft``); held-out files keep their names, so the train/valid split is the
same as on the raw data. An up-to-date output (same sources, tokenizer, template, max_seq_len) is
left alone unless ``--overwrite``. Default ``out_dir``: ``DATA_DIR_pretok`` next to ``data_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dataset.dataset_sft import (
    FORMAT_VERSION,
    META_NAME,
    list_sft_files,
    source_stamp,
    tokenize_file,
    tokenizer_meta,
    write_samples,
)
from utils.errors import ConfigError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger("pretokenize_sft_data")


def pretokenize_sft(
    data_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    max_seq_len: int,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the pretokenized SFT directory and return its path (see the module docstring)."""
    data_dir = Path(data_dir)
    out = Path(out_dir) if out_dir is not None else data_dir.parent / f"{data_dir.name}_pretok"
    if max_seq_len < 2:
        raise ConfigError(f"max_seq_len={max_seq_len} must be >= 2")
    if out.resolve() == data_dir.resolve() or data_dir.resolve() in out.resolve().parents:
        raise ConfigError(f"out_dir={out} must not lie inside data_dir={data_dir}")
    files = list_sft_files(data_dir)
    tokenizer, tok_meta = tokenizer_meta(tokenizer_dir)
    entries = [
        {
            "source": str(p.relative_to(data_dir)),
            "prefix": str(p.relative_to(data_dir)),
            **source_stamp(p),
        }
        for p in files
    ]
    wanted = {"format_version": FORMAT_VERSION, "max_seq_len": max_seq_len, **tok_meta}
    meta_path = out / META_NAME
    if not overwrite and _up_to_date(meta_path, wanted, entries):
        logger.info("%s is up to date (use --overwrite to rebuild)", out)
        return out
    dtype = np.dtype(tok_meta["dtype"])
    # The meta file marks a complete directory: drop the old one before the first sample file is
    # replaced, so that a run dying half-way never leaves new files described by old settings.
    meta_path.unlink(missing_ok=True)
    for path, entry in zip(files, entries):
        samples = tokenize_file(tokenizer, path, max_seq_len + 1, dtype)
        write_samples(out / entry["prefix"], samples)
        entry.update(
            num_samples=len(samples),
            num_tokens=int(samples.lengths().sum()),
            skipped=samples.skipped,
        )
        logger.info(
            "%s: %d samples, %d tokens, %d skipped (no label left after truncation to %d tokens)",
            path,
            len(samples),
            entry["num_tokens"],
            samples.skipped,
            max_seq_len + 1,
        )
    tmp = meta_path.with_name(META_NAME + ".tmp")
    tmp.write_text(json.dumps({**wanted, "files": entries}, indent=2), encoding="utf-8")
    os.replace(tmp, meta_path)
    logger.info("wrote %s", out)
    return out


def _up_to_date(meta_path: Path, wanted: dict[str, Any], entries: list[dict[str, Any]]) -> bool:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    same_settings = all(meta.get(k) == v for k, v in wanted.items())
    stamps = [{k: e.get(k) for k in ("source", "size", "mtime_ns")} for e in meta.get("files", [])]
    return same_settings and stamps == [
        {k: e[k] for k in ("source", "size", "mtime_ns")} for e in entries
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_dir", required=True, help="directory of SFT .jsonl/.json/.parquet files"
    )
    parser.add_argument("--tokenizer_dir", required=True)
    parser.add_argument("--max_seq_len", type=int, required=True, help="model sequence length")
    parser.add_argument("--out_dir", default=None, help="default: DATA_DIR_pretok")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    pretokenize_sft(
        args.data_dir, args.tokenizer_dir, args.max_seq_len, args.out_dir, args.overwrite
    )


if __name__ == "__main__":
    run_cli(main)
