"""Image–text loaders on tiny files made here: CSV/TSV/JSONL manifests, COCO captions, WebDataset shards,
with missing and corrupt images and rows without an image or a caption."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.clip.loaders import (
    BadRecords, ImageTextCollate, ImageTextDataError, ImageTextDataset, WebDatasetImageText, image_transform,
    read_coco_captions, read_manifest, sample_id, scene_datasets, scene_records,
)
from datamodules.clip.scenes import SceneSettings, build_scene_corpus

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TRANSFORM = image_transform(16, MEAN, STD)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "red.png").write_bytes(_png((255, 0, 0)))
    (root / "blue.png").write_bytes(_png((0, 0, 255)))
    (root / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    return root


def _tokenize(texts):
    return torch.tensor([[len(t), t.count(" ")] for t in texts])


def test_csv_manifest_groups_captions_and_skips_bad_rows(tmp_path, images):
    m = tmp_path / "train.csv"
    m.write_text("filepath,title\nred.png,a red thing\nblue.png,a blue thing\nred.png,crimson\n"
                 ",no image here\nblue.png,\nmissing.png,a ghost\ncorrupt.jpg,broken\nmissing.png,again\n")
    bad = BadRecords()
    recs = read_manifest(m, images, bad=bad)
    assert [(r.image, r.captions, r.image_id) for r in recs] == [
        ("red.png", ["a red thing", "crimson"], 0), ("blue.png", ["a blue thing"], 1), ("corrupt.jpg", ["broken"], 2)]
    assert bad.count == 4
    assert any("train.csv:9: image file 'missing.png' not found" in e for e in bad.examples)
    assert any("train.csv:5: row has no image" in e for e in bad.examples)
    assert any("train.csv:6: row has no caption" in e for e in bad.examples)
    assert any("train.csv:7: image file 'missing.png' not found" in e for e in bad.examples)
    # the corrupt image is found at decode time: skipped, counted, and the collate drops it
    ds = ImageTextDataset(recs, TRANSFORM, images, bad=bad)
    assert len(ds) == 4 and ds.caption_image_ids.tolist() == [0, 0, 1, 2]
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ImageTextCollate(_tokenize))))
    assert batch["skipped"] == 1 and bad.count == 5 and "corrupt.jpg" in bad.examples[-1]
    assert batch["pixels"].shape == (3, 3, 16, 16)
    assert batch["image_id"].tolist() == [0, 0, 1] and batch["caption_id"].tolist() == [0, 1, 2]
    assert batch["ids"].tolist()[1] == [len("crimson"), 0]
    # the red image normalised: red channel (1 - 0.5) / 0.5 = 1, others -1
    assert torch.allclose(batch["pixels"][0, :, 8, 8], torch.tensor([1.0, -1.0, -1.0]))


def test_manifest_raise_mode_names_the_row(tmp_path, images):
    m = tmp_path / "m.tsv"
    m.write_text("path\tcap\nred.png\tred\n\tnothing\n")
    with pytest.raises(ImageTextDataError, match=r"m\.tsv:3: row has no image"):
        read_manifest(m, images, image_column="path", caption_column="cap", bad=BadRecords("raise"))
    recs = read_manifest(tmp_path / "m.tsv", images, image_column="path", caption_column="cap")
    ds = ImageTextDataset(read_manifest(_write(tmp_path / "c.csv", "filepath,title\ncorrupt.jpg,x\n"), images),
                          TRANSFORM, images, bad=BadRecords("raise"))
    with pytest.raises(ImageTextDataError, match=r"c\.csv:2: image .*corrupt\.jpg.* cannot be read"):
        ds[0]
    assert len(recs) == 1
    with pytest.raises(ImageTextDataError, match=r"m\.tsv: manifest lacks column\(s\) \['filepath', 'title'\]"):
        read_manifest(m, images)


def _write(path, text):
    path.write_text(text)
    return path


def test_jsonl_manifest_with_caption_lists(tmp_path, images):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": str(images / "red.png"), "text": ["red", "scarlet"]}) + "\n"
                 "not json\n" + json.dumps({"text": "orphan"}) + "\n")
    bad = BadRecords()
    recs = read_manifest(m, image_column="image", caption_column="text", bad=bad)
    assert len(recs) == 1 and recs[0].captions == ["red", "scarlet"]  # an absolute path ignores the root
    assert bad.count == 2 and "m.jsonl:2: not a JSON object" in bad.examples[0]
    assert "m.jsonl:3: row has no image" in bad.examples[1]


def test_coco_captions_several_positives(tmp_path, images):
    coco = {"images": [{"id": 7, "file_name": "red.png"}, {"id": 9, "file_name": "blue.png"},
                       {"id": 11, "file_name": "gone.png"}, {"id": 12, "file_name": "blue.png"}],
            "annotations": [{"image_id": 7, "caption": "red one"}, {"image_id": 9, "caption": "blue one"},
                            {"image_id": 7, "caption": " a red square "}, {"image_id": 11, "caption": "lost"},
                            {"image_id": 99, "caption": "dangling"}]}
    path = _write(tmp_path / "captions_val.json", json.dumps(coco))
    bad = BadRecords()
    recs = read_coco_captions(path, images, bad=bad)
    assert [(r.image, r.captions, r.label) for r in recs] == [("red.png", ["red one", "a red square"], 7),
                                                               ("blue.png", ["blue one"], 9)]
    assert bad.count == 3  # dangling annotation, missing file, image without captions
    ds = ImageTextDataset(recs, TRANSFORM, images)
    assert ds.caption_image_ids.tolist() == [0, 0, 1]
    with pytest.raises(ImageTextDataError, match=r"captions_val\.json: COCO captions JSON lacks the list 'annotations'"):
        read_coco_captions(_write(tmp_path / "captions_val.json", json.dumps({"images": []})), images)
    with pytest.raises(ImageTextDataError, match=r"annotations\[0\] lacks 'image_id' or 'caption'"):
        read_coco_captions(_write(tmp_path / "c2.json", json.dumps({"images": [], "annotations": [{"id": 1}]})),
                           images)


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards(tmp_path):
    shard = _tar(tmp_path / "shard-000.tar", [
        ("s0", {"png": _png((255, 0, 0)), "txt": b"a red thing"}),
        ("s1", {"png": b"garbage", "txt": b"broken"}),
        ("s2", {"txt": b"no image"}),
        ("s3", {"png": _png((0, 0, 255)), "json": json.dumps({"caption": ["blue", "navy"]}).encode()}),
        ("s4", {"png": _png((0, 255, 0))}),
    ])
    bad = BadRecords()
    items = list(WebDatasetImageText(str(shard), TRANSFORM, bad=bad))
    assert [it["caption"] for it in items][0] == "a red thing" and items[1]["caption"] in ("blue", "navy")
    assert [it["image_id"] for it in items] == [sample_id(str(shard), "s0"), sample_id(str(shard), "s3")]
    assert len({sample_id("a.tar", "s0"), sample_id("b.tar", "s0"), sample_id("a.tar", "s1")}) == 3
    assert bad.count == 3
    assert "shard-000.tar: sample 's1': image 'png' cannot be decoded" in bad.examples[0]
    assert "'s2': no image" in bad.examples[1] and "'s4': no caption" in bad.examples[2]
    with pytest.raises(ImageTextDataError, match="s1"):
        list(WebDatasetImageText(str(shard), TRANSFORM, bad=BadRecords("raise")))
    batch = ImageTextCollate(_tokenize)(items)
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["skipped"] == 0


def test_scene_records_and_per_image_sampling():
    split = build_scene_corpus(SceneSettings(n_train=12, n_valid=0, n_test=0, n_zeroshot=0), use_cache=False)["train"]
    recs = scene_records(split)
    ds = ImageTextDataset(recs, image_transform(64, MEAN, STD), images=split.images, per="image", seed=1)
    assert len(ds) == 12
    a = [ds[i]["caption"] for i in range(12)]
    assert a == [ds[i]["caption"] for i in range(12)]  # deterministic within an epoch
    ds.set_epoch(1)
    b = [ds[i]["caption"] for i in range(12)]
    assert a != b and all(c in split.captions[i] for i, c in enumerate(b))
    item = ds[3]
    datasets = scene_datasets({"train": split, "test": split}, image_transform(64, MEAN, STD))
    assert datasets["train"].per == "image" and datasets["test"].per == "caption"
    batch = ImageTextCollate(_tokenize)([datasets["train"][i] for i in range(4)])
    fields = ImageTextCollate.contract_fields(batch)
    assert fields["anchors"]["ids"].shape[0] == fields["candidates"]["pixels"].shape[0] == 4
    assert fields["anchor_labels"].tolist() == fields["candidate_ids"].tolist() == [0, 1, 2, 3]
    assert fields["candidate_groups"].tolist() == split.groups[:4].tolist()
    assert item["group"] == split.groups[3] and item["label"] == split.labels[3]
    expected = (split.images[3].astype(np.float32) / 255 - 0.5) / 0.5
    assert torch.allclose(item["image"], torch.from_numpy(expected).permute(2, 0, 1), atol=0.02)
