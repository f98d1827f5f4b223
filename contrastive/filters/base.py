"""The false-negative filter interface: a context, a filter, and a chain of filters.

A *filter* looks at an anchor's candidate negatives and flags the ones that are probably not negatives
at all (duplicates of the positive, same class, scored too close to the positive, ...). Its output is a
``(Q, K)`` bool mask with ``True = remove`` that feeds a loss's ``false_negative_mask``
(:class:`contrastive.losses.base.ContrastiveInputs`) or a miner's ``exclude`` step.

Layout of :class:`FilterContext`:

- ``Q`` anchors, each with ``K`` candidates (``(Q, K)`` scores). For in-batch negatives ``K = M`` and
  ``candidate_ids`` may be left ``None``: column ``j`` is then corpus item ``j`` (the batch is the corpus).
- ids (``candidate_ids``, ``positive_ids``) are row indices into corpus-level tensors of ``N`` items:
  ``dup_group``, ``labels`` and ``corpus_embeddings``. Candidate embeddings are therefore *not* passed as a
  ``(Q, K, d)`` block; they are looked up as ``corpus_embeddings[candidate_ids]``.
- ``-1`` ids and ``NaN``/``-inf`` scores are padding. Padding and the anchor's own positives
  (``positive_mask``) are never flagged, never counted as removed, and never "kept".

Filters run under ``torch.no_grad()``: every statistic they use (quantiles, thresholds, guide scores,
neighbourhoods) is detached, so a filter can never leak gradient into the loss (methods.md §B8).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from contrastive.filters.functional import min_positive_score, rowwise_isin, valid_candidates


@dataclass
class FilterContext:
    """Everything a filter may need; only ``scores`` is required.

    Attributes:
        scores: ``(Q, K)`` anchor–candidate scores of the model being trained.
        candidate_ids: ``(Q, K)`` long corpus ids, ``-1`` = padding. ``None``: column ``j`` is item ``j``.
        positive_scores: ``(Q, P)`` or ``(Q,)`` scores of each anchor's positives; NaN/``-inf`` padding.
        positive_ids: ``(Q, P)`` or ``(Q,)`` long corpus ids of each anchor's positives, ``-1`` padding.
        positive_mask: ``(Q, K)`` bool, candidates that *are* the anchor's positives (in-batch layout,
            e.g. the diagonal). No filter ever flags them, so they are never counted as removed.
        anchor_ids: ``(Q,)`` long corpus ids of the anchors (when anchors live in the same corpus).
        dup_group: ``(N,)`` long duplicate-group id per corpus item; negative = no group.
        labels: ``(N,)`` long class label per corpus item; negative = unlabelled.
        anchor_labels: ``(Q,)`` long class label per anchor; negative = unlabelled.
        guide_scores: ``(Q, K)`` anchor–candidate scores of a frozen guide model (GISTEmbed).
        guide_positive_scores: ``(Q, P)`` or ``(Q,)`` guide scores of the anchor's positives.
        corpus_embeddings: ``(N, d)`` embeddings of the corpus, indexed by ids.
        anchor_embeddings: ``(Q, d)`` embeddings of the anchors.
    """

    scores: Tensor
    candidate_ids: Optional[Tensor] = None
    positive_scores: Optional[Tensor] = None
    positive_ids: Optional[Tensor] = None
    positive_mask: Optional[Tensor] = None
    anchor_ids: Optional[Tensor] = None
    dup_group: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    anchor_labels: Optional[Tensor] = None
    guide_scores: Optional[Tensor] = None
    guide_positive_scores: Optional[Tensor] = None
    corpus_embeddings: Optional[Tensor] = None
    anchor_embeddings: Optional[Tensor] = None

    def __post_init__(self) -> None:
        s = self.scores
        if s.dim() != 2 or s.shape[0] == 0 or s.shape[1] == 0:
            raise ValueError(f"FilterContext.scores must be a non-empty (Q, K) tensor; got shape {tuple(s.shape)}")
        if not s.is_floating_point():
            raise TypeError(f"FilterContext.scores must be floating point; got {s.dtype}")
        q, k = s.shape
        for name in ("candidate_ids", "positive_mask", "guide_scores"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (q, k):
                raise ValueError(f"FilterContext.{name} must have shape (Q, K) = {(q, k)}; got {tuple(t.shape)}")
        if self.positive_mask is not None and self.positive_mask.dtype != torch.bool:
            raise TypeError(f"FilterContext.positive_mask must be bool; got {self.positive_mask.dtype}")
        for name in ("candidate_ids", "positive_ids", "anchor_ids", "dup_group", "labels", "anchor_labels"):
            t = getattr(self, name)
            if t is not None and (t.is_floating_point() or t.dtype == torch.bool):
                raise TypeError(f"FilterContext.{name} must be an integer tensor; got {t.dtype}")
        for name in ("positive_scores", "positive_ids", "guide_positive_scores", "anchor_ids", "anchor_labels", "anchor_embeddings"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != q:
                raise ValueError(f"FilterContext.{name} must have Q = {q} rows; got shape {tuple(t.shape)}")
        if self.positive_ids is not None and self.positive_ids.dim() == 1:
            self.positive_ids = self.positive_ids.unsqueeze(1)
        if self.positive_scores is not None and self.positive_scores.dim() == 1:
            self.positive_scores = self.positive_scores.unsqueeze(1)
        if self.guide_positive_scores is not None and self.guide_positive_scores.dim() == 1:
            self.guide_positive_scores = self.guide_positive_scores.unsqueeze(1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scores.shape[0], self.scores.shape[1]

    def ids(self) -> Tensor:
        """``(Q, K)`` candidate ids; ``arange(K)`` per row when ``candidate_ids`` is ``None``."""
        if self.candidate_ids is not None:
            return self.candidate_ids.long()
        q, k = self.shape
        return torch.arange(k, device=self.scores.device).expand(q, k)

    def candidate_mask(self) -> Tensor:
        """``(Q, K)`` bool: real candidates that may be flagged (not padding, not a positive column)."""
        m = valid_candidates(self.scores, self.candidate_ids)
        if self.positive_mask is not None:
            m = m & ~self.positive_mask
        return m

    def is_positive_id(self) -> Tensor:
        """``(Q, K)`` bool: the candidate's id is one of the anchor's ``positive_ids``."""
        if self.positive_ids is None:
            return torch.zeros(self.shape, dtype=torch.bool, device=self.scores.device)
        return rowwise_isin(self.ids(), self.positive_ids.long())

    def min_positive(self, guide: bool = False, *, setting: str = "") -> Tensor:
        """``(Q,)`` minimum positive score (model or guide) per anchor; raises if a row has none."""
        name = "guide_positive_scores" if guide else "positive_scores"
        ps = self.guide_positive_scores if guide else self.positive_scores
        if ps is None:
            raise ValueError(f"{setting or 'this filter'} needs FilterContext.{name}")
        pid = self.positive_ids if self.positive_ids is not None and self.positive_ids.shape == ps.shape else None
        p = min_positive_score(ps, pid)
        missing = torch.isnan(p).nonzero().flatten()
        if missing.numel():
            raise ValueError(
                f"{setting or 'this filter'} needs a finite positive score per anchor, but anchors "
                f"{missing[:5].tolist()} have none in FilterContext.{name}"
            )
        return p


def require(ctx: FilterContext, filter_name: str, *fields: str) -> None:
    """Raise a ``ValueError`` naming the filter and the missing :class:`FilterContext` fields."""
    missing = [f for f in fields if getattr(ctx, f) is None]
    if missing:
        raise ValueError(f"filter {filter_name!r} needs FilterContext.{', FilterContext.'.join(missing)}")


class NegativeFilter(abc.ABC):
    """A false-negative detector. Subclasses set ``name`` and implement :meth:`flag`.

    ``filter(ctx)`` returns a ``(Q, K)`` bool mask, ``True = remove (likely a false negative)``, already
    restricted to :meth:`FilterContext.candidate_mask` and computed without gradient.
    """

    name: str = "filter"

    @abc.abstractmethod
    def flag(self, ctx: FilterContext) -> Tensor:
        """``(Q, K)`` bool raw flags; padding and positive columns are cleared by :meth:`__call__`."""

    def __call__(self, ctx: FilterContext) -> Tensor:
        with torch.no_grad():
            m = self.flag(ctx)
            if tuple(m.shape) != ctx.shape or m.dtype != torch.bool:
                raise RuntimeError(f"filter {self.name!r} returned {m.dtype} {tuple(m.shape)}, expected bool {ctx.shape}")
            return m & ctx.candidate_mask()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


@dataclass
class FilterResult:
    """Output of :meth:`FilterChain.apply`.

    Attributes:
        false_negative_mask: ``(Q, K)`` bool union of all filters (``True`` = remove); feed it to a loss.
        keep: ``(Q, K)`` bool candidates usable as negatives: real, not a positive column, not flagged.
        removed: per-filter count of candidates *that filter* flagged (filters overlap, so these may sum
            to more than ``total_removed``).
        total_removed: size of the union.
        masks: per-filter ``(Q, K)`` masks, keyed like ``removed``.
        num_candidates: real candidates seen (padding and positive columns excluded).
    """

    false_negative_mask: Tensor
    keep: Tensor
    removed: dict[str, int] = field(default_factory=dict)
    total_removed: int = 0
    masks: dict[str, Tensor] = field(default_factory=dict)
    num_candidates: int = 0

    @property
    def removed_fraction(self) -> float:
        return self.total_removed / self.num_candidates if self.num_candidates else 0.0


class FilterChain:
    """Run several filters on one context and take the union of their flags.

    Every filter sees the same, unfiltered context (order does not matter); each reports how many real
    candidates it flagged on its own. A name that appears twice gets a ``#2``, ``#3`` suffix in the report.

    Args:
        filters: the filters to combine; an empty chain removes nothing.
    """

    def __init__(self, filters: Sequence[NegativeFilter]) -> None:
        for f in filters:
            if not isinstance(f, NegativeFilter):
                raise TypeError(f"FilterChain takes NegativeFilter instances; got {type(f).__name__}")
        self.filters = list(filters)

    def __len__(self) -> int:
        return len(self.filters)

    def __repr__(self) -> str:
        return f"FilterChain({self.filters!r})"

    def apply(self, ctx: FilterContext) -> FilterResult:
        cand = ctx.candidate_mask()
        union = torch.zeros_like(cand)
        removed: dict[str, int] = {}
        masks: dict[str, Tensor] = {}
        for f in self.filters:
            key, n = f.name, 2
            while key in removed:
                key, n = f"{f.name}#{n}", n + 1
            m = f(ctx)
            masks[key] = m
            removed[key] = int(m.sum())
            union |= m
        return FilterResult(
            false_negative_mask=union,
            keep=cand & ~union,
            removed=removed,
            total_removed=int(union.sum()),
            masks=masks,
            num_candidates=int(cand.sum()),
        )

    __call__ = apply
