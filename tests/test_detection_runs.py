"""Detection runs go through the shared fit flow of ``contrastive.cli``: a failed second ``fit`` into a
finished run leaves its files byte-identical, and a run interrupted mid-epoch and resumed with ``--resume``
ends bit-identical to the uninterrupted one (weights, optimiser state, every logged metric except the
wall-clock epoch time), with random augmentation and a stateful category sampler."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import contrastive.cli as cli
from contrastive.detection.category_samplers import IndexTopKSampler, RandomCategorySampler
from contrastive.detection.heads import CategoryQueryHead
from contrastive.runs import snapshot
from tests.helpers import final_state

ROOT = Path(__file__).resolve().parents[1]
CQ = ROOT / "configs" / "detection" / "category_query.yaml"
#: 12 training images in batches of 4: 3 steps per epoch, 2 epochs, a step checkpoint every 2 steps
TINY = ["data.num_categories=10", "data.train_images=12", "data.val_images=4", "data.test_images=4",
        "data.batch_size=4", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "run.num_threads=1", "run.checkpoint_every_n_steps=2", "run.test_after_fit=false",
        "category_sampler.name=random", "data.scale_jitter=0.3"]


class Interrupt(RuntimeError):
    pass


class InterruptAt(Callback):
    """Raise after optimiser step ``step`` (before that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise Interrupt(f"interrupted at step {trainer.global_step}")


def args(cache: Path, out: Path) -> list[str]:
    return [*TINY, f"data.cache_dir={cache}", f"run.output_dir={out}"]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("detruns_cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("detruns_ref")
    assert cli.main(["fit", str(CQ), *args(cache, out)]) == 0
    return out / "detection_category_query" / "version_0"


def test_failed_second_fit_leaves_the_finished_run_unchanged(reference, tmp_path, capsys):
    before = snapshot(reference)
    assert {"config.yaml", "metrics.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= set(before)
    # a changed model: refused before anything is written, naming the key
    assert cli.main(["fit", str(reference), "--resume", str(reference), "model.d_model=64"]) == 2
    assert "model.d_model: 128 -> 64" in capsys.readouterr().err
    assert snapshot(reference) == before
    # accepted config change, but a checkpoint that does not fit the model built from it
    assert cli.main(["fit", str(reference), "--resume", str(reference), "model.d_model=64",
                     "--allow-config-change"]) == 2
    assert "does not match the model" in capsys.readouterr().err
    assert snapshot(reference) == before
    # a truncated checkpoint
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((reference / "checkpoints" / "last.ckpt").read_bytes()[:200])
    assert cli.main(["fit", str(reference), "--resume", str(reference), "--ckpt", str(bad)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert snapshot(reference) == before
    # a broken new run leaves no directory beside the finished one
    assert cli.main(["fit", str(CQ), *args(reference.parents[1] / "cache_unused", reference.parents[1]),
                     "head.num_selected=0"]) == 2
    assert sorted(p.name for p in reference.parent.iterdir()) == ["version_0"]


def test_resume_mid_epoch_is_bit_identical(reference, cache, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    make = cli.Job.trainer
    monkeypatch.setattr(cli.Job, "trainer",
                        lambda self, callbacks_extra=(), **kw: make(self, callbacks_extra=[*callbacks_extra, InterruptAt(5)], **kw))
    assert cli.main(["fit", str(CQ), *args(cache, out)]) == 1  # interrupted at step 5 (epoch 1, 2nd batch)
    monkeypatch.setattr(cli.Job, "trainer", make)
    run = out / "detection_category_query" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    assert cli.main(["fit", str(CQ), *args(cache, out), "--resume", str(run)]) == 0
    ref_w, ref_opt, ref_rows = final_state(reference, ["train/epoch_time_s"])
    w, opt, rows = final_state(run, ["train/epoch_time_s"])
    assert ref_w.keys() == w.keys()
    for k, v in ref_w.items():  # tensors, and the category sampler's state (the head's extra state)
        assert same(v, w[k]), k
    for i, s in ref_opt.items():
        for k, v in s.items():
            assert torch.equal(v, opt[i][k]), (i, k)
    assert rows == ref_rows
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    times = ckpt["detection_epoch_times"]["epoch_times_s"]
    assert len(times) == 1 and times[0] > 0  # epoch 0's time survived the resume


@pytest.mark.parametrize("make", [lambda: RandomCategorySampler(seed=3), lambda: IndexTopKSampler(neighbours=2, refresh_every=2)],
                         ids=["random", "index_topk"])
def test_category_sampler_state_travels_in_the_heads_state_dict(make):
    """A head restored from another's ``state_dict`` makes the same category choices from then on."""
    g = torch.Generator().manual_seed(0)
    presence = torch.randn(3, 12, generator=g)
    gt = [torch.tensor([1, 5]), torch.tensor([0]), torch.tensor([7, 8, 9])]
    a = CategoryQueryHead(12, 16, num_selected=6, embed_dim=8, nheads=2, sampler=make())
    emb = a.embeddings.detach()
    for _ in range(3):
        a.sampler.select(presence, gt, 6, emb)
    b = CategoryQueryHead(12, 16, num_selected=6, embed_dim=8, nheads=2, sampler=make())
    b.load_state_dict(a.state_dict())
    for step in range(4):
        emb = emb + 0.1 * step  # index_topk refreshes its table from the embeddings it is given
        assert torch.equal(a.sampler.select(presence, gt, 6, emb), b.sampler.select(presence, gt, 6, emb))
    assert b.sampler.state_dict().keys() == a.sampler.state_dict().keys() != set()
    if isinstance(a.sampler, RandomCategorySampler):  # without the state the choices differ
        fresh = make()
        assert not all(torch.equal(a.sampler.select(presence, gt, 6), fresh.select(presence, gt, 6)) for _ in range(3))
    else:
        assert a.sampler.calls == b.sampler.calls == 7 and a.sampler.refreshes == 4
