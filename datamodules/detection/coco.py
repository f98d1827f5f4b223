"""Read a COCO-format detection split (instances JSON + image folder) into clean, typed records.

Accepted category lists are COCO's, LVIS's (``frequency`` in ``{"r", "c", "f"}``) and V3Det's; a category may
name its parent with ``parent`` (or ``parent_id``), which gives the optional hierarchy. Bad input is handled
so that training never crashes on it, and every case is counted and named (:class:`CocoReadReport`):

- a box reaching outside its image is clipped to the image (``clipped``);
- a box of zero width or height (after clipping) is dropped (``dropped_zero_area``);
- an annotation whose ``category_id`` is not in ``categories`` is an error naming the annotation id;
- an image listed in the JSON but missing on disk is skipped and counted (``missing_images``), or raises
  when ``missing_images="error"``.

Boxes are kept in absolute ``xyxy`` pixels of the original image; categories get contiguous indices
``0..C-1`` in the order of their ids (:attr:`CocoSplit.category_ids` maps back).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

log = logging.getLogger("datamodules.detection")

#: LVIS bucket limits: rare = at most 10 training images, common = 11..100, frequent = more than 100.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
BUCKETS = ("r", "c", "f")


class CocoFormatError(ValueError):
    """A detection JSON that cannot be used (the message names the file and the record)."""


@dataclass
class Category:
    """One category: COCO ``id`` and ``name``, LVIS ``frequency`` (``"r"``/``"c"``/``"f"`` or ``None``) and
    the ``parent`` category id (``None`` for a root or a flat vocabulary)."""

    id: int
    name: str
    frequency: Optional[str] = None
    parent: Optional[int] = None


@dataclass
class ImageRecord:
    """One image: ``boxes`` float32 ``(n, 4)`` absolute ``xyxy``, ``labels`` int64 ``(n,)`` contiguous
    category indices, ``areas`` float32 ``(n,)`` (the JSON's ``area`` when given, else ``w * h``)."""

    id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    ann_ids: np.ndarray


@dataclass
class CocoReadReport:
    """Counts of repaired or skipped input, with up to ``max_examples`` examples each (annotation ids or
    file names) for the log message."""

    source: str = ""
    clipped: int = 0
    dropped_zero_area: int = 0
    missing_images: int = 0
    examples: dict[str, list[Any]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, kind: str, example: Any) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    def summary(self) -> str:
        parts = []
        for kind, what in (("clipped", "boxes outside the image clipped (annotation ids"),
                           ("dropped_zero_area", "zero-area boxes dropped (annotation ids"),
                           ("missing_images", "listed images missing on disk, skipped (files")):
            n = getattr(self, kind)
            if n:
                parts.append(f"{n} {what} {self.examples.get(kind, [])}{' ...' if n > self.max_examples else ''})")
        return f"{self.source}: " + ("; ".join(parts) if parts else "clean")

    def as_dict(self) -> dict[str, int]:
        return {"clipped": self.clipped, "dropped_zero_area": self.dropped_zero_area,
                "missing_images": self.missing_images}


@dataclass
class CocoSplit:
    """A cleaned split: ``images`` (only those that exist on disk), ``categories`` (sorted by id) and the
    read report. ``coco`` is the cleaned JSON dict that evaluation uses as ground truth."""

    images: list[ImageRecord]
    categories: list[Category]
    report: CocoReadReport
    coco: dict[str, Any]

    @property
    def category_ids(self) -> list[int]:
        return [c.id for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def parents(self) -> Optional[list[int]]:
        """Contiguous parent index per category (``-1`` for a root), or ``None`` without a hierarchy."""
        if all(c.parent is None for c in self.categories):
            return None
        index = {c.id: i for i, c in enumerate(self.categories)}
        return [index.get(c.parent, -1) if c.parent is not None else -1 for c in self.categories]

    def images_per_category(self) -> np.ndarray:
        """``(C,)`` number of images holding at least one box of each category."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for im in self.images:
            counts[np.unique(im.labels)] += 1
        return counts


def frequency_buckets(images_per_category: Sequence[int]) -> list[str]:
    """LVIS buckets from training-image counts: ``"r"`` (<= 10 images), ``"c"`` (11-100), ``"f"`` (> 100)."""
    return ["r" if n <= RARE_MAX_IMAGES else "c" if n <= COMMON_MAX_IMAGES else "f" for n in images_per_category]


def _require(record: dict, keys: Sequence[str], what: str, source: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise CocoFormatError(f"{source}: {what} lacks {', '.join(repr(k) for k in missing)}")


def _categories(raw: Any, source: str) -> list[Category]:
    if not isinstance(raw, list) or not raw:
        raise CocoFormatError(f"{source}: 'categories' must be a non-empty list")
    cats, seen = [], set()
    for i, c in enumerate(raw):
        _require(c, ("id", "name"), f"categories[{i}]", source)
        if c["id"] in seen:
            raise CocoFormatError(f"{source}: category id {c['id']} appears twice")
        seen.add(c["id"])
        freq = c.get("frequency")
        if freq is not None and freq not in BUCKETS:
            raise CocoFormatError(f"{source}: category {c['id']} has frequency {freq!r}; expected one of r, c, f")
        parent = c.get("parent", c.get("parent_id"))
        cats.append(Category(int(c["id"]), str(c["name"]), freq, None if parent is None else int(parent)))
    for c in cats:
        if c.parent is not None and c.parent not in seen:
            raise CocoFormatError(f"{source}: category {c.id} names parent {c.parent}, which is not a category")
    return sorted(cats, key=lambda c: c.id)


def read_coco(json_path: str | os.PathLike, image_root: str | os.PathLike,
              missing_images: Literal["skip", "error"] = "skip", check_files: bool = True) -> CocoSplit:
    """Read ``json_path`` with images under ``image_root``; see the module docstring for the repairs.

    Raises:
        CocoFormatError: malformed JSON, an unknown ``category_id`` (naming the annotation id), a box
            that is not four numbers, or (with ``missing_images="error"``) an image missing on disk.
    """
    source, root = str(json_path), Path(image_root)
    if missing_images not in ("skip", "error"):
        raise ValueError(f"missing_images must be 'skip' or 'error'; got {missing_images!r}")
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CocoFormatError(f"{source}: annotation file not found") from None
    except ValueError as e:
        raise CocoFormatError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{source}: the top level must be an object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{source}: missing or non-list '{key}'")
    cats = _categories(data["categories"], source)
    index = {c.id: i for i, c in enumerate(cats)}
    report = CocoReadReport(source=source)

    images: dict[int, dict] = {}
    for i, im in enumerate(data["images"]):
        _require(im, ("id", "file_name", "width", "height"), f"images[{i}]", source)
        if im["id"] in images:
            raise CocoFormatError(f"{source}: image id {im['id']} appears twice")
        images[im["id"]] = im
    per_image: dict[int, list[tuple[list[float], int, float, int]]] = {k: [] for k in images}
    clean_anns = []
    for a in data["annotations"]:
        _require(a, ("id", "image_id", "category_id", "bbox"), f"annotation {a.get('id', '?')}", source)
        if a["category_id"] not in index:
            raise CocoFormatError(f"{source}: annotation {a['id']} has category_id {a['category_id']}, which is not "
                                  f"in 'categories'")
        if a["image_id"] not in images:
            raise CocoFormatError(f"{source}: annotation {a['id']} refers to image_id {a['image_id']}, which is not "
                                  f"in 'images'")
        bbox = a["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise CocoFormatError(f"{source}: annotation {a['id']} has bbox {bbox!r}; expected [x, y, w, h]")
        if a.get("iscrowd", 0):
            continue
        im = images[a["image_id"]]
        x0, y0, w, h = (float(v) for v in bbox)
        x1, y1 = x0 + w, y0 + h
        cx0, cy0 = min(max(x0, 0.0), im["width"]), min(max(y0, 0.0), im["height"])
        cx1, cy1 = min(max(x1, 0.0), im["width"]), min(max(y1, 0.0), im["height"])
        if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
            report.add("dropped_zero_area", a["id"])
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            report.add("clipped", a["id"])
        area = float(a["area"]) if "area" in a and (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1) else (cx1 - cx0) * (cy1 - cy0)
        per_image[a["image_id"]].append(([cx0, cy0, cx1, cy1], index[a["category_id"]], area, int(a["id"])))
        clean_anns.append({**a, "bbox": [cx0, cy0, cx1 - cx0, cy1 - cy0], "area": area, "iscrowd": 0})

    records, kept_ids = [], set()
    for img_id, im in images.items():
        path = root / im["file_name"]
        if check_files and not path.is_file():
            if missing_images == "error":
                raise CocoFormatError(f"{source}: image {img_id} file {path} does not exist")
            report.add("missing_images", str(path))
            continue
        anns = per_image[img_id]
        records.append(ImageRecord(
            id=int(img_id), path=path, width=int(im["width"]), height=int(im["height"]),
            boxes=np.array([b for b, _, _, _ in anns], dtype=np.float32).reshape(-1, 4),
            labels=np.array([c for _, c, _, _ in anns], dtype=np.int64),
            areas=np.array([s for _, _, s, _ in anns], dtype=np.float32),
            ann_ids=np.array([i for _, _, _, i in anns], dtype=np.int64)))
        kept_ids.add(img_id)
    if report.clipped or report.dropped_zero_area or report.missing_images:
        log.warning("%s", report.summary())
    coco = {"images": [images[i] for i in images if i in kept_ids],
            "annotations": [a for a in clean_anns if a["image_id"] in kept_ids],
            "categories": data["categories"]}
    return CocoSplit(records, cats, report, coco)


def with_frequency(split: CocoSplit, train: CocoSplit) -> list[str]:
    """Each category's bucket in ``split``: its JSON ``frequency`` when every category has one, else
    computed from the images per category of ``train`` (:func:`frequency_buckets`)."""
    if train.category_ids != split.category_ids:
        raise CocoFormatError(f"{split.report.source}: its categories differ from the training split's "
                              f"({train.report.source})")
    if all(c.frequency is not None for c in split.categories):
        return [c.frequency for c in split.categories]  # type: ignore[misc]
    return frequency_buckets(train.images_per_category().tolist())
