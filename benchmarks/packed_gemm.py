"""How fast MKL's packed GEMM runs on the exact search's block shapes, against a large ``torch.mm``.

The exact CPU search (``contrastive/index/exact.py``, packed schedule) computes ``rows x width`` score
blocks with ``cblas_sgemm_compute`` on pre-packed operands, one worker thread per core. Its rate relative
to the machine's matmul rate is the product of two factors: this one (the block GEMM's own efficiency)
and the selection's overhead (the filter, packing and finish, see ``benchmarks/mining.py``). Here, on
one thread, each shape's packed compute over a query sub-chunk set and 8 packed database pieces (the
schedule's inner loops, no filter) is timed between two runs of a ``(4096, d) @ (d, 16384)``
``torch.mm``, and the ratio to the better of those two is printed per round, with the median: the
machine's speed drifts, so only adjacent runs are compared.

Usage::

    python benchmarks/packed_gemm.py                       # the default shapes, 12 rounds
    python benchmarks/packed_gemm.py --shapes 256x512 128x512 --rounds 24
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from contrastive.index._kernels import mkl_packed_gemm  # noqa: E402
from contrastive.index.exact import PACKED_BLOCK  # noqa: E402

ROW_MAJOR, PACK_A, PACK_B, NO_TRANS, TRANS, PACKED = 101, 161, 162, 111, 112, 151


def load_mkl() -> ctypes.CDLL:
    """The loaded ``libtorch_cpu`` with MKL's packed GEMM, as exact.py finds it, with argument types set."""
    mkl = mkl_packed_gemm()
    if mkl is None:
        raise SystemExit("this torch build does not export MKL's packed GEMM (cblas_sgemm_compute)")
    lib, (pack_size, pack, compute, threads_local) = mkl
    pack_size.restype = ctypes.c_size_t
    pack_size.argtypes = [ctypes.c_int] * 4
    pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    compute.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                                             ctypes.c_void_p, ctypes.c_int]
    threads_local(1)  # MKL on this thread only, as in the search's workers
    return lib


class PackedBlocks:
    """``subs`` packed query sub-chunks of ``rows`` rows and 8 packed database pieces of ``width`` rows."""

    def __init__(self, lib: ctypes.CDLL, x: torch.Tensor, rows: int, width: int, queries: int) -> None:
        d = x.shape[1]
        self.lib, self.rows, self.width, self.d = lib, rows, width, d
        a_size = lib.cblas_sgemm_pack_get_size(PACK_A, rows, width, d)
        b_size = lib.cblas_sgemm_pack_get_size(PACK_B, rows, width, d)
        self.a = [torch.empty(a_size // 4 + 16) for _ in range(max(1, queries // rows))]
        for i, buf in enumerate(self.a):
            lib.cblas_sgemm_pack(ROW_MAJOR, PACK_A, NO_TRANS, rows, width, d, 1.0, x[i * rows].data_ptr(), d,
                                 buf.data_ptr())
        self.b = [torch.empty(b_size // 4 + 16) for _ in range(8)]
        for j, buf in enumerate(self.b):
            lib.cblas_sgemm_pack(ROW_MAJOR, PACK_B, TRANS, rows, width, d, 1.0, x[j * width].data_ptr(), d,
                                 buf.data_ptr())
        self.c = torch.empty(rows, width)
        self.flops = 2 * len(self.a) * rows * len(self.b) * width * d
        # the packed product equals torch.mm (up to float32 summation order)
        self.lib.cblas_sgemm_compute(ROW_MAJOR, PACKED, PACKED, rows, width, d, self.a[0].data_ptr(), d,
                                     self.b[0].data_ptr(), width, 0.0, self.c.data_ptr(), width)
        torch.testing.assert_close(self.c, x[:rows] @ x[:width].T, atol=1e-4, rtol=1e-4)

    def rate(self) -> float:
        t0 = time.perf_counter()
        for a in self.a:
            for b in self.b:
                self.lib.cblas_sgemm_compute(ROW_MAJOR, PACKED, PACKED, self.rows, self.width, self.d, a.data_ptr(),
                                             self.d, b.data_ptr(), self.width, 0.0, self.c.data_ptr(), self.width)
        return self.flops / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = f"{PACKED_BLOCK[0]}x{PACKED_BLOCK[1]}"
    p.add_argument("--shapes", nargs="+", default=[default] + [s for s in ("128x512", "128x1024") if s != default],
                   help="block shapes rows x width (the first is exact.py's default)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=2048, help="query rows per round (packed once)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--ref", default="4096x16384", help="reference torch.mm shape rows x cols")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lib = load_mkl()
    d = args.dim
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    n = max(max(8 * w for _, w in shapes), args.queries)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    rr, rc = (int(v) for v in args.ref.split("x"))
    ra, rb, ro = torch.randn(rr, d), torch.randn(rc, d), torch.empty(rr, rc)

    def ref() -> float:
        t0 = time.perf_counter()
        torch.mm(ra, rb.T, out=ro)
        return 2 * rr * rc * d / (time.perf_counter() - t0) / 1e9

    ref()  # warm-up
    blocks = {s: PackedBlocks(lib, x, s[0], s[1], args.queries) for s in shapes}
    ratios: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
    refs: list[float] = []
    for _ in range(args.rounds):
        for s in shapes:
            before = ref()
            rate = blocks[s].rate()
            after = ref()
            refs.append(max(before, after))
            ratios[s].append(rate / max(before, after))
    print(f"# one thread, d={d}, {args.queries} query rows x 8 pieces per round; reference {rr} x {rc} x {d} torch.mm "
          f"{min(refs):.1f}-{max(refs):.1f} GFLOP/s")
    print("| block (rows x width) | packed compute / adjacent torch.mm, median | range | per round |")
    print("|---|---:|---:|---|")
    for s in shapes:
        r = ratios[s]
        print(f"| {s[0]} x {s[1]} | {statistics.median(r):.3f} | {min(r):.2f}-{max(r):.2f} | "
              f"{' '.join(f'{v:.2f}' for v in r)} |")


if __name__ == "__main__":
    main()
