"""Re-mine negatives with the current model during training (ANCE-style refresh, methods.md §B7.4).

:class:`NegativeRefreshCallback` re-encodes the training corpus every N epochs or steps with the model
being trained (eval mode, no gradient, batched, with a progress bar), calls the sampler's
:meth:`~contrastive.samplers.base.NegativeSampler.refresh`, caches the mined table on disk, writes the
negative-quality report and logs the statistics. The table is used until the next refresh (ANCE: mined
with one checkpoint, used until newer data exists; here synchronously, so the staleness is at most the
refresh period).

When it refreshes
-----------------
- ``every_n_epochs``: at the start of epochs ``start_epoch, start_epoch + n, ...`` (``start_epoch=0``:
  also before the first batch, with the initial weights). A sampler that overrides ``should_refresh(epoch)``
  (NGAME's curriculum) decides the epochs itself.
- ``every_n_steps``: after every ``n``-th optimiser step. With dataloader workers the new table reaches
  them at the next epoch (workers hold a copy of the sampler); with ``num_workers=0`` from the next batch
  but one (Lightning prefetches one batch).

Cache and resume
----------------
Each refresh computes a key from the config fingerprint (sampler settings and context, training corpus,
tokenisation / config) and the checkpoint fingerprint (global step + hash of every model tensor); see
:mod:`contrastive.samplers.table`. If ``<cache_dir>/table-<key>.npz`` exists it is loaded instead of
re-mining: a run resumed from a checkpoint that reaches an already-mined refresh reuses it, and the
table in use when the checkpoint was written (its key is in the callback's checkpoint state) is
reinstalled at ``on_fit_start``, so a mid-epoch resume continues with the same negatives.

Distributed: every rank encodes a shard of the corpus, the embeddings are all-gathered, and every rank
mines the same table (mining is deterministic given the seed); only rank 0 writes files.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from contrastive.callbacks.report import NegativeQualityReport, log_metrics
from contrastive.samplers.base import NegativeSampler, SamplerData
from contrastive.samplers.table import (
    CorpusSampler,
    MinedTable,
    TableFileError,
    checkpoint_fingerprint,
    fingerprint,
    table_key,
)

log = logging.getLogger(__name__)

RowInputs = Callable[[Sequence[int], str], Mapping[str, Tensor]]
SIDES = ("anchor", "candidate")


# ---------------------------------------------------------------------------------------------- encoding
def _to(inputs: Mapping[str, Tensor], device: Optional[torch.device]) -> dict[str, Tensor]:
    return {k: torch.as_tensor(v).to(device) if device is not None else torch.as_tensor(v) for k, v in inputs.items()}


def encode_rows(model: Any, row_inputs: RowInputs, rows: Sequence[int], side: str, batch_size: int = 256,
                device: Optional[torch.device] = None, progress: bool = True) -> Tensor:
    """Embed training ``rows`` of ``side`` with ``model.encode(inputs, side)`` in batches, without
    gradient → ``(R, d)`` float32 on the CPU."""
    from tqdm.auto import tqdm

    rows = list(rows)
    out: list[Tensor] = []
    with torch.no_grad(), tqdm(total=len(rows), desc=f"refresh: encoding {side}s", disable=not progress,
                               leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            out.append(model.encode(_to(row_inputs(chunk, side), device), side).detach().float().cpu())
            bar.update(len(chunk))
    if not out:
        raise ValueError(f"negative refresh: no {side} rows to encode (empty training corpus)")
    return torch.cat(out)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ModelRowEncoder:
    """``encode(rows, side) -> (R, d)`` over a :class:`~contrastive.models.contrastive.ContrastiveModule`'s
    towers and a datamodule's :meth:`~contrastive.samplers.base.SamplerData.row_inputs`: the sampler-facing
    encoder of :meth:`~contrastive.samplers.base.NegativeSampler.refresh`.

    The model is put in eval mode for the duration of :meth:`run` (and restored); encoding runs without
    gradient on the model's device, with the rows split over ``torch.distributed`` ranks (rank ``r``
    encodes rows ``r, r + W, ...``) and all-gathered back into order.

    Args:
        model: exposes ``encode(inputs, side)``.
        row_inputs: ``(rows, side) -> tower inputs``.
        batch_size: rows per forward pass.
        progress: show tqdm progress bars.
    """

    def __init__(self, model: Any, row_inputs: RowInputs, batch_size: int = 256, progress: bool = True) -> None:
        self.model, self.row_inputs, self.batch_size, self.progress = model, row_inputs, int(batch_size), progress

    def _device(self) -> Optional[torch.device]:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else None

    def __call__(self, rows: Tensor, side: str) -> Tensor:
        if side not in SIDES:
            raise ValueError(f"side must be 'anchor' or 'candidate'; got {side!r}")
        rows_l = torch.as_tensor(rows).long().view(-1).tolist()
        world, rank = _world()
        device = self._device()
        if world == 1:
            return encode_rows(self.model, self.row_inputs, rows_l, side, self.batch_size, device, self.progress)
        import torch.distributed as dist

        from contrastive.distributed import gather_no_grad

        n = len(rows_l)
        mine = rows_l[rank::world]
        part = encode_rows(self.model, self.row_inputs, mine, side, self.batch_size, device,
                           self.progress and rank == 0) if mine else None
        dim = torch.tensor([part.shape[1] if part is not None else 0], device=device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
        if part is None:
            part = torch.zeros(0, int(dim.item()))
        gathered = gather_no_grad(part.to(device) if device is not None else part).cpu()
        out = torch.empty(n, gathered.shape[1])
        offset = 0
        for r in range(world):
            idx = torch.arange(r, n, world)
            out[idx] = gathered[offset:offset + idx.numel()]
            offset += idx.numel()
        return out

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(self, *args)`` with the model in eval mode, restoring it."""
        was_training = bool(self.model.training)
        self.model.eval()
        try:
            with torch.no_grad():
                return fn(self, *args)
        finally:
            self.model.train(was_training)


def datamodule_rows(datamodule: Any) -> RowInputs:
    """The datamodule's ``row_inputs`` (see :class:`~contrastive.samplers.base.SamplerData`)."""
    if not isinstance(datamodule, SamplerData):
        raise TypeError(f"negative refresh: the datamodule {type(datamodule).__name__} does not implement "
                        "row_inputs(rows, side) (contrastive.samplers.base.SamplerData); pass row_inputs=... to "
                        "NegativeRefreshCallback")
    return datamodule.row_inputs


# ---------------------------------------------------------------------------------------------- mining
def sampler_config_fingerprint(sampler: NegativeSampler, config_fingerprint: str = "") -> str:
    """Fingerprint of what a refresh mines, apart from the weights: sampler class, settings and context,
    the training corpus and the caller's config fingerprint (tokenisation, model config)."""
    settings, context, corpus = {}, {}, None
    if isinstance(sampler, CorpusSampler):
        settings, context, corpus = sampler.settings(), sampler.cache_context(), sampler.corpus_fingerprint()
    return fingerprint({"sampler": type(sampler).__name__, "settings": settings, "context": context, "corpus": corpus,
                        "config": config_fingerprint})


def refresh_or_load(sampler: NegativeSampler, model: Any, row_inputs: RowInputs, step: int, cache_dir: Optional[Path],
                    config_fingerprint: str = "", batch_size: int = 256, progress: bool = True,
                    write: bool = True) -> tuple[Optional[MinedTable], dict[str, float], str, str]:
    """One refresh: load ``<cache_dir>/table-<key>.npz`` when it exists, else ``sampler.refresh`` with the
    model and save the table (``write``). Returns ``(table, stats, key, source)``, source ``"cache"`` or
    ``"mined"``."""
    cfg_fp = sampler_config_fingerprint(sampler, config_fingerprint)
    ckpt_fp = checkpoint_fingerprint(model, step)
    key = table_key(cfg_fp, ckpt_fp)
    path = None if cache_dir is None else Path(cache_dir) / f"table-{key}.npz"
    hit = path is not None and path.is_file()
    if _world()[0] > 1:  # every rank must take the same branch (mining runs collectives)
        import torch.distributed as dist

        decision = [hit]
        dist.broadcast_object_list(decision, src=0)
        hit = bool(decision[0])
    if hit:
        try:
            table = MinedTable.load(path, expected_key=key, expected_rows=sampler.num_rows)
            sampler.set_table(table)
            stats = {k: float(v) for k, v in (table.header.get("stats") or {}).items() if isinstance(v, (int, float))}
            log.info("negative refresh at step %d: reusing cached table %s", step, path)
            return table, stats, key, "cache"
        except (TableFileError, ValueError) as e:
            log.warning("negative refresh: ignoring unusable cached table %s (%s); re-mining", path, e)
    encoder = ModelRowEncoder(model, row_inputs, batch_size=batch_size, progress=progress)
    stats = encoder.run(sampler.refresh, int(step))
    table = sampler.mined_table()
    if table is not None:
        table.header.update(key=key, config_fingerprint=cfg_fp, checkpoint=ckpt_fp, stats=stats)
        if path is not None and write:
            table.save(path)
    return table, dict(stats or {}), key, "mined"


class NegativeRefreshCallback(Callback):
    """Refresh a model-dependent sampler (``faiss_hard``, ``ngame``) during training; see the module docstring.

    Args:
        sampler: the sampler (set up by the datamodule) whose ``refresh`` is called.
        row_inputs: ``(rows, side) -> tower inputs``; ``None`` = the trainer's datamodule's ``row_inputs``.
        every_n_epochs: refresh at the start of every n-th epoch from ``start_epoch`` (``None`` = never by
            epoch). Ignored when the sampler overrides ``should_refresh(epoch)`` (NGAME's curriculum).
        every_n_steps: refresh after every n-th optimiser step (``None`` = never by step).
        start_epoch: first epoch refreshed (0 = before training, with the initial weights).
        cache_dir: where tables are cached and reports written; ``None`` = ``<trainer.log_dir>/negatives``.
        batch_size: texts per forward pass when encoding.
        config_fingerprint: fingerprint of the config parts the sampler does not know (tokenisation,
            model); part of the cache key.
        report: write the negative-quality report at each refresh.
        use_cache: reuse cached tables (``False``: always re-mine, still writing them).
        progress_bar: show encoding progress.
    """

    def __init__(
        self,
        sampler: NegativeSampler,
        row_inputs: Optional[RowInputs] = None,
        every_n_epochs: Optional[int] = 1,
        every_n_steps: Optional[int] = None,
        start_epoch: int = 1,
        cache_dir: Optional[str] = None,
        batch_size: int = 256,
        config_fingerprint: str = "",
        report: bool = True,
        use_cache: bool = True,
        progress_bar: bool = True,
    ) -> None:
        for setting, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"NegativeRefreshCallback: {setting} must be a positive integer or None; got {v!r}")
        has_schedule = type(sampler).should_refresh is not NegativeSampler.should_refresh
        if every_n_epochs is None and every_n_steps is None and not has_schedule:
            raise ValueError("NegativeRefreshCallback: set every_n_epochs or every_n_steps (both are None)")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"NegativeRefreshCallback: start_epoch must be an integer >= 0; got {start_epoch!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"NegativeRefreshCallback: batch_size must be a positive integer; got {batch_size!r}")
        self.sampler, self.row_inputs = sampler, row_inputs
        self._own_schedule = has_schedule
        self.every_n_epochs, self.every_n_steps, self.start_epoch = every_n_epochs, every_n_steps, start_epoch
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.config_fingerprint = batch_size, config_fingerprint
        self.report = NegativeQualityReport() if report else None
        self.use_cache, self.progress_bar = bool(use_cache), bool(progress_bar)
        self.history: list[dict[str, Any]] = []
        self.last_key: Optional[str] = None
        self.last_step: Optional[int] = None
        self.last_epoch: Optional[int] = None
        self._resume_key: Optional[str] = None
        self._refreshed_epoch: Optional[int] = None
        self._checked_loader = False

    # -- schedule -----------------------------------------------------------------------------------
    def due_at_epoch(self, epoch: int) -> bool:
        """Whether a refresh is due at the start of ``epoch``."""
        if self._own_schedule:
            return bool(self.sampler.should_refresh(epoch))
        if self.every_n_epochs is None:
            return False
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.every_n_epochs == 0

    # -- hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.row_inputs is None:
            self.row_inputs = datamodule_rows(trainer.datamodule)
        if self.cache_dir is None:
            self.cache_dir = Path(trainer.log_dir or trainer.default_root_dir) / "negatives"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._resume_key is not None:
            path = self.cache_dir / f"table-{self._resume_key}.npz"
            try:
                if self.last_epoch is not None:
                    self.sampler.set_epoch(self.last_epoch)
                self.sampler.set_table(MinedTable.load(path, expected_key=self._resume_key,
                                                       expected_rows=self.sampler.num_rows))
                self.last_key = self._resume_key
                log.info("negative refresh: resumed with the cached table %s", path)
            except (TableFileError, ValueError) as e:
                log.warning("negative refresh: cannot reload the table in use at the checkpoint (%s); mining with "
                            "the resumed weights", e)
                self.refresh(trainer, pl_module, reason="resume")
            return
        if trainer.current_epoch == 0 and self.due_at_epoch(0):
            self.refresh(trainer, pl_module, reason="epoch")
            self._refreshed_epoch = 0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_loader(trainer)
        epoch = trainer.current_epoch
        if self._refreshed_epoch == epoch:
            return
        if self.due_at_epoch(epoch):
            self.refresh(trainer, pl_module, reason="epoch")
            self._refreshed_epoch = epoch

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.refresh(trainer, pl_module, reason="step")

    def state_dict(self) -> dict[str, Any]:
        return {"last_key": self.last_key, "last_step": self.last_step, "last_epoch": self.last_epoch,
                "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_key = state_dict.get("last_key")
        self.last_step, self.last_epoch = state_dict.get("last_step"), state_dict.get("last_epoch")
        self.history = list(state_dict.get("history") or [])
        # a run resumed inside an epoch that was already refreshed at its start must not refresh it again
        # (with the resumed weights); the next epoch's refresh is still due
        epochs = [h.get("epoch") for h in self.history if h.get("reason") in ("epoch", "resume")]
        self._refreshed_epoch = epochs[-1] if epochs else None

    # -- work ---------------------------------------------------------------------------------------
    def _check_loader(self, trainer: Any) -> None:
        if self._checked_loader:
            return
        self._checked_loader = True
        loader = getattr(trainer, "train_dataloader", None)
        workers = int(getattr(loader, "num_workers", 0) or 0)
        if workers and getattr(loader, "persistent_workers", False) and self.sampler.num_negatives > 0:
            raise RuntimeError(
                "negative refresh: the training dataloader uses persistent_workers=True with "
                f"num_workers={workers}; its workers keep the negatives they started with, so refreshed negatives "
                "would never be used. Set persistent_workers=False (or num_workers=0)."
            )
        if workers and self.every_n_steps:
            log.warning("negative refresh every %d steps with %d dataloader workers: a refreshed table reaches the "
                        "workers at the next epoch only", self.every_n_steps, workers)

    def refresh(self, trainer: Any, pl_module: Any, reason: str = "manual") -> dict[str, float]:
        """Refresh now (or reload the cached table for these weights); log and report. Returns the metrics."""
        if self.row_inputs is None or self.cache_dir is None:
            self.setup(trainer, pl_module, "fit")
        epoch, step = int(trainer.current_epoch), int(trainer.global_step)
        self.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        table, stats, key, source = refresh_or_load(
            self.sampler, pl_module, self.row_inputs, step, self.cache_dir if self.use_cache else None,
            self.config_fingerprint, self.batch_size, self.progress_bar and trainer.is_global_zero,
            write=trainer.is_global_zero,
        )
        if not self.use_cache and table is not None and trainer.is_global_zero:
            table.save(self.cache_dir / f"table-{key}.npz")
        seconds = time.perf_counter() - t0
        metrics = {f"refresh/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        metrics.update({"refresh/seconds": seconds, "refresh/from_cache": float(source == "cache"),
                        "refresh/epoch": float(epoch)})
        if self.report is not None and table is not None and trainer.is_global_zero:
            metrics.update(self.report.write(table, step, self.cache_dir,
                                             extra={"epoch": epoch, "reason": reason, "source": source}))
        log_metrics(trainer, metrics, step)
        self.last_key, self.last_step, self.last_epoch = key, step, epoch
        self.history.append({"epoch": epoch, "step": step, "key": key, "source": source, "reason": reason,
                             "seconds": round(seconds, 3)})
        log.info("negative refresh (%s) at epoch %d step %d: %s in %.1fs", reason, epoch, step, source, seconds)
        return metrics
