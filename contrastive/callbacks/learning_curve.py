"""The learning curve of a run: validation metrics against optimiser steps, plotted from ``metrics.csv``.

:func:`read_curve` reads the CSV logs of a run directory (``metrics.csv`` and, after resumes, the
``metrics.before_resume_*.csv`` files, in order); :func:`plot_learning_curve` writes
``learning_curve.png`` and ``learning_curve.csv`` next to them. :class:`LearningCurveCallback` does so
at the end of every fit (after flushing the CSV logger).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence, Union

from lightning.pytorch.callbacks import Callback

from contrastive.io import atomic_write, atomic_write_text

__all__ = ["LearningCurveCallback", "plot_learning_curve", "read_curve"]

DEFAULT_KEYS: tuple[str, ...] = ("val/mrr", "val/csn_mrr")


def read_curve(run_dir: Union[str, os.PathLike], keys: Sequence[str] = DEFAULT_KEYS) -> dict[str, list[tuple[int, float]]]:
    """``key -> [(step, value), ...]`` sorted by step, for each of ``keys`` found in the run's CSV logs
    (the last value wins when a step was logged twice, e.g. after a resume)."""
    d = Path(run_dir)
    files = sorted(d.glob("metrics.before_resume_*.csv"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    files += [d / "metrics.csv"] if (d / "metrics.csv").is_file() else []
    curve: dict[str, dict[int, float]] = {k: {} for k in keys}
    for f in files:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                for k in keys:
                    v = row.get(k)
                    if v not in (None, "") and row.get("step") not in (None, ""):
                        curve[k][int(float(row["step"]))] = float(v)
    return {k: sorted(v.items()) for k, v in curve.items() if v}


def plot_learning_curve(run_dir: Union[str, os.PathLike], keys: Sequence[str] = DEFAULT_KEYS,
                        baseline: dict[str, float] | None = None, title: str | None = None) -> Path | None:
    """Write ``run_dir/learning_curve.png`` (and the points as ``learning_curve.csv``); returns the png path,
    or ``None`` when no key has been logged. ``baseline`` (e.g. BM25's ``{"val/mrr": 0.5}``) draws
    horizontal reference lines."""
    curve = read_curve(run_dir, keys)
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    d = Path(run_dir)
    lines = ["metric,step,value"] + [f"{k},{s},{v}" for k, pts in curve.items() for s, v in pts]
    atomic_write_text(d / "learning_curve.csv", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, pts in curve.items():
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=k)
        if baseline and k in baseline:
            ax.axhline(baseline[k], linestyle="--", linewidth=1, color=ax.lines[-1].get_color(), label=f"{k} baseline")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation metric")
    ax.set_title(title or d.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = d / "learning_curve.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out


class LearningCurveCallback(Callback):
    """At the end of fit (global rank 0), flush the loggers and write the run's learning curve
    (:func:`plot_learning_curve`) into ``run_dir``."""

    def __init__(self, run_dir: Union[str, os.PathLike], keys: Sequence[str] = DEFAULT_KEYS) -> None:
        self.run_dir, self.keys = Path(run_dir), tuple(keys)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()
        plot_learning_curve(self.run_dir, self.keys, title=getattr(trainer.logger, "name", None))
