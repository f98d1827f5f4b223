"""Forward+backward time and peak memory of every registered loss, plain vs cached (GradCache).

For each loss in :data:`contrastive.registry.LOSSES` (those constructible with default arguments) and each
batch size ``B``:

- **plain**: a small MLP "encoder" (raw features ``F`` → ``d``, L2-normalised) embeds ``B`` queries and
  ``B`` documents with a graph, the loss sees the full ``(B, B)`` problem (in-batch negatives, candidate
  ``i`` is anchor ``i``'s positive), one ``backward()``.
- **cached**: the same encoder and loss through :mod:`contrastive.models.gradcache`: encoder chunks of
  ``--chunk`` rows without a graph, the loss and its embedding gradient in anchor-row blocks of
  ``max(1, chunk² // B)`` rows (so no block exceeds ``chunk × chunk`` entries), re-encoding with a graph
  per chunk, one ``backward()`` of the surrogate.

Extra loss inputs are synthesised: ``similarity_estimate`` / ``difficulty`` ``(B, M)`` uniform random,
only for the losses that refuse to run without them (plain: one full tensor; cached: generated per row
block, as a chunk-aware estimator would).

Timing: a warm-up iteration (by default only for ``B < 8192``: above, one iteration takes seconds and
first-touch page faults are a real part of a step), then the median of ``--repeats`` iterations (wall
clock, ``time.perf_counter``), single-threaded by default (``--threads 1``: on a shared 2-core machine
multi-threaded OpenMP timings were unstable by an order of magnitude). Reference: the similarity matrix
multiply ``(B, d) @ (d, B)``, timed in the same process right after the loss (median of
``max(3, --repeats)`` after a warm-up); the table reports every loss time as a multiple of it.

Memory: torch on CPU has no ``max_memory_allocated``, so **each configuration runs in its own
subprocess** and reports the kernel's high-water mark of its resident set, ``ru_maxrss`` of
``getrusage(RUSAGE_SELF)`` (KiB on Linux), read right after the loss iterations (before the reference
matmul allocates its ``(B, B)`` output). ``baseline`` is ``VmRSS`` from ``/proc/self/status`` just before the
first loss iteration (interpreter, torch, model, inputs); ``Δpeak = peak - baseline`` is what the loss step
itself needed. A worker that exceeds ``--mem-limit-gib`` of address space (``RLIMIT_AS``) fails with an
allocation error instead of invoking the OOM killer and is reported as ``failed``.

Usage::

    python benchmarks/losses.py                      # B in {1024, 4096, 16384}, d = 256, chunk = 1024
    python benchmarks/losses.py --quick              # smoke test: tiny sizes, one repeat
    python benchmarks/losses.py --sizes 1024 4096 --losses infonce cement
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

EXTRA_INPUTS = ("similarity_estimate", "difficulty")


# ---------------------------------------------------------------------------------------------- worker
def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _needed_extras(loss_fn: Any) -> Optional[tuple[str, ...]]:
    """The smallest set of extra inputs the loss runs with (probed on a tiny problem); None if none works."""
    import itertools

    import torch

    from contrastive.losses.base import LossInputError

    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    c = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    for k in range(len(EXTRA_INPUTS) + 1):
        for names in itertools.combinations(EXTRA_INPUTS, k):
            try:
                loss_fn(a, c, None, **{n: torch.rand(4, 4) for n in names})
                return names
            except LossInputError:
                continue
    return None


def _timed(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.mem_limit_gib:
        lim = int(args.mem_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import torch
    from torch import nn

    from contrastive.losses.base import ContrastiveInputs
    from contrastive.models.gradcache import (chunked_loss_grads, encode_without_grad, loss_chunk_rows, replay_backward,
                                              slice_rows)
    from contrastive.registry import LOSSES

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, d, f = args.size, args.dim, args.features
    loss_fn = LOSSES.build(args.loss)
    extras = _needed_extras(loss_fn)
    if extras is None:
        return {"status": "skipped", "reason": "needs inputs this benchmark cannot synthesise"}

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(f, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(self.net(x), dim=-1)

    enc = Encoder()
    x_q, x_d = torch.randn(b, f), torch.randn(b, f)
    params = [p for p in enc.parameters()]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    chunks = 1

    if args.variant == "plain":
        full_extras = {n: torch.rand(b, b) for n in extras}

        def step() -> None:
            enc.zero_grad(set_to_none=True)
            out = loss_fn(enc(x_q), enc(x_d), None, **full_extras)
            out.loss.backward()
    else:
        rows = loss_chunk_rows(args.chunk, b)

        def make_inputs(leaves, sl):
            inp = slice_rows(ContrastiveInputs(leaves[0], leaves[1]), sl, leaves[0], leaves[1])
            gen = torch.Generator().manual_seed(sl.start)
            synth = {n: torch.rand(sl.stop - sl.start, b, generator=gen) for n in extras}
            return dataclasses.replace(inp, **synth), None

        def step() -> None:
            nonlocal chunks
            enc.zero_grad(set_to_none=True)
            qc = encode_without_grad(enc, (x_q,), args.chunk)
            dc = encode_without_grad(enc, (x_d,), args.chunk)
            leaves = [qc.embeddings.requires_grad_(), dc.embeddings.requires_grad_()]
            res = chunked_loss_grads(loss_fn, leaves, make_inputs, b, rows, loss_params)
            chunks = res.num_chunks
            surrogate = replay_backward([(qc, res.grads[0]), (dc, res.grads[1])], params)
            assert surrogate is not None
            surrogate.backward()

    base = _rss_kib()
    warmup = args.warmup if args.warmup >= 0 else int(b < 8192)
    t = _timed(step, args.repeats, warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    e_q, e_d = torch.randn(b, d), torch.randn(b, d)
    t_mm = _timed(lambda: e_q @ e_d.T, max(3, args.repeats))
    return {"status": "ok", "time": t, "matmul": t_mm, "baseline_kib": base, "peak_kib": peak, "extras": list(extras),
            "loss_chunks": chunks}


# ---------------------------------------------------------------------------------------------- driver
def _loss_names(wanted: Optional[list[str]]) -> list[str]:
    from contrastive.registry import LOSSES

    names = LOSSES.names()
    if wanted:
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"unknown losses {unknown}; registered: {names}")
        names = [n for n in names if n in wanted]
    buildable = []
    for n in names:
        try:
            LOSSES.build(n)
        except TypeError as e:  # needs constructor arguments (e.g. weighted_sum's components)
            print(f"skipping {n}: cannot be built with default arguments ({e})", file=sys.stderr)
            continue
        buildable.append(n)
    return buildable


def _run_one(args: argparse.Namespace, loss: str, size: int, variant: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--loss", loss, "--size", str(size),
           "--variant", variant, "--dim", str(args.dim), "--chunk", str(args.chunk), "--features", str(args.features),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--mem-limit-gib", str(args.mem_limit_gib)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if "can't allocate memory" in proc.stderr:
            return {"status": "failed", "reason": f"out of memory (> --mem-limit-gib {args.mem_limit_gib:g} GiB)"}
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": "failed", "reason": f"exit {proc.returncode}: {tail[:100]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="batch sizes B")
    p.add_argument("--dim", type=int, default=256, help="embedding size d")
    p.add_argument("--chunk", type=int, default=1024, help="GradCache encoder chunk (rows)")
    p.add_argument("--features", type=int, default=256, help="raw input features of the MLP encoder")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per configuration (median)")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up iterations (-1: 1 if B < 8192 else 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--losses", nargs="+", default=None, help="subset of registered loss names")
    p.add_argument("--mem-limit-gib", type=float, default=16.0, help="address-space limit per worker (0 = none)")
    p.add_argument("--quick", action="store_true", help="smoke test: sizes 256 1024, chunk 256, 1 repeat")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["plain", "cached"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.sizes, args.chunk, args.repeats = [256, 1024], 256, 1

    names = _loss_names(args.losses)
    results: dict[tuple[str, int, str], dict[str, Any]] = {}
    for size in args.sizes:
        for loss in names:
            for variant in ("plain", "cached"):
                t0 = time.perf_counter()
                r = _run_one(args, loss, size, variant)
                results[(loss, size, variant)] = r
                print(f"[{time.perf_counter() - t0:6.1f}s] {loss} B={size} {variant}: {r.get('status')} "
                      f"{r.get('reason', '')}", file=sys.stderr, flush=True)

    print(f"\n### Loss forward+backward, d = {args.dim}, MLP encoder {args.features}→{4 * args.dim}→{args.dim}, "
          f"GradCache chunk = {args.chunk}, {args.threads} threads, median of {args.repeats}\n")
    print("| loss | B | variant | time (s) | × matmul | µs / sample | peak RSS (MiB) | Δpeak (MiB) | loss blocks |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for loss in names:
        for size in args.sizes:
            for variant in ("plain", "cached"):
                r = results[(loss, size, variant)]
                if r["status"] != "ok":
                    print(f"| {loss} | {size} | {variant} | {r['status']}: {r.get('reason', '')} | | | | | |")
                    continue
                print(f"| {loss} | {size} | {variant} | {r['time']:.3f} | {r['time'] / r['matmul']:.1f} | "
                      f"{1e6 * r['time'] / size:.1f} | {_mib(r['peak_kib'])} | "
                      f"{_mib(r['peak_kib'] - r['baseline_kib'])} | {r['loss_chunks']} |")
    mm = {s: statistics.median([r["matmul"] for (_, sz, _), r in results.items() if sz == s and r["status"] == "ok"]
                               or [float("nan")]) for s in args.sizes}
    print("\nReference matmul (B×d @ d×B), median over workers: "
          + ", ".join(f"B={s}: {mm[s] * 1e3:.1f} ms" for s in args.sizes))

    lo, hi = min(args.sizes), max(args.sizes)
    print(f"\n### Acceptance (cached): peak memory at B={hi} ≤ 1.5× at B={lo}; "
          f"time/sample within 2.5× of plain at B={hi}\n")
    print(f"| loss | peak RSS ratio | Δpeak ratio | cached/plain time per sample | memory | time |")
    print("|---|---:|---:|---:|---|---|")
    for loss in names:
        c_lo, c_hi, p_hi = results[(loss, lo, "cached")], results[(loss, hi, "cached")], results[(loss, hi, "plain")]
        if c_lo["status"] != "ok" or c_hi["status"] != "ok":
            print(f"| {loss} | n/a | n/a | n/a | n/a | n/a |")
            continue
        rss = c_hi["peak_kib"] / c_lo["peak_kib"]
        delta = (c_hi["peak_kib"] - c_hi["baseline_kib"]) / max(1, c_lo["peak_kib"] - c_lo["baseline_kib"])
        if p_hi["status"] == "ok":
            tr = (c_hi["time"] / hi) / (p_hi["time"] / hi)
            tr_s, ok_t = f"{tr:.2f}", "pass" if tr <= 2.5 else "FAIL"
        else:
            tr_s, ok_t = f"plain {p_hi['status']}", "n/a"
        print(f"| {loss} | {rss:.2f} | {delta:.2f} | {tr_s} | {'pass' if rss <= 1.5 else 'FAIL'} (RSS) | {ok_t} |")


if __name__ == "__main__":
    main()
