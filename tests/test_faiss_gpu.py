"""FAISS on a GPU (skipped without CUDA and a GPU build of FAISS): the GPU copy of each index kind returns
what its CPU index or the exact index returns, float16 storage stays close, sharding over ``gpu_ids``
equals one GPU, ``k`` above FAISS' GPU limit is served by the CPU copy, adds after a search reach the GPU
copy, and a saved index loads back onto the GPU."""
from __future__ import annotations

import logging

import pytest
import torch

from contrastive.index import ExactIndex, FaissIndex, Index, IndexInputError, build_index, faiss_num_gpus


def _gpus() -> int:
    try:
        return faiss_num_gpus()
    except ImportError:
        return 0


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or _gpus() == 0, reason="needs CUDA and faiss-gpu")]


def clustered(n: int, nq: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, dim, generator=g)
    x = centres[torch.randint(0, 64, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    q = centres[torch.randint(0, 64, (nq,), generator=g)] + 0.5 * torch.randn(nq, dim, generator=g)
    return x, q


def exact(x: torch.Tensor, q: torch.Tensor, k: int, metric: str = "ip") -> tuple[torch.Tensor, torch.Tensor]:
    index = ExactIndex(x.shape[1], metric, device="cpu")
    index.add(x)
    return index.search(q, k)


def recall(ids: torch.Tensor, ref: torch.Tensor) -> float:
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref)) / ref.numel()


def true_topk_error(q: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, metric: str) -> float:
    """Max gap between the float64 scores of the returned ids and the float64 top-k scores."""
    if metric == "cosine":
        q, x = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(x, dim=1)
    s = q.double() @ x.double().T
    ref = torch.topk(s, ids.shape[1], dim=1).values
    return float((s.gather(1, ids) - ref).abs().max())


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_flat_on_gpu_is_exact(metric):
    g = torch.Generator().manual_seed(1)
    x, q = torch.randn(20000, 64, generator=g), torch.randn(300, 64, generator=g)
    index = FaissIndex(64, metric, kind="flat", use_gpu=True, add_chunk_size=7000, search_chunk_size=128)
    index.add(x)
    assert index.on_gpu and "gpu" in repr(index)
    v, i = index.search(q, 50)
    ev, ei = exact(x, q, 50, metric)
    assert true_topk_error(q, x, i, metric) < 1e-4  # a true top-50 up to float32 rounding
    assert (i == ei).float().mean() > 0.999
    torch.testing.assert_close(v, ev, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,kwargs,min_recall", [
    ("ivf_flat", dict(nlist=128, nprobe=16), 0.9),
    ("ivf_pq", dict(nlist=64, nprobe=16, pq_m=16, pq_nbits=8), 0.4),
])
def test_ivf_gpu_matches_its_cpu_index(kind, kwargs, min_recall):
    """The same trained index (same seed, trained on CPU) searched on GPU and on CPU: the GPU scans the
    same lists, so results agree up to near-ties, and recall against exact is the CPU's."""
    x, q = clustered(20000, 300, 64)
    gpu = build_index(kind, 64, "cosine", use_gpu=True, **kwargs)
    cpu = build_index(kind, 64, "cosine", use_gpu=False, **kwargs)
    gpu.add(x)
    cpu.add(x)
    assert gpu.on_gpu and not cpu.on_gpu
    (gv, gi), (cv, ci) = gpu.search(q, 10), cpu.search(q, 10)
    _, ref = exact(x, q, 10, "cosine")
    rg, rc = recall(gi, ref), recall(ci, ref)
    assert rg >= min_recall and abs(rg - rc) <= 0.02, (rg, rc)
    assert recall(gi, ci) >= 0.97
    torch.testing.assert_close(gv[:, 0], cv[:, 0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_float16_on_gpu_stays_close(kind):
    x, q = clustered(12000, 200, 64, seed=2)
    kw = {} if kind == "flat" else dict(nlist=64, nprobe=64)
    if kind == "ivf_pq":
        kw.update(pq_m=16, pq_nbits=8)
    full = build_index(kind, 64, "cosine", use_gpu=True, **kw)
    half = build_index(kind, 64, "cosine", use_gpu=True, float16=True, **kw)
    full.add(x)
    half.add(x)
    (fv, fi), (hv, hi) = full.search(q, 10), half.search(q, 10)
    if kind == "ivf_pq":  # fp16 lookup tables; PQ distances tie often, so compare recall against exact
        _, ref = exact(x, q, 10, "cosine")
        assert recall(hi, ref) >= recall(fi, ref) - 0.03
        assert float((hv[:, 0] - fv[:, 0]).abs().max()) < 5e-2
    else:  # fp16 vectors: ~1e-3 error on cosine scores
        assert recall(hi, fi) >= 0.9
        assert float((hv[:, 0] - fv[:, 0]).abs().max()) < 1e-2


def test_sharded_over_gpu_ids_equals_one_gpu():
    """``gpu_ids`` with several entries shards the index (here twice GPU 0: the multi-GPU code path)."""
    g = torch.Generator().manual_seed(3)
    x, q = torch.randn(9001, 32, generator=g), torch.randn(100, 32, generator=g)
    sharded = FaissIndex(32, kind="flat", use_gpu=True, gpu_ids=[0, 0])
    single = FaissIndex(32, kind="flat", use_gpu=True)
    sharded.add(x)
    single.add(x)
    (sv, si), (v, i) = sharded.search(q, 20), single.search(q, 20)
    assert (si == i).float().mean() > 0.999
    torch.testing.assert_close(sv, v, rtol=1e-5, atol=1e-5)
    assert sharded._gpu_resources[0] is not sharded._gpu_resources[1]  # one resources object per shard
    assert single._gpu_resources[0] is sharded._gpu_resources[0]  # shared across indexes
    with pytest.raises(IndexInputError, match=r"gpu_ids \[7\] do not exist"):
        FaissIndex(32, use_gpu=True, gpu_ids=[0, 7])


def test_k_above_gpu_limit_searches_the_cpu_copy(caplog):
    g = torch.Generator().manual_seed(4)
    x, q = torch.randn(5000, 16, generator=g), torch.randn(20, 16, generator=g)
    index = FaissIndex(16, kind="flat", use_gpu=True)
    index.add(x)
    with caplog.at_level(logging.WARNING):
        v, i = index.search(q, 3000)
    assert "exceeds the FAISS GPU limit of 2048" in caplog.text
    _, ei = exact(x, q, 3000)
    assert i.shape == (20, 3000) and (i == ei).float().mean() > 0.999


def test_adds_after_a_search_reach_the_gpu_copy_and_save_load(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 24, generator=g)
    index = FaissIndex(24, "cosine", kind="flat", use_gpu=True)  # cosine: each vector is its own top-1
    index.add(x[:2000])
    assert int(index.search(x[2500:2510], 1)[1].max()) < 2000
    index.add(x[2000:])
    _, ids = index.search(x[2500:2510], 1)  # each query is in the index now: its own id first
    assert ids[:, 0].tolist() == list(range(2500, 2510))
    index.save(tmp_path / "flat.faiss")
    loaded = Index.load(tmp_path / "flat.faiss", expected_dim=24, use_gpu=True)
    assert loaded.on_gpu and len(loaded) == 3000
    assert torch.equal(loaded.search(x[:50], 5)[1], index.search(x[:50], 5)[1])


def test_gpu_placement_rules():
    with pytest.raises(IndexInputError, match="hnsw"):
        FaissIndex(8, kind="hnsw", use_gpu=True)
    assert not FaissIndex(8, kind="hnsw", use_gpu="auto").on_gpu  # no GPU HNSW in FAISS: CPU
    assert FaissIndex(8, kind="flat", use_gpu="auto").on_gpu
