"""Evaluation against hand-computed cases: retrieval with several captions per image, zero-shot with
prompt templates, compositional accuracy (strict), the SugarCrepe reader, and the scene pipeline."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from datamodules.clip.evaluation import (
    SCENE_TEMPLATES, compositional_accuracy, compositional_correct, encode_dataset, evaluate_compositional,
    evaluate_zero_shot, image_text_retrieval,
    read_image_folder, read_sugarcrepe, scene_compositional_items, zero_shot_accuracy, zero_shot_classifier,
)
from datamodules.clip.grammar import SHAPES, caption_holds
from datamodules.clip.loaders import BadRecords, ImageTextDataError, ImageTextDataset, image_transform, scene_records
from datamodules.clip.models import build_clip_towers
from datamodules.clip.scenes import SceneSettings, build_scene_corpus


def test_retrieval_several_captions_per_image():
    # image 0 has captions 0 and 1, image 1 has caption 2
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [0.5, 0.0], [0.1, 1.0]])
    out = image_text_retrieval(images, texts, torch.tensor([0, 1]), torch.tensor([0, 0, 1]))
    # image 0: scores 0.6, 0.5, 0.1 -> caption 0 first (relevant): RR 1; image 1: 0.8, 0, 1.0 -> caption 2: RR 1
    assert out["i2t/mrr"] == 1.0 and out["i2t/success@1"] == 1.0
    # caption 0: image scores 0.6 vs 0.8 -> image 0 second (RR 1/2); caption 1: 0.5 vs 0 -> 1; caption 2: 0.1 vs 1 -> 1
    assert out["t2i/mrr"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["t2i/success@1"] == pytest.approx(2 / 3)


class TableTower(nn.Module):
    """Text tower for hand cases: ``ids[:, 0]`` indexes a fixed table."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)

    def forward(self, inputs):
        return self.table[inputs["ids"][:, 0]]


def test_zero_shot_templates_by_hand():
    prompts = ["a cat", "the cat", "a dog", "the dog"]
    tokenizer = lambda texts: torch.tensor([[prompts.index(t)] for t in texts])  # noqa: E731
    tower = TableTower([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    clf = zero_shot_classifier(tower, tokenizer, ["cat", "dog"], ["a {}", "the {}"])
    s = 2 ** -0.5
    assert torch.allclose(clf, torch.tensor([[s, s], [-s, -s]]), atol=1e-6)  # normalised mean of the prompts
    images = torch.tensor([[1.0, 0.2], [-0.3, -1.0], [0.1, 0.0], [-1.0, 1.0]])
    # scores vs cat: 1.2s, -1.3s, 0.1s, 0 ; vs dog: the negatives -> tie on the last image goes to class 0
    acc = zero_shot_accuracy(images, torch.tensor([0, 1, 1, 1]), clf, ks=(1, 2))
    assert acc == {"top1": 0.5, "top2": 1.0}


def test_compositional_accuracy_strict_per_category():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.1], [1.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    neg = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    acc = compositional_accuracy(img, pos, neg, ["swap_att", "swap_att", "add_obj", "add_obj"])
    # item 0: cos .995 > .707 right; item 1: .707 < 1 wrong; item 2: 1 > .707 right; item 3: tie -> wrong
    assert acc == {"swap_att": 0.5, "add_obj": 0.5, "mean": 0.5}
    assert compositional_correct(img, pos, neg).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="one row per item"):
        compositional_accuracy(img, pos, neg, ["a"])


def _save_png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_sugarcrepe_reader(tmp_path):
    data, images = tmp_path / "sugar", tmp_path / "val2017"
    _save_png(images / "000000000139.jpg", (255, 0, 0))
    data.mkdir()
    (data / "swap_att.json").write_text(json.dumps({
        "0": {"filename": "000000000139.jpg", "caption": "a red cup on a blue table",
              "negative_caption": "a blue cup on a red table"},
        "1": {"filename": "000000000285.jpg", "caption": "a bear", "negative_caption": "a bear and a cat"}}))
    (data / "add_obj.json").write_text(json.dumps({
        "5": {"filename": "000000000139.jpg", "caption": "a cup", "negative_caption": "a cup and a dog"}}))
    bad = BadRecords()
    items = read_sugarcrepe(data, images, bad=bad)
    assert [(it.category, it.caption, it.negative) for it in items] == [
        ("add_obj", "a cup", "a cup and a dog"), ("swap_att", "a red cup on a blue table", "a blue cup on a red table")]
    assert bad.count == 1 and "swap_att.json: item '1'" in bad.examples[0] and "000000000285.jpg" in bad.examples[0]
    with pytest.raises(ImageTextDataError, match=r"replace_rel\.json: cannot read"):
        read_sugarcrepe(data, images, categories=["replace_rel"])
    (data / "add_att.json").write_text(json.dumps({"3": {"filename": "x.jpg", "caption": "c"}}))
    with pytest.raises(ImageTextDataError, match=r"add_att\.json: item '3' lacks \['negative_caption'\]"):
        read_sugarcrepe(data, images)
    with pytest.raises(ImageTextDataError, match="no SugarCrepe file"):
        read_sugarcrepe(tmp_path, images)


def test_image_folder(tmp_path):
    _save_png(tmp_path / "folder" / "red_square" / "a.png", (255, 0, 0))
    _save_png(tmp_path / "folder" / "blue" / "b.png", (0, 0, 255))
    _save_png(tmp_path / "folder" / "blue" / "c.png", (0, 0, 250))
    recs, names = read_image_folder(tmp_path / "folder")
    assert names == ["blue", "red square"]
    assert [(r.label, r.captions) for r in recs] == [(0, ["blue"]), (0, ["blue"]), (1, ["red square"])]
    with pytest.raises(ImageTextDataError, match="not an image folder"):
        read_image_folder(tmp_path / "nothing")


def test_scene_pipeline_with_tiny_towers(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_CACHE", str(tmp_path))
    split = build_scene_corpus(SceneSettings(n_train=1, n_valid=0, n_test=8, n_zeroshot=6), use_cache=False)["test"]
    towers = build_clip_towers("clip-tiny")
    cfg = towers.preprocess_cfg
    transform = image_transform(64, cfg["mean"], cfg["std"])
    ds = ImageTextDataset(scene_records(split), transform, images=split.images)
    enc = encode_dataset(towers.image, towers.text, towers.tokenizer, ds)
    n_caps = sum(len(c) for c in split.captions)
    assert enc.image_emb.shape == (8, 64) and enc.text_emb.shape == (n_caps, 64)
    assert enc.text_image_ids.tolist() == [i for i, c in enumerate(split.captions) for _ in c]
    out = image_text_retrieval(enc.image_emb, enc.text_emb, enc.image_ids, enc.text_image_ids)
    assert {"i2t/mrr", "i2t/success@1", "i2t/recall@5", "t2i/mrr", "t2i/success@1", "t2i/map"} <= set(out)
    items = scene_compositional_items(split, seed=0)
    assert {it.category for it in items} >= {"replace_obj", "replace_att", "add_obj"}
    assert all(not caption_holds(it.negative, split.scenes[it.image]) for it in items)
    acc = evaluate_compositional(towers.image, towers.text, towers.tokenizer, items, transform, images=split.images,
                                 per_item=True)
    correct = acc.pop("correct")
    assert len(correct) == len(items)
    for cat, n in acc["items"].items():  # the per-item outcomes add up to the per-category accuracies
        assert sum(c for c, it in zip(correct, items) if it.category == cat) / n == pytest.approx(acc[cat])
    # the same numbers from embeddings computed item by item
    img = torch.cat([towers.image({"pixels": transform(Image.fromarray(split.images[it.image]))[None]}) for it in items])
    with torch.no_grad():
        pos = towers.text({"ids": towers.tokenizer([it.caption for it in items])})
        neg = towers.text({"ids": towers.tokenizer([it.negative for it in items])})
    ref = compositional_accuracy(img.detach(), pos, neg, [it.category for it in items])
    assert {k: v for k, v in acc.items() if k != "items"} == pytest.approx(ref)
    assert sum(acc["items"].values()) == len(items)
    clf = zero_shot_classifier(towers.text, towers.tokenizer, SHAPES, SCENE_TEMPLATES)
    zs = build_scene_corpus(SceneSettings(n_train=1, n_valid=0, n_test=0, n_zeroshot=6), use_cache=False)["zeroshot"]
    emb = towers.image({"pixels": torch.stack([transform(Image.fromarray(a)) for a in zs.images])}).detach()
    ref = zero_shot_accuracy(emb, torch.from_numpy(zs.labels), clf, ks=(1, 5))
    assert ref["top5"] == 1.0  # five shapes
    zs_ds = ImageTextDataset(scene_records(zs), transform, images=zs.images)
    got = evaluate_zero_shot(towers.image, towers.text, towers.tokenizer, zs_ds, SHAPES, SCENE_TEMPLATES, ks=(1, 5))
    assert got == pytest.approx(ref)
    with pytest.raises(ValueError, match="class labels"):
        evaluate_zero_shot(towers.image, towers.text, towers.tokenizer,
                           ImageTextDataset([], transform), SHAPES)
