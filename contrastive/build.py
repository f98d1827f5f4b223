"""``build_*`` functions: the only place (with the CLI) that reads config. Each turns a validated section
(a plain dict with a registered ``name`` and keyword arguments) into a plain object."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
from torch import nn

from contrastive.config.validate import constructor_params
from contrastive.registry import (DATAMODULES, ENCODERS, ESTIMATORS, FILTERS, LOSSES, MODELS, SAMPLERS,
                                  TRANSFORMS, Registry)


def _kwargs(spec: dict | str) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    spec = dict(spec)
    return spec.pop("name"), spec


def build_component(registry: Registry, spec: dict | str, **filled: Any) -> Any:
    """Build ``spec`` from ``registry``; ``filled`` values are passed when the constructor accepts them and
    the spec does not set them."""
    name, kwargs = _kwargs(spec)
    params, _ = constructor_params(registry.get(name))
    for k, v in filled.items():
        if k in params and k not in kwargs:
            kwargs[k] = v
    return registry.build(name, **kwargs)


def build_datamodule(spec: dict, run_dir: Optional[Path] = None, seed: int = 0, sampler: Any = None,
                     model_spec: Optional[dict] = None) -> L.LightningDataModule:
    """The datamodule; its tokenizer is saved in (and reloaded from) ``run_dir/tokenizer``; a datamodule
    that takes the model's ``architecture`` (its tokenizer and image size) gets it from ``model_spec``."""
    filled: dict[str, Any] = {"seed": seed}
    if isinstance(model_spec, dict) and model_spec.get("architecture") is not None:
        filled["architecture"] = model_spec["architecture"]
    if run_dir is not None:
        filled["tokenizer_dir"] = str(run_dir / "tokenizer")
    if sampler is not None:
        filled["sampler"] = sampler
    return build_component(DATAMODULES, spec, **filled)


def _is_spec(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, dict) and "name" in x)


def build_loss(spec: dict | str) -> nn.Module:
    """The loss of ``spec``; the components of a ``weighted_sum`` may be loss specs themselves."""
    name, kwargs = _kwargs(spec)
    parts = kwargs.get("losses")
    if isinstance(parts, dict):
        kwargs["losses"] = {k: build_loss(v) if _is_spec(v) else v for k, v in parts.items()}
    return build_component(LOSSES, {"name": name, **kwargs})


def build_sampler(spec: dict | str | None) -> Any:
    """The sampler of ``spec`` (default ``in_batch``); its ``filters`` may be filter specs. Settings'
    samplers (``datamodules``) are registered first."""
    import importlib

    importlib.import_module("datamodules")
    name, kwargs = _kwargs(spec or "in_batch")
    if kwargs.get("filters"):
        kwargs["filters"] = [build_component(FILTERS, f) if _is_spec(f) else f for f in kwargs["filters"]]
    return build_component(SAMPLERS, {"name": name, **kwargs})


def build_filters(specs: Optional[list]) -> list:
    return [build_component(FILTERS, s) for s in (specs or [])]


def build_transforms(specs: Optional[list]) -> list:
    return [build_component(TRANSFORMS, s) for s in (specs or [])]


def build_encoder(spec: dict | str, vocab_size: Optional[int]) -> nn.Module:
    return build_component(ENCODERS, spec, vocab_size=vocab_size)


def build_model(cfg: dict, vocab_size: Optional[int], loss: nn.Module, **objects: Any) -> L.LightningModule:
    """The LightningModule of ``cfg['model']`` wired with its encoders, ``loss`` and the optimiser/eval
    settings; ``objects`` (sampler, filters, transforms) are passed when the module accepts them."""
    name, kwargs = _kwargs(cfg["model"])
    encoders: dict[str, Any] = {}
    if "encoder" in kwargs:  # settings whose towers are built from an ``encoder`` spec (code search)
        encoders["query_encoder"] = build_encoder(kwargs.pop("encoder"), vocab_size)
        doc_spec = kwargs.pop("doc_encoder", None)
        encoders["doc_encoder"] = build_encoder(doc_spec, vocab_size) if doc_spec else None
    est_spec = kwargs.pop("similarity_estimator", None)
    if est_spec:
        kwargs["similarity_estimator"] = build_component(ESTIMATORS, est_spec)
    optim, ev = cfg.get("optim") or {}, cfg.get("eval") or {}
    filled = dict(lr=optim.get("lr"), weight_decay=optim.get("weight_decay"), warmup_steps=optim.get("warmup_steps"),
                  scheduler=optim.get("scheduler"), eval_chunk_size=ev.get("chunk_size"),
                  csn_distractors=ev.get("csn_distractors"), **objects)
    sampler = objects.get("sampler")
    if sampler is not None:  # e.g. sampler=queue: the queue lives in the model
        filled.update(sampler.model_settings())
    params, _ = constructor_params(MODELS.get(name))
    for k, v in filled.items():
        if v is not None and k in params and k not in kwargs:
            kwargs[k] = v
    return MODELS.build(name, loss=loss, **encoders, **kwargs)


def trainer_kwargs(cfg: dict) -> dict[str, Any]:
    import dataclasses

    from contrastive.config.schema import TrainerConfig

    base = dataclasses.asdict(TrainerConfig())
    base.update(cfg.get("trainer") or {})
    return {k: v for k, v in base.items() if v is not None}
