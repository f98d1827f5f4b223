"""Our COCO-eval wrapper (xyxy -> xywh, contiguous label -> category id, scores, LVIS buckets) against
pycocotools run directly on a hand-made detections file."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from contrastive.detection.evaluation import STAT_NAMES, CocoEvaluator, to_coco_results

GT = {
    "images": [{"id": 5, "file_name": "a.png", "width": 100, "height": 80},
               {"id": 9, "file_name": "b.png", "width": 60, "height": 60}],
    "categories": [{"id": 2, "name": "cat"}, {"id": 11, "name": "dog"}, {"id": 40, "name": "emu"}],
    "annotations": [
        {"id": 1, "image_id": 5, "category_id": 2, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 11, "bbox": [50, 30, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 11, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 4, "image_id": 9, "category_id": 40, "bbox": [20, 20, 30, 35], "area": 1050, "iscrowd": 0},
    ],
}
# detections as the model gives them: absolute xyxy, contiguous labels (0 = id 2, 1 = id 11, 2 = id 40)
DETS = {
    5: (torch.tensor([[11.0, 9, 41, 31], [52, 28, 90, 72], [0, 0, 20, 20], [50, 30, 90, 70]]),
        torch.tensor([0.9, 0.8, 0.3, 0.2]), torch.tensor([0, 1, 1, 2])),
    9: (torch.tensor([[5.0, 6, 15, 15], [21, 22, 50, 50], [20, 20, 50, 55]]),
        torch.tensor([0.7, 0.6, 0.4]), torch.tensor([1, 2, 0])),
}


def direct_pycocotools(tmp_path) -> tuple[np.ndarray, COCOeval]:
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(GT))
    records = []
    ids = [2, 11, 40]
    for img, (boxes, scores, labels) in DETS.items():
        for (x0, y0, x1, y1), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            records.append({"image_id": img, "category_id": ids[lab], "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
    dt_path.write_text(json.dumps(records))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(dt_path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats, ev


def test_wrapper_equals_pycocotools(tmp_path):
    stats, ev = direct_pycocotools(tmp_path)
    assert stats[0] > 0.1  # a non-trivial case
    results = to_coco_results(list(DETS), [d[0] for d in DETS.values()], [d[1] for d in DETS.values()],
                              [d[2] for d in DETS.values()], [2, 11, 40])
    gt = json.loads(json.dumps(GT))
    for a in gt["annotations"]:  # the wrapper fills what a minimal JSON lacks
        del a["iscrowd"]
    m = CocoEvaluator(gt, frequency=["f", "r", "r"]).evaluate(results)
    for name, value in zip(STAT_NAMES, stats):
        assert m[name] == pytest.approx(float(value), abs=1e-12), name
    # per-category AP straight from the precision array; buckets average it
    prec = ev.eval["precision"][:, :, :, 0, -1]
    ref = {cid: float(prec[:, :, k][prec[:, :, k] > -1].mean()) for k, cid in enumerate([2, 11, 40])}
    assert m["per_category"] == {str(k): pytest.approx(v) for k, v in ref.items()}
    assert m["AP_frequent"] == pytest.approx(ref[2]) and m["AP_rare"] == pytest.approx((ref[11] + ref[40]) / 2)
    assert m["AP_common"] is None
    assert float(np.mean(list(ref.values()))) == pytest.approx(m["mAP"])


def test_perfect_and_empty_detections():
    ids = [2, 11, 40]
    boxes, scores, labels, imgs = [], [], [], []
    for img in (5, 9):
        anns = [a for a in GT["annotations"] if a["image_id"] == img]
        xyxy = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns], dtype=torch.float)
        imgs.append(img)
        boxes.append(xyxy)
        scores.append(torch.ones(len(anns)))
        labels.append(torch.tensor([ids.index(a["category_id"]) for a in anns]))
    ev = CocoEvaluator(GT, frequency=["f", "c", "r"])
    m = ev.evaluate(to_coco_results(imgs, boxes, scores, labels, ids))
    assert m["mAP"] == pytest.approx(1.0) and m["AP_rare"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert ev.evaluate([])["mAP"] == 0.0
    with pytest.raises(ValueError, match="frequency"):
        CocoEvaluator(GT, frequency=["f"])
