"""Fault injection for recovery tests, driven by the ``Z2ALL_FAULT`` environment variable.

Training code calls :func:`maybe_inject` at the points where a real failure would hurt most::

    maybe_inject("step", iter_num, rank)              # after backward, before optimizer.step
    maybe_inject("checkpoint_write", iter_num, rank)  # files written, not yet committed

When ``Z2ALL_FAULT`` is unset this is one dictionary lookup. When set, it holds one or more
comma-separated faults ``KIND@iter=N[:phase=P][:rank=R][:once=PATH][:code=C]``:

=========  ====================================================================================
KIND       what happens when iteration N reaches phase P on rank R
=========  ====================================================================================
crash      raise :class:`InjectedFault` (a Python exception: traceback, exit status 1)
exit       ``os._exit(C)`` (default C=1): no cleanup, no ``finally`` blocks, no atexit
kill       SIGKILL to the own process (what the OOM killer or a lost node looks like)
hang       sleep forever (a stuck collective); only a SIGKILL ends it
=========  ====================================================================================

``phase`` defaults to ``step``; without ``rank`` the fault fires on every rank. ``once=PATH``
makes the fault fire at most once in total: the first firing creates PATH (atomically), and a
run that finds PATH skips the fault, so the run restarted by ``monitor_process.py`` goes past the
same iteration. Examples::

    Z2ALL_FAULT=kill@iter=7:once=/tmp/f1                          # SIGKILL at step 7, first run
    Z2ALL_FAULT=kill@iter=10:phase=checkpoint_write:once=/tmp/f2  # SIGKILL while saving iter 10
    Z2ALL_FAULT=kill@iter=7:rank=1:once=/tmp/f3                   # one of two torchrun ranks dies
    Z2ALL_FAULT=exit@iter=3:code=2                                # like a configuration error
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass

from utils.errors import ConfigError

ENV_VAR = "Z2ALL_FAULT"
KINDS = ("crash", "exit", "kill", "hang")


class InjectedFault(RuntimeError):
    """The exception a ``crash`` fault raises."""


@dataclass(frozen=True)
class Fault:
    """One parsed fault; see the module docstring for the meaning of each field."""

    kind: str
    iteration: int
    phase: str = "step"
    rank: int | None = None
    once: str | None = None
    code: int = 1

    def matches(self, phase: str, iteration: int, rank: int) -> bool:
        return (
            iteration == self.iteration
            and phase == self.phase
            and (self.rank is None or rank == self.rank)
        )


def _parse_one(text: str) -> Fault:
    kind, sep, rest = text.strip().partition("@")
    if kind not in KINDS or not sep:
        raise ConfigError(
            f"{ENV_VAR}: bad fault {text!r}: expected KIND@iter=N[:phase=P][:rank=R][:once=PATH]"
            f"[:code=C] with KIND one of {', '.join(KINDS)}"
        )
    fields: dict[str, str] = {}
    for item in rest.split(":"):
        key, eq, value = item.partition("=")
        if not eq or key not in ("iter", "phase", "rank", "once", "code"):
            raise ConfigError(
                f"{ENV_VAR}: bad field {item!r} in {text!r}: expected iter=, phase=, rank=, "
                "once= or code="
            )
        fields[key] = value
    if "iter" not in fields:
        raise ConfigError(f"{ENV_VAR}: fault {text!r} needs iter=N")
    try:
        return Fault(
            kind=kind,
            iteration=int(fields["iter"]),
            phase=fields.get("phase", "step"),
            rank=int(fields["rank"]) if "rank" in fields else None,
            once=fields.get("once"),
            code=int(fields.get("code", "1")),
        )
    except ValueError as e:
        raise ConfigError(f"{ENV_VAR}: fault {text!r}: iter, rank and code must be integers") from e


@functools.lru_cache(maxsize=8)
def parse_faults(spec: str) -> tuple[Fault, ...]:
    """Parse a ``Z2ALL_FAULT`` value (comma-separated faults); cached, so parsing happens once."""
    return tuple(_parse_one(part) for part in spec.split(",") if part.strip())


def _claim_once(path: str) -> bool:
    """True the first time any process claims ``path`` (O_EXCL create), False ever after."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _fire(fault: Fault, phase: str, iteration: int, rank: int) -> None:
    where = f"{fault.kind} at iter {iteration} phase {phase} rank {rank} (pid {os.getpid()})"
    print(f"[{ENV_VAR}] injecting {where}", flush=True)
    if fault.kind == "crash":
        raise InjectedFault(f"injected fault: {where}")
    if fault.kind == "exit":
        os._exit(fault.code)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang
        time.sleep(3600)


def maybe_inject(phase: str, iteration: int, rank: int = 0) -> None:
    """Fire the fault of ``Z2ALL_FAULT`` that matches (phase, iteration, rank), if any."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    for fault in parse_faults(spec):
        if not fault.matches(phase, iteration, rank):
            continue
        if fault.once is None or _claim_once(fault.once):
            _fire(fault, phase, iteration, rank)
