"""Evaluation metrics: full-corpus retrieval metrics from exact ranks (:mod:`.retrieval`, :mod:`.ranks`)."""
from contrastive.metrics.ranks import RankInputError, RelevantRanks, relevant_ranks
from contrastive.metrics.retrieval import (
    CSNDistractors,
    csn_mrr,
    gold_ranks,
    metrics_from_ranks,
    metrics_from_relevant_ranks,
    retrieval_metrics,
    two_way_retrieval_metrics,
)

__all__ = [
    "CSNDistractors",
    "RankInputError",
    "RelevantRanks",
    "csn_mrr",
    "gold_ranks",
    "metrics_from_ranks",
    "metrics_from_relevant_ranks",
    "relevant_ranks",
    "retrieval_metrics",
    "two_way_retrieval_metrics",
]
