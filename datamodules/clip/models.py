"""open_clip models as towers: build by name or YAML, load a local checkpoint, export for open_clip.

Architectures (:func:`resolve_architecture`):

- any name in ``open_clip.list_models()`` (``"ViT-B-32"``, ``"RN50"``, ...);
- a YAML file in open_clip's model-config format (``embed_dim``, ``vision_cfg`` with ViT sizes or a
  ``timm_model_name``, ``text_cfg``), registered with open_clip under the file's stem at build time;
- the name of a YAML file shipped in ``datamodules/clip/model_configs/`` (``"clip-tiny"``, ``"clip-tiny-timm"``,
  ``"clip-tiny-timm-t4"``, ``"clip-tiny-rn"``, ``"clip-tiny-vit-t4"``).

Models are randomly initialised; ``pretrained`` takes a local checkpoint file only (an open_clip
training checkpoint, a bare state dict or safetensors; open_clip's own loader converts and checks it,
strictly). Nothing is downloaded: a pretrained *tag* is refused and timm/HF tower weights are never fetched.

Towers follow the setting's tower contract: ``forward(inputs: dict[str, Tensor]) -> (B, d)``.

- :class:`CLIPImageTower`: ``{"pixels": (B, 3, H, W) float}`` (normalised with the model's mean/std);
- :class:`CLIPTextTower`: ``{"ids": (B, L) long}`` open_clip token ids (``L <= context_length``, padded
  with 0 up to it); a ``"mask"`` entry is accepted and ignored: open_clip's text transformer is causal
  and pools at the end-of-text token, so padding after it never changes the embedding.
- :class:`CLIPLogitScale`: open_clip's learnable ``logit_scale`` (log of the inverse temperature,
  initialised to ``ln(1 / 0.07)``); ``forward()`` returns ``exp(logit_scale)`` after clamping the
  parameter to ``[0, ln 100]`` in place, as open_clip's training loop does after every step.

The towers share their parameters with the open_clip model (:attr:`CLIPTowers.model`), so the trained
model is exported with :func:`export_open_clip`, and ``open_clip.create_model_and_transforms(name,
pretrained=<file>)`` loads it after ``open_clip.add_model_config(<dir>/<name>.json)``, or directly with
``open_clip.create_model_and_transforms("local-dir:<dir>")``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import open_clip
import torch
import torch.nn.functional as F
import yaml
from open_clip.model import CLIP
from torch import Tensor, nn

from contrastive.io import atomic_write, atomic_write_text

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
LOGIT_SCALE_MAX = math.log(100.0)
CHECKPOINT_NAME = "open_clip_pytorch_model.bin"
REQUIRED_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class ModelConfigError(ValueError):
    """A model config or checkpoint argument that cannot be used."""


def load_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) model config in open_clip's format; errors name the file and the key."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ModelConfigError(f"{path}: cannot read model config ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{path}: a model config is a mapping with keys {REQUIRED_KEYS}")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ModelConfigError(f"{path}: model config lacks {missing} (open_clip format: {REQUIRED_KEYS})")
    for k in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg[k], dict):
            raise ModelConfigError(f"{path}: {k} must be a mapping")
    return cfg


def _config_dir() -> Path:
    base = os.environ.get("CONTRASTIVE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "contrastive") / "clip" / "model_configs"


def register_model_config(name: str, cfg: Mapping[str, Any], config_dir: str | os.PathLike | None = None) -> Path:
    """Make ``name`` an open_clip architecture: writes ``<config_dir>/<name>.json`` (atomically; default
    ``$CONTRASTIVE_CACHE/clip/model_configs``) and calls ``open_clip.add_model_config`` on it."""
    path = (Path(config_dir) if config_dir is not None else _config_dir()) / f"{name}.json"
    text = json.dumps(dict(cfg), indent=2, sort_keys=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    open_clip.add_model_config(path)
    return path


def resolve_architecture(architecture: str) -> tuple[str, dict[str, Any]]:
    """``(open_clip model name, model config)`` for a built-in name, a shipped YAML name or a YAML path."""
    path = Path(architecture).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        name, cfg = path.stem, load_model_config(path)
    elif (MODEL_CONFIG_DIR / f"{architecture}.yaml").is_file():
        name, cfg = architecture, load_model_config(MODEL_CONFIG_DIR / f"{architecture}.yaml")
    elif open_clip.get_model_config(architecture) is not None:
        return architecture, open_clip.get_model_config(architecture)
    else:
        shipped = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))
        raise ModelConfigError(f"unknown architecture {architecture!r}: not a model-config file, not one of "
                               f"{shipped} and not an open_clip model (open_clip.list_models())")
    register_model_config(name, cfg)
    return name, cfg


def create_clip_model(architecture: str, pretrained: str | os.PathLike | None = None,
                      **model_kwargs: Any) -> tuple[nn.Module, str, dict[str, Any]]:
    """``(open_clip model, name, model config)``; random init unless ``pretrained`` names a local file."""
    name, cfg = resolve_architecture(architecture)
    if pretrained is not None and not Path(pretrained).expanduser().is_file():
        raise ModelConfigError(f"pretrained must be a local checkpoint file (nothing is downloaded); "
                               f"{str(pretrained)!r} is not a file")
    model = open_clip.create_model(name, pretrained=str(Path(pretrained).expanduser()) if pretrained else None,
                                   pretrained_image=False, pretrained_text=False, **model_kwargs)
    return model, name, cfg


class CLIPImageTower(nn.Module):
    """``{"pixels": (B, 3, H, W)}`` -> ``(B, d)`` image embeddings (L2-normalised if ``normalize``)."""

    def __init__(self, visual: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.visual = visual
        self.normalize = normalize

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        feats = self.visual(inputs["pixels"])
        return F.normalize(feats, dim=-1) if self.normalize else feats


class CLIPTextTower(nn.Module):
    """``{"ids": (B, L)}`` open_clip token ids -> ``(B, d)`` text embeddings (L2-normalised if ``normalize``).

    Holds the text parts of an open_clip ``CLIP`` (and runs ``CLIP.encode_text`` on them), or the
    ``text`` module of a ``CustomTextCLIP``; the parameters are the model's own.
    """

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.custom = isinstance(getattr(model, "text", None), nn.Module)
        if self.custom:
            self.text = model.text
            self.context_length = int(getattr(model.text, "context_length", 0) or 0)
        else:
            for part in ("token_embedding", "transformer", "ln_final"):
                setattr(self, part, getattr(model, part))
            self.positional_embedding = model.positional_embedding
            self.text_projection = model.text_projection
            self.text_pool_type = model.text_pool_type
            self.text_eos_id = getattr(model, "text_eos_id", None)
            self.register_buffer("attn_mask", model.attn_mask, persistent=False)
            self.context_length = int(model.context_length)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        ids = inputs["ids"]
        if self.context_length and ids.shape[1] < self.context_length:
            ids = F.pad(ids, (0, self.context_length - ids.shape[1]))
        feats = self.text(ids) if self.custom else CLIP.encode_text(self, ids)  # type: ignore[arg-type]
        return F.normalize(feats, dim=-1) if self.normalize else feats


class CLIPLogitScale(nn.Module):
    """open_clip's learnable logit scale: ``forward() = exp(logit_scale)``, the parameter clamped to
    ``[0, ln 100]`` first (open_clip clamps it after each optimiser step; here before each use)."""

    def __init__(self, model: nn.Module, max_log: float = LOGIT_SCALE_MAX) -> None:
        super().__init__()
        self.logit_scale = model.logit_scale
        self.max_log = max_log

    def clamp_(self) -> None:
        """Clamp in place, only when out of range (an in-range parameter keeps its version, so a graph
        that already used it stays valid)."""
        with torch.no_grad():
            if bool((self.logit_scale < 0).any() or (self.logit_scale > self.max_log).any()):
                self.logit_scale.clamp_(0.0, self.max_log)

    def forward(self) -> Tensor:
        self.clamp_()
        return self.logit_scale.exp()


@dataclass
class CLIPTowers:
    """An open_clip model and its towers (sharing parameters), with what export and the data need.

    ``tokenizer(list[str]) -> LongTensor (B, context_length)``; ``preprocess_cfg`` holds the model's
    ``size``, ``mean`` and ``std`` for image normalisation.
    """

    model: nn.Module
    image: CLIPImageTower
    text: CLIPTextTower
    logit_scale: CLIPLogitScale
    tokenizer: Callable[..., Tensor]
    name: str
    model_cfg: dict[str, Any]

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        return dict(open_clip.get_model_preprocess_cfg(self.model))

    def export(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        return export_open_clip(self.model, self.name, self.model_cfg, out_dir, self.preprocess_cfg)


def build_clip_towers(architecture: str = "clip-tiny", pretrained: str | os.PathLike | None = None,
                      normalize: bool = True, **model_kwargs: Any) -> CLIPTowers:
    """Build the model (see :func:`create_clip_model`) and wrap it in the three towers."""
    model, name, cfg = create_clip_model(architecture, pretrained, **model_kwargs)
    return CLIPTowers(model, CLIPImageTower(model.visual, normalize), CLIPTextTower(model, normalize),
                      CLIPLogitScale(model), open_clip.get_tokenizer(name), name, cfg)


def export_open_clip(model: nn.Module, name: str, model_cfg: Mapping[str, Any], out_dir: str | os.PathLike,
                     preprocess_cfg: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``model`` as an open_clip checkpoint, atomically:

    - ``<out_dir>/open_clip_pytorch_model.bin``: ``{"state_dict": ..., "name": name}`` (the logit scale
      clamped to ``[0, ln 100]``);
    - ``<out_dir>/<name>.json``: the model config (``open_clip.add_model_config`` it, then
      ``open_clip.create_model_and_transforms(name, pretrained=<bin>)``);
    - ``<out_dir>/open_clip_config.json``: ``{"model_cfg", "preprocess_cfg"}`` for ``"local-dir:<out_dir>"``.
    """
    out = Path(out_dir)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].clamp(0.0, LOGIT_SCALE_MAX)
    paths = {"checkpoint": out / CHECKPOINT_NAME, "model_config": out / f"{name}.json",
             "open_clip_config": out / "open_clip_config.json"}
    atomic_write(paths["checkpoint"], lambda tmp: torch.save({"state_dict": state, "name": name}, tmp))
    atomic_write_text(paths["model_config"], json.dumps(dict(model_cfg), indent=2, sort_keys=True))
    oc = {"model_cfg": dict(model_cfg), "preprocess_cfg": dict(preprocess_cfg or {})}
    atomic_write_text(paths["open_clip_config"], json.dumps(oc, indent=2, sort_keys=True))
    return paths
