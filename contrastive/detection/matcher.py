"""Hungarian matching between predicted and ground-truth boxes (DETR, Carion et al. 2020; focal class cost
of Deformable DETR, Zhu et al. 2021).

Classification is over per-image *slots*: all categories for a linear head, the selected categories for a
category-query head. A target whose category has no slot (``slot == -1``) is matched on its box alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou


def focal_costs(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise focal matching cost of calling each logit positive (same shape as ``logits``)."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos - neg


def focal_class_cost(logits: Tensor, slots: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """``(Q, n)`` focal matching cost of giving target ``j`` (slot ``slots[j]``) to query ``i``.

    Args:
        logits: ``(Q, S)`` class logits of one image.
        slots: ``(n,)`` long slot of each target, ``-1`` = the category has no slot (cost 0).
    """
    cost = focal_costs(logits, alpha, gamma)
    has = slots >= 0
    out = torch.zeros(logits.shape[0], slots.numel(), dtype=logits.dtype, device=logits.device)
    out[:, has] = cost[:, slots[has]]
    return out


@dataclass
class HungarianMatcher:
    """One-to-one assignment minimising ``w_class * focal + w_bbox * L1(cxcywh) - w_giou * GIoU``.

    Returns, per image, ``(query_indices, target_indices)`` long tensors of equal length ``min(Q, n)``,
    on the device of the logits.
    """

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_boxes: Tensor, tgt_slots: Tensor) -> Tensor:
        """``(Q, n)`` cost for one image: ``logits (Q, S)``, ``boxes (Q, 4)`` and ``tgt_boxes (n, 4)`` in
        normalised cxcywh, ``tgt_slots (n,)``."""
        c = self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        c = c - self.cost_giou * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                     box_convert(tgt_boxes, "cxcywh", "xyxy"))
        return c + self.cost_class * focal_class_cost(logits, tgt_slots, self.focal_alpha, self.focal_gamma)

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, tgt_boxes: list[Tensor], tgt_slots: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``logits (B, Q, S)``, ``boxes (B, Q, 4)``; per image ``tgt_boxes[b] (n_b, 4)``, ``tgt_slots[b] (n_b,)``.

        The costs of all images are computed in one batch (``(B, Q, sum n_b)``, DETR's layout); each
        image's block is then assigned with ``scipy.optimize.linear_sum_assignment``.
        """
        b, q, _ = logits.shape
        sizes = [t.shape[0] for t in tgt_boxes]
        # indices on the logits' device: the loss indexes both device tensors and other indices with them
        empty = torch.empty(0, dtype=torch.long, device=logits.device)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(b)]
        tb, ts = torch.cat(tgt_boxes).float(), torch.cat(tgt_slots)
        img = torch.repeat_interleave(torch.arange(b, device=ts.device), torch.tensor(sizes, device=ts.device))
        pb = boxes.float().flatten(0, 1)
        c = self.cost_bbox * torch.cdist(pb, tb, p=1)
        c = c - self.cost_giou * generalized_box_iou(box_convert(pb, "cxcywh", "xyxy"), box_convert(tb, "cxcywh", "xyxy"))
        c = c.view(b, q, -1)
        # class cost of target j only matters against the queries of its own image
        own = logits.float()[img]  # (T, Q, S)
        idx = ts.clamp_min(0)[:, None, None].expand(-1, q, 1)
        cls = focal_costs(own, self.focal_alpha, self.focal_gamma).gather(2, idx).squeeze(2) * (ts >= 0)[:, None]
        c = c.cpu()
        cls = cls.t().cpu()
        out, start = [], 0
        for i, n in enumerate(sizes):
            if n == 0:
                out.append((empty, empty))
                continue
            block = c[i, :, start:start + n] + self.cost_class * cls[:, start:start + n]
            rows, cols = linear_sum_assignment(block.numpy())
            out.append((torch.as_tensor(rows, dtype=torch.long, device=logits.device),
                        torch.as_tensor(cols, dtype=torch.long, device=logits.device)))
            start += n
        return out
