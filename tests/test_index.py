"""kNN index layer: exact torch backend, FAISS backend, persistence, errors, GPU logic."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from contrastive.index import (
    ExactIndex,
    FaissIndex,
    Index,
    IndexFileError,
    IndexInputError,
    build_index,
    exact_topk,
    import_faiss,
    rank_of,
)
from contrastive.index import _kernels
from contrastive.index._kernels import c_compiler, fused_available
from contrastive.registry import INDEXES


def reference_topk(q: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force on the full score matrix; a stable sort gives lower-id-first ties."""
    vals, ids = torch.sort(q @ x.T, dim=1, descending=True, stable=True)
    return vals[:, :k], ids[:, :k]


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def clustered(n: int = 5000, nq: int = 200, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(50, dim, generator=g)
    x = centres[torch.randint(0, 50, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    q = centres[torch.randint(0, 50, (nq,), generator=g)] + 0.5 * torch.randn(nq, dim, generator=g)
    return x, q


def recall_at(ids: torch.Tensor, ref: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref))
    return hits / ref.numel()


# -- exact backend ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("chunk_size", [7, 64, 300, 5000])
def test_exact_index_matches_full_topk(metric: str, chunk_size: int) -> None:
    g = torch.Generator().manual_seed(chunk_size)
    x, q = torch.randn(1001, 16, generator=g), torch.randn(53, 16, generator=g)  # 1001, 53: no chunk divides them
    index = ExactIndex(16, metric, chunk_size=chunk_size)
    index.add(x[:600])
    index.add(x[600:].numpy())  # numpy input; ids continue in insertion order
    scores, ids = index.search(q, 20)
    if metric == "cosine":
        x, q = normalise(x), normalise(q)
    ref_v, ref_i = reference_topk(q, x, 20)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(scores, ref_v, atol=1e-5, rtol=1e-5)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert len(index) == 1001


#: tests of the compiled kernel skip, with the reason, where it is not built (it is optional)
needs_fused = pytest.mark.skipif(not fused_available(), reason="the optional compiled top-k kernel is not built")
BACKENDS = [pytest.param("fused", marks=needs_fused), "torch"]


def test_fused_extension_is_built() -> None:
    """Where a C compiler is present, the install compiles contrastive/index/_kernels/_topk.c; without it
    mining falls back to the slower torch path, which would go unnoticed. Without a compiler the kernel
    is optional, so this skips and says why."""
    if c_compiler() is None:
        pytest.skip("no C compiler (CC or sysconfig's CC not on PATH): the optional top-k kernel is not built "
                    "and exact search uses its torch path")
    assert fused_available(), (
        f"contrastive.index._kernels._topk is not built ({_kernels.IMPORT_ERROR}): reinstall with "
        "`pip install -e .`, or run `python setup.py build_ext --inplace`"
    )


def test_c_compiler_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """$CC wins over Python's configured CC; a compiler that is not on PATH counts as none."""
    import sysconfig

    monkeypatch.setenv("CC", "no-such-cc-for-contrastive -pthread")
    assert c_compiler() is None
    monkeypatch.setenv("CC", f"{sys.executable} -O2")  # any executable stands in for a compiler here
    assert c_compiler() == os.path.realpath(sys.executable) or c_compiler() == sys.executable
    monkeypatch.delenv("CC")
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: "no-such-cc-for-contrastive" if name == "CC" else None)
    assert c_compiler() is None


@needs_fused
def test_missing_mkl_symbol_falls_back_to_torch_mm(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A torch whose libtorch_cpu lacks one of MKL's packed-GEMM symbols: the lookup logs one line and
    the fused search computes its blocks with torch.mm, with the same (stable-sort) results."""
    from contrastive.index import exact as exact_mod

    names = list(_kernels.BLAS_NAMES)
    names[2] = ("cblas_sgemm_compute_absent_in_this_build",)
    monkeypatch.setattr(_kernels, "BLAS_NAMES", tuple(names))
    monkeypatch.setattr(_kernels, "packed_state", {})
    monkeypatch.setattr(exact_mod, "PACKED_MIN_QUERIES", 0)
    with caplog.at_level("WARNING", logger="contrastive.index._kernels"):
        assert not _kernels.packed_available()
        assert not _kernels.packed_available()  # looked up once
    lines = [r.getMessage() for r in caplog.records if r.name == "contrastive.index._kernels"]
    assert len(lines) == 1 and "cblas_sgemm_compute_absent_in_this_build" in lines[0] and "\n" not in lines[0]
    assert _kernels.mkl_packed_gemm() is None
    g = torch.Generator().manual_seed(5)
    q, x = torch.randn(300, 16, generator=g), torch.randn(2000, 16, generator=g)
    vals, ids = exact_topk(q, x, 30, backend="fused")
    ref_v, ref_i = reference_topk(q, x, 30)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(vals, ref_v, atol=1e-5, rtol=1e-5)


@needs_fused
def test_unloadable_libtorch_cpu_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No loadable libtorch_cpu at all (ctypes cannot open it): the same one-line fallback."""
    import ctypes

    def refuse(path: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"cannot open {path}")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    monkeypatch.setattr(_kernels, "packed_state", {})
    with caplog.at_level("WARNING", logger="contrastive.index._kernels"):
        assert not _kernels.packed_available()
    assert len(caplog.records) == 1 and "no loadable libtorch_cpu" in caplog.records[0].getMessage()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 10, 100, 333])
@pytest.mark.parametrize("chunk_size,query_chunk", [(50, 9), (128, 1000), (333, 40)])
def test_exact_topk_functional(k: int, chunk_size: int, query_chunk: int, backend: str) -> None:
    g = torch.Generator().manual_seed(k)
    q, x = torch.randn(70, 8, generator=g), torch.randn(333, 8, generator=g)
    vals, ids = exact_topk(q, x, k, chunk_size=chunk_size, query_chunk_size=query_chunk, backend=backend)
    ref_v, ref_i = reference_topk(q, x, k)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(vals, ref_v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [5, 64, 500])
def test_exact_ties_lower_id_first(chunk_size: int, backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (500, 4), generator=g).float()  # many exactly equal scores
    q = torch.randint(0, 3, (30, 4), generator=g).float()
    vals, ids = exact_topk(q, x, 50, chunk_size=chunk_size, backend=backend)
    ref_v, ref_i = reference_topk(q, x, 50)
    assert torch.equal(ids, ref_i) and torch.equal(vals, ref_v)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "nq,n,k,chunk,qchunk",
    [
        (300, 5000, 100, 2048, 64),  # first block wide enough for the group-maximum floor; merges mid-block
        (257, 4099, 7, 512, 100),  # ragged last blocks
        (64, 150, 150, 64, 64),  # k = N, every block narrower than 2k
        (3, 1000, 40, 4096, 512),  # too few queries for worker threads: one thread, rows over OpenMP
        (1000, 3000, 50, 1000, None),  # worker threads with the default query chunk
        (200, 3000, 1, 1, 7),  # one-column blocks
    ],
)
@needs_fused
def test_fused_topk_matches_stable_sort(nq: int, n: int, k: int, chunk: int, qchunk: int, threads: int) -> None:
    """The compiled filter (one thread; worker threads that own query chunks; buffered merges) against
    the full stable sort, values and ids bit for bit, with many exact ties (duplicated database rows)."""
    g = torch.Generator().manual_seed(nq + n + k)
    x = torch.randn(n, 16, generator=g)
    x[n // 2 : n // 2 + n // 5] = x[: n // 5]  # exact duplicates: equal scores, the lower id must win
    q = torch.randn(nq, 16, generator=g)
    before = torch.get_num_threads()
    vals, ids = exact_topk(q, x, k, chunk_size=chunk, query_chunk_size=qchunk, threads=threads, backend="fused")
    assert torch.get_num_threads() == before  # the worker threads' single-thread setting is undone
    ref_v, ref_i = reference_topk(q, x, k)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(vals, ref_v, atol=1e-5, rtol=1e-5)
    tv, ti = exact_topk(q, x, k, chunk_size=chunk, query_chunk_size=qchunk, backend="torch")
    assert torch.equal(ids, ti)


def test_packed_rows_bounded_by_memory_and_balanced() -> None:
    """Packed-schedule calls: equal (the last may be shorter), within PACKED_CHUNK and PACKED_MEMORY."""
    from contrastive.index import exact

    for nq, d, k in [(100_000, 256, 100), (100_000, 256, 5000), (5000, 1024, 2000), (1024, 8, 1), (16_385, 8, 1)]:
        cap = max(k, 64)
        rows = exact._packed_rows(nq, d, k, cap)
        calls = -(-nq // rows)
        assert rows <= exact.PACKED_CHUNK and nq - (calls - 1) * rows > rows - calls, (nq, rows)
        state = rows * ((k + cap) * 8 + d * 4)
        assert state <= exact.PACKED_MEMORY or rows <= exact.PACKED_BLOCK[0], (nq, rows, state)
    assert exact._packed_rows(100_000, 256, 100, 100) == 14_286  # 7 calls of 14,286 (the last 14,284)
    assert exact._packed_rows(100_000, 256, 5000, 5000) == 3226  # memory-bound: 31 calls of 3,226
    assert exact._packed_rows(10_000, 256, 100, 100, qchunk=1000) == 1000


@needs_fused
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_fused_isa_paths_match_stable_sort(isa: str) -> None:
    """Each instruction-set version of the scan and select (chosen by CONTRASTIVE_TOPK_ISA at import) gives the
    stable sort's result, on the worker schedule and on the packed one, with tied scores and k above the
    vectorised select's 16-key tail."""
    if isa != "scalar" and (_kernels.topk is None or _kernels.topk.isa() == "scalar"):
        pytest.skip("no vector scan on this CPU")
    if isa == "avx512" and _kernels.topk.isa() != "avx512":
        pytest.skip("CPU without AVX-512")
    code = (
        "import torch; from contrastive.index import exact; from contrastive.index._kernels import _topk\n"
        "from contrastive.index.exact import exact_topk\n"
        f"assert _topk.isa() == {isa!r}, _topk.isa()\n"
        "g = torch.Generator().manual_seed(0); q, x = torch.randn(300, 8, generator=g), torch.randn(3000, 8, generator=g)\n"
        "x[1500:1600] = x[:100]\n"
        "r = torch.sort(q @ x.T, dim=1, descending=True, stable=True)\n"
        "for packed in (False, True):\n"
        "    exact.PACKED_MIN_QUERIES = 0 if packed else 10**9\n"
        "    if packed and not exact.packed_available(): continue\n"
        "    for k in (60, 700):\n"
        "        v, i = exact_topk(q, x, k, backend='fused')\n"
        "        assert torch.equal(i, r.indices[:, :k]), (packed, k)\n"
    )
    env = {**os.environ, "CONTRASTIVE_TOPK_ISA": isa}
    env.pop("CONTRASTIVE_TOPK_SCALAR", None)
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_exact_topk_backend_errors() -> None:
    q, x = torch.randn(4, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    why = "float32" if fused_available() else "not built"
    with pytest.raises(IndexInputError, match=f"backend='fused' is unavailable.*{why}"):
        exact_topk(q, x, 3, backend="fused")
    v, i = exact_topk(q, x, 3)  # auto: float64 goes to the torch path
    assert torch.equal(i, reference_topk(q, x, 3)[1])
    with pytest.raises(IndexInputError, match="backend must be one of"):
        exact_topk(q, x, 3, backend="numba")
    bad = torch.randn(20, 8)
    bad[7, 0] = float("inf")
    with pytest.raises(IndexInputError, match=r"database vectors contain NaN or infinite values \(rows \[7\]"):
        exact_topk(torch.randn(4, 8), bad, 3)
    with pytest.raises(IndexInputError, match="threads must be a positive integer"):
        exact_topk(torch.randn(4, 8), torch.randn(20, 8), 3, threads=0)


def test_exact_index_errors() -> None:
    index = ExactIndex(8)
    with pytest.raises(IndexInputError, match="empty index"):
        index.search(torch.randn(2, 8), 1)
    index.add(torch.randn(5, 8))
    with pytest.raises(IndexInputError, match=r"k=6 .*index size 5"):
        index.search(torch.randn(2, 8), 6)
    scores, ids = index.search(torch.randn(2, 8), 6, allow_fewer=True)
    assert ids.shape == (2, 5)
    with pytest.raises(IndexInputError, match="dim 7"):
        index.search(torch.randn(2, 7), 1)
    bad = torch.randn(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(IndexInputError, match=r"NaN or infinite.*rows \[6\]"):
        index.add(bad)
    with pytest.raises(IndexInputError, match="zero vectors"):
        ExactIndex(8, "cosine").add(torch.zeros(2, 8))
    with pytest.raises(IndexInputError, match="metric"):
        ExactIndex(8, "l2")
    with pytest.raises(IndexInputError, match="torch.Tensor or numpy array"):
        index.add([[0.0] * 8])
    index.reset()
    assert len(index) == 0


def test_rank_of_and_filtered_rank() -> None:
    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(40, 8, generator=g), torch.randn(97, 8, generator=g)
    target = torch.randint(0, 97, (40,), generator=g)
    scores = q @ x.T
    gold = scores[torch.arange(40), target]
    expected = 1 + (scores > gold.unsqueeze(1)).sum(1)
    assert torch.equal(rank_of(q, x, target, chunk_size=13), expected)
    # duplicates of the gold document rank above or with it; the filtered rank ignores them
    x2 = torch.cat([x, x[target[:5]]])  # rows 97..101 copy the gold of queries 0..4
    group = torch.arange(102)
    group[97:] = target[:5]
    s2 = q[:5] @ x2.T
    strictly_above = 1 + (s2 > s2[torch.arange(5), target[:5]].unsqueeze(1) + 1e-4).sum(1)
    raw = rank_of(q[:5], x2, target[:5], chunk_size=10)
    assert torch.equal(raw, strictly_above + 1)  # the exact copy ties with the gold: counted (pessimistic)
    filt = rank_of(q[:5], x2, target[:5], dup_group=group, chunk_size=10)
    assert torch.equal(filt, strictly_above)  # own copy filtered out, other queries' copies still count
    opt = rank_of(q[:5], x2, target[:5], chunk_size=10, ties="optimistic")
    assert torch.equal(opt, strictly_above)


# -- persistence ------------------------------------------------------------------------------------
def test_exact_save_load_roundtrip(tmp_path) -> None:
    index = ExactIndex(8, "cosine", chunk_size=16)
    index.add(torch.randn(40, 8))
    path = tmp_path / "exact.pt"
    index.save(path)
    assert sorted(os.listdir(tmp_path)) == ["exact.pt", "exact.pt.json"]  # no temp files left behind
    loaded = Index.load(path, expected_dim=8)
    assert isinstance(loaded, ExactIndex) and loaded.metric == "cosine" and len(loaded) == 40
    q = torch.randn(3, 8)
    assert torch.equal(loaded.search(q, 5)[1], index.search(q, 5)[1])
    with pytest.raises(IndexFileError, match=r"exact\.pt.*dim 8.*dim 16 was expected"):
        ExactIndex.load(path, expected_dim=16)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(IndexFileError, match="does not exist"):
        Index.load(tmp_path / "missing.pt")
    index = ExactIndex(4)
    index.add(torch.randn(3, 4))
    path = tmp_path / "a.pt"
    index.save(path)
    other = ExactIndex(4)
    other.add(torch.randn(5, 4))
    other.save(tmp_path / "b.pt")
    os.replace(tmp_path / "b.pt", path)  # payload of another save next to a.pt's sidecar
    with pytest.raises(IndexFileError, match=r"a\.pt holds 5 vectors but its metadata says 3"):
        Index.load(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(IndexFileError, match=r"a\.pt.*corrupt"):
        Index.load(path)
    (tmp_path / "a.pt.json").write_text("{broken")
    with pytest.raises(IndexFileError, match=r"a\.pt\.json is corrupt"):
        Index.load(path)
    os.remove(tmp_path / "a.pt.json")
    with pytest.raises(IndexFileError, match="metadata file"):
        Index.load(path)


def test_faiss_save_load_roundtrip(tmp_path) -> None:
    x, q = clustered(2000, 20, 32)
    index = FaissIndex(32, "cosine", kind="ivf_flat", nlist=16, nprobe=4, use_gpu=False)
    index.add(x)
    path = tmp_path / "ivf.faiss"
    index.save(path)
    meta = json.loads((tmp_path / "ivf.faiss.json").read_text())
    assert meta["kind"] == "ivf_flat" and meta["dim"] == 32 and meta["metric"] == "cosine"
    loaded = Index.load(path, expected_dim=32, use_gpu=False)
    assert isinstance(loaded, FaissIndex) and loaded.nprobe == 4 and len(loaded) == 2000
    assert torch.equal(loaded.search(q, 10)[1], index.search(q, 10)[1])
    with pytest.raises(IndexFileError, match=r"ivf\.faiss.*dim 32.*dim 64 was expected"):
        FaissIndex.load(path, expected_dim=64)
    path.write_bytes(b"garbage")
    with pytest.raises(IndexFileError, match=r"ivf\.faiss.*not a readable FAISS index"):
        Index.load(path, use_gpu=False)


# -- FAISS backend ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_faiss_flat_equals_exact(metric: str) -> None:
    g = torch.Generator().manual_seed(3)
    x, q = torch.randn(3000, 32, generator=g), torch.randn(100, 32, generator=g)  # random: no ties
    flat = FaissIndex(32, metric, kind="flat", use_gpu=False, add_chunk_size=700, search_chunk_size=33)
    exact = ExactIndex(32, metric, chunk_size=512)
    for part in (x[:1234], x[1234:]):
        flat.add(part)
        exact.add(part)
    fv, fi = flat.search(q, 25)
    ev, ei = exact.search(q, 25)
    assert torch.equal(fi, ei)
    torch.testing.assert_close(fv, ev, atol=1e-5, rtol=1e-5)


# recall@10 against exact search on 5k x 64 clustered data (50 Gaussian clusters), measured 0.47-1.0;
# thresholds leave margin for FAISS version/thread differences.
@pytest.mark.parametrize(
    "kind,kwargs,min_recall",
    [
        ("ivf_flat", dict(nlist=64, nprobe=16), 0.9),  # nprobe = nlist / 4; measured 1.0
        ("hnsw", dict(hnsw_m=16, ef_search=64, ef_construction=64), 0.9),  # measured 1.0
        ("ivf_pq", dict(nlist=64, nprobe=16, pq_m=32, pq_nbits=6, train_size=2500), 0.5),  # measured ~0.72
    ],
)
def test_faiss_approximate_recall(kind: str, kwargs: dict, min_recall: float) -> None:
    x, q = clustered()
    exact = ExactIndex(64, "cosine")
    exact.add(x)
    _, ref = exact.search(q, 10)
    index = build_index(kind, 64, "cosine", use_gpu=False, **kwargs)
    index.add(x)
    _, ids = index.search(q, 10)
    assert recall_at(ids, ref) >= min_recall


def test_faiss_training_errors() -> None:
    index = FaissIndex(16, kind="ivf_flat", nlist=64, use_gpu=False)
    with pytest.raises(IndexInputError, match=r"nlist=64 = 64 training vectors; got 50"):
        index.add(torch.randn(50, 16))
    assert len(index) == 0 and not index.is_trained
    index.train(torch.randn(200, 16))  # explicit training, then adds of any size
    index.add(torch.randn(3, 16))
    assert len(index) == 3
    with pytest.raises(IndexInputError, match="pq_m must divide"):
        FaissIndex(30, kind="ivf_pq", pq_m=7, use_gpu=False)
    with pytest.raises(IndexInputError, match="kind must be one of"):
        FaissIndex(8, kind="lsh")
    with pytest.raises(IndexInputError, match="k=4 .*index size 3"):
        index.search(torch.randn(1, 16), 4)


def test_faiss_gpu_k_limit_falls_back_to_cpu(caplog) -> None:
    """The GPU path is mocked: a fake GPU index records calls; k above the limit must use the CPU copy."""
    x = torch.randn(300, 16)
    index = FaissIndex(16, kind="flat", use_gpu=False)
    index.add(x)
    calls = []

    class FakeGpuIndex:
        def search(self, q: np.ndarray, k: int):
            calls.append(k)
            return index._cpu.search(q, k)

    index._gpu_enabled = True
    index._gpu_index = lambda: FakeGpuIndex()  # type: ignore[method-assign]
    index.gpu_max_k = 10
    q = torch.randn(4, 16)
    index.search(q, 10)
    assert calls == [10]
    with caplog.at_level("WARNING"):
        scores, ids = index.search(q, 11)
    assert calls == [10] and "exceeds the FAISS GPU limit of 10" in caplog.text
    assert torch.equal(ids, reference_topk(q, x, 11)[1])


def test_gpu_resources_shared_per_gpu_and_shard_with_temp_memory(monkeypatch) -> None:
    """The GPU cloning is mocked (a fake faiss module around the real one): indexes share one resources
    object per (GPU, shard slot, temp memory); shards on one GPU get distinct ones; temp memory is set."""
    import types

    import contrastive.index.faiss_index as fi

    real = import_faiss()
    made, clones = [], []

    class FakeResources:
        def __init__(self) -> None:
            self.temp = None
            made.append(self)

        def setTempMemory(self, n: int) -> None:
            self.temp = n

    def to_gpu(res, device, index, co):
        clones.append(([res], [device], co.useFloat16))
        return index

    def to_gpus(resources, index, co=None, gpus=None):
        clones.append((list(resources), list(gpus), co.useFloat16))
        return index

    fake = types.SimpleNamespace(get_num_gpus=lambda: 2, StandardGpuResources=FakeResources,
                                 GpuClonerOptions=lambda: types.SimpleNamespace(useFloat16=False),
                                 GpuMultipleClonerOptions=lambda: types.SimpleNamespace(useFloat16=False, shard=False),
                                 index_cpu_to_gpu=to_gpu, index_cpu_to_gpu_multiple_py=to_gpus)
    for name in ("IndexFlatIP", "METRIC_INNER_PRODUCT"):
        setattr(fake, name, getattr(real, name))
    monkeypatch.setattr(fi, "import_faiss", lambda: fake)
    monkeypatch.setattr(fi, "_GPU_RESOURCES", {})
    x = torch.randn(50, 8)
    a, b = FaissIndex(8, use_gpu=True), FaissIndex(8, use_gpu=True, float16=True)
    sharded = FaissIndex(8, use_gpu=True, gpu_ids=[1, 1, 0])
    small = FaissIndex(8, use_gpu=True, gpu_temp_memory=256 << 20)
    for index in (a, b, sharded, small):
        index.add(x)
        index.search(x[:2], 3)
    assert a._gpu_resources[0] is b._gpu_resources[0] and clones[1][2] is True  # shared; fp16 passed on
    r = sharded._gpu_resources
    assert clones[2][1] == [1, 1, 0] and r[0] is not r[1] and r[2] is a._gpu_resources[0]
    assert small._gpu_resources[0] is not a._gpu_resources[0] and small._gpu_resources[0].temp == 256 << 20
    assert len(made) == 4 and a._gpu_resources[0].temp is None
    with pytest.raises(IndexInputError, match="gpu_temp_memory"):
        FaissIndex(8, use_gpu=True, gpu_temp_memory=-1)


def test_use_gpu_true_without_gpu_raises() -> None:
    if import_faiss().get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(IndexInputError, match="use_gpu=True, but FAISS sees no GPU"):
        FaissIndex(8, use_gpu=True)
    with pytest.raises(IndexInputError, match="hnsw"):
        FaissIndex(8, kind="hnsw", use_gpu=True)
    assert not FaissIndex(8, use_gpu="auto").on_gpu


def test_missing_faiss_message(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'contrastive\[cpu\]' \(or \[gpu\]\)"):
        FaissIndex(8)


def test_registry_and_build_index() -> None:
    assert {"exact", "faiss"} <= set(INDEXES.names())
    assert isinstance(INDEXES.build("exact", dim=4), ExactIndex)
    hnsw = INDEXES.build("faiss", dim=8, kind="hnsw", use_gpu=False)
    assert isinstance(hnsw, FaissIndex) and hnsw.kind == "hnsw"
    assert isinstance(build_index("exact", 4, chunk_size=3), ExactIndex)
    assert build_index("ivf_pq", 16, pq_m=4, use_gpu=False).kind == "ivf_pq"
    with pytest.raises(IndexInputError, match="valid kinds"):
        build_index("annoy", 4)


# -- GPU --------------------------------------------------------------------------------------------
def _faiss_gpus() -> int:
    try:
        return import_faiss().get_num_gpus()
    except ImportError:
        return 0


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_faiss_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _faiss_gpus() == 0, reason="needs CUDA and faiss-gpu"
)


@pytest.mark.gpu
@needs_gpu
def test_exact_index_cuda_matches_cpu() -> None:
    x, q = torch.randn(5000, 64), torch.randn(300, 64)
    cpu = ExactIndex(64, "cosine", chunk_size=1024)
    gpu = ExactIndex(64, "cosine", chunk_size=1024, device="cuda")
    cpu.add(x)
    gpu.add(x)
    cv, ci = cpu.search(q, 50)
    gv, gi = gpu.search(q, 50)
    assert gi.device.type == "cpu"
    assert (gi == ci).float().mean() > 0.99  # TF32/cuBLAS rounding may swap near-ties
    torch.testing.assert_close(gv, cv, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_faiss_gpu
def test_faiss_gpu_flat_and_k_fallback() -> None:
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(5000, 32, generator=g), torch.randn(50, 32, generator=g)
    index = FaissIndex(32, kind="flat", use_gpu=True)
    index.add(x)
    assert index.on_gpu
    exact = ExactIndex(32)
    exact.add(x)
    assert (index.search(q, 10)[1] == exact.search(q, 10)[1]).float().mean() > 0.99
    _, ids = index.search(q, 3000)  # above the 2048 GPU limit: CPU copy
    assert torch.equal(ids[:, :10], exact.search(q, 10)[1])


def test_check_finite_row_sum_shortcut_matches_elementwise() -> None:
    """check_finite screens rows by their sum: finite rows whose sum overflows must pass, and every row
    holding NaN or inf must be reported, as an element-wise torch.isfinite check would."""
    from contrastive.index.base import check_finite

    x = torch.randn(50, 6)
    x[3] = 3e38  # finite, but the row sum overflows to inf
    x[7, 1] = -3e38
    x[7, 2] = -3e38
    check_finite(x, "vectors")  # no error: every value is finite
    x[11, 4], x[20, 0], x[20, 1] = float("nan"), float("inf"), float("-inf")  # inf + -inf sums to NaN
    expected = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
    assert expected == [11, 20]
    with pytest.raises(IndexInputError, match=r"rows \[111, 120\]"):
        check_finite(x, "vectors", offset=100)


@pytest.mark.parametrize("threads", [1, 2, 3])  # 3: more threads than cores here, so tasks wait for each other
@pytest.mark.parametrize(
    "nq,n,k,qchunk,chunk",
    [
        (300, 5000, 100, None, None),  # default blocks, several sub-chunks, k + cap > 64 (vectorised select)
        (600, 3000, 50, None, None),  # three sub-chunks, shared by two threads when threads = 2
        (257, 4099, 7, 100, 333),  # ragged last sub-chunk and database piece, calls of 100 queries
        (700, 4099, 7, None, 333),  # the same in one call: 3 ragged sub-chunks x 2 groups of pieces
        (520, 2000, 9, None, 40),  # 3 sub-chunks x 7 groups of 8 pieces: tasks of the next group overtake
        (64, 150, 150, 7, 64),  # k = N
        (40, 6000, 5000, None, 2048),  # k + cap above the vectorised select's limit: scalar fallback
    ],
)
def test_packed_schedule_matches_stable_sort(monkeypatch: pytest.MonkeyPatch, nq: int, n: int, k: int,
                                             qchunk: int, chunk: int, threads: int) -> None:
    """The packed-GEMM schedule (forced on small inputs) against the full stable sort, with exact ties."""
    from contrastive.index import exact as exact_mod

    if not exact_mod.packed_available():
        pytest.skip("torch without MKL's packed GEMM")
    monkeypatch.setattr(exact_mod, "PACKED_MIN_QUERIES", 0)
    g = torch.Generator().manual_seed(nq + n + k)
    x = torch.randint(-3, 4, (n, 16), generator=g).float()
    q = torch.randint(-3, 4, (nq, 16), generator=g).float()
    vals, ids = exact_topk(q, x, k, chunk_size=chunk, query_chunk_size=qchunk, threads=threads, backend="fused")
    ref_v, ref_i = reference_topk(q, x, k)
    assert torch.equal(ids, ref_i) and torch.equal(vals, ref_v)
