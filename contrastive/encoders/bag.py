"""A neural bag of (sub)words: token embeddings pooled without any order, the CodeSearchNet NBoW baseline.

Husain et al. 2019 (CodeSearchNet Challenge, arXiv 1909.09436) found that this encoder, shared between
queries and code and trained with in-batch softmax, beat their 1D-CNN, biRNN and self-attention encoders
on most languages while training far faster. It is the project's default code-search tower on CPU.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from contrastive.encoders.transformer import masked_mean, text_inputs
from contrastive.registry import ENCODERS

Pooling = Literal["attention", "weighted_mean", "mean", "max"]


def attention_pool(hidden: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax-weighted mean over the real tokens.

    Args:
        hidden: ``(B, L, d)`` token vectors. scores: ``(B, L)`` unnormalised weights. mask: ``(B, L)`` bool.

    Returns:
        ``(B, d)``: ``sum_t softmax(scores)_t hidden_t`` over the tokens with ``mask`` True (zeros for a row
        without any real token).
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all-padding rows: softmax of -inf is nan
    return torch.einsum("bl,bld->bd", weights, hidden)


def gated_mean(hidden: Tensor, gates: Tensor, mask: Tensor) -> Tensor:
    """CodeSearchNet's ``weighted_mean`` pooling: ``sum_t g_t h_t / sum_t g_t`` with ``g = sigmoid(gates)``
    over real tokens. ``hidden`` (B, L, d), ``gates`` (B, L), ``mask`` (B, L) bool -> (B, d)."""
    g = torch.sigmoid(gates) * mask.to(hidden.dtype)
    return torch.einsum("bl,bld->bd", g, hidden) / g.sum(dim=1, keepdim=True).clamp_min(1e-6)


@ENCODERS.register("nbow")
class BagOfWordsEncoder(nn.Module):
    """Token embeddings, dropout, then an order-free pooling.

    Input ``ids`` (B, L) long and ``mask`` (B, L) bool (True = real token); output (B, ``dim``).

    Args:
        vocab_size: tokenizer vocabulary size (filled in from the datamodule when left out of YAML).
        dim: embedding width (the output size).
        pooling: ``"attention"`` (softmax over a learned per-token score ``w·e_t``: an attention-weighted
            mean that learns to down-weight frequent, uninformative tokens), ``"weighted_mean"`` (sigmoid
            gates, CodeSearchNet's variant), ``"mean"`` or ``"max"``.
        dropout: dropout on the token embeddings during training.
        pad_id: padding id (its embedding is kept at zero).
    """

    def __init__(self, vocab_size: int, dim: int = 256, pooling: Pooling = "attention", dropout: float = 0.1,
                 pad_id: int = 0) -> None:
        super().__init__()
        if pooling not in ("attention", "weighted_mean", "mean", "max"):
            raise ValueError(f"nbow pooling must be 'attention', 'weighted_mean', 'mean' or 'max'; got {pooling!r}")
        if vocab_size < 1 or dim < 1:
            raise ValueError(f"nbow needs vocab_size >= 1 and dim >= 1; got {vocab_size}, {dim}")
        self.dim, self.pooling = int(dim), pooling
        self.token = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(dim, 1, bias=False) if pooling in ("attention", "weighted_mean") else None
        nn.init.normal_(self.token.weight, std=1.0 / math.sqrt(dim))
        with torch.no_grad():
            self.token.weight[pad_id].zero_()

    @property
    def output_dim(self) -> int:
        return self.dim

    def forward(self, inputs: Union[Mapping[str, Tensor], Tensor], mask: Optional[Tensor] = None) -> Tensor:
        """``{"ids": (B, L), "mask": (B, L)}`` (or ``ids, mask``) → ``(B, dim)``."""
        ids, mask = text_inputs(inputs, mask)
        h = self.dropout(self.token(ids))  # (B, L, d)
        if self.pooling == "mean":
            return masked_mean(h, mask)
        if self.pooling == "max":
            return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1).nan_to_num(0.0, neginf=0.0)
        scores = self.score(h).squeeze(-1)  # (B, L)
        return attention_pool(h, scores, mask) if self.pooling == "attention" else gated_mean(h, scores, mask)
