"""Hard-negative mining cost on CPU: exact chunked top-k vs the machine's matmul rate, and FAISS ANN.

For each ``N``: ``N`` random unit vectors of size ``d`` (float32) are both the queries and the database,
as in offline mining (every training document is a query against the whole corpus), and we time:

- **exact** (:func:`contrastive.index.exact_topk`, fused CPU path): with MKL in torch (x86 wheels) and at
  least ``PACKED_MIN_QUERIES`` queries, the worker threads share one call of the C extension per query
  chunk, taking its 256-row sub-chunks one at a time: MKL's packed GEMM computes 256 x 512 score blocks
  and the compiled top-k kernel filters each right away; otherwise each worker computes
  ``query_chunk x chunk`` blocks with a single-threaded ``torch.mm`` and filters them. Achieved rate = ``2 * Q * N * d / time``, next to the
  **matmul rate** of this machine measured in the same run. The headline ``vs mm (paired)`` divides by
  the rate of a large ``(4096, d) @ (d, 16384)`` matmul timed around each slice of the search (see
  :class:`PairedReference`), the better of two forms: one ``torch.mm`` on all threads, or one
  single-threaded ``torch.mm`` per thread at once; each slice's own ratio (its rate over its two
  reference runs) is printed too, with their median, which a burst of load from other jobs moves less.
  ``vs best mm`` divides by the best of best-of-5 matmuls (block-shaped and large, both forms) before
  and after the runs: a stricter, noisier number on a machine whose speed drifts. 1.0 = top-k selection
  for free.
- **exact, torch path** (optional, ``--torch-path``): the same search with torch ops only
  (``backend="torch"``), what runs on CUDA or without the compiled kernel.
- **faiss-flat** (optional, ``--faiss-flat``): FAISS' exact ``IndexFlatIP`` (BLAS + C++ heaps), for
  reference.
- **ivf-flat** and **hnsw** (FAISS): build time, search time of the same queries, recall@k against the
  exact result, and speed-up of the search over exact.

Peak memory: a sampling thread reads the resident set (``/proc/self/statm``) every 2 ms during each
call; ``peak RSS Δ`` is the peak minus the RSS just before the call. For the exact method it should stay
near the search's buffers, whatever ``N`` is: a score buffer per worker (``query_chunk x chunk x 4`` bytes,
or one 256 x 512 block in the packed schedule), the packed schedule's per-query state (top-k keys and
packed queries of one query chunk, at most ``PACKED_MEMORY``), two groups of packed database pieces and
the ``(Q, k)`` outputs; the full ``Q x N`` score matrix is printed next to it.

Threads: ``torch.set_num_threads(--threads)`` (default: all cores) and ``OMP_WAIT_POLICY=PASSIVE``
unless set otherwise (spinning OpenMP threads collapse throughput on a shared CPU; see the comment at
the import).

Large ``N``: ``N = 1M`` all-pairs is ``2 * 1e12 * 256 = 5e14`` flop (about an hour on 2 cores), so
``--queries Q`` times ``Q`` queries against the full ``N``-row database and extrapolates the all-pairs
time (``x N / Q``; printed as such). By default ``Q = N`` up to 100k and ``Q = 8192`` above.

Usage::

    python benchmarks/mining.py --quick                    # smoke test, N = 20k
    python benchmarks/mining.py                            # N = 100k, all pairs
    python benchmarks/mining.py --n 100000 1000000 --queries 8192
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# OpenMP threads that spin while waiting for each other are ruinous on a shared or oversubscribed CPU:
# the selection is many short parallel ops, and on a 2-core machine running other jobs, the default
# (spinning) policy made the exact search 5x slower than PASSIVE in our runs. Must be set before torch
# loads its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from contrastive.index import FaissIndex, exact_topk, import_faiss  # noqa: E402
from contrastive.index.exact import (  # noqa: E402
    FUSED_BLOCK,
    PACKED_BLOCK,
    PACKED_CHUNK,
    TORCH_BLOCK,
)
from contrastive.index._kernels import fused_available, packed_available  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Context manager: peak resident-set increase (bytes) while the block runs, sampled every 2 ms."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.delta = 0

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.delta = self.peak - self.base


def timed(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """``(result, seconds, peak RSS increase in bytes)`` of one call."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.delta


def matmul_rate(rows: int, cols: int, d: int, repeats: int) -> float:
    """GFLOP/s of ``torch.mm`` for one ``(rows, d) @ (d, cols)`` block into a preallocated output, best of ``repeats``."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, d, generator=g), torch.randn(cols, d, generator=g)
    out = torch.empty(rows, cols)
    torch.mm(a, b.T, out=out)  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b.T, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * cols * d / best / 1e9


def concurrent_mm(a: torch.Tensor, b: torch.Tensor, outs: list[torch.Tensor], calls: int) -> float:
    """Seconds for ``len(outs)`` threads each running ``calls`` single-threaded ``torch.mm(a, b.T)`` at once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def run(out: torch.Tensor) -> None:
            for _ in range(calls):
                torch.mm(a, b.T, out=out)
        threads = [threading.Thread(target=run, args=(out,)) for out in outs]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


class PairedReference:
    """The machine's matmul rate measured around each timed slice of work, so that both see the same
    machine: on a shared VM the speed of a large ``torch.mm`` drifts by 2x within a minute (measured
    here: 141-295 GFLOP/s over 25 s, median 236), so a best-of-5 reference taken once would compare a
    lucky second against a whole run. ``around(work, flops)`` runs the reference ``(4096, d) @ (d, 16384)``
    matmul for about ``flops / 2`` before and after ``work``, in two forms: one ``torch.mm`` on all threads
    and one single-threaded ``torch.mm`` per thread at once (the exact search's worker threads run the
    latter; under contention from another process it was up to 1.3x faster, on a quiet machine both ran
    at ~290 GFLOP/s); :attr:`gflops` is the better of the two totals."""

    def __init__(self, d: int, threads: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(4096, d, generator=g), torch.randn(16384, d, generator=g)
        self.outs = [torch.empty(4096, 16384) for _ in range(max(1, threads))]
        self.call_flops = 2 * 4096 * 16384 * d
        self.flops = [0.0, 0.0]
        self.seconds = [0.0, 0.0]
        self.slice_ratios: list[float] = []
        torch.mm(self.a, self.b.T, out=self.outs[0])  # warm-up

    def _run(self, flops: float) -> None:
        calls = max(1, round(flops / self.call_flops / 2))
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(self.a, self.b.T, out=self.outs[0])
        self.seconds[0] += time.perf_counter() - t0
        self.flops[0] += calls * self.call_flops
        per_thread = max(1, round(calls / len(self.outs)))
        self.seconds[1] += concurrent_mm(self.a, self.b, self.outs, per_thread)
        self.flops[1] += per_thread * len(self.outs) * self.call_flops

    def around(self, work: Callable[[], Any], flops: float) -> tuple[Any, float, int]:
        """Runs ``work`` between two reference runs; also records the work's rate over the reference rate of
        those two runs alone (:attr:`slice_ratios`)."""
        f0, s0 = list(self.flops), list(self.seconds)
        self._run(flops / 2)
        out = timed(work)
        self._run(flops / 2)
        local = max((self.flops[j] - f0[j]) / (self.seconds[j] - s0[j]) for j in range(2))
        self.slice_ratios.append(flops / out[1] / local)
        return out

    @property
    def rates(self) -> tuple[float, float]:
        """GFLOP/s of (one multi-threaded matmul, one single-threaded matmul per thread)."""
        return self.flops[0] / self.seconds[0] / 1e9, self.flops[1] / self.seconds[1] / 1e9

    @property
    def gflops(self) -> float:
        return max(self.rates)


def recall_at_k(ids: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean fraction of the exact top-k ids that the approximate top-k contains."""
    k = ref.shape[1]
    hits = 0
    for s in range(0, ref.shape[0], 4096):  # sort-based set intersection, chunked
        a, r = ids[s : s + 4096], ref[s : s + 4096]
        both = torch.sort(torch.cat([a, r], 1), dim=1).values
        hits += int(((both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)).sum())
    return hits / (ref.shape[0] * k)


def progress(row: "Row") -> None:
    """One line per finished measurement (the table comes at the end)."""
    extra = f", {row.gflops:.1f} GFLOP/s" if row.gflops else ""
    extra += f", recall@k {row.recall:.3f}" if row.recall is not None else ""
    print(f"  [N={row.n:,}] {row.method}: {row.seconds:,.1f} s all-pairs{extra}", flush=True)


@dataclass
class Row:
    n: int
    queries: int
    method: str
    seconds: float  # all-pairs (extrapolated when queries < n)
    gflops: Optional[float] = None
    vs_mm: Optional[float] = None
    recall: Optional[float] = None
    speedup: Optional[float] = None
    build_s: Optional[float] = None
    peak_mb: Optional[float] = None
    notes: list[str] = field(default_factory=list)
    ref_gflops: Optional[tuple[float, float]] = None  # paired reference matmul rates (exact rows)
    slice_ratios: Optional[list[float]] = None  # per slice: its rate / the rate of its own two reference runs
    vs_best: Optional[float] = None


def fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def run_n(n: int, args: argparse.Namespace) -> list[Row]:
    d, k = args.dim, args.k
    nq = args.queries if args.queries else (n if n <= 100_000 else 8192)
    nq = min(nq, n)
    scale = n / nq  # all-pairs time = measured time x scale
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, d, generator=g)
    if args.data == "clustered":  # sqrt(N) Gaussian clusters: the structure real embeddings have
        centres = torch.randn(int(math.sqrt(n)), d, generator=g)
        x = centres[torch.randint(0, centres.shape[0], (n,), generator=g)] + 0.7 * x
    x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
    q = x[torch.randperm(n, generator=g)[:nq]] if nq < n else x
    rows: list[Row] = []
    subset = f"timed on {nq:,} of {n:,} queries, all-pairs time extrapolated x{scale:.1f}" if nq < n else ""
    flops = 2 * nq * n * d

    ref = PairedReference(d, args.threads)

    def exact_sliced(backend: str) -> tuple[torch.Tensor, float, int]:
        """The search in ``--slices`` query slices, each between two reference matmuls; returns
        (ids, seconds, peak RSS increase)."""
        ids, seconds, peak = [], 0.0, 0
        for part in torch.tensor_split(torch.arange(nq), min(args.slices, nq)):
            qs = q[part[0] : part[-1] + 1]
            (_, i), t, mem = ref.around(
                lambda: exact_topk(qs, x, k, args.chunk_size, args.query_chunk_size, threads=args.threads,
                                   backend=backend), 2 * qs.shape[0] * n * d)
            ids.append(i)
            seconds += t
            peak = max(peak, mem)
        return torch.cat(ids), seconds, peak

    backend = "fused" if fused_available() else "torch"
    exact_topk(q[:256], x[: max(k, 4096)], k, backend=backend)  # warm-up
    ref_i, t_exact, mem = exact_sliced(backend)
    label = "exact (fused C filter)" if backend == "fused" else "exact (torch path: C kernel not built)"
    rows.append(Row(n, nq, label, t_exact * scale, flops / t_exact / 1e9, flops / t_exact / 1e9 / ref.gflops, 1.0,
                    1.0, None, mem / 2**20, [subset] if subset else []))
    rows[-1].ref_gflops = ref.rates
    rows[-1].slice_ratios = ref.slice_ratios
    progress(rows[-1])
    if args.torch_path and backend == "fused":
        ref = PairedReference(d, args.threads)
        ti, t, mem = exact_sliced("torch")
        rows.append(Row(n, nq, "exact (torch path)", t * scale, flops / t / 1e9, flops / t / 1e9 / ref.gflops,
                        recall_at_k(ti, ref_i), t_exact / t, None, mem / 2**20))
        rows[-1].ref_gflops = ref.rates
        rows[-1].slice_ratios = ref.slice_ratios
        progress(rows[-1])
    faiss = import_faiss()
    faiss.omp_set_num_threads(args.threads)

    if args.faiss_flat:
        flat = FaissIndex(d, "ip", kind="flat", use_gpu=False)
        flat.add(x)
        (_, fi), t, mem = timed(lambda: flat.search(q, k))
        rows.append(Row(n, nq, "faiss flat (exact)", t * scale, flops / t / 1e9, None,
                        recall_at_k(fi, ref_i), t_exact / t, None, mem / 2**20))
        progress(rows[-1])
        del flat

    nlist = args.nlist or max(64, int(4 * math.sqrt(n)))
    nprobe = args.nprobe or max(1, nlist // 8)
    specs = [
        ("ivf-flat", dict(kind="ivf_flat", nlist=nlist, nprobe=nprobe), f"nlist={nlist}, nprobe={nprobe}"),
        ("hnsw", dict(kind="hnsw", hnsw_m=args.hnsw_m, ef_search=args.ef_search, ef_construction=args.ef_construction),
         f"M={args.hnsw_m}, efC={args.ef_construction}, efS={args.ef_search}"),
    ]
    for name, kwargs, desc in specs if args.ann else []:
        index = FaissIndex(d, "ip", use_gpu=False, **kwargs)
        t0 = time.perf_counter()
        index.add(x)
        build = time.perf_counter() - t0
        (_, ids), t, mem = timed(lambda: index.search(q, k))
        rows.append(Row(n, nq, f"{name} ({desc})", t * scale, None, None, recall_at_k(ids, ref_i), t_exact / t, build,
                        mem / 2**20))
        progress(rows[-1])
        del index
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000], help="corpus sizes (queries = database)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=None, help="database rows per score block (default: exact_topk's)")
    p.add_argument("--query-chunk-size", type=int, default=None, help="query rows per score block (default: exact_topk's)")
    p.add_argument("--queries", type=int, default=0, help="time this many queries and extrapolate (0: auto)")
    p.add_argument("--faiss-flat", action=argparse.BooleanOptionalAction, default=True, help="also time FAISS IndexFlatIP")
    p.add_argument("--ann", action=argparse.BooleanOptionalAction, default=True,
                   help="also build and time FAISS IVF-Flat and HNSW")
    p.add_argument("--torch-path", action=argparse.BooleanOptionalAction, default=False,
                   help="also time exact_topk's torch-op path")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=0, help="IVF lists probed (0: nlist / 8)")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="repeats of the best-of reference matmuls")
    p.add_argument("--slices", type=int, default=0,
                   help="the exact search runs in this many query slices, each between two reference matmuls "
                        "(0: one per 8192 queries, at most 10)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("uniform", "clustered"), default="uniform",
                   help="uniform: random unit vectors (worst case for ANN); clustered: sqrt(N) Gaussian clusters")
    p.add_argument("--quick", action="store_true", help="smoke test: N = 20k, 2048 queries timed")
    args = p.parse_args(argv)
    if args.quick:
        args.n = [20_000]
        args.queries = args.queries or 2048
    torch.set_num_threads(args.threads)
    if args.slices < 1:
        nq = min(args.queries or max(args.n), max(args.n))
        args.slices = max(1, min(10, nq // 8192))
    fused = fused_available()
    qdef, cdef = FUSED_BLOCK if fused else TORCH_BLOCK
    qc, cc = args.query_chunk_size or qdef, args.chunk_size or cdef

    def references() -> tuple[float, float, float]:
        """Best-of GFLOP/s: block-shaped and large torch.mm on all threads, large single-thread per thread."""
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(4096, args.dim, generator=g), torch.randn(16384, args.dim, generator=g)
        outs = [torch.empty(4096, 16384) for _ in range(args.threads)]
        conc = min(concurrent_mm(a, b, outs, 1) for _ in range(max(2, args.repeats // 2)))
        return (matmul_rate(qc, cc, args.dim, args.repeats), matmul_rate(4096, 16384, args.dim, max(2, args.repeats // 2)),
                args.threads * 2 * 4096 * 16384 * args.dim / conc / 1e9)

    mm_block, mm_large, mm_conc = references()
    buffer_mb = qc * cc * 4 / 2**20
    print(f"# Mining benchmark: d={args.dim}, k={args.k}, data={args.data}, threads={args.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, torch {torch.__version__}, "
          f"exact path: {'fused C filter (' + _topk_isa() + ')' if fused else 'torch ops'}")
    print(f"# score block {qc} x {cc} ({buffer_mb:.0f} MB per worker thread); before the runs: block-shaped torch.mm "
          f"{mm_block:.1f} GFLOP/s, 4096 x 16384 x {args.dim} torch.mm {mm_large:.1f} GFLOP/s, the same as "
          f"{args.threads} concurrent single-thread matmuls {mm_conc:.1f} GFLOP/s (best of {args.repeats})", flush=True)
    if fused and packed_available() and not (args.query_chunk_size or args.chunk_size):
        print(f"# the exact search runs the packed schedule: {PACKED_BLOCK[0]} x {PACKED_BLOCK[1]} MKL packed-GEMM "
              f"blocks, up to {PACKED_CHUNK} queries per call shared by all worker threads (the score-block size above "
              "is the fallback's)")
    all_rows: list[Row] = []
    for n in args.n:
        rows = run_n(n, args)
        all_rows.extend(rows)
        full_gb = n * n * 4 / 2**30
        print(f"N = {n:,}: the full {n:,} x {n:,} fp32 score matrix would be {full_gb:,.1f} GB; score buffer "
              f"{buffer_mb:.0f} MB")
        for note in rows[0].notes:
            print(f"  note: {note}")
        for r in rows:
            if r.ref_gflops is not None:
                multi, single = r.ref_gflops
                print(f"  {r.method}: paired reference, 4096 x 16384 x {args.dim} torch.mm run around each of the "
                      f"{args.slices} slices: {multi:.1f} GFLOP/s on {args.threads} threads, {single:.1f} GFLOP/s as "
                      f"{args.threads} concurrent single-thread matmuls; 'vs mm' divides by the better")
            if r.slice_ratios:
                sr = sorted(r.slice_ratios)
                print(f"  {r.method}: per slice, its rate over the better form of its own two reference runs: median "
                      f"{statistics.median(sr):.2f}, range {sr[0]:.2f}-{sr[-1]:.2f} ({' '.join(f'{x:.2f}' for x in r.slice_ratios)})")
    after = references()
    best = max(mm_block, mm_large, mm_conc, *after)
    print(f"# after the runs: block-shaped torch.mm {after[0]:.1f} GFLOP/s, large torch.mm {after[1]:.1f} GFLOP/s, "
          f"concurrent single-thread {after[2]:.1f} GFLOP/s; best of all six: {best:.1f} GFLOP/s ('vs best mm')")
    for r in all_rows:
        if r.gflops is not None:
            r.vs_best = r.gflops / best
    print()
    print(
        "| N | queries timed | method | all-pairs time (s) | GFLOP/s | vs mm (paired) | vs best mm | recall@k "
        "| search speed-up vs exact (x) | build (s) | peak RSS Δ (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in all_rows:
        print(f"| {r.n:,} | {r.queries:,} | {r.method} | {r.seconds:,.1f} | {fmt(r.gflops, '.1f')} | {fmt(r.vs_mm, '.2f')} | "
              f"{fmt(r.vs_best, '.2f')} | {fmt(r.recall, '.3f')} | {fmt(r.speedup, '.1f')} | {fmt(r.build_s, '.1f')} | "
              f"{fmt(r.peak_mb, ',.0f')} |")
    sys.stdout.flush()


def _topk_isa() -> str:
    from contrastive.index._kernels import topk

    return topk.isa() if topk is not None else "none"


if __name__ == "__main__":
    main()
