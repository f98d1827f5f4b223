"""Code-search evaluation beside the full-corpus metrics: CodeSearchNet's distractor MRR."""
from __future__ import annotations

from typing import Sequence

from contrastive.metrics.retrieval import csn_mrr
from contrastive.models.evaluation import EvalOutputs


class CodeSearchNetMRR:
    """CodeSearchNet-style MRR (Husain et al. 2019, arXiv 1909.09436): each query ranks its paired code
    snippet against ``n_distractors`` sampled others (:func:`contrastive.metrics.retrieval.csn_mrr`).

    Args:
        n_distractors: distractors per query (999 in CodeSearchNet).
        stages: the stages it runs at (``"test"``: the published protocol).
    """

    def __init__(self, n_distractors: int = 999, stages: Sequence[str] = ("test",)) -> None:
        self.n_distractors, self.stages = int(n_distractors), tuple(stages)

    def __call__(self, outputs: EvalOutputs, stage: str) -> dict[str, float]:
        if stage not in self.stages:
            return {}
        if outputs.positive is None:
            raise ValueError("csn_mrr needs exactly one positive candidate per query")
        docs = outputs.candidates[outputs.positive]  # query i's paired snippet is document i
        return {"csn_mrr": float(csn_mrr(outputs.anchors, docs, n_distractors=self.n_distractors))}
