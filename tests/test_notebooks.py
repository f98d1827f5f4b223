"""Every notebook under ``notebooks/`` (jupytext percent sources ``*.py``) executes top to bottom at smoke scale.

Each source is converted with jupytext and run with nbclient in a ``python3`` kernel that is *this*
interpreter (a kernelspec written to a temporary ``JUPYTER_PATH``), from the repository root, with
``CONTRASTIVE_NOTEBOOK_SCALE=smoke`` and its outputs in a temporary directory (``CONTRASTIVE_NOTEBOOK_OUT``).
A cell that raises (a failed ``assert`` included) fails the test with the cell's traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.py") if not p.name.startswith("_"))

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_notebooks_are_found():
    assert NOTEBOOKS, "no jupytext notebook sources under notebooks/"


@pytest.fixture()
def python3_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernelspec running ``sys.executable``, first on ``JUPYTER_PATH``."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


@pytest.mark.slow
@pytest.mark.parametrize("source", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_at_smoke_scale(source, python3_kernel, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("CONTRASTIVE_NOTEBOOK_SCALE", "smoke")
    monkeypatch.setenv("CONTRASTIVE_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = jupytext.read(source, fmt="py:percent")
    assert len(nb.cells) > 1, f"{source}: not a percent-format notebook (no cells)"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=python3_kernel,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    # keep the executed notebook beside its outputs for inspection
    import nbformat

    nbformat.write(nb, str(tmp_path / f"{source.stem}.ipynb"))
    if source.stem == "sampler_ablation":
        summary = json.loads((out / "ablation.json").read_text())
        assert [r["sampler"] for r in summary["rows"]] == ["in_batch", "bm25", "faiss_hard", "faiss_hard_top",
                                                           "faiss_hard_filtered", "ngame"]
        for r in summary["rows"]:
            assert 0.0 <= r["test"]["mrr"] <= 1.0
        # seeds table, filtered-vs-unfiltered table, seed-0 table
        assert (out / "ablation.md").read_text().count("| faiss_hard_filtered |") == 3
        assert set(summary["filter_rows"]) == {"faiss_hard_top", "faiss_hard_filtered"}
        assert 0.0 <= summary["filter_rows"]["faiss_hard_filtered"]["test_vs_baseline"]["p_value"] <= 1.0
        seed_rows = summary["seed_rows"]
        assert set(seed_rows) == {r["sampler"] for r in summary["rows"]} and summary["seeds"] == 2
        assert all(r["seeds"] == 2 and 0.0 <= r["test_vs_baseline"]["p_value"] <= 1.0
                   for k, r in seed_rows.items() if k != "in_batch")
        dups = summary["duplicates"]
        assert any(d["before"] > 0 for d in dups.values())
        assert all(d["after"] == 0 for k, d in dups.items() if "faiss_hard_filtered" in k)
    if source.stem == "loss_ablation":
        rows = json.loads((out / "loss_ablation.json").read_text())["rows"]
        assert set(rows) == {"infonce", "soft_infonce_bm25", "soft_infonce_simcse", "soft_infonce_frozen", "dcl", "hcl",
                             "cement", "infonce_filtered"}
        assert all(0.0 <= r["mrr"][0] <= 1.0 and r["seeds"] == 2 for r in rows.values())
        assert all(0.0 <= r["test_vs_baseline"]["p_value"] <= 1.0 for k, r in rows.items() if k != "infonce")
        assert "| BM25 (baseline) |" in (out / "loss_ablation.md").read_text()
    if source.stem == "clip_ablation":
        summary = json.loads((out / "clip_ablation.json").read_text())
        rows = summary["rows"]
        assert list(rows) == ["infonce", "neg_captions_random", "neg_captions_concreteness", "neg_images",
                              "mined_filtered", "cement"]
        assert all(r["seeds"] == summary["seeds"] == 2 and 0.0 <= r["comp/mean"][0] <= 1.0 for r in rows.values())
        assert all(set(r["tests"]) == {"t2i R@1", "comp"} and all(0.0 <= t["p_value"] <= 1.0 for t in r["tests"].values())
                   for k, r in rows.items() if k != "infonce")
        assert (out / "clip_ablation_scores.png").stat().st_size > 0
