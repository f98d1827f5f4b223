"""Run directories that failed commands never damage: checkpoint checks, config diffs, rollback of a new
run directory, an atomic CSV metrics log and atomic checkpoint writes.

The CLI (``contrastive.cli``) validates and loads everything a command needs before it writes anything
to a run directory:

- :func:`read_checkpoint` loads a checkpoint or raises :class:`CheckpointError` naming the file and what is
  wrong (missing, empty, truncated, not a checkpoint, no ``state_dict``);
- :func:`check_state_dict` compares a checkpoint's weights with the model built from the config and names
  the first differing keys with both shapes;
- :func:`config_diff` lists the dotted keys in which a resume's config differs from the run's saved one;
- :func:`new_run_dir` creates ``version_<n>`` and removes it again when the command fails before the run
  started (no orphan directory holding only ``config.yaml``);
- :class:`RunCSVLogger` writes ``metrics.csv`` atomically (temp file + ``os.replace``), continues the rows
  of the run it resumes (dropping those logged after the resumed checkpoint) and never warns that a
  non-empty run directory's logs "will be deleted";
- :class:`AtomicCheckpointIO` writes every checkpoint to a temp file first, so a kill during a save leaves
  the previous checkpoint intact.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from contrastive.io import atomic_write, atomic_write_text


class UserError(Exception):
    """An error in the user's command, config or data (printed as one line, exit status 2)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a Lightning checkpoint on the CPU, or raise :class:`CheckpointError` saying what is wrong.

    Tensors and plain containers are unpickled first (``torch.load(weights_only=True)``; the checkpoints this
    project writes need nothing else); a checkpoint holding other objects is then loaded fully."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found" + (" (it is a directory)" if p.is_dir() else ""))
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p}: empty checkpoint file (0 bytes; truncated by an interrupted save?)")
    with open(p, "rb") as f:
        head = f.read(4)
    is_zip = head.startswith(b"PK")
    if is_zip and not zipfile.is_zipfile(p):
        raise CheckpointError(f"{p}: truncated checkpoint ({size} bytes; the zip archive has no central directory, "
                              "so the save was interrupted)")
    if not is_zip and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise CheckpointError(f"{p}: not a checkpoint (a torch checkpoint is a zip archive; this file starts with "
                              f"{head!r})")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{p}: truncated checkpoint ({size} bytes): {type(e).__name__}") from None
    except pickle.UnpicklingError:
        # other pickled objects (a callback's or a module's custom state): the file is the user's own run,
        # so load it fully, as Lightning does; what still fails is not a checkpoint
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001 - any unpickling failure means the same to the user
            first = str(e2).strip().splitlines()[0] if str(e2).strip() else type(e2).__name__
            raise CheckpointError(f"{p}: not a checkpoint (cannot unpickle it: {first[:160]})") from None
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "truncated or corrupt checkpoint" if "zip" in msg.lower() or "archive" in msg.lower() else "unreadable checkpoint"
        raise CheckpointError(f"{p}: {kind} ({size} bytes): {msg[:200]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        keys = ", ".join(sorted(map(str, state))[:8]) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{p}: not a Lightning checkpoint (no 'state_dict'; found {keys})")
    return state


def state_dict_mismatch(model_state: dict, ckpt_state: dict, limit: int = 5) -> list[str]:
    """Human-readable differences between a model's ``state_dict`` and a checkpoint's, first ``limit`` of each
    kind: shape mismatches (``key: checkpoint (a, b) vs model (c, d)``), missing and unexpected keys."""
    shapes = [f"{k}: checkpoint {tuple(ckpt_state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in model_state.items()
              if k in ckpt_state and hasattr(ckpt_state[k], "shape") and tuple(ckpt_state[k].shape) != tuple(v.shape)]
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    out = []
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:limit]) + (" ..." if len(shapes) > limit else ""))
    if missing:
        out.append(f"{len(missing)} key(s) missing from the checkpoint: " + ", ".join(missing[:limit])
                   + (" ..." if len(missing) > limit else ""))
    if unexpected:
        out.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: " + ", ".join(unexpected[:limit])
                   + (" ..." if len(unexpected) > limit else ""))
    return out


def check_state_dict(model: Any, state: dict, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` when checkpoint ``state`` (from :func:`read_checkpoint`) does not fit
    ``model`` (an ``nn.Module``); the message lists the first differing keys with both shapes."""
    problems = state_dict_mismatch(model.state_dict(), state["state_dict"])
    if problems:
        raise CheckpointError(f"{path}: does not match the model built from the config: " + " | ".join(problems))


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first (by modification time, then name)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def newest_valid_checkpoint(ckpt_dir: Path, exclude: Sequence[Path] = ()) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint of ``ckpt_dir`` that loads (ordered by its ``global_step``, then modification
    time), with its contents; ``None`` when none does."""
    excluded = {Path(p).resolve() for p in exclude}
    best: Optional[tuple[tuple[int, int], Path, dict]] = None
    for p in checkpoint_candidates(ckpt_dir):
        if p.resolve() in excluded:
            continue
        try:
            state = read_checkpoint(p)
        except CheckpointError:
            continue
        key = (int(state.get("global_step", 0)), p.stat().st_mtime_ns)
        if best is None or key > best[0]:
            best = (key, p, state)
    return None if best is None else (best[1], best[2])


# ---------------------------------------------------------------------------------------------- configs
#: keys that change no trained number (what is printed or whether the test runs after fit); a resume may
#: change them without ``--allow-config-change``
RESUME_FREE_KEYS = ("run.test_after_fit", "trainer.enable_progress_bar", "eval.bm25_baseline")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def config_diff(old: dict, new: dict, ignore: Sequence[str] = RESUME_FREE_KEYS) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs (``<absent>`` for a missing key)."""
    a, b = _flatten(old), _flatten(new)
    missing = "<absent>"
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb and not (isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb)):
            out.append((k, va, vb))
    return out


def format_diff(diff: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    parts = [f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:limit]]
    return "; ".join(parts) + (f"; ... ({len(diff)} keys)" if len(diff) > limit else "")


# ---------------------------------------------------------------------------------------------- directories
def next_version_dir(root: Path) -> Path:
    versions = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return root / f"version_{max(versions, default=-1) + 1}"


@contextlib.contextmanager
def new_run_dir(root: Path) -> Iterator[Path]:
    """Create the next ``root/version_<n>`` and yield it; if the block raises, remove the directory again
    (it was created by this command, so nothing of another run is lost). Call :func:`keep_run_dir` from
    inside the block once the run has started: from then on a failure keeps what it wrote."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = next_version_dir(root)
        try:
            run_dir.mkdir()
            break
        except FileExistsError:  # another process took this version: try the next one
            continue
    _STARTED.discard(run_dir)
    try:
        yield run_dir
    except BaseException:
        if run_dir not in _STARTED:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        _STARTED.discard(run_dir)


_STARTED: set[Path] = set()


def keep_run_dir(run_dir: Path) -> None:
    """Mark a run directory as started: a later failure no longer removes it (:func:`new_run_dir`)."""
    _STARTED.add(run_dir)


def is_started(run_dir: Path) -> bool:
    """Whether training in ``run_dir`` has started in this process (:func:`keep_run_dir` was called)."""
    return run_dir in _STARTED


def snapshot(directory: Path) -> dict[str, bytes]:
    """``relative path -> sha256`` of every file under ``directory`` (to check a command changed nothing)."""
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- logging
def _metrics_writer_class() -> type:
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AtomicMetricsWriter(ExperimentWriter):
        """Lightning's CSV experiment writer, except that ``metrics.csv`` is rewritten whole and atomically
        on every save (a kill never leaves a half-written or header-less file), rows of the run being
        resumed are kept (those logged after step ``resume_step`` by the interrupted process are dropped:
        the resumed run logs them again), and an existing run directory is not reported as "will be
        deleted"."""

        resume_step: Optional[int] = None

        def __init__(self, log_dir: str, resume_step: Optional[int] = None) -> None:
            self.resume_step = resume_step
            super().__init__(log_dir)
            self.rows: list[dict[str, Any]] = []
            path = Path(self.metrics_file_path)
            if resume_step is not None and path.is_file():
                with open(path, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    self.metrics_keys = list(reader.fieldnames or [])
                    for row in reader:
                        step = row.get("step")
                        if step not in (None, "") and int(float(step)) >= resume_step:
                            continue
                        self.rows.append(row)

        def _check_log_dir_exists(self) -> None:  # no "previous log files will be deleted" warning
            return

        def save(self) -> None:
            if not self.metrics and (self.resume_step is None or not self.rows):
                return
            self._record_new_keys()
            self.rows.extend(self.metrics)
            self.metrics = []
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.metrics_keys, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write_text(self.metrics_file_path, buf.getvalue())

    return AtomicMetricsWriter


def run_csv_logger(save_dir: str, name: str, version: str, resume_step: Optional[int] = None) -> Any:
    """A Lightning ``CSVLogger`` writing ``<save_dir>/<name>/<version>/metrics.csv`` through the atomic
    writer above; with ``resume_step`` it continues the existing file."""
    from lightning.pytorch.loggers import CSVLogger

    writer_cls = _metrics_writer_class()

    class RunCSVLogger(CSVLogger):
        @property
        def experiment(self) -> Any:
            if self._experiment is None:
                os.makedirs(self.root_dir, exist_ok=True)
                self._experiment = writer_cls(self.log_dir, resume_step=resume_step)
            return self._experiment

    return RunCSVLogger(save_dir=save_dir, name=name, version=version)


def atomic_checkpoint_io() -> Any:
    """A Lightning ``CheckpointIO`` that saves each checkpoint to a temp file beside it and renames it into
    place, so an interrupted save never replaces a good ``last.ckpt`` with a truncated one."""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    return AtomicCheckpointIO()
