"""Checkpoint files: atomic commit, validation against the manifest, fallback, retention."""

import json
import os

import pytest
import torch

from utils import checkpoint as ckpt
from utils.errors import DataError


def write(out_dir, iteration, best_iter=None, before_commit=None):
    def save_model(d):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        torch.save({"w": torch.full((4,), float(iteration))}, d / "model.pt")

    return ckpt.save_checkpoint(
        out_dir, iteration, rank=0, save_model=save_model,
        shared_state={"optimizer": {"step": iteration}}, rank_state={"rng": {"r": iteration}},
        trainer_state={"iter": iteration, "best_iter": best_iter, "best_val_loss": 1.0},
        barrier=lambda: None, before_commit=before_commit,
    )


def test_save_and_load(tmp_path):
    path = write(tmp_path, 10)
    assert path.name == "iter_00000010" and ckpt.validate_checkpoint(path) is None
    assert ckpt.latest_valid_checkpoint(tmp_path) == path
    assert ckpt.load_trainer_state(path)["iter"] == 10
    assert ckpt.load_state(path, "optimizer") == {"step": 10}
    assert ckpt.load_state(path, "rng", rank=0) == {"r": 10}
    assert ckpt.latest_model_dir(tmp_path) == path / "model"
    with pytest.raises(DataError, match="no rng_rank00003"):
        ckpt.load_state(path, "rng", rank=3)


def test_crash_before_commit_leaves_previous_checkpoint(tmp_path):
    good = write(tmp_path, 10)

    def crash():
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 20, before_commit=crash)
    assert (tmp_path / "checkpoints" / "iter_00000020.tmp").is_dir()
    assert ckpt.latest_valid_checkpoint(tmp_path) == good
    # The next save clears the stale temporary directory.
    write(tmp_path, 30)
    assert not (tmp_path / "checkpoints" / "iter_00000020.tmp").exists()


def test_truncated_newest_falls_back_with_warning(tmp_path, caplog):
    good = write(tmp_path, 10)
    bad = write(tmp_path, 20)
    opt = bad / "optimizer.pt"
    with open(opt, "r+b") as f:
        f.truncate(os.path.getsize(opt) // 2)
    assert "optimizer.pt" in ckpt.validate_checkpoint(bad)
    assert ckpt.latest_valid_checkpoint(tmp_path) == good
    assert "unusable" in caplog.text


def test_retention_keeps_two_newest_and_best(tmp_path):
    for it in (10, 20, 30, 40):
        write(tmp_path, it, best_iter=10)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["iter_00000010", "iter_00000030", "iter_00000040"]
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["iter"] == 10


def test_retention_removes_damaged_older_checkpoints_and_keeps_a_damaged_newest(tmp_path):
    for it in (10, 20):
        write(tmp_path, it)
    root = tmp_path / "checkpoints"
    (root / "iter_00000010" / ckpt.MARKER).unlink()  # a deletion killed half-way
    (root / "iter_00000010" / "optimizer.pt").unlink()
    write(tmp_path, 30)
    bad = write(tmp_path, 40)
    (bad / ckpt.MARKER).write_text("[]")  # damaged newest: valid JSON, not a manifest
    assert ckpt.validate_checkpoint(bad) == "unreadable completion marker (not a JSON object)"
    write(tmp_path, 35)  # retention runs again with iter_00000040 damaged
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["iter_00000030", "iter_00000035", "iter_00000040"]
    assert ckpt.latest_valid_checkpoint(tmp_path) == root / "iter_00000035"


def test_a_damaged_state_file_of_the_right_size_is_a_clear_error(tmp_path):
    path = write(tmp_path, 10)
    opt = path / "optimizer.pt"
    opt.write_bytes(b"\0" * opt.stat().st_size)  # same size: passes the manifest check
    with pytest.raises(DataError, match=r"optimizer\.pt: unreadable"):
        ckpt.load_state(path, "optimizer")


def test_no_checkpoint_is_a_clear_error(tmp_path):
    assert ckpt.latest_valid_checkpoint(tmp_path) is None
    with pytest.raises(DataError, match="no valid checkpoint"):
        ckpt.latest_model_dir(tmp_path)
