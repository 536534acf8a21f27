"""Loading zero2all tokenizers, encoding untrusted text, and the fixed special tokens.

Both tokenizer types (``hf_bbpe``, ``sp_bbpe``; see ``tokenizer/train_tokenizer.py``) are saved
as a Hugging Face fast-tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json`` +
``chat_template.jinja``) that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads without
remote code. ``sp_bbpe`` directories also keep the sentencepiece ``tokenizer.model``.

Special tokens (the same ids in both types)::

    0 <unk>   1 <s> (bos)   2 </s> (eos)   3 <pad>   4 <|im_start|>   5 <|im_end|>

Untrusted text (a user's message, a document) must never produce ids 0..5, otherwise a user
typing ``<|im_end|>`` could end their own turn. Plain ``tok.encode(text)`` parses special-token
strings; :func:`encode_untrusted` turns that parsing off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import tokenizers

from utils.errors import DataError

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"

# In id order: SPECIAL_TOKENS[i] has id i in every zero2all tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN,
)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
SPECIAL_IDS: frozenset[int] = frozenset(range(len(SPECIAL_TOKENS)))

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML without BOS. Each message: <|im_start|>{role}\n{content}<|im_end|>\n. A default system
# message is prepended when the first message is not a system message; add_generation_prompt
# opens the assistant turn. utils/conversation.py produces the same ids for benign text.
CHAT_TEMPLATE = (
    "{%- if messages | length == 0 or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Files whose content defines the token <-> id mapping (see tokenizer_fingerprint).
_DEFINING_FILES = ("tokenizer.json", "tokenizer.model")

VOCAB_PAD_MULTIPLE = 64


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Model-side vocab size: ``vocab_size`` rounded up to a multiple of ``multiple`` (64).

    The embedding and LM-head matrices use this size so matmuls hit tensor-core friendly shapes;
    the extra rows are never produced by the tokenizer and never seen as targets.
    """
    return (vocab_size + multiple - 1) // multiple * multiple


def load_tokenizer(tokenizer_dir: str | os.PathLike, check_special_ids: bool = True) -> Any:
    """Load a tokenizer directory with ``AutoTokenizer`` (no remote code).

    With ``check_special_ids`` the directory must carry the zero2all special tokens at ids 0..5;
    a foreign tokenizer is a :class:`DataError` naming the first mismatching token.
    """
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {str(path)!r} does not exist or is not a directory")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise DataError(
            f"{path}: not a tokenizer directory (no tokenizer.json or tokenizer_config.json); "
            "train one with `python -m tokenizer.train_tokenizer`"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON errors)
        raise DataError(f"{path}: cannot load tokenizer: {e}") from e
    if check_special_ids:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            got = tok.convert_tokens_to_ids(token)
            if got != expected_id:
                raise DataError(
                    f"{path}: special token {token!r} has id {got}, expected {expected_id}; "
                    "this is not a zero2all tokenizer (see tokenizer/README.md)"
                )
    return tok


def load_backend_tokenizer(tokenizer_dir: str | os.PathLike) -> tokenizers.Tokenizer:
    """The Rust tokenizer of a zero2all tokenizer directory, from its ``tokenizer.json``.

    Pretokenization and train.py's vocab-size lookup need only this; skipping
    ``transformers.AutoTokenizer`` keeps transformers (and for pretokenization torch) out of the
    process: seconds of start-up and about 250 MB of memory. The special ids are checked like
    :func:`load_tokenizer` does; tests check the ids equal ``encode_untrusted``.
    """
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(
            f"{path.parent}: not a tokenizer directory (no tokenizer.json); train one "
            "with `python -m tokenizer.train_tokenizer`"
        )
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"{path}: cannot load tokenizer: {e}") from e
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise DataError(
                f"{path}: special token {token!r} has id {tokenizer.token_to_id(token)}, "
                f"expected {expected_id}; this is not a zero2all tokenizer"
            )
    return tokenizer


def encode_untrusted(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` with special-token parsing off: never an id in ``SPECIAL_IDS``.

    A literal ``<|im_end|>`` in ``text`` becomes ordinary tokens (its bytes / pieces). No BOS or
    EOS is added. ``tok`` is a transformers fast tokenizer (as returned by load_tokenizer).
    """
    return encode_untrusted_batch(tok, [text])[0]


def encode_untrusted_batch(tok: Any, texts: list[str]) -> list[list[int]]:
    """:func:`encode_untrusted` for many texts at once (the Rust backend encodes in parallel)."""
    if not texts:
        return []  # transformers cannot tell an empty batch from a single text
    backend = tok.backend_tokenizer
    previous = backend.encode_special_tokens
    try:
        batch = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    finally:
        # The flag lives on the shared backend; leave it as found for direct backend users.
        backend.encode_special_tokens = previous
    for text, ids in zip(texts, batch):
        # Invariant of our tokenizers: pre-tokenization never assembles a special-token string.
        assert SPECIAL_IDS.isdisjoint(ids), f"untrusted text produced special ids: {text[:80]!r}"
    return batch


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike) -> str:
    """sha256 hex digest identifying a tokenizer's token <-> id mapping.

    Covers ``tokenizer.json`` (canonical JSON, so re-serialising with other whitespace or key
    order keeps the fingerprint; it holds the vocab, merges and the special tokens with their
    ids) and ``tokenizer.model`` (raw bytes) when present. Data sidecars and caches store it to
    detect a tokenizer mismatch.
    """
    path = Path(tokenizer_dir)
    present = [path / name for name in _DEFINING_FILES if (path / name).is_file()]
    if not present:
        raise DataError(f"{path}: no tokenizer.json or tokenizer.model to fingerprint")
    digest = hashlib.sha256()
    for file in present:
        digest.update(file.name.encode())
        if file.suffix == ".json":
            try:
                canonical = json.dumps(json.loads(file.read_text(encoding="utf-8")), sort_keys=True)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{file}: unreadable tokenizer file: {e}") from e
            digest.update(canonical.encode("utf-8"))
        else:
            digest.update(file.read_bytes())
    return digest.hexdigest()
