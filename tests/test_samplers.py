"""Negative samplers on tiny synthetic corpora: random, BM25, FAISS hard negatives, NGAME batching, the
queue marker, the collate / batch sampler, the mined-table format, and bad input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive.filters import KnownDuplicatesFilter, PositiveAwareFilter
from contrastive.registry import SAMPLERS
from contrastive.samplers import (
    BM25NegativeSampler,
    FaissHardNegativeSampler,
    MinedTable,
    NegativeCollate,
    NGAMESampler,
    QueueSampler,
    RandomNegativeSampler,
    SamplerBatchSampler,
    balanced_clusters,
)
from contrastive.samplers.collate import TextRows
from contrastive.samplers.table import TableFileError, model_fingerprint, table_key

N = 24
GROUPS = list(range(N))
GROUPS[1] = GROUPS[2] = 0  # rows 0, 1, 2 are known duplicates
GROUPS[6] = 5  # rows 5, 6 too


def corpus(n: int = N, groups=None):
    q = [f"query number {i} about topic{i % 5}" for i in range(n)]
    d = [f"def function_{i}(x): return topic{i % 5}(x)" for i in range(n)]
    ids = torch.arange(n) + 1000
    if groups is None:
        groups = GROUPS[:n] if n <= N else list(range(n))
    g = torch.tensor(groups) + 1000
    return q, d, ids, g


def setup(sampler, n: int = N, groups=None):
    q, d, ids, g = corpus(n, groups)
    sampler.setup(ids, g, texts={"anchor": q, "candidate": d})
    return sampler


def group_key(rows):
    return torch.tensor(GROUPS)[rows]


# ---------------------------------------------------------------------------------------------- registry
def test_all_samplers_registered():
    for name in ("in_batch", "random", "bm25", "faiss_hard", "ngame", "queue"):
        assert name in SAMPLERS


def test_sampler_configs_validate_and_build():
    from contrastive import build
    from contrastive.cli import load_config

    root = Path(__file__).resolve().parent.parent
    for name, cls in (("random", RandomNegativeSampler), ("bm25", BM25NegativeSampler),
                      ("faiss_hard", FaissHardNegativeSampler), ("faiss_hard_filtered", FaissHardNegativeSampler),
                      ("ngame", NGAMESampler), ("queue", QueueSampler)):
        cfg = load_config(root / "configs/codesearch/infonce.yaml", [f"sampler={name}"])
        assert isinstance(build.build_sampler(cfg["sampler"]), cls)
    f = build.build_sampler(load_config(root / "configs/codesearch/infonce.yaml", ["sampler=faiss_hard_filtered"])["sampler"])
    assert [type(x).__name__ for x in f.filters.filters] == ["KnownDuplicatesFilter", "PositiveAwareFilter"]


# ---------------------------------------------------------------------------------------------- random
def test_random_never_returns_positive_or_duplicate():
    s = setup(RandomNegativeSampler(num_negatives=5, seed=3))
    rows = torch.arange(N)
    for epoch in range(3):
        s.set_epoch(epoch)
        neg = s.sample(rows)
        assert neg.shape == (N, 5)
        assert (neg >= 0).all()
        assert not (neg == rows[:, None]).any()
        assert not (group_key(neg) == group_key(rows)[:, None]).any()
        for r in neg.tolist():
            assert len(set(r)) == len(r)


def test_random_seeded_reproducible_and_independent_of_batch():
    a = setup(RandomNegativeSampler(3, seed=1))
    b = setup(RandomNegativeSampler(3, seed=1))
    c = setup(RandomNegativeSampler(3, seed=2))
    rows = torch.tensor([4, 9, 17])
    assert torch.equal(a.sample(rows), b.sample(rows))
    assert not torch.equal(a.sample(torch.arange(N)), c.sample(torch.arange(N)))
    assert torch.equal(a.sample(torch.tensor([9])), a.sample(rows)[1:2])  # batch-mates do not matter
    before = a.sample(torch.arange(N))
    a.set_epoch(1)
    assert not torch.equal(before, a.sample(torch.arange(N)))


def test_random_pads_when_pool_too_small():
    s = setup(RandomNegativeSampler(3, seed=0), n=4, groups=[0, 0, 0, 3])
    neg = s.sample(torch.arange(4))
    assert neg[0].tolist().count(-1) == 2 and neg[0, 0] == 3  # rows 0-2 have one eligible negative
    assert sorted(neg[3].tolist()) == [0, 1, 2]


def test_bad_corpus_errors_name_the_setting():
    with pytest.raises(ValueError, match="empty"):
        RandomNegativeSampler(2).setup(torch.zeros(0, dtype=torch.long), texts={"anchor": [], "candidate": []})
    with pytest.raises(ValueError, match="num_negatives=30"):
        setup(RandomNegativeSampler(30))
    with pytest.raises(ValueError, match="num_negatives"):
        RandomNegativeSampler(0)
    with pytest.raises(ValueError, match="unique"):
        RandomNegativeSampler(1).setup(torch.tensor([1, 1]), texts={"anchor": ["a", "b"], "candidate": ["c", "d"]})


# ---------------------------------------------------------------------------------------------- bm25
BM25_Q = ["sort a list in ascending order", "parse json text into a dict", "open a file and read lines",
          "compute the mean of numbers", "download a web page over http", "sort a list in descending order",
          "resize an image to a thumbnail", "read lines of a file"]
BM25_D = ["def sort_ascending(xs): return sorted(xs)", "def parse_json(text): return json.loads(text)",
          "def read_file_lines(path): return open(path).readlines()", "def mean(nums): return sum(nums) / len(nums)",
          "def download_page(url): return http_get(url).text", "def sort_descending(xs): return sorted(xs, reverse=True)",
          "def thumbnail(image): return image.resize((64, 64))", "def file_lines(path): return open(path).read().split()"]


def test_bm25_mines_the_lexical_neighbour():
    s = BM25NegativeSampler(num_negatives=1, sampling="top", fill_random=False)
    s.setup(torch.arange(8), torch.arange(8), texts={"anchor": BM25_Q, "candidate": BM25_D})
    neg = s.sample(torch.arange(8))[:, 0].tolist()
    assert neg[0] == 5 and neg[5] == 0  # ascending <-> descending sort
    assert neg[2] in (7,) and neg[7] == 2  # the two file-reading functions
    assert (s.table.scores[:, 0][torch.tensor(neg) >= 0] > 0).all()
    assert s.table.header["sampler"]["name"] == "bm25"


def test_bm25_top_k_never_runs_in_jax(monkeypatch):
    """bm25s' default ``retrieve`` backend runs the top-k in JAX when JAX is installed, and JAX's first GPU
    op takes 75% of the GPU's memory (on a GPU machine every later torch CUDA allocation failed); the
    sampler's BM25 (the library's BM25Retriever) scores with bm25s' numpy ``get_scores`` and takes the
    top-k in torch, so ``retrieve`` is never called."""
    import bm25s

    calls = []
    real = bm25s.BM25.retrieve

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("backend_selection"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(bm25s.BM25, "retrieve", spy)
    s = BM25NegativeSampler(num_negatives=1, sampling="top", fill_random=False)
    s.setup(torch.arange(8), torch.arange(8), texts={"anchor": BM25_Q, "candidate": BM25_D})
    assert calls == [] and s.table is not None and (s.table.neg_rows >= 0).any()


def test_bm25s_import_keeps_jax_off_the_gpu():
    """bm25s runs a JAX op at import when JAX is installed; on a GPU machine that made JAX take 75% of the
    GPU. import_bm25s sets JAX to CPU without preallocation first, as defaults the environment overrides,
    and every bm25s import in the library goes through it."""
    import subprocess
    import sys

    code = ("import os, sys; from contrastive.baselines.bm25 import import_bm25s; import_bm25s(); "
            "print(os.environ['JAX_PLATFORMS'], os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'], 'bm25s' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cpu", "false", "True"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cuda"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split()[0] == "cuda"  # the user's choice wins
    root = Path(__file__).resolve().parents[1]
    imports = {str(p.relative_to(root)): p.read_text().count("import bm25s")
               for d in ("contrastive", "datamodules", "notebooks", "benchmarks") for p in (root / d).rglob("*.py")}
    assert {f: n for f, n in imports.items() if n} == {"contrastive/baselines/bm25.py": 1}, \
        "import bm25s only through contrastive.baselines.bm25.import_bm25s"


def test_bm25_excludes_duplicates_and_reports_them_before():
    groups = torch.arange(8)
    groups[5] = 0  # the descending sort is a known duplicate of the ascending one
    s = BM25NegativeSampler(num_negatives=1, sampling="top", fill_random=False)
    s.setup(torch.arange(8), groups, texts={"anchor": BM25_Q, "candidate": BM25_D})
    assert s.sample(torch.tensor([0]))[0, 0] != 5
    assert s.table.extras["before_neg_rows"][0, 0] == 5  # mined before duplicate exclusion
    from contrastive.callbacks.report import negative_quality

    qual = negative_quality(s.table)
    assert qual["before"]["dup_fraction"] > 0 and qual["after"]["dup_fraction"] == 0


def test_bm25_zero_score_candidates_replaced_by_random_fill():
    q = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    d = ["alpha beta code", "gamma delta code", "epsilon zeta code", "eta theta code"]
    s = BM25NegativeSampler(num_negatives=2, fill_random=True)  # only 'code' is shared: tiny but positive scores
    s.setup(torch.arange(4), texts={"anchor": q, "candidate": d})
    assert (s.sample(torch.arange(4)) >= 0).all()
    s2 = BM25NegativeSampler(num_negatives=2, fill_random=False)
    s2.setup(torch.arange(3), texts={"anchor": ["alpha", "beta", "gamma"], "candidate": ["alpha", "beta", "gamma"]})
    assert (s2.sample(torch.arange(3)) == -1).all()  # no shared term: nothing mined, padded
    assert s2.last_stats["queries_short"] == 3


# ---------------------------------------------------------------------------------------------- faiss_hard
def fixed_embeddings(n: int = N, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g)
    d = q + 0.8 * torch.randn(n, dim, generator=g)
    return q, d


def expected_hard(q, d, k, range_min=0, exclude_dups=True):
    s = q @ d.T
    out = []
    for i in range(q.shape[0]):
        order = torch.argsort(s[i], descending=True, stable=True).tolist()
        cand = [j for j in order if j != i and not (exclude_dups and GROUPS[j] == GROUPS[i])]
        out.append(cand[range_min:range_min + k])
    return torch.tensor(out)


@pytest.mark.parametrize("range_min", [0, 2])
def test_faiss_hard_equals_exact_hard_negatives(range_min):
    q, d = fixed_embeddings()
    s = setup(FaissHardNegativeSampler(num_negatives=3, range_min=range_min, range_max=range_min + 3, sampling="top"))
    stats = s.refresh(lambda t, side: (q[: len(t)]) if side == "anchor" else (d[: len(t)]), step=7)
    assert torch.equal(s.sample(torch.arange(N)), expected_hard(q, d, 3, range_min))
    assert stats["queries_short"] == 0
    assert torch.allclose(s.table.positive_scores, (q * d).sum(1))
    assert torch.allclose(s.table.scores, torch.gather(q @ d.T, 1, s.table.neg_rows))


def test_faiss_hard_flat_index_matches_exact():
    pytest.importorskip("faiss")
    q, d = fixed_embeddings()
    a = setup(FaissHardNegativeSampler(num_negatives=3, index_kind="flat"))
    b = setup(FaissHardNegativeSampler(num_negatives=3, index_kind="exact"))
    for s in (a, b):
        s.refresh(lambda t, side: (q) if side == "anchor" else (d), step=0)
    assert torch.equal(a.sample(torch.arange(N)), b.sample(torch.arange(N)))


def test_faiss_hard_warmup_before_first_refresh():
    s = setup(FaissHardNegativeSampler(num_negatives=2, warmup="random", seed=4))
    r = setup(RandomNegativeSampler(2, seed=4))
    assert torch.equal(s.sample(torch.arange(N)), r.sample(torch.arange(N)))
    none = setup(FaissHardNegativeSampler(num_negatives=2, warmup="none"))
    assert (none.sample(torch.arange(5)) == -1).all()


def test_faiss_hard_filters_remove_duplicates_before_the_window():
    q, d = fixed_embeddings()
    d[1] = q[0] * 3  # row 1 (a known duplicate of row 0) is query 0's top candidate
    s = setup(FaissHardNegativeSampler(num_negatives=2, sampling="top", exclude_duplicates=False,
                                       filters=[KnownDuplicatesFilter()]))
    stats = s.refresh(lambda t, side: (q) if side == "anchor" else (d), step=0)
    assert torch.equal(s.sample(torch.arange(N)), expected_hard(q, d, 2))
    assert s.table.extras["before_neg_rows"][0, 0] == 1  # without the filter it would be mined
    assert stats["filter_removed/known_duplicates"] > 0
    # positive-aware filter: every mined negative scores at most 95% of the (positive) positive score
    s2 = setup(FaissHardNegativeSampler(num_negatives=2, range_max=20, filters=[PositiveAwareFilter(perc=0.95)]))
    s2.refresh(lambda t, side: (q) if side == "anchor" else (d), step=0)
    t = s2.table
    ok = (t.neg_rows >= 0) & (t.positive_scores[:, None] > 0)
    assert (t.scores[ok] <= (0.95 * t.positive_scores[:, None].expand_as(t.scores))[ok] + 1e-6).all()


def test_faiss_hard_margin_and_window_controls():
    q, d = fixed_embeddings()
    s = setup(FaissHardNegativeSampler(num_negatives=2, range_max=10, absolute_margin=0.5))
    s.refresh(lambda t, side: (q) if side == "anchor" else (d), step=0)
    t = s.table
    ok = t.neg_rows >= 0
    assert (t.scores[ok] <= (t.positive_scores[:, None] - 0.5).expand_as(t.scores)[ok] + 1e-6).all()
    exp = expected_hard(q, d, 10)
    assert all(set(r[r >= 0].tolist()) <= set(e.tolist()) for r, e in zip(t.neg_rows, exp))  # within the window


def test_faiss_hard_bad_windows_raise_naming_the_setting():
    with pytest.raises(ValueError, match="range_max=50"):
        setup(FaissHardNegativeSampler(num_negatives=2, range_max=50))  # N - 1 = 23 non-positive documents
    with pytest.raises(ValueError, match=r"range_min=1, range_max=3.*num_negatives=3"):
        FaissHardNegativeSampler(num_negatives=3, range_min=1, range_max=3, strict=True)
    with pytest.raises(ValueError, match="range_max must be > range_min"):
        FaissHardNegativeSampler(num_negatives=1, range_min=4, range_max=4)
    q, d = fixed_embeddings()
    s = setup(FaissHardNegativeSampler(num_negatives=3, range_max=5, max_score=-1e9, strict=True))
    with pytest.raises(ValueError, match="strict=True.*num_negatives=3"):
        s.refresh(lambda t, side: (q) if side == "anchor" else (d), step=0)
    with pytest.raises(ValueError, match="index_kind"):
        FaissHardNegativeSampler(index_kind="annoy")
    with pytest.raises(ValueError, match="encoder returned shape"):
        setup(FaissHardNegativeSampler(num_negatives=1)).refresh(lambda t, side: (q[:3]) if side == "anchor" else (d), step=0)


def test_faiss_hard_non_strict_window_pads():
    q, d = fixed_embeddings()
    s = setup(FaissHardNegativeSampler(num_negatives=3, range_min=0, range_max=2))
    stats = s.refresh(lambda t, side: (q) if side == "anchor" else (d), step=0)
    neg = s.sample(torch.arange(N))
    assert (neg[:, 2] == -1).all() and (neg[:, :2] >= 0).all()
    assert stats["queries_short"] == N


# ---------------------------------------------------------------------------------------------- ngame
def mixture(components: int, per: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(components, dim, generator=g), dim=1) * 10
    x = centres.repeat_interleave(per, 0) + 0.3 * torch.randn(components * per, dim, generator=g)
    labels = torch.arange(components).repeat_interleave(per)
    perm = torch.randperm(components * per, generator=g)
    return x[perm], labels[perm]


def test_ngame_schedule_follows_the_curriculum():
    s = NGAMESampler()  # official defaults
    assert [s.cluster_size_at(e) for e in (0, 9, 10, 19, 20, 25, 50, 200, 300)] == [1, 1, 2, 2, 4, 8, 16, 512, 512]
    assert [e for e in range(31) if s.should_refresh(e)] == [10, 15, 20, 25, 30]
    s = setup(NGAMESampler(curriculum_epochs=[1, 2]), n=30)
    assert s.num_clusters_for(2) == 16 and s.num_clusters_for(4) == 8 and s.num_clusters_for(8) == 4


def test_balanced_clusters_partition_and_balance():
    x, _ = mixture(5, 7)  # N = 35, not a power of two
    clusters = balanced_clusters(x, 8, seed=0)
    sizes = sorted(len(c) for c in clusters)
    assert len(clusters) == 8 and sizes[-1] - sizes[0] <= 1
    assert torch.equal(torch.cat(clusters).sort().values, torch.arange(35))
    with pytest.raises(ValueError, match="power of two"):
        balanced_clusters(x, 6)


def test_ngame_batches_are_cluster_partitions():
    x, labels = mixture(8, 4)  # 32 points, 8 tight components of 4
    n = 32
    s = setup(NGAMESampler(init_cluster_size=2, curriculum_epochs=[1], refresh_interval=1, report_negatives=3),
              n=n, groups=list(range(n)))
    assert s.batch_order(0, 8, torch.Generator()) is None  # random batches before the first refresh
    s.set_epoch(1)
    stats = s.refresh(lambda t, side: (x) if side == "anchor" else (x), step=0)
    assert stats["cluster_size_nominal"] == 4 and stats["num_clusters"] == 8
    assert all(len(set(labels[c].tolist())) == 1 for c in s.clusters)  # clusters are the components
    batches = s.batch_order(1, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(n)) and all(len(b) == 8 for b in batches)
    for b in batches:  # each batch = two whole clusters
        assert sorted(torch.bincount(labels[b]).tolist())[-2:] == [4, 4]
    # hardness: in-batch documents of NGAME batches are closer than those of random batches
    xn = torch.nn.functional.normalize(x, dim=1)

    def mean_cos(bs):
        return sum(float((xn[b] @ xn[b].T).mean()) for b in bs) / len(bs)

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    assert mean_cos(batches) > mean_cos([perm[i:i + 8] for i in range(0, n, 8)])
    # the report table holds same-cluster neighbours
    assert all(labels[j] == labels[i] for i in range(n) for j in s.table.neg_rows[i].tolist() if j >= 0)


@pytest.mark.parametrize("packing", ["concat", "whole"])
def test_ngame_packing_with_uneven_clusters(packing):
    x, _ = mixture(6, 5)  # N = 30 -> C=4: K = 8 clusters of 3-4
    s = setup(NGAMESampler(init_cluster_size=2, curriculum_epochs=[1], refresh_interval=1, packing=packing,
                           report_negatives=0), n=30, groups=list(range(30)))
    s.set_epoch(1)
    s.refresh(lambda t, side: (x) if side == "anchor" else (x), step=0)
    cluster_of = {i: ci for ci, c in enumerate(s.clusters) for i in c.tolist()}
    batches = s.batch_order(1, 7, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(30))
    for b in batches:
        ids = [cluster_of[i] for i in b]
        runs = [ids[0]] + [c for p, c in zip(ids, ids[1:]) if c != p]
        assert len(runs) == len(set(runs))  # contiguous pieces of clusters
        if packing == "whole":
            assert len(b) <= 7 and all(len(s.clusters[c]) == ids.count(c) for c in set(ids))
        else:
            whole = [c for c in set(ids) if len(s.clusters[c]) == ids.count(c)]
            assert len(set(ids)) - len(whole) <= 2  # only the first and last cluster may straddle


def test_ngame_bad_settings():
    with pytest.raises(ValueError, match="curriculum_epochs"):
        NGAMESampler(curriculum_epochs=[5, 3])
    with pytest.raises(ValueError, match="packing"):
        NGAMESampler(packing="greedy")
    with pytest.raises(ValueError, match="refresh_interval"):
        NGAMESampler(refresh_interval=0)


# ---------------------------------------------------------------------------------------------- queue
def test_queue_sampler_configures_the_model():
    from contrastive import build

    s = QueueSampler(size=16, momentum=0.99)
    assert (s.queue_size, s.momentum, s.num_negatives) == (16, 0.99, 0)
    cfg = {"model": {"name": "dual_encoder", "encoder": {"name": "transformer", "dim": 16, "num_layers": 1,
                                                          "num_heads": 2, "ff_dim": 32, "max_length": 16},
                     "projection_dim": 8}}
    from contrastive.losses import InfoNCELoss

    model = build.build_model(cfg, 50, InfoNCELoss(), sampler=s)
    assert model.queue is not None and model.queue.size == 16 and len(model.queue) == 0
    assert model.momentum == 0.99
    with pytest.raises(ValueError, match="size"):
        QueueSampler(size=0)
    with pytest.raises(ValueError, match="momentum"):
        QueueSampler(size=4, momentum=1.5)


# ---------------------------------------------------------------------------------------------- collate
def base_collate(rows):
    idx = torch.as_tensor(rows)
    return {"query_ids": torch.ones(len(rows), 4, dtype=torch.long), "query_mask": torch.ones(len(rows), 4, dtype=torch.bool),
            "doc_ids": torch.ones(len(rows), 6, dtype=torch.long), "doc_mask": torch.ones(len(rows), 6, dtype=torch.bool),
            "pair_id": idx + 1000, "dup_group": torch.tensor(GROUPS)[idx] + 1000}


def encode_docs(texts):
    lens = [min(5, len(t.split())) for t in texts]
    ids = torch.zeros(len(texts), 5, dtype=torch.long)
    mask = torch.arange(5)[None, :] < torch.tensor(lens)[:, None]
    return ids.masked_fill(mask, 7), mask


def make_collate(sampler, **kw):
    q, d, ids, g = corpus()
    return NegativeCollate(base_collate, sampler, ids, g, TextRows(d, encode_docs), **kw)


def test_collate_adds_negative_keys_with_right_shapes():
    s = setup(RandomNegativeSampler(2, seed=0))
    batch = make_collate(s)([3, 8, 11, 20])
    k = batch["neg_ids"].shape[0]
    assert 0 < k <= 8 and batch["neg_ids"].shape == batch["neg_mask"].shape == (k, 5)
    assert batch["neg_mask"].dtype == torch.bool
    assert batch["neg_pair_id"].shape == batch["neg_dup_group"].shape == (k,)
    assert torch.equal(batch["neg_pair_id"], batch["neg_row"] + 1000)
    assert torch.equal(batch["neg_dup_group"], torch.tensor(GROUPS)[batch["neg_row"]] + 1000)
    assert not torch.isin(batch["neg_row"], torch.tensor([3, 8, 11, 20])).any()
    assert batch["neg_row"].unique().numel() == k
    assert set(batch) >= {"query_ids", "doc_ids", "pair_id", "dup_group"}


def test_collate_maps_pair_ids_and_fixed_size():
    s = setup(RandomNegativeSampler(3, seed=0))
    c = make_collate(s, fixed_size=True)
    b = c([0, 5, 9])
    assert b["neg_ids"].shape[0] == 9
    # items without rows: rows recovered from pair_id
    c2 = NegativeCollate(lambda items: {"pair_id": torch.tensor([it["id"] for it in items])}, s, corpus()[2],
                         corpus()[3], TextRows(corpus()[1], encode_docs))
    b2 = c2([{"id": 1004}, {"id": 1010}])
    assert torch.equal(b2["neg_row"][:3], s.sample(torch.tensor([4, 10])).view(-1)[:3])
    with pytest.raises(KeyError, match="not in the training corpus"):
        c2([{"id": 5}])


def test_collate_drops_padding_and_handles_no_negatives():
    s = setup(FaissHardNegativeSampler(num_negatives=2, warmup="none"))
    b = make_collate(s)([1, 2])
    assert "neg_ids" not in b and b["neg_pair_id"].shape == (0,)


# ---------------------------------------------------------------------------------------------- batch sampler
def test_batch_sampler_shuffles_reproducibly():
    bs = SamplerBatchSampler(None, 23, 5, seed=1)
    e0 = list(bs)
    assert sorted(i for b in e0 for i in b) == list(range(23)) and len(bs) == 5
    assert list(SamplerBatchSampler(None, 23, 5, seed=1)) == e0
    bs.sampler.set_epoch(1)  # how Lightning sets the epoch
    assert list(bs) != e0
    assert [len(b) for b in SamplerBatchSampler(None, 23, 5, drop_last=True)] == [5] * 4


def test_batch_sampler_sets_sampler_epoch_and_shards():
    s = setup(RandomNegativeSampler(1))
    bs = SamplerBatchSampler(s, N, 4, seed=0)
    bs.set_epoch(3)
    assert s.epoch == 3
    r0 = SamplerBatchSampler(s, N, 4, num_replicas=4, rank=0)
    r1 = SamplerBatchSampler(s, N, 4, num_replicas=4, rank=1)
    assert len(r0) == len(r1) == 1  # 6 batches -> 4 usable
    assert not set(sum(list(r0), [])) & set(sum(list(r1), []))


def test_batch_sampler_uses_ngame_order_and_validates():
    x, _ = mixture(4, 6)
    s = setup(NGAMESampler(init_cluster_size=4, curriculum_epochs=[1], refresh_interval=1, report_negatives=0))
    s.set_epoch(1)
    s.refresh(lambda t, side: (x) if side == "anchor" else (x), 0)
    bs = SamplerBatchSampler(s, N, 8, seed=0)
    bs.set_epoch(1)
    assert list(bs) == s.batch_order(1, 8, bs.generator(1))

    class Bad(RandomNegativeSampler):
        def batch_order(self, epoch, batch_size, generator):
            return [[0, 1], [1, 2]]

    with pytest.raises(ValueError, match="repeated rows"):
        list(SamplerBatchSampler(setup(Bad(1)), N, 2))


# ---------------------------------------------------------------------------------------------- table
def test_table_roundtrip_and_errors(tmp_path):
    q, d = fixed_embeddings()
    s = setup(FaissHardNegativeSampler(num_negatives=2))
    s.refresh(lambda t, side: (q) if side == "anchor" else (d), step=0)
    t = s.table
    t.header["key"] = "abc"
    path = t.save(tmp_path / "t.npz")
    assert (tmp_path / "t.npz.json").is_file()
    back = MinedTable.load(path, expected_key="abc", expected_rows=N)
    assert torch.equal(back.neg_rows, t.neg_rows) and torch.allclose(back.scores, t.scores, equal_nan=True)
    assert torch.equal(back.extras["before_neg_rows"], t.extras["before_neg_rows"])
    assert back.header["format"] == "contrastive.negatives" and back.header["num_negatives"] == 2
    with np.load(path, allow_pickle=False) as z:  # plain numpy can read it
        assert z["neg_rows"].shape == (N, 2) and z["query_rows"].dtype == np.int64
    with pytest.raises(TableFileError, match="key"):
        MinedTable.load(path, expected_key="other")
    with pytest.raises(TableFileError, match="training rows"):
        MinedTable.load(path, expected_rows=N + 1)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TableFileError, match="corrupt"):
        MinedTable.load(tmp_path / "bad.npz")
    with pytest.raises(TableFileError, match="does not exist"):
        MinedTable.load(tmp_path / "missing.npz")
    other = setup(FaissHardNegativeSampler(num_negatives=2), n=N - 1, groups=GROUPS[: N - 1])
    with pytest.raises(TableFileError, match="training rows"):
        other.set_table(back)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_model_fingerprint_changes_with_weights():
    lin = torch.nn.Linear(3, 2)
    a = model_fingerprint(lin)
    assert a == model_fingerprint(lin)
    with torch.no_grad():
        lin.weight[0, 0] += 1e-3
    assert model_fingerprint(lin) != a
    assert table_key("c", {"global_step": 1, "state_hash": a}) != table_key("c", {"global_step": 2, "state_hash": a})
    assert math.isfinite(len(a))


def test_ngame_report_measures_duplicates_among_cluster_mates():
    from contrastive.callbacks.report import negative_quality

    x, labels = mixture(8, 4)
    groups = list(range(32))
    for comp in range(8):  # the first two points of every component are known duplicates
        a, b = (labels == comp).nonzero().flatten()[:2].tolist()
        groups[b] = groups[a]
    s = setup(NGAMESampler(init_cluster_size=2, curriculum_epochs=[1], refresh_interval=1, report_negatives=3),
              n=32, groups=groups)
    s.set_epoch(1)
    s.refresh(lambda t, side: (x) if side == "anchor" else (x), step=0)
    qual = negative_quality(s.table)
    assert qual["before"]["dup_fraction"] > 0 and qual["after"]["dup_fraction"] == 0
