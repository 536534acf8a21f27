"""Plot training curves of one or more runs from their ``metrics.jsonl``.

    python -m utils.resplot OUT_DIR [OUT_DIR ...] [--output=curves.png]

Four panels against the iteration: train loss (solid) with val loss (dashed, markers), learning
rate, gradient norm, tokens/s. Several runs are overlaid, one colour per run, labelled by the
run directory's name. A series of at most ``MARKER_MAX_POINTS`` points also gets markers, so a
run with a single logged row still shows a dot. A panel whose metric no run logged says so
instead of staying blank. Rows without an integer ``iter`` (hand-edited or foreign files) are
skipped with a warning. The default output is ``curves.png`` in the first OUT_DIR.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from utils.errors import DataError, run_cli
from utils.logging_utils import get_logger, setup_logging
from utils.metrics import METRICS_FILE, read_metrics

logger = get_logger("resplot")

# (metric key, panel title, log-scale y axis)
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("loss", "loss (train solid, val dashed)", False),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm", True),
    ("tokens_per_sec", "tokens / s", False),
)
MARKER_MAX_POINTS = 20  # sparser series get markers: one point alone draws no line


def load_run(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``out_dir/metrics.jsonl``; DataError naming the path when it is missing or empty."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: no metrics file; pass a train.py out_dir (it writes {METRICS_FILE} there)"
        )
    rows = read_metrics(path)
    usable = [row for row in rows if _is_int(row.get("iter"))]
    if len(usable) < len(rows):
        logger.warning("%s: skipped %d row(s) without an integer 'iter'", path,
                       len(rows) - len(usable))
    if not usable:
        raise DataError(f"{path}: no metrics rows with an integer 'iter' yet")
    return usable


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(iters, values) of the rows that have an integer ``iter`` and a finite number under
    ``key``."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if not _is_int(row.get("iter")):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row["iter"])
            ys.append(float(value))
    return xs, ys


def plot_runs(runs: dict[str, list[dict[str, Any]]], output: str | Path) -> Path:
    """Draw ``runs`` (name -> metrics rows) into the PNG ``output``; returns its path."""
    import matplotlib.pyplot as plt

    fig = draw_runs(runs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def draw_runs(runs: dict[str, list[dict[str, Any]]]):
    """The 2x2 figure of ``runs`` (name -> metrics rows); the caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, log_y) in zip(axes.flat, PANELS):
        drawn = False
        for i, (name, rows) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            xs, ys = series(rows, key)
            if xs:
                marker = "o" if len(xs) <= MARKER_MAX_POINTS else None
                ax.plot(xs, ys, color=color, marker=marker, markersize=3, label=name)
                drawn = True
            if key == "loss":
                vx, vy = series(rows, "val_loss")
                if vx:
                    ax.plot(vx, vy, color=color, linestyle="--", marker="o", markersize=3,
                            label=f"{name} (val)")
                    drawn = True
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if drawn:
            if log_y:
                ax.set_yscale("log")
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    return fig


def run_names(out_dirs: list[Path]) -> list[str]:
    """Legend names: each dir's name, or its full path when two runs share a name."""
    names = [d.resolve().name or str(d) for d in out_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(out_dirs, names)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.resplot", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dirs", nargs="+", type=Path, metavar="OUT_DIR")
    parser.add_argument("--output", type=Path, default=None,
                        help="PNG path (default: OUT_DIR/curves.png of the first run)")
    args = parser.parse_args(argv)
    setup_logging()
    runs = {name: load_run(d) for name, d in zip(run_names(args.out_dirs), args.out_dirs)}
    output = plot_runs(runs, args.output or args.out_dirs[0] / "curves.png")
    logger.info("wrote %s (%d run(s))", output, len(runs))
    return 0


if __name__ == "__main__":
    run_cli(main)
