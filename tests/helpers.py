"""Small shared builders for tests."""
from __future__ import annotations

import csv
import socket
from pathlib import Path
from typing import Sequence

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


def tiny_codesearch(cache, out, epochs: int = 2, checkpoint_every: int = 3) -> list[str]:
    """Overrides of ``configs/codesearch/infonce.yaml`` for a fit of a few seconds on 8 standard-library
    packages (4 batches of 16 per epoch, a 16-dim one-layer encoder, one thread, no test after fit)."""
    import sysconfig
    from pathlib import Path

    std = Path(sysconfig.get_paths()["stdlib"])
    roots = ",".join(str(std / p) for p in ("json", "email", "http", "xml", "logging", "urllib", "concurrent", "importlib"))
    return [f"data.path=[{roots}]", f"data.cache_dir={cache}", "data.max_pairs=600", "data.vocab_size=600",
            "data.batch_size=16", "data.max_doc_length=48", "data.split_method=balanced", "data.eval_batch_size=64",
            "model=tiny_transformer", "model.encoder.dim=16", "model.encoder.ff_dim=32", "model.encoder.num_layers=1", "model.projection_dim=16",
            f"trainer.max_epochs={epochs}", "trainer.limit_train_batches=4",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "optim.warmup_steps=2", f"run.output_dir={out}",
            f"run.checkpoint_every_n_steps={checkpoint_every}", "run.test_after_fit=false", "run.num_threads=1",
            "eval.bm25_baseline=false"]


def final_state(run: Path, drop_columns: Sequence[str] = ()) -> tuple[dict, dict, list[dict]]:
    """A run's ``last.ckpt`` weights and optimiser state, and its ``metrics.csv`` rows without
    ``drop_columns`` (e.g. wall-clock times), for comparing a resumed run with an uninterrupted one."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    with open(run / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in r.items() if k not in drop_columns} for r in csv.DictReader(f)]
    return ckpt["state_dict"], ckpt["optimizer_states"][0]["state"], rows
