"""Lightning callbacks (negative refresh, negative-quality reports) and the builder that reads the config.

``build_callbacks(cfg, job)`` returns

- a :class:`~contrastive.callbacks.refresh.NegativeRefreshCallback` when ``job.sampler.needs_model``
  (``faiss_hard``, ``ngame``), scheduled by the sampler's ``refresh_schedule`` (or its own
  ``should_refresh``); it also writes the quality report at every refresh;
- a :class:`~contrastive.callbacks.report.NegativeReportCallback` when the sampler holds a fixed mined
  table (``bm25``: ``mined_table()``), which reports it once at the start of training;
- a :class:`~contrastive.callbacks.learning_curve.LearningCurveCallback` writing ``learning_curve.png``
  (validation MRR against steps) into the run directory at the end of fit (``callbacks.learning_curve:
  false`` turns it off).

Optional ``callbacks.refresh`` keys in the experiment config: ``cache_dir``, ``batch_size``, ``report``,
``use_cache``, ``progress_bar``; ``callbacks.negative_report: false`` turns the reports off.
"""
from __future__ import annotations

from typing import Any, Optional

from contrastive.callbacks.learning_curve import LearningCurveCallback, plot_learning_curve
from contrastive.callbacks.refresh import NegativeRefreshCallback
from contrastive.callbacks.report import NegativeQualityReport, NegativeReportCallback, negative_quality
from contrastive.samplers.base import NegativeSampler

__all__ = ["LearningCurveCallback", "plot_learning_curve", "NegativeRefreshCallback", "NegativeReportCallback", "NegativeQualityReport", "negative_quality",
           "build_callbacks", "config_fingerprint"]

_REFRESH_KEYS = ("cache_dir", "batch_size", "report", "use_cache", "progress_bar")


def config_fingerprint(cfg: dict) -> str:
    """Fingerprint of the config parts that change embeddings besides the weights (the model section and
    the tokenisation settings of the data section); part of the mined-table cache key."""
    from contrastive.samplers.table import fingerprint

    data = cfg.get("data") or {}
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if any(t in k for t in ("vocab", "length", "token", "name"))}
    return fingerprint({"data": data, "model": cfg.get("model")})


def build_callbacks(cfg: dict, job: Any) -> list:
    """Callbacks implied by the config (the sampler's refresh and report); empty for in-batch training."""
    sampler: Optional[NegativeSampler] = job.sampler
    section = dict((cfg.get("callbacks") or {}))
    reports = bool(section.get("negative_report", True))
    out: list = []
    if section.get("learning_curve", True) and getattr(job, "run_dir", None) is not None:
        out.append(LearningCurveCallback(job.run_dir))
    if sampler is None:
        return out
    schedule = sampler.refresh_schedule
    if sampler.needs_model and schedule is not None:
        opts = dict(section.get("refresh") or {})
        unknown = sorted(set(opts) - set(_REFRESH_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) callbacks.refresh.{', callbacks.refresh.'.join(unknown)}; valid keys: "
                             f"{', '.join(_REFRESH_KEYS)}")
        opts.setdefault("report", reports)
        if job.run_dir is not None and "cache_dir" not in opts:
            opts["cache_dir"] = str(job.run_dir / "negatives")
        # the cache key must change with anything that changes the embeddings besides the weights
        out.append(NegativeRefreshCallback(
            sampler,
            every_n_epochs=schedule.every_n_epochs,
            every_n_steps=schedule.every_n_steps,
            start_epoch=schedule.start_epoch,
            config_fingerprint=config_fingerprint(cfg),
            **opts,
        ))
    elif reports and sampler.mined_table() is not None:
        out.append(NegativeReportCallback(sampler, out_dir=str(job.run_dir / "negatives")
                                          if job.run_dir is not None else None))
    return out
