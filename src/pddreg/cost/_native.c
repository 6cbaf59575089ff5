/* Native CPU kernels of pddreg.cost (float32, no autograd), called through ctypes.
 *
 * Compiled on first use by pddreg/cost/_native.py with the system C compiler (no Python or
 * torch headers: every entry point takes plain pointers and sizes) and cached per source hash.
 * Each kernel works on a range of columns or rows so that Python threads (ctypes releases the
 * GIL) can split a call; none allocates: the caller passes each thread a scratch buffer (about
 * 1 MB for the 3D min-convolution, less for the others).
 *
 * The operators are the lecture's (regularise.py): along an axis, replicate padding then a
 * cascade of box-5 averages (two with padding 5 for the min-convolution: the 9-tap filter
 * [1 2 3 4 5 4 3 2 1] / 25; three with padding 6 for the mean-field: a 13-tap filter), then,
 * for the min-convolution, a 3-wide min along every axis.  The filters run as FIR sums with
 * the accumulators in AVX registers (GCC/Clang vector extensions, 8 floats).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#define RESTRICT __restrict__

/* Every entry point runs with denormals flushed to zero (x86 MXCSR FTZ | DAZ, restored on
 * return): the probabilities of far displacements and their gradients reach 1e-38 and below,
 * and arithmetic on denormal floats is one to two orders of magnitude slower. */
#if defined(__x86_64__) || defined(__i386__)
#define FTZ_BEGIN                            \
    const unsigned int saved_csr_ = _mm_getcsr(); \
    _mm_setcsr(saved_csr_ | 0x8040u);
#define FTZ_END _mm_setcsr(saved_csr_);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif

/* 8 floats in one register (GCC/Clang vector extension: AVX with -mavx2, else two SSE). */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f ld8(const float* p) {
    v8f v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void st8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }

static inline v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* Lane masks (all bits set where a comparison of two v8f holds) and selections on them. */
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8f and8(v8i m, v8f x) { return (v8f)(m & (v8i)x); }
static inline v8f sel8(v8i m, v8f x, v8f y) { return (v8f)((m & (v8i)x) | (~m & (v8i)y)); }

/* Rows ahead that the column kernels prefetch: their rows lie K floats apart (often more than a
 * page), which the hardware prefetchers do not follow. */
#define PF_ROWS 12

/* Optional last step of a filter pass: y = wm * y + wd * d + wc * c (d, c: same layout as y,
 * either may be NULL; c may be y itself). */
struct epilogue {
    const float* d;
    const float* c;
    float wd, wc, wm;
};

/* yi[q .. q + 8 nv) = sum_t taps[t] * rows[t][q .. q + 8 nv), the sums in registers; with
 * ``split`` even and odd taps go to separate accumulators (more independent FMA chains).  With
 * an epilogue, element q of yi is element at + q of its arrays. */
static inline void fir_vec(const float* const* rows, const float* taps, int nt, int64_t q,
                           float* yi, const int nv, const int split, const struct epilogue* e,
                           int64_t at) {
    v8f acc[8], acc2[8];
    for (int k = 0; k < nv; ++k) acc[k] = acc2[k] = splat8(0.0f);
    int t = 0;
    if (split) {
        for (; t + 1 < nt; t += 2) {
            const v8f w0 = splat8(taps[t]), w1 = splat8(taps[t + 1]);
            for (int k = 0; k < nv; ++k) {
                acc[k] += w0 * ld8(rows[t] + q + 8 * k);
                acc2[k] += w1 * ld8(rows[t + 1] + q + 8 * k);
            }
        }
    }
    for (; t < nt; ++t) {
        const v8f w = splat8(taps[t]);
        for (int k = 0; k < nv; ++k) acc[k] += w * ld8(rows[t] + q + 8 * k);
    }
    for (int k = 0; k < nv; ++k) {
        v8f v = split ? acc[k] + acc2[k] : acc[k];
        if (e) {
            const int64_t i = at + q + 8 * k;
            v *= splat8(e->wm);
            if (e->d) v += splat8(e->wd) * ld8(e->d + i);
            if (e->c) v += splat8(e->wc) * ld8(e->c + i);
        }
        st8(yi + q + 8 * k, v);
    }
}

/* yi[0 .. Q) = sum_t taps[t] * rows[t][0 .. Q) (nt <= 64) on blocks of 64, 32, 16, 8
 * contiguous q, then 1; then the epilogue ``e`` (or NULL; element q of yi is element at + q of
 * its arrays). */
static inline void fir_row(const float* const* rows, const float* taps, int nt, int64_t Q,
                           float* yi, const struct epilogue* e, int64_t at) {
    int64_t q = 0;
    for (; q + 64 <= Q; q += 64) fir_vec(rows, taps, nt, q, yi, 8, 0, e, at);
    for (; q + 32 <= Q; q += 32) fir_vec(rows, taps, nt, q, yi, 4, 1, e, at);
    for (; q + 16 <= Q; q += 16) fir_vec(rows, taps, nt, q, yi, 2, 1, e, at);
    for (; q + 8 <= Q; q += 8) fir_vec(rows, taps, nt, q, yi, 1, 1, e, at);
    /* the tail as one vector overlapping the last block (outputs recomputed, not accumulated),
     * unless the epilogue reads the output row itself (c aliasing y) */
    if (q < Q && Q >= 8 && !(e && e->c && e->c + at == yi)) {
        fir_vec(rows, taps, nt, Q - 8, yi, 1, 1, e, at);
        q = Q;
    }
    for (; q < Q; ++q) {
        float acc = 0.0f;
        for (int t = 0; t < nt; ++t) acc += taps[t] * rows[t][q];
        if (e) {
            acc *= e->wm;
            if (e->d) acc += e->wd * e->d[at + q];
            if (e->c) acc += e->wc * e->c[at + q];
        }
        yi[q] = acc;
    }
}

/* y (P, o, Q) = FIR ``taps`` (nt <= 64) along the middle axis of x (P, n, Q), replicate-padded
 * by ``pad`` (o = n + 2 pad - nt + 1); then the epilogue ``e`` (or NULL). */
static void fir_mid(const float* RESTRICT x, float* y, int64_t P, int n, int64_t Q,
                    const float* RESTRICT taps, int nt, int pad, const struct epilogue* e) {
    const int o = n + 2 * pad - nt + 1;
    const float* rows[64];
    for (int64_t p = 0; p < P; ++p) {
        const float* xp = x + p * n * Q;
        float* yp = y + p * o * Q;
        for (int i = 0; i < o; ++i) {
            for (int t = 0; t < nt; ++t) {
                const int s = i + t - pad;
                rows[t] = xp + (s < 0 ? 0 : (s >= n ? n - 1 : s)) * Q;
            }
            fir_row(rows, taps, nt, Q, yp + i * Q, e, (p * o + i) * Q);
        }
    }
}

/* Column j of the (o, n) matrix M of the replicate-padded FIR of fir_mid
 * (M[i, j] = sum_t taps[t] [clamp(i + t - pad, 0, n - 1) == j]): its nonzero rows idx and
 * weights w in increasing i, returns their number (at most 64). */
static int fir_column(const float* taps, int nt, int pad, int n, int o, int j, int* idx,
                      float* w) {
    int m = 0;
    if (j > 0 && j < n - 1) { /* no clamping reaches an interior column */
        for (int t = nt - 1; t >= 0; --t) {
            const int i = j + pad - t;
            if (i >= 0 && i < o) {
                idx[m] = i;
                w[m++] = taps[t];
            }
        }
        return m;
    }
    for (int i = 0; i < o && m < 64; ++i) {
        float s = 0.0f;
        int hit = 0;
        for (int t = 0; t < nt; ++t) {
            int p = i + t - pad;
            p = p < 0 ? 0 : (p >= n ? n - 1 : p);
            if (p == j) {
                s += taps[t];
                hit = 1;
            }
        }
        if (hit) {
            idx[m] = i;
            w[m++] = s;
        }
    }
    return m;
}

/* The transposed filter of fir_mid / fir_last (o inputs of the forward, n outputs): its taps
 * and the two edge columns of M, computed once per kernel call. */
struct tfir {
    const float* taps;
    int nt, pad, o, n, m0, m1;
    int i0[64], i1[64];
    float w0[64], w1[64];
};

static void tfir_init(struct tfir* t, const float* taps, int nt, int pad, int o, int n) {
    t->taps = taps;
    t->nt = nt;
    t->pad = pad;
    t->o = o;
    t->n = n;
    t->m0 = fir_column(taps, nt, pad, n, o, 0, t->i0, t->w0);
    t->m1 = n > 1 ? fir_column(taps, nt, pad, n, o, n - 1, t->i1, t->w1) : 0;
}

/* Column j of M (idx, w) for the transposed filter t; returns the count. */
static inline int tfir_column(const struct tfir* t, int j, int* idx, float* w) {
    if (j == 0 || j == t->n - 1) {
        const int m = j == 0 ? t->m0 : t->m1;
        const int* si = j == 0 ? t->i0 : t->i1;
        const float* sw = j == 0 ? t->w0 : t->w1;
        for (int k = 0; k < m; ++k) {
            idx[k] = si[k];
            w[k] = sw[k];
        }
        return m;
    }
    return fir_column(t->taps, t->nt, t->pad, t->n, t->o, j, idx, w); /* interior: O(nt) */
}

/* y (P, n, Q) = M^T x for x (P, o, Q): the transpose (the gradient) of fir_mid along the middle
 * axis, M as in fir_column; then the epilogue ``e`` (or NULL). */
static void fir_mid_t(const float* RESTRICT x, float* y, int64_t P, int64_t Q,
                      const struct tfir* tf, const struct epilogue* e) {
    const float* rows[64];
    float w[64];
    int idx[64];
    const int o = tf->o, n = tf->n;
    for (int j = 0; j < n; ++j) {
        const int m = tfir_column(tf, j, idx, w);
        for (int64_t p = 0; p < P; ++p) {
            for (int t = 0; t < m; ++t) rows[t] = x + (p * o + idx[t]) * Q;
            fir_row(rows, w, m, Q, y + (p * n + j) * Q, e, (p * n + j) * Q);
        }
    }
}

/* y (P, o) = FIR ``taps`` along the last axis of x (P, n), replicate-padded by ``pad``,
 * vectorised over the outputs.  Rows are padded 32 at a time into xpad (32 * (n + 2 pad + 16)
 * floats) before they are read back, so no load waits on a store still in flight. */
static void fir_last(const float* RESTRICT x, float* RESTRICT y, int64_t P, int n,
                     const float* RESTRICT taps, int nt, int pad, float* RESTRICT xpad) {
    const int o = n + 2 * pad - nt + 1, len = n + 2 * pad + 16;
    for (int64_t p0 = 0; p0 < P; p0 += 32) {
        const int64_t pb = P - p0 < 32 ? P - p0 : 32;
        for (int64_t p = 0; p < pb; ++p) {
            const float* xp = x + (p0 + p) * n;
            float* xq = xpad + p * len;
            /* the vector loop reads xq[0 .. n + 2 pad): pad <= 8 edges as one vector each */
            if (pad <= 8) {
                st8(xq, splat8(xp[0]));
                st8(xq + pad + n, splat8(xp[n - 1]));
            } else {
                for (int j = 0; j < pad; ++j) xq[j] = xp[0];
                for (int j = 0; j < pad; ++j) xq[pad + n + j] = xp[n - 1];
            }
            __builtin_memcpy(xq + pad, xp, n * sizeof(float));
        }
        for (int64_t p = 0; p < pb; ++p) {
            const float* xq = xpad + p * len;
            float* yp = y + (p0 + p) * o;
            int i = 0;
            for (; i + 16 <= o; i += 16) {
                v8f a0 = splat8(0.f), a1 = a0, b0 = a0, b1 = a0;
                int t = 0;
                for (; t + 1 < nt; t += 2) {
                    const v8f w = splat8(taps[t]), v = splat8(taps[t + 1]);
                    a0 += w * ld8(xq + i + t);
                    a1 += w * ld8(xq + i + t + 8);
                    b0 += v * ld8(xq + i + t + 1);
                    b1 += v * ld8(xq + i + t + 9);
                }
                for (; t < nt; ++t) {
                    const v8f w = splat8(taps[t]);
                    a0 += w * ld8(xq + i + t);
                    a1 += w * ld8(xq + i + t + 8);
                }
                st8(yp + i, a0 + b0);
                st8(yp + i + 8, a1 + b1);
            }
            /* the tail: 8-wide blocks, the last one overlapping (outputs recomputed) */
            for (int i8 = i; i < o && o >= 8; i8 = i) {
                i = i8 + 8 <= o ? i8 : o - 8;
                v8f a0 = splat8(0.f), b0 = a0;
                int t = 0;
                for (; t + 1 < nt; t += 2) {
                    a0 += splat8(taps[t]) * ld8(xq + i + t);
                    b0 += splat8(taps[t + 1]) * ld8(xq + i + t + 1);
                }
                for (; t < nt; ++t) a0 += splat8(taps[t]) * ld8(xq + i + t);
                st8(yp + i, a0 + b0);
                i += 8;
            }
            for (; i < o; ++i) {
                float acc = 0;
                for (int t = 0; t < nt; ++t) acc += taps[t] * xq[i + t];
                yp[i] = acc;
            }
        }
    }
}

/* Floats of the xpad scratch of fir_last_t for rows of o inputs, n outputs, nt taps. */
#define FLT_LEN(o, n, nt) ((o) + (n) + 2 * (nt) + 16)

/* y (P, n) = M^T x for x (P, o) along the last axis: the transpose of fir_last (M as in
 * fir_column).  Outputs 1 .. n - 2 are a FIR with the reversed taps on x zero-padded by
 * nt - 1 - pad (vectorised over the outputs, rows padded 32 at a time into xpad:
 * 32 * FLT_LEN(o, n, nt) floats, zeroed by the caller: only the data slots are written, so the
 * zeros stay for later calls of the same sizes); outputs 0 and n - 1 are dot products with the
 * edge columns. */
static void fir_last_t(const float* RESTRICT x, float* RESTRICT y, int64_t P,
                       const struct tfir* tf, float* RESTRICT xpad) {
    float rt[64];
    const int nt = tf->nt, o = tf->o, n = tf->n, m0 = tf->m0, m1 = tf->m1;
    const int* i0 = tf->i0;
    const int* i1 = tf->i1;
    const float* w0 = tf->w0;
    const float* w1 = tf->w1;
    for (int t = 0; t < nt; ++t) rt[t] = tf->taps[nt - 1 - t];
    const int lead = nt - 1 - tf->pad, len = FLT_LEN(o, n, nt);
    for (int64_t p0 = 0; p0 < P; p0 += 32) {
        const int64_t pb = P - p0 < 32 ? P - p0 : 32;
        for (int64_t p = 0; p < pb; ++p)
            __builtin_memcpy(xpad + p * len + lead, x + (p0 + p) * o, o * sizeof(float));
        for (int64_t p = 0; p < pb; ++p) {
            const float* xq = xpad + p * len;
            const float* xp = x + (p0 + p) * o;
            float* yp = y + (p0 + p) * n;
            int i = 0;
            for (; i + 16 <= n; i += 16) {
                v8f a0 = splat8(0.f), a1 = a0, b0 = a0, b1 = a0;
                int t = 0;
                for (; t + 1 < nt; t += 2) {
                    const v8f w = splat8(rt[t]), v = splat8(rt[t + 1]);
                    a0 += w * ld8(xq + i + t);
                    a1 += w * ld8(xq + i + t + 8);
                    b0 += v * ld8(xq + i + t + 1);
                    b1 += v * ld8(xq + i + t + 9);
                }
                for (; t < nt; ++t) {
                    const v8f w = splat8(rt[t]);
                    a0 += w * ld8(xq + i + t);
                    a1 += w * ld8(xq + i + t + 8);
                }
                st8(yp + i, a0 + b0);
                st8(yp + i + 8, a1 + b1);
            }
            for (int i8 = i; i < n && n >= 8; i8 = i) { /* as in fir_last */
                i = i8 + 8 <= n ? i8 : n - 8;
                v8f a0 = splat8(0.f), b0 = a0;
                int t = 0;
                for (; t + 1 < nt; t += 2) {
                    a0 += splat8(rt[t]) * ld8(xq + i + t);
                    b0 += splat8(rt[t + 1]) * ld8(xq + i + t + 1);
                }
                for (; t < nt; ++t) a0 += splat8(rt[t]) * ld8(xq + i + t);
                st8(yp + i, a0 + b0);
                i += 8;
            }
            for (; i < n; ++i) {
                float acc = 0;
                for (int t = 0; t < nt; ++t) acc += rt[t] * xq[i + t];
                yp[i] = acc;
            }
            float e0 = 0.0f, e1 = 0.0f;
            for (int t = 0; t < m0; ++t) e0 += w0[t] * xp[i0[t]];
            for (int t = 0; t < m1; ++t) e1 += w1[t] * xp[i1[t]];
            yp[0] = e0;
            if (n > 1) yp[n - 1] = e1;
        }
    }
}

/* y (P, n, Q) = 3-wide valid min-pool of x (P, n + 2, Q) along the middle axis. */
static void min3_mid(const float* RESTRICT x, float* RESTRICT y, int64_t P, int n, int64_t Q) {
    for (int64_t p = 0; p < P; ++p) {
        const float* xp = x + p * (n + 2) * Q;
        float* yp = y + p * n * Q;
        for (int i = 0; i < n; ++i) {
            const float* RESTRICT a = xp + i * Q;
            const float* RESTRICT b = a + Q;
            const float* RESTRICT c = b + Q;
            float* RESTRICT yi = yp + i * Q;
            for (int64_t q = 0; q < Q; ++q) {
                float v = a[q] < b[q] ? a[q] : b[q];
                yi[q] = v < c[q] ? v : c[q];
            }
        }
    }
}

/* Min-convolution of the lecture over the displacement axes, columns [k0, k1) of one batch
 * item: per axis replicate-pad 5 and two box-5 averages (length n -> n + 2), then a 3-wide min
 * along every axis (n + 2 -> n).  src, dst: (L, K) with L = n**nd (nd in 1..3), K control
 * points; src and dst may be the same array (each block is read whole before it is written).
 * work: 2 * (n + 2)**nd * MC_W floats. */
#ifndef MC_W
#define MC_W 32
#endif
void pdd_minconv(const float* src, float* dst, int64_t K, int n, int nd, int64_t k0, int64_t k1,
                 float* work) {
    FTZ_BEGIN
    static const float taps[9] = {1.0f / 25, 2.0f / 25, 3.0f / 25, 4.0f / 25, 5.0f / 25,
                                  4.0f / 25, 3.0f / 25, 2.0f / 25, 1.0f / 25};
    int64_t L = 1, Lp = 1;
    for (int a = 0; a < nd; ++a) {
        L *= n;
        Lp *= n + 2;
    }
    float *A = work, *B = work + Lp * MC_W;
    for (int64_t kb = k0; kb < k1; kb += MC_W) {
        const int64_t w = (k1 - kb) < MC_W ? (k1 - kb) : MC_W;
        /* gather the block (L, w) into A as (n, .., n, W), zero-filling unused columns */
        for (int64_t l = 0; l < L; ++l) {
            if (l + PF_ROWS < L) __builtin_prefetch(src + (l + PF_ROWS) * K + kb);
            const float* s = src + l * K + kb;
            float* a = A + l * MC_W;
            int64_t q = 0;
            for (; q < w; ++q) a[q] = s[q];
            for (; q < MC_W; ++q) a[q] = 0.0f;
        }
        /* filter the innermost axis first, while the block is smallest (n -> n + 2 each) */
        float *cur = A, *nxt = B;
        int len[3] = {n, n, n};
        for (int a = nd - 1; a >= 0; --a) {
            int64_t P = 1, Q = MC_W;
            for (int b = 0; b < a; ++b) P *= len[b];
            for (int b = a + 1; b < nd; ++b) Q *= len[b];
            fir_mid(cur, nxt, P, n, Q, taps, 9, 5, NULL);
            len[a] = n + 2;
            float* t = cur;
            cur = nxt;
            nxt = t;
        }
        /* 3-wide mins, the last one written straight into the destination rows */
        int64_t Pm = 1, Qm = Lp * MC_W;
        for (int a = 0; a < nd - 1; ++a) {
            Qm /= n + 2;
            min3_mid(cur, nxt, Pm, n, Qm);
            Pm *= n;
            float* t = cur;
            cur = nxt;
            nxt = t;
        }
        for (int64_t p = 0; p < Pm; ++p) {
            const float* xp = cur + p * (n + 2) * MC_W;
            for (int i = 0; i < n; ++i) {
                const float *a = xp + i * MC_W, *b = a + MC_W, *c = b + MC_W;
                float* d = dst + (p * n + i) * K + kb;
                if (p * n + i + PF_ROWS < L) __builtin_prefetch(d + PF_ROWS * K, 1);
                for (int64_t q = 0; q < w; ++q) {
                    const float v = a[q] < b[q] ? a[q] : b[q];
                    d[q] = v < c[q] ? v : c[q];
                }
            }
        }
    }
    FTZ_END
}

/* Mean-field combination for rows [r0, r1) (all batch items together):
 *   out[r] = wd * d[r] + wc * c[r] + wm * MF(x[r])
 * with MF per grid axis g[0..nd) (nd in 1..3): replicate-pad 6 and three box-5 averages
 * (the 13-tap filter ``taps``).  Each row holds prod(g) floats.  d or c may
 * be NULL (term left out); c may alias out.  work: 2 * prod(g) + 32 * (g[nd - 1] + 28) floats. */
void pdd_meanfield(const float* x, const float* d, const float* c, float* out, int nd, const int* g,
                   int64_t r0, int64_t r1, float wd, float wc, float wm, const float* taps,
                   float* work) {
    FTZ_BEGIN
    int64_t G = 1;
    for (int a = 0; a < nd; ++a) G *= g[a];
    float *A = work, *B = work + G, *xpad = work + 2 * G;
    for (int64_t r = r0; r < r1; ++r) {
        const float* xr = x + r * G;
        /* the last axis first (x -> A), then the others, ending in A or B */
        fir_last(xr, A, G / g[nd - 1], g[nd - 1], taps, 13, 6, xpad);
        float *cur = A, *nxt = B;
        float* o = out + r * G;
        const struct epilogue e = {d ? d + r * G : NULL, c ? c + r * G : NULL, wd, wc, wm};
        if (nd == 1) {
            for (int64_t i = 0; i < G; ++i) {
                float v = wm * cur[i];
                if (e.d) v += wd * e.d[i];
                if (e.c) v += wc * e.c[i];
                o[i] = v;
            }
            continue;
        }
        int64_t P = 1, Q = G;
        for (int a = 0; a < nd - 1; ++a) {
            Q /= g[a];
            const int last = a == nd - 2; /* the last pass writes the weighted sum into out */
            fir_mid(cur, last ? o : nxt, P, g[a], Q, taps, 13, 6, last ? &e : NULL);
            P *= g[a];
            float* t = cur;
            cur = nxt;
            nxt = t;
        }
    }
    FTZ_END
}

/* ------------------------------------------------------------------------------------------
 * Backward kernels (gradients of the operators above; pddreg/cost/_autograd.py).
 */

/* Gradient of the 3-wide min-pool of min3_mid as PyTorch's autograd computes it for
 * torch.minimum(torch.minimum(a, b), c) (a, b, c = x[i], x[i + 1], x[i + 2]): at a tie each side
 * gets half.  gx (P, n + 2, Q) = the gradient from gy (P, n, Q) (each row of gx is assigned at
 * its first touch, then accumulated); *dot += sum gy * min3(x) when dot is not NULL. */
static void min3_mid_bwd(const float* RESTRICT x, const float* RESTRICT gy, float* gx, int64_t P,
                         int n, int64_t Q, double* dot) {
    const v8f one = splat8(1.0f), half = splat8(0.5f);
    v8f vacc = splat8(0.0f);
    float acc = 0.0f;
    for (int64_t p = 0; p < P; ++p) {
        {
            float* RESTRICT g0 = gx + p * (n + 2) * Q;
            for (int64_t q = 0; q < 2 * Q; ++q) g0[q] = 0.0f; /* rows 0, 1: touched first as a, b */
        }
        for (int i = 0; i < n; ++i) {
            const float* RESTRICT a = x + (p * (n + 2) + i) * Q;
            const float* RESTRICT b = a + Q;
            const float* RESTRICT c = b + Q;
            const float* RESTRICT g = gy + (p * n + i) * Q;
            float* RESTRICT ga = gx + (p * (n + 2) + i) * Q;
            float* RESTRICT gb = ga + Q;
            float* RESTRICT gc = gb + Q;
            int64_t q = 0;
            for (; q + 8 <= Q; q += 8) {
                const v8f u = ld8(a + q), v = ld8(b + q), w = ld8(c + q), gq = ld8(g + q);
                const v8i lt1 = u < v, gt1 = u > v, eq1 = u == v;
                const v8f m = sel8(lt1, u, v);
                const v8i lt2 = m < w, gt2 = m > w, eq2 = m == w;
                const v8f wu = one - and8(gt1, one) - and8(eq1, half);
                const v8f wv = one - and8(lt1, one) - and8(eq1, half);
                const v8f wm = one - and8(gt2, one) - and8(eq2, half);
                const v8f ww = one - and8(lt2, one) - and8(eq2, half);
                const v8f gm = gq * wm;
                st8(ga + q, ld8(ga + q) + gm * wu);
                st8(gb + q, ld8(gb + q) + gm * wv);
                st8(gc + q, gq * ww); /* row i + 2: first touch */
                vacc += gq * sel8(lt2, m, w);
            }
            for (; q < Q; ++q) {
                const float u = a[q], v = b[q], w = c[q], gq = g[q];
                const float m = u < v ? u : v;
                const float eq1 = u == v, eq2 = m == w;
                const float wu = 1.0f - (float)(u > v) - 0.5f * eq1;
                const float wv = 1.0f - (float)(u < v) - 0.5f * eq1;
                const float wm = 1.0f - (float)(m > w) - 0.5f * eq2;
                const float ww = 1.0f - (float)(m < w) - 0.5f * eq2;
                const float gm = gq * wm;
                ga[q] += gm * wu;
                gb[q] += gm * wv;
                gc[q] = gq * ww;
                acc += gq * (m < w ? m : w);
            }
        }
    }
    if (dot) {
        double t = acc;
        for (int u = 0; u < 8; ++u) t += vacc[u];
        *dot += t;
    }
}

/* Copy the columns [kb, kb + w) of src (L, K) into dst (L, W), zero-filling columns w .. W. */
static void gather_cols(const float* src, int64_t L, int64_t K, int64_t kb, int64_t w, int W,
                        float* RESTRICT dst) {
    for (int64_t l = 0; l < L; ++l) {
        if (l + PF_ROWS < L) __builtin_prefetch(src + (l + PF_ROWS) * K + kb);
        const float* s = src + l * K + kb;
        float* d = dst + l * W;
        int64_t q = 0;
        for (; q < w; ++q) d[q] = s[q];
        for (; q < W; ++q) d[q] = 0.0f;
    }
}

/* Gradient of pdd_minconv at x, columns [k0, k1) of one batch item:
 *   out = wm * MC_x^T(gy) + wa * a + wb * b
 * with MC_x^T the transposed Jacobian of the min-convolution at x (the block's filtered signal
 * and min-pools are recomputed; ties as PyTorch's autograd).  x, gy, a, b, out: (L, K); a, b may
 * be NULL; out may be gy, a or b.  dots[0] += sum gy * MC(x), dots[1] += sum a * x,
 * dots[2] += sum b * x (the reductions of the gradients of the regularisation weights).
 * work: (5 * (n + 2)**nd + n**nd) * MB_W floats. */
#ifndef MB_W
#define MB_W 16
#endif
void pdd_minconv_bwd(const float* x, const float* gy, const float* a, const float* b, float* out,
                     int64_t K, int n, int nd, int64_t k0, int64_t k1, float wa, float wb,
                     float wm, double* dots, float* work) {
    FTZ_BEGIN
    static const float taps[9] = {1.0f / 25, 2.0f / 25, 3.0f / 25, 4.0f / 25, 5.0f / 25,
                                  4.0f / 25, 3.0f / 25, 2.0f / 25, 1.0f / 25};
    int64_t L = 1, Lp = 1;
    for (int ax = 0; ax < nd; ++ax) {
        L *= n;
        Lp *= n + 2;
    }
    float* buf[5];
    for (int i = 0; i < 5; ++i) buf[i] = work + i * Lp * MB_W;
    float* xb = work + 5 * Lp * MB_W; /* the block of x, kept for the dot products */
    struct tfir tf;
    tfir_init(&tf, taps, 9, 5, n + 2, n);
    double d0 = 0.0, d1 = 0.0, d2 = 0.0;
    for (int64_t kb = k0; kb < k1; kb += MB_W) {
        const int64_t w = (k1 - kb) < MB_W ? (k1 - kb) : MB_W;
        /* recompute the filtered signal F (n + 2)^nd and the min-pools of all but the last axis */
        gather_cols(x, L, K, kb, w, MB_W, xb);
        float *cur = xb, *nxt = buf[0];
        int len[3] = {n, n, n};
        for (int ax = nd - 1; ax >= 0; --ax) {
            int64_t P = 1, Q = MB_W;
            for (int c = 0; c < ax; ++c) P *= len[c];
            for (int c = ax + 1; c < nd; ++c) Q *= len[c];
            fir_mid(cur, nxt, P, n, Q, taps, 9, 5, NULL);
            len[ax] = n + 2;
            cur = nxt;
            nxt = cur == buf[0] ? buf[1] : buf[0]; /* xb is read once */
        }
        const float* S[3] = {cur, nxt, buf[2]}; /* S[ax]: input of the min-pool along ax */
        int64_t Pm = 1, Qm = Lp * MB_W;
        for (int ax = 0; ax + 1 < nd; ++ax) {
            Qm /= n + 2;
            min3_mid(S[ax], (float*)S[ax + 1], Pm, n, Qm);
            Pm *= n;
        }
        /* back through the min-pools, the last axis first */
        float *ga = buf[3], *gb = buf[4];
        gather_cols(gy, L, K, kb, w, MB_W, ga);
        for (int ax = nd - 1; ax >= 0; --ax) {
            int64_t P = 1, Q = MB_W;
            for (int c = 0; c < ax; ++c) P *= n;
            for (int c = ax + 1; c < nd; ++c) Q *= n + 2;
            min3_mid_bwd(S[ax], ga, gb, P, n, Q, ax == nd - 1 ? &d0 : NULL);
            float* t = ga;
            ga = gb;
            gb = t;
        }
        /* transposed filter along every axis ((n + 2)^nd -> n^nd) */
        for (int ax = 0; ax < nd; ++ax) {
            int64_t P = 1, Q = MB_W;
            for (int c = 0; c < ax; ++c) P *= n;
            for (int c = ax + 1; c < nd; ++c) Q *= n + 2;
            fir_mid_t(ga, gb, P, Q, &tf, NULL);
            float* t = ga;
            ga = gb;
            gb = t;
        }
        /* the epilogue, with the dot products in vector lanes flushed every 32 rows */
        for (int64_t l0 = 0; l0 < L; l0 += 32) {
            const int64_t l1 = L - l0 < 32 ? L : l0 + 32;
            v8f s1 = splat8(0.0f), s2 = s1;
            float t1 = 0.0f, t2 = 0.0f;
            for (int64_t l = l0; l < l1; ++l) {
                const float* g = ga + l * MB_W;
                const float* xl = xb + l * MB_W;
                const int64_t r = l * K + kb;
                if (l + PF_ROWS < L) {
                    const int64_t rp = r + PF_ROWS * K;
                    if (a) __builtin_prefetch(a + rp);
                    if (b) __builtin_prefetch(b + rp);
                    if (out != a && out != b) __builtin_prefetch(out + rp, 1);
                }
                int64_t q = 0;
                if (w == MB_W) {
                    for (; q < MB_W; q += 8) {
                        v8f v = splat8(wm) * ld8(g + q);
                        if (a) {
                            const v8f av = ld8(a + r + q);
                            s1 += av * ld8(xl + q);
                            v += splat8(wa) * av;
                        }
                        if (b) {
                            const v8f bv = ld8(b + r + q);
                            s2 += bv * ld8(xl + q);
                            v += splat8(wb) * bv;
                        }
                        st8(out + r + q, v);
                    }
                }
                for (; q < w; ++q) {
                    float v = wm * g[q];
                    if (a) {
                        t1 += a[r + q] * xl[q];
                        v += wa * a[r + q];
                    }
                    if (b) {
                        t2 += b[r + q] * xl[q];
                        v += wb * b[r + q];
                    }
                    out[r + q] = v;
                }
            }
            d1 += t1;
            d2 += t2;
            for (int u = 0; u < 8; ++u) {
                d1 += s1[u];
                d2 += s2[u];
            }
        }
    }
    dots[0] += d0;
    dots[1] += d1;
    dots[2] += d2;
    FTZ_END
}

/* Transpose of pdd_meanfield for rows [r0, r1):  out[r] = wd * d[r] + wc * c[r] + wm * MF^T(x[r])
 * (the gradient of the mean-field; sizes, NULL and aliasing rules as pdd_meanfield).
 * work: 2 * prod(g) + 32 * FLT_LEN(g[nd - 1], g[nd - 1], 13) floats. */
void pdd_meanfield_t(const float* x, const float* d, const float* c, float* out, int nd,
                     const int* g, int64_t r0, int64_t r1, float wd, float wc, float wm,
                     const float* taps, float* work) {
    FTZ_BEGIN
    int64_t G = 1;
    for (int a = 0; a < nd; ++a) G *= g[a];
    float *A = work, *B = work + G, *xpad = work + 2 * G;
    const int gl = g[nd - 1];
    memset(xpad, 0, sizeof(float) * 32 * FLT_LEN(gl, gl, 13));
    struct tfir tf[3];
    for (int a = 0; a < nd; ++a) tfir_init(&tf[a], taps, 13, 6, g[a], g[a]);
    for (int64_t r = r0; r < r1; ++r) {
        fir_last_t(x + r * G, A, G / gl, &tf[nd - 1], xpad);
        float *cur = A, *nxt = B;
        float* o = out + r * G;
        const struct epilogue e = {d ? d + r * G : NULL, c ? c + r * G : NULL, wd, wc, wm};
        if (nd == 1) {
            for (int64_t i = 0; i < G; ++i) {
                float v = wm * cur[i];
                if (e.d) v += wd * e.d[i];
                if (e.c) v += wc * e.c[i];
                o[i] = v;
            }
            continue;
        }
        int64_t P = 1, Q = G;
        for (int a = 0; a < nd - 1; ++a) {
            Q /= g[a];
            const int last = a == nd - 2;
            fir_mid_t(cur, last ? o : nxt, P, Q, &tf[a], last ? &e : NULL);
            P *= g[a];
            float* t = cur;
            cur = nxt;
            nxt = t;
        }
    }
    FTZ_END
}

/* exp(x) for x <= 0 (float32, relative error ~2e-7), written so that loops over it vectorise:
 * 2^(x log2 e) split into 2^k * 2^f, f in [-0.5, 0.5], with the degree-6 Taylor polynomial (error <
 * 2e-7 on the interval). */
static inline float exp_neg(float x) {
    x = x > -87.0f ? x : -87.0f;
    const float t = x * 1.44269504088896341f;
    const float k = floorf(t + 0.5f);
    const float f = t - k;
    float p = 1.540353039e-04f;
    p = p * f + 1.333355815e-03f;
    p = p * f + 9.618129108e-03f;
    p = p * f + 5.550410866e-02f;
    p = p * f + 2.402265070e-01f;
    p = p * f + 6.931471806e-01f;
    p = p * f + 1.0f;
    union {
        int32_t i;
        float f;
    } u;
    u.i = ((int32_t)k + 127) << 23;
    return p * u.f;
}

/* mn[q] = min over the L rows of cost (L, K) at column kb + q, q < w (streaming the rows). */
static void column_min(const float* cost, int64_t L, int64_t K, int64_t kb, int64_t w,
                       float* RESTRICT mn) {
    for (int64_t q = 0; q < w; ++q) mn[q] = INFINITY;
    for (int64_t l = 0; l < L; ++l) {
        const float* RESTRICT c = cost + l * K + kb;
        for (int64_t q = 0; q < w; ++q) mn[q] = c[q] < mn[q] ? c[q] : mn[q];
    }
}

/* Expected displacement of softmax(-cost) over L, columns [k0, k1) of one batch item.
 * cost: (L, K); disp: (L, nd) displacement set; out: (nd, K), nd <= 3.  Columns go in tiles
 * of SF_T; each tile streams through the rows twice (minimum, then exponentials and sums),
 * reading contiguous row segments.  work: 5 * SF_T floats. */
#define SF_T 2048
void pdd_soft_field(const float* cost, const float* disp, float* out, int64_t L, int64_t K, int nd,
                    int64_t k0, int64_t k1, float* work) {
    FTZ_BEGIN
    float* RESTRICT mn = work;
    float* RESTRICT s = work + SF_T;
    float* RESTRICT acc = work + 2 * SF_T;
    for (int64_t kb = k0; kb < k1; kb += SF_T) {
        const int64_t w = (k1 - kb) < SF_T ? (k1 - kb) : SF_T;
        column_min(cost, L, K, kb, w, mn);
        for (int64_t q = 0; q < w; ++q) s[q] = 0.0f;
        for (int64_t q = 0; q < 3 * SF_T; ++q) acc[q] = 0.0f;
        for (int64_t l = 0; l < L; ++l) {
            const float* RESTRICT c = cost + l * K + kb;
            const float d0 = disp[l * nd];
            const float d1 = nd > 1 ? disp[l * nd + 1] : 0.0f;
            const float d2 = nd > 2 ? disp[l * nd + 2] : 0.0f;
            float *RESTRICT a0 = acc, *RESTRICT a1 = acc + SF_T, *RESTRICT a2 = acc + 2 * SF_T;
            for (int64_t q = 0; q < w; ++q) {
                const float e = exp_neg(mn[q] - c[q]);
                s[q] += e;
                a0[q] += d0 * e;
                a1[q] += d1 * e;
                a2[q] += d2 * e;
            }
        }
        for (int a = 0; a < nd; ++a)
            for (int64_t q = 0; q < w; ++q) out[a * K + kb + q] = acc[a * SF_T + q] / s[q];
    }
    FTZ_END
}

/* out = softmax(-cost) over L, columns [k0, k1) of one batch item; cost, out: (L, K), out may
 * be cost.  Tiles of SF_T columns, three streaming passes over the rows (minimum;
 * exponentials and their sum; scaling).  work: SF_T * 2 floats. */
void pdd_softmax_neg(const float* cost, float* out, int64_t L, int64_t K, int64_t k0, int64_t k1,
                     float* work) {
    FTZ_BEGIN
    float* RESTRICT mn = work;
    float* RESTRICT s = work + SF_T;
    for (int64_t kb = k0; kb < k1; kb += SF_T) {
        const int64_t w = (k1 - kb) < SF_T ? (k1 - kb) : SF_T;
        column_min(cost, L, K, kb, w, mn);
        for (int64_t q = 0; q < w; ++q) s[q] = 0.0f;
        for (int64_t l = 0; l < L; ++l) {
            const float* c = cost + l * K + kb;
            float* o = out + l * K + kb;
            for (int64_t q = 0; q < w; ++q) {
                const float e = exp_neg(mn[q] - c[q]);
                o[q] = e;
                s[q] += e;
            }
        }
        for (int64_t q = 0; q < w; ++q) s[q] = 1.0f / s[q];
        for (int64_t l = 0; l < L; ++l) {
            float* RESTRICT o = out + l * K + kb;
            for (int64_t q = 0; q < w; ++q) o[q] *= s[q];
        }
    }
    FTZ_END
}

/* prob = softmax(-cost) over L and field = sum_l prob_l disp[l] (nd <= 3 components), columns
 * [k0, k1) of one batch item, in one streaming pass for both (plus the minimum and the scaling
 * of prob): the values of pdd_softmax_neg and pdd_soft_field.  cost, prob: (L, K), prob may be
 * cost; field: (nd, K); either output may be NULL.  work: 5 * SF_T floats. */
void pdd_softmax_field(const float* cost, const float* disp, float* prob, float* field, int64_t L,
                       int64_t K, int nd, int64_t k0, int64_t k1, float* work) {
    FTZ_BEGIN
    float* RESTRICT mn = work;
    float* RESTRICT s = work + SF_T;
    float* RESTRICT acc = work + 2 * SF_T;
    for (int64_t kb = k0; kb < k1; kb += SF_T) {
        const int64_t w = (k1 - kb) < SF_T ? (k1 - kb) : SF_T;
        column_min(cost, L, K, kb, w, mn);
        for (int64_t q = 0; q < w; ++q) s[q] = 0.0f;
        for (int64_t q = 0; q < 3 * SF_T; ++q) acc[q] = 0.0f;
        for (int64_t l = 0; l < L; ++l) {
            const float* c = cost + l * K + kb;
            if (field) {
                const float d0 = disp[l * nd];
                const float d1 = nd > 1 ? disp[l * nd + 1] : 0.0f;
                const float d2 = nd > 2 ? disp[l * nd + 2] : 0.0f;
                float *RESTRICT a0 = acc, *RESTRICT a1 = acc + SF_T, *RESTRICT a2 = acc + 2 * SF_T;
                if (prob) {
                    float* o = prob + l * K + kb;
                    for (int64_t q = 0; q < w; ++q) {
                        const float e = exp_neg(mn[q] - c[q]);
                        o[q] = e;
                        s[q] += e;
                        a0[q] += d0 * e;
                        a1[q] += d1 * e;
                        a2[q] += d2 * e;
                    }
                } else {
                    for (int64_t q = 0; q < w; ++q) {
                        const float e = exp_neg(mn[q] - c[q]);
                        s[q] += e;
                        a0[q] += d0 * e;
                        a1[q] += d1 * e;
                        a2[q] += d2 * e;
                    }
                }
            } else {
                float* o = prob + l * K + kb;
                for (int64_t q = 0; q < w; ++q) {
                    const float e = exp_neg(mn[q] - c[q]);
                    o[q] = e;
                    s[q] += e;
                }
            }
        }
        if (field)
            for (int a = 0; a < nd; ++a)
                for (int64_t q = 0; q < w; ++q) field[a * K + kb + q] = acc[a * SF_T + q] / s[q];
        if (prob) {
            for (int64_t q = 0; q < w; ++q) s[q] = 1.0f / s[q];
            for (int64_t l = 0; l < L; ++l) {
                float* RESTRICT o = prob + l * K + kb;
                for (int64_t q = 0; q < w; ++q) o[q] *= s[q];
            }
        }
    }
    FTZ_END
}

/* Gradient w.r.t. cost of prob = softmax(-cost), given the gradients dprob (L, K) of prob and
 * gfield (nd, K) of field = sum_l prob_l disp[l] (either may be NULL), columns [k0, k1) of one
 * batch item:
 *   dp_l = dprob_l + sum_i disp[l, i] gfield_i,    out_l = -p_l (dp_l - sum_m p_m dp_m).
 * p is read from prob, or (prob NULL) recomputed from cost, when out holds the exponentials
 * between two passes and may not be dprob; with prob, out may be dprob.  work: 3 * SF_T floats
 * (+ SF_T for the zero component tiles). */
void pdd_softmax_bwd(const float* prob, const float* cost, const float* dprob,
                     const float* gfield, const float* disp, float* out, int64_t L, int64_t K,
                     int nd, int64_t k0, int64_t k1, float* work) {
    FTZ_BEGIN
    float* RESTRICT mn = work;
    float* RESTRICT z = work + SF_T;
    float* RESTRICT s = work + 2 * SF_T;
    float* zero = work + 3 * SF_T;
    for (int64_t q = 0; q < SF_T; ++q) zero[q] = 0.0f;
    for (int64_t kb = k0; kb < k1; kb += SF_T) {
        const int64_t w = (k1 - kb) < SF_T ? (k1 - kb) : SF_T;
        const float* gp[3];
        for (int a = 0; a < 3; ++a) gp[a] = gfield && a < nd ? gfield + a * K + kb : zero;
        for (int64_t q = 0; q < w; ++q) s[q] = 0.0f;
        if (!prob) {
            column_min(cost, L, K, kb, w, mn);
            for (int64_t q = 0; q < w; ++q) z[q] = 0.0f;
        }
        for (int64_t l = 0; l < L; ++l) {
            const float d0 = gfield ? disp[l * nd] : 0.0f;
            const float d1 = gfield && nd > 1 ? disp[l * nd + 1] : 0.0f;
            const float d2 = gfield && nd > 2 ? disp[l * nd + 2] : 0.0f;
            const float* RESTRICT dp = dprob ? dprob + l * K + kb : zero;
            const float *RESTRICT g0 = gp[0], *RESTRICT g1 = gp[1], *RESTRICT g2 = gp[2];
            if (prob) {
                const float* RESTRICT p = prob + l * K + kb;
                for (int64_t q = 0; q < w; ++q)
                    s[q] += p[q] * (dp[q] + d0 * g0[q] + d1 * g1[q] + d2 * g2[q]);
            } else {
                const float* RESTRICT c = cost + l * K + kb;
                float* RESTRICT o = out + l * K + kb;
                for (int64_t q = 0; q < w; ++q) {
                    const float e = exp_neg(mn[q] - c[q]);
                    o[q] = e;
                    z[q] += e;
                    s[q] += e * (dp[q] + d0 * g0[q] + d1 * g1[q] + d2 * g2[q]);
                }
            }
        }
        if (!prob)
            for (int64_t q = 0; q < w; ++q) {
                z[q] = 1.0f / z[q];
                s[q] *= z[q];
            }
        for (int64_t l = 0; l < L; ++l) {
            const float d0 = gfield ? disp[l * nd] : 0.0f;
            const float d1 = gfield && nd > 1 ? disp[l * nd + 1] : 0.0f;
            const float d2 = gfield && nd > 2 ? disp[l * nd + 2] : 0.0f;
            const float* dp = dprob ? dprob + l * K + kb : zero;
            const float *RESTRICT g0 = gp[0], *RESTRICT g1 = gp[1], *RESTRICT g2 = gp[2];
            float* o = out + l * K + kb;
            if (prob) {
                const float* RESTRICT p = prob + l * K + kb;
                for (int64_t q = 0; q < w; ++q)
                    o[q] = -p[q] * (dp[q] + d0 * g0[q] + d1 * g1[q] + d2 * g2[q] - s[q]);
            } else {
                for (int64_t q = 0; q < w; ++q)
                    o[q] = -(o[q] * z[q]) * (dp[q] + d0 * g0[q] + d1 * g1[q] + d2 * g2[q] - s[q]);
            }
        }
    }
    FTZ_END
}

/* Linear resampling along the middle axis, rows [p0, p1): y (P, o, Q) from x (P, n, Q) with
 *   y[p, i, q] = w0[i] x[p, i0[i], q] + w1[i] x[p, i1[i], q]
 * (indices in range, weights 0 for taps outside the map). */
void pdd_resample(const float* x, float* y, int64_t n, int64_t Q, int64_t o, const int64_t* i0,
                  const float* w0, const int64_t* i1, const float* w1, int64_t p0, int64_t p1) {
    FTZ_BEGIN
    for (int64_t p = p0; p < p1; ++p) {
        const float* xp = x + p * n * Q;
        float* yp = y + p * o * Q;
        if (Q == 1) {
            for (int64_t i = 0; i < o; ++i) yp[i] = w0[i] * xp[i0[i]] + w1[i] * xp[i1[i]];
            continue;
        }
        for (int64_t i = 0; i < o; ++i) {
            const float a = w0[i], b = w1[i];
            const float* RESTRICT xa = xp + i0[i] * Q;
            const float* RESTRICT xb = xp + i1[i] * Q;
            float* RESTRICT yi = yp + i * Q;
            for (int64_t q = 0; q < Q; ++q) yi[q] = a * xa[q] + b * xb[q];
        }
    }
    FTZ_END
}

/* The lattices of the correlation kernels store their last axis phase-major: for the lattice
 * step a2 of that axis, natural node a2 q + phi (phi < a2) lies at phi * plen + q of its row
 * (rows of a2 * plen floats; a2 = 1: the natural order).  Then the nodes a2 k + o of the points
 * k of a row are contiguous in k for every offset o = b2 j: at lat_off(o) + k. */
static inline int64_t lat_off(int64_t o, int64_t a2, int64_t plen) {
    return (o % a2) * plen + o / a2;
}

/* SSD correlation on a lattice, rows [r0, r1) of the control grid of one batch item.
 *   out[l, k] = sum_c (f[c, k] - g[c, a * k + b * j])**2   (per axis: node a_ax k_ax + b_ax j_ax)
 * f: (C, G0, G1, G2) fixed features at the control points; g: (C, N0, N1, N2) moving features
 * resampled onto the lattice, the last axis phase-major (N2 = a2 * plen, see lat_off); out:
 * (L, G0, G1, G2) with L = nj0 nj1 nj2 (C order).  Lower dimensions use leading axes of size 1
 * (G = N = nj = 1).  A "row" is one (k0, k1) (r0, r1 count rows); 8 points of a row per vector.
 * With ``dot``: out[l, k] = sum_c f[c, k] g[c, n] instead (the gradient of expected values
 * w.r.t. the probabilities). */
static inline v8f term8(v8f f, v8f g, const int dot) {
    const v8f d = f - g;
    return dot ? f * g : d * d;
}

static inline float term1(float f, float g, const int dot) {
    const float d = f - g;
    return dot ? f * g : d * d;
}

static inline __attribute__((always_inline)) void correlation_impl(
    const float* f, const float* g, float* out, int C, const int64_t* G, const int64_t* N,
    const int64_t* a, const int64_t* b, const int64_t* nj, int64_t plen, int64_t r0, int64_t r1,
    const int dot) {
    const int64_t Gt = G[0] * G[1] * G[2], Nt = N[0] * N[1] * N[2], G2 = G[2];
    const int64_t a2 = a[2], b2 = b[2];
    for (int64_t rs = r0, re; rs < r1; rs = re) {
        /* the rows of one plane k0: its lattice planes stay in cache over j1, k1 and j2 */
        const int64_t k0 = rs / G[1];
        re = (k0 + 1) * G[1] < r1 ? (k0 + 1) * G[1] : r1;
        for (int64_t j0 = 0; j0 < nj[0]; ++j0) {
            const int64_t z = a[0] * k0 + b[0] * j0;
            for (int64_t j1 = 0; j1 < nj[1]; ++j1) {
                for (int64_t row = rs; row < re; ++row) {
                    const int64_t k1 = row % G[1];
                    const float* fr = f + row * G2;
                    const int64_t y = a[1] * k1 + b[1] * j1;
                    const float* gr = g + (z * N[1] + y) * N[2];
                    const int64_t l0 = (j0 * nj[1] + j1) * nj[2];
                    int64_t j2 = 0;
                    /* 4 displacements x 16 points: 8 independent accumulators */
                    for (; j2 + 4 <= nj[2]; j2 += 4) {
                        const float* gx[4];
                        for (int u = 0; u < 4; ++u) gx[u] = gr + lat_off(b2 * (j2 + u), a2, plen);
                        float* o = out + (l0 + j2) * Gt + row * G2;
                        int64_t k = 0;
                        for (; k + 16 <= G2; k += 16) {
                            v8f s[8];
                            for (int u = 0; u < 8; ++u) s[u] = splat8(0.0f);
                            for (int c = 0; c < C; ++c) {
                                const float* fc = fr + c * Gt + k;
                                const v8f f0 = ld8(fc), f1 = ld8(fc + 8);
                                for (int u = 0; u < 4; ++u) {
                                    const float* gc = gx[u] + c * Nt + k;
                                    s[2 * u] += term8(f0, ld8(gc), dot);
                                    s[2 * u + 1] += term8(f1, ld8(gc + 8), dot);
                                }
                            }
                            for (int u = 0; u < 4; ++u) {
                                st8(o + u * Gt + k, s[2 * u]);
                                st8(o + u * Gt + k + 8, s[2 * u + 1]);
                            }
                        }
                        /* 8-wide, the last block overlapping (outputs recomputed) */
                        for (int64_t k8 = k; k < G2 && G2 >= 8; k8 = k) {
                            k = k8 + 8 <= G2 ? k8 : G2 - 8;
                            v8f s4[4];
                            for (int u = 0; u < 4; ++u) s4[u] = splat8(0.0f);
                            for (int c = 0; c < C; ++c) {
                                const v8f f0 = ld8(fr + c * Gt + k);
                                for (int u = 0; u < 4; ++u)
                                    s4[u] += term8(f0, ld8(gx[u] + c * Nt + k), dot);
                            }
                            for (int u = 0; u < 4; ++u) st8(o + u * Gt + k, s4[u]);
                            k += 8;
                        }
                        for (; k < G2; ++k) {
                            for (int u = 0; u < 4; ++u) {
                                float acc = 0.0f;
                                for (int c = 0; c < C; ++c)
                                    acc += term1(fr[c * Gt + k], gx[u][c * Nt + k], dot);
                                o[u * Gt + k] = acc;
                            }
                        }
                    }
                    for (; j2 < nj[2]; ++j2) {
                        const float* gx = gr + lat_off(b2 * j2, a2, plen);
                        float* o = out + (l0 + j2) * Gt + row * G2;
                        int64_t k = 0;
                        for (int64_t k8 = 0; k < G2 && G2 >= 8; k8 = k) {
                            k = k8 + 8 <= G2 ? k8 : G2 - 8; /* the last block overlapping */
                            v8f s0 = splat8(0.0f), s1 = s0;
                            int c = 0;
                            for (; c + 2 <= C; c += 2) {
                                s0 += term8(ld8(fr + c * Gt + k), ld8(gx + c * Nt + k), dot);
                                s1 += term8(ld8(fr + (c + 1) * Gt + k),
                                            ld8(gx + (c + 1) * Nt + k), dot);
                            }
                            for (; c < C; ++c)
                                s0 += term8(ld8(fr + c * Gt + k), ld8(gx + c * Nt + k), dot);
                            st8(o + k, s0 + s1);
                            k += 8;
                        }
                        for (; k < G2; ++k) {
                            float acc = 0.0f;
                            for (int c = 0; c < C; ++c)
                                acc += term1(fr[c * Gt + k], gx[c * Nt + k], dot);
                            o[k] = acc;
                        }
                    }
                }
            }
        }
    }
}

void pdd_correlation(const float* f, const float* g, float* out, int C, const int64_t* G,
                     const int64_t* N, const int64_t* a, const int64_t* b, const int64_t* nj,
                     int64_t plen, int64_t r0, int64_t r1, int dot) {
    FTZ_BEGIN
    if (dot)
        correlation_impl(f, g, out, C, G, N, a, b, nj, plen, r0, r1, 1);
    else
        correlation_impl(f, g, out, C, G, N, a, b, nj, plen, r0, r1, 0);
    FTZ_END
}

/* The lattice sums behind the correlation's gradient and the expected values, rows [r0, r1) of
 * the control grid of one batch item (node n(k, l) = a k + b j_l per axis, sizes and the
 * phase-major last axis as pdd_correlation; w: (L, G0, G1, G2) weights, e.g. the cost gradient
 * or the probabilities):
 *   T[c, k] = sum_l w[l, k] g[c, n(k, l)]       S[k] = sum_l w[l, k]        (rows r0 .. r1)
 *   U[c, m] += sum_{(k, l): n(k, l) = m} w[l, k] f[c, k]    W[m] += sum w[l, k]
 * Any of T, S, U, W may be NULL; T and S are written for the rows of the range (channel
 * stride ts of T: with Gt a multiple of 1024, as at 32^3, the channels' rows would lie a
 * multiple of 4 kB apart, where each load after the store of the previous channel seems to
 * depend on it and waits, 2.5x slower), U and W (C, N0, N1, N2) and (N0, N1, N2), phase-major
 * like g, are accumulated (the caller gives each range its own). */
void pdd_lattice_sums(const float* w, const float* f, const float* g, float* T, float* S,
                      float* U, float* W, int C, const int64_t* G, const int64_t* N,
                      const int64_t* a, const int64_t* b, const int64_t* nj, int64_t plen,
                      int64_t ts, int64_t r0, int64_t r1) {
    FTZ_BEGIN
    const int64_t Gt = G[0] * G[1] * G[2], Nt = N[0] * N[1] * N[2], G2 = G[2];
    const int64_t a2 = a[2], b2 = b[2];
    for (int64_t row = r0; row < r1; ++row) {
        for (int64_t k = 0; k < G2; ++k) {
            if (S) S[row * G2 + k] = 0.0f;
            if (T)
                for (int c = 0; c < C; ++c) T[c * ts + row * G2 + k] = 0.0f;
        }
    }
    for (int64_t rs = r0, re; rs < r1; rs = re) {
        const int64_t k0 = rs / G[1];
        re = (k0 + 1) * G[1] < r1 ? (k0 + 1) * G[1] : r1;
        for (int64_t j0 = 0; j0 < nj[0]; ++j0) {
            const int64_t z = a[0] * k0 + b[0] * j0;
            for (int64_t j1 = 0; j1 < nj[1]; ++j1) {
                for (int64_t row = rs; row < re; ++row) {
                    const int64_t k1 = row % G[1];
                    const int64_t y = a[1] * k1 + b[1] * j1;
                    const int64_t l0 = (j0 * nj[1] + j1) * nj[2];
                    const int64_t base = (z * N[1] + y) * N[2];
                    const float* fr = f ? f + row * G2 : NULL;
                    float* Tr = T ? T + row * G2 : NULL;
                    float* Sr = S ? S + row * G2 : NULL;
                    for (int64_t j2 = 0; j2 < nj[2]; ++j2) {
                        const float* wl = w + (l0 + j2) * Gt + row * G2;
                        const int64_t m0 = base + lat_off(b2 * j2, a2, plen); /* node of k2 = 0 */
                        int64_t k = 0;
                        for (int64_t k8 = 0; k < G2 && G2 >= 8; k8 = k) {
                            /* the last block overlaps the previous one: its lanes below k8 add
                             * exact zeros (masked products) */
                            k = k8 + 8 <= G2 ? k8 : G2 - 8;
                            v8i keep = {0, 1, 2, 3, 4, 5, 6, 7};
                            keep = keep >= (v8i){0, 0, 0, 0, 0, 0, 0, 0} + (int32_t)(k8 - k);
                            const v8f wv = and8(keep, ld8(wl + k));
                            const int64_t m = m0 + k;
                            if (Sr) st8(Sr + k, ld8(Sr + k) + wv);
                            if (W) st8(W + m, ld8(W + m) + wv);
                            if (Tr)
                                for (int c = 0; c < C; ++c) {
                                    float* t = Tr + c * ts + k;
                                    st8(t, ld8(t) + and8(keep, wv * ld8(g + c * Nt + m)));
                                }
                            if (U)
                                for (int c = 0; c < C; ++c) {
                                    float* u = U + c * Nt + m;
                                    st8(u, ld8(u) + and8(keep, wv * ld8(fr + c * Gt + k)));
                                }
                            k += 8;
                        }
                        for (; k < G2; ++k) {
                            const float wv = wl[k];
                            const int64_t m = m0 + k;
                            if (Sr) Sr[k] += wv;
                            if (W) W[m] += wv;
                            if (Tr)
                                for (int c = 0; c < C; ++c) Tr[c * ts + k] += wv * g[c * Nt + m];
                            if (U)
                                for (int c = 0; c < C; ++c) U[c * Nt + m] += wv * fr[c * Gt + k];
                        }
                    }
                }
            }
        }
    }
    FTZ_END
}

/* Transpose (gradient) of pdd_resample, rows [p0, p1):
 *   x[p, j, q] = sum over the taps (i, t) with i_t[i] = j of w_t[i] y[p, i, q]. */
void pdd_resample_t(const float* y, float* x, int64_t n, int64_t Q, int64_t o, const int64_t* i0,
                    const float* w0, const int64_t* i1, const float* w1, int64_t p0, int64_t p1) {
    FTZ_BEGIN
    for (int64_t p = p0; p < p1; ++p) {
        const float* yp = y + p * o * Q;
        float* xp = x + p * n * Q;
        memset(xp, 0, sizeof(float) * n * Q);
        if (Q == 1) {
            for (int64_t i = 0; i < o; ++i) {
                xp[i0[i]] += w0[i] * yp[i];
                xp[i1[i]] += w1[i] * yp[i];
            }
            continue;
        }
        for (int64_t i = 0; i < o; ++i) {
            const float a = w0[i], c = w1[i];
            const float* RESTRICT yi = yp + i * Q;
            float* RESTRICT xa = xp + i0[i] * Q;
            for (int64_t q = 0; q < Q; ++q) xa[q] += a * yi[q];
            if (c != 0.0f) {
                float* RESTRICT xb = xp + i1[i] * Q;
                for (int64_t q = 0; q < Q; ++q) xb[q] += c * yi[q];
            }
        }
    }
    FTZ_END
}

/* Warped feature SSD and its gradient (instance optimisation), voxels [p0, p1) of one item.
 *
 * f, m: fixed and moving features on the same grid S (nd = 2 or 3 axes), channels last (N, C);
 * u: displacement (nd, N) in voxels, channel first.  With x_i + u_i(x) clamped to [0, S_i - 1]
 * (border padding) and multilinear interpolation of m there, as grid_sample(align_corners=True,
 * padding_mode="border"):
 *   ssd[x] = sum_c (m_c(x + u(x)) - f_c(x))^2,   g[i, x] = d ssd[x] / d u_i(x)
 * (0 where the coordinate is clamped, as grid_sample's gradient).  With a moving mask mk (N)
 * (else NULL): wk[x] = mk(x + u(x)) with zeros outside the map (padding_mode="zeros", not
 * clamped) and gk[i, x] = d wk[x] / d u_i(x). */
static inline void lerp_axis(float q, int64_t n, int64_t* i0, float* t, float* on) {
    *on = 1.0f;
    if (!(q > 0.0f)) { q = 0.0f; *on = 0.0f; }  /* NaN as well */
    if (q >= (float)(n - 1)) { q = (float)(n - 1); *on = 0.0f; }
    int64_t i = (int64_t)q;
    if (i > n - 2) i = n - 2;
    if (i < 0) i = 0;
    *i0 = i;
    *t = n > 1 ? q - (float)i : 0.0f;
}

/* mk (grid S, nd axes) at position q (voxels) with zero padding (grid_sample's "zeros": corners
 * outside the map read 0, nothing is clamped): the value, and its gradient in gq. */
static inline float mk_at(const float* mk, const int64_t* S, int64_t z, int64_t y, int64_t x) {
    if (z < 0 || y < 0 || x < 0 || z >= S[0] || y >= S[1] || x >= S[2]) return 0.0f;
    return mk[(z * S[1] + y) * S[2] + x];
}

/* Multilinear value of the corners c (000, 001, 010, 011, 100, 101, 110, 111: z, y, x bits; the
 * first four in 2D) at fractions (tz, ty, tx), and its gradient in gq (axes in array order). */
static inline float lerp_corners(const float* c, int nd, float tz, float ty, float tx, float* gq) {
    const float x00 = c[1] - c[0], x01 = c[3] - c[2];
    const float e00 = c[0] + tx * x00, e01 = c[2] + tx * x01;
    const float f0 = e00 + ty * (e01 - e00);
    if (nd == 2) {
        gq[0] = e01 - e00;
        gq[1] = x00 + ty * (x01 - x00);
        return f0;
    }
    const float x10 = c[5] - c[4], x11 = c[7] - c[6];
    const float e10 = c[4] + tx * x10, e11 = c[6] + tx * x11;
    const float f1 = e10 + ty * (e11 - e10);
    gq[0] = f1 - f0;
    gq[1] = (e01 - e00) + tz * ((e11 - e10) - (e01 - e00));
    const float h0 = x00 + ty * (x01 - x00), h1 = x10 + ty * (x11 - x10);
    gq[2] = h0 + tz * (h1 - h0);
    return f0 + tz * (f1 - f0);
}

static float mask_at(const float* mk, int nd, const int64_t* S, const float* q, float* gq) {
    for (int a = 0; a < nd; ++a) gq[a] = 0.0f;
    for (int a = 0; a < nd; ++a)
        if (!(q[a] > -2.0f && q[a] < (float)S[a] + 1.0f)) return 0.0f; /* outside, or NaN */
    const int64_t S3[3] = {nd == 3 ? S[0] : 1, S[nd - 2], S[nd - 1]};
    const float qz = nd == 3 ? q[0] : 0.0f, qy = q[nd - 2], qx = q[nd - 1];
    const float fz = floorf(qz), fy = floorf(qy), fx = floorf(qx);
    const int64_t z = (int64_t)fz, y = (int64_t)fy, x = (int64_t)fx;
    float c[8];
    for (int k = 0; k < (nd == 3 ? 8 : 4); ++k)
        c[k] = mk_at(mk, S3, z + (k >> 2), y + ((k >> 1) & 1), x + (k & 1));
    return lerp_corners(c, nd, qz - fz, qy - fy, qx - fx, gq);
}

void pdd_warp_ssd(const float* f, const float* m, const float* u, float* ssd, float* g,
                  const float* mk, float* wk, float* gk, int nd, const int64_t* S, int C,
                  int64_t p0, int64_t p1) {
    FTZ_BEGIN
    const int64_t N = nd == 3 ? S[0] * S[1] * S[2] : S[0] * S[1];
    const int64_t nz = nd == 3 ? S[0] : 1, ny = S[nd - 2], nx = S[nd - 1];
    const int64_t dy = nx > 1 ? C : 0, sy = ny > 1 ? nx * C : 0, sz = nz > 1 ? ny * nx * C : 0;
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t x = p % nx, y = (p / nx) % ny, z = p / (nx * ny);
        int64_t ix, iy, iz = 0;
        float tx, ty, tz = 0.0f, ox, oy, oz = 0.0f;
        lerp_axis((float)x + u[(nd - 1) * N + p], nx, &ix, &tx, &ox);
        lerp_axis((float)y + u[(nd - 2) * N + p], ny, &iy, &ty, &oy);
        if (nd == 3) lerp_axis((float)z + u[p], nz, &iz, &tz, &oz);
        const float* RESTRICT fp = f + p * C;
        const float* RESTRICT a = m + ((iz * ny + iy) * nx + ix) * C; /* corner (0, 0, 0) */
        float s = 0.0f, gx = 0.0f, gy = 0.0f, gz = 0.0f;
        if (nd == 2) {
            for (int c = 0; c < C; ++c) {
                const float m00 = a[c], m01 = a[dy + c], m10 = a[sy + c], m11 = a[sy + dy + c];
                const float e0 = m00 + tx * (m01 - m00), e1 = m10 + tx * (m11 - m10);
                const float r = e0 + ty * (e1 - e0) - fp[c];
                s += r * r;
                gy += r * (e1 - e0);
                gx += r * ((m01 - m00) + ty * ((m11 - m10) - (m01 - m00)));
            }
        } else {
            for (int c = 0; c < C; ++c) {
                const float m000 = a[c], m001 = a[dy + c], m010 = a[sy + c],
                            m011 = a[sy + dy + c];
                const float m100 = a[sz + c], m101 = a[sz + dy + c], m110 = a[sz + sy + c],
                            m111 = a[sz + sy + dy + c];
                const float x00 = m001 - m000, x01 = m011 - m010, x10 = m101 - m100,
                            x11 = m111 - m110;
                const float e00 = m000 + tx * x00, e01 = m010 + tx * x01;
                const float e10 = m100 + tx * x10, e11 = m110 + tx * x11;
                const float f0 = e00 + ty * (e01 - e00), f1 = e10 + ty * (e11 - e10);
                const float r = f0 + tz * (f1 - f0) - fp[c];
                s += r * r;
                gz += r * (f1 - f0);
                gy += r * ((e01 - e00) + tz * ((e11 - e10) - (e01 - e00)));
                const float h0 = x00 + ty * (x01 - x00), h1 = x10 + ty * (x11 - x10);
                gx += r * (h0 + tz * (h1 - h0));
            }
            g[p] = 2.0f * oz * gz;
        }
        ssd[p] = s;
        g[(nd - 2) * N + p] = 2.0f * oy * gy;
        g[(nd - 1) * N + p] = 2.0f * ox * gx;
        if (mk && ox * oy * (nd == 3 ? oz : 1.0f) != 0.0f) {
            /* inside on every axis: the mask's corners are the features' (same grid, same
             * weights), no padding to check */
            const float* RESTRICT k = mk + (iz * ny + iy) * nx + ix;
            const int64_t ky = ny > 1 ? nx : 0, kz = nz > 1 ? ny * nx : 0, kx = nx > 1 ? 1 : 0;
            float c[8], gq[3];
            for (int j = 0; j < (nd == 3 ? 8 : 4); ++j)
                c[j] = k[(j >> 2) * kz + ((j >> 1) & 1) * ky + (j & 1) * kx];
            wk[p] = lerp_corners(c, nd, tz, ty, tx, gq);
            for (int a = 0; a < nd; ++a) gk[a * N + p] = gq[a];
        } else if (mk) {
            float q[3], gq[3];
            q[nd - 1] = (float)x + u[(nd - 1) * N + p];
            q[nd - 2] = (float)y + u[(nd - 2) * N + p];
            if (nd == 3) q[0] = (float)z + u[p];
            for (int a = 0; a < nd; ++a)
                if (S[a] == 1) q[a] = 0.0f; /* grid_sample: a size-1 axis reads index 0 */
            wk[p] = mask_at(mk, nd, S, q, gq);
            for (int a = 0; a < nd; ++a) gk[a * N + p] = S[a] == 1 ? 0.0f : gq[a];
        }
    }
    FTZ_END
}

/* The rest of an instance-optimisation step after pdd_warp_ssd (feature_optimise's native
 * loop), voxels [p0, p1) of one item of N voxels.
 *
 * pdd_io_sums: the weighted SSD's sums, out[0] += sum w, out[1] += sum w ssd (double), with
 * w = fm * wk (either NULL: 1).
 * pdd_io_grad: the gradient of the weighted mean  sum(w ssd) / norm  with respect to the dense
 * field, in place of g (nd, N):  (w g + fm gk (ssd - data)) * inv_norm  (gk NULL: no mask
 * term; fm NULL: 1).
 * pdd_io_adam: g plus the diffusion term's gradient on the control grid G (nd axes) makes one
 * Adam step from p into out (not in place: neighbours are read).  Per component a and axis j
 * with forward differences d = q(x + e_j) - q(x) of q = p * sc[a]:
 *   g_a += lam sc[a]^2 k[j] ((p(x) - p(x - e_j)) [x_j >= 1] - (p(x + e_j) - p(x)) [x_j <= n_j - 2])
 * (k[j] = 2 / numel(d_j); an axis with n_j < 2 has no term), then
 *   m = b1 m + a1 g,  v = b2 v + a2 g^2,  out = p - c1 m / (sqrt(v / c2) + eps)
 * with a1 = 1 - b1, a2 = 1 - b2 (rounded from double: 1 - 0.999f is 1.3e-5 off), c1 = lr /
 * (1 - b1^t), c2 = 1 - b2^t (coef: nd weights lam k[j], then nd sc[a]^2), on rows [r0, r1) of
 * the grid (z, y; 2D: y).  Items are consecutive in p, g, m, v, out. */
void pdd_io_sums(const float* ssd, const float* wk, const float* fm, int64_t p0, int64_t p1,
                 double* out) {
    double sw = 0.0, sws = 0.0;
    for (int64_t p = p0; p < p1; ++p) {
        const double w = (double)((fm ? fm[p] : 1.0f) * (wk ? wk[p] : 1.0f));
        sw += w;
        sws += w * (double)ssd[p];
    }
    out[0] += sw;
    out[1] += sws;
}

void pdd_io_grad(const float* ssd, float* g, const float* wk, const float* gk, const float* fm,
                 float data, float inv_norm, int nd, int64_t N, int64_t p0, int64_t p1) {
    FTZ_BEGIN
    for (int64_t p = p0; p < p1; ++p) {
        const float f = fm ? fm[p] : 1.0f;
        const float w = f * (wk ? wk[p] : 1.0f);
        const float c = f * (ssd[p] - data);
        for (int a = 0; a < nd; ++a) {
            float v = w * g[a * N + p];
            if (gk) v += gk[a * N + p] * c;
            g[a * N + p] = v * inv_norm;
        }
    }
    FTZ_END
}

static inline void io_adam_one(float h, float gt, float* m, float* v, float* out, float b1,
                               float b2, float a1, float a2, float c1, float c2, float eps) {
    const float mi = b1 * *m + a1 * gt;
    const float vi = b2 * *v + a2 * gt * gt;
    *m = mi;
    *v = vi;
    *out = h - c1 * mi / (sqrtf(vi / c2) + eps);
}

void pdd_io_adam(const float* p, const float* g, float* m, float* v, float* out, int nd,
                 const int64_t* G, const float* coef, float b1, float b2, float a1, float a2,
                 float c1, float c2, float eps, int64_t r0, int64_t r1) {
    FTZ_BEGIN
    const int64_t nz = nd == 3 ? G[0] : 1, ny = G[nd - 2], nx = G[nd - 1];
    const int64_t N = nz * ny * nx, plane = ny * nx;
    const float wz = nd == 3 && nz >= 2 ? coef[0] : 0.0f;
    const float wy = ny >= 2 ? coef[nd - 2] : 0.0f, wx = nx >= 2 ? coef[nd - 1] : 0.0f;
    for (int a = 0; a < nd; ++a) {
        const float sa = coef[nd + a];
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t z = r / ny, y = r % ny, o = a * N + r * nx;
            const float* RESTRICT row = p + o;
            /* a missing neighbour reads the voxel itself: its difference is 0 */
            const float* RESTRICT yb = y >= 1 ? row - nx : row;
            const float* RESTRICT yf = y <= ny - 2 ? row + nx : row;
            const float* RESTRICT zb = z >= 1 ? row - plane : row;
            const float* RESTRICT zf = z <= nz - 2 ? row + plane : row;
            const float* RESTRICT gr = g + o;
            float* RESTRICT mr = m + o;
            float* RESTRICT vr = v + o;
            float* RESTRICT outr = out + o;
            /* the ends of the row apart, so that the inner loop has no branch */
            const int64_t last = nx - 1;
            for (int64_t x = 0; x <= last; x += last > 0 ? last : 1) {
                const float h = row[x];
                const float xb = x >= 1 ? row[x - 1] : h, xf = x < last ? row[x + 1] : h;
                const float lap = wz * ((h - zb[x]) - (zf[x] - h)) +
                                  wy * ((h - yb[x]) - (yf[x] - h)) + wx * ((h - xb) - (xf - h));
                io_adam_one(h, gr[x] + sa * lap, mr + x, vr + x, outr + x, b1, b2, a1, a2, c1, c2,
                            eps);
            }
            for (int64_t x = 1; x < last; ++x) {
                const float h = row[x];
                const float lap = wz * ((h - zb[x]) - (zf[x] - h)) +
                                  wy * ((h - yb[x]) - (yf[x] - h)) +
                                  wx * ((h - row[x - 1]) - (row[x + 1] - h));
                io_adam_one(h, gr[x] + sa * lap, mr + x, vr + x, outr + x, b1, b2, a1, a2, c1, c2,
                            eps);
            }
        }
    }
    FTZ_END
}

/* Trilinear samples of a channels-first volume x (C, S0, S1, S2) at the voxel coordinates q
 * (3, N) (component a along array axis a; align_corners=True voxel centres), output points
 * [p0, p1) of y (C, N), as grid_sample(mode="bilinear", align_corners=True): with zeros == 0
 * ("border") every coordinate is clamped into [0, S - 1] (NaN reads index S - 1); with zeros != 0
 * corners outside the volume read 0 (a NaN coordinate gives 0); an axis of size 1 always reads
 * its only voxel, as pddreg.spatial.voxel_to_normalised maps it.  The eight corner offsets and
 * weights are computed once per point and serve every channel. */
void pdd_sample3(const float* x, const float* q, float* y, const int64_t* S, int C, int64_t N,
                 int zeros, int64_t p0, int64_t p1) {
    FTZ_BEGIN
    const int64_t n0 = S[0], n1 = S[1], n2 = S[2], V = n0 * n1 * n2;
    for (int64_t p = p0; p < p1; ++p) {
        float c[3] = {q[p], q[N + p], q[2 * N + p]};
        const int64_t n[3] = {n0, n1, n2};
        int64_t i0[3], i1[3];
        float t[3], w0[3], w1[3];
        int nan = 0;
        for (int a = 0; a < 3; ++a) {
            if (n[a] == 1) c[a] = 0.0f; /* a size-1 axis reads its only voxel (grid_sample) */
            if (!(c[a] == c[a])) { nan = 1; c[a] = zeros ? 0.0f : (float)(n[a] - 1); }
            if (!zeros) {
                if (!(c[a] > 0.0f)) c[a] = 0.0f;
                if (c[a] > (float)(n[a] - 1)) c[a] = (float)(n[a] - 1);
            }
            const float f = floorf(c[a]);
            i0[a] = (int64_t)f;
            i1[a] = i0[a] + 1;
            t[a] = c[a] - f;
            w0[a] = 1.0f - t[a];
            w1[a] = t[a];
            if (zeros) {
                if (i0[a] < 0 || i0[a] >= n[a]) w0[a] = 0.0f, i0[a] = 0;
                if (i1[a] < 0 || i1[a] >= n[a]) w1[a] = 0.0f, i1[a] = 0;
            } else if (i1[a] >= n[a]) {
                i1[a] = n[a] - 1;  /* weight t == 0 there (clamped to n - 1) */
            }
        }
        if (nan && zeros) {
            for (int ch = 0; ch < C; ++ch) y[ch * N + p] = 0.0f;
            continue;
        }
        int64_t off[8];
        float w[8];
        for (int k = 0; k < 8; ++k) {
            const int64_t a = (k & 4) ? i1[0] : i0[0], b = (k & 2) ? i1[1] : i0[1],
                          d = (k & 1) ? i1[2] : i0[2];
            off[k] = (a * n1 + b) * n2 + d;
            w[k] = ((k & 4) ? w1[0] : w0[0]) * ((k & 2) ? w1[1] : w0[1]) *
                   ((k & 1) ? w1[2] : w0[2]);
        }
        for (int ch = 0; ch < C; ++ch) {
            const float* RESTRICT xc = x + ch * V;
            float v = 0.0f;
            for (int k = 0; k < 8; ++k) v += w[k] * xc[off[k]];
            y[ch * N + p] = v;
        }
    }
    FTZ_END
}

/* Box mean along the middle axis of x (P, n, Q), replicate borders, rows [p0, p1) and columns
 * [q0, q1): y[p, i, q] = (x[p, c(i - r), q] + x[p, c(i - r + 1), q] + ... + x[p, c(i + r), q])
 * / (2r + 1) with c clamping to [0, n), summed in that order (as the padded form, so the result
 * agrees bit for bit, except that denormal inputs and results are flushed to zero, as in every
 * kernel here).  y may be x: then each block of BX_W columns is first copied to wk
 * (n * BX_W floats; Q == 1: the row, padded, n + 2r floats). */
#define BX_W 64
void pdd_box(const float* x, float* y, int64_t n, int64_t Q, int r, int64_t p0, int64_t p1,
             int64_t q0, int64_t q1, float* wk) {
    FTZ_BEGIN
    const float k = (float)(2 * r + 1);
    const int inplace = x == y;
    for (int64_t p = p0; p < p1; ++p) {
        const float* xp = x + p * n * Q;
        float* yp = y + p * n * Q;
        if (Q == 1) { /* along the contiguous axis: the padded row, then 2r + 1 shifted sums */
            for (int i = 0; i < r; ++i) wk[i] = xp[0], wk[n + r + i] = xp[n - 1];
            memcpy(wk + r, xp, n * sizeof(float));
            float* RESTRICT out = yp;
            const float* RESTRICT a = wk;
            for (int64_t i = 0; i < n; ++i) out[i] = a[i];
            for (int o = 1; o <= 2 * r; ++o)
                for (int64_t i = 0; i < n; ++i) out[i] += a[i + o];
            for (int64_t i = 0; i < n; ++i) out[i] /= k;
            continue;
        }
        for (int64_t b0 = q0; b0 < q1; b0 += inplace ? BX_W : q1 - q0) {
            /* the block's source rows: a copy in wk (stride w) in place, else x itself */
            const int64_t w = inplace && q1 - b0 > BX_W ? BX_W : q1 - b0;
            const float* src = xp + b0;
            int64_t ld = Q;
            if (inplace) {
                for (int64_t i = 0; i < n; ++i) memcpy(wk + i * w, src + i * Q, w * sizeof(float));
                src = wk;
                ld = w;
            }
            for (int64_t i = 0; i < n; ++i) {
                int64_t j = i - r < 0 ? 0 : (i - r >= n ? n - 1 : i - r);
                const float* RESTRICT a = src + j * ld;
                float* RESTRICT out = yp + i * Q + b0;
                for (int64_t q = 0; q < w; ++q) out[q] = a[q];
                for (int o = -r + 1; o <= r; ++o) {
                    j = i + o < 0 ? 0 : (i + o >= n ? n - 1 : i + o);
                    const float* RESTRICT c = src + j * ld;
                    for (int64_t q = 0; q < w; ++q) out[q] += c[q];
                }
                for (int64_t q = 0; q < w; ++q) out[q] /= k;
            }
        }
    }
    FTZ_END
}

/* Ask Linux for transparent huge pages on [p, p + bytes) (the whole 2 MiB pages inside it),
 * before the memory is first touched: the kernels above read a few cache lines from each of
 * thousands of rows, and with 4 kB pages every row is a TLB miss.  No effect elsewhere. */
#if defined(__linux__)
#include <sys/mman.h>
#endif
void pdd_hugepages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t page = (uintptr_t)1 << 21;
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1);
    uintptr_t b = ((uintptr_t)p + (uintptr_t)bytes) & ~(page - 1);
    if (b > a) madvise((void*)a, b - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}
