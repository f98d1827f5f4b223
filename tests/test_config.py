"""Config composition, overrides, validation errors (key + file + choices) and the saved resolved config."""
from __future__ import annotations

from pathlib import Path

import pytest

from contrastive.cli import load_config, main
from contrastive.config.errors import ConfigError
from contrastive.config.loader import compose, save_resolved

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "configs" / "codesearch" / "infonce.yaml"


def test_composes_groups_and_applies_overrides_in_order():
    cfg = load_config(EXP, ["loss.temperature=0.2", "trainer.max_epochs=3", "model.encoder.dim=64"])
    assert cfg["loss"]["name"] == "infonce" and cfg["loss"]["temperature"] == 0.2
    assert cfg["trainer"]["max_epochs"] == 3
    assert cfg["model"]["encoder"]["dim"] == 64
    assert cfg["data"]["name"] == "codesearch"
    assert "defaults" not in cfg


def test_group_override_swaps_the_whole_group(tmp_path):
    root = tmp_path / "configs"
    (root / "loss").mkdir(parents=True)
    (root / "exp").mkdir()
    (root / "loss" / "a.yaml").write_text("name: infonce\ntemperature: 0.3\nsymmetric: true\n")
    (root / "loss" / "b.yaml").write_text("name: infonce\ntemperature: 0.7\n")
    (root / "exp" / "e.yaml").write_text("defaults:\n  - loss: a\nexperiment: e\nloss:\n  learnable_temperature: true\n")
    cfg, prov = compose(root / "exp" / "e.yaml", ["loss=b"])
    assert cfg.loss.temperature == 0.7 and "symmetric" not in cfg.loss  # b replaced a entirely
    assert cfg.loss.learnable_temperature is True  # the experiment body still applies on top
    assert prov.of("loss.temperature").endswith("b.yaml")
    assert prov.of("loss.learnable_temperature").endswith("e.yaml")


@pytest.mark.parametrize(
    "override, expected",
    [
        (["loss.temprature=0.1"], ["unknown key 'loss.temprature'", "command line", "temperature", "symmetric"]),
        (["trainer.max_epochs=abc"], ["trainer.max_epochs", "must be int", "'abc'"]),
        (["loss.name=nope"], ["unknown loss 'nope'", "loss.name", "valid choices", "infonce"]),
        (["loss=nope"], ["loss=nope", "no file", "nope.yaml", "valid choices", "infonce"]),
        (["model.encoder.pooling=sum"], ["model.encoder.pooling", "'attention', 'weighted_mean', 'mean', 'max'"]),
        (["model.encoder.name=nope"], ["unknown encoder 'nope'", "transformer"]),
        (["bogus=1"], ["unknown key 'bogus'", "valid keys", "trainer"]),
        (["data.batch_sise=3"], ["unknown key 'data.batch_sise'", "batch_size"]),
    ],
)
def test_config_errors_name_key_source_and_choices(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(EXP, override)
    for piece in expected:
        assert piece in str(e.value), (piece, str(e.value))


def test_error_names_the_file_the_bad_key_came_from(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXP.read_text().replace("loss:\n  temperature:", "loss:\n  temperatur:"))
    with pytest.raises(ConfigError, match=r"loss.temperatur.*bad.yaml"):
        load_config(bad, [])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", [])


def test_missing_group_file_in_defaults(tmp_path):
    exp = tmp_path / "configs" / "x" / "e.yaml"
    (tmp_path / "configs" / "loss").mkdir(parents=True)
    exp.parent.mkdir(parents=True)
    exp.write_text("defaults:\n  - loss: ghost\nexperiment: e\n")
    with pytest.raises(ConfigError, match=r"loss=ghost.*e.yaml.*no file"):
        compose(exp, [])


def test_saved_resolved_config_relaunches_alone(tmp_path):
    cfg, _ = compose(EXP, ["loss.temperature=0.07"])
    save_resolved(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml", [])
    assert again == load_config(EXP, ["loss.temperature=0.07"])
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_cli_user_error_is_one_line_and_nonzero(capsys):
    code = main(["fit", str(EXP), "loss.temprature=0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "loss.temprature" in err and "Traceback" not in err
    with pytest.raises(ConfigError):
        main(["--debug", "fit", str(EXP), "loss.temprature=0.1"])
