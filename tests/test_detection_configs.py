"""Every configs/detection/*.yaml trains a few steps and tests through the real CLI on tiny synthetic data,
and writes results.json with the COCO and LVIS-bucket metrics; config errors name the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from contrastive.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "detection").glob("*.yaml"))
TINY = ["data.num_categories=10", "data.train_images=12", "data.val_images=4", "data.test_images=4",
        "data.batch_size=4", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false",
        "run.num_threads=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("detcache")


def _overrides(tmp: Path, cache: Path) -> list[str]:
    return TINY + [f"data.cache_dir={cache}", f"run.output_dir={tmp / 'runs'}"]


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_detection_config_trains_and_tests(config, tmp_path, cache):
    assert main(["fit", str(config), *_overrides(tmp_path, cache)]) == 0
    run = next((tmp_path / "runs").glob("*/version_0"))
    res = json.loads((run / "results.json").read_text())
    for key in ("mAP", "AP50", "AP75", "APs", "AP_rare", "AP_common", "AP_frequent"):
        assert key in res["test"]
    assert 0.0 <= res["test"]["mAP"] <= 1.0
    assert res["time_per_epoch_s"] > 0 and len(res["epoch_times_s"]) == 1
    for cat in res["per_category"].values():
        assert cat["bucket"] in ("r", "c", "f") and cat["train_images"] >= 0
    assert res["bad_input"]["train"] == {"clipped": 0, "dropped_zero_area": 0, "missing_images": 0}
    # the saved config relaunches evaluation of the run
    assert main(["test", str(run)]) == 0


def test_category_samplers_and_relations_run(tmp_path, cache):
    cfg = str(ROOT / "configs" / "detection" / "category_query.yaml")
    for i, extra in enumerate((["category_sampler.name=random"], ["category_sampler.name=index_topk", "head.relation=self_attention"])):
        out = tmp_path / str(i)
        assert main(["fit", cfg, *_overrides(out, cache), "run.test_after_fit=false", *extra]) == 0


def test_config_errors_name_the_key(tmp_path, cache, capsys):
    cfg = str(ROOT / "configs" / "detection" / "linear.yaml")
    assert main(["fit", cfg, *_overrides(tmp_path, cache), "head.num_selected=5"]) == 2
    assert "head.num_selected" in capsys.readouterr().err
    assert main(["fit", cfg, *_overrides(tmp_path, cache), "category_sampler.name=random"]) == 2
    assert "category_query" in capsys.readouterr().err
    assert main(["fit", cfg, *_overrides(tmp_path, cache), "head.name=softmax"]) == 2
    assert "linear, category_query" in capsys.readouterr().err
    assert main(["mine", cfg]) == 2
    assert "not available for task 'detection'" in capsys.readouterr().err
    assert main(["fit", cfg, *_overrides(tmp_path, cache), "task=segmentation"]) == 2
    assert "unknown task 'segmentation'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("version_*"))
