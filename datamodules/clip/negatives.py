"""Generated hard negatives for a batch of scene items, as tower inputs: the data side of a sampler that
returns generated negatives.

:class:`SceneNegativeGenerator` takes the batch's scene indices and captions and returns
:class:`GeneratedNegatives` with the fields of the core batch contract's extra negatives:

- text negatives (image->text): ``per_item`` perturbed captions per item (:class:`CaptionPerturber`, or the
  :class:`RandomWordPerturber` control), tokenized (``inputs = {"ids": (K, L)}``), its difficulty (the
  concreteness score that feeds a Cement-style margin) and its category;
- image negatives (text->image): ``per_item`` copies of the item's scene, each with one attribute or
  relation changed so that the item's caption is false for it, re-rendered (``inputs = {"pixels": (K, 3, H, W)}``).

``owner[k]`` is the batch row whose item negative ``k`` was made from (the negative is meant for that
anchor only); ``ids`` and ``labels`` are ``-1`` (generated, never a positive). Items without a qualifying
negative get none (or fewer), so ``K <= per_item * B``. Everything is drawn from ``(seed, step, scene index)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datamodules.clip.perturb import (IMAGE_EDITS, CaptionPerturber, RandomWordPerturber, image_edit_kinds,
                                      perturb_scene_many)
from datamodules.clip.scenes import Combo, SceneSplit, render_scene


@dataclass
class GeneratedNegatives:
    """``K`` generated negatives: ``inputs`` tower inputs ``(K, ...)``; ``ids``, ``labels`` ``(K,)`` long,
    all ``-1``; ``owner`` ``(K,)`` long batch rows; ``difficulty`` ``(K,)`` float or ``None``;
    ``kinds`` the category (text) or edit kind (image) of each."""

    inputs: dict[str, Tensor]
    owner: Tensor
    difficulty: Tensor | None = None
    kinds: list[str] = field(default_factory=list)

    @property
    def ids(self) -> Tensor:
        return torch.full_like(self.owner, -1)

    @property
    def labels(self) -> Tensor:
        return torch.full_like(self.owner, -1)

    def __len__(self) -> int:
        return int(self.owner.shape[0])

    def contract_fields(self) -> dict:
        """Keyword arguments of the core's ``ExtraNegatives(inputs, ids, labels, groups, weights,
        difficulty, owner)``."""
        return {"inputs": self.inputs, "ids": self.ids, "labels": self.labels, "difficulty": self.difficulty,
                "owner": self.owner}


class SceneNegativeGenerator:
    """Text and image negatives for items of a generated-scene split.

    Args:
        split: the scenes the batch items come from (their ``image_id`` indexes it).
        tokenizer: captions -> ``(K, L)`` long ids (the text tower's tokenizer).
        transform: PIL image -> ``(3, H, W)`` tensor (the image tower's preprocessing).
        perturber: text-negative engine (``None``: the concreteness-guided :class:`CaptionPerturber`).
        image_kinds: scene edits drawn for image negatives.
        seed: base seed.
        combos: the (colour, shape) combinations negatives may name or show (those of the training
            positives; :mod:`datamodules.clip.perturb`); ``None``: any. Used by the default perturber and
            the image edits.
    """

    def __init__(self, split: SceneSplit, tokenizer: Callable[[list[str]], Tensor],
                 transform: Callable[[Image.Image], Tensor],
                 perturber: CaptionPerturber | RandomWordPerturber | None = None,
                 image_kinds: Sequence[str] = IMAGE_EDITS, seed: int = 0,
                 combos: Collection[Combo] | None = None) -> None:
        self.split, self.tokenizer, self.transform = split, tokenizer, transform
        self.combos = None if combos is None else frozenset(combos)
        self.perturber = perturber or CaptionPerturber(combos=self.combos)
        self.image_kinds = image_edit_kinds(image_kinds)
        self.seed = seed
        self.image_size = int(split.images.shape[1]) if len(split) else 64

    def _rng(self, step: int, scene: int, side: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, scene, side])

    def text_negatives(self, scene_ids: Sequence[int] | Tensor, captions: Sequence[str], step: int = 0,
                       per_item: int = 1) -> GeneratedNegatives:
        """Up to ``per_item`` perturbed captions per item (false for the item's scene; of distinct
        categories with the concreteness-guided perturber), tokenized, grouped by item."""
        texts, owner, diff, kinds = [], [], [], []
        for row, (i, cap) in enumerate(zip((int(x) for x in scene_ids), captions)):
            for neg in self.perturber.perturb_many(cap, self._rng(step, i, 0), per_item, scene=self.split.scenes[i]):
                texts.append(neg.text), owner.append(row), diff.append(neg.difficulty), kinds.append(neg.category)
        ids = self.tokenizer(texts) if texts else torch.zeros(0, 1, dtype=torch.long)
        return GeneratedNegatives({"ids": ids}, torch.tensor(owner, dtype=torch.long),
                                  torch.tensor(diff, dtype=torch.float32), kinds)

    def image_negatives(self, scene_ids: Sequence[int] | Tensor, captions: Sequence[str], step: int = 0,
                        per_item: int = 1) -> GeneratedNegatives:
        """Up to ``per_item`` re-rendered scenes per item (edits of distinct kinds), each with one edit that
        makes the item's caption false, grouped by item."""
        pixels, owner, kinds = [], [], []
        for row, (i, cap) in enumerate(zip((int(x) for x in scene_ids), captions)):
            for scene, edit in perturb_scene_many(self.split.scenes[i], self._rng(step, i, 1), per_item,
                                                  self.image_kinds, caption=cap, combos=self.combos):
                pixels.append(self.transform(Image.fromarray(render_scene(scene, self.image_size))))
                owner.append(row), kinds.append(edit.kind)
        stacked = torch.stack(pixels) if pixels else torch.zeros(0, 3, self.image_size, self.image_size)
        return GeneratedNegatives({"pixels": stacked}, torch.tensor(owner, dtype=torch.long), None, kinds)
