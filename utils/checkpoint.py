"""Atomic, validated training checkpoints.

Layout of a run directory::

    OUT_DIR/exp_config.json              the resolved config (marks a train.py run dir)
    OUT_DIR/checkpoints/iter_00000200/   one checkpoint per saved iteration
        model/config.json                model weights in Hugging Face Llama format
        model/model.safetensors          (training dtype, so resuming is exact)
        trainer_state.json               iteration, data position, best val loss, ...
        <name>.pt                        shared state written by rank 0 (e.g. optimizer)
        <name>_rank00001.pt              per-rank state (RNG, ZeRO-1 optimizer shards)
        COMPLETE                         written last: JSON manifest {file: size in bytes}

Atomicity: everything is written into ``iter_X.tmp/`` (each file through a temporary name,
fsync and rename), ranks meet at a barrier, then rank 0 writes ``COMPLETE`` and renames the
directory to ``iter_X``. A crash at any point leaves either a complete checkpoint or a ``.tmp``
directory that is ignored and removed by the next save. On load, a checkpoint whose files do not
match its manifest (missing, truncated) is skipped with a warning and the previous one is used.

Retention: the newest two complete checkpoints are kept, plus the best one by validation loss
(recorded in ``trainer_state.json`` and ``checkpoints/best.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from utils.errors import DataError
from utils.logging_utils import get_logger

logger = get_logger(__name__)

CHECKPOINT_DIR = "checkpoints"
MARKER = "COMPLETE"
MODEL_SUBDIR = "model"
TRAINER_STATE = "trainer_state.json"
KEEP_NEWEST = 2


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def rank_file(name: str, rank: int) -> str:
    return f"{name}_rank{rank:05d}.pt"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` via a temporary file in the same dir, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_json_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2).encode("utf-8")))


def _manifest(ckpt_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt_dir)): p.stat().st_size
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }


def validate_checkpoint(ckpt_dir: Path) -> str | None:
    """None when ``ckpt_dir`` is complete and matches its manifest, else the reason it is not."""
    marker = ckpt_dir / MARKER
    if not marker.is_file():
        return "no completion marker"
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable completion marker ({e})"
    if not isinstance(manifest, dict):
        return "unreadable completion marker (not a JSON object)"
    for name, size in manifest.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, manifest says {size}"
    return None


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories that carry a completion marker, newest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_")
             and not p.name.endswith(".tmp") and (p / MARKER).exists()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def latest_valid_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that passes validation; invalid newer ones are reported."""
    for ckpt in list_checkpoints(out_dir):
        problem = validate_checkpoint(ckpt)
        if problem is None:
            return ckpt
        logger.warning("checkpoint %s is unusable (%s); falling back to the previous one", ckpt, problem)
    return None


def latest_model_dir(out_dir: str | os.PathLike) -> Path:
    """The Hugging Face-format model directory of a run's newest valid checkpoint."""
    ckpt = latest_valid_checkpoint(out_dir)
    if ckpt is None:
        raise DataError(f"{out_dir}: no valid checkpoint under {checkpoint_root(out_dir)}")
    return ckpt / MODEL_SUBDIR


def save_checkpoint(
    out_dir: str | os.PathLike,
    iteration: int,
    rank: int,
    save_model: Callable[[Path], None],
    shared_state: dict[str, Any],
    rank_state: dict[str, Any],
    trainer_state: dict[str, Any],
    barrier: Callable[[], None],
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Write one checkpoint collectively (every rank calls this).

    ``save_model(dir)`` runs on rank 0 and writes the HF-format model into ``dir``;
    ``shared_state`` (rank 0 only) and ``rank_state`` (every rank) map a name to an object for
    ``torch.save``; ``trainer_state`` is JSON written by rank 0. ``before_commit`` runs on rank 0
    just before the completion marker (fault-injection tests kill the process there).
    """
    root = checkpoint_root(out_dir)
    final = root / checkpoint_name(iteration)
    tmp = root / f"{checkpoint_name(iteration)}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    for name, obj in rank_state.items():
        atomic_torch_save(obj, tmp / rank_file(name, rank))
    if rank == 0:
        save_model(tmp / MODEL_SUBDIR)
        for name, obj in shared_state.items():
            atomic_torch_save(obj, tmp / f"{name}.pt")
        atomic_json_save(trainer_state, tmp / TRAINER_STATE)
    barrier()
    if rank == 0:
        if before_commit is not None:
            before_commit()
        atomic_json_save(_manifest(tmp), tmp / MARKER)
        if final.exists():  # re-saving the same iteration (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        _apply_retention(root, trainer_state)
    barrier()
    return final


def _apply_retention(root: Path, trainer_state: dict[str, Any]) -> None:
    """Keep the newest KEEP_NEWEST complete checkpoints and the best one; drop the rest."""
    best = trainer_state.get("best_iter")
    best_name = checkpoint_name(best) if best is not None else None
    if best is not None:
        atomic_json_save({"iter": best, "val_loss": trainer_state.get("best_val_loss")}, root / "best.json")
    complete = [p for p in list_checkpoints(root.parent) if validate_checkpoint(p) is None]
    keep = {p.name for p in complete[:KEEP_NEWEST]}
    if best_name is not None:
        keep.add(best_name)
    newest = complete[0].name if complete else ""
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if p.name.endswith(".tmp"):  # a write that never committed
            stale = True
        else:
            # Older than the newest complete checkpoint and not kept: complete ones past
            # retention, and damaged ones (e.g. a deletion here that was killed half-way), which
            # can never be used again. A damaged NEWER one stays for inspection (the loader
            # reports it and falls back).
            stale = p.name.startswith("iter_") and p.name not in keep and p.name < newest
        if stale:
            shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((ckpt_dir / TRAINER_STATE).read_text())


def load_state(ckpt_dir: Path, name: str, rank: int | None = None) -> Any:
    """Load a shared (``rank=None``) or per-rank object written by :func:`save_checkpoint`.

    These files are written by this program; they hold optimizer and RNG state (numpy arrays,
    Python tuples), so they are unpickled fully rather than with ``weights_only``.
    """
    path = ckpt_dir / (f"{name}.pt" if rank is None else rank_file(name, rank))
    if not path.is_file():
        raise DataError(f"checkpoint {ckpt_dir} has no {path.name}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataError(
            f"{path}: unreadable ({type(e).__name__}: {e}); the file is damaged although its size "
            "matches the manifest. Move this checkpoint directory away to resume from the previous one"
        ) from e
