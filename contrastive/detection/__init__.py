"""The detection setting: a DETR-style detector whose classification head is swappable between a linear
head and CQ-DINO category queries, category samplers (hard-negative categories), the hierarchy
false-negative filter, and COCO / LVIS-bucket evaluation. Experiments say ``task: detection``
(configs/detection/); data lives in :mod:`datamodules.detection`.

Names are imported lazily, so that the CLI can check a config's ``task`` without loading timm.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "category_samplers": ("CATEGORY_SAMPLERS", "CategoryHierarchyFilter", "CategorySampler", "CQTopKSampler",
                          "IndexTopKSampler", "RandomCategorySampler", "hierarchy_relation"),
    "criterion": ("DetectionSetLoss", "StageOutput", "box_losses"),
    "detector": ("DetectorOutput", "DetrDetector"),
    "evaluation": ("CocoEvaluator", "select_detections", "to_coco_results"),
    "heads": ("CLASSIFICATION_HEADS", "CategoryContext", "CategoryQueryHead", "ClassificationHead", "LinearClassHead"),
    "matcher": ("HungarianMatcher",),
    "job": ("DetectionJob",),
    "module": ("DetectionModule",),
    "text_init": ("OpenClipClassNames", "class_embeddings", "open_clip_class_embeddings"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'contrastive.detection' has no attribute {name!r}")
    return getattr(importlib.import_module(f"contrastive.detection.{_WHERE[name]}"), name)
