"""The vision–language configuration of :class:`~contrastive.models.contrastive.ContrastiveModule`:
open_clip image and text towers (:func:`~datamodules.clip.models.build_clip_towers`) behind one routing
tower, the clip batch format (:func:`clip_batch`) and an evaluator for image–text retrieval both ways,
zero-shot accuracy and compositional accuracy per category.

Temperature: the loss's temperature is open_clip's learnable ``logit_scale`` (``t = 1 / exp(logit_scale)``,
the parameter clamped to ``[0, ln 100]`` as open_clip does; :class:`~datamodules.clip.models.CLIPLogitScale`),
handed to the core's loss with :meth:`~contrastive.losses.base.ContrastiveLoss.use_temperature`: the loss
config's own temperature settings are unused, and a pretrained checkpoint's scale is kept. A loss without a
temperature (the Cement margin loss) leaves the logit scale unused and frozen. The export writes the
parameter as trained.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from contrastive.filters.base import NegativeFilter
from contrastive.losses.base import ContrastiveLoss
from contrastive.losses.infonce import ScaleTemperature
from contrastive.models.batch import ContrastiveBatch, ExtraNegatives
from contrastive.models.contrastive import ContrastiveModule
from contrastive.models.evaluation import EvalOutputs
from contrastive.models.optim import OptimizerSettings
from contrastive.registry import MODELS
from datamodules.clip.models import CLIPTowers, build_clip_towers

IMAGE_KEYS = ("pixels",)
TEXT_KEYS = ("ids", "mask")


def clip_batch(batch: Mapping[str, Any]) -> ContrastiveBatch:
    """The clip batch dict (:mod:`datamodules.clip.datamodule`) as a :class:`ContrastiveBatch`; extra
    negatives (``neg_*``) keep their labels ``-1`` unless they are training rows (``neg_pair_id``)."""

    def side(prefix: str) -> dict[str, Tensor]:
        return {k: batch[f"{prefix}{k}"] for k in IMAGE_KEYS + TEXT_KEYS if f"{prefix}{k}" in batch}

    negatives = None
    neg = side("neg_")
    if neg and next(iter(neg.values())).shape[0] > 0:
        ids = batch["neg_pair_id"]
        negatives = ExtraNegatives(inputs=neg, ids=ids, labels=ids, groups=batch.get("neg_dup_group", ids),
                                   weights=batch.get("neg_weight"), difficulty=batch.get("neg_difficulty"),
                                   owner=batch.get("neg_owner"))
    return ContrastiveBatch(anchors=side("a_"), candidates=side("c_"), anchor_ids=batch["a_id"],
                            candidate_ids=batch["c_id"], anchor_labels=batch["a_label"],
                            candidate_labels=batch["c_label"], anchor_groups=batch["a_group"],
                            candidate_groups=batch["c_group"], negatives=negatives, paired=bool(batch["paired"]))


class ImageTextTower(nn.Module):
    """One tower for both modalities (the tower contract): ``{"pixels"}`` → the image tower, ``{"ids",
    ("mask")}`` → the text tower; either way ``(N, d)`` L2-normalised embeddings."""

    def __init__(self, towers: CLIPTowers) -> None:
        super().__init__()
        self.model = towers.model  # registers the open_clip parameters once
        self.image, self.text = towers.image, towers.text
        self.output_dim = int(towers.model_cfg["embed_dim"])

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.image(inputs) if "pixels" in inputs else self.text(inputs)


class ClipEvaluator:
    """Retrieval both ways from the evaluation outputs (anchors = captions labelled with their image id,
    candidates = the images): ``i2t/`` and ``t2i/`` ``R@1/5/10`` (success@k, the image–text papers' R@k),
    ``mrr`` (and their mean ``mrr``), plus ``num_images`` / ``num_captions``; at test time also zero-shot accuracy
    (``zeroshot/top1``) and compositional accuracy per category (``comp/<category>``, ``comp/mean``) on the
    datamodule's data (generated scenes). ``module`` is bound by :class:`ClipModule`.

    At the ``extra_at`` stages :attr:`last_items` holds the per-item outcomes behind those figures (the
    input of paired significance tests): ``t2i/caption_id`` and ``t2i/rank`` (each caption's rank of its
    image), ``i2t/image_id`` and ``i2t/rank`` (each image's rank of its best-ranked caption), both sorted
    by id, and ``comp/category`` and ``comp/correct`` per compositional item (the datamodule's order)."""

    def __init__(self, chunk_size: int = 4096, ks: Sequence[int] = (1, 5, 10), extra_at: Sequence[str] = ("test",)) -> None:
        self.chunk_size, self.ks, self.extra_at = int(chunk_size), tuple(ks), tuple(extra_at)
        self.module: Optional["ClipModule"] = None
        self.last_items: dict[str, list] = {}

    def __call__(self, outputs: EvalOutputs, stage: str) -> dict[str, float]:
        from datamodules.clip.evaluation import image_text_retrieval

        o = outputs
        m = image_text_retrieval(o.candidates, o.anchors, o.candidate_labels, o.anchor_labels, ks=self.ks,
                                 chunk_size=self.chunk_size)
        out: dict[str, float] = {}
        for d in ("i2t", "t2i"):
            out[f"{d}/mrr"] = m[f"{d}/mrr"]
            for k in self.ks:
                out[f"{d}/R@{k}"] = m[f"{d}/success@{k}"]
        out["mrr"] = (out["i2t/mrr"] + out["t2i/mrr"]) / 2  # the default checkpoint monitor (val/mrr)
        out["num_images"], out["num_captions"] = float(o.candidates.shape[0]), float(o.anchors.shape[0])
        self.last_items = {}
        if stage in self.extra_at:
            self.last_items = self.retrieval_items(o)
            if self.module is not None:
                out.update(self.extra_metrics(stage))
        return out

    def retrieval_items(self, o: EvalOutputs) -> dict[str, list]:
        """Per caption and per image, the rank of the first relevant item of the other side (by id)."""
        from datamodules.clip.evaluation import first_relevant_ranks

        t2i = first_relevant_ranks(o.anchors, o.candidates, o.anchor_labels, o.candidate_labels, self.chunk_size)
        i2t = first_relevant_ranks(o.candidates, o.anchors, o.candidate_labels, o.anchor_labels, self.chunk_size)
        a, c = torch.argsort(o.anchor_ids.cpu()), torch.argsort(o.candidate_ids.cpu())
        return {"t2i/caption_id": o.anchor_ids.cpu()[a].tolist(), "t2i/rank": t2i[a].tolist(),
                "i2t/image_id": o.candidate_ids.cpu()[c].tolist(), "i2t/rank": i2t[c].tolist()}

    def extra_metrics(self, stage: str) -> dict[str, float]:
        from datamodules.clip.evaluation import evaluate_compositional, evaluate_zero_shot, SCENE_TEMPLATES

        module = self.module
        dm = getattr(module.trainer, "datamodule", None) if module is not None and module._trainer is not None else None
        if dm is None or not hasattr(dm, "compositional_items"):
            return {}
        out: dict[str, float] = {}
        zs = dm.zero_shot_data()
        if zs is not None:
            data, classes = zs
            acc = evaluate_zero_shot(module.towers.image, module.towers.text, dm.tokenizer, data, classes, SCENE_TEMPLATES)
            out["zeroshot/top1"] = acc["top1"]
        split = "test" if stage == "test" else "valid"
        items = dm.compositional_items(split)
        if items:
            comp = evaluate_compositional(module.towers.image, module.towers.text, dm.tokenizer, items, dm.transform,
                                          images=dm.split_images(split), per_item=True)
            self.last_items["comp/category"] = [it.category for it in items]
            self.last_items["comp/correct"] = [int(v) for v in comp.pop("correct")]
            out.update({f"comp/{k}": float(v) for k, v in comp.items() if k != "items"})
            out["comp/num_items"] = float(len(items))
        return out


@MODELS.register("clip")
class ClipModule(ContrastiveModule):
    """CLIP-style image–text training: :class:`ContrastiveModule` with open_clip towers, the clip batches
    (:func:`clip_batch`) and :class:`ClipEvaluator`.

    Args:
        loss: any :class:`~contrastive.losses.base.ContrastiveLoss`; its temperature becomes open_clip's
            logit scale (module docstring).
        architecture: an open_clip model name, a shipped model-config name (``clip-tiny``) or a YAML file in
            open_clip's model-config format.
        pretrained: a local open_clip checkpoint file (nothing is downloaded); ``None``: random init.
        lr, weight_decay, warmup_steps, scheduler: :class:`~contrastive.models.optim.OptimizerSettings`.
        eval_chunk_size: memory bound of the exact ranking at validation/test.
        The other arguments are :class:`ContrastiveModule`'s.
    """

    def __init__(
        self,
        loss: ContrastiveLoss,
        architecture: str = "clip-tiny",
        pretrained: Optional[str] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        scheduler: str = "cosine",
        mask_known_duplicates: bool = True,
        eval_chunk_size: int = 4096,
        queue_size: int = 0,
        momentum: Optional[float] = None,
        cache_chunk_size: Optional[int] = None,
        cache_chunked_loss: bool = True,
        similarity_estimator: Optional[Any] = None,
        difficulty: Optional[Literal["similarity", "estimate"]] = None,
        feature_transform: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        filters: Optional[Sequence[NegativeFilter]] = None,
    ) -> None:
        towers = build_clip_towers(architecture, pretrained)
        if loss.use_temperature(ScaleTemperature(towers.logit_scale)) == 0:
            towers.model.logit_scale.requires_grad_(False)  # unused by the loss: not a trained parameter
        evaluator = ClipEvaluator(eval_chunk_size)
        super().__init__(
            ImageTextTower(towers), loss,
            optimizer=OptimizerSettings(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                        scheduler=scheduler),  # type: ignore[arg-type]
            mask_known_duplicates=mask_known_duplicates, evaluators=[evaluator], queue_size=queue_size,
            momentum=momentum, cache_chunk_size=cache_chunk_size, cache_chunked_loss=cache_chunked_loss,
            similarity_estimator=similarity_estimator, difficulty=difficulty, feature_transform=feature_transform,
            filters=filters, batch_adapter=clip_batch,
        )
        self.towers = towers  # a plain holder (its modules are registered through the tower)
        evaluator.module = self

    def export(self, out_dir: str) -> dict:
        """Write the open_clip checkpoint and its model config (:func:`~datamodules.clip.models.export_open_clip`)."""
        return self.towers.export(out_dir)
