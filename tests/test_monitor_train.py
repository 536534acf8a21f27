"""monitor_process.py around the real train.py: SIGKILL, hang and Ctrl-C recovery paths.

tests/test_monitor.py proves every monitor rule against a one-second stand-in trainer; this file
proves that the real thing recovers too. Each case runs the monitor as a subprocess around a tiny
pretraining run (12 iterations, a checkpoint every 4, a fixed cosine schedule) with a fault
injected through ``Z2ALL_FAULT`` (utils/fault_injection.py), and checks what a user would check:
the monitor's exit status and log, and that the final parameters (``torch.equal``) and every
``metrics.jsonl`` row (iter, loss, val_loss, in order, none twice) equal those of an
uninterrupted run.

The uninterrupted reference is a single-process run. The torchrun case compares its 2-rank run
with it bit for bit: with the default data-parallel settings two ranks reproduce one process
exactly on CPU (each gradient is a two-term sum in both cases and the world-size scaling is a
power of two), which tests/test_train_parallel.py checks within 1e-5.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import monitor_process as mp
from test_monitor import FAST, MONITOR, attempts, pid_alive, run_monitor
from train_utils import ROOT, TINY, final_weights, metrics, run_train
from utils.metrics import read_heartbeat

MAX_ITERS = 12
RUN = ["--task_type=pretrain", f"--max_iters={MAX_ITERS}", "--save_interval=4",
       f"--lr_decay_iters={MAX_ITERS}", "--train_batch_size=4", "--gradient_accumulation_steps=2",
       "--eval_interval=6"]
TIMEOUT = 240  # seconds for a whole monitored run; generous, the CPUs may be shared


class TrainPy:
    """tests/test_monitor.FakeTrainer's interface around ``train.py`` (alone or under torchrun)."""

    def __init__(self, pretok_dir: Path, tokenizer_dir: Path, nproc: int = 1) -> None:
        self.data = [f"--data_dir={pretok_dir}", f"--tokenizer_dir={tokenizer_dir}"]
        self.nproc = nproc

    def command(self, out_dir: Path, *extra: str) -> list[str]:
        launcher = [sys.executable, "train.py"]
        if self.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={self.nproc}", "train.py"]
        return [*launcher, *RUN, *self.data, *TINY, f"--out_dir={out_dir}", *extra]

    def final_state(self, out_dir: Path) -> dict[str, torch.Tensor]:
        return final_weights(out_dir)

    def metric_rows(self, out_dir: Path) -> list[tuple]:
        return [(row["iter"], row.get("loss"), row.get("val_loss")) for row in metrics(out_dir)]


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """Every train.py process (each torchrun rank too) uses one thread: 2 cores, 2 ranks."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pretok_dir, tokenizer_dir) -> Path:
    """An uninterrupted single-process run, no monitor: the result every recovery must equal."""
    out_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(TrainPy(pretok_dir, tokenizer_dir).command(out_dir)[2:], timeout=TIMEOUT)
    return out_dir


def assert_same_run(out_dir: Path, reference: Path, trainer: TrainPy) -> None:
    rows, expected = trainer.metric_rows(out_dir), trainer.metric_rows(reference)
    assert rows == expected, f"metrics.jsonl differs:\n{rows}\nvs uninterrupted\n{expected}"
    assert [r[0] for r in rows if r[1] is not None] == list(range(1, MAX_ITERS + 1))
    got, want = trainer.final_state(out_dir), trainer.final_state(reference)
    assert got.keys() == want.keys()
    differing = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differing, f"final parameters differ from the uninterrupted run: {differing}"


def resumed_from(out_dir: Path) -> list[int]:
    """The iterations the runs logged in train.log resumed from, in order."""
    lines = (out_dir / "train.log").read_text().splitlines()
    return [int(line.rsplit(" ", 1)[1]) for line in lines if "resumed from" in line]


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``, by scanning /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline and pid_alive(int(entry)):
            found.append(int(entry))
    return found


# ----------------------------------------------------------------------------- orphan sweep

# torchrun in miniature: a parent whose child runs in a session of its own, as torchrun starts
# every rank (start_new_session=True). The child writes its pid, then both sleep.
ORPHAN_MAKER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
    " start_new_session=True)\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(child.pid))\n"
    "import os; os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(120)\n"
)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("where", ["local", "remote_script"])
def test_kill_sweeps_children_in_other_sessions_even_when_orphaned(tmp_path, where):
    """Killing the process group misses a child in its own session; the tag sweep does not,
    locally (Target.kill) and in the shell script that RemoteTarget runs over ssh (run here
    with /bin/sh, no ssh)."""
    target = mp.Target(out_dir=str(tmp_path))
    proc = target.start([sys.executable, "-c", ORPHAN_MAKER, str(tmp_path / "child.pid")], 1)
    try:
        assert wait_until(lambda: (tmp_path / "child.pid").exists(), timeout=60)
        child = int((tmp_path / "child.pid").read_text())
        os.killpg(proc.pid, signal.SIGKILL)  # the parent dies, like a SIGKILLed torchrun
        proc.wait()
        assert pid_alive(child) and target.alive(proc)  # the orphan survived the group kill
        if where == "local":
            target.kill(proc)
        else:
            remote = mp.RemoteTarget(out_dir=str(tmp_path), host="unused", cwd=str(tmp_path))
            remote.run_tag = target.run_tag
            (tmp_path / mp.REMOTE_PGID_FILE).write_text(str(proc.pid))
            script = remote.signal_command(signal.SIGKILL)[-1]
            subprocess.run(["/bin/sh", "-c", script], check=True, timeout=30)
        assert wait_until(lambda: not pid_alive(child))
        assert not target.alive(proc)
    finally:
        target.kill(proc)


# ----------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize(
    "where, nproc, fault",
    [
        ("mid_step", 1, "kill@iter=6"),
        ("mid_checkpoint_write", 1, "kill@iter=8:phase=checkpoint_write"),
        pytest.param("one_of_two_torchrun_ranks", 2, "kill@iter=6:rank=1", marks=pytest.mark.slow),
    ],
)
def test_sigkill_is_resumed_to_the_uninterrupted_result(tmp_path, pretok_dir, tokenizer_dir,
                                                        reference, where, nproc, fault):
    trainer = TrainPy(pretok_dir, tokenizer_dir, nproc)
    out_dir = tmp_path / "run"
    result = run_monitor(out_dir, [], ["--max_restarts=2"], f"{fault}:once={tmp_path / 'fired'}",
                         timeout=TIMEOUT, trainer=trainer)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fired").exists()  # the fault did strike
    runs = attempts(out_dir)
    assert len(runs) == 2 and "--resume" in runs[1] and "--resume" not in runs[0], runs
    # mid-step at 6 and mid-write of 8 both lose everything after the iter-4 checkpoint
    assert resumed_from(out_dir) == [4]
    assert_same_run(out_dir, reference, trainer)


# ----------------------------------------------------------------------------- hang


class HeartbeatWatch(threading.Thread):
    """Polls the heartbeat and monitor.log while the monitor runs, with our own clock.

    ``last_beat``: when the heartbeat of the first (hanging) train.py last changed;
    ``restarted``: when monitor.log first showed attempt 2.
    """

    def __init__(self, out_dir: Path) -> None:
        super().__init__(daemon=True)
        self.out_dir = out_dir
        self.done = threading.Event()
        self.first_pid: int | None = None
        self.last_beat: float | None = None
        self.restarted: float | None = None

    def run(self) -> None:
        seen = None
        while not self.done.is_set() and self.restarted is None:
            beat = read_heartbeat(self.out_dir)
            if beat is not None and beat != seen:
                self.first_pid = self.first_pid or beat["pid"]
                if beat["pid"] == self.first_pid:
                    seen, self.last_beat = beat, time.monotonic()
            log = self.out_dir / "monitor.log"
            if log.exists() and "attempt 2: started" in log.read_text():
                self.restarted = time.monotonic()
            time.sleep(0.02)


@pytest.mark.slow
def test_hang_of_a_torchrun_rank_is_detected_and_recovered(tmp_path, pretok_dir, tokenizer_dir,
                                                          reference):
    """Rank 1 hangs, rank 0 waits for it in a collective: the heartbeat stops, the monitor kills
    torchrun and both ranks (which torchrun started in sessions of their own) and restarts."""
    # Above the few seconds torchrun and the ranks take to exit after the last heartbeat, or the
    # finished run would itself look hung.
    hang_timeout = 10.0
    trainer = TrainPy(pretok_dir, tokenizer_dir, nproc=2)
    out_dir = tmp_path / "run"
    watch = HeartbeatWatch(out_dir)
    watch.start()
    try:
        # startup_timeout: a fresh train.py needs seconds of imports before its first heartbeat
        monitor_args = [f"--hang_timeout={hang_timeout}", "--startup_timeout=120",
                        "--max_restarts=2"]
        result = run_monitor(out_dir, [], monitor_args,
                             f"hang@iter=6:rank=1:once={tmp_path / 'fired'}", timeout=TIMEOUT,
                             trainer=trainer)
    finally:
        watch.done.set()
        watch.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hung, killing process group" in (out_dir / "monitor.log").read_text()
    assert watch.last_beat is not None and watch.restarted is not None
    assert watch.restarted - watch.last_beat < hang_timeout + 5
    assert not pid_alive(watch.first_pid)
    assert processes_mentioning(str(out_dir)) == []  # no orphaned rank of the hung attempt
    assert resumed_from(out_dir) == [4]
    assert_same_run(out_dir, reference, trainer)


# ----------------------------------------------------------------------------- Ctrl-C, exit 2


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_leaves_a_resumable_checkpoint(tmp_path, pretok_dir,
                                                                     tokenizer_dir, reference):
    """SIGINT to the monitor of a 2-rank torchrun run: monitor, torchrun and both ranks are gone
    within seconds; ``train.py --resume`` then finishes the uninterrupted run (in one process:
    a plain-DDP checkpoint resumes on any world size, and two ranks equal one, see above)."""
    trainer = TrainPy(pretok_dir, tokenizer_dir, nproc=2)
    out_dir = tmp_path / "run"
    env = {**os.environ, "Z2ALL_FAULT": "hang@iter=6"}  # park both ranks after the iter-4 save
    cmd = [sys.executable, str(MONITOR), *FAST, "--grace=10", "--", *trainer.command(out_dir)]
    monitor = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and monitor.poll() is None:
            beat = read_heartbeat(out_dir)
            if beat is not None and beat["iter"] == 5:
                break
            time.sleep(0.05)
        assert monitor.poll() is None, monitor.communicate()[0][-3000:]
        running = processes_mentioning(str(out_dir))
        assert len(running) >= 4, running  # monitor, torchrun, rank 0, rank 1
        t0 = time.monotonic()
        monitor.send_signal(signal.SIGINT)
        returncode = monitor.wait(timeout=30)
        stopped_after = time.monotonic() - t0
    finally:
        if monitor.poll() is None:
            monitor.kill()
        output = monitor.communicate()[0]
    assert returncode == 128 + signal.SIGINT, output[-3000:]
    assert stopped_after < 10, output[-3000:]
    assert processes_mentioning(str(out_dir)) == []
    assert len(attempts(out_dir)) == 1
    run_train([f"--out_dir={out_dir}", "--resume"], timeout=TIMEOUT)
    assert resumed_from(out_dir) == [4]
    assert_same_run(out_dir, reference, trainer)


def test_exit_status_2_is_not_retried(tmp_path, pretok_dir, tokenizer_dir):
    out_dir = tmp_path / "run"
    result = run_monitor(out_dir, ["--no_such_key=1"], [], timeout=TIMEOUT,
                         trainer=TrainPy(pretok_dir, tokenizer_dir))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no_such_key" in result.stderr
    assert len(attempts(out_dir)) == 1
    assert "configuration error: not restarting" in (out_dir / "monitor.log").read_text()
