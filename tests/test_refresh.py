"""Negative refresh during training: a real tiny ``lightning.Trainer`` fit with an in-memory datamodule
wired with ``attach_sampler``; refresh epochs, cached tables (reuse on resume,
re-mining on a new key), the quality report, ``build_callbacks`` and ``contrastive mine``."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from contrastive.callbacks import NegativeRefreshCallback, NegativeReportCallback, build_callbacks
from contrastive.callbacks.learning_curve import LearningCurveCallback
from contrastive.samplers import (
    BM25NegativeSampler,
    FaissHardNegativeSampler,
    InBatchSampler,
    MinedTable,
    NGAMESampler,
    QueueSampler,
)
from contrastive.samplers.collate import TextRows, attach_sampler
from tests.helpers import tiny_model

N, BATCH, VOCAB = 32, 8, 50


class TinyTokenizer:
    """Word → id by a stable character hash (ids 1..VOCAB-1), right-padded with 0."""

    def encode_batch(self, texts, max_length):
        seqs = [[1 + sum(map(ord, w)) % (VOCAB - 1) for w in t.split()][:max_length] or [1] for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, ids > 0


class TinyDataModule(L.LightningDataModule):
    """``N`` (query, document) pairs in memory; item ``i`` is training row ``i``."""

    def __init__(self, sampler=None, n: int = N, batch_size: int = BATCH) -> None:
        super().__init__()
        self.sampler, self.n, self.batch_size = sampler, n, batch_size
        self.tokenizer = TinyTokenizer()
        self.max_query_length, self.max_doc_length = 8, 12
        topics = ["sort", "json", "file", "http", "image", "math", "date", "regex"]
        self.queries = [f"how to {topics[i % 8]} item {i} fast" for i in range(n)]
        self.docs = [f"def {topics[i % 8]}_{i} ( x ) : return {topics[i % 8]} x {i}" for i in range(n)]
        self.pair_ids = torch.arange(n) + 500
        self.groups = self.pair_ids.clone()
        self.groups[1] = self.groups[0]  # one known duplicate pair

    def setup(self, stage=None):
        self.loader = attach_sampler(
            self.sampler, list(range(self.n)), ids=self.pair_ids, groups=self.groups, base_collate=self.collate,
            candidate_inputs=TextRows(self.docs, lambda texts: self.tokenizer.encode_batch(texts, self.max_doc_length)),
            texts={"anchor": self.queries, "candidate": self.docs}, batch_size=self.batch_size,
            setup=self.sampler is not None and not self.sampler.is_setup)

    def collate(self, rows):
        idx = torch.as_tensor(rows)
        q_ids, q_mask = self.tokenizer.encode_batch([self.queries[i] for i in rows], self.max_query_length)
        d_ids, d_mask = self.tokenizer.encode_batch([self.docs[i] for i in rows], self.max_doc_length)
        return {"query_ids": q_ids, "query_mask": q_mask, "doc_ids": d_ids, "doc_mask": d_mask,
                "pair_id": self.pair_ids[idx], "dup_group": self.groups[idx]}

    def row_inputs(self, rows, side):
        texts, length = (self.queries, self.max_query_length) if side == "anchor" else (self.docs, self.max_doc_length)
        ids, mask = self.tokenizer.encode_batch([texts[i] for i in rows], length)
        return {"ids": ids, "mask": mask}

    def train_dataloader(self):
        return self.loader


class Recorder(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({"epoch": trainer.current_epoch, "rows": (batch["pair_id"] - 500).tolist(),
                             "negs": int(batch["neg_ids"].shape[0]) if "neg_ids" in batch else None})


def count_refreshes(sampler):
    calls = []
    original = sampler.refresh

    def wrapped(*args, **kw):
        calls.append(args[-1] if args else kw.get("step"))
        return original(*args, **kw)

    sampler.refresh = wrapped
    return calls


def fit(tmp_path, sampler, callback, max_epochs, ckpt_path=None, extra=(), seed=0, name="run"):
    torch.manual_seed(seed)
    model = tiny_model(dtype=torch.float32, warmup_steps=1)
    dm = TinyDataModule(sampler)
    rec = Recorder()
    trainer = L.Trainer(max_epochs=max_epochs, limit_val_batches=0, accelerator="cpu", devices=1,
                        logger=CSVLogger(str(tmp_path), name=name, version=0), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(extra), num_sanity_val_steps=0,
                        callbacks=[callback, rec, *extra], deterministic=True)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, rec


# ---------------------------------------------------------------------------------------------- faiss_hard
def test_refresh_epochs_tables_and_reports(tmp_path):
    sampler = FaissHardNegativeSampler(num_negatives=2, range_max=10, sampling="top", warmup="random")
    calls = count_refreshes(sampler)
    cb = NegativeRefreshCallback(sampler, every_n_epochs=1, start_epoch=1, cache_dir=str(tmp_path / "neg"),
                                 progress_bar=False)
    trainer, model, rec = fit(tmp_path, sampler, cb, max_epochs=3)
    assert [h["epoch"] for h in cb.history] == [1, 2] and len(calls) == 2
    assert all(h["source"] == "mined" for h in cb.history)
    assert trainer.train_dataloader.batch_sampler.epoch == 2 and sampler.epoch == 2  # Lightning's set_epoch
    assert all(b["negs"] > 0 for b in rec.batches)  # warm-up (epoch 0) and mined negatives reach the model
    tables = sorted((tmp_path / "neg").glob("table-*.npz"))
    assert len(tables) == 2
    for h in cb.history:
        t = MinedTable.load(tmp_path / "neg" / f"table-{h['key']}.npz", expected_key=h["key"], expected_rows=N)
        assert t.header["checkpoint"]["global_step"] == h["step"] and t.header["sampler"]["name"] == "faiss_hard"
        rep = json.loads((tmp_path / "neg" / f"step_{h['step']}.json").read_text())
        assert (tmp_path / "neg" / f"step_{h['step']}.png").stat().st_size > 1000
        after, before = rep["quality"]["after"], rep["quality"]["before"]
        assert after["dup_fraction"] == 0.0 and before["dup_fraction"] is not None
        assert {"mean_score", "median_score", "mean_margin", "frac_above_positive"} <= set(after)
    assert torch.equal(sampler.table.neg_rows, MinedTable.load(tables[0]).neg_rows) or \
        torch.equal(sampler.table.neg_rows, MinedTable.load(tables[1]).neg_rows)
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "negatives/after/dup_fraction" in metrics and "refresh/seconds" in metrics

    # same weights + same config → cached table; any change → re-mined
    n_before = len(calls)
    m1 = cb.refresh(trainer, model)
    assert cb.history[-1]["source"] == "mined" and len(calls) == n_before + 1  # final weights: new key
    cb.refresh(trainer, model)
    assert cb.history[-1]["source"] == "cache" and len(calls) == n_before + 1
    assert m1["refresh/from_cache"] == 0.0
    cb.config_fingerprint = "another tokenizer"
    cb.refresh(trainer, model)
    assert cb.history[-1]["source"] == "mined" and len(calls) == n_before + 2
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.train()
    cb.refresh(trainer, model)
    assert cb.history[-1]["source"] == "mined" and len(calls) == n_before + 3
    assert model.training  # refresh encodes in eval mode and restores the module's mode
    model.eval()
    cb.refresh(trainer, model)
    assert not model.training


def test_refresh_restores_training_mode_and_every_n_steps(tmp_path):
    sampler = FaissHardNegativeSampler(num_negatives=1, warmup="none", refresh_every_n_epochs=None,
                                       refresh_every_n_steps=3)
    calls = count_refreshes(sampler)
    cb = NegativeRefreshCallback(sampler, every_n_epochs=None, every_n_steps=3, cache_dir=str(tmp_path / "neg"),
                                 progress_bar=False)
    modes = []

    class Mode(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.training)

    trainer, model, rec = fit(tmp_path, sampler, cb, max_epochs=2, extra=(Mode(),))
    assert [h["step"] for h in cb.history] == [3, 6] and calls == [3, 6]  # 4 steps per epoch
    assert all(modes)
    assert rec.batches[0]["negs"] is None  # warmup="none": in-batch only before the first refresh (no neg_ inputs)
    assert rec.batches[-1]["negs"] > 0


def test_resume_reuses_cached_tables(tmp_path):
    cache = tmp_path / "neg"

    def run(max_epochs, ckpt=None, name="a"):
        sampler = FaissHardNegativeSampler(num_negatives=2, warmup="random")
        calls = count_refreshes(sampler)
        cb = NegativeRefreshCallback(sampler, every_n_epochs=2, start_epoch=1, cache_dir=str(cache), progress_bar=False)
        ck = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="e{epoch}", save_top_k=-1, every_n_epochs=1,
                             enable_version_counter=False)
        fit(tmp_path, sampler, cb, max_epochs, ckpt_path=ckpt, extra=(ck,), name=name)
        return sampler, cb, calls

    s_a, cb_a, calls_a = run(2)  # refresh at the start of epoch 1
    assert len(calls_a) == 1 and [h["epoch"] for h in cb_a.history] == [1]
    key = cb_a.history[0]["key"]
    # resume from the end of epoch 0: the refresh at epoch 1 has the same weights and step → cache hit
    s_b, cb_b, calls_b = run(2, ckpt=str(tmp_path / "ckpt" / "eepoch=0.ckpt"), name="b")
    assert calls_b == [] and cb_b.history[-1]["source"] == "cache" and cb_b.history[-1]["key"] == key
    assert torch.equal(s_b.table.neg_rows, s_a.table.neg_rows)
    # resume mid-schedule (end of epoch 1): the table in use at the checkpoint is reinstalled, nothing mined
    s_c, cb_c, calls_c = run(3, ckpt=str(tmp_path / "ckpt" / "eepoch=1.ckpt"), name="c")
    assert calls_c == [] and s_c.table is not None and s_c.table.header["key"] == key


# ---------------------------------------------------------------------------------------------- ngame
def test_ngame_refresh_follows_curriculum_and_batches_are_clusters(tmp_path):
    sampler = NGAMESampler(init_cluster_size=1, curriculum_epochs=[1, 2], refresh_interval=1, report_negatives=4)
    cb = NegativeRefreshCallback(sampler, cache_dir=str(tmp_path / "neg"), progress_bar=False)
    trainer, model, rec = fit(tmp_path, sampler, cb, max_epochs=3)
    assert [h["epoch"] for h in cb.history] == [1, 2]
    sizes = [json.loads((tmp_path / "neg" / f"step_{h['step']}.json").read_text())["mining_stats"]["cluster_size_nominal"]
             for h in cb.history]
    assert sizes == [2, 4]
    assert len(sampler.clusters) == 8 and all(len(c) == 4 for c in sampler.clusters)
    cluster_of = {i: ci for ci, c in enumerate(sampler.clusters) for i in c.tolist()}
    last = [b["rows"] for b in rec.batches if b["epoch"] == 2]
    assert sorted(sum(last, [])) == list(range(N))
    assert all(len({cluster_of[i] for i in b}) == 2 for b in last)  # batch of 8 = two whole clusters of 4
    assert all(b["negs"] is None for b in rec.batches)  # NGAME adds no extra negatives


# ---------------------------------------------------------------------------------------------- builders
def negative_callbacks(cfg: dict, job) -> list:
    """The sampler-driven callbacks of :func:`build_callbacks` (without the learning curve)."""
    return [c for c in build_callbacks(cfg, job) if not isinstance(c, LearningCurveCallback)]


def test_build_callbacks_per_sampler(tmp_path):
    job = SimpleNamespace(sampler=FaissHardNegativeSampler(num_negatives=1, refresh_every_n_epochs=2,
                                                           refresh_start_epoch=0), run_dir=tmp_path)
    (cb,) = negative_callbacks({"data": {"name": "x"}, "model": {"name": "dual_encoder"}}, job)
    assert isinstance(cb, NegativeRefreshCallback)
    assert (cb.every_n_epochs, cb.start_epoch, cb.cache_dir) == (2, 0, tmp_path / "negatives")
    assert isinstance(negative_callbacks({}, SimpleNamespace(sampler=NGAMESampler(), run_dir=tmp_path))[0],
                      NegativeRefreshCallback)
    dm = TinyDataModule()
    bm = BM25NegativeSampler(num_negatives=1)
    bm.setup(dm.pair_ids, dm.groups, texts={"anchor": dm.queries, "candidate": dm.docs})
    (rep,) = negative_callbacks({}, SimpleNamespace(sampler=bm, run_dir=tmp_path))
    assert isinstance(rep, NegativeReportCallback)
    assert negative_callbacks({}, SimpleNamespace(sampler=InBatchSampler(), run_dir=tmp_path)) == []
    assert negative_callbacks({}, SimpleNamespace(sampler=QueueSampler(8), run_dir=tmp_path)) == []
    assert negative_callbacks({"callbacks": {"negative_report": False}}, SimpleNamespace(sampler=bm, run_dir=tmp_path)) == []
    with pytest.raises(ValueError, match="callbacks.refresh.cache_dri"):
        negative_callbacks({"callbacks": {"refresh": {"cache_dri": "x"}}}, job)
    curve = build_callbacks({}, SimpleNamespace(sampler=InBatchSampler(), run_dir=tmp_path))
    assert [type(c) for c in curve] == [LearningCurveCallback]
    assert build_callbacks({"callbacks": {"learning_curve": False}}, SimpleNamespace(sampler=None, run_dir=tmp_path)) == []
    with pytest.raises(ValueError, match="every_n_epochs"):
        NegativeRefreshCallback(FaissHardNegativeSampler(), every_n_epochs=0)


def test_report_callback_writes_bm25_report(tmp_path):
    sampler = BM25NegativeSampler(num_negatives=1)
    cb = NegativeReportCallback(sampler, out_dir=str(tmp_path / "neg"))
    fit(tmp_path, sampler, cb, max_epochs=1)
    rep = json.loads((tmp_path / "neg" / "step_0.json").read_text())
    assert rep["sampler"] == "bm25" and rep["quality"]["after"]["dup_fraction"] == 0.0
    assert (tmp_path / "neg" / "step_0.png").is_file()


def test_persistent_workers_are_rejected(tmp_path):
    sampler = FaissHardNegativeSampler(num_negatives=1)
    cb = NegativeRefreshCallback(sampler, cache_dir=str(tmp_path), progress_bar=False)
    loader = SimpleNamespace(num_workers=2, persistent_workers=True)
    with pytest.raises(RuntimeError, match="persistent_workers"):
        cb._check_loader(SimpleNamespace(train_dataloader=loader))


# ---------------------------------------------------------------------------------------------- mine CLI
FUNCS = textwrap.dedent('''
    def {name}_{i}(items, key=None):
        """{verb} the {noun} items of the list and return them."""
        result = [x for x in items if x]
        result.sort(key=key)
        return result[{i}:]
''')


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    verbs = ["sort", "filter", "parse", "load", "merge", "split", "count", "encode"]
    nouns = ["json", "csv", "config", "user", "image", "token", "date", "graph"]
    for m in range(6):
        pkg = root / f"pkg{m}"
        pkg.mkdir()
        body = "".join(FUNCS.format(name=f"{verbs[(m + i) % 8]}_{nouns[i % 8]}", i=i, verb=verbs[(m + i) % 8],
                                    noun=nouns[(i * 3 + m) % 8]) for i in range(12))
        (pkg / "mod.py").write_text(body)
    return root


def mine_args(src, tmp, *extra):
    return ["mine", "configs/codesearch/infonce.yaml", "model=tiny_transformer", f"data.path={src}", f"data.cache_dir={tmp / 'cache'}",
            "data.vocab_size=300", "data.max_doc_length=32", "data.batch_size=8", "data.max_pairs=null",
            "model.encoder.dim=16", "model.encoder.num_layers=1", "model.encoder.num_heads=2",
            "model.encoder.ff_dim=32", "model.projection_dim=8", f"run.output_dir={tmp / 'runs'}", *extra]


@pytest.mark.parametrize("sampler", ["bm25", "faiss_hard"])
def test_contrastive_mine_end_to_end(tmp_path, source_tree, sampler, monkeypatch):
    from contrastive.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    out = tmp_path / f"{sampler}.npz"
    args = mine_args(source_tree, tmp_path, f"sampler={sampler}", "sampler.num_negatives=2", "sampler.range_max=10",
                     "--out", str(out))
    assert main(args) == 0
    table = MinedTable.load(out)
    assert table.num_negatives == 2 and table.header["sampler"]["name"] == sampler
    assert (table.neg_rows != table.query_rows[:, None]).all()
    rep = json.loads((tmp_path / f"{sampler}.report.json").read_text())
    assert rep["quality"]["after"]["dup_fraction"] in (0.0, None)
    assert (tmp_path / f"{sampler}.report.png").is_file()
    if sampler == "faiss_hard":
        assert table.header["checkpoint"]["global_step"] == 0


# ---------------------------------------------------------------------------------------------- DDP encoding
class _RowModel(torch.nn.Module):
    """``encode(inputs, side)``: row number (and side) repeated into a 3-d embedding."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def encode(self, inputs, side):
        return inputs["x"].float().repeat(1, 3) * (1 if side == "anchor" else -1)


def _sharded_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from contrastive.callbacks.refresh import ModelRowEncoder

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        encode = ModelRowEncoder(_RowModel(), lambda rows, side: {"x": torch.tensor(rows).view(-1, 1)}, batch_size=2,
                                 progress=False)
        torch.save((encode(torch.arange(7), "anchor"), encode(torch.arange(7), "candidate")), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_encoding_gathers_rows_in_order(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the loaded modules instead of re-importing lightning (slow on 2 CPUs)
    mp.start_processes(_sharded_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected = torch.arange(7).float().view(-1, 1).repeat(1, 3)
    for rank in range(2):
        anchors, candidates = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(anchors, expected) and torch.equal(candidates, -expected)
