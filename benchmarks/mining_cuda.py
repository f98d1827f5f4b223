"""Exact hard-negative mining on a CUDA GPU: :func:`contrastive.index.exact_topk` against the GPU's own
float32 matrix-multiply rate, measured in the same run.

``N`` random unit vectors of size ``d`` (float32, on the GPU) are both the queries and the database, as
in offline mining. For each block shape ``query_chunk x chunk`` we time ``exact_topk`` (its torch path,
the one that runs on CUDA: blocked ``torch.mm`` + threshold filter + merge) with CUDA events and report:

- achieved rate ``2 * Q * N * d / time`` and its ratio to the **matmul rate**: the median of 20
  ``torch.mm`` calls of the same block shape into a preallocated buffer (float32, ``"highest"``
  precision, i.e. no TF32), timed before and after the searches; the better of the two is used;
- peak extra GPU memory (``torch.cuda.max_memory_allocated`` above what was allocated before the call),
  next to the size the full ``Q x N`` score matrix would take;
- exactness on the first ``--check`` queries: the float64 scores of the returned ids against the
  float64 top-k (a full float64 matmul and ``torch.topk``), i.e. the result is a true top-k up to
  float32 rounding.

Also timed, for reference: ``mm+topk`` (``torch.topk`` per block, merged by a second ``topk``: the
obvious GPU implementation, without the lower-id-first tie order), ``exact_topk`` with
``precision="high"`` (TF32 tensor cores: faster, not exact) against the TF32 matmul rate, and FAISS'
``GpuIndexFlatIP`` through :class:`~contrastive.index.FaissIndex` when a GPU build of FAISS is installed
(its matmul reference is a float32 ``(16384, d) @ (d, 65536)`` block).

Large ``N``: ``--queries Q`` times ``Q`` queries against all ``N`` rows and extrapolates the all-pairs time
(printed as such); default: all queries up to 100k, 131072 above.

Usage::

    python benchmarks/mining_cuda.py                          # N = 100k and 1M, default blocks
    python benchmarks/mining_cuda.py --n 1000000 --blocks 8192x16384 16384x16384 --queries 0
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from contrastive.index import FaissIndex, exact_topk  # noqa: E402
from contrastive.index.exact import CUDA_BLOCKS, _Float32MatmulPrecision, cuda_block  # noqa: E402


def faiss_gpus() -> int:
    try:
        from contrastive.index import faiss_num_gpus

        return faiss_num_gpus()
    except ImportError:
        return 0


def cuda_time(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, timed with CUDA events after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_rate(rows: int, cols: int, d: int, precision: str) -> float:
    """FLOP/s of ``torch.mm`` of a ``(rows, d) @ (d, cols)`` float32 block into a preallocated buffer."""
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(rows, d, device="cuda", generator=g)
    b = torch.randn(cols, d, device="cuda", generator=g)
    out = torch.empty(rows, cols, device="cuda")
    with _Float32MatmulPrecision(precision):
        t = cuda_time(lambda: torch.mm(a, b.T, out=out), repeats=20)
    del a, b, out
    return 2 * rows * cols * d / t


def mm_topk(queries: torch.Tensor, database: torch.Tensor, k: int, rows: int, cols: int) -> torch.Tensor:
    """The obvious GPU baseline: ``torch.topk`` of every block, merged by a ``topk`` of the concatenation."""
    out = torch.empty(queries.shape[0], k, device=queries.device, dtype=torch.int64)
    for q0 in range(0, queries.shape[0], rows):
        q = queries[q0 : q0 + rows]
        best_v = torch.full((q.shape[0], k), float("-inf"), device=q.device)
        best_i = torch.full((q.shape[0], k), -1, device=q.device, dtype=torch.int64)
        for c0 in range(0, database.shape[0], cols):
            v, i = torch.topk(q @ database[c0 : c0 + cols].T, min(k, min(cols, database.shape[0] - c0)), dim=1)
            v, j = torch.topk(torch.cat([best_v, v], 1), k, dim=1)
            best_i = torch.cat([best_i, i + c0], 1).gather(1, j)
            best_v = v
        out[q0 : q0 + q.shape[0]] = best_i
    return out


def check(queries: torch.Tensor, database: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[float, float]:
    """``(max |float64 score of returned id - float64 top-k score|, fraction of ids equal to the float64
    top-k)`` over the given queries; the first is float32 rounding if the result is a true top-k."""
    q64, x64 = queries.double(), database.double()
    ref_v, ref_i = torch.topk(q64 @ x64.T, k, dim=1)
    got = (q64.unsqueeze(1) * x64[ids]).sum(-1)
    return float((got - ref_v).abs().max()), float((ids == ref_i).float().mean())


def parse_block(s: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block must look like 8192x16384 (query rows x database rows); got {s!r}")
    return r, c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes (queries = database)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--blocks", type=parse_block, nargs="+",
                   default=[(8192, 16384), (8192, 32768), (8192, 65536), (16384, 65536), (4096, 131072)],
                   help="block shapes query_rows x database_rows to time (exact_topk picks one of "
                        f"{', '.join(f'{r}x{c}' for r, c in CUDA_BLOCKS)} by free memory)")
    p.add_argument("--queries", type=int, default=-1, help="time this many queries and extrapolate (0: all; -1: auto)")
    p.add_argument("--check", type=int, default=256, help="queries checked against a float64 reference")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="also time mm+topk")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="also time precision='high'")
    p.add_argument("--faiss", action=argparse.BooleanOptionalAction, default=True,
                   help="also time FAISS' GPU flat index (when faiss-gpu is installed; queries and results go "
                        "through host memory, as FaissIndex.search does)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("mining_cuda.py: torch sees no CUDA device; see benchmarks/mining.py for the CPU benchmark")
        return 2
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}; d={args.dim}, k={args.k}, float32")
    rows: list[tuple] = []
    for n in args.n:
        g = torch.Generator(device="cuda").manual_seed(args.seed)
        x = torch.nn.functional.normalize(torch.randn(n, args.dim, device="cuda", generator=g), dim=1)
        nq = n if args.queries == 0 or (args.queries < 0 and n <= 100_000) else (
            131072 if args.queries < 0 else args.queries)
        nq = min(nq, n)
        q = x[:nq]
        scale = n / nq
        flop = 2 * nq * n * args.dim
        full_gb = n * n * 4 / 1e9

        def run(label: str, fn: Callable[[], torch.Tensor], block: tuple[int, int], precision: str = "highest") -> None:
            ref_rate = matmul_rate(*block, args.dim, precision)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            ids = fn()
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() - base
            ref_rate = max(ref_rate, matmul_rate(*block, args.dim, precision))
            err, same = check(q[: args.check], x, ids[: args.check], args.k)
            rate = flop / t
            rows.append((n, label, f"{block[0]}x{block[1]}", t * scale, rate / 1e12, ref_rate / 1e12, rate / ref_rate,
                         peak / 1e9, full_gb, err, same))
            print(f"  N={n:>9,} {label:<22} block {block[0]}x{block[1]}: {t:.3f} s for {nq:,} queries "
                  f"({rate / 1e12:.1f} TFLOP/s, {rate / ref_rate:.2f} of mm), peak +{peak / 1e6:.0f} MB, "
                  f"max |err| {err:.1e}, ids = ref {same:.4f}", flush=True)

        exact_topk(q[:512], x, args.k)  # warm-up (kernels, allocator)
        for block in args.blocks:
            run("exact_topk", lambda b=block: exact_topk(q, x, args.k, chunk_size=b[1], query_chunk_size=b[0])[1], block)
        default = cuda_block(x.device)
        run("exact_topk (default)", lambda: exact_topk(q, x, args.k)[1], default)
        if args.tf32:
            run("exact_topk tf32", lambda: exact_topk(q, x, args.k, precision="high")[1], default, "high")
        if args.baseline:
            run("mm+topk", lambda: mm_topk(q, x, args.k, 8192, 16384), (8192, 16384))
        if args.faiss and faiss_gpus() > 0:
            index = FaissIndex(args.dim, "ip", kind="flat", use_gpu=True, search_chunk_size=16384)
            index.add(x.cpu())
            index.search(q[:256].cpu(), args.k)  # clones the index to the GPU
            run("faiss GpuIndexFlatIP", lambda: index.search(q.cpu(), args.k)[1].cuda(), (16384, min(n, 65536)))
            del index
        del x, q
        torch.cuda.empty_cache()

    print(f"\n{dev}, d={args.dim}, k={args.k}, float32 unit vectors, queries = database "
          "(all-pairs time extrapolated when fewer queries were timed)\n")
    print("| N | method | block | all-pairs time | TFLOP/s | matmul TFLOP/s (same run) | vs matmul "
          "| peak GPU mem Δ | full score matrix | max |err| vs float64 | ids = float64 top-k |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, label, block, t, rate, ref, ratio, peak, full, err, same in rows:
        print(f"| {n:,} | {label} | {block} | {t:.2f} s | {rate:.1f} | {ref:.1f} | {ratio:.2f} | {peak:.2f} GB "
              f"| {full:,.0f} GB | {err:.1e} | {same:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
