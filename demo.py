"""`make demo`: the whole pipeline on the bundled sample data, in minutes on a laptop CPU.

    python demo.py [--fresh] [--out=demo_out] [--smoke] [--pretrain_data=data/sample/pretrain]

tokenizer → pretokenize + sample index → pretrain → SFT → DPO → generation → plots.

Every stage runs the same commands a user would type (each printed before it runs), so the demo
doubles as an end-to-end check of the command-line tools. A finished stage is skipped on a re-run
(its outputs stay in ``demo_out/``, a marker in ``demo_out/.done/`` says it finished); once a stage
runs, every later stage runs again, since it depends on it. ``--fresh`` (``make demo FRESH=1``)
starts over. ``--smoke`` shrinks every size to seconds (the test suite uses it).

What the summary measures (SPEC §2, issue 8):

- tokenizer: held-out bytes per token (raw bytes: 1.0) of both tokenizer types;
- pretokenize: corpus size and the unigram entropy of its tokens, ``H1 = -Σ p(t) ln p(t)`` nats per
  token: the loss of the best model that ignores context; a pretrained model must go below it;
- pretrain: validation loss at step 0 (≈ ln vocab) and at the end;
- SFT: held-out exact match on the generated tasks (``utils.evaluate_chat``) of the pretrained
  model (≈ 0: it has never seen the chat format) and of the SFT model;
- DPO: held-out reward accuracy (share of held-out pairs whose chosen reply gained more than the
  rejected one, relative to the SFT reference; target > 0.8) and the held-out SFT loss of the SFT
  model and of the DPO model (target: not raised by more than 10%).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PY = sys.executable


@dataclass(frozen=True)
class Plan:
    """Every size of the demo. ``FULL`` fits 15 minutes on 2 CPU cores; ``SMOKE`` is for tests."""

    vocab_size: int
    max_train_bytes: int  # tokenizer training sample
    seq_len: int
    model: tuple[str, ...]  # train.py model flags (the SFT/DPO runs inherit the architecture)
    pretrain: tuple[str, ...]  # train.py optimisation flags per stage
    sft: tuple[str, ...]
    dpo: tuple[str, ...]
    sft_batches: tuple[str, ...]  # SFT batch size and eval batches, shared by the SFT run and the
    #                               evaluation-only run of the DPO model: the same held-out samples
    eval_samples: int  # held-out questions scored by exact match (0 = all)
    sample_tokens: int
    # The generated SFT/DPO tasks (data.build_sft_data --tasks): the lookup tier, which this
    # budget teaches, plus one task of the spell tier, which it mostly does not.
    tasks: str = "lookup,first_letter"
    chat_prompts: tuple[str, ...] = ("Is 1234 even or odd?", "What is the last digit of 9087?",
                                     "“quokka”的第一个字母是什么？")


# Sizes measured on a shared 2-core machine, one thread per process (see --threads): tokenizers
# ~15 s, pretrain ~3 min (0.3 s/step), SFT ~3 min, DPO ~1 min, evaluations ~6 s each.
FULL = Plan(
    vocab_size=4096,
    max_train_bytes=2_000_000,
    seq_len=128,
    model=("--model_preset=debug", "--dim=128", "--n_layers=4", "--n_heads=4", "--n_kv_heads=2"),
    pretrain=("--max_iters=600", "--train_batch_size=16", "--learning_rate=4e-3", "--min_lr=4e-4",
              "--warmup_iters=30", "--eval_interval=100", "--eval_iters=8", "--log_interval=20",
              "--save_interval=200", "--valid_ratio=0.02"),
    # Measured held-out exact match after 400 / 600 / 800 steps: 0.69-0.82 / 0.89 / 0.94-0.96.
    sft=("--max_iters=800", "--learning_rate=2e-3", "--min_lr=2e-4",
         "--warmup_iters=20", "--eval_interval=200", "--log_interval=20", "--save_interval=200",
         "--weight_decay=0.0"),
    # IPO with a large beta: its squared loss stops at a margin of 1/(2 beta), so the policy stays
    # near the SFT model. Measured on these tasks after 400 SFT steps (held-out reward accuracy,
    # SFT loss change): beta 2 / 150 steps 0.84, +4%; beta 1.5 / 200 steps 0.84-0.94, -1% to +2%;
    # beta 1 / 200 steps 0.93, +7%; beta 0.5, lr 1e-3, 300 steps: SFT loss +16%. After 600 / 800
    # SFT steps, beta 1.5 / 200 steps: 0.87, +5% / 0.90-0.92, +5% to +7%.
    dpo=("--max_iters=200", "--train_batch_size=16", "--learning_rate=5e-4", "--min_lr=5e-5",
         "--warmup_iters=10", "--dpo_loss_type=ipo", "--dpo_beta=1.5",
         "--precompute_ref_logps=True", "--eval_interval=50", "--eval_iters=13",
         "--log_interval=10", "--save_interval=0", "--weight_decay=0.0"),
    sft_batches=("--train_batch_size=32", "--eval_iters=13"),  # 416 >= all 400 held-out records
    eval_samples=0,
    sample_tokens=48,
)
SMOKE = Plan(
    vocab_size=1024,
    max_train_bytes=200_000,
    seq_len=64,
    model=("--model_preset=debug", "--dim=32", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1"),
    pretrain=("--max_iters=2", "--train_batch_size=2", "--eval_interval=1", "--eval_iters=1",
              "--log_interval=1", "--save_interval=0", "--warmup_iters=1", "--valid_ratio=0.05"),
    sft=("--max_iters=2", "--eval_interval=1", "--log_interval=1", "--save_interval=0",
         "--warmup_iters=1"),
    dpo=("--max_iters=2", "--train_batch_size=2", "--eval_interval=1", "--eval_iters=1",
         "--log_interval=1", "--save_interval=0", "--warmup_iters=1"),
    sft_batches=("--train_batch_size=2", "--eval_iters=1"),
    eval_samples=4,
    sample_tokens=4,
)


# ----------------------------------------------------------------------------------------------
# running commands


@dataclass
class Step:
    """One command of a stage; ``capture``: also write its stdout to this file."""

    argv: list[str]
    capture: Path | None = None


def shown(argv: list[str], threads: int = 0) -> str:
    """The command as a user would type it from the repo root (paths relative to it), with the
    ``OMP_NUM_THREADS`` the demo gives it (``threads`` > 0)."""
    prefix = f"OMP_NUM_THREADS={threads} " if threads > 0 and argv[0] == PY else ""
    return prefix + shlex.join(rel(a) if a == PY else a for a in argv)


def rel(path: str | Path) -> str:
    """``path`` relative to the repo root when it lies inside it (shorter commands and tables)."""
    p = Path(os.path.abspath(path))  # not resolve(): the venv's python is a symlink
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def run_step(step: Step, threads: int = 0) -> None:
    """Run one command from the repo root, echoing it; stop the demo if it fails.

    ``threads`` > 0 sets the command's ``OMP_NUM_THREADS``. The demo uses one intra-op thread per
    process because its models are tiny: their ops gain little from a second thread, and on a busy
    machine every multi-threaded op waits for a descheduled thread (measured on a loaded 2-core VM:
    a 32x128 @ 128x128 matmul takes 15 ms with two threads, 0.01 ms with one).
    """
    print(f"\n$ {shown(step.argv, threads)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads > 0 else None
    if step.capture is None:
        returncode = subprocess.run(step.argv, cwd=ROOT, env=env).returncode
    else:
        proc = subprocess.run(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        print(proc.stdout, end="", flush=True)
        with step.capture.open("a", encoding="utf-8") as f:
            f.write(f"$ {shown(step.argv, threads)}\n{proc.stdout}\n")
        returncode = proc.returncode
    if returncode != 0:
        print(f"demo: the command above failed with exit status {returncode}", file=sys.stderr)
        sys.exit(returncode)


# ----------------------------------------------------------------------------------------------
# metrics read back from the artifacts (so a skipped stage still reports them)


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def logged(run_dir: Path, key: str) -> tuple[float | None, float | None]:
    """First and last value of ``key`` in ``run_dir/metrics.jsonl`` (None when never logged)."""
    values = [r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get(key) is not None]
    return (values[0], values[-1]) if values else (None, None)


def unigram_entropy(pretok_dir: Path) -> tuple[float, int]:
    """(H1 in nats/token, number of tokens) over every ``.bin`` token file in ``pretok_dir``."""
    import numpy as np

    from data_preprocess.token_file import open_tokens

    counts = np.zeros(0, dtype=np.int64)
    for path in sorted(pretok_dir.glob("*.bin")):
        c = np.bincount(open_tokens(path))
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
    total = int(counts.sum())
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum()), total


def tokenizer_fertility(tok_dir: Path) -> str:
    """Held-out bytes/token per language from the tokenizer's ``train_report.json``."""
    report = json.loads((tok_dir / "train_report.json").read_text(encoding="utf-8"))
    stats = sorted(report.get("heldout", {}).items())
    text = " ".join(f"{lang} {s['bytes'] / s['tokens']:.2f}" for lang, s in stats)
    return text or "(no held-out text)"


def exact_match(report: Path) -> tuple[float, str]:
    """Overall accuracy and the per-task accuracies of an ``evaluate_chat`` report."""
    r = json.loads(report.read_text(encoding="utf-8"))
    return r["accuracy"], ", ".join(f"{task} {v['accuracy']:.2f}"
                                    for task, v in r["by_task"].items())


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# the stages


@dataclass
class Metric:
    name: str
    before: str
    after: str


@dataclass
class Stage:
    name: str
    outputs: list[Path]  # removed before the stage (re)runs
    steps: list[Step]
    measure: Callable[[], list[Metric]] = lambda: []
    artifacts: list[Path] = field(default_factory=list)
    seconds: float | None = None  # None: skipped (finished in an earlier run)
    metrics: list[Metric] = field(default_factory=list)


def build_stages(out: Path, plan: Plan, pretrain_data: Path) -> tuple[list[Stage], dict]:
    """The pipeline as data: each stage's commands, outputs and how to measure it."""
    tok, tok_sp, pretok = out / "tokenizer", out / "tokenizer_sp", out / "pretok"
    pre, sft, dpo = out / "pretrain", out / "sft", out / "dpo"
    tasks, dpo_sft_eval = out / "tasks", out / "dpo_sft_eval"
    sft_data, dpo_data = tasks / "sample_sft", tasks / "sample_dpo"
    heldout = sft_data / "heldout.jsonl"
    train = [PY, "train.py"]
    common = [f"--tokenizer_dir={rel(tok)}", *plan.model, f"--max_seq_len={plan.seq_len}"]
    evaluate = [PY, "-m", "utils.evaluate_chat", f"--data={rel(heldout)}", "--max_new_tokens=16"]
    evaluate += [f"--max_samples={plan.eval_samples}"] if plan.eval_samples else []
    em = {name: out / f"exact_match_{name}.json" for name in ("pretrain", "sft", "dpo")}
    samples = out / "samples.txt"
    pngs = {name: out / f"curves_{name}.png" for name in ("pretrain", "sft", "dpo")}
    targets: dict = {}

    def tokenizer_metrics() -> list[Metric]:
        return [Metric(f"held-out bytes/token ({kind})", "1.00 (bytes)", tokenizer_fertility(path))
                for kind, path in (("hf_bbpe", tok), ("sp_bbpe", tok_sp))]

    def pretok_metrics() -> list[Metric]:
        h1, n = unigram_entropy(pretok)
        targets["h1"] = h1
        return [Metric("tokens / unigram entropy", f"{n:,} tokens", f"H1 {h1:.3f} nats/token")]

    def pretrain_metrics() -> list[Metric]:
        first, last = logged(pre, "val_loss")
        targets["pretrain"] = (first, last)
        h1 = fmt(targets.get("h1"))
        return [Metric("val loss (nats/token)", fmt(first), f"{fmt(last)} (H1 {h1})")]

    def sft_metrics() -> list[Metric]:
        before, _ = exact_match(em["pretrain"])
        after, per_task = exact_match(em["sft"])
        targets["exact_match"] = (before, after)
        first, last = logged(sft, "val_loss")
        return [Metric("held-out SFT loss", fmt(first), fmt(last)),
                Metric("held-out exact match", fmt(before), f"{fmt(after)} ({per_task})")]

    def dpo_metrics() -> list[Metric]:
        acc0, acc = logged(dpo, "val_rewards/accuracy")
        _, sft_loss = logged(sft, "val_loss")
        dpo_loss, _ = logged(dpo_sft_eval, "val_loss")
        after_em, _ = exact_match(em["dpo"])
        targets["dpo"] = (acc, sft_loss, dpo_loss)
        change = f" ({100 * (dpo_loss / sft_loss - 1):+.1f}%)" if sft_loss and dpo_loss else ""
        return [Metric("held-out reward accuracy", f"{fmt(acc0)} (policy = ref)", fmt(acc)),
                Metric("held-out SFT loss", fmt(sft_loss), fmt(dpo_loss) + change),
                Metric("held-out exact match", fmt(targets["exact_match"][1]), fmt(after_em))]

    stages = [
        Stage("tokenizer", [tok, tok_sp], [
            Step([PY, "-m", "tokenizer.train_tokenizer", f"--tokenizer_type={kind}",
                  f"--data_dir={rel(pretrain_data)}", f"--vocab_size={plan.vocab_size}",
                  f"--max_train_bytes={plan.max_train_bytes}", f"--out_dir={rel(path)}"])
            for kind, path in (("hf_bbpe", tok), ("sp_bbpe", tok_sp))
        ], tokenizer_metrics, [tok, tok_sp]),
        Stage("pretokenize", [pretok], [
            Step([PY, "-m", "data_preprocess.pretokenize_pretrain_data",
                  f"--data_dir={rel(pretrain_data)}", f"--tokenizer_dir={rel(tok)}",
                  f"--out_dir={rel(pretok)}", "--num_workers=2"]),
            Step([PY, "-m", "data_preprocess.build_pretrain_sample_index_map",
                  f"--data_dir={rel(pretok)}", f"--max_seq_len={plan.seq_len}"]),
        ], pretok_metrics, [pretok]),
        Stage("pretrain", [pre], [
            Step([*train, "--task_type=pretrain", f"--data_dir={rel(pretok)}", *common,
                  f"--out_dir={rel(pre)}", *plan.pretrain]),
        ], pretrain_metrics, [pre]),
        # The lookup tier of the generated tasks (data/build_sft_data.py) plus first_letter: what
        # a model this small learns in minutes. With the copy tier mixed in, even the lookup
        # tasks were only half-learned in this budget, and the copy tasks not at all.
        Stage("sft", [tasks, sft, em["pretrain"], em["sft"]], [
            Step([PY, "-m", "data.build_sft_data", f"--tasks={plan.tasks}",
                  f"--out_dir={rel(tasks)}"]),
            Step([*evaluate, f"--model_dir={rel(pre)}", f"--output={rel(em['pretrain'])}"]),
            Step([*train, "--task_type=sft", f"--init_from={rel(pre)}",
                  f"--data_dir={rel(sft_data)}", *common, f"--out_dir={rel(sft)}", *plan.sft,
                  *plan.sft_batches]),
            Step([*evaluate, f"--model_dir={rel(sft)}", f"--output={rel(em['sft'])}"]),
        ], sft_metrics, [sft, em["sft"]]),
        Stage("dpo", [dpo, dpo_sft_eval, em["dpo"]], [
            Step([*train, "--task_type=dpo", f"--init_from={rel(sft)}",
                  f"--data_dir={rel(dpo_data)}", *common, f"--out_dir={rel(dpo)}", *plan.dpo]),
            # The held-out SFT loss of the DPO model: an evaluation-only SFT run (0 steps).
            Step([*train, "--task_type=sft", f"--init_from={rel(dpo)}",
                  f"--data_dir={rel(sft_data)}", *common, f"--out_dir={rel(dpo_sft_eval)}",
                  "--max_iters=0", "--eval_interval=1", *plan.sft_batches]),
            Step([*evaluate, f"--model_dir={rel(dpo)}", f"--output={rel(em['dpo'])}"]),
        ], dpo_metrics, [dpo, em["dpo"]]),
        Stage("generate", [samples], [
            Step([PY, "sample.py", f"--model_dir={rel(pre)}", "--prompt=The Debian system",
                  f"--max_new_tokens={plan.sample_tokens}", "--temperature=0.8", "--top_k=50"],
                 samples),
            *(Step([PY, "sample.py", f"--model_dir={rel(dpo)}", "--chat", f"--prompt={q}",
                    "--temperature=0", f"--max_new_tokens={plan.sample_tokens}"], samples)
              for q in plan.chat_prompts),
        ], artifacts=[samples]),
        Stage("plot", list(pngs.values()), [
            Step([PY, "-m", "utils.resplot", rel(run), f"--output={rel(pngs[name])}"])
            for name, run in (("pretrain", pre), ("sft", sft), ("dpo", dpo))
        ], artifacts=list(pngs.values())),
    ]
    return stages, targets


def run_stages(stages: list[Stage], out: Path, threads: int = 0) -> None:
    """Run each unfinished stage (clearing its old outputs first); measure every stage."""
    done_dir = out / ".done"
    done_dir.mkdir(parents=True, exist_ok=True)
    rerun_rest = False
    for stage in stages:
        marker = done_dir / stage.name
        print(f"\n=== {stage.name} ===", flush=True)
        if marker.exists() and not rerun_rest:
            print(f"(finished in an earlier run, see {rel(marker)}; `make demo FRESH=1` redoes it)")
        else:
            rerun_rest = True  # everything after a re-run stage depends on its new outputs
            marker.unlink(missing_ok=True)
            for path in stage.outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            start = time.perf_counter()
            for step in stage.steps:
                run_step(step, threads)
            stage.seconds = time.perf_counter() - start
            marker.write_text(json.dumps({"seconds": stage.seconds}))
        stage.metrics = stage.measure()


# ----------------------------------------------------------------------------------------------
# the summary


def check_targets(targets: dict) -> list[str]:
    """Issue 8's acceptance targets, each with what was reached."""
    lines = []
    if "pretrain" in targets and None not in targets["pretrain"]:
        first, last = targets["pretrain"]
        lines.append(f"pretrain val loss falls: {first:.3f} -> {last:.3f} (unigram entropy H1 "
                     f"{targets.get('h1', math.nan):.3f})  {'OK' if last < first else 'NOT MET'}")
    if "exact_match" in targets:
        before, after = targets["exact_match"]
        lines.append(f"SFT raises held-out exact match: {before:.3f} -> {after:.3f}  "
                     f"{'OK' if after > before else 'NOT MET'}")
    if "dpo" in targets and None not in targets["dpo"]:
        acc, before, after = targets["dpo"]
        ok = "OK" if acc > 0.8 else "NOT MET"
        lines.append(f"DPO held-out reward accuracy > 0.8: {acc:.3f}  {ok}")
        ok = "OK" if after <= 1.1 * before else "NOT MET"
        lines.append(f"DPO raises held-out SFT loss by <= 10%: {before:.3f} -> {after:.3f} "
                     f"({100 * (after / before - 1):+.1f}%)  {ok}")
    return lines


def summary(stages: list[Stage], targets: dict, wall: float) -> str:
    rows = [("stage", "time", "metric", "before", "after")]
    for s in stages:
        t = "skipped" if s.seconds is None else f"{s.seconds:.1f}s"
        for i, m in enumerate(s.metrics or [Metric("", "", "")]):
            rows.append((s.name if i == 0 else "", t if i == 0 else "", m.name, m.before, m.after))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += ["", "artifacts:"]
    lines += [f"  {s.name:<12} {', '.join(rel(a) for a in s.artifacts)}"
              for s in stages if s.artifacts]
    lines += ["", "targets:"] + [f"  {line}" for line in check_targets(targets)]
    lines += ["", f"total time this run: {wall:.1f}s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete the output dir and start over")
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="where every artifact goes")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: checks the wiring in about a minute")
    parser.add_argument("--pretrain_data", default=str(ROOT / "data/sample/pretrain"),
                        help="raw pretraining text (tokenizer and pretraining)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every command (0: keep the environment's)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stages, targets = build_stages(out, SMOKE if args.smoke else FULL, Path(args.pretrain_data))
    run_stages(stages, out, args.threads)
    text = summary(stages, targets, time.perf_counter() - start)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    print("\n=== summary ===\n" + text + f"\n\n(also in {rel(out / 'summary.txt')})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
