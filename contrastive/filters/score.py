"""Score-based false-negative filters: thresholds relative to the positive, to a guide model, to the
batch's score distribution, or absolute.

Every rule here flags a candidate when its score is **strictly above** a threshold, so a candidate kept
by a filter satisfies ``score <= threshold`` (the same convention as :func:`contrastive.samplers.mining.select_negatives`).
With several positives per anchor the threshold is built from the **minimum** positive score (as
sentence-transformers' ``mine_hard_negatives``): a trusted negative must sit below every positive.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from contrastive.filters.base import FilterContext, NegativeFilter, require
from contrastive.filters.functional import absolute_threshold, gather_corpus, relative_threshold
from contrastive.registry import FILTERS


def _check_finite(value: float, setting: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{setting} must be finite; got {value}")
    return value


@FILTERS.register("positive_aware")
class PositiveAwareFilter(NegativeFilter):
    """NV-Retriever positive-aware false-negative removal (Moreira et al. 2024, arXiv 2407.15831, §B7.10).

    With ``p`` the anchor's minimum positive score and ``s`` a candidate's score:

    - ``mode="perc"`` (TopK-PercPos): flag if ``s > p - |p| * (1 - perc)``. For ``p >= 0`` this is the
      paper's ``s > perc * p``; for ``p < 0`` the paper's form would put the threshold *above* ``p``, so
      the sign-safe form is used (sentence-transformers #3819): any ``s >= p`` is flagged for
      ``perc <= 1``, whatever the sign of ``p``.
    - ``mode="margin"`` (TopK-MarginPos): flag if ``s > p - margin``.

    ``perc = 1`` is equivalent to ``margin = 0``. Rows without a finite positive score raise.

    Args:
        mode: ``"perc"`` or ``"margin"``.
        perc: fraction of the positive score a negative may reach (paper's best 0.95); ``> 0``.
        margin: absolute gap below the positive (paper's best 0.05); ``>= 0``.
        use_guide: read ``guide_scores``/``guide_positive_scores`` (a teacher, as in the paper) instead
            of the trained model's ``scores``/``positive_scores``.
    """

    name = "positive_aware"

    def __init__(self, mode: Literal["perc", "margin"] = "perc", perc: float = 0.95, margin: float = 0.05,
                 use_guide: bool = False) -> None:
        if mode not in ("perc", "margin"):
            raise ValueError(f"positive_aware mode must be 'perc' or 'margin'; got {mode!r}")
        perc = _check_finite(perc, "positive_aware perc")
        margin = _check_finite(margin, "positive_aware margin")
        if perc <= 0:
            raise ValueError(f"positive_aware perc must be > 0; got {perc}")
        if margin < 0:
            raise ValueError(f"positive_aware margin must be >= 0; got {margin}")
        self.mode, self.perc, self.margin, self.use_guide = mode, perc, margin, bool(use_guide)

    def flag(self, ctx: FilterContext) -> Tensor:
        setting = f"filter 'positive_aware' (use_guide={self.use_guide})"
        if self.use_guide:
            require(ctx, setting, "guide_scores")
        scores = ctx.guide_scores if self.use_guide else ctx.scores
        p = ctx.min_positive(guide=self.use_guide, setting=setting)
        thr = relative_threshold(p, 1.0 - self.perc) if self.mode == "perc" else absolute_threshold(p, self.margin)
        return scores > thr.unsqueeze(1).to(scores.dtype)


@FILTERS.register("guide_model")
class GuideModelFilter(NegativeFilter):
    """GISTEmbed guide-model veto (Solatorio 2024, arXiv 2402.16829; sentence-transformers ``GISTEmbedLoss``, §B7.7).

    A frozen guide scores every (anchor, candidate) pair; with ``g`` the guide's score of the anchor's
    positive (the minimum over positives when there are several), flag candidates with guide score

    - ``margin_strategy="absolute"``: ``G > g - margin``;
    - ``margin_strategy="relative"``: ``G > g - |g| * margin`` (sign-safe, ST PR #3821).

    With the defaults (absolute, margin 0) a candidate the guide scores strictly above the positive is
    flagged; ties ``G == g`` are kept, as in sentence-transformers.
    The anchor's own positive column is never flagged (pass ``positive_mask``).

    Args:
        margin_strategy: ``"absolute"`` or ``"relative"``.
        margin: ``>= 0``; 0.0 by default (sentence-transformers' default).
    """

    name = "guide_model"

    def __init__(self, margin_strategy: Literal["absolute", "relative"] = "absolute", margin: float = 0.0) -> None:
        if margin_strategy not in ("absolute", "relative"):
            raise ValueError(f"guide_model margin_strategy must be 'absolute' or 'relative'; got {margin_strategy!r}")
        margin = _check_finite(margin, "guide_model margin")
        if margin < 0:
            raise ValueError(f"guide_model margin must be >= 0; got {margin}")
        self.margin_strategy, self.margin = margin_strategy, margin

    def flag(self, ctx: FilterContext) -> Tensor:
        require(ctx, self.name, "guide_scores", "guide_positive_scores")
        g = ctx.min_positive(guide=True, setting="filter 'guide_model'")
        thr = absolute_threshold(g, self.margin) if self.margin_strategy == "absolute" else relative_threshold(g, self.margin)
        return ctx.guide_scores > thr.unsqueeze(1).to(ctx.guide_scores.dtype)


@FILTERS.register("threshold")
class ThresholdFilter(NegativeFilter):
    """Flag candidates scoring above an absolute ``max_score`` (NV-Retriever's TopK-Abs, best 0.7).

    Args:
        max_score: a candidate with ``score > max_score`` is flagged.
        use_guide: compare ``guide_scores`` instead of ``scores``.
    """

    name = "threshold"

    def __init__(self, max_score: float, use_guide: bool = False) -> None:
        self.max_score = _check_finite(max_score, "threshold max_score")
        self.use_guide = bool(use_guide)

    def flag(self, ctx: FilterContext) -> Tensor:
        if self.use_guide:
            require(ctx, "threshold (use_guide=True)", "guide_scores")
        scores = ctx.guide_scores if self.use_guide else ctx.scores
        return scores > self.max_score


def iqr_bounds(sorted_values: Tensor, counts: Tensor, whisker: float) -> tuple[Tensor, Tensor]:
    """Box-and-whisker bounds with UNPG's index-based quartiles (Jung et al. 2022, §B3).

    ``Q1 = sorted[floor(n/4)]``, ``Q3 = sorted[floor(3n/4)]``, ``IQR = Q3 - Q1``; returns
    ``(Q1 - whisker*IQR, Q3 + whisker*IQR)``.

    Args:
        sorted_values: ``(R, L)`` ascending, the first ``counts[r]`` entries of row ``r`` are real.
        counts: ``(R,)`` long, ``>= 1``.
    Returns:
        ``(lo, hi)`` each ``(R,)``.
    """
    i1 = (counts // 4).clamp(max=sorted_values.shape[1] - 1).unsqueeze(1)
    i3 = ((3 * counts) // 4).clamp(max=sorted_values.shape[1] - 1).unsqueeze(1)
    q1 = sorted_values.gather(1, i1).squeeze(1)
    q3 = sorted_values.gather(1, i3).squeeze(1)
    iqr = q3 - q1
    return q1 - whisker * iqr, q3 + whisker * iqr


@FILTERS.register("iqr_outliers")
class IQROutlierFilter(NegativeFilter):
    """UNPG's box-and-whisker filter on negative similarities (Jung et al. 2022, arXiv 2203.11593, §B3).

    Following the reference code, the statistic set ``S`` is **the whole batch** of negative scores
    (``scope="batch"``: every real candidate of every anchor that is not a positive by id, and, when
    ``labels`` and ``anchor_labels`` are both known, not of the anchor's label: UNPG's ``y_a != y_b``).
    ``Q1``/``Q3`` are index-based (``sorted(S)[floor(|S|/4)]``, ``sorted(S)[floor(3|S|/4)]``, no
    interpolation) and candidates outside ``[Q1 - k*IQR, Q3 + k*IQR]`` are flagged: **both tails**, as in
    UNPG, which treats both as noisy pairs (``tails="upper"`` keeps the easy low tail and flags only the
    suspiciously high scores, the false-negative reading). ``scope="anchor"`` computes the quartiles per
    row instead (an adaptation, not in UNPG). An empty ``S`` flags nothing (UNPG's fallback).

    Under DDP the statistics are those of the local ``(Q, K)`` block; all-gather the scores first for
    UNPG's global behaviour.

    Args:
        whisker: ``k`` (UNPG: 1.5 for MS1MV2, 1.0 for K-FACE); ``>= 0``.
        scope: ``"batch"`` (UNPG) or ``"anchor"``.
        tails: ``"both"`` (UNPG) or ``"upper"``.
        symmetric: the scores are a symmetric sample–sample matrix (``Q == K``, same items on both
            axes): quartiles use only the strict upper triangle, each pair once (UNPG's ``a < b``);
            flags still apply to both triangles.
    """

    name = "iqr_outliers"

    def __init__(self, whisker: float = 1.5, scope: Literal["batch", "anchor"] = "batch",
                 tails: Literal["both", "upper"] = "both", symmetric: bool = False) -> None:
        whisker = _check_finite(whisker, "iqr_outliers whisker")
        if whisker < 0:
            raise ValueError(f"iqr_outliers whisker must be >= 0; got {whisker}")
        if scope not in ("batch", "anchor"):
            raise ValueError(f"iqr_outliers scope must be 'batch' or 'anchor'; got {scope!r}")
        if tails not in ("both", "upper"):
            raise ValueError(f"iqr_outliers tails must be 'both' or 'upper'; got {tails!r}")
        if symmetric and scope != "batch":
            raise ValueError("iqr_outliers symmetric=True needs scope='batch'")
        self.whisker, self.scope, self.tails, self.symmetric = whisker, scope, tails, bool(symmetric)

    def negatives(self, ctx: FilterContext) -> Tensor:
        """``(Q, K)`` bool: the candidates that form UNPG's negative set ``S`` (before the triangle)."""
        neg = ctx.candidate_mask() & ~ctx.is_positive_id()
        if ctx.labels is not None and ctx.anchor_labels is not None:
            cl = gather_corpus(ctx.labels.long(), ctx.ids())
            al = ctx.anchor_labels.long().view(-1, 1)
            neg &= ~((cl == al) & (al >= 0))
        return neg

    def flag(self, ctx: FilterContext) -> Tensor:
        s = ctx.scores
        neg = self.negatives(ctx)
        stat = neg
        if self.symmetric:
            q, k = ctx.shape
            if q != k:
                raise ValueError(f"iqr_outliers symmetric=True needs a square score matrix; got {ctx.shape}")
            stat = neg & torch.ones_like(neg).triu(diagonal=1)
        if self.scope == "batch":
            vals = s[stat].reshape(1, -1)
            counts = torch.tensor([vals.shape[1]], device=s.device)
        else:
            vals = torch.where(stat, s, torch.full_like(s, float("inf")))
            counts = stat.sum(dim=1)
        if vals.shape[1] == 0:
            return torch.zeros_like(neg)
        lo, hi = iqr_bounds(vals.sort(dim=1).values, counts.clamp_min(1), self.whisker)
        lo, hi = lo.view(-1, 1), hi.view(-1, 1)
        out = s > hi
        if self.tails == "both":
            out |= s < lo
        return out & neg & (counts > 0).view(-1, 1)
