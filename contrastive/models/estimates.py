"""Batch-level similarity estimates for Soft-InfoNCE (Li et al. 2023) and Cement difficulty, registered in
:data:`contrastive.registry.ESTIMATORS` and selected in YAML as ``model.similarity_estimator``: the
:class:`~contrastive.losses.estimators.SimilarityEstimator` subclasses of text settings that implement
``estimate_batch``.

An estimator turns one training batch into representations that are gathered like the candidates, then
scored: ``r = score(anchor_repr(batch), all candidate reprs)`` ``(B, M)``, with the columns laid out like the
model's candidates (gathered in-batch documents, then gathered extra negatives). Queue entries have no
estimate and get the row mean.

- ``bm25``: BM25 between the token sequences of the batch (paper: query-to-query; ``candidates="queries"``),
  computed with :class:`contrastive.losses.estimators.BM25Estimator` on the BPE token ids (the paper also
  scores the training model's subword tokens). Extra negatives have no query, so they are scored by their
  document tokens.
- ``frozen_encoder``: cosine similarity from the query tower of any frozen run (SimCSE-like,
  query-to-query).
- ``frozen_model``: a frozen copy of a model trained with plain InfoNCE (the paper's ``--self``):
  query-to-document dot product.

Frozen runs must share the tokenizer of the run being trained: set ``data.tokenizer_dir`` to
``<frozen run>/tokenizer`` (checked at set-up).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from contrastive.distributed import gather_no_grad, is_distributed
from contrastive.losses.estimators import BM25Estimator, FrozenEncoderEstimator
from contrastive.registry import ESTIMATORS


def token_strings(ids: Tensor, mask: Tensor, skip: int = 4) -> list[str]:
    """Rows of token ids as space-separated strings, without padding and special tokens (ids < ``skip``)."""
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        out.append(" ".join(str(t) for t, keep in zip(row, m) if keep and t >= skip))
    return out


def gather_strings(xs: list[str]) -> list[str]:
    if not is_distributed():
        return xs
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, xs)
    return [s for p in parts for s in p]


@ESTIMATORS.register("bm25")
class BatchBM25Estimator(BM25Estimator):
    """BM25 within the (global) batch on BPE tokens.

    Args:
        k1, b: BM25 constants.
        candidates: ``"queries"`` (the paper: query i against the query of pair j) or ``"documents"``.
    """

    def __init__(self, k1: float = 1.2, b: float = 0.75, candidates: Literal["queries", "documents"] = "queries") -> None:
        super().__init__(tokenizer=str.split, k1=k1, b=b)  # token ids as words
        self.candidates = candidates

    def setup(self, module: nn.Module, datamodule: Any) -> None:
        # the paper's avgdl is the mean length over the training queries
        ds = datamodule._dataset("train") if hasattr(datamodule, "_dataset") else None
        if ds is not None and hasattr(ds, "queries"):
            offsets = ds.queries.offsets
            self.avgdl = float((offsets[1:] - offsets[:-1]).float().mean()) - 1.0  # without [CLS]

    @torch.no_grad()
    def estimate_batch(self, module: nn.Module, batch: Any) -> Tensor:
        batch = module.as_batch(batch)
        anchors = token_strings(batch.anchors["ids"], batch.anchors["mask"])
        side = batch.anchors if self.candidates == "queries" else batch.candidates  # queries: paired batches
        cands = gather_strings(token_strings(side["ids"], side["mask"]))
        if batch.has_negatives:
            cands += gather_strings(token_strings(batch.negatives.inputs["ids"], batch.negatives.inputs["mask"]))
        return self.estimate(anchors, cands).to(batch.anchors["ids"].device)


def _load_frozen_run(run_dir: str, checkpoint: Optional[str]) -> nn.Module:
    """Rebuild a run's model from its ``config.yaml`` and load its best (else last) checkpoint, frozen."""
    from contrastive import build
    from contrastive.config.loader import compose
    from contrastive.config.validate import validate
    from contrastive.encoders.tokenizer import BPETokenizer

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"similarity_estimator.run_dir: no config.yaml in {run}")
    cfg = validate(*compose(run / "config.yaml", []))
    tok = BPETokenizer.load(str(run / "tokenizer"))
    # built under a forked RNG: the frozen copy's (overwritten) random init must not shift the random stream
    # of the run being trained, so that a Soft-InfoNCE run and its InfoNCE baseline start from the same weights
    with torch.random.fork_rng(devices=[]):
        model = build.build_model(cfg, tok.vocab_size, build.build_loss(cfg["loss"]))
    candidates = [Path(checkpoint)] if checkpoint else [run / "checkpoints" / n for n in ("best.ckpt", "last.ckpt")]
    ckpt = next((c for c in candidates if c.is_file()), None)
    if ckpt is None:
        raise FileNotFoundError(f"similarity_estimator: no checkpoint at {', '.join(map(str, candidates))}")
    from contrastive.runs import read_checkpoint

    state = read_checkpoint(ckpt)  # names the file and says what is wrong with it
    model.load_state_dict(state["state_dict"], strict=False)
    model.eval().requires_grad_(False)
    return model


def _file_hash(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else ""


class _FrozenRunEstimator(FrozenEncoderEstimator):
    query_to_query: bool = True
    normalize: bool = True

    def __init__(self, run_dir: str, checkpoint: Optional[str] = None) -> None:
        self.run_dir = run_dir
        self.frozen = _load_frozen_run(run_dir, checkpoint)
        side = "anchor" if self.query_to_query else "candidate"
        super().__init__(lambda x: self.frozen.encode(x, "anchor"), lambda x: self.frozen.encode(x, side),
                         normalize=self.normalize, modules=[self.frozen])

    def setup(self, module: nn.Module, datamodule: Any) -> None:
        mine = Path(getattr(datamodule, "tokenizer_dir_used", None) or getattr(datamodule, "tokenizer_dir", None) or "") / "tokenizer.json"
        theirs = Path(self.run_dir) / "tokenizer" / "tokenizer.json"
        if mine.is_file() and _file_hash(mine) != _file_hash(theirs):
            raise ValueError(
                f"similarity_estimator.run_dir: the frozen run's tokenizer ({theirs}) differs from this run's "
                f"({mine}); set data.tokenizer_dir={theirs.parent} so both read the same token ids")
        self.to(module.device)

    @torch.no_grad()
    def estimate_batch(self, module: nn.Module, batch: Any) -> Tensor:
        batch = module.as_batch(batch)
        self.frozen.to(batch.anchors["ids"].device)
        a = self.frozen.encode(batch.anchors, "anchor")
        if self.query_to_query:  # paired batches: candidate j is represented by its query
            c = [gather_no_grad(self.frozen.encode(batch.anchors, "anchor"))]
        else:
            c = [gather_no_grad(self.frozen.encode(batch.candidates, "candidate"))]
        if batch.has_negatives:
            c.append(gather_no_grad(self.frozen.encode(batch.negatives.inputs, "candidate")))
        c_all = torch.cat(c)
        if self.normalize:
            a, c_all = nn.functional.normalize(a, dim=-1), nn.functional.normalize(c_all, dim=-1)
        return a @ c_all.T


@ESTIMATORS.register("frozen_encoder")
class FrozenEncoderBatchEstimator(_FrozenRunEstimator):
    """SimCSE-like: cosine between queries under a frozen run's query tower.

    Args:
        run_dir: a run directory (``config.yaml``, ``tokenizer/``, ``checkpoints/``).
        checkpoint: a checkpoint path (default: the run's best, then last).
    """

    query_to_query = True
    normalize = True


@ESTIMATORS.register("frozen_model")
class FrozenModelBatchEstimator(_FrozenRunEstimator):
    """The paper's ``--self`` estimator: query-to-document dot product of a frozen run trained with plain
    InfoNCE (unnormalised; with L2-normalised towers this is the cosine).

    Args:
        run_dir: a run directory (``config.yaml``, ``tokenizer/``, ``checkpoints/``).
        checkpoint: a checkpoint path (default: the run's best, then last).
    """

    query_to_query = False
    normalize = False
