"""Text encoders: a small Transformer trained from scratch, or a local Hugging Face checkpoint."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from contrastive.registry import ENCODERS


def text_inputs(inputs: Union[Mapping[str, Tensor], Tensor], mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(ids (B, L), mask (B, L))`` from the tower inputs ``{"ids", "mask"}`` (or ``ids, mask`` given apart)."""
    if mask is not None:
        return inputs, mask  # type: ignore[return-value]
    if not isinstance(inputs, Mapping) or "ids" not in inputs or "mask" not in inputs:
        raise TypeError("a text tower takes {'ids': (B, L) long, 'mask': (B, L) bool} (or ids, mask)")
    return inputs["ids"], inputs["mask"]


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens. ``hidden`` (B, L, d), ``mask`` (B, L) bool → (B, d)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


@ENCODERS.register("transformer")
class TransformerTextEncoder(nn.Module):
    """A pre-LayerNorm Transformer encoder (Vaswani et al. 2017) sized to train on a CPU.

    Input ``ids`` (B, L) long and ``mask`` (B, L) bool (True = real token); output (B, ``dim``)
    pooled by the masked mean or by the first ([CLS]) token.

    Args:
        vocab_size: tokenizer vocabulary size (filled in from the datamodule when left out of YAML).
        dim: model width. num_layers / num_heads / ff_dim: encoder shape.
        max_length: size of the learned position table; longer inputs are an error.
        dropout: dropout in attention and feed-forward blocks.
        pooling: ``"mean"`` or ``"cls"``.
        pad_id: padding id (its embedding is kept at zero).
    """

    def __init__(self, vocab_size: int, dim: int = 128, num_layers: int = 2, num_heads: int = 4,
                 ff_dim: int = 256, max_length: int = 512, dropout: float = 0.1,
                 pooling: Literal["mean", "cls"] = "mean", pad_id: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.max_length, self.pooling = dim, max_length, pooling
        self.token = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, num_heads, ff_dim, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token.weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.position.weight, std=0.02)
        with torch.no_grad():
            self.token.weight[pad_id].zero_()

    @property
    def output_dim(self) -> int:
        return self.dim

    def forward(self, inputs: Union[Mapping[str, Tensor], Tensor], mask: Optional[Tensor] = None) -> Tensor:
        """``{"ids": (B, L), "mask": (B, L)}`` (or ``ids, mask``) → ``(B, dim)``."""
        ids, mask = text_inputs(inputs, mask)
        if ids.shape[1] > self.max_length:
            raise ValueError(f"input length {ids.shape[1]} exceeds the encoder's max_length {self.max_length}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.token(ids) + self.position(pos)[None]
        h = self.encoder(h, src_key_padding_mask=~mask)
        h = self.norm(h)
        return h[:, 0] if self.pooling == "cls" else masked_mean(h, mask)


@ENCODERS.register("huggingface")
class HFTextEncoder(nn.Module):
    """A local Hugging Face checkpoint (a directory with ``config.json`` and weights); never downloads.

    Args:
        path: local directory of the checkpoint.
        pooling: ``"mean"`` or ``"cls"``.
        vocab_size: ignored (accepted so that configs can swap encoders freely).
    """

    def __init__(self, path: str, pooling: Literal["mean", "cls"] = "mean", vocab_size: Optional[int] = None) -> None:
        super().__init__()
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"encoder.path: no Hugging Face checkpoint (config.json) in {p}")
        try:
            from transformers import AutoModel
        except ImportError as e:  # optional dependency
            raise ImportError("encoder 'huggingface' needs transformers: pip install 'contrastive[hf]'") from e
        self.model = AutoModel.from_pretrained(str(p), local_files_only=True)
        self.pooling = pooling

    @property
    def output_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, inputs: Union[Mapping[str, Tensor], Tensor], mask: Optional[Tensor] = None) -> Tensor:
        """``{"ids": (B, L), "mask": (B, L)}`` (or ``ids, mask``) → ``(B, hidden)``."""
        ids, mask = text_inputs(inputs, mask)
        h = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return h[:, 0] if self.pooling == "cls" else masked_mean(h, mask)
