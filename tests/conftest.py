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
