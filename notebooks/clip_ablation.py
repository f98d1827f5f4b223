# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Hard-negative ablation for CLIP-style training
#
# Each row trains the open_clip towers of `configs/clip/<row>.yaml` on the generated compositional scenes
# (the embedded default) with `SEEDS` seeds; every row has the same corpus (`data.scenes.seed=0`, so the
# seeds vary the initialisation and the order, not the data), model and budget, and only the experiment
# file changes:
#
# | row | experiment |
# |---|---|
# | InfoNCE | `infonce` |
# | + random-word negative captions (control) | `neg_captions_random` |
# | + concreteness-guided negative captions | `neg_captions_concreteness` |
# | + negative images (re-rendered scenes) | `neg_images` |
# | + mined negatives with filters | `mined_filtered` |
# | + Cement-style loss | `cement` |
#
# Reported (mean ± std over seeds): text→image and image→text R@1 on the test split, zero-shot accuracy, the
# mean compositional accuracy and the accuracy per category; and for every row two paired randomization
# tests against the InfoNCE row over the test items (per item averaged over seeds): text→image R@1 per test
# caption, and compositional accuracy per compositional item (`*` p < 0.05, `**` p < 0.01). A plot shows
# the scores of true and perturbed captions for the seed-0 model of each row.
#
# `CONTRASTIVE_NOTEBOOK_SCALE=smoke` (used by `tests/test_notebooks.py`) trains on a few dozen scenes for two
# steps with 2 seeds; the default `full` uses the experiment files as they are (`CONTRASTIVE_NOTEBOOK_SEEDS`,
# default 3; `CONTRASTIVE_NOTEBOOK_EXPERIMENTS` picks the rows, the first is the baseline).

# %% tags=["parameters"]
import os

SCALE = os.environ.get("CONTRASTIVE_NOTEBOOK_SCALE", "full")  # "smoke" or "full"
OUT = os.environ.get("CONTRASTIVE_NOTEBOOK_OUT")  # runs directory; None = runs/notebooks/clip_ablation/<SCALE>
EXPERIMENTS = os.environ.get(
    "CONTRASTIVE_NOTEBOOK_EXPERIMENTS",
    "infonce,neg_captions_random,neg_captions_concreteness,neg_images,mined_filtered,cement").split(",")
SEEDS = int(os.environ.get("CONTRASTIVE_NOTEBOOK_SEEDS", "2" if SCALE == "smoke" else "3"))
# extra overrides for every run, space-separated (e.g. "trainer.max_epochs=8")
OVERRIDES = os.environ.get("CONTRASTIVE_NOTEBOOK_OVERRIDES", "").split()
# reuse a finished run in the runs directory whose saved config equals the one this notebook would run
# (same experiment, seed and overrides), so a table can be filled in over several sessions
REUSE = os.environ.get("CONTRASTIVE_NOTEBOOK_REUSE", "0") == "1"

# %%
import json
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import yaml

import contrastive
from contrastive.cli import load_config, main as contrastive_main, next_version_dir

if SCALE not in ("smoke", "full"):
    raise ValueError(f"CONTRASTIVE_NOTEBOOK_SCALE must be 'smoke' or 'full'; got {SCALE!r}")
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs" / "clip").is_dir()),
            Path(contrastive.__file__).resolve().parents[1])
RUNS = Path(OUT) if OUT else ROOT / "runs" / "notebooks" / "clip_ablation" / SCALE
RUNS.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(ROOT / "notebooks"))
from _ablation import finished_run, tested_table  # noqa: E402  (shared with the other ablation notebooks)

BUDGET = ["data.scenes.seed=0", f"run.output_dir={RUNS}", "trainer.enable_progress_bar=false", *OVERRIDES]
if SCALE == "smoke":
    BUDGET += [f"data.cache_dir={RUNS / 'cache'}", "data.scenes.n_train=32", "data.scenes.n_valid=8",
               "data.scenes.n_test=12", "data.scenes.n_zeroshot=6", "data.batch_size=16", "data.eval_batch_size=64",
               "trainer.max_epochs=1", "trainer.limit_train_batches=2", "optim.warmup_steps=1"]
print("budget:", " ".join(BUDGET))

# %% [markdown]
# ## Train and test each row

# %%
seed_runs: dict[str, list[Path]] = {}
for name in EXPERIMENTS:
    exp = ROOT / "configs" / "clip" / f"{name}.yaml"
    for seed in range(SEEDS):
        done = (finished_run(RUNS / f"clip_{name}", load_config(exp, [*BUDGET, f"seed={seed}"]),
                             required=("results.json", "test_items.json")) if REUSE else None)
        if done is not None:
            seed_runs.setdefault(name, []).append(done)
            print(f"{name} seed {seed}: reused {done}")
            continue
        run = next_version_dir(RUNS / f"clip_{name}")  # the directory `fit` is about to create
        t0 = time.time()
        with open(RUNS / f"{name}_seed{seed}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
            code = contrastive_main(["fit", str(exp), *BUDGET, f"seed={seed}"])
        assert code == 0, f"{name} (seed {seed}) failed; see {RUNS / f'{name}_seed{seed}.log'}"
        res = json.loads((run / "results.json").read_text())["test"]
        seed_runs.setdefault(name, []).append(run)
        print(f"{name} seed {seed}: t2i R@1 {res['t2i/R@1']:.4f}, comp {res['comp/mean']:.4f} "
              f"({time.time() - t0:.0f}s) {run}")

# %% [markdown]
# ## Tables
#
# Mean ± std over seeds. `Δ` and `p` compare each row with the first (InfoNCE) row by paired randomization
# tests over the test items: text→image R@1 per caption (1 if its image ranks first), and compositional
# accuracy per item (1 if the image scores its caption above the perturbed one), each averaged over seeds.
# `Δ comp` is the difference of the accuracy over all items, which weighs the categories by their item counts
# (`comp/mean` is the unweighted mean over categories).

# %%
metrics = {n: [json.loads((d / "results.json").read_text())["test"] for d in dirs] for n, dirs in seed_runs.items()}
items = {n: [json.loads((d / "test_items.json").read_text()) for d in dirs] for n, dirs in seed_runs.items()}
ref = items[EXPERIMENTS[0]][0]
for name, per_seed in items.items():  # every run is tested on the same captions and compositional items
    for it, d in zip(per_seed, seed_runs[name]):
        assert it["t2i/caption_id"] == ref["t2i/caption_id"] and it["comp/category"] == ref["comp/category"], d
per_item = {
    "t2i R@1": {n: [(np.asarray(it["t2i/rank"]) == 1).astype(float) for it in s] for n, s in items.items()},
    "comp": {n: [np.asarray(it["comp/correct"], dtype=float) for it in s] for n, s in items.items()},
}
KEYS = ["t2i/R@1", "i2t/R@1", "zeroshot/top1", "comp/mean"]
table, rows = tested_table(metrics, per_item, EXPERIMENTS[0], "row", KEYS, runs=seed_runs)
categories = list(dict.fromkeys(ref["comp/category"]))
cat_table, cat_rows = tested_table(metrics, {}, EXPERIMENTS[0], "row", [f"comp/{c}" for c in categories])
first = metrics[EXPERIMENTS[0]][0]
caption = (f"CLIP hard-negative ablation ({SCALE}): {SEEDS} seeds per row, `{' '.join(BUDGET)}`; "
           f"{int(first['num_images'])} test images, {int(first['num_captions'])} captions, "
           f"{int(first['comp/num_items'])} compositional items; chance t2i R@1 {1 / first['num_images']:.4f}, "
           "compositional accuracy 0.5.")
report = caption + "\n\n" + table + "\n\nCompositional accuracy per category:\n\n" + cat_table
print(report)
(RUNS / "clip_ablation.md").write_text(report + "\n")
(RUNS / "clip_ablation.json").write_text(json.dumps({"rows": rows, "categories": cat_rows, "seeds": SEEDS,
                                                     "budget": BUDGET}, indent=2))
assert all(r["seeds"] == SEEDS and 0.0 <= r["t2i/R@1"][0] <= 1.0 for r in rows.values())

# %% [markdown]
# ## Scores of true and perturbed captions
#
# For the seed-0 model of each row: the cosine score of each compositional item's image with its true
# caption and with its perturbed caption. Hard negatives should push the two distributions apart.

# %%
import matplotlib.pyplot as plt
import torch
from PIL import Image

from contrastive.cli import Job, load_config
from contrastive.runs import read_checkpoint
from datamodules.clip.evaluation import encode_images, encode_texts

fig, axes = plt.subplots(1, len(seed_runs), figsize=(3.2 * len(seed_runs), 2.8), sharey=True, squeeze=False)
for ax, (name, dirs) in zip(axes[0], seed_runs.items()):
    with open(RUNS / f"{name}_scores.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        job = Job(load_config(dirs[0] / "config.yaml", []), dirs[0])
    ckpt = dirs[0] / "checkpoints" / "best.ckpt"
    job.model.load_state_dict(read_checkpoint(ckpt if ckpt.is_file() else dirs[0] / "checkpoints" / "last.ckpt")["state_dict"])
    model, dm = job.model.eval(), job.datamodule
    comp = dm.compositional_items("test")
    split_images = dm.split_images("test")
    with torch.no_grad():
        img = encode_images(model.towers.image, [dm.transform(Image.fromarray(split_images[it.image])) for it in comp])
        pos = encode_texts(model.towers.text, dm.tokenizer, [it.caption for it in comp])
        neg = encode_texts(model.towers.text, dm.tokenizer, [it.negative for it in comp])
    s_pos, s_neg = (img * pos).sum(-1).numpy(), (img * neg).sum(-1).numpy()
    # the tested checkpoint: the same outcomes as the run's test_items.json
    assert np.array_equal(s_pos > s_neg, np.asarray(items[name][0]["comp/correct"], dtype=bool)), name
    bins = np.linspace(min(s_pos.min(), s_neg.min()), max(s_pos.max(), s_neg.max()), 30)
    ax.hist(s_pos, bins=bins, alpha=0.6, label="true caption")
    ax.hist(s_neg, bins=bins, alpha=0.6, label="perturbed caption")
    ax.set_title(f"{name}\nacc {(s_pos > s_neg).mean():.3f}", fontsize=9)
    ax.set_xlabel("cosine score")
axes[0][0].set_ylabel("items")
axes[0][0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(RUNS / "clip_ablation_scores.png", dpi=120)
