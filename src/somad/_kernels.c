/* Native CPU kernels for the two hot loops of SOMAD scoring (see somad/kernels.py, the only caller).
 *
 * whitened_sq_norms: out[p] = ||L_i^{-1} (x[v_p] - mu_i)||^2 for the pairs p of every node i, pairs grouped by
 *     node so that each node's packed triangle is read once per call. Triangles are float32 or float16.
 * probe_nearest: per query, the k nearest nodes among the members of its n_probe nearest clusters.
 *
 * Each kernel has an AVX2/FMA/F16C body, chosen at run time when the CPU has those instructions, and a
 * portable C body. The caller validates shapes, dtypes and index ranges; the kernels check only buffer sizes.
 * Both release the GIL and run on OpenMP threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define SOMAD_X86 1
#include <immintrin.h>
#endif

#define BLOCK 4 /* vectors whitened together: each row of a triangle is loaded once for four dot products */

static int use_simd = 0; /* set at import: the CPU has AVX2, FMA and F16C */

/* ------------------------------------------------------------------------------------------ float16 */
static inline float half_to_float(uint16_t h) {
    /* Shift exponent and mantissa into place, then rescale by 2^112 (float32 bias 127 - float16 bias 15):
     * exact for normal and subnormal halves. Inf/NaN never occur (the caller stores only finite values). */
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)(h & 0x7fffu) << 13;
    v.f *= 5.192296858534828e+33f; /* 2^112 */
    v.u |= (uint32_t)(h & 0x8000u) << 16;
    return v.f;
}

/* -------------------------------------------------------------------------- portable C bodies */
/* Squared norms of W (y_j) for `count` centred vectors y (rows of length d) and one packed triangle. */
#define DEFINE_WHITEN_GENERIC(NAME, WTYPE, LOADW)                                                      \
    static void NAME(const WTYPE *t, const float *y, int64_t d, int64_t stride, int count, float *s) { \
        for (int j = 0; j < count; j++) s[j] = 0.f;                                                    \
        int64_t start = 0;                                                                             \
        for (int64_t r = 0; r < d; r++) {                                                              \
            for (int j = 0; j < count; j++) {                                                          \
                const float *yj = y + j * stride;                                                      \
                float z = 0.f;                                                                         \
                for (int64_t c = 0; c <= r; c++) z += LOADW(t[start + c]) * yj[c];                     \
                s[j] += z * z;                                                                         \
            }                                                                                          \
            start += r + 1;                                                                            \
        }                                                                                              \
    }
#define LOAD_F32(v) (v)
#define LOAD_F16(v) half_to_float(v)
DEFINE_WHITEN_GENERIC(whiten_generic_f32, float, LOAD_F32)
DEFINE_WHITEN_GENERIC(whiten_generic_f16, uint16_t, LOAD_F16)

/* Dot products of one row a with four rows b0..b3, all of length d. */
static void dots_generic(const float *a, const float *b0, const float *b1, const float *b2, const float *b3, int64_t d,
                         float *out) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (int64_t c = 0; c < d; c++) s0 += a[c] * b0[c], s1 += a[c] * b1[c], s2 += a[c] * b2[c], s3 += a[c] * b3[c];
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* Insert (value, id) into the ascending list of n if it beats the last entry. */
static inline void insert(float *values, int64_t *ids, int64_t n, float value, int64_t id) {
    int64_t j = n - 1;
    if (!(value < values[j])) return;
    while (j > 0 && values[j - 1] > value) {
        values[j] = values[j - 1];
        ids[j] = ids[j - 1];
        j--;
    }
    values[j] = value;
    ids[j] = id;
}

/* Insert every entry of v[0:len] that beats the list's last entry; entry j has id ids_of[j], or base + j. */
static void insert_all_generic(float *values, int64_t *ids, int64_t n, const float *v, int64_t len,
                               const int64_t *ids_of, int64_t base) {
    for (int64_t j = 0; j < len; j++)
        if (v[j] < values[n - 1]) insert(values, ids, n, v[j], ids_of ? ids_of[j] : base + j);
}

/* ------------------------------------------------------------------------------- AVX2 bodies */
#ifdef SOMAD_X86
#define SIMD __attribute__((target("avx2,fma,f16c")))

static const int32_t MASK_TABLE[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

SIMD static inline __m256i lane_mask(int64_t n) { /* the first min(n, 8) lanes */
    return _mm256_loadu_si256((const __m256i *)(MASK_TABLE + 8 - (n > 8 ? 8 : n)));
}

SIMD static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) { /* (sum a, sum b, sum c, sum d) */
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

SIMD static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
SIMD static inline __m256 tail8_f32(const float *p, int64_t n, const float *end) {
    (void)end; /* masked lanes are not read */
    return _mm256_maskload_ps(p, lane_mask(n));
}
SIMD static inline __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
SIMD static inline __m256 tail8_f16(const uint16_t *p, int64_t n, const uint16_t *end) {
    if (p + 8 <= end) /* 8 entries readable: load them all, zero the lanes past n */
        return _mm256_and_ps(load8_f16(p), _mm256_castsi256_ps(lane_mask(n)));
    uint16_t tmp[8] = {0}; /* the end of the triangle: copy, never read past it */
    memcpy(tmp, p, (size_t)(n > 8 ? 8 : n) * sizeof(uint16_t));
    return load8_f16(tmp);
}

#define FMA4(w, acc0, acc1, acc2, acc3, c)                   \
    acc0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(y0 + c), acc0); \
    acc1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(y1 + c), acc1); \
    acc2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(y2 + c), acc2); \
    acc3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(y3 + c), acc3);

/* Four centred vectors (rows of y, `stride` >= d + 8 floats, zero past d) against one packed triangle.
 * Rows r and r+1 go together (two rows x four vectors = eight accumulators): each load of y feeds two FMAs.
 * `next`, if not NULL, is the triangle processed next: its lines are prefetched at the pace of this one's. */
#define DEFINE_WHITEN_SIMD(NAME, WTYPE, LOAD8, TAIL8)                                                            \
    SIMD static void NAME(const WTYPE *t, const float *y, int64_t d, int64_t stride, float *s, const WTYPE *next) { \
        const float *y0 = y, *y1 = y + stride, *y2 = y + 2 * stride, *y3 = y + 3 * stride;                       \
        const int64_t line = 64 / (int64_t)sizeof(WTYPE);                                                        \
        const WTYPE *end = t + d * (d + 1) / 2;                                                                   \
        __m128 total = _mm_setzero_ps();                                                                          \
        int64_t start = 0, r = 0;                                                                                 \
        for (; r + 1 < d; r += 2) {                                                                               \
            const WTYPE *wa = t + start, *wb = wa + r + 1; /* rows r (r + 1 entries) and r + 1 (r + 2) */         \
            if (next)                                                                                             \
                for (int64_t o = 0; o < 2 * r + 3; o += line) _mm_prefetch((const char *)(next + start + o), _MM_HINT_T1); \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;      \
            int64_t c = 0;                                                                                        \
            for (; c + 8 <= r + 1; c += 8) {                                                                      \
                __m256 u = LOAD8(wa + c), v = LOAD8(wb + c);                                                      \
                FMA4(u, a0, a1, a2, a3, c) FMA4(v, b0, b1, b2, b3, c)                                             \
            }                                                                                                     \
            /* tail: r + 1 - c (0..7) entries of row r, one more of row r + 1; y is zero past d */                \
            __m256 u = TAIL8(wa + c, r + 1 - c, end), v = TAIL8(wb + c, r + 2 - c, end);                                    \
            FMA4(u, a0, a1, a2, a3, c) FMA4(v, b0, b1, b2, b3, c)                                                 \
            __m128 za = hsum4(a0, a1, a2, a3), zb = hsum4(b0, b1, b2, b3);                                        \
            total = _mm_fmadd_ps(za, za, _mm_fmadd_ps(zb, zb, total));                                            \
            start += 2 * r + 3;                                                                                   \
        }                                                                                                         \
        if (r < d) { /* odd d: the last row alone */                                                              \
            const WTYPE *wa = t + start;                                                                          \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                           \
            for (int64_t c = 0; c <= r; c += 8) {                                                                 \
                __m256 u = TAIL8(wa + c, r + 1 - c, end);                                                              \
                FMA4(u, a0, a1, a2, a3, c)                                                                        \
            }                                                                                                     \
            __m128 za = hsum4(a0, a1, a2, a3);                                                                    \
            total = _mm_fmadd_ps(za, za, total);                                                                  \
        }                                                                                                         \
        _mm_storeu_ps(s, total);                                                                                  \
    }
DEFINE_WHITEN_SIMD(whiten_simd_f32, float, load8_f32, tail8_f32)
DEFINE_WHITEN_SIMD(whiten_simd_f16, uint16_t, load8_f16, tail8_f16)

SIMD static void dots_simd(const float *a, const float *b0, const float *b1, const float *b2, const float *b3, int64_t d,
                          float *out) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
        __m256 v = _mm256_loadu_ps(a + c);
        s0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(b0 + c), s0);
        s1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(b1 + c), s1);
        s2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(b2 + c), s2);
        s3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(b3 + c), s3);
    }
    if (c < d) { /* masked lanes are not read */
        __m256i m = lane_mask(d - c);
        __m256 v = _mm256_maskload_ps(a + c, m);
        s0 = _mm256_fmadd_ps(v, _mm256_maskload_ps(b0 + c, m), s0);
        s1 = _mm256_fmadd_ps(v, _mm256_maskload_ps(b1 + c, m), s1);
        s2 = _mm256_fmadd_ps(v, _mm256_maskload_ps(b2 + c, m), s2);
        s3 = _mm256_fmadd_ps(v, _mm256_maskload_ps(b3 + c, m), s3);
    }
    _mm_storeu_ps(out, hsum4(s0, s1, s2, s3));
}
/* insert_all_generic for lists of at most 8 (n_probe and k are small): the list lives in two registers and an
 * insertion is branch-free (shift the lanes above the new value up by one, put it in the first of them);
 * eight entries at a time are compared with the list's last entry first, so most blocks are skipped. Ids
 * travel as 32-bit lanes (node and cluster ids are far below 2^31, checked by the caller). */
SIMD static void insert_all_simd(float *values, int64_t *ids, int64_t n, const float *v, int64_t len,
                                 const int64_t *ids_of, int64_t base) {
    if (n > 8) {
        insert_all_generic(values, ids, n, v, len, ids_of, base);
        return;
    }
    float lv[8];
    int32_t li[8];
    for (int j = 0; j < 8; j++) lv[j] = j < n ? values[j] : INFINITY, li[j] = j < n ? (int32_t)ids[j] : 0;
    __m256 vals = _mm256_loadu_ps(lv);
    __m256i idv = _mm256_loadu_si256((const __m256i *)li);
    const __m256i up = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6), last = _mm256_set1_epi32((int)(n - 1));
    float threshold = values[n - 1];
    for (int64_t j = 0; j < len; j += 8) {
        int64_t m = len - j < 8 ? len - j : 8;
        __m256 block = _mm256_maskload_ps(v + j, lane_mask(m));
        int hits = _mm256_movemask_ps(_mm256_cmp_ps(block, _mm256_set1_ps(threshold), _CMP_LT_OQ)) & ((1 << m) - 1);
        while (hits) {
            int b = __builtin_ctz((unsigned)hits);
            hits &= hits - 1;
            if (!(v[j + b] < threshold)) continue; /* the threshold may have dropped since the comparison */
            __m256 x = _mm256_set1_ps(v[j + b]);
            __m256 id = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)(ids_of ? ids_of[j + b] : base + j + b)));
            __m256 moved = _mm256_cmp_ps(vals, x, _CMP_GT_OQ); /* lanes above x: a suffix (equal values stay first) */
            __m256 first = _mm256_andnot_ps(_mm256_blend_ps(_mm256_permutevar8x32_ps(moved, up), _mm256_setzero_ps(), 1), moved);
            vals = _mm256_blendv_ps(vals, _mm256_blendv_ps(_mm256_permutevar8x32_ps(vals, up), x, first), moved);
            __m256 shifted = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(idv, up));
            idv = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idv), _mm256_blendv_ps(shifted, id, first), moved));
            threshold = _mm256_cvtss_f32(_mm256_permutevar8x32_ps(vals, last));
        }
    }
    _mm256_storeu_ps(lv, vals);
    _mm256_storeu_si256((__m256i *)li, idv);
    for (int j = 0; j < n; j++) values[j] = lv[j], ids[j] = li[j];
}
#define INSERT_ALL(values, ids, n, v, len, ids_of, base)                                                   \
    (use_simd ? insert_all_simd(values, ids, n, v, len, ids_of, base) : insert_all_generic(values, ids, n, v, len, ids_of, base))
#define DOTS4(a, b0, b1, b2, b3, d, out) \
    (use_simd ? dots_simd(a, b0, b1, b2, b3, d, out) : dots_generic(a, b0, b1, b2, b3, d, out))
#else
#define DOTS4(a, b0, b1, b2, b3, d, out) dots_generic(a, b0, b1, b2, b3, d, out)
#define INSERT_ALL insert_all_generic
#endif

/* --------------------------------------------------------------------------------- the loops */
static inline int64_t padded(int64_t d) { return (d + 7) / 8 * 8 + 8; } /* row stride: tail loads stay inside */

static int whiten_all(const float *x, const int64_t *pair_vector, const int64_t *pointer, const int64_t *node_ids,
                      const int64_t *table_rows, int64_t n_nodes, const float *means, const void *tril, int half,
                      int64_t d, float *out, int threads) {
    const int64_t tri = d * (d + 1) / 2, stride = padded(d);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *y = (float *)calloc((size_t)(BLOCK * stride), sizeof(float)); /* zero past d, forever */
        if (!y) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 8)
        for (int64_t a = 0; a < n_nodes; a++) {
            if (!y) continue;
            const float *mu = means + node_ids[a] * d;
            const size_t offset = (size_t)(table_rows[a] * tri), next_offset = a + 1 < n_nodes ? (size_t)(table_rows[a + 1] * tri) : 0;
            for (int64_t first = pointer[a]; first < pointer[a + 1]; first += BLOCK) {
                int count = (int)(pointer[a + 1] - first < BLOCK ? pointer[a + 1] - first : BLOCK);
                for (int j = 0; j < BLOCK; j++) {
                    /* a short last block repeats its last vector (its result is dropped) */
                    const float *xv = x + pair_vector[first + (j < count ? j : count - 1)] * d;
                    float *yj = y + j * stride;
                    for (int64_t c = 0; c < d; c++) yj[c] = xv[c] - mu[c]; /* centre first: no cancellation */
                }
                float s[BLOCK];
                int prefetch = first == pointer[a] && a + 1 < n_nodes;
#ifdef SOMAD_X86
                if (use_simd && half)
                    whiten_simd_f16((const uint16_t *)tril + offset, y, d, stride, s, prefetch ? (const uint16_t *)tril + next_offset : NULL);
                else if (use_simd)
                    whiten_simd_f32((const float *)tril + offset, y, d, stride, s, prefetch ? (const float *)tril + next_offset : NULL);
                else
#endif
                if (half)
                    whiten_generic_f16((const uint16_t *)tril + offset, y, d, stride, count, s);
                else
                    whiten_generic_f32((const float *)tril + offset, y, d, stride, count, s);
                (void)prefetch;
                (void)next_offset;
                for (int j = 0; j < count; j++) out[first + j] = s[j];
            }
        }
        free(y);
    }
    return failed;
}

/* k nearest nodes per query among the members of its n_probe nearest clusters, in three passes:
 * 1. per query, its n_probe nearest clusters (insertion into a sorted list: n_probe is small);
 * 2. per cluster, the distances from its members to every query that probes it: the cluster's rows stay in
 *    L1 while the queries stream past (query-major order re-read every probed row from L2/L3 for each query);
 * 3. per query, the k smallest of its candidates.
 * Candidates are stored compactly, each (query, probe) pair holding its cluster's own member count: clusters
 * can be very unequal (their rows are padded to the largest), and padding would multiply the memory. */
static int probe_all(const float *x, int64_t n, int64_t d, const float *coarse, int64_t n_clusters, int64_t n_probe,
                     const int64_t *members, int64_t length, const float *weights, const float *weights_sq, int64_t pad,
                     int64_t k, float *out_sq, int64_t *out_index, int threads) {
    const int64_t pairs = n * n_probe;
    int64_t *probe_id = (int64_t *)malloc((size_t)pairs * sizeof(int64_t));
    int64_t *offset = (int64_t *)malloc((size_t)(pairs + 1) * sizeof(int64_t)); /* of each pair's candidates */
    int64_t *size = (int64_t *)malloc((size_t)n_clusters * sizeof(int64_t));
    int64_t *start = (int64_t *)calloc((size_t)(n_clusters + 1), sizeof(int64_t));
    int64_t *fill = (int64_t *)malloc((size_t)(n_clusters + 1) * sizeof(int64_t));
    int64_t *by_cluster = (int64_t *)malloc((size_t)pairs * sizeof(int64_t));
    float *cand = NULL;
    int failed = !probe_id || !offset || !size || !start || !fill || !by_cluster;
    if (!failed) {
        for (int64_t c = 0; c < n_clusters; c++) { /* members are padded at the end of each row */
            size[c] = 0;
            while (size[c] < length && members[c * length + size[c]] != pad) size[c]++;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < n; i++) { /* pass 1 */
            float value[64]; /* n_probe <= 64, checked by the caller */
            int64_t *ids = probe_id + i * n_probe;
            for (int64_t p = 0; p < n_probe; p++) value[p] = INFINITY, ids[p] = 0;
            INSERT_ALL(value, ids, n_probe, coarse + i * n_clusters, n_clusters, NULL, 0);
        }
        offset[0] = 0;
        for (int64_t e = 0; e < pairs; e++) offset[e + 1] = offset[e] + size[probe_id[e]];
        cand = (float *)malloc((size_t)(offset[pairs] > 0 ? offset[pairs] : 1) * sizeof(float));
        failed = !cand;
    }
    if (!failed) {
        /* the (query, probe) pairs of each cluster, by counting sort */
        for (int64_t e = 0; e < pairs; e++) start[probe_id[e] + 1]++;
        for (int64_t c = 0; c < n_clusters; c++) start[c + 1] += start[c];
        memcpy(fill, start, (size_t)(n_clusters + 1) * sizeof(int64_t));
        for (int64_t e = 0; e < pairs; e++) by_cluster[fill[probe_id[e]]++] = e;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t c = 0; c < n_clusters; c++) { /* pass 2 */
            const int64_t *row = members + c * length;
            for (int64_t first = start[c]; first < start[c + 1]; first += BLOCK) {
                int64_t e[BLOCK];
                int count = (int)(start[c + 1] - first < BLOCK ? start[c + 1] - first : BLOCK);
                for (int b = 0; b < BLOCK; b++) e[b] = by_cluster[first + (b < count ? b : count - 1)]; /* repeat the last */
                const float *q[BLOCK];
                for (int b = 0; b < BLOCK; b++) q[b] = x + (e[b] / n_probe) * d;
                for (int64_t j = 0; j < size[c]; j++) {
                    int64_t node = row[j];
                    float dot[BLOCK];
                    if (isinf(weights_sq[node])) { /* an excluded node: never a candidate */
                        for (int b = 0; b < count; b++) cand[offset[e[b]] + j] = INFINITY;
                        continue;
                    }
                    DOTS4(weights + node * d, q[0], q[1], q[2], q[3], d, dot);
                    for (int b = 0; b < count; b++) cand[offset[e[b]] + j] = weights_sq[node] - 2.f * dot[b];
                }
            }
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < n; i++) { /* pass 3 */
            float *best = out_sq + i * k;
            int64_t *best_id = out_index + i * k;
            for (int64_t j = 0; j < k; j++) best[j] = INFINITY, best_id[j] = pad;
            for (int64_t e = i * n_probe; e < (i + 1) * n_probe; e++) /* candidates are ||w||^2 - 2 x.w */
                INSERT_ALL(best, best_id, k, cand + offset[e], offset[e + 1] - offset[e], members + probe_id[e] * length, 0);
            const float *xi = x + i * d;
            float norm = 0.f;
            for (int64_t c = 0; c < d; c++) norm += xi[c] * xi[c];
            for (int64_t j = 0; j < k; j++) best[j] = fmaxf(best[j] + norm, 0.f); /* add ||x||^2; rounding can go below 0 */
        }
    }
    free(probe_id), free(offset), free(size), free(start), free(fill), free(by_cluster), free(cand);
    return failed;
}

/* --------------------------------------------------------------------------------- Python API */
static int check(Py_buffer *b, Py_ssize_t items, Py_ssize_t itemsize, const char *name) {
    if (b->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes, expected %zd", name, b->len, items * itemsize);
        return 0;
    }
    return 1;
}

static PyObject *py_whitened_sq_norms(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x, pv, ptr, ids, rows, means, tril, out;
    Py_ssize_t n, d, n_pairs, n_nodes, n_means, n_tril;
    int half, threads;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*w*nnnnnnpi", &x, &pv, &ptr, &ids, &rows, &means, &tril, &out, &n, &d,
                          &n_pairs, &n_nodes, &n_means, &n_tril, &half, &threads))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t tri = d * (d + 1) / 2;
    if (check(&x, n * d, 4, "x") && check(&pv, n_pairs, 8, "pair_vector") && check(&ptr, n_nodes + 1, 8, "pointer") &&
        check(&ids, n_nodes, 8, "node_ids") && check(&rows, n_nodes, 8, "table_rows") &&
        check(&means, n_means * d, 4, "means") && check(&tril, n_tril * tri, half ? 2 : 4, "tril") &&
        check(&out, n_pairs, 4, "out")) {
        int failed;
        Py_BEGIN_ALLOW_THREADS
        failed = whiten_all(x.buf, pv.buf, ptr.buf, ids.buf, rows.buf, n_nodes, means.buf, tril.buf, half, d, out.buf,
                            threads < 1 ? 1 : threads);
        Py_END_ALLOW_THREADS
        result = failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x), PyBuffer_Release(&pv), PyBuffer_Release(&ptr), PyBuffer_Release(&ids);
    PyBuffer_Release(&rows), PyBuffer_Release(&means), PyBuffer_Release(&tril), PyBuffer_Release(&out);
    return result;
}

static PyObject *py_probe_nearest(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x, coarse, members, weights, weights_sq, out_sq, out_index;
    Py_ssize_t n, d, n_clusters, n_probe, length, n_weights, k;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*w*nnnnnnni", &x, &coarse, &members, &weights, &weights_sq, &out_sq,
                          &out_index, &n, &d, &n_clusters, &n_probe, &length, &n_weights, &k, &threads))
        return NULL;
    PyObject *result = NULL;
    if (n_probe < 1 || n_probe > n_clusters || n_probe > 64 || k < 1 || n_weights < 1 || n_weights > INT32_MAX ||
        n_clusters > INT32_MAX)
        PyErr_SetString(PyExc_ValueError, "need 1 <= n_probe <= min(n_clusters, 64), k >= 1, a padding row and "
                                          "fewer than 2^31 nodes and clusters");
    else if (check(&x, n * d, 4, "x") && check(&coarse, n * n_clusters, 4, "coarse") &&
             check(&members, n_clusters * length, 8, "members") && check(&weights, n_weights * d, 4, "weights") &&
             check(&weights_sq, n_weights, 4, "weights_sq") && check(&out_sq, n * k, 4, "out_sq") &&
             check(&out_index, n * k, 8, "out_index")) {
        int failed;
        Py_BEGIN_ALLOW_THREADS
        failed = probe_all(x.buf, n, d, coarse.buf, n_clusters, n_probe, members.buf, length, weights.buf,
                           weights_sq.buf, n_weights - 1, k, out_sq.buf, out_index.buf, threads < 1 ? 1 : threads);
        Py_END_ALLOW_THREADS
        result = failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x), PyBuffer_Release(&coarse), PyBuffer_Release(&members), PyBuffer_Release(&weights);
    PyBuffer_Release(&weights_sq), PyBuffer_Release(&out_sq), PyBuffer_Release(&out_index);
    return result;
}

static int cpu_has_simd(void) {
#ifdef SOMAD_X86
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    (void)self;
    int want = PyObject_IsTrue(arg);
    if (want < 0) return NULL;
    use_simd = want && cpu_has_simd();
    return PyBool_FromLong(use_simd);
}

static PyMethodDef methods[] = {
    {"whitened_sq_norms", py_whitened_sq_norms, METH_VARARGS,
     "whitened_sq_norms(x, pair_vector, pointer, node_ids, table_rows, means, tril, out, n, d, n_pairs, n_nodes, "
     "n_means, n_tril, half, threads)"},
    {"probe_nearest", py_probe_nearest, METH_VARARGS,
     "probe_nearest(x, coarse, members, weights, weights_sq, out_sq, out_index, n, d, n_clusters, n_probe, length, "
     "n_weights, k, threads)"},
    {"set_simd", py_set_simd, METH_O, "set_simd(flag) -> bool: use the AVX2 bodies if flag and the CPU has them"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "somad._kernels", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    use_simd = cpu_has_simd();
    return PyModule_Create(&module);
}
