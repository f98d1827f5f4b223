"""Small shared builders for tests."""
from __future__ import annotations

import socket

import torch

from contrastive.encoders import TransformerTextEncoder
from contrastive.losses import InfoNCELoss
from datamodules.codesearch.model import DualEncoderModule


def tiny_model(symmetric: bool = False, vocab: int = 50, seed: int = 0, dtype=torch.float64, **kw) -> DualEncoderModule:
    torch.manual_seed(seed)
    enc = TransformerTextEncoder(vocab, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=16, dropout=0.0)
    model = DualEncoderModule(enc, InfoNCELoss(temperature=0.1, symmetric=symmetric), projection_dim=8, **kw)
    return model.to(dtype)


def tiny_batch(n: int, vocab: int = 50, length: int = 6, seed: int = 1, groups: list[int] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    qi = torch.randint(1, vocab, (n, length), generator=g)
    di = torch.randint(1, vocab, (n, length + 2), generator=g)
    qm = torch.ones_like(qi, dtype=torch.bool)
    qm[:, -1] = torch.rand(n, generator=g) > 0.5
    dm = torch.ones_like(di, dtype=torch.bool)
    ids = torch.arange(n) + 100
    batch = {"query_ids": qi, "query_mask": qm, "doc_ids": di, "doc_mask": dm, "pair_id": ids}
    batch["dup_group"] = torch.tensor(groups) if groups is not None else ids.clone()
    return batch


def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DDPWrap(torch.nn.Module):
    """Wraps a dual encoder so that torch DDP calls ``contrastive_step`` as its forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.contrastive_step(batch)[0]
