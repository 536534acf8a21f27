"""The one training entry point: pretrain | sft | dpo, one process or many under torchrun.

    python train.py --task_type=pretrain --data_dir=DIR --tokenizer_dir=DIR --out_dir=out/run
    torchrun --nproc_per_node=2 train.py ... same flags ...
    python train.py --resume --out_dir=out/run

Reading order: ``main`` → ``setup_run`` (config, process group, logging) → ``build_task`` →
``build_model`` → ``build_optimizer`` → ``train`` (the loop) → ``train_step`` (one optimizer step)
and ``evaluate``. Checkpoint save/restore is at the bottom.

Global batch: ``train_batch_size × gradient_accumulation_steps`` sequences per optimizer step,
whatever the number of ranks: each rank runs ``gradient_accumulation_steps / world_size``
micro-batches, and the sampler hands every rank its slice of the same global batch (SPEC §10).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
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
from utils.tasks import LanguageModelingTask, Task, to_device

logger = get_logger("train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainState:
    """Everything about the loop's position that a checkpoint must restore."""

    iter: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_iter: int | None = None
    sampler: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# set-up


def setup_run(argv: list[str]) -> tuple[Config, DistContext]:
    """Config (validated before anything is written), process group, logging, saved config."""
    cfg = resolve_config(argv)
    validate_paths(cfg)
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


def validate_paths(cfg: Config) -> None:
    for key in ("data_dir", "tokenizer_dir"):
        value = getattr(cfg.data, key)
        if not value and not cfg.data.data_mix:
            raise ConfigError(f"config key '{key}' is required for task_type={cfg.task.task_type}")
        if value and not Path(value).exists():
            raise ConfigError(f"config key '{key}': {value!r} does not exist")


def build_task(cfg: Config, tokenizer: Any) -> Task:
    """The datasets and loss for ``task_type``."""
    if cfg.task.task_type == "pretrain":
        from dataset.dataset_pretrain import PretokDatasetWithIndex

        common = dict(seed=cfg.task.seed, valid_ratio=cfg.data.valid_ratio)
        train_set = PretokDatasetWithIndex(cfg.data.data_dir, cfg.model.max_seq_len, split="train", **common)
        valid_set = PretokDatasetWithIndex(cfg.data.data_dir, cfg.model.max_seq_len, split="valid", **common)
        return LanguageModelingTask(train_set, valid_set)
    raise ConfigError(f"task_type={cfg.task.task_type} is not available yet")


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


def build_model(cfg: Config, vocab_size: int, ctx: DistContext) -> nn.Module:
    """A fresh model, or weights from ``--init_from`` (a run dir or a Hugging Face Llama dir)."""
    from model.modeling_z2all import Z2allForCausalLM

    torch.manual_seed(cfg.task.seed)  # identical initial weights on every rank
    if cfg.task.init_from:
        model = Z2allForCausalLM.from_pretrained(
            cfg.task.init_from, kernels=cfg.model.kernels,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
        )
        logger.info("initialised from %s", cfg.task.init_from)
    else:
        model = Z2allForCausalLM(model_config(cfg, vocab_size))
    model = model.to(device=ctx.device, dtype=DTYPES[cfg.optim.dtype])
    logger.info("model: %s parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    return model


def build_optimizer(cfg: Config, model: nn.Module) -> MixedPrecisionOptimizer:
    o = cfg.optim
    return MixedPrecisionOptimizer(
        model, lr=o.learning_rate, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2),
        grad_clip=o.grad_clip,
        loss_scaler=make_loss_scaler(DTYPES[o.dtype], o.initial_loss_scale),
    )


def wrap_data_parallel(cfg: Config, model: nn.Module, ctx: DistContext) -> nn.Module:
    """The model as the training step sees it: itself on one rank, else a DDP wrapper."""
    if not ctx.is_distributed:
        return model
    from parallel.distributed_data_parallel import wrap_model

    p = cfg.parallel
    return wrap_model(
        model, ctx, p.ddp_impl, bucket_size=p.bucket_size, overlap_grad_reduce=p.overlap_grad_reduce,
        grad_reduce_in_fp32=p.grad_reduce_in_fp32, comm_hook=p.comm_hook,
    )


# ----------------------------------------------------------------------------------------------
# the training step


def train_step(
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer,
    task: Task,
    batches: list[dict[str, torch.Tensor]],
    ctx: DistContext,
    lr: float,
    iteration: int,
) -> tuple[float, StepResult, int]:
    """Forward/backward over this rank's micro-batches, gradient sync, one optimizer step.

    Each micro-batch's loss SUM is divided by the number of loss units in the whole global batch
    (all ranks) and multiplied by the world size, because data-parallel gradient averaging
    divides by it again. The gradient is then exactly that of the global-batch mean loss.
    Returns (global mean loss, step result, global loss units).
    """
    local_count = torch.tensor(float(sum(task.count(b) for b in batches)))
    all_reduce(local_count, ctx.world_size)
    global_count = int(local_count.item())
    if global_count == 0:
        raise DataError("a global batch has no target tokens (every label is -100)")
    scale = ctx.world_size / global_count
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        with nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
            sums = task.loss(model, to_device(batch, ctx.device))
            optimizer.scale_loss(sums.loss_sum * scale).backward()
        loss_sum += sums.loss_sum.detach().double().cpu()
    if hasattr(model, "finish_grad_sync"):
        model.finish_grad_sync()
    maybe_inject("step", iteration, ctx.rank)  # fault-injection tests: die between backward and step
    result = optimizer.step(lr)
    all_reduce(loss_sum, ctx.world_size)
    return float(loss_sum) / global_count, result, global_count


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, cfg: Config, ctx: DistContext) -> float:
    """Mean loss over the first ``eval_iters`` micro-batches of the valid split, on every rank.

    The samples are fixed (the first ``eval_iters × train_batch_size``), micro-batches are dealt
    round-robin to ranks and the sums all-reduced, so the number is the same for any world size.
    """
    model.eval()
    bs = cfg.optim.train_batch_size
    n = min(len(task.valid_set), cfg.ckpt.eval_iters * bs)
    totals = torch.zeros(2, dtype=torch.float64)  # loss sum, count
    for start in range(ctx.rank * bs, n, bs * ctx.world_size):
        batch = task.collate([task.valid_set[i] for i in range(start, min(start + bs, n))])
        sums = task.loss(model, to_device(batch, ctx.device))
        totals += torch.tensor([float(sums.loss_sum), sums.count], dtype=torch.float64)
    all_reduce(totals, ctx.world_size)
    model.train()
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# the loop


def train(argv: list[str]) -> int:
    cfg, ctx = setup_run(argv)
    try:
        return _train(cfg, ctx)
    finally:
        destroy_distributed()


def _train(cfg: Config, ctx: DistContext) -> int:
    from dataset.sampler import GlobalBatchSampler, rank_micro_batches
    from tokenizer.tokenization import load_tokenizer, padded_vocab_size

    seed_everything(cfg.task.seed + ctx.rank)
    tokenizer = load_tokenizer(cfg.data.tokenizer_dir)
    task = build_task(cfg, tokenizer)
    model = build_model(cfg, padded_vocab_size(len(tokenizer)), ctx)
    optimizer = build_optimizer(cfg, model)
    o, c = cfg.optim, cfg.ckpt
    sampler = GlobalBatchSampler(len(task.train_set), o.train_batch_size, o.gradient_accumulation_steps,
                                 seed=cfg.task.seed)
    state = TrainState()
    if c.resume:
        restore(cfg, ctx, model, optimizer, sampler, state)
    train_model = wrap_data_parallel(cfg, torch.compile(model) if cfg.model.compile else model, ctx)
    # On resume the logger drops metrics rows (and TensorBoard points) past the checkpoint.
    metrics = MetricsLogger(c.out_dir, enabled=ctx.is_main, tensorboard=c.tensorboard,
                            resume_iter=state.iter if c.resume else None)

    def heartbeat(phase: str) -> None:
        """Progress signal for monitor_process.py's hang detection (rank 0 writes it)."""
        if ctx.is_main:
            touch_heartbeat(c.out_dir, state.iter, phase)

    heartbeat("startup")
    decay_iters = o.lr_decay_iters or o.max_iters
    tokens_per_step = o.train_batch_size * o.gradient_accumulation_steps * cfg.model.max_seq_len
    logger.info("training %d → %d steps, global batch %d sequences (%d tokens)", state.iter, o.max_iters,
                o.train_batch_size * o.gradient_accumulation_steps, tokens_per_step)

    if c.eval_interval and state.iter == 0:
        heartbeat("eval")
        val_loss = evaluate(train_model, task, cfg, ctx)
        metrics.log(0, {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
    t_last = time.perf_counter()
    while state.iter < o.max_iters:
        it = state.iter
        lr = cosine_lr(it, o.learning_rate, o.min_lr, o.warmup_iters, decay_iters)
        indices = rank_micro_batches(sampler.next_global_batch(), ctx.rank, ctx.world_size)
        batches = [task.collate([task.train_set[i] for i in mb]) for mb in indices]
        if hasattr(train_model, "zero_grad_buffer"):
            train_model.zero_grad_buffer()
        optimizer.zero_grad()
        loss, result, units = train_step(train_model, optimizer, task, batches, ctx, lr, it + 1)
        state.iter = it + 1
        state.tokens_seen += units
        state.sampler = sampler.state_dict()
        heartbeat("step")

        if state.iter % c.log_interval == 0 or state.iter == o.max_iters:
            dt = time.perf_counter() - t_last
            steps = state.iter % c.log_interval or c.log_interval
            t_last = time.perf_counter()
            metrics.log(state.iter, {
                "loss": loss, "lr": lr, "grad_norm": result.grad_norm,
                "tokens_per_sec": tokens_per_step * steps / dt, "step_ms": 1000 * dt / steps,
                "loss_scale": result.loss_scale, "skipped_steps": getattr(optimizer.loss_scaler, "skipped_steps", 0),
                "epoch": getattr(sampler, "epoch", 0),
            })
        if c.eval_interval and (state.iter % c.eval_interval == 0 or state.iter == o.max_iters):
            heartbeat("eval")
            val_loss = evaluate(train_model, task, cfg, ctx)
            metrics.log(state.iter, {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            if val_loss < state.best_val_loss:
                state.best_val_loss, state.best_iter = val_loss, state.iter
        if (c.save_interval and state.iter % c.save_interval == 0) or state.iter == o.max_iters:
            heartbeat("checkpoint_write")
            save(cfg, ctx, model, optimizer, state)
    metrics.close()
    logger.info("done: %d steps, checkpoint in %s", state.iter, ckpt.checkpoint_root(c.out_dir))
    return 0


# ----------------------------------------------------------------------------------------------
# checkpoints


def save(cfg: Config, ctx: DistContext, model: nn.Module, optimizer: MixedPrecisionOptimizer,
         state: TrainState) -> None:
    trainer_state = {
        "iter": state.iter, "tokens_seen": state.tokens_seen, "best_val_loss": state.best_val_loss,
        "best_iter": state.best_iter, "world_size": ctx.world_size, "config": cfg.to_dict(),
    }
    path = ckpt.save_checkpoint(
        cfg.ckpt.out_dir, state.iter, ctx.rank,
        save_model=model.save_pretrained,
        shared_state={"optimizer": optimizer.state_dict(), "sampler": state.sampler},
        rank_state={"rng": rng_state()},
        trainer_state=trainer_state,
        barrier=lambda: barrier(ctx.world_size),
        before_commit=lambda: maybe_inject("checkpoint_write", state.iter, ctx.rank),
    )
    logger.info("saved checkpoint %s", path)


def restore(cfg: Config, ctx: DistContext, model: nn.Module, optimizer: MixedPrecisionOptimizer,
            sampler: Any, state: TrainState) -> None:
    """Load the newest valid checkpoint of ``out_dir`` into the freshly built objects."""
    path = ckpt.latest_valid_checkpoint(cfg.ckpt.out_dir)
    if path is None:
        # A run that died before its first save: the monitor adds --resume to every restart.
        logger.warning("--resume: no valid checkpoint under %s yet; starting from iteration 0",
                       ckpt.checkpoint_root(cfg.ckpt.out_dir))
        return
    trainer_state = ckpt.load_trainer_state(path)
    from model.modeling_z2all import Z2allForCausalLM

    loaded = Z2allForCausalLM.from_pretrained(path / ckpt.MODEL_SUBDIR, dtype=DTYPES[cfg.optim.dtype])
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(ckpt.load_state(path, "optimizer"))
    state.sampler = ckpt.load_state(path, "sampler")
    sampler.load_state_dict(state.sampler)
    saved_world = trainer_state["world_size"]
    if saved_world == ctx.world_size:
        set_rng_state(ckpt.load_state(path, "rng", ctx.rank))
    else:
        logger.warning("resuming %d-rank checkpoint on %d ranks: RNG streams start fresh", saved_world,
                       ctx.world_size)
    state.iter = trainer_state["iter"]
    state.tokens_seen = trainer_state["tokens_seen"]
    state.best_val_loss = trainer_state["best_val_loss"]
    state.best_iter = trainer_state["best_iter"]
    saved_max_iters = trainer_state["config"]["optim"]["max_iters"]
    if not cfg.optim.lr_decay_iters and saved_max_iters != cfg.optim.max_iters:
        logger.warning("max_iters changed %d → %d with lr_decay_iters=0: the cosine schedule now decays "
                       "over %d steps; set --lr_decay_iters to keep the schedule of the first run",
                       saved_max_iters, cfg.optim.max_iters, cfg.optim.max_iters)
    logger.info("resumed from %s at iteration %d", path, state.iter)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text())
        return 0
    return train(argv)


if __name__ == "__main__":
    run_cli(main)
