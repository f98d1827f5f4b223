"""Id- and label-based false-negative filters: exact knowledge, no scores involved.

- ``known_duplicates``: the candidate is a positive (same id) or a known duplicate of one (same
  ``dup_group``), the fix sentence-transformers' maintainers suggest for in-batch duplicates (ST #2732,
  #3189): mask by id inside the loss rather than string-compare in a sampler.
- ``same_label``: the candidate carries the anchor's class label (supervised contrastive learning,
  Khosla et al. 2020, where same-label items are positives, never negatives).
"""
from __future__ import annotations

import torch
from torch import Tensor

from contrastive.filters.base import FilterContext, NegativeFilter, require
from contrastive.filters.functional import gather_corpus, rowwise_isin
from contrastive.registry import FILTERS


@FILTERS.register("known_duplicates")
class KnownDuplicatesFilter(NegativeFilter):
    """Flag candidates that are one of the anchor's positives or in the same duplicate group as one.

    Flags ``(q, k)`` when ``candidate_ids[q, k]`` is in ``positive_ids[q]``, or when
    ``dup_group[candidate_ids[q, k]] == dup_group[p]`` for some positive ``p`` of anchor ``q``.
    Negative group ids mean "no known duplicate" and never match each other. Without ``dup_group``
    only the id test runs. Positive *columns* (``FilterContext.positive_mask``) are never flagged.

    Args:
        include_anchor: also flag the anchor itself and its duplicates (needs ``anchor_ids``): for
            symmetric losses where anchors and candidates share one corpus (anchor–anchor terms).
    """

    name = "known_duplicates"

    def __init__(self, include_anchor: bool = False) -> None:
        self.include_anchor = bool(include_anchor)

    def flag(self, ctx: FilterContext) -> Tensor:
        if ctx.positive_ids is None and not self.include_anchor:
            raise ValueError("filter 'known_duplicates' needs FilterContext.positive_ids")
        if self.include_anchor:
            require(ctx, self.name + " (include_anchor=True)", "anchor_ids")
        ids = ctx.ids()
        refs = []  # (Q, *) id sets whose members (and duplicates) are not negatives
        if ctx.positive_ids is not None:
            refs.append(ctx.positive_ids.long())
        if self.include_anchor:
            refs.append(ctx.anchor_ids.long().view(-1, 1))
        ref = torch.cat(refs, dim=1)
        out = rowwise_isin(ids, ref)
        if ctx.dup_group is not None:
            groups = ctx.dup_group.long()
            out |= rowwise_isin(gather_corpus(groups, ids), gather_corpus(groups, ref))
        return out


@FILTERS.register("same_label")
class SameLabelFilter(NegativeFilter):
    """Flag candidates whose class label equals the anchor's (SupCon-style supervision).

    The anchor's label is ``anchor_labels[q]`` when given; otherwise the labels of its positives
    (``labels[positive_ids[q]]``, any of them). Negative labels mean "unlabelled" and never match.
    """

    name = "same_label"

    def flag(self, ctx: FilterContext) -> Tensor:
        require(ctx, self.name, "labels")
        labels = ctx.labels.long()
        cand = gather_corpus(labels, ctx.ids())
        if ctx.anchor_labels is not None:
            ref = ctx.anchor_labels.long().view(-1, 1)
        elif ctx.positive_ids is not None:
            ref = gather_corpus(labels, ctx.positive_ids.long())
        else:
            raise ValueError("filter 'same_label' needs FilterContext.anchor_labels or FilterContext.positive_ids")
        return rowwise_isin(cand, torch.where(ref < 0, torch.full_like(ref, -1), ref))
