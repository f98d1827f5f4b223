"""WebDataset shards as a ClipDataModule source (``data.source: webdataset``), on tiny shards made here:
streamed training batches with a corrupt image skipped and counted (or raising by the switch), shuffled
passes, evaluation with several captions per image, and training and testing through the module."""
from __future__ import annotations

import io
import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from contrastive.losses import InfoNCELoss
from datamodules.clip.datamodule import ClipDataModule
from datamodules.clip.loaders import ImageTextDataError, sample_id
from datamodules.clip.model import ClipModule
from datamodules.clip.samplers import SceneImageSampler
from tests.test_clip_loaders import _tar as _shard

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
           "white": (245, 245, 245), "black": (10, 10, 10)}


def _png(rgb, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """train: 2 shards, 12 good samples (txt captions) + 1 corrupt image; valid/test: 6 samples with 2
    captions each (json lists)."""
    names = list(COLOURS)
    train = [[], []]
    for i in range(12):
        c = names[i % 6]
        train[i % 2].append((f"t{i:03d}", {"png": _png(COLOURS[c], i), "txt": f"a {c} square".encode()}))
    train[1].append(("t_bad", {"png": b"\x89PNG not really", "txt": b"a broken square"}))
    for k, samples in enumerate(train):
        _shard(tmp_path / f"train-{k:03d}.tar", samples)
    for split in ("valid", "test"):
        _shard(tmp_path / f"{split}-000.tar", [
            (f"{split}{i}", {"png": _png(COLOURS[c], 100 + i),
                             "json": json.dumps({"caption": [f"a {c} square", f"something {c}"]}).encode()})
            for i, c in enumerate(names)])
    return tmp_path


def _dm(root, **kw):
    paths = {"train": str(root / "train-*.tar"), "valid": str(root / "valid-000.tar"),
             "test": [str(root / "test-000.tar")]}
    return ClipDataModule(source="webdataset", paths=paths, batch_size=4, eval_batch_size=5, **kw)


def test_streamed_training_batches_skip_and_count_a_corrupt_image(shards, caplog):
    dm = _dm(shards, captions_per_item=1, shuffle_buffer=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 13 // 4  # counted without decoding: the corrupt sample is only found when read
    orders = []
    for _ in range(2):
        batches = list(loader)
        ids = torch.cat([b["c_id"] for b in batches])
        assert all(b["a_ids"].shape[0] == 4 and b["c_pixels"].shape == (4, 3, 64, 64) for b in batches)
        orders.append(ids.tolist())
    assert dm.bad.count == 1  # counted once over two passes
    assert "train-001.tar: sample 't_bad': image 'png' cannot be decoded" in dm.bad.examples[0]
    assert "t_bad" in caplog.text
    assert orders[0] != orders[1]  # a new shuffle every pass
    good = {sample_id(str(shards / f"train-{i % 2:03d}.tar"), f"t{i:03d}") for i in range(12)}
    assert set(orders[0]) <= good and set(orders[1]) <= good

    strict = _dm(shards, on_error="raise", shuffle_buffer=8)
    strict.setup("fit")
    with pytest.raises(ImageTextDataError, match="t_bad"):
        list(strict.train_dataloader())


def test_evaluation_items_keep_every_caption(shards):
    dm = _dm(shards)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    labels = torch.cat([b["a_label"] for b in batches])
    assert labels.numel() == 12 and torch.unique(labels).numel() == 6  # 2 captions of each of 6 images
    assert torch.unique(torch.cat([b["a_id"] for b in batches])).numel() == 12


def test_samplers_that_index_rows_are_refused_and_bad_paths_named(shards):
    dm = _dm(shards, sampler=SceneImageSampler())
    dm.setup("fit")
    with pytest.raises(ValueError, match="needs indexed training rows"):
        dm.train_dataloader()
    with pytest.raises(ImageTextDataError, match=r"data\.paths\.train: no shard matches"):
        ClipDataModule(source="webdataset", paths={"train": str(shards / "nope-*.tar"), "valid": str(shards / "valid-000.tar"),
                                                   "test": str(shards / "test-000.tar")}).setup("fit")


def test_trains_and_tests_through_the_clip_module(shards, tmp_path):
    torch.manual_seed(0)
    dm = _dm(shards, captions_per_item=1, shuffle_buffer=8)
    module = ClipModule(InfoNCELoss(), warmup_steps=1)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    trainer.test(module, datamodule=dm, verbose=False)
    m = module.last_metrics
    assert m["test/num_images"] == 6 and m["test/num_captions"] == 12
    assert 0.0 <= m["test/t2i/R@1"] <= 1.0 and 0.0 <= m["test/i2t/R@1"] <= 1.0
