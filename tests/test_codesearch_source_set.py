"""The default code-search corpus comes from a fixed, named source set (standard library + pinned
distributions): unrelated packages on the path do not change it, and its fingerprints are stable."""
from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path

from datamodules.codesearch.corpus import build_local_corpus, content_fingerprint, resolve_source_set
from datamodules.codesearch.datamodule import CodeSearchDataModule

VERBS = ["parse", "load", "render", "merge", "split", "encode"]
NOUNS = ["config", "token", "table", "image", "record", "header"]


def _function(verb: str, noun: str, k: int) -> str:
    return (f"def {verb}_{noun}_{k}(value):\n"
            f'    """{verb.capitalize()} the {noun} number {k} from the value."""\n'
            f"    result = [value] * {k + 1}\n"
            f"    result.append('{noun}')\n"
            f"    return '{verb}', result\n\n\n")


def _fake_dist(site: Path, name: str, version: str, k: int, record: bool = True) -> None:
    """An installed distribution ``name`` with package ``name`` (two modules of documented functions)
    and a ``.dist-info`` whose ``RECORD`` lists its files (``record=False``: a bare package, no metadata)."""
    files = {f"{name}/__init__.py": "", f"{name}/core.py": "".join(
        _function(VERBS[(k + j) % 6], NOUNS[(2 * k + j) % 6], 10 * k + j) for j in range(5))}
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    if record:
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in [*files, f"{info.name}/METADATA"]))


PINNED = {"alpha": "1.0", "beta": "2.0", "gamma": "0.3", "delta": "4.1"}


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site-packages"
    for k, (name, version) in enumerate(PINNED.items()):
        _fake_dist(site, name, version, k)
    return site


def _build(site: Path, cache: Path):
    return build_local_corpus(packages=PINNED, stdlib=False, search_path=[str(site)], cache_dir=cache,
                              split_fractions=(0.5, 0.25, 0.25), split_method="balanced", use_cache=False)


def test_unrelated_package_does_not_change_the_corpus(tmp_path):
    site = _site(tmp_path)
    before = _build(site, tmp_path / "cache")
    assert {r.group for r in before.records()} == set(PINNED) and len(before) == 20
    assert before.meta["source_set"]["packages"] == PINNED and not before.meta["source_set"]["missing"]
    _fake_dist(site, "unrelated", "9.9", 7)  # installed with metadata
    _fake_dist(site, "loose", "0", 8, record=False)  # a bare package directory
    after = _build(site, tmp_path / "cache")
    assert after.meta["content_fingerprint"] == before.meta["content_fingerprint"]
    assert after.fingerprint == before.fingerprint
    assert [(r.query, r.document, r.split, r.source) for r in after.records()] == \
           [(r.query, r.document, r.split, r.source) for r in before.records()]
    # the site directory as a plain root *does* see the extra packages (so the check above can fail)
    as_root = build_local_corpus(site, cache_dir=tmp_path / "cache", use_cache=False,
                                 split_fractions=(0.5, 0.25, 0.25), split_method="balanced")
    assert {"unrelated", "loose"} <= {r.group for r in as_root.records()}
    assert content_fingerprint(as_root.records()) != before.meta["content_fingerprint"]


def test_default_source_set_ignores_a_fake_package_on_sys_path(tmp_path, monkeypatch):
    before = resolve_source_set()
    site = tmp_path / "extra"
    _fake_dist(site, "zz_fake_extra_pkg", "1.0", 3)
    monkeypatch.syspath_prepend(str(site))
    assert importlib.metadata.version("zz_fake_extra_pkg") == "1.0"
    after = resolve_source_set()
    assert after.files == before.files and after.description == before.description
    assert not any("zz_fake_extra_pkg" in rel for _, _, rel in after.files)
    assert before.description["stdlib"] and before.description["python"] == ".".join(map(str, sys.version_info[:3]))


def test_missing_or_moved_pins_are_reported(tmp_path, caplog):
    site = _site(tmp_path)
    with caplog.at_level(logging.WARNING, logger="datamodules.codesearch"):
        s = resolve_source_set({"alpha": "1.1", "beta": "2.0", "nothere": "1.0"}, stdlib=False, search_path=[str(site)])
    assert s.description["missing"] == ["nothere"]
    assert s.description["version_mismatch"] == ["alpha 1.0 (pinned 1.1)"]
    assert "nothere" in caplog.text and "alpha 1.0 (pinned 1.1)" in caplog.text
    assert "alpha==1.0, beta==2.0" in s.summary() and "missing: nothere" in s.summary()
    assert {rel for _, _, rel in s.files} == {"alpha/__init__.py", "alpha/core.py", "beta/__init__.py", "beta/core.py"}


def test_content_fingerprint_is_path_independent_and_provenance_is_reported(tmp_path):
    site = _site(tmp_path)
    a = _build(site, tmp_path / "cache")
    moved = tmp_path / "elsewhere" / "site-packages"
    moved.parent.mkdir()
    site.rename(moved)
    b = _build(moved, tmp_path / "cache")
    assert a.fingerprint != b.fingerprint  # cache key: paths and file times
    assert a.meta["content_fingerprint"] == b.meta["content_fingerprint"] == content_fingerprint(b.records())
    dm = CodeSearchDataModule(path=str(moved), cache_dir=str(tmp_path / "cache"), split_fractions=(0.5, 0.25, 0.25),
                              split_method="balanced", vocab_size=300, batch_size=2)
    p = dm.provenance()
    assert p["source"] == {"roots": [str(moved)]} and p["records"] == 20 and len(p["content_fingerprint"]) == 40
    assert p["content_fingerprint"][:16] in dm.provenance_summary()
