"""Detection data: the COCO reader's repairs and errors, frequency buckets, augmentation with boxes, and
the synthetic default (determinism, vocabulary sizes, hierarchy, atomic cache)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.detection import (CocoDetectionDataModule, CocoFormatError, DetectionDataset, SyntheticSpec,
                                   attribute_grid, detection_transforms, ensure_synthetic, frequency_buckets,
                                   read_coco, with_frequency)


def write_dataset(root: Path, images: list[dict], anns: list[dict], cats: list[dict], create=None) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for im in images:
        if create is None or im["id"] in create:
            Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(root / "img" / im["file_name"])
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
IMAGES = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
          {"id": 2, "file_name": "b.png", "width": 40, "height": 30}]


def test_reader_clips_drops_and_names_annotations(tmp_path, caplog):
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [-4, 20, 50, 20]},  # outside: clipped
            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [3, 3, 0, 8]},  # zero width: dropped
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [45, 3, 5, 8]}]  # right of the image: dropped
    path = write_dataset(tmp_path, IMAGES, anns, CATS)
    with caplog.at_level("WARNING"):
        split = read_coco(path, tmp_path / "img")
    assert split.report.as_dict() == {"clipped": 1, "dropped_zero_area": 2, "missing_images": 0}
    assert split.report.examples == {"clipped": [11], "dropped_zero_area": [12, 13]}
    assert "11" in caplog.text and "12" in caplog.text
    im1 = split.images[0]
    np.testing.assert_allclose(im1.boxes, [[5, 5, 15, 15], [0, 20, 40, 30]])
    assert im1.labels.tolist() == [0, 1] and split.category_ids == [3, 7]
    assert split.images[1].boxes.shape == (0, 4)
    assert [a["id"] for a in split.coco["annotations"]] == [10, 11]
    assert split.coco["annotations"][1]["bbox"] == [0, 20, 40, 10]


def test_unknown_category_names_the_annotation(tmp_path):
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]},
            {"id": 99, "image_id": 2, "category_id": 5, "bbox": [5, 5, 10, 10]}]
    path = write_dataset(tmp_path, IMAGES, anns, CATS)
    with pytest.raises(CocoFormatError, match=r"annotation 99 has category_id 5"):
        read_coco(path, tmp_path / "img")


def test_missing_images_skipped_or_raised(tmp_path):
    anns = [{"id": 10, "image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 10]}]
    path = write_dataset(tmp_path, IMAGES, anns, CATS, create={1})
    split = read_coco(path, tmp_path / "img")
    assert [im.id for im in split.images] == [1] and split.report.missing_images == 1
    assert "b.png" in split.report.summary()
    assert split.coco["annotations"] == [] and [im["id"] for im in split.coco["images"]] == [1]
    with pytest.raises(CocoFormatError, match="b.png"):
        read_coco(path, tmp_path / "img", missing_images="error")


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match="bad.json"):
        read_coco(bad, tmp_path)
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a", "parent": 4}]}))
    with pytest.raises(CocoFormatError, match="parent 4"):
        read_coco(bad, tmp_path)


def test_frequency_buckets_from_training_images(tmp_path):
    assert frequency_buckets([0, 1, 10, 11, 100, 101]) == ["r", "r", "r", "c", "c", "f"]
    # category 3 in 11 images (common, twice in one image counts once), 7 in 2 images (rare)
    images = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 20} for i in range(1, 12)]
    anns = [{"id": 100 + i, "image_id": i, "category_id": 3, "bbox": [1, 1, 5, 5]} for i in range(1, 12)]
    anns += [{"id": 200, "image_id": 1, "category_id": 3, "bbox": [8, 8, 5, 5]},
             {"id": 201, "image_id": 1, "category_id": 7, "bbox": [8, 8, 5, 5]},
             {"id": 202, "image_id": 2, "category_id": 7, "bbox": [8, 8, 5, 5]}]
    train = read_coco(write_dataset(tmp_path, images, anns, CATS), tmp_path / "img")
    assert train.images_per_category().tolist() == [11, 2]
    assert with_frequency(train, train) == ["c", "r"]
    lvis = [{"id": 3, "name": "cat", "frequency": "f"}, {"id": 7, "name": "dog", "frequency": "r"}]
    given = read_coco(write_dataset(tmp_path / "lvis", images, anns, lvis), tmp_path / "lvis" / "img")
    assert with_frequency(given, given) == ["f", "r"]


def test_augmentation_moves_boxes_with_the_image(tmp_path):
    img = np.zeros((30, 40, 3), np.uint8)
    img[5:15, 2:12] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 5, 10, 10]}]
    path = tmp_path / "i.json"
    path.write_text(json.dumps({"images": IMAGES[:1], "annotations": anns, "categories": CATS}))
    split = read_coco(path, tmp_path)
    torch.manual_seed(0)
    ds = DetectionDataset(split, detection_transforms(32, train=True, hflip=True))
    seen = set()
    for _ in range(20):
        x, t = ds[0]
        assert x.shape == (3, 32, 32)
        cx, cy, w, h = t["boxes"][0].tolist()
        assert abs(w - 10 / 40) < 1e-5 and abs(h - 10 / 30) < 1e-5 and abs(cy - 10 / 30) < 1e-5
        seen.add(round(cx, 4))
        # the bright square is where the box says
        col = int(cx * 32)
        assert x[0, int(cy * 32), col] > 1.0
    assert seen == {round(7 / 40, 4), round(1 - 7 / 40, 4)}


def test_synthetic_vocabularies_and_hierarchy(tmp_path):
    assert attribute_grid(50) == (4, 4, 4) and attribute_grid(800) == (10, 10, 8)
    for v in (50, 200, 800):
        g = attribute_grid(v)
        assert g[0] * g[1] * g[2] >= v
    spec = SyntheticSpec(num_categories=20, train_images=30, val_images=5, test_images=8, seed=3)
    root = ensure_synthetic(spec, tmp_path)
    train = read_coco(root / "train.json", root / "images" / "train", missing_images="error")
    test = read_coco(root / "test.json", root / "images" / "test", missing_images="error")
    leaves = [c for c in json.loads((root / "train.json").read_text())["categories"] if c["level"] == 2]
    assert len(leaves) == 20
    parents = train.parents()
    names = [c.name for c in train.categories]
    for i, p in enumerate(parents):
        if p >= 0:  # "striped red circle" -> "red circle" -> "circle"
            assert names[i].endswith(names[p])
    leaf_idx = [train.category_ids.index(c["id"]) for c in leaves]
    assert (train.images_per_category()[leaf_idx] >= 1).all() and (test.images_per_category()[leaf_idx] >= 1).all()
    assert train.report.as_dict() == {"clipped": 0, "dropped_zero_area": 0, "missing_images": 0}
    # deterministic and cached: a second call returns the same folder; another folder gets identical bytes
    assert ensure_synthetic(spec, tmp_path) == root
    again = ensure_synthetic(spec, tmp_path / "other")
    assert (again / "train.json").read_bytes() == (root / "train.json").read_bytes()
    assert (again / "images/train/train_000003.png").read_bytes() == (root / "images/train/train_000003.png").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_synthetic_cache_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_CACHE", str(tmp_path / "env"))
    root = ensure_synthetic(SyntheticSpec(num_categories=4, train_images=4, val_images=2, test_images=2))
    assert root.parent == tmp_path / "env" / "detection"


def test_datamodule_batches(tmp_path):
    spec_root = ensure_synthetic(SyntheticSpec(num_categories=8, train_images=6, val_images=2, test_images=3), tmp_path)
    dm = CocoDetectionDataModule(str(spec_root / "train.json"), str(spec_root / "images/train"),
                                 str(spec_root / "test.json"), str(spec_root / "images/test"), image_size=48, batch_size=4)
    dm.setup()
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 48, 48) and len(targets) == 4
    for t in targets:
        assert t["boxes"].shape[1] == 4 and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        assert t["labels"].max() < dm.num_classes and t["orig_size"].tolist() == [64, 64]
    assert len(dm.frequency("test")) == dm.num_classes
