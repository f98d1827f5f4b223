"""``contrastive export``: a clip run trained through the CLI is written as an open_clip checkpoint that
open_clip loads with the same image and text embeddings and logit scale; exports are atomic and never
overwrite; a setting without an export format is a one-line error; a user's open_clip checkpoint
fine-tunes here (``model.pretrained``)."""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from contrastive.cli import Job, load_config, main
from contrastive.runs import read_checkpoint
from datamodules.clip.models import CHECKPOINT_NAME, build_clip_towers
from tests.test_configs_run import FAST, clip_overrides

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "configs" / "clip" / "infonce.yaml"
ARCH = load_config(EXP, [])["model"]["architecture"]  # the default towers (configs/model/clip_tiny.yaml)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip_export")
    assert main(["fit", str(EXP), *clip_overrides(tmp), *FAST, "run.test_after_fit=false"]) == 0
    return tmp, tmp / "runs" / "clip_infonce" / "version_0"


def _trained_module(run: Path):
    """The run's model rebuilt from its saved config with its best checkpoint loaded."""
    job = Job(load_config(run / "config.yaml", []), run)
    job.model.load_state_dict(read_checkpoint(run / "checkpoints" / "best.ckpt")["state_dict"])
    return job.model.eval(), job.datamodule


def test_export_loads_in_open_clip_with_the_same_embeddings_and_scale(trained, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "Exported" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKPOINT_NAME, f"{ARCH}.json", "open_clip_config.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    module, dm = _trained_module(run)
    open_clip.add_model_config(out / f"{ARCH}.json")  # open_clip's own registration of the model config
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(out / CHECKPOINT_NAME))
    model.eval()
    batch = next(iter(dm.val_dataloader()))  # captions as anchors, images as candidates
    with torch.no_grad():
        ours_img = module.towers.image({"pixels": batch["c_pixels"]})
        ours_txt = module.towers.text({"ids": batch["a_ids"]})
        theirs_img = model.encode_image(batch["c_pixels"], normalize=True)
        theirs_txt = model.encode_text(batch["a_ids"], normalize=True)
        ours_scale = 1.0 / float(module.loss_fn.temperature())
    assert torch.allclose(ours_img, theirs_img, atol=1e-5)
    assert torch.allclose(ours_txt, theirs_txt, atol=1e-5)
    assert float(model.logit_scale.exp()) == pytest.approx(ours_scale, rel=1e-5)
    # trained: not the initial weights
    fresh = build_clip_towers(ARCH)
    assert not torch.allclose(fresh.model.encode_image(batch["c_pixels"][:4]), theirs_img[:4], atol=1e-3)
    # the checkpoint names a trained run; open_clip's preprocessing is the model config's
    assert preprocess.transforms[0].size in (64, (64, 64))


def test_export_never_overwrites_and_needs_a_run(trained, tmp_path, capsys):
    tmp, run = trained
    out = tmp_path / "exported"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main(["export", str(EXP)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]
    assert not (run / "export").exists()


def test_a_setting_without_export_is_a_one_line_error(tmp_path, capsys):
    from contrastive.config.loader import save_resolved
    from omegaconf import OmegaConf

    run = tmp_path / "runs" / "codesearch_infonce" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    save_resolved(OmegaConf.create(load_config(ROOT / "configs" / "codesearch" / "infonce.yaml", [])),
                  run / "config.yaml")
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no export format" in err[0], err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


def test_a_users_open_clip_checkpoint_fine_tunes_here(tmp_path):
    """An open_clip training checkpoint (``state_dict`` with DDP's ``module.`` prefix) as ``model.pretrained``:
    its weights are loaded, and training runs from them."""
    build_clip_towers(ARCH)  # registers the shipped model config with open_clip, as the user's setup would
    torch.manual_seed(123)
    user = open_clip.create_model(ARCH)
    with torch.no_grad():
        user.logit_scale.fill_(3.0)
    ckpt = tmp_path / "epoch_5.pt"
    torch.save({"epoch": 5, "state_dict": {f"module.{k}": v for k, v in user.state_dict().items()}}, ckpt)
    overrides = [*clip_overrides(tmp_path), *FAST, "trainer.limit_train_batches=1", "run.test_after_fit=false",
                 f"model.pretrained={ckpt}", "optim.lr=1e-4"]
    assert main(["fit", str(EXP), *overrides]) == 0
    run = tmp_path / "runs" / "clip_infonce" / "version_0"
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert int(state["global_step"]) == 1
    trained = {k.removeprefix("anchor_tower.model."): v for k, v in state["state_dict"].items()
               if k.startswith("anchor_tower.model.")}
    init = user.state_dict()
    assert set(trained) == set(init)
    moved = {k for k in init if not torch.equal(trained[k], init[k])}
    assert moved, "no weight changed: the training step did not run"
    # one AdamW step of lr 1e-4 moves each weight by about 1e-4: the run started from the user's weights
    # (parameters only: the CNN tower's batch-norm statistics move with every training forward pass)
    params = {k for k, _ in user.named_parameters()}
    assert max(float((trained[k] - init[k]).abs().max()) for k in params) < 1e-3
    assert float(trained["logit_scale"]) == pytest.approx(3.0, abs=1e-3)
