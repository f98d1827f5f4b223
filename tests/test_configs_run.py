"""Every YAML config runs: each experiment of every setting folder (``configs/<setting>/``: files with a
``defaults`` list) and each group file (the other folders) is trained for a couple of steps (and tested)
through the real CLI on tiny data. The lists come from the folders, and the group files already covered
from the experiments' ``defaults``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from contrastive.cli import main
from tests.test_cli_e2e import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _defaults(path: Path) -> list:
    return list((yaml.safe_load(path.read_text()) or {}).get("defaults") or [])


def _task(path: Path) -> str:
    return str((yaml.safe_load(path.read_text()) or {}).get("task", "retrieval"))


#: folders of other tasks run through their own tests (configs/detection: tests/test_detection_configs.py)
OTHER_TASKS = {d for d in (ROOT / "configs").iterdir() if d.is_dir() and any(_task(p) != "retrieval" for p in d.glob("*.yaml"))}
FOLDERS = sorted(d for d in (ROOT / "configs").iterdir() if d.is_dir() and d not in OTHER_TASKS)
SETTINGS = [d for d in FOLDERS if any(_defaults(p) for p in d.glob("*.yaml"))]
EXPERIMENTS = [p for d in SETTINGS for p in sorted(d.glob("*.yaml"))]
GROUP_FILES = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in FOLDERS if d not in SETTINGS}
FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "eval.bm25_baseline=false"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A plain InfoNCE run that the frozen-model Soft-InfoNCE config reads its estimates from."""
    tmp = tmp_path_factory.mktemp("base")
    assert main(["fit", str(ROOT / "configs/codesearch/infonce.yaml"), *tiny_overrides(tmp), *FAST]) == 0
    return tmp, tmp / "runs" / "codesearch_infonce" / "version_0"


def clip_overrides(tmp: Path) -> list[str]:
    """The clip setting at smoke scale: a few dozen generated scenes, two batches."""
    return [f"data.cache_dir={tmp / 'cache'}", "data.scenes.n_train=48", "data.scenes.n_valid=12",
            "data.scenes.n_test=12", "data.scenes.n_zeroshot=10", "data.batch_size=16", "optim.warmup_steps=2",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", f"run.output_dir={tmp / 'runs'}"]


def _fit(exp: Path, tmp: Path, extra: list[str]) -> dict:
    overrides = (clip_overrides(tmp) if exp.parent.name == "clip" else tiny_overrides(tmp)) + FAST + extra
    assert main(["fit", str(exp), *overrides]) == 0
    runs = sorted((tmp / "runs").glob("*/version_*"), key=lambda p: p.stat().st_mtime)
    res = json.loads((runs[-1] / "results.json").read_text())
    assert 0.0 <= res["test"]["mrr"] <= 1.0
    if exp.parent.name == "clip":  # per-item outcomes behind the figures (paired tests in the notebook)
        items = json.loads((runs[-1] / "test_items.json").read_text())
        for d in ("t2i", "i2t"):
            assert sum(r == 1 for r in items[f"{d}/rank"]) / len(items[f"{d}/rank"]) == pytest.approx(res["test"][f"{d}/R@1"])
        for cat in set(items["comp/category"]):
            outcomes = [c for c, k in zip(items["comp/correct"], items["comp/category"]) if k == cat]
            assert sum(outcomes) / len(outcomes) == pytest.approx(res["test"][f"comp/{cat}"])
        assert len(items["comp/category"]) == len(items["comp/correct"]) == res["test"]["comp/num_items"]
    return res


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_config_trains_and_tests(exp, base_run, tmp_path):
    base_tmp, base = base_run
    extra: list[str] = []
    if exp.stem in ("soft_infonce_frozen", "soft_infonce_simcse"):  # read a finished run
        extra = [f"model.similarity_estimator.run_dir={base}", f"data.tokenizer_dir={base / 'tokenizer'}"]
    if exp.parent.name == "clip" and exp.stem == "mined_filtered":
        extra = ["trainer.max_epochs=2"]  # mined from the second epoch on
    if exp.stem == "gradcache":
        extra = ["data.batch_size=32", "model.cache_chunk_size=8"]
    _fit(exp, tmp_path, extra)


#: group files already trained by the experiments above (the groups named in their defaults lists)
COVERED = {(g, n) for p in EXPERIMENTS for entry in _defaults(p) if isinstance(entry, dict) for g, n in entry.items()}
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
