"""Bad input and failed commands: every message names the file, key or line; every user error exits 2
before a run directory is created; a failed resume leaves the run directory byte-identical."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from tests.helpers import tiny_codesearch

from contrastive.cli import load_config, main
from contrastive.config.errors import ConfigError
from contrastive.runs import config_diff, read_checkpoint, run_csv_logger, snapshot

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "configs" / "codesearch" / "infonce.yaml"


def tiny(cache: Path, out: Path) -> list[str]:
    return tiny_codesearch(cache, out, epochs=1, checkpoint_every=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", str(EXP), *tiny(tmp / "cache", tmp / "runs")]) == 0
    return tmp, tmp / "runs" / "codesearch_infonce" / "version_0", [str(w.message) for w in caught]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------------------- config files
def test_overrides_read_numbers_as_yaml_1_2():
    cfg = load_config(EXP, ["optim.lr=1e-3", "optim.weight_decay=5e-2", "eval.chunk_size=4096", "loss.temperature=1E-1"])
    assert cfg["optim"]["lr"] == 1e-3 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["optim"]["weight_decay"] == 5e-2 and cfg["loss"]["temperature"] == 0.1
    cfg = load_config(EXP, ["optim.lr=1e6"])
    assert cfg["optim"]["lr"] == 1e6 and isinstance(cfg["optim"]["lr"], float)


def test_yaml_files_read_numbers_as_yaml_1_2(tmp_path):
    exp = tmp_path / "configs" / "codesearch" / "e.yaml"
    exp.parent.mkdir(parents=True)
    exp.write_text(EXP.read_text() + "optim:\n  lr: 3e-4\n")
    for group in ("data", "model", "loss", "sampler", "trainer", "optim"):
        shutil.copytree(ROOT / "configs" / group, tmp_path / "configs" / group)
    assert load_config(exp, [])["optim"]["lr"] == 3e-4


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\nloss:\n  temperature: [0.1\n  name: infonce\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, [])
    assert str(e.value).startswith(f"{bad}:4:7: not valid YAML: expected ',' or ']'"), str(e.value)


def test_empty_config_file_is_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty config file") as e:
        load_config(empty, [])
    assert str(empty) in str(e.value)


def test_non_utf8_config_file_is_named(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("experiment: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as e:
        load_config(bad, [])
    assert str(bad) in str(e.value) and "line 1" in str(e.value)


def test_override_without_key_is_not_a_file_name(capsys):
    with pytest.raises(ConfigError, match="empty key") as e:
        load_config(EXP, ["=3"])
    assert "'=3'" in str(e.value) and ".yaml" not in str(e.value)
    assert main(["fit", "=3"]) == 2
    assert "looks like an override" in one_line_error(capsys)


def test_unknown_deep_key_is_blamed_on_the_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(EXP, ["model.encoder.extra.depth.four=1"])
    msg = str(e.value)
    assert "model.encoder.extra" in msg and "(from command line)" in msg and "tiny_transformer.yaml" not in msg
    with pytest.raises(ConfigError) as e:
        load_config(EXP, ["trainer.callbacks.a.b=1"])
    assert "trainer.callbacks" in str(e.value) and "(from command line)" in str(e.value)


def test_constructor_error_exits_2_without_a_run_directory(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["fit", str(EXP), *tiny(tmp_path / "cache", out), "sampler=queue", "sampler.size=0"]) == 2
    msg = one_line_error(capsys)
    assert "sampler" in msg and "size" in msg
    assert not list(out.glob("*/version_*")), "a failed command left a run directory behind"


# ------------------------------------------------------------------------------------------- runs
def test_first_run_has_no_spurious_log_warning_and_atomic_metrics(trained):
    _, run, messages = trained
    assert not [m for m in messages if "will be deleted" in m or "exists and is not empty" in m], messages
    assert "step" in (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*.tmp"))
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["best.ckpt", "last.ckpt", "step-2.ckpt"]


def test_metrics_csv_is_replaced_atomically(tmp_path, monkeypatch):
    logger = run_csv_logger(str(tmp_path), "exp", "version_0")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    path = tmp_path / "exp" / "version_0" / "metrics.csv"
    before = path.read_bytes()
    logger.log_metrics({"b": 2.0}, step=1)  # a new column: the whole file is rewritten
    import csv

    def boom(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", boom)
    with pytest.raises(OSError):
        logger.save()
    assert path.read_bytes() == before and not list(path.parent.glob(".*.tmp"))


def test_failed_resume_with_changed_model_size_leaves_the_run_untouched(trained, capsys):
    tmp, run, _ = trained
    before = snapshot(run)
    args = ["fit", str(EXP), *tiny(tmp / "cache", tmp / "runs"), "model.encoder.dim=24", "--resume", str(run)]
    assert main(args) == 2  # the config differs: refused, naming the keys
    msg = one_line_error(capsys)
    assert "model.encoder.dim: 16 -> 24" in msg and "--allow-config-change" in msg and str(run / "config.yaml") in msg
    assert snapshot(run) == before
    assert main([*args, "--allow-config-change"]) == 2  # accepted config change, but the weights do not fit
    msg = one_line_error(capsys)
    assert "last.ckpt" in msg and "shape mismatch" in msg and "checkpoint (" in msg and "vs model (" in msg
    assert "anchor_tower.encoder" in msg and "weights_only" not in msg
    assert snapshot(run) == before


def test_failed_resume_with_corrupt_checkpoint_offers_the_newest_valid_one(trained, capsys, tmp_path):
    tmp, run0, _ = trained
    run = tmp_path / "runs" / "codesearch_infonce" / "version_0"
    shutil.copytree(run0, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # an interrupted copy
    before = snapshot(run)
    assert main(["fit", str(run), "--resume", str(run)]) == 2
    msg = one_line_error(capsys)
    assert str(last) in msg and "truncated" in msg and "newest valid checkpoint" in msg and "--ckpt" in msg
    assert ("best.ckpt" in msg or "step-2.ckpt" in msg) and "weights_only" not in msg
    assert snapshot(run) == before
    offered = msg.split("--ckpt ")[1].split()[0]
    assert read_checkpoint(offered)["global_step"] == 4  # the newest: best.ckpt at the end of the epoch
    # an older step checkpoint resumes mid-epoch, and the finished run writes a whole last.ckpt again
    assert main(["fit", str(run), "--resume", str(run), "--ckpt", str(run / "checkpoints" / "step-2.ckpt")]) == 0
    assert read_checkpoint(last)["global_step"] == 4


@pytest.mark.parametrize("content, words", [(b"", "empty checkpoint"), (b"hello, not a checkpoint", "not a checkpoint"),
                                            (b"PK\x03\x04 truncated zip", "truncated")])
def test_checkpoint_errors_name_the_file_and_the_problem(tmp_path, content, words):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    from contrastive.runs import CheckpointError

    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_eval_takes_a_run_directory_or_a_checkpoint(trained, capsys):
    tmp, run, _ = trained
    assert main(["eval", str(run / "checkpoints" / "last.ckpt")]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["checkpoint"].endswith("last.ckpt")


def test_eval_of_a_config_file_without_checkpoint_is_a_user_error(trained, capsys):
    tmp, run, _ = trained
    out = tmp / "runs_eval"
    for command in ("eval", "test", "validate"):
        assert main([command, str(EXP), *tiny(tmp / "cache", out)]) == 2
        msg = one_line_error(capsys)
        assert str(EXP) in msg and "--untrained" in msg and "run directory" in msg
    assert not out.exists() or not list(out.rglob("version_*"))


def test_untrained_evaluates_a_fresh_model_in_a_new_run(trained, capsys):
    tmp, _, _ = trained
    out = tmp / "runs_untrained"
    assert main(["eval", str(EXP), *tiny(tmp / "cache", out), "--untrained"]) == 0
    res = json.loads((out / "codesearch_infonce" / "version_0" / "results.json").read_text())
    assert res["checkpoint"] is None and 0.0 <= res["test"]["mrr"] <= 1.0


def test_mine_out_errors_name_the_users_path(trained, capsys, tmp_path):
    tmp, run, _ = trained
    a_file = tmp_path / "notadir"
    a_file.write_text("x")
    for out, words in ((tmp_path, "is a directory"), (a_file / "mined.npz", "is a file")):
        runs = tmp_path / "runs"
        assert main(["mine", str(EXP), *tiny(tmp / "cache", runs), "sampler=random", "--out", str(out)]) == 2
        msg = one_line_error(capsys)
        assert f"--out {out}" in msg and words in msg and ".tmp" not in msg
        assert not runs.exists() or not list(runs.rglob("version_*"))


def test_config_diff_lists_changed_added_and_removed_keys():
    old = {"a": {"b": 1, "c": 2}, "run": {"test_after_fit": True}}
    new = {"a": {"b": 1, "c": 3, "d": 4}, "run": {"test_after_fit": False}}
    assert config_diff(old, new) == [("a.c", 2, 3), ("a.d", "<absent>", 4)]


def test_error_found_while_lightning_sets_up_exits_2_without_a_run_directory(tmp_path, capsys):
    out = tmp_path / "runs"
    # the train split (a few hundred pairs) is smaller than one batch: found when the train loader is built
    assert main(["fit", str(EXP), *tiny(tmp_path / "cache", out), "data.batch_size=5000"]) == 2
    msg = one_line_error(capsys)
    assert "batch_size=5000" in msg
    assert not list(out.glob("*/version_*")), "a failed command left a run directory behind"


def test_files_that_are_not_lightning_checkpoints_are_named(tmp_path):
    import pickle

    import torch

    from contrastive.runs import CheckpointError

    path = tmp_path / "model.ckpt"
    torch.save({"weights": torch.ones(3)}, path)  # a torch file, but no state_dict
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and "not a Lightning checkpoint" in str(e.value) and "weights" in str(e.value)
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))  # a plain pickle
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and "not a checkpoint" in str(e.value) and "weights_only" not in str(e.value)
