"""Training throughput of our model vs transformers' LlamaForCausalLM, and FLOP/s vs a GEMM roof.

One training step = forward + backward + AdamW step, same config, batch, optimizer and thread
count for both models. Modes: fp32 eager, fp32 torch.compile, bf16 autocast (eager). Runs of
the two implementations are interleaved (order alternating per repeat) so machine noise hits
both alike; each cell is the median over repeats.

    python -m benchmarks.bench_model                 # both sizes, all modes (minutes on a CPU)
    python -m benchmarks.bench_model --quick         # small size, eager + bf16, short
    python -m benchmarks.bench_model --sizes=medium --modes=eager,compile --repeats=5

Columns: tokens/s of ours and of HF (sdpa attention), their ratio, our achieved model FLOP/s
(6N + 12 L H Q T per token, model/flops.py) and its fraction of the measured fp32 GEMM roof
(median FLOP/s of a large square fp32 matmul on the same threads).
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
    """Ours and HF's Llama with the same architecture (and the same initial weights)."""
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
        models = {name: torch.compile(m) for name, m in models.items()}
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


def gemm_roof(n: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of an n x n x n fp32 matmul (2 n^3 FLOPs) on the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def bench_cell(size: str, mode: str, steps: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of ours and HF for one (size, mode), runs interleaved."""
    _, batch, seq_len = SIZES[size]
    torch.manual_seed(0)
    models = build_models(size, mode)
    x = torch.randint(0, VOCAB, (batch, seq_len))
    y = torch.cat((x[:, 1:], torch.full((batch, 1), -100)), dim=1)
    step_fns = {name: make_step(name, m, mode, x, y) for name, m in models.items()}
    for fn in step_fns.values():
        for _ in range(warmup):  # includes compilation for mode=compile
            fn()
    samples: dict[str, list[float]] = {name: [] for name in step_fns}
    for r in range(repeats):
        order = list(step_fns) if r % 2 == 0 else list(reversed(step_fns))
        for name in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                step_fns[name]()
            samples[name].append(batch * seq_len * steps / (time.perf_counter() - t0))
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
    roof = gemm_roof()
    print(
        f"threads={torch.get_num_threads()}  fp32 GEMM roof (2048^3): {roof / 1e9:.1f} GFLOP/s  "
        f"kernels: {get_kernels('auto').describe()}"
    )
    header = (
        f"{'size':<7} {'mode':<8} {'ours tok/s':>11} {'HF tok/s':>11} {'ratio':>6} "
        f"{'ours GFLOP/s':>13} {'of roof':>8}"
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for mode in args.modes:
            r = bench_cell(size, mode, args.steps, args.warmup, args.repeats)
            achieved = r["ours"] * r["flops_per_token"]
            print(
                f"{size:<7} {mode:<8} {r['ours']:>11.0f} {r['hf']:>11.0f} "
                f"{r['ours'] / r['hf']:>6.2f} "
                f"{achieved / 1e9:>13.1f} {achieved / roof:>8.1%}",
                flush=True,
            )


if __name__ == "__main__":
    run_cli(main)
