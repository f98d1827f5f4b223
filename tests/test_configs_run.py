"""Every YAML config runs: each experiment in configs/codesearch/ and each group file under configs/ is
trained for a couple of steps (and tested) through the real CLI on a tiny corpus."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from contrastive.cli import main
from tests.test_cli_e2e import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "codesearch").glob("*.yaml"))
GROUP_FILES = {g: sorted(p.stem for p in (ROOT / "configs" / g).glob("*.yaml"))
               for g in ("loss", "sampler", "model", "data", "trainer", "optim")}
FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "eval.bm25_baseline=false"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A plain InfoNCE run that the frozen-model Soft-InfoNCE config reads its estimates from."""
    tmp = tmp_path_factory.mktemp("base")
    assert main(["fit", str(ROOT / "configs/codesearch/infonce.yaml"), *tiny_overrides(tmp), *FAST]) == 0
    return tmp, tmp / "runs" / "codesearch_infonce" / "version_0"


def _fit(exp: Path, tmp: Path, extra: list[str]) -> dict:
    overrides = tiny_overrides(tmp) + FAST + extra
    assert main(["fit", str(exp), *overrides]) == 0
    runs = sorted((tmp / "runs").glob("*/version_*"), key=lambda p: p.stat().st_mtime)
    res = json.loads((runs[-1] / "results.json").read_text())
    assert 0.0 <= res["test"]["mrr"] <= 1.0
    return res


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_config_trains_and_tests(exp, base_run, tmp_path):
    base_tmp, base = base_run
    extra: list[str] = []
    if exp.stem == "soft_infonce_frozen":
        extra = [f"model.similarity_estimator.run_dir={base}", f"data.tokenizer_dir={base / 'tokenizer'}"]
    if exp.stem == "gradcache":
        extra = ["data.batch_size=32", "model.cache_chunk_size=8"]
    _fit(exp, tmp_path, extra)


#: group files already trained by the experiments above (their defaults and losses)
COVERED = {("loss", "infonce"), ("loss", "dcl"), ("loss", "hcl"), ("loss", "soft_infonce"), ("loss", "cement"),
           ("loss", "slipform"), ("sampler", "in_batch"), ("model", "tiny_transformer"), ("data", "codesearch"),
           ("trainer", "cpu"), ("optim", "adamw")}
UNCOVERED = [(g, n) for g, names in GROUP_FILES.items() for n in names if (g, n) not in COVERED]


@pytest.mark.parametrize("group, name", UNCOVERED, ids=[f"{g}={n}" for g, n in UNCOVERED])
def test_every_other_group_file_trains(group, name, tmp_path):
    """Group files that no experiment uses, swapped into the InfoNCE experiment with ``group=name``."""
    extra = [f"{group}={name}"]
    if group == "sampler" and name in ("faiss_hard", "faiss_hard_filtered", "ngame"):
        extra += ["trainer.max_epochs=2"]  # refreshed from the second epoch on
    _fit(ROOT / "configs/codesearch/infonce.yaml", tmp_path, extra)


def test_coverage_lists_are_real_files():
    for group, name in COVERED:
        assert (ROOT / "configs" / group / f"{name}.yaml").is_file(), (group, name)
