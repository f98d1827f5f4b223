"""Typed schemas of the sections of an experiment config that are not registry components.

Registry-backed sections (``data``, ``model``, ``model.encoder``, ``loss``, ``sampler``, ...) are validated
against the registered constructor's signature instead (see :mod:`contrastive.config.validate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union


@dataclass
class TrainerConfig:
    """The subset of ``lightning.Trainer`` arguments a config may set."""

    max_epochs: int = 1
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Union[int, str, list] = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Union[str, int] = "32-true"
    log_every_n_steps: int = 10
    val_check_interval: Optional[Union[int, float]] = None
    check_val_every_n_epoch: Optional[int] = 1
    limit_train_batches: Optional[Union[int, float]] = None
    limit_val_batches: Optional[Union[int, float]] = None
    limit_test_batches: Optional[Union[int, float]] = None
    num_sanity_val_steps: int = 0
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    deterministic: Optional[bool] = None
    enable_progress_bar: bool = True
    enable_checkpointing: bool = True
    use_distributed_sampler: bool = True
    max_time: Optional[str] = None


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a decay schedule."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class EvalConfig:
    """Retrieval evaluation settings."""

    chunk_size: int = 4096
    csn_distractors: int = 999
    bm25_baseline: bool = True


@dataclass
class RunConfig:
    """Where and how a run writes its outputs."""

    output_dir: str = "runs"
    test_after_fit: bool = True
    monitor: str = "val/mrr"
    monitor_mode: Literal["min", "max"] = "max"
    num_threads: Optional[int] = None
    #: write ``checkpoints/last.ckpt`` (and ``step-<n>.ckpt``) every this many optimiser steps, besides the
    #: epoch ends (``null``: epoch ends only); a killed run resumes from there exactly
    checkpoint_every_n_steps: Optional[int] = 100
    #: how many ``step-<n>.ckpt`` files to keep (the fallback when ``last.ckpt`` is damaged)
    keep_step_checkpoints: int = 1


#: top-level keys of an experiment and how each is validated: a dataclass schema, a registry family
#: name (``"component:<family>"``) or a plain type.
TOP_LEVEL: dict[str, object] = {
    "experiment": str,
    "seed": int,
    "data": "component:datamodule",
    "model": "component:model",
    "loss": "component:loss",
    "sampler": "component:sampler",
    "trainer": TrainerConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "run": RunConfig,
    "filters": "list:filter",
    "transforms": "list:feature transform",
    "callbacks": dict,
}

REQUIRED_TOP_LEVEL = ("experiment", "data", "model", "loss")

#: constructor arguments filled in at build time from other objects (not expected in YAML)
BUILD_FILLED: dict[str, tuple[str, ...]] = {
    "model": ("query_encoder", "doc_encoder", "loss", "lr", "weight_decay", "warmup_steps", "scheduler",
              "eval_chunk_size", "csn_distractors", "sampler", "feature_transform", "filters"),
    "encoder": ("vocab_size",),
    "datamodule": ("sampler", "architecture"),
}
