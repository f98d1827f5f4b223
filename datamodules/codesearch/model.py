"""The code-search configuration of :class:`~contrastive.models.contrastive.ContrastiveModule`: text towers
(a query encoder and an optional document encoder, projection and L2 normalisation), the code-search batch
format, the full-corpus metrics and CodeSearchNet's distractor MRR at test time."""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

from torch import Tensor, nn

from contrastive.filters.base import NegativeFilter
from contrastive.losses.base import ContrastiveLoss
from contrastive.models.batch import ContrastiveBatch, ExtraNegatives
from contrastive.models.contrastive import ContrastiveModule
from contrastive.models.evaluation import RetrievalEvaluator
from contrastive.models.optim import OptimizerSettings
from contrastive.models.towers import ProjectedTower
from contrastive.registry import MODELS
from datamodules.codesearch.evaluation import CodeSearchNetMRR


def pair_batch(batch: dict[str, Tensor]) -> ContrastiveBatch:
    """The code-search batch dict as a :class:`ContrastiveBatch`.

    Keys: ``query_ids``/``query_mask`` ``(B, Lq)``, ``doc_ids``/``doc_mask`` ``(B, Ld)``, ``pair_id`` ``(B,)``
    and optionally ``dup_group`` ``(B,)``; extra negatives ``neg_ids``/``neg_mask`` ``(K, Ld)`` with
    ``neg_pair_id`` and ``neg_dup_group`` ``(K,)`` and optionally ``neg_owner``, ``neg_weight``,
    ``neg_difficulty`` ``(K,)`` (generated negatives; :class:`~contrastive.samplers.collate.NegativeCollate`).
    Query ``i`` and document ``i`` form pair ``pair_id[i]`` (the label of both).
    """
    ids = batch["pair_id"]
    negatives = None
    if "neg_ids" in batch and batch["neg_ids"].shape[0] > 0:
        neg_ids = batch["neg_pair_id"]
        negatives = ExtraNegatives(inputs={"ids": batch["neg_ids"], "mask": batch["neg_mask"]}, ids=neg_ids,
                                   labels=neg_ids, groups=batch.get("neg_dup_group", neg_ids),
                                   weights=batch.get("neg_weight"), difficulty=batch.get("neg_difficulty"),
                                   owner=batch.get("neg_owner"))
    return ContrastiveBatch.paired_items({"ids": batch["query_ids"], "mask": batch["query_mask"]},
                                         {"ids": batch["doc_ids"], "mask": batch["doc_mask"]}, ids,
                                         batch.get("dup_group", ids), negatives)


@MODELS.register("dual_encoder")
class DualEncoderModule(ContrastiveModule):
    """Bi-encoder code retriever: :class:`ContrastiveModule` with text towers and the code-search batches
    (:func:`pair_batch`); see :class:`ContrastiveModule` for the queue, momentum, GradCache, filters and
    feature transforms.

    Args:
        query_encoder: text encoder (``{"ids", "mask"}`` → ``(B, d)``, exposes ``output_dim``).
        loss: any :class:`~contrastive.losses.base.ContrastiveLoss`.
        doc_encoder: a separate document encoder; ``None`` shares the query encoder's weights.
        projection_dim: linear projection after each encoder (``None``: none).
        normalize: L2-normalise embeddings (cosine similarity).
        shared_projection: with a shared encoder, also share the projection.
        lr, weight_decay, warmup_steps, scheduler: :class:`~contrastive.models.optim.OptimizerSettings`.
        eval_chunk_size: memory bound of the exact ranking at validation/test.
        csn_distractors: distractors of the CodeSearchNet-style MRR at test time.
        The other arguments are :class:`ContrastiveModule`'s.
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
        similarity_estimator: Optional[Any] = None,
        difficulty: Optional[Literal["similarity", "estimate"]] = None,
        feature_transform: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        filters: Optional[Sequence[NegativeFilter]] = None,
    ) -> None:
        query_tower = ProjectedTower(query_encoder, projection_dim, normalize)
        doc_tower = None
        if doc_encoder is not None or not shared_projection:
            doc_tower = ProjectedTower(doc_encoder if doc_encoder is not None else query_encoder, projection_dim,
                                       normalize)
        super().__init__(
            query_tower, loss, candidate_tower=doc_tower,
            optimizer=OptimizerSettings(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                        scheduler=scheduler),  # type: ignore[arg-type]
            mask_known_duplicates=mask_known_duplicates,
            evaluators=[RetrievalEvaluator(eval_chunk_size), CodeSearchNetMRR(csn_distractors)],
            queue_size=queue_size, momentum=momentum, cache_chunk_size=cache_chunk_size,
            cache_chunked_loss=cache_chunked_loss, similarity_estimator=similarity_estimator, difficulty=difficulty,
            feature_transform=feature_transform, filters=filters, batch_adapter=pair_batch,
        )

    @property
    def query_tower(self) -> nn.Module:
        return self.anchor_tower

    @property
    def doc_tower(self) -> nn.Module:
        return self.candidate_tower

    def encode_queries(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``(B, L)`` query tokens → ``(B, D)``."""
        return self.encode({"ids": ids, "mask": mask}, "anchor")

    def encode_documents(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``(B, L)`` document tokens → ``(B, D)``."""
        return self.encode({"ids": ids, "mask": mask}, "candidate")
