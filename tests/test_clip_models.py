"""open_clip towers: build by name / YAML, the tower contract, the clamped logit scale, export that
open_clip loads, and a user's open_clip checkpoint loaded into the towers."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch

from datamodules.clip.models import (
    CHECKPOINT_NAME, LOGIT_SCALE_MAX, MODEL_CONFIG_DIR, ModelConfigError, build_clip_towers, load_model_config,
)

SHIPPED = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))

CAPTIONS = ["a small red circle left of a blue square", "there is a cross", "a picture of a white diamond"] * 2


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_CACHE", str(tmp_path / "cache"))


def _inputs(towers, n=6):
    torch.manual_seed(0)
    size = towers.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    return {"pixels": torch.randn(n, 3, size, size)}, {"ids": towers.tokenizer(CAPTIONS[:n])}


def test_shipped_configs_are_listed():
    assert {"clip-tiny", "clip-tiny-timm", "clip-tiny-timm-t4", "clip-tiny-rn"} <= set(SHIPPED)


@pytest.mark.parametrize("arch", SHIPPED)
def test_tower_contract_and_gradients(arch):
    t = build_clip_towers(arch)
    img, txt = _inputs(t)
    a, b = t.image(img), t.text(txt)
    assert a.shape == b.shape == (6, t.model_cfg["embed_dim"])
    assert torch.allclose(a.norm(dim=-1), torch.ones(6), atol=1e-5)
    # identical to open_clip's own encoders
    assert torch.allclose(a, t.model.encode_image(img["pixels"], normalize=True), atol=1e-6)
    assert torch.allclose(b, t.model.encode_text(txt["ids"], normalize=True), atol=1e-6)
    # shorter ids are padded to the context length; a mask entry is ignored
    short = txt["ids"][:, :12]
    assert torch.allclose(t.text({"ids": short, "mask": short > 0}), b, atol=1e-6)
    loss = torch.nn.functional.cross_entropy(t.logit_scale() * a @ b.T, torch.arange(6))
    loss.backward()
    params = dict(t.model.named_parameters())
    no_grad = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert no_grad == [], no_grad
    # towers hold the model's own parameters, without copies
    ids = {id(p) for m in (t.image, t.text, t.logit_scale) for p in m.parameters()}
    assert ids == {id(p) for p in params.values()}


def test_logit_scale_is_open_clips_and_clamped():
    t = build_clip_towers("clip-tiny")
    assert t.logit_scale.logit_scale is t.model.logit_scale
    assert float(t.logit_scale()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        t.model.logit_scale.fill_(7.0)
    assert float(t.logit_scale()) == pytest.approx(100.0, rel=1e-5)
    assert float(t.model.logit_scale) == pytest.approx(LOGIT_SCALE_MAX)
    with torch.no_grad():
        t.model.logit_scale.fill_(-1.0)
    assert float(t.logit_scale()) == pytest.approx(1.0)
    # used twice in one graph (e.g. two loss terms): the in-range parameter is not touched again
    with torch.no_grad():
        t.model.logit_scale.fill_(2.0)
    (t.logit_scale() * 2 + t.logit_scale()).backward()
    assert float(t.model.logit_scale.grad) == pytest.approx(3 * math.exp(2.0))


def test_builtin_open_clip_name_random_init():
    t = build_clip_towers("RN50", force_image_size=64)  # any open_clip architecture by name
    img, txt = _inputs(t, 2)
    assert t.image(img).shape == (2, 1024) and t.text(txt).shape == (2, 1024)


@pytest.mark.parametrize("arch", SHIPPED)
def test_export_loads_with_open_clip(tmp_path, arch):
    t = build_clip_towers(arch)
    with torch.no_grad():  # "train": change every weight, and push the logit scale past its clamp
        for p in t.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        t.model.logit_scale.fill_(6.0)
    img, txt = _inputs(t)
    paths = t.export(tmp_path / "export")
    assert paths["checkpoint"].name == CHECKPOINT_NAME
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(
        [CHECKPOINT_NAME, f"{arch}.json", "open_clip_config.json"])  # no temporary files
    open_clip.add_model_config(paths["model_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(paths["checkpoint"]))
    model.eval(), t.model.eval()
    assert torch.allclose(model.encode_image(img["pixels"]), t.model.encode_image(img["pixels"]), atol=1e-6)
    assert torch.allclose(model.encode_text(txt["ids"]), t.model.encode_text(txt["ids"]), atol=1e-6)
    assert float(model.logit_scale) == pytest.approx(math.log(100))
    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    local.eval()
    assert torch.allclose(local.encode_text(txt["ids"]), t.model.encode_text(txt["ids"]), atol=1e-6)


def test_user_open_clip_checkpoint_loads_into_towers(tmp_path):
    """A checkpoint as open_clip's trainer writes it (``state_dict`` with DDP's ``module.`` prefix)."""
    build_clip_towers("clip-tiny")  # registers clip-tiny with open_clip, as a user's config would be
    user = open_clip.create_model("clip-tiny")
    with torch.no_grad():
        user.logit_scale.fill_(3.0)
    ckpt = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in user.state_dict().items()}}, ckpt)
    t = build_clip_towers("clip-tiny", pretrained=ckpt)
    img, txt = _inputs(t)
    user.eval(), t.model.eval()
    assert torch.allclose(t.image(img), user.encode_image(img["pixels"], normalize=True), atol=1e-6)
    assert torch.allclose(t.text(txt), user.encode_text(txt["ids"], normalize=True), atol=1e-6)
    assert float(t.logit_scale()) == pytest.approx(math.exp(3.0))


def test_yaml_config_from_a_path_and_bad_input(tmp_path):
    cfg = tmp_path / "my-clip.yaml"
    cfg.write_text("embed_dim: 32\nvision_cfg: {image_size: 32, patch_size: 8, width: 64, head_width: 32, layers: 1}\n"
                   "text_cfg: {context_length: 16, vocab_size: 49408, width: 32, heads: 1, layers: 1}\n")
    t = build_clip_towers(str(cfg))
    assert t.name == "my-clip" and "my-clip" in open_clip.list_models()
    assert t.image({"pixels": torch.randn(2, 3, 32, 32)}).shape == (2, 32)
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed_dim: 32\nvision_cfg: {}\n")
    with pytest.raises(ModelConfigError, match=r"bad\.yaml: model config lacks \['text_cfg'\]"):
        load_model_config(bad)
    with pytest.raises(ModelConfigError, match="unknown architecture 'no-such-model'"):
        build_clip_towers("no-such-model")
    with pytest.raises(ModelConfigError, match="nothing is downloaded"):
        build_clip_towers("clip-tiny", pretrained="openai")


def test_tiny_config_step_is_cheap():
    """Forward + backward + AdamW of clip-tiny at batch 32 of 64x64 images: the process's CPU time on one
    thread (immune to other jobs on a shared machine) is well under a second (about 0.1 s measured)."""
    import time
    t = build_clip_towers("clip-tiny")
    opt = torch.optim.AdamW(t.model.parameters(), 1e-3)
    pixels = torch.randn(32, 3, 64, 64)
    ids = t.tokenizer(["a small red circle left of a blue square and a large green cross"] * 32)

    def step() -> None:
        a, b = t.image({"pixels": pixels}), t.text({"ids": ids})
        torch.nn.functional.cross_entropy(t.logit_scale() * a @ b.T, torch.arange(32)).backward()
        opt.step()
        opt.zero_grad()

    step()
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        step()
        best = min(best, time.process_time() - start)
    assert best < 0.5, best
