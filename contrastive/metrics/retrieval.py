"""Full-corpus retrieval metrics from exact gold ranks (one relevant document per query).

Setting (CodeSearchNet, Husain et al. 2019, arXiv:1909.09436; and most text-to-code / image-text
retrieval evaluations): query ``i`` has exactly one gold document ``positive[i]`` in a corpus of ``N``
documents. All metrics then follow from the gold document's rank:

- ``mrr`` = mean of ``1 / rank`` (full ranking, no cut-off);
- ``recall@k`` = fraction of queries with ``rank <= k`` (equal to hit rate / accuracy@k here);
- ``ndcg@k`` = mean of ``1 / log2(rank + 1)`` if ``rank <= k`` else 0 (ideal DCG is 1 with one relevant
  document; Järvelin & Kekäläinen 2002).

Why ranks instead of torchmetrics' ``RetrievalMRR`` & co.: those take one score per (query, document)
pair, i.e. the full ``Q x N`` matrix flattened (22k x 22k CodeSearchNet Python test = 1.9 GB of fp32
scores plus indexes and targets, far more for larger corpora). The rank needs only a count per query, so
:func:`gold_ranks` streams the matrix in ``chunk x chunk`` blocks (see
:func:`contrastive.index.exact.rank_of`). The tests check the two agree.

Ties: ``rank = 1 + #{other docs scoring >= gold}`` (``ties="pessimistic"``, default) or ``> gold``
(``"optimistic"``), with scores within a float32 rounding tolerance of the gold's counted as equal. The
pessimistic rule means a collapsed encoder (every score equal) gets rank ``N`` rather than a perfect
score; on real-valued embeddings ties are practically absent and both rules agree.

Known false negatives: with ``dup_group`` (one group id per document, negative = no group), documents
of the gold's group other than the gold are removed from its ranking, giving the "filtered" rank (as in
knowledge-graph link prediction's filtered setting, Bordes et al. 2013). CodeSearchNet has exact and
near duplicate functions; Allamanis 2019 ("The adverse effects of code duplication", arXiv:1812.06469)
shows they inflate metrics.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from contrastive.index.exact import TIES, rank_of, rank_pair

log = logging.getLogger(__name__)


def _check_inputs(query_emb: Tensor, doc_emb: Tensor, positive: Tensor) -> Tensor:
    if query_emb.dim() != 2 or doc_emb.dim() != 2:
        raise ValueError(
            f"query_emb and doc_emb must be 2-D (Q, d) and (N, d); got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}"
        )
    positive = torch.as_tensor(positive)
    if positive.dim() != 1 or positive.shape[0] != query_emb.shape[0]:
        raise ValueError(f"positive must have shape (Q,) = ({query_emb.shape[0]},); got {tuple(positive.shape)}")
    return positive.to(query_emb.device)


def gold_ranks(
    query_emb: Tensor,
    doc_emb: Tensor,
    positive: Tensor,
    dup_group: Optional[Tensor] = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
    tie_rtol: float = 1e-5,
) -> Tensor:
    """Exact 1-based rank of each query's gold document by inner product, chunked.

    Args:
        query_emb: ``(Q, d)`` query embeddings (normalise first for cosine).
        doc_emb: ``(N, d)`` document embeddings, on the same device.
        positive: ``(Q,)`` long, index of each query's gold document.
        dup_group: ``(N,)`` long duplicate-group ids (negative = none); same-group documents other than
            the gold are not counted (filtered rank).
        chunk_size: block size; memory is ``O(chunk_size ** 2)`` whatever ``Q`` and ``N``.
        ties: ``"pessimistic"`` (ties rank above the gold) or ``"optimistic"``.
        tie_rtol: relative tolerance under which a score equals the gold's (see :func:`rank_of`).

    Returns:
        ``(Q,)`` long ranks in ``1..N``.
    """
    positive = _check_inputs(query_emb, doc_emb, positive)
    return rank_of(query_emb, doc_emb, positive, dup_group, chunk_size=chunk_size, ties=ties, tie_rtol=tie_rtol)


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


def retrieval_metrics(
    query_emb: Tensor,
    doc_emb: Tensor,
    positive: Tensor,
    dup_group: Optional[Tensor] = None,
    ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
) -> dict[str, float]:
    """Full-corpus metrics (see :func:`metrics_from_ranks`) from exact gold ranks.

    With ``dup_group`` the dict also holds the filtered metrics, prefixed ``filtered_`` (e.g.
    ``filtered_mrr``), computed with the gold's duplicates left out of its ranking (same pass over the
    score matrix).
    """
    positive = _check_inputs(query_emb, doc_emb, positive)
    raw, filtered = rank_pair(query_emb, doc_emb, positive, dup_group, chunk_size=chunk_size, ties=ties)
    out = metrics_from_ranks(raw, ks, ndcg_k)
    if filtered is not None:
        out.update({f"filtered_{k}": v for k, v in metrics_from_ranks(filtered, ks, ndcg_k).items()})
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
    tie_rtol: float = 1e-5,
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
        ties: tie rule, as in :func:`gold_ranks` (same tolerance).
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
    qnorm = torch.linalg.vector_norm(query_emb, dim=1)
    dmax = torch.linalg.vector_norm(doc_emb, dim=1).max()
    chunk = max(1, max_elements // ((sampler.n_distractors + 1) * d))
    rr = torch.empty(n, dtype=torch.float64, device=doc_emb.device)
    for s in range(0, n, chunk):
        idx = torch.arange(s, min(s + chunk, n))
        cand = torch.cat([idx.unsqueeze(1), sampler(idx)], 1).to(doc_emb.device)  # gold first
        idx = idx.to(doc_emb.device)
        scores = torch.einsum("cd,cmd->cm", query_emb[idx], doc_emb[cand])
        gold, dist = scores[:, :1], scores[:, 1:]
        tol = (tie_rtol * qnorm[idx] * dmax).unsqueeze(1)  # same tolerance as gold_ranks
        beats = dist >= gold - tol if ties == "pessimistic" else dist > gold + tol
        rr[s : s + idx.shape[0]] = 1.0 / (1.0 + beats.sum(1).double())
    return rr.mean().item()
