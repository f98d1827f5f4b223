"""The detection setting's :class:`contrastive.cli.Job`: experiments with ``task: detection`` go through the
shared ``contrastive fit|validate|test|eval`` flow (run-directory safety, ``--resume``, step checkpoints,
atomic ``results.json``); this class only builds the detection objects and adds the detection results.

    contrastive fit configs/detection/linear.yaml
    contrastive fit configs/detection/category_query.yaml category_sampler.name=index_topk
    contrastive fit configs/detection/linear.yaml --resume runs/detection_linear/version_0
    contrastive eval runs/detection_linear/version_0

``results.json`` holds the test metrics (mAP, AP50, AP75, APs/m/l, AP_rare/common/frequent), per-category
AP with each category's training-image count and bucket, the time per training epoch (with its validation
pass) and the bad-input counts of the data. The best checkpoint is chosen by ``run.monitor`` (default
``val/mAP``, set by :func:`contrastive.detection.build.validate_detection`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from contrastive.cli import Job, building


class DetectionJob(Job):
    """Datamodule and :class:`~contrastive.detection.module.DetectionModule` of one detection experiment.

    There is no negative sampler (``sampler = None``): the category samplers live in the classification
    head and their state travels in the model's ``state_dict`` (``get_extra_state``).
    """

    def build(self, cfg: dict, run_dir: Path) -> None:
        from contrastive.detection.build import build_detection_datamodule, build_detection_module

        self.sampler, self.loss = None, None
        with building("data"):
            self.datamodule = build_detection_datamodule(cfg, int(cfg.get("seed", 0)))
            self.datamodule.setup("fit")
        with building("model"):
            self.model = build_detection_module(cfg, self.datamodule)

    def test_results(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Per-category AP (moved out of ``metrics``), epoch times and the data's bad-input counts."""
        dm = self.datamodule
        per_cat = metrics.pop("per_category", None) or {}
        train = dm.train_split
        counts = train.images_per_category().tolist()
        buckets = dm.frequency("test")
        per_category = {str(c.id): {"name": c.name, "ap": per_cat[str(c.id)], "train_images": int(counts[i]),
                                    "bucket": buckets[i]}
                        for i, c in enumerate(train.categories) if str(c.id) in per_cat}
        out: dict[str, Any] = {"per_category": per_category, "bad_input": dm.bad_input_report()}
        times = list(self.model.epoch_times)
        if times:  # trained in this command (``eval`` of a finished run keeps the times results.json has)
            out.update(epoch_times_s=times, time_per_epoch_s=sum(times) / len(times))
        return out
