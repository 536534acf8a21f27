"""Model configuration: the shape of a Llama-style decoder, its presets, and the HF mapping.

`Z2allConfig` is a plain dataclass (no transformers base class) so it is cheap to build,
compare and serialise. `to_hf_dict` / `from_hf_dict` translate to and from the keys of a
Hugging Face `LlamaConfig` (`config.json`), which is the on-disk format of every model
directory this project writes.

Presets (`Z2allConfig.from_preset(name, **overrides)`):

=======  ====  ======  =====  ========  ====  =====  ==========================================
name     dim   layers  heads  kv heads  ffn   vocab  parameters
=======  ====  ======  =====  ========  ====  =====  ==========================================
debug    64    2       4      2         192   512    164,160 (tests)
15m      288   6       6      6         768   32000  15,191,712, tied (llama2.c "stories15M")
100m     768   12      12     4         2048  32000  100,092,672, tied
1.7b     2048  32      16     8         5632  64320  1,773,537,280, untied (the original
                                                     llm-zero2all run; 1,773,404,160 in
                                                     its weight matrices)
=======  ====  ======  =====  ========  ====  =====  ==========================================

The vocab size is normally overridden with the tokenizer's (padded to a multiple of 64).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from utils.errors import ConfigError

ROPE_SCALING_TYPES = ("linear", "llama3")
KERNEL_MODES = ("auto", "torch", "triton")


def llama_ffn_dim(dim: int, multiple_of: int) -> int:
    """SwiGLU hidden size as in Llama: 2/3 of 4*dim (same parameters as a 4*dim GELU MLP),
    rounded up to a multiple of `multiple_of` (kernel-friendly). dim=2048, 256 -> 5632."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class Z2allConfig:
    """Shape and numerics of the model. All sizes are in elements, not bytes."""

    vocab_size: int = 32000
    dim: int = 768  # residual stream width (HF: hidden_size)
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # grouped-query attention; None -> n_heads (plain MHA)
    multiple_of: int = 256  # rounds the derived SwiGLU hidden size
    hidden_dim: int | None = None  # SwiGLU hidden size (HF: intermediate_size); None -> derived
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None | {"type": "linear", "factor": f}
    #      | {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #         "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02  # std of the normal init of every Linear / Embedding
    # GPT-2 style: the two residual output projections (o_proj, down_proj) get std
    # initializer_range / sqrt(2 * n_layers), so the residual stream's variance does not grow
    # with depth. Off by default (plain Llama init, what HF's LlamaForCausalLM does).
    scale_residual_init: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    # Runtime switches, not part of the architecture (not written to config.json).
    gradient_checkpointing: bool = False
    kernels: str = "auto"  # auto | torch | triton, see model/kernels/__init__.py

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = llama_ffn_dim(self.dim, self.multiple_of)
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ConfigError naming the key when the shape is impossible."""
        for key in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "hidden_dim",
            "max_seq_len",
            "multiple_of",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model config: dim={self.dim} is not divisible by n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model config: head_dim = dim / n_heads = {self.head_dim} must be "
                "even for rotary embeddings"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads={self.n_heads} is not divisible by "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.initializer_range <= 0:
            raise ConfigError(
                "model config: norm_eps, rope_theta and initializer_range must be > 0"
            )
        if self.kernels not in KERNEL_MODES:
            raise ConfigError(
                f"model config: kernels must be one of {KERNEL_MODES}, got {self.kernels!r}"
            )

    # ---- presets ------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Z2allConfig:
        """A named preset (see the module docstring) with keyword overrides applied."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` of a Hugging Face `LlamaForCausalLM` with this architecture.

        RoPE is written the transformers-4 way (`rope_theta` + `rope_scaling`), which
        transformers 5 still reads (it folds both into `rope_parameters`).
        """
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = dict(self.rope_scaling)
            rope_scaling["type"] = rope_scaling["rope_type"]  # transformers < 4.45 reads "type"
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(
        cls, hf: dict[str, Any], source: str = "config.json", **overrides: Any
    ) -> Z2allConfig:
        """Read a Hugging Face Llama `config.json` dict (transformers 4 or 5 layout).

        Anything this model cannot represent exactly (biases, another activation, other RoPE
        types, a head_dim that is not hidden_size / heads) is a ConfigError naming `source`.
        """

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"{source}: missing key {key!r} (expected a Llama config.json)")
            return hf[key]

        if hf.get("model_type", "llama") != "llama":
            raise ConfigError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'llama'")
        for key, expected in (
            ("hidden_act", "silu"),
            ("attention_bias", False),
            ("mlp_bias", False),
        ):
            if hf.get(key, expected) != expected:
                raise ConfigError(
                    f"{source}: {key}={hf[key]!r} is not supported (expected {expected!r})"
                )
        dim, n_heads = need("hidden_size"), need("num_attention_heads")
        if hf.get("head_dim") not in (None, dim // n_heads):
            raise ConfigError(
                f"{source}: head_dim={hf['head_dim']} != hidden_size / "
                f"num_attention_heads = {dim // n_heads} is not supported"
            )
        # transformers 5 keeps theta and scaling together in `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else rope

        eos = hf.get("eos_token_id", 2)
        kwargs: dict[str, Any] = dict(
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            hidden_dim=need("intermediate_size"),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
            eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
            pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 3,
        )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def normalize_rope_scaling(scaling: dict[str, Any]) -> dict[str, Any]:
    """Validate a RoPE scaling dict and return it with a `rope_type` key and float factors.

    Accepts the `type` (old HF) or `rope_type` (new HF) spelling. Unknown types are a
    ConfigError: silently ignoring a scaling would change every position's angle.
    """
    if not isinstance(scaling, dict):
        raise ConfigError(f"model config: rope_scaling must be a dict or None, got {scaling!r}")
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_SCALING_TYPES:
        raise ConfigError(
            f"model config: rope_scaling type {rope_type!r} is not supported; "
            f"use one of {ROPE_SCALING_TYPES} or None"
        )
    out["rope_type"] = rope_type
    required = ["factor"]
    if rope_type == "llama3":
        required += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    for key in required:
        if not isinstance(out.get(key), (int, float)) or out[key] <= 0:
            raise ConfigError(
                f"model config: rope_scaling[{key!r}] must be a positive number for "
                f"rope_type {rope_type!r}, got {out.get(key)!r}"
            )
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key in out:
            out[key] = float(out[key])
    if rope_type == "llama3":
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ConfigError("model config: rope_scaling needs high_freq_factor > low_freq_factor")
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=32,
        max_seq_len=128,
        tie_word_embeddings=False,
    ),
    "15m": dict(
        vocab_size=32000,
        dim=288,
        n_layers=6,
        n_heads=6,
        n_kv_heads=6,
        multiple_of=32,
        max_seq_len=256,
        tie_word_embeddings=True,
    ),
    "100m": dict(
        vocab_size=32000,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        multiple_of=256,
        max_seq_len=1024,
        tie_word_embeddings=True,
    ),
    "1.7b": dict(
        vocab_size=64320,
        dim=2048,
        n_layers=32,
        n_heads=16,
        n_kv_heads=8,
        hidden_dim=5632,
        max_seq_len=2048,
        tie_word_embeddings=False,
    ),
}
