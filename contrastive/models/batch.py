"""The batch contract of :class:`~contrastive.models.contrastive.ContrastiveModule`, for every setting.

A training or evaluation batch is a set of **anchors** (queries, captions, region crops, ...) and a set of
**candidates** (documents, images, ...), each given as the inputs of its tower (a ``dict`` of tensors whose
first dimension is the item count), plus integer keys that say who is whose positive:

- ``labels``: candidate ``j`` is a positive of anchor ``i`` iff ``anchor_labels[i] == candidate_labels[j]``.
  Several candidates may share an anchor's label (5 captions per image: anchors are captions labelled with
  their image, candidates are images labelled with themselves). Labels are compared after the candidates
  are gathered across ranks, so they are global.
- ``groups``: known duplicates. A candidate of the anchor's group that is not a positive is a known false
  negative (masked from the denominator when the module's ``mask_known_duplicates`` is on).
- ``ids``: stable item ids (training rows, corpus ids); they order evaluation outputs and name items in
  reports. Anchor labels and groups must be ``>= 0``; ``-1`` on a candidate means "none".

Extra negatives (mined, random, generated) come as :class:`ExtraNegatives`: more candidates with their own
inputs, ids, labels, groups and optional per-negative weights, difficulty and owner anchor.

Tower contract: a tower is any ``nn.Module`` whose ``forward(inputs: dict[str, Tensor]) -> (N, d)``;
text towers read ``{"ids": (N, L) long, "mask": (N, L) bool}``, image towers ``{"pixels": (N, 3, H, W)}``,
vector towers ``{"x": (N, d_in)}``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch
from torch import Tensor

#: one side's tower inputs: tensors whose first dimension is the item count
Inputs = Mapping[str, Tensor]


def num_items(inputs: Inputs) -> int:
    """The item count ``N`` of tower inputs (their common first dimension)."""
    sizes = {int(t.shape[0]) for t in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"tower inputs must share their first dimension; got {({k: tuple(v.shape) for k, v in inputs.items()})}")
    return sizes.pop()


def _check(name: str, t: Optional[Tensor], n: int, floating: bool = False) -> None:
    if t is None:
        return
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},); got {tuple(t.shape)}")
    if t.is_floating_point() != floating:
        raise ValueError(f"{name} must be a {'float' if floating else 'integer'} tensor; got {t.dtype}")


@dataclass
class ExtraNegatives:
    """``K`` extra candidates appended after the in-batch candidates (``K`` may be 0).

    Attributes:
        inputs: tower inputs of the candidate tower, each tensor ``(K, ...)``; corpus rows or **generated**
            items (a perturbed caption, a re-rendered image) alike.
        ids: ``(K,)`` long item ids (``-1`` for generated items).
        labels: ``(K,)`` long; a negative whose label equals an anchor's label is that anchor's positive
            (the same item as its target); ``-1`` = never a positive.
        groups: ``(K,)`` long duplicate groups (``None``: the labels).
        weights: ``(K,)`` float, optional per-negative weight (the column of ``ContrastiveInputs.weights``).
        difficulty: ``(K,)`` float, optional per-negative difficulty (e.g. the sampler's score); it fills
            these columns of the difficulty matrix when the module computes one.
        owner: ``(K,)`` long, optional: ``-1`` = a negative for every anchor; ``i >= 0`` = only for local
            anchor ``i`` (masked for the others), e.g. a caption generated from anchor ``i``'s own.
    """

    inputs: Inputs
    ids: Tensor
    labels: Tensor
    groups: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    difficulty: Optional[Tensor] = None
    owner: Optional[Tensor] = None

    def __post_init__(self) -> None:
        k = num_items(self.inputs)
        for name in ("ids", "labels", "groups", "owner"):
            _check(f"ExtraNegatives.{name}", getattr(self, name), k)
        for name in ("weights", "difficulty"):
            _check(f"ExtraNegatives.{name}", getattr(self, name), k, floating=True)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def resolved_groups(self) -> Tensor:
        return self.labels if self.groups is None else self.groups


@dataclass
class ContrastiveBatch:
    """``B`` anchors and ``C`` candidates (``C = B`` for paired data such as code search).

    Attributes:
        anchors: anchor-tower inputs, each tensor ``(B, ...)``.
        candidates: candidate-tower inputs, each tensor ``(C, ...)``.
        anchor_ids: ``(B,)`` long item ids.
        candidate_ids: ``(C,)`` long item ids.
        anchor_labels: ``(B,)`` long (``None``: the anchor ids).
        candidate_labels: ``(C,)`` long (``None``: the candidate ids); positives share the anchor's label.
        anchor_groups: ``(B,)`` long duplicate groups (``None``: the labels).
        candidate_groups: ``(C,)`` long duplicate groups (``None``: the labels).
        negatives: optional :class:`ExtraNegatives`.
        paired: candidate ``i`` is anchor ``i``'s positive and ``B == C`` (needed by symmetric losses).
    """

    anchors: Inputs
    candidates: Inputs
    anchor_ids: Tensor
    candidate_ids: Tensor
    anchor_labels: Optional[Tensor] = None
    candidate_labels: Optional[Tensor] = None
    anchor_groups: Optional[Tensor] = None
    candidate_groups: Optional[Tensor] = None
    negatives: Optional[ExtraNegatives] = None
    paired: bool = False

    def __post_init__(self) -> None:
        b, c = num_items(self.anchors), num_items(self.candidates)
        for name in ("anchor_ids", "anchor_labels", "anchor_groups"):
            _check(f"ContrastiveBatch.{name}", getattr(self, name), b)
        for name in ("candidate_ids", "candidate_labels", "candidate_groups"):
            _check(f"ContrastiveBatch.{name}", getattr(self, name), c)
        if self.paired and b != c:
            raise ValueError(f"ContrastiveBatch: paired=True needs as many candidates as anchors; got {b} and {c}")

    @property
    def num_anchors(self) -> int:
        return int(self.anchor_ids.shape[0])

    @property
    def a_labels(self) -> Tensor:
        return self.anchor_ids if self.anchor_labels is None else self.anchor_labels

    @property
    def c_labels(self) -> Tensor:
        return self.candidate_ids if self.candidate_labels is None else self.candidate_labels

    @property
    def a_groups(self) -> Tensor:
        return self.a_labels if self.anchor_groups is None else self.anchor_groups

    @property
    def c_groups(self) -> Tensor:
        return self.c_labels if self.candidate_groups is None else self.candidate_groups

    @property
    def has_negatives(self) -> bool:
        return self.negatives is not None and len(self.negatives) > 0

    def without_negatives(self) -> "ContrastiveBatch":
        return replace(self, negatives=None)

    @classmethod
    def paired_items(cls, anchors: Inputs, candidates: Inputs, ids: Tensor, groups: Optional[Tensor] = None,
                     negatives: Optional[ExtraNegatives] = None) -> "ContrastiveBatch":
        """Pairs ``(anchor i, candidate i)`` with item ids ``ids`` ``(B,)`` as labels on both sides."""
        return cls(anchors=anchors, candidates=candidates, anchor_ids=ids, candidate_ids=ids, anchor_labels=ids,
                   candidate_labels=ids, anchor_groups=groups, candidate_groups=groups, negatives=negatives,
                   paired=True)


def owner_columns(owner: Optional[Tensor], k: int, device: torch.device) -> Tensor:
    """``(K,)`` owner of each extra negative, ``-1`` = shared (the default)."""
    return torch.full((k,), -1, dtype=torch.long, device=device) if owner is None else owner.long()
