/* Native CPU kernels for the two hot loops of SOMAD scoring (see somad/kernels.py, the only caller).
 *
 * whitened_sq_norms: out[v, j] = ||L_i^{-1} (x[v] - mu_i)||^2 with i = nodes[v, j]; the pairs are grouped by node
 *     (a counting sort) so that each node's whitener is read once per call. Whiteners are float32 or float16,
 *     packed in strips of 16 rows (somad/node_stats.py, strip_layout): strip r0 holds columns
 *     0..min(r0 + 16, d) - 1 of rows r0..r0+15, 16 entries per column, zeros above the diagonal and past d.
 * probe_nearest: per query, the k nearest nodes among the members of its n_probe nearest clusters. Centres and
 *     members are held as panels: the vectors of a group side by side, dimension by dimension (d rows of
 *     `width` floats), so that 8 or 16 of them are compared with a query in vector registers.
 *
 * Each kernel has an AVX2/FMA/F16C body, chosen at run time when the CPU has those instructions, and a
 * portable C body. The caller validates shapes and dtypes; the kernels check buffer sizes, and
 * whitened_sq_norms the node range (in its counting sort).
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

#define WBLOCK 6 /* vectors processed together: each 16-float strip of a column is loaded once for six vectors */
#define TILE 16 /* rows of a strip (two 8-float registers per vector) */

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
static inline int64_t strip_columns(int64_t r0, int64_t d) { return r0 + TILE < d ? r0 + TILE : d; }

/* Entries per packed whitener: 16 per column of every strip. */
static int64_t packed_size(int64_t d) {
    int64_t size = 0;
    for (int64_t r0 = 0; r0 < d; r0 += TILE) size += TILE * strip_columns(r0, d);
    return size;
}

/* Squared norms of W y_j for `count` centred vectors y (rows of length d, `stride` apart) and one packed
 * whitener: per strip, z[0:16] = sum over its columns c of column c's 16 entries times y_j[c]. */
#define DEFINE_WHITEN_GENERIC(NAME, WTYPE, LOADW)                                                      \
    static void NAME(const WTYPE *t, const float *y, int64_t d, int64_t stride, int count, float *s) { \
        for (int j = 0; j < count; j++) {                                                              \
            const float *yj = y + j * stride;                                                          \
            const WTYPE *p = t;                                                                        \
            float sum = 0.f;                                                                           \
            for (int64_t r0 = 0; r0 < d; r0 += TILE) {                                                 \
                float z[TILE] = {0.f};                                                                 \
                for (int64_t c = 0; c < strip_columns(r0, d); c++, p += TILE)                          \
                    for (int l = 0; l < TILE; l++) z[l] += LOADW(p[l]) * yj[c];                        \
                for (int l = 0; l < TILE; l++) sum += z[l] * z[l];                                     \
            }                                                                                          \
            s[j] = sum;                                                                                \
        }                                                                                              \
    }
#define LOAD_F32(v) (v)
#define LOAD_F16(v) half_to_float(v)
DEFINE_WHITEN_GENERIC(whiten_generic_f32, float, LOAD_F32)
DEFINE_WHITEN_GENERIC(whiten_generic_f16, uint16_t, LOAD_F16)

/* out[j * width + l] = sum_c panel[c * width + l] * q[j][c] for the nv vectors q[j]. */
static void panel_dots_generic(const float *panel, int64_t width, int64_t d, const float *const *q, int nv, float *out) {
    for (int j = 0; j < nv; j++) {
        float *o = out + j * width;
        for (int64_t l = 0; l < width; l++) o[l] = 0.f;
        for (int64_t c = 0; c < d; c++) {
            const float v = q[j][c], *row = panel + c * width;
            for (int64_t l = 0; l < width; l++) o[l] += row[l] * v;
        }
    }
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

SIMD static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
SIMD static inline __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* (a0, a1)[set + j] += (w0, w1) * v_j[col] for the nv vectors v_j = VECTOR(j) (only a0 when halves is 1):
 * the independent accumulators hide the FMA latency. */
#define STRIP_FMA_SET(nv, halves, col, set)                                          \
    _Pragma("GCC unroll 6") for (int j = 0; j < (nv); j++) {                         \
        __m256 b = _mm256_broadcast_ss(VECTOR(j) + (col));                           \
        a0[(set) + j] = _mm256_fmadd_ps(w0, b, a0[(set) + j]);                       \
        if ((halves) == 2) a1[(set) + j] = _mm256_fmadd_ps(w1, b, a1[(set) + j]);    \
    }
#define STRIP_FMA(nv, halves, col) STRIP_FMA_SET(nv, halves, col, 0)

#define VECTOR(j) (y + (j) * stride)
#define PREFETCH_BYTES 4096 /* how far ahead of the columns being read the memory is requested */

/* Squared norms of W y_j for nv <= WBLOCK centred vectors and one packed whitener. Strip r0 accumulates, over
 * its columns, the column's 16 entries times y_j[c] for every vector, so no horizontal sums are needed until
 * the strip is squared. The whitener is one sequential stream; `next`, if not NULL, is the whitener processed
 * next: the lines PREFETCH_BYTES ahead are requested every four columns, running on into `next` (the hardware
 * prefetcher stops at each 4 KB page). Always inlined with a constant nv, so the accumulators stay in registers. */
#define DEFINE_WHITEN_SIMD(NAME, WTYPE, LOAD8)                                                                        \
    SIMD static inline __attribute__((always_inline)) void NAME##_nv(const WTYPE *t, const float *y, int64_t d,        \
                                                                    int64_t stride, float *s, const WTYPE *next,     \
                                                                    const int nv) {                                   \
        const int64_t size = packed_size(d), ahead = PREFETCH_BYTES / (int64_t)sizeof(WTYPE);                          \
        const int64_t line = 64 / (int64_t)sizeof(WTYPE);                                                            \
        int64_t read = 0; /* entries read so far */                                                                  \
        for (int j = 0; j < nv; j++) s[j] = 0.f;                                                                      \
        for (int64_t r0 = 0; r0 < d; r0 += TILE) {                                                                    \
            const int64_t cols = strip_columns(r0, d);                                                                \
            __m256 a0[WBLOCK], a1[WBLOCK];                                                                            \
            for (int j = 0; j < WBLOCK; j++) a0[j] = a1[j] = _mm256_setzero_ps();                                     \
            int64_t c = 0;                                                                                            \
            for (; c + 4 <= cols; c += 4, t += 4 * TILE, read += 4 * TILE) {                                          \
                if (next) {                                                                                           \
                    const WTYPE *q = read + ahead < size ? t + ahead : next + (read + ahead - size);                  \
                    for (int64_t o = 0; o < 4 * TILE; o += line) _mm_prefetch((const char *)(q + o), _MM_HINT_T0);   \
                }                                                                                                     \
                _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {                                                 \
                    __m256 w0 = LOAD8(t + u * TILE), w1 = LOAD8(t + u * TILE + 8);                                    \
                    const int64_t cu = c + u;                                                                         \
                    /* up to 3 vectors: odd columns use a second set of accumulators (more chains in flight) */      \
                    STRIP_FMA_SET(nv, 2, cu, nv <= WBLOCK / 2 && (u & 1) ? WBLOCK / 2 : 0)                            \
                }                                                                                                     \
            }                                                                                                         \
            for (; c < cols; c++, t += TILE, read += TILE) {                                                          \
                __m256 w0 = LOAD8(t), w1 = LOAD8(t + 8);                                                              \
                STRIP_FMA(nv, 2, c)                                                                                   \
            }                                                                                                         \
            for (int j = 0; j < nv; j++) {                                                                            \
                if (nv <= WBLOCK / 2)                                                                                 \
                    a0[j] = _mm256_add_ps(a0[j], a0[j + WBLOCK / 2]), a1[j] = _mm256_add_ps(a1[j], a1[j + WBLOCK / 2]); \
                __m256 q = _mm256_fmadd_ps(a0[j], a0[j], _mm256_mul_ps(a1[j], a1[j]));                                \
                __m128 v = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));                        \
                v = _mm_hadd_ps(v, v);                                                                                \
                s[j] += _mm_cvtss_f32(_mm_hadd_ps(v, v));                                                             \
            }                                                                                                         \
        }                                                                                                             \
    }                                                                                                                 \
    SIMD static void NAME(const WTYPE *t, const float *y, int64_t d, int64_t stride, int nv, float *s,                \
                          const WTYPE *next) {                                                                        \
        switch (nv) { /* one specialised body per block size */                                                      \
        case 1: NAME##_nv(t, y, d, stride, s, next, 1); break;                                                        \
        case 2: NAME##_nv(t, y, d, stride, s, next, 2); break;                                                        \
        case 3: NAME##_nv(t, y, d, stride, s, next, 3); break;                                                        \
        case 4: NAME##_nv(t, y, d, stride, s, next, 4); break;                                                        \
        case 5: NAME##_nv(t, y, d, stride, s, next, 5); break;                                                        \
        default: NAME##_nv(t, y, d, stride, s, next, WBLOCK); break;                                                  \
        }                                                                                                             \
    }
DEFINE_WHITEN_SIMD(whiten_simd_f32, float, load8_f32)
DEFINE_WHITEN_SIMD(whiten_simd_f16, uint16_t, load8_f16)
#undef VECTOR

/* panel_dots_generic with strips of 16 lanes (and a last one of 8): per dimension c, one or two loads of
 * the panel and nv broadcasts of y_j[c] feed up to 2 x nv FMAs. */
#define VECTOR(j) (q[j])
SIMD static inline __attribute__((always_inline)) void panel_strip_nv(const float *panel, int64_t width, int64_t d,
                                                                      const float *const *q, float *out, const int nv,
                                                                      const int halves) {
    __m256 a0[WBLOCK], a1[WBLOCK];
    for (int j = 0; j < WBLOCK; j++) a0[j] = a1[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c++) {
        const float *row = panel + c * width;
        __m256 w0 = _mm256_loadu_ps(row), w1 = halves == 2 ? _mm256_loadu_ps(row + 8) : w0;
        STRIP_FMA(nv, halves, c)
    }
    for (int j = 0; j < nv; j++) {
        _mm256_storeu_ps(out + j * width, a0[j]);
        if (halves == 2) _mm256_storeu_ps(out + j * width + 8, a1[j]);
    }
}
#define PANEL_CASE(n)                                                                                    \
    case n:                                                                                              \
        if (halves == 2) panel_strip_nv(panel + l, width, d, q, out + l, n, 2);                          \
        else panel_strip_nv(panel + l, width, d, q, out + l, n, 1);                                      \
        break;
SIMD static void panel_dots_simd(const float *panel, int64_t width, int64_t d, const float *const *q, int nv,
                                 float *out) { /* width is a multiple of 8 */
    for (int64_t l = 0; l < width; l += TILE) {
        const int halves = width - l >= TILE ? 2 : 1;
        switch (nv) { /* one specialised body per block size */
            PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) default: PANEL_CASE(WBLOCK)
        }
    }
}
#undef VECTOR

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
#define PANEL_DOTS(panel, width, d, q, nv, out) \
    (use_simd ? panel_dots_simd(panel, width, d, q, nv, out) : panel_dots_generic(panel, width, d, q, nv, out))
#else
#define PANEL_DOTS panel_dots_generic
#define INSERT_ALL insert_all_generic
#endif

/* --------------------------------------------------------------------------------- the loops */

/* The pairs (v, j) of each node, by counting sort: order[pointer[a]:pointer[a + 1]] are the pairs of node
 * used[a], in increasing pair order. Returns -1 if a node id is out of [0, n_means), 1 if out of memory. */
static int group_by_node(const int64_t *nodes, int64_t n_pairs, int64_t n_means, int64_t **order, int64_t **pointer,
                         int64_t **used, int64_t *n_used) {
    int64_t *count = (int64_t *)calloc((size_t)n_means + 1, sizeof(int64_t));
    *order = (int64_t *)malloc((size_t)(n_pairs > 0 ? n_pairs : 1) * sizeof(int64_t));
    *pointer = *used = NULL;
    if (!count || !*order) return free(count), 1;
    for (int64_t p = 0; p < n_pairs; p++) {
        if (nodes[p] < 0 || nodes[p] >= n_means) return free(count), -1;
        count[nodes[p] + 1]++;
    }
    int64_t a = 0;
    for (int64_t i = 0; i < n_means; i++) a += count[i + 1] > 0;
    *pointer = (int64_t *)malloc((size_t)(a + 1) * sizeof(int64_t));
    *used = (int64_t *)malloc((size_t)(a > 0 ? a : 1) * sizeof(int64_t));
    if (!*pointer || !*used) return free(count), 1;
    *n_used = a;
    a = 0;
    (*pointer)[0] = 0;
    for (int64_t i = 0; i < n_means; i++) {
        if (count[i + 1] > 0) (*used)[a] = i, (*pointer)[a + 1] = (*pointer)[a] + count[i + 1], a++;
        count[i + 1] += count[i]; /* now count[i] is where node i's pairs start */
    }
    for (int64_t p = 0; p < n_pairs; p++) (*order)[count[nodes[p]]++] = p;
    free(count);
    return 0;
}

static int whiten_all(const float *x, const int64_t *nodes, int64_t n_pairs, int64_t k, const float *means,
                      int64_t n_means, const void *packed, int half, int64_t d, float *out, int threads) {
    const int64_t size = packed_size(d);
    int64_t *order, *pointer, *used, n_used = 0;
    int failed = group_by_node(nodes, n_pairs, n_means, &order, &pointer, &used, &n_used);
    if (failed) {
        free(order), free(pointer), free(used);
        return failed;
    }
#pragma omp parallel num_threads(threads)
    {
        float *y = (float *)malloc((size_t)(WBLOCK * d) * sizeof(float));
        if (!y) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 8)
        for (int64_t a = 0; a < n_used; a++) {
            if (!y) continue;
            const float *mu = means + used[a] * d;
            const size_t offset = (size_t)(used[a] * size), next_offset = a + 1 < n_used ? (size_t)(used[a + 1] * size) : 0;
            /* blocks of at most WBLOCK vectors, of nearly equal size: 7 pairs go as 4 + 3, not 6 + 1 (a block of
             * one vector keeps only two FMA chains busy) */
            const int64_t total = pointer[a + 1] - pointer[a], blocks = (total + WBLOCK - 1) / WBLOCK;
            for (int64_t b = 0, first = pointer[a], count; b < blocks; b++, first += count) {
                count = total / blocks + (b < total % blocks);
                for (int j = 0; j < count; j++) {
                    const float *xv = x + (order[first + j] / k) * d; /* pair p = v * k + j belongs to vector v */
                    float *yj = y + j * d;
                    for (int64_t c = 0; c < d; c++) yj[c] = xv[c] - mu[c]; /* centre first: no cancellation */
                }
                float s[WBLOCK];
                int prefetch = first == pointer[a] && a + 1 < n_used;
#ifdef SOMAD_X86
                if (use_simd && half) {
                    const uint16_t *t = (const uint16_t *)packed;
                    whiten_simd_f16(t + offset, y, d, d, (int)count, s, prefetch ? t + next_offset : NULL);
                } else if (use_simd) {
                    const float *t = (const float *)packed;
                    whiten_simd_f32(t + offset, y, d, d, (int)count, s, prefetch ? t + next_offset : NULL);
                } else
#endif
                if (half)
                    whiten_generic_f16((const uint16_t *)packed + offset, y, d, d, (int)count, s);
                else
                    whiten_generic_f32((const float *)packed + offset, y, d, d, (int)count, s);
                (void)prefetch;
                (void)next_offset;
                for (int j = 0; j < count; j++) out[order[first + j]] = s[j];
            }
        }
        free(y);
    }
    free(order), free(pointer), free(used);
    return failed;
}

/* k nearest nodes per query among the members of its n_probe nearest clusters, in three passes:
 * 1. per block of queries, their projections on dc principal axes (given as `xc`, n x dc; else computed as
 *    x A^T + shift with the panel `axes`, d x a_width; or, with neither, x itself), then the distances from
 *    those to every cluster centre (one panel), kept as each query's n_probe nearest (insertion into a sorted
 *    list: n_probe is small);
 * 2. per cluster, the distances from its members (its panel) to every query that probes it, in blocks of
 *    queries: the panel stays in L1 while the queries stream past;
 * 3. per query, the k smallest of its candidates.
 * Distances are ||w||^2 - 2 x.w until the end, where ||x||^2 is added. Lanes past a group's size have
 * ||w||^2 = inf and are never candidates. Each (query, probe) pair holds its cluster's own panel width of
 * candidates: clusters can be very unequal, and padding to the largest would multiply the memory. */
static int probe_all(const float *x, int64_t n, int64_t d, const float *xc, const float *axes, const float *shift,
                     int64_t a_width, int64_t dc, const float *centres, const float *centre_sq, int64_t c_width,
                     int64_t n_probe, const float *panels, const int64_t *lane_start, int64_t n_clusters,
                     const int64_t *lane_ids, const float *lane_sq, int64_t pad, int64_t k, float *out_sq,
                     int64_t *out_index, int threads) {
    const int64_t pairs = n * n_probe;
    int64_t *probe_id = (int64_t *)malloc((size_t)(pairs > 0 ? pairs : 1) * sizeof(int64_t));
    int64_t *offset = (int64_t *)malloc((size_t)(pairs + 1) * sizeof(int64_t)); /* of each pair's candidates */
    int64_t *start = (int64_t *)calloc((size_t)(n_clusters + 1), sizeof(int64_t));
    int64_t *fill = (int64_t *)malloc((size_t)(n_clusters + 1) * sizeof(int64_t));
    int64_t *by_cluster = (int64_t *)malloc((size_t)(pairs > 0 ? pairs : 1) * sizeof(int64_t));
    float *cand = NULL;
    int failed = !probe_id || !offset || !start || !fill || !by_cluster;
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            float *dots = (float *)malloc((size_t)(WBLOCK * c_width) * sizeof(float));
            float *projected = (float *)malloc((size_t)(WBLOCK * (a_width > 0 ? a_width : 1)) * sizeof(float));
            if (!dots || !projected) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t first = 0; first < n; first += WBLOCK) { /* pass 1 */
                if (!dots || !projected) continue;
                int count = (int)(n - first < WBLOCK ? n - first : WBLOCK);
                const float *q[WBLOCK];
                for (int j = 0; j < count; j++) q[j] = xc ? xc + (first + j) * dc : x + (first + j) * d;
                if (!xc && a_width > 0) { /* the block's projections, then compare those */
                    PANEL_DOTS(axes, a_width, d, q, count, projected);
                    for (int j = 0; j < count; j++) {
                        for (int64_t l = 0; l < dc; l++) projected[j * a_width + l] += shift[l];
                        q[j] = projected + j * a_width;
                    }
                }
                PANEL_DOTS(centres, c_width, dc, q, count, dots);
                for (int j = 0; j < count; j++) {
                    float value[64], *v = dots + j * c_width; /* n_probe <= 64, checked by the caller */
                    int64_t *ids = probe_id + (first + j) * n_probe;
                    for (int64_t l = 0; l < c_width; l++) v[l] = centre_sq[l] - 2.f * v[l];
                    for (int64_t p = 0; p < n_probe; p++) value[p] = INFINITY, ids[p] = 0;
                    INSERT_ALL(value, ids, n_probe, v, c_width, NULL, 0);
                }
            }
            free(dots), free(projected);
        }
    }
    if (!failed) {
        offset[0] = 0;
        for (int64_t e = 0; e < pairs; e++) offset[e + 1] = offset[e] + lane_start[probe_id[e] + 1] - lane_start[probe_id[e]];
        cand = (float *)malloc((size_t)(offset[pairs] > 0 ? offset[pairs] : 1) * sizeof(float));
        failed = !cand;
    }
    if (!failed) {
        /* the (query, probe) pairs of each cluster, by counting sort */
        for (int64_t e = 0; e < pairs; e++) start[probe_id[e] + 1]++;
        for (int64_t c = 0; c < n_clusters; c++) start[c + 1] += start[c];
        memcpy(fill, start, (size_t)(n_clusters + 1) * sizeof(int64_t));
        for (int64_t e = 0; e < pairs; e++) by_cluster[fill[probe_id[e]]++] = e;
#pragma omp parallel num_threads(threads)
        {
            int64_t max_width = 8;
            for (int64_t c = 0; c < n_clusters; c++)
                if (lane_start[c + 1] - lane_start[c] > max_width) max_width = lane_start[c + 1] - lane_start[c];
            float *dots = (float *)malloc((size_t)(WBLOCK * max_width) * sizeof(float));
            if (!dots) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t c = 0; c < n_clusters; c++) { /* pass 2 */
                if (!dots) continue;
                const int64_t width = lane_start[c + 1] - lane_start[c];
                const float *panel = panels + lane_start[c] * d, *sq = lane_sq + lane_start[c];
                for (int64_t first = start[c]; first < start[c + 1]; first += WBLOCK) {
                    int count = (int)(start[c + 1] - first < WBLOCK ? start[c + 1] - first : WBLOCK);
                    const float *q[WBLOCK];
                    for (int j = 0; j < count; j++) q[j] = x + (by_cluster[first + j] / n_probe) * d;
                    PANEL_DOTS(panel, width, d, q, count, dots);
                    for (int j = 0; j < count; j++) {
                        float *to = cand + offset[by_cluster[first + j]];
                        for (int64_t l = 0; l < width; l++) to[l] = sq[l] - 2.f * dots[j * width + l];
                    }
                }
            }
            free(dots);
        }
    }
    if (!failed) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < n; i++) { /* pass 3 */
            float *best = out_sq + i * k;
            int64_t *best_id = out_index + i * k;
            for (int64_t j = 0; j < k; j++) best[j] = INFINITY, best_id[j] = pad;
            for (int64_t e = i * n_probe; e < (i + 1) * n_probe; e++)
                INSERT_ALL(best, best_id, k, cand + offset[e], offset[e + 1] - offset[e], lane_ids + lane_start[probe_id[e]], 0);
            const float *xi = x + i * d;
            float part[8] = {0.f}, norm = 0.f; /* eight partial sums: no chain of d dependent additions */
            int64_t c = 0;
            for (; c + 8 <= d; c += 8)
                for (int l = 0; l < 8; l++) part[l] += xi[c + l] * xi[c + l];
            for (; c < d; c++) part[0] += xi[c] * xi[c];
            for (int l = 0; l < 8; l++) norm += part[l];
            for (int64_t j = 0; j < k; j++) best[j] = fmaxf(best[j] + norm, 0.f); /* add ||x||^2; rounding can go below 0 */
        }
    }
    free(probe_id), free(offset), free(start), free(fill), free(by_cluster), free(cand);
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
    Py_buffer x, nodes, means, packed, out;
    Py_ssize_t n, d, k, n_means;
    int half, threads;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*nnnnpi", &x, &nodes, &means, &packed, &out, &n, &d, &k, &n_means, &half,
                          &threads))
        return NULL;
    PyObject *result = NULL;
    if (k < 1)
        PyErr_SetString(PyExc_ValueError, "need k >= 1");
    else if (check(&x, n * d, 4, "x") && check(&nodes, n * k, 8, "nodes") && check(&means, n_means * d, 4, "means") &&
             check(&packed, n_means * packed_size(d), half ? 2 : 4, "packed") && check(&out, n * k, 4, "out")) {
        int failed;
        Py_BEGIN_ALLOW_THREADS
        failed = whiten_all(x.buf, nodes.buf, n * k, k, means.buf, n_means, packed.buf, half, d, out.buf,
                            threads < 1 ? 1 : threads);
        Py_END_ALLOW_THREADS
        if (failed < 0)
            PyErr_Format(PyExc_ValueError, "node indices must be in [0, %zd)", n_means);
        else
            result = failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x), PyBuffer_Release(&nodes), PyBuffer_Release(&means), PyBuffer_Release(&packed);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_probe_nearest(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x, xc, axes, shift, centres, centre_sq, panels, lane_start, lane_ids, lane_sq, out_sq, out_index;
    Py_ssize_t n, d, a_width, dc, c_width, n_probe, n_clusters, n_lanes, pad, k;
    int threads, given;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*y*y*w*w*nnnnnnnnnnpi", &x, &xc, &axes, &shift, &centres, &centre_sq,
                          &panels, &lane_start, &lane_ids, &lane_sq, &out_sq, &out_index, &n, &d, &a_width, &dc,
                          &c_width, &n_probe, &n_clusters, &n_lanes, &pad, &k, &given, &threads))
        return NULL;
    PyObject *result = NULL;
    if (n_probe < 1 || n_probe > n_clusters || n_probe > 64 || k < 1 || c_width < n_clusters || c_width % 8 ||
        pad > INT32_MAX || n_clusters > INT32_MAX || a_width % 8 || (!given && (a_width ? dc > a_width : dc != d)))
        PyErr_SetString(PyExc_ValueError, "need 1 <= n_probe <= min(n_clusters, 64), k >= 1, panel widths that are "
                                          "multiples of 8, dc <= the axes' width (or dc = d without axes or xc) and "
                                          "fewer than 2^31 nodes and clusters");
    else if (check(&x, n * d, 4, "x") && check(&xc, given ? n * dc : 0, 4, "xc") &&
             check(&axes, d * a_width, 4, "axes") && check(&shift, a_width, 4, "shift") &&
             check(&centres, dc * c_width, 4, "centres") &&
             check(&centre_sq, c_width, 4, "centre_sq") && check(&panels, d * n_lanes, 4, "panels") &&
             check(&lane_start, n_clusters + 1, 8, "lane_start") && check(&lane_ids, n_lanes, 8, "lane_ids") &&
             check(&lane_sq, n_lanes, 4, "lane_sq") && check(&out_sq, n * k, 4, "out_sq") &&
             check(&out_index, n * k, 8, "out_index")) {
        const int64_t *ls = lane_start.buf;
        int ok = ls[0] == 0 && ls[n_clusters] == n_lanes;
        for (Py_ssize_t c = 0; ok && c < n_clusters; c++) ok = ls[c + 1] > ls[c] && (ls[c + 1] - ls[c]) % 8 == 0;
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "lane_start must rise from 0 to the lane count in steps that are multiples of 8");
        } else {
            int failed;
            Py_BEGIN_ALLOW_THREADS
            failed = probe_all(x.buf, n, d, given ? xc.buf : NULL, axes.buf, shift.buf, a_width, dc, centres.buf,
                               centre_sq.buf, c_width, n_probe, panels.buf, ls, n_clusters, lane_ids.buf, lane_sq.buf,
                               pad, k, out_sq.buf, out_index.buf, threads < 1 ? 1 : threads);
            Py_END_ALLOW_THREADS
            result = failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&x), PyBuffer_Release(&xc), PyBuffer_Release(&axes), PyBuffer_Release(&shift);
    PyBuffer_Release(&centres);
    PyBuffer_Release(&centre_sq), PyBuffer_Release(&panels);
    PyBuffer_Release(&lane_start), PyBuffer_Release(&lane_ids), PyBuffer_Release(&lane_sq);
    PyBuffer_Release(&out_sq), PyBuffer_Release(&out_index);
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
     "whitened_sq_norms(x, nodes, means, packed, out, n, d, k, n_means, half, threads)"},
    {"probe_nearest", py_probe_nearest, METH_VARARGS,
     "probe_nearest(x, xc, axes, shift, centres, centre_sq, panels, lane_start, lane_ids, lane_sq, out_sq, out_index, n, "
     "d, a_width, dc, c_width, n_probe, n_clusters, n_lanes, pad, k, xc_given, threads)"},
    {"set_simd", py_set_simd, METH_O, "set_simd(flag) -> bool: use the AVX2 bodies if flag and the CPU has them"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "somad._kernels", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    use_simd = cpu_has_simd();
    return PyModule_Create(&module);
}
