"""Shared pytest set-up: CPU-friendly threads, Triton in interpreter mode without CUDA."""

import os
import sys
from pathlib import Path

# Triton kernels run on CPU through Triton's interpreter; the variable must be set before the
# first `import triton` anywhere in the test process.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


# --- tokenizer fixture (tokenizer helper) -------------------------------------------------------

import pytest  # noqa: E402

# Built-in mixed Chinese / English / code text for when data/sample/pretrain is missing.
BUILTIN_TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we've got 3 cats and 12 dogs.",
    "Debian is a free operating system. Install packages with `apt-get install vim`.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "今天天气很好，我们去公园散步吧。中文分词是自然语言处理的基础任务之一。",
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i] * 10;\n}\r\n",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？Learning with practice is a joy.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small trained hf_bbpe tokenizer directory (vocab <= 1024), built once per session.

    Trained on a seeded ~0.5 MB sample of data/sample/pretrain when present, else on
    BUILTIN_TOKENIZER_TEXT; takes a few seconds.
    """
    from tokenizer.train_tokenizer import train_tokenizer

    out_dir = tmp_path_factory.mktemp("tokenizer") / "hf_bbpe"
    sample = ROOT / "data" / "sample" / "pretrain"
    if sample.is_dir():
        from data.readers import list_data_files

        return train_tokenizer(
            "hf_bbpe", list_data_files(sample), vocab_size=1024, out_dir=out_dir,
            max_train_bytes=500_000, seed=0,
        )
    return train_tokenizer("hf_bbpe", texts=BUILTIN_TOKENIZER_TEXT * 50, vocab_size=1024, out_dir=out_dir)


@pytest.fixture(scope="session")
def pretok_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The English Debian handbook from the sample corpus, pretokenized and indexed (seq 32)."""
    from train_utils import pretokenize

    raw = tmp_path_factory.mktemp("raw")
    (raw / "handbook_en.jsonl").write_bytes((ROOT / "data/sample/pretrain/handbook_en.jsonl").read_bytes())
    return pretokenize(raw, tokenizer_dir, tmp_path_factory.mktemp("pretok"))
