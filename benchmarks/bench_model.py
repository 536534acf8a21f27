"""Training throughput of our model vs transformers' LlamaForCausalLM, and FLOP/s vs a GEMM roof.

One training step = forward + backward + AdamW step, same config, batch, optimizer and thread
count for both models. Modes: fp32 eager, fp32 torch.compile, bf16 autocast (eager). Within a
cell every contestant (ours, HF, the GEMM roof; in compile mode also HF eager) is timed once
per repeat, in an order that rotates from repeat to repeat, so machine noise hits all alike;
each number is the median over repeats.

    python -m benchmarks.bench_model                 # both sizes, all modes (minutes on a CPU)
    python -m benchmarks.bench_model --quick         # small size, eager + bf16, short
    python -m benchmarks.bench_model --sizes=medium --modes=eager,compile --repeats=5
    python -m benchmarks.bench_model --threads=1 --clock=cpu   # robust on a shared machine

Columns (markdown): tokens/s of ours and of HF (sdpa attention) and their ratio; in compile
rows also ours (compiled) over HF eager; our achieved model FLOP/s (6N + 12 L H Q T per token,
model/flops.py), the fp32 GEMM roof (FLOP/s of a 2048^3 fp32 matmul on the same threads,
measured between the runs of the cell) and our fraction of it.

--clock=cpu times process CPU seconds instead of wall seconds. With --threads=1 that is the
work done, whatever other jobs take the cores meanwhile; with more threads it also counts
OpenMP threads spinning at barriers, so use it with --threads=1.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from model.configuration_z2all import Z2allConfig
from model.flops import flops_per_token
from model.kernels import get_kernels
from model.modeling_z2all import Z2allForCausalLM
from utils.errors import ConfigError, run_cli

SIZES = {  # name: (model config, batch size, sequence length)
    "small": (dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=688), 8, 256),
    "medium": (dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1376), 4, 512),
}
MODES = ("eager", "compile", "bf16")
VOCAB = 8192


def build_models(size: str, mode: str) -> dict[str, torch.nn.Module]:
    """Ours and HF's Llama with the same architecture (and the same initial weights); in
    compile mode both compiled, plus an eager HF copy ("hf eager") as the baseline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape, _, seq_len = SIZES[size]
    cfg = Z2allConfig(vocab_size=VOCAB, max_seq_len=seq_len, kernels="auto", **shape)
    ours = Z2allForCausalLM(cfg)
    hf_cfg = LlamaConfig(
        **{
            k: v
            for k, v in cfg.to_hf_dict().items()
            if k not in ("architectures", "model_type", "torch_dtype")
        }
    )
    hf = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    hf.load_state_dict(ours.state_dict())
    models = {"ours": ours.train(), "hf": hf.train()}
    if mode == "compile":
        hf_eager = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
        hf_eager.load_state_dict(ours.state_dict())
        models = {name: torch.compile(m) for name, m in models.items()}
        models["hf eager"] = hf_eager.train()
    return models


def make_step(
    name: str, model: torch.nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """A closure running one optimizer step. HF shifts labels itself, so it gets x as labels
    (same loss as ours with the pre-shifted y)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            if name == "ours":
                loss = model(x, labels=y, return_logits=False).loss
            else:
                loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


GEMM_N = 2048  # the roof: an n x n x n fp32 matmul, 2 n^3 FLOPs


def make_gemm(n: int = GEMM_N) -> Callable[[], None]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: a @ b


def bench_cell(
    size: str, mode: str, steps: int, warmup: int, repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median tokens/s of each model and median FLOP/s of the GEMM roof for one (size, mode).

    Each repeat times every contestant once (`steps` optimizer steps, or 3 GEMMs), the order
    rotating per repeat.
    """
    _, batch, seq_len = SIZES[size]
    torch.manual_seed(0)
    models = build_models(size, mode)
    x = torch.randint(0, VOCAB, (batch, seq_len))
    y = torch.cat((x[:, 1:], torch.full((batch, 1), -100)), dim=1)
    fns = {name: make_step(name.split()[0], m, mode, x, y) for name, m in models.items()}
    fns["roof"] = make_gemm()
    work = {name: batch * seq_len * steps for name in models}  # tokens per timed run
    work["roof"] = 2 * GEMM_N**3 * 3  # FLOPs per timed run
    for fn in fns.values():
        for _ in range(warmup):  # includes compilation for mode=compile
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = clock()
            for _ in range(3 if name == "roof" else steps):
                fns[name]()
            samples[name].append(work[name] / (clock() - t0))
    result = {name: statistics.median(v) for name, v in samples.items()}
    ours = models["ours"]
    result["flops_per_token"] = flops_per_token(getattr(ours, "_orig_mod", ours), seq_len)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,medium")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: torch's default")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall seconds, or process CPU seconds (robust to other jobs with --threads=1)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small size, eager + bf16, 2 repeats of 2 steps"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.modes, args.steps, args.warmup, args.repeats = (
            "small",
            "eager,bf16",
            2,
            1,
            2,
        )
    args.sizes, args.modes = args.sizes.split(","), args.modes.split(",")
    for value, valid, key in ((args.sizes, SIZES, "--sizes"), (args.modes, MODES, "--modes")):
        bad = [v for v in value if v not in valid]
        if bad:
            raise ConfigError(f"{key}: unknown {bad}; choose from {list(valid)}")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        raise ConfigError("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(
        f"threads={torch.get_num_threads()}  clock={args.clock}  steps={args.steps}  "
        f"repeats={args.repeats}  kernels: {get_kernels('auto').describe()}\n"
    )
    print(
        "| size | mode | ours tok/s | HF tok/s | ours / HF | ours / HF eager "
        "| ours GFLOP/s | roof GFLOP/s | of roof |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        _, batch, seq_len = SIZES[size]
        for mode in args.modes:
            r = bench_cell(size, mode, args.steps, args.warmup, args.repeats, clock)
            achieved = r["ours"] * r["flops_per_token"]
            vs_eager = f"{r['ours'] / r['hf eager']:.2f}" if "hf eager" in r else "-"
            print(
                f"| {size} (B={batch}, T={seq_len}) | {mode} | {r['ours']:.0f} | {r['hf']:.0f} "
                f"| {r['ours'] / r['hf']:.2f} | {vs_eager} | {achieved / 1e9:.1f} "
                f"| {r['roof'] / 1e9:.1f} | {achieved / r['roof']:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    run_cli(main)
