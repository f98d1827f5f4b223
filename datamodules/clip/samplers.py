"""Generated hard negatives as samplers (one YAML line each): negative captions by concreteness-guided
perturbation (``neg_captions_concreteness``) or by random-word swaps (``neg_captions_random``, the
control), and negative images re-rendered with one attribute or relation changed (``neg_images``).

The sampler draws nothing from the corpus; its :meth:`sample` returns generated negatives made by the
datamodule's :class:`~datamodules.clip.datamodule.SceneNegativeSource` (bound with :meth:`bind`),
``negatives_per_item`` per anchor at most (of distinct perturbation categories or scene-edit kinds), each
owned by its anchor and carrying its difficulty (the concreteness score of the changed words) for a
Cement-style margin, and, when ``weight`` is not 1, its loss weight (InfoNCE multiplies the negative's
``exp(s / t)`` by it, as if it were ``weight`` copies).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from contrastive.registry import SAMPLERS
from contrastive.samplers.base import NegativeSampler, SampledNegatives
from datamodules.clip.lexicon import ConcretenessLexicon
from datamodules.clip.perturb import CATEGORIES, IMAGE_EDITS, CaptionPerturber, RandomWordPerturber, image_edit_kinds


class SceneNegativeSampler(NegativeSampler):
    """Base of the generated-negative samplers: ``kind`` ``"captions"`` or ``"images"``.

    Args:
        negatives_per_item: generated negatives per training row at most (distinct categories / edit kinds).
        weight: loss weight of every generated negative (1: unweighted; no weights are attached).
        seen_combinations_only: negatives name or show only (colour, shape) combinations that occur in the
            training positives (:mod:`datamodules.clip.perturb`: otherwise an unseen combination marks a
            negative by itself, and the held-out combinations of the test scenes are learnt as false).
    """

    kind: str = "captions"

    def __init__(self, negatives_per_item: int = 1, weight: float = 1.0, seen_combinations_only: bool = True) -> None:
        super().__init__(num_negatives=0)
        if isinstance(negatives_per_item, bool) or not isinstance(negatives_per_item, int) or negatives_per_item < 1:
            raise ValueError(f"{type(self).__name__}: negatives_per_item must be a positive integer; got "
                             f"{negatives_per_item!r}")
        if not float(weight) > 0:
            raise ValueError(f"{type(self).__name__}: weight must be positive; got {weight!r}")
        self.negatives_per_item, self.weight = int(negatives_per_item), float(weight)
        self.seen_combinations_only = bool(seen_combinations_only)
        self.source: Optional[Any] = None

    def bind(self, source: Any) -> None:
        """Receive the datamodule's negative source (``negatives(rows, kind, step)``)."""
        self.source = source

    def sample(self, rows: Tensor) -> SampledNegatives:
        """``(B,)`` training rows → no corpus rows and up to ``B`` generated negatives."""
        if self.source is None:
            raise RuntimeError(f"{type(self).__name__}: no negative source bound (the clip datamodule binds it)")
        rows = torch.as_tensor(rows).long().view(-1)
        gen = self.source.negatives(rows, self.kind, self.epoch, self.negatives_per_item)
        if self.weight != 1.0:
            gen = replace(gen, weights=torch.full((len(gen.items),), self.weight, dtype=torch.float32))
        return SampledNegatives(rows=torch.full((rows.shape[0], 0), -1, dtype=torch.long), generated=gen)


@SAMPLERS.register("neg_captions_concreteness")
class ConcretenessCaptionSampler(SceneNegativeSampler):
    """A perturbed caption per image anchor (SugarCrepe categories), words picked by concreteness
    (:class:`~datamodules.clip.perturb.CaptionPerturber`).

    Args (besides those of :class:`SceneNegativeSampler`):
        categories: the perturbation categories to draw from (default: all of
            :data:`~datamodules.clip.perturb.CATEGORIES`), e.g. ``[replace_rel, swap_att]`` for a per-category
            ablation.
        selection: ``"concreteness"`` (prefer concrete words) or ``"uniform"``.
        temperature: sharpness of the concreteness preference.
        lexicon: a user's concreteness ratings in the Brysbaert et al. (2014) format (CSV or TSV with ``Word``
            and ``Conc.M``), read when the sampler is built; ``None``: the built-in table.
    """

    kind = "captions"

    def __init__(self, negatives_per_item: int = 1, weight: float = 1.0, seen_combinations_only: bool = True,
                 categories: Optional[Sequence[str]] = None, selection: str = "concreteness",
                 temperature: float = 0.1, lexicon: Optional[str] = None) -> None:
        super().__init__(negatives_per_item, weight, seen_combinations_only)
        self._settings = dict(lexicon=ConcretenessLexicon.from_csv(lexicon) if lexicon else None,
                              categories=tuple(categories) if categories is not None else CATEGORIES,
                              selection=selection, temperature=temperature)
        CaptionPerturber(**self._settings)  # checks categories, selection and temperature now, not at the first batch

    def bind(self, source: Any) -> None:
        source.generator.perturber = CaptionPerturber(**self._settings, combos=source.generator.combos)
        super().bind(source)


@SAMPLERS.register("neg_captions_random")
class RandomWordCaptionSampler(SceneNegativeSampler):
    """The control: a caption with a random vocabulary word swapped in
    (:class:`~datamodules.clip.perturb.RandomWordPerturber`)."""

    kind = "captions"

    def bind(self, source: Any) -> None:
        source.generator.perturber = RandomWordPerturber(combos=source.generator.combos)
        super().bind(source)


@SAMPLERS.register("neg_images")
class SceneImageSampler(SceneNegativeSampler):
    """A re-rendered scene per caption anchor with one colour, size, shape or relation changed.

    Args (besides those of :class:`SceneNegativeSampler`):
        edits: the scene-edit kinds to draw from (default: all of :data:`~datamodules.clip.perturb.IMAGE_EDITS`),
            e.g. ``[relation]`` for relation-swapped image negatives only.
    """

    kind = "images"

    def __init__(self, negatives_per_item: int = 1, weight: float = 1.0, seen_combinations_only: bool = True,
                 edits: Optional[Sequence[str]] = None) -> None:
        super().__init__(negatives_per_item, weight, seen_combinations_only)
        self.edits = image_edit_kinds(edits if edits is not None else IMAGE_EDITS)  # checked now, not at bind

    def bind(self, source: Any) -> None:
        source.generator.image_kinds = self.edits
        super().bind(source)
