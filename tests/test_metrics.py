"""Retrieval metrics from exact gold ranks, against torchmetrics and hand-made cases."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

from contrastive.metrics import CSNDistractors, csn_mrr, gold_ranks, metrics_from_ranks, retrieval_metrics


def torchmetrics_reference(q: torch.Tensor, d: torch.Tensor, positive: torch.Tensor) -> dict[str, float]:
    """torchmetrics on the full (Q, N) matrix: fine for a test, but that matrix is exactly what
    gold_ranks avoids materialising (torchmetrics takes one score per query-document pair)."""
    nq, n = q.shape[0], d.shape[0]
    # torchmetrics' reciprocal rank ignores a relevant document whose score is <= 0; a constant shift
    # keeps every score positive without changing any ranking
    preds = (q @ d.T + 1000.0).flatten()
    target = torch.zeros(nq, n, dtype=torch.bool)
    target[torch.arange(nq), positive] = True
    target = target.flatten()
    indexes = torch.arange(nq).repeat_interleave(n)
    out = {"mrr": RetrievalMRR()(preds, target, indexes=indexes).item()}
    for k in (1, 5, 10):
        out[f"recall@{k}"] = RetrievalRecall(top_k=k)(preds, target, indexes=indexes).item()
    out["ndcg@10"] = RetrievalNormalizedDCG(top_k=10)(preds, target, indexes=indexes).item()
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_torchmetrics(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, d = torch.randn(40, 6, generator=g), torch.randn(60, 6, generator=g)
    q[:20] = d[:20] + 0.3 * torch.randn(20, 6, generator=g)  # half the queries are easy: ranks near 1
    positive = torch.cat([torch.arange(20), torch.randint(0, 60, (20,), generator=g)])
    ours = retrieval_metrics(q, d, positive, chunk_size=7)
    ref = torchmetrics_reference(q, d, positive)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key


def test_metrics_from_ranks_hand_case() -> None:
    m = metrics_from_ranks(torch.tensor([1, 2, 10, 11]))
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 4)
    assert m["recall@1"] == 0.25 and m["recall@5"] == 0.5 and m["recall@10"] == 0.75
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)
    assert set(metrics_from_ranks(torch.tensor([3]), ks=(1, 100), ndcg_k=5)) == {"mrr", "recall@1", "recall@100", "ndcg@5"}
    with pytest.raises(ValueError, match=">= 1"):
        metrics_from_ranks(torch.tensor([0, 1]))


def test_gold_ranks_hand_case_and_ties() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[0.9, 0.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.0]])  # doc 3 duplicates doc 0
    ranks = gold_ranks(q, d, torch.tensor([0, 2]), chunk_size=3)
    assert ranks.tolist() == [3, 1]  # query 0: doc 1 scores higher, doc 3 ties (pessimistic)
    assert gold_ranks(q, d, torch.tensor([0, 2]), ties="optimistic").tolist() == [2, 1]
    # filtered: doc 3 is in doc 0's duplicate group and is left out; -1 = no group
    group = torch.tensor([7, -1, -1, 7])
    assert gold_ranks(q, d, torch.tensor([0, 2]), dup_group=group).tolist() == [2, 1]
    m = retrieval_metrics(q, d, torch.tensor([0, 2]), dup_group=group)
    assert m["mrr"] == pytest.approx((1 / 3 + 1) / 2) and m["filtered_mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert {"filtered_recall@1", "filtered_ndcg@10"} <= m.keys()
    # a collapsed encoder is not rewarded: every score equal means rank N
    assert gold_ranks(torch.ones(3, 2), torch.ones(5, 2), torch.tensor([0, 2, 4])).tolist() == [5, 5, 5]


def test_gold_ranks_input_errors() -> None:
    with pytest.raises(ValueError, match=r"positive must have shape \(Q,\) = \(2,\)"):
        gold_ranks(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"positive must lie in \[0, 5\)"):
        gold_ranks(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="dup_group"):
        gold_ranks(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), dup_group=torch.zeros(4, dtype=torch.long))


def test_csn_mrr_fewer_docs_than_distractors(caplog) -> None:
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    with caplog.at_level(logging.WARNING):
        value = csn_mrr(q, d)  # 49 < 999 distractors: all other documents are used
    assert "against 49 distractors, not 999" in caplog.text
    # with every other document as distractor, it is the full-corpus MRR of the paired problem
    assert value == pytest.approx(retrieval_metrics(q, d, torch.arange(50))["mrr"], abs=1e-9)
    unit = torch.nn.functional.normalize(d, dim=1)
    assert csn_mrr(unit, unit) == 1.0  # a unit vector is its own unique nearest neighbour


def test_csn_mrr_sampling() -> None:
    n = 1500
    sampler = CSNDistractors(n, 999, seed=3)
    ids = sampler(torch.arange(n))
    assert ids.shape == (n, 999)
    assert not (ids == torch.arange(n).unsqueeze(1)).any()  # never the query's own document
    assert all(len(set(row.tolist())) == 999 for row in ids[:20])  # distinct distractors
    assert torch.equal(ids, CSNDistractors(n, 999, seed=3)(torch.arange(n)))  # seeded
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    q = torch.nn.functional.normalize(d + 0.5 * torch.randn(n, 16, generator=g), dim=1)
    a, b = csn_mrr(q, d, seed=0), csn_mrr(q, d, seed=0, max_elements=10_000)
    assert a == pytest.approx(b)  # chunking does not change the result
    # 999 sampled distractors vs all 1499: fewer distractors, higher (or equal) MRR on average
    assert a >= retrieval_metrics(q, d, torch.arange(n))["mrr"] - 0.02
