"""``contrastive fit|validate|test|eval`` for experiments with ``task: detection``.

    contrastive fit configs/detection/linear.yaml
    contrastive fit configs/detection/category_query.yaml category_sampler.name=index_topk
    contrastive test runs/detection_linear/version_0

A run directory holds ``config.yaml``, CSV/TensorBoard logs, ``checkpoints/{best,last}.ckpt`` (best by
``val/mAP``) and ``results.json``: the test metrics (mAP, AP50, AP75, APs/m/l, AP_rare/common/frequent),
per-category AP with each category's training-image count and bucket, the time per training epoch (with its
validation pass) and the bad-input counts of the data.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from contrastive.cli import (UserError, device_info, eval_log_dir, find_checkpoint, latest_resumable, next_version_dir,
                             resolve_target, save_results)

TASK = "detection"


def config_task(target: str) -> Optional[str]:
    """The top-level ``task`` of a config file or run directory (``None`` when absent or unreadable)."""
    p = Path(target)
    if p.suffix == ".ckpt":  # a checkpoint of a run: runs/<exp>/version_<n>/checkpoints/<name>.ckpt
        p = p.parent.parent
    try:
        path, _ = resolve_target(str(p))
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, UserError):  # ValueError: undecodable bytes
        return None
    return data.get("task") if isinstance(data, dict) else None


def load_detection_config(path: Path, overrides: list[str]) -> dict:
    from contrastive.config.loader import compose, to_container
    from contrastive.detection.build import validate_detection

    cfg, prov = compose(path, list(overrides))
    return validate_detection(to_container(cfg), prov)


class DetectionJob:
    """Datamodule, module and trainer factory of one detection experiment."""

    def __init__(self, cfg: dict, run_dir: Path) -> None:
        import lightning as L
        import torch

        from contrastive.detection.build import build_detection_datamodule, build_detection_module

        self.cfg, self.run_dir = cfg, run_dir
        run = cfg.get("run") or {}
        if run.get("num_threads"):
            torch.set_num_threads(int(run["num_threads"]))
        seed = int(cfg.get("seed", 0))
        L.seed_everything(seed, workers=True, verbose=False)
        self.datamodule = build_detection_datamodule(cfg, seed)
        self.datamodule.setup("fit")
        self.model = build_detection_module(cfg, self.datamodule)

    def trainer(self, log_dir: Optional[Path] = None) -> Any:
        import lightning as L
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        from contrastive.build import trainer_kwargs

        run = self.cfg.get("run") or {}
        log_dir = self.run_dir if log_dir is None else log_dir
        out, name, version = log_dir.parent.parent, log_dir.parent.name, log_dir.name
        loggers = [CSVLogger(save_dir=str(out), name=name, version=version),
                   TensorBoardLogger(save_dir=str(out), name=name, version=version, default_hp_metric=False)]
        callbacks = [ModelCheckpoint(dirpath=str(self.run_dir / "checkpoints"), filename="best",
                                     monitor=run.get("monitor", "val/mAP"),
                                     mode=run.get("monitor_mode", "max"), save_top_k=1, save_last=True,
                                     auto_insert_metric_name=False, enable_version_counter=False),
                     LearningRateMonitor(logging_interval="step")]
        return L.Trainer(default_root_dir=str(self.run_dir), logger=loggers, callbacks=callbacks,
                         **trainer_kwargs(self.cfg))


def evaluate(job: DetectionJob, trainer: Any, ckpt: Optional[str]) -> dict[str, Any]:
    """Test on the test split and write ``results.json``."""
    dm = job.datamodule
    trainer.test(job.model, datamodule=dm, ckpt_path=ckpt, verbose=False)
    metrics = {k.split("/", 1)[1]: v for k, v in job.model.last_metrics.items() if k.startswith("test/")}
    per_cat = metrics.pop("per_category", {})
    train = dm.train_split
    counts = train.images_per_category().tolist()
    buckets = dm.frequency("test")
    per_category = {str(c.id): {"name": c.name, "ap": per_cat[str(c.id)], "train_images": int(counts[i]),
                                "bucket": buckets[i]}
                    for i, c in enumerate(train.categories) if str(c.id) in per_cat}
    times = job.model.epoch_times
    results = {"test": metrics, "per_category": per_category, "checkpoint": ckpt,
               "epoch_times_s": times, "time_per_epoch_s": sum(times) / len(times) if times else None,
               "bad_input": dm.bad_input_report(), "device": device_info(trainer)}
    if trainer.is_global_zero:
        keys = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AP_rare", "AP_common", "AP_frequent")
        print(f"\nTest detection ({job.cfg['experiment']}): " +
              ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if metrics.get(k) is not None))
        save_results(job.run_dir, results)
    return results


def cmd_fit(args: argparse.Namespace) -> int:
    import os

    from omegaconf import OmegaConf

    from contrastive.config.loader import save_resolved

    config_path, run_dir = resolve_target(args.config)
    cfg = load_detection_config(config_path, args.overrides)
    ckpt = None
    if args.resume is not None:
        if args.resume != "latest":
            _, run_dir = resolve_target(args.resume)
        else:
            run_dir = latest_resumable(Path((cfg.get("run") or {}).get("output_dir", "runs")) / cfg["experiment"])
        if run_dir is None or not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise UserError(f"--resume: no checkpoints/last.ckpt for '{cfg['experiment']}'")
        ckpt = str(run_dir / "checkpoints" / "last.ckpt")
        if (run_dir / "metrics.csv").is_file():
            n = len(list(run_dir.glob("metrics.before_resume_*.csv")))
            os.replace(run_dir / "metrics.csv", run_dir / f"metrics.before_resume_{n}.csv")
    else:
        run_dir = next_version_dir(Path((cfg.get("run") or {}).get("output_dir", "runs")) / cfg["experiment"])
    run_dir.mkdir(parents=True, exist_ok=True)
    job = DetectionJob(cfg, run_dir)
    save_resolved(OmegaConf.create(cfg), run_dir / "config.yaml")
    print(f"Run directory: {run_dir}")
    trainer = job.trainer()
    trainer.fit(job.model, datamodule=job.datamodule, ckpt_path=ckpt)
    if (cfg.get("run") or {}).get("test_after_fit", True):
        best = run_dir / "checkpoints" / "best.ckpt"
        evaluate(job, trainer, str(best) if best.is_file() else None)
    return 0


def _job_for_eval(args: argparse.Namespace) -> tuple[DetectionJob, Optional[str]]:
    config_path, run_dir = resolve_target(args.config)
    cfg = load_detection_config(config_path, args.overrides)
    ckpt = find_checkpoint(run_dir, args.ckpt)
    if run_dir is None:
        run_dir = next_version_dir(Path((cfg.get("run") or {}).get("output_dir", "runs")) / cfg["experiment"])
        run_dir.mkdir(parents=True, exist_ok=True)
    return DetectionJob(cfg, run_dir), ckpt


def cmd_validate(args: argparse.Namespace) -> int:
    import json

    job, ckpt = _job_for_eval(args)
    trainer = job.trainer(log_dir=eval_log_dir(job.run_dir, "validate"))
    trainer.validate(job.model, datamodule=job.datamodule, ckpt_path=ckpt, verbose=False)
    print(json.dumps({k: v for k, v in job.model.last_metrics.items() if not k.endswith("per_category")}, indent=2))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    job, ckpt = _job_for_eval(args)
    evaluate(job, job.trainer(log_dir=eval_log_dir(job.run_dir, "test")), ckpt)
    return 0


def cmd_unsupported(args: argparse.Namespace) -> int:
    raise UserError(f"'{args.command}' is not available for task '{TASK}' (use fit, validate, test or eval)")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "fit": cmd_fit, "validate": cmd_validate, "test": cmd_test, "eval": cmd_test, "mine": cmd_unsupported,
    "export": cmd_unsupported}


def task_commands(target: str) -> Optional[dict[str, Callable[[argparse.Namespace], int]]]:
    """The detection commands when ``target``'s config says ``task: detection``, else ``None``."""
    return COMMANDS if config_task(target) == TASK else None
