"""A stand-in for train.py that exercises everything monitor_process.py relies on, in a second.

    python tests/fake_trainer.py [CONFIG.json] --out_dir=DIR [--max_iters=12] [--save_interval=4]
        [--step_time=0.02] [--resume] [--spawn_child=plain|stubborn]

Its "model" is a hash chain: ``state_i = sha256(state_{i-1} + i)``, so the final state equals the
uninterrupted run's only if every resume restarted from exactly the right step. Like train.py it
writes ``metrics.jsonl`` (via MetricsLogger, truncated on resume) and the heartbeat, saves an
atomic checkpoint every ``save_interval`` iterations (``Z2ALL_FAULT`` can strike in the middle of
the write), on Ctrl-C saves a checkpoint and exits 130, and exits 2 on an unknown option.
``--spawn_child`` starts a grandchild process (like a torchrun rank); ``stubborn`` ignores
SIGINT/SIGTERM, so only SIGKILL ends it. ``events.jsonl`` records starts, steps and stops with
wall-clock times; ``pids.txt`` records every process started, for the orphan checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configurator import CONFIG_FILE_NAME  # noqa: E402
from utils.errors import ConfigError, run_cli  # noqa: E402
from utils.fault_injection import maybe_inject  # noqa: E402
from utils.metrics import MetricsLogger, touch_heartbeat  # noqa: E402

DEFAULTS = {"out_dir": None, "max_iters": 12, "save_interval": 4, "step_time": 0.02,
            "resume": False, "spawn_child": ""}
CHILD_CODE = {
    "plain": "import time; time.sleep(600)",
    "stubborn": "import signal, time\n"
                "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\n"
                "time.sleep(600)",
}


def parse_args(argv: list[str]) -> dict:
    args = dict(DEFAULTS)
    for arg in argv:
        if arg.endswith(".json") and not arg.startswith("--"):
            args.update(json.loads(Path(arg).read_text()))
            continue
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in DEFAULTS:
            raise ConfigError(f"unknown option {arg!r}; valid keys: {', '.join(DEFAULTS)}")
        if key == "resume":
            args[key] = not eq or value == "True"
        elif not eq:
            raise ConfigError(f"option {arg!r} needs a value: --{key}=VALUE")
        else:
            args[key] = value if DEFAULTS[key] is None else type(DEFAULTS[key])(value)
    if args["out_dir"] is None:
        raise ConfigError("--out_dir is required")
    return args


def next_state(state: str, iteration: int) -> str:
    return hashlib.sha256(f"{state}:{iteration}".encode()).hexdigest()


def record(out_dir: Path, event: str, **fields: object) -> None:
    with open(out_dir / "events.jsonl", "a") as f:
        row = {"event": event, "time": time.time(), "pid": os.getpid(), **fields}
        f.write(json.dumps(row) + "\n")


def save_checkpoint(out_dir: Path, iteration: int, state: str) -> None:
    """Atomic: tmp file, fault point half-way through the write, then rename."""
    text = json.dumps({"iter": iteration, "state": state})
    tmp = out_dir / "ckpt.json.tmp"
    with open(tmp, "w") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        maybe_inject("checkpoint_write", iteration)
        f.write(text[len(text) // 2 :])
    os.replace(tmp, out_dir / "ckpt.json")


def main() -> int:
    args = parse_args(sys.argv[1:])
    out_dir = Path(args["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE_NAME).write_text(json.dumps(args))  # as train.py does before training
    ckpt = out_dir / "ckpt.json"
    start, state = 0, "seed"
    if args["resume"] and ckpt.exists():
        saved = json.loads(ckpt.read_text())
        start, state = saved["iter"], saved["state"]
    record(out_dir, "start", resumed_from=start, argv=sys.argv[1:])
    with open(out_dir / "pids.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
        if args["spawn_child"]:
            child = subprocess.Popen([sys.executable, "-c", CHILD_CODE[args["spawn_child"]]])
            f.write(f"{child.pid}\n")
    metrics = MetricsLogger(out_dir, tensorboard=False, resume_iter=start)
    touch_heartbeat(out_dir, start, phase="startup")
    done = (start, state)  # the last fully completed (iteration, state)
    try:
        for iteration in range(start + 1, args["max_iters"] + 1):
            maybe_inject("step", iteration)
            new_state = next_state(done[1], iteration)
            time.sleep(args["step_time"])
            metrics.log(iteration, {"loss": int(new_state[:8], 16) / 2**32, "lr": 1e-3})
            touch_heartbeat(out_dir, iteration)
            record(out_dir, "step", iter=iteration)
            done = (iteration, new_state)
            if iteration % args["save_interval"] == 0 or iteration == args["max_iters"]:
                save_checkpoint(out_dir, *done)
    except KeyboardInterrupt:
        save_checkpoint(out_dir, *done)
        record(out_dir, "interrupted", saved=done[0])
        return 130
    finally:
        metrics.close()
    (out_dir / "final.json").write_text(json.dumps({"iter": done[0], "state": done[1]}))
    record(out_dir, "finished")
    return 0


if __name__ == "__main__":
    run_cli(main)
