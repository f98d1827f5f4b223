/*
 * Fused threshold filter + top-k merge for exact blocked kNN on CPU (see contrastive/index/exact.py).
 *
 * The threshold selection of Johnson, Douze & Jegou 2017 ("Billion-scale similarity search with GPUs",
 * arXiv:1702.08734) on a CPU: each query row keeps a running top-k, and one SIMD pass (AVX-512, AVX2 or
 * scalar, picked at import) compares a score block's row against the row's k-th best score; only the rare
 * survivors are touched again, buffered and merged by quickselect. A block's rows are split over OpenMP
 * threads (the caller passes the thread count). search_chunk() runs the whole search of a query chunk
 * with MKL's packed GEMM (see the packed-GEMM section). Why this is C, the alternatives measured against
 * it and the costs behind the choices below: benchmarks/RESULTS.md.
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
 * First block of a row (thr == -inf): no filter; one select over the row's keys and all the block's scores
 * (first_block). Scores must be finite (the Python caller checks its inputs).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
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

/* Median-of-three pivot of a[lo:hi] (hi - lo >= 2), then a branchless Lomuto partition: returns store with
 * a[lo:store] > a[store] = pivot >= a[store + 1:hi]. */
static int64_t partition_u64(uint64_t* a, int64_t lo, int64_t hi) {
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
    a[store] = pivot;
    return store;
}

/* Reorder a[0:n] (distinct keys) so that its k largest come first; returns the k-th largest.
 * Quickselect with a branchless Lomuto partition (a branchy one mispredicts on every other element of
 * random scores). */
static uint64_t select_top_u64(uint64_t* a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n, want = k - 1;
    while (hi - lo > 1) {
        int64_t store = partition_u64(a, lo, hi);
        if (store == want) break;
        if (store > want) hi = store;
        else lo = store + 1;
    }
    return a[want];
}

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int isa = ISA_SCALAR;

#ifdef TOPK_X86
/* select_top_u64 with AVX-512 passes that move nothing in a[]: each pass compresses the current candidates,
 * 8 keys at a time, into a "greater than the pivot" and a "not greater" buffer (thread-local, three in
 * rotation) and goes on with the side that holds the k-th largest; at 16 candidates or fewer the k-th is
 * found by counting, and one last pass compacts the k keys >= it to the front of a[] in place. Keys are
 * distinct, so a median-of-three pivot is never the maximum and every pass shrinks the candidates. */
#define VSEL_MAX 4096
static __thread uint64_t vsel_tmp[3][VSEL_MAX + 8];

__attribute__((target("avx512f")))
static uint64_t select_top_u64_avx512(uint64_t* a, int64_t n, int64_t k) {
    const uint64_t* src = a;
    int64_t m = n, want = k - 1; /* the answer has exactly `want` candidates above it */
    int cur = -1;                /* buffer holding src, -1 for a */
    uint64_t kth = 0;
    int found = 0;
    while (m > 16) {
        int64_t mid = m >> 1, last = m - 1;
        uint64_t x = src[0], y = src[mid], z = src[last];
        uint64_t pivot = (x < y) ? ((y < z) ? y : ((x < z) ? z : x)) : ((x < z) ? x : ((y < z) ? z : y));
        __m512i pv = _mm512_set1_epi64((long long)pivot);
        int ig = cur == 0 ? 1 : 0, il = cur == 2 ? 1 : 2; /* the two buffers that are not src */
        uint64_t *gt = vsel_tmp[ig], *le = vsel_tmp[il];
        int64_t ng = 0, nl = 0, i = 0;
        for (; i + 8 <= m; i += 8) {
            __m512i v = _mm512_loadu_si512((const void*)(src + i));
            __mmask8 g = _mm512_cmpgt_epu64_mask(v, pv);
            _mm512_storeu_si512((void*)(gt + ng), _mm512_maskz_compress_epi64(g, v));
            _mm512_storeu_si512((void*)(le + nl), _mm512_maskz_compress_epi64((__mmask8)~g, v));
            int c = __builtin_popcount((unsigned)g);
            ng += c;
            nl += 8 - c;
        }
        if (i < m) {
            __mmask8 valid = (__mmask8)((1u << (m - i)) - 1);
            __m512i v = _mm512_maskz_loadu_epi64(valid, (const void*)(src + i));
            __mmask8 g = _mm512_mask_cmpgt_epu64_mask(valid, v, pv);
            _mm512_storeu_si512((void*)(gt + ng), _mm512_maskz_compress_epi64(g, v));
            _mm512_storeu_si512((void*)(le + nl), _mm512_maskz_compress_epi64((__mmask8)(valid & ~g), v));
            int c = __builtin_popcount((unsigned)g);
            ng += c;
            nl += (m - i) - c;
        }
        if (ng == want) { kth = pivot; found = 1; break; }
        if (ng > want) { src = gt; m = ng; cur = ig; }
        else { src = le; m = nl; want -= ng; cur = il; }
    }
    if (!found) { /* the candidate with exactly `want` others above it */
        __mmask8 v0 = (__mmask8)(m >= 8 ? 0xFF : (1u << m) - 1), v1 = (__mmask8)(m > 8 ? (1u << (m - 8)) - 1 : 0);
        __m512i c0 = _mm512_maskz_loadu_epi64(v0, (const void*)src);
        __m512i c1 = _mm512_maskz_loadu_epi64(v1, (const void*)(src + 8));
        for (int64_t j = 0; j < m; j++) {
            __m512i e = _mm512_set1_epi64((long long)src[j]);
            int above = __builtin_popcount((unsigned)_mm512_mask_cmpgt_epu64_mask(v0, c0, e))
                        + __builtin_popcount((unsigned)_mm512_mask_cmpgt_epu64_mask(v1, c1, e));
            kth = above == want ? src[j] : kth;
        }
    }
    /* a[0:k] = the keys >= kth, in place: the write position never passes the read position */
    __m512i kv = _mm512_set1_epi64((long long)kth);
    int64_t w = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512i v = _mm512_loadu_si512((const void*)(a + i));
        __mmask8 g = _mm512_cmpge_epu64_mask(v, kv);
        _mm512_mask_storeu_epi64((void*)(a + w), (__mmask8)((1u << __builtin_popcount((unsigned)g)) - 1),
                                 _mm512_maskz_compress_epi64(g, v));
        w += __builtin_popcount((unsigned)g);
    }
    for (; i < n; i++) {
        uint64_t e = a[i];
        a[w] = e;
        w += e >= kth;
    }
    return kth;
}
#endif

/* Put the k largest keys of a[0:n] (distinct) in a[0:k], in no order, and return the k-th largest; a[k:n] is left
 * holding unspecified keys (the AVX-512 version does not keep a permutation). */
static uint64_t select_top(uint64_t* a, int64_t n, int64_t k) {
#ifdef TOPK_X86
    if (isa == ISA_AVX512 && n <= VSEL_MAX) return select_top_u64_avx512(a, n, k);
#endif
    return select_top_u64(a, n, k);
}

/* Merge cnt buffered keys into the running top-k; returns the new k-th best score. A row's keys are usually
 * out of cache by its next merge (the blocks in between stream MKL's packed operands through L2), so all
 * their cache lines are prefetched at once first. */
static float merge(uint64_t* rk, int64_t k, int64_t cnt) {
    for (int64_t j = 0; j < k + cnt; j += 8) __builtin_prefetch(rk + j, 1, 3);
    uint64_t kth = select_top(rk, k + cnt, k);
    return kth < EMPTY_LIMIT ? -INFINITY : key_value(kth); /* fewer than k scores so far */
}

/* A row's first block (thr == -inf): the top-k of the keys it holds (rk[0:k + c]) and the block's scores, by one
 * select over all of them into tmp (k + c + width slots), written to rk[0:k]; returns the new k-th best score
 * (-inf while fewer than k). With no threshold yet, a filter would let much of the block through. */
static float first_block(const float* row, int64_t width, int64_t offset, uint64_t* rk, int64_t k, int64_t c,
                         uint64_t* tmp) {
    memcpy(tmp, rk, (size_t)(k + c) * sizeof(uint64_t));
    for (int64_t j = 0; j < width; j++) tmp[k + c + j] = make_key(row[j], offset + j);
    uint64_t kth = select_top(tmp, k + c + width, k);
    memcpy(rk, tmp, (size_t)k * sizeof(uint64_t));
    return kth < EMPTY_LIMIT ? -INFINITY : key_value(kth);
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
/* Append the columns base + (set bits of mask) to pos[np...]: two unconditionally (tzcnt of an empty mask is 64,
 * written past the count and overwritten later), the rest in a loop that is rarely entered. tzcnt (BMI1, which
 * every AVX2 CPU has) rather than a test for zero, which gcc turns into a branch. */
#define POS_TWO(base, mask)                                                         \
    do {                                                                            \
        uint64_t m_ = (mask);                                                       \
        pos[np] = (base) + (int32_t)_tzcnt_u64(m_); np += m_ != 0; m_ = _blsr_u64(m_); \
        pos[np] = (base) + (int32_t)_tzcnt_u64(m_); np += m_ != 0; m_ = _blsr_u64(m_); \
        while (m_) { pos[np++] = (base) + (int32_t)_tzcnt_u64(m_); m_ = _blsr_u64(m_); } \
    } while (0)

/* Push the compacted survivors; t may rise at a merge on the way, hence the re-test. */
#define SURVIVORS_PUSH                                              \
    for (int64_t i = 0; i < np; i++) {                              \
        float v = row[pos[i]];                                      \
        if (v > t) PUSH(v, offset + pos[i]);                        \
    }
/* The scans below defer survivors: the pass over the row only records (branch-free) which groups of
 * columns hold a score above the threshold, and a second loop over those few groups pushes them, so the
 * scan has no branch that mispredicts at every survivor. */
__attribute__((target("avx2,bmi"), always_inline))
static inline void scan_avx2(const float* row, int64_t width, int64_t offset, uint64_t* rk, int64_t k, int64_t cap,
                      float* tp, int64_t* cp, int32_t* hits) {
    float t = *tp;
    int64_t c = *cp, h = 0, j = 0;
    __m256 tv = _mm256_set1_ps(t);
    for (; j + 32 <= width; j += 32) {
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(row + j + 8)),
                                 _mm256_max_ps(_mm256_loadu_ps(row + j + 16), _mm256_loadu_ps(row + j + 24)));
        hits[h] = (int32_t)j;
        h += _mm256_movemask_ps(_mm256_cmp_ps(m, tv, _CMP_GT_OQ)) != 0;
    }
    int32_t* pos = hits + h; /* as in scan_avx512 */
    int64_t np = 0;
    for (int64_t i = 0; i < h; i++) {
        const float* g = row + hits[i];
        uint64_t mask = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(g), tv, _CMP_GT_OQ))
                        | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(g + 8), tv, _CMP_GT_OQ)) << 8
                        | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(g + 16), tv, _CMP_GT_OQ)) << 16
                        | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(g + 24), tv, _CMP_GT_OQ)) << 24;
        POS_TWO(hits[i], mask);
    }
    SURVIVORS_PUSH;
    *tp = t; *cp = c;
    scan_scalar(row, j, width, offset, rk, k, cap, tp, cp);
}

__attribute__((target("avx512f,bmi"), always_inline))
static inline void scan_avx512(const float* row, int64_t width, int64_t offset, uint64_t* rk, int64_t k, int64_t cap,
                        float* tp, int64_t* cp, int32_t* hits) {
    float t = *tp;
    int64_t c = *cp, h = 0, j = 0;
    __m512 tv = _mm512_set1_ps(t);
    for (; j + 64 <= width; j += 64) {
        __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(row + j), _mm512_loadu_ps(row + j + 16)),
                                 _mm512_max_ps(_mm512_loadu_ps(row + j + 32), _mm512_loadu_ps(row + j + 48)));
        hits[h] = (int32_t)j;
        h += _mm512_cmp_ps_mask(m, tv, _CMP_GT_OQ) != 0;
    }
    /* Survivor columns, compacted branch-free: two per group unconditionally, a loop only for the rare group
     * with more; then one flat loop pushes them. */
    int32_t* pos = hits + h;
    int64_t np = 0;
    for (int64_t i = 0; i < h; i++) {
        const float* g = row + hits[i];
        uint64_t mask = (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(g), tv, _CMP_GT_OQ)
                        | (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(g + 16), tv, _CMP_GT_OQ) << 16
                        | (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(g + 32), tv, _CMP_GT_OQ) << 32
                        | (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(g + 48), tv, _CMP_GT_OQ) << 48;
        POS_TWO(hits[i], mask);
    }
    SURVIVORS_PUSH;
    *tp = t; *cp = c;
    scan_scalar(row, j, width, offset, rk, k, cap, tp, cp);
}
#endif

/* Filter rows [0, rows) of a block (row stride ld) whose column j is database id offset + j into the per-row
 * state. One copy per instruction set, each with its scan inlined (no call, nor an AVX-512 function's stack
 * realignment, per row). */
#define UPDATE_ROWS_BODY(SCAN_CALL)                                                                             \
    int32_t* hits = (int32_t*)scratch_keys; /* group starts (<= width / 32), then survivor columns (<= width + 1): fits in width + 8 keys */ \
    (void)hits;                                                                                                 \
    for (int64_t r = 0; r < rows; r++) {                                                                        \
        const float* row = block + r * ld;                                                                      \
        uint64_t* rk = keys + r * (k + cap);                                                                    \
        float t = thr[r];                                                                                       \
        int64_t c = cnt[r];                                                                                     \
        if (isinf(t) && t < 0) {                                                                                \
            t = first_block(row, width, offset, rk, k, c, scratch_keys);                                        \
            c = 0;                                                                                              \
        } else {                                                                                                \
            SCAN_CALL;                                                                                          \
        }                                                                                                       \
        thr[r] = t;                                                                                             \
        cnt[r] = c;                                                                                             \
    }

#define UPDATE_ROWS_ARGS                                                                                        \
    const float *block, int64_t rows, int64_t width, int64_t ld, int64_t offset, uint64_t *keys, float *thr,    \
        int64_t *cnt, int64_t k, int64_t cap, uint64_t *scratch_keys

static void update_rows_scalar(UPDATE_ROWS_ARGS) { UPDATE_ROWS_BODY(scan_scalar(row, 0, width, offset, rk, k, cap, &t, &c)) }
#ifdef TOPK_X86
__attribute__((target("avx2,bmi"))) static void update_rows_avx2(UPDATE_ROWS_ARGS) {
    UPDATE_ROWS_BODY(scan_avx2(row, width, offset, rk, k, cap, &t, &c, hits))
}
__attribute__((target("avx512f,bmi"))) static void update_rows_avx512(UPDATE_ROWS_ARGS) {
    UPDATE_ROWS_BODY(scan_avx512(row, width, offset, rk, k, cap, &t, &c, hits))
}
#endif

static void update_rows(UPDATE_ROWS_ARGS) {
#ifdef TOPK_X86
    if (isa == ISA_AVX512) update_rows_avx512(block, rows, width, ld, offset, keys, thr, cnt, k, cap, scratch_keys);
    else if (isa == ISA_AVX2) update_rows_avx2(block, rows, width, ld, offset, keys, thr, cnt, k, cap, scratch_keys);
    else
#endif
        update_rows_scalar(block, rows, width, ld, offset, keys, thr, cnt, k, cap, scratch_keys);
}

/* uint64 slots of an update's scratch_keys: first_block's k + cap + width keys, or the scans' group starts
 * and survivor columns (int32, width + 8 keys' room). */
static size_t scratch_slots(int64_t width, int64_t k, int64_t cap) { return (size_t)((width > 0 ? width : 1) + k + cap + 8); }

static void* as_ptr(unsigned long long p) { return (void*)(uintptr_t)p; }

/* Empty state for `rows` query rows. */
static void init_rows(uint64_t* keys, float* thr, int64_t* cnt, int64_t rows, int64_t k, int64_t cap) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < k + cap; j++) keys[r * (k + cap) + j] = (uint64_t)j;
        thr[r] = -INFINITY;
        cnt[r] = 0;
    }
}

/* Sort a[0:n] (distinct keys) in decreasing order: quicksort with the branchless partition of
 * select_top_u64, insertion sort below 16 keys. */
static void sort_desc_u64(uint64_t* a, int64_t n) {
    while (n > 16) {
        int64_t store = partition_u64(a, 0, n); /* a[0:store] > a[store] > a[store + 1:n] */
        if (store < n - store - 1) { /* recurse into the smaller side, loop on the larger */
            sort_desc_u64(a, store);
            a += store + 1;
            n -= store + 1;
        } else {
            sort_desc_u64(a + store + 1, n - store - 1);
            n = store;
        }
    }
    for (int64_t i = 1; i < n; i++) {
        uint64_t e = a[i];
        int64_t j = i;
        for (; j > 0 && a[j - 1] < e; j--) a[j] = a[j - 1];
        a[j] = e;
    }
}

#ifdef TOPK_X86
/* sort_desc_u64 for n <= RANK_SORT_MAX keys, by rank: each key's rank is the number of keys above it, counted
 * for 8 keys at a time against every key broadcast (n * n / 8 compares, no branch), then each key is written
 * at its rank (the quicksort's branches mispredict on random keys). */
#define RANK_SORT_MAX 256
__attribute__((target("avx512f")))
static void sort_desc_rank_avx512(uint64_t* a, int64_t n) {
    uint64_t out[RANK_SORT_MAX];
    int64_t rank[RANK_SORT_MAX + 8];
    const __m512i one = _mm512_set1_epi64(1);
    for (int64_t j = 0; j < n; j += 8) {
        __mmask8 valid = (__mmask8)(n - j >= 8 ? 0xFF : (1u << (n - j)) - 1);
        __m512i v = _mm512_maskz_loadu_epi64(valid, (const void*)(a + j));
        __m512i cnt = _mm512_setzero_si512();
        for (int64_t i = 0; i < n; i++) {
            __mmask8 above = _mm512_cmpgt_epu64_mask(_mm512_set1_epi64((long long)a[i]), v);
            cnt = _mm512_mask_add_epi64(cnt, above, cnt, one);
        }
        _mm512_storeu_si512((void*)(rank + j), cnt);
    }
    for (int64_t j = 0; j < n; j++) out[rank[j]] = a[j];
    memcpy(a, out, (size_t)n * sizeof(uint64_t));
}
#endif

/* Sort a[0:n] (distinct keys) in decreasing order, by the fastest version this CPU runs. */
static void sort_desc(uint64_t* a, int64_t n) {
#ifdef TOPK_X86
    if (isa == ISA_AVX512 && n <= RANK_SORT_MAX) {
        sort_desc_rank_avx512(a, n);
        return;
    }
#endif
    sort_desc_u64(a, n);
}

/* Merge what is buffered and write each row's top-k (-inf / -1 for empty slots), best first when `sorted`
 * (score descending, then id ascending: the key order), else in no particular order. */
static void finish_rows(uint64_t* keys, int64_t* cnt, int64_t rows, int64_t k, int64_t cap, float* vals, int64_t* ids,
                        int64_t ld_out, int sorted) {
    for (int64_t r = 0; r < rows; r++) {
        uint64_t* rk = keys + r * (k + cap);
        if (cnt[r]) {
            select_top(rk, k + cnt[r], k);
            cnt[r] = 0;
        }
        if (sorted) sort_desc(rk, k);
        for (int64_t j = 0; j < k; j++) {
            vals[r * ld_out + j] = rk[j] < EMPTY_LIMIT ? -INFINITY : key_value(rk[j]);
            ids[r * ld_out + j] = rk[j] < EMPTY_LIMIT ? -1 : key_id(rk[j]);
        }
    }
}

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
        uint64_t* scratch_keys = (uint64_t*)malloc(scratch_slots(width, k, cap) * sizeof(uint64_t));
        if (!scratch_keys) failed = 1;
        else
            update_rows(block + lo * ld, hi - lo, width, ld, offset, keys + lo * (k + cap), thr + lo, cnt + lo, k, cap,
                        scratch_keys);
        free(scratch_keys);
    }
    return failed;
}

static PyObject* py_init(PyObject* self, PyObject* args) {
    unsigned long long pkeys, pthr, pcnt;
    long long rows, k, cap;
    if (!PyArg_ParseTuple(args, "KKKLLL", &pkeys, &pthr, &pcnt, &rows, &k, &cap)) return NULL;
    init_rows((uint64_t*)as_ptr(pkeys), (float*)as_ptr(pthr), (int64_t*)as_ptr(pcnt), rows, k, cap);
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
    int sorted = 0;
    if (!PyArg_ParseTuple(args, "KKLLLKKL|p", &pkeys, &pcnt, &rows, &k, &cap, &pvals, &pids, &ld_out, &sorted)) return NULL;
    uint64_t* keys = (uint64_t*)as_ptr(pkeys);
    int64_t* cnt = (int64_t*)as_ptr(pcnt);
    float* vals = (float*)as_ptr(pvals);
    int64_t* ids = (int64_t*)as_ptr(pids);
    Py_BEGIN_ALLOW_THREADS
    finish_rows(keys, cnt, rows, k, cap, vals, ids, ld_out, sorted);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}


/* ---- Packed-GEMM schedule: the whole search of one query chunk in one call --------------------------------
 * With torch.mm per block, a block must be large (megabytes of scores) for the matmul to run at full rate, so
 * the filter reads it back from L3 or memory. MKL's packed GEMM (cblas_sgemm_pack / cblas_sgemm_compute)
 * packs each operand once into the layout its kernels read, after which small blocks (e.g. 256 x 512
 * scores, 512 KB) run at the full matmul rate, and the filter reads each block right after it is written.
 * torch's x86 wheels carry MKL; contrastive/index/_kernels/__init__.py looks the four functions up in the
 * loaded libtorch_cpu and hands their addresses to set_blas (no link-time dependency; without them this
 * schedule is simply not offered). MKL_INT is 32-bit (LP64 interface). */
typedef size_t (*blas_pack_size_fn)(int identifier, int m, int n, int k);
typedef void (*blas_pack_fn)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                             int ld, float* dest);
typedef void (*blas_compute_fn)(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                                const float* b, int ldb, float beta, float* c, int ldc);
typedef int (*blas_threads_local_fn)(int nthreads);
static blas_pack_size_fn blas_pack_size;
static blas_pack_fn blas_pack;
static blas_compute_fn blas_compute;
static blas_threads_local_fn blas_threads_local;
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112, CBLAS_PACKED = 151, CBLAS_A = 161, CBLAS_B = 162 };
#define PACK_ALIGN 64

static size_t round_up(size_t x) { return (x + PACK_ALIGN - 1) / PACK_ALIGN * PACK_ALIGN; }

static PyObject* py_set_blas(PyObject* self, PyObject* args) {
    unsigned long long a, b, c, d;
    if (!PyArg_ParseTuple(args, "KKKK", &a, &b, &c, &d)) return NULL;
    blas_pack_size = (blas_pack_size_fn)as_ptr(a);
    blas_pack = (blas_pack_fn)as_ptr(b);
    blas_compute = (blas_compute_fn)as_ptr(c);
    blas_threads_local = (blas_threads_local_fn)as_ptr(d);
    Py_RETURN_NONE;
}

static int blas_ready(void) {
    if (blas_pack_size && blas_pack && blas_compute && blas_threads_local) return 1;
    PyErr_SetString(PyExc_RuntimeError, "_topk: set_blas() was not called");
    return 0;
}

/* Wait until *x >= v, another thread's release store (rare and short: yield, not spin). */
static void wait_at_least(int64_t* x, int64_t v) {
    while (__atomic_load_n(x, __ATOMIC_ACQUIRE) < v) sched_yield();
}

static int bad_block(long long rows, long long width, long long d) {
    if (rows < 1 || width < 1 || d < 1 || rows > 1 << 20 || width > 1 << 20 || d > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "_topk: rows, width and d must be in [1, 2^20]");
        return 1;
    }
    return 0;
}

/* search_chunk(q_ptr, m, d, db_ptr, n, rows, width, k, cap, vals_ptr, ids_ptr, ld_out, group=8, threads=1): top-k of
 * m query rows (row-major m x d) over n database rows (row-major n x d), written best first as by
 * finish(..., sorted=True).
 *
 * The m queries are cut into s = ceil(m / rows) sub-chunks of equal size (the last zero-padded), each packed
 * once; the database is walked in groups of `group` pieces of `width` rows, each piece packed once per call
 * (the last zero-padded) and multiplied with every sub-chunk, so packing is shared by all m queries and
 * nothing is kept per database row.
 *
 * `threads` OpenMP threads share the call. They pack the queries together, then take tasks (sub-chunk i,
 * group g) from one shared ticket counter, in the order g * s + i, until none is left: a task multiplies the
 * sub-chunk's packed queries with the group's pieces and filters each block, so the rows' state stays in one
 * core's cache for the group. The thread that takes a group's first task packs the group, into one of two
 * slots (the slot of group g - 2, once every task of that group is done); the others wait for it if they
 * get there first, and a task also waits until the same sub-chunk's task of the group before is done (a
 * row must see the database in increasing id order, see the top of the file). There is no barrier between
 * groups, so a faster core simply takes more tasks. Each thread runs MKL on its own thread only
 * (mkl_set_num_threads_local(1), restored after).
 *
 * MKL's pack_get_size reserves ~8 MB per packed operand whatever its size, of which only about the operand's
 * own size is written, so the buffers are malloc'ed (untouched pages cost no memory). */
static PyObject* py_search_chunk(PyObject* self, PyObject* args) {
    unsigned long long pq, pdb, pvals, pids;
    long long m, d, n, rows, width, k, cap, ld_out, group = 8;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "KLLKLLLLLKKL|Li", &pq, &m, &d, &pdb, &n, &rows, &width, &k, &cap, &pvals, &pids, &ld_out,
                          &group, &threads))
        return NULL;
    if (!blas_ready() || bad_block(rows, width, d)) return NULL;
    if (m < 1 || m > 1 << 24 || n < 1 || k < 1 || cap < 1 || ld_out < k || n >= 0xFFFFFFFFLL || group < 1 || group > 1024
        || threads < 1 || threads > 1024) {
        PyErr_SetString(PyExc_ValueError,
                        "_topk.search_chunk: bad sizes (need 1 <= m <= 2^24, k, cap >= 1, 1 <= group <= 1024, "
                        "1 <= threads <= 1024, ids < 2^32 - 1)");
        return NULL;
    }
    const float* q = (const float*)as_ptr(pq);
    const float* db = (const float*)as_ptr(pdb);
    int64_t subs = (m + rows - 1) / rows, sub = (m + subs - 1) / subs;
    int64_t tail = m - (subs - 1) * sub; /* rows of the last sub-chunk, 1..sub */
    if (width > n) width = n;
    if (threads > subs) threads = (int)subs;
    size_t a_bytes = round_up(blas_pack_size(CBLAS_A, (int)sub, (int)width, (int)d));
    size_t b_bytes = round_up(blas_pack_size(CBLAS_B, (int)sub, (int)width, (int)d));
    size_t block_bytes = round_up((size_t)(sub * width) * sizeof(float));
    size_t scratch_bytes = round_up(scratch_slots(width, k, cap) * sizeof(uint64_t));
    char* apack = (char*)aligned_alloc(PACK_ALIGN, a_bytes * (size_t)subs);
    char* bpack = (char*)aligned_alloc(PACK_ALIGN, b_bytes * (size_t)group * 2); /* two groups' slots */
    int64_t* done = (int64_t*)calloc((size_t)subs, sizeof(int64_t)); /* groups each sub-chunk has seen */
    int64_t packed[2] = {0, 0};                                          /* 1 + the group packed in each slot */
    char* per_thread = (char*)aligned_alloc(PACK_ALIGN, (block_bytes + scratch_bytes) * (size_t)threads);
    uint64_t* keys = (uint64_t*)malloc((size_t)(m * (k + cap)) * sizeof(uint64_t));
    float* thr = (float*)malloc((size_t)m * sizeof(float));
    int64_t* cnt = (int64_t*)malloc((size_t)m * sizeof(int64_t));
    /* zero-padded copies of the last sub-chunk and of the last database piece, when short */
    float* pad_a = tail < sub ? (float*)calloc((size_t)(sub * d), sizeof(float)) : NULL;
    float* pad_b = n % width ? (float*)calloc((size_t)(width * d), sizeof(float)) : NULL;
    int ok = apack && bpack && done && per_thread && keys && thr && cnt && (tail == sub || pad_a) && (n % width == 0 || pad_b);
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        if (pad_a) memcpy(pad_a, q + (subs - 1) * sub * d, (size_t)(tail * d) * sizeof(float));
        init_rows(keys, thr, cnt, m, k, cap);
        int64_t groups = (n + group * width - 1) / (group * width), ticket = 0;
#pragma omp parallel num_threads(threads)
        {
            int me = 0;
#ifdef _OPENMP
            me = omp_get_thread_num();
#endif
            float* block = (float*)(per_thread + (size_t)me * (block_bytes + scratch_bytes));
            uint64_t* scratch_keys = (uint64_t*)((char*)block + block_bytes);
            int before = blas_threads_local(1);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < subs; i++) {
                const float* src = i == subs - 1 && pad_a ? pad_a : q + i * sub * d;
                blas_pack(CBLAS_ROW_MAJOR, CBLAS_A, CBLAS_NO_TRANS, (int)sub, (int)width, (int)d, 1.0f, src, (int)d,
                          (float*)(apack + i * a_bytes));
            }
            /* (the loop's barrier: all queries are packed) tasks (sub-chunk i, group g) in the order of their
             * ticket g * subs + i; see the comment above */
            for (;;) {
                int64_t t = __atomic_fetch_add(&ticket, 1, __ATOMIC_RELAXED), g = t / subs, i = t % subs;
                if (g >= groups) break;
                int64_t g0 = g * group * width, pieces = (n - g0 + width - 1) / width;
                if (pieces > group) pieces = group;
                char* bp = bpack + (size_t)(g & 1) * (size_t)group * b_bytes;
                if (i == 0) { /* the group's first task packs it, into the slot of group g - 2 once that is done */
                    for (int64_t j = 0; j < subs; j++) wait_at_least(done + j, g - 1);
                    for (int64_t p = 0; p < pieces; p++) {
                        int64_t c0 = g0 + p * width;
                        const float* src = db + c0 * d;
                        if (n - c0 < width) { /* only the last piece of the database */
                            memcpy(pad_b, src, (size_t)((n - c0) * d) * sizeof(float));
                            src = pad_b;
                        }
                        /* B = piece^T (d x width); the piece is row-major (width x d) */
                        blas_pack(CBLAS_ROW_MAJOR, CBLAS_B, CBLAS_TRANS, (int)sub, (int)width, (int)d, 1.0f, src,
                                  (int)d, (float*)(bp + p * b_bytes));
                    }
                    __atomic_store_n(packed + (g & 1), g + 1, __ATOMIC_RELEASE);
                } else { /* the slot holds group g - 2 until then; group g + 2 needs this task done first */
                    wait_at_least(packed + (g & 1), g + 1);
                }
                wait_at_least(done + i, g); /* the sub-chunk's rows have seen groups 0 .. g - 1 */
                int64_t r0 = i * sub, nr = i == subs - 1 ? tail : sub;
                for (int64_t p = 0; p < pieces; p++) {
                    int64_t c0 = g0 + p * width, w = n - c0 < width ? n - c0 : width;
                    blas_compute(CBLAS_ROW_MAJOR, CBLAS_PACKED, CBLAS_PACKED, (int)sub, (int)width, (int)d,
                                 (const float*)(apack + i * a_bytes), (int)d, (const float*)(bp + p * b_bytes),
                                 (int)width, 0.0f, block, (int)width);
                    update_rows(block, nr, w, width, c0, keys + r0 * (k + cap), thr + r0, cnt + r0, k, cap,
                                scratch_keys);
                }
                __atomic_store_n(done + i, g + 1, __ATOMIC_RELEASE);
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t i = 0; i < subs; i++) {
                int64_t r0 = i * sub, nr = i == subs - 1 ? tail : sub;
                finish_rows(keys + r0 * (k + cap), cnt + r0, nr, k, cap, (float*)as_ptr(pvals) + r0 * ld_out,
                            (int64_t*)as_ptr(pids) + r0 * ld_out, ld_out, 1);
            }
            blas_threads_local(before);
        }
        Py_END_ALLOW_THREADS
    }
    free(apack); free(bpack); free(done); free(per_thread); free(keys); free(thr); free(cnt); free(pad_a); free(pad_b);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject* py_isa(PyObject* self, PyObject* args) {
    return PyUnicode_FromString(isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "scalar");
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
     "finish(keys_ptr, cnt_ptr, rows, k, cap, vals_ptr, ids_ptr, ld_out, sorted=False): merge the buffered "
     "survivors and write each row's top-k to vals float32 / ids int64 (row stride ld_out; -inf / -1 for empty "
     "slots), best first (score descending, then id ascending) when sorted. Releases the GIL."},
    {"set_blas", py_set_blas, METH_VARARGS,
     "set_blas(pack_get_size, pack, compute, set_num_threads_local): addresses of MKL's cblas_sgemm_pack_get_size, "
     "cblas_sgemm_pack, cblas_sgemm_compute and mkl_set_num_threads_local, for the packed schedule."},
    {"search_chunk", py_search_chunk, METH_VARARGS,
     "search_chunk(q_ptr, m, d, db_ptr, n, rows, width, k, cap, vals_ptr, ids_ptr, ld_out, group=8, threads=1): top-k "
     "of m float32 queries over n float32 database rows by packed GEMM in blocks of about rows x width, on `threads` "
     "OpenMP threads, written best first as by finish(sorted=True). Releases the GIL."},
    {"isa", py_isa, METH_NOARGS, "Instruction set of the scan: 'avx512', 'avx2' or 'scalar'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk", "Fused threshold top-k for exact kNN.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__topk(void) {
#ifdef TOPK_X86
    __builtin_cpu_init();
    isa = __builtin_cpu_supports("avx512f") ? ISA_AVX512 : __builtin_cpu_supports("avx2") ? ISA_AVX2 : ISA_SCALAR;
    if (!__builtin_cpu_supports("bmi")) isa = ISA_SCALAR; /* the vector scans use tzcnt / blsr */
    const char* want = getenv("CONTRASTIVE_TOPK_ISA"); /* lower the instruction set, for tests and A/B runs */
    if (want && !strcmp(want, "avx2") && isa >= ISA_AVX2) isa = ISA_AVX2;
    if ((want && !strcmp(want, "scalar")) || getenv("CONTRASTIVE_TOPK_SCALAR")) isa = ISA_SCALAR;
#endif
    return PyModule_Create(&module);
}
