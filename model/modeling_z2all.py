"""A Llama-style decoder-only transformer, readable top to bottom.

    RMSNorm -> RoPE -> grouped-query Attention -> SwiGLU MLP -> DecoderLayer -> Z2allModel
    -> Z2allForCausalLM (LM head, loss, KV cache, generate, save/load in HF Llama format)

Architecture: Touvron et al. 2023, "Llama 2" (https://arxiv.org/abs/2307.09288): pre-norm
RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention (Ainslie et al. 2023,
https://arxiv.org/abs/2305.13245), no biases, optionally tied input/output embeddings.

Module and parameter names are exactly those of Hugging Face's `LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...), so `state_dict()` *is* the HF checkpoint.
Our RoPE pairs dimension i with i + head_dim/2 ("rotate_half"), which is the layout HF's q/k
projection rows already use (HF's conversion script permutes Meta's interleaved-pair rows into
it), so weights move between the two with no permutation in either direction.

Every fused op goes through the kernel seam (`model/kernels`), chosen once per model.
Shapes: B batch, T new tokens, S = past + T keys, D dim, H heads, Hkv kv heads, Dh head_dim,
V vocab.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.configuration_z2all import Z2allConfig
from model.generation import generate
from model.kernels import Kernels, get_kernels
from model.kernels.attention import AttentionLayout, build_attention_layout, positions_from_doc_ids
from utils.errors import DataError

IGNORE_INDEX = -100
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # sharded HF checkpoints (large models)


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight; statistics in fp32 (see torch_ref.rms_norm)."""

    def __init__(self, dim: int, eps: float, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


# ------------------------------------------------------------------------------------------------
# RoPE: inverse frequencies (with theta and scaling), then cos/sin per token position
# ------------------------------------------------------------------------------------------------


def rope_inv_freq(config: Z2allConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """[Dh/2] fp32 rotation speed of each dimension pair: theta^(-2i/Dh), then scaled.

    Scaling (for contexts longer than pre-training):
    - linear (Chen et al. 2023, https://arxiv.org/abs/2306.15595): every frequency / factor,
      i.e. positions are interpolated;
    - llama3 (Llama 3.1): low frequencies (wavelength > original_len / low_freq_factor) are
      divided by factor, high ones (wavelength < original_len / high_freq_factor) are kept,
      and the band in between is interpolated smoothly.
    """
    dh = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dh, 2, device=device).float() / dh))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the low edge, 1 at the high edge
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, smoothed, inv_freq)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, T] -> cos, sin [B, T, Dh/2], always fp32.

    Angles reach max_seq_len * 1 rad; in bf16 (8 mantissa bits) position 2000 would be off by
    several radians, so cos/sin are computed and kept in fp32 whatever the model dtype.
    """
    angles = position_ids.float()[..., None] * inv_freq.float()  # (B, T, Dh/2)
    return angles.cos(), angles.sin()


# ------------------------------------------------------------------------------------------------
# Attention (grouped-query) and the KV cache
# ------------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of every layer for generation.

    k, v: [n_layers, B, max_len, Hkv, Dh]. `length` tokens (the same for every row; left
    padding is masked, not removed) are filled. Time is dimension 2 of the buffers and
    dimension 1 of what `update` returns.
    """

    def __init__(
        self,
        config: Z2allConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (config.n_layers, batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `layer`'s new k, v [B, T, Hkv, Dh]; return all its keys/values [B, S, Hkv, Dh]."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len={self.max_len}")
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer stored its n new tokens."""
        self.length += n


class Attention(nn.Module):
    """Causal self-attention with H query heads sharing Hkv key/value heads (GQA; MHA if equal)."""

    def __init__(self, config: Z2allConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.kernels = kernels

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        q = self.kernels.apply_rotary(q, cos, sin)
        k = self.kernels.apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, S, Hkv, Dh)
        y = self.kernels.attention(q, k, v, layout)  # (B, T, H, Dh)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))  # (B, T, D)


# ------------------------------------------------------------------------------------------------
# SwiGLU MLP, decoder layer
# ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): D -> hidden_dim -> D."""

    def __init__(self, config: Z2allConfig, kernels: Kernels) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: Z2allConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.self_attn = Attention(config, layer_idx, kernels)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.mlp = MLP(config, kernels)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, D)


# ------------------------------------------------------------------------------------------------
# The decoder stack
# ------------------------------------------------------------------------------------------------


class Z2allModel(nn.Module):
    """Embedding -> n_layers DecoderLayers -> final RMSNorm. Returns hidden states [B, T, D]."""

    def __init__(self, config: Z2allConfig, kernels: Kernels) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, kernels) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.varlen = kernels.backends["attention"] == "flash_attn"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask must be [B, past + T] = {[B, past + T]}, "
                f"got {list(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = default_position_ids(
                B, T, past, attention_mask, doc_ids, input_ids.device
            )
        # inv_freq is recomputed (Dh/2 numbers) rather than kept as a buffer, so that
        # model.to(torch.bfloat16) can never round it.
        cos, sin = rope_cos_sin(rope_inv_freq(self.config, input_ids.device), position_ids)
        layout = build_attention_layout(
            T, past, attention_mask, doc_ids, input_ids.device, varlen=self.varlen
        )

        x = self.embed_tokens(input_ids)  # (B, T, D)
        use_checkpointing = (
            self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        )
        for layer in self.layers:
            if use_checkpointing:  # keep only each layer's input; recompute the rest in backward
                x = checkpoint(layer, x, cos, sin, layout, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)  # (B, T, D)


def default_position_ids(
    B: int,
    T: int,
    past: int,
    attention_mask: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """[B, T] positions when the caller gives none.

    Packed rows restart at 0 per document; left-padded rows count only real tokens (so a
    padded prompt gets the same positions, hence logits, as the unpadded one); otherwise
    past, past+1, ...
    """
    if doc_ids is not None:
        return positions_from_doc_ids(doc_ids)
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    return torch.arange(past, past + T, device=device).expand(B, T)


# ------------------------------------------------------------------------------------------------
# Causal LM: LM head, loss, generation, persistence
# ------------------------------------------------------------------------------------------------


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, V] in the compute dtype; None with return_logits=False
    loss: torch.Tensor | None  # fp32 scalar: mean (or sum) CE over labels != -100
    num_tokens: torch.Tensor | None  # int64 scalar: how many labels != -100


class Z2allForCausalLM(nn.Module):
    """The language model. `forward(input_ids, labels)` -> logits and loss; labels are ALREADY
    shifted (labels[t] is the token after input_ids[t]); -100 labels are ignored."""

    def __init__(self, config: Z2allConfig) -> None:
        super().__init__()
        self.config = config
        self.kernels = get_kernels(config.kernels)
        self.model = Z2allModel(config, self.kernels)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Llama / HF init: every Linear and Embedding ~ N(0, initializer_range), norms = 1.
        With scale_residual_init the residual output projections (o_proj, down_proj) get
        std / sqrt(2 * n_layers) (GPT-2, Radford et al. 2019), two such adds per layer."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.config.scale_residual_init:
            for layer in self.model.layers:
                for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    nn.init.normal_(
                        proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers)
                    )
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head if tie_word_embeddings (Press, Wolf 2017)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_logits: bool = True,
        loss_reduction: str = "mean",
    ) -> CausalLMOutput:
        """
        input_ids [B, T] int64; labels [B, T] int64 (already shifted, -100 = ignore).
        attention_mask [B, past + T]: 1 real token, 0 padding (left-padded batches).
        position_ids [B, T]: default see `default_position_ids`.
        doc_ids [B, T]: packed rows; no attention across documents, positions restart.
        return_logits=False with labels: the loss goes through kernels.linear_cross_entropy
        on the hidden states, so the [B*T, V] fp32 logits are never materialised (training).
        loss_reduction: "mean" over non-ignored labels, or "sum" (for exact averaging over
        gradient-accumulation micro-batches with different token counts).
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        h = self.model(input_ids, attention_mask, position_ids, doc_ids, kv_cache)  # (B, T, D)
        logits = self.lm_head(h) if return_logits else None  # (B, T, V)
        loss = num_tokens = None
        if labels is not None:
            targets = labels.reshape(-1)  # (B*T,)
            num_tokens = (targets != IGNORE_INDEX).sum()
            if logits is not None:
                loss = F.cross_entropy(
                    logits.float().flatten(0, 1),
                    targets,
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            else:
                rows, row_targets = h.flatten(0, 1), targets  # (B*T, D), (B*T,)
                if not torch.compiler.is_compiling() and 2 * num_tokens < targets.numel():
                    # SFT and DPO label only the replies: most rows are prompt or padding, so
                    # skip their LM-head work (the largest matmul of a small model). The check
                    # syncs with the device and the shape is data-dependent: eager mode only.
                    keep = targets != IGNORE_INDEX
                    rows, row_targets = rows[keep], targets[keep]
                loss = self.kernels.linear_cross_entropy(
                    rows, self.lm_head.weight, row_targets, IGNORE_INDEX
                )
            if loss_reduction == "mean":
                loss = loss / num_tokens.clamp(min=1)  # all-ignored batch -> 0, not NaN
        return CausalLMOutput(logits=logits, loss=loss, num_tokens=num_tokens)

    # ---- generation ---------------------------------------------------------------------------

    def make_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    generate = generate  # model.generate(input_ids, ...): see model/generation.py

    # ---- bookkeeping --------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied matrix counts once); optionally without the embedding
        matrix (with tied embeddings that is also the LM head; see model/flops.py for the
        count that enters the FLOPs formula)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.model.embed_tokens.weight))
        return sum(p.numel() for p in params.values())

    # ---- Hugging Face Llama format ------------------------------------------------------------

    def save_pretrained(
        self, save_dir: str | os.PathLike, dtype: torch.dtype | None = None
    ) -> None:
        """Write `config.json` + `model.safetensors` that `LlamaForCausalLM.from_pretrained` loads.

        Files are written to temporary names and renamed, so a crash never leaves a torn file.
        dtype: cast the weights (e.g. torch.bfloat16 for a smaller export); default as they are.
        """
        from safetensors.torch import save_file

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        state = {
            name: t.detach().to(dtype or t.dtype).contiguous().cpu()
            for name, t in self.state_dict().items()
        }
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]  # HF re-ties it from tie_word_embeddings
        torch_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        _atomic_write(
            save_dir / WEIGHTS_NAME,
            lambda path: save_file(state, str(path), metadata={"format": "pt"}),
        )
        config = json.dumps(self.config.to_hf_dict(torch_dtype), indent=2) + "\n"
        _atomic_write(
            save_dir / "config.json", lambda path: path.write_text(config, encoding="utf-8")
        )

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, dtype: torch.dtype | None = torch.float32, **overrides
    ) -> Z2allForCausalLM:
        """Load an HF Llama directory (ours or any compatible one), or a train.py out_dir
        (then its newest valid checkpoint). `overrides` set runtime config fields such as
        kernels or gradient_checkpointing. dtype: cast on load (None keeps the file's)."""
        model_dir = resolve_model_dir(model_dir)
        config_path = model_dir / "config.json"
        try:
            hf_config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{config_path}: cannot read the model config ({e})") from None
        config = Z2allConfig.from_hf_dict(hf_config, source=str(config_path), **overrides)
        state = _load_safetensors(model_dir)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # some exporters write the tied copy too
            if "model.embed_tokens.weight" in state:
                state["lm_head.weight"] = state["model.embed_tokens.weight"]
        with torch.device("meta"):  # no time spent initialising weights we overwrite
            model = cls(config)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise DataError(
                f"{model_dir}: weights do not match config.json; missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, tensor in state.items():
            want = expected[name].shape
            if tensor.shape != want:
                raise DataError(
                    f"{model_dir}: {name} has shape {list(tensor.shape)}, "
                    f"config.json implies {list(want)}"
                )
        if dtype is not None:
            state = {name: t.to(dtype) for name, t in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()  # assign=True gave lm_head its own Parameter object: share again
        return model


def resolve_model_dir(model_dir: str | os.PathLike) -> Path:
    """A model directory as given, or the newest checkpoint's model dir of a train.py out_dir."""
    path = Path(model_dir)
    if (path / "config.json").is_file():
        return path
    if (path / "exp_config.json").is_file():
        from utils.checkpoint import latest_model_dir  # train.py's checkpoint layout

        return Path(latest_model_dir(path))
    raise DataError(
        f"{path}: not a model directory (no config.json) and not a train.py out_dir "
        "(no exp_config.json)"
    )


def _load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = model_dir / WEIGHTS_NAME, model_dir / WEIGHTS_INDEX_NAME
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
            return {k: v for shard in shards for k, v in load_file(str(model_dir / shard)).items()}
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise DataError(f"{model_dir}: cannot read the weights ({e})") from None
    raise DataError(f"{model_dir}: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) found")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
