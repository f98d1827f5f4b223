"""Class-name text embeddings that initialise the category-query head (CQ-DINO initialises its category
queries from a vision-language text encoder's embeddings of the class names; methods.md A4).

Two sources, given as ``head.init_embeddings``:

- a local open_clip checkpoint (:class:`OpenClipClassNames`): the checkpoint file and its model config
  (what ``open_clip.create_model_and_transforms(name, pretrained=<file>)`` loads after
  ``open_clip.add_model_config(<name>.json)``; the clip setting's export writes exactly that, see
  :func:`datamodules.clip.models.export_open_clip`). Each class name is put into ``prompt``, tokenised with
  the model's open_clip tokenizer and encoded by its text tower; the rows are L2-normalised ``(C, e)``;
- a ``.pt`` file saved with ``torch.save``: a ``(C, e)`` tensor in category order, or
  ``{"names": [...], "embeddings": (N, e)}`` matched by name.

Nothing is downloaded: the checkpoint must be a local file (:func:`datamodules.clip.models.create_clip_model`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from contrastive.config.errors import ConfigError

KEY = "head.init_embeddings"


@dataclasses.dataclass
class OpenClipClassNames:
    """Where the class-name embeddings come from: an open_clip text tower.

    Attributes:
        checkpoint: local open_clip checkpoint (e.g. ``open_clip_pytorch_model.bin`` of an export).
        model_config: its model config, open_clip's JSON (or YAML) format with ``embed_dim``, ``vision_cfg``
            and ``text_cfg``; default ``<checkpoint folder>/<name>.json`` with the ``name`` the checkpoint
            records (as :func:`~datamodules.clip.models.export_open_clip` writes).
        prompt: template with one ``{}`` for the class name (underscores in names become spaces).
        batch_size: class names encoded per forward pass.
    """

    checkpoint: str
    model_config: Optional[str] = None
    prompt: str = "a photo of a {}."
    batch_size: int = 256

    def check(self) -> None:
        if self.prompt.count("{}") != 1:
            raise ConfigError(f"{KEY}.prompt must contain one '{{}}' for the class name; got {self.prompt!r}")
        if self.batch_size < 1:
            raise ConfigError(f"{KEY}.batch_size must be >= 1; got {self.batch_size}")


def _model_config_path(source: OpenClipClassNames, ckpt: Path) -> Path:
    if source.model_config is not None:
        path = Path(source.model_config).expanduser()
        if not path.is_file():
            raise ConfigError(f"{KEY}.model_config: file not found: {path}")
        return path
    from contrastive.runs import CheckpointError, read_checkpoint

    try:  # an open_clip export holds {"state_dict", "name"}
        name = read_checkpoint(ckpt).get("name")
    except CheckpointError:
        name = None
    if not isinstance(name, str) or not (ckpt.parent / f"{name}.json").is_file():
        raise ConfigError(f"{KEY}: give model_config (the open_clip model-config JSON of {ckpt}); the checkpoint "
                          f"names no model whose <name>.json is beside it" + (f" (name {name!r})" if name else ""))
    return ckpt.parent / f"{name}.json"


@torch.no_grad()
def open_clip_class_embeddings(source: OpenClipClassNames, names: Sequence[str]) -> Tensor:
    """``(C, e)`` L2-normalised text-tower embeddings of ``prompt.format(name)`` for each class name."""
    from datamodules.clip.models import ModelConfigError, build_clip_towers

    source.check()
    ckpt = Path(source.checkpoint).expanduser()
    if not ckpt.is_file():
        raise ConfigError(f"{KEY}.checkpoint: file not found: {ckpt}")
    config = _model_config_path(source, ckpt)
    try:
        towers = build_clip_towers(str(config), pretrained=ckpt, normalize=True)
    except ModelConfigError as e:
        raise ConfigError(f"{KEY}.model_config: {e}") from None
    except Exception as e:  # noqa: BLE001 - open_clip's loader: not a checkpoint, or one of another model
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{KEY}.checkpoint: {ckpt} does not load as an open_clip checkpoint of the model in "
                          f"{config}: {first}") from None
    towers.model.eval()
    prompts = [source.prompt.format(n.replace("_", " ")) for n in names]
    out = [towers.text({"ids": towers.tokenizer(prompts[i:i + source.batch_size])})
           for i in range(0, len(prompts), source.batch_size)]
    return torch.cat(out).float()


def saved_class_embeddings(path: str, names: Sequence[str]) -> Tensor:
    """``(C, e)`` class-name embeddings from a local ``.pt`` file (module docstring)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{KEY}: file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ConfigError(f"{KEY}: {p} is not a torch file of class-name embeddings ({type(e).__name__})") from None
    if isinstance(obj, dict):
        if "names" not in obj or "embeddings" not in obj:
            raise ConfigError(f"{p}: expected a tensor or a dict with 'names' and 'embeddings'")
        row = {n: i for i, n in enumerate(obj["names"])}
        missing = [n for n in names if n not in row]
        if missing:
            raise ConfigError(f"{p}: no embedding for categories {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return obj["embeddings"][[row[n] for n in names]].float()
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or obj.shape[0] != len(names):
        raise ConfigError(f"{p}: expected a ({len(names)}, e) tensor of class-name embeddings")
    return obj.float()


def class_embeddings(spec: str | dict, names: Sequence[str]) -> Tensor:
    """The embeddings ``head.init_embeddings`` names: a ``.pt`` path, or an :class:`OpenClipClassNames`
    mapping (validated by :func:`contrastive.detection.build.validate_detection`)."""
    if isinstance(spec, str):
        return saved_class_embeddings(spec, names)
    return open_clip_class_embeddings(OpenClipClassNames(**spec), names)
