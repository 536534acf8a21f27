"""Train a byte-level BPE tokenizer (``hf_bbpe``) or a sentencepiece BPE tokenizer (``sp_bbpe``).

    python -m tokenizer.train_tokenizer --tokenizer_type=hf_bbpe --data_dir=data/sample/pretrain \\
        --vocab_size=8192 --out_dir=out/tokenizer_hf

Both types write a directory that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads
without remote code: ``tokenizer.json`` (a HF ``tokenizers`` pipeline), ``tokenizer_config.json``
and ``chat_template.jinja``; ``sp_bbpe`` also keeps the trained sentencepiece ``tokenizer.model``.
Special tokens sit at ids 0..5 in both (see ``tokenizer/tokenization.py`` and the README).

- ``hf_bbpe``: BPE over the 256 byte symbols. A regex pre-tokenizer keeps CJK runs, other
  letter runs (with combining marks), single digits, punctuation runs and whitespace runs apart,
  so merges never cross those boundaries. Every string round-trips exactly.
- ``sp_bbpe``: sentencepiece BPE with ``byte_fallback`` (characters outside the vocab become
  ``<0xXX>`` byte pieces), identity normalisation, no dummy prefix, no whitespace collapsing,
  digits split. It is converted to an equivalent ``tokenizer.json`` (vocab + merges ordered by
  sentencepiece's piece scores) so both types share one loading and encoding path. Its only
  normalisation: U+2581 ``▁`` (sentencepiece's space symbol) decodes as a space.

Training text is read with ``data.readers`` (streaming). ``--max_train_bytes`` samples whole
documents with a seeded Bernoulli draw in a second streaming pass, so memory is bounded by the
sample and the same seed gives the same sample. The log reports the documents and bytes actually
trained on, then what the readers read and skipped. No training document at all (a mistyped
``--text_field``, only bad records, every document larger than ``--max_train_bytes``) is a
``DataError`` raised before anything is written.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from itertools import chain, zip_longest
from pathlib import Path

from tqdm import tqdm

from data.readers import ReadStats, iter_documents, list_data_files
from tokenizer.tokenization import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    encode_untrusted,
    load_tokenizer,
    padded_vocab_size,
)
from utils.errors import ConfigError, DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

TOKENIZER_TYPES = ("hf_bbpe", "sp_bbpe")

# Pre-tokenizer for hf_bbpe, alternatives tried left to right:
#   English contractions | a CJK run (optional leading space) | a run of other letters and
#   combining marks (one optional leading non-letter, e.g. space or `_`) | ONE digit |
#   a punctuation/symbol run (optional leading space, trailing newlines) | newlines with the
#   indentation before them | a whitespace run minus its last space (that space starts the next
#   word, as in GPT-2) | any remaining whitespace.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"| ?\p{Han}+"
    r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}&&[^\p{Han}]]+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

SP_SPACE = "\u2581"  # sentencepiece's whitespace symbol "▁"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + 1  # specials + one symbol per byte + one merge


# ---------------------------------------------------------------------------------------------
# Training text
# ---------------------------------------------------------------------------------------------


def iter_training_texts(
    files: list[Path],
    text_field: str | None = None,
    max_train_bytes: int | None = None,
    seed: int = 0,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Documents of ``files`` (in order), or a seeded sample of about ``max_train_bytes`` bytes.

    Sampling is two streaming passes: the first sums the UTF-8 bytes, the second keeps each
    document with probability ``max_train_bytes / total`` and stops at the budget. Memory holds
    one document at a time; the result depends only on the files and ``seed``.
    """
    stats = stats if stats is not None else ReadStats()
    if max_train_bytes is not None:
        counted = ReadStats()
        for path in tqdm(files, desc="counting bytes", unit="file", leave=False, disable=None):
            for _ in iter_documents(path, text_field, counted):
                pass
        if counted.bytes > max_train_bytes:
            yield from _sample_documents(
                files, text_field, max_train_bytes, counted.bytes, seed, stats
            )
            return
    for path in tqdm(files, desc="reading", unit="file", leave=False, disable=None):
        yield from iter_documents(path, text_field, stats)


def _sample_documents(
    files: list[Path], text_field: str | None, budget: int, total: int, seed: int, stats: ReadStats
) -> Iterator[str]:
    """Bernoulli sample; a document drawn but larger than the budget left counts as
    ``over_budget`` in ``stats.skipped`` (reading still counts it in ``stats.docs``)."""
    rng = random.Random(seed)
    keep_prob = budget / total
    for path in tqdm(files, desc="sampling", unit="file", leave=False, disable=None):
        for doc in iter_documents(path, text_field, stats):
            if rng.random() >= keep_prob:
                continue
            size = len(doc.encode("utf-8"))
            if size > budget:
                stats.skip("over_budget")
                continue  # too big for what is left; a smaller later document may still fit
            budget -= size
            yield doc


def _count_kept(texts: Iterable[str], kept: ReadStats) -> Iterator[str]:
    """Pass ``texts`` through, counting them (and their UTF-8 bytes) in ``kept``."""
    for text in texts:
        kept.docs += 1
        kept.bytes += len(text.encode("utf-8"))
        yield text


def _cap_bytes(texts: Iterable[str], max_train_bytes: int | None) -> Iterator[str]:
    """The leading texts that fit in ``max_train_bytes`` (all when None)."""
    budget = max_train_bytes
    for text in texts:
        if budget is not None:
            budget -= len(text.encode("utf-8"))
            if budget < 0:
                return
        yield text


# ---------------------------------------------------------------------------------------------
# hf_bbpe
# ---------------------------------------------------------------------------------------------


def build_hf_bbpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with SPECIAL_TOKENS at ids 0..5."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        # Map every byte to a printable symbol; no regex of its own, no prefix space.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..5 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# ---------------------------------------------------------------------------------------------
# sp_bbpe
# ---------------------------------------------------------------------------------------------


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """sentencepiece trains on lines; newlines themselves encode as the byte piece <0x0A>."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, seed: int = 0, character_coverage: float = 0.9995
) -> bytes:
    """Train a sentencepiece BPE model; returns the serialized ``tokenizer.model`` bytes."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=UNK_TOKEN, bos_piece=BOS_TOKEN, eos_piece=EOS_TOKEN, pad_piece=PAD_TOKEN,
            # Control symbols are never produced from text by sentencepiece itself.
            control_symbols=list(SPECIAL_TOKENS[4:]),
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
        raise ConfigError(
            f"sentencepiece training failed with --vocab_size={vocab_size}: {e}"
        ) from e
    return model.getvalue()


def sentencepiece_to_tokenizers(model_proto: bytes):
    """An equivalent ``tokenizers.Tokenizer`` for a sentencepiece BPE model with byte fallback.

    sentencepiece BPE encodes by repeatedly merging the adjacent pair whose concatenation is
    the highest-scoring piece; ids of normal pieces follow descending score. A HF BPE whose
    merges are "every split of each piece into two pieces, ordered by the piece's id" applies
    the same merges in the same order. Spaces become ``▁`` in a normalizer (sentencepiece does
    the same before its model), and the decoder maps them back and fuses ``<0xXX>`` bytes.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {
        piece for piece, i in vocab.items()
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    merges: list[tuple[int, int, int, str, str]] = []
    for piece in normal:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(models.BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in merges],
        unk_token=UNK_TOKEN,
        byte_fallback=True,
        fuse_unk=True,
    ))
    tok.normalizer = normalizers.Replace(" ", SP_SPACE)
    tok.decoder = decoders.Sequence([
        decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
    ])
    return tok


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def save_tokenizer_dir(backend, out_dir: Path, sp_model: bytes | None = None) -> None:
    """Write ``backend`` (a ``tokenizers.Tokenizer``) as a transformers tokenizer directory."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    # Special tokens match only verbatim (not normalised, no stripping) and are skipped by
    # decode(skip_special_tokens=True). Their ids are already 0..5 in the vocab.
    backend.add_special_tokens([
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
        for t in SPECIAL_TOKENS
    ])
    for i, token in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(token) == i, (token, backend.token_to_id(token))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    tok.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    stale_model = out_dir / "tokenizer.model"
    if sp_model is None and stale_model.exists():
        stale_model.unlink()  # left by an earlier sp_bbpe run; would change the fingerprint
    tok.save_pretrained(str(out_dir))
    if sp_model is not None:
        stale_model.write_bytes(sp_model)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def train_tokenizer(
    tokenizer_type: str,
    files: list[Path] | None = None,
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int,
    out_dir: Path,
    text_field: str | None = None,
    max_train_bytes: int | None = None,
    seed: int = 0,
    character_coverage: float = 0.9995,
) -> Path:
    """Train a tokenizer on ``files`` (read with data.readers) or on ``texts``; return ``out_dir``.

    Exactly one of ``files``/``texts`` is given. ``max_train_bytes`` samples documents from
    ``files`` (seeded) or keeps the leading ``texts`` that fit. ``character_coverage`` is used
    by ``sp_bbpe`` only (rarer characters fall back to bytes).
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError(f"--tokenizer_type={tokenizer_type!r} is not one of {TOKENIZER_TYPES}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"--vocab_size={vocab_size} is too small: at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes + merges)"
        )
    if max_train_bytes is not None and max_train_bytes <= 0:
        raise ConfigError(f"--max_train_bytes={max_train_bytes} must be positive")
    if (files is None) == (texts is None):
        raise ValueError("pass exactly one of files= or texts=")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "--out_dir")
    read, kept = ReadStats(), ReadStats()
    if files is not None:
        docs = iter_training_texts(files, text_field, max_train_bytes, seed, read)
    else:
        docs = _cap_bytes(texts, max_train_bytes)
    docs = _count_kept(docs, kept)
    first = next(docs, None)  # streams until the first kept document
    if first is None:
        raise DataError(_no_text_message(files, text_field, max_train_bytes, read))
    docs = chain([first], docs)
    if tokenizer_type == "hf_bbpe":
        save_tokenizer_dir(build_hf_bbpe(docs, vocab_size), out_dir)
    else:
        sp_model = train_sentencepiece(docs, vocab_size, seed, character_coverage)
        save_tokenizer_dir(sentencepiece_to_tokenizers(sp_model), out_dir, sp_model=sp_model)
    logger.info("trained on %d documents, %s bytes of text", kept.docs, f"{kept.bytes:,}")
    if files is not None:
        note = " (over_budget: drawn by the sample, larger than the bytes left)"
        logger.info("read: %s, %s bytes%s", read.summary(), f"{read.bytes:,}",
                    note if read.skipped["over_budget"] else "")
    return out_dir


def check_out_dir(path: Path, flag: str) -> None:
    """DataError when ``path`` or its nearest existing parent is not a directory.

    Checked before reading any data, so a long run does not fail at its very end.
    """
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(
            f"{flag}={path}: {existing} exists and is not a directory; choose a directory path"
        )


def _no_text_message(
    files: list[Path] | None, text_field: str | None, max_train_bytes: int | None,
    read: ReadStats,
) -> str:
    """Why no training document was kept, naming the data, the text field and skip reasons."""
    if files is None:
        return (f"no training text: texts= is empty or its first text is larger than "
                f"max_train_bytes={max_train_bytes}")
    where = os.path.commonpath([str(f.parent) for f in files]) if files else "(no files)"
    field = f"--text_field={text_field}" if text_field else "the default fields (text, content)"
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(read.skipped.items())) or "none"
    message = (f"no training documents in {len(files)} file(s) under {where} with {field}: "
               f"{read.docs} documents read, records skipped: {reasons}")
    if read.docs and max_train_bytes is not None:
        message += (f"; the --max_train_bytes={max_train_bytes} sample kept none of them "
                    "(over_budget: drawn but larger than the budget); raise --max_train_bytes")
    elif read.skipped.get("bad_field"):
        message += "; bad_field means records without that field: check --text_field"
    return message + "; nothing was written"


def heldout_stats(tok, heldout_dir: Path, text_field: str | None = None) -> dict[str, dict]:
    """Fertility and exact round trips per ``lang`` on the held-out documents.

    Returns ``{lang: {"docs", "chars", "bytes", "tokens", "roundtrip_ok"}}``. Each file is read
    twice in step (text and ``lang`` fields); a file whose records do not pair up cleanly (a
    skipped record, no ``lang``) is left out with a warning.
    """
    totals: dict[str, dict] = {}
    for path in list_data_files(heldout_dir):
        if path.suffix == ".txt":
            continue
        text_stats, lang_stats = ReadStats(), ReadStats()
        pairs = zip_longest(
            iter_documents(path, text_field, text_stats), iter_documents(path, "lang", lang_stats)
        )
        per_file: dict[str, dict] = {}
        for text, lang in pairs:
            if text is None or lang is None:
                break
            ids = encode_untrusted(tok, text)
            row = per_file.setdefault(
                lang, {"docs": 0, "chars": 0, "bytes": 0, "tokens": 0, "roundtrip_ok": 0}
            )
            row["docs"] += 1
            row["chars"] += len(text)
            row["bytes"] += len(text.encode("utf-8"))
            row["tokens"] += len(ids)
            row["roundtrip_ok"] += tok.decode(ids) == text
        if text_stats.num_skipped or lang_stats.num_skipped or text_stats.docs != lang_stats.docs:
            logger.warning("%s: text and lang fields do not pair up; left out of the stats", path)
            continue
        for lang, row in per_file.items():
            total = totals.setdefault(lang, dict.fromkeys(row, 0))
            for key, value in row.items():
                total[key] += value
    return totals


def format_report(tokenizer_type: str, tok, seconds: float, heldout: dict[str, dict]) -> str:
    vocab = len(tok)
    special = ", ".join(f"{t}={tok.convert_tokens_to_ids(t)}" for t in SPECIAL_TOKENS)
    lines = [
        f"tokenizer type:     {tokenizer_type}",
        f"vocab size:         {vocab}",
        f"model-side vocab:   {padded_vocab_size(vocab)} (padded to a multiple of 64)",
        f"special ids:        {special}",
        f"training time:      {seconds:.1f} s",
    ]
    for lang in sorted(heldout):
        row = heldout[lang]
        tokens = max(row["tokens"], 1)
        lines.append(
            f"held-out {lang}: {row['docs']} docs, {row['chars'] / tokens:.2f} chars/token, "
            f"{row['bytes'] / tokens:.2f} bytes/token, "
            f"exact round trip {row['roundtrip_ok']}/{row['docs']}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tokenizer.train_tokenizer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--tokenizer_type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument(
        "--data_dir", required=True, help="training text (.txt/.jsonl/.json/.parquet, recursive)"
    )
    p.add_argument("--vocab_size", required=True, type=int)
    p.add_argument("--out_dir", required=True, help="tokenizer directory to write")
    p.add_argument(
        "--text_field", default=None, help="record field holding the text (default: text, content)"
    )
    p.add_argument(
        "--max_train_bytes", type=int, default=None, help="sample documents up to this many bytes"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample")
    p.add_argument("--character_coverage", type=float, default=0.9995, help="sp_bbpe only")
    p.add_argument(
        "--heldout_dir", default=None,
        help="records with a `lang` field for fertility stats "
        "(default: a sibling `heldout` dir if present)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    files = list_data_files(args.data_dir)
    if not files:
        raise DataError(f"{args.data_dir}: no .txt/.jsonl/.json/.parquet files found")
    logger.info("training %s (vocab %d) on %d files under %s", args.tokenizer_type,
                args.vocab_size, len(files), args.data_dir)
    start = time.perf_counter()
    out_dir = train_tokenizer(
        args.tokenizer_type, files, vocab_size=args.vocab_size, out_dir=Path(args.out_dir),
        text_field=args.text_field, max_train_bytes=args.max_train_bytes, seed=args.seed,
        character_coverage=args.character_coverage,
    )
    seconds = time.perf_counter() - start
    tok = load_tokenizer(out_dir)
    heldout_dir = Path(args.heldout_dir or Path(args.data_dir).parent / "heldout")
    heldout = heldout_stats(tok, heldout_dir, args.text_field) if heldout_dir.is_dir() else {}
    report = format_report(args.tokenizer_type, tok, seconds, heldout)
    (out_dir / "train_report.json").write_text(json.dumps(
        {"tokenizer_type": args.tokenizer_type, "vocab_size": len(tok), "train_seconds": seconds,
         "heldout": heldout}, indent=2) + "\n", encoding="utf-8")
    print(report, flush=True)
    logger.info("saved to %s", out_dir)


if __name__ == "__main__":
    run_cli(main)
