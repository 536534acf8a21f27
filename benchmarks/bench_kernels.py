"""Benchmark our Triton kernels against their pure-torch references on a CUDA device.

    python -m benchmarks.bench_kernels [--tokens=8192] [--dtype=bfloat16] [--vocab_size=64320]

For each op (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) it times the forward pass and
forward + backward of `model.kernels.torch_ref` and of the Triton kernel with
`triton.testing.do_bench`, and measures the peak memory that one forward + backward allocates
on top of its inputs. Shapes default to the 1.7B preset (dim 2048, 16 heads of 128, ffn 5632,
vocab 64320) at 8192 tokens per step. Without CUDA it says so and exits: the Triton interpreter
would measure Python, not the kernels.
"""

import argparse
from collections.abc import Callable

import torch

from utils.errors import ConfigError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

Op = Callable[..., torch.Tensor]


def _measure(fn: Op, inputs: list[torch.Tensor]) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, peak MiB above the inputs) of ``fn(*inputs)``."""
    from triton.testing import do_bench

    grads = [t for t in inputs if t.requires_grad]

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd() -> None:
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    fwd_ms = do_bench(fwd)
    fwd_bwd_ms = do_bench(fwd_bwd, grad_to_none=grads)
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in grads:
        t.grad = None
    return fwd_ms, fwd_bwd_ms, peak_mib


def _cases(
    args: argparse.Namespace, dtype: torch.dtype, dev: str = "cuda"
) -> list[tuple[str, Op, Op, list]]:
    """(op name, torch reference, triton kernel, inputs) for every op, on device `dev`."""
    from model.kernels import torch_ref
    from model.kernels.triton_cross_entropy import linear_cross_entropy
    from model.kernels.triton_rmsnorm import rms_norm
    from model.kernels.triton_rope import apply_rotary
    from model.kernels.triton_swiglu import swiglu

    N, D = args.tokens, args.dim
    B, T = 1, N
    Dh, half = D // args.n_heads, D // args.n_heads // 2

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_(True)

    angles = torch.rand(B, T, half, device=dev) * 6
    cos, sin = angles.cos(), angles.sin()
    targets = torch.randint(0, args.vocab_size, (N,), device=dev)
    return [
        ("rms_norm", lambda x, w: torch_ref.rms_norm(x, w, 1e-5),
         lambda x, w: rms_norm(x, w, 1e-5), [leaf(N, D), leaf(D)]),
        ("apply_rotary", lambda q: torch_ref.apply_rotary(q, cos, sin),
         lambda q: apply_rotary(q, cos, sin), [leaf(B, T, args.n_heads, Dh)]),
        ("swiglu", torch_ref.swiglu, swiglu, [leaf(N, args.ffn_dim), leaf(N, args.ffn_dim)]),
        ("linear_cross_entropy", lambda h, w: torch_ref.linear_cross_entropy(h, w, targets),
         lambda h, w: linear_cross_entropy(h, w, targets),
         [leaf(N, D), leaf(args.vocab_size, D, scale=D**-0.5)]),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="rows per step (B*T)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n_heads", type=int, default=16)
    parser.add_argument("--ffn_dim", type=int, default=5632)
    parser.add_argument("--vocab_size", type=int, default=64320)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    setup_logging()
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA device (the Triton interpreter on CPU measures Python, "
              "not kernels); nothing to do here.")
        return
    if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
        raise ConfigError(f"--dim={args.dim} must split into --n_heads={args.n_heads} even heads")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    logger.info("device %s, dtype %s, %d tokens", torch.cuda.get_device_name(), dtype, args.tokens)
    header = (f"{'op':<22}{'impl':<8}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>11}"
              f"{'speed-up':>10}")
    print(header)
    print("-" * len(header))
    for name, ref, fused, inputs in _cases(args, dtype):
        ref_res = _measure(ref, inputs)
        fused_res = _measure(fused, inputs)
        for impl, (f, fb, mem) in (("torch", ref_res), ("triton", fused_res)):
            speedup = f"{ref_res[1] / fb:.2f}x" if impl == "triton" else ""
            print(f"{name:<22}{impl:<8}{f:>10.3f}{fb:>12.3f}{mem:>11.1f}{speedup:>10}")


if __name__ == "__main__":
    run_cli(main)
