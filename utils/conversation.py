"""The ChatML conversation template: token ids plus SFT labels, generation prompts, record formats.

Rendering (identical to the tokenizer directory's Jinja ``chat_template``, no BOS)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n     (when messages[0] is not system)
    <|im_start|>{role}\\n{content}<|im_end|>\\n                       (every message)
    <|im_start|>assistant\\n                                          (generation prompt only)

Hugging Face tokenizes a rendered chat by splitting it at the special tokens and encoding the text
between them, so each message becomes ``[<|im_start|>] + encode(role + "\\n" + content) +
[<|im_end|>] + encode("\\n")``. We build exactly those pieces, which gives the same ids as
``tokenizer.apply_chat_template`` for benign text, and encode the text with special-token parsing
off (:func:`tokenizer.tokenization.encode_untrusted`), so content that contains the string
``<|im_end|>`` cannot end its turn early: it becomes ordinary byte tokens, never id 5.

Labels (aligned, not shifted; datasets shift when they build ``(x, y)``): ``labels[i] ==
input_ids[i]`` on an assistant message's content and its ``<|im_end|>``, -100 on everything
else (system and user messages, the ``<|im_start|>assistant\\n`` header, the ``\\n`` after
``<|im_end|>``). If BPE merges the header's ``\\n`` with the first content bytes (content starting
with whitespace), the merged token is labelled: it carries content.

Truncation to ``max_len`` keeps whole turns where it can. The conversation is a leading system
message plus *rounds*: a user message with the messages that follow it up to the next user
message. The oldest rounds are dropped (the system message always stays) until the rest fits;
if the newest round alone is still too long, the sequence is cut at ``max_len``, which cuts the
end of the last reply.

Record formats accepted by :func:`record_to_messages`:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- ShareGPT ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
- instruction ``{"instruction": str, "input": str (optional), "output": str, "system": str
  (optional)}`` -> user ``instruction`` (plus ``"\\n\\n" + input`` when input is non-empty),
  assistant ``output``.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from tokenizer.tokenization import DEFAULT_SYSTEM_PROMPT, IM_END_ID, IM_START_ID, encode_untrusted
from utils.errors import DataError

# Bump whenever the rendering or the labelling above changes: it is part of every SFT cache key.
TEMPLATE_VERSION = 1
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}

Message = dict[str, str]
Segment = tuple[list[int], list[int]]  # (ids, labels) of one rendered message


def is_unicode_text(value: Any) -> bool:
    """A ``str`` that encodes as UTF-8: JSON allows lone surrogates (``"\\ud800"``), which
    Python decodes into strings that no tokenizer can encode."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_messages(messages: Any) -> list[Message]:
    """Check the ``[{"role", "content"}, ...]`` shape; DataError naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"messages must be a non-empty list of {{role, content}} objects, got {messages!r:.80}"
        )
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not is_unicode_text(m.get("content"))
        ):
            raise DataError(
                f"message {i} must be {{'role': one of {ROLES}, 'content': str}} (valid Unicode, "
                f"no lone surrogates), got {m!r:.120}"
            )
    return messages


def with_default_system(messages: list[Message]) -> list[Message]:
    """Prepend the default system message unless the conversation starts with one."""
    if messages and messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]


def _encode_message(tokenizer: Any, message: Message, train: bool) -> Segment:
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` with labels on content + <|im_end|> if train."""
    header = encode_untrusted(tokenizer, message["role"] + "\n")
    body = encode_untrusted(tokenizer, message["role"] + "\n" + message["content"])
    newline = encode_untrusted(tokenizer, "\n")
    ids = [IM_START_ID, *body, IM_END_ID, *newline]
    if not train:
        return ids, [IGNORE_INDEX] * len(ids)
    # The content starts where body stops agreeing with the header-only encoding.
    start = 0
    while start < min(len(header), len(body)) and header[start] == body[start]:
        start += 1
    labels = (
        [IGNORE_INDEX] * (1 + start) + body[start:] + [IM_END_ID] + [IGNORE_INDEX] * len(newline)
    )
    return ids, labels


def _round_starts(messages: list[Message]) -> list[int]:
    """Indices (after messages[0], the system message) where a round begins: each user message,
    and message 1 when the conversation does not open with a user message."""
    starts = [i for i in range(1, len(messages)) if messages[i]["role"] == "user" or i == 1]
    return starts


def _first_kept_round(fixed_len: int, round_lens: list[int], max_len: int | None) -> int:
    """Drop the oldest rounds while ``fixed_len + sum(kept)`` exceeds max_len; keep at least one."""
    first, total = 0, fixed_len + sum(round_lens)
    while max_len is not None and total > max_len and first < len(round_lens) - 1:
        total -= round_lens[first]
        first += 1
    return first


def _assemble(
    segments: list[Segment],
    starts: list[int],
    tail: Segment,
    reserve: int,
    max_len: int | None,
    keep_end: bool = False,
) -> Segment:
    """System segment + the newest rounds that fit (``reserve`` tokens kept free) + ``tail``.

    Whatever still exceeds ``max_len`` is cut off the end (or off the start with ``keep_end``).
    """
    bounds = [*starts, len(segments)]
    round_lens = [sum(len(s[0]) for s in segments[a:b]) for a, b in pairwise(bounds)]
    first = _first_kept_round(len(segments[0][0]) + reserve, round_lens, max_len)
    kept = [segments[0], *segments[bounds[first] :], tail]
    ids = [t for s in kept for t in s[0]]
    labels = [t for s in kept for t in s[1]]
    if max_len is not None and len(ids) > max_len:
        cut = slice(len(ids) - max_len, None) if keep_end else slice(0, max_len)
        ids, labels = ids[cut], labels[cut]
    return ids, labels


def encode_conversation(
    tokenizer: Any,
    messages: list[Message],
    max_len: int | None = None,
    *,
    only_last_reply: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and aligned SFT labels of a conversation (see the module docstring).

    Args:
        tokenizer: a zero2all tokenizer (``tokenizer.tokenization.load_tokenizer``).
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        max_len: at most this many tokens, truncated turn-wise as documented above.
        only_last_reply: label only the final assistant message (DPO completions), not earlier
            assistant turns of the prompt.

    Returns:
        ``(input_ids, labels)``, two int lists of equal length; labels are -100 except on
        assistant content and its ``<|im_end|>``.
    """
    messages = with_default_system(validate_messages(messages))
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    segments = [
        _encode_message(
            tokenizer, m, m["role"] == "assistant" and (not only_last_reply or i == last_reply)
        )
        for i, m in enumerate(messages)
    ]
    return _assemble(segments, _round_starts(messages), ([], []), 0, max_len)


def encode_generation_prompt(
    tokenizer: Any, messages: list[Message], max_len: int | None = None
) -> list[int]:
    """Ids of ``messages`` followed by ``<|im_start|>assistant\\n`` (``add_generation_prompt``).

    The oldest rounds are dropped until the prompt fits ``max_len``; if the newest round alone is
    too long, the prompt's first tokens are cut instead (left truncation), so it still ends with
    the open assistant turn.
    """
    messages = with_default_system(validate_messages(messages))
    segments = [_encode_message(tokenizer, m, train=False) for m in messages]
    header = [IM_START_ID, *encode_untrusted(tokenizer, "assistant\n")]
    tail = (header, [IGNORE_INDEX] * len(header))
    ids, _ = _assemble(segments, _round_starts(messages), tail, len(header), max_len, keep_end=True)
    return ids


def encode_preference_pair(
    tokenizer: Any,
    prompt: list[Message],
    chosen: str,
    rejected: str,
    max_len: int | None = None,
) -> tuple[Segment, Segment]:
    """``((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))`` for DPO.

    ``chosen`` and ``rejected`` are each appended to ``prompt`` as an ASSISTANT message; only that
    final reply is labelled. Both sequences keep the same prompt rounds (chosen from the longer
    reply), so the pair differs only in its completion.
    """
    messages = with_default_system(validate_messages(prompt))
    segments = [_encode_message(tokenizer, m, train=False) for m in messages]
    replies = [
        _encode_message(tokenizer, {"role": "assistant", "content": text}, train=True)
        for text in (chosen, rejected)
    ]
    reserve = max(len(r[0]) for r in replies)
    starts = _round_starts(messages)
    chosen_seg, rejected_seg = (
        _assemble(segments, starts, reply, reserve, max_len) for reply in replies
    )
    return chosen_seg, rejected_seg


def record_to_messages(record: Any, where: str) -> list[Message]:
    """Messages of one SFT record in any supported format; DataError naming ``where`` otherwise.

    ``where`` locates the record for the message, e.g. ``"data/sft/train.jsonl:12"``.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        if "messages" in record:
            return validate_messages(record["messages"])
        if "conversations" in record:
            return validate_messages(_sharegpt_to_messages(record["conversations"]))
        if "instruction" in record:
            return validate_messages(_instruction_to_messages(record))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    raise DataError(
        f"{where}: unknown record format with keys {sorted(record)[:8]}; expected 'messages', "
        "'conversations' (ShareGPT) or 'instruction'/'input'/'output'"
    )


def _sharegpt_to_messages(turns: Any) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise DataError("'conversations' must be a non-empty list of {from, value} objects")
    messages = []
    for i, turn in enumerate(turns):
        source = turn.get("from") if isinstance(turn, dict) else None
        role = SHAREGPT_ROLES.get(source) if isinstance(source, str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(
                f"conversations[{i}] must be {{'from': one of {sorted(SHAREGPT_ROLES)}, "
                f"'value': str}}, got {turn!r:.120}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _instruction_to_messages(record: dict) -> list[Message]:
    fields = {k: record.get(k, "") for k in ("system", "instruction", "input", "output")}
    bad = [k for k, v in fields.items() if not isinstance(v, str)]
    if "output" not in record:
        bad.append("output")
    if not fields["instruction"]:
        bad.append("instruction")
    if bad:
        raise DataError(
            "instruction records need a non-empty string 'instruction', a string 'output' and "
            f"optionally string 'input'/'system'; bad or missing: {bad}"
        )
    user = fields["instruction"] + ("\n\n" + fields["input"] if fields["input"] else "")
    messages = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
    return [
        *messages,
        {"role": "user", "content": user},
        {"role": "assistant", "content": fields["output"]},
    ]
