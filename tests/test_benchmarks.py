"""The benchmark scripts run end to end on tiny sizes (their numbers are measured by hand, see README)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contrastive.index._kernels import fused_available, packed_available

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_mining_benchmark_smoke() -> None:
    out = run_script("mining.py", "--n", "4096", "--queries", "2048", "--slices", "2", "--repeats", "1",
                     "--nlist", "64", "--ef-search", "32", "--ef-construction", "40")
    rows = [line for line in out.splitlines() if line.startswith("| 4,096 |")]
    methods = [r.split("|")[3].strip() for r in rows]
    assert methods[0].startswith("exact") and "faiss flat (exact)" in methods
    assert any(m.startswith("ivf-flat") for m in methods) and any(m.startswith("hnsw") for m in methods)
    exact_row = rows[0].split("|")
    assert float(exact_row[6]) > 0  # vs mm (paired)
    assert float(exact_row[8]) == 1.0  # recall of the exact search against itself
    faiss_row = next(r for r in rows if "faiss flat" in r).split("|")
    assert float(faiss_row[8]) == 1.0  # FAISS Flat finds the exact top-k
    assert "per slice, its rate over" in out and "median" in out


@pytest.mark.skipif(not packed_available(), reason="torch without MKL's packed GEMM")
def test_packed_gemm_benchmark_smoke() -> None:
    out = run_script("packed_gemm.py", "--shapes", "256x512", "64x256", "--queries", "256", "--rounds", "2",
                     "--ref", "512x2048")
    assert "| 256 x 512 |" in out and "| 64 x 256 |" in out


@pytest.mark.skipif(not (fused_available() and packed_available() and shutil.which("gcc")),
                    reason="needs the packed schedule and gcc")
def test_profile_packed_benchmark_smoke() -> None:
    out = run_script("profile_packed.py", "--n", "8192", "--queries", "1024", "--runs", "1")
    row = next(line for line in out.splitlines() if line.startswith("| 1 |")).split("|")
    fractions = [float(v) for v in row[3:9]]
    assert all(v >= 0 for v in fractions) and 0 < fractions[-1] <= 1


def test_clip_step_benchmark_smoke() -> None:
    out = run_script("clip_step.py", "--batch", "8", "--steps", "3", "--warmup", "1", "--repeats", "1")
    rates = {tuple(c.strip() for c in line.split("|")[1:3]): float(line.split("|")[3]) for line in out.splitlines()
             if line.startswith(("| bare |", "| lightning |"))}
    assert set(rates) == {(p, c) for p in ("bare", "lightning") for c in ("wall", "cpu")}
    assert all(v > 0 for v in rates.values())
    for clock in ("wall", "cpu"):
        ratio = float(out.split(f"ratio lightning / bare ({clock}): ")[1].split()[0])
        assert ratio == pytest.approx(rates["lightning", clock] / rates["bare", clock], rel=0.01)
