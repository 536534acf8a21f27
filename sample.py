"""Generate text, or chat, with a trained model (KV cache; greedy or sampled).

    python sample.py --model_dir=RUN_OR_MODEL_DIR --prompt="Once upon a time" \\
        [--max_new_tokens=200] [--temperature=0.8] [--top_k=50] [--top_p=0.95] [--seed=1337] \\
        [--num_samples=1] [--tokenizer_dir=DIR] [--device=auto] [--dtype=auto]
    python sample.py --model_dir=DIR --chat [--prompt="Hi!"]   # one turn; without --prompt: a REPL

--model_dir: a train.py run directory (its newest checkpoint), an exported HF directory or any
Hugging Face Llama directory. --temperature=0 is greedy decoding. --chat renders the ChatML
template (utils/conversation.py) and stops at <|im_end|>. Prompt + new tokens never exceed the
model's max_seq_len: a long prompt loses its start, and --max_new_tokens is lowered (with a
warning) when it does not fit after the prompt.
"""

from __future__ import annotations

import argparse
import sys

import torch

from utils.errors import ConfigError, DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger("sample")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate text or chat with a zero2all model.")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--tokenizer_dir", default=None, help="default: found next to the model")
    p.add_argument("--prompt", default=None, help="text to continue (chat: the user message)")
    p.add_argument("--chat", action="store_true", help="use the chat template")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ConfigError("--max_new_tokens and --num_samples must be >= 1")
    if (
        args.temperature < 0
        or (args.top_k is not None and args.top_k < 1)
        or (args.top_p is not None and not 0 < args.top_p <= 1)
    ):
        raise ConfigError("need --temperature >= 0, --top_k >= 1, 0 < --top_p <= 1")
    if not args.chat and args.prompt is None:
        raise ConfigError("--prompt is required without --chat")
    return args


def pick_device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={device} but CUDA is not available")
    if dtype == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if cuda_bf16 else "float32"
    return torch.device(device), getattr(torch, dtype)


def load_model_and_tokenizer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from model.modeling_z2all import Z2allForCausalLM
    from tokenizer.tokenization import load_tokenizer
    from utils.export_hf import locate_tokenizer_dir

    tok_dir = locate_tokenizer_dir(args.model_dir, args.tokenizer_dir)
    if tok_dir is None:
        raise DataError(
            f"{args.model_dir}: no tokenizer found next to the model; pass --tokenizer_dir"
        )
    tokenizer = load_tokenizer(tok_dir, check_special_ids=args.chat)
    model = Z2allForCausalLM.from_pretrained(args.model_dir, dtype=dtype, kernels=args.kernels)
    model = model.to(device).eval()
    if len(tokenizer) > model.config.vocab_size:
        raise DataError(
            f"tokenizer {tok_dir} has {len(tokenizer)} tokens but the model's vocab_size "
            f"is {model.config.vocab_size}: they do not belong together"
        )
    return model, tokenizer


def prompt_budget(max_new_tokens: int, max_seq_len: int) -> int:
    """At most this many prompt tokens are kept, so that new tokens still fit the context.

    Normally max_seq_len - max_new_tokens. When --max_new_tokens takes more than half the context
    (e.g. the default 200 on a 128-token model) the prompt still keeps up to half of it, and
    `complete` generates only what fits after the prompt instead.
    """
    budget = max(max_seq_len - max_new_tokens, max_seq_len // 2)
    if budget < 1:
        raise ConfigError(
            f"the model's context (max_seq_len={max_seq_len}) has no room for a prompt and "
            f"--max_new_tokens={max_new_tokens} new tokens"
        )
    return budget


def complete(
    model,
    prompt_ids: list[int],
    args: argparse.Namespace,
    eos_id: int | None,
    generator: torch.Generator,
) -> list[list[int]]:
    """New token ids (without the prompt, cut after the first eos) for num_samples rows.

    Prompt + new tokens never exceed the model's max_seq_len: a long prompt loses its first
    tokens (see `prompt_budget`), and fewer than --max_new_tokens are generated when they do not
    fit after the prompt; both with a warning.
    """
    max_seq_len = model.config.max_seq_len
    room = prompt_budget(args.max_new_tokens, max_seq_len)
    if len(prompt_ids) > room:
        logger.warning(
            "prompt of %d tokens cut to its last %d (max_seq_len %d)",
            len(prompt_ids),
            room,
            max_seq_len,
        )
        prompt_ids = prompt_ids[-room:]
    max_new_tokens = min(args.max_new_tokens, max_seq_len - len(prompt_ids))
    if max_new_tokens < args.max_new_tokens:
        logger.warning(
            "--max_new_tokens=%d exceeds the model's context (max_seq_len=%d): generating at "
            "most %d new tokens after a prompt of %d tokens",
            args.max_new_tokens,
            max_seq_len,
            max_new_tokens,
            len(prompt_ids),
        )
    device = model.lm_head.weight.device
    x = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
    out = model.generate(
        x,
        max_new_tokens=max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos_id,
        generator=generator,
    )
    rows = []
    for row in out[:, x.shape[1] :].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


def chat(model, tokenizer, args: argparse.Namespace, generator: torch.Generator) -> None:
    from tokenizer.tokenization import IM_END_ID
    from utils.conversation import encode_generation_prompt

    messages: list[dict[str, str]] = []
    turns = [args.prompt] if args.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return
            user = turns.pop(0)
        else:
            try:
                user = input("user> ")
            except EOFError:
                return
            if user.strip() in ("exit", "quit"):
                return
        messages.append({"role": "user", "content": user})
        # Fit the budget here, dropping the oldest rounds first; `complete` would cut blindly.
        room = prompt_budget(args.max_new_tokens, model.config.max_seq_len)
        ids = encode_generation_prompt(tokenizer, messages, max_len=room)
        replies = complete(model, ids, args, IM_END_ID, generator)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
        for text in texts:
            print(f"assistant> {text}", flush=True)
        messages.append({"role": "assistant", "content": texts[0]})


def main(argv: list[str] | None = None) -> None:
    from tokenizer.tokenization import encode_untrusted

    args = parse_args(argv)
    setup_logging()
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    model, tokenizer = load_model_and_tokenizer(args, device, dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.chat:
        chat(model, tokenizer, args, generator)
        return
    # The prompt is plain text (special-token strings stay text). An empty prompt starts after
    # an EOS, i.e. at a document boundary as in the pretraining stream.
    eos_id = (
        tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    )
    prompt_ids = encode_untrusted(tokenizer, args.prompt) or [eos_id]
    for i, ids in enumerate(complete(model, prompt_ids, args, eos_id, generator)):
        if args.num_samples > 1:
            print(f"---------------- sample {i + 1}", flush=True)
        print(args.prompt + tokenizer.decode(ids, skip_special_tokens=True), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
