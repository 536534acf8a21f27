"""utils.metrics: metrics.jsonl rows, JSON safety, resume truncation, TensorBoard, heartbeat."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from utils.metrics import (
    MetricsLogger,
    format_console_line,
    read_heartbeat,
    read_metrics,
    touch_heartbeat,
    truncate_after,
)


def strict_rows(path) -> list[dict]:
    """Parse like a strict JSON reader would (NaN/Infinity literals are rejected)."""

    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_rows_are_strict_json_and_flushed_per_line(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": torch.tensor(2.5), "lr": 3e-4, "grad_norm": float("nan"),
                   "scale": float("inf"), "skipped": 0, "note": "warmup"})
    # flushed before close: a crash right now would keep the row
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert rows == [{"iter": 1, "loss": 2.5, "lr": 3e-4, "grad_norm": "NaN", "scale": "Infinity",
                     "skipped": 0, "note": "warmup"}]
    logger.log(2, {"loss": -math.inf})
    logger.close()
    back = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(back[0]["grad_norm"]) and back[0]["scale"] == math.inf
    assert back[1] == {"iter": 2, "loss": -math.inf}


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "rank1").exists()
    touch_heartbeat(tmp_path, 5, rank=1)
    assert read_heartbeat(tmp_path) is None


def test_truncate_after_keeps_rows_up_to_the_resumed_iteration(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iter": i, "loss": 1.0 / i}) for i in range(1, 8)]
    path.write_text("\n".join(lines) + '\n{"iter": 8, "lo')  # torn last line from a crash
    assert truncate_after(path, 4) == 4  # iters 5, 6, 7 and the torn line
    assert [row["iter"] for row in read_metrics(path)] == [1, 2, 3, 4]
    assert path.read_text() == "\n".join(lines[:4]) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left
    inode = path.stat().st_ino
    assert truncate_after(path, 10) == 0 and path.stat().st_ino == inode  # untouched
    assert truncate_after(tmp_path / "missing.jsonl", 3) == 0


def test_read_metrics_skips_undecodable_and_unparseable_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b'{"iter": 1, "loss": 2.0}\n'
        b"\xff\xfe\x00 not utf-8\n"
        b'{"iter": 2, "note": "caf\xe9"}\n'  # latin-1 inside an otherwise valid row
        b"[[[[[[[[[[[[[[[[[[[[" * 5000 + b"\n"  # too deep for json's recursion limit
        b'{"iter": 3, "loss": "NaN"}\r\n'
        b'{"iter": 4, "lo'  # torn last line
    )
    rows = read_metrics(path)
    assert [r["iter"] for r in rows] == [1, 3]
    assert math.isnan(rows[1]["loss"])


def test_resumed_logger_equals_uninterrupted(tmp_path):
    losses = {i: 10.0 / i for i in range(1, 11)}
    with MetricsLogger(tmp_path / "ref", tensorboard=False) as ref:
        for i, loss in losses.items():
            ref.log(i, {"loss": loss})
    with MetricsLogger(tmp_path / "run", tensorboard=False) as first:
        for i in range(1, 8):  # crashed after logging iter 7; last checkpoint at iter 5
            first.log(i, {"loss": losses[i]})
    with MetricsLogger(tmp_path / "run", tensorboard=False, resume_iter=5) as resumed:
        for i in range(6, 11):
            resumed.log(i, {"loss": losses[i]})
    expected = (tmp_path / "ref/metrics.jsonl").read_text()
    assert (tmp_path / "run/metrics.jsonl").read_text() == expected


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as first:
        for i in range(1, 7):
            first.log(i, {"loss": float(i), "grad_norm": float("nan")})
    with MetricsLogger(tmp_path, resume_iter=3) as resumed:
        for i in range(4, 7):
            resumed.log(i, {"loss": 100.0 + i})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)
    ]


def test_console_line(tmp_path, caplog):
    line = format_console_line(
        100, {"loss": 2.5, "lr": 3e-4, "grad_norm": 1.25, "tokens_per_sec": 12345.6, "mfu": 0.125,
              "step_ms": 210.04, "mem_gib": 1.5, "rewards/margin": 0.123456, "val_loss": "NaN"}
    )
    assert line == ("iter 100 | loss 2.5000 | val_loss NaN | lr 3.000e-04 | grad_norm 1.250 | "
                    "tok/s 12,346 | mfu 12.5% | step 210.0ms | mem 1.50GiB | rewards/margin=0.1235")
    with caplog.at_level(logging.INFO, logger="utils.metrics"):
        with MetricsLogger(tmp_path, tensorboard=False) as logger:
            logger.log(3, {"loss": 1.0})
    assert "iter 3 | loss 1.0000" in caplog.text


def test_heartbeat(tmp_path):
    assert read_heartbeat(tmp_path) is None
    touch_heartbeat(tmp_path, 12, phase="checkpoint_write")
    beat = read_heartbeat(tmp_path)
    assert beat["iter"] == 12 and beat["phase"] == "checkpoint_write" and beat["time"] > 0
    touch_heartbeat(tmp_path, 13)
    assert read_heartbeat(tmp_path)["iter"] == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heartbeat"]


def test_metric_named_iter_is_a_bug(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger, pytest.raises(AssertionError):
        logger.log(1, {"iter": 1})
