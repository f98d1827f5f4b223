"""Dual-encoder LightningModule: query and document towers, projection, L2 normalisation, any loss.

The module only wires objects together: encoders, the loss and the optimiser settings are built
elsewhere (``contrastive.build``) and passed in.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor, nn

from contrastive.distributed import gather_no_grad, gather_with_grad
from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss
from contrastive.models.gradcache import (chunk_slices, chunked_loss_grads, encode_without_grad, loss_chunk_rows,
                                          needs_reverse, replay_backward)
from contrastive.filters.base import FilterChain, FilterContext, NegativeFilter
from contrastive.models.estimates import BatchEstimator
from contrastive.models.queue import MemoryQueue
from contrastive.transforms.feature import FeatureTransformPipeline
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
        queue_size: capacity of a MoCo-style memory queue of past document embeddings (He et al. 2020,
            arXiv 1911.05722) appended to the candidates of every training step; ``0`` = no queue. See
            "Memory queue" below.
        momentum: ``None`` = no momentum encoder. Otherwise ``m`` in ``[0, 1]``: an EMA copy of the
            (shared) tower, ``θ_k ← m θ_k + (1 - m) θ``, updated after every optimiser step, encodes the
            documents (MoCo's keys) **without gradient**: in-batch documents, extra negatives and the
            entries enqueued. Needs a shared tower (``doc_encoder=None``, ``shared_projection=True``), as in
            MoCo where the key encoder is an EMA of the query encoder: a separate document tower would get
            no gradient. Typical values 0.99-0.999.
        cache_chunk_size: ``None`` = off. Otherwise gradient caching (GradCache, Gao et al. 2021, arXiv
            2101.06983) with encoder chunks of this many rows: the gradient equals the full-batch one while
            encoder activations are only ever held for one chunk. See "Cached large batches" below.
        cache_chunked_loss: with ``cache_chunk_size``, also compute the loss and its embedding gradient in
            blocks of anchor rows, ``rows = max(1, cache_chunk_size² // M)`` for ``M`` candidates, so that
            no ``(rows, M)`` block is larger than one encoder chunk's ``chunk × chunk`` similarity matrix
            and the loss memory does not grow with ``B²`` (exact for losses that are means of per-anchor
            terms, i.e. every built-in loss; see :mod:`contrastive.models.gradcache`). ``False``: one full
            ``(B, M)`` loss.

    Memory queue: the queue holds detached document embeddings with their ``pair_id`` and ``dup_group``
    (:class:`~contrastive.models.queue.MemoryQueue`). Queued entries are appended after the in-batch and
    extra candidates of the query→document direction (the reverse direction of symmetric losses does not
    use the queue). They are never positives: an entry with the anchor's own ``pair_id`` is a stale copy of
    its positive and is masked as a false negative (removed from the denominator) whatever
    ``mask_known_duplicates`` says; entries of the anchor's duplicate group are masked when
    ``mask_known_duplicates``. After each training step the step's in-batch documents are enqueued: under
    DDP the gathered documents of all ranks, so every rank holds the same queue. The queue lives in buffers
    and is saved in checkpoints (the documents come from the momentum tower when ``momentum`` is set,
    otherwise from the trained tower, detached).

    Cached large batches: with ``cache_chunk_size`` the :meth:`training_step` runs :meth:`gradcache_step`:
    (1) encode queries/documents/negatives in chunks without a graph, recording each chunk's RNG state
    (CPU + CUDA) so that dropout is replayed identically; (2) compute the loss exactly as
    :meth:`contrastive_step` (gathered, masked, queue) on detached embeddings and its gradient w.r.t. them;
    (3) re-encode each chunk with a graph and differentiate ``sum(emb_chunk * grad_chunk)``. Lightning's
    automatic optimisation runs ``training_step`` *before* ``zero_grad`` and ``backward``
    (``lightning/pytorch/loops/optimization/automatic.py``, ``Closure.closure``), so nothing is written to
    ``param.grad`` inside ``training_step``: the chunks' parameter gradients are collected with
    :func:`torch.autograd.grad` and folded into the returned surrogate ``S`` (value = the true loss,
    gradient = the full-batch gradient). Lightning's single backward of ``S`` then applies its usual
    ``1 / accumulate_grad_batches`` normalisation, AMP scaling and, under DDP, one gradient all-reduce (no
    ``no_sync`` needed). Costs one extra encoder forward per step and a parameter-sized gradient buffer.
    :meth:`contrastive_step` itself stays uncached (validation and tests use it).
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
        queue_size: int = 0,
        momentum: Optional[float] = None,
        cache_chunk_size: Optional[int] = None,
        cache_chunked_loss: bool = True,
        similarity_estimator: Optional[BatchEstimator] = None,
        difficulty: Optional[Literal["similarity", "estimate"]] = None,
        feature_transform: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        filters: Optional[Sequence[NegativeFilter]] = None,
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
        if int(queue_size) < 0:
            raise ValueError(f"queue_size must be >= 0 (0 = no queue); got {queue_size}")
        if cache_chunk_size is not None and int(cache_chunk_size) <= 0:
            raise ValueError(f"cache_chunk_size must be a positive integer or None; got {cache_chunk_size}")
        self.cache_chunk_size = None if cache_chunk_size is None else int(cache_chunk_size)
        self.cache_chunked_loss = cache_chunked_loss
        self.similarity_estimator = similarity_estimator
        if difficulty not in (None, "similarity", "estimate"):
            raise ValueError(f"difficulty must be None, 'similarity' or 'estimate'; got {difficulty!r}")
        if difficulty == "estimate" and similarity_estimator is None:
            raise ValueError("difficulty='estimate' needs a similarity_estimator")
        self.difficulty = difficulty
        if isinstance(feature_transform, (list, tuple)):
            feature_transform = FeatureTransformPipeline(list(feature_transform)) if feature_transform else None
        self.feature_transform = feature_transform
        self.filter_chain = FilterChain(list(filters)) if filters else None
        dim = int(projection_dim) if projection_dim else int(getattr(query_encoder, "output_dim"))
        self.queue: Optional[MemoryQueue] = MemoryQueue(int(queue_size), dim) if queue_size else None
        self.momentum: Optional[float] = None if momentum is None else float(momentum)
        self.momentum_tower: Optional[Tower] = None
        if self.momentum is not None:
            if not 0.0 <= self.momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1] (or None for no momentum encoder); got {momentum}")
            if self.doc_tower is not self.query_tower:
                raise ValueError(
                    "momentum needs one shared tower (doc_encoder=None, shared_projection=True): the momentum "
                    "encoder is an EMA of the query tower (MoCo) and encodes all documents without gradient, so "
                    "a separate document tower would never be trained"
                )
            self.momentum_tower = copy.deepcopy(self.doc_tower)
            for p in self.momentum_tower.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ encoding
    def encode_queries(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.query_tower(ids, mask)

    def encode_documents(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.doc_tower(ids, mask)

    def encode_keys(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Training-time document candidates ``(B, L)`` → ``(B, D)``: the momentum tower without gradient
        when ``momentum`` is set, else :meth:`encode_documents`."""
        if self.momentum_tower is None:
            return self.encode_documents(ids, mask)
        with torch.no_grad():
            return self.momentum_tower(ids, mask).detach()

    @torch.no_grad()
    def update_momentum_encoder(self) -> None:
        """``θ_k ← m θ_k + (1 - m) θ`` for the momentum tower (buffers are copied). No-op without momentum."""
        if self.momentum_tower is None or self.momentum is None:
            return
        m = self.momentum
        for pk, p in zip(self.momentum_tower.parameters(), self.doc_tower.parameters()):
            pk.mul_(m).add_(p.detach().to(pk.dtype), alpha=1.0 - m)
        for bk, b in zip(self.momentum_tower.buffers(), self.doc_tower.buffers()):
            bk.copy_(b)

    # ------------------------------------------------------------------ training
    def _transform(self, q: Tensor, d: Tensor, n: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """Feature-space transformations between encoder and loss (training only), on local embeddings:
        returns ``(q, d, n, synthetic)`` with per-anchor synthetic negatives ``(B, S, D)`` (MoCHi) or None."""
        if self.feature_transform is None or not self.training:
            return q, d, n, None
        out = self.feature_transform(q, d, n, None)
        return out.queries, out.positives, out.negatives, out.extra_negatives

    def _problem(self, q: Tensor, d: Tensor, n: Optional[Tensor], batch: dict[str, Tensor],
                 synthetic: Optional[Tensor] = None) -> "_Problem":
        """Gather candidates across ranks (with gradient), append extra negatives, per-anchor synthetic
        negatives (local, visible only to their anchor) and the queue, and return the lazily masked loss
        problem. ``q``/``d`` (B, D) and ``n`` (K, D) are local; ``synthetic`` is (B, S, D)."""
        ids = batch["pair_id"]
        groups = batch.get("dup_group", ids)
        d_all, ids_all, groups_all = gather_with_grad(d), gather_no_grad(ids), gather_no_grad(groups)
        cand, cand_ids, cand_groups = [d_all], [ids_all], [groups_all]
        if n is not None:
            neg_ids = batch["neg_pair_id"]
            neg_groups = batch.get("neg_dup_group", neg_ids)
            cand.append(gather_with_grad(n))
            cand_ids.append(gather_no_grad(neg_ids))
            cand_groups.append(gather_no_grad(neg_groups))
        n_synth, synth_owner = 0, None
        if synthetic is not None and synthetic.shape[1] > 0:
            b, n_per = synthetic.shape[:2]
            cand.append(synthetic.reshape(b * n_per, -1).to(d_all.dtype))
            n_synth = b * n_per
            synth_owner = torch.arange(b, device=ids.device).repeat_interleave(n_per)
            cand_ids.append(torch.full((n_synth,), -1, dtype=ids_all.dtype, device=ids.device))
            cand_groups.append(torch.full((n_synth,), -1, dtype=groups_all.dtype, device=ids.device))
        n_queue = 0
        if self.queue is not None and len(self.queue):
            qe, qi, qg = self.queue.contents()
            cand.append(qe.to(device=d_all.device, dtype=d_all.dtype))
            cand_ids.append(qi.to(ids_all.device))
            cand_groups.append(qg.to(groups_all.device))
            n_queue = qe.shape[0]
        one = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs)  # noqa: E731
        q_all = gather_with_grad(q) if needs_reverse(self.loss_fn) else None
        return _Problem(q=q, cand=one(cand), d=d, q_all=q_all, ids=ids, groups=groups, cand_ids=one(cand_ids),
                        cand_groups=one(cand_groups), n_batch=d_all.shape[0], n_queue=n_queue,
                        mask_known_duplicates=self.mask_known_duplicates, keys=d_all.detach(), key_ids=ids_all,
                        key_groups=groups_all, n_synth=n_synth, synth_owner=synth_owner,
                        estimate=self._estimate(batch), difficulty=self.difficulty, filter_chain=self.filter_chain)

    @torch.no_grad()
    def _estimate(self, batch: dict[str, Tensor]) -> Optional[Tensor]:
        """``(B, M_batch + M_extra)`` similarity estimates r_ij (Soft-InfoNCE, guide filters), or None."""
        if self.similarity_estimator is None:
            return None
        return self.similarity_estimator.estimate(self, batch).to(self.device)

    def on_fit_start(self) -> None:
        if self.similarity_estimator is not None:
            self.similarity_estimator.setup(self, getattr(self.trainer, "datamodule", None))

    def _enqueue(self, problem: "_Problem") -> None:
        if self.queue is not None:
            self.queue.enqueue(problem.keys, problem.key_ids, problem.key_groups)

    def _has_negs(self, batch: dict[str, Tensor]) -> bool:
        return "neg_ids" in batch and batch["neg_ids"].shape[0] > 0

    def contrastive_step(self, batch: dict[str, Tensor],
                         enqueue: Optional[bool] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch (uncached) and its logs.

        Args:
            batch: see the class docstring.
            enqueue: push this step's (gathered) documents into the memory queue after computing the loss;
                ``None`` = only in training mode. Ignored without a queue.
        """
        q = self.encode_queries(batch["query_ids"], batch["query_mask"])
        d = self.encode_keys(batch["doc_ids"], batch["doc_mask"])
        n = self.encode_keys(batch["neg_ids"], batch["neg_mask"]) if self._has_negs(batch) else None
        q, d, n, synthetic = self._transform(q, d, n)
        problem = self._problem(q, d, n, batch, synthetic)
        inputs, reverse = problem.make_inputs(problem.tensors, slice(0, q.shape[0]))
        out = self.loss_fn.forward_inputs(inputs, reverse)
        logs = dict(out.logs)
        logs.update(problem.mask_logs(None))
        if enqueue if enqueue is not None else self.training:
            self._enqueue(problem)
        return out.loss, logs

    def gradcache_step(self, batch: dict[str, Tensor],
                       enqueue: Optional[bool] = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One cached step (GradCache, arXiv 2101.06983) with ``cache_chunk_size`` rows per encoder chunk.

        Returns ``(surrogate, loss, logs)``: ``loss`` is the detached full-batch loss of
        :meth:`contrastive_step` and ``surrogate`` a scalar with the same value whose gradient w.r.t. every
        trainable parameter is the full-batch gradient (call ``surrogate.backward()``, or return it from
        ``training_step``). No parameter's ``.grad`` is modified here.
        """
        cs = self.cache_chunk_size
        b = batch["query_ids"].shape[0]
        qc = encode_without_grad(self.encode_queries, (batch["query_ids"], batch["query_mask"]), cs)
        doc_grad = self.momentum_tower is None
        dc = encode_without_grad(self.encode_keys, (batch["doc_ids"], batch["doc_mask"]), cs)
        nc = (encode_without_grad(self.encode_keys, (batch["neg_ids"], batch["neg_mask"]), cs)
              if self._has_negs(batch) else None)
        q_leaf = qc.embeddings.requires_grad_()
        d_leaf = dc.embeddings.requires_grad_(doc_grad)
        n_leaf = nc.embeddings.requires_grad_(doc_grad) if nc is not None else None
        q_t, d_t, n_t, synthetic = self._transform(q_leaf, d_leaf, n_leaf)
        problem = self._problem(q_t, d_t, n_t, batch, synthetic)
        loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        rows = loss_chunk_rows(cs, problem.cand.shape[0]) if self.cache_chunked_loss else None
        res = chunked_loss_grads(self.loss_fn, problem.tensors, problem.make_inputs, b, rows, loss_params)
        # d loss / d (local embeddings): back through the gathers (one all-reduce each under DDP) and cats
        outs = [(t, g) for t, g in zip(problem.tensors, res.grads) if g is not None and t.requires_grad]
        leaves = [x for x in (q_leaf, d_leaf, n_leaf) if x is not None and x.requires_grad]
        leaf_grads = torch.autograd.grad([t for t, _ in outs], leaves, [g for _, g in outs], allow_unused=True)
        by_leaf = {id(x): g for x, g in zip(leaves, leaf_grads)}
        loss_ids = {id(p) for p in loss_params}
        enc_params = [p for p in self.parameters() if p.requires_grad and id(p) not in loss_ids]
        parts = [(qc, by_leaf.get(id(q_leaf))), (dc, by_leaf.get(id(d_leaf)))]
        if nc is not None:
            parts.append((nc, by_leaf.get(id(n_leaf))))
        core = replay_backward(parts, enc_params)
        for p, g in zip(loss_params, res.param_grads):
            if g is not None:
                term = (p * g).sum()
                core = term if core is None else core + term
        surrogate = res.loss.clone() if core is None else core - core.detach() + res.loss
        logs = dict(res.logs)
        logs.update(problem.mask_logs(rows))
        if enqueue if enqueue is not None else self.training:
            self._enqueue(problem)
        return surrogate, res.loss, logs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.cache_chunk_size is not None:
            out, loss, logs = self.gradcache_step(batch)
        else:
            loss, logs = self.contrastive_step(batch)
            out = loss
        bs = batch["query_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in logs.items():
            self.log(f"train/{k}", v, prog_bar=k == "acc", batch_size=bs)
        return out

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's optimiser step, then the momentum-encoder EMA update (when ``momentum`` is set)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_momentum_encoder()

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


@dataclass
class _Problem:
    """The loss problem of one step, with masks built lazily per block of anchor rows.

    ``q`` (B, D) local anchors; ``cand`` (M, D) = gathered documents (``n_batch`` rows), gathered extra
    negatives, then ``n_queue`` queued entries; ``d`` (B, D) local documents and ``q_all`` (world·B, D)
    gathered queries for the reverse direction (``None`` when the loss is one-way)."""

    q: Tensor
    cand: Tensor
    d: Tensor
    q_all: Optional[Tensor]
    ids: Tensor
    groups: Tensor
    cand_ids: Tensor
    cand_groups: Tensor
    n_batch: int
    n_queue: int
    mask_known_duplicates: bool
    keys: Tensor
    key_ids: Tensor
    key_groups: Tensor
    n_synth: int = 0
    synth_owner: Optional[Tensor] = None
    estimate: Optional[Tensor] = None
    difficulty: Optional[str] = None
    filter_chain: Optional[FilterChain] = None

    @property
    def tensors(self) -> list[Tensor]:
        return [self.q, self.cand] + ([self.d, self.q_all] if self.q_all is not None else [])

    def masks(self, rows: slice) -> tuple[Tensor, Optional[Tensor]]:
        """``(positive, false_negative)`` ``(|rows|, M)`` masks of anchor rows ``rows``."""
        return self._masks(rows)[:2]

    def _masks(self, rows: slice) -> tuple[Tensor, Optional[Tensor], dict[str, int]]:
        ids, groups = self.ids[rows], self.groups[rows]
        m = self.cand_ids.shape[0] - self.n_queue - self.n_synth
        pos = ids[:, None] == self.cand_ids[None, :m]
        fn = ((groups[:, None] == self.cand_groups[None, :m]) & ~pos) if self.mask_known_duplicates else None
        if self.n_synth:
            assert self.synth_owner is not None
            local = torch.arange(rows.start, rows.stop, device=ids.device)
            foreign = self.synth_owner[None, :] != local[:, None]  # another anchor's synthetic negatives
            fn = torch.cat([fn if fn is not None else torch.zeros_like(pos), foreign], dim=1)
            pos = torch.cat([pos, torch.zeros_like(foreign)], dim=1)
            m += self.n_synth
        if self.n_queue:
            q_pos, q_fn = MemoryQueue.masks(ids, groups, self.cand_ids[m:], self.cand_groups[m:],
                                            self.mask_known_duplicates)
            pos = torch.cat([pos, q_pos], dim=1)
            fn = torch.cat([fn if fn is not None else torch.zeros_like(pos[:, :m]), q_fn], dim=1)
        removed: dict[str, int] = {}
        if self.filter_chain is not None:
            fn, removed = self._filter(rows, pos, fn)
        return pos, fn, removed

    @torch.no_grad()
    def _filter(self, rows: slice, pos: Tensor, fn: Optional[Tensor]) -> tuple[Tensor, dict[str, int]]:
        """False-negative filters on the detached scores of anchor rows ``rows`` against every candidate;
        candidate columns index ``cand_groups`` (column j = item j), the positive is the first positive
        column, and the similarity estimate (when present) serves as the guide model's scores."""
        assert self.filter_chain is not None
        scores = (self.q[rows].detach() @ self.cand.detach().T).float()
        known = fn if fn is not None else torch.zeros_like(pos)
        scores = scores.masked_fill(known, float("-inf"))  # already-masked candidates are not re-counted
        first_pos = pos.float().argmax(dim=1)
        r = torch.arange(scores.shape[0], device=scores.device)
        guide = self._estimate_block(rows)
        ctx = FilterContext(scores=scores, positive_mask=pos, positive_ids=first_pos,
                            positive_scores=scores[r, first_pos], dup_group=self.cand_groups,
                            guide_scores=guide, guide_positive_scores=None if guide is None else guide[r, first_pos])
        res = self.filter_chain.apply(ctx)
        return known | res.false_negative_mask, {k: int(v) for k, v in res.removed.items()}

    def _estimate_block(self, rows: slice) -> Optional[Tensor]:
        """``(|rows|, M)`` estimates; synthetic and queued columns (no estimate) get the row mean."""
        if self.estimate is None:
            return None
        est = self.estimate[rows].to(self.cand.dtype)
        pad = self.cand.shape[0] - est.shape[1]
        if pad:
            est = torch.cat([est, est.mean(dim=1, keepdim=True).expand(-1, pad)], dim=1)
        return est

    def make_inputs(self, leaves: Sequence[Tensor],
                    rows: slice) -> tuple[ContrastiveInputs, Optional[ContrastiveInputs]]:
        """Loss inputs of anchor rows ``rows`` built from ``leaves`` (laid out like :attr:`tensors`)."""
        pos, fn = self.masks(rows)
        est = self._estimate_block(rows)
        diff = None
        if self.difficulty == "similarity":
            diff = (leaves[0][rows] @ leaves[1].T).detach()
        elif self.difficulty == "estimate":
            diff = est
        inputs = ContrastiveInputs(leaves[0][rows], leaves[1], pos, false_negative_mask=fn, difficulty=diff,
                                   similarity_estimate=est)
        if len(leaves) < 4:
            return inputs, None
        m = self.n_batch
        cut = lambda x: None if x is None else x[:, :m]  # noqa: E731
        diff_rev = (leaves[2][rows] @ leaves[3].T).detach() if self.difficulty == "similarity" else cut(diff)
        reverse = ContrastiveInputs(leaves[2][rows], leaves[3], pos[:, :m], false_negative_mask=cut(fn),
                                    difficulty=diff_rev, similarity_estimate=cut(est))
        return inputs, reverse

    def mask_logs(self, chunk_size: Optional[int]) -> dict[str, Tensor]:
        """``masked_duplicates``: mean masked candidates per anchor (duplicates, stale queue copies, other
        anchors' synthetic negatives and filter removals); ``filtered/<filter>``: mean candidates per anchor
        each false-negative filter removed; ``queue_size``: queued candidates used."""
        b = self.ids.shape[0]
        logs: dict[str, Tensor] = {}
        if self.mask_known_duplicates or self.n_queue or self.n_synth or self.filter_chain is not None:
            total = torch.zeros((), device=self.ids.device)
            removed: dict[str, int] = {}
            for rows in chunk_slices(b, chunk_size):
                _, fn, rem = self._masks(rows)
                if fn is not None:
                    total = total + fn.sum().float()
                for k, v in rem.items():
                    removed[k] = removed.get(k, 0) + v
            logs["masked_duplicates"] = total / b
            for k, v in removed.items():
                logs[f"filtered/{k}"] = torch.tensor(v / b, device=self.ids.device)
        if self.n_queue:
            logs["queue_size"] = torch.tensor(float(self.n_queue), device=self.ids.device)
        return logs
