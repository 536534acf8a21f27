"""utils.resplot: curves PNG from metrics.jsonl, several runs, clear errors."""

from __future__ import annotations

import json
import logging
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from utils.errors import DataError
from utils.metrics import MetricsLogger
from utils.resplot import load_run, main, run_names, series

ROOT = Path(__file__).resolve().parent.parent


def write_run(out_dir: Path, n: int, with_val: bool) -> None:
    with MetricsLogger(out_dir, tensorboard=False) as logger:
        for i in range(1, n + 1):
            logger.log(i, {"loss": 5.0 / i, "lr": 1e-3 * min(1.0, i / 3), "grad_norm": 1.0 / i,
                           "tokens_per_sec": 1000.0 + i})
            if with_val and i % 4 == 0:
                logger.log(i, {"val_loss": 5.5 / i, "val_ppl": math.exp(5.5 / i)})


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_two_runs_default_output(tmp_path):
    write_run(tmp_path / "a", 12, with_val=True)
    write_run(tmp_path / "b", 8, with_val=False)
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert png_size(tmp_path / "a" / "curves.png") == (1200, 800)


def test_explicit_output(tmp_path):
    write_run(tmp_path / "a", 4, with_val=False)
    out = tmp_path / "plots" / "x.png"
    main([str(tmp_path / "a"), f"--output={out}"])
    assert png_size(out) == (1200, 800)


def test_series_skips_missing_and_non_finite(tmp_path):
    rows = [{"iter": 1, "loss": 2.0}, {"iter": 2, "val_loss": 1.0}, {"iter": 3, "loss": math.nan},
            {"iter": 4, "loss": 1.5}]
    assert series(rows, "loss") == ([1, 4], [2.0, 1.5])
    assert series(rows, "val_loss") == ([2], [1.0])


def test_run_names_disambiguate(tmp_path):
    assert run_names([tmp_path / "x" / "run", tmp_path / "y" / "other"]) == ["run", "other"]
    same = [tmp_path / "x" / "run", tmp_path / "y" / "run"]
    assert run_names(same) == [str(p) for p in same]


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"empty_run/metrics.jsonl: no metrics file"):
        load_run(tmp_path / "empty_run")
    result = subprocess.run([sys.executable, "-m", "utils.resplot", str(tmp_path / "empty_run")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_rows_without_integer_iter_are_skipped_with_a_warning(tmp_path, caplog):
    rows = [{"iter": 1, "loss": 3.0}, {"loss": 2.9}, {"iter": None, "loss": 2.8},
            {"iter": "7", "loss": 2.7}, {"iter": True, "loss": 2.6}, {"iter": 2, "loss": 2.5}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="resplot"):
        assert [r["iter"] for r in load_run(tmp_path / "run")] == [1, 2]
    assert "skipped 4 row(s) without an integer 'iter'" in caplog.text
    assert series(rows, "loss") == ([1, 2], [3.0, 2.5])
    assert main([str(tmp_path / "run")]) == 0
    assert png_size(tmp_path / "run" / "curves.png") == (1200, 800)


def test_non_utf8_metrics_file_is_plotted(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(
        b'{"iter": 1, "loss": 2.0}\n\xff\xfe garbage \x80\n{"iter": 2, "loss": 1.5}\n')
    assert [r["iter"] for r in load_run(tmp_path / "run")] == [1, 2]
    assert main([str(tmp_path / "run")]) == 0


def test_a_single_row_is_drawn_with_a_marker(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    write_run(tmp_path / "one", 1, with_val=False)
    assert main([str(tmp_path / "one")]) == 0
    (fig,) = figures
    for ax in fig.axes:
        (line,) = ax.get_lines()  # a single point: only a marker makes it visible
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", "None")
