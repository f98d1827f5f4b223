"""Exact resume: step checkpoints and the training state Lightning does not save by itself.

Lightning restores the model (with the memory queue and a learnable temperature, which live in it), the
optimiser, the scheduler, the loop counters and the callbacks' states. :class:`ResumeStateCallback` adds
what else a training step depends on:

- the Python, NumPy and torch (CPU and CUDA) random states, restored right where the interrupted run
  would have continued: before the first batch after a mid-epoch checkpoint, at the start of training after
  an end-of-epoch one (so that the next epoch's dataloader and refresh draw the same numbers);
- the position in the epoch: the batch sampler skips the batches already trained on (its order is a
  function of ``(seed, epoch)``, see :class:`contrastive.data.resumable.ShuffleBatchSampler` and
  :class:`contrastive.samplers.collate.SamplerBatchSampler`);
- the negative sampler's own state (``sampler.state_dict()``; the mined table in use is restored by
  :class:`~contrastive.callbacks.refresh.NegativeRefreshCallback` from its cache).

:class:`StepCheckpoint` writes ``checkpoints/last.ckpt`` every ``every_n_steps`` optimiser steps and at
every epoch end, and keeps the newest ``keep`` step checkpoints as ``step-<n>.ckpt`` (the fallback when
``last.ckpt`` is damaged). Writes are atomic with :func:`contrastive.runs.atomic_checkpoint_io`.
"""
from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("contrastive")

STATE_KEY = "contrastive_resume"


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch random states (CUDA states when CUDA is initialised)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _rng_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    """Random states as tensors and plain containers (loadable with ``torch.load(weights_only=True)``)."""
    py = state["python"]
    np_state = state["numpy"]
    out = {"python": [py[0], torch.tensor(py[1], dtype=torch.int64), py[2]],
           "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), int(np_state[2]),
                     int(np_state[3]), float(np_state[4])],
           "torch": state["torch"]}
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _rng_from_plain(state: dict[str, Any]) -> dict[str, Any]:
    py = state["python"]
    np_state = state["numpy"]
    out = {"python": (int(py[0]), tuple(int(x) for x in py[1].tolist()), py[2]),
           "numpy": (np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]),
           "torch": state["torch"]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _batches_done(trainer: Any) -> int:
    """Training batches of the current epoch whose step has run (also inside ``on_train_batch_end``)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.processed)


class ResumeStateCallback(Callback):
    """Save and restore the random states, the epoch position and the sampler state (module docstring).

    Args:
        sampler: the negative sampler (its ``state_dict``/``load_state_dict`` are called), or ``None``.
    """

    def __init__(self, sampler: Any = None) -> None:
        self.sampler = sampler
        self._pending: Optional[dict[str, Any]] = None

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        done = _batches_done(trainer)
        finished = done >= int(trainer.num_training_batches) if trainer.num_training_batches != float("inf") else False
        state: dict[str, Any] = {"epoch": int(trainer.current_epoch), "batches_done": done,
                                 "epoch_finished": bool(finished), "rng": _rng_to_plain(rng_state())}
        if self.sampler is not None and callable(getattr(self.sampler, "state_dict", None)):
            state["sampler"] = self.sampler.state_dict()
        checkpoint[STATE_KEY] = state

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is None:
            log.warning("resume: the checkpoint holds no random-state or data-position record (written by an older "
                        "version); the resumed run will not repeat the interrupted one exactly")
            return
        if self.sampler is not None and "sampler" in state and callable(getattr(self.sampler, "load_state_dict", None)):
            self.sampler.load_state_dict(state["sampler"])
        self._pending = dict(state)
        # Lightning warns that a mid-epoch resume is unreliable unless the dataloader itself is stateful;
        # here the batch sampler skips the trained batches (on_train_start), so the warning does not apply
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        state = self._pending
        if state is None:
            return
        if state["epoch_finished"] or trainer.current_epoch != state["epoch"]:
            # an end-of-epoch checkpoint: the next epoch starts with the random state of that moment
            set_rng_state(_rng_from_plain(state["rng"]))
            self._pending = None
            return
        # mid-epoch (Lightning calls no on_train_epoch_start then): skip the batches already trained on
        loader = trainer.train_dataloader
        batch_sampler = getattr(loader, "batch_sampler", None)
        if not callable(getattr(batch_sampler, "skip_next", None)):
            raise RuntimeError(f"resume: the training dataloader's batch sampler ({type(batch_sampler).__name__}) "
                               "cannot skip the batches already trained on (no skip_next); cannot resume mid-epoch")
        batch_sampler.skip_next(int(state["batches_done"]))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:  # mid-epoch: continue with the random state after the last step
            set_rng_state(_rng_from_plain(self._pending["rng"]))
            self._pending = None


class StepCheckpoint(Callback):
    """Write ``last.ckpt`` every ``every_n_steps`` optimiser steps and at each epoch end; keep the newest
    ``keep`` step checkpoints as ``step-<global step>.ckpt``.

    Args:
        dirpath: the run's ``checkpoints`` directory.
        every_n_steps: steps between checkpoints (``None``: only at epoch ends).
        keep: step checkpoints kept besides ``last.ckpt`` (0: none).
    """

    def __init__(self, dirpath: str | Path, every_n_steps: Optional[int] = None, keep: int = 1) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or int(every_n_steps) < 1):
            raise ValueError(f"run.checkpoint_every_n_steps must be a positive integer or null; got {every_n_steps!r}")
        if int(keep) < 0:
            raise ValueError(f"run.keep_step_checkpoints must be >= 0; got {keep!r}")
        self.dirpath, self.every_n_steps, self.keep = Path(dirpath), every_n_steps, int(keep)
        self._last_saved_step: Optional[int] = None

    def _save(self, trainer: Any, step_copy: bool) -> None:
        step = int(trainer.global_step)
        trainer.save_checkpoint(str(self.dirpath / "last.ckpt"))
        self._last_saved_step = step
        if step_copy and self.keep:
            trainer.save_checkpoint(str(self.dirpath / f"step-{step}.ckpt"))
            olds = sorted(self.dirpath.glob("step-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))
            for p in olds[:-self.keep]:
                p.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_saved_step:
            if _batches_done(trainer) < int(trainer.num_training_batches):  # the epoch end saves the last batch
                self._save(trainer, step_copy=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._save(trainer, step_copy=False)
