"""Cement-style margin loss: a triplet hinge whose margin is calibrated by a per-negative difficulty."""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from contrastive.losses import functional as F
from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss, LossInputError, LossOutput
from contrastive.losses.infonce import contrastive_logs, reduce_rows
from contrastive.registry import LOSSES

Calibration = Literal["linear", "sigmoid", "constant"]
NegativeReduction = Literal["mean", "sum", "max"]


@LOSSES.register("cement")
class CementLoss(ContrastiveLoss):
    """Difficulty-calibrated margin loss in the spirit of the Cement loss of "Concrete Jungle" (Im,
    Madhwal, Gupta, arXiv 2604.13313, 2026). **The paper's exact formula is not public; this is this
    project's formulation**, built from the established triplet hinge (VSE++, Faghri et al. 2018) and the
    concreteness-calibrated margin sketch of the reference notes (methods.md §A3 B4).

    For anchor i with positives P_i, negatives N_i (not positive, not a known false negative, weight
    ``w_in > 0``; ``w = 1`` by default), similarity ``s_ij = a_i · c_j`` (cosine for L2-normalised
    embeddings; no temperature) and difficulty ``d_in`` (``difficulty`` input, e.g. the normalised
    concreteness of the word changed to make a hard-negative caption, or the negative's mined
    similarity)::

        d̂_in = clip((d_in - d_lo) / (d_hi - d_lo), 0, 1)
        m_in = m_min + (m_max - m_min) * g(d̂_in)
            g(x) = x                                                          (linear)
            g(x) = (σ(k(x - c)) - σ(-kc)) / (σ(k(1 - c)) - σ(-kc))           (sigmoid)
            g(x) = 1, i.e. m_in = m_max, difficulty ignored                   (constant)
        L_i  = 1/|P_i| Σ_{p ∈ P_i} R_{n ∈ N_i}[ w_in · max(0, m_in - s_ip + s_in) ]
            R = weighted mean Σ_n(·) / Σ_n w_in (mean) | Σ_n (sum) | max_n (max, VSE++ hardest negative)
        L    = mean of L_i over anchors with at least one negative

    Harder (e.g. more concrete) negatives get a larger margin, so they keep contributing gradient longer,
    while easy pairs whose gap already exceeds their margin contribute exactly zero loss and gradient: the
    margin caps the gradient share of easy pairs. ``m_min == m_max`` (or ``calibration="constant"``) is
    the fixed-margin triplet loss. Combine it with InfoNCE through ``slipform`` /
    :class:`~contrastive.losses.combined.WeightedSumLoss`.

    Args:
        margin_min: margin of the easiest negatives (``d̂ = 0``), >= 0; default 0.1 (project choice).
        margin_max: margin of the hardest negatives (``d̂ = 1``), >= ``margin_min``; default 0.3 (project
            choice; the pair brackets the usual fixed triplet margin 0.2 of VSE++).
        calibration: ``"linear"``, ``"sigmoid"`` or ``"constant"``.
        difficulty_min, difficulty_max: the raw difficulty range mapped to ``[0, 1]`` (``d_lo``, ``d_hi``);
            e.g. 1 and 5 for raw Brysbaert concreteness ratings, -1 and 1 for cosine similarities.
        sigmoid_slope, sigmoid_center: ``k`` and ``c`` of the sigmoid map.
        negative_reduction: ``"mean"``, ``"sum"`` or ``"max"`` over the negatives of a (anchor, positive).
        symmetric: also the reverse direction (needs the difficulty of that direction).

    Raises:
        LossInputError: ``calibration`` is not ``"constant"`` and no ``difficulty`` is given.
    """

    def __init__(self, margin_min: float = 0.1, margin_max: float = 0.3, calibration: Calibration = "linear",
                 difficulty_min: float = 0.0, difficulty_max: float = 1.0, sigmoid_slope: float = 10.0,
                 sigmoid_center: float = 0.5, negative_reduction: NegativeReduction = "mean",
                 symmetric: bool = False) -> None:
        super().__init__(symmetric=symmetric)
        if not 0.0 <= margin_min <= margin_max:
            raise ValueError(f"need 0 <= margin_min <= margin_max; got {margin_min}, {margin_max}")
        if calibration not in ("linear", "sigmoid", "constant"):
            raise ValueError(f"calibration must be 'linear', 'sigmoid' or 'constant'; got {calibration!r}")
        if negative_reduction not in ("mean", "sum", "max"):
            raise ValueError(f"negative_reduction must be 'mean', 'sum' or 'max'; got {negative_reduction!r}")
        if not difficulty_max > difficulty_min:
            raise ValueError(f"need difficulty_max > difficulty_min; got {difficulty_min}, {difficulty_max}")
        if sigmoid_slope <= 0:
            raise ValueError(f"sigmoid_slope must be > 0; got {sigmoid_slope}")
        self.margin_min, self.margin_max, self.calibration = float(margin_min), float(margin_max), calibration
        self.difficulty_min, self.difficulty_max = float(difficulty_min), float(difficulty_max)
        self.sigmoid_slope, self.sigmoid_center = float(sigmoid_slope), float(sigmoid_center)
        self.negative_reduction = negative_reduction

    def margins(self, difficulty: Tensor) -> Tensor:
        """``(B, M)`` margins for a ``(B, M)`` difficulty tensor (see the class docstring)."""
        return F.calibrated_margins(
            difficulty, calibration=self.calibration, margin_min=self.margin_min, margin_max=self.margin_max,
            difficulty_min=self.difficulty_min, difficulty_max=self.difficulty_max,
            sigmoid_slope=self.sigmoid_slope, sigmoid_center=self.sigmoid_center)

    def one_way(self, inputs: ContrastiveInputs) -> LossOutput:
        sims = inputs.anchors @ inputs.candidates.T
        difficulty = inputs.difficulty
        if difficulty is None:
            if self.calibration != "constant":
                raise LossInputError(
                    f"cement with calibration={self.calibration!r} needs difficulty (B, M); pass difficulty=... "
                    "or use calibration='constant'"
                )
            margins = sims.new_full(sims.shape, self.margin_max)
        else:
            margins = self.margins(difficulty.to(device=sims.device, dtype=sims.dtype))
        pos, neg = inputs.resolved_positive_mask(), inputs.negative_mask()
        rows, has_neg, active = F.margin_triplet_from_similarities(
            sims, pos, neg, margins, inputs.weights, self.negative_reduction)
        logs = contrastive_logs(sims, inputs)
        logs["active"] = active
        if neg.any():
            logs["margin_mean"] = margins.detach()[neg].mean()
        return LossOutput(reduce_rows(rows, has_neg, logs), logs)
