"""Uniform random negatives from the training corpus (the baseline every hard-negative method is compared to)."""
from __future__ import annotations

import torch
from torch import Tensor

from contrastive.registry import SAMPLERS
from contrastive.samplers.table import CorpusSampler, MinedTable


@SAMPLERS.register("random")
class RandomNegativeSampler(CorpusSampler):
    """``num_negatives`` documents drawn uniformly from the training corpus for every training pair.

    A drawn row is never the pair itself, never a known duplicate of it (same ``dup_group``, when
    ``exclude_duplicates``) and never repeated within a row; a row whose eligible pool is smaller than
    ``num_negatives`` (a tiny corpus, a huge duplicate group) is padded with ``-1``.

    Draws are a counter-based hash of ``(seed, epoch, row, draw index)`` (SplitMix64): the same seed gives
    the same negatives for a row in an epoch whatever its batch-mates or the dataloader worker, and a new
    epoch (``set_epoch``, called by :class:`~contrastive.samplers.collate.SamplerBatchSampler`) gives new
    ones.

    Args:
        num_negatives: extra negatives per pair, ``>= 1`` and at most ``N - 1`` (checked in ``setup``).
        exclude_duplicates: skip rows of the pair's duplicate group.
        seed: the seed.
    """

    name = "random"

    def __init__(self, num_negatives: int = 1, exclude_duplicates: bool = True, seed: int = 0) -> None:
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"sampler.num_negatives must be an integer >= 1 for the random sampler; got {num_negatives!r}")
        super().__init__(num_negatives=num_negatives, exclude_duplicates=exclude_duplicates, seed=seed)

    def sample(self, rows: Tensor) -> Tensor:
        """``(B,)`` rows → ``(B, num_negatives)`` random rows, ``-1`` where too few are eligible."""
        return self.draw_random(torch.as_tensor(rows).long().view(-1), self.num_negatives)

    def mine_all(self) -> MinedTable:
        """The negatives of every training row for the current epoch as a table (scores unknown: NaN)."""
        rows = torch.arange(self.num_rows)
        neg = self.sample(rows)
        return MinedTable(query_rows=rows, neg_rows=neg, scores=torch.full(neg.shape, float("nan")),
                          positive_scores=torch.full((rows.shape[0],), float("nan")),
                          pair_ids=self.pair_ids, dup_group=self.dup_group)
