"""A small DETR-style detector with the convergence aids that let it train on a few CPU cores.

- Backbone: a ``timm`` model with ``features_only`` (randomly initialised; nothing is downloaded), one
  feature level projected to ``d_model`` with 2-D sine positions (DETR, Carion et al. 2020).
- Transformer encoder over the feature tokens.
- Two-stage query selection (Deformable DETR, Zhu et al. 2021): every encoder token predicts a class score
  through the classification head and a box relative to its grid anchor; the ``num_queries`` best tokens
  give the initial reference boxes, while the content queries are learned (DINO's mixed query selection).
- Decoder with anchor-box queries (DAB-DETR): each layer's query position is an MLP of the sine embedding of
  its current reference box, and each layer refines the box in logit space (iterative refinement, the
  reference detached between layers).
- Optional denoising queries (DN-DETR, Li et al. 2022; :mod:`contrastive.detection.denoising`) in training.

The classification head (:mod:`contrastive.detection.heads`) is injected; it sees the encoder memory once
(:meth:`ClassificationHead.prepare`) and scores the encoder proposals and every decoder layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import timm
import torch
from torch import Tensor, nn

from contrastive.detection.criterion import StageOutput
from contrastive.detection.denoising import DenoisingBatch, DenoisingQueries
from contrastive.detection.heads import CategoryContext, ClassificationHead


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def sine_embed(coords: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """``(..., m)`` coordinates in ``[0, 1]`` -> ``(..., m * num_feats)`` interleaved sin/cos features."""
    dim_t = torch.arange(num_feats // 2, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * dim_t / num_feats)
    x = coords[..., None] * 2 * math.pi / dim_t
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2)


class MLP(nn.Sequential):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class EncoderLayer(nn.Module):
    """Post-norm self-attention (positions added to queries and keys) + FFN."""

    def __init__(self, d: int, nheads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.ffn = MLP(d, ff, d, 2)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.attn(q, q, x, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN (post-norm)."""

    def __init__(self, d: int, nheads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.ffn = MLP(d, ff, d, 2)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        """``attn_mask`` ``(L, L)`` bool, ``True`` = query ``i`` may not attend to query ``j``."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, memory + memory_pos, memory, need_weights=False)[0])
        return self.norm3(tgt + self.ffn(tgt))


@dataclass
class DetectorOutput:
    """``stages``: encoder proposals first, then each decoder layer (the last is the prediction);
    ``context``: the head's category slots; in training with denoising queries, ``denoising`` holds their
    inputs and ``denoising_stages`` their prediction at each decoder layer."""

    stages: list[StageOutput]
    context: CategoryContext
    denoising: Optional[DenoisingBatch] = None
    denoising_stages: list[StageOutput] = field(default_factory=list)

    @property
    def final(self) -> StageOutput:
        return self.stages[-1]


class DetrDetector(nn.Module):
    """DETR-style detector; see the module docstring.

    Args:
        head: the classification head (``d_model`` wide inputs).
        backbone: a ``timm`` model name (random init; e.g. ``resnet18``, ``resnet10t``).
        feature_level: which ``features_only`` level feeds the transformer (2 = stride 8 for ResNets).
        d_model, nheads, dim_feedforward, dropout: transformer sizes.
        enc_layers, dec_layers: transformer depth.
        num_queries: object queries (capped at the number of feature tokens).
        anchor_size: initial width/height (fraction of the image) of the encoder tokens' anchor boxes.
        denoising: denoising queries added in training (:mod:`contrastive.detection.denoising`), or ``None``.
    """

    def __init__(self, head: ClassificationHead, backbone: str = "resnet18", feature_level: int = 2,
                 d_model: int = 128, nheads: int = 4, dim_feedforward: int = 512, dropout: float = 0.0,
                 enc_layers: int = 2, dec_layers: int = 3, num_queries: int = 30, anchor_size: float = 0.3,
                 denoising: Optional[DenoisingQueries] = None) -> None:
        super().__init__()
        self.head = head
        self.denoising = denoising
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(feature_level,))
        channels = self.backbone.feature_info.channels()[-1]
        self.input_proj = nn.Sequential(nn.Conv2d(channels, d_model, 1), nn.GroupNorm(32 if d_model % 32 == 0 else 1, d_model))
        self.encoder = nn.ModuleList(EncoderLayer(d_model, nheads, dim_feedforward, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, nheads, dim_feedforward, dropout) for _ in range(dec_layers))
        self.enc_output = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
        self.enc_box = MLP(d_model, d_model, 4, 3)
        self.query_content = nn.Embedding(num_queries, d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.dec_norm = nn.LayerNorm(d_model)
        self.box_heads = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(dec_layers))
        for mlp in [self.enc_box, *self.box_heads]:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
        self.d_model, self.num_queries, self.anchor_size = d_model, num_queries, anchor_size

    def positions(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(h*w, d)`` sine positions and ``(h*w, 4)`` anchor boxes (cxcywh) of the feature grid."""
        ys, xs = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
                                indexing="ij")
        centres = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
        pos = sine_embed(centres, self.d_model // 2)
        anchors = torch.cat([centres, torch.full_like(centres, self.anchor_size)], dim=-1)
        return pos, anchors

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``images (B, 3, H, W)`` -> memory ``(B, N, d)``, positions ``(N, d)``, anchors ``(N, 4)``."""
        f = self.input_proj(self.backbone(images)[-1])
        b, d, h, w = f.shape
        pos, anchors = self.positions(h, w, f.device)
        x = f.flatten(2).transpose(1, 2)
        for layer in self.encoder:
            x = layer(x, pos[None])
        return x, pos, anchors

    def forward(self, images: Tensor, gt_labels: Optional[Sequence[Tensor]] = None,
                gt_boxes: Optional[Sequence[Tensor]] = None) -> DetectorOutput:
        """``gt_labels``/``gt_boxes`` (training): the head's category selection and the denoising queries."""
        memory, pos, anchors = self.encode(images)
        ctx = self.head.prepare(memory, gt_labels)
        # two-stage proposals: a class score and a box per encoder token
        enc = self.enc_output(memory)
        enc_logits = self.head.logits(enc, ctx)
        enc_boxes = (self.enc_box(enc) + inverse_sigmoid(anchors)[None]).sigmoid()
        stages = [StageOutput(enc_logits, enc_boxes)]
        q = min(self.num_queries, memory.shape[1])
        top = enc_logits.max(-1).values.topk(q, dim=1).indices
        ref = torch.gather(enc_boxes, 1, top[..., None].expand(-1, -1, 4)).detach()
        tgt = self.query_content.weight[:q][None].expand(memory.shape[0], -1, -1)
        dn, mask = None, None
        if self.denoising is not None and self.training and gt_labels is not None and gt_boxes is not None:
            dn = self.denoising(gt_labels, gt_boxes)
            if dn.target.shape[1] == 0:  # no ground truth in the batch
                dn = None
            else:  # denoising queries first; the mask isolates them from the matching queries and each other
                tgt, ref, mask = torch.cat([dn.content, tgt], 1), torch.cat([dn.boxes, ref], 1), dn.attention_mask(q)
        n_dn = 0 if dn is None else dn.target.shape[1]
        dn_stages: list[StageOutput] = []
        for layer, box_head in zip(self.decoder, self.box_heads):
            query_pos = self.ref_point_head(sine_embed(ref, self.d_model // 2))
            tgt = layer(tgt, query_pos, memory, pos[None], attn_mask=mask)
            h = self.dec_norm(tgt)
            boxes = (box_head(h) + inverse_sigmoid(ref)).sigmoid()
            logits = self.head.logits(h, ctx)
            stages.append(StageOutput(logits[:, n_dn:], boxes[:, n_dn:]))
            if dn is not None:
                dn_stages.append(StageOutput(logits[:, :n_dn], boxes[:, :n_dn]))
            ref = boxes.detach()
        return DetectorOutput(stages, ctx, dn, dn_stages)
