"""The DETR set loss: Hungarian matching, then sigmoid focal classification over slots plus L1 and GIoU box
losses, summed over every prediction stage (decoder layers and encoder proposals; deep supervision).

Each term is normalised by the number of target boxes in the batch (DETR). Classification targets are
one-hot over the slots at the matched target's slot; a target whose category has no slot leaves its row
all zeros (CQ-DINO's released behaviour). ``negative_mask`` (``(B, S)`` bool, ``True`` = not a negative,
e.g. from :class:`contrastive.detection.category_samplers.CategoryHierarchyFilter`) zeroes the loss of
those slots wherever they are not the matched target's own slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from contrastive.detection.matcher import HungarianMatcher

if TYPE_CHECKING:
    from contrastive.detection.denoising import DenoisingBatch


@dataclass
class StageOutput:
    """One prediction stage: ``logits (B, Q, S)`` and ``boxes (B, Q, 4)`` normalised cxcywh."""

    logits: Tensor
    boxes: Tensor


def box_losses(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Summed L1 (on cxcywh) and GIoU loss ``1 - GIoU`` of matched pairs ``(n, 4)`` normalised cxcywh."""
    l1 = (pred - target).abs().sum()
    giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"),
                                    reduction="sum")
    return l1, giou


class DetectionSetLoss(nn.Module):
    """Matching + focal/L1/GIoU over all stages.

    Args:
        matcher: the :class:`HungarianMatcher` (its weights are the matching costs).
        weight_class, weight_bbox, weight_giou: loss weights (DINO: 1, 5, 2).
        focal_alpha, focal_gamma: ``torchvision.ops.sigmoid_focal_loss`` parameters.
    """

    def __init__(self, matcher: HungarianMatcher, weight_class: float = 1.0, weight_bbox: float = 5.0,
                 weight_giou: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.matcher = matcher
        self.weight_class, self.weight_bbox, self.weight_giou = weight_class, weight_bbox, weight_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def stage_loss(self, out: StageOutput, tgt_boxes: list[Tensor], tgt_slots: list[Tensor], num_boxes: float,
                   negative_mask: Optional[Tensor]) -> dict[str, Tensor]:
        match = self.matcher(out.logits, out.boxes, tgt_boxes, tgt_slots)
        b_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(match)])
        q_idx = torch.cat([q for q, _ in match])
        t_idx = torch.cat([t for _, t in match])
        return self.assigned_loss(out, b_idx, q_idx, t_idx, tgt_boxes, tgt_slots, num_boxes, negative_mask)

    def assigned_loss(self, out: StageOutput, b_idx: Tensor, q_idx: Tensor, t_idx: Tensor, tgt_boxes: list[Tensor],
                      tgt_slots: list[Tensor], num_boxes: float, negative_mask: Optional[Tensor]) -> dict[str, Tensor]:
        """Focal, L1 and GIoU terms when query ``q_idx[i]`` of image ``b_idx[i]`` predicts that image's target
        ``t_idx[i]`` (every other query: background)."""
        sizes = torch.tensor([0] + [t.shape[0] for t in tgt_slots], device=b_idx.device)
        flat = sizes.cumsum(0)[b_idx] + t_idx  # row of each assigned target in the concatenated targets
        slots = torch.cat(tgt_slots)[flat]
        target = torch.zeros_like(out.logits)
        has = slots >= 0
        target[b_idx[has], q_idx[has], slots[has]] = 1.0
        focal = sigmoid_focal_loss(out.logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        if negative_mask is not None:
            focal = focal * ~(negative_mask[:, None, :] & (target == 0))
        src = out.boxes[b_idx, q_idx]
        dst = torch.cat(tgt_boxes)[flat]
        l1, giou = box_losses(src, dst)
        return {"class": focal.sum() / num_boxes, "bbox": l1 / num_boxes, "giou": giou / num_boxes}

    def forward(self, stages: list[StageOutput], tgt_boxes: list[Tensor], tgt_slots: list[Tensor],
                negative_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Total ``loss`` and the per-term sums over stages (``class``, ``bbox``, ``giou``); the last
        stage's terms also as ``final_*``."""
        num_boxes = max(float(sum(t.shape[0] for t in tgt_boxes)), 1.0)
        return self._over_stages(stages, lambda s: self.stage_loss(s, tgt_boxes, tgt_slots, num_boxes, negative_mask))

    def denoising_loss(self, stages: list[StageOutput], dn: DenoisingBatch, tgt_boxes: list[Tensor],
                       tgt_slots: list[Tensor], negative_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The reconstruction loss of denoising queries (DN-DETR): each valid query of ``dn`` predicts the
        target it was made from, at every decoder layer in ``stages``; normalised by the number of target
        boxes times the number of groups. Keys as :meth:`forward`."""
        b_idx, q_idx = dn.valid.nonzero(as_tuple=True)
        t_idx = dn.target[b_idx, q_idx]
        num = max(float(sum(t.shape[0] for t in tgt_boxes)) * dn.groups, 1.0)
        return self._over_stages(stages, lambda s: self.assigned_loss(s, b_idx, q_idx, t_idx, tgt_boxes, tgt_slots,
                                                                      num, negative_mask))

    def _over_stages(self, stages: list[StageOutput], loss_of: Callable[[StageOutput], dict[str, Tensor]]) -> dict[str, Tensor]:
        terms: dict[str, Any] = {"class": 0.0, "bbox": 0.0, "giou": 0.0}
        final: dict[str, Tensor] = {}
        for stage in stages:
            final = loss_of(stage)
            for k in terms:
                terms[k] = terms[k] + final[k]
        total = self.weight_class * terms["class"] + self.weight_bbox * terms["bbox"] + self.weight_giou * terms["giou"]
        return {"loss": total, **terms, **{f"final_{k}": v.detach() for k, v in final.items()}}
