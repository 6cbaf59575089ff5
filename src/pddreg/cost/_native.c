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

#define RESTRICT __restrict__

/* 8 floats in one register (GCC/Clang vector extension: AVX with -mavx2, else two SSE). */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f ld8(const float* p) {
    v8f v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void st8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }

static inline v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

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

/* y (P, o, Q) = FIR ``taps`` (nt <= 64) along the middle axis of x (P, n, Q), replicate-padded
 * by ``pad`` (o = n + 2 pad - nt + 1), on blocks of 64, 32, 16, 8 contiguous q, then 1; then
 * the epilogue ``e`` (or NULL). */
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
            float* yi = yp + i * Q;
            const int64_t at = (p * o + i) * Q;
            int64_t q = 0;
            for (; q + 64 <= Q; q += 64) fir_vec(rows, taps, nt, q, yi, 8, 0, e, at);
            for (; q + 32 <= Q; q += 32) fir_vec(rows, taps, nt, q, yi, 4, 1, e, at);
            for (; q + 16 <= Q; q += 16) fir_vec(rows, taps, nt, q, yi, 2, 1, e, at);
            for (; q + 8 <= Q; q += 8) fir_vec(rows, taps, nt, q, yi, 1, 1, e, at);
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
            for (; i < o; ++i) {
                float acc = 0;
                for (int t = 0; t < nt; ++t) acc += taps[t] * xq[i + t];
                yp[i] = acc;
            }
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
                for (int64_t q = 0; q < w; ++q) {
                    const float v = a[q] < b[q] ? a[q] : b[q];
                    d[q] = v < c[q] ? v : c[q];
                }
            }
        }
    }
}

/* Mean-field combination for rows [r0, r1) (all batch items together):
 *   out[r] = wd * d[r] + wc * c[r] + wm * MF(x[r])
 * with MF per grid axis g[0..nd) (nd in 1..3): replicate-pad 6 and three box-5 averages
 * (the 13-tap filter ``taps``).  Each row holds prod(g) floats.  d or c may
 * be NULL (term left out); c may alias out.  work: 2 * prod(g) + 32 * (g[nd - 1] + 28) floats. */
void pdd_meanfield(const float* x, const float* d, const float* c, float* out, int nd, const int* g,
                   int64_t r0, int64_t r1, float wd, float wc, float wm, const float* taps,
                   float* work) {
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
}

/* out = softmax(-cost) over L, columns [k0, k1) of one batch item; cost, out: (L, K), out may
 * be cost.  Tiles of SF_T columns, three streaming passes over the rows (minimum;
 * exponentials and their sum; scaling).  work: SF_T * 2 floats. */
void pdd_softmax_neg(const float* cost, float* out, int64_t L, int64_t K, int64_t k0, int64_t k1,
                     float* work) {
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
}

/* Linear resampling along the middle axis, rows [p0, p1): y (P, o, Q) from x (P, n, Q) with
 *   y[p, i, q] = w0[i] x[p, i0[i], q] + w1[i] x[p, i1[i], q]
 * (indices in range, weights 0 for taps outside the map). */
void pdd_resample(const float* x, float* y, int64_t n, int64_t Q, int64_t o, const int64_t* i0,
                  const float* w0, const int64_t* i1, const float* w1, int64_t p0, int64_t p1) {
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
}

/* SSD correlation on a lattice, rows [r0, r1) of the control grid of one batch item.
 *   out[l, k] = sum_c (f[c, k] - g[c, a * k + b * j])**2   (per axis: node a_ax k_ax + b_ax j_ax)
 * f: (C, G0, G1, G2) fixed features at the control points; g: (C, N0, N1, N2) moving features
 * resampled onto the lattice; out: (L, G0, G1, G2) with L = nj0 nj1 nj2 (C order).  Lower
 * dimensions use leading axes of size 1 (G = N = nj = 1).  A "row" is one (k0, k1) (r0, r1
 * count rows); 8 points of a row per vector. */
void pdd_correlation(const float* f, const float* g, float* out, int C, const int64_t* G,
                     const int64_t* N, const int64_t* a, const int64_t* b, const int64_t* nj,
                     int64_t r0, int64_t r1) {
    const int64_t Gt = G[0] * G[1] * G[2], Nt = N[0] * N[1] * N[2], G2 = G[2];
    const int64_t a2 = a[2];
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
                    if (a2 == 1) {
                        /* 4 displacements x 16 points: 8 independent accumulators */
                        for (; j2 + 4 <= nj[2]; j2 += 4) {
                            const float* gx = gr + b[2] * j2;
                            const int64_t gs = b[2];
                            float* o = out + (l0 + j2) * Gt + row * G2;
                            int64_t k = 0;
                            for (; k + 16 <= G2; k += 16) {
                                v8f s[8];
                                for (int u = 0; u < 8; ++u) s[u] = splat8(0.0f);
                                for (int c = 0; c < C; ++c) {
                                    const float *fc = fr + c * Gt + k, *gc = gx + c * Nt + k;
                                    const v8f f0 = ld8(fc), f1 = ld8(fc + 8);
                                    for (int u = 0; u < 4; ++u) {
                                        const v8f d0 = f0 - ld8(gc + u * gs);
                                        const v8f d1 = f1 - ld8(gc + u * gs + 8);
                                        s[2 * u] += d0 * d0;
                                        s[2 * u + 1] += d1 * d1;
                                    }
                                }
                                for (int u = 0; u < 4; ++u) {
                                    st8(o + u * Gt + k, s[2 * u]);
                                    st8(o + u * Gt + k + 8, s[2 * u + 1]);
                                }
                            }
                            for (; k < G2; ++k) {
                                for (int u = 0; u < 4; ++u) {
                                    float acc = 0.0f;
                                    for (int c = 0; c < C; ++c) {
                                        const float d0 = fr[c * Gt + k] - gx[c * Nt + k + u * gs];
                                        acc += d0 * d0;
                                    }
                                    o[u * Gt + k] = acc;
                                }
                            }
                        }
                    }
                    for (; j2 < nj[2]; ++j2) {
                        const float* gx = gr + b[2] * j2;
                        float* o = out + (l0 + j2) * Gt + row * G2;
                        int64_t k = 0;
                        if (a2 == 1) {
                            for (; k + 8 <= G2; k += 8) {
                                v8f s0 = splat8(0.0f), s1 = s0;
                                int c = 0;
                                for (; c + 2 <= C; c += 2) {
                                    const v8f d0 = ld8(fr + c * Gt + k) - ld8(gx + c * Nt + k);
                                    const v8f d1 =
                                        ld8(fr + (c + 1) * Gt + k) - ld8(gx + (c + 1) * Nt + k);
                                    s0 += d0 * d0;
                                    s1 += d1 * d1;
                                }
                                for (; c < C; ++c) {
                                    const v8f d0 = ld8(fr + c * Gt + k) - ld8(gx + c * Nt + k);
                                    s0 += d0 * d0;
                                }
                                st8(o + k, s0 + s1);
                            }
                        }
                        /* the rest (all of a strided row): channel by channel, so that
                         * each pass reads one row of f and of g */
                        const int64_t k0 = k;
                        for (k = k0; k < G2; ++k) o[k] = 0.0f;
                        for (int c = 0; c < C; ++c) {
                            const float* fc = fr + c * Gt;
                            const float* gc = gx + c * Nt;
                            for (k = k0; k < G2; ++k) {
                                const float d0 = fc[k] - gc[a2 * k];
                                o[k] += d0 * d0;
                            }
                        }
                    }
                }
            }
        }
    }
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
