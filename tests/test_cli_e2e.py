"""A tiny end-to-end ``fit`` + ``test`` + ``eval`` + ``--resume`` through the real CLI entry point."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import yaml

from contrastive.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "configs" / "codesearch" / "infonce.yaml"
STD = Path(sysconfig.get_paths()["stdlib"])


def tiny_overrides(tmp_path: Path) -> list[str]:
    roots = ",".join(str(STD / p) for p in ("json", "email", "http", "xml", "logging", "urllib", "concurrent", "importlib"))
    return [
        f"data.path=[{roots}]", f"data.cache_dir={tmp_path / 'cache'}", "data.max_pairs=600", "data.vocab_size=600",
        "data.batch_size=16", "data.max_doc_length=64", "data.split_method=balanced",
        "model.encoder.dim=32", "model.projection_dim=32",
        "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "optim.warmup_steps=2", f"run.output_dir={tmp_path / 'runs'}",
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    assert main(["fit", str(EXP), *tiny_overrides(tmp)]) == 0
    return tmp, tmp / "runs" / "codesearch_infonce" / "version_0"


def test_fit_writes_run_directory_and_results(fitted, capsys):
    tmp, run = fitted
    for rel in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "tokenizer", "results.json",
                "corpus.json", "learning_curve.png", "learning_curve.csv", "test_ranks.json"):
        assert (run / rel).exists(), rel
    assert list(run.glob("events.out.tfevents*")), "TensorBoard log missing"
    res = json.loads((run / "results.json").read_text())
    for key in ("mrr", "recall@1", "recall@5", "recall@10", "ndcg@10", "csn_mrr"):
        assert 0.0 <= res["test"][key] <= 1.0
        assert 0.0 <= res["bm25"][key] <= 1.0
    assert res["test"]["corpus_size"] > 10
    ranks = json.loads((run / "test_ranks.json").read_text())  # per-query ranks behind the test MRR
    assert len(ranks["rank"]) == len(ranks["pair_id"]) == res["test"]["corpus_size"]
    assert sum(1.0 / r for r in ranks["rank"]) / len(ranks["rank"]) == pytest.approx(res["test"]["mrr"], abs=1e-6)
    # BM25's ranks of the same queries, and the paired test of the model against it
    assert len(ranks["bm25_rank"]) == len(ranks["rank"])
    bm25_mrr = sum(1.0 / r for r in ranks["bm25_rank"]) / len(ranks["bm25_rank"])
    assert bm25_mrr == pytest.approx(res["bm25"]["mrr"], abs=1e-6)
    vs = res["model_vs_bm25"]
    assert vs["diff"] == pytest.approx(res["test"]["mrr"] - bm25_mrr, abs=1e-6) and vs["n"] == len(ranks["rank"])
    assert vs["ci_low"] <= vs["diff"] <= vs["ci_high"] and 0.0 < vs["p_value"] <= 1.0
    corpus = json.loads((run / "corpus.json").read_text())
    assert len(corpus["content_fingerprint"]) == 40 and corpus["splits"]["test"] == res["test"]["corpus_size"]
    curve = (run / "learning_curve.csv").read_text().splitlines()
    # 2 epochs, validated at each epoch end
    assert curve[0] == "metric,step,value" and sum(line.startswith("val/mrr,") for line in curve) == 2
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "defaults" not in saved and saved["data"]["max_pairs"] == 600


def test_test_and_eval_from_run_directory(fitted, capsys):
    tmp, run = fitted
    assert main(["test", str(run)]) == 0
    out = capsys.readouterr().out
    assert "test/mrr" in out
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| model |" in out and "| bm25 |" in out


def test_relaunch_from_saved_config_and_resume(fitted):
    tmp, run = fitted
    # resume the run from its last checkpoint for one more epoch
    assert main(["fit", str(run), "--resume", str(run), "trainer.max_epochs=3", "run.test_after_fit=false",
                 "--allow-config-change"]) == 0
    assert (run / "config.before_resume_0.yaml").is_file()  # the config the run was trained with
    metrics = (run / "metrics.csv").read_text()
    assert "epoch" in metrics
    # relaunch a fresh run from the saved config file alone
    assert main(["fit", str(run / "config.yaml"), "trainer.max_epochs=1", "run.test_after_fit=false"]) == 0
    assert (run.parent / "version_1" / "checkpoints" / "last.ckpt").is_file()


def test_missing_corpus_path_is_a_one_line_error(tmp_path, capsys):
    code = main(["fit", str(EXP), "data.path=/nonexistent/corpus", f"data.cache_dir={tmp_path}",
                 f"run.output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "/nonexistent/corpus" in err[0]
