"""The memory-queue "sampler": negatives are past batches' document embeddings (MoCo, He et al. 2020).

A queue is a property of the model (it lives in :class:`~contrastive.models.contrastive.ContrastiveModule`
buffers and needs its encoders), so :class:`QueueSampler` is a *marker*: it adds no extra documents to the
batch and only carries the settings that :func:`contrastive.build.build_model` passes to the model as
``queue_size`` / ``momentum`` (:meth:`QueueSampler.model_settings`). Switching is one command-line
override: ``sampler=queue``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from contrastive.registry import SAMPLERS
from contrastive.samplers.base import NegativeSampler


@SAMPLERS.register("queue")
class QueueSampler(NegativeSampler):
    """In-batch negatives plus a FIFO queue of the last ``size`` document embeddings.

    Args:
        size: queue capacity (number of past document embeddings appended to the candidates), ``>= 1``.
        momentum: ``None`` = queue entries come from the trained tower (detached); otherwise the EMA
            coefficient ``m`` in ``[0, 1]`` of a momentum document encoder (MoCo; typical 0.99-0.999).

    Attributes:
        queue_size, momentum: what the model builder passes to the model.
    """

    def __init__(self, size: int = 4096, momentum: Optional[float] = None) -> None:
        super().__init__(num_negatives=0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"sampler 'queue': size must be a positive integer; got {size!r}")
        if momentum is not None and (not math.isfinite(float(momentum)) or not 0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"sampler 'queue': momentum must be in [0, 1] or null; got {momentum!r}")
        self.queue_size = size
        self.momentum = None if momentum is None else float(momentum)

    def model_settings(self) -> dict[str, Any]:
        return {"queue_size": self.queue_size, "momentum": self.momentum}

    def __repr__(self) -> str:
        return f"QueueSampler(size={self.queue_size}, momentum={self.momentum})"
