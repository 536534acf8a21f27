"""train.py end to end on a tiny model: accumulation equivalence, exact resume, mixed precision.

Every run is a real ``python train.py`` subprocess on pretokenized sample text, compared with
another run (an uninterrupted one, or a different accumulation split) — never with numbers
copied from our own output.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from train_utils import TINY, final_weights, losses, metrics, run_train


def train(out_dir: Path, pretok_dir: Path, tokenizer_dir: Path, *args: str, env: dict | None = None,
          check: bool = True):
    return run_train(["--task_type=pretrain", f"--data_dir={pretok_dir}", f"--tokenizer_dir={tokenizer_dir}",
                      f"--out_dir={out_dir}", *TINY, *args], env=env, check=check)


def test_gradient_accumulation_splits_agree(tmp_path, pretok_dir, tokenizer_dir):
    """(8, 1), (4, 2), (2, 4): the same global batch gives the same parameters after 5 steps."""
    weights = []
    for bs, accum in [(8, 1), (4, 2), (2, 4)]:
        out = tmp_path / f"b{bs}"
        train(out, pretok_dir, tokenizer_dir, "--max_iters=5", f"--train_batch_size={bs}",
              f"--gradient_accumulation_steps={accum}", "--eval_interval=0", "--save_interval=0",
              "--learning_rate=1e-3")
        weights.append(final_weights(out))
    for other in weights[1:]:
        for name, value in weights[0].items():
            torch.testing.assert_close(other[name], value, rtol=0, atol=1e-6)


def test_training_lowers_validation_loss(tmp_path, pretok_dir, tokenizer_dir):
    out = tmp_path / "run"
    train(out, pretok_dir, tokenizer_dir, "--max_iters=30", "--train_batch_size=8", "--eval_interval=30")
    val = [row["val_loss"] for row in metrics(out) if "val_loss" in row]
    assert len(val) == 2 and val[-1] < val[0] - 0.5, val
    assert (out / "exp_config.json").is_file() and (out / "train.log").is_file()


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, pretok_dir, tokenizer_dir):
    # lr_decay_iters is fixed so the schedule does not depend on max_iters (10 vs 20).
    common = ["--train_batch_size=4", "--gradient_accumulation_steps=2", "--eval_interval=5",
              "--save_interval=5", "--lr_decay_iters=20"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, pretok_dir, tokenizer_dir, "--max_iters=20", *common)
    train(split, pretok_dir, tokenizer_dir, "--max_iters=10", *common)
    train(split, pretok_dir, tokenizer_dir, "--resume", "--max_iters=20")
    assert losses(split) == losses(straight) and len(losses(split)) == 20
    assert [r for r in metrics(split) if "val_loss" in r] == [r for r in metrics(straight) if "val_loss" in r]
    a, b = final_weights(straight), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_checkpoint_write_then_resume(tmp_path, pretok_dir, tokenizer_dir):
    common = ["--train_batch_size=4", "--eval_interval=0", "--save_interval=4", "--lr_decay_iters=12"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(straight, pretok_dir, tokenizer_dir, "--max_iters=12", *common)
    r = train(crashed, pretok_dir, tokenizer_dir, "--max_iters=12", *common,
              env={"Z2ALL_FAULT": "kill@iter=8:phase=checkpoint_write"}, check=False)
    assert r.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert "iter_00000008.tmp" in ckpts and "iter_00000004" in ckpts
    train(crashed, pretok_dir, tokenizer_dir, "--resume", "--max_iters=12")
    assert losses(crashed) == losses(straight)
    a, b = final_weights(straight), final_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_trains(tmp_path, pretok_dir, tokenizer_dir, dtype):
    out = tmp_path / dtype
    train(out, pretok_dir, tokenizer_dir, "--max_iters=12", "--train_batch_size=8", f"--dtype={dtype}",
          "--eval_interval=12")
    val = [row["val_loss"] for row in metrics(out) if "val_loss" in row]
    assert val[-1] < val[0]
    weights = final_weights(out)
    assert all(w.dtype == getattr(torch, dtype) for w in weights.values())


def test_fp16_overflow_skips_steps_lowers_the_scale_and_trains_on(tmp_path, pretok_dir, tokenizer_dir):
    """A loss scale of 2**30 overflows fp16 gradients: those steps are skipped, the scale halves
    until gradients are finite, and training then proceeds."""
    out = tmp_path / "fp16"
    train(out, pretok_dir, tokenizer_dir, "--max_iters=16", "--train_batch_size=8", "--dtype=float16",
          "--initial_loss_scale=1073741824", "--eval_interval=16")
    rows = [r for r in metrics(out) if "loss" in r]
    scales = [r["loss_scale"] for r in rows]
    skipped = [r["skipped_steps"] for r in rows]
    assert scales[0] == 2.0**30 and scales[-1] < 2.0**30
    assert all(b == a / 2 or b == a for a, b in zip(scales, scales[1:]))
    assert 0 < skipped[-1] < 16 and skipped == sorted(skipped)
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val[-1] < val[0]


def test_bad_input_is_a_clear_error(tmp_path, pretok_dir, tokenizer_dir):
    r = train(tmp_path / "x", tmp_path / "missing", tokenizer_dir, "--max_iters=1", check=False)
    assert r.returncode == 2 and "data_dir" in r.stderr and "Traceback" not in r.stderr
    r = train(tmp_path / "y", pretok_dir, tokenizer_dir, "--resume", check=False)
    assert r.returncode == 2 and "no saved config" in r.stderr and "Traceback" not in r.stderr


def test_init_from_exported_hf_dir_continues_from_the_same_weights(tmp_path, pretok_dir, tokenizer_dir):
    """Export a run to Hugging Face format, then start a new run from it: same validation loss."""
    import subprocess
    import sys

    from train_utils import ROOT, column

    run = tmp_path / "run"
    train(run, pretok_dir, tokenizer_dir, "--max_iters=6", "--train_batch_size=8", "--eval_interval=6")
    hf_dir = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "utils.export_hf", f"--out_dir={run}", f"--hf_dir={hf_dir}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    again = tmp_path / "again"
    train(again, pretok_dir, tokenizer_dir, f"--init_from={hf_dir}", "--max_iters=0", "--eval_interval=1",
          "--train_batch_size=8")
    assert column(again, "val_loss")[0] == pytest.approx(column(run, "val_loss")[6], abs=1e-6)


def test_triton_kernels_without_cuda_fail_before_writing_anything(tmp_path, pretok_dir, tokenizer_dir):
    if torch.cuda.is_available():
        pytest.skip("with CUDA, --kernels=triton is valid")
    out = tmp_path / "run"
    r = train(out, pretok_dir, tokenizer_dir, "--kernels=triton", env={"TRITON_INTERPRET": "0"}, check=False)
    assert r.returncode == 2 and "triton" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_saved_config_starts_a_new_run_after_a_resume(tmp_path, pretok_dir, tokenizer_dir):
    run = tmp_path / "run"
    train(run, pretok_dir, tokenizer_dir, "--max_iters=2", "--eval_interval=0")
    train(run, pretok_dir, tokenizer_dir, "--resume", "--max_iters=3")
    fresh = tmp_path / "fresh"
    run_train([str(run / "exp_config.json"), f"--out_dir={fresh}", "--max_iters=1"])
    assert losses(fresh)[1] == losses(run)[1]


def test_resume_before_the_first_checkpoint_logs_every_row_once(tmp_path, pretok_dir, tokenizer_dir):
    """A run that dies before its first save restarts from 0 (the monitor adds --resume): the rows
    of the dead attempt, its iter-0 eval included, must not stay in metrics.jsonl."""
    common = ["--max_iters=4", "--train_batch_size=4", "--eval_interval=2", "--save_interval=10"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(straight, pretok_dir, tokenizer_dir, *common)
    r = train(crashed, pretok_dir, tokenizer_dir, *common, env={"Z2ALL_FAULT": "exit@iter=2"}, check=False)
    assert r.returncode != 0 and not list((crashed / "checkpoints").glob("iter_*"))
    assert any("val_loss" in row for row in metrics(crashed))  # the dead attempt did log
    train(crashed, pretok_dir, tokenizer_dir, *common, "--resume")
    keys = lambda rows: [(row["iter"], row.get("loss"), row.get("val_loss")) for row in rows]  # noqa: E731
    assert keys(metrics(crashed)) == keys(metrics(straight))


def test_a_new_run_into_an_existing_run_dir_is_refused(tmp_path, pretok_dir, tokenizer_dir):
    """Without --resume, an out_dir holding a run is an error that changes nothing in it."""
    run = tmp_path / "run"
    train(run, pretok_dir, tokenizer_dir, "--max_iters=2", "--eval_interval=0")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = train(run, pretok_dir, tokenizer_dir, "--max_iters=3", "--learning_rate=1e-3", check=False)
    assert r.returncode == 2 and "already holds a training run" in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_best_checkpoint_is_the_saved_one_with_the_lowest_val_loss(tmp_path, pretok_dir, tokenizer_dir):
    """Evals at 0, 2, ..., 12, saves at 4, 8, 12; a learning rate so high that the iter-0 eval is
    the lowest: the best must still be a checkpoint that exists, the best of 4, 8, 12."""
    import json

    from train_utils import column

    out = tmp_path / "run"
    train(out, pretok_dir, tokenizer_dir, "--max_iters=12", "--train_batch_size=4", "--eval_interval=2",
          "--save_interval=4", "--learning_rate=3", "--min_lr=3", "--warmup_iters=0")
    val = column(out, "val_loss")
    assert min(val, key=val.get) not in (4, 8, 12)  # the case this test is about
    expected = min((4, 8, 12), key=val.get)
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best == {"iter": expected, "val_loss": val[expected]}
    assert (out / "checkpoints" / f"iter_{expected:08d}").is_dir()


def test_init_from_a_model_with_fewer_embeddings_than_the_tokenizer_is_a_clear_error(
        tmp_path, pretok_dir, tokenizer_dir):
    from model.configuration_z2all import Z2allConfig
    from model.modeling_z2all import Z2allForCausalLM

    small = tmp_path / "small_vocab"
    Z2allForCausalLM(Z2allConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=32)
                     ).save_pretrained(small)
    r = train(tmp_path / "run", pretok_dir, tokenizer_dir, f"--init_from={small}", "--max_iters=1",
              check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "64 token embeddings" in r.stderr and str(small) in r.stderr


def test_without_the_index_file_training_sees_the_same_samples(tmp_path, pretok_dir, tokenizer_dir):
    """--use_dataset_with_index=false computes the sample starts from the .bin sizes: a copy of the
    data without its index trains to exactly the losses of the indexed run."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(pretok_dir, bare, ignore=shutil.ignore_patterns("*.idx"))
    assert not list(bare.glob("*.idx"))
    common = ["--max_iters=4", "--train_batch_size=4", "--eval_interval=4"]
    train(tmp_path / "indexed", pretok_dir, tokenizer_dir, *common)
    train(tmp_path / "bare_run", bare, tokenizer_dir, *common, "--use_dataset_with_index=false")
    assert metrics(tmp_path / "bare_run") and [
        (r["iter"], r.get("loss"), r.get("val_loss")) for r in metrics(tmp_path / "bare_run")
    ] == [(r["iter"], r.get("loss"), r.get("val_loss")) for r in metrics(tmp_path / "indexed")]


def test_data_from_another_tokenizer_is_a_clear_error(tmp_path, pretok_dir, tokenizer_dir):
    """The data's tokenizer fingerprint must match --tokenizer_dir (ids of another vocabulary
    would train silently on garbage)."""
    import json
    import shutil

    other = tmp_path / "other_tok"
    shutil.copytree(tokenizer_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text("utf-8"))
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]  # two ordinary tokens swap ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok), "utf-8")
    r = train(tmp_path / "run", pretok_dir, other, "--max_iters=1", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "different tokenizer" in r.stderr and str(other) in r.stderr


def test_bf16_micro_batches_accumulate_in_fp32_on_one_process(pretok_dir):
    """--dtype=bfloat16 with grad_reduce_in_fp32 (default): one process sums the micro-batch
    gradients in fp32, as several ranks do, not in bf16 in param.grad."""
    from configurator import build_config
    from dataset.dataset_pretrain import PretokDatasetWithIndex
    from model.configuration_z2all import Z2allConfig
    from model.modeling_z2all import Z2allForCausalLM
    from optimizer.mixed_precision import MixedPrecisionOptimizer, make_loss_scaler, model_grad
    from parallel.dist_context import DistContext
    from parallel.distributed_data_parallel import DistributedDataParallel
    from train import train_step, wrap_data_parallel
    from utils.tasks import LanguageModelingTask

    ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    ds = PretokDatasetWithIndex(pretok_dir, 32, "train")
    task = LanguageModelingTask(ds, ds)
    batches = [task.collate([ds[2 * k], ds[2 * k + 1]]) for k in range(24)]
    torch.manual_seed(0)
    model = Z2allForCausalLM(Z2allConfig(vocab_size=1024, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                         max_seq_len=32)).to(torch.bfloat16)
    reference = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    total = sum(task.count(b) for b in batches)
    for b in batches:  # each micro-batch's bf16 gradient, summed in float64
        model.zero_grad(set_to_none=True)
        (task.loss(model, b).loss_sum / total).backward()
        for r, p in zip(reference, model.parameters()):
            r += p.grad.double()
    model.zero_grad(set_to_none=True)
    assert wrap_data_parallel(build_config({}), model, ctx) is model  # fp32 run: left alone
    wrapped = wrap_data_parallel(build_config({"dtype": ("bfloat16", "test")}), model, ctx)
    assert isinstance(wrapped, DistributedDataParallel)
    optimizer = MixedPrecisionOptimizer(model, lr=0.0, weight_decay=0.0,
                                        loss_scaler=make_loss_scaler(torch.bfloat16))
    optimizer.step = lambda lr: None  # look at the gradients the step would use
    train_step(wrapped, optimizer, task, batches, ctx, 0.0, 1)
    got = [model_grad(p) for p in model.parameters()]
    assert {g.dtype for g in got} == {torch.float32}
    err = sum(((g.double() - r) ** 2).sum() for g, r in zip(got, reference)).sqrt()
    assert err / sum((r ** 2).sum() for r in reference).sqrt() < 1e-5


def test_throughput_rows_count_training_steps_only(tmp_path, pretok_dir, tokenizer_dir):
    """Eval and checkpoint time stay out of step_ms / tokens_per_sec, and the tokens are the
    ones processed (here no padding: batch × seq per step)."""
    import statistics

    out = tmp_path / "run"
    train(out, pretok_dir, tokenizer_dir, "--max_iters=8", "--train_batch_size=4", "--eval_interval=2",
          "--eval_iters=40", "--save_interval=3")
    rows = [r for r in metrics(out) if "step_ms" in r]
    assert [r["iter"] for r in rows] == list(range(1, 9))
    for r in rows:  # tokens per step = tokens_per_sec × step time
        assert r["tokens_per_sec"] * r["step_ms"] / 1000 == pytest.approx(4 * 32, rel=1e-6)
    # each eval is ~10 training steps of work; counted in, it would dominate the next row
    ms = [r["step_ms"] for r in rows]
    assert max(ms) < 5 * statistics.median(ms), ms
