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
# # Negative-sampler ablation on code search
#
# Reproduces the code-search ablation table: the dual encoder of `configs/codesearch/infonce.yaml`
# trained with each negative sampler at **the same training budget** (same corpus, model, batch size,
# epochs and number of optimiser steps; only `sampler=<name>` changes):
#
# | sampler | what the extra negatives are |
# |---|---|
# | `in_batch` | none: the other documents of the batch |
# | `bm25` | one BM25 hard negative per query, mined once before training (DPR) |
# | `faiss_hard` | one dense hard negative from the current model, re-mined every epoch (ANCE; random ranks 2..29) |
# | `faiss_hard_top` | the top-ranked dense non-positive, re-mined every epoch, with nothing against false negatives (no duplicate exclusion, no filters) |
# | `faiss_hard_filtered` | `faiss_hard` + false-negative filters (known duplicates, TopK-PercPos 95%), top of the ranking |
# | `ngame` | none, but batches are built from clusters of similar queries (NGAME) |
#
# For each run it reports test MRR / Recall@1 / Recall@10 (full test corpus, beside the BM25 baseline)
# and the **measured false-negative rate among the mined negatives**: the fraction of mined negatives
# that are *known duplicates* of the query's positive (same `dup_group` in the corpus: same normalised
# code or same normalised docstring summary), before and after the false-negative filters.
# A second section shows concrete duplicates among the unfiltered mined negatives and checks that the
# filters remove them.
#
# `CONTRASTIVE_NOTEBOOK_SCALE=smoke` (used by `tests/test_notebooks.py`) runs on a few standard-library
# packages for a few steps in about a minute; the default `full` runs on the embedded default corpus
# (see `notebooks/README.md` for the budget and running time).

# %% tags=["parameters"]
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see contrastive/cli.py

SCALE = os.environ.get("CONTRASTIVE_NOTEBOOK_SCALE", "full")  # "smoke" or "full"
OUT = os.environ.get("CONTRASTIVE_NOTEBOOK_OUT")  # runs directory; None = runs/notebooks/sampler_ablation/<SCALE>
SAMPLERS = ["in_batch", "bm25", "faiss_hard", "faiss_hard_top", "faiss_hard_filtered", "ngame"]
DEEP_K = 10  # negatives per query in the closer look at duplicates (section 3)
FULL_EPOCHS = int(os.environ.get("CONTRASTIVE_NOTEBOOK_FULL_EPOCHS", "4"))  # full scale: epochs per run
SEEDS = int(os.environ.get("CONTRASTIVE_NOTEBOOK_SEEDS", "2" if SCALE == "smoke" else "3"))  # seeds per sampler
REUSE = os.environ.get("CONTRASTIVE_NOTEBOOK_REUSE", "0") == "1"  # reuse finished runs with the same config in OUT

# %%
import csv
import json
import logging
import sys
import sysconfig
import time
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
import yaml

import contrastive
from contrastive.build import build_datamodule
from contrastive.cli import load_config, main as contrastive_main, next_version_dir
from contrastive.samplers.table import MinedTable
from datamodules.codesearch.corpus import content_fingerprint

if SCALE not in ("smoke", "full"):
    raise ValueError(f"CONTRASTIVE_NOTEBOOK_SCALE must be 'smoke' or 'full'; got {SCALE!r}")


def find_root() -> Path:
    """The repository root: the first parent of the working directory holding the experiment configs."""
    for p in (Path.cwd(), *Path.cwd().parents):
        if (p / "configs" / "codesearch" / "infonce.yaml").is_file():
            return p
    return Path(contrastive.__file__).resolve().parents[1]


ROOT = find_root()
sys.path.insert(0, str(ROOT / "notebooks"))
from _ablation import finished_run, seeds_table  # noqa: E402  (shared with the other ablation notebooks)
EXP = ROOT / "configs" / "codesearch" / "infonce.yaml"
OUT = Path(OUT) if OUT else ROOT / "runs" / "notebooks" / "sampler_ablation" / SCALE
OUT.mkdir(parents=True, exist_ok=True)


def show_markdown(text: str) -> None:
    """Rendered in a notebook, printed when this file runs as a plain script."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(text))
            return
    except ImportError:
        pass
    print(text)


# the CLI calls logging.basicConfig(level=INFO); configure first so that it keeps to warnings
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
print(f"scale={SCALE}  root={ROOT}  out={OUT}  torch threads={torch.get_num_threads()}")

# %% [markdown]
# ## 1. Corpus and training budget
#
# Every sampler gets exactly the same overrides; only `sampler=<name>` differs.
#
# - **smoke**: a handful of standard-library packages chosen because they contain known duplicates in
#   the *training* split (functions with copied docstrings such as `Queue.get` / `Queue.get_nowait`,
#   `_patch.start` / `_patch_dict.start`, `Misc.pack_slaves` / `Misc.grid_slaves`), a tiny model,
#   3 epochs of 20 batches of 16.
# - **full**: the embedded default corpus (`configs/data/codesearch.yaml`: Python functions with
#   docstrings from the standard library and the pinned project dependencies, fingerprint printed below)
#   and the default model and batch size, `SEEDS` seeds (default 3) of `FULL_EPOCHS` epochs (default 4) and a
#   learning-rate warm-up of 20 steps (the shipped 100-step warm-up would take most of the first epoch). The first
#   epoch is the random-negative warm-up of `faiss_hard*` (first refresh at the start of epoch 1); NGAME
#   clusters from epoch 1.

# %%
STD = Path(sysconfig.get_paths()["stdlib"])
SMOKE_PACKAGES = ["asyncio", "multiprocessing", "unittest", "idlelib", "tkinter", "json", "http", "xml"]

if SCALE == "smoke":
    roots = ",".join(str(STD / p) for p in SMOKE_PACKAGES)
    DATA = [f"data.path=[{roots}]", f"data.cache_dir={OUT / 'cache'}", "data.max_pairs=800", "data.vocab_size=600",
            "data.batch_size=16", "data.max_doc_length=64", "data.split_method=balanced"]
    MODEL = ["model.encoder.dim=32", "model.projection_dim=32"]
    BUDGET = ["trainer.max_epochs=3", "trainer.limit_train_batches=20", "trainer.log_every_n_steps=1",
              "optim.warmup_steps=2"]
else:
    DATA, MODEL = [], []  # configs/data/codesearch.yaml and configs/model/tiny_transformer.yaml as they are
    BUDGET = [f"trainer.max_epochs={FULL_EPOCHS}", "optim.warmup_steps=20", "trainer.log_every_n_steps=10"]

COMMON = [*DATA, *MODEL, *BUDGET, "trainer.enable_progress_bar=false", "callbacks.refresh.progress_bar=false",
          f"run.output_dir={OUT / 'runs'}"]

cfg = load_config(EXP, COMMON)
BATCH = int(cfg["data"]["batch_size"])


def load_corpus():
    """The corpus every run of this notebook trains on (built, or loaded from the on-disk cache)."""
    dm = build_datamodule(cfg["data"], seed=int(cfg.get("seed", 0)))
    return dm, dm.describe()  # no tokenizer needed


def content_digest(c) -> str:
    """The corpus content fingerprint (splits, duplicate groups, texts; independent of paths and file times)."""
    return content_fingerprint(c.records())[:16]


datamodule, corpus_info = load_corpus()
corpus = datamodule.corpus
CORPUS_FP = content_digest(corpus)  # the default corpus: stdlib + the pinned packages (README)
train = corpus.records("train")
group_size = Counter(r.dup_group for r in train)
train_dup_rows = sum(n for n in group_size.values() if n > 1)
train_dup_groups = sum(1 for n in group_size.values() if n > 1)
N = len(train)
# expected fraction of in-batch negatives that are known duplicates with uniformly random batches:
# a row of a group of size g has g - 1 duplicates among its N - 1 possible batch-mates
expected_inbatch_fn = sum(group_size[r.dup_group] - 1 for r in train) / (N * (N - 1))
CORPUS = {k: corpus_info[k] for k in ("records", "splits", "dup_groups", "dup_records", "largest_dup_group",
                                       "cross_split_dup_groups")}
CORPUS.update(train_dup_groups=train_dup_groups, train_dup_rows=train_dup_rows,
              expected_inbatch_fn_rate=expected_inbatch_fn, fingerprint=CORPUS_FP)
print(json.dumps(CORPUS, indent=1))
print("overrides:", " ".join(COMMON))
assert train_dup_rows > 0, "the training split has no known duplicates: the false-negative columns would be vacuous"

# %% [markdown]
# ## 2. Train and test one model per sampler
#
# `contrastive fit configs/codesearch/infonce.yaml sampler=<name> <overrides>` through
# `contrastive.cli.main`; each run writes `results.json` (test metrics and the BM25 baseline),
# `metrics.csv` and, for the mining samplers, `negatives/step_<n>.json` (the negative-quality report at
# every refresh: `negatives/before/dup_fraction` and `negatives/after/dup_fraction`) and the mined tables
# `negatives/table-<key>.npz`. The console output of each command goes to `<OUT>/logs/<experiment>.log`.

# %%
QUIET = ("lightning", "lightning.pytorch", "lightning.fabric", "contrastive", "datamodules", "bm25s")


def run_cli(argv: list[str], log_path: Path) -> int:
    """``contrastive <argv>`` in this process, its console output to ``log_path``; returns the exit status."""
    levels = {name: logging.getLogger(name).level for name in QUIET}
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "a", encoding="utf-8") as f, redirect_stdout(f), redirect_stderr(f):
            return contrastive_main(argv)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


STAMP = "notebook_corpus.txt"  # the corpus fingerprint a run was checked to have used


def check_same_corpus(run_dir: Path) -> None:
    """The default corpus is rebuilt whenever the scanned files change (e.g. a ``pip install`` during the
    notebook), which would make the rows incomparable: check that it is still the one of section 1."""
    quiet = logging.getLogger("datamodules")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the bad-input summary was shown in section 1
    try:
        now = load_corpus()[0].corpus
    finally:
        quiet.setLevel(level)
    if content_digest(now) != CORPUS_FP:
        raise RuntimeError(f"the corpus changed while the notebook ran ({len(corpus)} -> {len(now)} records; were "
                           f"packages installed?): {run_dir} may have used another corpus than the earlier runs. "
                           "Re-run the notebook on a machine whose source files do not change meanwhile.")
    (run_dir / STAMP).write_text(CORPUS_FP + "\n")


RUNS: dict[str, Path] = {}  # seed 0 of every sampler (the false-negative analysis below)
SEED_RUNS: dict[str, list[Path]] = {}
for name in SAMPLERS:
    experiment = f"ablation_{name}"
    for seed in range(SEEDS):
        argv = [f"sampler={name}", f"experiment={experiment}", f"seed={seed}", *COMMON]
        t0 = time.perf_counter()
        run_dir = (finished_run(OUT / "runs" / experiment, load_config(EXP, argv), stamp=(STAMP, CORPUS_FP))
                   if REUSE else None)
        if run_dir is None:
            run_dir = next_version_dir(OUT / "runs" / experiment)  # the directory `fit` is about to create
            code = run_cli(["fit", str(EXP), *argv], OUT / "logs" / f"{experiment}_seed{seed}.log")
            assert code == 0, f"fit with sampler={name} seed={seed} exited with {code}; see {OUT / 'logs'}"
            assert (run_dir / "results.json").is_file(), f"{run_dir}: no results.json"
            check_same_corpus(run_dir)
        SEED_RUNS.setdefault(name, []).append(run_dir)
        RUNS.setdefault(name, run_dir)
        mrr = json.loads((run_dir / "results.json").read_text())["test"]["mrr"]
        print(f"{name:>20} seed {seed}: test MRR {mrr:.4f}  ({time.perf_counter() - t0:.0f}s)  {run_dir}")

# %% [markdown]
# ### Seeds and significance
#
# Mean ± std over the seeds of every sampler; `Δ mrr` and `p` compare each row with `in_batch` by a paired
# randomization test over the test queries (per-query reciprocal ranks averaged over seeds; `*` p < 0.05,
# `**` p < 0.01).

# %%

SEED_TABLE_MD, SEED_ROWS = seeds_table(SEED_RUNS, "in_batch", "sampler")
show_markdown(f"{SEEDS} seeds per sampler, corpus fingerprint {CORPUS_FP}\n\n" + SEED_TABLE_MD)

# Does filtering recover MRR (NV-Retriever, CET)? The same top-ranked dense negatives with and without the
# false-negative filters, tested against each other.
FILTER_PAIR = ["faiss_hard_top", "faiss_hard_filtered"]
FILTER_TABLE_MD, FILTER_ROWS = seeds_table({k: SEED_RUNS[k] for k in FILTER_PAIR}, FILTER_PAIR[0], "sampler")
show_markdown("Filtered against unfiltered top-ranked dense negatives:\n\n" + FILTER_TABLE_MD)

# %% [markdown]
# ### How the false-negative rate is measured
#
# *Known false negative* = a mined negative in the same duplicate group as the query's positive.
#
# - `bm25`, `faiss_hard`, `faiss_hard_filtered`: from the negative-quality report of the **last mined
#   table** (`negatives/step_<n>.json`; for `faiss_hard*` the refresh at the start of epoch 1, mined with
#   the model being trained). **before** = what the miner would have selected with the same rank window
#   and sampling but without duplicate exclusion and without the false-negative filters (the table's
#   `before_neg_rows`); **after** = the negatives actually trained on. Note that the shipped `bm25` and
#   `faiss_hard` configs already set `exclude_duplicates: true` (known duplicates are never mined, by
#   id), and `faiss_hard` skips ranks 0-1 (the ANCE heuristic against false negatives); only
#   `faiss_hard_filtered` adds the filter chain (`known_duplicates`, `positive_aware` 95%).
# - `ngame`: NGAME adds no negatives; its negatives are the cluster-mates in the batch. The report holds
#   the 16 hardest cluster-mates of every query at the last clustering (before / after leaving known
#   duplicates out).
# - `in_batch`: there is nothing mined, so the rate is the fraction of **in-batch** negatives that are known
#   duplicates, *measured* during training from `train/masked_duplicates` in `metrics.csv` (mean masked
#   candidates per anchor / (batch size - 1)); the expected value for random batches,
#   sum over rows of (group size - 1) / (N (N - 1)), is printed beside it. It is
#   tiny: random batch-mates are rarely duplicates, which is why false negatives matter only for
#   *mined* (hard) negatives.
#
# In all runs the loss also masks known duplicates among the candidates (`model.mask_known_duplicates:
# true`), so "after" is what reaches the miner's output, not the loss.

# %%
def read_column(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


def last_report(run_dir: Path) -> dict | None:
    reports = sorted(run_dir.glob("negatives/step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    return json.loads(reports[-1].read_text()) if reports else None


def rate(q: dict | None) -> dict | None:
    if not q or not q.get("negatives"):
        return None
    n = int(q["negatives"])
    return {"rate": float(q["dup_fraction"]), "dups": int(round(q["dup_fraction"] * n)), "negatives": n}


def fmt_rate(r: dict | None) -> str:
    if r is None:
        return "n/a"
    return f"{100 * r['rate']:.2f}% ({r['dups']}/{r['negatives']})"


ROWS = []
for name, run_dir in RUNS.items():
    res = json.loads((run_dir / "results.json").read_text())
    row = {"sampler": name, "run": str(run_dir), "test": {k: res["test"][k] for k in ("mrr", "recall@1", "recall@10")},
           "bm25": {k: res["bm25"][k] for k in ("mrr", "recall@1", "recall@10")} if "bm25" in res else None}
    masked = read_column(run_dir, "train/masked_duplicates")
    inbatch = sum(masked) / len(masked) / (BATCH - 1) if masked else float("nan")
    report = last_report(run_dir)
    if name == "in_batch":
        row["fn_before"] = {"rate": inbatch, "dups": None, "negatives": None}
        row["fn_after"] = {"rate": 0.0, "dups": None, "negatives": None}
        row["fn_source"] = (f"in-batch negatives, measured from train/masked_duplicates (expected for random "
                            f"batches {100 * expected_inbatch_fn:.3f}%); after = masked in the loss")
    else:
        assert report is not None, f"{run_dir}: no negatives report"
        row["fn_before"] = rate(report["quality"].get("before"))
        row["fn_after"] = rate(report["quality"].get("after"))
        row["fn_source"] = f"negatives/step_{report['step']}.json (sampler '{report['sampler']}')"
        if name == "ngame":
            row["fn_source"] += f"; in-batch (masked_duplicates) {100 * inbatch:.3f}%"
    ROWS.append(row)
BM25_BASELINE = next((r["bm25"] for r in ROWS if r["bm25"]), None)


def fmt_in(r: dict | None) -> str:
    return "n/a" if r is None else (f"{100 * r['rate']:.3f}% (in-batch)" if r["dups"] is None else fmt_rate(r))


header = ("| sampler | test MRR | R@1 | R@10 | known-dup rate among negatives, before filters | "
          "after (trained on) |\n|---|---|---|---|---|---|")
lines = [header]
for r in ROWS:
    t = r["test"]
    after = "0 (masked in the loss)" if r["sampler"] == "in_batch" else fmt_rate(r["fn_after"])
    lines.append(f"| {r['sampler']} | {t['mrr']:.4f} | {t['recall@1']:.4f} | {t['recall@10']:.4f} | "
                 f"{fmt_in(r['fn_before'])} | {after} |")
if BM25_BASELINE:
    b = BM25_BASELINE
    lines.append(f"| *BM25 baseline (no training)* | {b['mrr']:.4f} | {b['recall@1']:.4f} | {b['recall@10']:.4f} | - | - |")
budget = " ".join(BUDGET)
TABLE_MD = "\n".join(lines)
sizes = {name: int(json.loads((d / "results.json").read_text())["test"].get("corpus_size", -1)) for name, d in RUNS.items()}
assert set(sizes.values()) == {CORPUS["splits"]["test"]}, f"the runs were tested on different test splits: {sizes}"
test_size = CORPUS["splits"]["test"]
caption = (f"Code search ({SCALE} scale): {CORPUS['splits']['train']} training pairs, test MRR over "
           f"{test_size} test documents; same budget for every sampler: `{budget}` (batch size {BATCH}).")
show_markdown(caption + "\n\n" + TABLE_MD)

(OUT / "ablation.md").write_text(f"# Sampler ablation ({SCALE})\n\n{caption}\n\n{SEEDS} seeds per sampler (mean ± std, paired test "
                                 f"against in_batch):\n\n{SEED_TABLE_MD}\n\nFiltered against unfiltered top-ranked dense negatives:\n\n"
                                 f"{FILTER_TABLE_MD}\n\nSeed 0 and false negatives:\n\n{TABLE_MD}\n\n"
                                 "False-negative sources:\n\n"
                                 + "\n".join(f"- {r['sampler']}: {r['fn_source']}" for r in ROWS) + "\n")
(OUT / "ablation.json").write_text(json.dumps({"scale": SCALE, "overrides": COMMON, "batch_size": BATCH,
                                               "corpus": CORPUS, "rows": ROWS, "bm25_baseline": BM25_BASELINE,
                                               "seeds": SEEDS, "seed_rows": SEED_ROWS, "filter_rows": FILTER_ROWS},
                                              indent=1, sort_keys=True))
print(f"wrote {OUT / 'ablation.md'} and {OUT / 'ablation.json'}")

# %% [markdown]
# ## 3. Known duplicates among the unfiltered mined negatives, and the filters removing them
#
# We load the mined tables (`contrastive.samplers.table.MinedTable`) and count the mined negatives whose
# `dup_group` equals the positive's:
#
# - **(a) the tables trained on**: the last table of the `faiss_hard` run (no filter chain) and of the
#   `faiss_hard_filtered` run, one negative per query: *before* = `extra_before_neg_rows` (no duplicate
#   exclusion, no filters), *after* = `neg_rows`;
# - **(b) a closer look**: one negative per query is a small sample, so we also re-mine the top
#   `DEEP_K` negatives from rank 0 with each trained checkpoint (`contrastive mine RUN_DIR
#   sampler.num_negatives=DEEP_K sampler.range_min=0 sampler.sampling=top --out ...`), and the same for
#   BM25. Here *before* is exactly the unfiltered top-`DEEP_K` of the ranking without the positive.

# %%
def group_key(groups: torch.Tensor) -> torch.Tensor:
    """Equal iff the same non-negative duplicate group (a negative group = no known duplicate)."""
    top = int(groups.max().clamp_min(0)) + 1 if groups.numel() else 0
    return torch.where(groups >= 0, groups, top + torch.arange(groups.shape[0]))


def known_duplicates(table: MinedTable, neg_rows: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(known-duplicate negatives, valid negatives, (Q, k) bool mask) of ``neg_rows`` (training rows, -1 = none)."""
    key = group_key(table.dup_group)
    valid = neg_rows >= 0
    dup = valid & (key[neg_rows.clamp_min(0)] == key[table.query_rows].view(-1, 1))
    return int(dup.sum()), int(valid.sum()), dup


def last_table(run_dir: Path) -> MinedTable:
    tables = [MinedTable.load(p) for p in run_dir.glob("negatives/table-*.npz")]
    assert tables, f"{run_dir}: no mined table"
    return max(tables, key=lambda t: int((t.header.get("checkpoint") or {}).get("global_step", -1)))


def head(text: str, lines: int = 3) -> str:
    return "\n".join(text.strip("\n").splitlines()[:lines])


def show_examples(table: MinedTable, neg_rows: torch.Tensor, dup: torch.Tensor, title: str, limit: int = 2) -> None:
    # the texts are looked up in this notebook's corpus: the table must come from the same training split
    assert torch.equal(table.pair_ids, torch.tensor([r.id for r in train])), f"{title}: mined on another corpus"
    qi, kj = dup.nonzero(as_tuple=True)
    shown, seen = 0, set()
    for i, j in zip(qi.tolist(), kj.tolist()):
        row = int(table.query_rows[i])
        group = int(table.dup_group[row])
        if group in seen:
            continue
        seen.add(group)
        pos, neg = corpus[int(table.pair_ids[row])], corpus[int(table.pair_ids[int(neg_rows[i, j])])]
        print(f"--- {title}: query row {row}, negative #{j} is a known duplicate (dup_group {group})")
        print(f"query:     {pos.query}")
        print(f"positive:  {pos.source}:{pos.func_name}\n{head(pos.document)}")
        print(f"negative:  {neg.source}:{neg.func_name}  (query of that pair: {neg.query!r})\n{head(neg.document)}")
        shown += 1
        if shown >= limit:
            break


DUPS: dict[str, dict] = {}
trained = {name: last_table(RUNS[name]) for name in ("faiss_hard", "faiss_hard_top", "faiss_hard_filtered") if name in RUNS}
for name, table in trained.items():
    b, nb, bmask = known_duplicates(table, table.extras["before_neg_rows"].long())
    a, na, _ = known_duplicates(table, table.neg_rows)
    DUPS[f"{name} (trained on, k={table.num_negatives})"] = {"before": b, "before_negatives": nb, "after": a,
                                                             "after_negatives": na}
    print(f"{name:>20} table (step {table.header['checkpoint']['global_step']}): known-duplicate negatives "
          f"before filters {b}/{nb}, after {a}/{na}")
    if b:
        show_examples(table, table.extras["before_neg_rows"].long(), bmask, f"{name}, before filters")

# %%
DEEP: dict[str, MinedTable] = {}
for name in ("bm25", "faiss_hard", "faiss_hard_filtered"):
    if name not in RUNS:
        continue
    out = OUT / "dupcheck" / RUNS[name].parent.name / RUNS[name].name / f"top{DEEP_K}.npz"
    extra = [f"sampler.num_negatives={DEEP_K}", "sampler.range_min=0", "sampler.sampling=top"]
    if not (REUSE and out.is_file()):
        code = run_cli(["mine", str(RUNS[name]), *extra, "--out", str(out)], OUT / "logs" / f"mine_{name}.log")
        assert code == 0, f"contrastive mine for {name} exited with {code}; see {OUT / 'logs' / f'mine_{name}.log'}"
    DEEP[name] = table = MinedTable.load(out)
    b, nb, bmask = known_duplicates(table, table.extras["before_neg_rows"].long())
    a, na, _ = known_duplicates(table, table.neg_rows)
    rows_hit = int(bmask.any(dim=1).sum())
    DUPS[f"{name} (top-{DEEP_K} re-mined)"] = {"before": b, "before_negatives": nb, "after": a, "after_negatives": na,
                                               "queries_with_dup_before": rows_hit}
    print(f"{name:>20} top-{DEEP_K}: known-duplicate negatives before filters {b}/{nb} "
          f"({rows_hit} of {table.num_rows} queries; {train_dup_rows} training rows have a duplicate), after {a}/{na}")

for name, table in DEEP.items():
    b, _, bmask = known_duplicates(table, table.extras["before_neg_rows"].long())
    if b:
        show_examples(table, table.extras["before_neg_rows"].long(), bmask, f"{name} top-{DEEP_K}, before filters", 1)

# %% [markdown]
# ### Checks
#
# The filtered miner must never hand a known duplicate to the loss, and must end with fewer known
# duplicates than the unfiltered ranking whenever the unfiltered ranking has any.

# %%
rows = ["| table | known dups before filters | after filters |", "|---|---|---|"]
for key, d in DUPS.items():
    rows.append(f"| {key} | {d['before']} / {d['before_negatives']} | {d['after']} / {d['after_negatives']} |")
DUP_MD = "\n".join(rows)
show_markdown(DUP_MD)

for key, d in DUPS.items():
    if "faiss_hard_filtered" in key:
        assert d["after"] == 0, f"{key}: {d['after']} known duplicates survived the filters"
    if key.startswith("faiss_hard_top"):  # the unfiltered arm: it trains on what it mines
        assert d["after"] == d["before"], f"{key}: nothing should filter the unfiltered arm ({d})"
    elif d["before"] > 0:
        assert d["after"] < d["before"], f"{key}: filters did not reduce the known duplicates ({d})"
unfiltered = DUPS.get("faiss_hard (trained on, k=1)", {}).get("before", 0)
filtered = DUPS.get("faiss_hard_filtered (trained on, k=1)", {}).get("after", 0)
if unfiltered > 0:
    assert filtered < unfiltered, "faiss_hard_filtered trained on as many known duplicates as unfiltered faiss_hard"
deep_before = sum(d["before"] for k, d in DUPS.items() if "re-mined" in k)
assert deep_before > 0, "no known duplicate among the unfiltered top-k negatives: nothing for the filters to remove"

with open(OUT / "ablation.md", "a", encoding="utf-8") as f:
    f.write(f"\n## Known duplicates among mined negatives\n\n{DUP_MD}\n")
summary = json.loads((OUT / "ablation.json").read_text())
summary["duplicates"] = DUPS
(OUT / "ablation.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
print("checks passed")

# %% [markdown]
# ## Reading the table
#
# - The known duplicates of the corpus are real false negatives for a *mining* sampler: they sit near
#   the positive in the ranking (identical docstring summary, often near-identical code), so the
#   unfiltered top of a BM25 or dense ranking contains them (section 3), while random in-batch
#   negatives almost never do (the `in_batch` rate).
# - `faiss_hard_filtered` drops them before the rank window (filter `known_duplicates`) and also drops
#   candidates scoring above 95% of the positive (`positive_aware`), so its "after" rate is 0;
#   `exclude_duplicates: true` does the same by id in the shipped `bm25` / `faiss_hard` configs.
# - Test MRR at smoke scale is noise (a few steps on a few hundred pairs); run the full scale for the
#   numbers (see `notebooks/README.md`).
