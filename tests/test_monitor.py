"""monitor_process.py against tests/fake_trainer.py: every recovery path, end to end.

Each test runs the real monitor as a subprocess around a real training process and checks what
a user would check: the exit status, the monitor.log events, and that the final state (a hash
chain over every step) and the metrics rows equal those of an uninterrupted run. The trainer is
described by :class:`FakeTrainer`; a class with the same three methods around train.py lets
these tests run against the real thing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import monitor_process as mp
from utils import fault_injection
from utils.errors import ConfigError
from utils.fault_injection import Fault, InjectedFault, maybe_inject, parse_faults
from utils.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
MONITOR = ROOT / "monitor_process.py"
FAST = ["--backoff=0.1", "--max_backoff=0.5", "--poll_interval=0.1", "--grace=2"]


class FakeTrainer:
    """How to start tests/fake_trainer.py and read back the state it trained to."""

    script = ROOT / "tests" / "fake_trainer.py"

    def command(self, out_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, str(self.script), f"--out_dir={out_dir}", *extra]

    def final_state(self, out_dir: Path) -> dict:
        return json.loads((out_dir / "final.json").read_text())

    def metric_rows(self, out_dir: Path) -> list[tuple[int, float]]:
        return [(row["iter"], row["loss"]) for row in read_metrics(out_dir / "metrics.jsonl")]


TRAINER = FakeTrainer()


def run_monitor(
    out_dir: Path, trainer_args: list[str], monitor_args: list[str], fault: str | None = None,
    timeout: float = 60, trainer: FakeTrainer = TRAINER,
) -> subprocess.CompletedProcess:
    """Run the monitor around ``trainer`` (any object with FakeTrainer's methods) to the end."""
    env = {k: v for k, v in os.environ.items() if k != "Z2ALL_FAULT"}
    if fault:
        env["Z2ALL_FAULT"] = fault
    cmd = [sys.executable, str(MONITOR), *FAST, *monitor_args, "--",
           *trainer.command(out_dir, *trainer_args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)


def attempts(out_dir: Path) -> list[str]:
    """The 'attempt N: started' lines of monitor.log, in order."""
    lines = (out_dir / "monitor.log").read_text().splitlines()
    return [line for line in lines if ": started pid " in line]


def events(out_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]
    return [row for row in rows if row["event"] == kind]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has already died)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, list]:
    """Final state and metric rows of an uninterrupted run (no monitor)."""
    out_dir = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if k != "Z2ALL_FAULT"}
    subprocess.run(TRAINER.command(out_dir), check=True, env=env, cwd=ROOT, timeout=60)
    return TRAINER.final_state(out_dir), TRAINER.metric_rows(out_dir)


# ----------------------------------------------------------------------------- command handling


def test_out_dir_from_command_and_config_files(tmp_path):
    assert mp.command_out_dir(["python", "train.py", "--out_dir=a", "--out_dir=b"]) == "b"
    assert mp.command_out_dir(["python", "train.py", "--out_dir", "c"]) == "c"
    nested = tmp_path / "cfg.json"
    nested.write_text(json.dumps({"model": {"dim": 8}, "checkpoint": {"out_dir": "from_json"}}))
    assert mp.command_out_dir(["python", "train.py", str(nested)]) == "from_json"
    assert mp.command_out_dir(["python", "train.py", str(nested), "--out_dir=cli"]) == "cli"
    py_cfg = tmp_path / "cfg.py"
    py_cfg.write_text("import os\nout_dir = 'first'\nout_dir = 'from_py'\nmax_iters = 3\n")
    # train.py itself is the script, never read as a config file
    torchrun = ["torchrun", "--nproc_per_node=2", "train.py", str(py_cfg)]
    assert mp.command_out_dir(torchrun) == "from_py"
    assert mp.command_out_dir(["python", "train.py", "--max_iters=3"]) is None


def test_resolve_out_dir_and_resume_command(tmp_path):
    assert mp.resolve_out_dir(["python", "train.py"], "m") == ("m", True)
    assert mp.resolve_out_dir(["python", "train.py", "--out_dir=o"], None) == ("o", False)
    assert mp.resolve_out_dir(["python", "train.py", "--out_dir=o"], "./o") == ("o", False)
    with pytest.raises(ConfigError, match="differs"):
        mp.resolve_out_dir(["python", "train.py", "--out_dir=o"], "other")
    with pytest.raises(ConfigError, match="--out_dir"):
        mp.resolve_out_dir(["python", "train.py"], None)
    assert mp.command_out_dir(["python", "train.py", "--out-dir=o"]) == "o"  # train.py's spelling too
    cmd, o = ["torchrun", "train.py", "--max_iters=5"], str(tmp_path / "o")
    # nothing saved yet (the first attempt died before writing its config): restart as started
    assert mp.resume_command(cmd, o) == [*cmd, f"--out_dir={o}"]
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "exp_config.json").write_text("{}")
    assert mp.resume_command(cmd, o) == [*cmd, f"--out_dir={o}", "--resume"]
    again = mp.resume_command(mp.resume_command(cmd, o), o)
    assert again == [*cmd, f"--out_dir={o}", "--resume"]  # never duplicated
    assert mp.resume_command([*cmd, "--resume=false", f"--out-dir={o}"], o) == [
        *cmd, f"--out-dir={o}", "--resume"]


def test_backoff_doubles_up_to_the_cap():
    assert [mp.backoff_delay(1.0, 5.0, n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_parse_iteration_takes_the_furthest_report():
    heartbeat = json.dumps({"time": 1.0, "iter": 7, "phase": "step", "pid": 1})
    tail = '{"iter": 5, "loss": 1.0}\n{"iter": 6, "lo'  # torn last line
    assert mp.parse_iteration(heartbeat, tail) == 7
    assert mp.parse_iteration("", tail) == 5
    assert mp.parse_iteration("garbage", "") is None


def test_remote_command_construction():
    target = mp.RemoteTarget(out_dir="runs/a b", host="me@gpu1", cwd="/home/me/zero2all")
    argv = target.argv(["torchrun", "--nproc_per_node=8", "train.py", "--out_dir=runs/a b"])
    assert argv[:2] == ["ssh", "-tt"] and "BatchMode=yes" in argv and argv[-2] == "me@gpu1"
    script = argv[-1]
    assert script.startswith("cd /home/me/zero2all && mkdir -p 'runs/a b' && echo $$ > ")
    assert script.endswith("exec torchrun --nproc_per_node=8 train.py '--out_dir=runs/a b'")
    kill = target.signal_command(signal.SIGTERM)[-1]
    assert "kill -15 -- -$(cat 'runs/a b'/monitor_remote.pgid)" in kill
    assert "tail -n 2 'runs/a b'/metrics.jsonl" in target.probe_command()[-1]


def test_usage_errors_exit_2(tmp_path):
    no_command = subprocess.run([sys.executable, str(MONITOR), "--max_restarts=1"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
    assert no_command.returncode == 2 and "training command" in no_command.stderr
    no_out_dir = subprocess.run([sys.executable, str(MONITOR), "--", "python", "train.py"],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert no_out_dir.returncode == 2 and "--out_dir" in no_out_dir.stderr
    for bad in ("--startup_timeout=-1", "--grace=-5", "--poll_interval=0", "--hang_timeout=nan"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            mp.parse_args([bad, "--", "python", "train.py"])


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "fault",
    ["crash@iter=6", "exit@iter=6", "kill@iter=6", "kill@iter=8:phase=checkpoint_write"],
)
def test_crash_is_resumed_to_the_uninterrupted_result(tmp_path, reference, fault):
    out_dir = tmp_path / "run"
    result = run_monitor(out_dir, [], ["--max_restarts=3"], f"{fault}:once={tmp_path / 'fired'}")
    assert result.returncode == 0, result.stderr
    runs = attempts(out_dir)
    assert len(runs) == 2 and "--resume" in runs[1] and "--resume" not in runs[0]
    assert (TRAINER.final_state(out_dir), TRAINER.metric_rows(out_dir)) == reference
    if "checkpoint_write" in fault:  # killed while saving iter 8: resumed from the iter-4 save
        assert events(out_dir, "start")[1]["resumed_from"] == 4


def test_success_is_not_restarted(tmp_path, reference):
    out_dir = tmp_path / "run"
    result = run_monitor(out_dir, [], [])
    assert result.returncode == 0, result.stderr
    assert len(attempts(out_dir)) == 1
    assert "training finished (exit status 0)" in (out_dir / "monitor.log").read_text()
    assert TRAINER.final_state(out_dir) == reference[0]


@pytest.mark.parametrize("how", ["bad_option", "exit_code_2"])
def test_configuration_error_is_not_retried(tmp_path, how):
    out_dir = tmp_path / "run"
    if how == "bad_option":
        result = run_monitor(out_dir, ["--no_such_key=1"], [])
    else:
        result = run_monitor(out_dir, [], [], fault="exit@iter=3:code=2")
    assert result.returncode == 2
    assert len(attempts(out_dir)) == 1
    assert "configuration error: not restarting" in (out_dir / "monitor.log").read_text()


class ExitOneLauncher(FakeTrainer):
    """The fake trainer under a launcher that turns every failure into exit 1 (as torchrun does)."""

    def command(self, out_dir: Path, *extra: str) -> list[str]:
        launcher = "import subprocess, sys; sys.exit(1 if subprocess.call(sys.argv[1:]) else 0)"
        return [sys.executable, "-c", launcher, *super().command(out_dir, *extra)]


def test_configuration_error_under_a_launcher_that_exits_1_is_not_retried(tmp_path):
    out_dir = tmp_path / "run"
    result = run_monitor(out_dir, ["--no_such_key=1"], [], trainer=ExitOneLauncher())
    assert result.returncode == 2
    assert len(attempts(out_dir)) == 1
    log = (out_dir / "monitor.log").read_text()
    assert "reported a configuration error" in log and "no_such_key" in log


def test_restart_cap(tmp_path):
    out_dir = tmp_path / "run"
    result = run_monitor(out_dir, [], ["--max_restarts=2", "--crash_loop_restarts=10"],
                         fault="exit@iter=3")
    assert result.returncode == 1
    assert len(attempts(out_dir)) == 3
    assert "restart cap reached (--max_restarts=2)" in (out_dir / "monitor.log").read_text()


def test_crash_loop_without_progress_stops(tmp_path):
    out_dir = tmp_path / "run"
    result = run_monitor(out_dir, [], ["--max_restarts=10", "--crash_loop_restarts=2"],
                         fault="exit@iter=3")
    assert result.returncode == 1
    # run 1 reaches iter 2 (progress), runs 2 and 3 die at the same place: give up
    assert len(attempts(out_dir)) == 3
    log = (out_dir / "monitor.log").read_text()
    assert "crash loop: 2 consecutive runs made no progress past iter 2" in log


def test_hang_is_detected_and_recovered(tmp_path, reference):
    hang_timeout = 2.0
    out_dir = tmp_path / "run"
    result = run_monitor(out_dir, [], [f"--hang_timeout={hang_timeout}", "--max_restarts=2"],
                         fault=f"hang@iter=6:once={tmp_path / 'fired'}")
    assert result.returncode == 0, result.stderr
    assert "hung, killing process group" in (out_dir / "monitor.log").read_text()
    first, second = events(out_dir, "start")
    last_step = max(e["time"] for e in events(out_dir, "step") if e["pid"] == first["pid"])
    assert second["time"] - last_step < hang_timeout + 5
    assert not pid_alive(first["pid"])
    assert (TRAINER.final_state(out_dir), TRAINER.metric_rows(out_dir)) == reference


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_whole_group(tmp_path, reference, sig):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, str(MONITOR), *FAST, "--grace=1", "--",
           *TRAINER.command(out_dir, "--step_time=0.3", "--spawn_child=stubborn")]
    env = {k: v for k, v in os.environ.items() if k != "Z2ALL_FAULT"}
    monitor = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(events_or_empty(out_dir, "step")) < 2:
            time.sleep(0.05)
        pids = [int(p) for p in (out_dir / "pids.txt").read_text().split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        t0 = time.monotonic()
        monitor.send_signal(sig)
        returncode = monitor.wait(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        if monitor.poll() is None:
            monitor.kill()
        monitor.communicate()
    assert returncode == 128 + sig
    assert not any(pid_alive(p) for p in pids)  # trainer and its SIGTERM-ignoring child
    assert len(attempts(out_dir)) == 1
    if sig == signal.SIGINT:  # the trainer saved on Ctrl-C: a resume finishes the same run
        assert events(out_dir, "interrupted")
        subprocess.run(TRAINER.command(out_dir, "--resume"), check=True, env=env, cwd=ROOT,
                       timeout=60)
        assert (TRAINER.final_state(out_dir), TRAINER.metric_rows(out_dir)) == reference


def events_or_empty(out_dir: Path, kind: str) -> list[dict]:
    return events(out_dir, kind) if (out_dir / "events.jsonl").exists() else []


def test_remote_run_through_a_stand_in_ssh(tmp_path, reference):
    """--remote end to end, with an `ssh` on PATH that runs the remote script locally."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"
    fake_ssh.write_text(
        "#!/bin/bash\n"
        "# stand-in for ssh: drop the options and the host, run the remote script here\n"
        'while [ $# -gt 1 ]; do\n'
        '  case "$1" in -o) shift 2;; -*) shift;; *) shift; break;; esac\n'
        'done\n'
        'exec bash -c "$*"\n'
    )
    fake_ssh.chmod(0o755)
    out_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "Z2ALL_FAULT"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["Z2ALL_FAULT"] = f"kill@iter=6:once={tmp_path / 'fired'}"
    cmd = [sys.executable, str(MONITOR), *FAST, "--hang_timeout=20", "--remote=me@gpu1",
           f"--remote_cwd={ROOT}", "--", *TRAINER.command(out_dir)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(attempts(out_dir)) == 2
    assert (out_dir / "monitor_remote.pgid").exists()
    assert (TRAINER.final_state(out_dir), TRAINER.metric_rows(out_dir)) == reference


# ----------------------------------------------------------------------------- fault injection


def test_fault_spec_parsing():
    (fault,) = parse_faults("kill@iter=7:phase=checkpoint_write:rank=1:once=/tmp/m")
    assert fault == Fault("kill", 7, phase="checkpoint_write", rank=1, once="/tmp/m")
    assert parse_faults("crash@iter=2, exit@iter=3:code=2") == (
        Fault("crash", 2), Fault("exit", 3, code=2))
    for bad in ["boom@iter=1", "crash", "crash@phase=step", "crash@iter=x", "crash@iter=1:when=2"]:
        with pytest.raises(ConfigError, match="Z2ALL_FAULT"):
            parse_faults(bad)


def test_maybe_inject_matches_phase_iteration_rank_once(tmp_path, monkeypatch):
    monkeypatch.delenv("Z2ALL_FAULT", raising=False)
    monkeypatch.setattr(fault_injection, "parse_faults", None)  # unset: never even parsed
    maybe_inject("step", 7)
    monkeypatch.undo()
    marker = tmp_path / "fired"
    monkeypatch.setenv("Z2ALL_FAULT", f"crash@iter=7:rank=1:once={marker}")
    for phase, iteration, rank in [("step", 6, 1), ("checkpoint_write", 7, 1), ("step", 7, 0)]:
        maybe_inject(phase, iteration, rank)  # no match: nothing happens
    assert not marker.exists()
    with pytest.raises(InjectedFault, match="crash at iter 7 phase step rank 1"):
        maybe_inject("step", 7, 1)
    assert marker.exists()
    maybe_inject("step", 7, 1)  # once: the restarted run goes past it


@pytest.mark.parametrize("fault, returncode", [("exit@iter=3:code=7", 7), ("exit@iter=3", 1),
                                               ("kill@iter=3", -signal.SIGKILL),
                                               ("hang@iter=3", None)])
def test_fault_kinds_in_a_process(fault, returncode):
    code = ("from utils.fault_injection import maybe_inject\n"
            "for i in range(5): maybe_inject('step', i)")
    env = {**os.environ, "Z2ALL_FAULT": fault}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=1.5 if returncode is None else 30) == returncode
    except subprocess.TimeoutExpired:
        assert returncode is None  # the hang is still hanging
    finally:
        proc.kill()
        proc.wait()
