"""Evaluation of a :class:`~contrastive.models.contrastive.ContrastiveModule` at the end of a validation or
test epoch: the module collects every anchor and candidate embedding with its ids, labels and groups into
:class:`EvalOutputs` and hands them to its evaluators, each returning named metrics. Settings add their
own evaluators (e.g. the code-search setting's CodeSearchNet distractor MRR)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor


@dataclass
class EvalOutputs:
    """All evaluation items of a split, in a rank-independent order.

    Attributes:
        anchors: ``(Q, d)`` float, sorted by ``anchor_ids``.
        anchor_ids, anchor_labels, anchor_groups: ``(Q,)`` long.
        candidates: ``(N, d)`` float: every distinct candidate (by id), sorted by ``candidate_ids``.
        candidate_ids, candidate_labels, candidate_groups: ``(N,)`` long.
        positive: ``(Q,)`` long index of each anchor's single positive candidate, or ``None`` when some
            anchor has several (or none).
    """

    anchors: Tensor
    anchor_ids: Tensor
    anchor_labels: Tensor
    anchor_groups: Tensor
    candidates: Tensor
    candidate_ids: Tensor
    candidate_labels: Tensor
    candidate_groups: Tensor
    positive: Optional[Tensor]

    @classmethod
    def collect(cls, a: Tensor, a_ids: Tensor, a_labels: Tensor, a_groups: Tensor, c: Tensor, c_ids: Tensor,
                c_labels: Tensor, c_groups: Tensor) -> "EvalOutputs":
        """Sort anchors by id, keep one candidate per id (sorted), and find single positives."""
        order = torch.argsort(a_ids)
        a, a_ids, a_labels, a_groups = a[order], a_ids[order], a_labels[order], a_groups[order]
        uniq, first = _first_occurrence(c_ids)
        c, c_labels, c_groups = c[first], c_labels[first], c_groups[first]
        order = torch.argsort(c_labels, stable=True)  # positives by binary search, not a (Q, N) matrix
        left = torch.searchsorted(c_labels[order], a_labels)
        count = torch.searchsorted(c_labels[order], a_labels, right=True) - left
        single = c_labels.numel() > 0 and bool((count == 1).all())
        positive = order[left.clamp(max=max(c_labels.numel() - 1, 0))] if single else None
        return cls(a, a_ids, a_labels, a_groups, c, uniq, c_labels, c_groups, positive)


def _first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted distinct ``ids`` and the index of each one's first occurrence."""
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    pos = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    return uniq, first


class Evaluator(Protocol):
    """``evaluator(outputs, stage) -> {name: value}``; ``stage`` is ``"val"`` or ``"test"``. An evaluator may
    also expose ``last_items: dict[str, list]``, per-item outcomes of its last call (e.g. each test query's
    rank), which :class:`~contrastive.models.contrastive.ContrastiveModule` gathers into its ``last_items``."""

    def __call__(self, outputs: EvalOutputs, stage: str) -> dict[str, float]: ...


class RetrievalEvaluator:
    """Full-corpus retrieval metrics (MRR, Recall@k, nDCG@10 and their duplicate-filtered variants) of
    every anchor against every candidate, computed exactly in chunks of ``chunk_size`` anchors
    (:func:`contrastive.metrics.retrieval.retrieval_metrics`), plus ``corpus_size``."""

    def __init__(self, chunk_size: int = 4096) -> None:
        self.chunk_size = int(chunk_size)

    def __call__(self, outputs: EvalOutputs, stage: str) -> dict[str, float]:
        from contrastive.metrics import retrieval

        o = outputs
        if o.positive is not None:
            metrics = retrieval.retrieval_metrics(o.anchors, o.candidates, o.positive, dup_group=o.candidate_groups,
                                                  chunk_size=self.chunk_size)
        else:  # several positives per anchor: labels define relevance
            metrics = retrieval.retrieval_metrics(o.anchors, o.candidates, None, dup_group=o.candidate_groups,
                                                  chunk_size=self.chunk_size, query_labels=o.anchor_labels,
                                                  doc_labels=o.candidate_labels)
        out = {k: float(v) for k, v in metrics.items()}
        out["corpus_size"] = float(o.candidates.shape[0])
        return out
