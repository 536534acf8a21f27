"""train.py under torchrun on CPU (gloo): every parallel mode reproduces the single-process run.

The reference is a one-process run of the same config and global batch; the parallel runs must
match its per-step losses within 1e-5 (SPEC §6: "Every parallel mode trains to the same numbers
as a single process on the same global batch").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from train_utils import TINY, assert_close_series, column, losses, run_train

from utils.checkpoint import latest_valid_checkpoint

COMMON = ["--max_iters=6", "--train_batch_size=4", "--gradient_accumulation_steps=2", "--eval_interval=6",
          "--save_interval=3", "--lr_decay_iters=6", "--bucket_size=2000", "--learning_rate=1e-3"]


def pretrain_args(out: Path, pretok_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return ["--task_type=pretrain", f"--data_dir={pretok_dir}", f"--tokenizer_dir={tokenizer_dir}",
            f"--out_dir={out}", *TINY, *COMMON, *extra]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, pretok_dir, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run_train(pretrain_args(out, pretok_dir, tokenizer_dir))
    return out


MODES = {
    "my-ddp": ["--ddp_impl=my"],
    "my-ddp-overlap": ["--ddp_impl=my", "--overlap_grad_reduce"],
    "torch-ddp": ["--ddp_impl=torch"],
    "zero1-all-overlaps": ["--use_distributed_optimizer", "--overlap_grad_reduce", "--overlap_param_gather",
                           "--overlap_optim_step"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_match_single_process(tmp_path, pretok_dir, tokenizer_dir, single_process, mode):
    out = tmp_path / mode
    run_train(pretrain_args(out, pretok_dir, tokenizer_dir, *MODES[mode]), nproc=2)
    assert_close_series(losses(out), losses(single_process), atol=1e-5)
    assert_close_series(column(out, "val_loss"), column(single_process, "val_loss"), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_zero1_resumes_on_another_world_size(tmp_path, pretok_dir, tokenizer_dir, single_process,
                                             saved_on, resumed_on):
    """A ZeRO-1 checkpoint written at step 3 continues on another world size like the straight run
    (each rank saves its own shard as parameter pieces, which reshard to any layout)."""
    out = tmp_path / "reshard"
    args = pretrain_args(out, pretok_dir, tokenizer_dir, "--use_distributed_optimizer")
    run_train([*args, "--max_iters=3"], nproc=saved_on)
    saved = latest_valid_checkpoint(out)
    assert not (saved / "optimizer.pt").exists()  # sharded: one optimizer file per rank
    assert sorted(p.name for p in saved.glob("optimizer_rank*.pt")) == [
        f"optimizer_rank{r:05d}.pt" for r in range(saved_on)]
    run_train([f"--out_dir={out}", "--resume", "--max_iters=6"], nproc=resumed_on)
    assert_close_series(losses(out), losses(single_process), atol=1e-5)


def test_grad_accumulation_must_divide_by_world_size(tmp_path, pretok_dir, tokenizer_dir):
    r = run_train(pretrain_args(tmp_path / "x", pretok_dir, tokenizer_dir, "--gradient_accumulation_steps=3"),
                  nproc=2, check=False)
    assert r.returncode != 0 and "gradient_accumulation_steps=3 must divide" in r.stderr


def run_straight_and_resumed(tmp_path: Path, args: list[str], nproc: int, total: int, split_at: int):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train([*args(straight), f"--max_iters={total}"], nproc=nproc)
    run_train([*args(split), f"--max_iters={split_at}"], nproc=nproc)
    run_train([f"--out_dir={split}", "--resume", f"--max_iters={total}"], nproc=nproc)
    return straight, split


def test_zero1_resume_on_same_world_size_is_exact(tmp_path, pretok_dir, tokenizer_dir):
    def args(out):
        return pretrain_args(out, pretok_dir, tokenizer_dir, "--use_distributed_optimizer", "--overlap_grad_reduce")

    straight, split = run_straight_and_resumed(tmp_path, args, nproc=2, total=6, split_at=3)
    assert losses(split) == losses(straight)


def test_powersgd_trains_comparably_and_resumes_exactly(tmp_path, pretok_dir, tokenizer_dir, single_process):
    """PowerSGD (rank 2, compressing from step 2) keeps its error feedback across a resume."""
    def args(out):
        return pretrain_args(out, pretok_dir, tokenizer_dir, "--comm_hook=powersgd", "--powersgd_rank=2",
                             "--powersgd_start_iter=2", "--overlap_grad_reduce")

    straight, split = run_straight_and_resumed(tmp_path, args, nproc=2, total=6, split_at=3)
    assert losses(split) == losses(straight)
    ref, ours = losses(single_process), losses(straight)
    drop_ref, drop_ours = ref[1] - ref[6], ours[1] - ours[6]
    assert drop_ours > 0.5 * drop_ref, (ref, ours)


@pytest.mark.parametrize("hook", ["fp16", "bf16"])
def test_compression_hooks_stay_close(tmp_path, pretok_dir, tokenizer_dir, single_process, hook):
    out = tmp_path / hook
    run_train(pretrain_args(out, pretok_dir, tokenizer_dir, f"--comm_hook={hook}"), nproc=2)
    assert_close_series(losses(out), losses(single_process), atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, mode", [(1, []), (2, MODES["zero1-all-overlaps"])],
                         ids=["one-rank", "zero1-all-overlaps"])
def test_compiled_model_matches_eager_single_process(tmp_path, pretok_dir, tokenizer_dir,
                                                      single_process, nproc, mode):
    """--compile (Inductor): the compiled model trains to the eager numbers, also under ZeRO-1
    with every overlap, whose hooks (gradient-ready hooks, parameter all-gather before each
    module's forward) then wrap a compiled module."""
    out = tmp_path / "compiled"
    run_train(pretrain_args(out, pretok_dir, tokenizer_dir, "--compile", *mode), nproc=nproc,
              timeout=600)
    assert_close_series(losses(out), losses(single_process), atol=1e-5)
    assert_close_series(column(out, "val_loss"), column(single_process, "val_loss"), atol=1e-5)
