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
# # Loss ablation on code search
#
# Every loss of the library trains the dual encoder of `configs/codesearch/*.yaml` on the embedded
# default corpus at **the same budget** (same corpus, model, batch size, number of optimiser steps) with
# `SEEDS` seeds per row; only the experiment file changes. Reported: test MRR / Recall@1 / Recall@10 on the
# full test corpus and the CodeSearchNet-style MRR against 999 distractors (mean ± std over seeds), beside
# BM25, and for every row a paired randomization test against the InfoNCE row over the test queries
# (per-query reciprocal ranks averaged over seeds; `*` p < 0.05, `**` p < 0.01).
#
# `CONTRASTIVE_NOTEBOOK_SCALE=smoke` (used by `tests/test_notebooks.py`) runs on a few standard-library
# packages for a few steps with 2 seeds; the default `full` runs on the default corpus
# (`CONTRASTIVE_NOTEBOOK_FULL_BATCHES` optimiser steps, default 126 = 3 epochs; `CONTRASTIVE_NOTEBOOK_SEEDS`, default 3;
# `CONTRASTIVE_NOTEBOOK_EXPERIMENTS` picks the experiment files, the first one is the baseline row).

# %% tags=["parameters"]
import os

SCALE = os.environ.get("CONTRASTIVE_NOTEBOOK_SCALE", "full")  # "smoke" or "full"
OUT = os.environ.get("CONTRASTIVE_NOTEBOOK_OUT")  # runs directory; None = runs/notebooks/loss_ablation/<SCALE>
EXPERIMENTS = os.environ.get(
    "CONTRASTIVE_NOTEBOOK_EXPERIMENTS",
    "infonce,soft_infonce_bm25,soft_infonce_simcse,soft_infonce_frozen,dcl,hcl,cement,infonce_filtered").split(",")
#: rows whose Soft-InfoNCE weights come from a finished run: they read the first row's run of the same seed
#: (plain InfoNCE, as in Li et al. 2023) and share its tokenizer
FROZEN_RUN_ROWS = {"soft_infonce_simcse", "soft_infonce_frozen"}
# Full scale: optimiser steps per run (3 epochs of the default corpus at batch 256; the default bag-of-subwords
# tower reaches its best validation MRR at about this point, see the learning curve of the main job).
FULL_BATCHES = int(os.environ.get("CONTRASTIVE_NOTEBOOK_FULL_BATCHES", "126"))
SEEDS = int(os.environ.get("CONTRASTIVE_NOTEBOOK_SEEDS", "2" if SCALE == "smoke" else "3"))

# %%
import json
import sysconfig
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import sys

import contrastive
from contrastive.cli import main as contrastive_main, next_version_dir

if SCALE not in ("smoke", "full"):
    raise ValueError(f"CONTRASTIVE_NOTEBOOK_SCALE must be 'smoke' or 'full'; got {SCALE!r}")
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs" / "codesearch").is_dir()),
            Path(contrastive.__file__).resolve().parents[1])
RUNS = Path(OUT) if OUT else ROOT / "runs" / "notebooks" / "loss_ablation" / SCALE
RUNS.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(ROOT / "notebooks"))
from _ablation import seeds_table  # noqa: E402  (shared with sampler_ablation)

if SCALE == "smoke":
    std = Path(sysconfig.get_paths()["stdlib"])
    roots = ",".join(str(std / p) for p in ("json", "email", "http", "xml", "logging", "urllib"))
    BUDGET = [f"data.path=[{roots}]", f"data.cache_dir={RUNS / 'cache'}", "data.max_pairs=400", "data.vocab_size=500",
              "data.batch_size=16", "data.max_doc_length=64", "data.split_method=balanced",
              "model.encoder.dim=32", "model.projection_dim=32", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
              "trainer.enable_progress_bar=false"]
else:
    BUDGET = ["trainer.max_epochs=100", f"trainer.max_steps={FULL_BATCHES}", "trainer.enable_progress_bar=false"]
BUDGET += [f"run.output_dir={RUNS}", "optim.warmup_steps=10", "sampler=in_batch"]  # losses over in-batch negatives
print("budget:", " ".join(BUDGET))

# %% [markdown]
# ## Train and test each loss

# %%
results: dict[str, list[dict]] = {}
seed_runs: dict[str, list[Path]] = {}
for i, name in enumerate(EXPERIMENTS):
    exp = ROOT / "configs" / "codesearch" / f"{name}.yaml"
    for seed in range(SEEDS):
        extra = [] if i == seed == 0 else ["eval.bm25_baseline=false"]  # BM25 is the same for every run: once
        if name in FROZEN_RUN_ROWS:
            base = seed_runs[EXPERIMENTS[0]][seed]
            extra += [f"model.similarity_estimator.run_dir={base}", f"data.tokenizer_dir={base / 'tokenizer'}"]
        run = next_version_dir(RUNS / f"codesearch_{name}")  # the directory `fit` is about to create
        t0 = time.time()
        with open(RUNS / f"{name}_seed{seed}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
            code = contrastive_main(["fit", str(exp), *BUDGET, f"seed={seed}", *extra])
        assert code == 0, f"{name} (seed {seed}) failed; see {RUNS / f'{name}_seed{seed}.log'}"
        res = json.loads((run / "results.json").read_text())
        results.setdefault(name, []).append(res)
        seed_runs.setdefault(name, []).append(run)
        print(f"{name} seed {seed}: mrr={res['test']['mrr']:.4f} ({time.time() - t0:.0f}s) {run}")

# %% [markdown]
# ## Table
#
# Mean ± std over seeds; `Δ mrr` and `p` compare each row with the first (InfoNCE) row by a paired
# randomization test over the test queries.

# %%
corpus = json.loads((seed_runs[EXPERIMENTS[0]][0] / "corpus.json").read_text())
table, rows = seeds_table(seed_runs, EXPERIMENTS[0], "loss")
bm25 = results[EXPERIMENTS[0]][0].get("bm25")
if bm25:
    table += "\n| BM25 (baseline) | - | " + " | ".join(f"{bm25[k]:.4f}" for k in ("mrr", "recall@1", "recall@10", "csn_mrr")) + " | | |"
caption = (f"Loss ablation ({SCALE}): {SEEDS} seeds per row, `{' '.join(BUDGET)}`; corpus "
           f"{corpus['records']} pairs, fingerprint {corpus['content_fingerprint'][:16]}.")
print(caption + "\n\n" + table)
(RUNS / "loss_ablation.md").write_text(caption + "\n\n" + table + "\n")
(RUNS / "loss_ablation.json").write_text(json.dumps({"rows": rows, "bm25": bm25, "corpus": corpus}, indent=2))
assert all(0.0 <= r["mrr"][0] <= 1.0 for r in rows.values()) and all(r["seeds"] == SEEDS for r in rows.values())
