"""The library's BM25 and its code tokenizer: the lexical baseline for code search, BM25 hard negatives and
in-batch BM25 similarity estimates; corpus search on the ``bm25s`` package (Lù 2024, arXiv:2407.03618).

BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond") is the
standard non-neural baseline in CodeSearchNet (Husain et al. 2019, arXiv:1909.09436, where ElasticSearch
BM25 is competitive on some languages). Three uses here:

- a retrieval baseline reported with the same metrics as the neural models (:func:`bm25_baseline`);
- BM25 hard negatives: lexically close but wrong documents (:meth:`BM25Retriever.search`);
- BM25 hard negatives of the ``bm25`` sampler (:class:`contrastive.samplers.bm25.BM25NegativeSampler`);
- a query-document (or query-query) similarity estimate for Soft-InfoNCE-style negative weighting
  (Li et al. 2023, "Rethinking Negative Pairs in Code Search", arXiv:2310.08069): within a batch with
  the paper's idf variant and training-set ``avgdl`` (:func:`bm25_score_matrix`), or against a corpus
  (:meth:`BM25Retriever.score_matrix`).

Tokenisation matters more than the BM25 variant for code: ``getHttpResponse`` must match a query that
says "http response". :func:`code_tokens` splits identifiers on camelCase and snake_case, lowercases,
and keeps the whole identifier too, so exact identifier matches still score higher.

Scores come from ``bm25s.BM25.get_scores(query_tokens)`` (the package's public per-query scoring call,
which returns the dense ``(N,)`` score vector), using bm25s' default "lucene" BM25 variant.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from contrastive.index.exact import sort_by_score_then_id
from contrastive.metrics.retrieval import CSNDistractors, metrics_from_ranks

log = logging.getLogger(__name__)

_IDENT = re.compile(r"[A-Za-z0-9_]+")
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def import_bm25s() -> Any:
    """Import ``bm25s`` without letting it take the GPU.

    When JAX is installed, ``bm25s`` runs a JAX top-k at import time (``bm25s/selection.py``), which starts
    JAX's default backend: on a GPU machine, JAX then preallocates 75% of the GPU's memory for the rest of
    the process (seen on an H200: one process held 107 GB, and every torch CUDA allocation of the other
    processes failed). This library only uses bm25s' numpy top-k, so when the process has not imported
    JAX yet, ``JAX_PLATFORMS=cpu`` and ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` are set first, as
    defaults: values already in the environment win, and a process that started JAX itself is left
    alone. Every import of ``bm25s`` in the library goes through here.
    """
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import bm25s  # noqa: PLC0415  (optional heavy import, on first use)

    return bm25s


def code_tokens(text: str) -> list[str]:
    """Lowercased tokens of ``text`` for code and natural language alike.

    Splits on non-alphanumerics (``_`` is kept inside identifiers), then splits each identifier on
    snake_case and camelCase (acronyms stay together: ``parseHTTPHeader`` → ``parse``, ``http``,
    ``header``), digits separate. The whole identifier is kept in front of its parts when it has more
    than one part, so an exact identifier match scores higher than a bag of its pieces.

    >>> code_tokens("def getHttpResponse(url_path):")
    ['def', 'gethttpresponse', 'get', 'http', 'response', 'url_path', 'url', 'path']
    """
    out: list[str] = []
    for ident in _IDENT.findall(text):
        parts = [p.lower() for chunk in ident.split("_") for p in _PART.findall(chunk)]
        whole = ident.lower().strip("_")
        if not parts:
            if whole:
                out.append(whole)
            continue
        if len(parts) > 1:
            out.append(whole)
        out.extend(parts)
    return out


def bm25_score_matrix(
    query_tokens: Sequence[Sequence[str]],
    doc_tokens: Sequence[Sequence[str]],
    *,
    k1: float = 1.2,
    b: float = 0.75,
    avgdl: Optional[float] = None,
) -> Tensor:
    """``(Q, D)`` float64 BM25 scores of every query against every document of a small collection, in the
    form of the Soft-InfoNCE code (Robertson–Spärck-Jones idf with r = R = 0)::

        score(q, d) = sum_{token occurrence t in q} idf(t) * (k1 + 1) f(t, d) / (K(d) + f(t, d))
        idf(t)      = log( (N - n(t) + 0.5) / (n(t) + 0.5) )        (negative when n(t) > N / 2)
        K(d)        = k1 * ((1 - b) + b * |d| / avgdl)

    ``N`` = number of documents, ``n(t)`` = documents containing ``t``, ``f`` = term frequency. Each query
    occurrence counts once (qf = 1, so the paper's ``(k2 + 1) qf / (k2 + qf)`` factor is 1 and a repeated
    query token adds repeatedly). ``avgdl`` defaults to the collection's mean length; the paper uses the
    mean over the whole training set (see :meth:`BM25Estimator.fit`).
    """
    n_docs = len(doc_tokens)
    vocab: dict[str, int] = {}
    for doc in doc_tokens:
        for tok in doc:
            vocab.setdefault(tok, len(vocab))
    tf = torch.zeros(n_docs, len(vocab), dtype=torch.float64)
    for j, doc in enumerate(doc_tokens):
        for tok in doc:
            tf[j, vocab[tok]] += 1.0
    qc = torch.zeros(len(query_tokens), len(vocab), dtype=torch.float64)
    for i, query in enumerate(query_tokens):
        for tok in query:
            if tok in vocab:  # a token absent from every document scores 0
                qc[i, vocab[tok]] += 1.0
    dl = tf.sum(dim=1, keepdim=True)
    if avgdl is None:
        avgdl = float(dl.mean()) if n_docs else 1.0
    avgdl = avgdl if avgdl > 0 else 1.0
    n_t = (tf > 0).sum(dim=0).to(torch.float64)
    idf = torch.log((n_docs - n_t + 0.5) / (n_t + 0.5))
    K = k1 * ((1.0 - b) + b * dl / avgdl)
    saturated = (k1 + 1.0) * tf / (K + tf)
    return qc @ (idf[None, :] * saturated).T


def _topk_lower_id_first(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-``k`` of ``scores`` ``(q, N)``, ties broken by lower id (BM25 ties are common:
    every document sharing no term with the query scores 0)."""
    vals, ids = torch.topk(scores, k, dim=1)
    kth = vals[:, -1:]
    boundary_tie = (scores >= kth).sum(dim=1) > k
    vals, ids = sort_by_score_then_id(vals, ids)
    rows = boundary_tie.nonzero().flatten()
    if rows.numel():  # ties straddle the k-th place: the lowest tied ids must win
        v, i = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        vals[rows], ids[rows] = v[:, :k], i[:, :k]
    return vals, ids


class BM25Retriever:
    """BM25 over code-aware tokens (:func:`code_tokens`), backed by ``bm25s``.

    Args:
        k1: term-frequency saturation.
        b: document-length normalisation.
        chunk_size: queries scored per dense ``(chunk, N)`` block in :meth:`search`.
    """

    def __init__(self, k1: float = 1.2, b: float = 0.75, chunk_size: int = 256) -> None:
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
        self.k1 = k1
        self.b = b
        self.chunk_size = chunk_size
        self._bm25 = None
        self.n_docs = 0

    def fit(self, docs: Sequence[str]) -> "BM25Retriever":
        """Index ``docs`` (ids ``0..N-1`` in order)."""
        bm25s = import_bm25s()

        if len(docs) == 0:
            raise ValueError("BM25Retriever.fit needs at least one document")
        self._bm25 = bm25s.BM25(k1=self.k1, b=self.b)
        self._bm25.index([code_tokens(d) for d in docs], show_progress=False)
        self.n_docs = len(docs)
        return self

    def _scores(self, query: str) -> np.ndarray:
        if self._bm25 is None:
            raise RuntimeError("BM25Retriever: call fit(docs) before scoring")
        tokens = [t for t in code_tokens(query) if t in self._bm25.vocab_dict]
        if not tokens:  # bm25s.get_scores needs at least one known token
            return np.zeros(self.n_docs, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(tokens), dtype=np.float32)

    def score_matrix(self, queries: Sequence[str], docs_subset_ids: Optional[Sequence[int]] = None) -> Tensor:
        """Dense BM25 scores ``(Q, N)`` float32, or ``(Q, len(docs_subset_ids))`` for a subset of documents.

        Memory is ``Q x N``: meant for small ``N`` or a subset (a batch's documents as Soft-InfoNCE
        weights, candidate lists); use :meth:`search` for top-k over a large corpus.
        """
        rows = [self._scores(q) for q in queries]
        mat = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, self.n_docs)
        if docs_subset_ids is not None:
            sub = torch.as_tensor(docs_subset_ids, dtype=torch.long)
            if sub.numel() and (sub.min() < 0 or sub.max() >= self.n_docs):
                raise ValueError(f"docs_subset_ids must lie in [0, {self.n_docs}); got [{int(sub.min())}, {int(sub.max())}]")
            mat = mat[:, sub]
        return mat

    def pair_scores(self, queries: Sequence[str], doc_ids: Sequence[int]) -> Tensor:
        """``(Q,)`` float32: the score of query ``i`` for document ``doc_ids[i]``."""
        return torch.tensor([float(self._scores(q)[int(d)]) for q, d in zip(queries, doc_ids)], dtype=torch.float32)

    def search(self, queries: Sequence[str], k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` documents per query: ``scores`` ``(Q, k)`` float32 and ``ids`` ``(Q, k)`` long, best
        first, ties broken by lower id."""
        if not 1 <= k <= self.n_docs:
            raise ValueError(f"k={k} must be between 1 and the number of indexed documents {self.n_docs}")
        vals, ids = [], []
        for s in range(0, len(queries), self.chunk_size):
            v, i = _topk_lower_id_first(self.score_matrix(queries[s : s + self.chunk_size]), k)
            vals.append(v)
            ids.append(i)
        if not vals:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return torch.cat(vals), torch.cat(ids)


def bm25_baseline(
    queries: Sequence[str],
    docs: Sequence[str],
    positive: Sequence[int],
    k1: float = 1.2,
    b: float = 0.75,
    ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10,
    n_distractors: int = 999,
    seed: int = 0,
    chunk_size: int = 256,
    return_ranks: bool = False,
) -> dict[str, float] | tuple[dict[str, float], Tensor]:
    """BM25 retrieval metrics with the same keys as :func:`contrastive.metrics.retrieval_metrics`, plus
    ``csn_mrr``.

    Ranks are exact and pessimistic on ties (``1 + #{other docs with score >= gold}``, as for the neural
    models; it matters for BM25, where many documents score exactly 0). They come from the dense score
    rows of ``chunk_size`` queries at a time. ``csn_mrr`` ranks query ``i`` against the same sampled
    distractors as :func:`contrastive.metrics.csn_mrr` (so it needs aligned pairs, ``positive[i] == i``
    for ``len(queries) == len(docs)``; otherwise it is left out). ``return_ranks=True`` also returns the
    ``(Q,)`` 1-based full-corpus rank of each query's gold document (the input of paired significance tests
    against another system on the same queries).
    """
    positive = torch.as_tensor(positive, dtype=torch.long)
    if positive.shape != (len(queries),):
        raise ValueError(f"positive must have one entry per query ({len(queries)}); got shape {tuple(positive.shape)}")
    if len(queries) == 0:
        raise ValueError("bm25_baseline needs at least one query")
    if positive.min() < 0 or positive.max() >= len(docs):
        raise ValueError(f"positive ids must lie in [0, {len(docs)})")
    retriever = BM25Retriever(k1, b, chunk_size).fit(docs)
    paired = len(queries) == len(docs) and torch.equal(positive, torch.arange(len(docs)))
    sampler = CSNDistractors(len(docs), n_distractors, seed) if paired else None
    if sampler is not None and sampler.n_distractors < n_distractors:
        log.warning(
            "bm25_baseline: csn_mrr ranks each query against %d distractors, not %d", sampler.n_distractors, n_distractors
        )
    ranks = torch.empty(len(queries), dtype=torch.long)
    csn_rr = torch.empty(len(queries), dtype=torch.float64)
    for s in range(0, len(queries), chunk_size):
        scores = retriever.score_matrix(queries[s : s + chunk_size])  # (c, N)
        rows = torch.arange(scores.shape[0])
        gold = scores[rows, positive[s : s + chunk_size]].unsqueeze(1)
        ranks[s : s + scores.shape[0]] = (scores >= gold).sum(dim=1)  # the gold counts itself: rank >= 1
        if paired:
            idx = torch.arange(s, s + scores.shape[0])
            dis = scores.gather(1, sampler(idx))
            csn_rr[s : s + scores.shape[0]] = 1.0 / (1.0 + (dis >= scores[rows, idx].unsqueeze(1)).sum(1).double())
    out = metrics_from_ranks(ranks, ks, ndcg_k)
    if paired:
        out["csn_mrr"] = csn_rr.mean().item()
    return (out, ranks) if return_ranks else out
