"""Negative-quality report: how hard the mined negatives are and how many are known false negatives.

Written at every refresh (and by ``contrastive mine``) beside the run, e.g.
``runs/<exp>/<version>/negatives/step_<n>.png`` and ``step_<n>.json``. For a :class:`MinedTable`:

- **measured false-negative rate** ``dup_fraction``: the fraction of mined negatives that are known
  duplicates of the query's positive (same ``dup_group``), computed on what would have been mined
  *before* duplicate exclusion and the false-negative filters (``before``, from the table's
  ``before_neg_rows`` extra) and on what *was* mined (``after``), so the effect of the filters shows;
- **hardness**: mean / median negative score, mean margin ``positive - negative``, and the fraction of
  negatives scoring at or above the positive (``frac_above_positive``: likely false negatives, or a
  model that ranks them first);
- a histogram of positive vs negative scores (before and after), as a PNG (matplotlib, Agg canvas).

Scores are those of the mining model (BM25 or the dense model at the refresh). Rows topped up with random
negatives have NaN scores: they count in the false-negative rate but not in the hardness statistics.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from contrastive.io import atomic_write
from contrastive.samplers.table import MinedTable, atomic_write_json


def _group_key(groups: Tensor) -> Tensor:
    top = int(groups.max().clamp_min(0)) + 1 if groups.numel() else 0
    return torch.where(groups >= 0, groups, top + torch.arange(groups.shape[0]))


def _block_quality(query_rows: Tensor, neg: Tensor, scores: Tensor, pos: Tensor, key: Tensor) -> dict[str, float]:
    valid = neg >= 0
    n_valid = int(valid.sum())
    q = max(1, query_rows.shape[0])
    out: dict[str, float] = {"negatives": float(n_valid), "per_query": n_valid / q}
    dup = valid & (key[neg.clamp_min(0)] == key[query_rows].view(-1, 1))
    out["dup_fraction"] = float(dup.sum()) / n_valid if n_valid else float("nan")
    out["queries_with_dup"] = float(dup.any(dim=1).float().mean()) if query_rows.numel() else float("nan")
    fin = valid & torch.isfinite(scores)
    s = scores[fin]
    out["scored"] = float(s.numel())
    out["mean_score"] = float(s.mean()) if s.numel() else float("nan")
    out["median_score"] = float(s.median()) if s.numel() else float("nan")
    both = fin & torch.isfinite(pos).view(-1, 1)
    margin = (pos.view(-1, 1) - scores)[both]
    out["mean_margin"] = float(margin.mean()) if margin.numel() else float("nan")
    out["frac_above_positive"] = float((margin <= 0).float().mean()) if margin.numel() else float("nan")
    return out


def negative_quality(table: MinedTable) -> dict[str, Any]:
    """Quality statistics of a table: ``{"after": {...}, "before": {...} (if recorded), "positive": {...}}``.

    Keys of ``after`` / ``before``: ``negatives`` (count), ``per_query``, ``dup_fraction`` (measured
    false-negative rate), ``queries_with_dup``, ``scored``, ``mean_score``, ``median_score``,
    ``mean_margin`` (positive - negative) and ``frac_above_positive``.
    """
    key = _group_key(table.dup_group)
    pos = table.positive_scores
    out: dict[str, Any] = {"after": _block_quality(table.query_rows, table.neg_rows, table.scores, pos, key)}
    b_rows, b_scores = table.extras.get("before_neg_rows"), table.extras.get("before_scores")
    if b_rows is not None and b_scores is not None:
        out["before"] = _block_quality(table.query_rows, b_rows.long(), b_scores.float(), pos, key)
    fp = pos[torch.isfinite(pos)]
    out["positive"] = {"mean_score": float(fp.mean()) if fp.numel() else float("nan"),
                       "median_score": float(fp.median()) if fp.numel() else float("nan")}
    out["queries"] = int(table.query_rows.shape[0])
    out["short_fraction"] = float(((table.neg_rows >= 0).sum(dim=1) < table.num_negatives).float().mean()) \
        if table.query_rows.numel() and table.num_negatives else 0.0
    return out


def quality_metrics(quality: dict[str, Any], prefix: str = "negatives") -> dict[str, float]:
    """Flatten :func:`negative_quality` into loggable scalars ``<prefix>/<after|before|positive>/<name>``;
    NaNs are left out."""
    flat: dict[str, float] = {}
    for part in ("after", "before", "positive"):
        for k, v in (quality.get(part) or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                flat[f"{prefix}/{part}/{k}"] = float(v)
    flat[f"{prefix}/short_fraction"] = float(quality.get("short_fraction", 0.0))
    return flat


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class NegativeQualityReport:
    """Computes :func:`negative_quality` for a table and writes ``<name>.json`` and ``<name>.png``.

    Args:
        bins: histogram bins.
        plot: write the PNG (the JSON is always written).
        prefix: metric-name prefix.
    """

    def __init__(self, bins: int = 50, plot: bool = True, prefix: str = "negatives") -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"report bins must be a positive integer; got {bins!r}")
        self.bins, self.plot, self.prefix = bins, bool(plot), prefix

    def write(self, table: MinedTable, step: int, out_dir: Union[str, os.PathLike], name: Optional[str] = None,
              extra: Optional[dict[str, Any]] = None) -> dict[str, float]:
        """Write the report of ``table`` as ``out_dir/<name>.{json,png}`` (default name ``step_<step>``)
        and return the flat metrics."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = name or f"step_{int(step)}"
        quality = negative_quality(table)
        metrics = quality_metrics(quality, self.prefix)
        payload = {"step": int(step), "quality": _clean(quality), "metrics": metrics,
                   "sampler": table.header.get("sampler", {}).get("name"), "key": table.header.get("key"),
                   "checkpoint": table.header.get("checkpoint"), "mining_stats": table.header.get("stats"),
                   **(extra or {})}
        atomic_write_json(out_dir / f"{name}.json", _clean(payload))
        if self.plot:
            self.plot_histogram(table, quality, step, out_dir / f"{name}.png")
        return metrics

    def plot_histogram(self, table: MinedTable, quality: dict[str, Any], step: int, path: Path) -> None:
        """Positive vs negative score histograms (before / after the filters) as a PNG, written atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        def finite(t: Optional[Tensor], mask: Optional[Tensor] = None) -> Tensor:
            if t is None:
                return torch.empty(0)
            t = t.float()
            keep = torch.isfinite(t) if mask is None else (mask & torch.isfinite(t))
            return t[keep]

        pos = finite(table.positive_scores)
        after = finite(table.scores, table.neg_rows >= 0)
        b_rows = table.extras.get("before_neg_rows")
        before = finite(table.extras.get("before_scores"), None if b_rows is None else b_rows >= 0)
        fig = Figure(figsize=(7, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        every = torch.cat([pos, after, before])
        if every.numel():
            lo, hi = float(every.min()), float(every.max())
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            kw = dict(bins=self.bins, range=(lo, hi), density=True)
            if before.numel():
                ax.hist(before.numpy(), histtype="step", linestyle="--", color="tab:gray", label="negatives before filters", **kw)
            if after.numel():
                ax.hist(after.numpy(), alpha=0.55, color="tab:red", label="mined negatives", **kw)
            if pos.numel():
                ax.hist(pos.numpy(), alpha=0.55, color="tab:blue", label="positives", **kw)
            ax.legend(loc="upper left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no scores (random negatives)", ha="center", va="center", transform=ax.transAxes)
        a, b = quality.get("after", {}), quality.get("before", {})

        def pct(x: Any) -> str:
            return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"

        sampler = table.header.get("sampler", {}).get("name", "?")
        ax.set_title(f"{sampler} negatives, step {int(step)}: known-duplicate rate {pct(b.get('dup_fraction'))} before → "
                     f"{pct(a.get('dup_fraction'))} after filters; above positive {pct(a.get('frac_above_positive'))}",
                     fontsize=8)
        ax.set_xlabel("score under the mining model")
        ax.set_ylabel("density")
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def log_metrics(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """Send scalars to every logger of ``trainer`` (usable from any hook, unlike ``LightningModule.log``)."""
    if not metrics:
        return
    for lg in getattr(trainer, "loggers", None) or []:
        lg.log_metrics(metrics, step=int(step))


class NegativeReportCallback(Callback):
    """Writes the quality report of a sampler's fixed table (BM25 negatives) once, when training starts.

    Samplers that refresh (``needs_model``) are reported by
    :class:`~contrastive.callbacks.refresh.NegativeRefreshCallback` at every refresh instead.

    Args:
        sampler: a sampler exposing ``table`` (a :class:`MinedTable` or ``None``).
        out_dir: report directory; ``None`` = ``<trainer.log_dir>/negatives``.
        report: the report writer (default :class:`NegativeQualityReport`).
    """

    def __init__(self, sampler: Any, out_dir: Optional[str] = None, report: Optional[NegativeQualityReport] = None) -> None:
        self.sampler, self.out_dir = sampler, out_dir
        self.report = report or NegativeQualityReport()
        self.metrics: dict[str, float] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        table = self.sampler.mined_table()
        if table is None or not trainer.is_global_zero:
            return
        out = Path(self.out_dir) if self.out_dir else Path(trainer.log_dir or trainer.default_root_dir) / "negatives"
        self.metrics = self.report.write(table, trainer.global_step, out)
        log_metrics(trainer, self.metrics, trainer.global_step)
