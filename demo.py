"""`make demo`: the whole pipeline on the bundled sample data, in minutes on a laptop CPU.

tokenizer → pretokenize → sample index → pretrain → SFT → DPO → generation → plots.

Every stage runs the same command a user would type (printed before it runs), so the demo doubles
as an end-to-end check of the command-line tools. A finished stage is skipped on a re-run (its
output is kept in ``demo_out/``); ``--fresh`` (``make demo FRESH=1``) starts over. The run ends
with a summary table: per stage its time, its metric before and after, and where its artifacts are.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PY = sys.executable

# Sizes chosen so the whole demo ends well within 15 minutes on 2 CPU cores.
VOCAB_SIZE = 8192
SEQ_LEN = 256
MODEL_FLAGS = ["--model_preset=debug", "--dim=192", "--n_layers=4", "--n_heads=6", "--n_kv_heads=2",
               f"--max_seq_len={SEQ_LEN}"]


@dataclass
class StageResult:
    name: str
    seconds: float = 0.0
    before: str = ""
    after: str = ""
    artifacts: list[str] = field(default_factory=list)
    skipped: bool = False


def run(cmd: list[str]) -> None:
    """Run one pipeline command from the repo root, echoing it; stop the demo if it fails."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        print(f"demo: stage command failed with exit status {result.returncode}", file=sys.stderr)
        sys.exit(result.returncode)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_before_after(run_dir: Path, key: str = "val_loss") -> tuple[str, str]:
    rows = [r for r in read_metrics(run_dir) if r.get(key) is not None]
    if not rows:
        return "", ""
    return f"{key} {rows[0][key]:.3f}", f"{key} {rows[-1][key]:.3f}"


class Demo:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.results: list[StageResult] = []

    def stage(self, name: str, done_marker: Path, commands: list[list[str]]) -> StageResult:
        result = StageResult(name)
        print(f"\n=== {name} ===", flush=True)
        if done_marker.exists():
            print(f"(done already: {done_marker.relative_to(ROOT)}; `make demo FRESH=1` redoes it)")
            result.skipped = True
        else:
            start = time.perf_counter()
            for cmd in commands:
                run(cmd)
            result.seconds = time.perf_counter() - start
        self.results.append(result)
        return result

    def summary(self) -> None:
        print("\n=== summary ===")
        header = f"{'stage':<12} {'time':>7}  {'before':<22} {'after':<22} artifacts"
        print(header)
        print("-" * len(header))
        for r in self.results:
            t = "skipped" if r.skipped else f"{r.seconds:6.1f}s"
            print(f"{r.name:<12} {t:>7}  {r.before:<22} {r.after:<22} {', '.join(r.artifacts)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete demo_out/ and start over")
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="where every artifact goes")
    args = parser.parse_args()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out)
    rel = lambda p: str(Path(p).relative_to(ROOT)) if Path(p).is_relative_to(ROOT) else str(p)  # noqa: E731

    tok = out / "tokenizer"
    r = demo.stage("tokenizer", tok / "tokenizer.json", [
        [PY, "-m", "tokenizer.train_tokenizer", "--tokenizer_type=hf_bbpe", "--data_dir=data/sample/pretrain",
         f"--vocab_size={VOCAB_SIZE}", f"--out_dir={rel(tok)}"],
        [PY, "-m", "tokenizer.train_tokenizer", "--tokenizer_type=sp_bbpe", "--data_dir=data/sample/pretrain",
         f"--vocab_size={VOCAB_SIZE}", f"--out_dir={rel(out / 'tokenizer_sp')}"],
    ])
    r.artifacts = [rel(tok), rel(out / "tokenizer_sp")]

    pretok = out / "pretok"
    r = demo.stage("pretokenize", pretok / ".done", [
        [PY, "-m", "data_preprocess.pretokenize_pretrain_data", "--data_dir=data/sample/pretrain",
         f"--tokenizer_dir={rel(tok)}", f"--out_dir={rel(pretok)}", "--num_workers=2"],
        [PY, "-m", "data_preprocess.build_pretrain_sample_index_map", f"--data_dir={rel(pretok)}",
         f"--max_seq_len={SEQ_LEN}"],
    ])
    (pretok / ".done").touch()
    r.artifacts = [rel(pretok)]

    pre = out / "pretrain"
    r = demo.stage("pretrain", pre / "checkpoints", [
        [PY, "train.py", "--task_type=pretrain", f"--data_dir={rel(pretok)}", f"--tokenizer_dir={rel(tok)}",
         f"--out_dir={rel(pre)}", *MODEL_FLAGS, "--max_iters=300", "--train_batch_size=8",
         "--gradient_accumulation_steps=2", "--learning_rate=2e-3", "--min_lr=2e-4", "--warmup_iters=30",
         "--eval_interval=50", "--eval_iters=8", "--log_interval=10", "--save_interval=100",
         "--weight_decay=0.1", "--valid_ratio=0.02"],
    ])
    r.before, r.after = loss_before_after(pre)
    r.artifacts = [rel(pre)]

    plot = out / "curves.png"
    r = demo.stage("plot", plot, [[PY, "-m", "utils.resplot", rel(pre), f"--output={rel(plot)}"]])
    r.artifacts = [rel(plot)]

    demo.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
