"""User-facing errors and the CLI wrapper that prints them without a traceback.

Internal invariants are plain ``assert`` statements. Mistakes a user can make (a bad flag, a
missing file, a stale index) raise :class:`UserError` with a message that names the file, key or
record and says what was expected. Command-line entry points run under :func:`run_cli`, which
prints that message and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# When set (monitor_process.py sets it), a ConfigError's message is also written to this file:
# launchers such as torchrun replace a rank's exit status 2 with their own 1.
CONFIG_ERROR_FILE_VAR = "Z2ALL_CONFIG_ERROR_FILE"


class UserError(Exception):
    """A mistake in the user's input: printed as one paragraph, exit status ``exit_code``."""

    exit_code = 1


class ConfigError(UserError):
    """A bad configuration key or value. Exit status 2, so a supervisor never retries it."""

    exit_code = 2


class DataError(UserError):
    """Unreadable or inconsistent data: a missing file, a stale index, a tokenizer mismatch."""


def run_cli(main: Callable[[], object]) -> None:
    """Run ``main()``; turn a :class:`UserError` into ``error: ...`` on stderr and its exit code."""
    try:
        result = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        report = os.environ.get(CONFIG_ERROR_FILE_VAR)
        if report and isinstance(e, ConfigError):
            try:
                with open(report, "w", encoding="utf-8") as f:
                    f.write(f"{e}\n")
            except OSError:
                pass  # the exit status still says it (when no launcher rewrites it)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
