"""The one loss interface shared by every contrastive loss in the library.

Every loss sees the same inputs (:class:`ContrastiveInputs`):

- ``anchors``  ``(B, d)``: the rows that are pulled towards their positives (queries, images, ...).
- ``candidates`` ``(M, d)``: everything an anchor is compared with: its positives, in-batch documents
  (gathered across ranks under DDP), mined negatives, queued embeddings. ``M >= 1``.
- ``positive_mask`` ``(B, M)`` bool: which candidates are positives of each anchor (several allowed).
  ``None`` means "candidate ``i`` is the positive of anchor ``i``" (requires ``M >= B``).
- ``weights`` ``(B, M)`` float, optional: a non-negative weight per (anchor, negative); entries on
  positives are ignored. ``None`` means all ones.
- ``false_negative_mask`` ``(B, M)`` bool, optional: known false negatives (duplicates, same label, filter
  output). They are removed from the denominator; positives are never masked.
- ``difficulty`` ``(B, M)`` float, optional: a per-negative difficulty score for margin calibration
  (:class:`~contrastive.losses.margin.CementLoss`).
- ``similarity_estimate`` ``(B, M)`` float, optional: an external estimate r_ij of how related anchor i and
  candidate j are (BM25, a frozen encoder, ...), used by
  :class:`~contrastive.losses.soft_infonce.SoftInfoNCELoss` to weight negatives.

Losses are pure functions in :mod:`contrastive.losses.functional` with thin :class:`ContrastiveLoss`
shells that validate inputs, optionally add the reverse direction (``symmetric=True``) and return a
:class:`LossOutput` (a scalar plus detached values to log).
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn


class LossInputError(ValueError):
    """Bad loss input (shape, dtype, non-finite value, negative weight, anchor without positive)."""


@dataclass
class LossOutput:
    """A scalar loss and detached scalars to log (``logs`` keys are short names such as ``acc``)."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ContrastiveInputs:
    """Inputs of a contrastive loss; see the module docstring for shapes and meaning."""

    anchors: Tensor
    candidates: Tensor
    positive_mask: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    false_negative_mask: Optional[Tensor] = None
    difficulty: Optional[Tensor] = None
    similarity_estimate: Optional[Tensor] = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.anchors.shape[0], self.candidates.shape[0]

    def resolved_positive_mask(self) -> Tensor:
        b, m = self.shape
        if self.positive_mask is not None:
            return self.positive_mask
        if m < b:
            raise LossInputError(
                f"positive_mask is None, so candidate i must be the positive of anchor i, but there are "
                f"{m} candidates for {b} anchors"
            )
        mask = torch.zeros(b, m, dtype=torch.bool, device=self.anchors.device)
        mask[:, :b].fill_diagonal_(True)
        return mask

    def negative_mask(self) -> Tensor:
        """``(B, M)`` bool: candidates that count as negatives (not positive, not a known false negative)."""
        neg = ~self.resolved_positive_mask()
        if self.false_negative_mask is not None:
            neg = neg & ~self.false_negative_mask
        return neg

    def validate(self) -> "ContrastiveInputs":
        a, c = self.anchors, self.candidates
        if a.dim() != 2 or c.dim() != 2:
            raise LossInputError(f"anchors and candidates must be 2-D (B, d) and (M, d); got {tuple(a.shape)} and {tuple(c.shape)}")
        if a.shape[1] != c.shape[1]:
            raise LossInputError(f"embedding sizes differ: anchors {tuple(a.shape)} vs candidates {tuple(c.shape)}")
        if a.shape[0] == 0 or c.shape[0] == 0:
            raise LossInputError(f"empty input: {a.shape[0]} anchors, {c.shape[0]} candidates")
        if not a.is_floating_point() or a.dtype != c.dtype:
            raise LossInputError(f"anchors and candidates must share one floating dtype; got {a.dtype} and {c.dtype}")
        for name, t in (("anchors", a), ("candidates", c)):
            if not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).any(dim=1).nonzero().flatten()[:5].tolist()
                raise LossInputError(f"{name} contain NaN or infinite values (rows {bad} ...)")
        b, m = self.shape
        for name in ("positive_mask", "weights", "false_negative_mask", "difficulty", "similarity_estimate"):
            t = getattr(self, name)
            if t is None:
                continue
            if tuple(t.shape) != (b, m):
                raise LossInputError(f"{name} must have shape (B, M) = {(b, m)}; got {tuple(t.shape)}")
            if name.endswith("mask") and t.dtype != torch.bool:
                raise LossInputError(f"{name} must be a bool tensor; got {t.dtype}")
            if not name.endswith("mask"):
                if not t.is_floating_point():
                    raise LossInputError(f"{name} must be floating point; got {t.dtype}")
                if not torch.isfinite(t).all():
                    raise LossInputError(f"{name} contain NaN or infinite values")
        if self.weights is not None and (self.weights < 0).any():
            raise LossInputError("weights must be non-negative; got a negative weight")
        pos = self.resolved_positive_mask()
        no_pos = (~pos.any(dim=1)).nonzero().flatten()
        if no_pos.numel():
            raise LossInputError(f"anchors {no_pos[:5].tolist()} have no positive candidate")
        return self

    def reversed(self) -> "ContrastiveInputs":
        """The candidate→anchor direction for a square problem (M == B, no extra negatives)."""
        b, m = self.shape
        if m != b:
            raise LossInputError(
                f"symmetric loss needs the reverse inputs when candidates ({m}) outnumber anchors ({b}); "
                "pass reverse=ContrastiveInputs(...)"
            )
        t = lambda x: None if x is None else x.transpose(0, 1)  # noqa: E731
        return ContrastiveInputs(
            anchors=self.candidates,
            candidates=self.anchors,
            positive_mask=t(self.resolved_positive_mask()),
            weights=t(self.weights),
            false_negative_mask=t(self.false_negative_mask),
            difficulty=t(self.difficulty),
            similarity_estimate=t(self.similarity_estimate),
        )

    def to(self, dtype: torch.dtype) -> "ContrastiveInputs":
        conv = lambda x: x if x is None or not x.is_floating_point() else x.to(dtype)  # noqa: E731
        return dataclasses.replace(self, **{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)})


class ContrastiveLoss(nn.Module, abc.ABC):
    """Base shell: validation, optional symmetric direction, log aggregation.

    Subclasses implement :meth:`one_way`, which receives validated inputs.

    Args:
        symmetric: also compute the candidate→anchor direction and average the two (CLIP-style).
    """

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__()
        self.symmetric = symmetric

    def use_temperature(self, temperature: nn.Module) -> int:
        """Make ``temperature`` (a module whose ``forward()`` returns the temperature t as a 0-d tensor) the
        temperature of this loss and of its component losses, in place of their own fixed or learnable one,
        so that a model that owns its logit scale (open_clip's ``logit_scale``) trains it through the loss.
        The module is registered in the loss, so its parameters are the loss's (GradCache differentiates
        them with the loss). Returns how many temperatures were replaced (0 for a loss without one, e.g. a
        margin loss)."""
        owners = [m for m in self.modules() if isinstance(m, ContrastiveLoss)
                  and isinstance(getattr(m, "temperature", None), nn.Module)]
        for m in owners:
            m.temperature = temperature
        return len(owners)

    @abc.abstractmethod
    def one_way(self, inputs: ContrastiveInputs) -> LossOutput:
        """Loss of the anchor→candidate direction on validated inputs."""

    def forward(
        self,
        anchors: Tensor,
        candidates: Tensor,
        positive_mask: Optional[Tensor] = None,
        *,
        weights: Optional[Tensor] = None,
        false_negative_mask: Optional[Tensor] = None,
        difficulty: Optional[Tensor] = None,
        similarity_estimate: Optional[Tensor] = None,
        reverse: Optional[ContrastiveInputs] = None,
    ) -> LossOutput:
        """Return the loss; ``reverse`` gives the second direction's inputs when ``symmetric`` and the
        problem is not square (e.g. under DDP: local documents against all gathered queries)."""
        inputs = ContrastiveInputs(anchors, candidates, positive_mask, weights, false_negative_mask, difficulty,
                                   similarity_estimate)
        return self.forward_inputs(inputs, reverse)

    def forward_inputs(self, inputs: ContrastiveInputs, reverse: Optional[ContrastiveInputs] = None) -> LossOutput:
        """Validate, run :meth:`one_way` (and the reverse direction when ``symmetric``), check the result.

        Raises:
            LossInputError: bad inputs (see :meth:`ContrastiveInputs.validate`), every anchor skipped, or a
                non-finite loss (never returned silently).
        """
        out = self.one_way(inputs.validate())
        if self.symmetric:
            rev = (reverse if reverse is not None else inputs.reversed()).validate()
            out_r = self.one_way(rev)
            logs = {k: v for k, v in out.logs.items()}
            for k, v in out_r.logs.items():
                logs[f"{k}_rev"] = v
            out = LossOutput(loss=0.5 * (out.loss + out_r.loss), logs=logs)
        check_finite_loss(out.loss, type(self).__name__, inputs.anchors.dtype)
        return out


def check_finite_loss(loss: Tensor, where: str, dtype: torch.dtype) -> None:
    """Raise :class:`LossInputError` instead of returning a NaN or infinite loss."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise LossInputError(
            f"{where} produced a non-finite loss ({loss.detach().flatten()[:1].tolist()}) from finite inputs in "
            f"{dtype}; the similarities overflowed: use a larger temperature, L2-normalised embeddings or float32"
        )
