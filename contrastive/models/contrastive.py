"""``ContrastiveModule``: the one LightningModule of every setting (code search, vision-language,
detection): injected towers, any loss, the candidate assembler, optional queue / momentum tower /
GradCache / feature transforms / false-negative filters, and injected evaluators."""
from __future__ import annotations

import copy
from typing import Any, Callable, Literal, Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor, nn

from contrastive.distributed import gather_no_grad
from contrastive.filters.base import FilterChain, NegativeFilter
from contrastive.losses.base import ContrastiveLoss
from contrastive.models.assembler import CandidateAssembler, CandidateSet
from contrastive.models.batch import ContrastiveBatch, Inputs
from contrastive.models.evaluation import EvalOutputs, Evaluator, RetrievalEvaluator
from contrastive.models.gradcache import (chunked_loss_grads, encode_without_grad, loss_chunk_rows, needs_reverse,
                                          replay_backward)
from contrastive.models.optim import OptimizerSettings
from contrastive.models.queue import MemoryQueue
from contrastive.transforms.feature import FeatureTransformPipeline

Side = Literal["anchor", "candidate"]


def _encode_fn(tower: Callable[[Inputs], Tensor], keys: Sequence[str]) -> Callable[..., Tensor]:
    """``fn(*tensors)`` over a dict-input tower (GradCache chunks tuples of tensors)."""
    return lambda *ts: tower(dict(zip(keys, ts)))


class ContrastiveModule(L.LightningModule):
    """Anchor and candidate towers trained with a contrastive loss over in-batch and extra negatives.

    Batches follow :class:`~contrastive.models.batch.ContrastiveBatch` (``batch_adapter`` converts a
    setting's own batch format). Under DDP the candidate embeddings (candidates, extra negatives, and
    anchors for the symmetric direction) are gathered across ranks **with their gradient** while anchors
    stay local, so every anchor sees the global batch (the open_clip / sentence-transformers pattern).

    Args:
        anchor_tower: inputs → ``(B, D)`` (tower contract of :mod:`contrastive.models.batch`).
        loss: any :class:`~contrastive.losses.base.ContrastiveLoss`.
        candidate_tower: a separate candidate tower; ``None`` shares the anchor tower.
        optimizer: AdamW and schedule settings (:class:`~contrastive.models.optim.OptimizerSettings`).
        mask_known_duplicates: remove candidates of the anchor's duplicate group from the denominator.
        evaluators: validation/test evaluators; ``None`` = a :class:`RetrievalEvaluator`.
        queue_size: capacity of a MoCo-style memory queue of past candidate embeddings (He et al. 2020,
            arXiv 1911.05722) appended to every training step's candidates; ``0`` = none. Queued entries
            are never positives: an entry with the anchor's label is a stale copy of its positive and is
            masked, entries of its duplicate group too with ``mask_known_duplicates``. After each training
            step the (gathered) in-batch candidates are enqueued.
        momentum: ``None`` or ``m`` in ``[0, 1]``: an EMA copy of the shared tower, ``θ_k ← m θ_k + (1 - m)
            θ`` after every optimiser step, encodes candidates and extra negatives without gradient (MoCo's
            keys). Needs a shared tower.
        cache_chunk_size: ``None`` or GradCache (Gao et al. 2021, arXiv 2101.06983) encoder chunks of this
            many rows: the gradient equals the full-batch one (:mod:`contrastive.models.gradcache`).
        cache_chunked_loss: with GradCache, also compute the loss in blocks of anchor rows.
        similarity_estimator: a :class:`~contrastive.losses.estimators.SimilarityEstimator`: batch-level
            similarity estimates r_ij (Soft-InfoNCE, guide filters).
        difficulty: ``None``, ``"similarity"`` or ``"estimate"``: the difficulty matrix of the loss.
        feature_transform: feature-space transforms between towers and loss (training only).
        filters: false-negative filters applied to every step's candidates (once per step).
        batch_adapter: converts a batch of the setting's format into a :class:`ContrastiveBatch`.
    """

    def __init__(
        self,
        anchor_tower: nn.Module,
        loss: ContrastiveLoss,
        candidate_tower: Optional[nn.Module] = None,
        optimizer: Optional[OptimizerSettings] = None,
        mask_known_duplicates: bool = True,
        evaluators: Optional[Sequence[Evaluator]] = None,
        queue_size: int = 0,
        momentum: Optional[float] = None,
        cache_chunk_size: Optional[int] = None,
        cache_chunked_loss: bool = True,
        similarity_estimator: Optional[Any] = None,
        difficulty: Optional[Literal["similarity", "estimate"]] = None,
        feature_transform: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        filters: Optional[Sequence[NegativeFilter]] = None,
        batch_adapter: Optional[Callable[[Any], ContrastiveBatch]] = None,
        embedding_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.anchor_tower = anchor_tower
        self.candidate_tower = anchor_tower if candidate_tower is None else candidate_tower
        self.loss_fn = loss
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.mask_known_duplicates = mask_known_duplicates
        self.evaluators: list[Evaluator] = list(evaluators) if evaluators is not None else [RetrievalEvaluator()]
        self.batch_adapter = batch_adapter
        self._eval_outputs: list[dict[str, Tensor]] = []
        self.last_metrics: dict[str, float] = {}
        self.last_items: dict[str, list] = {}  # per-item outcomes of the last evaluation (evaluators' last_items)
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
        self.assembler = CandidateAssembler(mask_known_duplicates, self.filter_chain, difficulty)
        dim = embedding_dim if embedding_dim is not None else getattr(anchor_tower, "output_dim", None)
        if queue_size and dim is None:
            raise ValueError("a memory queue needs the embedding size: pass embedding_dim or a tower with output_dim")
        self.queue: Optional[MemoryQueue] = MemoryQueue(int(queue_size), int(dim)) if queue_size else None
        self.momentum: Optional[float] = None if momentum is None else float(momentum)
        self.momentum_tower: Optional[nn.Module] = None
        if self.momentum is not None:
            if not 0.0 <= self.momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1] (or None for no momentum encoder); got {momentum}")
            if self.candidate_tower is not self.anchor_tower:
                raise ValueError(
                    "momentum needs one shared tower (doc_encoder=None, shared_projection=True): the momentum "
                    "encoder is an EMA of the query tower (MoCo) and encodes all documents without gradient, so "
                    "a separate document tower would never be trained"
                )
            self.momentum_tower = copy.deepcopy(self.candidate_tower)
            for p in self.momentum_tower.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ batches and encoding
    def as_batch(self, batch: Any) -> ContrastiveBatch:
        """``batch`` as a :class:`ContrastiveBatch` (through ``batch_adapter`` unless it already is one)."""
        if isinstance(batch, ContrastiveBatch):
            return batch
        if self.batch_adapter is None:
            raise TypeError(f"{type(self).__name__}: got a {type(batch).__name__} batch and no batch_adapter")
        return self.batch_adapter(batch)

    def encode(self, inputs: Inputs, side: Side) -> Tensor:
        """``inputs`` of one side → ``(N, D)`` with that side's tower (with gradient when enabled)."""
        if side == "anchor":
            return self.anchor_tower(inputs)
        if side == "candidate":
            return self.candidate_tower(inputs)
        raise ValueError(f"side must be 'anchor' or 'candidate'; got {side!r}")

    def encode_keys(self, inputs: Inputs) -> Tensor:
        """Training-time candidates: the momentum tower without gradient when ``momentum`` is set."""
        if self.momentum_tower is None:
            return self.candidate_tower(inputs)
        with torch.no_grad():
            return self.momentum_tower(inputs).detach()

    @torch.no_grad()
    def update_momentum_encoder(self) -> None:
        """``θ_k ← m θ_k + (1 - m) θ`` for the momentum tower (buffers are copied). No-op without momentum."""
        if self.momentum_tower is None or self.momentum is None:
            return
        m = self.momentum
        for pk, p in zip(self.momentum_tower.parameters(), self.candidate_tower.parameters()):
            pk.mul_(m).add_(p.detach().to(pk.dtype), alpha=1.0 - m)
        for bk, b in zip(self.momentum_tower.buffers(), self.candidate_tower.buffers()):
            bk.copy_(b)

    # ------------------------------------------------------------------ training
    def _transform(self, q: Tensor, d: Tensor, n: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """Feature-space transformations between towers and loss (training only), on local embeddings:
        returns ``(q, d, n, synthetic)`` with per-anchor synthetic negatives ``(B, S, D)`` (MoCHi) or None."""
        if self.feature_transform is None or not self.training:
            return q, d, n, None
        out = self.feature_transform(q, d, n, None)
        return out.queries, out.positives, out.negatives, out.extra_negatives

    def _assemble(self, q: Tensor, d: Tensor, n: Optional[Tensor], batch: ContrastiveBatch,
                  synthetic: Optional[Tensor], mask_rows: Optional[int] = None) -> CandidateSet:
        queue = self.queue.contents() if self.queue is not None and len(self.queue) else None
        return self.assembler.assemble(q, d, n, batch, synthetic, queue, self._estimate(batch),
                                       reverse=needs_reverse(self.loss_fn), mask_rows=mask_rows)

    @torch.no_grad()
    def _estimate(self, batch: ContrastiveBatch) -> Optional[Tensor]:
        """``(B, M_batch + M_extra)`` similarity estimates r_ij (Soft-InfoNCE, guide filters), or None."""
        if self.similarity_estimator is None:
            return None
        return self.similarity_estimator.estimate_batch(self, batch).to(self.device)

    def on_fit_start(self) -> None:
        if self.similarity_estimator is not None:
            self.similarity_estimator.setup(self, getattr(self.trainer, "datamodule", None))

    def _enqueue(self, cs: CandidateSet) -> None:
        if self.queue is not None:
            self.queue.enqueue(cs.keys, cs.key_labels, cs.key_groups)

    def contrastive_step(self, batch: Any, enqueue: Optional[bool] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch (uncached) and its logs.

        Args:
            batch: a :class:`ContrastiveBatch` or the setting's batch (converted by ``batch_adapter``).
            enqueue: push this step's (gathered) candidates into the memory queue after computing the loss;
                ``None`` = only in training mode. Ignored without a queue.
        """
        batch = self.as_batch(batch)
        q = self.encode(batch.anchors, "anchor")
        d = self.encode_keys(batch.candidates)
        n = self.encode_keys(batch.negatives.inputs) if batch.has_negatives else None
        q, d, n, synthetic = self._transform(q, d, n)
        cs = self._assemble(q, d, n, batch, synthetic)
        inputs, reverse = cs.make_inputs(cs.tensors, slice(0, q.shape[0]))
        out = self.loss_fn.forward_inputs(inputs, reverse)
        logs = dict(out.logs)
        logs.update(cs.mask_logs())
        if enqueue if enqueue is not None else self.training:
            self._enqueue(cs)
        return out.loss, logs

    def gradcache_step(self, batch: Any, enqueue: Optional[bool] = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One cached step (GradCache, arXiv 2101.06983) with ``cache_chunk_size`` rows per encoder chunk.

        (1) encode anchors/candidates/negatives in chunks without a graph, recording each chunk's RNG state;
        (2) the loss of :meth:`contrastive_step` on detached embeddings and its gradient w.r.t. them;
        (3) re-encode each chunk with a graph and fold ``sum(emb_chunk * grad_chunk)`` into the returned
        surrogate (value = the loss, gradient = the full-batch gradient); Lightning's own backward of the
        surrogate then writes ``param.grad`` (``training_step`` runs before ``zero_grad``). Returns
        ``(surrogate, loss, logs)``; no ``.grad`` is modified here.
        """
        batch = self.as_batch(batch)
        cs_rows = self.cache_chunk_size
        b = batch.num_anchors
        ak, ck = sorted(batch.anchors), sorted(batch.candidates)
        qc = encode_without_grad(_encode_fn(self.anchor_tower, ak), [batch.anchors[k] for k in ak], cs_rows)
        doc_grad = self.momentum_tower is None
        dc = encode_without_grad(_encode_fn(self.encode_keys, ck), [batch.candidates[k] for k in ck], cs_rows)
        nc = None
        if batch.has_negatives:
            nk = sorted(batch.negatives.inputs)
            nc = encode_without_grad(_encode_fn(self.encode_keys, nk), [batch.negatives.inputs[k] for k in nk], cs_rows)
        q_leaf = qc.embeddings.requires_grad_()
        d_leaf = dc.embeddings.requires_grad_(doc_grad)
        n_leaf = nc.embeddings.requires_grad_(doc_grad) if nc is not None else None
        q_t, d_t, n_t, synthetic = self._transform(q_leaf, d_leaf, n_leaf)
        n_cand = self._num_candidates(d_t, n_t, synthetic)
        rows = loss_chunk_rows(cs_rows, n_cand) if self.cache_chunked_loss else None
        cs = self._assemble(q_t, d_t, n_t, batch, synthetic, mask_rows=rows)
        loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        res = chunked_loss_grads(self.loss_fn, cs.tensors, cs.make_inputs, b, rows, loss_params)
        # d loss / d (local embeddings): back through the gathers (one all-reduce each under DDP) and cats
        outs = [(t, g) for t, g in zip(cs.tensors, res.grads) if g is not None and t.requires_grad]
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
        logs.update(cs.mask_logs())
        if enqueue if enqueue is not None else self.training:
            self._enqueue(cs)
        return surrogate, res.loss, logs

    def _num_candidates(self, d: Tensor, n: Optional[Tensor], synthetic: Optional[Tensor]) -> int:
        """``M``: gathered candidates and negatives, synthetic negatives and queued entries."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        m = world * (d.shape[0] + (n.shape[0] if n is not None else 0))
        if synthetic is not None:
            m += synthetic.shape[0] * synthetic.shape[1]
        return m + (len(self.queue) if self.queue is not None else 0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = self.as_batch(batch)
        if self.cache_chunk_size is not None:
            out, loss, logs = self.gradcache_step(batch)
        else:
            loss, logs = self.contrastive_step(batch)
            out = loss
        bs = batch.num_anchors
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in logs.items():
            self.log(f"train/{k}", v, prog_bar=k == "acc", batch_size=bs)
        return out

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's optimiser step, then the momentum-encoder EMA update (when ``momentum`` is set)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_momentum_encoder()

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any) -> None:
        batch = self.as_batch(batch)
        self._eval_outputs.append({
            "a": self.encode(batch.anchors, "anchor").float(), "a_id": batch.anchor_ids,
            "a_label": batch.a_labels, "a_group": batch.a_groups,
            "c": self.encode(batch.candidates, "candidate").float(), "c_id": batch.candidate_ids,
            "c_label": batch.c_labels, "c_group": batch.c_groups,
        })

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def eval_outputs(self) -> Optional[EvalOutputs]:
        """The collected evaluation items of this epoch (gathered over ranks), clearing the buffer."""
        outs, self._eval_outputs = self._eval_outputs, []
        if not outs:
            return None
        cat = {k: gather_no_grad(torch.cat([o[k] for o in outs])) for k in outs[0]}
        return EvalOutputs.collect(cat["a"], cat["a_id"], cat["a_label"], cat["a_group"], cat["c"], cat["c_id"],
                                   cat["c_label"], cat["c_group"])

    def _log_eval(self, stage: str) -> None:
        outputs = self.eval_outputs()
        if outputs is None:
            return
        metrics: dict[str, float] = {}
        self.last_items = {}
        for evaluator in self.evaluators:
            metrics.update(evaluator(outputs, stage))
            self.last_items.update(getattr(evaluator, "last_items", None) or {})
        self.last_metrics = {f"{stage}/{k}": float(v) for k, v in metrics.items()}
        for k, v in self.last_metrics.items():
            self.log(k, v, prog_bar=k in (f"{stage}/mrr",), sync_dist=False, rank_zero_only=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        total = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        return self.optimizer_settings.configure(self, total)

    def frozen_copy(self) -> "ContrastiveModule":
        """A detached, frozen copy (e.g. the Soft-InfoNCE 'trained model' estimator or a guide model)."""
        c = copy.deepcopy(self).eval()
        for p in c.parameters():
            p.requires_grad_(False)
        return c
