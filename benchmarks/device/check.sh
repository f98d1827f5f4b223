#!/usr/bin/env bash
# GPU check in one go, for a lent CUDA machine that cannot reach a package registry. Its image has torch,
# lightning, torchmetrics, timm, tokenizers, pytest and pytest-xdist; the rest travels with the call:
#   .whl/  wheels of the missing pure-Python dependencies (omegaconf, antlr4, bm25s, open_clip_torch, ...)
#   .fg/fg.tar.xz  optional: the faiss-gpu wheel (CUDA 12) unpacked, with nvidia-cuda-runtime-cu12's lib/,
#          made usable over the machine's cuBLAS 13 by faiss_gpu_env.sh; without it, a faiss-cpu wheel in .whl/
# Preparing them (here, with pip and network; both folders are git-ignored, 64 MiB in all travel):
#   P="--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64"
#   pip download --no-deps $P -d .whl omegaconf bm25s open_clip_torch ftfy wcwidth
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.13.2
#   pip download --no-deps $P -d /tmp/w faiss-gpu==1.15.1 'nvidia-cuda-runtime-cu12>=12.6,<13'
#   (unzip both into /tmp/fg; keep faiss/, faiss_gpu.libs/, nvidia/cuda_runtime/lib/libcudart.so.12)
#   tar cf - -C /tmp/fg faiss faiss_gpu.libs nvidia | xz -9 -T2 > .fg/fg.tar.xz   # 58 MB
# Steps (each with its own time limit; a failing step does not stop the next):
#   0. FAISS on the GPU (tests/test_faiss_gpu.py), in its own process
#   1. the tests marked `gpu` (CUDA vs CPU/float64 references, GradCache on the CUDA RNG, a CLI fit that
#      mines on CUDA)
#   2. benchmarks/mining_cuda.py
#   3. the whole suite (configs train on CUDA through `accelerator: auto`; FaissIndex(use_gpu="auto") runs
#      on the GPU), less the install pins and the notebooks (no jupyter there), over $WORKERS xdist workers
#   4. (not by default) the FAISS tests in $PAR concurrent processes on the one GPU
# STEPS="0 1 2 3" (default) picks the steps.
# Logs go to $OUT (or ./device-logs).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-device-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || echo "wheel install failed"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -f .fg/fg.tar.xz ]; then
  export FG=/tmp/fg
  rm -rf "$FG" && mkdir -p "$FG" && python3 -c "import tarfile, sys; tarfile.open('.fg/fg.tar.xz').extractall(sys.argv[1])" "$FG" \
    && source benchmarks/device/faiss_gpu_env.sh || echo "faiss-gpu setup failed"
fi
python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || echo "C extension build failed (torch path only)"
nvidia-smi -L; python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
python3 -c "from contrastive.index.exact import fused_available; print('fused CPU filter built:', fused_available())"
python3 -c "import torch, faiss; print('faiss', faiss.__version__, 'GPUs seen by FAISS:', faiss.get_num_gpus())"

step() { [[ " ${STEPS:-0 1 2 3} " == *" $1 "* ]]; }
if step 0; then
  echo "== 0. FAISS on the GPU"
  timeout "${FAISS_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_faiss_gpu.py 2>&1 | tee "$OUT/faiss_gpu.log" | tail -15
fi
if step 1; then
  echo "== 1. gpu-marked tests"
  timeout "${GPU_TESTS_S:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests --ignore=tests/test_faiss_gpu.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -12
fi
if step 2; then
  echo "== 2. CUDA mining benchmark"
  timeout "${BENCH_S:-200}" python3 benchmarks/mining_cuda.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/mining_cuda.log" | tail -24
fi
if step 3; then
  echo "== 3. full suite on the GPU machine"
  (while sleep 2; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done) >"$OUT/gpu_mem.log" 2>&1 &
  sampler=$!
  timeout "${SUITE_S:-240}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" \
    --ignore=tests/test_install.py --ignore=tests/test_notebooks.py tests 2>&1 | tee "$OUT/suite.log" | tail -25
  kill "$sampler"
  echo "peak GPU memory used during the suite: $(sort -n "$OUT/gpu_mem.log" | tail -1) MiB"
fi
if step 4; then  # several processes using FAISS on one GPU at once, each with its own log (stderr kept)
  echo "== 4. FAISS GPU tests in ${PAR:-4} concurrent processes"
  for i in $(seq "${PAR:-4}"); do
    timeout "${FAISS_S:-150}" python3 -X faulthandler -m pytest -q -p no:cacheprovider -x tests/test_faiss_gpu.py tests/test_index.py \
      >"$OUT/faiss_par_$i.log" 2>&1 &
  done
  wait
  for i in $(seq "${PAR:-4}"); do echo "process $i: $(tail -1 "$OUT/faiss_par_$i.log")"; done
fi
