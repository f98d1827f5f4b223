"""Negative samplers: where the negatives of a training batch come from.

A sampler is a plain object. The datamodule asks it for extra negatives for the pairs of each training
batch (:meth:`NegativeSampler.sample`, ids of corpus records), or, for samplers that shape batches
(NGAME), for the order of the training pairs (:meth:`NegativeSampler.batch_order`). Samplers that need
the current model (FAISS hard negatives) are refreshed by a callback through :meth:`refresh`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from contrastive.registry import SAMPLERS


class NegativeSampler:
    """Base sampler: no extra negatives (in-batch only).

    Args:
        num_negatives: extra negatives per training pair (0 for purely in-batch sampling).
    """

    #: whether :meth:`refresh` needs the current encoder (the refresh callback checks this)
    needs_model: bool = False

    def __init__(self, num_negatives: int = 0) -> None:
        if num_negatives < 0:
            raise ValueError(f"sampler.num_negatives must be >= 0; got {num_negatives}")
        self.num_negatives = num_negatives

    def setup(self, query_texts: Sequence[str], doc_texts: Sequence[str], pair_ids: Tensor,
              dup_group: Optional[Tensor] = None) -> None:
        """Receive the training corpus: record ``i`` has query ``query_texts[i]``, document ``doc_texts[i]``,
        global id ``pair_ids[i]`` and duplicate group ``dup_group[i]``."""

    def sample(self, rows: Tensor) -> Tensor:
        """Extra negatives for the training records at positions ``rows`` (B,) → (B, num_negatives) row
        positions into the corpus, ``-1`` where fewer were available."""
        return torch.full((rows.shape[0], 0), -1, dtype=torch.long)

    def batch_order(self, epoch: int, batch_size: int, generator: torch.Generator) -> Optional[list[list[int]]]:
        """Optional: the training batches of ``epoch`` as lists of row positions (``None``: shuffle)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State a resumed run needs beyond the constructor arguments and the refreshed table (restored by
        the refresh callback); saved in every checkpoint. Default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Default: nothing to restore."""

    def refresh(self, encode_queries: Callable[[Sequence[str]], Tensor],
                encode_documents: Callable[[Sequence[str]], Tensor], step: int) -> dict[str, float]:
        """Re-mine with the current model; returns statistics to log."""
        return {}


@SAMPLERS.register("in_batch")
class InBatchSampler(NegativeSampler):
    """Only the other documents of the (global) batch are negatives (the default)."""

    def __init__(self) -> None:
        super().__init__(num_negatives=0)
