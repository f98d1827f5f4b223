"""Helpers shared by the ablation notebooks: rows trained with several seeds, reported as mean ± std, each
tested against a baseline row by a paired test over the test queries (:mod:`contrastive.metrics.significance`).

Every run directory must hold ``results.json`` and ``test_ranks.json`` (written by ``contrastive fit``).
:func:`finished_run` finds a finished run with a given resolved config, so a long notebook can continue
where an interrupted one stopped (``CONTRASTIVE_NOTEBOOK_REUSE=1``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml

from contrastive.metrics.significance import compare_to_baseline, mean_std, reciprocal_ranks, significance_mark

KEYS = ("mrr", "recall@1", "recall@10", "csn_mrr")


#: ``run`` keys that say where and on how many threads a run was computed, not what it computed
WHERE_KEYS = ("output_dir", "num_threads")


def _what_runs(cfg: Mapping) -> dict:
    """A resolved config without the ``run`` keys of :data:`WHERE_KEYS`."""
    run = {k: v for k, v in (cfg.get("run") or {}).items() if k not in WHERE_KEYS}
    return {**cfg, "run": run}


def finished_run(runs_dir: Path, want: Mapping, required: Sequence[str] = ("results.json",),
                 stamp: tuple[str, str] | None = None) -> Path | None:
    """The latest ``runs_dir/version_*`` that finished (holds ``config.yaml`` and every file of
    ``required``) with the resolved config ``want`` (as :func:`contrastive.cli.load_config` gives it;
    ``run.output_dir`` and ``run.num_threads`` are not compared). With ``stamp = (file, text)`` the run must also hold ``file``
    whose stripped content is ``text`` (e.g. the fingerprint of the corpus it was checked to use)."""
    target = _what_runs(want)
    runs = sorted(Path(runs_dir).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for run_dir in reversed(runs):
        if not all((run_dir / f).is_file() for f in ("config.yaml", *required)):
            continue
        if stamp is not None and not ((run_dir / stamp[0]).is_file()
                                      and (run_dir / stamp[0]).read_text().strip() == stamp[1]):
            continue
        if _what_runs(yaml.safe_load((run_dir / "config.yaml").read_text())) == target:
            return run_dir
    return None


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
    metrics: dict[str, list[dict]] = {}
    per_query: dict[str, list[np.ndarray]] = {}
    ids_ref = None
    for name, dirs in runs.items():
        metrics[name] = [json.loads((Path(d) / "results.json").read_text())["test"] for d in dirs]
        per_query[name] = []
        for d in dirs:
            ids, rr = run_reciprocal_ranks(Path(d))
            if ids_ref is None:
                ids_ref = ids
            if not np.array_equal(ids, ids_ref):
                raise ValueError(f"{d}: tested on other queries than {runs[next(iter(runs))][0]} (different corpus?)")
            per_query[name].append(rr)
    return tested_table(metrics, {"mrr": per_query}, baseline, label, keys, n_resamples, runs)


def tested_table(metrics: Mapping[str, Sequence[Mapping[str, float]]],
                 per_item: Mapping[str, Mapping[str, Sequence[np.ndarray]]], baseline: str, label: str,
                 keys: Sequence[str], n_resamples: int = 10000,
                 runs: Mapping[str, Sequence[Path]] | None = None) -> tuple[str, dict[str, dict]]:
    """Markdown table and rows: per system (keys of ``metrics``, one metrics dict per seed) the mean ± std
    of ``keys``; then for each tested measure ``m`` of ``per_item`` (``m -> system -> one per-item score
    array per seed``, the same items in the same order) ``Δ m`` against ``baseline`` (seed-averaged) and the
    p-value of a paired randomization test over the items of the scores averaged over seeds
    (``*`` p < 0.05, ``**`` p < 0.01, with the sign). ``rows[system]["tests"][m]`` holds each test;
    ``"test_vs_baseline"`` is the first measure's."""
    tests = {m: compare_to_baseline(scores, baseline, n_resamples=n_resamples) for m, scores in per_item.items()}
    head = [label, "seeds", *keys, *(c for m in per_item for c in (f"Δ {m} vs {baseline}", "p (paired)"))]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    rows: dict[str, dict] = {}
    for name, results in metrics.items():
        row: dict = {"seeds": len(results), **{k: mean_std([r[k] for r in results]) for k in keys}}
        if runs is not None:
            row["runs"] = [str(d) for d in runs[name]]
        cells = [f"{row[k][0]:.4f} ± {row[k][1]:.4f}" for k in keys]
        for m in per_item:
            t = tests[m].get(name)
            if t is None:
                cells += ["(baseline)", "-"]
                continue
            row.setdefault("tests", {})[m] = {"diff": t.diff, "p_value": t.p_value, "method": t.method}
            row.setdefault("test_vs_baseline", row["tests"][m])
            cells += [f"{t.diff:+.4f} {significance_mark(t)}".strip(), f"{t.p_value:.4f}"]
        rows[name] = row
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows
