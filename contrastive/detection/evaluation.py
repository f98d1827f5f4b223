"""COCO detection metrics through ``pycocotools`` plus LVIS-style frequency buckets.

:class:`CocoEvaluator` holds the ground truth (a COCO dict) and turns detections in absolute ``xyxy``
pixels with contiguous labels into COCO results (``[x, y, w, h]``, original category ids), then runs
``COCOeval`` (``iouType="bbox"``, at most 100 detections per image). Besides COCO's 12 numbers it reports
``AP_rare``, ``AP_common`` and ``AP_frequent`` (the mean per-category AP over the categories of each bucket
that have ground truth in the evaluated split; LVIS's AP_r/c/f; ``None`` for an empty bucket) and
``per_category`` AP. COCO's own numbers keep pycocotools' ``-1`` for an area range without ground truth.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

STAT_NAMES = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BUCKET_NAMES = {"r": "AP_rare", "c": "AP_common", "f": "AP_frequent"}


def to_coco_results(image_ids: Sequence[int], boxes: Sequence[Tensor], scores: Sequence[Tensor],
                    labels: Sequence[Tensor], category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO result records from per-image ``boxes (n, 4)`` absolute xyxy, ``scores (n,)`` and contiguous
    ``labels (n,)`` (mapped to ``category_ids``)."""
    out = []
    for img, b, s, lab in zip(image_ids, boxes, scores, labels):
        xywh = b.detach().float().cpu().clone()
        xywh[:, 2:] -= xywh[:, :2]
        for box, score, label in zip(xywh.tolist(), s.detach().float().cpu().tolist(), lab.cpu().tolist()):
            out.append({"image_id": int(img), "category_id": int(category_ids[label]), "bbox": box,
                        "score": float(score)})
    return out


class CocoEvaluator:
    """COCO AP of detections against ``gt`` (a COCO instances dict).

    Args:
        gt: ground truth (``images``, ``annotations``, ``categories``); ``iscrowd`` and ``area`` are
            filled in when missing.
        frequency: bucket (``"r"``/``"c"``/``"f"``) per category, in the order of ``category_ids``.
        category_ids: the COCO id of each contiguous label (default: sorted ids of ``gt``).
    """

    def __init__(self, gt: dict[str, Any], frequency: Optional[Sequence[str]] = None,
                 category_ids: Optional[Sequence[int]] = None) -> None:
        from pycocotools.coco import COCO

        gt = copy.deepcopy(gt)
        for a in gt["annotations"]:
            a.setdefault("iscrowd", 0)
            a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        self.category_ids = list(category_ids) if category_ids is not None else sorted(c["id"] for c in gt["categories"])
        self.frequency = list(frequency) if frequency is not None else None
        if self.frequency is not None and len(self.frequency) != len(self.category_ids):
            raise ValueError(f"frequency has {len(self.frequency)} entries for {len(self.category_ids)} categories")
        self.coco = COCO()
        self.coco.dataset = gt
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def evaluate(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Metrics of COCO result records (see :func:`to_coco_results`); zeros when there are none."""
        from pycocotools.cocoeval import COCOeval

        if not results:
            return {**{k: 0.0 for k in STAT_NAMES}, **{v: 0.0 for v in BUCKET_NAMES.values()}, "per_category": {}}
        with contextlib.redirect_stdout(io.StringIO()):
            dt = self.coco.loadRes(results)
            ev = COCOeval(self.coco, dt, iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics: dict[str, Any] = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
        per_cat = self.per_category_ap(ev)
        metrics["per_category"] = {str(k): v for k, v in per_cat.items()}
        if self.frequency is not None:
            bucket_of = dict(zip(self.category_ids, self.frequency))
            for key, name in BUCKET_NAMES.items():
                vals = [ap for cid, ap in per_cat.items() if bucket_of.get(cid) == key]
                metrics[name] = float(np.mean(vals)) if vals else None
        return metrics

    @staticmethod
    def per_category_ap(ev: Any) -> dict[int, float]:
        """AP (IoU 0.50:0.95, all areas, 100 detections) of every category with ground truth."""
        precision = ev.eval["precision"]  # (T, R, K, A, M)
        out = {}
        for k, cid in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            if p.size:
                out[int(cid)] = float(p.mean())
        return out


def select_detections(logits: Tensor, boxes: Tensor, categories: Tensor, orig_sizes: Tensor,
                      max_detections: int = 100) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Top ``max_detections`` (query, slot) pairs per image by ``sigmoid(logit)`` (Deformable DETR /
    CQ-DINO inference).

    Args:
        logits: ``(B, Q, S)``; ``boxes``: ``(B, Q, 4)`` normalised cxcywh; ``categories``: ``(B, S)`` category
            index of each slot; ``orig_sizes``: ``(B, 2)`` (height, width) of the original images.

    Returns:
        per image ``boxes (n, 4)`` absolute xyxy clipped to the image, ``scores (n,)`` and contiguous ``labels (n,)``.
    """
    from torchvision.ops import box_convert

    b, q, s = logits.shape
    prob = logits.sigmoid().flatten(1)
    k = min(max_detections, q * s)
    scores, idx = prob.topk(k, dim=1)
    query, slot = idx // s, idx % s
    labels = torch.gather(categories, 1, slot)
    xyxy = box_convert(torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4)), "cxcywh", "xyxy")
    h, w = orig_sizes[:, 0].float(), orig_sizes[:, 1].float()
    xyxy = xyxy.clamp(0.0, 1.0) * torch.stack([w, h, w, h], dim=1)[:, None, :]
    return list(xyxy), list(scores), list(labels)
