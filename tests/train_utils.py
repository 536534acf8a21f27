"""Helpers for tests that run train.py as a user would: in a subprocess, alone or under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32
TINY = ["--model_preset=debug", "--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
        f"--max_seq_len={SEQ}", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=2",
        "--log_interval=1", "--eval_iters=2", "--tensorboard=false", "--valid_ratio=0.05"]


def pretokenize(raw_dir: Path, tokenizer_dir: Path, out: Path, seq: int = SEQ) -> Path:
    for module, args in [
        ("data_preprocess.pretokenize_pretrain_data",
         [f"--data_dir={raw_dir}", f"--tokenizer_dir={tokenizer_dir}", f"--out_dir={out}"]),
        ("data_preprocess.build_pretrain_sample_index_map", [f"--data_dir={out}", f"--max_seq_len={seq}"]),
    ]:
        r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return out


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, check: bool = True,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """``python train.py ARGS``, or the same under ``torchrun --nproc_per_node=nproc`` on CPU."""
    if nproc == 1:
        launcher = [sys.executable, "train.py"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "train.py"]
    r = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def column(out_dir: Path, key: str) -> dict[int, float]:
    return {row["iter"]: row[key] for row in metrics(out_dir) if key in row}


def losses(out_dir: Path) -> dict[int, float]:
    return column(out_dir, "loss")


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    from utils.checkpoint import latest_model_dir

    return load_file(latest_model_dir(out_dir) / "model.safetensors")


def assert_close_series(a: dict[int, float], b: dict[int, float], atol: float) -> None:
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= atol, f"max difference {worst:.3g} > {atol}: {a} vs {b}"
