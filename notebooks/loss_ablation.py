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
# default corpus at **the same budget** (same corpus, model, batch size, seed, number of optimiser
# steps); only the experiment file changes. Reported: test MRR / Recall@1 / Recall@10 / nDCG@10 on the
# full test corpus and the CodeSearchNet-style MRR against 999 distractors, beside BM25.
#
# `CONTRASTIVE_NOTEBOOK_SCALE=smoke` (used by `tests/test_notebooks.py`) runs on a few standard-library
# packages for a few steps; the default `full` runs on the default corpus
# (`CONTRASTIVE_NOTEBOOK_FULL_BATCHES` optimiser steps, default 250; `CONTRASTIVE_NOTEBOOK_EXPERIMENTS`
# picks the experiment files).

# %% tags=["parameters"]
import os

SCALE = os.environ.get("CONTRASTIVE_NOTEBOOK_SCALE", "full")  # "smoke" or "full"
OUT = os.environ.get("CONTRASTIVE_NOTEBOOK_OUT")  # runs directory; None = runs/notebooks/loss_ablation/<SCALE>
EXPERIMENTS = os.environ.get(
    "CONTRASTIVE_NOTEBOOK_EXPERIMENTS",
    "infonce,dcl,hcl,soft_infonce_bm25,cement,slipform,feature_transforms,mochi,infonce_filtered").split(",")
# Full scale: optimiser steps per run. Below ~150 steps the from-scratch encoder has not left the
# log(batch) plateau of InfoNCE and every loss scores near chance, so the default is 250.
FULL_BATCHES = int(os.environ.get("CONTRASTIVE_NOTEBOOK_FULL_BATCHES", "250"))

# %%
import json
import sysconfig
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import contrastive
from contrastive.cli import main as contrastive_main

if SCALE not in ("smoke", "full"):
    raise ValueError(f"CONTRASTIVE_NOTEBOOK_SCALE must be 'smoke' or 'full'; got {SCALE!r}")
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs" / "codesearch").is_dir()),
            Path(contrastive.__file__).resolve().parents[1])
RUNS = Path(OUT) if OUT else ROOT / "runs" / "notebooks" / "loss_ablation" / SCALE
RUNS.mkdir(parents=True, exist_ok=True)

if SCALE == "smoke":
    std = Path(sysconfig.get_paths()["stdlib"])
    roots = ",".join(str(std / p) for p in ("json", "email", "http", "xml", "logging", "urllib"))
    BUDGET = [f"data.path=[{roots}]", f"data.cache_dir={RUNS / 'cache'}", "data.max_pairs=400", "data.vocab_size=500",
              "data.batch_size=16", "data.max_doc_length=64", "data.split_method=balanced",
              "model.encoder.dim=32", "model.encoder.ff_dim=64", "model.encoder.num_layers=1",
              "model.projection_dim=32", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
              "trainer.enable_progress_bar=false"]
else:
    BUDGET = ["trainer.max_epochs=1", f"trainer.limit_train_batches={FULL_BATCHES}", "trainer.enable_progress_bar=false"]
BUDGET += [f"run.output_dir={RUNS}", "seed=0", "optim.warmup_steps=10"]
print("budget:", " ".join(BUDGET))

# %% [markdown]
# ## Train and test each loss

# %%
results = {}
for i, name in enumerate(EXPERIMENTS):
    exp = ROOT / "configs" / "codesearch" / f"{name}.yaml"
    extra = [] if i == 0 else ["eval.bm25_baseline=false"]  # BM25 is the same for every loss: once
    t0 = time.time()
    with open(RUNS / f"{name}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        code = contrastive_main(["fit", str(exp), *BUDGET, *extra])
    assert code == 0, f"{name} failed; see {RUNS / (name + '.log')}"
    run = max((RUNS / f"codesearch_{name}").glob("version_*"), key=lambda p: p.stat().st_mtime)
    res = json.loads((run / "results.json").read_text())
    results[name] = res
    print(f"{name}: mrr={res['test']['mrr']:.4f} ({time.time() - t0:.0f}s) {run}")

# %% [markdown]
# ## Table

# %%
KEYS = ["mrr", "recall@1", "recall@10", "ndcg@10", "csn_mrr"]
rows = [f"| loss | {' | '.join(KEYS)} |", "|---" * (len(KEYS) + 1) + "|"]
for name, res in results.items():
    rows.append(f"| {name} | " + " | ".join(f"{res['test'][k]:.4f}" for k in KEYS) + " |")
bm25 = results[EXPERIMENTS[0]].get("bm25")
if bm25:
    rows.append("| BM25 (baseline) | " + " | ".join(f"{bm25[k]:.4f}" for k in KEYS) + " |")
table = "\n".join(rows)
print(table)
(RUNS / "loss_ablation.md").write_text(table + "\n")
(RUNS / "loss_ablation.json").write_text(json.dumps(results, indent=2))
assert all(0.0 <= r["test"]["mrr"] <= 1.0 for r in results.values())
