"""Assemble the candidates of one training step and their masks, once.

:class:`CandidateAssembler` turns local anchor/candidate embeddings and a
:class:`~contrastive.models.batch.ContrastiveBatch` into a :class:`CandidateSet`: the candidates gathered
across ranks (with gradient), the extra negatives, per-anchor synthetic negatives (feature transforms) and
queued embeddings, in that column order, together with the ``(B, M)`` positive and false-negative masks.
The masks, the false-negative filter chain and its statistics are computed **once per step** (in blocks of
anchor rows, to bound the ``(rows, M)`` score matrix the filters read) and then sliced by the loss (also
when GradCache computes the loss in row chunks) and by the logs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from contrastive.distributed import gather_no_grad, gather_with_grad
from contrastive.filters.base import FilterChain, FilterContext
from contrastive.losses.base import ContrastiveInputs
from contrastive.models.batch import ContrastiveBatch, owner_columns


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _chunk_slices(n: int, rows: Optional[int]) -> list[slice]:
    if rows is None or rows >= n:
        return [slice(0, n)]
    return [slice(s, min(n, s + rows)) for s in range(0, n, rows)]


@dataclass
class CandidateSet:
    """The loss problem of one step.

    ``q`` ``(B, D)`` local anchors; ``cand`` ``(M, D)``: gathered in-batch candidates (``n_batch``), gathered
    extra negatives, local synthetic negatives, then ``n_queue`` queued entries; ``d`` ``(B, D)`` local
    candidates and ``q_all`` gathered anchors for the reverse direction (``None`` when the loss is one-way).
    ``positive``/``false_negative`` are the ``(B, M)`` masks (``false_negative`` ``None`` when nothing can be
    masked), ``removed`` the candidates each filter removed (summed over anchors).
    """

    q: Tensor
    cand: Tensor
    d: Tensor
    q_all: Optional[Tensor]
    n_batch: int
    n_queue: int
    positive: Tensor
    false_negative: Optional[Tensor]
    removed: dict[str, int]
    keys: Tensor
    key_labels: Tensor
    key_groups: Tensor
    weights: Optional[Tensor] = None
    neg_difficulty: Optional[Tensor] = None
    n_extra: int = 0
    estimate: Optional[Tensor] = None
    difficulty: Optional[str] = None
    masks_any: bool = False

    @property
    def tensors(self) -> list[Tensor]:
        return [self.q, self.cand] + ([self.d, self.q_all] if self.q_all is not None else [])

    def masks(self, rows: slice) -> tuple[Tensor, Optional[Tensor]]:
        """``(positive, false_negative)`` ``(|rows|, M)`` masks of anchor rows ``rows``."""
        return self.positive[rows], None if self.false_negative is None else self.false_negative[rows]

    def estimate_block(self, rows: slice) -> Optional[Tensor]:
        """``(|rows|, M)`` estimates; synthetic and queued columns (no estimate) get the row mean."""
        if self.estimate is None:
            return None
        est = self.estimate[rows].to(self.cand.dtype)
        pad = self.cand.shape[0] - est.shape[1]
        if pad:
            est = torch.cat([est, est.mean(dim=1, keepdim=True).expand(-1, pad)], dim=1)
        return est

    def make_inputs(self, leaves: Sequence[Tensor],
                    rows: slice) -> tuple[ContrastiveInputs, Optional[ContrastiveInputs]]:
        """Loss inputs of anchor rows ``rows`` built from ``leaves`` (laid out like :attr:`tensors`)."""
        pos, fn = self.masks(rows)
        est = self.estimate_block(rows)
        diff = None
        if self.difficulty == "similarity":
            diff = (leaves[0][rows] @ leaves[1].T).detach()
        elif self.difficulty == "estimate":
            diff = est
        extra = slice(self.n_batch, self.n_batch + self.n_extra)
        if diff is not None and self.neg_difficulty is not None:
            diff = diff.clone()
            diff[:, extra] = self.neg_difficulty.to(diff.dtype)[None, :]
        weights = None
        if self.weights is not None:
            weights = torch.ones_like(pos, dtype=self.cand.dtype)
            weights[:, extra] = self.weights.to(weights.dtype)[None, :]
        inputs = ContrastiveInputs(leaves[0][rows], leaves[1], pos, weights=weights, false_negative_mask=fn,
                                   difficulty=diff, similarity_estimate=est)
        if len(leaves) < 4:
            return inputs, None
        m = self.n_batch
        cut = lambda x: None if x is None else x[:, :m]  # noqa: E731
        diff_rev = (leaves[2][rows] @ leaves[3].T).detach() if self.difficulty == "similarity" else cut(diff)
        reverse = ContrastiveInputs(leaves[2][rows], leaves[3], pos[:, :m], false_negative_mask=cut(fn),
                                    difficulty=diff_rev, similarity_estimate=cut(est))
        return inputs, reverse

    def mask_logs(self) -> dict[str, Tensor]:
        """``masked_duplicates``: mean masked candidates per anchor (duplicates, stale queue copies, other
        anchors' private negatives and filter removals); ``filtered/<filter>``: mean candidates per anchor
        each false-negative filter removed; ``queue_size``: queued candidates used."""
        b = self.q.shape[0]
        device = self.positive.device
        logs: dict[str, Tensor] = {}
        if self.masks_any:
            total = self.false_negative.sum().float() if self.false_negative is not None else torch.zeros((), device=device)
            logs["masked_duplicates"] = total / b
            for k, v in self.removed.items():
                logs[f"filtered/{k}"] = torch.tensor(v / b, device=device)
        if self.n_queue:
            logs["queue_size"] = torch.tensor(float(self.n_queue), device=device)
        return logs


@dataclass
class CandidateAssembler:
    """Builds the :class:`CandidateSet` of a step (see the module docstring).

    Args:
        mask_known_duplicates: mask candidates of the anchor's duplicate group (not positives).
        filter_chain: false-negative filters run on the detached scores (once per step).
        difficulty: ``None``, ``"similarity"`` (detached anchor-candidate similarity) or ``"estimate"``.
    """

    mask_known_duplicates: bool = True
    filter_chain: Optional[FilterChain] = None
    difficulty: Optional[str] = None

    def assemble(self, q: Tensor, d: Tensor, n: Optional[Tensor], batch: ContrastiveBatch,
                 synthetic: Optional[Tensor] = None, queue: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                 estimate: Optional[Tensor] = None, reverse: bool = False,
                 mask_rows: Optional[int] = None) -> CandidateSet:
        """Gather, append and mask.

        Args:
            q: ``(B, D)`` local anchor embeddings; ``d``: ``(C, D)`` local candidates; ``n``: ``(K, D)`` local
                extra negatives or ``None``.
            batch: labels, groups and extra-negative metadata.
            synthetic: ``(B, S, D)`` per-anchor synthetic negatives (visible only to their anchor) or ``None``.
            queue: ``(embeddings (Q, D), labels (Q,), groups (Q,))`` of a memory queue, or ``None``.
            estimate: ``(B, M_batch + M_extra)`` similarity estimates, or ``None``.
            reverse: also gather the anchors for the candidate→anchor direction (paired batches only).
            mask_rows: anchor rows per mask block (bounds the filters' score matrix); ``None``: all.
        """
        labels, groups = batch.a_labels, batch.a_groups
        b = q.shape[0]
        glob = _rank() * b + torch.arange(b, device=q.device)  # global anchor index (ranks hold equal B)
        d_all = gather_with_grad(d)
        c_labels, c_groups = gather_no_grad(batch.c_labels), gather_no_grad(batch.c_groups)
        cand, cl, cg = [d_all], [c_labels], [c_groups]
        co = [torch.full((d_all.shape[0],), -1, dtype=torch.long, device=q.device)]
        n_extra, weights, neg_diff = 0, None, None
        if n is not None:
            neg = batch.negatives
            assert neg is not None
            cand.append(gather_with_grad(n))
            cl.append(gather_no_grad(neg.labels))
            cg.append(gather_no_grad(neg.resolved_groups))
            own = owner_columns(neg.owner, len(neg), q.device)
            co.append(gather_no_grad(torch.where(own >= 0, own + _rank() * b, own)))
            n_extra = int(cl[-1].shape[0])
            if neg.weights is not None:
                weights = gather_no_grad(neg.weights)
            if neg.difficulty is not None:
                neg_diff = gather_no_grad(neg.difficulty)
        if synthetic is not None and synthetic.shape[1] > 0:
            n_per = synthetic.shape[1]
            cand.append(synthetic.reshape(b * n_per, -1).to(d_all.dtype))
            minus = torch.full((b * n_per,), -1, dtype=c_labels.dtype, device=q.device)
            cl.append(minus)
            cg.append(minus.clone())
            co.append(glob.repeat_interleave(n_per))
        n_queue = 0
        if queue is not None and queue[0].shape[0]:
            qe, qi, qg = queue
            cand.append(qe.to(device=d_all.device, dtype=d_all.dtype))
            cl.append(qi.to(c_labels.device))
            cg.append(qg.to(c_groups.device))
            n_queue = int(qe.shape[0])
        one = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs)  # noqa: E731
        cand_t, cl_t, cg_t, co_t = one(cand), one(cl), one(cg), one(co)
        if reverse and not batch.paired:
            raise ValueError("a symmetric loss needs paired batches (candidate i is anchor i's positive, B == C)")
        q_all = gather_with_grad(q) if reverse else None
        est = estimate
        mask_any = self.mask_known_duplicates or bool(n_queue) or bool((co_t >= 0).any()) or self.filter_chain is not None
        pos_blocks, fn_blocks, removed = [], [], {}
        for rows in _chunk_slices(b, mask_rows):
            p, f, rem = self._masks(q[rows], cand_t, labels[rows], groups[rows], glob[rows], cl_t, cg_t, co_t, n_queue,
                                    None if est is None else _pad_estimate(est[rows], cand_t))
            pos_blocks.append(p)
            fn_blocks.append(f)
            for k, v in rem.items():
                removed[k] = removed.get(k, 0) + v
        positive = one(pos_blocks)
        fn = None if fn_blocks[0] is None else one(fn_blocks)
        return CandidateSet(q=q, cand=cand_t, d=d, q_all=q_all, n_batch=int(d_all.shape[0]), n_queue=n_queue,
                            positive=positive, false_negative=fn, removed=removed, keys=d_all.detach(),
                            key_labels=c_labels, key_groups=c_groups, weights=weights, neg_difficulty=neg_diff,
                            n_extra=n_extra, estimate=est, difficulty=self.difficulty, masks_any=mask_any)

    def _masks(self, q: Tensor, cand: Tensor, labels: Tensor, groups: Tensor, glob: Tensor, cl: Tensor, cg: Tensor,
               co: Tensor, n_queue: int, guide: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], dict[str, int]]:
        m = cl.shape[0] - n_queue
        pos = labels[:, None] == cl[None, :m]
        fn = ((groups[:, None] == cg[None, :m]) & ~pos) if self.mask_known_duplicates else None
        owned = co[:m] >= 0
        if bool(owned.any()):
            foreign = owned[None, :] & (co[None, :m] != glob[:, None])  # another anchor's private negatives
            pos = pos & ~foreign
            fn = foreign if fn is None else fn | foreign
        if n_queue:
            same = labels[:, None] == cl[None, m:]  # a stale copy of the anchor's own positive
            if self.mask_known_duplicates:
                same = same | (groups[:, None] == cg[None, m:])
            pos = torch.cat([pos, torch.zeros_like(same)], dim=1)
            fn = torch.cat([fn if fn is not None else torch.zeros_like(pos[:, :m]), same], dim=1)
        removed: dict[str, int] = {}
        if self.filter_chain is not None:
            fn, removed = self._filter(q, cand, pos, fn, cg, guide)
        return pos, fn, removed

    @torch.no_grad()
    def _filter(self, q: Tensor, cand: Tensor, pos: Tensor, fn: Optional[Tensor], cg: Tensor,
                guide: Optional[Tensor]) -> tuple[Tensor, dict[str, int]]:
        """False-negative filters on the detached scores of the anchor rows ``q`` against every candidate;
        candidate columns index ``cg`` (column j = item j), the positive is the first positive column, and
        the similarity estimate (when present) serves as the guide model's scores."""
        assert self.filter_chain is not None
        scores = (q.detach() @ cand.detach().T).float()
        known = fn if fn is not None else torch.zeros_like(pos)
        scores = scores.masked_fill(known, float("-inf"))  # already-masked candidates are not re-counted
        first_pos = pos.float().argmax(dim=1)
        r = torch.arange(scores.shape[0], device=scores.device)
        ctx = FilterContext(scores=scores, positive_mask=pos, positive_ids=first_pos,
                            positive_scores=scores[r, first_pos], dup_group=cg, guide_scores=guide,
                            guide_positive_scores=None if guide is None else guide[r, first_pos])
        res = self.filter_chain.apply(ctx)
        return known | res.false_negative_mask, {k: int(v) for k, v in res.removed.items()}


def _pad_estimate(est: Tensor, cand: Tensor) -> Tensor:
    est = est.to(cand.dtype)
    pad = cand.shape[0] - est.shape[1]
    if pad:
        est = torch.cat([est, est.mean(dim=1, keepdim=True).expand(-1, pad)], dim=1)
    return est
