"""False-negative filters: composable detectors of candidates that are probably not negatives.

Each filter is registered in :data:`contrastive.registry.FILTERS` and maps a :class:`FilterContext` to a
``(Q, K)`` bool mask (``True`` = remove) that feeds a loss's ``false_negative_mask``. A
:class:`FilterChain` takes the union and reports per-filter removal counts.

Registered names: ``known_duplicates``, ``same_label``, ``positive_aware``, ``guide_model``,
``neighbour_consensus``, ``iqr_outliers``, ``threshold``.

Example::

    from contrastive.registry import FILTERS
    chain = FilterChain([FILTERS.build("known_duplicates"), FILTERS.build("positive_aware", mode="perc", perc=0.95)])
    res = chain.apply(FilterContext(scores=s, candidate_ids=ids, positive_ids=pos, positive_scores=ps))
    loss(anchors, candidates, positive_mask, false_negative_mask=res.false_negative_mask)
"""
from contrastive.filters.base import FilterChain, FilterContext, FilterResult, NegativeFilter
from contrastive.filters.identity import KnownDuplicatesFilter, SameLabelFilter
from contrastive.filters.neighbours import NeighbourConsensusFilter
from contrastive.filters.score import GuideModelFilter, IQROutlierFilter, PositiveAwareFilter, ThresholdFilter

__all__ = [
    "FilterChain",
    "FilterContext",
    "FilterResult",
    "NegativeFilter",
    "KnownDuplicatesFilter",
    "SameLabelFilter",
    "PositiveAwareFilter",
    "GuideModelFilter",
    "NeighbourConsensusFilter",
    "IQROutlierFilter",
    "ThresholdFilter",
]
