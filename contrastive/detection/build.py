"""Build the detection setting from a config (the only detection code that reads config).

An experiment with ``task: detection`` has these top-level sections (each a plain mapping whose keys are
the constructor arguments of the class named, checked before anything runs):

- ``data``: ``name`` = ``synthetic_scenes`` | ``coco`` (:mod:`datamodules.detection`);
- ``model``: :class:`DetrDetector` sizes (backbone, d_model, layers, queries); optional ``denoising``:
  ``{groups, box_noise, label_noise}`` of :class:`~contrastive.detection.denoising.DenoisingQueries`;
- ``head``: ``name`` = ``linear`` | ``category_query`` (:mod:`contrastive.detection.heads`); for
  ``category_query``, ``init_embeddings`` initialises the category embeddings from class-name text
  embeddings: a mapping ``{checkpoint, model_config, prompt}`` (a local open_clip checkpoint encoded by its
  text tower, :class:`~contrastive.detection.text_init.OpenClipClassNames`) or a local ``.pt`` file;
- ``category_sampler``: ``name`` = ``cq_topk`` | ``index_topk`` | ``random`` (category-query head only);
- ``filters``: a list; ``category_hierarchy`` drops parents/children of ground-truth categories from the
  negatives (needs a hierarchy in the data);
- ``matcher``, ``loss``: :class:`HungarianMatcher` costs and :class:`DetectionSetLoss` weights;
- ``optim`` (lr, weight_decay, warmup_steps, max_detections), ``trainer``, ``run``, ``seed``, ``experiment``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

from contrastive.config.errors import ConfigError
from contrastive.config.loader import Provenance
from contrastive.config.schema import RunConfig, TrainerConfig
from contrastive.config.validate import _check_dataclass, check_type, constructor_params
from contrastive.detection.category_samplers import CATEGORY_SAMPLERS, CategoryHierarchyFilter
from contrastive.detection.criterion import DetectionSetLoss
from contrastive.detection.denoising import DenoisingQueries
from contrastive.detection.detector import DetrDetector
from contrastive.detection.evaluation import CocoEvaluator
from contrastive.detection.heads import CLASSIFICATION_HEADS
from contrastive.detection.matcher import HungarianMatcher
from contrastive.detection.module import DetectionModule
from contrastive.detection.text_init import OpenClipClassNames, class_embeddings

DETECTION_FILTERS: dict[str, type] = {"category_hierarchy": CategoryHierarchyFilter}


@dataclasses.dataclass
class DetectionOptimConfig:
    """AdamW, linear warm-up then cosine decay; detections kept per image at evaluation."""

    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    max_detections: int = 100


def _registries() -> dict[str, dict[str, Callable]]:
    from datamodules.detection import DETECTION_DATAMODULES

    return {"data": DETECTION_DATAMODULES, "head": CLASSIFICATION_HEADS, "category_sampler": CATEGORY_SAMPLERS,
            "filters": DETECTION_FILTERS}


#: arguments filled at build time, never given in YAML
FILLED = {"head": {"num_classes", "d_model", "parents", "sampler", "init_embeddings"}, "model": {"head"},
          "filters": {"parents"}, "loss": {"matcher"}, "denoising": {"num_classes", "d_model"}}
TOP_LEVEL = ("task", "experiment", "seed", "data", "model", "head", "category_sampler", "filters", "matcher", "loss",
             "optim", "trainer", "run")


def _check_kwargs(value: Any, key: str, target: Callable, prov: Provenance, skip: set[str], extra: set[str] = set()) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"key '{key}' (from {prov.of(key)}) must be a mapping")
    params, hints = constructor_params(target)
    valid = (set(params) - skip) | extra
    for k, v in value.items():
        if k == "name":
            continue
        if k not in valid:
            raise ConfigError(f"unknown key '{key}.{k}' (from {prov.of(f'{key}.{k}')}); valid keys: "
                              f"{', '.join(sorted(valid)) or '(none)'}")
        if k in hints and k not in extra:
            check_type(v, hints[k], f"{key}.{k}", prov)
    for k, p in params.items():
        if p.default is inspect.Parameter.empty and k not in value and k not in skip:
            raise ConfigError(f"missing required key '{key}.{k}' (section from {prov.of(key)})")


def _named(value: Any, key: str, registry: dict[str, Callable], prov: Provenance) -> tuple[str, dict]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or value.get("name") not in registry:
        got = value.get("name") if isinstance(value, dict) else value
        raise ConfigError(f"key '{key}.name' (from {prov.of(key)}): unknown choice {got!r}; valid choices: "
                          f"{', '.join(registry)}")
    return value["name"], value


def _check_init_embeddings(value: Any, prov: Provenance) -> None:
    key = "head.init_embeddings"
    if isinstance(value, str):
        return
    if not isinstance(value, dict):
        raise ConfigError(f"key '{key}' (from {prov.of(key)}) must be a .pt path or a mapping with keys "
                          f"{', '.join(f.name for f in dataclasses.fields(OpenClipClassNames))}")
    _check_dataclass(value, key, OpenClipClassNames, prov)
    if "checkpoint" not in value:
        raise ConfigError(f"missing required key '{key}.checkpoint' (section from {prov.of(key)})")
    OpenClipClassNames(**value).check()


def validate_detection(cfg: dict, prov: Optional[Provenance] = None) -> dict:
    """Check a detection experiment; returns it with string component specs expanded to mappings."""
    prov = prov or Provenance()
    for key in cfg:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown key '{key}' (from {prov.of(key)}); valid keys: {', '.join(sorted(TOP_LEVEL))}")
    for key in ("experiment", "data", "model", "head"):
        if cfg.get(key) is None:
            raise ConfigError(f"missing required key '{key}' in the detection experiment")
    reg = _registries()
    out = dict(cfg)
    for key in ("data", "head", "category_sampler"):
        if cfg.get(key) is None:
            continue
        name, spec = _named(cfg[key], key, reg[key], prov)
        extra = {"init_embeddings"} if key == "head" and name == "category_query" else set()
        _check_kwargs(spec, key, reg[key][name], prov, FILLED.get(key, set()) - extra, extra)
        if spec.get("init_embeddings") is not None:
            _check_init_embeddings(spec["init_embeddings"], prov)
        out[key] = spec
    if out.get("category_sampler") and out["head"]["name"] != "category_query":
        raise ConfigError("key 'category_sampler' only applies to head 'category_query'; remove it or set "
                          "head.name=category_query")
    filters = cfg.get("filters") or []
    if not isinstance(filters, list):
        raise ConfigError(f"key 'filters' (from {prov.of('filters')}) must be a list")
    out["filters"] = []
    for i, f in enumerate(filters):
        name, spec = _named(f, f"filters.{i}", reg["filters"], prov)
        _check_kwargs(spec, f"filters.{i}", reg["filters"][name], prov, FILLED["filters"])
        out["filters"].append(spec)
    _check_kwargs(cfg["model"], "model", DetrDetector, prov, FILLED["model"])
    if cfg["model"].get("denoising") is not None:
        _check_kwargs(cfg["model"]["denoising"], "model.denoising", DenoisingQueries, prov, FILLED["denoising"])
    for key, target in (("matcher", HungarianMatcher), ("loss", DetectionSetLoss)):
        if cfg.get(key) is not None:
            _check_kwargs(cfg[key], key, target, prov, FILLED.get(key, set()))
    for key, schema in (("optim", DetectionOptimConfig), ("trainer", TrainerConfig), ("run", RunConfig)):
        if cfg.get(key) is not None:
            _check_dataclass(cfg[key], key, schema, prov)
    out["run"] = {"monitor": "val/mAP", **(cfg.get("run") or {})}  # the best checkpoint by validation mAP
    if cfg.get("seed") is not None:
        check_type(cfg["seed"], int, "seed", prov)
    return out


def _kwargs(spec: Optional[dict]) -> dict:
    return {k: v for k, v in (spec or {}).items() if k != "name"}


def build_detection_datamodule(cfg: dict, seed: int = 0) -> Any:
    from datamodules.detection import build_detection_datamodule as build

    spec = dict(cfg["data"])
    name = spec.pop("name")
    spec.setdefault("seed", seed)
    return build(name, **spec)


def build_detection_module(cfg: dict, datamodule: Any) -> DetectionModule:
    """The :class:`DetectionModule` for ``cfg`` on the categories of ``datamodule`` (set up)."""
    parents = datamodule.category_parents()
    head_spec = dict(cfg["head"])
    head_name = head_spec.pop("name")
    d_model = int(cfg["model"].get("d_model", 128))
    head_kwargs: dict[str, Any] = {"num_classes": datamodule.num_classes, "d_model": d_model}
    if head_name == "category_query":
        init = head_spec.pop("init_embeddings", None)
        if init:
            head_kwargs["init_embeddings"] = class_embeddings(init, datamodule.category_names)
        if parents is not None and head_spec.get("relation", "auto") in ("auto", "tree"):
            head_kwargs["parents"] = parents
        sampler = cfg.get("category_sampler") or {"name": "cq_topk"}
        head_kwargs["sampler"] = CATEGORY_SAMPLERS[sampler["name"]](**_kwargs(sampler))
    head = CLASSIFICATION_HEADS[head_name](**head_kwargs, **head_spec)
    model_spec = dict(cfg["model"])
    dn_spec = model_spec.pop("denoising", None)
    denoising = DenoisingQueries(datamodule.num_classes, d_model, **dn_spec) if dn_spec is not None else None
    detector = DetrDetector(head=head, denoising=denoising, **model_spec)
    criterion = DetectionSetLoss(HungarianMatcher(**(cfg.get("matcher") or {})), **(cfg.get("loss") or {}))
    filters = []
    for f in cfg.get("filters") or []:
        if f["name"] == "category_hierarchy":
            if parents is None:
                raise ConfigError("filter 'category_hierarchy' needs a category hierarchy ('parent' ids in the "
                                  "categories of the training JSON)")
            filters.append(CategoryHierarchyFilter(parents, **_kwargs(f)))
    train = datamodule.train_split
    evaluators = {split: CocoEvaluator(datamodule.splits[split].coco, datamodule.frequency(split), train.category_ids)
                  for split in ("val", "test")}
    optim = dataclasses.asdict(DetectionOptimConfig(**(cfg.get("optim") or {})))
    return DetectionModule(detector, criterion, filters, evaluators, **optim)
