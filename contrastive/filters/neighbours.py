"""Nearest-neighbour false-negative flagging, after TACRED's *Intrinsic Strategy* (Parekh, Anand, Awekar
2023, arXiv 2311.12298, methods.md §B5).

TACRED's IS assumes positives are clean and uses the model's *false-negative predictions* (gold
positives predicted ``no_relation``) as anchors; the training negatives among their ``k`` nearest
neighbours in representation space are flagged as noisy negatives.

Adaptation to per-anchor candidate negatives (``rule="positive_knn"``):

- the "false-negative prediction" of anchor ``q`` is a positive ``p`` that the model ranks below at
  least one of ``q``'s real candidates (``positive_score[q, p] < max_k scores[q, k]``, strictly):
  ``anchors="missed"`` (faithful). ``anchors="all"`` uses every positive (more aggressive);
- the neighbour pool is the whole corpus (``corpus_embeddings``), minus ``q``'s positives (TACRED
  searches among negatives only) and ``q`` itself when ``anchor_ids`` is given;
- candidate ``c`` of ``q`` is flagged when it is among the ``k`` nearest pool items of a selected
  positive. Ties at the ``k``-th similarity are all included (``sim(p, c) >= k-th largest``), which keeps
  the result deterministic, invariant to row order and monotone in ``k``; a candidate whose embedding
  equals a selected positive's is always flagged for ``k >= 1``. Positives are never flagged.

The "neighbour majority" reading (``rule="label_vote"``, needs ``labels``): a candidate is flagged when a
strict majority of its own ``k`` nearest corpus neighbours (itself excluded, ties at the boundary broken
by lower corpus index) carry the label of one of the anchor's selected positives (or ``anchor_labels``
when there are no ``positive_ids``): a kNN classifier says it belongs with the positive, whatever its
own, possibly noisy, label says (the neighbourhood-label rule §B5 describes for the ES "NP" extension,
turned towards negatives).

Similarities are exact (``torch`` matmul + ``topk``), computed in chunks of ``chunk_size`` query rows
against the whole corpus: peak extra memory is about ``chunk_size * N * 4`` bytes.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.filters.base import FilterContext, NegativeFilter, require
from contrastive.filters.functional import gather_corpus, rowwise_isin

from contrastive.registry import FILTERS


def knn_mask(sims: Tensor, k: int) -> Tensor:
    """``(R, N)`` bool: exactly ``min(k, N)`` nearest items per row, ties at the ``k``-th value broken by
    lower column index (deterministic). ``-inf`` entries are excluded; rows with fewer finite entries
    than ``k`` keep only the finite ones."""
    k = min(k, sims.shape[1])
    kth = sims.topk(k, dim=1).values[:, -1:]
    greater = sims > kth
    need = k - greater.sum(dim=1, keepdim=True)
    eq = sims == kth
    chosen = greater | (eq & (eq.cumsum(dim=1) <= need))
    return chosen & (sims > float("-inf"))


@FILTERS.register("neighbour_consensus")
class NeighbourConsensusFilter(NegativeFilter):
    """Flag candidates that sit in an anchor's positive's neighbourhood (TACRED IS, adapted; see module doc).

    Args:
        k: neighbourhood size, ``>= 1``.
        rule: ``"positive_knn"`` (TACRED IS) or ``"label_vote"`` (kNN label majority, needs ``labels``).
        anchors: which positives act as anchors: ``"missed"`` (outscored by a candidate; needs
            ``positive_scores``) or ``"all"``.
        metric: ``"cosine"`` (embeddings L2-normalised here) or ``"dot"``.
        chunk_size: rows per similarity block, ``>= 1``.
    """

    name = "neighbour_consensus"

    def __init__(self, k: int = 5, rule: Literal["positive_knn", "label_vote"] = "positive_knn",
                 anchors: Literal["missed", "all"] = "missed", metric: Literal["cosine", "dot"] = "cosine",
                 chunk_size: int = 512) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"neighbour_consensus k must be an integer >= 1; got {k!r}")
        if rule not in ("positive_knn", "label_vote"):
            raise ValueError(f"neighbour_consensus rule must be 'positive_knn' or 'label_vote'; got {rule!r}")
        if anchors not in ("missed", "all"):
            raise ValueError(f"neighbour_consensus anchors must be 'missed' or 'all'; got {anchors!r}")
        if metric not in ("cosine", "dot"):
            raise ValueError(f"neighbour_consensus metric must be 'cosine' or 'dot'; got {metric!r}")
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"neighbour_consensus chunk_size must be an integer >= 1; got {chunk_size!r}")
        self.k, self.rule, self.anchors, self.metric, self.chunk_size = int(k), rule, anchors, metric, int(chunk_size)

    def _embeddings(self, ctx: FilterContext) -> Tensor:
        e = ctx.corpus_embeddings
        if e.dim() != 2:
            raise ValueError(f"neighbour_consensus needs corpus_embeddings of shape (N, d); got {tuple(e.shape)}")
        e = e.detach().float()
        return F.normalize(e, dim=1) if self.metric == "cosine" else e

    def selected_positives(self, ctx: FilterContext) -> Tensor:
        """``(Q, P)`` bool: positives used as anchors (all real ones, or the missed ones)."""
        pos = ctx.positive_ids.long()
        sel = pos >= 0
        if self.anchors == "missed":
            if ctx.positive_scores is None or ctx.positive_scores.shape != pos.shape:
                raise ValueError(
                    "neighbour_consensus anchors='missed' needs FilterContext.positive_scores aligned with "
                    "positive_ids (Q, P); pass them or use anchors='all'"
                )
            cand = ctx.candidate_mask() & ~ctx.is_positive_id()
            best = torch.where(cand, ctx.scores, torch.full_like(ctx.scores, float("-inf"))).amax(dim=1, keepdim=True)
            ps = ctx.positive_scores.to(best.dtype)
            sel &= torch.isfinite(ps) & (ps < best)
        return sel

    def flag(self, ctx: FilterContext) -> Tensor:
        require(ctx, self.name, "corpus_embeddings")
        if self.rule == "positive_knn":
            require(ctx, self.name + " (rule='positive_knn')", "positive_ids")
            return self._positive_knn(ctx)
        require(ctx, self.name + " (rule='label_vote')", "labels")
        return self._label_vote(ctx)

    def _positive_knn(self, ctx: FilterContext) -> Tensor:
        emb = self._embeddings(ctx)
        n = emb.shape[0]
        pos = ctx.positive_ids.long()
        ids = ctx.ids()
        excl = pos if ctx.anchor_ids is None else torch.cat([pos, ctx.anchor_ids.long().view(-1, 1)], dim=1)
        q_idx, p_col = self.selected_positives(ctx).nonzero(as_tuple=True)
        hits = torch.zeros(ctx.shape, dtype=torch.int32, device=ctx.scores.device)
        for start in range(0, q_idx.numel(), self.chunk_size):
            qi, pc = q_idx[start:start + self.chunk_size], p_col[start:start + self.chunk_size]
            pid = pos[qi, pc]
            if int(pid.max()) >= n:
                raise IndexError(f"positive id {int(pid.max())} is out of range for corpus_embeddings with {n} rows")
            sims = emb[pid] @ emb.T  # (c, N)
            ex = excl[qi]
            ex = torch.where(ex >= 0, ex, pid.view(-1, 1))  # padding -> the positive itself (excluded anyway)
            sims.scatter_(1, ex.clamp(max=n - 1), float("-inf"))
            kth = sims.topk(min(self.k, n), dim=1).values[:, -1:]
            cid = ids[qi]
            if cid.numel() and int(cid.max()) >= n:
                raise IndexError(f"candidate id {int(cid.max())} is out of range for corpus_embeddings with {n} rows")
            cs = sims.gather(1, cid.clamp_min(0))
            hit = (cs >= kth) & (cs > float("-inf")) & (cid >= 0)
            hits.index_add_(0, qi, hit.to(torch.int32))
        return hits > 0

    def _label_vote(self, ctx: FilterContext) -> Tensor:
        emb = self._embeddings(ctx)
        n = emb.shape[0]
        labels = ctx.labels.long().to(emb.device)
        if labels.shape[0] != n:
            raise ValueError(f"neighbour_consensus labels ({labels.shape[0]}) and corpus_embeddings ({n}) disagree on N")
        ids = ctx.ids()
        if ctx.positive_ids is not None:
            pos = ctx.positive_ids.long()
            target = torch.where(self.selected_positives(ctx), gather_corpus(labels, pos), torch.full_like(pos, -1))
        elif ctx.anchor_labels is not None and self.anchors == "all":
            target = ctx.anchor_labels.long().view(-1, 1)
        else:
            raise ValueError("neighbour_consensus rule='label_vote' needs positive_ids, or anchor_labels with anchors='all'")
        uniq = ids[ctx.candidate_mask()].unique()
        if uniq.numel() and int(uniq.max()) >= n:
            raise IndexError(f"candidate id {int(uniq.max())} is out of range for corpus_embeddings with {n} rows")
        k = min(self.k, n - 1)
        predicted = torch.full((n,), -1, dtype=torch.long, device=emb.device)
        if k >= 1:
            for start in range(0, uniq.numel(), self.chunk_size):
                u = uniq[start:start + self.chunk_size]
                sims = emb[u] @ emb.T
                sims.scatter_(1, u.view(-1, 1), float("-inf"))  # a point is not its own neighbour
                chosen = knn_mask(sims, k)
                nb_labels = labels[chosen.nonzero(as_tuple=True)[1]].view(-1, k)
                mode = nb_labels.mode(dim=1).values
                majority = (nb_labels == mode.view(-1, 1)).sum(dim=1) * 2 > k
                predicted[u] = torch.where(majority & (mode >= 0), mode, torch.full_like(mode, -1))
        return rowwise_isin(gather_corpus(predicted, ids), target)
