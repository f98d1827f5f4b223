"""Full-corpus retrieval metrics from exact ranks, with one or several relevant documents per query.

One relevant document per query (CodeSearchNet, Husain et al. 2019, arXiv:1909.09436; text-to-code
retrieval): query ``i`` has exactly one gold document ``positive[i]`` in a corpus of ``N`` documents. All
metrics then follow from the gold document's rank:

- ``mrr`` = mean of ``1 / rank`` (full ranking, no cut-off);
- ``recall@k`` = fraction of queries with ``rank <= k`` (equal to hit rate / accuracy@k here);
- ``ndcg@k`` = mean of ``1 / log2(rank + 1)`` if ``rank <= k`` else 0 (ideal DCG is 1 with one relevant
  document; Järvelin & Kekäläinen 2002).

Why ranks instead of torchmetrics' ``RetrievalMRR`` & co.: those take one score per (query, document)
pair, i.e. the full ``Q x N`` matrix flattened (22k x 22k CodeSearchNet Python test = 1.9 GB of fp32
scores plus indexes and targets, far more for larger corpora). The rank needs only a count per query, so
:func:`gold_ranks` streams the matrix in ``chunk x chunk`` blocks (see
:func:`contrastive.metrics.ranks.relevant_ranks`). The tests check the two agree.

Several relevant documents per query (five captions per image; image-to-text and text-to-image): pass
``query_labels`` and ``doc_labels`` (relevant iff equal). The metrics are then trec_eval's:
``mrr`` (reciprocal rank of the first relevant document), ``success@k`` (at least one relevant document in
the top ``k``: the "R@k" of image-text retrieval papers), ``recall@k`` (fraction of the relevant documents
in the top ``k``), ``ndcg@k`` (binary gains, ideal DCG over ``min(#relevant, k)`` documents) and ``map``.
With one relevant document, ``recall@k`` and ``success@k`` coincide.

Ties: ``rank = 1 + #{other docs scoring >= gold}`` (``ties="pessimistic"``, default) or ``> gold``
(``"optimistic"``), with exact score equality (see :mod:`contrastive.metrics.ranks`). The pessimistic
rule means a collapsed encoder (every score equal) gets rank ``N`` rather than a perfect score.

Known false negatives: with ``dup_group`` (one group id per document, negative = no group), documents
of the gold's group other than the gold are removed from its ranking, giving the "filtered" rank (as in
knowledge-graph link prediction's filtered setting, Bordes et al. 2013). CodeSearchNet has exact and
near duplicate functions; Allamanis 2019 ("The adverse effects of code duplication", arXiv:1812.06469)
shows they inflate metrics.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from contrastive.metrics.ranks import TIES, count_beating, relevant_ranks

log = logging.getLogger(__name__)


def _check_inputs(query_emb: Tensor, doc_emb: Tensor, positive: Tensor) -> Tensor:
    if query_emb.dim() != 2 or doc_emb.dim() != 2:
        raise ValueError(
            f"query_emb and doc_emb must be 2-D (Q, d) and (N, d); got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}"
        )
    positive = torch.as_tensor(positive)
    if positive.dim() != 1 or positive.shape[0] != query_emb.shape[0]:
        raise ValueError(f"positive must have shape (Q,) = ({query_emb.shape[0]},); got {tuple(positive.shape)}")
    if positive.is_floating_point() or positive.dtype == torch.bool:
        raise ValueError(f"positive must hold integer document indices; got {positive.dtype}")
    n = doc_emb.shape[0]
    if positive.numel() and (positive.min() < 0 or positive.max() >= n):
        raise ValueError(f"positive must lie in [0, {n}); got range [{int(positive.min())}, {int(positive.max())}]")
    return positive.to(query_emb.device).long()


def _gold_relevance(doc_emb: Tensor, positive: Tensor, dup_group: Optional[Tensor]) -> dict[str, Optional[Tensor]]:
    """Labels and ignore keys of the one-gold setting: document ``j`` is relevant iff ``j == positive[i]``;
    the gold's duplicate group is ignored in the filtered ranks."""
    n = doc_emb.shape[0]
    out: dict[str, Optional[Tensor]] = {
        "query_labels": positive,
        "doc_labels": torch.arange(n, device=doc_emb.device),
        "query_ignore": None,
        "doc_ignore": None,
    }
    if dup_group is not None:
        dup_group = torch.as_tensor(dup_group, device=doc_emb.device)
        if dup_group.shape != (n,) or dup_group.is_floating_point():
            raise ValueError(f"dup_group must be an integer tensor of shape (N,) = ({n},); got {tuple(dup_group.shape)}")
        dup_group = dup_group.long()
        out["query_ignore"], out["doc_ignore"] = dup_group[positive], dup_group
    return out


def gold_ranks(
    query_emb: Tensor,
    doc_emb: Tensor,
    positive: Tensor,
    dup_group: Optional[Tensor] = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
) -> Tensor:
    """Exact 1-based rank of each query's gold document by inner product, chunked.

    Args:
        query_emb: ``(Q, d)`` query embeddings (normalise first for cosine).
        doc_emb: ``(N, d)`` document embeddings, on the same device.
        positive: ``(Q,)`` long, index of each query's gold document.
        dup_group: ``(N,)`` long duplicate-group ids (negative = none); same-group documents other than
            the gold are not counted (filtered rank).
        chunk_size: block size; memory is ``O(chunk_size ** 2)`` whatever ``Q`` and ``N``.
        ties: ``"pessimistic"`` (ties rank above the gold) or ``"optimistic"``; ties are exact equality.

    Returns:
        ``(Q,)`` long ranks in ``1..N`` (filtered ranks when ``dup_group`` is given).
    """
    positive = _check_inputs(query_emb, doc_emb, positive)
    rr = relevant_ranks(query_emb, doc_emb, **_gold_relevance(doc_emb, positive, dup_group), ties=ties,
                        chunk_size=chunk_size)
    return rr.rank if rr.filtered_rank is None else rr.filtered_rank


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10) -> dict[str, float]:
    """``mrr``, ``recall@k`` for each ``k`` in ``ks`` and ``ndcg@{ndcg_k}`` from 1-based gold ranks ``(Q,)``."""
    ranks = torch.as_tensor(ranks)
    if ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor; got shape {tuple(ranks.shape)}")
    if ranks.is_floating_point() or (ranks < 1).any():
        raise ValueError("ranks must be integers >= 1 (1 = gold document ranked first)")
    r = ranks.double()
    out = {"mrr": (1.0 / r).mean().item()}
    for k in ks:
        out[f"recall@{k}"] = (r <= k).double().mean().item()
    gain = torch.where(r <= ndcg_k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))
    out[f"ndcg@{ndcg_k}"] = gain.mean().item()
    return out


def metrics_from_relevant_ranks(
    query: Tensor, rank: Tensor, num_queries: int, ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10
) -> dict[str, float]:
    """trec_eval's measures from the positions of every (query, relevant document) pair.

    Args:
        query: ``(P,)`` long query index of each pair (every query in ``0..num_queries-1`` appears).
        rank: ``(P,)`` long 1-based position of each pair's document in its query's ranking.
        num_queries: ``Q``.

    Returns:
        ``mrr``, ``success@k`` and ``recall@k`` for each ``k`` in ``ks``, ``ndcg@{ndcg_k}`` and ``map``,
        each averaged over queries.
    """
    query, rank = torch.as_tensor(query).long(), torch.as_tensor(rank)
    if query.shape != rank.shape or query.dim() != 1 or query.numel() == 0:
        raise ValueError(f"query and rank must be non-empty 1-D tensors of one shape; got {tuple(query.shape)} "
                         f"and {tuple(rank.shape)}")
    if rank.is_floating_point() or (rank < 1).any():
        raise ValueError("ranks must be integers >= 1")
    nq = int(num_queries)
    n_rel = torch.bincount(query, minlength=nq).double()
    if (n_rel == 0).any():
        raise ValueError(f"query {int(torch.nonzero(n_rel == 0)[0])} has no relevant document")
    r = rank.double()
    first = torch.full((nq,), math.inf, dtype=torch.float64).scatter_reduce(0, query, r, "amin")

    def per_query(values: Tensor) -> Tensor:
        return torch.zeros(nq, dtype=torch.float64).index_add_(0, query, values)

    out = {"mrr": (1.0 / first).mean().item()}
    for k in ks:
        out[f"success@{k}"] = (first <= k).double().mean().item()
        out[f"recall@{k}"] = (per_query((r <= k).double()) / n_rel).mean().item()
    dcg = per_query(torch.where(r <= ndcg_k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)))
    discounts = 1.0 / torch.log2(torch.arange(2, ndcg_k + 2, dtype=torch.float64))
    ideal = torch.cumsum(discounts, 0)[n_rel.clamp(max=ndcg_k).long() - 1]
    out[f"ndcg@{ndcg_k}"] = (dcg / ideal).mean().item()
    # precision at each relevant document's position: (its place among the relevant ones) / position
    order = torch.argsort(r, stable=True)
    order = order[torch.argsort(query[order], stable=True)]
    counts = n_rel.long()
    place = torch.empty_like(query)
    place[order] = torch.arange(query.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts) + 1
    out["map"] = (per_query(place.double() / r) / n_rel).mean().item()
    return out


def retrieval_metrics(
    query_emb: Tensor,
    doc_emb: Tensor,
    positive: Optional[Tensor] = None,
    dup_group: Optional[Tensor] = None,
    ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
    *,
    query_labels: Optional[Tensor] = None,
    doc_labels: Optional[Tensor] = None,
    query_ignore: Optional[Tensor] = None,
    doc_ignore: Optional[Tensor] = None,
) -> dict[str, float]:
    """Full-corpus metrics from exact ranks, one pass over the score matrix.

    One gold per query: pass ``positive`` ``(Q,)`` (and optionally ``dup_group`` ``(N,)``); the result
    holds ``mrr``, ``recall@k``, ``ndcg@k`` (see :func:`metrics_from_ranks`) and, with ``dup_group``, the
    same prefixed ``filtered_`` with the gold's duplicates left out of its ranking.

    Several relevant documents: pass ``query_labels`` ``(Q,)`` and ``doc_labels`` ``(N,)`` instead
    (relevant iff equal and ``>= 0``), optionally ``query_ignore``/``doc_ignore`` keys of known false
    negatives; the result holds the measures of :func:`metrics_from_relevant_ranks` (plus ``filtered_``).
    """
    if (positive is None) == (query_labels is None):
        raise ValueError("pass either positive (one gold per query) or query_labels and doc_labels")
    if positive is not None:
        if doc_labels is not None or query_ignore is not None or doc_ignore is not None:
            raise ValueError("with positive, use dup_group for known duplicates (no labels or ignore keys)")
        positive = _check_inputs(query_emb, doc_emb, positive)
        rr = relevant_ranks(query_emb, doc_emb, **_gold_relevance(doc_emb, positive, dup_group), ties=ties,
                            chunk_size=chunk_size)
        out = metrics_from_ranks(rr.rank, ks, ndcg_k)
        if rr.filtered_rank is not None:
            out.update({f"filtered_{k}": v for k, v in metrics_from_ranks(rr.filtered_rank, ks, ndcg_k).items()})
        return out
    if doc_labels is None:
        raise ValueError("query_labels needs doc_labels")
    if dup_group is not None:
        raise ValueError("with labels, pass known false negatives as query_ignore and doc_ignore")
    rr = relevant_ranks(query_emb, doc_emb, query_labels, doc_labels, query_ignore, doc_ignore, ties=ties,
                        chunk_size=chunk_size)
    out = metrics_from_relevant_ranks(rr.query.cpu(), rr.rank.cpu(), rr.num_queries, ks, ndcg_k)
    if rr.filtered_rank is not None:
        filtered = metrics_from_relevant_ranks(rr.query.cpu(), rr.filtered_rank.cpu(), rr.num_queries, ks, ndcg_k)
        out.update({f"filtered_{k}": v for k, v in filtered.items()})
    return out


def two_way_retrieval_metrics(
    a_emb: Tensor,
    b_emb: Tensor,
    a_labels: Tensor,
    b_labels: Tensor,
    names: tuple[str, str] = ("image", "text"),
    **kwargs: object,
) -> dict[str, float]:
    """Retrieval both ways between two sets that share labels (e.g. images and their captions).

    ``a_emb`` ``(A, d)`` with ``a_labels`` ``(A,)`` and ``b_emb`` ``(B, d)`` with ``b_labels`` ``(B,)``:
    an item of one side is relevant to a query of the other iff their labels are equal. Keys are
    ``"{a}_to_{b}/{measure}"`` and ``"{b}_to_{a}/{measure}"`` with the measures of
    :func:`metrics_from_relevant_ranks`; ``kwargs`` go to :func:`retrieval_metrics`.
    """
    a, b = names
    out = {}
    for (qn, q, ql), (dn, d, dl) in (((a, a_emb, a_labels), (b, b_emb, b_labels)),
                                     ((b, b_emb, b_labels), (a, a_emb, a_labels))):
        m = retrieval_metrics(q, d, query_labels=ql, doc_labels=dl, **kwargs)  # type: ignore[arg-type]
        out.update({f"{qn}_to_{dn}/{k}": v for k, v in m.items()})
    return out


class CSNDistractors:
    """Seeded distractor sets for CodeSearchNet-style evaluation.

    A random permutation ``pi`` of the ``n`` documents is drawn once; query ``i`` gets the
    ``n_distractors`` documents that follow ``i`` in ``pi`` (cyclically). Each set is a uniformly random
    subset of the other documents, never contains ``i``, and costs ``O(n_distractors)`` to produce.
    With ``n - 1 < n_distractors`` every other document is used (:attr:`n_distractors` holds the actual
    number).
    """

    def __init__(self, n: int, n_distractors: int = 999, seed: int = 0) -> None:
        if n < 2:
            raise ValueError(f"CodeSearchNet-style ranking needs at least 2 documents; got {n}")
        if n_distractors < 1:
            raise ValueError(f"n_distractors must be >= 1; got {n_distractors}")
        self.n = n
        self.requested = int(n_distractors)
        self.n_distractors = min(self.requested, n - 1)
        self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.pos = torch.empty_like(self.perm)
        self.pos[self.perm] = torch.arange(n)  # position of document i in perm
        self._steps = torch.arange(1, self.n_distractors + 1)

    def __call__(self, query_ids: Tensor) -> Tensor:
        """``(c, n_distractors)`` long document ids for the queries ``query_ids`` ``(c,)``."""
        query_ids = torch.as_tensor(query_ids, dtype=torch.long).cpu()
        return self.perm[(self.pos[query_ids].unsqueeze(1) + self._steps) % self.n]


def csn_mrr(
    query_emb: Tensor,
    doc_emb: Tensor,
    n_distractors: int = 999,
    seed: int = 0,
    ties: str = "pessimistic",
    max_elements: int = 1 << 24,
) -> float:
    """CodeSearchNet-style MRR: query ``i`` ranks its paired document ``i`` against ``n_distractors`` others.

    In CodeSearchNet (Husain et al. 2019) each test query is scored against the 999 other code snippets
    of its batch of 1000. Here the distractors are **sampled**, seeded, per query (:class:`CSNDistractors`)
    rather than taken from fixed consecutive blocks: the data order of CodeSearchNet groups functions of
    one repository, which would make block distractors unusually hard or easy, and sampling makes every
    query's set a uniform random subset. Results are reproducible for a given ``seed``.

    If fewer than ``n_distractors`` other documents exist (``N - 1 < n_distractors``), all ``N - 1`` are
    used and a warning reports the actual number (such an MRR is not comparable to the 999-distractor
    number: fewer distractors give a higher MRR).

    Args:
        query_emb: ``(N, d)``; doc_emb: ``(N, d)``, paired row by row.
        n_distractors: distractors per query (999 in CodeSearchNet).
        seed: seed of the distractor sampling.
        ties: tie rule, as in :func:`gold_ranks` (exact equality).
        max_elements: bound on the gathered ``(chunk, 1 + n_distractors, d)`` block.

    Returns:
        The mean reciprocal rank (a float in ``(0, 1]``).
    """
    if query_emb.dim() != 2 or doc_emb.shape != query_emb.shape:
        raise ValueError(
            "csn_mrr needs paired (N, d) query and document embeddings; "
            f"got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}"
        )
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}; got {ties!r}")
    n, d = doc_emb.shape
    sampler = CSNDistractors(n, n_distractors, seed)
    if sampler.n_distractors < n_distractors:
        log.warning(
            "csn_mrr: only %d documents, so each query is ranked against %d distractors, not %d",
            n,
            sampler.n_distractors,
            n_distractors,
        )
    chunk = max(1, max_elements // ((sampler.n_distractors + 1) * d))
    rr = torch.empty(n, dtype=torch.float64, device=doc_emb.device)
    for s in range(0, n, chunk):
        idx = torch.arange(s, min(s + chunk, n))
        cand = sampler(idx).to(doc_emb.device)
        idx = idx.to(doc_emb.device)
        beats = count_beating(query_emb[idx], doc_emb[cand], doc_emb[idx], ties=ties)
        rr[s : s + idx.shape[0]] = 1.0 / (1.0 + beats.double())
    return rr.mean().item()
