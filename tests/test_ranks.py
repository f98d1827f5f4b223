"""Exact ranks and multi-positive retrieval metrics against trec_eval (pytrec_eval) and hand cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contrastive.metrics import (
    RankInputError,
    csn_mrr,
    gold_ranks,
    relevant_ranks,
    retrieval_metrics,
    two_way_retrieval_metrics,
)
from contrastive.metrics.ranks import count_beating

pytrec_eval = pytest.importorskip("pytrec_eval")

KS = (1, 5, 10)
MEASURES = {"recip_rank", "success.1,5,10", "recall.1,5,10", "ndcg_cut.10", "map"}


def trec_reference(q: torch.Tensor, d: torch.Tensor, qlab: torch.Tensor, dlab: torch.Tensor, ties: str) -> dict:
    """trec_eval's averages over queries, with scores as the float64 dot products of the stored vectors.

    trec_eval breaks score ties by document name, descending: naming relevant documents so that they sort
    after (pessimistic) or before (optimistic) the others gives the two tie rules. trec_eval stores scores
    as C floats, which would merge near ties, so it gets each score's dense rank instead (same order,
    same exact ties, exact in float32).
    """
    qa, da = q.double().numpy(), d.double().numpy()
    rel_prefix, other_prefix = ("a", "b") if ties == "pessimistic" else ("b", "a")
    qrels, run = {}, {}
    for i in range(qa.shape[0]):
        scores = (qa[i][None, :] * da).sum(axis=1)  # row-wise, as the canonical scores
        scores = np.unique(scores, return_inverse=True)[1].astype(np.float64)
        rel = (dlab == qlab[i]).numpy()
        names = [f"{rel_prefix if rel[j] else other_prefix}{j:06d}" for j in range(da.shape[0])]
        qrels[f"q{i}"] = {names[j]: 1 for j in range(da.shape[0]) if rel[j]}
        run[f"q{i}"] = {names[j]: float(scores[j]) for j in range(da.shape[0])}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    mean = {k: float(np.mean([v[k] for v in per_query.values()])) for k in next(iter(per_query.values()))}
    out = {"mrr": mean["recip_rank"], "map": mean["map"], "ndcg@10": mean["ndcg_cut_10"]}
    for k in KS:
        out[f"success@{k}"], out[f"recall@{k}"] = mean[f"success_{k}"], mean[f"recall_{k}"]
    return out


def hard_case(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries with 1-3 relevant documents among exact duplicates, near ties (1e-7 apart) and one long
    document whose norm dwarfs the others."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(40, 16, generator=g, dtype=torch.float64)
    d[5] = d[3]  # exact duplicate of a document
    d[7] = d[3] + 1e-7 * torch.randn(16, generator=g, dtype=torch.float64)  # near tie
    d[8] = d[3] - 1e-7 * torch.randn(16, generator=g, dtype=torch.float64)
    d[12] = 1000.0 * torch.randn(16, generator=g, dtype=torch.float64)  # one long document
    q = torch.randn(12, 16, generator=g, dtype=torch.float64)
    q[:4] = d[3] + 0.01 * torch.randn(4, 16, generator=g, dtype=torch.float64)  # d3, d5, d7, d8 near the top
    dlab = torch.randint(0, 12, (40,), generator=g)
    dlab[3], dlab[5], dlab[7] = 0, 1, 2
    dlab[torch.arange(12)] = torch.arange(12)  # every query has at least one relevant document
    dlab[12] = -1  # relevant to no query
    qlab = torch.arange(12)
    return q.to(dtype), d.to(dtype), qlab, dlab


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("chunk", [3, 4096])
def test_multi_positive_metrics_match_trec_eval(dtype: torch.dtype, ties: str, chunk: int) -> None:
    q, d, qlab, dlab = hard_case(dtype)
    ours = retrieval_metrics(q, d, query_labels=qlab, doc_labels=dlab, ties=ties, chunk_size=chunk)
    ref = trec_reference(q, d, qlab, dlab, ties)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_single_gold_ranks_match_trec_eval(dtype: torch.dtype, ties: str) -> None:
    q, d, _, _ = hard_case(dtype, seed=1)
    positive = torch.tensor([3, 5, 7, 8, 12, 0, 1, 2, 3, 4, 20, 30])
    ours = retrieval_metrics(q, d, positive, ties=ties, chunk_size=5)
    ref = trec_reference(q, d, positive, torch.arange(d.shape[0]), ties)
    for key in ("mrr", "ndcg@10", *(f"recall@{k}" for k in KS)):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_issue_cases_no_tolerance() -> None:
    # one long document must not make a beaten gold look tied: MRR 0.5 under both rules
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[0.5, 0.0], [0.5001, 0.0], [0.0, 100.0]])
    for ties in ("pessimistic", "optimistic"):
        assert gold_ranks(q, d, torch.tensor([0]), ties=ties).tolist() == [2]
        assert retrieval_metrics(q, d, torch.tensor([0]), ties=ties)["mrr"] == 0.5
    # a gold that beats its neighbours by 1e-6 is first, even with a long document in the corpus
    for dtype in (torch.float32, torch.float64):
        d2 = torch.tensor([[1.0, 0.0], [1.0 - 1e-6, 0.0], [1.0 - 2e-6, 0.0], [0.0, 1e4]], dtype=dtype)
        assert gold_ranks(q.to(dtype), d2, torch.tensor([0])).tolist() == [1]
    # exact ties: an identical document is counted against the gold (pessimistic) or not (optimistic)
    d3 = torch.tensor([[0.3, 0.4], [0.3, 0.4], [0.0, 1.0]])
    q3 = torch.tensor([[0.6, 0.8]])
    assert gold_ranks(q3, d3, torch.tensor([0])).tolist() == [3]
    assert gold_ranks(q3, d3, torch.tensor([0]), ties="optimistic").tolist() == [2]  # doc 2 scores 0.8 > 0.5


def test_five_captions_per_image_hand_case() -> None:
    # 2 images, 3 captions each in 2-D: image 0 = (1, 0), image 1 = (0, 1)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cap = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.0],  # captions of image 0
                        [0.1, 0.9], [0.95, 0.0], [0.0, 0.5]])  # captions of image 1
    img_lab, cap_lab = torch.tensor([0, 1]), torch.tensor([0, 0, 0, 1, 1, 1])
    m = two_way_retrieval_metrics(img, cap, img_lab, cap_lab)
    # image 0 ranks captions by x: 4 (0.95, wrong), 0 (0.9), 2 (0.7), 1 (0.2), 3, 5 -> positions 2, 3, 4
    # image 1 ranks by y: 3 (0.9), 1 (0.8, wrong), 5 (0.5), 0, 2, 4 -> positions 1, 3, 6
    assert m["image_to_text/mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["image_to_text/success@1"] == 0.5 and m["image_to_text/success@5"] == 1.0
    assert m["image_to_text/recall@5"] == pytest.approx((3 / 3 + 2 / 3) / 2)
    ap0 = (1 / 2 + 2 / 3 + 3 / 4) / 3
    ap1 = (1 / 1 + 2 / 3 + 3 / 6) / 3
    assert m["image_to_text/map"] == pytest.approx((ap0 + ap1) / 2)
    idcg = sum(1 / math.log2(i + 1) for i in (1, 2, 3))
    ndcg0 = (1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)) / idcg
    ndcg1 = (1 + 1 / math.log2(4) + 1 / math.log2(7)) / idcg
    assert m["image_to_text/ndcg@10"] == pytest.approx((ndcg0 + ndcg1) / 2)
    # text -> image: one relevant image per caption; caption 1 (0.2, 0.8) and 4 (0.95, 0) are wrong
    assert m["text_to_image/success@1"] == pytest.approx(4 / 6)
    assert m["text_to_image/mrr"] == pytest.approx((4 + 0.5 + 0.5) / 6)


def test_filtered_ranks_ignore_known_duplicates() -> None:
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[0.8, 0.0], [0.9, 0.0], [0.95, 0.0], [0.1, 0.0]])
    rr = relevant_ranks(q, d, torch.tensor([0]), torch.tensor([0, -1, -1, -1]),
                        query_ignore=torch.tensor([5]), doc_ignore=torch.tensor([-1, 5, -1, 5]))
    assert rr.rank.tolist() == [3] and rr.filtered_rank.tolist() == [2]  # doc 1 ignored, doc 2 still counts


def test_collapsed_encoder_and_input_errors() -> None:
    rr = relevant_ranks(torch.ones(2, 3), torch.ones(4, 3), torch.tensor([0, 1]), torch.tensor([0, 0, 1, -1]))
    # pessimistic: both non-relevant documents tie above; the relevant ones are placed after them
    assert rr.rank.tolist() == [3, 4, 4]
    assert rr.query.tolist() == [0, 0, 1]
    with pytest.raises(RankInputError, match="query 1, label 7"):
        relevant_ranks(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 7]), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RankInputError, match="doc_labels must be an integer tensor of shape"):
        relevant_ranks(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), torch.zeros(4))
    with pytest.raises(ValueError, match="either positive"):
        retrieval_metrics(torch.randn(2, 3), torch.randn(4, 3))


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_count_beating_and_csn_mrr_exact_ties(ties: str) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 8, generator=g)
    ref = torch.randn(6, 8, generator=g)
    cand = torch.randn(6, 5, 8, generator=g)
    cand[:, 0] = ref  # an exact duplicate of the reference in every candidate list
    ours = count_beating(q, cand, ref, ties=ties)
    scores = (q.double().unsqueeze(1) * cand.double()).sum(-1)
    gold = (q.double() * ref.double()).sum(-1, keepdim=True)
    expected = (scores >= gold).sum(1) if ties == "pessimistic" else (scores > gold).sum(1)
    assert ours.tolist() == expected.tolist()
    unit = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    doubled = torch.cat([unit, unit])  # every document has an exact twin among the distractors
    value = csn_mrr(doubled, doubled, n_distractors=59, ties=ties)
    assert value == pytest.approx(0.5 if ties == "pessimistic" else 1.0)
