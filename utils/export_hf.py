"""Export a checkpoint to a self-contained Hugging Face Llama directory.

    python -m utils.export_hf --out_dir=RUN_OR_MODEL_DIR --hf_dir=DIR [--tokenizer_dir=DIR]
                              [--dtype=float32|bfloat16|float16]

--out_dir is a train.py run directory (its newest valid checkpoint is exported) or a model
directory (`config.json` + `model.safetensors`). The result holds `config.json`,
`model.safetensors` and the tokenizer files, and loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
with the same logits as our model.

The tokenizer comes from --tokenizer_dir, else from the model directory or the run directory
when they hold tokenizer files, else from the run's saved `tokenizer_dir` setting.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from utils.errors import ConfigError, DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")  # as tokenizer.tokenization
MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "generation_config.json",
}


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_MARKERS)


def locate_tokenizer_dir(
    source_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None
) -> Path | None:
    """Where the tokenizer of a model or run directory lives (see the module docstring);
    None when nothing is found. An explicit tokenizer_dir must exist."""
    if tokenizer_dir:
        path = Path(tokenizer_dir)
        if not has_tokenizer(path):
            raise DataError(
                f"--tokenizer_dir={path}: no tokenizer.json or tokenizer_config.json there"
            )
        return path
    from model.modeling_z2all import resolve_model_dir

    source = Path(source_dir)
    for candidate in (resolve_model_dir(source), source):
        if has_tokenizer(candidate):
            return candidate
    if (source / "exp_config.json").is_file():
        from configurator import load_config

        saved = load_config(source).to_flat().get("tokenizer_dir")
        if saved and has_tokenizer(Path(saved)):
            return Path(saved)
    return None


def copy_tokenizer_files(tokenizer_dir: Path, dest: Path) -> list[str]:
    """Copy every file of the tokenizer directory (not the model's own files) into dest."""
    copied = []
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file() and path.name not in MODEL_FILES:
            shutil.copy2(path, dest / path.name)
            copied.append(path.name)
    return copied


def export_hf(
    out_dir: str | os.PathLike,
    hf_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the HF directory; returns its path. dtype None keeps the checkpoint's dtype."""
    from model.modeling_z2all import Z2allForCausalLM, resolve_model_dir

    source, dest = resolve_model_dir(out_dir), Path(hf_dir)
    if dest.resolve() == source.resolve():
        raise ConfigError(f"--hf_dir={dest} is the checkpoint directory itself; choose another")
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"--hf_dir={dest} is an existing file, not a directory")
    if (dest / "exp_config.json").is_file():
        raise ConfigError(f"--hf_dir={dest} is a train.py run directory; choose another")
    tok_dir = locate_tokenizer_dir(out_dir, tokenizer_dir)
    model = Z2allForCausalLM.from_pretrained(source, dtype=None, kernels="torch")
    model.save_pretrained(dest, dtype=dtype)
    logger.info("wrote %s (%s parameters) from %s", dest, f"{model.num_parameters():,}", source)
    if tok_dir is None:
        logger.warning("no tokenizer found for %s; pass --tokenizer_dir to include one", out_dir)
    else:
        names = copy_tokenizer_files(tok_dir, dest)
        logger.info("copied tokenizer files from %s: %s", tok_dir, ", ".join(names))
        write_generation_config(dest)
    return dest


def write_generation_config(dest: Path) -> None:
    """``generation_config.json``: ``transformers``' ``generate()`` stops at ``</s>`` and at
    ``<|im_end|>`` (the end of a chat reply), and pads with ``<pad>`` (ids of our tokenizers)."""
    from transformers import GenerationConfig

    from tokenizer.tokenization import BOS_ID, EOS_ID, IM_END_ID, PAD_ID

    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=PAD_ID
    ).save_pretrained(dest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Export a checkpoint to the Hugging Face Llama format."
    )
    parser.add_argument(
        "--out_dir", required=True, help="train.py run directory or model directory"
    )
    parser.add_argument("--hf_dir", required=True, help="directory to write")
    parser.add_argument("--tokenizer_dir", default=None)
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: as saved")
    args = parser.parse_args(argv)
    setup_logging()
    export_hf(args.out_dir, args.hf_dir, args.tokenizer_dir, DTYPES.get(args.dtype))


if __name__ == "__main__":
    run_cli(main)
