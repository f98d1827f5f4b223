# Source this on a machine with CUDA 13 libraries only, after extracting the faiss-gpu wheel (CUDA 12) and
# nvidia-cuda-runtime-cu12's lib/ into $FG (faiss/, faiss_gpu.libs/, nvidia/cuda_runtime/lib/): lays out
# the nvidia.<component>/lib/ directories that faiss' loader looks for, with the real CUDA 12 runtime,
# benchmarks/device/cublas12_shim.c as libcublas.so.12 (forwarding to cuBLAS 13), an empty
# libcublasLt.so.12 (libfaiss.so uses none of its symbols) and the machine's libcurand.so.10.
# Then sets PYTHONPATH and LD_LIBRARY_PATH. Used by benchmarks/device/faiss_gpu_check.sh.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FG=${FG:?set FG to the extracted faiss-gpu directory}
cu13=$(dirname "$(python3 - <<'PY'
import glob, os, site, sys
for d in site.getsitepackages() + sys.path:
    hits = glob.glob(os.path.join(d, "nvidia", "*", "lib", "libcublas.so.13")) + glob.glob(os.path.join(d, "nvidia", "cublas", "lib", "libcublas.so.13"))
    if hits:
        print(hits[0]); break
PY
)")
mkdir -p "$FG/cu12/nvidia/cublas/lib" "$FG/cu12/nvidia/curand/lib" "$FG/cu12/nvidia/cuda_runtime/lib"
cp "$FG"/nvidia/cuda_runtime/lib/libcudart.so.12 "$FG/cu12/nvidia/cuda_runtime/lib/"
gcc -O2 -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script="$here/cublas12.map" \
  -o "$FG/cu12/nvidia/cublas/lib/libcublas.so.12" "$here/cublas12_shim.c" -ldl
echo 'void contrastive_cublaslt12_stub(void) {}' > "$FG/cu12/lt.c"
gcc -shared -fPIC -Wl,-soname,libcublasLt.so.12 -o "$FG/cu12/nvidia/cublas/lib/libcublasLt.so.12" "$FG/cu12/lt.c"
ln -sf "$cu13/libcurand.so.10" "$FG/cu12/nvidia/curand/lib/libcurand.so.10"
export PYTHONPATH="$FG:$FG/cu12${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$cu13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "faiss-gpu (CUDA 12) set up over cuBLAS 13 in $cu13"
