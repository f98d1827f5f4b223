"""Detection datamodules: a user's COCO-format data (``coco``) and the synthetic default (``synthetic_scenes``).

Batches are ``(images, targets)``:

- ``images`` float32 ``(B, 3, S, S)``, resized to ``image_size`` and normalised with ImageNet statistics;
- ``targets`` a list of ``B`` dicts: ``boxes`` float32 ``(n, 4)`` normalised ``(cx, cy, w, h)`` in ``[0, 1]``,
  ``labels`` int64 ``(n,)`` contiguous category indices, ``image_id`` (COCO id) and ``orig_size``
  ``(height, width)`` of the original image (predictions are mapped back to it for evaluation).

Training augmentation goes through ``torchvision.transforms.v2`` with ``tv_tensors.BoundingBoxes``, so
boxes follow every geometric transform; ``SanitizeBoundingBoxes`` drops boxes that an augmentation
shrinks to nothing.
"""
from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from contrastive.data.resumable import EpochTaggedBatchSampler, item_seed
from datamodules.detection.coco import CocoSplit, read_coco, with_frequency
from datamodules.detection.synthetic import SyntheticSpec, ensure_synthetic

log = logging.getLogger("datamodules.detection")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


def detection_transforms(image_size: int, train: bool, hflip: bool = True, scale_jitter: float = 0.0) -> v2.Compose:
    """Resize to ``image_size`` square; in training optionally flip and zoom out by up to ``scale_jitter``."""
    ops: list[Any] = []
    if train and scale_jitter > 0:
        ops.append(v2.RandomZoomOut(fill=0, side_range=(1.0, 1.0 + scale_jitter), p=0.5))
    ops.append(v2.Resize((image_size, image_size), antialias=True))
    if train and hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.SanitizeBoundingBoxes(min_size=1.0), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


class DetectionDataset(Dataset):
    """Images and boxes of one :class:`CocoSplit` passed through ``transform``.

    With ``cache_images`` the decoded uint8 images are kept in memory after their first read. An item key is a
    position, or an ``(epoch, position)`` pair (:class:`~contrastive.data.resumable.EpochTaggedBatchSampler`),
    whose random augmentation is then drawn from a generator seeded by ``(seed, epoch, position)``.
    """

    def __init__(self, split: CocoSplit, transform: v2.Compose, cache_images: bool = False, seed: int = 0) -> None:
        self.split, self.transform, self.cache_images, self.seed = split, transform, cache_images, int(seed)
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.split.images)

    def _image(self, i: int) -> Tensor:
        if i in self._cache:
            return self._cache[i]
        rec = self.split.images[i]
        try:
            with Image.open(rec.path) as im:
                arr = np.asarray(im.convert("RGB")).copy()
        except OSError as e:
            raise OSError(f"cannot read image {rec.path} (image id {rec.id}): {e}") from None
        if arr.shape[:2] != (rec.height, rec.width):
            raise ValueError(f"image {rec.path} (id {rec.id}) is {arr.shape[1]}x{arr.shape[0]} but the JSON says "
                             f"{rec.width}x{rec.height}")
        t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.cache_images:
            self._cache[i] = t
        return t

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        rec = self.split.images[i]
        image = tv_tensors.Image(self._image(i))
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(rec.boxes), format="XYXY", canvas_size=(rec.height, rec.width))
        sample = {"image": image, "boxes": boxes, "labels": torch.from_numpy(rec.labels)}
        if epoch is None:
            out = self.transform(sample)
        else:  # transforms.v2 draws from the global generator: fork it, seeded by (seed, epoch, position)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, epoch, i))
                out = self.transform(sample)
        h, w = out["image"].shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        norm = box_convert(out["boxes"].as_subclass(Tensor).float() / scale, "xyxy", "cxcywh")
        return out["image"].as_subclass(Tensor), {
            "boxes": norm.clamp(0.0, 1.0), "labels": out["labels"].long(), "image_id": torch.tensor(rec.id),
            "orig_size": torch.tensor([rec.height, rec.width])}


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class CocoDetectionDataModule(L.LightningDataModule):
    """COCO-format splits from user paths.

    Args:
        train_json, val_json, test_json: instances JSON of each split (``val_json`` defaults to ``test_json``).
        train_images, val_images, test_images: image folders (``file_name`` is relative to them);
            ``val_images`` defaults to ``test_images``.
        image_size: side of the square network input.
        batch_size, num_workers: loader settings (evaluation uses the same batch size).
        hflip, scale_jitter: training augmentation (see :func:`detection_transforms`).
        missing_images: ``"skip"`` (count and skip images missing on disk) or ``"error"``.
        cache_images: keep decoded images in memory.
        seed: seed of the training order and augmentation (a function of ``(seed, epoch)``, so that a
            resumed run repeats the interrupted one; see :class:`EpochTaggedBatchSampler`).
    """

    def __init__(self, train_json: str, train_images: str, test_json: str, test_images: str,
                 val_json: Optional[str] = None, val_images: Optional[str] = None, image_size: int = 64,
                 batch_size: int = 16, num_workers: int = 0, hflip: bool = True, scale_jitter: float = 0.0,
                 missing_images: Literal["skip", "error"] = "skip", cache_images: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.paths = {"train": (train_json, train_images), "test": (test_json, test_images),
                      "val": (val_json or test_json, val_images or test_images)}
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.hflip, self.scale_jitter, self.missing_images, self.cache_images = hflip, scale_jitter, missing_images, cache_images
        self.splits: dict[str, CocoSplit] = {}
        self.datasets: dict[str, DetectionDataset] = {}

    def _read(self, name: str) -> CocoSplit:
        if name not in self.splits:
            json_path, images = self.paths[name]
            self.splits[name] = read_coco(json_path, images, missing_images=self.missing_images)
        return self.splits[name]

    def setup(self, stage: Optional[str] = None) -> None:
        for name in SPLITS:
            if name not in self.datasets:
                split = self._read(name)
                if split.category_ids != self._read("train").category_ids:
                    raise ValueError(f"{self.paths[name][0]}: categories differ from the training split's "
                                     f"({self.paths['train'][0]})")
                tf = detection_transforms(self.image_size, name == "train", self.hflip, self.scale_jitter)
                self.datasets[name] = DetectionDataset(split, tf, self.cache_images, self.seed)

    # ------------------------------------------------------------------ what the model and evaluation need
    @property
    def train_split(self) -> CocoSplit:
        return self._read("train")

    @property
    def num_classes(self) -> int:
        return self.train_split.num_classes

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.train_split.categories]

    def category_parents(self) -> Optional[list[int]]:
        return self.train_split.parents()

    def frequency(self, name: str = "test") -> list[str]:
        """LVIS bucket of each category (from the JSON when given, else from training annotations)."""
        return with_frequency(self._read(name), self.train_split)

    def bad_input_report(self) -> dict[str, dict[str, int]]:
        return {name: s.report.as_dict() for name, s in self.splits.items()}

    def _loader(self, name: str) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets[name], batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_detection, drop_last=False,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per ``(seed, epoch)`` and resumable mid-epoch (:class:`EpochTaggedBatchSampler`)."""
        self.setup()
        batches = EpochTaggedBatchSampler(len(self.datasets["train"]), self.batch_size, seed=self.seed, drop_last=False)
        return DataLoader(self.datasets["train"], batch_sampler=batches, num_workers=self.num_workers,
                          collate_fn=collate_detection, generator=torch.Generator().manual_seed(self.seed),
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class SyntheticDetectionDataModule(CocoDetectionDataModule):
    """The embedded default: :mod:`datamodules.detection.synthetic` scenes generated once into ``cache_dir``
    (default ``$CONTRASTIVE_CACHE/detection``), then read like user data. Arguments as in
    :class:`datamodules.detection.synthetic.SyntheticSpec` and :class:`CocoDetectionDataModule`."""

    def __init__(self, num_categories: int = 50, train_images: int = 2000, val_images: int = 200,
                 test_images: int = 400, scene_size: int = 64, max_objects: int = 4, zipf_exponent: float = 1.2,
                 min_train_instances: int = 2, min_eval_instances: int = 1, coarse_fraction: float = 0.0,
                 seed: int = 0, cache_dir: Optional[str] = None, image_size: int = 64, batch_size: int = 16,
                 num_workers: int = 0, hflip: bool = True, scale_jitter: float = 0.0, cache_images: bool = True) -> None:
        self.spec = SyntheticSpec(num_categories=num_categories, image_size=scene_size, train_images=train_images,
                                  val_images=val_images, test_images=test_images, max_objects=max_objects,
                                  zipf_exponent=zipf_exponent, min_train_instances=min_train_instances,
                                  min_eval_instances=min_eval_instances, coarse_fraction=coarse_fraction, seed=seed)
        self.spec.check()
        self.cache_dir = cache_dir
        root = self.root = ensure_synthetic(self.spec, cache_dir)
        super().__init__(train_json=str(root / "train.json"), train_images=str(root / "images" / "train"),
                         val_json=str(root / "val.json"), val_images=str(root / "images" / "val"),
                         test_json=str(root / "test.json"), test_images=str(root / "images" / "test"),
                         image_size=image_size, batch_size=batch_size, num_workers=num_workers, hflip=hflip,
                         scale_jitter=scale_jitter, missing_images="error", cache_images=cache_images, seed=seed)


DETECTION_DATAMODULES: dict[str, type] = {"coco": CocoDetectionDataModule,
                                          "synthetic_scenes": SyntheticDetectionDataModule}


def build_detection_datamodule(name: str, **kwargs: Any) -> CocoDetectionDataModule:
    if name not in DETECTION_DATAMODULES:
        raise KeyError(f"unknown detection datamodule {name!r}; valid choices: {', '.join(DETECTION_DATAMODULES)}")
    return DETECTION_DATAMODULES[name](**kwargs)

