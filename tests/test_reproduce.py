"""The training core reproduces numbers recorded before the one-core refactor (issue 12), at a fixed seed.

``tests/data/reproduce_baseline.json`` holds test metrics and losses measured with the code of main at
commit 825f6b2 (before :class:`~contrastive.models.contrastive.ContrastiveModule` replaced the dual
encoder's own training step). Two levels:

- ``module``: a tiny text dual encoder trained for a few steps on fixed synthetic token batches through
  Lightning (in-batch, extra negatives with a filter chain, GradCache, memory queue): every step's loss and
  the final test metrics. Independent of the corpus pipeline.
- ``fit``: ``contrastive fit configs/codesearch/infonce.yaml`` (and ``infonce_filtered`` with the refreshed
  ``faiss_hard_filtered`` sampler under GradCache) on a tiny stdlib corpus with every model and data
  setting pinned; the test metrics of ``results.json``. The fit depends on the corpus extraction and the
  tokenizer of the code-search setting: a change there that is meant to alter the data needs a new
  recording. Its epochs run to the end (no ``limit_train_batches``): the seeded shuffle of a plain
  loader draws one more permutation when an epoch is exhausted, which the resumable batch sampler
  (:class:`~contrastive.data.resumable.ShuffleBatchSampler`) replays for whole epochs only.

Tolerances allow floating-point reduction order only. Record again (only when a change is meant to
alter the numbers) with ``python -m tests.test_reproduce --record``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tests" / "data" / "reproduce_baseline.json"
METRICS = ("mrr", "recall@1", "recall@5", "recall@10", "ndcg@10", "csn_mrr")

#: every setting of the model pinned (the default model of the code-search configs may change)
PINNED_MODEL = [
    "model=tiny_transformer", "model.encoder.name=transformer", "model.encoder.dim=32", "model.encoder.ff_dim=64",
    "model.encoder.num_layers=1", "model.encoder.num_heads=4", "model.encoder.max_length=256",
    "model.encoder.dropout=0.1", "model.encoder.pooling=mean", "model.projection_dim=32", "model.normalize=true",
    "model.mask_known_duplicates=true",
]
#: the pre-refactor values of settings whose defaults changed later (code-search recipe of issue 15)
PINNED_RECIPE = ["optim.lr=0.001", "data.code_aware=false", "trainer.val_check_interval=1.0", "sampler=in_batch"]
FIT_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "infonce": ("configs/codesearch/infonce.yaml", ["loss.temperature=0.05"]),
    "faiss_hard_filtered_gradcache": ("configs/codesearch/infonce_filtered.yaml",
                                      ["loss.temperature=0.05", "sampler=faiss_hard_filtered", "model.cache_chunk_size=8"]),
}
#: recorded too (tests/data/reproduce_baseline.json) but not rerun by the suite, to keep it fast: the queue
#: and momentum encoder are covered at module level ("queue_momentum" above)
EXTRA_FIT_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "queue_momentum": ("configs/codesearch/infonce.yaml", ["loss.temperature=0.05", "sampler=queue", "sampler.size=48",
                                                           "sampler.momentum=0.9"]),
}


def _fit(config: str, extra: list[str], tmp: Path) -> dict[str, float]:
    import sysconfig

    from contrastive.cli import main

    std = Path(sysconfig.get_paths()["stdlib"])
    roots = ",".join(str(std / p) for p in ("json", "email", "http", "xml", "logging", "urllib", "concurrent",
                                             "importlib"))
    overrides = [
        f"data.path=[{roots}]", f"data.cache_dir={tmp / 'cache'}", "data.source=local", "data.max_pairs=300",
        "data.vocab_size=600", "data.batch_size=16", "data.max_query_length=32", "data.max_doc_length=64",
        "data.split_method=balanced", *PINNED_MODEL, *PINNED_RECIPE, "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false", "optim.warmup_steps=2", "eval.bm25_baseline=false", "seed=0",
        f"run.output_dir={tmp / 'runs'}", *extra,
    ]
    assert main(["fit", str(ROOT / config), *overrides]) == 0
    run = next((tmp / "runs").glob("*/version_0"))
    res = json.loads((run / "results.json").read_text())["test"]
    return {k: float(res[k]) for k in METRICS}


# ------------------------------------------------------------------------------------------------ module level
def _module_batches(n_batches: int = 4, b: int = 8, vocab: int = 40) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for k in range(n_batches):
        q = torch.randint(1, vocab, (b, 6), generator=g)
        d = torch.cat([q[:, :3], torch.randint(1, vocab, (b, 5), generator=g)], dim=1)  # learnable overlap
        ids = torch.arange(b) + 100 * k
        groups = ids.clone()
        groups[1] = groups[0]  # one known duplicate per batch
        neg = torch.randint(1, vocab, (4, 8), generator=g)
        out.append({"query_ids": q, "query_mask": torch.ones_like(q, dtype=torch.bool), "doc_ids": d,
                    "doc_mask": torch.ones_like(d, dtype=torch.bool), "pair_id": ids, "dup_group": groups,
                    "neg_ids": neg, "neg_mask": torch.ones_like(neg, dtype=torch.bool),
                    "neg_pair_id": torch.arange(4) + 10_000 + 10 * k, "neg_dup_group": torch.arange(4) + 10_000 + 10 * k})
    return out


MODULE_VARIANTS: dict[str, dict[str, Any]] = {
    "in_batch": {},
    "negatives_filtered": {"filters": "positive_aware"},
    "gradcache_symmetric": {"cache_chunk_size": 3, "symmetric": True},
    "queue_momentum": {"queue_size": 12, "momentum": 0.9},
}


def _module_run(variant: str) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader

    from contrastive.encoders import TransformerTextEncoder
    from contrastive.filters import PositiveAwareFilter
    from contrastive.losses import InfoNCELoss
    from datamodules.codesearch.model import DualEncoderModule

    kw = dict(MODULE_VARIANTS[variant])
    symmetric = kw.pop("symmetric", False)
    if kw.pop("filters", None):
        kw["filters"] = [PositiveAwareFilter(mode="perc", perc=0.9)]
    batches = _module_batches()
    if variant == "in_batch":
        batches = [{k: v for k, v in x.items() if not k.startswith("neg_")} for x in batches]
    L.seed_everything(3, verbose=False)
    enc = TransformerTextEncoder(40, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=16, dropout=0.1)
    model = DualEncoderModule(enc, InfoNCELoss(temperature=0.1, symmetric=symmetric), projection_dim=8,
                              lr=1e-2, warmup_steps=1, **kw)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Record()], deterministic=True)
    collate = lambda xs: xs[0]  # noqa: E731
    trainer.fit(model, DataLoader(batches, batch_size=1, collate_fn=collate))
    test = [{k: v for k, v in x.items() if not k.startswith("neg_")} for x in batches]
    trainer.test(model, DataLoader(test, batch_size=1, collate_fn=collate), verbose=False)
    metrics = {k.split("/", 1)[1]: float(v) for k, v in model.last_metrics.items() if k.split("/", 1)[1] in METRICS}
    return {"losses": losses, "metrics": metrics}


def _baseline() -> dict[str, Any]:
    if not BASELINE.is_file():
        pytest.fail(f"{BASELINE} is missing: record it with python -m tests.test_reproduce --record")
    return json.loads(BASELINE.read_text())


@pytest.mark.parametrize("variant", sorted(MODULE_VARIANTS))
def test_module_reproduces_recorded_losses_and_metrics(variant):
    want = _baseline()["module"][variant]
    got = _module_run(variant)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-4, atol=1e-5)
    for k, v in want["metrics"].items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-4), k


@pytest.mark.parametrize("variant", sorted(FIT_VARIANTS))
def test_fit_reproduces_recorded_test_metrics(variant, tmp_path):
    want = _baseline()["fit"][variant]
    config, extra = FIT_VARIANTS[variant]
    got = _fit(config, extra, tmp_path)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=2e-3), (k, got, want)


def _record() -> None:
    import tempfile

    torch.set_num_threads(1)
    out: dict[str, Any] = {"recorded_at_commit": "825f6b2", "module": {}, "fit": {}}
    for v in MODULE_VARIANTS:
        out["module"][v] = _module_run(v)
        print(v, out["module"][v], flush=True)
    for v, (config, extra) in {**FIT_VARIANTS, **EXTRA_FIT_VARIANTS}.items():
        with tempfile.TemporaryDirectory() as tmp:
            out["fit"][v] = _fit(config, extra, Path(tmp))
        print(v, out["fit"][v], flush=True)
    BASELINE.parent.mkdir(parents=True, exist_ok=True)
    BASELINE.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        _record()
