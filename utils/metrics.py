"""Training metrics: one logger for console + ``metrics.jsonl`` + TensorBoard, and the heartbeat.

``out_dir/metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call, e.g.::

    {"iter": 100, "loss": 3.2141, "lr": 0.0003, "grad_norm": 0.91, "tokens_per_sec": 15234.0}

JSON has no NaN or infinity, so non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (the spellings Python's ``float()`` reads back);
:func:`read_metrics` turns them back into floats. Tensors and numpy scalars become Python
numbers via ``.item()``. Every line is flushed as soon as it is written, so a crash loses at most
the line being written, and :func:`read_metrics` skips a torn last line.

Resume: rows logged after the checkpoint that a run resumes from are dropped
(:func:`truncate_after`), and TensorBoard events from that step on are purged, so a resumed
run's ``metrics.jsonl`` has the same rows as an uninterrupted run.

Heartbeat: :func:`touch_heartbeat` rewrites ``out_dir/heartbeat`` (JSON: time, iter, phase, pid).
``monitor_process.py`` watches it to tell a slow run from a hung one and to measure progress
between restarts. Only rank 0 writes metrics and the heartbeat.

Keys the console line knows (all optional; any other numeric key is appended as ``key=value``):
``loss``, ``val_loss``, ``val_ppl``, ``lr``, ``grad_norm``, ``tokens_per_sec``, ``mfu`` (a fraction,
printed as %), ``step_ms``, ``mem_gib`` (peak accelerator memory, GiB).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.logging_utils import get_logger

logger = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
HEARTBEAT_FILE = "heartbeat"
TENSORBOARD_DIR = "tensorboard"

_NONFINITE_TO_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# (key, console label, format) in console order; keys not listed here follow as key=value.
_CONSOLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", "{:.4f}"),
    ("val_loss", "val_loss", "{:.4f}"),
    ("val_ppl", "val_ppl", "{:.2f}"),
    ("lr", "lr", "{:.3e}"),
    ("grad_norm", "grad_norm", "{:.3f}"),
    ("tokens_per_sec", "tok/s", "{:,.0f}"),
    ("mfu", "mfu", "{:.1%}"),
    ("step_ms", "step", "{:.1f}ms"),
    ("mem_gib", "mem", "{:.2f}GiB"),
)
_CONSOLE_KEYS = frozenset(key for key, _, _ in _CONSOLE_FIELDS)


def json_safe(value: Any) -> Any:
    """``value`` as something ``json.dumps(..., allow_nan=False)`` accepts.

    0-d tensors / numpy scalars -> Python numbers, non-finite floats -> "NaN"/"Infinity"/
    "-Infinity", containers recursively; anything else unknown -> ``str(value)``.
    """
    if hasattr(value, "item") and callable(value.item):
        value = value.item()  # torch / numpy scalar (a multi-element tensor raises, on purpose)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return _NONFINITE_TO_STR.get(value, value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return str(value)


def _from_json(value: Any) -> Any:
    """Inverse of the non-finite encoding in :func:`json_safe` (for one row's values)."""
    if isinstance(value, str) and value in _STR_TO_NONFINITE:
        return _STR_TO_NONFINITE[value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file, non-finite strings decoded back to floats.

    A torn, garbled or non-UTF-8 line (a crash mid-write, a stray binary write) is skipped, not
    an error: the file is a log. Lines are split on ``\n`` only and decoded one at a time.
    """
    rows = []
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError: ValueError
                continue
            if isinstance(row, dict):
                rows.append({k: _from_json(v) for k, v in row.items()})
    return rows


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + ``os.replace`` (readers never see half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def truncate_after(path: str | os.PathLike, iteration: int) -> int:
    """Drop the rows of ``metrics.jsonl`` whose ``iter`` is greater than ``iteration``.

    Called when a run resumes from the checkpoint of ``iteration``: the rows an interrupted run
    logged after that checkpoint are logged again by the resumed run. Lines that do not parse
    (a torn last line) are dropped too. The rewrite is atomic. Returns the number of lines
    dropped (0, and the file untouched, when nothing needs dropping; also when it is missing).
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and int(row.get("iter", -1)) <= iteration
            except (json.JSONDecodeError, TypeError, ValueError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        _atomic_write_text(path, "".join(kept))
    return dropped


def touch_heartbeat(
    out_dir: str | os.PathLike, iteration: int, phase: str = "step", rank: int = 0
) -> None:
    """Rewrite ``out_dir/heartbeat`` with the time, ``iteration`` and ``phase`` (rank 0 only).

    Call it once per iteration and before/after anything long (start-up, eval, checkpoint save),
    so that ``monitor_process.py --hang_timeout=S`` only fires when nothing happened for S
    seconds. Written atomically, so the monitor never reads a half-written file.
    """
    if rank != 0:
        return
    record = {"time": time.time(), "iter": int(iteration), "phase": phase, "pid": os.getpid()}
    _atomic_write_text(Path(out_dir) / HEARTBEAT_FILE, json.dumps(record) + "\n")


def read_heartbeat(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last heartbeat record, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads((Path(out_dir) / HEARTBEAT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def format_console_line(step: int, metrics: Mapping[str, Any]) -> str:
    """``iter 100 | loss 3.2141 | lr 3.000e-04 | ... | key=value`` from JSON-safe ``metrics``."""
    parts = [f"iter {step}"]
    for key, label, fmt in _CONSOLE_FIELDS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {fmt.format(value)}")
        elif value is not None:
            parts.append(f"{label} {value}")  # a non-finite value, already a string
    for key, value in metrics.items():
        if key not in _CONSOLE_KEYS and isinstance(value, (int, float, str)):
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            parts.append(f"{key}={shown}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each logged step to the console, ``out_dir/metrics.jsonl`` and TensorBoard.

    Args:
        out_dir: the run directory (created if missing).
        enabled: False on every rank but 0; then every method is a no-op.
        tensorboard: write TensorBoard scalars to ``out_dir/tensorboard`` (SummaryWriter is
            imported only here, so a run without it never imports tensorboard).
        resume_iter: the iteration of the checkpoint this run resumed from, or None for a fresh
            run; later rows are dropped from ``metrics.jsonl`` and purged from TensorBoard.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_iter: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_iter is not None:
            dropped = truncate_after(self.path, resume_iter)
            if dropped:
                logger.info("dropped %d metrics rows after resumed iter %d", dropped, resume_iter)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge_step = None if resume_iter is None else resume_iter + 1
            self._writer = SummaryWriter(
                str(self.out_dir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=10
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log ``metrics`` (scalars; tensors allowed) for iteration ``step``."""
        if not self.enabled:
            return
        assert "iter" not in metrics, f"pass the iteration as step, not in metrics: {metrics}"
        values = {str(k): json_safe(v) for k, v in metrics.items()}
        row = {"iter": int(step), **values}
        self._file.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                number = _from_json(value)
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    self._writer.add_scalar(key, number, int(step))
        logger.info("%s", format_console_line(step, values))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
