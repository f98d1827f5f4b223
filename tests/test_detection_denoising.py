"""Denoising queries (DN-DETR): the attention mask on a hand-made case, DN-DETR's box noise bounds, the
matching path is exactly that of a detector without denoising queries (no information and no gradient
crosses the mask), the reconstruction targets are the ground truth each query was made from, and a config
with ``model.denoising`` trains through the CLI."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from contrastive.detection.criterion import DetectionSetLoss, StageOutput
from contrastive.detection.denoising import DenoisingQueries, denoising_attention_mask, noise_boxes
from contrastive.detection.detector import DetrDetector
from contrastive.detection.heads import CategoryQueryHead, LinearClassHead
from contrastive.detection.matcher import HungarianMatcher

ROOT = Path(__file__).resolve().parents[1]


def test_attention_mask_hand_made():
    # 2 groups of 2 denoising queries, then 3 matching queries; 1 = may not attend
    want = torch.tensor([[0, 0, 1, 1, 1, 1, 1],
                         [0, 0, 1, 1, 1, 1, 1],
                         [1, 1, 0, 0, 1, 1, 1],
                         [1, 1, 0, 0, 1, 1, 1],
                         [1, 1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(denoising_attention_mask(2, 2, 3), want)
    assert not denoising_attention_mask(0, 3, 4).any()  # no ground truth: the matching queries alone


def test_box_noise_within_dn_detr_bounds():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.4, 0.6, 0.1, 0.1]]).repeat(500, 1)
    noised = noise_boxes(boxes, 0.4, generator=g)
    shift, scale = (noised[:, :2] - boxes[:, :2]).abs(), noised[:, 2:] / boxes[:, 2:]
    assert (shift <= 0.4 * boxes[:, 2:] / 2 + 1e-6).all() and (shift > 0.3 * boxes[:, 2:] / 2).any()
    assert (scale >= 0.6 - 1e-5).all() and (scale <= 1.4 + 1e-5).all() and (scale > 1.3).any()
    assert torch.equal(noise_boxes(boxes, 0.0), boxes)


def tiny(head_name: str, denoising: bool) -> DetrDetector:
    torch.manual_seed(0)
    head = LinearClassHead(6, 32) if head_name == "linear" else CategoryQueryHead(6, 32, num_selected=4, embed_dim=16)
    dn = DenoisingQueries(6, 32, groups=3, box_noise=0.4, label_noise=0.5) if denoising else None
    return DetrDetector(head, backbone="resnet10t", d_model=32, nheads=2, dim_feedforward=64, enc_layers=1,
                        dec_layers=2, num_queries=5, denoising=dn)


@pytest.mark.parametrize("head_name", ["linear", "category_query"])
def test_matching_path_is_isolated_from_denoising_queries(head_name):
    images = torch.randn(2, 3, 64, 64)
    labels = [torch.tensor([1, 4, 4]), torch.tensor([5])]
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]),
             torch.tensor([[0.5, 0.4, 0.3, 0.3]])]
    plain = tiny(head_name, denoising=False).train()
    det = tiny(head_name, denoising=True).train()
    det.load_state_dict(plain.state_dict(), strict=False)  # the same weights besides the label embedding
    ref = plain(images, labels, boxes)
    out = det(images, labels, boxes)
    assert out.denoising is not None and out.denoising.target.shape == (2, 9)  # 3 groups x 3 (most boxes)
    assert out.denoising.target[1].tolist() == [0, -1, -1] * 3
    assert len(out.denoising_stages) == 2 and out.denoising_stages[0].boxes.shape == (2, 9, 4)
    for a, b in zip(ref.stages, out.stages):  # the matching queries never see the denoising queries
        assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.boxes, b.boxes, atol=1e-5)
    slots = [out.context.slots_of(i, lab) for i, lab in enumerate(labels)]
    crit = DetectionSetLoss(HungarianMatcher())
    dn_loss = crit.denoising_loss(out.denoising_stages, out.denoising, boxes, slots)["loss"]
    params = dict(det.named_parameters())
    q, lab = params["query_content.weight"], params["denoising.label_embed.weight"]
    g_q, g_lab = torch.autograd.grad(dn_loss, [q, lab], retain_graph=True, allow_unused=True)
    assert g_q is None or torch.count_nonzero(g_q) == 0  # no gradient into the matching queries
    assert torch.count_nonzero(g_lab) > 0
    match_loss = crit(out.stages, boxes, slots)["loss"]
    (g_lab,) = torch.autograd.grad(match_loss, [lab], allow_unused=True)
    assert g_lab is None or torch.count_nonzero(g_lab) == 0  # nor from the denoising queries into matching
    det.eval()
    assert det(images).denoising is None  # inference: matching queries only


def test_denoising_loss_targets_the_source_ground_truth():
    """Perfect reconstructions (each query predicts its own ground truth) cost only the focal background
    terms; predicting a neighbour's box costs more."""
    from contrastive.detection.denoising import DenoisingBatch

    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])]
    slots = [torch.tensor([0, 2])]
    dn = DenoisingBatch(content=torch.zeros(1, 4, 8), boxes=torch.zeros(1, 4, 4), target=torch.tensor([[0, 1, 0, 1]]),
                        group_size=2, groups=2)
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, [0, 2], 0] = logits[0, [1, 3], 2] = 10.0
    crit = DetectionSetLoss(HungarianMatcher())
    good = crit.denoising_loss([StageOutput(logits, boxes[0][[0, 1, 0, 1]][None])], dn, boxes, slots)
    assert good["bbox"] == 0 and good["giou"].abs() < 1e-5 and good["class"] < 1e-6
    swapped = crit.denoising_loss([StageOutput(logits, boxes[0][[1, 0, 1, 0]][None])], dn, boxes, slots)
    assert swapped["bbox"] > 0.1 and swapped["giou"] > 0.1


def test_config_with_denoising_trains(tmp_path):
    from contrastive.cli import main

    cfg = ROOT / "configs" / "detection" / "linear.yaml"
    args = ["data.num_categories=10", "data.train_images=8", "data.val_images=4", "data.test_images=4",
            "data.batch_size=4", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "run.num_threads=1", "run.test_after_fit=false", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.output_dir={tmp_path / 'runs'}", "model.denoising.groups=2", "model.denoising.box_noise=0.4",
            "model.denoising.label_noise=0.2"]
    assert main(["fit", str(cfg), *args]) == 0
    with open(next((tmp_path / "runs").glob("*/version_0")) / "metrics.csv", newline="") as f:
        dn = [float(r["train/denoising_loss"]) for r in csv.DictReader(f) if r.get("train/denoising_loss")]
    assert len(dn) == 2 and all(v > 0 for v in dn)
    assert main(["fit", str(cfg), *args, "model.denoising.noise=1"]) == 2  # unknown key: a config error
