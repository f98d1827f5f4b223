"""The category-query head starts from an open_clip text tower's embeddings of the class names: a tiny
randomly initialised open_clip model is exported to a temporary folder in open_clip's format, and the
head's category embeddings equal open_clip's own normalised text embeddings of the prompts (or their
projection); missing files and wrong formats are config errors naming the key and the file."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from contrastive.config.errors import ConfigError
from contrastive.config.loader import Provenance
from contrastive.detection.build import validate_detection
from contrastive.detection.heads import CategoryQueryHead
from contrastive.detection.text_init import class_embeddings

NAMES = ["red circle", "striped_blue square", "green star"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A randomly initialised clip-tiny exported like the clip setting does (checkpoint + model-config JSON)."""
    import os

    from datamodules.clip.models import build_clip_towers

    tmp = tmp_path_factory.mktemp("textinit")
    old = os.environ.get("CONTRASTIVE_CACHE")
    os.environ["CONTRASTIVE_CACHE"] = str(tmp / "cache")  # register_model_config writes its JSON there
    try:
        torch.manual_seed(3)
        paths = build_clip_towers("clip-tiny").export(tmp / "export")
    finally:
        if old is None:
            os.environ.pop("CONTRASTIVE_CACHE")
        else:
            os.environ["CONTRASTIVE_CACHE"] = old
    return paths


def reference(paths, prompts):
    """open_clip run directly on the exported files."""
    open_clip.add_model_config(paths["model_config"])
    model, _, _ = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(paths["checkpoint"]))
    model.eval()
    with torch.no_grad():
        return F.normalize(model.encode_text(open_clip.get_tokenizer("clip-tiny")(prompts)), dim=-1)


def test_category_embeddings_are_the_text_towers_embeddings_of_the_prompts(exported):
    spec = {"checkpoint": str(exported["checkpoint"]), "model_config": str(exported["model_config"]),
            "prompt": "a photo of a {}."}
    emb = class_embeddings(spec, NAMES)
    want = reference(exported, ["a photo of a red circle.", "a photo of a striped blue square.",
                                "a photo of a green star."])
    assert emb.shape == (3, 64)
    assert torch.allclose(emb, want, atol=1e-6)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)  # the names matter
    # model_config defaults to <name>.json beside the checkpoint (as the export writes it)
    assert torch.equal(class_embeddings({"checkpoint": spec["checkpoint"], "prompt": spec["prompt"]}, NAMES), emb)
    head = CategoryQueryHead(num_classes=3, d_model=16, num_selected=3, embed_dim=64, nheads=2, init_embeddings=emb)
    assert torch.allclose(head.embeddings.data, want, atol=1e-6)
    # another width: a fixed projection of the text embeddings, normalised
    narrow = CategoryQueryHead(num_classes=3, d_model=16, num_selected=3, embed_dim=8, nheads=2, init_embeddings=emb)
    proj = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) / math.sqrt(64)
    assert torch.allclose(narrow.embeddings.data, F.normalize(want @ proj, dim=1), atol=1e-5)


def test_missing_files_and_wrong_formats_are_named(exported, tmp_path):
    ckpt, cfg = str(exported["checkpoint"]), str(exported["model_config"])
    with pytest.raises(ConfigError, match=r"head.init_embeddings.checkpoint: file not found: .*nope.bin"):
        class_embeddings({"checkpoint": str(tmp_path / "nope.bin")}, NAMES)
    with pytest.raises(ConfigError, match=r"head.init_embeddings.model_config: file not found"):
        class_embeddings({"checkpoint": ckpt, "model_config": str(tmp_path / "none.json")}, NAMES)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match=r"junk.bin does not load as an open_clip checkpoint"):
        class_embeddings({"checkpoint": str(junk), "model_config": cfg}, NAMES)
    with pytest.raises(ConfigError, match=r"give model_config"):  # nothing tells which model it is
        class_embeddings({"checkpoint": str(junk)}, NAMES)
    bad_cfg = tmp_path / "clip-bad.json"
    bad_cfg.write_text('{"embed_dim": 64}')
    with pytest.raises(ConfigError, match=r"model_config: .*clip-bad.json.*lacks"):
        class_embeddings({"checkpoint": ckpt, "model_config": str(bad_cfg)}, NAMES)
    other = tmp_path / "clip-other.json"  # a config of another model: the checkpoint's weights do not fit it
    other.write_text(exported["model_config"].read_text().replace('"embed_dim": 64', '"embed_dim": 32'))
    with pytest.raises(ConfigError, match=r"does not load as an open_clip checkpoint of the model in .*clip-other.json"):
        class_embeddings({"checkpoint": ckpt, "model_config": str(other)}, NAMES)
    with pytest.raises(ConfigError, match=r"not a torch file"):
        class_embeddings(str(junk), NAMES)


def test_config_checks_the_init_embeddings_section():
    base = {"task": "detection", "experiment": "x", "data": {"name": "synthetic_scenes"}, "model": {},
            "head": {"name": "category_query"}}

    def check(init):
        return validate_detection({**base, "head": {**base["head"], "init_embeddings": init}}, Provenance())

    check("embeddings.pt")
    check({"checkpoint": "m.bin", "prompt": "{}"})
    with pytest.raises(ConfigError, match="head.init_embeddings.checkpoint"):
        check({"prompt": "a {}"})
    with pytest.raises(ConfigError, match="head.init_embeddings.tokenizer"):
        check({"checkpoint": "m.bin", "tokenizer": "x"})
    with pytest.raises(ConfigError, match="one '{}'"):
        check({"checkpoint": "m.bin", "prompt": "a photo"})


def test_fit_starts_from_the_text_towers_embeddings(exported, tmp_path):
    """Through the CLI: the trained run's config names the checkpoint, and the run trains."""
    from pathlib import Path

    from contrastive.cli import main

    cfg = Path(__file__).resolve().parents[1] / "configs" / "detection" / "category_query.yaml"
    args = ["data.num_categories=10", "data.train_images=8", "data.val_images=4", "data.test_images=4",
            "data.batch_size=4", "trainer.max_steps=1", "trainer.enable_progress_bar=false", "run.num_threads=1",
            "run.test_after_fit=false", "head.embed_dim=64", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.output_dir={tmp_path / 'runs'}", f"head.init_embeddings.checkpoint={exported['checkpoint']}"]
    assert main(["fit", str(cfg), *args]) == 0
    assert main(["fit", str(cfg), *args[:-1], f"head.init_embeddings.checkpoint={tmp_path / 'gone.bin'}"]) == 2
