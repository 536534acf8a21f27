"""train.py --task_type=sft|dpo on the bundled data: runs, parallel equivalence, reference handling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from train_utils import ROOT, TINY, assert_close_series, column, losses, metrics, run_train

SEQ = 96
MODEL = [a for a in TINY if not a.startswith("--max_seq_len")] + [f"--max_seq_len={SEQ}"]


def subset(src: Path, dst: Path, lines: dict[str, int]) -> Path:
    dst.mkdir(parents=True)
    for name, n in lines.items():
        text = (src / name).read_text(encoding="utf-8").splitlines()[:n]
        (dst / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return subset(ROOT / "data/sample_sft", tmp_path_factory.mktemp("sft") / "data",
                  {"train.jsonl": 160, "heldout.jsonl": 32})


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory) -> Path:
    return subset(ROOT / "data/sample_dpo", tmp_path_factory.mktemp("dpo") / "data",
                  {"train.jsonl": 64, "heldout.jsonl": 16})


def sft_args(out: Path, data: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return ["--task_type=sft", f"--data_dir={data}", f"--tokenizer_dir={tokenizer_dir}", f"--out_dir={out}",
            *MODEL, "--max_iters=4", "--train_batch_size=4", "--gradient_accumulation_steps=2",
            "--eval_interval=4", "--lr_decay_iters=4", "--learning_rate=1e-3", *extra]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, sft_data, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("sft_run") / "run"
    run_train(sft_args(out, sft_data, tokenizer_dir))
    return out


def dpo_args(out: Path, data: Path, tokenizer_dir: Path, init: Path, *extra: str) -> list[str]:
    return ["--task_type=dpo", f"--data_dir={data}", f"--tokenizer_dir={tokenizer_dir}", f"--out_dir={out}",
            f"--init_from={init}", *MODEL, "--max_iters=3", "--train_batch_size=4",
            "--gradient_accumulation_steps=2", "--eval_interval=3", "--lr_decay_iters=3", "--learning_rate=1e-3",
            *extra]


def test_sft_trains_and_two_ranks_match(tmp_path, sft_data, tokenizer_dir, sft_run):
    val = column(sft_run, "val_loss")
    assert val[4] < val[0]
    out = tmp_path / "two"
    run_train(sft_args(out, sft_data, tokenizer_dir), nproc=2)
    assert_close_series(losses(out), losses(sft_run), atol=1e-5)
    assert_close_series(column(out, "val_loss"), val, atol=1e-5)


def test_sft_packing_trains(tmp_path, sft_data, tokenizer_dir):
    out = tmp_path / "packed"
    run_train(sft_args(out, sft_data, tokenizer_dir, "--sft_packing"))
    val = column(out, "val_loss")
    assert val[4] < val[0]


def test_dpo_starts_at_ln2_and_two_ranks_match(tmp_path, dpo_data, tokenizer_dir, sft_run):
    out = tmp_path / "dpo"
    run_train(dpo_args(out, dpo_data, tokenizer_dir, sft_run))
    # The policy starts as the reference, so the first evaluation's sigmoid loss is exactly ln 2
    # and every implicit reward is 0.
    first = next(r for r in metrics(out) if "val_loss" in r)
    assert first["iter"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["val_rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert set(column(out, "rewards/accuracy")) == {1, 2, 3}
    two = tmp_path / "dpo2"
    run_train(dpo_args(two, dpo_data, tokenizer_dir, sft_run), nproc=2)
    assert_close_series(losses(two), losses(out), atol=1e-5)


def test_precomputed_reference_logps_give_the_same_losses(tmp_path, dpo_data, tokenizer_dir, sft_run):
    frozen, table = tmp_path / "frozen", tmp_path / "table"
    run_train(dpo_args(frozen, dpo_data, tokenizer_dir, sft_run))
    run_train(dpo_args(table, dpo_data, tokenizer_dir, sft_run, "--precompute_ref_logps"))
    assert_close_series(losses(table), losses(frozen), atol=1e-5)
    assert_close_series(column(table, "val_loss"), column(frozen, "val_loss"), atol=1e-5)


def test_dpo_resume_keeps_init_weights_as_reference(tmp_path, dpo_data, tokenizer_dir, sft_run):
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = ["--save_interval=1", "--max_iters=3"]
    run_train(dpo_args(straight, dpo_data, tokenizer_dir, sft_run, *extra))
    run_train(dpo_args(split, dpo_data, tokenizer_dir, sft_run, "--save_interval=1", "--max_iters=2"))
    run_train([f"--out_dir={split}", "--resume", "--max_iters=3"])
    assert losses(split) == losses(straight)


def test_dpo_resume_keeps_its_reference_when_the_init_run_saves_newer_checkpoints(
        tmp_path, dpo_data, tokenizer_dir, sft_run):
    """--init_from=RUN_DIR resolves to that run's newest checkpoint at the first start only: the
    SFT run going on (a newer checkpoint) must not change the reference of a resumed DPO run."""
    import shutil

    from utils.checkpoint import latest_valid_checkpoint

    sft_copy = tmp_path / "sft_copy"
    shutil.copytree(sft_run, sft_copy)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(dpo_args(straight, dpo_data, tokenizer_dir, sft_run, "--save_interval=1", "--max_iters=3"))
    run_train(dpo_args(split, dpo_data, tokenizer_dir, sft_copy, "--save_interval=1", "--max_iters=2"))
    before = latest_valid_checkpoint(sft_copy)
    run_train([f"--out_dir={sft_copy}", "--resume", "--max_iters=6"])  # the SFT run goes on
    assert latest_valid_checkpoint(sft_copy) != before
    run_train([f"--out_dir={split}", "--resume", "--max_iters=3"])
    assert losses(split) == losses(straight)
