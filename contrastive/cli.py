"""The ``contrastive`` command line: ``fit``, ``validate``, ``test``, ``eval`` (and ``mine``, ``export``).

    contrastive fit configs/codesearch/infonce.yaml loss.temperature=0.1 trainer.max_epochs=3
    contrastive fit configs/codesearch/infonce.yaml --resume            # last run of the experiment
    contrastive test runs/codesearch_infonce/version_0                   # best checkpoint of a run
    contrastive fit runs/codesearch_infonce/version_0/config.yaml        # relaunch from the saved config
    contrastive export runs/clip_infonce/version_0 --out my_clip         # the setting's format (open_clip)

Outputs go to ``runs/<experiment>/version_<n>/``: ``config.yaml`` (fully resolved), CSV and TensorBoard
logs, ``checkpoints/{best,last}.ckpt``, ``tokenizer/`` and ``results.json``. User errors print one line and
exit non-zero; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import platform
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

log = logging.getLogger("contrastive")

EXIT_USER_ERROR = 2

from contrastive.config.errors import ConfigError  # noqa: E402
from contrastive.runs import (CheckpointError, UserError, check_state_dict, config_diff,  # noqa: E402
                              format_diff, is_started, keep_run_dir, new_run_dir, newest_valid_checkpoint, next_version_dir,
                              read_checkpoint)


# ---------------------------------------------------------------------------------------------- runs
def latest_resumable(root: Path) -> Optional[Path]:
    runs = sorted((p for p in root.glob("version_*")
                   if re.fullmatch(r"version_\d+", p.name) and any((p / "checkpoints").glob("*.ckpt"))),
                  key=lambda p: int(p.name.split("_")[1]))
    return runs[-1] if runs else None


def output_root(cfg: dict) -> Path:
    return Path((cfg.get("run") or {}).get("output_dir", "runs")) / cfg["experiment"]


def resolve_target(target: str) -> tuple[Path, Optional[Path]]:
    """``target`` is a config file or a run directory; returns (config path, run dir or None)."""
    p = Path(target)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise UserError(f"{p}: not a run directory (no config.yaml)")
        return p / "config.yaml", p
    if p.name == "config.yaml" and (p.parent / "checkpoints").is_dir():
        return p, p.parent
    return p, None


#: settings whose experiments say ``task: <name>``: the validator of their own config schema and their
#: :class:`Job` subclass, as ``"module:attribute"`` (imported on use); without ``task`` an experiment is one
#: of the registry-built settings (code search, clip)
TASKS: dict[str, tuple[str, str]] = {
    "detection": ("contrastive.detection.build:validate_detection", "contrastive.detection.job:DetectionJob"),
}


def _task_object(spec: str) -> Any:
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def load_config(path: Path, overrides: Sequence[str]) -> dict:
    from contrastive.config.loader import compose
    from contrastive.config.validate import check_experiment, resolve

    importlib.import_module("datamodules")  # settings register their samplers (e.g. clip's generated negatives)
    cfg, prov = compose(path, list(overrides))
    data = resolve(cfg, prov)
    task = data.get("task")
    if task is None:
        return check_experiment(data, prov)
    if task in TASKS:
        return _task_object(TASKS[task][0])(data, prov)
    raise ConfigError(f"key 'task' (from {prov.of('task')}): unknown task {task!r}; valid choices: "
                      f"{', '.join(TASKS)} (or no 'task' key)")


def find_checkpoint(run_dir: Optional[Path], explicit: Optional[str]) -> Optional[str]:
    if explicit:
        if not Path(explicit).is_file():
            raise CheckpointError(f"--ckpt {explicit}: checkpoint not found")
        return explicit
    if run_dir is None:
        return None
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            return str(run_dir / "checkpoints" / name)
    raise UserError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'}")


# ---------------------------------------------------------------------------------------------- wiring
class Job:
    """Everything one command needs, built from a validated config (:meth:`build`; a setting with its own
    ``task`` overrides it and :meth:`test_results`)."""

    def __init__(self, cfg: dict, run_dir: Path) -> None:
        import lightning as L
        import torch

        self.cfg, self.run_dir = cfg, run_dir
        run = cfg.get("run") or {}
        if run.get("num_threads"):
            torch.set_num_threads(int(run["num_threads"]))
        L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
        self.build(cfg, run_dir)

    def build(self, cfg: dict, run_dir: Path) -> None:
        """Set ``sampler``, ``datamodule`` (set up for fit), ``loss`` and ``model``."""
        from contrastive import build

        with building("sampler"):
            self.sampler = build.build_sampler(cfg.get("sampler"))
        with building("data"):
            self.datamodule = build.build_datamodule(cfg["data"], run_dir=run_dir, seed=int(cfg.get("seed", 0)),
                                                     sampler=self.sampler, model_spec=cfg.get("model"))
            self.datamodule.prepare_data()
            self.datamodule.setup("fit")
        with building("loss"):
            self.loss = build.build_loss(cfg["loss"])
        objects: dict[str, Any] = {"sampler": self.sampler}
        if cfg.get("filters"):
            with building("filters"):
                objects["filters"] = build.build_filters(cfg["filters"])
        if cfg.get("transforms"):
            with building("transforms"):
                objects["feature_transform"] = build.build_transforms(cfg["transforms"])
        with building("model"):
            self.model = build.build_model(cfg, getattr(self.datamodule, "vocab_size", None), self.loss, **objects)

    def test_results(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """What ``results.json`` holds besides ``metrics`` (the ``test/`` metrics without the prefix, which a
        setting may edit in place, e.g. to move non-scalar entries out of the printed table)."""
        return {}

    def trainer(self, callbacks_extra: Sequence[Any] = (), log_dir: Optional[Path] = None,
                resume_step: Optional[int] = None) -> Any:
        """A Trainer logging (CSV + TensorBoard) to ``log_dir`` (default: the run directory); with
        ``resume_step`` (the resumed checkpoint's global step) ``metrics.csv`` is continued."""
        import lightning as L
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
        from lightning.pytorch.loggers import TensorBoardLogger

        from contrastive.build import trainer_kwargs
        from contrastive.callbacks import build_callbacks
        from contrastive.callbacks.resume import ResumeStateCallback, StepCheckpoint
        from contrastive.runs import atomic_checkpoint_io, run_csv_logger

        run = self.cfg.get("run") or {}
        log_dir = self.run_dir if log_dir is None else log_dir
        out, name, version = log_dir.parent.parent, log_dir.parent.name, log_dir.name
        loggers = [run_csv_logger(str(out), name, version, resume_step=resume_step),
                   TensorBoardLogger(save_dir=str(out), name=name, version=version, default_hp_metric=False)]
        ckpt_dir = self.run_dir / "checkpoints"
        with building("run"):
            step_ckpt = StepCheckpoint(ckpt_dir, run.get("checkpoint_every_n_steps", 100),
                                       run.get("keep_step_checkpoints", 1))
        callbacks = [
            ResumeStateCallback(self.sampler),  # first: restores the random state before other epoch-start hooks
            ModelCheckpoint(dirpath=str(ckpt_dir), filename="best",
                            monitor=run.get("monitor", "val/mrr"), mode=run.get("monitor_mode", "max"),
                            save_top_k=1, save_last=False, auto_insert_metric_name=False, enable_version_counter=False),
            LearningRateMonitor(logging_interval="step"),
            *build_callbacks(self.cfg, self),
            *callbacks_extra,
            step_ckpt,  # last: a step checkpoint includes what the other callbacks did at that step
        ]
        with building("trainer"):
            return L.Trainer(default_root_dir=str(self.run_dir), logger=loggers, callbacks=callbacks,
                             plugins=[atomic_checkpoint_io()], **trainer_kwargs(self.cfg))


def make_job(cfg: dict, run_dir: Path) -> Job:
    """The :class:`Job` of ``cfg``'s setting (``task``, see :data:`TASKS`)."""
    task = cfg.get("task")
    return (_task_object(TASKS[task][1]) if task is not None else Job)(cfg, run_dir)


def _misconfiguration() -> type:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return MisconfigurationException


@contextlib.contextmanager
def building(section: str) -> Iterator[None]:
    """Turn a constructor's ``ValueError``/``TypeError`` (bad settings) into a config error naming the
    config section, so that it exits 2 like every other user error."""
    try:
        yield
    except (ValueError, TypeError, _misconfiguration()) as e:
        if isinstance(e, ConfigError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{section}: {msg}") from e


class _OnStart:
    """A callback run when training starts: marks a new run directory as started (kept even if training
    fails later) and writes what only a started run may write (its ``config.yaml``)."""

    def __new__(cls, run_dir: Path, write: Callable[[], None]) -> Any:
        from lightning.pytorch.callbacks import Callback

        class OnStart(Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                keep_run_dir(run_dir)
                if trainer.is_global_zero:
                    write()

        return OnStart()


def save_provenance(job: Job, run_dir: Path) -> None:
    """Print the dataset's provenance line and save ``run_dir/corpus.json`` (datamodules with ``provenance()``)."""
    from datamodules.codesearch import CodeSearchDataModule

    dm = job.datamodule
    if not isinstance(dm, CodeSearchDataModule):
        return
    from contrastive.io import atomic_write_text

    print(dm.provenance_summary())
    atomic_write_text(run_dir / "corpus.json", json.dumps(dm.provenance(), indent=2, sort_keys=True))


def save_results(run_dir: Path, results: dict) -> None:
    from contrastive.io import atomic_write_text

    path = run_dir / "results.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    previous.update(results)
    atomic_write_text(path, json.dumps(previous, indent=2, sort_keys=True))


def format_table(rows: dict[str, dict[str, float]], keys: Sequence[str]) -> str:
    head = "| system | " + " | ".join(keys) + " |"
    sep = "|---" * (len(keys) + 1) + "|"
    lines = [head, sep]
    for system, m in rows.items():
        lines.append(f"| {system} | " + " | ".join(f"{m[k]:.4f}" if m.get(k) is not None else "-" for k in keys) + " |")
    return "\n".join(lines)


REPORT_KEYS = ("mrr", "recall@1", "recall@5", "recall@10", "ndcg@10", "filtered_mrr", "csn_mrr")


def evaluate(job: Job, trainer: Any, ckpt: Optional[str]) -> dict[str, Any]:
    """Test the model on the test split (full corpus + CSN-style MRR) and the BM25 baseline beside it."""
    job.datamodule.setup("test")
    trainer.test(job.model, datamodule=job.datamodule, ckpt_path=ckpt, verbose=False)
    model_m = {k.split("/", 1)[1]: v for k, v in job.model.last_metrics.items() if k.startswith("test/")}
    extra = job.test_results(model_m)
    rows = {"model": model_m}
    results: dict[str, Any] = {"test": model_m, "checkpoint": ckpt, "device": device_info(trainer), **extra}
    bm25_ranks = None
    if (job.cfg.get("eval") or {}).get("bm25_baseline", True) and trainer.is_global_zero:
        bm = bm25_baseline_for(job.datamodule)
        if bm is not None:
            rows["bm25"], bm25_ranks = bm
            results["bm25"] = bm[0]
    if trainer.is_global_zero:
        ranks = test_ranks(job)
        if ranks is not None and bm25_ranks is not None:
            results["model_vs_bm25"] = compare_with_bm25(ranks[1], bm25_ranks)
        if "corpus_size" in model_m:
            print(f"\nTest retrieval on {int(model_m['corpus_size'])} documents ({job.cfg['experiment']}):")
            print(format_table(rows, REPORT_KEYS))
            if "model_vs_bm25" in results:
                t = results["model_vs_bm25"]
                print(f"model - BM25 MRR: {t['diff']:+.4f} (95% CI {t['ci_low']:+.4f} .. {t['ci_high']:+.4f}, paired "
                      f"bootstrap over the {t['n']} test queries, p = {t['p_value']:.4f})")
        else:  # another setting's metrics (e.g. clip: i2t/t2i R@k, zero-shot, compositional accuracy)
            print(f"\nTest results ({job.cfg['experiment']}):")
            print(format_table(rows, list(model_m)))
        save_results(job.run_dir, results)
        if ranks is not None:
            save_test_ranks(job.run_dir, *ranks, bm25_ranks)
        save_test_items(job, job.run_dir)
    return results


def compare_with_bm25(model_ranks: Any, bm25_ranks: Any) -> dict[str, Any]:
    """Paired bootstrap test of the model's test MRR against BM25's on the same queries (both ``(Q,)`` gold
    ranks in pair-id order): ``diff`` = model − BM25, its 95% interval and two-sided p-value."""
    from dataclasses import asdict

    from contrastive.metrics.significance import paired_bootstrap_test, reciprocal_ranks

    t = paired_bootstrap_test(reciprocal_ranks(model_ranks.cpu().numpy()), reciprocal_ranks(bm25_ranks.cpu().numpy()))
    return {**asdict(t), "metric": "mrr"}


def test_ranks(job: Job) -> Optional[tuple[Any, Any]]:
    """``(pair_ids, ranks)`` of the code-search test queries, sorted by pair id: the 1-based full-corpus rank
    of each query's gold document (unfiltered, as the ``mrr`` of ``results.json``). ``None`` for other
    settings."""
    import torch

    from contrastive.metrics.retrieval import gold_ranks

    from datamodules.codesearch import CodeSearchDataModule, DualEncoderModule

    model, dm = job.model, job.datamodule
    if not (isinstance(model, DualEncoderModule) and isinstance(dm, CodeSearchDataModule)):
        return None
    q, d, ids = [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
            q.append(model.encode_queries(batch["query_ids"], batch["query_mask"]).float())
            d.append(model.encode_documents(batch["doc_ids"], batch["doc_mask"]).float())
            ids.append(batch["pair_id"])
    model.train(was_training)
    order = torch.argsort(torch.cat(ids))
    qe, de = torch.cat(q)[order], torch.cat(d)[order]
    return torch.cat(ids)[order].cpu(), gold_ranks(qe, de, torch.arange(qe.shape[0], device=qe.device)).cpu()


def save_test_ranks(run_dir: Path, pair_ids: Any, ranks: Any, bm25_ranks: Any = None) -> Path:
    """Write ``run_dir/test_ranks.json``: each test query's ``pair_id`` and the rank of its gold document
    (:func:`test_ranks`), with BM25's (``bm25_rank``) when the baseline ran: the input of paired
    significance tests (:mod:`contrastive.metrics.significance`)."""
    from contrastive.io import atomic_write_text

    data = {"pair_id": pair_ids.tolist(), "rank": ranks.tolist()}
    if bm25_ranks is not None:
        data["bm25_rank"] = bm25_ranks.tolist()
    out = run_dir / "test_ranks.json"
    atomic_write_text(out, json.dumps(data))
    return out


def save_test_items(job: Job, run_dir: Path) -> Optional[Path]:
    """Write ``run_dir/test_items.json``: the per-item outcomes of the test that the model's evaluators
    report (``ContrastiveModule.last_items``, e.g. clip's per-caption ranks and per-item compositional
    outcomes), for paired significance tests. Nothing when they report none."""
    from contrastive.io import atomic_write_text

    items = getattr(job.model, "last_items", None)
    if not items:
        return None
    out = run_dir / "test_items.json"
    atomic_write_text(out, json.dumps(items))
    return out


def device_info(trainer: Any) -> dict[str, Any]:
    """Where the run trained and tested (recorded in ``results.json``, since speed and float rounding
    depend on it): device type, its name, and the torch and CUDA versions."""
    import torch

    dev = trainer.strategy.root_device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {"type": dev.type, "name": name, "count": int(trainer.num_devices), "torch": torch.__version__,
            "cuda": torch.version.cuda if dev.type == "cuda" else None}


def bm25_baseline_for(datamodule: Any) -> Optional[tuple[dict[str, float], Any]]:
    """BM25 on the code-search test split: its metrics and the ``(Q,)`` gold ranks of the test queries in
    pair-id order (``None`` for other settings)."""
    from datamodules.codesearch import CodeSearchDataModule

    if not isinstance(datamodule, CodeSearchDataModule) or datamodule.corpus is None:
        return None
    corpus = datamodule.corpus
    import torch

    from contrastive.baselines.bm25 import bm25_baseline

    recs = sorted(corpus.records("test"), key=lambda r: r.id)
    positive = torch.arange(len(recs))
    metrics, ranks = bm25_baseline([r.query for r in recs], [r.document for r in recs], positive, return_ranks=True)
    return {k: float(v) for k, v in metrics.items()}, ranks


# ---------------------------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    if args.resume is None:
        if args.ckpt or args.allow_config_change:
            raise UserError("--ckpt and --allow-config-change only apply with --resume")
        config_path, _ = resolve_target(args.config)
        cfg = load_config(config_path, args.overrides)
        with new_run_dir(output_root(cfg)) as run_dir:  # removed again if the run fails before it starts
            return _fit(make_job(cfg, run_dir), cfg, None, None)
    return _resume(args)


def _fit(job: Job, cfg: dict, ckpt: Optional[str], resume_step: Optional[int],
         before_start: Callable[[], None] = lambda: None) -> int:
    """Train ``job`` (from ``ckpt`` when resuming). The run's ``config.yaml`` (and ``before_start``'s
    files) are written once training has started, so a run that fails before is left as it was."""
    from contrastive.config.loader import save_resolved
    from omegaconf import OmegaConf

    run_dir = job.run_dir

    def write() -> None:
        before_start()
        save_resolved(OmegaConf.create(job.cfg), run_dir / "config.yaml")

    trainer = job.trainer(callbacks_extra=[_OnStart(run_dir, write)], resume_step=resume_step)
    print(f"Run directory: {run_dir}")
    save_provenance(job, run_dir)
    try:
        trainer.fit(job.model, datamodule=job.datamodule, ckpt_path=ckpt)
    except (ValueError, TypeError, _misconfiguration()) as e:  # bad settings found while Lightning sets up
        if is_started(run_dir) or isinstance(e, ConfigError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"before training started: {msg}") from e
    if (cfg.get("run") or {}).get("test_after_fit", True):
        best = run_dir / "checkpoints" / "best.ckpt"
        evaluate(job, trainer, str(best) if best.is_file() else None)
    return 0


def _resume(args: argparse.Namespace) -> int:
    """Resume a run; everything is checked before the run directory is touched (see :mod:`contrastive.runs`)."""
    from contrastive.config.loader import parse_yaml
    from contrastive.io import atomic_write_text

    if args.resume != "latest":
        config_path, run_dir = resolve_target(args.resume)
        if run_dir is None:
            raise UserError(f"--resume {args.resume}: not a run directory (give runs/<experiment>/version_<n>)")
        if Path(args.config).resolve() != Path(args.resume).resolve() and Path(args.config).resolve() != config_path.resolve():
            config_path = resolve_target(args.config)[0]  # an experiment file: compared with the saved config
    else:
        config_path, run_dir = resolve_target(args.config)
    cfg = load_config(config_path, args.overrides)
    if run_dir is None:
        root = output_root(cfg)
        run_dir = latest_resumable(root)
        if run_dir is None:
            raise UserError(f"--resume: no run of '{cfg['experiment']}' with a checkpoint under {root}")
    saved_path = run_dir / "config.yaml"
    saved = parse_yaml(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else None
    diff = config_diff(saved, cfg) if isinstance(saved, dict) else []
    if diff and not args.allow_config_change:
        raise UserError(f"--resume: the config differs from the run's {saved_path} in {len(diff)} key(s): "
                        f"{format_diff(diff)}; resume without these changes, or pass --allow-config-change "
                        "(the old config is then kept beside the new one)")
    ckpt = Path(args.ckpt) if args.ckpt else run_dir / "checkpoints" / "last.ckpt"
    try:
        state = read_checkpoint(ckpt)
    except CheckpointError as e:
        if args.ckpt:
            raise
        alt = newest_valid_checkpoint(run_dir / "checkpoints", exclude=[ckpt])
        hint = (f"the newest valid checkpoint is {alt[0]} (step {int(alt[1].get('global_step', 0))}): resume from it "
                f"with --resume {run_dir} --ckpt {alt[0]}" if alt else f"no valid checkpoint in {run_dir / 'checkpoints'}")
        raise CheckpointError(f"--resume: {e}; {hint}") from None
    job = make_job(cfg, run_dir)
    check_state_dict(job.model, state, ckpt)
    print(f"Resuming {run_dir} from {ckpt} (step {int(state.get('global_step', 0))})")
    # Lightning warns about a non-empty checkpoint directory; a resumed run's directory holds its checkpoints
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def keep_old_config() -> None:  # explicit change: keep the config the run was trained with beside the new one
        if not diff:
            return
        n = len(list(run_dir.glob("config.before_resume_*.yaml")))
        atomic_write_text(run_dir / f"config.before_resume_{n}.yaml", saved_path.read_text(encoding="utf-8"))
        print(f"Config changed on resume ({format_diff(diff)}); the previous one is kept as "
              f"{run_dir / f'config.before_resume_{n}.yaml'}")

    return _fit(job, cfg, str(ckpt), int(state.get("global_step", 0)), before_start=keep_old_config)


def _load_for_eval(args: argparse.Namespace, command: str, stack: contextlib.ExitStack) -> tuple[Job, Optional[str]]:
    """The job and checkpoint of ``validate``/``test``/``eval``: a run directory (its best, else last
    checkpoint, or ``--ckpt``), a checkpoint file inside a run, a config file with ``--ckpt``, or a config
    with ``--untrained`` (a fresh model, for baselines; written to a new run directory)."""
    target = Path(args.config)
    explicit = args.ckpt
    if target.suffix == ".ckpt":
        if args.ckpt:
            raise UserError(f"{command}: give the checkpoint either as the target or with --ckpt, not both")
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{command}: {target}: no config.yaml in the run directory {run_dir}; give the run directory "
                            "or a config file with --ckpt")
        config_path, explicit = run_dir / "config.yaml", str(target)
    else:
        config_path, run_dir = resolve_target(args.config)
    if args.untrained and explicit:
        raise UserError(f"{command}: --untrained evaluates a fresh model; it takes no checkpoint")
    if run_dir is None and not explicit and not args.untrained:
        raise UserError(f"{command}: {config_path} is a config file, not a trained run: give a run directory or a "
                        "checkpoint (.ckpt), add --ckpt PATH, or pass --untrained to evaluate a freshly initialised "
                        "model")
    cfg = load_config(config_path, args.overrides)
    ckpt = None if args.untrained else find_checkpoint(run_dir, explicit)
    state = read_checkpoint(ckpt) if ckpt else None
    fresh = run_dir is None or args.untrained
    if fresh:  # results of a config + checkpoint or an untrained model: a new run
        run_dir = stack.enter_context(new_run_dir(output_root(cfg)))
    job = make_job(cfg, run_dir)
    if state is not None:
        check_state_dict(job.model, state, ckpt)
    if fresh:
        from contrastive.config.loader import save_resolved
        from omegaconf import OmegaConf

        save_resolved(OmegaConf.create(cfg), run_dir / "config.yaml")
    if args.untrained:
        print(f"Evaluating an untrained model (--untrained); results in {run_dir}")
    return job, ckpt


def eval_log_dir(run_dir: Path, command: str) -> Path:
    """Logs of validate/test/eval go beside the training logs, never over them."""
    root = run_dir / "eval"
    return root / f"{command}_{len(list(root.glob(f'{command}_*')))}"


def cmd_validate(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        job, ckpt = _load_for_eval(args, "validate", stack)
        trainer = job.trainer(log_dir=eval_log_dir(job.run_dir, "validate"))
        trainer.validate(job.model, datamodule=job.datamodule, ckpt_path=ckpt, verbose=False)
        print(json.dumps(job.model.last_metrics, indent=2, sort_keys=True))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        job, ckpt = _load_for_eval(args, "test", stack)
        trainer = job.trainer(log_dir=eval_log_dir(job.run_dir, "test"))
        job.datamodule.setup("test")
        trainer.test(job.model, datamodule=job.datamodule, ckpt_path=ckpt, verbose=False)
        print(json.dumps(job.model.last_metrics, indent=2, sort_keys=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        job, ckpt = _load_for_eval(args, "eval", stack)
        evaluate(job, job.trainer(log_dir=eval_log_dir(job.run_dir, "eval")), ckpt)
    return 0


def _check_out(out: Path) -> None:
    """Fail before mining when ``--out`` cannot be written; the message names the user's path."""
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name such as {out / 'mined.npz'}")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {parent} (permission denied)")


def cmd_mine(args: argparse.Namespace) -> int:
    """Mine negatives once with the config's sampler and write the table (format:
    :mod:`contrastive.samplers.table`) and its quality report (``<out stem>.report.{json,png}``)."""

    from contrastive.callbacks import config_fingerprint
    from contrastive.callbacks.refresh import datamodule_rows, refresh_or_load
    from contrastive.callbacks.report import NegativeQualityReport
    from contrastive.samplers.table import CorpusSampler, utc_now

    config_path, run_dir = resolve_target(args.config)
    cfg = load_config(config_path, args.overrides)
    if cfg.get("task") is not None:
        raise UserError(f"'mine' is not available for task '{cfg['task']}' (it mines a negative sampler's table)")
    user_out = Path(args.out) if args.out else None
    if user_out is not None:
        _check_out(user_out)
    ckpt = args.ckpt or (find_checkpoint(run_dir, None) if run_dir is not None and (run_dir / "checkpoints").is_dir()
                         and any((run_dir / "checkpoints").glob("*.ckpt")) else None)
    state = read_checkpoint(ckpt) if ckpt else None
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = stack.enter_context(new_run_dir(output_root(cfg)))
        job = make_job(cfg, run_dir)
        sampler = job.sampler
        name = (cfg.get("sampler") or {}).get("name", "in_batch") if isinstance(cfg.get("sampler"), dict) else cfg.get("sampler")
        if not isinstance(sampler, CorpusSampler):
            raise UserError(f"sampler '{name}' mines no negatives (in-batch / queue); choose sampler=bm25, random, "
                            "faiss_hard or ngame")
        if state is not None:
            check_state_dict(job.model, state, ckpt)
        if not sampler.is_setup:
            raise UserError(f"the datamodule '{(cfg.get('data') or {}).get('name')}' did not set the sampler up on "
                            "its training rows (attach_sampler in its setup('fit'))")
        out = user_out or run_dir / "negatives" / "mined.npz"
        step, epoch, stats = 0, 0, {}
        if sampler.needs_model:
            if state is not None:
                job.model.load_state_dict(state["state_dict"])
                step, epoch = int(state.get("global_step", 0)), int(state.get("epoch", 0))
                print(f"Mining with {ckpt} (step {step})")
            else:
                print("Mining with the initial (untrained) weights: pass --ckpt or a run directory for a trained model")
            epoch = max(epoch, sampler.first_refresh_epoch)  # NGAME: cluster at the curriculum size of that epoch
            sampler.set_epoch(epoch)
            table, stats, _, _ = refresh_or_load(sampler, job.model, datamodule_rows(job.datamodule), step, None,
                                                 config_fingerprint(cfg), progress=True, write=False)
        elif sampler.mined_table() is not None:
            table = sampler.mined_table()
            stats = dict(table.header.get("stats") or {})
        else:
            table = sampler.mine_all()
            if table is not None:
                table.header.update({"sampler": {"name": name, "settings": sampler.settings()}, "checkpoint": None,
                                     "corpus": {"size": sampler.num_rows, "fingerprint": sampler.corpus_fingerprint()},
                                     "created": utc_now(), "stats": {}})
        if table is None:
            raise UserError(f"sampler '{name}' produced no table to write")
        table.header.setdefault("key", None)
        table.header["info"] = {**(table.header.get("info") or {}), "config": str(config_path), "command": "mine"}
        try:
            table.save(out)
            metrics = NegativeQualityReport().write(table, step, out.parent, name=f"{out.stem}.report")
        except OSError as e:
            raise UserError(f"--out {out}: cannot write the mined table: {e.strerror or type(e).__name__}") from None
        keep_run_dir(run_dir)
    print(f"Mined {table.query_rows.shape[0]} x {table.num_negatives} negatives with sampler '{name}' -> {out}")
    for key in ("negatives/before/dup_fraction", "negatives/after/dup_fraction", "negatives/after/mean_score",
                "negatives/after/mean_margin", "negatives/after/frac_above_positive", "negatives/short_fraction"):
        if key in metrics:
            print(f"  {key}: {metrics[key]:.4f}")
    print(f"Report: {out.parent / (out.stem + '.report.json')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a trained run in its setting's own format through the model's ``export(out_dir)`` (clip: an
    open_clip checkpoint and its model config). The files are written into a temporary folder beside
    ``--out`` (default ``RUN_DIR/export``), which is renamed to ``--out`` once complete; an existing
    ``--out`` is an error, never overwritten."""
    import shutil
    import tempfile

    from contrastive.registry import MODELS

    config_path, run_dir = resolve_target(args.config)
    if run_dir is None:
        raise UserError(f"export: {args.config} is not a run directory (give runs/<experiment>/version_<n>)")
    cfg = load_config(config_path, args.overrides)
    spec = cfg.get("model") or {}
    name = spec if isinstance(spec, str) else spec.get("name")
    model_cls = MODELS.get(name)
    if not callable(getattr(model_cls, "export", None)):
        raise UserError(f"export: model '{name}' ({model_cls.__name__}) has no export format; only settings whose "
                        "module defines export() can be exported (e.g. model: clip)")
    out = Path(args.out) if args.out else run_dir / "export"
    if out.exists():
        raise UserError(f"export: {out} already exists; remove it or give another --out")
    ckpt = find_checkpoint(run_dir, args.ckpt)
    assert ckpt is not None
    state = read_checkpoint(ckpt)
    job = Job(cfg, run_dir)
    check_state_dict(job.model, state, ckpt)
    job.model.load_state_dict(state["state_dict"])
    job.model.eval()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise UserError(f"export: cannot write in {out.parent}: {e.strerror or type(e).__name__}") from None
    try:
        written = job.model.export(str(tmp))
        if out.exists():
            raise UserError(f"export: {out} appeared while exporting; remove it or give another --out")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"Exported {ckpt} (step {int(state.get('global_step', 0))}) -> {out}")
    for key, path in sorted((written or {}).items()):
        print(f"  {key}: {out / Path(path).name}")
    return 0


COMMANDS = {"fit": cmd_fit, "validate": cmd_validate, "test": cmd_test, "eval": cmd_eval, "mine": cmd_mine,
            "export": cmd_export}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="contrastive", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("fit", "train (then test) a model"), ("validate", "validate a checkpoint"),
                        ("test", "test a checkpoint"), ("eval", "test a checkpoint and the BM25 baseline"),
                        ("mine", "mine negatives once with the config's sampler; write the table and a report"),
                        ("export", "write a trained run in its setting's format (clip: an open_clip checkpoint)")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", metavar="RUN_DIR" if name == "export" else "config",
                        help="a run directory" if name == "export" else "experiment YAML, a run's config.yaml, a run "
                        "directory" + (" or a checkpoint" if name in ("validate", "test", "eval") else ""))
        sp.add_argument("overrides", nargs="*", help="key=value or group=name")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == "fit":
            sp.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                            help="resume from last.ckpt of RUN_DIR (default: the experiment's latest run)")
            sp.add_argument("--ckpt", default=None, help="with --resume: resume from this checkpoint instead")
            sp.add_argument("--allow-config-change", action="store_true",
                            help="with --resume: accept a config that differs from the run's saved one (the old "
                                 "one is kept as config.before_resume_<n>.yaml)")
        else:
            sp.add_argument("--ckpt", default=None, help="checkpoint (default: the run's best, then last)")
        if name in ("validate", "test", "eval"):
            sp.add_argument("--untrained", action="store_true",
                            help="evaluate a freshly initialised model (a baseline) instead of a checkpoint")
        if name == "mine":
            sp.add_argument("--out", default=None, metavar="FILE",
                            help="mined table .npz (default: <run dir>/negatives/mined.npz)")
        if name == "export":
            sp.add_argument("--out", default=None, metavar="DIR",
                            help="export folder, must not exist yet (default: <run dir>/export)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    # OpenMP threads that spin while waiting make small CPU models several times slower whenever another
    # process shares the cores (measured: 3.4 s vs 0.6 s per training step on 2 shared cores); sleeping
    # waits cost nothing measurable on an idle machine. Only effective before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = parser()
    args, unknown = p.parse_known_args(argv)
    # overrides may follow options (``fit cfg.yaml --resume run/ loss.temperature=0.1``)
    stray = [u for u in unknown if "=" not in u or u.startswith("-")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*getattr(args, "overrides", []), *unknown]
    target = getattr(args, "config", "")
    if "=" in target and not Path(target).exists():  # ``contrastive fit =3``: an override, not a file name
        print(f"contrastive: error: {target!r} looks like an override (key=value), not a config file or run "
              f"directory; usage: contrastive {args.command} CONFIG [key=value ...]", file=sys.stderr)
        return EXIT_USER_ERROR
    debug = args.debug or os.environ.get("CONTRASTIVE_DEBUG") == "1"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("contrastive: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; the traceback with --debug
        if debug:
            raise
        from contrastive.config.errors import ConfigError

        kind = "config error" if isinstance(e, ConfigError) else "error"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"contrastive: {kind}: {msg} [{type(e).__name__}; rerun with --debug for the traceback]", file=sys.stderr)
        return EXIT_USER_ERROR if isinstance(e, (ConfigError, UserError, FileNotFoundError, KeyError)) else 1


if __name__ == "__main__":
    sys.exit(main())
