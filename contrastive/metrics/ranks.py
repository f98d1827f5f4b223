"""Exact ranks of relevant documents under inner-product scores, streamed over the score matrix.

A query ``i`` ranks every document ``j`` of a corpus by its score ``s_ij = <q_i, x_j>``. A document is
*relevant* to a query when their labels are equal (``query_labels[i] == doc_labels[j] >= 0``), so one
query may have several relevant documents (five captions of an image) and several queries may share a
document. The 1-based **position** of a relevant document ``r`` in query ``i``'s ranking is

    1 + #{j not relevant, not ignored : s_ij beats s_ir} + #{relevant r' ranked before r}

where "beats" is ``>=`` for ``ties="pessimistic"`` (the default: a tie counts against the model, so a
collapsed encoder that scores everything equally gets position ``N``, not 1) and ``>`` for
``ties="optimistic"``. Relevant documents are ordered among themselves by score (their order among
themselves changes no metric). These are the positions trec_eval uses once its tie-break by document
name is set to the chosen rule (trec_eval sorts ties by descending document name); the tests check it.

**Ties are exact score equality**: two scores tie when the float64 dot products of the stored vectors
are equal (for float32 or half inputs every product is exact in float64, and identical vectors always
tie). No tolerance scales with other documents' norms.

How the exactness is kept at matmul speed: the score matrix is produced in ``chunk x chunk`` blocks by
plain matmuls in the working precision (float32, or float64 for float64 inputs), whose rounding depends
on the kernel. Each block score ``b_ij`` is within ``E_ij = 2 (gamma_d(u) + gamma_d(2^-53)) |q_i| |x_j|``
of the float64 dot product (``gamma_d(u) = d u / (1 - d u)``, the classical bound for any summation
order, Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, eq. 3.5). A document whose block
score is farther than ``E_ij`` from the reference score is decided by the block; the few within the band
(exact duplicates, near ties) are re-scored in float64 by one elementwise product and row sum, the same
operation that scored the reference, and compared exactly. Memory is ``O(chunk**2)`` whatever ``Q`` and
``N``.

Known false negatives (the "filtered" setting of link prediction, Bordes et al. 2013): documents that
share an *ignore key* with the query (``doc_ignore[j] == query_ignore[i] >= 0``) and are not relevant
are left out of the filtered positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

TIES = ("pessimistic", "optimistic")


class RankInputError(ValueError):
    """Inputs of the rank functions have the wrong shape, dtype or values."""


def canonical_scores(queries: Tensor, docs: Tensor) -> Tensor:
    """Row-wise float64 dot products ``(P,)`` of ``queries`` ``(P, d)`` and ``docs`` ``(P, d)``.

    The one operation that decides ties: every compared score goes through it, so equal vectors give
    bit-equal scores.
    """
    return (queries.double() * docs.double()).sum(dim=1)


def _gamma(d: int, dtype: torch.dtype) -> float:
    """Twice the summation error bound of a length-``d`` dot product in ``dtype`` plus float64's."""

    def gamma(u: float) -> float:
        return d * u / (1.0 - d * u)

    return 2.0 * (gamma(torch.finfo(dtype).eps / 2) + gamma(2.0**-53))


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _labels(t: Optional[Tensor], n: int, name: str, device: torch.device) -> Optional[Tensor]:
    if t is None:
        return None
    t = torch.as_tensor(t, device=device)
    if t.shape != (n,) or t.is_floating_point() or t.dtype == torch.bool:
        raise RankInputError(f"{name} must be an integer tensor of shape ({n},); got {t.dtype} {tuple(t.shape)}")
    return t.long()


@dataclass(frozen=True)
class RelevantRanks:
    """Positions of every (query, relevant document) pair.

    Attributes:
        query: ``(P,)`` long query index of each pair, sorted by query.
        doc: ``(P,)`` long document index of each pair.
        rank: ``(P,)`` long 1-based position of the document in the query's full ranking.
        filtered_rank: ``(P,)`` positions with ignored documents left out, or ``None`` without ignore keys.
        num_queries: ``Q``; every query has at least one pair.
    """

    query: Tensor
    doc: Tensor
    rank: Tensor
    filtered_rank: Optional[Tensor]
    num_queries: int


def _check_embeddings(queries: Tensor, docs: Tensor) -> None:
    if queries.dim() != 2 or docs.dim() != 2 or queries.shape[1] != docs.shape[1]:
        raise RankInputError(
            f"queries and documents must be 2-D (Q, d) and (N, d) with one d; got {tuple(queries.shape)} "
            f"and {tuple(docs.shape)}"
        )
    if not queries.is_floating_point() or not docs.is_floating_point():
        raise RankInputError(f"embeddings must be floating point; got {queries.dtype} and {docs.dtype}")
    if queries.device != docs.device:
        raise RankInputError(f"queries on {queries.device} but documents on {docs.device}")
    if docs.shape[0] == 0:
        raise RankInputError("the corpus is empty")


def relevant_pairs(query_labels: Tensor, doc_labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(query, doc)`` index pairs ``(P,)``, ``(P,)`` with equal non-negative labels, sorted by query.

    Raises :class:`RankInputError` naming the first query without a relevant document.
    """
    order = torch.argsort(doc_labels, stable=True)
    sorted_labels = doc_labels[order]
    lo = torch.searchsorted(sorted_labels, query_labels, side="left")
    hi = torch.searchsorted(sorted_labels, query_labels, side="right")
    count = torch.where(query_labels >= 0, hi - lo, torch.zeros_like(lo))
    if (count == 0).any():
        missing = torch.nonzero(count == 0).flatten()
        first = int(missing[0])
        raise RankInputError(
            f"{missing.numel()} of {query_labels.numel()} queries have no relevant document "
            f"(first: query {first}, label {int(query_labels[first])})"
        )
    query = torch.repeat_interleave(torch.arange(query_labels.numel(), device=count.device), count)
    start = torch.repeat_interleave(lo, count)
    offset = torch.arange(query.numel(), device=count.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    return query, order[start + offset]


def relevant_ranks(
    queries: Tensor,
    docs: Tensor,
    query_labels: Tensor,
    doc_labels: Tensor,
    query_ignore: Optional[Tensor] = None,
    doc_ignore: Optional[Tensor] = None,
    ties: str = "pessimistic",
    chunk_size: int = 4096,
) -> RelevantRanks:
    """Exact positions of all relevant documents (see the module doc for the rule).

    Args:
        queries: ``(Q, d)`` float query embeddings (normalise first for cosine).
        docs: ``(N, d)`` float document embeddings on the same device.
        query_labels: ``(Q,)`` int labels; document ``j`` is relevant to query ``i`` iff
            ``doc_labels[j] == query_labels[i] >= 0``.
        doc_labels: ``(N,)`` int labels (negative: relevant to no query).
        query_ignore, doc_ignore: optional ``(Q,)`` and ``(N,)`` int keys; non-relevant documents with
            ``doc_ignore[j] == query_ignore[i] >= 0`` are left out of :attr:`RelevantRanks.filtered_rank`.
        ties: ``"pessimistic"`` or ``"optimistic"``.
        chunk_size: block size over queries and documents; memory is ``O(chunk_size**2)``.
    """
    _check_embeddings(queries, docs)
    if ties not in TIES:
        raise RankInputError(f"ties must be one of {TIES}; got {ties!r}")
    if int(chunk_size) < 1:
        raise RankInputError(f"chunk_size must be >= 1; got {chunk_size}")
    chunk = int(chunk_size)
    nq, n = queries.shape[0], docs.shape[0]
    dev = queries.device
    qlab = _labels(query_labels, nq, "query_labels", dev)
    dlab = _labels(doc_labels, n, "doc_labels", dev)
    if (query_ignore is None) != (doc_ignore is None):
        raise RankInputError("query_ignore and doc_ignore must be given together")
    qign = _labels(query_ignore, nq, "query_ignore", dev)
    dign = _labels(doc_ignore, n, "doc_ignore", dev)
    pq, pd = relevant_pairs(qlab, dlab)
    work = _work_dtype(queries)
    q_all, x_all = queries.to(work), docs.to(work)
    gam = _gamma(queries.shape[1], work)
    qn = torch.linalg.vector_norm(queries.double(), dim=1)
    xn = torch.linalg.vector_norm(docs.double(), dim=1)
    ref = canonical_scores(queries[pq], docs[pd])  # (P,)
    beat = torch.zeros(pq.numel(), dtype=torch.long, device=dev)
    beat_ign = torch.zeros_like(beat) if qign is not None else None
    pessimistic = ties == "pessimistic"
    bounds = torch.searchsorted(pq, torch.arange(0, nq + chunk, chunk, device=dev).clamp(max=nq))
    for k, q0 in enumerate(range(0, nq, chunk)):
        p0, p1 = int(bounds[k]), int(bounds[k + 1])
        if p0 == p1:
            continue
        rows = pq[p0:p1]  # global query index of each pair in this query chunk
        local = rows - q0
        r_ref = ref[p0:p1].unsqueeze(1)
        r_qn = qn[rows].unsqueeze(1)
        r_lab = qlab[rows].unsqueeze(1)
        r_ign = qign[rows].unsqueeze(1) if qign is not None else None
        q = q_all[q0 : min(q0 + chunk, nq)]
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            block = (q @ x_all[c0:c1].T).double()[local]  # (p, w) block scores of the pairs' queries
            err = gam * r_qn * xn[c0:c1].unsqueeze(0)
            counted = dlab[c0:c1].unsqueeze(0) != r_lab  # relevant documents are placed among themselves
            above = (block - err > r_ref) & counted
            unsure = (block + err >= r_ref) & ~(block - err > r_ref) & counted
            if unsure.any():
                pi, cj = torch.nonzero(unsure, as_tuple=True)
                exact = canonical_scores(queries[rows[pi]], docs[c0 + cj])
                wins = exact >= ref[p0 + pi] if pessimistic else exact > ref[p0 + pi]
                above[pi[wins], cj[wins]] = True
            beat[p0:p1] += above.sum(dim=1)
            if beat_ign is not None:
                ign = (dign[c0:c1].unsqueeze(0) == r_ign) & (r_ign >= 0)
                beat_ign[p0:p1] += (above & ign).sum(dim=1)
    # place the relevant documents of each query among themselves: by score, descending
    order = torch.argsort(ref, descending=True, stable=True)
    order = order[torch.argsort(pq[order], stable=True)]
    within = torch.empty_like(pq)
    counts = torch.bincount(pq, minlength=nq)
    starts = counts.cumsum(0) - counts
    within[order] = torch.arange(pq.numel(), device=dev) - torch.repeat_interleave(starts, counts)
    rank = 1 + beat + within
    filtered = rank - beat_ign if beat_ign is not None else None
    return RelevantRanks(query=pq, doc=pd, rank=rank, filtered_rank=filtered, num_queries=nq)


def count_beating(queries: Tensor, candidates: Tensor, reference: Tensor, ties: str = "pessimistic") -> Tensor:
    """Per query, how many of its own candidates beat its reference document, with exact ties.

    Args:
        queries: ``(C, d)``; candidates: ``(C, M, d)`` (query ``i`` against its ``M`` candidates);
        reference: ``(C, d)`` the document each query's candidates are compared with.

    Returns:
        ``(C,)`` long counts (``>=`` for pessimistic ties, ``>`` for optimistic).
    """
    if ties not in TIES:
        raise RankInputError(f"ties must be one of {TIES}; got {ties!r}")
    work = _work_dtype(queries)
    gam = _gamma(queries.shape[1], work)
    ref = canonical_scores(queries, reference).unsqueeze(1)
    scores = torch.einsum("cd,cmd->cm", queries.to(work), candidates.to(work)).double()
    err = gam * torch.linalg.vector_norm(queries.double(), dim=1).unsqueeze(1) * torch.linalg.vector_norm(
        candidates.double(), dim=2
    )
    above = scores - err > ref
    unsure = (scores + err >= ref) & ~above
    if unsure.any():
        ci, mj = torch.nonzero(unsure, as_tuple=True)
        exact = canonical_scores(queries[ci], candidates[ci, mj])
        wins = exact >= ref[ci, 0] if ties == "pessimistic" else exact > ref[ci, 0]
        above[ci[wins], mj[wins]] = True
    return above.sum(dim=1)
