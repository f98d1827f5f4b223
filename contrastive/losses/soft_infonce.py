"""Soft-InfoNCE: InfoNCE whose negatives are weighted by an external similarity estimate."""
from __future__ import annotations

from contrastive.losses import functional as F
from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss, LossInputError, LossOutput
from contrastive.losses.infonce import Temperature, contrastive_logs, reduce_rows
from contrastive.registry import LOSSES


@LOSSES.register("soft_infonce")
class SoftInfoNCELoss(ContrastiveLoss):
    """Soft-InfoNCE (Li, Zhou, Luu, Miao, "Rethinking Negative Pairs in Code Search", EMNLP 2023, arXiv
    2310.08069; formulas from the official code, ``github.com/Alex-HaochenLi/Soft-InfoNCE``).

    Negatives that an external estimator finds related to the anchor (likely false negatives) are pushed
    away less::

        p_ij = softmax_{j in N_i}( r_ij / t_w )
        w_ij = max( w_min, (beta - alpha p_ij) / (beta - alpha / |N_i|) )
        L    = mean_i -log( e^{s_ii/t} / (e^{s_ii/t} + sum_{j in N_i} u_ij w_ij e^{s_ij/t}) )

    ``r`` is ``similarity_estimate`` ``(B, M)`` (pass it to ``forward``; see
    :mod:`contrastive.losses.estimators` for BM25, frozen-encoder and frozen-model estimators), ``N_i``
    the negatives of row i (positives and known false negatives excluded, so ``|N_i| = N - 1`` for plain
    in-batch negatives), ``u`` the optional caller ``weights`` (multiplied in after the softmax).
    The weights are computed without gradient. With several positives the SupCon L_out form of
    :class:`~contrastive.losses.infonce.InfoNCELoss` is used and positives never enter the softmax.
    ``alpha = 0`` (or a constant ``r`` per row) is InfoNCE exactly.

    The paper's scripts use raw dot products of unnormalised embeddings and no logit temperature: that is
    ``temperature=1.0`` (the default here). With L2-normalised embeddings use a small temperature
    (e.g. 0.05) as for InfoNCE. The paper's loss is one-directional; ``symmetric=True`` also runs the
    candidate→anchor direction with ``r`` transposed.

    Args:
        alpha: α (``--weight_kl``), >= 0; default 1.0 (code default).
        beta: β (``--weight_unif``), > 0; default 1.0. Needs ``beta > alpha / |N_i|`` for rows with at
            least two negatives.
        weight_temperature: ``t_w`` that sharpens the weight distribution (``--t``); default 1.0.
        w_min: lower clip of the weights, in ``[0, 1]``; default 0.1 (hard-coded in the paper's code).
        temperature: logit temperature t (1.0 = the paper's raw dot product).
        learnable_temperature, min_temperature, max_temperature: as for InfoNCE.
        symmetric: also the reverse direction.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, weight_temperature: float = 1.0,
                 w_min: float = 0.1, temperature: float = 1.0, learnable_temperature: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0, symmetric: bool = False) -> None:
        super().__init__(symmetric=symmetric)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0; got {alpha}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0; got {beta}")
        if weight_temperature <= 0:
            raise ValueError(f"weight_temperature must be > 0; got {weight_temperature}")
        if not 0.0 <= w_min <= 1.0:
            raise ValueError(f"w_min must be in [0, 1]; got {w_min}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.weight_temperature, self.w_min = float(weight_temperature), float(w_min)
        self.temperature = Temperature(temperature, learnable_temperature, min_temperature, max_temperature)

    def one_way(self, inputs: ContrastiveInputs) -> LossOutput:
        if inputs.similarity_estimate is None:
            raise LossInputError(
                "soft_infonce needs similarity_estimate (B, M): pass similarity_estimate=... to the loss "
                "(e.g. from contrastive.losses.estimators.BM25Estimator)"
            )
        t = self.temperature().to(inputs.anchors.dtype)
        logits = F.similarity_logits(inputs.anchors, inputs.candidates, t)
        pos, neg = inputs.resolved_positive_mask(), inputs.negative_mask()
        r = inputs.similarity_estimate.to(device=logits.device, dtype=logits.dtype)
        soft = F.soft_infonce_weights(r, neg, alpha=self.alpha, beta=self.beta,
                                      weight_temperature=self.weight_temperature, w_min=self.w_min)
        weights = soft if inputs.weights is None else soft * inputs.weights.to(soft.dtype)
        rows, has_neg = F.info_nce_from_logits(logits, pos, neg, weights)
        logs = contrastive_logs(logits, inputs)
        logs["temperature"] = t.detach()
        if neg.any():
            logs["soft_w_min"] = soft[neg].min()
            logs["soft_w_mean"] = soft[neg].mean()
        return LossOutput(reduce_rows(rows, has_neg, logs), logs)
