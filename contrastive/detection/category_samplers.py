"""Which categories a category-query head scores in training: hard-negative samplers over categories, and
the hierarchy false-negative filter.

A sampler picks ``K`` distinct categories per image (``(B, K)`` long, contiguous category indices). The
classification loss then sees ``K`` instead of ``C`` negatives (CQ-DINO, Sun et al. NeurIPS 2025, which
keeps the image-guided top-K; methods.md A4). At inference every head uses the top-K presence scores.

- :class:`CQTopKSampler` (``cq_topk``): the ``K`` categories with the highest presence logits (learned,
  image-guided). ``force_include_gt`` puts the image's ground-truth categories first (a deviation from the
  released code, which leaves a missed ground-truth category without a slot).
- :class:`IndexTopKSampler` (``index_topk``): the ground-truth categories plus their nearest categories in
  category-embedding space, found through :mod:`contrastive.index` and refreshed every ``refresh_every``
  calls; remaining slots by presence.
- :class:`RandomCategorySampler` (``random``): the ground-truth categories plus a uniform sample.

:class:`CategoryHierarchyFilter` is a :class:`contrastive.filters.NegativeFilter` over (image, category
slot) pairs: it flags categories that are an ancestor or a descendant of a ground-truth category of the
image, so that a "red circle" is not a negative for an object labelled "striped red circle".
"""
from __future__ import annotations

import abc
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from contrastive.filters import NegativeFilter
from contrastive.filters.base import FilterContext
from contrastive.index import ExactIndex


def _fill(first: list[int], ranked: Tensor, k: int) -> list[int]:
    """``first`` (deduplicated, at most ``k``) followed by the best of ``ranked`` not already taken."""
    out = list(dict.fromkeys(first))[:k]
    if len(out) < k:
        taken = torch.zeros(int(ranked.max()) + 1 if ranked.numel() else 1, dtype=torch.bool)
        taken[torch.tensor(out, dtype=torch.long)] = True
        rest = ranked[~taken[ranked]]
        out += rest[:k - len(out)].tolist()
    return out


class CategorySampler(abc.ABC):
    """Chooses the ``K`` categories of each training image."""

    name = "sampler"

    @abc.abstractmethod
    def select(self, presence: Tensor, gt: Sequence[Tensor], k: int, embeddings: Optional[Tensor] = None) -> Tensor:
        """``(B, K)`` long category indices.

        Args:
            presence: ``(B, C)`` presence logits (detached).
            gt: per image, the long indices of its ground-truth categories.
            k: categories per image (``k <= C``).
            embeddings: ``(C, e)`` current category embeddings (detached), for samplers that need them.
        """

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the sampler's choices exactly (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class CQTopKSampler(CategorySampler):
    """CQ-DINO's image-guided selection: top-``k`` presence logits (ground truth first if forced)."""

    name = "cq_topk"

    def __init__(self, force_include_gt: bool = False) -> None:
        self.force_include_gt = force_include_gt

    def select(self, presence: Tensor, gt: Sequence[Tensor], k: int, embeddings: Optional[Tensor] = None) -> Tensor:
        if not self.force_include_gt:
            return presence.topk(k, dim=1).indices
        order = presence.argsort(dim=1, descending=True).cpu()
        return torch.tensor([_fill(g.tolist(), order[b], k) for b, g in enumerate(gt)], device=presence.device)


class IndexTopKSampler(CategorySampler):
    """Ground-truth categories plus their ``neighbours`` nearest categories (cosine, :class:`ExactIndex`),
    then the highest presence logits. The neighbour table is rebuilt every ``refresh_every`` calls from the
    embeddings given then."""

    name = "index_topk"

    def __init__(self, neighbours: int = 8, refresh_every: int = 100) -> None:
        if neighbours < 1 or refresh_every < 1:
            raise ValueError(f"neighbours and refresh_every must be >= 1; got {neighbours}, {refresh_every}")
        self.neighbours, self.refresh_every = neighbours, refresh_every
        self.table: Optional[Tensor] = None
        self.calls = 0
        self.refreshes = 0

    def refresh(self, embeddings: Tensor) -> None:
        """Rebuild the ``(C, neighbours)`` nearest-category table (self excluded)."""
        emb = embeddings.detach().float().cpu()
        index = ExactIndex(emb.shape[1], metric="cosine", device="cpu")
        index.add(emb)
        k = min(self.neighbours + 1, emb.shape[0])
        _, ids = index.search(emb, k)
        own = ids == torch.arange(emb.shape[0])[:, None]
        # drop each row's own id (normally first; a duplicate embedding may put it elsewhere)
        keep = torch.where(own.any(1, keepdim=True), ~own, torch.arange(k)[None, :] < k - 1)
        self.table = ids[keep].view(emb.shape[0], k - 1)
        self.refreshes += 1

    def select(self, presence: Tensor, gt: Sequence[Tensor], k: int, embeddings: Optional[Tensor] = None) -> Tensor:
        if self.table is None or self.calls % self.refresh_every == 0:
            if embeddings is None:
                raise ValueError("index_topk needs the category embeddings")
            self.refresh(embeddings)
        self.calls += 1
        order = presence.argsort(dim=1, descending=True).cpu()
        rows = []
        for b, g in enumerate(gt):
            g = g.cpu()
            near = self.table[g].t().flatten().tolist() if g.numel() else []  # rank-major: nearest of all GT first
            rows.append(_fill(g.tolist() + near, order[b], k))
        return torch.tensor(rows, device=presence.device)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"calls": self.calls, "refreshes": self.refreshes}
        if self.table is not None:
            state["table"] = self.table.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.refreshes = int(state.get("calls", 0)), int(state.get("refreshes", 0))
        self.table = state["table"].clone() if state.get("table") is not None else None


class RandomCategorySampler(CategorySampler):
    """Ground-truth categories plus a uniform sample of the others (``generator`` for reproducibility)."""

    name = "random"

    def __init__(self, seed: Optional[int] = None) -> None:
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def select(self, presence: Tensor, gt: Sequence[Tensor], k: int, embeddings: Optional[Tensor] = None) -> Tensor:
        c = presence.shape[1]
        rows = [_fill(g.tolist(), torch.randperm(c, generator=self.generator), k) for g in gt]
        return torch.tensor(rows, device=presence.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


CATEGORY_SAMPLERS: dict[str, type] = {"cq_topk": CQTopKSampler, "index_topk": IndexTopKSampler,
                                      "random": RandomCategorySampler}


def ancestor_matrix(parents: Sequence[int]) -> Tensor:
    """``(C, C)`` bool: ``A[i, j]`` is True when ``j`` is a strict ancestor of ``i``.

    ``parents[i]`` is the parent index of category ``i`` (``-1`` for a root); cycles raise ``ValueError``.
    """
    c = len(parents)
    anc = torch.zeros(c, c, dtype=torch.bool)
    for i in range(c):
        p, seen = parents[i], 0
        while p >= 0:
            anc[i, p] = True
            p = parents[p]
            seen += 1
            if seen > c:
                raise ValueError(f"category hierarchy has a cycle through category index {i}")
    return anc


def hierarchy_relation(parents: Sequence[int]) -> Tensor:
    """``(C, C)`` bool: ``R[i, j]`` is True when ``i`` is a strict ancestor or descendant of ``j``."""
    anc = ancestor_matrix(parents)
    return anc | anc.t()


class CategoryHierarchyFilter(NegativeFilter):
    """Flags candidate categories related (ancestor or descendant) to one of the anchor's positives.

    Layout: anchors are images, ``candidate_ids`` ``(B, K)`` the category of each slot, ``positive_ids``
    ``(B, P)`` the image's ground-truth categories (``-1`` padding).
    """

    name = "category_hierarchy"

    def __init__(self, parents: Sequence[int]) -> None:
        self.relation = hierarchy_relation(parents)

    def flag(self, ctx: FilterContext) -> Tensor:
        if ctx.positive_ids is None:
            raise ValueError("filter 'category_hierarchy' needs FilterContext.positive_ids")
        rel = self.relation.to(ctx.scores.device)
        cand = ctx.ids().clamp_min(0)
        pos = ctx.positive_ids.long()
        valid = pos >= 0
        # (B, K, P): candidate k related to positive p
        hit = rel[cand[:, :, None], pos.clamp_min(0)[:, None, :]] & valid[:, None, :]
        return hit.any(-1)
