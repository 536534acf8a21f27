"""The one training entry point: pretrain | sft | dpo, one process or many under torchrun.

    python train.py --task_type=pretrain --data_dir=DIR --tokenizer_dir=DIR --out_dir=out/run
    torchrun --nproc_per_node=2 train.py ... same flags ...
    python train.py --resume --out_dir=out/run

Reading order: ``main`` → ``setup_run`` (config, process group, logging) → ``build_task`` →
``build_model`` → ``wrap_data_parallel`` → ``build_optimizer`` → ``train_loop`` → ``train_step``
(one optimizer step) and ``evaluate``. Checkpoint save/restore is at the bottom.

Global batch: ``train_batch_size × gradient_accumulation_steps`` sequences per optimizer step,
whatever the number of ranks: each rank runs ``gradient_accumulation_steps / world_size``
micro-batches, and the sampler hands every rank its slice of the same global batch (SPEC §10).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configurator import Config, help_text, resolve_config, save_config, wants_help
from optimizer.lr_schedule import cosine_lr
from optimizer.mixed_precision import MixedPrecisionOptimizer, StepResult, make_loss_scaler
from parallel.dist_context import DistContext, all_reduce, barrier, destroy_distributed, init_distributed
from utils import checkpoint as ckpt
from utils.errors import ConfigError, DataError, run_cli
from utils.fault_injection import maybe_inject
from utils.logging_utils import get_logger, setup_logging
from utils.metrics import MetricsLogger, touch_heartbeat
from utils.rng import rng_state, seed_everything, set_rng_state
from utils.tasks import LanguageModelingTask, PreferenceTask, Task, to_device

logger = get_logger("train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainState:
    """The loop's position: what a checkpoint's ``trainer_state.json`` restores."""

    iter: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # loss units (target tokens or pairs) trained on
    best_val_loss: float = math.inf  # of the best checkpoint: saved right after an eval
    best_iter: int | None = None
    last_eval: tuple[int, float] | None = None  # (iter, val_loss) of the latest eval
    reference_dir: str | None = None  # DPO: the model dir the frozen reference was loaded from


# ----------------------------------------------------------------------------------------------
# set-up


def setup_run(argv: list[str]) -> tuple[Config, DistContext]:
    """Config (validated before anything is written), process group, logging, saved config."""
    cfg = resolve_config(argv)
    validate_run_config(cfg)
    ctx = init_distributed()
    if cfg.optim.gradient_accumulation_steps % ctx.world_size:
        raise ConfigError(
            f"gradient_accumulation_steps={cfg.optim.gradient_accumulation_steps} must divide by the "
            f"world size {ctx.world_size} (each rank runs an equal share of the global batch)"
        )
    out_dir = Path(cfg.ckpt.out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
    setup_logging(out_dir / "train.log", rank=ctx.rank, world_size=ctx.world_size)
    logger.info("run dir %s, world size %d, device %s (%s)", out_dir, ctx.world_size, ctx.device, ctx.backend)
    return cfg, ctx


def validate_run_config(cfg: Config) -> None:
    """Checks that need the task: required paths exist, flag combinations make sense."""
    from model.kernels import get_kernels

    get_kernels(cfg.model.kernels)  # e.g. --kernels=triton without CUDA: an error before any output
    d, t, p = cfg.data, cfg.task, cfg.parallel
    required = ["tokenizer_dir"] + ([] if d.data_mix else ["data_dir"])
    for key in required:
        value = getattr(d, key)
        if not value:
            raise ConfigError(f"config key '{key}' is required for task_type={t.task_type}")
        if not Path(value).exists():
            raise ConfigError(f"config key '{key}': {value!r} does not exist")
    if d.data_mix and t.task_type != "pretrain":
        raise ConfigError("config key 'data_mix' applies to task_type=pretrain only")
    if d.data_mix and not d.use_dataset_with_index:
        raise ConfigError("data_mix reads every source through its sample index: "
                          "use_dataset_with_index=false applies to a single data_dir only")
    if t.task_type == "dpo" and not t.init_from:
        raise ConfigError("task_type=dpo needs --init_from (the SFT model; it is also the reference)")
    if t.init_from and not Path(t.init_from).exists():
        raise ConfigError(f"config key 'init_from': {t.init_from!r} does not exist")
    if p.use_distributed_optimizer and (p.ddp_impl != "my" or p.comm_hook != "allreduce"):
        raise ConfigError("use_distributed_optimizer (ZeRO-1) needs ddp_impl=my and comm_hook=allreduce")
    if p.overlap_optim_step and not p.use_distributed_optimizer:
        raise ConfigError("overlap_optim_step steps ZeRO-1 shards per bucket: it needs use_distributed_optimizer")


def build_task(cfg: Config, ctx: DistContext) -> Task:
    """The datasets and loss for ``task_type`` (pretrain and SFT share the LM loss)."""
    d, m, t = cfg.data, cfg.model, cfg.task
    split_args = dict(seed=t.seed, valid_ratio=d.valid_ratio)
    if t.task_type == "pretrain":
        from dataset.dataset_pretrain import PretokDataset, PretokDatasetWithIndex, check_pretrain_tokenizer

        if d.data_mix:
            from dataset.mixing import mixed_pretrain_dataset

            make = lambda split: mixed_pretrain_dataset(d.data_mix, m.max_seq_len, split, **split_args)  # noqa: E731
        else:
            # The same samples either way; without the index their starts are computed.
            cls = PretokDatasetWithIndex if d.use_dataset_with_index else PretokDataset
            make = lambda split: cls(d.data_dir, m.max_seq_len, split, **split_args)  # noqa: E731
        train_set = make("train")
        check_pretrain_tokenizer(train_set, d.tokenizer_dir)
        return LanguageModelingTask(train_set, make("valid"))
    if t.task_type == "sft":
        from dataset.dataset_sft import SFTDataset, check_record_format

        if not (Path(d.data_dir) / "sft_meta.json").is_file():  # raw files, not pretokenized
            check_record_format(d.data_dir, d.sft_type)
        train_set, valid_set = (
            SFTDataset(d.data_dir, m.max_seq_len, split, tokenizer_dir=d.tokenizer_dir,
                       packing=d.sft_packing, **split_args)
            for split in ("train", "valid")
        )
        return LanguageModelingTask(train_set, valid_set, collate_fn=train_set.collate, pad_id=train_set.pad_id)
    from dataset.dataset_dpo import DPODataset

    train_set, valid_set = (
        DPODataset(d.data_dir, m.max_seq_len, split, tokenizer_dir=d.tokenizer_dir, **split_args)
        for split in ("train", "valid")
    )
    return PreferenceTask(train_set, valid_set, train_set.collate, beta=t.dpo_beta,
                          loss_type=t.dpo_loss_type, label_smoothing=t.dpo_label_smoothing,
                          pad_id=train_set.pad_id)


def model_config(cfg: Config, vocab_size: int) -> Any:
    from model.configuration_z2all import Z2allConfig

    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim")
                 if getattr(m, k)}
    return Z2allConfig.from_preset(
        m.model_preset, vocab_size=vocab_size, max_seq_len=m.max_seq_len, norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        gradient_checkpointing=m.gradient_checkpointing, kernels=m.kernels, **overrides,
    )


def build_model(cfg: Config, vocab_size: int, ctx: DistContext, weights_dir: str | Path | None = None) -> nn.Module:
    """A fresh model, or one loaded from ``weights_dir`` (a run dir or a Hugging Face Llama dir)."""
    from model.modeling_z2all import Z2allForCausalLM

    dtype = DTYPES[cfg.optim.dtype]
    torch.manual_seed(cfg.task.seed)  # identical initial weights on every rank
    if weights_dir:
        model = Z2allForCausalLM.from_pretrained(
            weights_dir, dtype=dtype, kernels=cfg.model.kernels,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
        )
    else:
        model = Z2allForCausalLM(model_config(cfg, vocab_size))
    return model.to(device=ctx.device, dtype=dtype)


def wrap_data_parallel(cfg: Config, model: nn.Module, ctx: DistContext) -> nn.Module:
    """The model as the training step sees it: itself on one rank, else a DDP wrapper.

    On one rank our DDP is still used for ZeRO-1 (its buffers are what the optimizer shards) and
    for 16-bit params with grad_reduce_in_fp32: its fp32 grad buffer accumulates the micro-batches
    as on several ranks, where autograd would add them up in bf16/fp16 in ``param.grad``.
    """
    p = cfg.parallel
    fp32_grads_for_16bit = DTYPES[cfg.optim.dtype] != torch.float32 and p.grad_reduce_in_fp32
    if not ctx.is_distributed and not (p.use_distributed_optimizer or fp32_grads_for_16bit):
        return model
    from parallel.distributed_data_parallel import wrap_model

    impl = p.ddp_impl if ctx.is_distributed else "my"  # torch's DDP needs a process group
    return wrap_model(
        model, ctx, impl, bucket_size=p.bucket_size, overlap_grad_reduce=p.overlap_grad_reduce,
        grad_reduce_in_fp32=p.grad_reduce_in_fp32, comm_hook=p.comm_hook, powersgd_rank=p.powersgd_rank,
        powersgd_start_iter=p.powersgd_start_iter,
        powersgd_min_compression_rate=p.powersgd_min_compression_rate, seed=cfg.task.seed,
    )


def build_optimizer(cfg: Config, model: nn.Module, train_model: nn.Module) -> Any:
    """AdamW with fp32 masters: whole on every rank, or sharded across ranks (ZeRO-1)."""
    o, p = cfg.optim, cfg.parallel
    common = dict(lr=o.learning_rate, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2),
                  grad_clip=o.grad_clip, loss_scaler=make_loss_scaler(DTYPES[o.dtype], o.initial_loss_scale))
    if p.use_distributed_optimizer:
        from parallel.distributed_optimizer import DistributedOptimizer

        return DistributedOptimizer(train_model, overlap_param_gather=p.overlap_param_gather,
                                    overlap_optim_step=p.overlap_optim_step, **common)
    return MixedPrecisionOptimizer(model, **common)


# ----------------------------------------------------------------------------------------------
# one optimizer step, and evaluation


def train_step(
    model: nn.Module,
    optimizer: Any,
    task: Task,
    batches: list[dict[str, torch.Tensor]],
    ctx: DistContext,
    lr: float,
    iteration: int,
) -> tuple[dict[str, float], StepResult, int, int]:
    """Forward/backward over this rank's micro-batches, gradient sync, one optimizer step.

    Each micro-batch's loss SUM is divided by the number of loss units in the whole global batch
    (all ranks) and multiplied by the world size, because data-parallel gradient averaging
    divides by it again. The gradient is then exactly that of the global-batch mean loss, for
    any world size and accumulation split. Returns (global means of loss and task metrics,
    step result, global loss units, global input tokens without padding).
    """
    # float64: exact integer sums far beyond the 2**24 of float32
    local = torch.tensor([sum(task.count(b) for b in batches),
                          sum(task.input_tokens(b) for b in batches)], dtype=torch.float64)
    all_reduce(local, ctx.world_size)
    global_count, global_tokens = (int(v) for v in local.tolist())
    if global_count == 0:
        raise DataError("a global batch has no target tokens (every label is -100)")
    scale = ctx.world_size / global_count
    sums = {k: torch.zeros((), dtype=torch.float64) for k in ("loss", *task.metric_names)}
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        with nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
            out = task.loss(model, to_device(batch, ctx.device))
            optimizer.scale_loss(out.loss_sum * scale).backward()
        for key, value in {"loss": out.loss_sum, **out.metric_sums}.items():
            sums[key] += value.detach().double().cpu()
    if hasattr(model, "finish_grad_sync") and not getattr(optimizer, "owns_grad_sync", False):
        model.finish_grad_sync()
    maybe_inject("step", iteration, ctx.rank)  # fault-injection tests: die between backward and step
    result = optimizer.step(lr)
    return global_means(sums, global_count, ctx), result, global_count, global_tokens


def global_means(sums: dict[str, torch.Tensor], count: float, ctx: DistContext) -> dict[str, float]:
    """All-reduce per-rank sums (in a fixed key order) and divide by the global count."""
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys])
    all_reduce(packed, ctx.world_size)
    return {k: float(v) / count for k, v in zip(keys, packed)}


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, cfg: Config, ctx: DistContext) -> dict[str, float]:
    """Mean loss (and task metrics) over the first ``eval_iters`` micro-batches of the valid split.

    The samples are fixed (the first ``eval_iters × train_batch_size``), micro-batches are dealt
    round-robin to ranks and the sums all-reduced, so the result is the same for any world size.
    Every rank takes part, so no rank waits on a collective the others never reach.
    """
    model.eval()
    bs = cfg.optim.train_batch_size
    n = min(len(task.valid_set), cfg.ckpt.eval_iters * bs)
    # Every rank reports every key, even a rank that got no validation batch.
    sums = {k: torch.zeros((), dtype=torch.float64) for k in ("loss", *task.metric_names)}
    count = torch.zeros((), dtype=torch.float64)
    for start in range(ctx.rank * bs, n, bs * ctx.world_size):
        batch = task.collate([task.valid_set[i] for i in range(start, min(start + bs, n))])
        out = task.loss(model, to_device(batch, ctx.device))
        for key, value in {"loss": out.loss_sum, **out.metric_sums}.items():
            sums[key] += value.double().cpu()
        count += out.count
    all_reduce(count, ctx.world_size)
    model.train()
    means = global_means(sums, max(float(count), 1.0), ctx)
    return {f"val_{k}": v for k, v in means.items()}


# ----------------------------------------------------------------------------------------------
# the run


def train(argv: list[str]) -> int:
    cfg, ctx = setup_run(argv)
    try:
        return run(cfg, ctx)
    finally:
        destroy_distributed()


def run(cfg: Config, ctx: DistContext) -> int:
    from dataset.sampler import GlobalBatchSampler
    from model.modeling_z2all import resolve_model_dir
    from tokenizer.tokenization import load_backend_tokenizer, padded_vocab_size

    o, c = cfg.optim, cfg.ckpt
    seed_everything(cfg.task.seed + ctx.rank)
    resume_from = ckpt.latest_valid_checkpoint(c.out_dir) if c.resume else None
    if c.resume and resume_from is None:
        # A run that died before its first save: the monitor adds --resume to every restart.
        logger.warning("--resume: no valid checkpoint under %s yet; starting from iteration 0",
                       ckpt.checkpoint_root(c.out_dir))
    tokenizer_vocab = load_backend_tokenizer(cfg.data.tokenizer_dir).get_vocab_size()
    vocab_size = padded_vocab_size(tokenizer_vocab)
    task = build_task(cfg, ctx)
    weights = resume_from / ckpt.MODEL_SUBDIR if resume_from else cfg.task.init_from
    model = build_model(cfg, vocab_size, ctx, weights)
    if model.config.vocab_size < tokenizer_vocab:
        raise DataError(
            f"{weights}: the model has {model.config.vocab_size} token embeddings but the tokenizer "
            f"{cfg.data.tokenizer_dir} has {tokenizer_vocab} tokens; pass the --tokenizer_dir the "
            "model was trained with"
        )
    state = TrainState()
    if isinstance(task, PreferenceTask):
        # The reference is its own copy of the --init_from weights, never a resumed policy. It
        # stays the checkpoint it was first read from: when --init_from is a run directory that
        # saved newer checkpoints meanwhile, a resumed run must not switch to one of them.
        pinned = ckpt.load_trainer_state(resume_from).get("reference_dir") if resume_from else None
        if pinned and not Path(pinned).is_dir():
            logger.warning("DPO reference %s no longer exists; loading the reference from %s again",
                           pinned, cfg.task.init_from)
            pinned = None
        state.reference_dir = pinned or str(resolve_model_dir(cfg.task.init_from).resolve())
        reference = build_model(cfg, vocab_size, ctx, state.reference_dir)
        task.set_reference(reference, cfg.task.precompute_ref_logps, o.train_batch_size, ctx.device)
    logger.info("model: %s parameters%s", f"{sum(p.numel() for p in model.parameters()):,}",
                f", weights from {weights}" if weights else "")
    train_model = wrap_data_parallel(cfg, torch.compile(model) if cfg.model.compile else model, ctx)
    optimizer = build_optimizer(cfg, model, train_model)
    sampler = GlobalBatchSampler(len(task.train_set), o.train_batch_size, o.gradient_accumulation_steps,
                                 seed=cfg.task.seed, shuffle=not cfg.data.data_mix)
    if resume_from is not None:
        restore(resume_from, cfg, ctx, train_model, optimizer, sampler, state)
    train_loop(cfg, ctx, task, model, train_model, optimizer, sampler, state)
    return 0


def train_loop(cfg: Config, ctx: DistContext, task: Task, model: nn.Module, train_model: nn.Module,
               optimizer: Any, sampler: Any, state: TrainState) -> None:
    from dataset.sampler import rank_micro_batches
    from model.flops import flops_per_token, mfu, peak_flops

    o, c = cfg.optim, cfg.ckpt
    # On --resume, rows logged after the checkpoint are dropped (they will be logged again); with no
    # checkpoint yet (state.iter 0: checkpoints are never taken at 0), every row of the attempt
    # that died, including its iter-0 eval.
    resume_iter = (state.iter or -1) if c.resume else None
    metrics = MetricsLogger(c.out_dir, enabled=ctx.is_main, tensorboard=c.tensorboard,
                            resume_iter=resume_iter)

    def heartbeat(phase: str) -> None:
        """Progress signal for monitor_process.py's hang detection (rank 0 writes it)."""
        if ctx.is_main:
            touch_heartbeat(c.out_dir, state.iter, phase)

    def run_eval() -> None:
        heartbeat("eval")
        results = evaluate(train_model, task, cfg, ctx)
        results["val_ppl"] = math.exp(min(results["val_loss"], 50.0))
        metrics.log(state.iter, results)
        state.last_eval = (state.iter, results["val_loss"])

    decay_iters = o.lr_decay_iters or o.max_iters
    flops_tok = flops_per_token(model, cfg.model.max_seq_len)
    peak = cfg.ckpt.peak_flops or peak_flops(ctx.device, DTYPES[o.dtype])
    logger.info("training steps %d → %d, global batch %d sequences", state.iter, o.max_iters,
                o.train_batch_size * o.gradient_accumulation_steps)
    heartbeat("startup")
    if c.eval_interval and state.iter == 0:
        run_eval()
    # Throughput over the training steps since the last log row: the time of each step (batch
    # building included; eval and checkpoint writes not) and the input tokens it processed
    # (all ranks, padding excluded).
    window_seconds, window_steps, window_tokens = 0.0, 0, 0
    while state.iter < o.max_iters:
        step_start = time.perf_counter()
        lr = cosine_lr(state.iter, o.learning_rate, o.min_lr, o.warmup_iters, decay_iters)
        indices = rank_micro_batches(sampler.next_global_batch(), ctx.rank, ctx.world_size)
        batches = [task.collate([task.train_set[i] for i in mb]) for mb in indices]
        if hasattr(train_model, "zero_grad_buffer"):
            train_model.zero_grad_buffer()
        optimizer.zero_grad()
        means, result, units, tokens = train_step(train_model, optimizer, task, batches, ctx, lr,
                                                  state.iter + 1)
        window_seconds += time.perf_counter() - step_start
        window_steps += 1
        window_tokens += tokens
        state.iter += 1
        state.tokens_seen += units
        heartbeat("step")
        if state.iter % c.log_interval == 0 or state.iter == o.max_iters:
            tokens_per_sec = window_tokens / window_seconds
            row = {**means, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_sec": tokens_per_sec,
                   "step_ms": 1000 * window_seconds / window_steps, "epoch": sampler.epoch}
            if peak:
                row["mfu"] = mfu(tokens_per_sec / ctx.world_size, flops_tok, peak)
            if optimizer.loss_scaler.dynamic:
                row.update(loss_scale=result.loss_scale, skipped_steps=optimizer.loss_scaler.skipped_steps)
            if ctx.device.type == "cuda":
                row["mem_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            metrics.log(state.iter, row)
            if hasattr(task.train_set, "describe"):  # --data_mix: epochs of every source so far
                logger.info("data mix: %s", task.train_set.describe(sampler.consumed_samples))
            window_seconds, window_steps, window_tokens = 0.0, 0, 0
        if c.eval_interval and (state.iter % c.eval_interval == 0 or state.iter == o.max_iters):
            run_eval()
        if (c.save_interval and state.iter % c.save_interval == 0) or state.iter == o.max_iters:
            heartbeat("checkpoint_write")
            # The best checkpoint is chosen among checkpoints: one saved right after an eval.
            if state.last_eval and state.last_eval[0] == state.iter and state.last_eval[1] < state.best_val_loss:
                state.best_val_loss, state.best_iter = state.last_eval[1], state.iter
            save(cfg, ctx, model, train_model, optimizer, sampler, state)
    metrics.close()
    logger.info("finished at step %d; checkpoints in %s", state.iter, ckpt.checkpoint_root(c.out_dir))


# ----------------------------------------------------------------------------------------------
# checkpoints


def save(cfg: Config, ctx: DistContext, model: nn.Module, train_model: nn.Module, optimizer: Any,
         sampler: Any, state: TrainState) -> None:
    """Write a checkpoint collectively (see utils/checkpoint.py for the layout)."""
    rank_state: dict[str, Any] = {"rng": rng_state()}
    if hasattr(train_model, "comm_hook_state_dict"):  # PowerSGD error feedback, per rank
        rank_state["comm_hook"] = train_model.comm_hook_state_dict()
    shared_state = {"sampler": sampler.state_dict()}
    if hasattr(optimizer, "sharded_state_dict"):  # ZeRO-1: each rank saves its own shard
        rank_state["optimizer"] = optimizer.sharded_state_dict()
    else:
        shared_state["optimizer"] = optimizer.state_dict()
    trainer_state = {
        "iter": state.iter, "tokens_seen": state.tokens_seen, "best_val_loss": state.best_val_loss,
        "best_iter": state.best_iter, "world_size": ctx.world_size, "config": cfg.to_dict(),
        "reference_dir": state.reference_dir,
    }
    path = ckpt.save_checkpoint(
        cfg.ckpt.out_dir, state.iter, ctx.rank,
        save_model=model.save_pretrained,
        shared_state=shared_state,
        rank_state=rank_state,
        trainer_state=trainer_state,
        barrier=lambda: barrier(ctx.world_size),
        before_commit=lambda: maybe_inject("checkpoint_write", state.iter, ctx.rank),
    )
    logger.info("saved checkpoint %s", path)


def restore(path: Path, cfg: Config, ctx: DistContext, train_model: nn.Module, optimizer: Any,
            sampler: Any, state: TrainState) -> None:
    """Load optimizer, data position, RNG and loop state (the weights are already loaded)."""
    trainer_state = ckpt.load_trainer_state(path)
    saved_world = trainer_state["world_size"]
    if hasattr(optimizer, "load_sharded_state_dicts"):  # ZeRO-1, saved with any world size
        optimizer.load_sharded_state_dicts(
            ckpt.load_state(path, "optimizer", rank) for rank in range(saved_world)
        )
    else:
        optimizer.load_state_dict(ckpt.load_state(path, "optimizer"))
    sampler.load_state_dict(ckpt.load_state(path, "sampler"))
    if saved_world == ctx.world_size:
        set_rng_state(ckpt.load_state(path, "rng", ctx.rank))
        if hasattr(train_model, "load_comm_hook_state_dict"):
            train_model.load_comm_hook_state_dict(ckpt.load_state(path, "comm_hook", ctx.rank))
    else:
        logger.warning("resuming a %d-rank checkpoint on %d ranks: per-rank RNG and comm-hook state "
                       "start fresh", saved_world, ctx.world_size)
    state.iter = trainer_state["iter"]
    state.tokens_seen = trainer_state["tokens_seen"]
    state.best_val_loss = trainer_state["best_val_loss"]
    state.best_iter = trainer_state["best_iter"]
    saved_max_iters = trainer_state["config"]["optim"]["max_iters"]
    if not cfg.optim.lr_decay_iters and saved_max_iters != cfg.optim.max_iters:
        logger.warning("max_iters changed %d → %d with lr_decay_iters=0: the cosine schedule now decays "
                       "over %d steps; set --lr_decay_iters to keep the first run's schedule",
                       saved_max_iters, cfg.optim.max_iters, cfg.optim.max_iters)
    logger.info("resumed from %s at step %d", path, state.iter)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text())
        return 0
    return train(argv)


if __name__ == "__main__":
    run_cli(main)
