"""Denoising queries (DN-DETR, Li et al. CVPR 2022), an optional convergence aid of the detector.

In training, ``groups`` noised copies of the ground-truth boxes and labels are fed to the decoder as extra
queries beside the matching queries. Each denoising query's reference box is a ground-truth box with its
centre moved by up to ``box_noise * (w/2, h/2)`` and its width and height scaled by a factor in
``[1 - box_noise, 1 + box_noise]``; its content is the embedding of the ground-truth label, replaced by a
uniformly drawn category with probability ``label_noise``. Each is assigned to the ground truth it was made
from (no Hungarian matching), and the decoder layers reconstruct box and class (the set loss's focal, L1 and
GIoU terms, :meth:`contrastive.detection.criterion.DetectionSetLoss.denoising_loss`).

The self-attention mask (:func:`denoising_attention_mask`) keeps the matching queries from seeing any
denoising query (they would read the answer) and each group from seeing the other groups. It also keeps the
denoising queries from seeing the matching queries, which the paper allows ("it does not matter") but which
would let the reconstruction loss train the matching queries; isolated, the matching path is exactly that of
a detector without denoising queries, and the denoising loss gives it no gradient.

Layout: ``(B, G * M, .)`` with ``M`` the most ground-truth boxes of an image in the batch; query
``g * M + j`` of image ``b`` is group ``g``'s copy of ground truth ``j`` (``valid[b, g * M + j]`` is False
for ``j >= n_b``, padding that no loss sees).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


def denoising_attention_mask(group_size: int, groups: int, num_matching: int, device: torch.device | None = None) -> Tensor:
    """``(L, L)`` bool self-attention mask (``True`` = may not attend), ``L = groups * group_size +
    num_matching``, denoising queries first: each query sees only its own group (denoising) or the
    matching queries (matching)."""
    n_dn = groups * group_size
    size = n_dn + num_matching
    block = torch.arange(size, device=device)
    group = torch.where(block < n_dn, block // max(group_size, 1), groups)  # the matching queries: group ``groups``
    return group[:, None] != group[None, :]


@dataclass
class DenoisingBatch:
    """Denoising queries of one batch.

    Attributes:
        content: ``(B, G * M, d)`` label embeddings (noised labels).
        boxes: ``(B, G * M, 4)`` noised ground-truth boxes, normalised cxcywh (the reference boxes).
        target: ``(B, G * M)`` long index of the ground truth each query reconstructs (``-1`` padding).
        group_size: ``M``; ``groups``: ``G``.
    """

    content: Tensor
    boxes: Tensor
    target: Tensor
    group_size: int
    groups: int

    @property
    def valid(self) -> Tensor:
        return self.target >= 0

    def attention_mask(self, num_matching: int) -> Tensor:
        return denoising_attention_mask(self.group_size, self.groups, num_matching, self.content.device)


def noise_boxes(boxes: Tensor, box_noise: float, generator: torch.Generator | None = None) -> Tensor:
    """``(n, 4)`` cxcywh boxes with DN-DETR's centre shift (``|dx| <= box_noise * w / 2``) and scaling
    (``w' in [(1 - box_noise) w, (1 + box_noise) w]``), clipped to the image."""
    if box_noise <= 0:
        return boxes.clone()
    u = torch.rand(boxes.shape, generator=generator, device=boxes.device) * 2 - 1
    wh = boxes[:, 2:]
    diff = torch.cat([wh / 2, wh], dim=1) * box_noise
    noised = box_convert(boxes + u * diff, "cxcywh", "xyxy").clamp(0.0, 1.0)
    return box_convert(noised, "xyxy", "cxcywh").clamp_min(1e-4)


class DenoisingQueries(nn.Module):
    """Builds the :class:`DenoisingBatch` of a training batch (module docstring).

    Args:
        num_classes: ``C`` (the label embedding's size).
        d_model: query width.
        groups: ``G`` noised copies of the ground truth.
        box_noise: DN-DETR's ``lambda_1 = lambda_2`` (fraction of the box size).
        label_noise: probability of replacing a label by a uniformly drawn category.
    """

    def __init__(self, num_classes: int, d_model: int, groups: int = 5, box_noise: float = 0.4,
                 label_noise: float = 0.2) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"denoising.groups must be >= 1; got {groups}")
        if not 0.0 <= box_noise <= 1.0 or not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"denoising.box_noise and label_noise must be in [0, 1]; got {box_noise}, {label_noise}")
        self.num_classes, self.groups, self.box_noise, self.label_noise = num_classes, groups, box_noise, label_noise
        self.label_embed = nn.Embedding(num_classes, d_model)

    def forward(self, labels: Sequence[Tensor], boxes: Sequence[Tensor]) -> DenoisingBatch:
        """``labels[b] (n_b,)`` long and ``boxes[b] (n_b, 4)`` cxcywh of each image."""
        b, g = len(labels), self.groups
        m = max((int(lab.numel()) for lab in labels), default=0)
        device = self.label_embed.weight.device
        target = torch.full((b, g, m), -1, dtype=torch.long, device=device)
        lab = torch.zeros((b, g, m), dtype=torch.long, device=device)
        ref = torch.full((b, g, m, 4), 0.5, device=device)
        for i, (li, bi) in enumerate(zip(labels, boxes)):
            n = int(li.numel())
            if n == 0:
                continue
            target[i, :, :n] = torch.arange(n, device=device)
            noisy = li.to(device).repeat(g, 1)
            flip = torch.rand(noisy.shape, device=device) < self.label_noise
            noisy = torch.where(flip, torch.randint_like(noisy, self.num_classes), noisy)
            lab[i, :, :n] = noisy
            ref[i, :, :n] = noise_boxes(bi.to(device).float().repeat(g, 1), self.box_noise).view(g, n, 4)
        return DenoisingBatch(content=self.label_embed(lab.view(b, g * m)), boxes=ref.view(b, g * m, 4).detach(),
                              target=target.view(b, g * m), group_size=m, groups=g)
