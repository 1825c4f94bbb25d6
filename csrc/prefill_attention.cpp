// Causal attention for a prompt that starts its sequence (prefill from position 0, no sliding window
// narrower than the prompt), grouped-query heads, fp32, reading q, k and v where the fused qkv
// product left them and writing the [tokens, heads * D] layout the o projection reads:
//
//   out[b, t, h*D + d] = sum_{j <= t} softmax_j(scale * q[b,t,h] . k[b,j,g]) v[b,j,g][d],  g = h / (H/KV)
//
// Why: on SmolLM2-135M's 128-token prefill torch's CPU flash attention took ~11 % of the AVX2 sparse
// prefill (0.37 ms a layer for 9 heads of 128 x 64); it also needs q, k, v transposed to
// [B, heads, T, D] and its output transposed back (two copies). Here a work unit is (batch row, head,
// block of 16 queries): the scores of the block come from K transposed once per kv head ([D, T]: a
// query row broadcast against 8 keys per FMA, no horizontal sums), then a softmax over the causal
// prefix (exp256: sr_avx2.h) and the weighted sum of v rows (a probability broadcast against 8 of
// the D values per FMA). Each product is register-blocked 4 queries x 16 keys (or 16 values).
// Numerics: fp32 throughout; the sums run in another order than torch's and the exponential is a
// degree-6 polynomial (relative error ~2e-7), so results agree with torch's to fp32 rounding. A NaN
// score makes its query's output NaN (never a finite value).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sparse_runtime.h"
#include "sr_avx2.h"
#include "sr_common.h"

namespace {

const int64_t kQBlock = 16;  // queries per work unit

struct Attn {
    const float *q, *k, *v;
    float* out;
    int64_t qb, qt, kb, kt, ob, ot;  // strides (floats): batch and token of q, of k/v, of out
    int64_t B, T, H, KV, D;
    float scale;
};

// The portable path (any D): one query at a time, scalar.
void attend_portable(const Attn& a, int64_t b, int64_t h, int64_t t0, int64_t t1, float* s) {
    const int64_t g = h / (a.H / a.KV);
    for (int64_t t = t0; t < t1; ++t) {
        const float* q = a.q + b * a.qb + t * a.qt + h * a.D;
        float m = -INFINITY;
        bool nan = false;
        for (int64_t j = 0; j <= t; ++j) {
            const float* k = a.k + b * a.kb + j * a.kt + g * a.D;
            float acc = 0.f;
            for (int64_t d = 0; d < a.D; ++d) acc += q[d] * k[d];
            s[j] = acc * a.scale;
            nan |= s[j] != s[j];
            m = s[j] > m ? s[j] : m;
        }
        float sum = 0.f;
        for (int64_t j = 0; j <= t; ++j) sum += (s[j] = expf(s[j] - m));
        const float inv = nan ? NAN : 1.0f / sum;
        float* o = a.out + b * a.ob + t * a.ot + h * a.D;
        for (int64_t d = 0; d < a.D; ++d) o[d] = 0.f;
        for (int64_t j = 0; j <= t; ++j) {
            const float* v = a.v + b * a.kb + j * a.kt + g * a.D;
            const float p = s[j] * inv;
            for (int64_t d = 0; d < a.D; ++d) o[d] += p * v[d];
        }
    }
}

#if SR_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// K of kv head g (batch row b), keys [0, n), transposed into kt [D][np] (np = n rounded up to 16,
// the pad keys zero).
void build_kt(const Attn& a, int64_t b, int64_t g, int64_t n, int64_t np, float* kt) {
    for (int64_t d = 0; d < a.D; ++d) memset(kt + d * np + n, 0, (size_t)(np - n) * sizeof(float));
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
        const int64_t nj = n - j0 < 8 ? n - j0 : 8;
        for (int64_t d0 = 0; d0 < a.D; d0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i)
                r[i] = i < nj ? _mm256_loadu_ps(a.k + b * a.kb + (j0 + i) * a.kt + g * a.D + d0) : _mm256_setzero_ps();
            transpose8_ps(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
            for (int i = 0; i < 8; ++i) {  // row d0 + i of kt, keys j0 .. j0 + 7 (the pad lanes zero)
                float* dst = kt + (d0 + i) * np + j0;
                if (nj == 8) {
                    _mm256_storeu_ps(dst, r[i]);
                } else {
                    alignas(32) float tmp[8];
                    _mm256_store_ps(tmp, r[i]);
                    memcpy(dst, tmp, (size_t)nj * sizeof(float));
                }
            }
        }
    }
}

// Queries [t0, t1) of head h (t1 - t0 <= kQBlock) against keys [0, t1): kt holds K^T of the head's
// kv group for at least t1 keys (row length np); s: kQBlock x np scratch.
void attend_avx2(const Attn& a, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* kt, int64_t np, float* s) {
    const int64_t g = h / (a.H / a.KV), nq = t1 - t0, nk = (t1 + 15) / 16 * 16;  // keys computed: 16-multiples
    const float* qrow[kQBlock];
    for (int64_t i = 0; i < kQBlock; ++i) qrow[i] = a.q + b * a.qb + (t0 + (i < nq ? i : nq - 1)) * a.qt + h * a.D;
    // scores: 4 queries x 16 keys per register block
    const __m256 sc = _mm256_set1_ps(a.scale);
    for (int64_t i0 = 0; i0 < nq; i0 += 4)
        for (int64_t j = 0; j < nk; j += 16) {
            __m256 c[4][2];
            for (int i = 0; i < 4; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
            for (int64_t d = 0; d < a.D; ++d) {
                const __m256 k0 = _mm256_loadu_ps(kt + d * np + j), k1 = _mm256_loadu_ps(kt + d * np + j + 8);
                for (int i = 0; i < 4; ++i) {
                    const __m256 qv = _mm256_broadcast_ss(qrow[i0 + i] + d);
                    c[i][0] = _mm256_fmadd_ps(qv, k0, c[i][0]);
                    c[i][1] = _mm256_fmadd_ps(qv, k1, c[i][1]);
                }
            }
            for (int i = 0; i < 4; ++i) {
                _mm256_storeu_ps(s + (i0 + i) * np + j, _mm256_mul_ps(c[i][0], sc));
                _mm256_storeu_ps(s + (i0 + i) * np + j + 8, _mm256_mul_ps(c[i][1], sc));
            }
        }
    // softmax over each query's causal prefix; keys past it get probability 0
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t i = 0; i < kQBlock; ++i) {
        float* si = s + i * np;
        if (i >= nq) {  // the clamped duplicate rows: zero, so the products below add nothing
            memset(si, 0, (size_t)nk * sizeof(float));
            continue;
        }
        const int64_t t = t0 + i, n = t + 1;  // keys 0 .. t
        __m256 m = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
        for (int64_t j = 0; j < nk; j += 8) {
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), lane));
            const __m256 x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(si + j), keep);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            m = _mm256_max_ps(m, x);
            _mm256_storeu_ps(si + j, x);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const __m256 mx = _mm256_set1_ps(_mm_cvtss_f32(m4));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < nk; j += 8) {  // exp(-inf - m) = 0 for the masked keys
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(si + j), mx));
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), lane));
            const __m256 p = _mm256_and_ps(e, keep);
            sum = _mm256_add_ps(sum, p);
            _mm256_storeu_ps(si + j, p);
        }
        const float inv = _mm256_movemask_ps(bad) ? NAN : 1.0f / hsum256(sum);
        const __m256 iv = _mm256_set1_ps(inv);
        for (int64_t j = 0; j < nk; j += 8) _mm256_storeu_ps(si + j, _mm256_mul_ps(_mm256_loadu_ps(si + j), iv));
    }
    // out = P V: 4 queries x 16 values per register block, keys up to the block's last query
    for (int64_t i0 = 0; i0 < nq; i0 += 4) {
        const int64_t nj = t0 + (i0 + 4 < nq ? i0 + 4 : nq);  // keys 0 .. t0 + i0 + 3 (the 4 queries' prefix)
        for (int64_t d = 0; d < a.D; d += 16) {
            __m256 c[4][2];
            for (int i = 0; i < 4; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
            for (int64_t j = 0; j < nj; ++j) {
                const float* vr = a.v + b * a.kb + j * a.kt + g * a.D + d;
                const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8);
                for (int i = 0; i < 4; ++i) {
                    const __m256 p = _mm256_broadcast_ss(s + (i0 + i) * np + j);
                    c[i][0] = _mm256_fmadd_ps(p, v0, c[i][0]);
                    c[i][1] = _mm256_fmadd_ps(p, v1, c[i][1]);
                }
            }
            for (int i = 0; i < 4 && i0 + i < nq; ++i) {
                float* o = a.out + b * a.ob + (t0 + i0 + i) * a.ot + h * a.D + d;
                _mm256_storeu_ps(o, c[i][0]);
                _mm256_storeu_ps(o + 8, c[i][1]);
            }
        }
    }
}

#pragma GCC pop_options
#endif  // SR_X86

}  // namespace

extern "C" {

// See the top of this file. q, k, v, out: fp32 with the given strides (floats) per batch row and
// token; the heads of a token are contiguous D-vectors (q: H of them, k and v: KV, out: H). isa:
// SR_AVX2 (D a multiple of 16) or SR_PORTABLE. scale: usually 1 / sqrt(D).
int sr_prefill_attention(const float* q, int64_t q_batch, int64_t q_tok, const float* k, const float* v,
                         int64_t kv_batch, int64_t kv_tok, float* out, int64_t out_batch, int64_t out_tok, int64_t B,
                         int64_t T, int64_t H, int64_t KV, int64_t D, float scale, int isa, int n_threads) {
    if (B < 0 || T < 0 || H <= 0 || KV <= 0 || D <= 0 || H % KV) return SR_EARG;
    if (B == 0 || T == 0) return SR_OK;
    if (!q || !k || !v || !out) return SR_EARG;
    if (isa == SR_AVX2 && (D % 16 || !(sr_cpu_features() & (1 << SR_AVX2)))) return SR_EUNSUPPORTED;
    if (isa != SR_AVX2 && isa != SR_PORTABLE) return SR_EUNSUPPORTED;
    const Attn a{q, k, v, out, q_batch, q_tok, kv_batch, kv_tok, out_batch, out_tok, B, T, H, KV, D, scale};
    const int64_t qblocks = (T + kQBlock - 1) / kQBlock, units = B * H * qblocks;
    const int64_t np = (T + 15) / 16 * 16;
    int failed = 0;
    parallel_rows(units, n_threads, 1, [&](int64_t u0, int64_t u1) {
        static thread_local SrThreadBuf kt_buf, s_buf;
        float* s = (float*)s_buf.get((size_t)(kQBlock * np) * sizeof(float));
        float* kt = isa == SR_AVX2 ? (float*)kt_buf.get((size_t)(D * np) * sizeof(float)) : nullptr;
        if (!s || (isa == SR_AVX2 && !kt)) {
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
            return;
        }
        int64_t built = -1, built_n = 0;  // the (b, g) whose K^T kt holds, and for how many keys
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t b = u / (H * qblocks), h = u / qblocks % H, t0 = u % qblocks * kQBlock;
            const int64_t t1 = t0 + kQBlock < T ? t0 + kQBlock : T;
#if SR_X86
            if (isa == SR_AVX2) {
                const int64_t bg = b * KV + h / (H / KV);
                if (bg != built || built_n < t1) {  // the whole prompt's keys, once per kv head and thread
                    build_kt(a, b, h / (H / KV), T, np, kt);
                    built = bg;
                    built_n = T;
                }
                attend_avx2(a, b, h, t0, t1, kt, np, s);
                continue;
            }
#endif
            attend_portable(a, b, h, t0, t1, s);
        }
    });
    return failed ? SR_ENOMEM : SR_OK;
}

}  // extern "C"
