/* One-row fp32 products for decoding on x86 CPUs with AVX2 and FMA (see gemv.py).

   g2t_blocks(...): every block of a GPT-2 for one token (norms, products, attention over the KV
     cache, GELU, residuals) in one call, and the final norm.
   g2t_gemv(kind, w, x, y, scratch, M, K, N, b, threads), for M = 1 to 8 rows (each row gets the
   numbers it would get alone):
     kind 0: y[N] = x[K] @ W[K, N] + b   (GPT-2's Conv1D layout: each thread streams a contiguous
             block of rows; the two halves of K are summed at the end, so the numbers are the same
             for every thread count)
     kind 1: y[N] = W[N, K] . x[K] + b   (nn.Linear layout, the LM head: rows split among threads)
   scratch: N floats (kind 0). b may be NULL. Returns the thread count used.
   g2t_top1(...): the argmax of W[N, K] . x for greedy decoding, reading W's int8 copy and
     recomputing from W only the rows that can be the largest.

   The calling thread does the first task; `threads - 1` worker threads (started on first use,
   again in a forked child) do the others. Workers spin for a short while after a task, since the
   next product comes within microseconds while decoding, then sleep on a condition variable. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#define MAXT 64

enum { AXPY = 0, DOT = 1, ATTN = 2, DOTQ = 3, PICK = 4 };

typedef struct {
    int kind;
    const float *w, *x; /* ATTN: x is qkv [3D] */
    float *y, *scratch; /* ATTN: y is the output [D] */
    long K, N;          /* ATTN: K = head size, N = heads */
    int threads;
    const float *kc, *vc; /* ATTN: one layer's key and value cache [heads, max_len, head size] */
    long t1, max_len;     /* ATTN: keys to attend (the new one included) */
    long M;               /* AXPY, DOT: rows of x (x [M, K], y and scratch [M, N]); 0 means 1 */
    /* DOTQ, PICK (g2t_top1; w: the fp32 rows, x: fp32, K: padded, Kx: x's own length) */
    const int8_t *wq;        /* the packed int8 copy [N, K] */
    const int16_t *xq;       /* x as int16 [K] */
    const float *scale;      /* the rows' scales */
    const float *err, *gq;   /* the bound per row: err ||x|| + gq ||x - sx xq|| */
    double *acc;             /* the approximate products [N] */
    double sx, xn, dxn, lb;  /* x's scale, ||x||, ||x - sx xq||, the best lower bound (PICK) */
    double *lbs;             /* DOTQ: each thread's best lower bound */
    const uint8_t *skip;     /* rows never to pick (NULL: none) */
    long *counts, Kx;        /* PICK: rows each thread recomputed */
} job_t;

static job_t job;
static atomic_long posted, done;
static atomic_int sleeping;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER, call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int workers;
static long spin_ns = 1000000;
static long start_seen[MAXT];

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for 8 floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* out[n0:n1] = x[k0:k1] @ W[k0:k1, n0:n1]; W has N columns (8 rows per pass) */
static void axpy_rows(const float *w, const float *x, float *out, long k0, long k1, long n0, long n1, long N) {
    if (k0 >= k1) {
        memset(out + n0, 0, (size_t)(n1 - n0) * sizeof(float));
        return;
    }
    int first = 1;
    long k = k0;
    for (; k + 8 <= k1; k += 8, first = 0) {
        const float *w0 = w + k * N;
        __m256 xs[8];
        for (int i = 0; i < 8; i++) xs[i] = _mm256_set1_ps(x[k + i]);
        long n = n0;
        for (; n + 8 <= n1; n += 8) {
            __m256 o = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + n);
            for (int i = 0; i < 8; i++) o = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i * N + n), xs[i], o);
            _mm256_storeu_ps(out + n, o);
        }
        for (; n < n1; n++) {
            float o = first ? 0.f : out[n];
            for (int i = 0; i < 8; i++) o = fmaf(w0[i * N + n], x[k + i], o);
            out[n] = o;
        }
    }
    for (; k < k1; k++, first = 0) {
        const float *w0 = w + k * N;
        for (long n = n0; n < n1; n++) out[n] = fmaf(w0[n], x[k], first ? 0.f : out[n]);
    }
}

/* a . b over n floats: 8 lanes, their sum, then the tail */
static inline float dot(const float *a, const float *b, long n) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s = fmaf(a[i], b[i], s);
    return s;
}

/* y[n0:n1] = W[n0:n1, :K] . x */
static void dot_rows(const float *w, const float *x, float *y, long n0, long n1, long K) {
    long n = n0;
    for (; n + 4 <= n1; n += 4) {
        const float *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        long k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (; k < K; k++) {
            s0 = fmaf(w0[k], x[k], s0);
            s1 = fmaf(w1[k], x[k], s1);
            s2 = fmaf(w2[k], x[k], s2);
            s3 = fmaf(w3[k], x[k], s3);
        }
        y[n] = s0, y[n + 1] = s1, y[n + 2] = s2, y[n + 3] = s3;
    }
    for (; n < n1; n++) y[n] = dot(w + n * K, x, K);
}

/* Products with an int8 copy of W and x as int16, for g2t_top1: acc[n0:n1] = (Wq[n] . xq) scale[n] sx,
   the sums exact (16-bit products summed in int32 lanes, whose range the caller keeps, then in
   int64). Wq is packed to be read as one sequential stream: rows padded to Kp (a multiple of 16),
   in groups of 4 (the last group: what is left) interleaved by 16 numbers. n0 a multiple of 4. */
static inline __m256i dotq_acc(const int8_t *w, __m256i xv, __m256i a) {
    return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)), xv));
}

static inline long hsum_i32(__m256i v) {
    int32_t o[8];
    _mm256_storeu_si256((__m256i *)o, v);
    long s = 0;
    for (int i = 0; i < 8; i++) s += o[i];
    return s;
}

static void dotq_rows(const int8_t *w, const int16_t *x, double *acc, const float *scale, double sx, long n0, long n1,
                      long N, long Kp) {
    long n = n0;
    for (; n + 4 <= n1; n += 4) {
        const int8_t *g = w + n * Kp;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (long k = 0; k < Kp; k += 16, g += 64) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
            a0 = dotq_acc(g, xv, a0);
            a1 = dotq_acc(g + 16, xv, a1);
            a2 = dotq_acc(g + 32, xv, a2);
            a3 = dotq_acc(g + 48, xv, a3);
        }
        acc[n] = (double)hsum_i32(a0) * scale[n] * sx, acc[n + 1] = (double)hsum_i32(a1) * scale[n + 1] * sx;
        acc[n + 2] = (double)hsum_i32(a2) * scale[n + 2] * sx, acc[n + 3] = (double)hsum_i32(a3) * scale[n + 3] * sx;
    }
    long rest = N - n;
    for (long j = 0; n + j < n1; j++) {
        __m256i a = _mm256_setzero_si256();
        const int8_t *g = w + n * Kp + j * 16;
        for (long k = 0; k < Kp; k += 16, g += 16 * rest) a = dotq_acc(g, _mm256_loadu_si256((const __m256i *)(x + k)), a);
        acc[n + j] = (double)hsum_i32(a) * scale[n + j] * sx;
    }
}

/* (row, head) pairs [p0, p1) (p = row * heads + head) of M query rows over t1 cached keys and values
   each (GPT-2: scaled by 1/sqrt(head size)); x: qkv [M, 3D], y: [M, D], caches [M, heads, max_len, hd] */
static void attn_heads(const job_t *j, long p0, long p1) {
    long hd = j->K, t1 = j->t1, H = j->N, D = H * hd;
    float scale = 1.0f / sqrtf((float)hd), s[t1];
    for (long p = p0; p < p1; p++) {
        long b = p / H, h = p % H;
        const float *q = j->x + b * 3 * D + h * hd, *kh = j->kc + (b * H + h) * j->max_len * hd,
                    *vh = j->vc + (b * H + h) * j->max_len * hd;
        float m = -INFINITY;
        for (long t = 0; t < t1; t++) {
            s[t] = dot(q, kh + t * hd, hd) * scale;
            m = s[t] > m ? s[t] : m;
        }
        float sum = 0.f;
        long t = 0;
        for (; t + 8 <= t1; t += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(m)));
            _mm256_storeu_ps(s + t, e);
            sum += hsum(e);
        }
        for (; t < t1; t++) sum += (s[t] = expf(s[t] - m));
        float inv = 1.0f / sum, *o = j->y + b * D + h * hd;
        long d = 0;
        for (; d + 8 <= hd; d += 8) {
            __m256 a = _mm256_setzero_ps();
            for (long t = 0; t < t1; t++) a = _mm256_fmadd_ps(_mm256_set1_ps(s[t]), _mm256_loadu_ps(vh + t * hd + d), a);
            _mm256_storeu_ps(o + d, _mm256_mul_ps(a, _mm256_set1_ps(inv)));
        }
        for (; d < hd; d++) {
            float a = 0.f;
            for (long t = 0; t < t1; t++) a = fmaf(s[t], vh[t * hd + d], a);
            o[d] = a * inv;
        }
    }
}

/* R rows (1 to 4) x V (1 to 3) vectors of 8 columns from column n: out[m][n:n + 8V] (+)= x[m][k0:k1] @
   W[k0:k1, n:n + 8V], the sums in registers over the k range (12 of the 16 AVX registers): one FMA per (k, row, column) in order of k, the
   operations of `axpy_rows` on each row alone. `first`: start from zero instead of out. */
static inline __attribute__((always_inline)) void axpy_tile(const float *w, const float *x, float *out, int R, int V,
                                                            long K, long k0, long k1, long n, long N, int first) {
    __m256 a[4][3];
    for (int m = 0; m < R; m++)
        for (int v = 0; v < V; v++) a[m][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + m * N + n + 8 * v);
    const float *wk = w + k0 * N + n, *xk = x + k0;
    for (long k = k0; k < k1; k++, wk += N, xk++) {
        __m256 w0 = _mm256_loadu_ps(wk), w1 = V > 1 ? _mm256_loadu_ps(wk + 8) : w0,
               w2 = V > 2 ? _mm256_loadu_ps(wk + 16) : w0;
        for (int m = 0; m < R; m++) {
            __m256 xb = _mm256_broadcast_ss(xk + m * K);
            a[m][0] = _mm256_fmadd_ps(w0, xb, a[m][0]);
            if (V > 1) a[m][1] = _mm256_fmadd_ps(w1, xb, a[m][1]);
            if (V > 2) a[m][2] = _mm256_fmadd_ps(w2, xb, a[m][2]);
        }
    }
    for (int m = 0; m < R; m++)
        for (int v = 0; v < V; v++) _mm256_storeu_ps(out + m * N + n + 8 * v, a[m][v]);
}

#define TILE(R, V) axpy_tile(w, x, out, R, V, K, k0, k1, n, N, first)

/* rows of up to 4 at once (R = 1 to 4; constants after inlining) */
static void axpy_group(const float *w, const float *x, float *out, int R, long K, long k0, long k1, long n0, long n1,
                       long N, int first) {
    long n = n0;
    switch (R) {
    case 4: for (; n + 24 <= n1; n += 24) TILE(4, 3); for (; n + 16 <= n1; n += 16) TILE(4, 2); for (; n + 8 <= n1; n += 8) TILE(4, 1); break;
    case 3: for (; n + 24 <= n1; n += 24) TILE(3, 3); for (; n + 16 <= n1; n += 16) TILE(3, 2); for (; n + 8 <= n1; n += 8) TILE(3, 1); break;
    case 2: for (; n + 24 <= n1; n += 24) TILE(2, 3); for (; n + 16 <= n1; n += 16) TILE(2, 2); for (; n + 8 <= n1; n += 8) TILE(2, 1); break;
    default: for (; n + 24 <= n1; n += 24) TILE(1, 3); for (; n + 16 <= n1; n += 16) TILE(1, 2); for (; n + 8 <= n1; n += 8) TILE(1, 1); break;
    }
    for (; n < n1; n++)
        for (int m = 0; m < R; m++) {
            float o = first ? 0.f : out[m * N + n];
            for (long k = k0; k < k1; k++) o = fmaf(w[k * N + n], x[m * K + k], o);
            out[m * N + n] = o;
        }
}

#define KC 16 /* rows of W per pass: the groups of rows after the first read them from L1 */

/* M rows: out[m][n0:n1] = x[m][k0:k1] @ W[k0:k1, n0:n1] (x rows of K, out rows of N). Each row gets
   exactly the operations of `axpy_rows` on it alone (one FMA chain per column in order of k): the
   same numbers in any batch. Several rows are register-tiled: 4 rows x 24 columns of sums stay in
   registers over KC rows of W (3 loads and 4 broadcasts per 12 FMAs); GPT-2 124M's blocks at 8
   rows: 40 -> 21-23 ms per step on the 2-core EPYC (the layout of `axpy_rows`, 4 rows of W per pass
   and the sums through memory, was bound by loads and stores). */
static void axpy_rows_m(const float *w, const float *x, float *out, long M, long K, long k0, long k1, long n0,
                        long n1, long N) {
    if (M == 1) {
        axpy_rows(w, x, out, k0, k1, n0, n1, N);
        return;
    }
    if (k0 >= k1) {
        for (long m = 0; m < M; m++) memset(out + m * N + n0, 0, (size_t)(n1 - n0) * sizeof(float));
        return;
    }
    for (long c0 = k0; c0 < k1; c0 += KC) { /* KC rows of W, read along the rows (16 prefetched streams) */
        long c1 = c0 + KC < k1 ? c0 + KC : k1;
        for (long m = 0; m < M; m += 4)
            axpy_group(w, x + m * K, out + m * N, M - m < 4 ? (int)(M - m) : 4, K, c0, c1, n0, n1, N, c0 == k0);
    }
}

#define MAXROWS 8

/* RN rows of W (1 to 3) from row n against RM rows of x (1 to 4) from row m0: 12 sums in registers,
   each (W row, x row) the operations of `dot` on it (8 lanes over k, their sum, then the tail) */
static inline __attribute__((always_inline)) void dot_tile(const float *w, const float *x, float *y, int RN, int RM,
                                                           long n, long m0, long K, long N) {
    __m256 a[3][4];
    for (int i = 0; i < RN; i++)
        for (int j = 0; j < RM; j++) a[i][j] = _mm256_setzero_ps();
    const float *wn = w + n * K, *xm = x + m0 * K;
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[3];
        for (int i = 0; i < RN; i++) wv[i] = _mm256_loadu_ps(wn + i * K + k);
        for (int j = 0; j < RM; j++) {
            __m256 xv = _mm256_loadu_ps(xm + j * K + k);
            for (int i = 0; i < RN; i++) a[i][j] = _mm256_fmadd_ps(wv[i], xv, a[i][j]);
        }
    }
    for (int i = 0; i < RN; i++)
        for (int j = 0; j < RM; j++) {
            float s = hsum(a[i][j]);
            for (long kk = k; kk < K; kk++) s = fmaf(wn[i * K + kk], xm[j * K + kk], s);
            y[(m0 + j) * N + n + i] = s;
        }
}

#define DTILE(RN, RM) dot_tile(w, x, y, RN, RM, n, m, K, N)
#define DROWS(RN)                                                                                                      \
    for (m = 0; m + 4 <= M; m += 4) DTILE(RN, 4);                                                                     \
    switch (M - m) {                                                                                                   \
    case 3: DTILE(RN, 3); break;                                                                                       \
    case 2: DTILE(RN, 2); break;                                                                                       \
    case 1: DTILE(RN, 1); break;                                                                                       \
    }

/* M <= MAXROWS rows: y[m][n0:n1] = W[n0:n1, :K] . x[m]; each row as `dot_rows` on it alone. Tiles of
   3 rows of W x 4 rows of x (7 loads per 12 FMAs; the second group of x rows reads W from L1). */
static void dot_rows_m(const float *w, const float *x, float *y, long M, long n0, long n1, long K, long N) {
    if (M == 1) {
        dot_rows(w, x, y, n0, n1, K);
        return;
    }
    long n = n0, m;
    for (; n + 3 <= n1; n += 3) {
        DROWS(3)
    }
    if (n1 - n == 2) {
        DROWS(2)
    } else if (n1 - n == 1) {
        DROWS(1)
    }
}

static void run_task(const job_t *j, int t) {
    int T = j->threads;
    if (j->kind == 0) {
        long kh = j->K / 2, M = j->M ? j->M : 1;
        if (T == 1) {
            axpy_rows_m(j->w, j->x, j->y, M, j->K, 0, kh, 0, j->N, j->N);
            axpy_rows_m(j->w, j->x, j->scratch, M, j->K, kh, j->K, 0, j->N, j->N);
            return;
        }
        int per = T / 2, half = t / per, c = t % per; /* threads per half; the columns split among them */
        if (half > 1) return;
        long n0 = c ? (j->N * c / per) & ~7L : 0, n1 = c == per - 1 ? j->N : (j->N * (c + 1) / per) & ~7L;
        axpy_rows_m(j->w, j->x, half ? j->scratch : j->y, M, j->K, half ? kh : 0, half ? j->K : kh, n0, n1, j->N);
    } else if (j->kind == DOTQ) {
        long n0 = t ? (j->N * t / T) & ~3L : 0, n1 = t == T - 1 ? j->N : (j->N * (t + 1) / T) & ~3L;
        dotq_rows(j->wq, j->xq, j->acc, j->scale, j->sx, n0, n1, j->N, j->K);
        double lb = -INFINITY;
        for (long r = n0; r < n1; r++) {
            double v = j->acc[r] - (j->err[r] * j->xn + j->gq[r] * j->dxn);
            lb = v > lb && !(j->skip && j->skip[r]) ? v : lb;
        }
        j->lbs[t] = lb;
    } else if (j->kind == PICK) {
        long n0 = t ? (j->N * t / T) & ~3L : 0, n1 = t == T - 1 ? j->N : (j->N * (t + 1) / T) & ~3L, c = 0;
        for (long r = n0; r < n1; r++) {
            if (j->acc[r] + (j->err[r] * j->xn + j->gq[r] * j->dxn) >= j->lb && !(j->skip && j->skip[r])) {
                j->y[r] = dot(j->w + r * j->Kx, j->x, j->Kx);
                c++;
            } else {
                j->y[r] = -INFINITY;
            }
        }
        j->counts[t] = c;
    } else if (j->kind == DOT) {
        long n0 = t ? (j->N * t / T) & ~3L : 0, n1 = t == T - 1 ? j->N : (j->N * (t + 1) / T) & ~3L;
        dot_rows_m(j->w, j->x, j->y, j->M ? j->M : 1, n0, n1, j->K, j->N);
    } else {
        long P = (j->M ? j->M : 1) * j->N;
        attn_heads(j, P * t / T, P * (t + 1) / T);
    }
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *worker(void *arg) {
    int t = (int)(long)arg;
    long seen = start_seen[t];
    for (;;) {
        long start = now_ns();
        for (int i = 1; atomic_load_explicit(&posted, memory_order_acquire) == seen; i++) {
            _mm_pause();
            if (i % 256 == 0 && now_ns() - start > spin_ns) {
                pthread_mutex_lock(&mu);
                atomic_fetch_add(&sleeping, 1);
                while (atomic_load(&posted) == seen) pthread_cond_wait(&cv, &mu);
                atomic_fetch_sub(&sleeping, 1);
                pthread_mutex_unlock(&mu);
                break;
            }
        }
        seen = atomic_load_explicit(&posted, memory_order_acquire);
        if (t < job.threads) run_task(&job, t);
        atomic_fetch_add_explicit(&done, 1, memory_order_release);
    }
    return NULL;
}

static void forked_child(void) { /* the parent's workers are not in the child: start afresh */
    workers = 0;
    atomic_store(&sleeping, 0);
    pthread_mutex_init(&mu, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pthread_cond_init(&cv, NULL);
}

__attribute__((constructor)) static void on_load(void) { pthread_atfork(NULL, NULL, forked_child); }

static int start_workers(int n) {
    while (workers < n) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        start_seen[workers + 1] = atomic_load(&posted);
        int err = pthread_create(&th, &at, worker, (void *)(long)(workers + 1));
        pthread_attr_destroy(&at);
        if (err) break;
        workers++;
    }
    return workers;
}

/* run `job` on `threads` threads (the caller's and workers'); call_mu held */
static int run_job(job_t j, int threads) {
    if (threads > MAXT) threads = MAXT;
    if (threads > 1 && start_workers(threads - 1) + 1 < threads) threads = workers + 1;
    if (threads < 1) threads = 1;
    j.threads = threads;
    job = j;
    if (threads > 1) {
        long target = atomic_load(&done) + workers;
        atomic_fetch_add(&posted, 1);
        if (atomic_load(&sleeping)) {
            pthread_mutex_lock(&mu);
            pthread_cond_broadcast(&cv);
            pthread_mutex_unlock(&mu);
        }
        run_task(&job, 0);
        while (atomic_load_explicit(&done, memory_order_acquire) < target) _mm_pause();
    } else {
        run_task(&job, 0);
    }
    return threads;
}

/* y = x @ W or W . x, plus b; scratch: N floats (AXPY's second half) */
static int gemv_m(int kind, const float *w, const float *x, float *y, float *scratch, long M, long K, long N,
                  const float *b, int threads) {
    threads = run_job((job_t){.kind = kind, .w = w, .x = x, .y = y, .scratch = scratch, .K = K, .N = N, .M = M},
                      threads);
    for (long m = 0; m < M; m++, y += N, scratch += N) {
        long n = 0;
        if (kind == AXPY) {
            for (; n + 8 <= N; n += 8) {
                __m256 v = _mm256_add_ps(_mm256_loadu_ps(y + n), _mm256_loadu_ps(scratch + n));
                _mm256_storeu_ps(y + n, b ? _mm256_add_ps(v, _mm256_loadu_ps(b + n)) : v);
            }
            for (; n < N; n++) y[n] = b ? (y[n] + scratch[n]) + b[n] : y[n] + scratch[n];
        } else if (b) {
            for (; n < N; n++) y[n] += b[n];
        }
    }
    return threads;
}

static int gemv(int kind, const float *w, const float *x, float *y, float *scratch, long K, long N, const float *b,
                int threads) {
    return gemv_m(kind, w, x, y, scratch, 1, K, N, b, threads);
}

/* M (1 to 8) rows: x [M, K] -> y [M, N]; scratch [M, N] */
int g2t_gemv(int kind, const float *w, const float *x, float *y, float *scratch, long M, long K, long N,
             const float *b, int threads) {
    if (M < 1 || M > MAXROWS) return -1;
    pthread_mutex_lock(&call_mu); /* one product at a time: the workers and `job` are shared */
    threads = gemv_m(kind, w, x, y, scratch, M, K, N, b, threads);
    pthread_mutex_unlock(&call_mu);
    return threads;
}

/* g2t_top1's copy of W [N, K]: wq [N, Kp] int8 packed as dotq_rows reads it, q = round(w / s) with
   s = max|w| / 127 per row (scale); err = (||w - s q|| + g ||w||) * 1.001 and gq = s ||q|| * 1.001 per
   row, g the fp32 product's rounding factor (see gemv.py's Top1). One pass, sums in double. */
void g2t_top1_prepare(const float *w, long N, long K, int8_t *wq, float *scale, float *err, float *gq) {
    long Kp = (K + 15) / 16 * 16;
    double n = (double)(K + 10), u = ldexp(1.0, -24), g = n * u / (1 - n * u);
    for (long r = 0; r < N; r++) {
        const float *wr = w + r * K;
        float m = 0.f;
        for (long k = 0; k < K; k++) m = fabsf(wr[k]) > m ? fabsf(wr[k]) : m;
        float s = m / 127.0f;
        s = s < 1e-30f ? 1e-30f : s;
        long j = r % 4, base = r - j, rows = N - base < 4 ? N - base : 4;
        int8_t *dst = wq + base * Kp + j * 16;
        double e2 = 0, w2 = 0, q2 = 0;
        for (long k = 0; k < Kp; k++) {
            float q = 0.f;
            if (k < K) {
                q = nearbyintf(wr[k] / s);
                q = q > 127.f ? 127.f : q < -127.f ? -127.f : q;
                double e = (double)wr[k] - (double)q * s;
                e2 += e * e, w2 += (double)wr[k] * wr[k], q2 += (double)q * q;
            }
            dst[(k / 16) * 16 * rows + k % 16] = (int8_t)q;
        }
        scale[r] = s;
        err[r] = (float)((sqrt(e2) + g * sqrt(w2)) * 1.001 + 1e-30);
        gq[r] = (float)(s * sqrt(q2) * 1.001);
    }
}

/* The argmax of W[N, K] . x read mostly from W's int8 copy: y gets the fp32 products (exactly those
   of g2t_gemv's DOT) of every row that can be the largest, and -inf elsewhere. x is rounded to int16
   (scale sx), each row's approximate product is exact in integers, and |fl(W[r] . x) - acc[r]| <=
   err[r] ||x|| + gq[r] ||x - sx xq|| (see gemv.py's Top1), so a row whose upper bound is below the
   best lower bound cannot be the argmax; the others are recomputed from W. The first largest of y
   is then the first largest of the full product. Rows with skip[r] set (the caller bans them) are
   left out: -inf, and no part of the bound. Returns the rows recomputed, or -1 (y undefined) when x
   is not finite or all zero, or every row is skipped: then the caller computes every product. */
long g2t_top1(const float *w, const int8_t *wq, const float *scale, const float *err, const float *gq, const float *x,
              const uint8_t *skip, float *y, double *acc, long N, long K, int threads) {
    long Kp = (K + 15) / 16 * 16;
    int16_t xq[Kp];
    double xn = 0, m = 0, dxn = 0, lbs[MAXT];
    long counts[MAXT];
    for (long k = 0; k < K; k++) {
        xn += (double)x[k] * x[k];
        m = fabs(x[k]) > m ? fabs(x[k]) : m;
    }
    xn = sqrt(xn);
    if (!isfinite(xn) || m == 0) return -1;
    /* an int32 lane sums Kp / 16 products of two 16-bit pairs, each at most 2 * 127 * limit */
    double limit = fmin(32767.0, floor(2147483647.0 / (254.0 * (Kp / 16))));
    double sx = m / limit;
    for (long k = 0; k < Kp; k++) {
        xq[k] = k < K ? (int16_t)lrint(x[k] / sx) : 0;
        if (k < K) dxn += (x[k] - sx * xq[k]) * (x[k] - sx * xq[k]);
    }
    dxn = sqrt(dxn);
    pthread_mutex_lock(&call_mu);
    threads = run_job((job_t){.kind = DOTQ, .wq = wq, .xq = xq, .acc = acc, .scale = scale, .sx = sx, .err = err,
                              .gq = gq, .xn = xn, .dxn = dxn, .lbs = lbs, .skip = skip, .K = Kp, .N = N}, threads);
    double lb = -INFINITY;
    for (int t = 0; t < threads; t++) lb = lbs[t] > lb ? lbs[t] : lb;
    if (lb == -INFINITY) { /* every row skipped */
        pthread_mutex_unlock(&call_mu);
        return -1;
    }
    run_job((job_t){.kind = PICK, .w = w, .err = err, .gq = gq, .acc = acc, .dxn = dxn, .xn = xn, .lb = lb,
                    .skip = skip, .counts = counts, .x = x, .y = y, .Kx = K, .N = N}, threads);
    pthread_mutex_unlock(&call_mu);
    long count = 0;
    for (int t = 0; t < threads; t++) count += counts[t];
    return count;
}

/* each of M rows' key and value (from qkv [M, 3D]) into its cache (kc, vc [M, heads, max_len, hd]) at t */
static void write_kv(const float *qkv, float *kc, float *vc, long M, long heads, long hd, long t, long max_len) {
    long D = heads * hd;
    for (long b = 0; b < M; b++)
        for (long i = 0; i < heads; i++) {
            memcpy(kc + ((b * heads + i) * max_len + t) * hd, qkv + b * 3 * D + D + i * hd, hd * sizeof(float));
            memcpy(vc + ((b * heads + i) * max_len + t) * hd, qkv + b * 3 * D + 2 * D + i * hd, hd * sizeof(float));
        }
}

/* M rows' attention in one layer at cache position t: each row's key and value (from qkv [M, 3D])
   written into its cache (kc, vc [M, heads, max_len, hd]), then every (row, head) over t + 1 keys into
   out [M, D]. The operations of g2t_blocks' attention on each row. */
int g2t_attn_rows(const float *qkv, float *kc, float *vc, float *out, long M, long heads, long hd, long t,
                  long max_len, int threads) {
    write_kv(qkv, kc, vc, M, heads, hd, t, max_len);
    pthread_mutex_lock(&call_mu);
    threads = run_job((job_t){.kind = ATTN, .x = qkv, .y = out, .K = hd, .N = heads, .M = M, .kc = kc, .vc = vc,
                              .t1 = t + 1, .max_len = max_len}, threads);
    pthread_mutex_unlock(&call_mu);
    return threads;
}

static void gelu(float *x, long n, int exact);

/* GELU in place over n floats (as g2t_blocks computes it) */
void g2t_gelu(float *x, long n, int exact) { gelu(x, n, exact); }

/* One GPT-2 block (pre-norm) for one token; fields as the model's tensors (Conv1D weights [in, out]). */
typedef struct {
    const float *ln1_w, *ln1_b, *attn_w, *attn_b, *proj_w, *proj_b;
    const float *ln2_w, *ln2_b, *fc_w, *fc_b, *mproj_w, *mproj_b;
    float *k_cache, *v_cache; /* [heads, max_len, head size] of this layer (row 0) */
} block_t;

static void layer_norm(const float *x, const float *w, const float *b, float *y, long D, float eps) {
    double sum = 0, sq = 0;
    for (long i = 0; i < D; i++) sum += x[i];
    double mean = sum / D;
    for (long i = 0; i < D; i++) sq += (x[i] - mean) * (x[i] - mean);
    float rstd = (float)(1.0 / sqrt(sq / D + eps)), mu = (float)mean;
    for (long i = 0; i < D; i++) y[i] = (x[i] - mu) * rstd * w[i] + b[i];
}

/* GELU in place: exact (erf) or the tanh form, written as v * sigmoid(2u) = v / (1 + e^(-2u)),
   u = sqrt(2/pi) (v + 0.044715 v^3), since 1 + tanh(u) = 2 sigmoid(2u) */
static void gelu(float *x, long n, int exact) {
    long i = 0;
    if (exact) {
        for (; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
        return;
    }
    const __m256 c = _mm256_set1_ps(-2.0f * 0.79788456080286536f), k = _mm256_set1_ps(0.044715f),
                 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v));
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, exp8(u))));
    }
    for (; i < n; i++) {
        float v = x[i];
        x[i] = v / (1.0f + expf(-2.0f * 0.79788456080286536f * (v + 0.044715f * v * v * v)));
    }
}

/* The blocks of a GPT-2 for one token at cache position t: the residual stream x [D] in place.
   work: 2 * 4 * D + 2 * F floats (F: the MLP's inner size). Then the final norm of x into h [D]. */
int g2t_blocks(const block_t *blocks, long L, float *x, float *h, const float *lnf_w, const float *lnf_b, long t,
               long max_len, long heads, long D, long F, float eps, int exact_gelu, float *work, int threads) {
    long hd = D / heads, Q = 3 * D > F ? 3 * D : F;
    float *a = work, *qkv = a + D, *y = qkv + Q, *scratch = y + Q;
    pthread_mutex_lock(&call_mu);
    for (long l = 0; l < L; l++) {
        const block_t *B = blocks + l;
        layer_norm(x, B->ln1_w, B->ln1_b, h, D, eps);
        threads = gemv(AXPY, B->attn_w, h, qkv, scratch, D, 3 * D, B->attn_b, threads);
        write_kv(qkv, B->k_cache, B->v_cache, 1, heads, hd, t, max_len);
        run_job((job_t){.kind = ATTN, .x = qkv, .y = a, .K = hd, .N = heads, .kc = B->k_cache, .vc = B->v_cache,
                        .t1 = t + 1, .max_len = max_len}, threads);
        gemv(AXPY, B->proj_w, a, y, scratch, D, D, B->proj_b, threads);
        for (long i = 0; i < D; i++) x[i] += y[i];
        layer_norm(x, B->ln2_w, B->ln2_b, h, D, eps);
        gemv(AXPY, B->fc_w, h, qkv, scratch, D, F, B->fc_b, threads);
        gelu(qkv, F, exact_gelu);
        gemv(AXPY, B->mproj_w, qkv, y, scratch, F, D, B->mproj_b, threads);
        for (long i = 0; i < D; i++) x[i] += y[i];
    }
    layer_norm(x, lnf_w, lnf_b, h, D, eps);
    pthread_mutex_unlock(&call_mu);
    return threads;
}

void g2t_set_spin(long ns) { spin_ns = ns; }
