"""Where the exact CPU search spends its time: ``torch.mm`` of each block vs the compiled top-k filter.

Runs the fused path's schedule (one worker thread per core, each with single-threaded ``torch.mm`` blocks
of ``rows x width`` scores, then ``_topk.update`` on the block) on ``Q`` random unit queries against
``N`` documents, and sums, over the worker threads, the time inside ``torch.mm`` and inside the filter.
``filter / mm`` is the filter's cost as a fraction of the matmul: exact mining can reach at most
``1 / (1 + filter / mm)`` of the matmul rate. Modes:

- ``both``: the real search;
- ``mm``: the matmuls only (the rate of this block shape on this machine);
- ``scan``: after the first block, each block is filled with a score below every threshold instead of
  computed, so the filter only scans (no survivors): the cost of reading the block back.

A/B comparisons on a shared machine need interleaved repeats (``--repeats``); the medians are printed.

Usage::

    python benchmarks/mining_split.py --n 100000 --queries 8192 --blocks 1024x2048 512x512 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/mining.py

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from contrastive.index import _kernels  # noqa: E402


def run(x: torch.Tensor, nq: int, rows: int, width: int, k: int, mode: str, workers: int) -> tuple[float, float, float]:
    """``(wall s, thread-summed mm s, thread-summed filter s)`` of one search."""
    fused = _kernels.topk
    n = x.shape[0]
    cap = max(k, 64)
    mm_t, filt_t = [0.0] * workers, [0.0] * workers
    starts, lock = iter(range(0, nq, rows)), threading.Lock()

    def work(w: int) -> None:  # contrastive.index.exact._fused_topk's worker loop, with timers around each stage
        buf = torch.empty(rows * width)
        keys = torch.empty(rows, k + cap, dtype=torch.int64)
        thr, cnt = torch.empty(rows), torch.empty(rows, dtype=torch.int64)
        while True:
            with lock:
                q0 = next(starts, None)
            if q0 is None:
                return
            q = x[q0 : q0 + rows]
            m = q.shape[0]
            fused.init(keys.data_ptr(), thr.data_ptr(), cnt.data_ptr(), m, k, cap)
            for c0 in range(0, n, width):
                db = x[c0 : c0 + width]
                block = buf[: m * db.shape[0]].view(m, db.shape[0])
                t0 = time.perf_counter()
                if mode != "scan" or c0 == 0:
                    torch.mm(q, db.T, out=block)
                else:
                    block.fill_(-10.0)  # below every threshold: no survivors
                t1 = time.perf_counter()
                if mode != "mm":
                    fused.update(block.data_ptr(), m, block.shape[1], block.shape[1], c0, keys.data_ptr(),
                                 thr.data_ptr(), cnt.data_ptr(), k, cap, 1)
                t2 = time.perf_counter()
                if mode != "scan" or c0 == 0:
                    mm_t[w] += t1 - t0
                filt_t[w] += t2 - t1

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(work, w) for w in range(workers)]:
                f.result()
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return wall, sum(mm_t), sum(filt_t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=8192)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--blocks", nargs="+", default=["1024x2048"], help="rows x width per worker block")
    p.add_argument("--modes", nargs="+", default=["both", "mm", "scan"], choices=["both", "mm", "scan"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if _kernels.topk is None:
        print("mining_split.py: the C extension contrastive.index._kernels._topk is not built")
        return 2
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=g), dim=1)
    nq = min(args.queries, args.n)
    flop = 2 * nq * args.n * args.dim
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(args.repeats):  # interleaved, so that drift hits every configuration alike
        for block in args.blocks:
            rows, width = (int(v) for v in block.lower().split("x"))
            for mode in args.modes:
                results.setdefault((block, mode), []).append(run(x, nq, rows, width, args.k, mode, args.threads))
    print(f"N={args.n:,}, {nq:,} queries, d={args.dim}, k={args.k}, {args.threads} worker threads, "
          f"medians of {args.repeats} interleaved runs\n")
    print("| block | mode | wall (s) | GFLOP/s | mm, thread-sum (s) | filter, thread-sum (s) | filter / mm |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (block, mode), runs in results.items():
        wall, mm, filt = (statistics.median(r[i] for r in runs) for i in range(3))
        rate = flop / wall / 1e9 if mode != "scan" else float("nan")
        ratio = filt / mm if mode == "both" else (filt / statistics.median(
            r[1] for r in results.get((block, "mm"), runs)) if mode == "scan" and (block, "mm") in results else float("nan"))
        print(f"| {block} | {mode} | {wall:.2f} | {rate:.1f} | {mm:.2f} | {filt:.2f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
