"""One stdlib logging set-up for every entry point: rank-aware, console + optional file.

Rank 0 logs at INFO; other ranks log WARNING and above only, so a multi-process run prints one
stream of progress but still shows every rank's problems. Each line carries the rank when the
run is distributed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname).1s %(rankprefix)s%(name)s: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def env_rank() -> int:
    """The global rank from torchrun's environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.prefix = f"[rank{rank}] " if world_size > 1 else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rankprefix = self.prefix
        return True


def setup_logging(
    log_file: str | os.PathLike | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    level: int = logging.INFO,
) -> None:
    """Configure the root logger once (idempotent: replaces handlers of an earlier call).

    ``log_file`` receives the same lines as the console; it is appended to, so a resumed run
    continues the same ``train.log``. Only rank 0 writes the file.
    """
    rank = env_rank() if rank is None else rank
    world_size = env_world_size() if world_size is None else world_size
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level if rank == 0 else logging.WARNING)
    formatter = logging.Formatter(_FORMAT, _DATEFMT)
    rank_filter = _RankFilter(rank, world_size)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.addFilter(rank_filter)
    root.addHandler(console)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        file_handler.addFilter(rank_filter)
        root.addHandler(file_handler)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def log_rank0(logger: logging.Logger, msg: str, *args: object) -> None:
    """Log at INFO on rank 0 only (other ranks are already filtered to WARNING, this is explicit)."""
    if env_rank() == 0:
        logger.info(msg, *args)
