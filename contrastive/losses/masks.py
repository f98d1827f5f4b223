"""Build the ``(B, M)`` masks of :class:`~contrastive.losses.base.ContrastiveInputs` from labels or ids.

- :func:`positive_mask_from_labels`: every candidate sharing the anchor's label is a positive (SupCon,
  Khosla et al. 2020, arXiv 2004.11362), optionally together with the paired candidate ``i``.
- :func:`false_negative_mask_from_ids`: a candidate carrying the id of one of the anchor's positives (a
  duplicate document, the same image under another caption) but not marked positive is a known false
  negative, to be removed from the denominator.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from contrastive.losses.base import LossInputError


def _check_1d(name: str, t: Tensor) -> None:
    if t.dim() != 1:
        raise LossInputError(f"{name} must be 1-D; got shape {tuple(t.shape)}")


def positive_mask_from_labels(
    anchor_labels: Tensor,
    candidate_labels: Tensor,
    *,
    include_diagonal: bool = False,
    exclude: Optional[Tensor] = None,
    ignore_label: Optional[int] = None,
) -> Tensor:
    """``(B, M)`` bool: candidate ``j`` is a positive of anchor ``i`` when their labels are equal.

    Args:
        anchor_labels: ``(B,)`` labels (any dtype that supports ``==``).
        candidate_labels: ``(M,)`` labels.
        include_diagonal: also mark the paired candidate ``i`` of anchor ``i`` (``M >= B``), so an anchor
            whose label is unknown still has its own positive.
        exclude: ``(B, M)`` bool, entries that are never positives. When the anchors are themselves among
            the candidates (SimCLR / SupCon view layout), pass the self-pairs here and put them in
            ``false_negative_mask`` too, so they leave the denominator as well.
        ignore_label: a label (e.g. ``-1`` = unlabelled) that matches nothing.

    Returns:
        ``(B, M)`` bool positive mask.
    """
    _check_1d("anchor_labels", anchor_labels)
    _check_1d("candidate_labels", candidate_labels)
    b, m = anchor_labels.shape[0], candidate_labels.shape[0]
    mask = anchor_labels[:, None] == candidate_labels[None, :]
    if ignore_label is not None:
        mask &= (anchor_labels != ignore_label)[:, None] & (candidate_labels != ignore_label)[None, :]
    if include_diagonal:
        if m < b:
            raise LossInputError(f"include_diagonal needs M >= B; got {m} candidates for {b} anchors")
        mask[:, :b] |= torch.eye(b, dtype=torch.bool, device=mask.device)
    if exclude is not None:
        if tuple(exclude.shape) != (b, m) or exclude.dtype != torch.bool:
            raise LossInputError(
                f"exclude must be a bool tensor of shape {(b, m)}; got {exclude.dtype} {tuple(exclude.shape)}")
        mask &= ~exclude
    return mask


def false_negative_mask_from_ids(
    anchor_ids: Tensor,
    candidate_ids: Tensor,
    positive_mask: Optional[Tensor] = None,
    *,
    pad_id: Optional[int] = -1,
) -> Tensor:
    """``(B, M)`` bool: candidate ``j`` is a known false negative of anchor ``i`` when its id equals one of
    the ids of anchor ``i``'s positives and it is not itself marked positive.

    Example: in code search the anchor's id is the id of its gold function; a batch that holds the same
    function twice (or a mined negative that is the gold function) gets the duplicate masked out of the
    denominator instead of being pushed away.

    Args:
        anchor_ids: ``(B,)`` integer id of each anchor's positive, or ``(B, P)`` several ids per anchor,
            padded with ``pad_id``.
        candidate_ids: ``(M,)`` integer id of each candidate.
        positive_mask: ``(B, M)`` bool; its entries are left out of the result. Positives are never masked
            by the losses anyway, so ``None`` is safe.
        pad_id: an id that matches nothing (padding or "unknown"); ``None`` to disable.

    Returns:
        ``(B, M)`` bool false-negative mask.
    """
    if anchor_ids.dim() == 1:
        anchor_ids = anchor_ids[:, None]
    if anchor_ids.dim() != 2:
        raise LossInputError(f"anchor_ids must be (B,) or (B, P); got shape {tuple(anchor_ids.shape)}")
    _check_1d("candidate_ids", candidate_ids)
    match = anchor_ids[:, :, None] == candidate_ids[None, None, :]  # (B, P, M)
    if pad_id is not None:
        match &= (anchor_ids != pad_id)[:, :, None]
    mask = match.any(dim=1)
    if positive_mask is not None:
        if tuple(positive_mask.shape) != tuple(mask.shape):
            raise LossInputError(f"positive_mask must have shape {tuple(mask.shape)}; got {tuple(positive_mask.shape)}")
        mask &= ~positive_mask
    return mask
