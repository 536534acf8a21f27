"""Training configuration: typed defaults → optional config file → ``--key=value`` overrides.

One dataclass per concern (task, model, data, optimization, parallel, checkpoint/logging). Field
names are unique across sections, so the command line stays flat::

    python train.py config/pretrain_debug.json --task_type=pretrain --learning_rate=3e-4 --compile

A config file is ``.json`` (an object of keys) or ``.py`` (module-level assignments, nanoGPT
style; names starting with ``_`` and imported modules are ignored). Bare ``--flag`` sets a bool
to true. An unknown key, a value of the wrong type or outside its allowed range raises
:class:`~utils.errors.ConfigError` (exit status 2) before anything is written. The resolved
config is saved as ``out_dir/exp_config.json`` and ``--resume --out_dir=DIR`` reloads it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import ConfigError

CONFIG_FILE_NAME = "exp_config.json"

# Keys that may differ from the saved config when resuming: they change how long the run goes
# and how often it reports, never what it computes.
# Keys naming input files or directories (saved absolute; see save_config).
PATH_KEYS = ("data_dir", "tokenizer_dir", "data_mix", "init_from")
RESUME_SAFE_KEYS = frozenset(
    {"max_iters", "eval_interval", "eval_iters", "log_interval", "save_interval", "resume",
     "tensorboard", "peak_flops"}
)


def opt(default: Any, help: str, choices: tuple | None = None, min: float | None = None) -> Any:
    """A config field with its help text, allowed choices and lower bound."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min})


@dataclass
class TaskConfig:
    task_type: str = opt("pretrain", "what to train", choices=("pretrain", "sft", "dpo"))
    seed: int = opt(1337, "base random seed (data order, init, dropout)", min=0)
    init_from: str = opt("", "start from weights only: a train.py out_dir or a Hugging Face Llama dir")
    dpo_beta: float = opt(0.1, "DPO beta (strength of the KL penalty)", min=0.0)
    dpo_loss_type: str = opt("sigmoid", "DPO loss", choices=("sigmoid", "ipo", "hinge"))
    dpo_label_smoothing: float = opt(0.0, "conservative-DPO label smoothing in [0, 0.5)", min=0.0)
    precompute_ref_logps: bool = opt(False, "compute reference log-probs once, keep no reference model")


@dataclass
class ModelConfig:
    model_preset: str = opt("debug", "architecture preset; the keys below override it when set",
                            choices=("debug", "15m", "100m", "1.7b"))
    dim: int = opt(0, "hidden size (0 = preset)", min=0)
    n_layers: int = opt(0, "number of transformer blocks (0 = preset)", min=0)
    n_heads: int = opt(0, "attention heads (0 = preset)", min=0)
    n_kv_heads: int = opt(0, "key/value heads for grouped-query attention (0 = preset)", min=0)
    multiple_of: int = opt(0, "round the SwiGLU hidden size up to a multiple of this (0 = preset)", min=0)
    hidden_dim: int = opt(0, "SwiGLU hidden size (0 = derived from dim and multiple_of)", min=0)
    norm_eps: float = opt(1e-5, "RMSNorm epsilon", min=0.0)
    rope_theta: float = opt(10000.0, "RoPE base frequency", min=1.0)
    max_seq_len: int = opt(256, "training sequence length in tokens", min=1)
    tie_word_embeddings: bool = opt(False, "share input embedding and output projection")
    gradient_checkpointing: bool = opt(False, "recompute each block in backward to save memory")
    kernels: str = opt("auto", "kernel backend: triton on CUDA, torch on CPU",
                       choices=("auto", "torch", "triton"))
    compile: bool = opt(False, "wrap the model in torch.compile")


@dataclass
class DataConfig:
    data_dir: str = opt("", "pretokenized data dir (pretrain) or jsonl dir/file (sft, dpo)")
    tokenizer_dir: str = opt("", "tokenizer directory (AutoTokenizer format)")
    valid_ratio: float = opt(0.01, "fraction of samples held out for validation", min=0.0)
    data_mix: str = opt("", "weighted mix of data dirs, e.g. 'dirA:0.7,dirB:0.3'")
    use_dataset_with_index: bool = opt(True, "pretrain: read sample starts from the index file (false: compute them; same samples)")
    sft_type: str = opt("auto", "SFT record format: auto-detect per record, or require one",
                        choices=("auto", "conversation", "instruction"))
    sft_packing: bool = opt(False, "SFT: pack several samples per sequence")


@dataclass
class OptimConfig:
    max_iters: int = opt(1000, "optimizer steps to train", min=0)
    train_batch_size: int = opt(8, "sequences per micro-batch", min=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step (global)", min=1)
    learning_rate: float = opt(6e-4, "peak learning rate", min=0.0)
    min_lr: float = opt(6e-5, "learning rate at the end of the cosine decay", min=0.0)
    warmup_iters: int = opt(100, "linear warmup steps", min=0)
    lr_decay_iters: int = opt(0, "steps of cosine decay (0 = max_iters)", min=0)
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)", min=0.0)
    beta1: float = opt(0.9, "AdamW beta1", min=0.0)
    beta2: float = opt(0.95, "AdamW beta2", min=0.0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)", min=0.0)
    dtype: str = opt("float32", "parameter/compute dtype; fp32 master weights otherwise",
                     choices=("float32", "bfloat16", "float16"))
    initial_loss_scale: float = opt(65536.0, "float16: initial dynamic loss scale", min=1.0)


@dataclass
class ParallelConfig:
    ddp_impl: str = opt("my", "data-parallel implementation", choices=("my", "torch"))
    use_distributed_optimizer: bool = opt(False, "ZeRO-1: shard fp32 master weights and optimizer state")
    overlap_grad_reduce: bool = opt(False, "reduce gradient buckets during backward")
    overlap_param_gather: bool = opt(False, "ZeRO-1: all-gather parameters during the next forward")
    overlap_optim_step: bool = opt(False, "step each bucket's shard as soon as its gradients arrive")
    comm_hook: str = opt("allreduce", "gradient communication hook",
                         choices=("allreduce", "fp16", "bf16", "powersgd"))
    bucket_size: int = opt(4_000_000, "elements per gradient bucket", min=1)
    powersgd_rank: int = opt(4, "PowerSGD low-rank approximation rank", min=1)
    powersgd_start_iter: int = opt(10, "PowerSGD: plain all-reduce before this iteration", min=0)
    powersgd_min_compression_rate: float = opt(
        2.0, "PowerSGD: reduce a matrix uncompressed unless rank-r factors shrink it this much", min=1.0)
    grad_reduce_in_fp32: bool = opt(True, "accumulate and reduce gradients in fp32")


@dataclass
class CheckpointConfig:
    out_dir: str = opt("out", "run directory: config, checkpoints, logs, metrics")
    resume: bool = opt(False, "continue from the newest valid checkpoint in out_dir")
    save_interval: int = opt(100, "checkpoint every N steps (0 = only at the end)", min=0)
    eval_interval: int = opt(100, "evaluate every N steps (0 = never)", min=0)
    eval_iters: int = opt(20, "validation batches per evaluation", min=1)
    log_interval: int = opt(10, "log metrics every N steps", min=1)
    tensorboard: bool = opt(True, "also write TensorBoard event files")
    peak_flops: float = opt(0.0, "peak FLOP/s per device for MFU (0 = per-device default)", min=0.0)


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "ckpt": CheckpointConfig,
}


@dataclass
class Config:
    """The whole run's configuration, one attribute per section."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_flat(self) -> dict[str, Any]:
        return {k: v for name in SECTIONS for k, v in dataclasses.asdict(getattr(self, name)).items()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def _key_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat key → (section name, dataclass field)."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"config key {f.name!r} is defined in two sections"
            f.type = hints[f.name]
            index[f.name] = (section, f)
    return index


KEYS = _key_index()


def _unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list every key"
    return ConfigError(f"unknown config key '{key}' ({source}){hint}")


def _convert(key: str, value: Any, source: str) -> Any:
    """Convert a raw value (a CLI string or a JSON/py value) to the key's type and validate it."""
    f = KEYS[key][1]
    kind = f.type
    allowed = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
    bad = ConfigError(f"bad value {value!r} for config key '{key}' ({source}): expected {allowed}")
    if kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            out = True
        elif isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            out = False
        else:
            raise bad
    elif kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            out = value
        else:
            try:
                as_float = float(str(value).replace("_", ""))
            except ValueError:
                raise bad from None
            if not as_float.is_integer():
                raise bad
            out = int(as_float)
    elif kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if out != out or out in (float("inf"), float("-inf")):
            raise bad
    else:
        if not isinstance(value, str):
            raise bad
        out = value
    choices, lower = f.metadata.get("choices"), f.metadata.get("min")
    if choices is not None and out not in choices:
        raise ConfigError(
            f"bad value {value!r} for config key '{key}' ({source}): expected one of {', '.join(choices)}"
        )
    if lower is not None and out < lower:
        raise ConfigError(f"bad value {value!r} for config key '{key}' ({source}): must be ≥ {lower}")
    return out


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a JSON object of config keys")
        # A saved exp_config.json is nested by section; a hand-written one may be flat.
        if set(data) <= set(SECTIONS) and all(isinstance(v, dict) for v in data.values()):
            data = {k: v for section in data.values() for k, v in section.items()}
        return data
    if p.suffix == ".py":
        namespace: dict[str, Any] = {}
        try:
            exec(compile(p.read_text(encoding="utf-8"), str(p), "exec"), namespace)
        except Exception as e:
            raise ConfigError(f"config file {path!r} failed to run: {type(e).__name__}: {e}") from None
        return {
            k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType)
        }
    raise ConfigError(f"config file {path!r}: expected a .json or .py file")


def parse_overrides(argv: list[str]) -> tuple[list[str], dict[str, tuple[Any, str]]]:
    """Split argv into config files and ``{key: (raw value, source)}`` overrides, in order."""
    files: list[str] = []
    overrides: dict[str, tuple[Any, str]] = {}
    seen_flag = False
    for arg in argv:
        if not arg.startswith("--"):
            if seen_flag:
                raise ConfigError(f"config file {arg!r} must come before the --key=value overrides")
            files.append(arg)
            for key, value in _read_config_file(arg).items():
                overrides[key] = (value, f"in {arg}")
            continue
        seen_flag = True
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in KEYS:
            raise _unknown_key_error(key, f"from {arg!r}")
        if not eq:
            if KEYS[key][1].type is not bool:
                raise ConfigError(f"config key '{key}' needs a value: --{key}=VALUE")
            value = "true"
        overrides[key] = (value, f"from {arg!r}")
    return files, overrides


def build_config(
    overrides: dict[str, tuple[Any, str]], base: Config | None = None, check: bool = True
) -> Config:
    """Apply overrides (each value type- and range-checked) on top of ``base`` (defaults when
    None); ``check=False`` skips the cross-key checks of :func:`validate`."""
    cfg = Config() if base is None else config_from_flat(base.to_flat())
    for key, (value, source) in overrides.items():
        if key not in KEYS:
            raise _unknown_key_error(key, source)
        section, _ = KEYS[key]
        setattr(getattr(cfg, section), key, _convert(key, value, source))
    if check:
        validate(cfg)
    return cfg


def config_from_flat(flat: dict[str, Any]) -> Config:
    """A Config from ``{key: value}`` (values validated as if they came from a file)."""
    cfg = Config()
    for key, value in flat.items():
        if key not in KEYS:
            raise _unknown_key_error(key, "in a saved config")
        setattr(getattr(cfg, KEYS[key][0]), key, _convert(key, value, "in a saved config"))
    return cfg


def validate(cfg: Config) -> None:
    """Cross-key checks that no single field can make."""
    o = cfg.optim
    if o.min_lr > o.learning_rate:
        raise ConfigError(f"min_lr ({o.min_lr}) must not exceed learning_rate ({o.learning_rate})")
    if 0 < o.lr_decay_iters <= o.warmup_iters:
        raise ConfigError(
            f"lr_decay_iters ({o.lr_decay_iters}) must exceed warmup_iters ({o.warmup_iters}): the "
            "cosine decay runs from the end of warmup to lr_decay_iters (0 = max_iters)"
        )
    if not 0.0 <= cfg.data.valid_ratio < 1.0:
        raise ConfigError(f"bad value {cfg.data.valid_ratio} for config key 'valid_ratio': expected 0 ≤ x < 1")
    if not 0.0 <= cfg.task.dpo_label_smoothing < 0.5:
        raise ConfigError(
            f"bad value {cfg.task.dpo_label_smoothing} for config key 'dpo_label_smoothing': expected 0 ≤ x < 0.5"
        )
    for key in ("beta1", "beta2"):
        if not getattr(o, key) < 1.0:
            raise ConfigError(f"bad value {getattr(o, key)} for config key '{key}': expected < 1")
    if not cfg.ckpt.out_dir:
        raise ConfigError("config key 'out_dir' must not be empty")
    p = cfg.parallel
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        raise ConfigError("overlap_param_gather needs use_distributed_optimizer (ZeRO-1)")


def save_config(cfg: Config, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/exp_config.json`` atomically (nested by section)."""
    path = Path(out_dir) / CONFIG_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    saved = cfg.to_dict()
    # `resume` describes one invocation, not the experiment: a saved config must be able to
    # start a fresh run (python train.py OUT/exp_config.json --out_dir=NEW).
    saved["ckpt"]["resume"] = False
    # Input paths are saved absolute: the run dir is read from other directories later
    # (sample.py, utils.export_hf, --resume, --init_from=OUT_DIR).
    for key in PATH_KEYS:
        section = KEYS[key][0]
        saved[section][key] = absolute_paths(key, saved[section][key])
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_config(path: str | os.PathLike) -> Config:
    """Load a saved ``exp_config.json`` (or its directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE_NAME
    if not p.is_file():
        raise ConfigError(f"no saved config at {str(p)!r}")
    return config_from_flat(_read_config_file(str(p)))


def absolute_paths(key: str, value: str) -> str:
    """``value`` of the path-valued ``key`` with its directories made absolute ('' stays '')."""
    if not value:
        return value
    if key == "data_mix":  # 'dirA:0.7,dirB:0.3'
        entries = [entry.rsplit(":", 1) for entry in value.split(",")]
        return ",".join(
            f"{os.path.abspath(e[0])}:{e[1]}" if len(e) == 2 else os.path.abspath(e[0])
            for e in entries
        )
    return os.path.abspath(value)


def resolve_config(argv: list[str]) -> Config:
    """The run's config from the command line; with ``--resume``, the saved one plus safe overrides.

    Without ``--resume``, an ``out_dir`` that already holds a run is an error: starting over in
    it would mix two runs' checkpoints and metrics (and overwrite the saved config).
    """
    _, overrides = parse_overrides(argv)
    cfg = build_config(overrides, check=False)
    saved_path = Path(cfg.ckpt.out_dir) / CONFIG_FILE_NAME
    if not cfg.ckpt.resume:
        validate(cfg)
        if saved_path.is_file():
            raise ConfigError(
                f"out_dir={cfg.ckpt.out_dir!r} already holds a training run ({saved_path.name}); "
                "pass --resume to continue it, or choose a new --out_dir (or delete the old one)"
            )
        return cfg
    if not saved_path.is_file():
        raise ConfigError(
            f"--resume: no saved config at {str(saved_path)!r}; pass the --out_dir of an earlier run"
        )
    saved = load_config(saved_path)
    saved_flat, new_flat = saved.to_flat(), cfg.to_flat()
    for key in PATH_KEYS:
        saved_flat[key] = absolute_paths(key, saved_flat[key])
        new_flat[key] = absolute_paths(key, new_flat[key])
    changed = [
        k for k, (value, source) in overrides.items()
        if k not in RESUME_SAFE_KEYS and k != "out_dir" and new_flat[k] != saved_flat[k]
    ]
    if changed:
        diffs = ", ".join(f"{k}: saved {saved_flat[k]!r} vs given {new_flat[k]!r}" for k in changed)
        raise ConfigError(
            f"--resume: these keys differ from {saved_path} and cannot change on resume ({diffs}); "
            f"only {', '.join(sorted(RESUME_SAFE_KEYS - {'resume'}))} may"
        )
    safe = {k: v for k, v in overrides.items() if k in RESUME_SAFE_KEYS}
    resumed = build_config(safe, base=saved)
    resumed.ckpt.resume = True
    resumed.ckpt.out_dir = cfg.ckpt.out_dir
    return resumed


def help_text() -> str:
    """Every key with its type, default and help, grouped by section."""
    lines = ["usage: python train.py [CONFIG.json|CONFIG.py] [--key=value | --flag] ...", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            kind = KEYS[f.name][1].type.__name__
            extra = f" {{{'|'.join(f.metadata['choices'])}}}" if f.metadata.get("choices") else ""
            lines.append(f"  --{f.name}={f.default!r}  ({kind}{extra})  {f.metadata['help']}")
        lines.append("")
    return "\n".join(lines)


def markdown_reference() -> str:
    """The config reference as a Markdown table (README's reference is checked against it)."""
    rows = ["| key | type | default | help |", "|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            kind = KEYS[f.name][1].type.__name__
            sep = " \\| "
            choices = f" ({sep.join(f.metadata['choices'])})" if f.metadata.get("choices") else ""
            rows.append(f"| `{f.name}` | {kind} | `{f.default!r}` | {f.metadata['help']}{choices} |")
    return "\n".join(rows)


def wants_help(argv: list[str]) -> bool:
    return "--help" in argv or "-h" in argv


if __name__ == "__main__":
    print(help_text() if len(sys.argv) < 2 else markdown_reference())
