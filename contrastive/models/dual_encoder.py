"""Dual-encoder LightningModule: query and document towers, projection, L2 normalisation, any loss.

The module only wires objects together: encoders, the loss and the optimiser settings are built
elsewhere (``contrastive.build``) and passed in.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn

from contrastive.distributed import gather_no_grad, gather_with_grad
from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss
from contrastive.registry import MODELS


class Tower(nn.Module):
    """Encoder → optional linear projection → optional L2 normalisation. ``(B, L)`` ids → ``(B, D)``."""

    def __init__(self, encoder: nn.Module, projection_dim: Optional[int], normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        in_dim = int(getattr(encoder, "output_dim"))
        self.projection = nn.Linear(in_dim, projection_dim, bias=False) if projection_dim else nn.Identity()
        self.normalize = normalize

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        z = self.projection(self.encoder(ids, mask))
        return nn.functional.normalize(z, dim=-1) if self.normalize else z


@MODELS.register("dual_encoder")
class DualEncoderModule(L.LightningModule):
    """Bi-encoder retriever trained with a contrastive loss over in-batch (and any extra) negatives.

    Under DDP the candidate embeddings (documents, and queries for the symmetric direction) and their ids
    are gathered across ranks **with their gradient**, while anchors stay local, so every anchor sees the
    global batch as negatives (the open_clip / sentence-transformers pattern); the gathered loss and
    gradients equal the single-process full-batch ones (``tests/test_ddp.py``).

    Batches are dicts with ``query_ids``/``query_mask`` (B, Lq), ``doc_ids``/``doc_mask`` (B, Ld),
    ``pair_id`` (B,) and optionally ``dup_group`` (B,) (equal ids are known duplicates: masked from the
    denominator when ``mask_known_duplicates``). Extra negatives (mined, random, BM25) come as
    ``neg_ids``/``neg_mask`` (K, Ld) with ``neg_pair_id`` and ``neg_dup_group`` (K,).

    Args:
        query_encoder: maps ``(ids, mask)`` to ``(B, d)`` and exposes ``output_dim``.
        doc_encoder: a separate document tower; ``None`` shares the query encoder's weights.
        loss: any :class:`~contrastive.losses.base.ContrastiveLoss`.
        projection_dim: size of the linear projection after each encoder (``None``: no projection).
        normalize: L2-normalise embeddings (cosine similarity).
        shared_projection: with a shared encoder, also share the projection.
        lr, weight_decay, warmup_steps, scheduler: AdamW with linear warm-up then ``"cosine"``,
            ``"linear"`` decay or ``"constant"``.
        mask_known_duplicates: remove candidates in the anchor's duplicate group from the denominator.
        eval_chunk_size: memory bound of the exact ranking at validation/test.
        csn_distractors: number of distractors of the CodeSearchNet-style MRR.
    """

    def __init__(
        self,
        query_encoder: nn.Module,
        loss: ContrastiveLoss,
        doc_encoder: Optional[nn.Module] = None,
        projection_dim: Optional[int] = 128,
        normalize: bool = True,
        shared_projection: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        scheduler: str = "cosine",
        mask_known_duplicates: bool = True,
        eval_chunk_size: int = 4096,
        csn_distractors: int = 999,
    ) -> None:
        super().__init__()
        self.query_tower = Tower(query_encoder, projection_dim, normalize)
        if doc_encoder is None and shared_projection:
            self.doc_tower = self.query_tower
        else:
            self.doc_tower = Tower(doc_encoder if doc_encoder is not None else query_encoder, projection_dim, normalize)
        self.loss_fn = loss
        self.lr, self.weight_decay, self.warmup_steps, self.scheduler_name = lr, weight_decay, warmup_steps, scheduler
        self.mask_known_duplicates = mask_known_duplicates
        self.eval_chunk_size, self.csn_distractors = eval_chunk_size, csn_distractors
        self._eval_outputs: list[dict[str, Tensor]] = []
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ encoding
    def encode_queries(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.query_tower(ids, mask)

    def encode_documents(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.doc_tower(ids, mask)

    # ------------------------------------------------------------------ training
    def contrastive_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        q = self.encode_queries(batch["query_ids"], batch["query_mask"])
        d = self.encode_documents(batch["doc_ids"], batch["doc_mask"])
        ids = batch["pair_id"]
        groups = batch.get("dup_group", ids)
        d_all, ids_all, groups_all = gather_with_grad(d), gather_no_grad(ids), gather_no_grad(groups)
        cand, cand_ids, cand_groups = d_all, ids_all, groups_all
        if "neg_ids" in batch and batch["neg_ids"].shape[0] > 0:
            n = self.encode_documents(batch["neg_ids"], batch["neg_mask"])
            neg_ids = batch["neg_pair_id"]
            neg_groups = batch.get("neg_dup_group", neg_ids)
            cand = torch.cat([cand, gather_with_grad(n)])
            cand_ids = torch.cat([cand_ids, gather_no_grad(neg_ids)])
            cand_groups = torch.cat([cand_groups, gather_no_grad(neg_groups)])
        pos = ids[:, None] == cand_ids[None, :]
        fn = ((groups[:, None] == cand_groups[None, :]) & ~pos) if self.mask_known_duplicates else None
        reverse = None
        if self.loss_fn.symmetric:
            q_all = gather_with_grad(q)
            m = d_all.shape[0]
            reverse = ContrastiveInputs(d, q_all, pos[:, :m], false_negative_mask=None if fn is None else fn[:, :m])
        out = self.loss_fn(q, cand, pos, false_negative_mask=fn, reverse=reverse)
        logs = dict(out.logs)
        if fn is not None:
            logs["masked_duplicates"] = fn.sum(dim=1).float().mean()
        return out.loss, logs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, logs = self.contrastive_step(batch)
        bs = batch["query_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in logs.items():
            self.log(f"train/{k}", v, prog_bar=k == "acc", batch_size=bs)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        q = self.encode_queries(batch["query_ids"], batch["query_mask"])
        d = self.encode_documents(batch["doc_ids"], batch["doc_mask"])
        self._eval_outputs.append({
            "q": q.float(), "d": d.float(), "id": batch["pair_id"],
            "group": batch.get("dup_group", batch["pair_id"]),
        })

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val", csn=False)

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test", csn=True)

    def _log_retrieval(self, stage: str, csn: bool) -> None:
        from contrastive.metrics.retrieval import csn_mrr, retrieval_metrics

        outs, self._eval_outputs = self._eval_outputs, []
        if not outs:
            return
        cat = {k: gather_no_grad(torch.cat([o[k] for o in outs])) for k in outs[0]}
        # The corpus is every document of the split; query i's gold document is document i.
        order = torch.argsort(cat["id"])  # rank-independent order (DDP samplers interleave)
        q, d, group = cat["q"][order], cat["d"][order], cat["group"][order]
        positive = torch.arange(q.shape[0], device=q.device)
        metrics = retrieval_metrics(q, d, positive, dup_group=group, chunk_size=self.eval_chunk_size)
        if csn:
            metrics["csn_mrr"] = csn_mrr(q, d, n_distractors=self.csn_distractors)
        metrics["corpus_size"] = float(d.shape[0])
        self.last_metrics = {f"{stage}/{k}": float(v) for k, v in metrics.items()}
        for k, v in self.last_metrics.items():
            self.log(k, v, prog_bar=k in (f"{stage}/mrr",), sync_dist=False, rank_zero_only=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.dim() < 2 or "norm" in name or "log_scale" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer is not None else 1
        warm, kind = self.warmup_steps, self.scheduler_name

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            if kind == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def frozen_copy(self) -> "DualEncoderModule":
        """A detached, frozen copy (e.g. the Soft-InfoNCE 'trained model' estimator or a guide model)."""
        c = copy.deepcopy(self).eval()
        for p in c.parameters():
            p.requires_grad_(False)
        return c
