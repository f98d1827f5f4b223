"""``notebooks/_ablation.finished_run``: which finished run a notebook may reuse (CONTRASTIVE_NOTEBOOK_REUSE)."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
from _ablation import finished_run  # noqa: E402

CFG = {"experiment": "x", "seed": 0, "model": {"width": 8}, "run": {"output_dir": "/a", "num_threads": 2, "save_every": 5}}


def _run(root: Path, version: int, cfg: dict, files=("results.json",), stamp: tuple[str, str] | None = None) -> Path:
    d = root / f"version_{version}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    for f in files:
        (d / f).write_text("{}")
    if stamp:
        (d / stamp[0]).write_text(stamp[1] + "\n")
    return d


def test_same_config_apart_from_where_it_ran_is_reused(tmp_path):
    moved = {**CFG, "run": {**CFG["run"], "output_dir": "/elsewhere", "num_threads": 1}}
    run = _run(tmp_path, 0, moved)
    assert finished_run(tmp_path, CFG) == run


def test_a_different_setting_or_an_unfinished_run_is_not_reused(tmp_path):
    _run(tmp_path, 0, {**CFG, "seed": 1})
    _run(tmp_path, 1, {**CFG, "run": {**CFG["run"], "save_every": 6}})  # a run key that changes what runs
    _run(tmp_path, 2, CFG, files=())                                    # no results.json: not finished
    assert finished_run(tmp_path, CFG) is None
    assert finished_run(tmp_path / "missing", CFG) is None


def test_latest_matching_version_wins_numerically_and_required_files_count(tmp_path):
    _run(tmp_path, 2, CFG)
    ten = _run(tmp_path, 10, CFG)
    assert finished_run(tmp_path, CFG) == ten                    # version_10 after version_2
    assert finished_run(tmp_path, CFG, required=("results.json", "test_items.json")) is None


def test_stamp_must_match(tmp_path):
    run = _run(tmp_path, 0, CFG, stamp=("corpus.sha", "abc"))
    assert finished_run(tmp_path, CFG, stamp=("corpus.sha", "abc")) == run
    assert finished_run(tmp_path, CFG, stamp=("corpus.sha", "def")) is None
    assert finished_run(tmp_path, CFG, stamp=("other.sha", "abc")) is None
