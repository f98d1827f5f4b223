"""Exact (brute-force) top-k and gold-rank computation in torch, chunked over queries and database.

The score matrix ``queries @ database.T`` ``(Q, N)`` is never materialised: it is produced block by
block, ``(query_chunk, chunk)`` at a time, into one reused buffer, so peak memory is
``O(query_chunk * chunk)`` whatever ``Q`` and ``N`` are (100k x 100k float32 scores would be 40 GB;
sentence-transformers #3164 / PR #3816 hit exactly this when mining without FAISS).

Top-k selection by threshold
----------------------------
A ``torch.topk`` per block costs more than the matmul that produced the block on a CPU. Both paths below
use the threshold selection of Johnson, Douze & Jégou 2017 ("Billion-scale similarity search with
GPUs", arXiv:1702.08734) instead: each query row keeps a running top-k whose k-th score ``t`` a new
score must beat; block ``j`` has only about ``k * chunk / seen`` survivors per query,
``k (1 + ln(N / chunk))`` in all, which are buffered and merged in batches.

**Fused CPU path** (float32 on CPU, the default there): the C extension in
:mod:`contrastive.index._kernels` (``_topk.c``) does the filter and merge in one SIMD pass (AVX-512,
AVX2 or scalar) over each score block right after the matmul wrote it. Three schedules, picked by
:func:`exact_topk`:

- **Packed** (many queries, torch built with MKL, as its x86 wheels are): MKL's packed GEMM
  (``cblas_sgemm_pack`` / ``cblas_sgemm_compute``, found in the loaded ``libtorch_cpu``) packs the
  database pieces and query sub-chunks once per call, after which small blocks (:data:`PACKED_BLOCK`)
  run at the full matmul rate, and the filter reads each block right after it is written. All worker
  threads share each call (OpenMP inside the C extension): they take tasks (query sub-chunk x group of
  :data:`PACKED_GROUP` database pieces) from one ticket counter, with no barrier between groups, so a
  faster core takes more of them; MKL runs single-threaded inside each (``mkl_set_num_threads_local``,
  nothing process-wide changes). Database pieces are packed per call (two groups at a time, shared by
  all of the call's queries), so no copy of the database is kept.
- **Worker threads** (many queries, no packed GEMM): each worker runs a single-threaded ``torch.mm``
  per :data:`FUSED_BLOCK` block into its own buffer, then filters it. While it runs,
  ``torch.set_num_threads(1)`` is in effect process-wide (restored after; such searches are
  serialised).
- **Inline** (few queries): one ``torch.mm`` on torch's threads per :data:`FUSED_INLINE_BLOCK` block,
  then the filter with its rows split over OpenMP threads.

**Torch path** (CUDA tensors, float64, or when the C extension is not built): the same filter written
with torch ops:

1. One pass reduces the block to maxima of level-1 groups (``group_size`` columns) and those to
   maxima of level-2 groups (8 level-1 groups); only level-2 groups whose maximum beats ``t`` are
   opened, then only their level-1 groups that do, so a survivor costs ~16 looked-at values.
2. Survivors are buffered and, every ``merge_every`` survivors per query, merged into the running list
   by binary search (``torch.searchsorted``) and two scatters, with no row-wise sort of ``(Q, k + m)``
   scores.

In both, the first block has no threshold yet and uses a lower bound instead: the k-th largest group
maximum (at least ``k`` distinct scores reach it). On a shared or oversubscribed CPU, run the torch path
with ``OMP_WAIT_POLICY=PASSIVE`` (spinning OpenMP threads slow its many short ops).

Tie-breaking is deterministic: among equal scores the lower id comes first (a new score must be
*strictly* above ``t`` to displace the running k-th entry, whose id is lower; buffered survivors are
ordered by (score desc, id asc) and go after running entries with an equal score). Results are thus
identical to a stable descending sort of each full score row, which is what the tests compare against.

Measured rates of each path and schedule, and the measurements behind the block shapes below:
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

import torch
from torch import Tensor

from contrastive.index.base import (
    ArrayLike,
    Index,
    IndexFileError,
    IndexInputError,
    atomic_write,
    check_dim,
    check_finite,
    check_k,
    check_size,
    n_rows,
    register_backend,
    write_sidecar,
)
from contrastive.index import _kernels
from contrastive.index._kernels import fused_available, packed_available

NEG_INF = float("-inf")
_LEVEL2 = 8  # level-1 groups per level-2 group in the threshold filter
#: default block shapes: (query rows, database rows) per block for the fused CPU path and the torch path.
#: PACKED_BLOCK: per worker thread, packed GEMM (512 KB of scores each); chosen with benchmarks/packed_gemm.py and
#: benchmarks/profile_packed.py (benchmarks/RESULTS.md)
PACKED_BLOCK = (256, 512)
PACKED_GROUP = 8  # database pieces packed together; each query sub-chunk meets all of them in a row
#: query rows per call of the packed schedule (all worker threads share a call): each database piece is packed
#: once per call and serves all of them, so more rows make packing cheaper per query; capped so that the call's
#: per-row state (top-k keys and packed queries) stays within PACKED_MEMORY bytes
PACKED_CHUNK = 16384
PACKED_MEMORY = 256 << 20
FUSED_BLOCK = (1024, 2048)  # per worker thread (8 MB of scores each)
FUSED_INLINE_BLOCK = (512, 2048)  # one thread of work at a time: torch.mm on all threads, then the filter
TORCH_BLOCK = (4096, 4096)
#: torch path on CUDA, largest first: big blocks, so that the filter's per-block kernel launches and host
#: syncs (survivor counts) are small next to the block's matmul. The first whose score buffer (with the
#: filter's temporaries, ~1.5x) fits in an eighth of the free GPU memory is used (rates and memory per
#: shape, from benchmarks/mining_cuda.py: benchmarks/RESULTS.md).
CUDA_BLOCKS = ((16384, 65536), (8192, 65536), (8192, 16384), (4096, 4096))
PRECISIONS = ("highest", "high", "medium")
_MIN_WORKER_ROWS = 64  # fewer query rows per worker than this: use the inline schedule
#: fewer queries than this: not the packed schedule (packing every database piece once per call would not pay)
PACKED_MIN_QUERIES = 1024
_MAX_FUSED_IDS = 2**32 - 2  # the fused path packs ids into 32 bits
_THREADS_LOCK = threading.Lock()  # torch's thread count is process-wide: one worker-thread search at a time


def _check_pair(queries: Tensor, database: Tensor) -> None:
    if queries.dim() != 2 or database.dim() != 2:
        raise IndexInputError(
            f"queries and database must be 2-D (Q, d) and (N, d); got {tuple(queries.shape)} and {tuple(database.shape)}"
        )
    if queries.shape[1] != database.shape[1]:
        raise IndexInputError(f"queries have dim {queries.shape[1]} but the database has dim {database.shape[1]}")
    if queries.device != database.device:
        raise IndexInputError(f"queries are on {queries.device} but the database is on {database.device}")
    if not queries.is_floating_point() or queries.dtype != database.dtype:
        raise IndexInputError(f"queries and database must share one float dtype; got {queries.dtype}, {database.dtype}")


def _check_chunk(chunk_size: int, name: str = "chunk_size") -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise IndexInputError(f"{name} must be a positive integer; got {chunk_size!r}")
    return chunk_size


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for a 1-D ``x`` via ``index_select`` (several times faster than advanced indexing on CPU)."""
    return x.index_select(0, index.reshape(-1)).view(index.shape)


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise IndexInputError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    return precision


class _Float32MatmulPrecision:
    """Set ``torch.set_float32_matmul_precision`` for a block and restore it after.

    An exact index must compute float32 scores in float32: Lightning advises
    ``torch.set_float32_matmul_precision("high")`` on GPUs with tensor cores, which makes CUDA float32
    matmuls TF32 (10-bit mantissa, relative error ~1e-3), enough to reorder near-ties and change mined
    negatives and ranks. The setting is process-wide; it is restored on exit.
    """

    def __init__(self, precision: str) -> None:
        self.precision = _check_precision(precision)
        self.before = ""

    def __enter__(self) -> None:
        self.before = torch.get_float32_matmul_precision()
        if self.before != self.precision:
            torch.set_float32_matmul_precision(self.precision)

    def __exit__(self, *exc: Any) -> None:
        if torch.get_float32_matmul_precision() != self.before:
            torch.set_float32_matmul_precision(self.before)


def cuda_block(device: torch.device) -> tuple[int, int]:
    """Default ``(query rows, database rows)`` per block on a CUDA ``device`` (see :data:`CUDA_BLOCKS`)."""
    free, _ = torch.cuda.mem_get_info(device)
    for rows, cols in CUDA_BLOCKS:
        if 1.5 * rows * cols * 4 <= free / 8:
            return rows, cols
    return CUDA_BLOCKS[-1]


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """``"auto"`` → the current CUDA device when CUDA is available, else CPU; ``None`` → CPU."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise IndexInputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IndexInputError(f"device={device!r}, but torch sees no CUDA device (use device='auto' to fall back to CPU)")
    return dev


class _BlockTopK:
    """Running top-k of one query chunk, fed database blocks in increasing id order.

    Survivors of the threshold filter are buffered, as one ``(q, m_b)`` score/id matrix per block, and
    merged into the sorted running list only when about ``merge_every`` of them per query have piled up
    (or at the end): in late blocks only a few scores per query survive, while a merge costs
    ``O(q * k)`` however few they are. Between merges the filter uses the last merged threshold, which
    is looser but still exact.
    """

    def __init__(self, n_queries: int, k: int, device: torch.device, dtype: torch.dtype, merge_every: float) -> None:
        self.k = k
        self.q = n_queries
        self.values = torch.full((n_queries, k), NEG_INF, device=device, dtype=dtype)
        self.ids = torch.full((n_queries, k), -1, device=device, dtype=torch.int64)
        self.threshold = self.values[:, k - 1 :]
        self.seen = 0  # database columns filtered so far
        self.merged = 0  # ... of which the running top-k accounts for
        self.budget = max(1, int(merge_every * n_queries))
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._n_pending = 0

    @property
    def full(self) -> bool:
        """Whether the running list holds k real scores, so its k-th score is a usable threshold."""
        return self.merged >= self.k

    def group_sizes(self, width: int, preferred: int) -> tuple[int, int]:
        """``(g1, g2)`` for the next block: level-1 groups of ``g1`` columns, level-2 groups of ``g2``
        level-1 groups. Until k columns are merged the block needs at least ``2k`` level-1 groups, so
        that the k-th largest group maximum is a tight lower bound."""
        g1 = preferred
        if not self.full:
            g1 = min(preferred, _pow2_floor(width // (2 * self.k))) if width >= 2 * self.k else 1
        g2 = _LEVEL2 if width >= g1 * _LEVEL2 * 2 else 1
        return g1, g2

    def update(self, block: Tensor, width: int, g1: int, g2: int, offset: int) -> None:
        """Filter ``block`` ``(q, W)``, ``W`` a multiple of ``g1 * g2``, whose first ``width`` columns are ids
        ``offset + j`` (the rest is -inf padding); survivors are buffered for the next merge.

        Groups are strided so that both reductions are element-wise maxima of contiguous rows (well
        vectorised): column ``j`` is in level-1 group ``j mod G1``, level-1 group ``h`` in level-2 group
        ``h mod G2``. Only level-2 groups whose maximum beats the threshold are opened, then only their
        level-1 groups that do, so a survivor costs ``g1 + g2`` looked-at values.
        """
        q, w_pad = block.shape
        n1 = w_pad // g1
        n2 = n1 // g2
        m1 = block.view(q, g1, n1).amax(dim=1) if g1 > 1 else block  # m1[r, h] = max_t block[r, h + t*n1]
        m2 = m1.view(q, g2, n2).amax(dim=1) if g2 > 1 else m1  # m2[r, u] = max_s m1[r, u + s*n2]
        thr = self.threshold.view(-1)
        lower = None
        if not self.full and n1 >= self.k:
            # at least k distinct scores of this block reach the k-th largest level-1 maximum
            lower = torch.topk(m1, self.k, dim=1, sorted=False).values.amin(dim=1)
        self.seen += width

        def passing(vals: Tensor, rows: Optional[Tensor]) -> Tensor:
            t = thr if rows is None else _take(thr, rows)
            ok = vals > t.unsqueeze(1)
            if lower is not None:
                ok &= vals >= (lower if rows is None else _take(lower, rows)).unsqueeze(1)
            return ok.view(-1).nonzero().squeeze(1)

        # level 2: which (query, u) groups can hold a survivor
        f2 = passing(m2, None)
        if f2.shape[0] == 0:
            return self._maybe_flush()
        r2 = torch.div(f2, n2, rounding_mode="floor")
        u = f2 - r2 * n2
        if g2 > 1:  # open them: their level-1 maxima
            at = (r2 * n1 + u).unsqueeze(1) + torch.arange(g2, device=block.device) * n2
            v1 = _take(m1.reshape(-1), at)  # (P2, g2)
            f1 = passing(v1, r2)
            p = torch.div(f1, g2, rounding_mode="floor")
            r1, h = _take(r2, p), _take(u, p) + (f1 - p * g2) * n2
        else:
            r1, h = r2, u
        # level 1: open the surviving groups' columns
        at = (r1 * w_pad + h).unsqueeze(1) + torch.arange(g1, device=block.device) * n1
        v0 = _take(block.view(-1), at)  # (P1, g1)
        f0 = passing(v0, r1)
        p = torch.div(f0, g1, rounding_mode="floor")
        cols = _take(h, p) + (f0 - p * g1) * n1 + offset
        self._stash(_take(r1, p), cols, _take(v0.view(-1), f0))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._n_pending >= self.budget or not self.full:
            self.flush()

    def _stash(self, rows: Tensor, ids: Tensor, vals: Tensor) -> None:
        """Buffer survivors (grouped by query) as a ``(q, m)`` score/id matrix padded with -inf."""
        counts = torch.bincount(rows, minlength=self.q)
        m = int(counts.max())
        within = torch.arange(rows.shape[0], device=rows.device) - _take(torch.cumsum(counts, 0) - counts, rows)
        new_v = torch.full((self.q, m), NEG_INF, device=vals.device, dtype=vals.dtype)
        new_i = torch.full((self.q, m), -1, device=vals.device, dtype=torch.int64)
        new_v[rows, within] = vals
        new_i[rows, within] = ids
        self._pending.append((new_v, new_i))
        self._n_pending += rows.shape[0]

    def flush(self) -> None:
        """Merge the buffered survivors into the running top-k.

        The buffered matrices are concatenated and sorted per row by (score desc, id asc). Each
        survivor's slot in the running list is found by binary search, running entries of an equal
        score first (their ids are lower); old entries shift right by the number of survivors inserted
        before them. The final positions form a permutation of ``0..k+m-1``, so two scatters build the
        merged rows, with no ``(q, k + m)`` sort.
        """
        self.merged = self.seen
        if not self._pending:
            return
        parts, self._pending, self._n_pending = self._pending, [], 0
        new_v = torch.cat([v for v, _ in parts], 1) if len(parts) > 1 else parts[0][0]
        new_i = torch.cat([i for _, i in parts], 1) if len(parts) > 1 else parts[0][1]
        q, k = self.values.shape
        m = new_v.shape[1]
        dev = new_v.device
        if m > 1:
            new_v, order = torch.sort(new_v, dim=1, descending=True)
            new_i = new_i.gather(1, order)
            # equal scores must be in id order; redo the (rare) rows with ties lexicographically
            tied = ((new_v[:, 1:] == new_v[:, :-1]) & (new_v[:, 1:] > NEG_INF)).any(dim=1).nonzero().squeeze(1)
            if tied.shape[0]:
                ids_t, order = torch.sort(new_i[tied], dim=1)
                vals_t, order2 = torch.sort(new_v[tied].gather(1, order), dim=1, descending=True, stable=True)
                new_v[tied] = vals_t
                new_i[tied] = ids_t.gather(1, order2)
        slot = torch.searchsorted(self.values.neg(), new_v.neg(), right=True)  # (q, m), in 0..k
        new_pos = slot + torch.arange(m, device=dev)
        inserted = torch.zeros(q, k + 1, device=dev, dtype=torch.int64).scatter_add_(1, slot, torch.ones_like(slot))
        old_pos = torch.arange(k, device=dev) + torch.cumsum(inserted, 1)[:, :k]
        out_v = torch.empty(q, k + m, device=dev, dtype=new_v.dtype)
        out_i = torch.empty(q, k + m, device=dev, dtype=torch.int64)
        out_v.scatter_(1, old_pos, self.values).scatter_(1, new_pos, new_v)
        out_i.scatter_(1, old_pos, self.ids).scatter_(1, new_pos, new_i)
        self.values = out_v[:, :k].contiguous()
        self.ids = out_i[:, :k].contiguous()
        self.threshold = self.values[:, k - 1 :]


BACKENDS = ("auto", "fused", "torch")


def exact_topk(
    queries: Tensor,
    database: Tensor,
    k: int,
    chunk_size: Optional[int] = None,
    query_chunk_size: Optional[int] = None,
    group_size: int = 8,
    merge_every: float = 16.0,
    threads: Optional[int] = None,
    backend: str = "auto",
    precision: str = "highest",
) -> tuple[Tensor, Tensor]:
    """Exact inner-product top-``k`` of every query over ``database``, chunked.

    Args:
        queries: ``(Q, d)`` float tensor with finite values.
        database: ``(N, d)`` float tensor on the same device (normalise both first for cosine).
        k: neighbours per query, ``1 <= k <= N``.
        chunk_size: database rows per block (default: 512 on the fused CPU path's packed schedule, 2048 on
            its others, 4096 on the torch path on CPU; on CUDA 65536, or 16384 or 4096 when free GPU memory
            is short, see :func:`cuda_block`).
        query_chunk_size: query rows per block (default on the fused path: 1024 with worker threads, 512
            inline; ``chunk_size`` or 4096 torch on CPU; 16384 or 8192 on CUDA, 4096 with the smallest
            block); on the packed schedule (``Q >= 1024`` queries) query rows per call, shared by all
            worker threads (default up to ``PACKED_CHUNK`` = 16384, fewer when the call's per-query
            state would pass ``PACKED_MEMORY`` = 256 MB), its blocks being ``256 x 512``. Peak extra
            memory is about ``query_chunk_size * chunk_size`` scores per worker thread (x1.4 on CUDA);
            on the packed schedule, ``query_chunk_size * ((k + max(k, 64)) * 8 + d * 4)`` bytes, plus
            one block and two groups of 8 packed database pieces (~8 MB at ``d = 256``).
        group_size: torch path only: columns per group in the threshold filter (a tuning knob).
        merge_every: torch path only: buffered survivors per query before a merge (a tuning knob).
        threads: fused path: worker threads (default ``torch.get_num_threads()``); see the module doc.
        backend: ``"fused"`` (compiled filter, float32 on CPU), ``"torch"``, or ``"auto"`` (fused when
            it applies, else torch). Both return identical results.
        precision: float32 matmul precision during the search (``torch.set_float32_matmul_precision``,
            restored after): ``"highest"`` (default) computes float32 scores in float32 even when the
            process allows TF32; ``"high"`` lets CUDA use TF32 tensor cores (several times faster on
            Ampere and later, but scores carry ~1e-3 relative error, so near-ties may reorder).

    Returns:
        ``scores`` ``(Q, k)`` and ``ids`` ``(Q, k)`` int64 on the input device, best first; ties are
        broken by lower id first (as a stable descending sort of each full score row).
    """
    _check_pair(queries, database)
    n = database.shape[0]
    check_k(k, n, allow_fewer=False)
    if backend not in BACKENDS:
        raise IndexInputError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if threads is not None:  # checked on every path, so bad input fails whether or not the kernel is built
        _check_chunk(threads, "threads")
    check_finite(queries, "queries")
    check_finite(database, "database vectors")
    fused_ok = fused_available() and queries.device.type == "cpu" and queries.dtype == torch.float32 and n <= _MAX_FUSED_IDS
    if backend == "fused" and not fused_ok:
        why = ("the C extension contrastive.index._kernels._topk is not built (reinstall with a C compiler)" if not fused_available()
               else "it needs float32 CPU tensors and fewer than 2^32 database rows")
        raise IndexInputError(f"backend='fused' is unavailable: {why}")
    with _Float32MatmulPrecision(precision):
        if backend == "torch" or not fused_ok:
            qdef, cdef = cuda_block(queries.device) if queries.device.type == "cuda" else TORCH_BLOCK
            chunk = _check_chunk(chunk_size if chunk_size is not None else cdef)
            qchunk = query_chunk_size if query_chunk_size is not None else (
                chunk_size if chunk_size is not None else qdef)
            return _torch_topk(queries, database, k, chunk, _check_chunk(qchunk, "query_chunk_size"), group_size,
                               merge_every)
        chunk = _check_chunk(chunk_size) if chunk_size is not None else None
        qchunk = _check_chunk(query_chunk_size, "query_chunk_size") if query_chunk_size is not None else None
        workers = _check_chunk(threads if threads is not None else torch.get_num_threads(), "threads")
        return _fused_topk(queries.contiguous(), database.contiguous(), k, chunk, qchunk, workers)


def sort_by_score_then_id(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(values, ids)`` ``(q, m)`` with each row reordered by (score desc, id asc)."""
    ids, order = torch.sort(ids, dim=1)
    values, order = torch.sort(values.gather(1, order), dim=1, descending=True, stable=True)
    return values, ids.gather(1, order)


def _fused_topk(queries: Tensor, database: Tensor, k: int, chunk: Optional[int], qchunk: Optional[int],
                threads: int) -> tuple[Tensor, Tensor]:
    """The compiled path: the packed schedule for many queries when MKL's packed GEMM is there; else, with
    several threads and enough queries, each worker thread owns whole query chunks and runs a
    single-threaded ``torch.mm`` per block into its own buffer, then filters it (the block is filtered by
    the core that computed it); otherwise one ``torch.mm`` on torch's threads per block, then the filter
    with its rows split over ``threads`` OpenMP threads."""
    fused = _kernels.topk
    assert fused is not None
    nq, n = queries.shape[0], database.shape[0]
    out_v = torch.empty(nq, k, dtype=torch.float32)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    if nq == 0:
        return out_v, out_i
    cap = max(k, 64)  # buffered survivors per query between merges (a merge costs O(k + cap))
    if nq >= PACKED_MIN_QUERIES and packed_available():
        _packed_topk(queries, database, k, chunk, qchunk, threads, cap, out_v, out_i)
        return out_v, out_i
    workers = min(threads, nq // _MIN_WORKER_ROWS)
    if workers > 1:
        rows = min(qchunk or FUSED_BLOCK[0], -(-nq // workers))
        width = chunk or FUSED_BLOCK[1]
        filter_threads = 1
    else:
        rows, width = qchunk or FUSED_INLINE_BLOCK[0], chunk or FUSED_INLINE_BLOCK[1]
        filter_threads = threads
    rows = min(rows, nq)
    starts = iter(range(0, nq, rows))
    take = threading.Lock()

    def work() -> None:
        buf = torch.empty(rows * min(width, n))
        keys = torch.empty(rows, k + cap, dtype=torch.int64)  # packed (score, id) keys, see _topk.c
        thr = torch.empty(rows)
        cnt = torch.empty(rows, dtype=torch.int64)
        while True:
            with take:
                q0 = next(starts, None)
            if q0 is None:
                return
            q = queries[q0 : q0 + rows]
            m = q.shape[0]
            fused.init(keys.data_ptr(), thr.data_ptr(), cnt.data_ptr(), m, k, cap)
            for c0 in range(0, n, width):
                db = database[c0 : c0 + width]
                w = db.shape[0]
                block = buf[: m * w].view(m, w)
                torch.mm(q, db.T, out=block)
                fused.update(block.data_ptr(), m, w, w, c0, keys.data_ptr(), thr.data_ptr(), cnt.data_ptr(), k, cap,
                              filter_threads)
            fused.finish(keys.data_ptr(), cnt.data_ptr(), m, k, cap, out_v[q0].data_ptr(), out_i[q0].data_ptr(), k,
                          True)  # sorted (score desc, id asc)

    if workers <= 1:
        work()
        return out_v, out_i
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="exact-topk") as pool:
                for f in [pool.submit(work) for _ in range(workers)]:
                    f.result()
        finally:
            torch.set_num_threads(before)
    return out_v, out_i


def _packed_rows(nq: int, d: int, k: int, cap: int, qchunk: Optional[int] = None) -> int:
    """Query rows per call of the packed schedule (all worker threads share a call): calls of equal size (the
    last may be shorter), each at most ``qchunk`` rows or by default ``PACKED_CHUNK``, fewer when the call's
    per-query state (top-k keys and packed queries) would pass ``PACKED_MEMORY`` bytes."""
    row_bytes = (k + cap) * 8 + d * 4  # a query's keys (see _topk.c) and its packed copy
    target = qchunk or max(PACKED_BLOCK[0], min(PACKED_CHUNK, PACKED_MEMORY // row_bytes))
    return -(-nq // -(-nq // target))


def _packed_topk(queries: Tensor, database: Tensor, k: int, chunk: Optional[int], qchunk: Optional[int],
                 threads: int, cap: int, out_v: Tensor, out_i: Tensor) -> None:
    """The packed schedule (see the module doc): query chunks one after another, each searched in one call of
    the C extension by ``threads`` OpenMP threads, which take its 256-row sub-chunks from a shared counter;
    results sorted into ``out_v`` / ``out_i``."""
    fused = _kernels.topk
    assert fused is not None
    nq, d = queries.shape
    n = database.shape[0]
    rows = _packed_rows(nq, d, k, cap, qchunk)
    block_rows, width = min(PACKED_BLOCK[0], rows), min(chunk or PACKED_BLOCK[1], n)
    for q0 in range(0, nq, rows):
        m = min(rows, nq - q0)
        fused.search_chunk(queries[q0].data_ptr(), m, d, database.data_ptr(), n, block_rows, width, k, cap,
                            out_v[q0].data_ptr(), out_i[q0].data_ptr(), k, PACKED_GROUP, threads)  # sorted


def _torch_topk(queries: Tensor, database: Tensor, k: int, chunk: int, qchunk: int, group_size: int,
                merge_every: float) -> tuple[Tensor, Tensor]:
    """The torch-op path (any device and float dtype); see the module doc."""
    n = database.shape[0]
    group = _pow2_floor(_check_chunk(group_size, "group_size"))
    nq, d = queries.shape
    out_v = torch.empty(nq, k, device=queries.device, dtype=queries.dtype)
    out_i = torch.empty(nq, k, device=queries.device, dtype=torch.int64)
    if nq == 0:
        return out_v, out_i
    # one score buffer for all blocks; room for padding the last block up to a multiple of the group
    buf = torch.empty(min(qchunk, nq) * (min(chunk, n) + group * _LEVEL2), device=queries.device, dtype=queries.dtype)
    for q0 in range(0, nq, qchunk):
        q = queries[q0 : q0 + qchunk]
        state = _BlockTopK(q.shape[0], k, queries.device, queries.dtype, merge_every)
        for c0 in range(0, n, chunk):
            db = database[c0 : c0 + chunk]
            width = db.shape[0]
            g1, g2 = state.group_sizes(width, group)
            g = g1 * g2
            padded = -(-width // g) * g
            if padded != width:
                db = torch.cat([db, db.new_zeros(padded - width, d)])
            block = buf[: q.shape[0] * padded].view(q.shape[0], padded)
            torch.mm(q, db.T, out=block)
            if padded != width:
                block[:, width:] = NEG_INF
            state.update(block, width, g1, g2, c0)
        state.flush()
        out_v[q0 : q0 + q.shape[0]] = state.values
        out_i[q0 : q0 + q.shape[0]] = state.ids
    return out_v, out_i


TIES = ("pessimistic", "optimistic")


def rank_of(
    queries: Tensor,
    database: Tensor,
    target_ids: Tensor,
    dup_group: Optional[Tensor] = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
    tie_rtol: float = 1e-5,
    precision: str = "highest",
) -> Tensor:
    """1-based rank of ``database[target_ids[i]]`` among all database rows for query ``i`` (inner product).

    ``rank = 1 + #{j != target : s_j > s_target}`` (``ties="optimistic"``) or
    ``1 + #{j != target : s_j >= s_target}`` (``ties="pessimistic"``, the default: a model that gives
    every document the same score gets rank ``N``, not 1). Scores within
    ``tol_i = tie_rtol * |q_i| * max_j |x_j|`` of the target's are treated as equal: the target's score is
    computed by a row-wise dot product and the others by blocked matmuls, which round differently
    (float32 differences of ~1e-7 relative), so exact duplicates of the target would otherwise land on
    a random side. ``tie_rtol=0`` compares raw float scores.

    Args:
        queries: ``(Q, d)``; database: ``(N, d)`` float on the same device.
        target_ids: ``(Q,)`` int64 index of each query's gold row.
        dup_group: optional ``(N,)`` int64 duplicate-group id per database row (negative = no group).
            Rows in the target's group, other than the target, are left out of the ranking (known
            false negatives), giving the "filtered" rank.
        chunk_size: block size over queries and database; memory is ``O(chunk_size**2)``.
        precision: float32 matmul precision (see :func:`exact_topk`); ``"highest"`` by default.

    Returns:
        ``(Q,)`` int64 ranks in ``1..N`` (filtered ranks when ``dup_group`` is given).
    """
    raw, filtered = rank_pair(queries, database, target_ids, dup_group, chunk_size, ties, tie_rtol, precision)
    return raw if filtered is None else filtered


def rank_pair(
    queries: Tensor,
    database: Tensor,
    target_ids: Tensor,
    dup_group: Optional[Tensor] = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
    tie_rtol: float = 1e-5,
    precision: str = "highest",
) -> tuple[Tensor, Optional[Tensor]]:
    """``(raw ranks, filtered ranks or None)`` of :func:`rank_of` in one pass over the score matrix
    (float32 scores in float32 unless ``precision`` says otherwise, as in :func:`exact_topk`)."""
    with _Float32MatmulPrecision(precision):
        return _rank_pair(queries, database, target_ids, dup_group, chunk_size, ties, tie_rtol)


def _rank_pair(queries: Tensor, database: Tensor, target_ids: Tensor, dup_group: Optional[Tensor], chunk_size: int,
               ties: str, tie_rtol: float) -> tuple[Tensor, Optional[Tensor]]:
    _check_pair(queries, database)
    if ties not in TIES:
        raise IndexInputError(f"ties must be one of {TIES}; got {ties!r}")
    if tie_rtol < 0:
        raise IndexInputError(f"tie_rtol must be >= 0; got {tie_rtol}")
    chunk = _check_chunk(chunk_size)
    nq, n = queries.shape[0], database.shape[0]
    target_ids = torch.as_tensor(target_ids, device=queries.device)
    if target_ids.shape != (nq,) or target_ids.is_floating_point():
        raise IndexInputError(
            f"target ids must be an integer tensor of shape (Q,) = ({nq},); got {tuple(target_ids.shape)}"
        )
    target_ids = target_ids.long()
    if nq and (target_ids.min() < 0 or target_ids.max() >= n):
        lo, hi = int(target_ids.min()), int(target_ids.max())
        raise IndexInputError(f"target ids must lie in [0, {n}); got range [{lo}, {hi}]")
    if dup_group is not None:
        dup_group = torch.as_tensor(dup_group, device=queries.device)
        if dup_group.shape != (n,) or dup_group.is_floating_point():
            raise IndexInputError(
                f"dup_group must be an integer tensor of shape (N,) = ({n},); got {tuple(dup_group.shape)}"
            )
        dup_group = dup_group.long()
    gold = (queries * database[target_ids]).sum(dim=1)
    scale = torch.linalg.vector_norm(queries, dim=1) * torch.linalg.vector_norm(database, dim=1).max()
    tol = tie_rtol * scale
    bound = gold - tol if ties == "pessimistic" else gold + tol
    raw = torch.ones(nq, dtype=torch.int64, device=queries.device)
    dups = torch.zeros(nq, dtype=torch.int64, device=queries.device)  # duplicates counted in raw
    for q0 in range(0, nq, chunk):
        q = queries[q0 : q0 + chunk]
        t = target_ids[q0 : q0 + chunk]
        b = bound[q0 : q0 + chunk].unsqueeze(1)
        g = dup_group[t].unsqueeze(1) if dup_group is not None else None
        rows = torch.arange(q.shape[0], device=q.device)
        for c0 in range(0, n, chunk):
            block = q @ database[c0 : c0 + chunk].T
            above = block >= b if ties == "pessimistic" else block > b
            inside = (t >= c0) & (t < c0 + block.shape[1])
            above[rows[inside], t[inside] - c0] = False  # the target itself
            raw[q0 : q0 + chunk] += torch.count_nonzero(above, dim=1)
            if g is not None:
                same = (dup_group[c0 : c0 + chunk].unsqueeze(0) == g) & (g >= 0)
                dups[q0 : q0 + chunk] += torch.count_nonzero(above & same, dim=1)
    return raw, (raw - dups if dup_group is not None else None)


@register_backend
class ExactIndex(Index):
    """Brute-force index in torch: exact top-k by blocked matmul + threshold top-k (see module doc).

    Args:
        dim: vector size.
        metric: ``"ip"`` or ``"cosine"``.
        chunk_size: database rows per block (default: :func:`exact_topk`'s); peak search memory is about
            ``query_chunk_size * chunk_size`` float32 scores per worker thread, independent of the index
            size.
        device: where vectors live and scores are computed: ``"auto"`` (default: the current CUDA device
            when torch sees one, else CPU, like :class:`FaissIndex`'s ``use_gpu="auto"``), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"`` (an error when CUDA is unavailable); ``None`` means CPU.
        query_chunk_size: query rows per block (default: :func:`exact_topk`'s).
        precision: float32 matmul precision of searches (see :func:`exact_topk`): ``"highest"`` keeps
            results exact when the process allows TF32; ``"high"`` trades that for TF32 speed on CUDA.

    Vectors are kept as float32 ``(N, dim)``; :meth:`search` returns CPU tensors.
    """

    backend = "exact"

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        chunk_size: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = "auto",
        query_chunk_size: Optional[int] = None,
        precision: str = "highest",
    ) -> None:
        super().__init__(dim, metric)
        self.precision = _check_precision(precision)
        self.chunk_size = _check_chunk(chunk_size) if chunk_size is not None else None
        self.query_chunk_size = (_check_chunk(query_chunk_size, "query_chunk_size") if query_chunk_size is not None
                                 else None)
        self.device = resolve_device(device)
        self._parts: list[Tensor] = []
        self._size = 0

    def add(self, x: ArrayLike) -> None:
        n = n_rows(x, "added vectors")
        step = self.chunk_size or TORCH_BLOCK[1]
        for start in range(0, n, step):
            part = x[start : start + step] if x.ndim == 2 else x
            t = self._prepare(part, "added vectors", self.device, offset=self._size)
            self._parts.append(t)
            self._size += t.shape[0]

    @property
    def vectors(self) -> Tensor:
        """All stored vectors ``(N, dim)`` (normalised under cosine), on :attr:`device`."""
        if len(self._parts) != 1:
            merged = torch.cat(self._parts) if self._parts else torch.empty(0, self.dim, device=self.device)
            self._parts = [merged]
        return self._parts[0]

    def search(self, queries: ArrayLike, k: int, allow_fewer: bool = False) -> tuple[Tensor, Tensor]:
        k = check_k(k, len(self), allow_fewer)
        q = self._prepare(queries, "queries", self.device)
        scores, ids = exact_topk(q, self.vectors, k, self.chunk_size, self.query_chunk_size, precision=self.precision)
        return scores.cpu(), ids.cpu()

    def __len__(self) -> int:
        return self._size

    def reset(self) -> None:
        self._parts = []
        self._size = 0

    def save(self, path: Union[str, os.PathLike]) -> None:
        payload = {"vectors": self.vectors.cpu(), "dim": self.dim, "metric": self.metric}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        write_sidecar(
            path,
            {
                "backend": self.backend,
                "dim": self.dim,
                "metric": self.metric,
                "size": len(self),
                "chunk_size": self.chunk_size,
                "query_chunk_size": self.query_chunk_size,
                "precision": self.precision,
            },
        )

    @classmethod
    def _load(cls, path: Union[str, os.PathLike], meta: dict[str, Any], **overrides: Any) -> "ExactIndex":
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            vectors = payload["vectors"]
        except Exception as e:  # torch raises many types for a truncated or foreign file
            raise IndexFileError(f"cannot load index {path}: file is corrupt or not an ExactIndex ({e})") from None
        if not isinstance(vectors, Tensor) or vectors.dim() != 2:
            raise IndexFileError(f"cannot load index {path}: 'vectors' is not a 2-D tensor")
        check_dim(path, vectors.shape[1], int(meta["dim"]))
        check_size(path, vectors.shape[0], meta)
        kwargs: dict[str, Any] = {
            "chunk_size": meta.get("chunk_size"),
            "query_chunk_size": meta.get("query_chunk_size"),
            "precision": meta.get("precision", "highest"),
            **overrides,
        }
        index = cls(int(meta["dim"]), meta["metric"], **kwargs)
        if vectors.shape[0]:
            index._parts = [vectors.to(device=index.device, dtype=torch.float32).contiguous()]
            index._size = vectors.shape[0]
        return index
