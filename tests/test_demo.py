"""demo.py: stage orchestration (skip, re-run, failure), its commands' flags, its metrics, and one
end-to-end run at smoke sizes (slow)."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from demo import FULL, SMOKE, Stage, Step, build_stages, run_stages, unigram_entropy

ROOT = Path(__file__).resolve().parent.parent


def test_unigram_entropy_matches_hand_computed(tmp_path):
    from data_preprocess.token_file import TokenFileMeta, write_token_file

    for name, ids in (("a", [1, 1, 2, 3]), ("b", [3, 3, 3, 7])):
        arr = np.array(ids, dtype=np.uint16)
        meta = TokenFileMeta(dtype="uint16", vocab_size=8, num_tokens=4, num_documents=1,
                             tokenizer_fingerprint="x", special_ids={}, add_bos=False,
                             text_field=None, source={})
        write_token_file(tmp_path / f"{name}.bin", arr, meta)
    h1, n = unigram_entropy(tmp_path)
    counts = [2, 1, 4, 1]  # tokens 1, 2, 3, 7 over 8 tokens
    assert n == 8
    assert h1 == pytest.approx(-sum(c / 8 * math.log(c / 8) for c in counts), abs=1e-12)


@pytest.mark.parametrize("plan", [FULL, SMOKE], ids=["full", "smoke"])
def test_every_command_parses(plan, tmp_path):
    """Each train.py / sample.py / evaluate_chat command has valid keys and values."""
    import sample
    from configurator import resolve_config
    from data.build_sft_data import select_tasks
    from utils import evaluate_chat

    stages, _ = build_stages(tmp_path, plan, ROOT / "data/sample/pretrain")
    assert [s.name for s in stages] == ["tokenizer", "pretokenize", "pretrain", "sft", "dpo",
                                        "generate", "plot"]
    argvs = [step.argv for s in stages for step in s.steps]
    train = [a[2:] for a in argvs if a[1] == "train.py"]
    assert {resolve_config(a).task.task_type for a in train} == {"pretrain", "sft", "dpo"}
    for a in train:  # SFT and DPO start from the previous stage's run
        cfg = resolve_config(a)
        assert bool(cfg.task.init_from) == (cfg.task.task_type != "pretrain")
    for a in argvs:
        if a[1] == "sample.py":
            sample.parse_args(a[2:])
        if a[1:3] == ["-m", "utils.evaluate_chat"]:
            evaluate_chat.parse_args(a[3:])
        if a[1:3] == ["-m", "data.build_sft_data"]:  # the SFT/DPO tasks exist
            tasks = [arg.split("=", 1)[1] for arg in a if arg.startswith("--tasks=")]
            assert len(tasks) == 1 and select_tasks(tasks[0])


def stub_stage(name: str, log: Path, out: Path, fail: bool = False) -> Stage:
    """A stage whose one command appends its name to ``log`` (or fails) and writes ``out``."""
    code = "import sys; open(sys.argv[1], 'a').write(sys.argv[2]); open(sys.argv[3], 'w').close()"
    if fail:
        code = "raise SystemExit(3)"
    return Stage(name, [out], [Step([sys.executable, "-c", code, str(log), name, str(out)])])


def test_run_stages_skips_finished_stages_and_reruns_everything_after_a_redo(tmp_path, capsys):
    log = tmp_path / "log"
    make = lambda: [stub_stage(n, log, tmp_path / f"{n}.out") for n in "abc"]  # noqa: E731
    first = make()
    run_stages(first, tmp_path)
    assert log.read_text() == "abc" and all(s.seconds is not None for s in first)
    assert "$ " in capsys.readouterr().out  # the command is echoed before it runs

    again = make()
    run_stages(again, tmp_path)
    assert log.read_text() == "abc" and all(s.seconds is None for s in again)

    (tmp_path / ".done" / "b").unlink()  # b must be redone, so c (which depends on it) too
    (tmp_path / "b.out").write_text("stale")
    redo = make()
    run_stages(redo, tmp_path)
    assert log.read_text() == "abcbc"
    assert [s.seconds is None for s in redo] == [True, False, False]
    assert (tmp_path / "b.out").read_text() == ""  # the old output was removed first


def test_a_failing_command_stops_the_demo_without_marking_the_stage(tmp_path):
    stages = [stub_stage("a", tmp_path / "log", tmp_path / "a.out"),
              stub_stage("b", tmp_path / "log", tmp_path / "b.out", fail=True)]
    with pytest.raises(SystemExit) as e:
        run_stages(stages, tmp_path)
    assert e.value.code == 3
    assert (tmp_path / ".done" / "a").exists() and not (tmp_path / ".done" / "b").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_demo_runs_every_stage_then_skips_them(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    shutil.copy(ROOT / "data/sample/pretrain/fortunes_min_en.json", data)
    out = tmp_path / "demo_out"
    cmd = [sys.executable, "demo.py", "--smoke", f"--out={out}", f"--pretrain_data={data}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text(encoding="utf-8")
    for name in ("tokenizer", "pretokenize", "pretrain", "sft", "dpo", "generate", "plot"):
        assert f"\n{name} " in summary
    for name in ("pretrain", "sft", "dpo"):
        assert (out / f"curves_{name}.png").stat().st_size > 0
        assert (out / f"exact_match_{name}.json").exists()
    assert "assistant>" in (out / "samples.txt").read_text(encoding="utf-8")

    proc = subprocess.run(cmd[:2] + cmd[3:] + ["--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished in an earlier run") == 7
    assert "\n$ " not in proc.stdout  # nothing ran again
    assert "held-out exact match" in proc.stdout  # metrics are read back from the artifacts
