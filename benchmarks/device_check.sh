#!/usr/bin/env bash
# GPU check in one go, for a lent CUDA machine that cannot reach a package registry (its image has torch,
# lightning, torchmetrics, timm, tokenizers, pytest, pytest-xdist; the rest comes as wheels in .whl/):
#   1. the tests marked `gpu` (CUDA vs CPU/float64 references, GradCache on the CUDA RNG, a CLI fit that
#      mines on CUDA), 2. benchmarks/mining_cuda.py, 3. the whole suite (configs train on CUDA through
#      `accelerator: auto`), less the install pins and the notebooks (no jupyter there).
# Logs go to $OUT (or ./device-logs). Each step has its own time limit; a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || echo "wheel install failed"
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || echo "C extension build failed (torch path only)"
nvidia-smi -L; python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
python3 -c "from contrastive.index.exact import fused_available; print('fused CPU filter built:', fused_available())"

echo "== 1. gpu-marked tests"
timeout "${GPU_TESTS_S:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "== 2. CUDA mining benchmark"
timeout "${BENCH_S:-200}" python3 benchmarks/mining_cuda.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/mining_cuda.log" | tail -24
echo "== 3. full suite on the GPU machine"
timeout "${SUITE_S:-240}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" \
  --ignore=tests/test_install.py --ignore=tests/test_notebooks.py tests 2>&1 | tee "$OUT/suite.log" | tail -25
