"""Training images per second of the clip setting's Lightning step against a bare torch loop.

Both paths train the same open_clip model (same initial weights, ``--arch``, default ``clip-tiny`` at
64×64 pixels) with the same loss object type (:class:`~contrastive.losses.InfoNCELoss`, text→image, its
temperature open_clip's ``logit_scale``) and the same AdamW settings and schedule
(:class:`~contrastive.models.optim.OptimizerSettings`) on the same batch of ``--batch`` image–caption
pairs (generated scenes, preprocessed once), repeated ``--steps`` times:

- **lightning**: :class:`~datamodules.clip.model.ClipModule` through ``lightning.Trainer.fit`` (the
  clip batch dict → the core's batch contract → candidate assembler → loss → logging → optimiser and
  scheduler step), without logger, checkpointing or progress bar;
- **bare**: ``model.encode_image`` / ``model.encode_text`` (normalised), the loss on the two embedding
  matrices, ``backward()``, ``optimizer.step()``, ``scheduler.step()``, ``zero_grad()``.

Timing: wall clock (``time.perf_counter``) and this process's CPU time (``time.process_time``, which other
jobs on a shared machine do not inflate; with one thread it is the work done) from the end of step
``--warmup`` to the end of the last step, so Lightning's work between steps is included; images/s =
``(steps - warmup) * batch / seconds``. The two
paths alternate ``--repeats`` times in one process (bare first), each from a fresh copy of the initial
weights; the table gives the median of each path and clock, and the ratio lightning / bare of the medians
and of each adjacent pair (target ≥ 0.9). Threads: ``--threads`` (default 1, as a shared 2-core machine gives
unstable multi-threaded timings).

Usage::

    python benchmarks/clip_step.py                        # batch 64, 30 steps (5 warm-up), 3 repeats
    python benchmarks/clip_step.py --batch 8 --steps 3 --warmup 1 --repeats 1   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Any


PATHS = ("bare", "lightning")
CLOCKS = ("wall", "cpu")


def make_batch(towers: Any, batch: int, seed: int) -> dict[str, Any]:
    """One paired clip batch dict (:class:`~datamodules.clip.datamodule.ClipCollate`'s form, captions as
    anchors) of ``batch`` generated scenes, each with its first caption, preprocessed for the model."""
    import open_clip
    import torch
    from PIL import Image

    from datamodules.clip.loaders import image_transform
    from datamodules.clip.scenes import SceneSettings, build_scene_corpus

    pre = towers.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    split = build_scene_corpus(SceneSettings(n_train=batch, n_valid=0, n_test=0, n_zeroshot=0, image_size=size,
                                             seed=seed), use_cache=False)["train"]
    transform = image_transform(size, pre.get("mean", open_clip.OPENAI_DATASET_MEAN),
                                pre.get("std", open_clip.OPENAI_DATASET_STD))
    ids = towers.tokenizer([caps[0] for caps in split.captions])
    ar = torch.arange(batch)
    return {"a_ids": ids, "a_mask": ids != 0, "a_id": ar, "a_label": ar, "a_group": ar,
            "c_pixels": torch.stack([transform(Image.fromarray(im)) for im in split.images]), "c_id": ar,
            "c_label": ar, "c_group": ar, "paired": True, "skipped": 0}


def loader(batch: dict, steps: int) -> Any:
    """The batch ``steps`` times, as a DataLoader (both paths read it the same way)."""
    from torch.utils.data import DataLoader

    return DataLoader([batch] * steps, batch_size=None)


class Timer:
    """Times steps ``warmup + 1 .. steps`` (the clocks start when step ``warmup`` ends): wall clock and
    this process's CPU time."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.done = warmup, 0
        self.start = self.end = (0.0, 0.0)

    def step_done(self) -> None:
        self.done += 1
        now = (time.perf_counter(), time.process_time())
        if self.done == self.warmup:
            self.start = now
        self.end = now

    def seconds(self) -> tuple[float, float]:
        """``(wall, cpu)`` seconds of the timed steps."""
        return self.end[0] - self.start[0], self.end[1] - self.start[1]


def run_lightning(module: Any, batch: dict, steps: int, warmup: int) -> tuple[float, float]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    timer = Timer(warmup)

    class StepClock(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            timer.step_done()

    trainer = L.Trainer(max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[StepClock()], accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=loader(batch, steps))
    assert timer.done == steps, (timer.done, steps)
    return timer.seconds()


def run_bare(module: Any, batch: dict, steps: int, warmup: int) -> tuple[float, float]:
    """The same model, loss, optimiser settings and batch in a plain loop (no Lightning, no core module)."""
    model, loss_fn = module.towers.model, module.loss_fn
    cfg = module.optimizer_settings.configure(module, steps)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    model.train()
    timer = Timer(warmup)
    for b in loader(batch, steps):
        img = model.encode_image(b["c_pixels"], normalize=True)
        txt = model.encode_text(b["a_ids"], normalize=True)
        loss = loss_fn(txt, img).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        timer.step_done()
    return timer.seconds()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="clip-tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 0 < args.warmup < args.steps:
        p.error("need 0 < --warmup < --steps")

    import logging

    import torch

    from contrastive.losses import InfoNCELoss
    from datamodules.clip.model import ClipModule

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    initial = ClipModule(InfoNCELoss(), architecture=args.arch, lr=1e-3, warmup_steps=args.warmup)
    batch = make_batch(initial.towers, args.batch, args.seed)
    rates: dict[tuple[str, str], list[float]] = {(p, c): [] for p in PATHS for c in CLOCKS}
    timed = (args.steps - args.warmup) * args.batch
    for _ in range(args.repeats):
        for name, run in (("bare", run_bare), ("lightning", run_lightning)):
            module = copy.deepcopy(initial)
            for clock, seconds in zip(CLOCKS, run(module, batch, args.steps, args.warmup)):
                rates[name, clock].append(timed / seconds)
    print(f"clip step: {args.arch}, batch {args.batch}, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.repeats} repeats, {args.threads} thread(s), torch {torch.__version__}")
    print("| path | clock | images/s (median) | images/s (each repeat) |")
    print("|---|---|---|---|")
    for clock in CLOCKS:
        for name in PATHS:
            r = rates[name, clock]
            print(f"| {name} | {clock} | {statistics.median(r):.1f} | {', '.join(f'{v:.1f}' for v in r)} |")
    for clock in CLOCKS:
        bare, light = rates["bare", clock], rates["lightning", clock]
        pairs = [lt / b for b, lt in zip(bare, light)]
        print(f"ratio lightning / bare ({clock}): {statistics.median(light) / statistics.median(bare):.3f} of the "
              f"medians; per pair {', '.join(f'{r:.3f}' for r in pairs)} (median {statistics.median(pairs):.3f}); "
              "target >= 0.9")


if __name__ == "__main__":
    main()
