"""A training run's metrics: one JSON object per line in `metrics.jsonl`, and the loss curve drawn from it.

Training records are `{"step": s, "loss": ..., "grad_norm": ..., "lr": ..., <the loss function's aux>,
"seconds": ...}` for the update that read batch `s`; evaluation records are `{"step": c, "eval": {...}}` for
the parameters after `c` updates (the numbering of checkpoints). Each line is appended and flushed as it is
written, so a killed run leaves whole lines, at worst a torn last one, which is dropped on resume. A resumed
run first rewrites the file (atomically) to the records of the steps before its checkpoint, so the log of a
run stopped and resumed is the log of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from spec_jax.files import atomic_write, atomic_write_text


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics file (a torn last line, from a killed run, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to `path`, keeping from an earlier run only what precedes step `start` (see the module
    doc). `enabled` False (a process other than 0) writes nothing."""

    def __init__(self, path: str | Path, start: int, enabled: bool = True):
        self.path, self.file = Path(path), None
        if not enabled:
            return
        kept = [r for r in read_records(self.path) if r.get("step", math.inf) < start
                or ("eval" in r and r.get("step") == start)]
        atomic_write_text(self.path, "".join(_line(r) for r in kept))
        self.file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(_line(record))
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _line(record: dict) -> str:
    return json.dumps(record, default=_plain) + "\n"


def _plain(x):
    """numpy scalars and arrays (per-head losses, say) as JSON numbers and lists."""
    if isinstance(x, np.ndarray | np.generic):
        return x.tolist()
    raise TypeError(f"metric of type {type(x).__name__} is not a number or an array")


def plot_losses(metrics_file: str | Path, png_file: str | Path) -> Path:
    """Draw the training loss by step (and every evaluation metric whose name holds "loss") from a metrics
    file into a PNG (written atomically); returns `png_file`."""
    from matplotlib.figure import Figure

    records = read_records(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and isinstance(r["loss"], int | float)]
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, lw=1, label="train loss")
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    for name in dict.fromkeys(k for r in evals for k in r["eval"] if "loss" in k):
        points = [(r["step"], r["eval"][name]) for r in evals if isinstance(r["eval"].get(name), int | float)]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", ms=3, label=f"eval {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(metrics_file).parent.name or "training")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(png_file, lambda tmp: fig.savefig(tmp, dpi=120))
