"""Image–text data from a user's path: CSV/TSV/JSONL manifests, COCO-captions JSON, WebDataset shards;
and the generated scenes in the same record form.

Every source becomes :class:`ImageTextRecord` s: one per image, with all its captions (several captions
of one image are several positives). :class:`ImageTextDataset` turns records into items

``{"image": FloatTensor (3, H, W), "caption": str, "image_id": int, "caption_id": int, "group": int,
"label": int}``

with one item per caption (``per="caption"``, evaluation: every positive) or per image (``per="image"``,
training: a caption drawn per epoch, as open_clip does). ``image_id`` is the record's index; it is the
relevance label for retrieval (an image and a caption are relevant iff their ``image_id`` match).
``group`` marks known duplicates (identical scene graphs for generated scenes; the image id otherwise)
and ``label`` a class index (-1 when none). :class:`ImageTextCollate` tokenizes and stacks items into

``{"pixels": (B, 3, H, W), "ids": (B, L) long, "image_id": (B,), "caption_id": (B,), "group": (B,),
"label": (B,)}``

Bad input: a row without an image or a caption, an image file that is missing or does not decode, a
caption file without text. With ``on_error="skip"`` (default) the record is skipped, counted in
:class:`BadRecords` and logged with its file and row; with ``"raise"`` an :class:`ImageTextDataError`
names them. An undecodable image found only while training yields ``None``, which the collate drops and
counts (``skipped`` in the batch).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from datamodules.clip.scenes import SceneSplit

log = logging.getLogger("datamodules.clip")

ON_ERROR = ("skip", "raise")
MAX_LOGGED = 20
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTENSIONS = ("txt", "json")


class ImageTextDataError(ValueError):
    """Input that cannot be read as image–text data; the message names the file and row or key."""


@dataclass
class BadRecords:
    """Counts (and, with ``on_error="raise"``, raises for) records that cannot be used."""

    on_error: str = "skip"
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}; got {self.on_error!r}")

    def report(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.on_error == "raise":
            raise ImageTextDataError(message)
        self.count += 1
        if len(self.examples) < MAX_LOGGED:
            self.examples.append(message)
            log.warning("skipped %s", message)


@dataclass
class ImageTextRecord:
    """One image and its captions. ``image``: a path (absolute, or relative to the dataset's root), or an
    index into an in-memory array; ``source``: where the record comes from (``file:line``)."""

    image: str | int
    captions: list[str]
    image_id: int = -1
    group: int = -1
    label: int = -1
    source: str = ""


def read_json(path: Path, what: str) -> Any:
    """The JSON document in ``path``; an :class:`ImageTextDataError` naming the file if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImageTextDataError(f"{path}: cannot read {what} ({e})") from None


def _finish(records: list[ImageTextRecord]) -> list[ImageTextRecord]:
    for i, r in enumerate(records):
        r.image_id = i
        if r.group < 0:
            r.group = i
    return records


def _check_file(root: Path | None, image: str) -> bool:
    return (Path(image) if root is None else root / image).is_file()


def _group_rows(rows: Iterator[tuple[str, str, str, str]], root: Path | None, bad: BadRecords,
                check_files: bool) -> list[ImageTextRecord]:
    """``(image, caption, where, ...)`` rows -> records, captions of the same image merged."""
    by_image: dict[str, ImageTextRecord] = {}
    missing: set[str] = set()
    for image, caption, where, _ in rows:
        if not image:
            bad.report(where, "row has no image")
            continue
        if not caption:
            bad.report(where, f"row has no caption (image {image!r})")
            continue
        if image not in by_image:
            if image in missing or (check_files and not _check_file(root, image)):
                missing.add(image)
                bad.report(where, f"image file {image!r} not found" + (f" under {root}" if root else ""))
                continue
            by_image[image] = ImageTextRecord(image, [], source=where)
        by_image[image].captions.append(caption)
    return _finish(list(by_image.values()))


def read_manifest(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                  image_column: str = "filepath", caption_column: str = "title", delimiter: str | None = None,
                  bad: BadRecords | None = None, check_files: bool = True) -> list[ImageTextRecord]:
    """Records from a CSV, TSV (``.tsv``/``.txt``: tab) or JSONL (``.jsonl``/``.json``: one object a line)
    manifest. Column defaults are open_clip's (``filepath``, ``title``); image paths are relative to
    ``image_root`` (default: the manifest's folder) unless absolute. A caption column holding a list
    gives several captions."""
    path = Path(path)
    bad = bad or BadRecords()
    root = Path(image_root) if image_root is not None else path.parent
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ImageTextDataError(f"{path}: manifest not found")

    def rows() -> Iterator[tuple[str, str, str, str]]:
        with open(path, newline="", encoding="utf-8") as f:
            if suffix in (".jsonl", ".json"):
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{path}:{line_no}"
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        bad.report(where, f"not a JSON object ({e.msg})")
                        continue
                    if not isinstance(obj, dict):
                        bad.report(where, "not a JSON object")
                        continue
                    caps = obj.get(caption_column)
                    for cap in (caps if isinstance(caps, list) else [caps]):
                        yield str(obj.get(image_column) or ""), str(cap or "").strip(), where, ""
                return
            sep = delimiter or ("\t" if suffix in (".tsv", ".txt") else ",")
            reader = csv.DictReader(f, delimiter=sep)
            missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise ImageTextDataError(f"{path}: manifest lacks column(s) {missing}; found {reader.fieldnames} "
                                         f"(set image_column / caption_column)")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                yield (row.get(image_column) or "").strip(), (row.get(caption_column) or "").strip(), where, ""

    return _group_rows(rows(), root, bad, check_files)


def read_coco_captions(path: str | os.PathLike, image_root: str | os.PathLike,
                       bad: BadRecords | None = None, check_files: bool = True) -> list[ImageTextRecord]:
    """Records from a COCO-captions JSON (``images``: ``{id, file_name}``; ``annotations``:
    ``{image_id, caption}``); every caption of an image is one of its positives. ``label`` is COCO's id."""
    path = Path(path)
    bad = bad or BadRecords()
    data = read_json(path, "COCO captions JSON")
    if not isinstance(data, dict):
        raise ImageTextDataError(f"{path}: a COCO captions file is a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ImageTextDataError(f"{path}: COCO captions JSON lacks the list {key!r}")
    files: dict[Any, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ImageTextDataError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
        files[img["id"]] = img["file_name"]
    caps: dict[Any, list[str]] = {k: [] for k in files}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ImageTextDataError(f"{path}: annotations[{i}] lacks 'image_id' or 'caption'")
        if ann["image_id"] not in caps:
            bad.report(f"{path}: annotations[{i}]", f"image_id {ann['image_id']!r} is not in 'images'")
            continue
        text = str(ann["caption"]).strip()
        if text:
            caps[ann["image_id"]].append(text)
    root = Path(image_root)
    records = []
    for coco_id, name in files.items():
        where = f"{path}: image id {coco_id} ({name})"
        if not caps[coco_id]:
            bad.report(where, "image has no caption")
        elif check_files and not _check_file(root, name):
            bad.report(where, f"image file not found under {root}")
        else:
            label = int(coco_id) if isinstance(coco_id, int) else -1
            records.append(ImageTextRecord(name, caps[coco_id], label=label, source=where))
    return _finish(records)


def scene_records(split: SceneSplit) -> list[ImageTextRecord]:
    """The generated scenes as records: ``image`` indexes ``split.images``; ``group`` the scene-graph group;
    ``label`` the first object's shape class."""
    return [ImageTextRecord(i, list(caps), i, int(split.groups[i]), int(split.labels[i]), f"scene {i}")
            for i, caps in enumerate(split.captions)]


# ------------------------------------------------------------------------------------ datasets

def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    train: bool = False) -> Callable[[Image.Image], Tensor]:
    """open_clip's preprocessing (resize, centre crop, to tensor, normalise) for PIL images."""
    import open_clip
    return open_clip.image_transform(image_size, is_train=train, mean=tuple(mean), std=tuple(std))


class ImageTextDataset(Dataset):
    """Items of ``records`` (see the module docstring); ``None`` for an image that fails to decode when
    ``bad.on_error == "skip"``.

    Args:
        records: from one of the readers above.
        transform: PIL image -> ``(3, H, W)`` tensor.
        image_root: folder that relative image paths are under.
        images: ``(N, H, W, 3)`` uint8 array for records whose ``image`` is an index (generated scenes).
        per: ``"caption"`` (one item per caption) or ``"image"`` (one per image, caption drawn from
            ``(seed, epoch, index)``; call :meth:`set_epoch`).
    """

    def __init__(self, records: Sequence[ImageTextRecord], transform: Callable[[Image.Image], Tensor],
                 image_root: str | os.PathLike | None = None, images: np.ndarray | None = None,
                 per: str = "caption", bad: BadRecords | None = None, seed: int = 0) -> None:
        if per not in ("caption", "image"):
            raise ValueError(f"per must be 'caption' or 'image'; got {per!r}")
        self.records = list(records)
        self.transform, self.images, self.per, self.seed = transform, images, per, seed
        self.image_root = Path(image_root) if image_root is not None else None
        self.bad = bad or BadRecords()
        self.epoch = 0
        # (record index, caption index) of every caption; its position is the caption id
        self.pairs = [(r, c) for r, rec in enumerate(self.records) for c in range(len(rec.captions))]
        self._first = np.cumsum([0] + [len(rec.captions) for rec in self.records])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs) if self.per == "caption" else len(self.records)

    @property
    def caption_image_ids(self) -> Tensor:
        """``(num_captions,)`` the image id of every caption (the relevance labels of text queries)."""
        return torch.tensor([self.records[r].image_id for r, _ in self.pairs], dtype=torch.long)

    def load_image(self, rec: ImageTextRecord) -> Image.Image | None:
        if isinstance(rec.image, (int, np.integer)):
            assert self.images is not None, "records index an image array; pass images="
            return Image.fromarray(self.images[int(rec.image)])
        path = Path(rec.image) if self.image_root is None else self.image_root / rec.image
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            self.bad.report(f"{rec.source or path}", f"image {str(path)!r} cannot be read ({type(e).__name__}: {e})")
            return None

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        if self.per == "caption":
            r, c = self.pairs[i]
        else:
            r = i
            n = len(self.records[r].captions)
            c = int(np.random.default_rng([self.seed, self.epoch, r]).integers(n))
        rec = self.records[r]
        img = self.load_image(rec)
        if img is None:
            return None
        return {"image": self.transform(img), "caption": rec.captions[c], "image_id": rec.image_id,
                "caption_id": int(self._first[r] + c), "group": rec.group, "label": rec.label}


class ImageTextCollate:
    """Items -> batch (see the module docstring); ``None`` items are dropped and counted in ``skipped``."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor]) -> None:
        self.tokenizer = tokenizer

    @staticmethod
    def contract_fields(batch: Mapping[str, Any], paired: bool = True) -> dict[str, Any]:
        """Keyword arguments of the core's ``ContrastiveBatch`` for a collated batch: captions are the
        anchors (``{"ids", "mask"}``), images the candidates (``{"pixels"}``); an anchor's positives are the
        images with its ``image_id``; ``group`` marks known duplicates. ``paired`` (caption ``i`` belongs
        to image ``i`` and no image repeats) holds for ``per="image"`` batches."""
        ids = batch["ids"]
        return {"anchors": {"ids": ids, "mask": ids != 0}, "candidates": {"pixels": batch["pixels"]},
                "anchor_ids": batch["caption_id"], "candidate_ids": batch["image_id"],
                "anchor_labels": batch["image_id"], "candidate_labels": batch["image_id"],
                "anchor_groups": batch["group"], "candidate_groups": batch["group"], "paired": paired}

    def __call__(self, items: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
        good = [it for it in items if it is not None]
        batch: dict[str, Any] = {"skipped": len(items) - len(good)}
        if not good:
            return batch
        batch["pixels"] = torch.stack([it["image"] for it in good])
        batch["ids"] = self.tokenizer([it["caption"] for it in good])
        for key in ("image_id", "caption_id", "group", "label"):
            batch[key] = torch.tensor([int(it[key]) for it in good], dtype=torch.long)
        return batch


def scene_datasets(splits: Mapping[str, SceneSplit], transform: Callable[[Image.Image], Tensor],
                   train_per: str = "image", seed: int = 0) -> dict[str, ImageTextDataset]:
    """An :class:`ImageTextDataset` per generated split: ``train`` one item per image (a caption drawn
    per epoch), the others one item per caption (every positive)."""
    return {name: ImageTextDataset(scene_records(split), transform, images=split.images,
                                   per=train_per if name == "train" else "caption", seed=seed)
            for name, split in splits.items()}


def sample_id(url: str, key: str) -> int:
    """A stable non-negative 62-bit id of a WebDataset sample from its shard's file name and its key."""
    digest = hashlib.sha1(f"{Path(url).name}/{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def webdataset_urls(spec: str | Sequence[str], what: str = "shards") -> str | list[str]:
    """Shard locations: a list of files, a glob (``data/train-*.tar``, expanded and sorted) or a brace
    pattern (``data/train-{000..009}.tar``, passed to webdataset, which expands it). A glob or file that
    matches nothing is an :class:`ImageTextDataError` naming it."""
    import glob

    if not isinstance(spec, str):
        urls = [str(u) for u in spec]
        missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
        if not urls or missing:
            raise ImageTextDataError(f"{what}: shard file(s) not found: {missing[:5] or '(empty list)'}")
        return urls
    if "{" in spec or "://" in spec or spec.startswith("pipe:"):
        return spec
    urls = sorted(glob.glob(os.path.expanduser(spec)))
    if not urls:
        raise ImageTextDataError(f"{what}: no shard matches {spec!r}")
    return urls


class WebDatasetImageText(IterableDataset):
    """Items from WebDataset tar shards (``webdataset`` package): an image (``jpg``/``jpeg``/``png``/
    ``webp``/``bmp``) and a caption (``txt``, or ``json`` with ``caption_field``: a string or a list).
    ``image_id`` (= ``group``) is a stable id of the sample, :func:`sample_id` of its shard's file name and
    key, the same in every worker and every epoch. A sample without an image or caption, or whose image does
    not decode, is skipped and counted (once, however many passes) or raises, naming the shard and the key.

    ``per="image"``: one item per sample with a caption drawn from ``(seed, image_id)`` (``caption_id`` =
    ``image_id``); ``per="caption"``: one item per caption (evaluation: every positive), ``caption_id`` the
    :func:`sample_id` of ``key#c``. ``shuffle > 0``: a shard order and a sample buffer of that size
    (training), new on every pass and drawn from ``seed`` and the pass number (in a loader worker: from the
    worker's seed, which the loader draws anew each epoch); shards are split over DDP ranks and loader
    workers. :meth:`samples` gives the decoded samples with all their captions.
    """

    def __init__(self, urls: str | Sequence[str], transform: Callable[[Image.Image], Tensor],
                 caption_field: str = "caption", bad: BadRecords | None = None, seed: int = 0,
                 per: str = "image", shuffle: int = 0) -> None:
        if per not in ("caption", "image"):
            raise ValueError(f"per must be 'caption' or 'image'; got {per!r}")
        self.urls = urls if isinstance(urls, str) else list(urls)
        self.transform, self.caption_field, self.seed = transform, caption_field, seed
        self.per, self.shuffle, self.passes = per, int(shuffle), 0
        self.bad = bad or BadRecords()
        self._reported: set[str] = set()
        self._length: int | None = None

    def _pipeline(self) -> Any:
        import webdataset as wds
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        seed = int(np.random.default_rng([self.seed, self.passes if info is None else info.seed]).integers(2**31))
        self.passes += 1
        shards = self.shuffle > 0 and not isinstance(self.urls, str) and len(self.urls) > 1
        pipe = wds.WebDataset(self.urls, shardshuffle=len(self.urls) if shards else False, detshuffle=shards,
                              seed=seed, nodesplitter=wds.split_by_node, empty_check=False)
        return pipe.shuffle(self.shuffle, seed=seed) if self.shuffle > 0 else pipe

    def _report(self, where: str, reason: str) -> None:
        if where not in self._reported:
            self._reported.add(where)
            self.bad.report(where, reason)

    def _captions(self, sample: Mapping[str, Any]) -> list[str]:
        cap_key = next((k for k in CAPTION_EXTENSIONS if k in sample), None)
        captions: list[str] = []
        if cap_key == "txt":
            captions = [sample["txt"].decode("utf-8", "replace").strip()]
        elif cap_key == "json":
            try:
                value = json.loads(sample["json"]).get(self.caption_field)
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                value = None
            captions = [str(v).strip() for v in (value if isinstance(value, list) else [value]) if v]
        return [c for c in captions if c]

    def samples(self) -> Iterator[tuple[int, Image.Image, list[str], str, str]]:
        """``(image_id, RGB image, captions, shard, sample key)`` of every usable sample, in stream order."""
        for sample in self._pipeline():
            url, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
            where = f"{url}: sample {key!r}"
            img_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
            if img_key is None:
                self._report(where, f"no image ({'/'.join(IMAGE_EXTENSIONS)})")
                continue
            captions = self._captions(sample)
            if not captions:
                self._report(where, "no caption (txt, or json with " + repr(self.caption_field) + ")")
                continue
            try:
                with Image.open(io.BytesIO(sample[img_key])) as im:
                    img = im.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError) as e:
                self._report(where, f"image {img_key!r} cannot be decoded ({type(e).__name__}: {e})")
                continue
            yield sample_id(url, key), img, captions, url, key

    def __len__(self) -> int:
        """Items of one pass (samples with an image and a caption; images are not decoded here), counted
        once by reading the shards."""
        if self._length is None:
            import webdataset as wds

            n = 0
            for sample in wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                         empty_check=False):
                if any(k in sample for k in IMAGE_EXTENSIONS):
                    caps = self._captions(sample)
                    n += (len(caps) if self.per == "caption" else 1) if caps else 0
            self._length = n
        return self._length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, img, captions, url, key in self.samples():
            image = self.transform(img)
            base = {"image": image, "image_id": index, "group": index, "label": -1}
            if self.per == "image":
                c = int(np.random.default_rng([self.seed, index]).integers(len(captions)))
                yield {**base, "caption": captions[c], "caption_id": index}
            else:
                for c, caption in enumerate(captions):
                    yield {**base, "caption": caption, "caption_id": sample_id(url, f"{key}#{c}")}
