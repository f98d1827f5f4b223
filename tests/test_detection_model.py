"""Detector pieces against slow references: Hungarian matching vs brute force, box losses vs torchvision,
the set loss's targets and masks, category samplers (top-K keeps the ground truth), the hierarchy filter,
CQ-DINO head properties (methods.md A4 (f)) and the detector's outputs for both heads."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from contrastive.detection.category_samplers import (CategoryHierarchyFilter, CQTopKSampler, IndexTopKSampler,
                                                     RandomCategorySampler, hierarchy_relation)
from contrastive.detection.criterion import DetectionSetLoss, StageOutput, box_losses
from contrastive.detection.detector import DetrDetector
from contrastive.detection.evaluation import select_detections
from contrastive.detection.heads import (CategoryContext, CategoryQueryHead, LinearClassHead, TreeAggregation,
                                         asymmetric_loss, prior_bias)
from contrastive.detection.matcher import HungarianMatcher
from contrastive.detection.module import negative_filter_mask
from contrastive.filters import FilterChain, FilterContext


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([c, wh], 1)


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    b, q, s = 3, 5, 4
    logits = torch.randn(b, q, s, generator=g)
    boxes = torch.stack([random_boxes(q, g) for _ in range(b)])
    n = [3, 0, 5]
    tb = [random_boxes(k, g) for k in n]
    ts = [torch.randint(-1, s, (k,), generator=g) for k in n]  # -1: category without a slot
    m = HungarianMatcher()
    match = m(logits, boxes, tb, ts)
    for i in range(b):
        rows, cols = match[i]
        assert len(rows) == min(q, n[i]) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if n[i] == 0:
            continue
        cost = m.cost_matrix(logits[i], boxes[i], tb[i], ts[i])
        best = min(sum(cost[p[j], j] for j in range(n[i])) for p in itertools.permutations(range(q), n[i]))
        assert float(cost[rows, cols].sum()) == pytest.approx(float(best), abs=1e-4)


def test_matching_cost_terms():
    """The class cost is the focal cost of the target's slot and zero for a target without a slot."""
    m = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    logits = torch.tensor([[2.0, -1.0]])
    c = m.cost_matrix(logits, torch.rand(1, 4), torch.rand(2, 4), torch.tensor([1, -1]))
    p = torch.sigmoid(torch.tensor(-1.0))
    ref = 0.25 * (1 - p) ** 2 * -torch.log(p) - 0.75 * p ** 2 * -torch.log(1 - p)
    assert c[0, 0] == pytest.approx(float(ref), rel=1e-5) and c[0, 1] == 0


def test_box_losses_match_torchvision():
    g = torch.Generator().manual_seed(0)
    pred, tgt = random_boxes(7, g), random_boxes(7, g)
    l1, giou = box_losses(pred, tgt)
    assert float(l1) == pytest.approx(float(F.l1_loss(pred, tgt, reduction="sum")), rel=1e-6)
    ref = (1 - torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))).sum()
    assert float(giou) == pytest.approx(float(ref), rel=1e-5)
    # hand-computed: [0,0,2,2] vs [1,1,3,3]: IoU 1/7, enclosing area 9, GIoU = 1/7 - (9 - 7)/9
    a = box_convert(torch.tensor([[0.0, 0, 2, 2]]), "xyxy", "cxcywh")
    b = box_convert(torch.tensor([[1.0, 1, 3, 3]]), "xyxy", "cxcywh")
    assert float(box_losses(a, b)[1]) == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-6)


def test_set_loss_targets_and_negative_mask():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, requires_grad=True)
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]]])
    crit = DetectionSetLoss(HungarianMatcher())
    tgt_boxes = [boxes[0, :2].clone()]
    out = crit([StageOutput(logits, boxes)], tgt_boxes, [torch.tensor([2, -1])])
    assert float(out["bbox"]) == pytest.approx(0.0, abs=1e-6) and float(out["giou"]) == pytest.approx(0.0, abs=1e-5)
    target = torch.zeros(1, 3, 4)
    target[0, 0, 2] = 1  # the second target has no slot: its row stays all zeros
    ref = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = logits.sigmoid()
    pt = p * target + (1 - p) * (1 - target)
    ref = (ref * (1 - pt) ** 2 * (0.25 * target + 0.75 * (1 - target))).sum() / 2
    assert float(out["class"]) == pytest.approx(float(ref), rel=1e-5)
    # slot 3 removed from the negatives: no loss (and no gradient) from it
    mask = torch.tensor([[False, False, False, True]])
    out = crit([StageOutput(logits, boxes)], tgt_boxes, [torch.tensor([2, -1])], negative_mask=mask)
    out["loss"].backward()
    assert torch.all(logits.grad[0, :, 3] == 0) and torch.all(logits.grad[0, :, :3] != 0)


def test_cq_topk_keeps_ground_truth_when_its_presence_is_highest():
    g = torch.Generator().manual_seed(1)
    presence = torch.randn(4, 50, generator=g)
    gt = [torch.tensor([3, 17]), torch.tensor([49]), torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.long)]
    for b, lab in enumerate(gt):
        presence[b, lab] = 10.0 + torch.arange(len(lab), dtype=torch.float)
    sel = CQTopKSampler().select(presence, gt, 5)
    assert sel.shape == (4, 5)
    for b, lab in enumerate(gt):
        assert set(lab.tolist()) <= set(sel[b].tolist()) and len(set(sel[b].tolist())) == 5
        assert sel[b].tolist() == presence[b].topk(5).indices.tolist()  # descending presence
    # ground truth with the lowest scores is dropped by plain top-K and kept when forced
    low = presence.clone()
    low[0, [3, 17]] = -10.0
    assert not {3, 17} & set(CQTopKSampler().select(low, gt, 5)[0].tolist())
    forced = CQTopKSampler(force_include_gt=True).select(low, gt, 5)[0].tolist()
    assert forced[:2] == [3, 17] and forced[2:] == [i for i in low[0].argsort(descending=True).tolist() if i not in (3, 17)][:3]


def test_head_selection_in_eval_is_top_presence():
    torch.manual_seed(0)
    head = CategoryQueryHead(num_classes=12, d_model=16, num_selected=4, embed_dim=16).eval()
    ctx = head.prepare(torch.randn(2, 9, 16))
    assert torch.equal(ctx.categories, ctx.presence.topk(4, dim=1).indices)
    feats = torch.randn(2, 5, 16)
    ref = feats @ ctx.tokens.transpose(1, 2) / math.sqrt(16) + head.bias
    assert torch.allclose(head.logits(feats, ctx), ref)
    assert float(head.bias) == pytest.approx(-math.log(0.99 / 0.01))
    assert ctx.slots_of(0, ctx.categories[0, [2, 0]]).tolist() == [2, 0]
    outside = [c for c in range(12) if c not in ctx.categories[0].tolist()][0]
    assert ctx.slots_of(0, torch.tensor([outside])).tolist() == [-1]


def test_index_topk_adds_nearest_categories():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0], [0.7, 0.7]])
    s = IndexTopKSampler(neighbours=1, refresh_every=2)
    presence = torch.zeros(1, 6)
    presence[0, 4] = 5.0  # fills the rest
    sel = s.select(presence, [torch.tensor([0, 2])], 5, embeddings=emb)
    assert sel[0].tolist() == [0, 2, 1, 3, 4]
    sims = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).t()
    sims.fill_diagonal_(-2)
    assert s.table[:, 0].tolist() == sims.argmax(1).tolist()
    s.select(presence, [torch.tensor([0])], 3, embeddings=emb)
    assert s.refreshes == 1
    s.select(presence, [torch.tensor([0])], 3, embeddings=emb)
    assert s.refreshes == 2  # refreshed every 2 calls


def test_random_sampler_keeps_gt_and_is_uniform():
    s = RandomCategorySampler(seed=0)
    counts = torch.zeros(20)
    for _ in range(400):
        sel = s.select(torch.zeros(1, 20), [torch.tensor([7])], 4)[0]
        assert sel[0] == 7 and len(set(sel.tolist())) == 4
        counts[sel[1:]] += 1
    assert counts[7] == 0 and counts.sum() == 1200
    assert counts[counts > 0].min() > 30  # about 63 each


def test_hierarchy_filter_drops_parents_and_children_of_ground_truth():
    # 0 shape -> 1 shape+colour -> {2, 3} leaves; 4 another shape -> 5
    parents = [-1, 0, 1, 1, -1, 4]
    rel = hierarchy_relation(parents)
    assert rel[2, 0] and rel[0, 2] and rel[1, 2] and not rel[2, 3] and not rel[2, 2] and not rel[2, 5]
    f = CategoryHierarchyFilter(parents)
    cats = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    pos = torch.tensor([[2, -1], [5, 1]])
    ctx = FilterContext(scores=torch.zeros(2, 6), candidate_ids=cats, positive_ids=pos)
    flags = f(ctx)
    assert flags[0].tolist() == [True, True, False, False, False, False]  # ancestors of 2; sibling 3 stays
    # image 2: GT 5 (child of 4) and 1 (parent 0, children 2 and 3); positives themselves are never flagged
    assert flags[1].tolist() == [False, True, True, True, False, True]
    mask, frac = negative_filter_mask(FilterChain([f]), cats, [torch.tensor([2, 2]), torch.tensor([1, 5])])
    assert mask[0].tolist() == [True, True, False, False, False, False]
    assert mask[1].tolist() == [False, True, True, True, False, True]
    assert frac == pytest.approx(6 / 9)
    with pytest.raises(ValueError, match="cycle"):
        hierarchy_relation([1, 0])


def test_tree_aggregation_properties():
    parents = [-1, 0, 0, 1, 1]  # 0 <- {1, 2}; 1 <- {3, 4}
    tree = TreeAggregation(parents, 3)
    emb = torch.randn(5, 3)
    out = tree.aggregate(emb)
    assert torch.equal(out[[2, 3, 4]], emb[[2, 3, 4]])  # leaves unchanged
    w1, w0 = float(tree.omega[1]), float(tree.omega[0])
    assert w1 == pytest.approx(0.4 + 0.4 * math.log(2 + 2) / math.log(5 + 2))
    new1 = (1 - w1) * emb[1] + w1 * emb[[3, 4]].mean(0)
    assert torch.allclose(out[1], new1)
    assert torch.allclose(out[0], (1 - w0) * emb[0] + w0 * torch.stack([new1, emb[2]]).mean(0))  # bottom-up
    tree.omega.fill_(1.0)
    assert torch.allclose(tree.aggregate(emb)[1], emb[[3, 4]].mean(0))


def test_asymmetric_loss_reduces_to_bce_and_masks():
    z, y = torch.randn(3, 6, requires_grad=True), (torch.rand(3, 6) > 0.5).float()
    assert float(asymmetric_loss(z, y)) == pytest.approx(float(F.binary_cross_entropy_with_logits(z, y, reduction="sum")), rel=1e-5)
    w = torch.ones(3, 6)
    w[0, 1] = 0
    asymmetric_loss(z, y, 0.0, 4.0, 0.05, weight=w).backward()
    assert z.grad[0, 1] == 0 and z.grad.abs().sum() > 0


def test_presence_loss_masks_unlabelled_ancestors():
    head = CategoryQueryHead(num_classes=4, d_model=8, num_selected=2, embed_dim=8, parents=[-1, 0, 1, -1])
    presence = torch.zeros(1, 4, requires_grad=True)
    head.presence_loss(presence, [torch.tensor([2])]).backward()
    assert presence.grad[0].tolist()[:2] == [0.0, 0.0] and presence.grad[0, 2] < 0 and presence.grad[0, 3] > 0


@pytest.mark.parametrize("head_name", ["linear", "category_query"])
def test_detector_outputs_and_detections(head_name):
    torch.manual_seed(0)
    c = 9
    head = (LinearClassHead(c, 32) if head_name == "linear"
            else CategoryQueryHead(c, 32, num_selected=4, embed_dim=16, sampler=RandomCategorySampler(0)))
    assert prior_bias(0.01) == pytest.approx(-4.59512, rel=1e-5)
    det = DetrDetector(head, backbone="resnet10t", d_model=32, nheads=2, dim_feedforward=64, enc_layers=1,
                       dec_layers=2, num_queries=6)
    images = torch.randn(2, 3, 64, 64)
    labels = [torch.tensor([1, 4]), torch.tensor([8])]
    out = det.train()(images, labels)
    s = c if head_name == "linear" else 4
    assert len(out.stages) == 3  # encoder proposals + 2 decoder layers
    for st in out.stages[1:]:
        assert st.logits.shape == (2, 6, s) and st.boxes.shape == (2, 6, 4)
        assert ((st.boxes > 0) & (st.boxes < 1)).all()
    if head_name == "category_query":
        assert out.context.loss is not None and set(labels[0].tolist()) <= set(out.context.categories[0].tolist())
    boxes, scores, labs = select_detections(out.final.logits, out.final.boxes, out.context.categories,
                                            torch.tensor([[64, 128], [32, 32]]), max_detections=5)
    assert boxes[0].shape == (5, 4) and (scores[0][:-1] >= scores[0][1:]).all()
    assert (boxes[0][:, 2] <= 128 + 1e-4).all() and (boxes[1] <= 32 + 1e-4).all()
    assert set(labs[1].tolist()) <= set(out.context.categories[1].tolist())


def test_linear_logits_equal_category_query_with_one_hot_tokens():
    """methods.md A4 (f) 4: with one-hot-like category tokens the contrastive logits are a linear classifier."""
    d = 4
    feats = torch.randn(1, 3, d)
    tokens = torch.eye(d)[None] * math.sqrt(d)
    head = CategoryQueryHead(num_classes=d, d_model=d, num_selected=d, embed_dim=4)
    ctx = CategoryContext(categories=torch.arange(d)[None], tokens=tokens)
    assert torch.allclose(head.logits(feats, ctx), feats + head.bias)


def test_text_embedding_initialisation(tmp_path):
    from contrastive.config.errors import ConfigError
    from contrastive.detection.text_init import saved_class_embeddings as load_text_embeddings

    names = ["red circle", "blue square"]
    path = tmp_path / "text.pt"
    torch.save({"names": ["blue square", "green star", "red circle"], "embeddings": torch.arange(9.0).view(3, 3)}, path)
    emb = load_text_embeddings(str(path), names)
    assert emb.tolist() == [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]
    with pytest.raises(ConfigError, match="purple ring"):
        load_text_embeddings(str(path), names + ["purple ring"])
    head = CategoryQueryHead(num_classes=2, d_model=8, num_selected=2, embed_dim=3, nheads=1, init_embeddings=emb)
    assert torch.allclose(head.embeddings.data, F.normalize(emb, dim=1))
    projected = CategoryQueryHead(num_classes=2, d_model=8, num_selected=2, embed_dim=5, nheads=1, init_embeddings=emb)
    assert projected.embeddings.shape == (2, 5)
