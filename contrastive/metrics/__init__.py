"""Evaluation metrics: full-corpus retrieval metrics from exact gold ranks (:mod:`.retrieval`)."""
from contrastive.metrics.retrieval import CSNDistractors, csn_mrr, gold_ranks, metrics_from_ranks, retrieval_metrics

__all__ = ["CSNDistractors", "csn_mrr", "gold_ranks", "metrics_from_ranks", "retrieval_metrics"]
