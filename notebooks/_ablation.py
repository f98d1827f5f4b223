"""Helpers shared by the ablation notebooks: rows trained with several seeds, reported as mean ± std, each
tested against a baseline row by a paired test over the test queries (:mod:`contrastive.metrics.significance`).

Every run directory must hold ``results.json`` and ``test_ranks.json`` (written by ``contrastive fit``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from contrastive.metrics.significance import compare_to_baseline, mean_std, reciprocal_ranks, significance_mark

KEYS = ("mrr", "recall@1", "recall@10", "csn_mrr")


def run_reciprocal_ranks(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(pair_ids, 1 / rank)`` of a run's test queries, sorted by pair id."""
    data = json.loads((Path(run_dir) / "test_ranks.json").read_text())
    ids, ranks = np.asarray(data["pair_id"]), np.asarray(data["rank"])
    order = np.argsort(ids)
    return ids[order], reciprocal_ranks(ranks[order])


def seeds_table(runs: dict[str, Sequence[Path]], baseline: str, label: str, keys: Sequence[str] = KEYS,
                n_resamples: int = 10000) -> tuple[str, dict[str, dict]]:
    """Markdown table (one row per key of ``runs``, mean ± std over its seeds' test metrics) and the rows as
    a dict. The last columns give ``Δ MRR`` against ``baseline`` (seed-averaged) and the two-sided p-value
    of a paired randomization test over the test queries of the per-query reciprocal ranks averaged over
    seeds, marked ``*`` (p < 0.05) / ``**`` (p < 0.01) with the sign of the difference."""
    per_query: dict[str, list[np.ndarray]] = {}
    rows: dict[str, dict] = {}
    ids_ref = None
    for name, dirs in runs.items():
        results = [json.loads((Path(d) / "results.json").read_text())["test"] for d in dirs]
        rows[name] = {"seeds": len(dirs), "runs": [str(d) for d in dirs],
                      **{k: mean_std([r[k] for r in results]) for k in keys}}
        per_query[name] = []
        for d in dirs:
            ids, rr = run_reciprocal_ranks(Path(d))
            if ids_ref is None:
                ids_ref = ids
            if not np.array_equal(ids, ids_ref):
                raise ValueError(f"{d}: tested on other queries than {runs[next(iter(runs))][0]} (different corpus?)")
            per_query[name].append(rr)
    tests = compare_to_baseline(per_query, baseline, n_resamples=n_resamples)
    head = f"| {label} | seeds | " + " | ".join(keys) + " | Δ mrr vs " + baseline + " | p (paired) |"
    lines = [head, "|---" * (len(keys) + 4) + "|"]
    for name, row in rows.items():
        cells = [f"{row[k][0]:.4f} ± {row[k][1]:.4f}" for k in keys]
        t = tests.get(name)
        if t is not None:
            row["test_vs_baseline"] = {"diff": t.diff, "p_value": t.p_value, "method": t.method}
            cmp = [f"{t.diff:+.4f} {significance_mark(t)}".strip(), f"{t.p_value:.4f}"]
        else:
            cmp = ["(baseline)", "-"]
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " | " + " | ".join(cmp) + " |")
    return "\n".join(lines), rows
