"""``DetectionModule``: wires a :class:`DetrDetector`, its set loss, the false-negative filters over category
slots and COCO evaluation into Lightning. Everything it does is delegated to those objects."""
from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from contrastive.detection.criterion import DetectionSetLoss
from contrastive.detection.detector import DetectorOutput, DetrDetector
from contrastive.detection.evaluation import CocoEvaluator, select_detections, to_coco_results
from contrastive.filters import FilterChain, FilterContext, NegativeFilter
from contrastive.filters.functional import rowwise_isin

Batch = tuple[Tensor, list[dict[str, Tensor]]]
#: checkpoint key of the training-time record (:meth:`DetectionModule.on_save_checkpoint`)
TIMES_KEY = "detection_epoch_times"


def negative_filter_mask(chain: FilterChain, categories: Tensor, labels: Sequence[Tensor],
                         presence: Optional[Tensor] = None) -> tuple[Tensor, float]:
    """``(B, S)`` bool slots removed from the negatives of each image, and the removed fraction.

    Anchors are images, candidates their category slots, positives the image's ground-truth categories.
    """
    pos = pad_sequence([lab.unique() for lab in labels], batch_first=True, padding_value=-1)
    if pos.shape[1] == 0:
        pos = torch.full((categories.shape[0], 1), -1, dtype=torch.long, device=categories.device)
    scores = (torch.gather(presence.detach(), 1, categories) if presence is not None
              else torch.zeros(categories.shape, device=categories.device))
    ctx = FilterContext(scores=scores, candidate_ids=categories, positive_ids=pos,
                        positive_mask=rowwise_isin(categories, pos))
    res = chain.apply(ctx)
    return res.false_negative_mask, res.removed_fraction


class DetectionModule(L.LightningModule):
    """Training and COCO evaluation of a detector.

    Args:
        detector: the model (its head decides linear vs category-query classification).
        criterion: the set loss.
        filters: false-negative filters over (image, category slot) pairs (e.g. the hierarchy filter).
        evaluators: ``{"val": ..., "test": ...}`` :class:`CocoEvaluator` per split.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 0.1 x lr.
        max_detections: detections per image kept for evaluation.
    """

    def __init__(self, detector: DetrDetector, criterion: DetectionSetLoss, filters: Sequence[NegativeFilter] = (),
                 evaluators: Optional[dict[str, CocoEvaluator]] = None, lr: float = 2e-4, weight_decay: float = 1e-4,
                 warmup_steps: int = 100, max_detections: int = 100) -> None:
        super().__init__()
        self.detector, self.criterion = detector, criterion
        self.chain = FilterChain(list(filters))
        self.evaluators = evaluators or {}
        self.lr, self.weight_decay, self.warmup_steps, self.max_detections = lr, weight_decay, warmup_steps, max_detections
        self._results: list[dict[str, Any]] = []
        self.last_metrics: dict[str, Any] = {}
        self.epoch_times: list[float] = []
        self._epoch_start = 0.0
        self._carry: Optional[dict[str, Any]] = None

    def forward(self, images: Tensor, labels: Optional[Sequence[Tensor]] = None) -> DetectorOutput:
        return self.detector(images, labels)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        labels, boxes = [t["labels"] for t in targets], [t["boxes"] for t in targets]
        out = self.detector(images, labels, boxes)
        ctx = out.context
        slots = [ctx.slots_of(b, lab) for b, lab in enumerate(labels)]
        mask = None
        if len(self.chain):
            mask, removed = negative_filter_mask(self.chain, ctx.categories, labels, ctx.presence)
            self.log("train/filtered_fraction", removed, batch_size=len(targets))
        losses = self.criterion(out.stages, boxes, slots, mask)
        loss = losses["loss"]
        bs = len(targets)
        if out.denoising is not None:
            dn = self.criterion.denoising_loss(out.denoising_stages, out.denoising, boxes, slots, mask)
            loss = loss + dn["loss"]
            self.log("train/denoising_loss", dn["loss"].detach(), batch_size=bs)
        if ctx.loss is not None:
            loss = loss + ctx.loss
            self.log("train/presence_loss", ctx.loss.detach(), batch_size=bs)
            n_gt = sum(lab.numel() for lab in labels)
            covered = sum(int((s >= 0).sum()) for s in slots)
            self.log("train/gt_in_slots", covered / max(n_gt, 1), batch_size=bs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for k in ("class", "bbox", "giou"):
            self.log(f"train/{k}", losses[f"final_{k}"], batch_size=bs)
        return loss

    def _eval_step(self, batch: Batch) -> None:
        images, targets = batch
        out = self.detector(images)
        sizes = torch.stack([t["orig_size"] for t in targets])
        boxes, scores, labels = select_detections(out.final.logits, out.final.boxes, out.context.categories, sizes,
                                                  self.max_detections)
        ids = [int(t["image_id"]) for t in targets]
        evaluator = next(iter(self.evaluators.values()), None)
        cat_ids = evaluator.category_ids if evaluator is not None else list(range(out.context.categories.max() + 1))
        self._results += to_coco_results(ids, boxes, scores, labels, cat_ids)

    def _eval_end(self, split: str) -> None:
        if split not in self.evaluators:
            return
        metrics = self.evaluators[split].evaluate(self._results)
        self._results = []
        scalars = {f"{split}/{k}": float(v) for k, v in metrics.items() if k != "per_category" and v is not None}
        self.log_dict(scalars)
        self.last_metrics = {**{f"{split}/{k}": v for k, v in metrics.items()}}

    def on_validation_epoch_start(self) -> None:
        self._results = []

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._results = []

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def on_train_start(self) -> None:
        self._epoch_start = time.perf_counter()
        carry, self._carry = self._carry, None
        if carry is None:
            return
        if self.trainer.current_epoch == carry["epoch"]:  # resumed mid-epoch: count the time before the save
            self._epoch_start -= carry["elapsed_s"]
        elif len(self.epoch_times) == carry["epoch"]:  # saved at the epoch's end, before its time was recorded
            self.epoch_times.append(carry["elapsed_s"])

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self.epoch_times.append(time.perf_counter() - self._epoch_start)
        self.log("train/epoch_time_s", self.epoch_times[-1])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the epoch times (and the time spent in the current epoch) across a resume."""
        checkpoint[TIMES_KEY] = {"epoch_times_s": list(self.epoch_times), "epoch": int(self.current_epoch),
                                 "elapsed_s": time.perf_counter() - self._epoch_start}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(TIMES_KEY)
        if saved is not None and self.trainer.state.fn == "fit":  # not when testing a (best) checkpoint
            self.epoch_times = [float(t) for t in saved["epoch_times_s"]]
            self._carry = {"epoch": int(saved["epoch"]), "elapsed_s": float(saved["elapsed_s"])}

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith("embeddings") else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self.trainer is not None else 1
        warm = min(self.warmup_steps, max(total - 1, 0))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            t = (step - warm) / max(total - warm, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
