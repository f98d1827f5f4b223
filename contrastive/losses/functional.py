"""Pure functional contrastive losses. Shapes follow :mod:`contrastive.losses.base`:
anchors ``(B, d)``, candidates ``(M, d)``, masks and weights ``(B, M)``.

All functions work on raw similarity logits so that they compose with any negative source.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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
