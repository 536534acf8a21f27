"""Training FLOPs per token, model FLOPs utilisation (MFU) and a parameter count report.

FLOPs per token (Chowdhery et al. 2022, PaLM, appendix B; https://arxiv.org/abs/2204.02311):

    6 N + 12 L H Q T

- 6 N: every weight matrix costs 2 FLOPs per token per parameter in the forward pass
  (multiply + add) and 4 in the backward (input and weight gradients). N counts the matrices
  that are multiplied: every parameter except the input embedding table (a lookup), with the
  LM head counted even when it is tied to that table.
- 12 L H Q T: attention scores and the weighted sum of values, forward + backward, for L layers,
  H heads of size Q over a context of T tokens. Like PaLM we count the full T x T square, not
  the causal half, so numbers compare across codebases.

MFU = achieved FLOPs / peak FLOPs of the hardware (dense, no sparsity).

    python -m model.flops --preset=1.7b --seq_len=2048
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from model.configuration_z2all import PRESETS, Z2allConfig
from utils.errors import ConfigError, run_cli

# Dense peak FLOP/s per GPU for BF16 matmuls with FP32 accumulation, from the vendor data sheets
# (FP16 for the V100, which has no BF16). Where a sheet prints only the 2:4-sparse figure, this
# is half of it (e.g. H100 NVL: 1,671 TFLOPS sparse). Matched by substring of
# torch.cuda.get_device_name(); the longest matching key wins, so "NVIDIA L40S" is an L40S (not
# an L40 or L4) and "NVIDIA H100 NVL" an H100 NVL (not an H100 SXM).
PEAK_BF16_FLOPS = {
    "H200": 989e12,  # H200 SXM
    "H200 NVL": 835e12,
    "H100": 989e12,  # H100 SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 125e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
}


def matmul_parameters(model: nn.Module) -> int:
    """N of the formula: every parameter except the input embedding lookup; the LM head counts
    even when it shares the embedding matrix, because it is still multiplied."""
    n = model.num_parameters(exclude_embeddings=True)
    if model.config.tie_word_embeddings:
        n += model.lm_head.weight.numel()
    return n


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) of a Z2allForCausalLM at context seq_len."""
    cfg = model.config
    return 6 * matmul_parameters(model) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def mfu(tokens_per_sec: float, flops_per_tok: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the hardware peak."""
    return tokens_per_sec * flops_per_tok / peak_flops


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak dense 16-bit FLOP/s of one `device`, or None when unknown (CPU, fp32, other GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    key = max((k for k in PEAK_BF16_FLOPS if k in name), key=len, default=None)
    return None if key is None else PEAK_BF16_FLOPS[key]


def parameter_report(model: nn.Module) -> str:
    """A small table: parameters per component, the total, without the embedding, and the N
    of the FLOPs formula."""
    groups = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head (untied)": 0}
    for name, p in model.named_parameters():  # named_parameters lists a tied matrix once
        if "embed_tokens" in name:
            groups["embedding"] += p.numel()
        elif "self_attn" in name:
            groups["attention"] += p.numel()
        elif ".mlp." in name:
            groups["mlp"] += p.numel()
        elif "norm" in name:
            groups["norms"] += p.numel()
        else:
            groups["lm_head (untied)"] += p.numel()
    rows = list(groups.items()) + [
        ("total", model.num_parameters()),
        ("non-embedding", model.num_parameters(exclude_embeddings=True)),
        ("multiplied per token (N)", matmul_parameters(model)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>15,}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    from model.modeling_z2all import Z2allForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="1.7b", help=f"one of {sorted(PRESETS)}")
    parser.add_argument(
        "--seq_len", type=int, default=None, help="default: the preset's max_seq_len"
    )
    parser.add_argument("--vocab_size", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    config = Z2allConfig.from_preset(args.preset, kernels="torch", **overrides)
    seq_len = args.seq_len or config.max_seq_len
    if seq_len <= 0:
        raise ConfigError(f"--seq_len must be positive, got {seq_len}")
    with torch.device("meta"):  # shapes only, no memory
        model = Z2allForCausalLM(config)
    print(parameter_report(model))
    print(f"FLOPs/token (train, T={seq_len}): {flops_per_token(model, seq_len):,}")


if __name__ == "__main__":
    run_cli(main)
