/*
 * Fused threshold filter + top-k merge for exact blocked kNN on CPU (see contrastive/index/exact.py).
 *
 * Why C: the selection must cost well under a tenth of the matrix multiply that produces the scores
 * (benchmarks/mining.py, acceptance of issue 4). With torch ops the filter and merge of survivors cost
 * ~0.6x the matmul; with numba the group-max pass alone cost ~0.1x (not vectorised); FAISS's
 * HeapArray::addn is scalar and costs ~0.3x. Here one AVX2 pass compares 32 scores per step against
 * the row's running k-th best score, and only the rare survivors are touched again; a block's rows are
 * split over OpenMP threads (the caller passes torch's thread count).
 *
 * Tried and dropped: (1) one single-threaded torch.mm + filter per worker thread, so each core filters
 * what it computed: two concurrent single-thread matmuls ran ~20% slower than torch's own two-thread
 * matmul of the same blocks. (2) A register-tiled AVX-512 matmul (12 x 32 tiles) filtering each tile
 * while it is in L1, so no score block is written at all: bit-identical to torch.mm, but 5-10% slower
 * than MKL on two threads, which ate the saving.
 *
 * State per query row r (all row-major, owned by the caller):
 *   keys[r, 0:k+cap] uint64: (score, id) pairs packed as sortable keys (see make_key); slots 0..k-1 hold
 *                       the running top-k (unsorted), slots k..k+cnt-1 buffered survivors not merged yet;
 *                       merging is one quickselect over k + cnt keys;
 *   thr[r] float32:     the k-th best merged score (-inf while fewer than k scores are merged), or a
 *                       lower bound for the current block (first block, see below);
 *   cnt[r] int64:       number of buffered survivors.
 * Ordering is (score desc, id asc): among equal scores the lower id wins, so the result equals a stable
 * descending sort of each full score row. Database ids reach a row in increasing order, so a new score
 * equal to the k-th best can never displace it: the filter is a strict ">".
 *
 * First block of a row (thr == -inf): the block is cut into n1 >= 2k strided groups of g columns
 * (column j is in group j mod n1) and the k-th largest group maximum is a lower bound of the k-th best
 * score (at least k distinct scores reach it), so only scores >= that bound are buffered.
 * Scores must be finite (the Python caller checks its inputs).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TOPK_X86 1
#endif

/* A (score, id) pair as one uint64 key whose unsigned order is (score asc, id desc): the high 32 bits are
 * the score's bits made monotone, the low 32 bits are 0xFFFFFFFF - id (ids < 2^32 - 1, checked by the
 * caller). Empty slot j holds key j, below every real key (finite scores map to >= 2^55). */
#define EMPTY_LIMIT ((uint64_t)1 << 55)

static inline uint64_t make_key(float v, int64_t id) {
    uint32_t u;
    memcpy(&u, &v, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)u << 32) | (uint32_t)(0xFFFFFFFFu - (uint32_t)id);
}

static inline float key_value(uint64_t key) {
    uint32_t u = (uint32_t)(key >> 32);
    u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

static inline int64_t key_id(uint64_t key) { return (int64_t)(0xFFFFFFFFu - (uint32_t)key); }

/* Reorder a[0:n] (distinct keys) so that its k largest come first; returns the k-th largest.
 * Quickselect with a branchless Lomuto partition: a branchy one mispredicts on every other element
 * (random scores), which made merges ~5x slower. */
static uint64_t select_top_u64(uint64_t* a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n, want = k - 1;
    while (hi - lo > 1) {
        int64_t mid = lo + ((hi - lo) >> 1), last = hi - 1;
        uint64_t x = a[lo], y = a[mid], z = a[last]; /* median of three, moved to the end */
        int64_t p = (x < y) ? ((y < z) ? mid : ((x < z) ? last : lo)) : ((x < z) ? lo : ((y < z) ? last : mid));
        uint64_t pivot = a[p];
        a[p] = a[last];
        a[last] = pivot;
        int64_t store = lo;
        for (int64_t i = lo; i < last; i++) {
            uint64_t e = a[i];
            int64_t gt = e > pivot;
            a[i] = a[store];
            a[store] = e;
            store += gt;
        }
        a[last] = a[store];
        a[store] = pivot; /* a[lo:store] > pivot >= a[store + 1:hi] */
        if (store == want) break;
        if (store > want) hi = store;
        else lo = store + 1;
    }
    return a[want];
}

/* Merge cnt buffered keys into the running top-k; returns the new k-th best score. */
static float merge(uint64_t* rk, int64_t k, int64_t cnt) {
    uint64_t kth = select_top_u64(rk, k + cnt, k);
    return kth < EMPTY_LIMIT ? -INFINITY : key_value(kth); /* fewer than k scores so far */
}

/* Lower bound of the k-th best score of row[0:width] from strided group maxima (needs width >= 2k). */
static float first_block_floor(const float* row, int64_t width, int64_t k, float* scratch, uint64_t* keys) {
    int64_t g = 1;
    while (width / (2 * g) >= 2 * k) g *= 2; /* n1 = width / g stays >= 2k */
    int64_t n1 = width / g;
    memcpy(scratch, row, (size_t)n1 * sizeof(float));
    for (int64_t s = 1; s < g; s++) {
        const float* seg = row + s * n1;
        for (int64_t j = 0; j < n1; j++) scratch[j] = seg[j] > scratch[j] ? seg[j] : scratch[j];
    }
    for (int64_t j = 0; j < n1; j++) keys[j] = make_key(scratch[j], j); /* distinct keys: no quickselect on ties */
    return key_value(select_top_u64(keys, n1, k));
}

#define PUSH(v, id)                                          \
    do {                                                     \
        rk[k + c] = make_key((v), (id)); c++;                \
        if (c == cap) { t = merge(rk, k, c); c = 0; }        \
    } while (0)

static void scan_scalar(const float* row, int64_t from, int64_t width, int64_t offset, uint64_t* rk, int64_t k,
                        int64_t cap, float* tp, int64_t* cp) {
    float t = *tp;
    int64_t c = *cp;
    for (int64_t j = from; j < width; j++) {
        float v = row[j];
        if (v > t) PUSH(v, offset + j);
    }
    *tp = t; *cp = c;
}

#ifdef TOPK_X86
__attribute__((target("avx2")))
static void scan_avx2(const float* row, int64_t width, int64_t offset, uint64_t* rk, int64_t k, int64_t cap,
                      float* tp, int64_t* cp) {
    float t = *tp;
    int64_t c = *cp;
    int64_t j = 0;
    __m256 tv = _mm256_set1_ps(t);
    for (; j + 32 <= width; j += 32) {
        __m256 a = _mm256_loadu_ps(row + j), b = _mm256_loadu_ps(row + j + 8);
        __m256 d = _mm256_loadu_ps(row + j + 16), e = _mm256_loadu_ps(row + j + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(d, e));
        if (!_mm256_movemask_ps(_mm256_cmp_ps(m, tv, _CMP_GT_OQ))) continue;
        uint32_t mask = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a, tv, _CMP_GT_OQ))
                        | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(b, tv, _CMP_GT_OQ)) << 8
                        | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(d, tv, _CMP_GT_OQ)) << 16
                        | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(e, tv, _CMP_GT_OQ)) << 24;
        while (mask) {
            int u = __builtin_ctz(mask);
            mask &= mask - 1;
            float v = row[j + u];
            if (v > t) { /* t may have risen at a merge since the mask was taken */
                PUSH(v, offset + j + u);
                tv = _mm256_set1_ps(t);
            }
        }
    }
    *tp = t; *cp = c;
    scan_scalar(row, j, width, offset, rk, k, cap, tp, cp);
}
#endif

static int use_avx2 = -1;

static void update_rows(const float* block, int64_t rows, int64_t width, int64_t ld, int64_t offset, uint64_t* keys,
                        float* thr, int64_t* cnt, int64_t k, int64_t cap, float* scratch, uint64_t* scratch_keys) {
    for (int64_t r = 0; r < rows; r++) {
        const float* row = block + r * ld;
        uint64_t* rk = keys + r * (k + cap);
        float t = thr[r];
        int64_t c = cnt[r];
        int first = isinf(t) && t < 0;
        if (first && width >= 2 * k) /* ">= floor" as "> the float just below it" */
            t = nextafterf(first_block_floor(row, width, k, scratch, scratch_keys), -INFINITY);
#ifdef TOPK_X86
        if (use_avx2) scan_avx2(row, width, offset, rk, k, cap, &t, &c);
        else
#endif
            scan_scalar(row, 0, width, offset, rk, k, cap, &t, &c);
        if (first && c) { /* the floor is not a k-th best score: merge so that thr is one */
            t = merge(rk, k, c);
            c = 0;
        }
        thr[r] = t;
        cnt[r] = c;
    }
}

static void* as_ptr(unsigned long long p) { return (void*)(uintptr_t)p; }

/* Rows split into `threads` contiguous parts, one per OpenMP thread (each with its own scratch). */
static int update_parallel(const float* block, int64_t rows, int64_t width, int64_t ld, int64_t offset, uint64_t* keys,
                           float* thr, int64_t* cnt, int64_t k, int64_t cap, int threads) {
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t lo = rows * t / nt, hi = rows * (t + 1) / nt;
        size_t slots = (size_t)(width > 0 ? width : 1);
        float* scratch = (float*)malloc(slots * sizeof(float));
        uint64_t* scratch_keys = (uint64_t*)malloc(slots * sizeof(uint64_t));
        if (!scratch || !scratch_keys) failed = 1;
        else
            update_rows(block + lo * ld, hi - lo, width, ld, offset, keys + lo * (k + cap), thr + lo, cnt + lo, k, cap,
                        scratch, scratch_keys);
        free(scratch);
        free(scratch_keys);
    }
    return failed;
}

static PyObject* py_init(PyObject* self, PyObject* args) {
    unsigned long long pkeys, pthr, pcnt;
    long long rows, k, cap;
    if (!PyArg_ParseTuple(args, "KKKLLL", &pkeys, &pthr, &pcnt, &rows, &k, &cap)) return NULL;
    uint64_t* keys = (uint64_t*)as_ptr(pkeys);
    float* thr = (float*)as_ptr(pthr);
    int64_t* cnt = (int64_t*)as_ptr(pcnt);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < k + cap; j++) keys[r * (k + cap) + j] = (uint64_t)j;
        thr[r] = -INFINITY;
        cnt[r] = 0;
    }
    Py_RETURN_NONE;
}

static PyObject* py_update(PyObject* self, PyObject* args) {
    unsigned long long pblock, pkeys, pthr, pcnt;
    long long rows, width, ld, offset, k, cap;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "KLLLLKKKLL|i", &pblock, &rows, &width, &ld, &offset, &pkeys, &pthr, &pcnt, &k, &cap,
                          &threads))
        return NULL;
    if (rows < 0 || width < 0 || ld < width || k < 1 || cap < 1 || offset < 0 || offset + width >= 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "_topk.update: bad sizes (need k, cap >= 1, ids < 2^32 - 1)");
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = update_parallel((const float*)as_ptr(pblock), rows, width, ld, offset, (uint64_t*)as_ptr(pkeys),
                             (float*)as_ptr(pthr), (int64_t*)as_ptr(pcnt), k, cap, threads);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject* py_finish(PyObject* self, PyObject* args) {
    unsigned long long pkeys, pcnt, pvals, pids;
    long long rows, k, cap, ld_out;
    if (!PyArg_ParseTuple(args, "KKLLLKKL", &pkeys, &pcnt, &rows, &k, &cap, &pvals, &pids, &ld_out)) return NULL;
    uint64_t* keys = (uint64_t*)as_ptr(pkeys);
    int64_t* cnt = (int64_t*)as_ptr(pcnt);
    float* vals = (float*)as_ptr(pvals);
    int64_t* ids = (int64_t*)as_ptr(pids);
    Py_BEGIN_ALLOW_THREADS
    for (int64_t r = 0; r < rows; r++) {
        uint64_t* rk = keys + r * (k + cap);
        if (cnt[r]) {
            select_top_u64(rk, k + cnt[r], k);
            cnt[r] = 0;
        }
        for (int64_t j = 0; j < k; j++) {
            vals[r * ld_out + j] = rk[j] < EMPTY_LIMIT ? -INFINITY : key_value(rk[j]);
            ids[r * ld_out + j] = rk[j] < EMPTY_LIMIT ? -1 : key_id(rk[j]);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject* py_isa(PyObject* self, PyObject* args) {
    return PyUnicode_FromString(use_avx2 ? "avx2" : "scalar");
}

static PyMethodDef methods[] = {
    {"init", py_init, METH_VARARGS,
     "init(keys_ptr, thr_ptr, cnt_ptr, rows, k, cap): empty state (keys uint64 (rows, k + cap), thr float32 "
     "(rows,), cnt int64 (rows,))."},
    {"update", py_update, METH_VARARGS,
     "update(block_ptr, rows, width, ld, offset, keys_ptr, thr_ptr, cnt_ptr, k, cap, threads=1): filter one "
     "(rows, width) float32 score block (row stride ld) whose column j is database id offset + j into the "
     "per-row state, rows split over `threads` OpenMP threads. Releases the GIL."},
    {"finish", py_finish, METH_VARARGS,
     "finish(keys_ptr, cnt_ptr, rows, k, cap, vals_ptr, ids_ptr, ld_out): merge the buffered survivors and "
     "write each row's top-k, unsorted, to vals float32 / ids int64 (row stride ld_out; -inf / -1 for empty "
     "slots). Releases the GIL."},
    {"isa", py_isa, METH_NOARGS, "Instruction set of the scan: 'avx2' or 'scalar'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk", "Fused threshold top-k for exact kNN.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__topk(void) {
#ifdef TOPK_X86
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (getenv("CONTRASTIVE_TOPK_SCALAR")) use_avx2 = 0;
#else
    use_avx2 = 0;
#endif
    return PyModule_Create(&module);
}
