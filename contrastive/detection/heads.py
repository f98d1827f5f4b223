"""Classification heads of the detector, swappable by one YAML line (``head.name: linear | category_query``).

A head works in two steps. :meth:`ClassificationHead.prepare` looks at the encoded image once and returns a
:class:`CategoryContext`: the ``S`` categories scored for each image (its *slots*) and any image-level
loss. :meth:`ClassificationHead.logits` then scores object features against those slots, for every
decoder layer and for the encoder proposals.

- :class:`LinearClassHead`: one linear layer over all ``C`` categories, bias initialised to the prior
  probability ``pi`` (``b = -log((1 - pi) / pi)``, RetinaNet); trained with sigmoid focal loss.
- :class:`CategoryQueryHead`: CQ-DINO's category queries (Sun et al., NeurIPS 2025; methods.md A4):
  learnable category embeddings (optionally initialised from class-name text embeddings), category
  relations (bottom-up tree averaging when a hierarchy is given, one self-attention layer otherwise),
  image-guided selection by cross-attention only, a presence logit per category with its multi-label loss,
  top-K selection, and contrastive logits ``o . t / sqrt(d) + b`` with ``b`` initialised like the linear
  bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.detection.category_samplers import CategorySampler, CQTopKSampler, ancestor_matrix


def prior_bias(prior_prob: float) -> float:
    """The logit whose sigmoid is ``prior_prob`` (focal-loss initialisation, Lin et al. 2017)."""
    return -math.log((1 - prior_prob) / prior_prob)


@dataclass
class CategoryContext:
    """Per-image category slots.

    Attributes:
        categories: ``(B, S)`` long contiguous category index of each slot.
        tokens: ``(B, S, d)`` slot embeddings (category-query head) or ``None`` (linear head).
        loss: image-level loss of the head (presence loss) or ``None``.
        presence: ``(B, C)`` presence logits or ``None``.
    """

    categories: Tensor
    tokens: Optional[Tensor] = None
    loss: Optional[Tensor] = None
    presence: Optional[Tensor] = None

    def slots_of(self, b: int, labels: Tensor) -> Tensor:
        """``(n,)`` slot of each label in image ``b`` (``-1`` when the category is not among the slots)."""
        eq = self.categories[b][None, :] == labels[:, None]
        return torch.where(eq.any(1), eq.float().argmax(1), torch.full_like(labels, -1))


class ClassificationHead(nn.Module):
    """Interface: :meth:`prepare` once per image batch, :meth:`logits` per prediction stage."""

    num_classes: int

    def prepare(self, memory: Tensor, gt_labels: Optional[Sequence[Tensor]] = None) -> CategoryContext:
        """``memory (B, N, d)`` encoded image tokens; ``gt_labels`` per image in training, else ``None``."""
        raise NotImplementedError

    def logits(self, feats: Tensor, ctx: CategoryContext) -> Tensor:
        """``(B, Q, S)`` logits of ``feats (B, Q, d)`` against the slots of ``ctx``."""
        raise NotImplementedError


class LinearClassHead(ClassificationHead):
    """``logits = W o + b`` over all categories; ``b`` starts at the prior ``prior_prob``."""

    def __init__(self, num_classes: int, d_model: int, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.proj = nn.Linear(d_model, num_classes)
        nn.init.constant_(self.proj.bias, prior_bias(prior_prob))

    def prepare(self, memory: Tensor, gt_labels: Optional[Sequence[Tensor]] = None) -> CategoryContext:
        cats = torch.arange(self.num_classes, device=memory.device).expand(memory.shape[0], -1)
        return CategoryContext(categories=cats)

    def logits(self, feats: Tensor, ctx: CategoryContext) -> Tensor:
        return self.proj(feats)


def asymmetric_loss(logits: Tensor, targets: Tensor, gamma_pos: float = 0.0, gamma_neg: float = 0.0,
                    clip: float = 0.0, weight: Optional[Tensor] = None) -> Tensor:
    """Summed asymmetric loss (Ridnik et al. 2021) with focusing weights computed without gradient;
    ``gamma_pos = gamma_neg = clip = 0`` is summed BCE-with-logits. ``weight`` (same shape) masks entries."""
    p = logits.sigmoid()
    log_p = F.logsigmoid(logits)
    p_m = (p - clip).clamp_min(0) if clip > 0 else p
    log_1m = torch.log1p(-p_m.clamp_max(1 - 1e-6)) if clip > 0 else F.logsigmoid(-logits)
    loss = targets * log_p + (1 - targets) * log_1m
    if gamma_pos or gamma_neg:
        with torch.no_grad():
            w = torch.where(targets > 0, (1 - p).pow(gamma_pos), p_m.pow(gamma_neg))
        loss = loss * w
    if weight is not None:
        loss = loss * weight
    return -loss.sum()


def tree_levels(parents: Sequence[int]) -> list[Tensor]:
    """Category indices grouped by depth (roots first)."""
    depth = ancestor_matrix(parents).sum(1).tolist()
    return [torch.tensor([i for i, d in enumerate(depth) if d == lvl], dtype=torch.long)
            for lvl in range(max(depth) + 1)]


class TreeAggregation(nn.Module):
    """Bottom-up averaging of child embeddings into parents (CQ-DINO V3Det):
    ``E_a <- (1 - w_a) E_a + w_a mean_{c in children(a)} E_c`` with ``w_a = 0.4 + 0.4 log(n_a + 2) / log(C + 2)``,
    ``n_a`` the number of descendants of ``a``; deepest level first, then LayerNorm."""

    def __init__(self, parents: Sequence[int], dim: int) -> None:
        super().__init__()
        c = len(parents)
        self.register_buffer("parents", torch.tensor(list(parents), dtype=torch.long), persistent=False)
        desc = ancestor_matrix(parents).sum(0).float()  # descendants of each category
        self.register_buffer("omega", 0.4 + 0.4 * torch.log(desc + 2) / math.log(c + 2), persistent=False)
        self.levels = tree_levels(parents)
        self.norm = nn.LayerNorm(dim)

    def forward(self, emb: Tensor) -> Tensor:
        """``emb (C, e)`` -> ``(C, e)``."""
        return self.norm(self.aggregate(emb))

    def aggregate(self, emb: Tensor) -> Tensor:
        """The bottom-up averaging alone (no LayerNorm)."""
        for level in reversed(self.levels[1:]):
            par = self.parents[level]
            sums = torch.zeros_like(emb).index_add(0, par, emb[level])
            counts = torch.zeros(emb.shape[0], device=emb.device).index_add(0, par, torch.ones(len(level), device=emb.device))
            has = counts > 0
            mean = sums / counts.clamp_min(1)[:, None]
            w = (self.omega * has)[:, None]
            emb = (1 - w) * emb + w * mean
        return emb


class CrossAttentionBlock(nn.Module):
    """Cross-attention from queries to memory, then FFN (post-norm; no self-attention, as CQ-DINO's
    selection decoder)."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim_feedforward), nn.ReLU(), nn.Linear(dim_feedforward, dim))

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        x = self.norm1(x + self.attn(x, memory, memory, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


class CategoryQueryHead(ClassificationHead):
    """CQ-DINO category queries as a classification head.

    Args:
        num_classes: ``C``.
        d_model: width of the object features scored by :meth:`logits`.
        num_selected: ``K`` categories kept per image (capped at ``C``).
        embed_dim: width of the category embeddings ``e``.
        parents: parent index per category (``-1`` root) for tree aggregation; ``None`` -> self-attention.
        relation: ``"auto"`` (tree when ``parents`` is given, else self-attention), ``"tree"``,
            ``"self_attention"`` or ``"none"``.
        select_layers, nheads: the cross-attention-only selection decoder.
        presence_weight, asl_gamma_pos, asl_gamma_neg, asl_clip: presence loss (CQ-DINO COCO: BCE, 0.1).
        sampler: training category sampler (default :class:`CQTopKSampler`); inference uses top-K presence.
        init_embeddings: ``(C, e0)`` class-name text embeddings to start from (projected when ``e0 != e``).
        prior_prob: initial probability of the contrastive logits' bias and of the presence logits.
    """

    def __init__(self, num_classes: int, d_model: int, num_selected: int = 30, embed_dim: int = 128,
                 parents: Optional[Sequence[int]] = None, relation: str = "auto", select_layers: int = 1,
                 nheads: int = 4, presence_weight: float = 0.1, asl_gamma_pos: float = 0.0,
                 asl_gamma_neg: float = 0.0, asl_clip: float = 0.0, sampler: Optional[CategorySampler] = None,
                 init_embeddings: Optional[Tensor] = None, prior_prob: float = 0.01) -> None:
        super().__init__()
        if relation not in ("auto", "tree", "self_attention", "none"):
            raise ValueError(f"relation must be auto, tree, self_attention or none; got {relation!r}")
        if num_selected < 1 or embed_dim < 1:
            raise ValueError(f"num_selected and embed_dim must be >= 1; got {num_selected}, {embed_dim}")
        if relation == "tree" and parents is None:
            raise ValueError("relation='tree' needs a category hierarchy (parents)")
        self.num_classes, self.k, self.d_model = num_classes, min(num_selected, num_classes), d_model
        if init_embeddings is not None:
            if init_embeddings.shape[0] != num_classes:
                raise ValueError(f"init_embeddings has {init_embeddings.shape[0]} rows for {num_classes} categories")
            e0 = init_embeddings.float()
            if e0.shape[1] != embed_dim:  # fixed random projection to the head's width
                g = torch.Generator().manual_seed(0)
                e0 = e0 @ torch.randn(e0.shape[1], embed_dim, generator=g) / math.sqrt(e0.shape[1])
            e0 = e0 / e0.norm(dim=1, keepdim=True).clamp_min(1e-6)
            self.embeddings = nn.Parameter(e0.clone())
        else:
            self.embeddings = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.02)
        self.pre = nn.Linear(embed_dim, embed_dim)
        self.relation_kind = ("tree" if parents is not None else "self_attention") if relation == "auto" else relation
        if self.relation_kind == "tree":
            self.tree: Optional[TreeAggregation] = TreeAggregation(parents, embed_dim)  # type: ignore[arg-type]
        else:
            self.tree = None
        if self.relation_kind == "self_attention":
            self.self_attn: Optional[nn.MultiheadAttention] = nn.MultiheadAttention(embed_dim, nheads, batch_first=True)
            self.sa_norm = nn.LayerNorm(embed_dim)
        else:
            self.self_attn = None
        self.parents = list(parents) if parents is not None else None
        self.image_proj = nn.Linear(d_model, embed_dim)
        self.select = nn.ModuleList(CrossAttentionBlock(embed_dim, nheads, 4 * embed_dim) for _ in range(select_layers))
        self.presence_fc = nn.Linear(embed_dim, 1)
        nn.init.constant_(self.presence_fc.bias, prior_bias(prior_prob))
        self.token_proj = nn.Linear(embed_dim, d_model)
        self.bias = nn.Parameter(torch.tensor(prior_bias(prior_prob)))
        self.presence_weight = presence_weight
        self.asl = (asl_gamma_pos, asl_gamma_neg, asl_clip)
        self.sampler = sampler or CQTopKSampler()
        if self.parents is not None:
            self.register_buffer("ancestors", ancestor_matrix(self.parents), persistent=False)
        else:
            self.ancestors = None

    def get_extra_state(self) -> dict:
        """The training category sampler's state (in the ``state_dict``, so checkpoints resume it)."""
        return {"sampler": self.sampler.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state.get("sampler") or {})

    def category_queries(self) -> Tensor:
        """``(C, e)`` category queries after pre-processing and the relation module."""
        e = F.relu(self.pre(self.embeddings))
        if self.tree is not None:
            e = self.tree(e)
        elif self.self_attn is not None:
            x = e[None]
            e = self.sa_norm(x + self.self_attn(x, x, x, need_weights=False)[0])[0]
        return e

    def presence_loss(self, presence: Tensor, gt_labels: Sequence[Tensor]) -> Tensor:
        """Multi-label loss of the presence logits against the image's categories; with a hierarchy the
        unlabelled ancestors of a labelled category are masked (CQ-DINO V3Det)."""
        target = torch.zeros_like(presence)
        for b, g in enumerate(gt_labels):
            target[b, g] = 1.0
        weight = None
        if self.ancestors is not None:
            masked = (target @ self.ancestors.float()) > 0  # ancestors of some positive
            weight = (~(masked & (target == 0))).float()
        gp, gn, clip = self.asl
        return asymmetric_loss(presence, target, gp, gn, clip, weight) / presence.shape[0]

    def prepare(self, memory: Tensor, gt_labels: Optional[Sequence[Tensor]] = None) -> CategoryContext:
        b = memory.shape[0]
        queries = self.category_queries()
        x = self.image_proj(memory)
        x = torch.cat([x.mean(1, keepdim=True), x], dim=1)  # global token first
        g = queries[None].expand(b, -1, -1)
        for block in self.select:
            g = block(g, x)
        presence = self.presence_fc(g).squeeze(-1)  # (B, C)
        if gt_labels is not None and self.training:
            cats = self.sampler.select(presence.detach(), [t.unique() for t in gt_labels], self.k,
                                       embeddings=self.embeddings.detach())
            loss = self.presence_weight * self.presence_loss(presence, gt_labels)
        else:
            cats = presence.topk(self.k, dim=1).indices
            loss = None
        tokens = self.token_proj(torch.gather(g, 1, cats[..., None].expand(-1, -1, g.shape[-1])))
        return CategoryContext(categories=cats, tokens=tokens, loss=loss, presence=presence)

    def logits(self, feats: Tensor, ctx: CategoryContext) -> Tensor:
        assert ctx.tokens is not None
        return feats @ ctx.tokens.transpose(1, 2) / math.sqrt(self.d_model) + self.bias


CLASSIFICATION_HEADS: dict[str, type] = {"linear": LinearClassHead, "category_query": CategoryQueryHead}
