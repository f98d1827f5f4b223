"""Pure functional contrastive losses. Shapes follow :mod:`contrastive.losses.base`:
anchors ``(B, d)``, candidates ``(M, d)``, masks and weights ``(B, M)``.

All functions work on a ``(B, M)`` similarity (or logit) matrix so that they compose with any negative
source, and return per-anchor losses plus which anchors have a negative left (the shells skip the others):

- :func:`info_nce_from_logits`: InfoNCE / SupCon L_out with weights and masks;
- :func:`debiased_nce_from_logits` (+ :func:`hcl_log_importance`): DCL and HCL;
- :func:`soft_infonce_weights`: the Soft-InfoNCE negative weights (fed to :func:`info_nce_from_logits`);
- :func:`calibrated_margins`, :func:`margin_triplet_from_similarities`: the Cement-style margin loss.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from contrastive.losses.base import LossInputError

NEG_INF = float("-inf")


def similarity_logits(anchors: Tensor, candidates: Tensor, temperature: Tensor | float) -> Tensor:
    """``(B, M)`` logits ``anchors @ candidates.T / temperature`` (cosine when inputs are L2-normalised)."""
    return anchors @ candidates.transpose(0, 1) / temperature


def info_nce_from_logits(
    logits: Tensor,
    positive_mask: Tensor,
    negative_mask: Tensor,
    weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Per-anchor weighted, masked, multi-positive InfoNCE (van den Oord et al. 2018; SupCon L_out,
    Khosla et al. 2020, when an anchor has several positives).

    For anchor i with positives P_i and negatives N_i (``negative_mask``; masked false negatives are
    simply absent from N_i)::

        L_i = -1/|P_i| * sum_{p in P_i} log( e^{s_ip} / (sum_{p' in P_i} e^{s_ip'} + sum_{n in N_i} w_in e^{s_in}) )

    With one positive this is InfoNCE with weighted negatives, and with ``w = 1`` plain InfoNCE.
    Weights are applied in log space (``s + log w``) so a zero weight removes a negative exactly.

    Args:
        logits: ``(B, M)`` similarities already divided by the temperature.
        positive_mask: ``(B, M)`` bool, at least one True per row.
        negative_mask: ``(B, M)`` bool, disjoint from ``positive_mask``.
        weights: ``(B, M)`` non-negative weights of negatives, or ``None``.

    Returns:
        ``(loss_per_anchor (B,), has_negative (B,) bool)``. Rows with no negative have loss 0 (their
        InfoNCE is log|P_i|/|P_i|-free noise); callers decide whether to skip them.
    """
    neg_logits = logits
    if weights is not None:
        neg_logits = logits + torch.log(weights.to(logits.dtype))  # log 0 = -inf removes the negative
    denom_terms = torch.where(positive_mask, logits, torch.where(negative_mask, neg_logits, torch.full_like(logits, NEG_INF)))
    log_denom = torch.logsumexp(denom_terms, dim=1, keepdim=True)  # (B, 1)
    log_prob = logits - log_denom
    n_pos = positive_mask.sum(dim=1).clamp_min(1)
    loss = -(torch.where(positive_mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)) / n_pos
    has_negative = (negative_mask & (torch.ones_like(logits, dtype=torch.bool) if weights is None else weights > 0)).any(dim=1)
    return loss, has_negative


_LN2 = math.log(2.0)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - e^x)`` for ``x < 0``, stable at both ends (Mächler 2012), with NaN-free gradients."""
    near = x > -_LN2
    x_near = torch.where(near, x, torch.full_like(x, -_LN2))
    x_far = torch.where(near, torch.full_like(x, -_LN2), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _effective_negatives(
    logits: Tensor, negative_mask: Tensor, weights: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """``(neg, log_w, has_negative)``: the negatives that count (mask and weight > 0), their log-weights,
    and which rows have any. Rows without a negative get every column as a unit-weight stand-in so
    that every intermediate stays finite (the row is skipped by the caller and gets zero gradient)."""
    neg = negative_mask if weights is None else negative_mask & (weights > 0)
    has_negative = neg.any(dim=1)
    log_w = torch.zeros_like(logits) if weights is None else torch.log(weights.to(logits.dtype))
    neg = neg | ~has_negative[:, None]
    log_w = torch.where(has_negative[:, None], log_w, torch.zeros_like(log_w))
    log_w = torch.where(neg, log_w, torch.full_like(log_w, NEG_INF))
    return neg, log_w, has_negative


def hcl_log_importance(logits: Tensor, log_w: Tensor, beta: float) -> Tensor:
    """``(B, M)`` log of the HCL importance weights (Robinson et al. 2021, arXiv 2010.04592, official code)::

        imp_ij = e^{beta * l_ij} / ( sum_k w_ik e^{beta * l_ik} / sum_k w_ik )

    over the negatives ``k`` of row i (``log_w = -inf`` elsewhere), so the weighted mean of ``imp`` is 1.
    ``beta`` multiplies the logit ``l = s / t`` (as in the code), not the raw similarity ``s``.
    """
    log_count = torch.logsumexp(log_w, dim=1, keepdim=True)
    return beta * logits - (torch.logsumexp(log_w + beta * logits, dim=1, keepdim=True) - log_count)


def debiased_nce_from_logits(
    logits: Tensor,
    positive_mask: Tensor,
    negative_mask: Tensor,
    weights: Optional[Tensor] = None,
    *,
    temperature: Tensor | float,
    tau_plus: float = 0.0,
    beta: float = 0.0,
    detach_importance: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-anchor debiased (DCL, Chuang et al. 2020, arXiv 2007.00224) and hard-negative (HCL, Robinson
    et al. 2021, arXiv 2010.04592) contrastive loss, generalised to weights, masks and several positives.

    For anchor i with logits ``l = s / t``, positives P_i, negatives N_i (known false negatives removed)
    with weights ``w`` (ones by default) and ``W_i = sum_{n in N_i} w_in`` (the number of negatives
    when unweighted)::

        imp_in = e^{beta l_in} / (sum_n w_in e^{beta l_in} / W_i)                    (1 when beta = 0)
        Ng_i   = max( (sum_n w_in imp_in e^{l_in} - tau+ W_i mean_{p in P_i} e^{l_ip}) / (1 - tau+),
                      W_i e^{-1/t} )
        L_i    = -1/|P_i| sum_{p in P_i} log( e^{l_ip} / (sum_{p' in P_i} e^{l_ip'} + Ng_i) )

    With one positive and unit weights this is exactly the official code (``N = W_i``; the positive
    term of DCL is estimated from the mean over the anchor's positives, the paper's general form).
    With several positives the denominator holds all of them (SupCon L_out, as in
    :func:`info_nce_from_logits`). The floor ``e^{-1/t}`` is the smallest possible ``e^{l}`` for
    L2-normalised embeddings; it keeps the estimate positive. Everything is computed in log space.
    ``beta = tau+ = 0`` equals :func:`info_nce_from_logits` whenever the floor is inactive (always, for
    unit-norm embeddings).

    Args:
        logits: ``(B, M)`` similarities divided by the temperature.
        positive_mask, negative_mask: ``(B, M)`` bool, disjoint.
        weights: ``(B, M)`` non-negative weights of negatives, or ``None``.
        temperature: the logit temperature ``t`` (for the floor).
        tau_plus: class prior tau+ in ``[0, 1)``.
        beta: HCL concentration (``0`` = DCL).
        detach_importance: treat ``imp`` as constants (B8 of the reference notes; the official code lets
            the gradient flow through them, ``False``).

    Returns:
        ``(loss_per_anchor (B,), has_negative (B,) bool, clamped (B,) bool)``; ``clamped`` marks rows where
        the floor ``W_i e^{-1/t}`` was used.
    """
    neg, log_w, has_negative = _effective_negatives(logits, negative_mask, weights)
    log_count = torch.logsumexp(log_w, dim=1)  # log W_i
    weighted = log_w + logits
    if beta != 0.0:
        log_imp = hcl_log_importance(logits, log_w, beta)
        if detach_importance:
            log_imp = log_imp.detach()
        weighted = weighted + log_imp
    log_reweight = torch.logsumexp(torch.where(neg, weighted, torch.full_like(weighted, NEG_INF)), dim=1)
    pos_logits = torch.where(positive_mask, logits, torch.full_like(logits, NEG_INF))
    log_pos_sum = torch.logsumexp(pos_logits, dim=1)
    n_pos = positive_mask.sum(dim=1).clamp_min(1).to(logits.dtype)
    if tau_plus > 0.0:
        log_pos_term = math.log(tau_plus) + log_count + log_pos_sum - torch.log(n_pos)
        x = log_pos_term - log_reweight  # Ng > 0  <=>  x < 0
        valid = x < 0
        x_safe = torch.where(valid, x, torch.full_like(x, -1.0))
        log_ng_raw = log_reweight + _log1mexp(x_safe) - math.log1p(-tau_plus)
        log_ng_raw = torch.where(valid, log_ng_raw, torch.full_like(log_ng_raw, NEG_INF))
    else:
        log_ng_raw = log_reweight
    inv_t = 1.0 / temperature
    log_floor = log_count - (inv_t.to(logits.dtype) if isinstance(inv_t, Tensor) else inv_t)
    clamped = log_floor > log_ng_raw
    log_ng = torch.maximum(log_ng_raw, log_floor)
    log_denom = torch.logaddexp(log_pos_sum, log_ng)  # (B,)
    log_prob = logits - log_denom[:, None]
    loss = -(torch.where(positive_mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)) / n_pos
    return loss, has_negative, clamped & has_negative


def soft_infonce_weights(
    similarity_estimate: Tensor,
    negative_mask: Tensor,
    *,
    alpha: float,
    beta: float,
    weight_temperature: float,
    w_min: Optional[float] = 0.1,
) -> Tensor:
    """``(B, M)`` Soft-InfoNCE negative weights (Li et al. 2023, "Rethinking Negative Pairs in Code
    Search", EMNLP, arXiv 2310.08069; formula from the official code)::

        p_ij = softmax_{j in N_i}( r_ij / t_w )
        w_ij = max( w_min, (beta - alpha p_ij) / (beta - alpha / |N_i|) )

    ``N_i`` are the negatives of row i (positives and known false negatives excluded; ``|N_i| = N - 1``
    for plain in-batch negatives). Before clipping the weights of a row average to exactly 1, and they
    decrease with ``r_ij`` when ``beta > alpha / |N_i|``. A row with one negative gets weight 1.
    Entries outside ``negative_mask`` (positives, false negatives) get weight 1 (ignored by the loss).
    No gradient flows through the weights.

    Args:
        similarity_estimate: ``(B, M)`` estimated similarities ``r``.
        negative_mask: ``(B, M)`` bool.
        alpha, beta: the paper's α (``--weight_kl``) and β (``--weight_unif``).
        weight_temperature: ``t_w`` of the softmax over ``r`` (``--t``).
        w_min: lower clip (0.1 in the paper); ``None`` returns the unclipped weights.

    Raises:
        LossInputError: ``beta - alpha / |N_i| <= 0`` for a row with at least two negatives (the map would
            invert or divide by zero).
    """
    with torch.no_grad():
        r = similarity_estimate.detach()
        n_neg = negative_mask.sum(dim=1, keepdim=True)
        has = n_neg > 0
        scaled = torch.where(negative_mask, r / weight_temperature, torch.full_like(r, NEG_INF))
        log_norm = torch.logsumexp(scaled, dim=1, keepdim=True)
        p = torch.where(negative_mask, torch.exp(scaled - torch.where(has, log_norm, torch.zeros_like(log_norm))),
                        torch.zeros_like(r))
        denom = beta - alpha / n_neg.clamp_min(1).to(r.dtype)
        several = n_neg > 1
        if bool((several & (denom <= 0)).any()):
            worst = int(n_neg[several & (denom <= 0)].min())
            raise LossInputError(
                f"soft_infonce needs beta > alpha / |N_i| for every row; got alpha={alpha}, beta={beta} with a row "
                f"of {worst} negatives"
            )
        w = (beta - alpha * p) / torch.where(several, denom, torch.ones_like(denom))
        w = torch.where(several, w, torch.ones_like(w))
        if w_min is not None:
            w = w.clamp_min(w_min)
        return torch.where(negative_mask, w, torch.ones_like(w))


def calibrated_margins(
    difficulty: Tensor,
    *,
    calibration: str,
    margin_min: float,
    margin_max: float,
    difficulty_min: float = 0.0,
    difficulty_max: float = 1.0,
    sigmoid_slope: float = 10.0,
    sigmoid_center: float = 0.5,
) -> Tensor:
    """Per-pair margins ``m = m_min + (m_max - m_min) * g(d_hat)`` from a difficulty score (this project's
    Cement formulation, see :class:`~contrastive.losses.margin.CementLoss`)::

        d_hat = clip((d - d_lo) / (d_hi - d_lo), 0, 1)
        g(x)  = x                                                        (linear)
                (sig(k(x - c)) - sig(-k c)) / (sig(k(1 - c)) - sig(-k c))   (sigmoid, spans [0, 1] exactly)
                1                                                        (constant: m = m_max)

    Both non-constant maps are non-decreasing in ``d``. Returns a tensor shaped like ``difficulty``.
    """
    d_hat = ((difficulty - difficulty_min) / (difficulty_max - difficulty_min)).clamp(0.0, 1.0)
    if calibration == "linear":
        g = d_hat
    elif calibration == "sigmoid":
        lo = 1.0 / (1.0 + math.exp(sigmoid_slope * sigmoid_center))
        hi = 1.0 / (1.0 + math.exp(-sigmoid_slope * (1.0 - sigmoid_center)))
        g = (torch.sigmoid(sigmoid_slope * (d_hat - sigmoid_center)) - lo) / (hi - lo)
    elif calibration == "constant":
        g = torch.ones_like(d_hat)
    else:
        raise ValueError(f"unknown calibration {calibration!r}; valid choices: linear, sigmoid, constant")
    return margin_min + (margin_max - margin_min) * g


def margin_triplet_from_similarities(
    sims: Tensor,
    positive_mask: Tensor,
    negative_mask: Tensor,
    margins: Tensor,
    weights: Optional[Tensor] = None,
    negative_reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-anchor margin (triplet hinge) loss over every (anchor i, positive p, negative n) triple::

        h_ipn = w_in * max(0, m_in - s_ip + s_in)
        L_ip  = sum_n h_ipn / sum_n w_in  (mean) | sum_n h_ipn (sum) | max_n h_ipn (max, VSE++ hardest)
        L_i   = mean_{p in P_i} L_ip

    Memory is ``O(#positives * M)``, not ``O(B M^2)``: each positive pair is one row.

    Args:
        sims: ``(B, M)`` similarities (no temperature; margins are in the same units).
        positive_mask, negative_mask: ``(B, M)`` bool.
        margins: ``(B, M)`` per-negative margins ``m_in``.
        weights: ``(B, M)`` non-negative weights of negatives, or ``None``.
        negative_reduction: ``"mean"``, ``"sum"`` or ``"max"``.

    Returns:
        ``(loss_per_anchor (B,), has_negative (B,) bool, active_fraction ())``: the last is the share of
        (positive, negative) triples with a violated margin (non-zero hinge), detached.
    """
    w = torch.ones_like(sims) if weights is None else weights.to(sims.dtype)
    neg = negative_mask & (w > 0)
    has_negative = neg.any(dim=1)
    rows, cols = positive_mask.nonzero(as_tuple=True)  # one row per positive pair
    s_pos = sims[rows, cols]  # (P,)
    hinge = torch.relu(margins[rows] - s_pos[:, None] + sims[rows])  # (P, M)
    neg_p, w_p = neg[rows], w[rows]
    h = torch.where(neg_p, w_p * hinge, torch.zeros_like(hinge))
    if negative_reduction == "mean":
        per_pair = h.sum(dim=1) / torch.where(neg_p, w_p, torch.zeros_like(w_p)).sum(dim=1).clamp_min(1e-12)
    elif negative_reduction == "sum":
        per_pair = h.sum(dim=1)
    elif negative_reduction == "max":
        per_pair = h.max(dim=1).values
    else:
        raise ValueError(f"unknown negative_reduction {negative_reduction!r}; valid choices: mean, sum, max")
    n_pos = positive_mask.sum(dim=1).clamp_min(1).to(sims.dtype)
    loss = torch.zeros(sims.shape[0], dtype=sims.dtype, device=sims.device).index_add(0, rows, per_pair) / n_pos
    with torch.no_grad():
        n_triples = neg_p.sum().clamp_min(1)
        active = ((hinge > 0) & neg_p).sum().to(sims.dtype) / n_triples
    return loss, has_negative, active
