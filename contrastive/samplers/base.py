"""Negative samplers: where the negatives of a training batch come from. One typed interface for every
setting (text, images, vectors).

Rows
----
A sampler works on the **training rows** ``0..N-1`` of a datamodule: row ``r`` is one training pair (an
anchor and its positive candidate) with an item id ``ids[r]`` and a duplicate group ``groups[r]`` (equal
non-negative groups are known duplicates; a negative group means "no known duplicate").

- :meth:`NegativeSampler.setup` receives the ids and groups (and, for text samplers such as BM25, the row
  texts) once per training corpus.
- :meth:`NegativeSampler.sample` maps the rows of a batch ``(B,)`` to extra negatives: ``(B, k)`` corpus
  rows (``-1`` padding), or :class:`SampledNegatives` that may also carry **generated** negatives (a
  perturbed caption, a re-rendered image) that the datamodule turns into tower inputs.
- :meth:`NegativeSampler.refresh` re-mines with the current model through ``encode(rows, side) -> (R, d)``,
  ``side`` ``"anchor"`` or ``"candidate"`` (the refresh callback provides it from the module's towers and
  the datamodule's :meth:`SamplerData.row_inputs`).
- :meth:`NegativeSampler.state_dict` / :meth:`NegativeSampler.load_state_dict` hold what an exact resume
  needs (default: nothing).

A datamodule wires a sampler with :func:`contrastive.samplers.collate.attach_sampler`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

from contrastive.registry import SAMPLERS

Side = Literal["anchor", "candidate"]
SIDES: tuple[str, str] = ("anchor", "candidate")
#: ``encode(rows (R,) long, side) -> (R, d)`` float embeddings of training rows under the current model
Encode = Callable[[Tensor, Side], Tensor]


@dataclass
class GeneratedNegatives:
    """Negatives a sampler makes rather than draws from the corpus.

    Attributes:
        items: ``K`` payloads the datamodule can turn into candidate-tower inputs (caption strings,
            image tensors, ...).
        owner: ``(K,)`` long batch position of the anchor each was generated for (only that anchor sees
            it), or ``-1`` = a negative for every anchor.
        weights: ``(K,)`` float per-negative loss weights, or ``None``.
        difficulty: ``(K,)`` float per-negative difficulty, or ``None``.
    """

    items: list[Any]
    owner: Tensor
    weights: Optional[Tensor] = None
    difficulty: Optional[Tensor] = None

    def __post_init__(self) -> None:
        k = len(self.items)
        self.owner = torch.as_tensor(self.owner, dtype=torch.long).view(-1)
        if self.owner.shape[0] != k:
            raise ValueError(f"GeneratedNegatives: {k} items but owner has {self.owner.shape[0]} entries")
        for name in ("weights", "difficulty"):
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != (k,):
                raise ValueError(f"GeneratedNegatives.{name} must have shape ({k},); got {tuple(v.shape)}")


@dataclass
class SampledNegatives:
    """What :meth:`NegativeSampler.sample` returns for a batch of ``B`` rows.

    Attributes:
        rows: ``(B, k)`` long corpus rows (``-1`` padding; ``k`` may be 0).
        generated: generated negatives, or ``None``.
    """

    rows: Tensor
    generated: Optional[GeneratedNegatives] = None


@dataclass(frozen=True)
class RefreshSchedule:
    """When a model-dependent sampler is refreshed.

    Attributes:
        every_n_epochs: at the start of epochs ``start_epoch, start_epoch + n, ...`` (``None``: never by epoch).
        every_n_steps: after every ``n``-th optimiser step (``None``: never by step).
        start_epoch: first epoch refreshed (0: before training, with the initial weights).
    """

    every_n_epochs: Optional[int] = 1
    every_n_steps: Optional[int] = None
    start_epoch: int = 1

    def __post_init__(self) -> None:
        for setting, v in (("refresh_every_n_epochs", self.every_n_epochs), ("refresh_every_n_steps", self.every_n_steps)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{setting} must be a positive integer or null; got {v!r}")
        if isinstance(self.start_epoch, bool) or not isinstance(self.start_epoch, int) or self.start_epoch < 0:
            raise ValueError(f"refresh_start_epoch must be an integer >= 0; got {self.start_epoch!r}")


@runtime_checkable
class SamplerData(Protocol):
    """What a datamodule offers a model-dependent sampler's refresh: the tower inputs of training rows."""

    def row_inputs(self, rows: Sequence[int], side: Side) -> Mapping[str, Tensor]:
        """Tower inputs of training ``rows`` for ``side`` (``"anchor"``: the anchors, ``"candidate"``: their
        positives), each tensor ``(len(rows), ...)``."""
        ...


class NegativeSampler:
    """Base sampler: no extra negatives (in-batch only). Every sampler derives from it (the registry checks).

    Args:
        num_negatives: extra corpus negatives per training row (0 for in-batch sampling).

    Attributes:
        needs_model: whether :meth:`refresh` needs the current towers (a refresh callback is attached).
    """

    needs_model: bool = False

    def __init__(self, num_negatives: int = 0) -> None:
        if num_negatives < 0:
            raise ValueError(f"sampler.num_negatives must be >= 0; got {num_negatives}")
        self.num_negatives = num_negatives
        self.epoch = 0

    # -- corpus -------------------------------------------------------------------------------------
    def setup(self, ids: Tensor, groups: Optional[Tensor] = None,
              texts: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        """Receive the training rows: row ``r`` has item id ``ids[r]`` and duplicate group ``groups[r]``
        (``None``: the ids); ``texts`` (text settings only) maps ``"anchor"`` / ``"candidate"`` to the row
        texts, for samplers that read text (BM25)."""

    @property
    def is_setup(self) -> bool:
        """Whether :meth:`setup` has run (always True for samplers that keep no corpus)."""
        return True

    def set_epoch(self, epoch: int) -> None:
        """The current training epoch (seeds per-epoch draws; set by the batch sampler / callback)."""
        self.epoch = int(epoch)

    # -- batches ------------------------------------------------------------------------------------
    def sample(self, rows: Tensor) -> Union[Tensor, SampledNegatives]:
        """Extra negatives for the training rows ``rows`` ``(B,)``: ``(B, num_negatives)`` corpus rows
        (``-1`` where fewer were available) or :class:`SampledNegatives`."""
        return torch.full((rows.shape[0], 0), -1, dtype=torch.long)

    def batch_order(self, epoch: int, batch_size: int, generator: torch.Generator) -> Optional[list[list[int]]]:
        """Optional: the training batches of ``epoch`` as lists of rows (``None``: shuffle)."""
        return None

    # -- refresh ------------------------------------------------------------------------------------
    @property
    def refresh_schedule(self) -> Optional[RefreshSchedule]:
        """When to refresh (``None`` for samplers that do not need the model)."""
        return None

    def should_refresh(self, epoch: int) -> bool:
        """Whether a refresh is due at the start of ``epoch`` (from :attr:`refresh_schedule` by default)."""
        s = self.refresh_schedule
        if s is None or s.every_n_epochs is None:
            return False
        return epoch >= s.start_epoch and (epoch - s.start_epoch) % s.every_n_epochs == 0

    @property
    def first_refresh_epoch(self) -> int:
        """The epoch whose state a one-off ``contrastive mine`` uses (NGAME: its first curriculum epoch)."""
        return 0

    def refresh(self, encode: Encode, step: int) -> dict[str, float]:
        """Re-mine with the current model (``encode(rows, side)``); returns statistics to log."""
        return {}

    # -- mined tables and reports -----------------------------------------------------------------------
    def mined_table(self) -> Optional[Any]:
        """The :class:`~contrastive.samplers.table.MinedTable` in use, or ``None``."""
        return None

    def mine_all(self) -> Optional[Any]:
        """Negatives of every training row without a model (``contrastive mine``), or ``None``."""
        return None

    # -- model settings -----------------------------------------------------------------------------
    def model_settings(self) -> dict[str, Any]:
        """Keyword arguments the sampler asks of the model (the memory queue's ``queue_size``, ``momentum``)."""
        return {}

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs besides the constructor settings and the training rows (default:
        nothing; mined tables are restored by the refresh callback from its cache)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (default: nothing to restore)."""


@SAMPLERS.register("in_batch")
class InBatchSampler(NegativeSampler):
    """Only the other candidates of the (global) batch are negatives (the default)."""

    def __init__(self) -> None:
        super().__init__(num_negatives=0)


def as_sampled(out: Union[Tensor, SampledNegatives]) -> SampledNegatives:
    """``sample``'s result as :class:`SampledNegatives`."""
    return out if isinstance(out, SampledNegatives) else SampledNegatives(rows=torch.as_tensor(out).long())
