/*
 * libcublas.so.12 for a machine that only has cuBLAS 13, so that the faiss-gpu wheel from PyPI (built
 * against CUDA 12) can be tested there. Used only by benchmarks/device/faiss_gpu_check.sh on a lent GPU
 * machine whose image ships CUDA 13 libraries and cannot download the 580 MB cuBLAS 12 wheel.
 *
 * libfaiss.so needs exactly these eight cuBLAS symbols, versioned "libcublas.so.12" (nm -D --undefined-only
 * libfaiss.so). Their C signatures are unchanged in cuBLAS 13 (handles and streams are opaque pointers,
 * enums are ints with the same values), so each one forwards to the cuBLAS 13 function of the same name.
 * Build: gcc -O2 -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script=cublas12.map -o libcublas.so.12
 *        cublas12_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef int st_t;     /* cublasStatus_t */
typedef void* h_t;    /* cublasHandle_t */
typedef long long ll; /* strides */

static void* lib;

static void* real(const char* name) {
    if (!lib) {
        lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_GLOBAL);
        if (!lib) {
            fprintf(stderr, "cublas12_shim: cannot load libcublas.so.13: %s\n", dlerror());
            abort();
        }
    }
    void* f = dlsym(lib, name);
    if (!f) {
        fprintf(stderr, "cublas12_shim: libcublas.so.13 has no %s\n", name);
        abort();
    }
    return f;
}

#define FWD(name, params, args)                         \
    st_t name params {                                  \
        static st_t(*f) params;                         \
        if (!f) f = (st_t(*) params)real(#name);         \
        return f args;                                  \
    }

FWD(cublasCreate_v2, (h_t * h), (h))
FWD(cublasDestroy_v2, (h_t h), (h))
FWD(cublasSetStream_v2, (h_t h, void* s), (h, s))
FWD(cublasGetMathMode, (h_t h, int* m), (h, m))
FWD(cublasSetMathMode, (h_t h, int m), (h, m))
FWD(cublasSgemmEx,
    (h_t h, int ta, int tb, int m, int n, int k, const float* alpha, const void* A, int at, int lda, const void* B,
     int bt, int ldb, const float* beta, void* C, int ct, int ldc),
    (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc))
FWD(cublasGemmEx,
    (h_t h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int at, int lda, const void* B,
     int bt, int ldb, const void* beta, void* C, int ct, int ldc, int compute, int algo),
    (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute, algo))
FWD(cublasGemmStridedBatchedEx,
    (h_t h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int at, int lda, ll sa,
     const void* B, int bt, int ldb, ll sb, const void* beta, void* C, int ct, int ldc, ll sc, int batch,
     int compute, int algo),
    (h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch, compute, algo))
