"""Where the packed exact search spends its time, as fractions of its own block matmuls (one worker).

Builds an instrumented copy of ``contrastive/index/_kernels/_topk.c`` (rdtsc counters around the packing, each
block's ``cblas_sgemm_compute``, each block's filter, the merges and the sorted finish; needs ``gcc``)
in a temporary directory, runs the packed schedule of :mod:`contrastive.index.exact` with it on one
thread, and prints each part's cycles over the block matmuls' cycles (the filter's share spent on each
row's first database block, and in merges, also on their own), with the search's rate over the
rate of its own matmuls: ``1 / (1 + overheads)``, what the selection costs whatever the machine's
speed (the ratio to a separate reference matmul, ``benchmarks/mining.py``, also carries the block
GEMM's own efficiency, ``benchmarks/packed_gemm.py``). The counters are process-wide and not atomic:
one worker only.

Usage::

    python benchmarks/profile_packed.py                     # N = 100k, 8192 queries, 3 runs
    python benchmarks/profile_packed.py --n 1000000 --queries 2048 --runs 1
    python benchmarks/profile_packed.py --source /tmp/old_topk.c     # another version, for A/B runs
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from contrastive.index import _kernels, exact  # noqa: E402

COUNTERS = "static unsigned long long cy_pack_a, cy_pack_b, cy_mm, cy_filter, cy_first, cy_finish, cy_merge, n_merge;"


# (text of _topk.c, the same with rdtsc timers around it): packing of the queries and of each database group,
# each block's matmul and filter (and its share on a row's first block), the sorted finish
TIMERS = [
    ("                blas_pack(CBLAS_ROW_MAJOR, CBLAS_A, CBLAS_NO_TRANS",
     "                unsigned long long ta = __rdtsc();\n"
     "                blas_pack(CBLAS_ROW_MAJOR, CBLAS_A, CBLAS_NO_TRANS"),
    ("                          (float*)(apack + i * a_bytes));\n",
     "                          (float*)(apack + i * a_bytes));\n                cy_pack_a += __rdtsc() - ta;\n"),
    ("                    for (int64_t p = 0; p < pieces; p++) {\n                        int64_t c0 = g0 + p * width;\n",
     "                    unsigned long long tb = __rdtsc();\n"
     "                    for (int64_t p = 0; p < pieces; p++) {\n                        int64_t c0 = g0 + p * width;\n"),
    ("                    __atomic_store_n(packed + (g & 1), g + 1, __ATOMIC_RELEASE);\n",
     "                    cy_pack_b += __rdtsc() - tb;\n"
     "                    __atomic_store_n(packed + (g & 1), g + 1, __ATOMIC_RELEASE);\n"),
    ("                    blas_compute(CBLAS_ROW_MAJOR, CBLAS_PACKED, CBLAS_PACKED",
     "                    unsigned long long t0 = __rdtsc();\n"
     "                    blas_compute(CBLAS_ROW_MAJOR, CBLAS_PACKED, CBLAS_PACKED"),
    ("                                 (int)width, 0.0f, block, (int)width);\n",
     "                                 (int)width, 0.0f, block, (int)width);\n"
     "                    unsigned long long t1 = __rdtsc(); cy_mm += t1 - t0;\n"),
    ("                                scratch_keys);\n                }",
     "                                scratch_keys);\n                    cy_filter += __rdtsc() - t1;\n"
     "                    if (c0 == 0) cy_first += __rdtsc() - t1;\n                }"),
    ("                finish_rows(keys + r0 * (k + cap)",
     "                unsigned long long tf = __rdtsc();\n                finish_rows(keys + r0 * (k + cap)"),
    ("(int64_t*)as_ptr(pids) + r0 * ld_out, ld_out, 1);\n",
     "(int64_t*)as_ptr(pids) + r0 * ld_out, ld_out, 1);\n                cy_finish += __rdtsc() - tf;\n"),
]


def _sub(src: str, old: str, new: str) -> str:
    if old not in src:
        raise SystemExit(f"profile_packed: _topk.c changed, cannot instrument (missing: {old[:60]!r}...)")
    return src.replace(old, new, 1)


def instrumented_source(path: str) -> str:
    """The C source at ``path`` (``_topk.c``) with rdtsc counters and a ``cycles()`` function that returns and
    resets them."""
    with open(path) as f:
        s = f.read()
    s = _sub(s, "#include <math.h>", "#include <math.h>\n#include <x86intrin.h>\n" + COUNTERS)
    s = _sub(s, "static float merge(uint64_t* rk, int64_t k, int64_t cnt) {",
             "static float merge_(uint64_t* rk, int64_t k, int64_t cnt);\n"
             "static float merge(uint64_t* rk, int64_t k, int64_t cnt) { n_merge++; unsigned long long t0 = __rdtsc();"
             " float r = merge_(rk, k, cnt); cy_merge += __rdtsc() - t0; return r; }\n"
             "static float merge_(uint64_t* rk, int64_t k, int64_t cnt) {")
    for old, new in TIMERS:
        s = _sub(s, old, new)
    s = _sub(s, "static PyObject* py_isa(PyObject* self, PyObject* args) {",
             "static PyObject* py_cycles(PyObject* self, PyObject* args) {\n"
             "    PyObject* r = Py_BuildValue(\"KKKKKKKK\", cy_pack_a, cy_pack_b, cy_mm, cy_filter, cy_first, cy_finish,"
             " cy_merge, n_merge);\n"
             "    cy_pack_a = cy_pack_b = cy_mm = cy_filter = cy_first = cy_finish = cy_merge = n_merge = 0;\n"
             "    return r;\n}\n"
             "static PyObject* py_isa(PyObject* self, PyObject* args) {")
    s = _sub(s, '{"isa", py_isa,', '{"cycles", py_cycles, METH_NOARGS, "rdtsc counters"},\n    {"isa", py_isa,')
    return s.replace('"_topk"', '"topk_profiled"').replace("PyInit__topk", "PyInit_topk_profiled")


def build(tmp: str, source: str):
    src = os.path.join(tmp, "topk_profiled.c")
    with open(src, "w") as f:
        f.write(instrumented_source(source))
    out = os.path.join(tmp, "topk_profiled" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp", f"-I{sysconfig.get_paths()['include']}",
                    src, "-o", out], check=True)
    spec = importlib.util.spec_from_file_location("topk_profiled", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="database rows")
    p.add_argument("--queries", type=int, default=8192)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--source", default=os.path.join(ROOT, "contrastive", "index", "_kernels", "_topk.c"),
                   help="C source to instrument (another version of _topk.c, for A/B runs)")
    args = p.parse_args(argv)
    if not _kernels.packed_available():
        raise SystemExit("the packed schedule is not available here (no MKL packed GEMM in torch, or no C extension)")
    with tempfile.TemporaryDirectory() as tmp:
        prof = build(tmp, args.source)
        original = _kernels.topk
        _kernels.topk = prof
        _kernels.packed_state.clear()
        try:
            if not _kernels.packed_available():
                raise SystemExit("the instrumented build could not find MKL's packed GEMM")
            g = torch.Generator().manual_seed(0)
            x = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=g), dim=1)
            q = x[: args.queries].contiguous()
            k, cap = args.k, max(args.k, 64)
            out_v, out_i = torch.empty(args.queries, k), torch.empty(args.queries, k, dtype=torch.int64)
            print(f"# one worker, N={args.n:,}, {args.queries:,} queries, d={args.dim}, k={k}, "
                  f"blocks {exact.PACKED_BLOCK[0]} x {exact.PACKED_BLOCK[1]}, ISA {prof.isa()}")
            print("| run | GFLOP/s | pack A | pack B | filter | of which first blocks | of which merges | finish | "
                  "search / own matmuls |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for run in range(args.runs):
                prof.cycles()
                t0 = time.perf_counter()
                exact._packed_topk(q, x, k, None, None, 1, cap, out_v, out_i)
                seconds = time.perf_counter() - t0
                pa, pb, mm, filt, first, fin, merge, _ = prof.cycles()
                total = pa + pb + mm + filt + fin
                print(f"| {run + 1} | {2 * args.queries * args.n * args.dim / seconds / 1e9:.1f} | {pa / mm:.4f} | "
                      f"{pb / mm:.4f} | {filt / mm:.4f} | {first / mm:.4f} | {merge / mm:.4f} | {fin / mm:.4f} | {mm / total:.3f} |")
            ref_v, ref_i = exact.exact_topk(q[:64], x, k)
            assert torch.equal(out_i[:64], ref_i), "instrumented search differs from the library's"
        finally:
            _kernels.topk = original
            _kernels.packed_state.clear()


if __name__ == "__main__":
    main()
