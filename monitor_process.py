"""Babysit a training run: restart it with ``--resume`` when it crashes or hangs.

    python monitor_process.py [--max_restarts=N] [--hang_timeout=S] [--backoff=S] [--out_dir=DIR] \\
        -- torchrun --nproc_per_node=2 train.py config.json --out_dir=out/run1

The training command runs in its own process group (its own session), so the monitor can signal
it the way a terminal's Ctrl-C would. torchrun starts each rank in a session of its own, out of
that group, so every attempt also gets a unique ``Z2ALL_MONITOR_RUN`` environment variable, which
all its descendants inherit: SIGKILL sweeps reach every process carrying it, orphaned ranks
included, and none survive. Rules:

- exit status 0: training finished, the monitor exits 0 and never restarts it;
- exit status 2: a configuration error (``ConfigError``), restarting cannot help: exit 2. Under
  a launcher that reports a failed rank as exit 1 (torchrun), the error is recognised by the
  file ``out_dir/config_error.txt`` that ``utils.errors.run_cli`` writes (local runs);
- any other exit, a death by signal, or a hang (no heartbeat / metrics.jsonl change for
  ``--hang_timeout`` seconds, the group is then SIGKILLed): restart with ``--resume`` and
  ``--out_dir=DIR`` appended (when missing) after an exponential back-off
  (``--backoff`` doubling per restart without progress, at most ``--max_backoff``);
- give up (exit 1) after ``--max_restarts`` restarts, or when ``--crash_loop_restarts``
  consecutive runs ended without getting past the highest iteration seen so far;
- SIGINT / SIGTERM to the monitor: forwarded to the command's process group (as a terminal's
  Ctrl-C; torchrun passes it on to its ranks), ``--grace`` seconds to finish, then SIGKILL for
  whatever is left, tagged orphans included; exit 128 + signal number.

Progress is read from ``out_dir/heartbeat`` (see ``utils.metrics.touch_heartbeat``) and
``out_dir/metrics.jsonl``. Every event goes, with a timestamp, to the console and to
``out_dir/monitor.log``. ``--remote=user@host`` runs the command over ssh; see docs/monitor.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from configurator import CONFIG_FILE_NAME
from utils.errors import CONFIG_ERROR_FILE_VAR, ConfigError, run_cli
from utils.logging_utils import get_logger, setup_logging
from utils.metrics import HEARTBEAT_FILE, METRICS_FILE

logger = get_logger("monitor")

CONFIG_ERROR_EXIT = 2  # utils.errors.ConfigError.exit_code: never retried
REMOTE_PGID_FILE = "monitor_remote.pgid"
CONFIG_ERROR_FILE = "config_error.txt"  # written by utils.errors.run_cli on a ConfigError
RUN_TAG_VAR = "Z2ALL_MONITOR_RUN"  # environment variable marking every process of one attempt
_PROBE_SEPARATOR = "--z2all-monitor--"


# ----------------------------------------------------------------------------- command handling


def _option_name(arg: str) -> str | None:
    """``out_dir`` for ``--out_dir=V``, ``--out-dir`` ... (train.py reads ``-`` as ``_``)."""
    if not arg.startswith("--"):
        return None
    return arg[2:].split("=", 1)[0].replace("-", "_")


def _option_value(command: list[str], name: str) -> str | None:
    """The last value of ``--name=V`` or ``--name V`` in ``command`` (None when absent)."""
    value = None
    for i, arg in enumerate(command):
        if _option_name(arg) != name:
            continue
        if "=" in arg:
            value = arg.split("=", 1)[1]
        elif i + 1 < len(command) and not command[i + 1].startswith("--"):
            value = command[i + 1]
    return value


def _find_key(tree: object, key: str) -> object | None:
    """The value of ``key`` anywhere in nested dicts (config files may group keys in sections)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def config_file_out_dir(path: Path) -> str | None:
    """``out_dir`` from a .json config (any nesting) or a .py config (top-level literal assignment).

    A .py config is parsed, never executed: only ``out_dir = "..."`` at module level counts.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            value = _find_key(json.loads(text), "out_dir")
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, str) else None
    try:
        module = ast.parse(text)
    except SyntaxError:
        return None
    value = None
    for node in module.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "out_dir" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            value = node.value.value
    return value


def command_out_dir(command: list[str]) -> str | None:
    """Where ``command`` writes its run: its ``--out_dir``, else the out_dir of its config file.

    Config files are the .json/.py arguments after the script (the first ``*.py`` argument),
    the same precedence as the configurator: a ``--out_dir=`` override beats the file.
    """
    explicit = _option_value(command, "out_dir")
    if explicit is not None:
        return explicit
    script = next((i for i, arg in enumerate(command) if arg.endswith(".py")), None)
    if script is None:
        return None
    for arg in command[script + 1 :]:
        path = Path(arg)
        if not arg.startswith("-") and path.suffix in (".json", ".py") and path.is_file():
            found = config_file_out_dir(path)
            if found is not None:
                return found
    return None


def _same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def resolve_out_dir(command: list[str], monitor_out_dir: str | None) -> tuple[str, bool]:
    """(out_dir, whether ``--out_dir=`` must be appended to the command).

    Raises ConfigError when neither side names it, or when they disagree.
    """
    from_command = command_out_dir(command)
    if from_command is None and monitor_out_dir is None:
        raise ConfigError(
            "cannot tell where the training run writes: give the training command --out_dir=DIR "
            "(or a config file with out_dir), or pass --out_dir=DIR to monitor_process.py"
        )
    if from_command is None:
        return monitor_out_dir, True
    if monitor_out_dir is not None and not _same_path(monitor_out_dir, from_command):
        raise ConfigError(
            f"monitor --out_dir={monitor_out_dir} differs from the training command's out_dir "
            f"{from_command}: give one of them, or the same directory to both"
        )
    return from_command, _option_value(command, "out_dir") is None


def resume_command(command: list[str], out_dir: str) -> list[str]:
    """The restart command: ``command`` with ``--out_dir=out_dir`` when it has none, and with
    ``--resume`` (replacing any ``--resume[=...]`` it has) once the run saved its config.

    A first attempt that died before writing ``out_dir/exp_config.json`` (killed while
    importing, stuck in the rendezvous) left nothing to resume: it restarts as it started.
    """
    restart = [arg for arg in command if _option_name(arg) != "resume"]
    if _option_value(command, "out_dir") is None:
        restart.append(f"--out_dir={out_dir}")
    if (Path(out_dir) / CONFIG_FILE_NAME).is_file():
        restart.append("--resume")
    return restart


def backoff_delay(base: float, cap: float, runs_without_progress: int) -> float:
    """Seconds before a restart: ``base`` doubled per run without progress, at most ``cap``."""
    return min(base * 2**runs_without_progress, cap)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


# ----------------------------------------------------------------------------- progress


def _last_iteration(metrics_tail: str) -> int | None:
    """``iter`` of the last complete JSON line in the tail of a metrics.jsonl file."""
    for line in reversed(metrics_tail.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iter"), int):
            return row["iter"]
    return None


def parse_iteration(heartbeat_text: str, metrics_tail: str) -> int | None:
    """The furthest iteration the run reported: heartbeat ``iter`` or last metrics row."""
    found = []
    try:
        heartbeat = json.loads(heartbeat_text)
        if isinstance(heartbeat, dict) and isinstance(heartbeat.get("iter"), int):
            found.append(heartbeat["iter"])
    except json.JSONDecodeError:
        pass
    last = _last_iteration(metrics_tail)
    if last is not None:
        found.append(last)
    return max(found, default=None)


@dataclass(frozen=True)
class Progress:
    """What the run has shown so far. ``signature`` changes whenever it does anything; None when
    it could not be read (a remote host that did not answer)."""

    signature: tuple | None
    iteration: int | None


def _read_local_progress(out_dir: Path) -> Progress:
    heartbeat, metrics = out_dir / HEARTBEAT_FILE, out_dir / METRICS_FILE
    try:
        heartbeat_text = heartbeat.read_text(encoding="utf-8")
    except OSError:
        heartbeat_text = ""
    try:
        with open(metrics, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 8192))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        size, tail = -1, ""
    return Progress((heartbeat_text, size), parse_iteration(heartbeat_text, tail))


# ----------------------------------------------------------------------------- process groups


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid`` (Linux: via /proc)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        entries = None
    if entries is None:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def tagged_pids(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment holds ``RUN_TAG_VAR=tag`` (Linux /proc).

    Why not the process group: torchrun starts every rank with ``start_new_session=True``, so the
    ranks are in groups of their own, and once torchrun dies (SIGKILLed by a hang kill, or by the
    OOM killer) nothing links them to the run but what they inherited, their environment.
    """
    if not tag:
        return []
    needle = f"{RUN_TAG_VAR}={tag}".encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:  # gone, or another user's process
            continue
        if needle in environ and stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X"):
            found.append(int(entry))
    return found


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class StopFlag:
    """Records SIGINT/SIGTERM sent to the monitor; the main loop polls it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        self.count += 1

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early (True) when a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while self.signum is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        return self.signum is not None


# ----------------------------------------------------------------------------- local / remote


@dataclass
class Target:
    """Runs the command on this machine; :class:`RemoteTarget` overrides the hooks."""

    out_dir: str
    run_tag: str = field(default="", init=False)  # RUN_TAG_VAR of the current attempt

    def start(self, command: list[str], attempt: int) -> subprocess.Popen:
        """Start ``command`` in a new session, its processes tagged with a fresh ``run_tag``."""
        self.run_tag = f"{os.getpid()}.{attempt}.{time.time_ns()}"
        report = Path(self.out_dir) / CONFIG_ERROR_FILE
        report.unlink(missing_ok=True)
        env = {**os.environ, RUN_TAG_VAR: self.run_tag, CONFIG_ERROR_FILE_VAR: str(report.resolve())}
        return subprocess.Popen(self.argv(command), start_new_session=True, env=env)

    def config_error(self) -> str | None:
        """The ConfigError message the last attempt reported through its file, if any."""
        try:
            return (Path(self.out_dir) / CONFIG_ERROR_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            return None

    def argv(self, command: list[str]) -> list[str]:
        return command

    def signal(self, proc: subprocess.Popen, sig: int) -> None:
        """Deliver ``sig`` to the group ``proc`` leads, as a terminal's Ctrl-C would (torchrun
        forwards it to its ranks)."""
        _killpg(proc.pid, sig)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL every process of the run, wherever it is: the group, and every tagged process
        (torchrun's ranks, in sessions of their own, orphaned or not)."""
        _killpg(proc.pid, signal.SIGKILL)
        _kill_pids(tagged_pids(self.run_tag), signal.SIGKILL)

    def alive(self, proc: subprocess.Popen) -> bool:
        """Whether any process of the run is left (``proc`` itself may already have exited)."""
        return proc.poll() is None or group_alive(proc.pid) or bool(tagged_pids(self.run_tag))

    def progress(self) -> Progress:
        return _read_local_progress(Path(self.out_dir))


@dataclass
class RemoteTarget(Target):
    """Runs the command on ``host`` over ssh, in the remote directory ``cwd``.

    The remote shell writes its pid — which is the remote process group id, since sshd starts
    every session in a new one — to ``out_dir/monitor_remote.pgid``, so the monitor can signal
    the remote group with a second ssh call. The script also exports the attempt's
    ``RUN_TAG_VAR``, so a SIGKILL sweep finds torchrun's ranks (in sessions of their own) by their
    environment, as locally. ``ssh -tt`` also ties the remote group to the connection: when ssh
    dies, the remote side gets SIGHUP.
    """

    host: str = ""
    cwd: str = "."
    ssh: list[str] = field(
        default_factory=lambda: [
            "ssh", "-tt", "-o", "BatchMode=yes",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
        ]
    )

    def _remote(self, script: str) -> list[str]:
        return [*self.ssh, self.host, f"cd {shlex.quote(self.cwd)} && {script}"]

    def argv(self, command: list[str]) -> list[str]:
        out = shlex.quote(self.out_dir)
        return self._remote(
            f"mkdir -p {out} && echo $$ > {out}/{REMOTE_PGID_FILE} && "
            f"export {RUN_TAG_VAR}={shlex.quote(self.run_tag)} && exec {shlex.join(command)}"
        )

    def signal_command(self, sig: int) -> list[str]:
        """ssh command that sends ``sig`` to the remote group; a SIGKILL also goes to every
        remote process tagged with this attempt's ``RUN_TAG_VAR`` (POSIX sh + GNU grep)."""
        pgid_file = f"{shlex.quote(self.out_dir)}/{REMOTE_PGID_FILE}"
        script = f"kill -{int(sig)} -- -$(cat {pgid_file}) 2>/dev/null; "
        if sig == signal.SIGKILL and self.run_tag:
            tag = shlex.quote(f"{RUN_TAG_VAR}={self.run_tag}")
            script += (f"for e in /proc/[0-9]*/environ; do grep -qxzF {tag} \"$e\" 2>/dev/null && "
                       'p=${e#/proc/} && kill -9 "${p%/environ}" 2>/dev/null; done; ')
        return self._remote(script + "true")

    def probe_command(self) -> list[str]:
        out = shlex.quote(self.out_dir)
        return self._remote(
            f"cat {out}/{HEARTBEAT_FILE} 2>/dev/null; echo; echo {_PROBE_SEPARATOR}; "
            f"wc -c < {out}/{METRICS_FILE} 2>/dev/null; echo {_PROBE_SEPARATOR}; "
            f"tail -n 2 {out}/{METRICS_FILE} 2>/dev/null"
        )

    def signal(self, proc: subprocess.Popen, sig: int) -> None:
        """Signal the remote group only: local ssh ends by itself when the remote run ends
        (killing ssh first would SIGHUP the ranks while they save their checkpoint)."""
        try:
            subprocess.run(self.signal_command(sig), timeout=30, capture_output=True)
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.warning("could not signal the remote process group: %s", e)

    def kill(self, proc: subprocess.Popen) -> None:
        self.signal(proc, signal.SIGKILL)
        _killpg(proc.pid, signal.SIGKILL)

    def progress(self) -> Progress:
        try:
            text = subprocess.run(
                self.probe_command(), timeout=30, capture_output=True, text=True
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return Progress(None, None)  # unknown: neither progress nor its absence
        heartbeat, _, rest = text.partition(_PROBE_SEPARATOR)
        size, _, tail = rest.partition(_PROBE_SEPARATOR)
        return Progress((heartbeat, size.strip()), parse_iteration(heartbeat.strip(), tail))


# ----------------------------------------------------------------------------- supervision


@dataclass(frozen=True)
class MonitorConfig:
    """Monitor settings; see ``python monitor_process.py --help`` for each field."""

    command: list[str]
    out_dir: str
    max_restarts: int = 10
    hang_timeout: float = 1800.0
    startup_timeout: float | None = None  # None: same as hang_timeout
    backoff: float = 10.0
    max_backoff: float = 600.0
    crash_loop_restarts: int = 3
    grace: float = 60.0
    poll_interval: float = 5.0


@dataclass(frozen=True)
class Attempt:
    """How one run of the training command ended."""

    returncode: int | None  # None when the monitor was stopped by a signal
    hung: bool = False


class Supervisor:
    """Runs, watches and restarts the training command (one instance per monitor process)."""

    def __init__(self, config: MonitorConfig, target: Target, stop: StopFlag) -> None:
        self.config = config
        self.target = target
        self.stop = stop

    def _stop_group(self, proc: subprocess.Popen, sig: int, grace: float) -> None:
        """Send ``sig`` to the run's group, wait up to ``grace`` s for it to empty, then SIGKILL.

        A second SIGINT/SIGTERM to the monitor cuts the grace period short.
        """
        signals_seen = self.stop.count
        self.target.signal(proc, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.stop.count == signals_seen:
            if not self.target.alive(proc):
                return
            time.sleep(0.05)
        if self.target.alive(proc):
            logger.warning("processes of the run (group %d) still alive: sending SIGKILL", proc.pid)
        self._kill_group(proc)

    def _kill_group(self, proc: subprocess.Popen) -> None:
        self.target.kill(proc)
        proc.wait()

    def run_once(self, command: list[str], attempt: int) -> Attempt:
        """Start ``command``, watch it until it exits, hangs, or the monitor is told to stop."""
        cfg = self.config
        started = time.monotonic()
        try:
            proc = self.target.start(command, attempt)
        except OSError as e:
            raise ConfigError(f"cannot start the training command {command[0]!r}: {e}") from e
        logger.info("attempt %d: started pid %d: %s", attempt, proc.pid, shlex.join(command))
        last_signature = self.target.progress().signature
        last_change, seen_progress = started, False
        next_probe = started + cfg.poll_interval
        while proc.poll() is None:
            if self.stop.signum is not None:
                name = signal.Signals(self.stop.signum).name
                logger.info("monitor got %s: forwarding it to process group %d, grace %.0f s",
                            name, proc.pid, cfg.grace)
                self._stop_group(proc, self.stop.signum, cfg.grace)
                logger.info("attempt %d: stopped (%s)", attempt, describe_exit(proc.returncode))
                return Attempt(returncode=None)
            now = time.monotonic()
            if cfg.hang_timeout > 0 and now >= next_probe:
                next_probe = now + cfg.poll_interval
                signature = self.target.progress().signature
                if signature is not None and signature != last_signature:
                    last_signature, last_change, seen_progress = signature, now, True
                limit = cfg.hang_timeout
                if not seen_progress and cfg.startup_timeout is not None:
                    limit = cfg.startup_timeout
                if now - last_change > limit:
                    logger.warning("attempt %d: no progress for %.0f s (limit %.0f s): hung, "
                                   "killing process group %d", attempt, now - last_change, limit,
                                   proc.pid)
                    self._kill_group(proc)
                    return Attempt(returncode=proc.returncode, hung=True)
            time.sleep(0.05)
        leftovers = self.target.alive(proc)
        if leftovers:
            logger.warning("attempt %d: processes of the run left after pid %d exited: "
                           "killing them", attempt, proc.pid)
        if proc.returncode != 0 or leftovers:
            self._kill_group(proc)  # leftover ranks (local or remote) must not outlive a run
        logger.info("attempt %d: %s after %.1f s", attempt, describe_exit(proc.returncode),
                    time.monotonic() - started)
        return Attempt(returncode=proc.returncode)

    def run(self) -> int:
        """Run until success, a non-retryable failure, the restart cap, or a stop signal."""
        cfg = self.config
        command, restarts, no_progress = cfg.command, 0, 0
        best_iter: int | None = None
        while True:
            result = self.run_once(command, restarts + 1)
            if result.returncode is None:
                return 128 + self.stop.signum
            if result.returncode == 0:
                logger.info("training finished (exit status 0) after %d restart(s)", restarts)
                return 0
            if result.returncode == CONFIG_ERROR_EXIT and not result.hung:
                logger.error("exit status 2 is a configuration error: not restarting")
                return CONFIG_ERROR_EXIT
            reported = self.target.config_error()
            if reported and not result.hung:
                logger.error("the run reported a configuration error (%s): not restarting", reported)
                return CONFIG_ERROR_EXIT
            iteration = self.target.progress().iteration
            if iteration is not None and (best_iter is None or iteration > best_iter):
                best_iter, no_progress = iteration, 0
            else:
                no_progress += 1
            logger.info("progress: iter %s (best %s), %d consecutive run(s) without progress",
                        iteration, best_iter, no_progress)
            if no_progress >= cfg.crash_loop_restarts:
                logger.error("crash loop: %d consecutive runs made no progress past iter %s; "
                             "giving up (see the training log in %s)", no_progress, best_iter,
                             cfg.out_dir)
                return 1
            if restarts >= cfg.max_restarts:
                logger.error("restart cap reached (--max_restarts=%d): giving up", cfg.max_restarts)
                return 1
            delay = backoff_delay(cfg.backoff, cfg.max_backoff, no_progress)
            logger.info("restarting with --resume in %.1f s (restart %d of at most %d)",
                        delay, restarts + 1, cfg.max_restarts)
            if self.stop.sleep(delay):
                logger.info("monitor got %s while waiting: not restarting",
                            signal.Signals(self.stop.signum).name)
                return 128 + self.stop.signum
            restarts += 1
            command = resume_command(cfg.command, cfg.out_dir)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` at ``--`` into monitor options and the training command."""
    split = argv.index("--") if "--" in argv else len(argv)
    own, command = argv[:split], argv[split + 1 :]
    defaults = MonitorConfig(command=[], out_dir="")
    p = argparse.ArgumentParser(prog="monitor_process.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--max_restarts", type=int, default=defaults.max_restarts)
    p.add_argument("--hang_timeout", type=float, default=defaults.hang_timeout,
                   help="seconds without heartbeat/metrics change that count as a hang (0: off)")
    p.add_argument("--startup_timeout", type=float, default=None,
                   help="seconds before a run's first sign of progress (default: hang_timeout)")
    p.add_argument("--backoff", type=float, default=defaults.backoff,
                   help="first restart delay; doubles per restart without progress")
    p.add_argument("--max_backoff", type=float, default=defaults.max_backoff)
    p.add_argument("--crash_loop_restarts", type=int, default=defaults.crash_loop_restarts,
                   help="give up after this many consecutive runs without progress")
    p.add_argument("--grace", type=float, default=defaults.grace,
                   help="seconds between forwarding SIGINT/SIGTERM and SIGKILL")
    p.add_argument("--poll_interval", type=float, default=defaults.poll_interval)
    p.add_argument("--out_dir", default=None,
                   help="run directory, when the training command does not name it")
    p.add_argument("--remote", default=None, metavar="USER@HOST", help="run the command over ssh")
    p.add_argument("--remote_cwd", default=None,
                   help="remote working directory (default: this directory's path)")
    args = p.parse_args(own)
    if not command:
        raise ConfigError("usage: monitor_process.py [options] -- <training command ...> "
                          "(no training command after a '--' separator)")
    if args.max_restarts < 0 or args.crash_loop_restarts < 1 or args.backoff < 0:
        raise ConfigError("--max_restarts and --backoff must be >= 0, --crash_loop_restarts >= 1")
    for name in ("hang_timeout", "startup_timeout", "grace", "max_backoff"):
        value = getattr(args, name)
        if value is not None and not value >= 0:  # also rejects nan
            raise ConfigError(f"--{name} must be >= 0 seconds, got {value}")
    if not args.poll_interval > 0:
        raise ConfigError(f"--poll_interval must be > 0 seconds, got {args.poll_interval}")
    return args, command


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir, append_out_dir = resolve_out_dir(command, args.out_dir)
    if append_out_dir:
        command = [*command, f"--out_dir={out_dir}"]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    setup_logging(log_file=Path(out_dir) / "monitor.log", rank=0, world_size=1)
    config = MonitorConfig(
        command=command, out_dir=out_dir, max_restarts=args.max_restarts,
        hang_timeout=args.hang_timeout, startup_timeout=args.startup_timeout,
        backoff=args.backoff, max_backoff=args.max_backoff,
        crash_loop_restarts=args.crash_loop_restarts, grace=args.grace,
        poll_interval=args.poll_interval,
    )
    if args.remote:
        target: Target = RemoteTarget(out_dir=out_dir, host=args.remote,
                                      cwd=args.remote_cwd or os.getcwd())
    else:
        target = Target(out_dir=out_dir)
    stop = StopFlag()
    stop.install()
    logger.info("monitor pid %d watching %s (max_restarts=%d, hang_timeout=%.0f s)%s",
                os.getpid(), out_dir, config.max_restarts, config.hang_timeout,
                f" on {args.remote}" if args.remote else "")
    return Supervisor(config, target, stop).run()


if __name__ == "__main__":
    run_cli(main)
