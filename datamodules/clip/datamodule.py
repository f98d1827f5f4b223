"""``ClipDataModule``: image–text pairs as batches of the core's contract, from the generated scenes (the
embedded default), a user's manifest / COCO-captions file, or WebDataset shards (streamed).

Training rows are **images**: row ``r`` is image ``r`` of the train split with item id ``r`` (its
``image_id``) and duplicate group the scene-graph group (identical scene graphs: known false negatives).
A training item carries the image and ``captions_per_item`` of its captions (a fixed rotation per row,
from ``(seed, row)``); the batch dict (:class:`ClipCollate`) holds

- ``a_<key>`` / ``c_<key>``: the anchor / candidate tower inputs (``pixels`` ``(N, 3, H, W)`` for images,
  ``ids`` ``(N, L)`` long + ``mask`` ``(N, L)`` bool for captions);
- ``a_id``, ``a_label``, ``a_group`` ``(B_a,)`` and ``c_id``, ``c_label``, ``c_group`` ``(B_c,)`` long: ids
  (image id for images, caption id for captions), labels (the image id on both sides: several captions of
  an image are several positives) and groups;
- ``paired``: one caption per image (caption ``i`` belongs to image ``i``);
- the sampler's extra negatives ``neg_*`` (:class:`~contrastive.samplers.collate.NegativeCollate`).

``anchors="captions"`` (default) makes captions the anchors and images the candidates (text→image, the
place of generated negative *images*); ``anchors="images"`` the reverse (image→text, the place of
generated negative *captions* and of mined nearest captions). Validation and test batches are one item
per caption with captions as anchors; the module's evaluator ranks both ways.

``source="webdataset"`` streams tar shards (:class:`~datamodules.clip.loaders.WebDatasetImageText`): the
training items are shuffled through a buffer (``shuffle_buffer``) instead of being indexed by row, so
only samplers that neither add negatives nor order the batches (``in_batch``, ``queue``) apply, and image
ids are stable hashes of shard name and sample key. The epoch length is counted once by reading the shards.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from contrastive.registry import DATAMODULES
from contrastive.samplers.base import GeneratedNegatives as SamplerGenerated
from datamodules.clip.evaluation import CompositionalItem, scene_compositional_items
from datamodules.clip.loaders import (BadRecords, ImageTextDataset, ImageTextRecord, WebDatasetImageText,
                                      image_transform, read_coco_captions, read_manifest, scene_records,
                                      webdataset_urls)
from datamodules.clip.models import resolve_architecture
from datamodules.clip.negatives import SceneNegativeGenerator
from datamodules.clip.scenes import SceneCorpus, SceneSettings, build_scene_corpus

log = logging.getLogger("datamodules.clip")

SOURCES = ("scenes", "manifest", "coco", "webdataset")
SIDES = ("captions", "images")


def caption_rotation(captions: Sequence[str], k: Optional[int], seed: int, key: int) -> list[str]:
    """``k`` of ``captions`` (``None``: all) in a fixed rotation whose start is drawn from ``(seed, key)``."""
    n = len(captions) if k is None else min(k, len(captions))
    start = int(np.random.default_rng([seed, key]).integers(len(captions)))
    return [captions[(start + j) % len(captions)] for j in range(n)]


class ClipTrainItems(Dataset):
    """Training items of an image split: item ``r`` = ``{"row": r, "image": (3, H, W), "captions": [...],
    "image_id", "group", "label"}`` with ``captions_per_item`` captions (``None``: all) in a fixed
    rotation drawn from ``(seed, r)``; ``None`` for an image that fails to decode (skipped by the collate)."""

    def __init__(self, images: ImageTextDataset, captions_per_item: Optional[int], seed: int = 0) -> None:
        self.images, self.k, self.seed = images, captions_per_item, seed

    def __len__(self) -> int:
        return len(self.images.records)

    def captions_of(self, row: int) -> list[str]:
        return caption_rotation(self.images.records[row].captions, self.k, self.seed, row)

    def __getitem__(self, row: int) -> Optional[dict[str, Any]]:
        rec = self.images.records[row]
        img = self.images.load_image(rec)
        if img is None:
            return None
        return {"row": int(row), "image": self.images.transform(img), "captions": self.captions_of(row),
                "image_id": rec.image_id, "group": rec.group, "label": rec.label}


class ClipStreamItems(IterableDataset):
    """Training items streamed from WebDataset shards, in :class:`ClipTrainItems`' form without ``row``:
    ``{"image", "captions", "image_id", "group", "label"}``; ``len`` = the usable samples of one pass."""

    def __init__(self, shards: WebDatasetImageText, captions_per_item: Optional[int], seed: int = 0) -> None:
        self.shards, self.k, self.seed = shards, captions_per_item, seed

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Any:
        for index, img, captions, _, _ in self.shards.samples():
            yield {"image": self.shards.transform(img), "captions": caption_rotation(captions, self.k, self.seed, index),
                   "image_id": index, "group": index, "label": -1}


def text_inputs(tokenizer: Callable[[list[str]], Tensor], texts: Sequence[str]) -> dict[str, Tensor]:
    """Captions → ``{"ids": (N, L) long, "mask": (N, L) bool}`` (open_clip ids, 0 = padding)."""
    ids = tokenizer(list(texts))
    return {"ids": ids, "mask": ids != 0}


class ClipCollate:
    """Training items (:class:`ClipTrainItems`) or evaluation items (one caption each, from
    :class:`~datamodules.clip.loaders.ImageTextDataset`) → the batch dict of the module docstring."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor], anchors: str = "captions") -> None:
        if anchors not in SIDES:
            raise ValueError(f"clip: anchors must be one of {SIDES}; got {anchors!r}")
        self.tokenizer, self.anchors = tokenizer, anchors

    def __call__(self, items: Sequence[Optional[Mapping[str, Any]]]) -> dict[str, Any]:
        good = [it for it in items if it is not None]
        if not good:
            raise ValueError("clip: every image of a batch failed to decode (see the skipped-record log)")
        captions = [c for it in good for c in (it["captions"] if "captions" in it else [it["caption"]])]
        per = [len(it["captions"]) if "captions" in it else 1 for it in good]
        image_ids = torch.tensor([int(it["image_id"]) for it in good], dtype=torch.long)
        groups = torch.tensor([int(it["group"]) for it in good], dtype=torch.long)
        cap_image = torch.repeat_interleave(image_ids, torch.tensor(per))
        if "caption_id" in good[0]:  # evaluation: the split's caption ids
            cap_ids = torch.tensor([int(it["caption_id"]) for it in good], dtype=torch.long)
        else:  # training: unique within the batch
            cap_ids = torch.arange(len(captions), dtype=torch.long)
        image_side = {"pixels": torch.stack([it["image"] for it in good]), "id": image_ids, "label": image_ids,
                      "group": groups}
        text_side = {**text_inputs(self.tokenizer, captions), "id": cap_ids, "label": cap_image,
                     "group": torch.repeat_interleave(groups, torch.tensor(per))}
        a, c = (text_side, image_side) if self.anchors == "captions" else (image_side, text_side)
        batch: dict[str, Any] = {f"a_{k}": v for k, v in a.items()}
        batch.update({f"c_{k}": v for k, v in c.items()})
        batch["paired"] = all(n == 1 for n in per)
        batch["skipped"] = len(items) - len(good)
        batch["label"] = torch.tensor([int(it["label"]) for it in good], dtype=torch.long)
        return batch


class SceneNegativeSource:
    """The data side of the generated-negative samplers: for training rows, the generated negatives of
    :class:`~datamodules.clip.negatives.SceneNegativeGenerator` as the core sampler's
    :class:`~contrastive.samplers.base.GeneratedNegatives` (items: one tower-input dict each, owner: the
    batch position of the anchor each belongs to).

    ``kind="captions"`` needs image anchors (a negative caption is an image's extra candidate), ``"images"``
    caption anchors (a re-rendered image is a caption's extra candidate)."""

    def __init__(self, generator: SceneNegativeGenerator, items: ClipTrainItems, anchors: str) -> None:
        self.generator, self.items, self.anchors = generator, items, anchors

    def negatives(self, rows: Tensor, kind: str, step: int, per_item: int = 1) -> SamplerGenerated:
        """Up to ``per_item`` generated negatives of ``kind`` per training row, made from the row's first
        caption: negative captions owned by the row's image, negative images owned by its first caption."""
        need = "images" if kind == "captions" else "captions"
        if self.anchors != need:
            raise ValueError(f"clip: generated negative {kind} are extra candidates of {need} anchors; set "
                             f"data.anchors: {need} (got {self.anchors!r})")
        rows_l = [int(r) for r in rows.tolist()]
        scene_ids = [self.items.images.records[r].image for r in rows_l]
        caps = [self.items.captions_of(r) for r in rows_l]
        first_anchor = np.cumsum([0] + [len(c) for c in caps])[:-1]
        if kind == "captions":
            gen = self.generator.text_negatives(scene_ids, [c[0] for c in caps], step, per_item)
            owner = gen.owner  # image anchors: one per row
        else:
            gen = self.generator.image_negatives(scene_ids, [c[0] for c in caps], step, per_item)
            owner = torch.as_tensor(first_anchor, dtype=torch.long)[gen.owner] if len(gen) else gen.owner
        items = [{k: v[i] for k, v in gen.inputs.items()} for i in range(len(gen))]
        return SamplerGenerated(items, owner, difficulty=gen.difficulty)


class GeneratedInputs:
    """``generated_inputs`` of :func:`~contrastive.samplers.collate.attach_sampler`: per-item input dicts
    → stacked tower inputs (captions get their ``mask``)."""

    def __call__(self, items: list[Any]) -> dict[str, Tensor]:
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        if "ids" in out:
            out["mask"] = out["ids"] != 0
        return out


class RowInputs:
    """Tower inputs of training rows (``side``: ``"anchor"`` / ``"candidate"``): the image, or the row's
    first caption."""

    def __init__(self, items: ClipTrainItems, tokenizer: Callable[[list[str]], Tensor], anchors: str) -> None:
        self.items, self.tokenizer, self.anchors = items, tokenizer, anchors

    def kind(self, side: str) -> str:
        if side not in ("anchor", "candidate"):
            raise ValueError(f"side must be 'anchor' or 'candidate'; got {side!r}")
        return self.anchors if side == "anchor" else ("images" if self.anchors == "captions" else "captions")

    def __call__(self, rows: Sequence[int], side: str = "candidate") -> dict[str, Tensor]:
        if self.kind(side) == "captions":
            return text_inputs(self.tokenizer, [self.items.captions_of(int(r))[0] for r in rows])
        ds = self.items.images
        return {"pixels": torch.stack([ds.transform(ds.load_image(ds.records[int(r)])) for r in rows])}


@DATAMODULES.register("clip")
class ClipDataModule(L.LightningDataModule):
    """Image–text training and evaluation data (module docstring).

    Args:
        source: ``"scenes"`` (generated compositional scenes, the default), ``"manifest"`` (CSV/TSV/JSONL
            plus an image root), ``"coco"`` (COCO-captions JSON per split) or ``"webdataset"`` (tar shards).
        architecture: the open_clip architecture (tokenizer and image size); filled from ``model:``.
        paths: for ``manifest`` / ``coco``: ``{"train": file, "valid": file, "test": file}``; for
            ``webdataset`` each is a glob, a brace pattern or a list of shards (``train-{000..009}.tar``).
        image_root: folder of the user's images (``manifest``: default the manifest's folder).
        image_column, caption_column: manifest columns (open_clip's ``filepath`` / ``title``).
        on_error: ``"skip"`` (count and log) or ``"raise"`` for missing / undecodable images and bad rows.
        caption_field: ``webdataset``: the caption key of a sample's ``json`` (a ``txt`` file is used first).
        shuffle_buffer: ``webdataset``: training samples shuffled through a buffer of this size.
        scenes: :class:`~datamodules.clip.scenes.SceneSettings` fields (``n_train``, ``image_size``, ...);
            its ``seed`` (default: ``seed``) fixes the scenes and the compositional test items, so runs of
            several seeds can share one corpus.
        cache_dir: scene cache (default ``$CONTRASTIVE_CACHE/clip``).
        anchors: ``"captions"`` or ``"images"`` (which side the loss treats as anchors).
        captions_per_item: captions per training image (``None``: all of them).
        batch_size: training images per batch; eval_batch_size: captions per evaluation batch.
        num_workers, seed: loaders and draws.
        sampler: a :class:`contrastive.samplers.NegativeSampler` (filled from ``sampler:``).
    """

    def __init__(
        self,
        source: Literal["scenes", "manifest", "coco", "webdataset"] = "scenes",
        architecture: str = "clip-tiny",
        paths: Optional[dict[str, str]] = None,
        image_root: Optional[str] = None,
        image_column: str = "filepath",
        caption_column: str = "title",
        on_error: Literal["skip", "raise"] = "skip",
        caption_field: str = "caption",
        shuffle_buffer: int = 1000,
        scenes: Optional[dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        anchors: Literal["captions", "images"] = "captions",
        captions_per_item: Optional[int] = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        sampler: Any = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"clip: source must be one of {SOURCES}; got {source!r}")
        if source != "scenes" and not (isinstance(paths, dict) and {"train", "test"} <= set(paths)):
            raise ValueError(f"clip: source={source!r} needs paths: {{train: FILE, valid: FILE, test: FILE}}")
        if anchors not in SIDES:
            raise ValueError(f"clip: anchors must be one of {SIDES}; got {anchors!r}")
        if captions_per_item is not None and (not isinstance(captions_per_item, int) or captions_per_item < 1):
            raise ValueError(f"clip: captions_per_item must be a positive integer or null; got {captions_per_item!r}")
        for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"clip: {name} must be a positive integer; got {v!r}")
        try:
            self.scene_settings = SceneSettings(**{"seed": seed, **dict(scenes or {})}) if source == "scenes" else None
        except TypeError as e:
            raise ValueError(f"clip: scenes: {e}") from None
        self.source, self.paths, self.image_root = source, dict(paths or {}), image_root
        self.image_column, self.caption_column = image_column, caption_column
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
            raise ValueError(f"clip: shuffle_buffer must be a positive integer; got {shuffle_buffer!r}")
        self.caption_field, self.shuffle_buffer = caption_field, shuffle_buffer
        self.bad = BadRecords(on_error)
        self.cache_dir, self.anchors, self.captions_per_item = cache_dir, anchors, captions_per_item
        self.batch_size, self.eval_batch_size, self.num_workers, self.seed = batch_size, eval_batch_size, num_workers, seed
        self.sampler = sampler
        name, cfg = resolve_architecture(architecture)
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(name)
        pre = dict(cfg.get("preprocess_cfg") or {})
        self.image_size = int(cfg["vision_cfg"].get("image_size", 224))
        self.transform = image_transform(self.image_size, pre.get("mean", open_clip.OPENAI_DATASET_MEAN),
                                         pre.get("std", open_clip.OPENAI_DATASET_STD))
        self.corpus: Optional[SceneCorpus] = None
        self._datasets: dict[str, Any] = {}
        self._train: Optional[ClipTrainItems] = None
        self._stream: Optional[ClipStreamItems] = None
        self._sampler_ready = False

    # ------------------------------------------------------------------------------ building
    def _records(self, split: str) -> tuple[list[ImageTextRecord], Optional[np.ndarray]]:
        if self.source == "scenes":
            if self.corpus is None:
                self.corpus = build_scene_corpus(self.scene_settings, self.cache_dir)
            return scene_records(self.corpus[split]), self.corpus[split].images
        path = self.paths.get(split)
        if path is None:
            raise ValueError(f"clip: paths has no {split!r} file")
        if self.source == "manifest":
            return read_manifest(path, self.image_root, self.image_column, self.caption_column, bad=self.bad), None
        if self.image_root is None:
            raise ValueError("clip: source='coco' needs image_root")
        return read_coco_captions(path, self.image_root, bad=self.bad), None

    def _shards(self, split: str, train: bool) -> WebDatasetImageText:
        path = self.paths.get(split)
        if path is None:
            raise ValueError(f"clip: paths has no {split!r} shards")
        return WebDatasetImageText(webdataset_urls(path, f"data.paths.{split}"), self.transform, self.caption_field,
                                   bad=self.bad, seed=self.seed, per="image" if train else "caption",
                                   shuffle=self.shuffle_buffer if train else 0)

    @property
    def streams(self) -> bool:
        """Whether the data is streamed (``webdataset``): no row-indexed training items."""
        return self.source == "webdataset"

    def dataset(self, split: str) -> Any:
        """One item per caption of ``split`` (``train``, ``valid``, ``test``; ``zeroshot`` for scenes): an
        :class:`ImageTextDataset`, or a :class:`WebDatasetImageText` stream for ``webdataset``."""
        if split not in self._datasets and self.streams:
            ds = self._shards(split, train=False)
            if len(ds) == 0:
                raise ValueError(f"clip: the {split} shards have no sample with an image and a caption")
            self._datasets[split] = ds
        if split not in self._datasets:
            records, images = self._records(split)
            if not records:
                raise ValueError(f"clip: the {split} split has no usable image ({self.bad.count} skipped)")
            root = self.image_root if self.source == "coco" else (
                self.image_root or (str(Path(self.paths[split]).parent) if self.source == "manifest" else None))
            self._datasets[split] = ImageTextDataset(records, self.transform, image_root=root, images=images,
                                                     per="caption", bad=self.bad, seed=self.seed)
        return self._datasets[split]

    def prepare_data(self) -> None:
        """Generate (or read) the scene cache."""
        if self.source == "scenes":
            self._records("train")

    def setup(self, stage: Optional[str] = None) -> None:
        splits = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",)}.get(stage or "",
                                                                                           ("train", "valid", "test"))
        for s in splits:
            if not (self.streams and s == "train"):
                self.dataset(s)
        if "train" in splits and self.streams and self._stream is None:
            self._stream = ClipStreamItems(self._shards("train", train=True), self.captions_per_item, self.seed)
        elif "train" in splits and self._train is None:
            self._train = ClipTrainItems(self.dataset("train"), self.captions_per_item, self.seed)

    # ------------------------------------------------------------------------------ loaders
    @property
    def train_items(self) -> ClipTrainItems:
        if self.streams:
            raise ValueError("clip: source webdataset streams its shards: its training rows cannot be indexed (samplers "
                             "that add negatives or mine need source scenes, manifest or coco)")
        if self._train is None:
            self.setup("fit")
        assert self._train is not None
        return self._train

    def row_inputs(self, rows: Sequence[int], side: str) -> dict[str, Tensor]:
        """Tower inputs of training ``rows`` (the refresh of model-dependent samplers such as ``faiss_hard``):
        images, or each row's first caption, as ``side`` is the image or the caption side."""
        return RowInputs(self.train_items, self.tokenizer, self.anchors)(rows, side)

    def _stream_loader(self) -> DataLoader:
        from contrastive.samplers.collate import generates, shapes_batches

        if generates(self.sampler) or shapes_batches(self.sampler):
            raise ValueError(f"clip: sampler {type(self.sampler).__name__} needs indexed training rows; source "
                             "webdataset streams its shards (use sampler in_batch or queue, or source manifest/coco)")
        if self._stream is None:
            self.setup("fit")
        assert self._stream is not None
        if len(self._stream) < self.batch_size:
            raise ValueError(f"clip: the train shards have {len(self._stream)} usable samples, fewer than "
                             f"batch_size={self.batch_size}")
        return DataLoader(self._stream, batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers,
                          collate_fn=ClipCollate(self.tokenizer, self.anchors))

    def train_dataloader(self) -> DataLoader:
        from contrastive.samplers.collate import attach_sampler

        if self.streams:
            return self._stream_loader()
        items = self.train_items
        if len(items) < self.batch_size:
            raise ValueError(f"clip: the train split has {len(items)} images, fewer than batch_size={self.batch_size}")
        if self.sampler is not None and hasattr(self.sampler, "bind"):
            if self.source != "scenes":
                raise ValueError(f"clip: sampler {type(self.sampler).__name__} generates scene negatives; it needs "
                                 "source: scenes")
            seen = None
            if getattr(self.sampler, "seen_combinations_only", False):  # the combinations of training positives
                seen = {(o.colour, o.shape) for scene in self.corpus["train"].scenes for o in scene.objects}
            gen = SceneNegativeGenerator(self.corpus["train"], self.tokenizer, self.transform, seed=self.seed,
                                         combos=seen)
            self.sampler.bind(SceneNegativeSource(gen, items, self.anchors))
        records = items.images.records
        ids = torch.tensor([r.image_id for r in records], dtype=torch.long)
        groups = torch.tensor([r.group for r in records], dtype=torch.long)
        loader = attach_sampler(
            self.sampler, items, ids=ids, groups=groups, base_collate=ClipCollate(self.tokenizer, self.anchors),
            candidate_inputs=RowInputs(items, self.tokenizer, self.anchors), generated_inputs=GeneratedInputs(),
            setup=not self._sampler_ready, batch_size=self.batch_size, seed=self.seed, num_workers=self.num_workers)
        self._sampler_ready = True
        return loader

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=ClipCollate(self.tokenizer, "captions"), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ------------------------------------------------------------------------------ evaluation data
    def compositional_items(self, split: str = "test") -> list[CompositionalItem]:
        """Generated scenes only: one negative caption per scene and category (empty for user data)."""
        if self.source != "scenes":
            return []
        self.dataset(split)
        assert self.scene_settings is not None
        return scene_compositional_items(self.corpus[split], seed=self.scene_settings.seed)

    def zero_shot_data(self) -> Optional[tuple[ImageTextDataset, list[str]]]:
        """The generated ``zeroshot`` split and its class names (the object shapes), or ``None``."""
        if self.source != "scenes":
            return None
        from datamodules.clip.grammar import SHAPES

        return self.dataset("zeroshot"), list(SHAPES)

    def split_images(self, split: str) -> Optional[np.ndarray]:
        self.dataset(split)
        return self.corpus[split].images if self.corpus is not None else None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {s: {"images": len(d.records), "captions": len(d)} if isinstance(d, ImageTextDataset)
                               else {"captions": len(d)} for s, d in self._datasets.items()}
        out["skipped_records"] = self.bad.count
        return out
