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
# # Detection: linear head vs category-query head, and the category samplers
#
# Trains the DETR-style detector of `configs/detection/` on the synthetic vast-vocabulary scenes with
#
# | row | head | training categories per image |
# |---|---|---|
# | `linear` | linear, focal loss over all categories | all |
# | `cq_topk` | CQ-DINO category queries | top-K presence (learned, image-guided) |
# | `index_topk` | CQ-DINO category queries | ground truth + nearest categories in embedding space (`contrastive.index`) |
# | `random` | CQ-DINO category queries | ground truth + uniform sample |
#
# at each vocabulary size, with several seeds per row, and reports mean ± std of mAP, AP_rare, AP_common,
# AP_frequent and the time per epoch, then plots each category's AP against its number of training images
# for every row (the long-tail claim of CQ-DINO: rare categories gain from the category-query head).
#
# `CONTRASTIVE_NOTEBOOK_SCALE=smoke` (used by `tests/test_notebooks.py`) trains a few steps on a tiny
# vocabulary; `full` uses the configs as they are at vocabularies 50, 200 and 800 with 3 seeds (45 runs of
# up to about 20 minutes each on 2 CPU cores, about 15 hours one at a time). The configs cap training at 17
# minutes, which at 800 categories can stop before the 12 epochs on a busy machine (an epoch at 800
# categories takes 78-95 s on one thread), so the 800-category rows compare heads at equal time rather
# than equal epochs; the table lists the epochs each seed trained; add
# `trainer.max_time=null` to `SCALE_OVERRIDES` for equal epochs (longer). With
# `CONTRASTIVE_NOTEBOOK_REUSE=1` finished runs are reused, so an interrupted table continues where it
# stopped.

# %% tags=["parameters"]
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see contrastive/cli.py

SCALE = os.environ.get("CONTRASTIVE_NOTEBOOK_SCALE", "full")  # "smoke" or "full"
OUT = os.environ.get("CONTRASTIVE_NOTEBOOK_OUT")  # runs directory; None = runs/notebooks/detection_heads/<SCALE>
REUSE = os.environ.get("CONTRASTIVE_NOTEBOOK_REUSE", "0") == "1"  # reuse finished runs found in OUT

# %%
import json
import logging
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from contrastive.cli import load_config, main

logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT / "notebooks"))
from _ablation import finished_run  # noqa: E402  (shared with the other ablation notebooks)

OUT_DIR = Path(OUT) if OUT else ROOT / "runs" / "notebooks" / "detection_heads" / SCALE
ROWS = {
    "linear": ("linear.yaml", []),
    "cq_topk": ("category_query.yaml", ["category_sampler.name=cq_topk"]),
    # the learned selection with the image's ground-truth categories always kept, as index_topk and random do
    "cq_topk_gt": ("category_query.yaml", ["category_sampler.name=cq_topk", "category_sampler.force_include_gt=true"]),
    "index_topk": ("category_query.yaml", ["category_sampler.name=index_topk"]),
    "random": ("category_query.yaml", ["category_sampler.name=random"]),
}
if SCALE == "smoke":
    VOCABS, SEEDS = [10], [0, 1]
    SCALE_OVERRIDES = ["data.train_images=12", "data.val_images=4", "data.test_images=6", "data.batch_size=4",
                       "trainer.max_epochs=1", "trainer.limit_train_batches=2", "run.num_threads=1",
                       f"data.cache_dir={OUT_DIR / 'cache'}"]
else:
    VOCABS, SEEDS = [50, 200, 800], [0, 1, 2]
    SCALE_OVERRIDES = []
# A part of the table (e.g. the 800-category heads first; with REUSE the rest is added later):
# CONTRASTIVE_NOTEBOOK_VOCABS=800 CONTRASTIVE_NOTEBOOK_ROWS=linear,cq_topk CONTRASTIVE_NOTEBOOK_SEEDS=3
if os.environ.get("CONTRASTIVE_NOTEBOOK_VOCABS"):
    VOCABS = [int(v) for v in os.environ["CONTRASTIVE_NOTEBOOK_VOCABS"].split(",")]
if os.environ.get("CONTRASTIVE_NOTEBOOK_ROWS"):
    wanted = os.environ["CONTRASTIVE_NOTEBOOK_ROWS"].split(",")
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        raise ValueError(f"CONTRASTIVE_NOTEBOOK_ROWS: unknown rows {unknown}; known: {sorted(ROWS)}")
    ROWS = {r: ROWS[r] for r in wanted}
if os.environ.get("CONTRASTIVE_NOTEBOOK_SEEDS"):
    SEEDS = list(range(int(os.environ["CONTRASTIVE_NOTEBOOK_SEEDS"])))
print(f"scale={SCALE}: vocabularies {VOCABS}, rows {list(ROWS)}, seeds {SEEDS}, runs in {OUT_DIR}")

# %% [markdown]
# ## Training runs
# One `contrastive fit` per (vocabulary, row, seed); each writes `results.json` with the test metrics,
# per-category AP and the time per epoch.

# %%
def run(vocab: int, row: str, seed: int) -> dict:
    config, extra = ROWS[row]
    out = OUT_DIR / f"v{vocab}_{row}_s{seed}"
    exp = ROOT / "configs" / "detection" / config
    overrides = [f"data.num_categories={vocab}", f"seed={seed}", f"run.output_dir={out}",
                 "trainer.enable_progress_bar=false", *extra, *SCALE_OVERRIDES]
    if REUSE:
        want = load_config(exp, overrides)
        done = finished_run(out / want["experiment"], want)
        if done is not None:
            print(f"v{vocab} {row} seed {seed}: reused {done}")
            return json.loads((done / "results.json").read_text())
    assert main(["fit", str(exp), *overrides]) == 0, overrides
    return json.loads(sorted(out.glob("*/version_*/results.json"))[-1].read_text())


results = {(v, r, s): run(v, r, s) for v in VOCABS for r in ROWS for s in SEEDS}

# %% [markdown]
# ## Table: mean ± std over seeds

# %%
KEYS = ("mAP", "AP_rare", "AP_common", "AP_frequent")


def mean_std(values: list) -> str:
    vals = [v for v in values if v is not None]
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "-"


lines = ["| vocabulary | row | " + " | ".join(KEYS) + " | time / epoch (s) | epochs trained |",
         "|---" * (len(KEYS) + 4) + "|"]
for v in VOCABS:
    for r in ROWS:
        rs = [results[(v, r, s)] for s in SEEDS]
        cells = [mean_std([x["test"].get(k) for x in rs]) for k in KEYS]
        cells.append(mean_std([x["time_per_epoch_s"] for x in rs]))
        cells.append(" / ".join(str(len(x["epoch_times_s"])) for x in rs))  # the configs cap training time
        lines.append(f"| {v} | {r} | " + " | ".join(cells) + " |")
table = "\n".join(lines)
print(table)
(OUT_DIR / "table.md").write_text(table + "\n")

# %% [markdown]
# ## Significance: each row against the linear head, each sampler against `cq_topk`
# Each seed generates its own scenes, so pairs are formed within a seed: the same category on the same
# test images under the row and under the row it is compared with. The Wilcoxon signed-rank test (`scipy.stats.wilcoxon`,
# two-sided) runs over all (seed, category) pairs, for all categories and for each frequency bucket
# (the bucket of the seed's training split). A paired t-test over seeds on the bucket's AP (the
# table's number) is given beside it; with 3 seeds it has 2 degrees of freedom.

# %%
BUCKETS = {"mAP": None, "AP_rare": "r", "AP_common": "c", "AP_frequent": "f"}


def paired_tests(vocab: int, row: str, base: str = "linear") -> dict:
    out = {}
    for key, bucket in BUCKETS.items():
        diff = []
        for s in SEEDS:
            a, b = results[(vocab, row, s)]["per_category"], results[(vocab, base, s)]["per_category"]
            diff += [a[c]["ap"] - b[c]["ap"] for c in a if c in b and (bucket is None or a[c]["bucket"] == bucket)]
        diff = np.array(diff)
        seeds_a = [results[(vocab, row, s)]["test"].get(key) for s in SEEDS]
        seeds_b = [results[(vocab, base, s)]["test"].get(key) for s in SEEDS]
        p_cat = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else float("nan")
        p_seed = (float(stats.ttest_rel(seeds_a, seeds_b).pvalue)
                  if len(SEEDS) > 1 and None not in seeds_a + seeds_b and np.any(np.subtract(seeds_a, seeds_b) != 0)
                  else float("nan"))
        out[key] = {"pairs": len(diff), "delta": float(diff.mean()) if len(diff) else float("nan"),
                    "p_categories": p_cat, "p_seeds": p_seed}
    return out


sig_lines = ["| vocabulary | row | against | measure | (seed, category) pairs | mean Δ AP | p (Wilcoxon, pairs) | p (t, seeds) |",
             "|---|---|---|---|---|---|---|---|"]
significance = {}
# every row against the linear head; the other category samplers also against CQ-DINO's learned selection
COMPARISONS = [(r, "linear") for r in ROWS if r != "linear" and "linear" in ROWS]
COMPARISONS += [(r, "cq_topk") for r in ROWS if r not in ("linear", "cq_topk") and "cq_topk" in ROWS]
for v in VOCABS:
    for r, base in COMPARISONS:
        significance[(v, r, base)] = paired_tests(v, r, base)
        for name, t in significance[(v, r, base)].items():
            sig_lines.append(f"| {v} | {r} | {base} | {name} | {t['pairs']} | {t['delta']:+.3f} | "
                             f"{t['p_categories']:.2g} | {t['p_seeds']:.2g} |")
sig_table = "\n".join(sig_lines)
print(sig_table)
(OUT_DIR / "significance.md").write_text(sig_table + "\n")

# %% [markdown]
# ## AP against training frequency, per category (one panel per vocabulary, all seeds)
# Each point is one (seed, category); the lines are each row's mean AP in log-spaced bins of training images.

# %%
MARKERS = {"linear": "o", "cq_topk": "x", "cq_topk_gt": "*", "index_topk": "+", "random": "."}
fig, axes = plt.subplots(1, len(VOCABS), figsize=(5 * len(VOCABS), 4), squeeze=False)
for ax, v in zip(axes[0], VOCABS):
    for row in ROWS:
        cats = [c for s in SEEDS for c in results[(v, row, s)]["per_category"].values()]
        xs, ys = np.array([c["train_images"] for c in cats]) + 1, np.array([c["ap"] for c in cats])
        dots = ax.scatter(xs, ys, marker=MARKERS.get(row, "."), alpha=0.25, s=12)
        edges = np.unique(np.geomspace(1, xs.max() + 1, 8).round())
        which = np.digitize(xs, edges)
        centre = [np.exp(np.log(xs[which == b]).mean()) for b in np.unique(which)]
        ax.plot(centre, [ys[which == b].mean() for b in np.unique(which)], color=dots.get_facecolor()[0][:3],
                label=row)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the category + 1")
    ax.set_ylabel("test AP")
    ax.set_title(f"{v} leaf categories")
    ax.legend()
fig.tight_layout()
fig.savefig(OUT_DIR / "ap_vs_frequency.png", dpi=100)

# %%
for key, res in results.items():
    assert 0.0 <= res["test"]["mAP"] <= 1.0, key
    assert res["time_per_epoch_s"] > 0, key
for key, tests in significance.items():
    for t in tests.values():
        assert np.isnan(t["p_categories"]) or 0.0 <= t["p_categories"] <= 1.0, key
