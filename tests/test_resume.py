"""Fault injection: a run killed with SIGKILL mid-epoch and resumed with ``--resume`` ends bit-identical to
the uninterrupted run (weights, optimiser, every logged metric), for in-batch, refreshed FAISS hard
negatives and the memory queue; a failed resume leaves the run directory byte-identical."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import final_state, tiny_codesearch

from contrastive.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "configs" / "codesearch" / "infonce.yaml"

SAMPLERS = {
    "in_batch": ["sampler=in_batch"],
    "faiss_hard": ["sampler=faiss_hard", "sampler.refresh_every_n_steps=5", "callbacks.refresh.progress_bar=false"],
    "queue": ["sampler=queue", "sampler.size=40"],
    "ngame": ["sampler=ngame", "callbacks.refresh.progress_bar=false"],
}
_REFERENCES: dict[str, Path] = {}


def tiny(cache: Path, out: Path) -> list[str]:
    return tiny_codesearch(cache, out)


KILLER = textwrap.dedent('''
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    import contrastive.cli as cli

    class Kill(Callback):  # SIGKILL right after optimiser step N (its step checkpoint, if any, is written)
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    make = cli.Job.trainer
    cli.Job.trainer = lambda self, callbacks_extra=(), **kw: make(self, callbacks_extra=[*callbacks_extra, Kill()], **kw)
    sys.exit(cli.main(sys.argv[1:]))
''')


def fit_killed(args: list[str], step: int) -> None:
    env = {**os.environ, "KILL_AT_STEP": str(step), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLER, "fit", str(EXP), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def run_dir(out: Path) -> Path:
    return out / "codesearch_infonce" / "version_0"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The uninterrupted run of a sampler (made once per module)."""
    def make(sampler: str) -> Path:
        if sampler not in _REFERENCES:
            out = tmp_path_factory.mktemp(f"ref_{sampler}")
            assert main(["fit", str(EXP), *tiny(cache, out), *SAMPLERS[sampler]]) == 0
            _REFERENCES[sampler] = run_dir(out)
        return _REFERENCES[sampler]
    return make


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_kill_mid_epoch_then_resume_is_bit_identical(sampler, cache, reference, tmp_path):
    """Steps 1-4 are epoch 0, 5-8 epoch 1; step checkpoints at 3 and 6, so killing after step 7 resumes
    from step 6, in the middle of epoch 1 (after a refresh at the start of the epoch and one at step 5 for
    faiss_hard; with a queue holding entries of both epochs)."""
    extra = SAMPLERS[sampler]
    killed = tmp_path / "killed"
    fit_killed([*tiny(cache, killed), *extra], step=7)
    assert not (run_dir(killed) / "results.json").exists()
    assert torch.load(run_dir(killed) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert main(["fit", str(EXP), *tiny(cache, killed), *extra, "--resume"]) == 0
    w_ref, opt_ref, rows_ref = final_state(reference(sampler))
    w_res, opt_res, rows_res = final_state(run_dir(killed))
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    for i in opt_ref:
        for k in opt_ref[i]:
            assert torch.equal(opt_ref[i][k], opt_res[i][k]), (i, k)
    drop = {"refresh/seconds", "refresh/from_cache"}  # wall time; the resumed run may reuse a cached table
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(rows_res) == strip(rows_ref)  # every logged loss and validation metric, in order
    assert any(r.get("val/mrr") for r in rows_ref)


def test_kill_in_first_epoch_resumes_from_the_step_checkpoint(cache, reference, tmp_path):
    killed = tmp_path / "killed"
    fit_killed([*tiny(cache, killed), *SAMPLERS["in_batch"]], step=4)  # dies after step 4 (before its epoch-end checkpoint)
    assert torch.load(run_dir(killed) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert main(["fit", str(EXP), *tiny(cache, killed), *SAMPLERS["in_batch"], "--resume"]) == 0
    (w_ref, _, rows_ref), (w_res, _, rows_res) = final_state(reference("in_batch")), final_state(run_dir(killed))
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    assert rows_res == rows_ref


def test_batch_samplers_skip_the_trained_batches_and_keep_their_length():
    from contrastive.data.resumable import ShuffleBatchSampler
    from contrastive.samplers.collate import SamplerBatchSampler

    for make in (lambda: ShuffleBatchSampler(50, 8, seed=3), lambda: SamplerBatchSampler(None, 50, 8, seed=3, drop_last=True)):
        sampler = make()
        epoch0 = list(sampler)
        sampler.set_epoch(2)
        full = list(sampler)
        assert len(full) == len(sampler) == 6 and full != epoch0
        assert list(make()) == epoch0  # a function of (seed, epoch) only
        sampler.skip_next(4)
        assert list(sampler) == full[4:] and len(sampler) == 6
        assert list(sampler) == full  # the skip applies to one iteration only
