// sparse-runtime CPU sparse linear kernels: y[b, r] = sum_k x[b, k] * W[r, k] + bias[r].
//
// One shared object holds every instruction-set path; the caller picks one at run time
// (sr_cpu_features() reports what the CPU and OS support). Paths are compiled with
// `#pragma GCC target(...)`, never with -march, so the binary runs on any x86-64 CPU.
//
// Layouts (packed in Python, sparse_runtime/kernels/layout.py; see docs/kernels.md):
//   bitmask: mask   uint32 [N, ceil(K/32)]  bit j of word w = column 32*w + j is nonzero
//            values float  [nnz]            the nonzeros, row-major, no padding
//            row_ptr int64 [N + 1]          offset of each row's first value
//   csr16:   idx    uint16 [nnz]            column index of each nonzero (K <= 65536)
//            values float  [nnz], row_ptr int64 [N + 1] as above
//
// Paths: bitmask x {avx512 (expand-load), avx2 (left-pack of x), portable}; csr16 x {avx2 (gathers),
// portable}. int8/int4 codes with fp32 scales (dense and bitmask layouts): quant_kernels.inc.
// All entry points are plain C (loaded with ctypes), declared in sparse_runtime.h; the Python module
// init below exists only so that setuptools builds and installs this file as an ordinary extension
// module. SparseGPT's column solver (also in this shared object) is in sparsegpt_solver.cpp.
#include <Python.h>

#include <alloca.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sparse_runtime.h"
#include "sr_common.h"
#include "sr_avx2.h"
#include "sr_avx512.h"

static int64_t g_calls[SR_NISA][SR_NLAYOUT];

// Threading (row_parts, parallel_rows): sr_common.h.

// ---------------------------------------------------------------------------------------------
// portable paths (plain C++; the compiler may auto-vectorise for the baseline ISA)
// ---------------------------------------------------------------------------------------------
static void bm_portable_rows(const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                             const float* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                             int64_t r1) {
    const int64_t Kw = (K + 31) / 32;
    for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* mr = mask + r * Kw;
        for (int64_t b = 0; b < B; ++b) {
            const float* xb = x + b * K;
            const float* v = vals + rp[r];
            float acc = 0.f;
            for (int64_t w = 0; w < Kw; ++w) {
                uint32_t m = mr[w];
                const float* xw = xb + 32 * w;
                while (m) {
                    acc += *v++ * xw[__builtin_ctz(m)];
                    m &= m - 1;
                }
            }
            y[b * N + r] = acc + (bias ? bias[r] : 0.f);
        }
    }
}

static void csr_portable_rows(const float* x, int64_t B, int64_t K, int64_t N, const uint16_t* idx,
                              const float* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                              int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        for (int64_t b = 0; b < B; ++b) {
            const float* xb = x + b * K;
            float acc = 0.f;
            for (int64_t p = rp[r]; p < rp[r + 1]; ++p) acc += vals[p] * xb[idx[p]];
            y[b * N + r] = acc + (bias ? bias[r] : 0.f);
        }
    }
}

// Batch-1 row kernels (fp32 bitmask here, int8/int4 in quant_kernels.inc) prefetch each stream
// they read (values or codes, and the mask) kPrefetchAhead bytes ahead of where they read it, one
// prefetch per cache line consumed: the streams of consecutive rows are contiguous, so this runs
// across row ends. Why: without it the kernels whose arithmetic per byte is high (int8 codes, sparse
// values) kept too few loads in flight for the hardware prefetchers to keep memory busy
// (docs/kernels.md "Prefetch"). 0: off.
static int64_t kPrefetchAhead = 2048;

// Prefetch the line kPrefetchAhead / div bytes past p (div: the stream's share, e.g. a mask read
// at a fraction of its values' pace). A plain builtin (prefetcht0 on x86), outside the ISA target
// regions, so the kernels of every ISA can inline it.
static inline void sr_prefetch_ahead(const void* p, int div = 1) {
    if (kPrefetchAhead) __builtin_prefetch((const char*)p + kPrefetchAhead / div, 0, 3);
}

#if SR_X86
// ---------------------------------------------------------------------------------------------
// AVX-512: bitmask + expand-load. Each 16-bit half of a mask word drives one vexpandps that
// places the next popcount(half) packed values into their columns' lanes; the x chunk is loaded
// with the same mask (so columns past K and pruned columns are never read).
// ---------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,popcnt,bmi,bmi2,fma,avx2")

static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// The values load of the batch-1 kernel, its only difference between the two forms (kGemvVariant):
// vexpandps from memory (the expand-load), or a plain 64-byte load + the register-form vexpandps
// (1 uop on Intel; the memory form is microcoded/slow on some cores). The register form over-reads
// up to 15 floats past a chunk's values, so the last chunks before vend (the end of the values
// array) use the memory form.
static inline __m512 expand_mem(__mmask16 k, const float* v, const float*) { return _mm512_maskz_expandloadu_ps(k, v); }
static inline __m512 expand_reg(__mmask16 k, const float* v, const float* vend) {
    return v + 16 <= vend ? _mm512_maskz_expand_ps(k, _mm512_loadu_ps(v)) : _mm512_maskz_expandloadu_ps(k, v);
}
typedef __m512 (*ExpandLoad)(__mmask16 k, const float* v, const float* vend);

// Rows [r0, r1) at batch 1, four 16-lane accumulators (two mask words) per step; Load places the
// next popcount(k) values into the lanes of k (inlined: a compile-time constant).
template <ExpandLoad Load>
static inline void bm_avx512_gemv_rows_t(const float* x, int64_t K, const uint32_t* mask, const float* vals,
                                         const int64_t* rp, const float* bias, float* y, int64_t r0, int64_t r1,
                                         const float* vend) {
    const int64_t Kw = (K + 31) / 32;
    for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* mr = mask + r * Kw;
        const float* v = vals + rp[r];
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t w = 0;
        for (; w + 2 <= Kw; w += 2) {
            const uint32_t m0 = mr[w], m1 = mr[w + 1];
            const __mmask16 k0 = (__mmask16)m0, k1 = (__mmask16)(m0 >> 16);
            const __mmask16 k2 = (__mmask16)m1, k3 = (__mmask16)(m1 >> 16);
            const float* v1 = v + _mm_popcnt_u32(k0);
            const float* v2 = v + _mm_popcnt_u32(m0);
            const float* v3 = v2 + _mm_popcnt_u32(k2);
            const float* xw = x + 32 * w;
            sr_prefetch_ahead(v);  // ~77 bytes of values per step at 70 %: about one line
            if (!(w & 15)) sr_prefetch_ahead(mr + w, 8);
            a0 = _mm512_fmadd_ps(Load(k0, v, vend), _mm512_maskz_loadu_ps(k0, xw), a0);
            a1 = _mm512_fmadd_ps(Load(k1, v1, vend), _mm512_maskz_loadu_ps(k1, xw + 16), a1);
            a2 = _mm512_fmadd_ps(Load(k2, v2, vend), _mm512_maskz_loadu_ps(k2, xw + 32), a2);
            a3 = _mm512_fmadd_ps(Load(k3, v3, vend), _mm512_maskz_loadu_ps(k3, xw + 48), a3);
            v = v2 + _mm_popcnt_u32(m1);
        }
        if (w < Kw) {  // an odd last word: the memory form in both (it may end the values array)
            const uint32_t m0 = mr[w];
            const __mmask16 k0 = (__mmask16)m0, k1 = (__mmask16)(m0 >> 16);
            const float* xw = x + 32 * w;
            a0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(k0, v), _mm512_maskz_loadu_ps(k0, xw), a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(k1, v + _mm_popcnt_u32(k0)),
                                 _mm512_maskz_loadu_ps(k1, xw + 16), a1);
        }
        const float s = hsum512(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        y[r] = s + (bias ? bias[r] : 0.f);
    }
}

// The memory form (kGemvVariant = 0).
static void bm_avx512_gemv_rows(const float* x, int64_t K, const uint32_t* mask, const float* vals,
                                const int64_t* rp, const float* bias, float* y, int64_t r0, int64_t r1) {
    bm_avx512_gemv_rows_t<expand_mem>(x, K, mask, vals, rp, bias, y, r0, r1, nullptr);
}

// The register form (kGemvVariant = 1, the default); vend: the end of the whole values array.
static void bm_avx512_gemv_rows_reg(const float* x, int64_t K, const uint32_t* mask, const float* vals,
                                    const int64_t* rp, const float* bias, float* y, int64_t r0, int64_t r1,
                                    const float* vend) {
    bm_avx512_gemv_rows_t<expand_reg>(x, K, mask, vals, rp, bias, y, r0, r1, vend);
}

// Several tokens at once: each mask word is expanded once (by Load, as at batch 1) and reused for
// TB rows of x.
template <int TB, ExpandLoad Load>
static inline void bm_avx512_tile(const float* x, int64_t K, const uint32_t* mr, int64_t Kw, const float* v,
                                  const float* vend, float* out) {
    __m512 lo[TB], hi[TB];
    for (int b = 0; b < TB; ++b) lo[b] = hi[b] = _mm512_setzero_ps();
    for (int64_t w = 0; w < Kw; ++w) {
        const uint32_t m = mr[w];
        const __mmask16 k0 = (__mmask16)m, k1 = (__mmask16)(m >> 16);
        const __m512 e0 = Load(k0, v, vend);
        const __m512 e1 = Load(k1, v + _mm_popcnt_u32(k0), vend);
        v += _mm_popcnt_u32(m);
        const float* xw = x + 32 * w;
        for (int b = 0; b < TB; ++b) {
            lo[b] = _mm512_fmadd_ps(e0, _mm512_maskz_loadu_ps(k0, xw + b * K), lo[b]);
            hi[b] = _mm512_fmadd_ps(e1, _mm512_maskz_loadu_ps(k1, xw + b * K + 16), hi[b]);
        }
    }
    for (int b = 0; b < TB; ++b) out[b] = hsum512(_mm512_add_ps(lo[b], hi[b]));
}

// Larger batches (prefill): x transposed to [K, Bp] (Bp = B rounded up to 16), so one nonzero
// W[r, k] costs one broadcast and one 16-wide FMA per 16 tokens (work ~ nnz, not ~ K). Each row's
// mask is first decoded into the list of its nonzeros' xT offsets (k * Bp) with vpcompressd, branch
// free; the FMA loop is then a counted loop over that list (no per-bit branches to mispredict),
// reused for every tile of up to 64 tokens. Tiles narrower than 64 tokens interleave U independent
// accumulator sets so the FMA latency chain does not bound them.
template <int T, int U>
static inline void bm_idx_tile(const float* xT, const int32_t* off, const float* v, int64_t n, float* out) {
    __m512 acc[U][T];
    for (int u = 0; u < U; ++u)
        for (int t = 0; t < T; ++t) acc[u][t] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + U <= n; j += U) {
        for (int u = 0; u < U; ++u) {
            const __m512 wv = _mm512_set1_ps(v[j + u]);
            const float* xr = xT + off[j + u];
            for (int t = 0; t < T; ++t) acc[u][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 16 * t), acc[u][t]);
        }
    }
    for (; j < n; ++j) {
        const __m512 wv = _mm512_set1_ps(v[j]);
        const float* xr = xT + off[j];
        for (int t = 0; t < T; ++t) acc[0][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 16 * t), acc[0][t]);
    }
    for (int t = 0; t < T; ++t) {
        __m512 s = acc[0][t];
        for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][t]);
        _mm512_storeu_ps(out + 16 * t, s);
    }
}

// bm_idx_tile for up to 8 rows of x (xT padded to Bp = 8): 8-lane loads, so a nonzero reads 32
// bytes of xT instead of 64, and the K x 8 xT of a 1536-wide input (48 KB) fits L1 where the 16-lane
// padding's 96 KB did not. U = 8 accumulators: the FMA latency (4) x 2 ports.
static inline void bm_idx_tile8(const float* xT, const int32_t* off, const float* v, int64_t n, float* out) {
    const int U = 8;
    __m256 acc[U];
    for (int u = 0; u < U; ++u) acc[u] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + U <= n; j += U)
        for (int u = 0; u < U; ++u)
            acc[u] = _mm256_fmadd_ps(_mm256_set1_ps(v[j + u]), _mm256_loadu_ps(xT + off[j + u]), acc[u]);
    for (; j < n; ++j) acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(v[j]), _mm256_loadu_ps(xT + off[j]), acc[0]);
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
                                   _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])));
    _mm256_storeu_ps(out, s);
}

// off: per-thread scratch of at least 32 * Kw + 16 int32.
static void bm_idx_gemm_rows(const float* xT, int64_t B, int64_t Bp, int64_t K, int64_t N, const uint32_t* mask,
                             const float* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                             int64_t r1, int32_t* off) {
    const int64_t Kw = (K + 31) / 32;
    const __m512i iota = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)Bp));
    alignas(64) float out[64];
    for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* mr = mask + r * Kw;
        const float* v = vals + rp[r];
        int64_t n = 0;
        for (int64_t w = 0; w < Kw; ++w) {
            const uint32_t m = mr[w];
            const __mmask16 k0 = (__mmask16)m, k1 = (__mmask16)(m >> 16);
            const __m512i base = _mm512_add_epi32(iota, _mm512_set1_epi32((int)(32 * w * Bp)));
            _mm512_storeu_si512((void*)(off + n), _mm512_maskz_compress_epi32(k0, base));
            n += _mm_popcnt_u32(k0);
            _mm512_storeu_si512((void*)(off + n),
                                _mm512_maskz_compress_epi32(k1, _mm512_add_epi32(base, _mm512_set1_epi32((int)(16 * Bp)))));
            n += _mm_popcnt_u32(k1);
        }
        const float bb = bias ? bias[r] : 0.f;
        if (Bp == 8) {
            bm_idx_tile8(xT, off, v, n, out);
            for (int64_t b = 0; b < B; ++b) y[b * N + r] = out[b] + bb;
            continue;
        }
        for (int64_t b0 = 0; b0 < Bp; b0 += 64) {
            const int64_t tiles = (Bp - b0) / 16 < 4 ? (Bp - b0) / 16 : 4;
            const float* xt = xT + b0;
            switch (tiles) {
                case 1: bm_idx_tile<1, 4>(xt, off, v, n, out); break;
                case 2: bm_idx_tile<2, 2>(xt, off, v, n, out); break;
                case 3: bm_idx_tile<3, 2>(xt, off, v, n, out); break;
                default: bm_idx_tile<4, 1>(xt, off, v, n, out); break;
            }
            const int64_t nb = B - b0 < 16 * tiles ? B - b0 : 16 * tiles;
            for (int64_t b = 0; b < nb; ++b) y[(b0 + b) * N + r] = out[b] + bb;
        }
    }
}

// Prefill-sized batches (>= kBlkMinBatch tokens): the index walk above reads a 256-byte xT row
// segment from L2 per nonzero and is bound by that. Here the K loop is blocked by mask word (32
// columns): for each word, a block of kBlkRows rows walks its nonzeros in those 32 columns, so the
// xT block (32 x up to 128 tokens = 16 KB) stays in L1 and serves every row of the block; each
// row's partial sums (up to 8 zmm = 128 tokens) live in a small L1 buffer between words and each
// row keeps its own cursor into the values. Per nonzero: one broadcast and T L1 loads + FMAs.
static const int64_t kBlkRows = 32;

template <int T>
static void bm_blk_tile(const float* xT, int64_t B, int64_t Bp, int64_t b0, int64_t K, int64_t N,
                        const uint32_t* mask, const float* vals, const int64_t* rp, const float* bias, float* y,
                        int64_t r0, int64_t r1, float* accbuf, int32_t* off) {
    const int64_t Kw = (K + 31) / 32;
    const __m512i iota = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)Bp));
    const __m512i iota_hi = _mm512_add_epi32(iota, _mm512_set1_epi32((int)(16 * Bp)));
    const float* vcur[kBlkRows];
    for (int64_t rb = r0; rb < r1; rb += kBlkRows) {
        const int64_t nr = r1 - rb < kBlkRows ? r1 - rb : kBlkRows;
        for (int64_t i = 0; i < nr; ++i) {
            vcur[i] = vals + rp[rb + i];
            for (int t = 0; t < T; ++t) _mm512_store_ps(accbuf + (i * T + t) * 16, _mm512_setzero_ps());
        }
        for (int64_t w = 0; w < Kw; ++w) {
            const float* xw = xT + 32 * w * Bp + b0;
            for (int64_t i = 0; i < nr; ++i) {
                const uint32_t m = mask[(rb + i) * Kw + w];
                // 2 x kBlkRows concurrent streams (each row's mask and values) are more than the
                // hardware prefetchers track: fetch each row's next lines explicitly
                _mm_prefetch((const char*)(mask + (rb + i) * Kw + w + 16), _MM_HINT_T0);
                _mm_prefetch((const char*)(vcur[i] + 32), _MM_HINT_T0);
                if (!m) continue;
                const int n0 = _mm_popcnt_u32(m & 0xFFFFu), n = _mm_popcnt_u32(m);
                _mm512_storeu_si512((void*)off, _mm512_maskz_compress_epi32((__mmask16)m, iota));
                _mm512_storeu_si512((void*)(off + n0), _mm512_maskz_compress_epi32((__mmask16)(m >> 16), iota_hi));
                float* a = accbuf + i * T * 16;
                __m512 acc[T];
                for (int t = 0; t < T; ++t) acc[t] = _mm512_load_ps(a + 16 * t);
                const float* v = vcur[i];
                for (int j = 0; j < n; ++j) {
                    const __m512 wv = _mm512_set1_ps(v[j]);
                    const float* xr = xw + off[j];
                    for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 16 * t), acc[t]);
                }
                for (int t = 0; t < T; ++t) _mm512_store_ps(a + 16 * t, acc[t]);
                vcur[i] = v + n;
            }
        }
        const int64_t nb = B - b0 < 16 * T ? B - b0 : 16 * T;
        for (int64_t i = 0; i < nr; ++i) {
            const float bb = bias ? bias[rb + i] : 0.f;
            for (int64_t b = 0; b < nb; ++b) y[(b0 + b) * N + rb + i] = accbuf[i * T * 16 + b] + bb;
        }
    }
}

// accbuf: 64-byte aligned, kBlkRows * 128 floats; off: 48 int32.
static void bm_blk_gemm_rows(const float* xT, int64_t B, int64_t Bp, int64_t K, int64_t N, const uint32_t* mask,
                             const float* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                             int64_t r1, float* accbuf, int32_t* off) {
    for (int64_t b0 = 0; b0 < Bp; b0 += 128) {
        const int64_t T = (Bp - b0) / 16 < 8 ? (Bp - b0) / 16 : 8;
#define SR_BLK(TT) case TT: bm_blk_tile<TT>(xT, B, Bp, b0, K, N, mask, vals, rp, bias, y, r0, r1, accbuf, off); break;
        switch (T) {
            SR_BLK(1) SR_BLK(2) SR_BLK(3) SR_BLK(4) SR_BLK(5) SR_BLK(6) SR_BLK(7)
            default: bm_blk_tile<8>(xT, B, Bp, b0, K, N, mask, vals, rp, bias, y, r0, r1, accbuf, off); break;
        }
#undef SR_BLK
    }
}

// Rows [r0, r1) of y [B, N] (B < kXtMinBatch, so at most 8 rows of x per tile) from the bitmask layout.
template <ExpandLoad Load>
static inline void bm_avx512_gemm_rows_t(const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                                         const float* vals, const int64_t* rp, const float* bias, float* y,
                                         int64_t r0, int64_t r1, const float* vend) {
    const int64_t Kw = (K + 31) / 32;
    float out[8];
    for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* mr = mask + r * Kw;
        const float* v = vals + rp[r];
        const float bb = bias ? bias[r] : 0.f;
        for (int64_t b0 = 0; b0 < B; b0 += 8) {
            const int64_t tb = B - b0 < 8 ? B - b0 : 8;
            const float* xb = x + b0 * K;
            switch (tb) {
                case 1: bm_avx512_tile<1, Load>(xb, K, mr, Kw, v, vend, out); break;
                case 2: bm_avx512_tile<2, Load>(xb, K, mr, Kw, v, vend, out); break;
                case 3: bm_avx512_tile<3, Load>(xb, K, mr, Kw, v, vend, out); break;
                case 4: bm_avx512_tile<4, Load>(xb, K, mr, Kw, v, vend, out); break;
                case 5: bm_avx512_tile<5, Load>(xb, K, mr, Kw, v, vend, out); break;
                case 6: bm_avx512_tile<6, Load>(xb, K, mr, Kw, v, vend, out); break;
                case 7: bm_avx512_tile<7, Load>(xb, K, mr, Kw, v, vend, out); break;
                default: bm_avx512_tile<8, Load>(xb, K, mr, Kw, v, vend, out); break;
            }
            for (int64_t b = 0; b < tb; ++b) y[(b0 + b) * N + r] = out[b] + bb;
        }
    }
}

// The memory form of the expand (kGemvVariant = 0) and the register form (1; vend: the end of the
// whole values array), as at batch 1.
static void bm_avx512_gemm_rows(const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                                const float* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                                int64_t r1) {
    bm_avx512_gemm_rows_t<expand_mem>(x, B, K, N, mask, vals, rp, bias, y, r0, r1, nullptr);
}

static void bm_avx512_gemm_rows_reg(const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                                    const float* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                                    int64_t r1, const float* vend) {
    bm_avx512_gemm_rows_t<expand_reg>(x, B, K, N, mask, vals, rp, bias, y, r0, r1, vend);
}
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX2: no expand instruction, so the layout stores 16-bit column indices and x is gathered.
// Batch > 1 transposes x to [K, Bp] (Bp = B rounded up to 8) so one broadcast weight feeds up to
// four 8-wide FMAs per nonzero.
// ---------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")


static void csr_avx2_gemv_rows_gather(const float* x, const uint16_t* idx, const float* vals, const int64_t* rp,
                                      const float* bias, float* y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        int64_t p = rp[r];
        const int64_t e = rp[r + 1];
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; p + 16 <= e; p += 16) {
            const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(idx + p)));
            const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(idx + p + 8)));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + p), _mm256_i32gather_ps(x, i0, 4), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + p + 8), _mm256_i32gather_ps(x, i1, 4), a1);
        }
        if (p + 8 <= e) {
            const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(idx + p)));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + p), _mm256_i32gather_ps(x, i0, 4), a0);
            p += 8;
        }
        float s = hsum256(_mm256_add_ps(a0, a1));
        for (; p < e; ++p) s += vals[p] * x[idx[p]];
        y[r] = s + (bias ? bias[r] : 0.f);
    }
}

// Four x values at the 16-bit column indices packed in q, as one 128-bit vector (scalar loads +
// vinsertps: load ports and one shuffle each, no gather).
static inline __m128 csr_avx2_load4(const float* x, uint64_t q) {
    __m128 v = _mm_load_ss(x + (q & 0xffff));
    v = _mm_insert_ps(v, _mm_load_ss(x + ((q >> 16) & 0xffff)), 0x10);
    v = _mm_insert_ps(v, _mm_load_ss(x + ((q >> 32) & 0xffff)), 0x20);
    return _mm_insert_ps(v, _mm_load_ss(x + (q >> 48)), 0x30);
}

// The "insert" form: the same products, x assembled from scalar loads. On cores whose vgatherdps is
// microcoded it is the faster of the two (AMD Zen 1, 7B shapes at 70 %, batch 1: the gather form ran
// 0.71-0.80x of dense F.linear on one thread, this form 1.3-1.9x faster than the gather form;
// benchmarks/results/kernels_layers_avx2_7b.md).
static void csr_avx2_gemv_rows_insert(const float* x, const uint16_t* idx, const float* vals, const int64_t* rp,
                                      const float* bias, float* y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        int64_t p = rp[r];
        const int64_t e = rp[r + 1];
        __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps(), a2 = _mm_setzero_ps(), a3 = _mm_setzero_ps();
        for (; p + 16 <= e; p += 16) {
            uint64_t q[4];
            memcpy(q, idx + p, sizeof q);
            a0 = _mm_fmadd_ps(_mm_loadu_ps(vals + p), csr_avx2_load4(x, q[0]), a0);
            a1 = _mm_fmadd_ps(_mm_loadu_ps(vals + p + 4), csr_avx2_load4(x, q[1]), a1);
            a2 = _mm_fmadd_ps(_mm_loadu_ps(vals + p + 8), csr_avx2_load4(x, q[2]), a2);
            a3 = _mm_fmadd_ps(_mm_loadu_ps(vals + p + 12), csr_avx2_load4(x, q[3]), a3);
        }
        for (; p + 4 <= e; p += 4) {
            uint64_t q;
            memcpy(&q, idx + p, sizeof q);
            a0 = _mm_fmadd_ps(_mm_loadu_ps(vals + p), csr_avx2_load4(x, q), a0);
        }
        __m128 s4 = _mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        float s = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
        for (; p < e; ++p) s += vals[p] * x[idx[p]];
        y[r] = s + (bias ? bias[r] : 0.f);
    }
}

// AVX2 batch-1 form: 0 = gathers, 1 = scalar loads + inserts (chosen per process by measurement in
// Python, sparse_runtime.kernels.choose_gemv_variant("avx2"); default insert).
static int kAvx2Form = 1;

static void csr_avx2_gemv_rows(const float* x, const uint16_t* idx, const float* vals, const int64_t* rp,
                               const float* bias, float* y, int64_t r0, int64_t r1) {
    if (kAvx2Form == 0) return csr_avx2_gemv_rows_gather(x, idx, vals, rp, bias, y, r0, r1);
    csr_avx2_gemv_rows_insert(x, idx, vals, rp, bias, y, r0, r1);
}

// One broadcast weight feeds up to four 8-wide FMAs per nonzero; col[p] = column of vals[p].
template <int T, class I>
static inline void avx2_tile(const float* xT, int64_t Bp, const I* col, const float* vals, int64_t n, float* out) {
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t p = 0; p < n; ++p) {
        const __m256 wv = _mm256_broadcast_ss(vals + p);
        const float* xr = xT + (int64_t)col[p] * Bp;
        for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * t), acc[t]);
    }
    for (int t = 0; t < T; ++t) _mm256_storeu_ps(out + 8 * t, acc[t]);
}

// Output row r for all B tokens from its n nonzeros (columns col, values vals), x transposed to
// [K, Bp]: both AVX2 layouts' batch > 1 path (csr16 reads its indices, bitmask decodes its mask).
template <class I>
static void avx2_gemm_row(const float* xT, int64_t B, int64_t Bp, int64_t N, const I* col, const float* vals,
                          int64_t n, float bias, float* y, int64_t r) {
    float out[32];
    for (int64_t b0 = 0; b0 < Bp; b0 += 32) {
        const int64_t tiles = (Bp - b0) / 8 < 4 ? (Bp - b0) / 8 : 4;
        const float* xt = xT + b0;
        switch (tiles) {
            case 1: avx2_tile<1>(xt, Bp, col, vals, n, out); break;
            case 2: avx2_tile<2>(xt, Bp, col, vals, n, out); break;
            case 3: avx2_tile<3>(xt, Bp, col, vals, n, out); break;
            default: avx2_tile<4>(xt, Bp, col, vals, n, out); break;
        }
        const int64_t nb = B - b0 < 8 * tiles ? B - b0 : 8 * tiles;
        for (int64_t b = 0; b < nb; ++b) y[(b0 + b) * N + r] = out[b] + bias;
    }
}

static void csr_avx2_gemm_rows(const float* xT, int64_t B, int64_t Bp, int64_t N, const uint16_t* idx,
                               const float* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                               int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
        avx2_gemm_row(xT, B, Bp, N, idx + rp[r], vals + rp[r], rp[r + 1] - rp[r], bias ? bias[r] : 0.f, y, r);
}

// ---------------------------------------------------------------------------------------------
// AVX2 on the bitmask layout: "left-pack" x instead of expanding the values. For each 8-column
// group with mask byte m, kLeftPack.lanes[m] lists the lanes of its c = popcount(m) set bits in
// order, each with the sign bit set, then 0 in lanes c..7. One vpermps (which reads only the low 3
// bits of each index) moves those x lanes to the front (x sits in L1: no memory gather), and the
// same table's sign bits zero lanes c..7 of the next 8 packed values (a plain load and an AND; within
// 8 floats of the end of the values array a vmaskmovps instead, which reads only the lanes whose
// sign bit is set, so nothing past the array is touched: vmaskmovps itself is microcoded on AMD
// Zen 1, 3x slower than load + AND there). Each group costs a table load, a permute, a load, an AND
// and one FMA whatever its density; the layout keeps the bitmask's bytes (4d + 1/8 per weight:
// bound 3.0x at 70 %, against 2.2x for csr16), and a bitmask checkpoint runs on AVX2 without
// repacking. Measured on AMD EPYC (Zen 1): slower than the csr16 insert form, which stays the AVX2
// default (docs/kernels.md).
// ---------------------------------------------------------------------------------------------
struct LeftPackTable {
    alignas(32) int32_t lanes[256][8];
    constexpr LeftPackTable() : lanes{} {
        for (int m = 0; m < 256; ++m) {
            int c = 0;
            for (int j = 0; j < 8; ++j)
                if (m & (1 << j)) lanes[m][c++] = (int32_t)(0x80000000u | (uint32_t)j);
            for (int j = c; j < 8; ++j) lanes[m][j] = 0;
        }
    }
};
static constexpr LeftPackTable kLeftPack{};

// acc += values(next c) * x(set lanes of m) for the 8 columns at x8; returns the values advanced by c.
// end = one past the values array.
static inline const float* bm_avx2_group(const float* x8, unsigned m, const float* v, const float* end,
                                         __m256& acc) {
    const __m256i lanes = _mm256_load_si256((const __m256i*)kLeftPack.lanes[m]);
    const __m256 xs = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x8), lanes);
    const __m256 vv = v + 8 <= end ? _mm256_and_ps(_mm256_loadu_ps(v), _mm256_castsi256_ps(_mm256_srai_epi32(lanes, 31)))
                                   : _mm256_maskload_ps(v, lanes);
    acc = _mm256_fmadd_ps(vv, xs, acc);
    return v + _mm_popcnt_u32(m);
}

static void bm_avx2_gemv_rows(const float* x, int64_t K, const uint32_t* mask, const float* vals,
                              const int64_t* rp, const float* bias, float* y, int64_t r0, int64_t r1,
                              const float* end) {
    const int64_t Kw = (K + 31) / 32, G = K / 8;  // G full 8-column groups; columns 8G..K-1 are the tail
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* mb = (const uint8_t*)(mask + r * Kw);  // byte g = columns 8g..8g+7 (little endian)
        const float* v = vals + rp[r];
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) {
            uint32_t m4;
            memcpy(&m4, mb + g, 4);
            v = bm_avx2_group(x + 8 * g, m4 & 255u, v, end, a0);
            v = bm_avx2_group(x + 8 * g + 8, (m4 >> 8) & 255u, v, end, a1);
            v = bm_avx2_group(x + 8 * g + 16, (m4 >> 16) & 255u, v, end, a2);
            v = bm_avx2_group(x + 8 * g + 24, m4 >> 24, v, end, a3);
        }
        for (; g < G; ++g) v = bm_avx2_group(x + 8 * g, mb[g], v, end, a0);
        float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        if (8 * G < K)  // tail: fewer than 8 columns of x are left, so walk the bits
            for (unsigned m = mb[G]; m; m &= m - 1) s += *v++ * x[8 * G + __builtin_ctz(m)];
        y[r] = s + (bias ? bias[r] : 0.f);
    }
}

// Row's nonzero columns into off[0..nnz) by the same table, 8 columns per store (int32, or uint16
// for K <= 65536: the unsigned saturating pack keeps values below 65536); lanes past c are
// overwritten by the next store, so off needs 8 slots of slack.
template <class I>
static inline int64_t bm_avx2_row_columns(const uint8_t* mb, int64_t K, I* off) {
    static_assert(sizeof(I) == 4 || sizeof(I) == 2, "int32 or uint16 columns");
    int64_t n = 0;
    const int64_t G = (K + 7) / 8;
    for (int64_t g = 0; g < G; ++g) {
        const unsigned m = mb[g];
        const __m256i lanes = _mm256_load_si256((const __m256i*)kLeftPack.lanes[m]);
        const __m256i c = _mm256_add_epi32(_mm256_and_si256(lanes, _mm256_set1_epi32(7)), _mm256_set1_epi32((int)(8 * g)));
        if constexpr (sizeof(I) == 4)
            _mm256_storeu_si256((__m256i*)(off + n), c);
        else
            _mm_storeu_si128((__m128i*)(off + n), _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)));
        n += _mm_popcnt_u32(m);
    }
    return n;
}

// Batch > 1: x transposed to [K, Bp] (Bp = B rounded up to 8); each row's mask is decoded once into
// column offsets, then as csr16 (avx2_gemm_row).
static void bm_avx2_gemm_rows(const float* xT, int64_t B, int64_t Bp, int64_t K, int64_t N, const uint32_t* mask,
                              const float* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                              int64_t r1, int32_t* off) {
    const int64_t Kw = (K + 31) / 32;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = bm_avx2_row_columns((const uint8_t*)(mask + r * Kw), K, off);
        avx2_gemm_row(xT, B, Bp, N, off, vals + rp[r], n, bias ? bias[r] : 0.f, y, r);
    }
}
// ---------------------------------------------------------------------------------------------
// AVX2 prefill-sized batches (>= kAvx2BlkMinBatch tokens; docs/kernels.md "The AVX2 prefill walk"):
// the plain walk above (avx2_gemm_row) keeps 4 accumulators (32 tokens), so its FMA chains wait on
// their latency (4 cycles x 2 ports wants 8 in flight), and reads a 128-byte xT segment from L2 per
// nonzero. Here x is repacked into 64-token tiles xt[tile][K][64] (avx2_tile_x), a nonzero feeds 8
// FMAs (64 tokens, 8 ymm accumulators: the FMA ports stay full), and K is walked in blocks of
// kAvx2BlkCols columns: a block of kAvx2BlkRows rows walks its nonzeros in those columns, so the
// xt block (128 columns x 64 tokens = 32 KB) stays in L1 and serves every row of the block. Each
// row's 64 partial sums live in a small buffer between blocks (kept in L1). Per nonzero: one
// broadcast and 8 L1 loads + FMAs, the AVX2 peak's shape (2 FMA + 2-3 loads per cycle).
// ---------------------------------------------------------------------------------------------
static const int64_t kAvx2Tile = 64;      // tokens per xt tile (8 ymm accumulators)
static int64_t kAvx2BlkCols = 128;        // columns per K block (128 x 64 tokens x 4 B = 32 KB: L1)
static const int64_t kAvx2BlkRows = 32;   // rows sharing one pass over the K blocks
static int64_t kAvx2BlkMinBatch = 16;     // from this batch on (csr16 and bitmask, fp32 values)

// The product's input, as in the AMX form (csrc/amx_prefill.cpp, SR_IN_*): x itself, its RMSNorm
// (w[k] * (x[m, k] * inv[m]), the HF Llama order) or SiLU(gate) * up of a gate|up row [2K].
struct Avx2Input {
    const float* x;
    int64_t K, stride;  // stride: floats per row of x (K, or 2K for SR_IN_SILU_MUL)
    int kind;
    const float* w;    // SR_IN_RMSNORM: the norm weight [K]
    const float* inv;  // SR_IN_RMSNORM: per row of x
};

// Columns k .. k+nk-1 (nk <= 8) of row m of the input, lanes past nk zero.
static inline __m256 avx2_input8(const Avx2Input& in, int64_t m, int64_t k, int64_t nk) {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nk), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const float* row = in.x + m * in.stride + k;
    const __m256 a = nk == 8 ? _mm256_loadu_ps(row) : _mm256_maskload_ps(row, keep);
    if (in.kind == SR_IN_RMSNORM) {
        const __m256 w = nk == 8 ? _mm256_loadu_ps(in.w + k) : _mm256_maskload_ps(in.w + k, keep);
        return _mm256_mul_ps(w, _mm256_mul_ps(a, _mm256_set1_ps(in.inv[m])));
    }
    if (in.kind == SR_IN_SILU_MUL) {
        const __m256 u = nk == 8 ? _mm256_loadu_ps(row + in.K) : _mm256_maskload_ps(row + in.K, keep);
        const __m256 sg = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), a))));
        return _mm256_and_ps(_mm256_mul_ps(sg, u), _mm256_castsi256_ps(keep));
    }
    return a;
}

// 1 / sqrt(mean(x[m, :K]^2) + eps) in fp32.
static inline float avx2_inv_rms(const float* row, int64_t K, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(row + k), acc);
    float s = hsum256(acc);
    for (; k < K; ++k) s += row[k] * row[k];
    return 1.0f / sqrtf(s / (float)K + eps);
}

// acc (T ymm, stored at a; zeros when first) += row r's nonzeros from *p on whose columns are below
// kend (the block's end; the row's columns are sorted), stopping at pend; *p is left at the first
// nonzero of the next block. The two exits cost a compare each per nonzero, cheaper than finding
// each block's boundaries beforehand.
template <int T, class I>
static inline void avx2_blk_walk(const float* xt, const I* col, const float* v, int64_t* p, int64_t pend,
                                 int64_t kend, float* a, bool first) {
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = first ? _mm256_setzero_ps() : _mm256_load_ps(a + 8 * t);
    int64_t q = *p;
    // two nonzeros per step (the columns are sorted: the second below kend means both are)
    for (; q + 1 < pend && (int64_t)col[q + 1] < kend; q += 2) {
        const float* xr = xt + (int64_t)col[q] * kAvx2Tile;
        const float* xs = xt + (int64_t)col[q + 1] * kAvx2Tile;
        // opaque base registers: the loads below then use base + displacement addressing, which
        // stays one fused uop with the FMA (base + index addressing is split in two on Intel cores)
        __asm__("" : "+r"(xr), "+r"(xs));
        const __m256 w0 = _mm256_broadcast_ss(v + q), w1 = _mm256_broadcast_ss(v + q + 1);
        for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(w0, _mm256_load_ps(xr + 8 * t), acc[t]);
        for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(w1, _mm256_load_ps(xs + 8 * t), acc[t]);
    }
    if (q < pend && (int64_t)col[q] < kend) {
        const float* xr = xt + (int64_t)col[q] * kAvx2Tile;
        __asm__("" : "+r"(xr));
        const __m256 w0 = _mm256_broadcast_ss(v + q);
        for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(w0, _mm256_load_ps(xr + 8 * t), acc[t]);
        ++q;
    }
    *p = q;
    for (int t = 0; t < T; ++t) _mm256_store_ps(a + 8 * t, acc[t]);
}

// Lines to bring into L2 while a tile runs, a few per visit so the requests stay spread out (a
// burst of hundreds would fill the core's miss buffers and stall the walk): the next row block's
// value and index streams (two byte ranges), then the lines of y this tile writes at its end (rows of
// `width` floats at `stride`). A cursor: fetch(k) issues the next k prefetches.
struct Avx2Ahead {
    const char* p[2];
    int64_t bytes[2];
    float* y;
    int64_t rows, width, stride;
    int s = 0;                  // cursor: range (0, 1), or 2 = y
    int64_t off = 0, row = 0;   // byte offset in the range; y: row and column
    int64_t lines() const {
        return (bytes[0] + 63) / 64 + (bytes[1] + 63) / 64 + rows * ((width + 15) / 16);
    }
    void fetch(int64_t k) {
        for (; k > 0; --k) {
            while (s < 2 && off >= bytes[s]) {
                ++s;
                off = 0;
            }
            if (s < 2) {
                _mm_prefetch(p[s] + off, _MM_HINT_T1);
                off += 64;
                continue;
            }
            if (row >= rows) return;
            _mm_prefetch((const char*)(y + row * stride + (off < width ? off : width - 1)), _MM_HINT_T1);
            off += 16;
            if (off >= width) {
                off = 0;
                ++row;
            }
        }
    }
};

// Columns [k0, k1) of xt (k0 a multiple of 8): the threads split K. Meanwhile `ahead`'s lines
// are prefetched, spread over the 8 x 8 blocks (the walk's first row block, whose streams nothing
// else has fetched yet).
static void avx2_tile_x(const Avx2Input& in, int64_t B, float* xt, int64_t k0, int64_t k1, Avx2Ahead ahead) {
    const int64_t K = in.K, tiles = (B + kAvx2Tile - 1) / kAvx2Tile;
    const int64_t steps = tiles * 8 * ((k1 - k0 + 7) / 8);
    const int64_t per = steps > 0 ? (ahead.lines() + steps - 1) / steps : 0;
    for (int64_t t = 0; t < tiles; ++t) {
        float* dst = xt + t * K * kAvx2Tile;
        for (int64_t b8 = 0; b8 < kAvx2Tile; b8 += 8) {
            const int64_t b0 = t * kAvx2Tile + b8;
            for (int64_t k = k0; k < k1; k += 8) {
                const int64_t nk = k1 - k < 8 ? k1 - k : 8;
                ahead.fetch(per);
                __m256 r[8];
                for (int i = 0; i < 8; ++i) r[i] = b0 + i < B ? avx2_input8(in, b0 + i, k, nk) : _mm256_setzero_ps();
                transpose8_ps(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
                for (int i = 0; i < nk; ++i) _mm256_storeu_ps(dst + (k + i) * kAvx2Tile + b8, r[i]);
            }
        }
    }
}

// One token tile for the nr rows whose columns/values/counts are col[i]/val[i]/n[i]: K walked in
// blocks of kAvx2BlkCols columns, each row resuming where its previous block stopped; `ahead`'s
// lines are prefetched a few per visit.
// The visits of one tile (avx2_blk_tile, avx512_blk_tile): every row of the block per K block, each
// visit prefetching a few of `ahead`'s lines and the next visit's first lines into L1 (its row's
// cursor is where it stopped last block), then WALK (a call with i, cur, k0 in scope). A macro: the
// two tiles are compiled for different ISAs, and a shared function could inline neither walk.
#define SR_BLK_VISITS(WALK)                                                                              \
    int64_t cur[kAvx2BlkRows];                                                                           \
    for (int64_t i = 0; i < nr; ++i) cur[i] = 0;                                                         \
    const int64_t KB = (K + kAvx2BlkCols - 1) / kAvx2BlkCols, visits = KB * nr, lines = ahead.lines();   \
    const int64_t per = visits > 0 ? (lines + visits - 1) / visits : 0;                                  \
    for (int64_t k0 = 0; k0 < K; k0 += kAvx2BlkCols)                                                     \
        for (int64_t i = 0; i < nr; ++i) {                                                               \
            ahead.fetch(per);                                                                            \
            const int64_t i2 = i + 1 < nr ? i + 1 : 0;                                                   \
            _mm_prefetch((const char*)(col[i2] + cur[i2]), _MM_HINT_T0);                                 \
            _mm_prefetch((const char*)(val[i2] + cur[i2]), _MM_HINT_T0);                                 \
            _mm_prefetch((const char*)(val[i2] + cur[i2]) + 64, _MM_HINT_T0);                            \
            WALK;                                                                                        \
        }

template <int T, class I>
static void avx2_blk_tile(const float* xt, int64_t K, const I* const* col, const float* const* val,
                          const int64_t* n, int64_t nr, float* accbuf, Avx2Ahead ahead) {
    SR_BLK_VISITS((avx2_blk_walk<T, I>(xt, col[i], val[i], cur + i, n[i], k0 + kAvx2BlkCols, accbuf + i * kAvx2Tile,
                                       k0 == 0)))
}

#pragma GCC pop_options

// The same tile on the AVX-512 path: 16-token zmm accumulators, 4 per row for a 64-token tile, and
// the two nonzeros of a step into separate accumulator sets (8 chains in flight, what two 512-bit
// FMA ports with a 4-cycle latency need) summed at the visit's end. Half the instructions per
// nonzero of the ymm walk; measured 1.02-1.44x faster per SmolLM2 shape on AMD Zen 4 (docs/kernels.md).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,popcnt,bmi,bmi2,fma,avx2")
template <int T>
static inline void avx512_blk_walk(const float* xt, const uint16_t* col, const float* v, int64_t* p, int64_t pend,
                                   int64_t kend, float* a, bool first) {
    __m512 acc[T], odd[T];
    for (int t = 0; t < T; ++t) {
        acc[t] = first ? _mm512_setzero_ps() : _mm512_load_ps(a + 16 * t);
        odd[t] = _mm512_setzero_ps();
    }
    int64_t q = *p;
    for (; q + 1 < pend && (int64_t)col[q + 1] < kend; q += 2) {
        const float* xr = xt + (int64_t)col[q] * kAvx2Tile;
        const float* xs = xt + (int64_t)col[q + 1] * kAvx2Tile;
        __asm__("" : "+r"(xr), "+r"(xs));  // base + displacement loads (see avx2_blk_walk)
        const __m512 w0 = _mm512_set1_ps(v[q]), w1 = _mm512_set1_ps(v[q + 1]);
        for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(w0, _mm512_load_ps(xr + 16 * t), acc[t]);
        for (int t = 0; t < T; ++t) odd[t] = _mm512_fmadd_ps(w1, _mm512_load_ps(xs + 16 * t), odd[t]);
    }
    if (q < pend && (int64_t)col[q] < kend) {
        const float* xr = xt + (int64_t)col[q] * kAvx2Tile;
        const __m512 w0 = _mm512_set1_ps(v[q]);
        for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(w0, _mm512_load_ps(xr + 16 * t), acc[t]);
        ++q;
    }
    *p = q;
    for (int t = 0; t < T; ++t) _mm512_store_ps(a + 16 * t, _mm512_add_ps(acc[t], odd[t]));
}

// avx2_blk_tile with avx512_blk_walk (T zmm of 16 tokens).
template <int T>
static void avx512_blk_tile(const float* xt, int64_t K, const uint16_t* const* col, const float* const* val,
                            const int64_t* n, int64_t nr, float* accbuf, Avx2Ahead ahead) {
    SR_BLK_VISITS((avx512_blk_walk<T>(xt, col[i], val[i], cur + i, n[i], k0 + kAvx2BlkCols, accbuf + i * kAvx2Tile,
                                      k0 == 0)))
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")

// y[b0 .. b0+nb, rb .. rb+nr] = accbuf (+ bias) (+ y itself when acc): 8 x 8 transposes where 8
// rows and 8 tokens are whole, scalar stores elsewhere.
static void avx2_blk_store(const float* accbuf, int64_t nr, int64_t nb, int64_t b0, int64_t rb, int64_t N,
                           const float* bias, float* y, bool acc) {
    int64_t i = 0;
    for (; i + 8 <= nr; i += 8) {
        const __m256 bb = bias ? _mm256_loadu_ps(bias + rb + i) : _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8) {
            __m256 r[8];
            for (int q = 0; q < 8; ++q) r[q] = _mm256_load_ps(accbuf + (i + q) * kAvx2Tile + b);
            transpose8_ps(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
            for (int q = 0; q < 8; ++q) {
                float* o = y + (b0 + b + q) * N + rb + i;
                const __m256 v = _mm256_add_ps(r[q], bb);
                _mm256_storeu_ps(o, acc ? _mm256_add_ps(_mm256_loadu_ps(o), v) : v);
            }
        }
        for (; b < nb; ++b)
            for (int q = 0; q < 8; ++q) {
                const float v = accbuf[(i + q) * kAvx2Tile + b] + (bias ? bias[rb + i + q] : 0.f);
                float* o = y + (b0 + b) * N + rb + i + q;
                *o = acc ? *o + v : v;
            }
    }
    for (; i < nr; ++i)
        for (int64_t b = 0; b < nb; ++b) {
            const float v = accbuf[i * kAvx2Tile + b] + (bias ? bias[rb + i] : 0.f);
            float* o = y + (b0 + b) * N + rb + i;
            *o = acc ? *o + v : v;
        }
}

// Where the walk's rows come from. A source gives row r's sorted columns (uint16), its fp32 values
// and their count, decoding into the calling thread's scratch (scratch_bytes() for kAvx2BlkRows rows;
// i = the row's place in its block) where the layout stores something else, and the byte ranges of
// rows [r0, r1)'s streams (to prefetch). The fp32 layouts here; int8 codes in quant_kernels.inc.
struct Avx2Csr16Rows {
    const uint16_t* idx;
    const float* vals;
    const int64_t* rp;
    size_t scratch_bytes() const { return 0; }
    const uint16_t* row(void*, int64_t, int64_t r, int64_t* n, const float** val) const {
        *n = rp[r + 1] - rp[r];
        *val = vals + rp[r];
        return idx + rp[r];
    }
    void streams(int64_t r0, int64_t r1, Avx2Ahead* a) const {
        a->p[0] = (const char*)(vals + rp[r0]);
        a->bytes[0] = (rp[r1] - rp[r0]) * (int64_t)sizeof(float);
        a->p[1] = (const char*)(idx + rp[r0]);
        a->bytes[1] = (rp[r1] - rp[r0]) * (int64_t)sizeof(uint16_t);
    }
};

struct Avx2BitmaskRows {
    const uint32_t* mask;
    const float* vals;
    const int64_t* rp;
    int64_t K, Kw;
    size_t scratch_bytes() const { return (size_t)(kAvx2BlkRows * (K + 8)) * sizeof(uint16_t); }
    const uint16_t* row(void* scratch, int64_t i, int64_t r, int64_t* n, const float** val) const {
        uint16_t* c = (uint16_t*)scratch + i * (K + 8);
        *n = bm_avx2_row_columns((const uint8_t*)(mask + r * Kw), K, c);
        *val = vals + rp[r];
        return c;
    }
    void streams(int64_t r0, int64_t r1, Avx2Ahead* a) const {
        a->p[0] = (const char*)(vals + rp[r0]);
        a->bytes[0] = (rp[r1] - rp[r0]) * (int64_t)sizeof(float);
        a->p[1] = (const char*)(mask + r0 * Kw);
        a->bytes[1] = (r1 - r0) * Kw * (int64_t)sizeof(uint32_t);
    }
};

// Rows [r0, r1) of y [B, N] from xt, kAvx2BlkRows rows at a time, from `src` (above). accbuf:
// kAvx2BlkRows * 64 floats, 64-byte aligned (the zmm form's loads); scratch: src.scratch_bytes().
// wide: the zmm tile (avx512_blk_tile; the caller checked that the CPU has AVX-512).
template <class Src>
static void avx2_blk_rows(const float* xt, int64_t B, int64_t K, int64_t N, const float* bias, float* y, bool acc,
                          int64_t r0, int64_t r1, float* accbuf, void* scratch, const Src& src, bool wide) {
    const int64_t tiles = (B + kAvx2Tile - 1) / kAvx2Tile;
    const uint16_t* col[kAvx2BlkRows];
    const float* val[kAvx2BlkRows];
    int64_t n[kAvx2BlkRows];
    for (int64_t rb = r0; rb < r1; rb += kAvx2BlkRows) {
        const int64_t nr = r1 - rb < kAvx2BlkRows ? r1 - rb : kAvx2BlkRows;
        for (int64_t i = 0; i < nr; ++i) col[i] = src.row(scratch, i, rb + i, n + i, val + i);
        // the next row block's streams, prefetched during this block's first tile
        const int64_t rn = rb + nr, rn2 = rn + kAvx2BlkRows < r1 ? rn + kAvx2BlkRows : r1;
        Avx2Ahead ahead{{nullptr, nullptr}, {0, 0}, y, 0, 0, 0};
        if (rn < r1) src.streams(rn, rn2, &ahead);
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t b0 = t * kAvx2Tile, nb = B - b0 < kAvx2Tile ? B - b0 : kAvx2Tile;
            const float* x = xt + t * K * kAvx2Tile;
            if (t == 1) ahead.bytes[0] = ahead.bytes[1] = 0;
            ahead.y = y + b0 * N + rb;
            ahead.rows = nb;
            ahead.width = nr;
            ahead.stride = N;
            if (wide) {
                switch ((nb + 15) / 16) {
                    case 1: avx512_blk_tile<1>(x, K, col, val, n, nr, accbuf, ahead); break;
                    case 2: avx512_blk_tile<2>(x, K, col, val, n, nr, accbuf, ahead); break;
                    case 3: avx512_blk_tile<3>(x, K, col, val, n, nr, accbuf, ahead); break;
                    default: avx512_blk_tile<4>(x, K, col, val, n, nr, accbuf, ahead); break;
                }
                avx2_blk_store(accbuf, nr, nb, b0, rb, N, bias, y, acc);
                continue;
            }
            switch ((nb + 7) / 8) {
#define SR_AVX2_BLK(TT) case TT: avx2_blk_tile<TT, uint16_t>(x, K, col, val, n, nr, accbuf, ahead); break;
                SR_AVX2_BLK(1) SR_AVX2_BLK(2) SR_AVX2_BLK(3) SR_AVX2_BLK(4) SR_AVX2_BLK(5) SR_AVX2_BLK(6)
                SR_AVX2_BLK(7)
                default: avx2_blk_tile<8, uint16_t>(x, K, col, val, n, nr, accbuf, ahead); break;
#undef SR_AVX2_BLK
            }
            avx2_blk_store(accbuf, nr, nb, b0, rb, N, bias, y, acc);
        }
    }
}

// The two phases of a prefill walk (avx2_blk_linear; bf16_blk_linear in bf16_walk.inc), one parallel
// region each: x repacked into 64-token tiles of `xt_elem`-byte elements by tile_x(in, xt, k0, k1,
// first) with the threads splitting K (the norm's factors computed first; `first`: the streams of the
// first row block the thread will likely run, to prefetch meanwhile), then rows(xt, r0, r1, accbuf,
// scratch) with the threads splitting N (scratch: `scratch_bytes` per thread, none when 0). K <= 65536.
// Returns SR_ENOMEM if a buffer cannot be had.
template <class Run, class Src, class TileX, class Rows>
static int blk_walk_phases(const Run& run, const Avx2Input& in0, int64_t B, int64_t N, float* y, float eps,
                           size_t xt_elem, size_t scratch_bytes, const Src& src, const TileX& tile_x,
                           const Rows& rows) {
    const int64_t K = in0.K;
    if (K > 65536) return SR_EARG;
    // the caller's thread holds x's tiles and the norm's factors; each worker its own small buffers
    // (grow-only per thread: no page faults per call)
    static thread_local SrThreadBuf xt_buf, inv_buf;
    static thread_local SrThreadBuf acc_buf, row_buf;
    const int64_t tiles = (B + kAvx2Tile - 1) / kAvx2Tile;
    void* xt = xt_buf.get((size_t)(tiles * K * kAvx2Tile) * xt_elem);
    float* inv = in0.kind == SR_IN_RMSNORM ? (float*)inv_buf.get((size_t)(B > 0 ? B : 1) * sizeof(float)) : NULL;
    if (!xt || (in0.kind == SR_IN_RMSNORM && !inv)) return SR_ENOMEM;
    Avx2Input in = in0;
    if (inv) {
        for (int64_t m = 0; m < B; ++m) inv[m] = avx2_inv_rms(in.x + m * in.stride, K, eps);
        in.inv = inv;
    }
    const int64_t K8 = (K + 7) / 8;
    run(K8, 16, [&](int64_t g0, int64_t g1) {
        // the first row block of the rows this thread will likely run (the same share of N as of K)
        const int64_t r = N * g0 / K8, r2 = r + kAvx2BlkRows < N ? r + kAvx2BlkRows : N;
        Avx2Ahead first{{nullptr, nullptr}, {0, 0}, y, 0, 0, 0};
        src.streams(r, r2, &first);
        tile_x(in, xt, 8 * g0, 8 * g1 < K ? 8 * g1 : K, first);
    });
    int failed = 0;
    run(N, kAvx2BlkRows, [&](int64_t r0, int64_t r1) {
        float* accbuf = (float*)acc_buf.get(kAvx2BlkRows * kAvx2Tile * sizeof(float));
        void* scratch = scratch_bytes ? row_buf.get(scratch_bytes) : nullptr;
        if (!accbuf || (scratch_bytes && !scratch)) {
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
            return;
        }
        rows(xt, r0, r1, accbuf, scratch);
    });
    return failed ? SR_ENOMEM : SR_OK;
}

// The prefill walk: y (+)= in(x) W^T + bias for the rows of `src` (above), K <= 65536; `wide`: the
// zmm tile (the caller checked that the CPU has AVX-512).
template <class Run, class Src>
static int avx2_blk_linear(const Run& run, const Avx2Input& in0, int64_t B, int64_t N, const float* bias, float* y,
                           bool acc, float eps, const Src& src, bool wide = false) {
    return blk_walk_phases(
        run, in0, B, N, y, eps, sizeof(float), src.scratch_bytes(), src,
        [&](const Avx2Input& in, void* xt, int64_t k0, int64_t k1, const Avx2Ahead& first) {
            avx2_tile_x(in, B, (float*)xt, k0, k1, first);
        },
        [&](void* xt, int64_t r0, int64_t r1, float* accbuf, void* scratch) {
            avx2_blk_rows((const float*)xt, B, in0.K, N, bias, y, acc, r0, r1, accbuf, scratch, src, wide);
        });
}
#pragma GCC pop_options
#endif  // SR_X86

// ---------------------------------------------------------------------------------------------
// bf16 values (the option against dense bf16): the same layouts with 16-bit values (the top half
// of the fp32 bit pattern), widened to fp32 in registers; x, bias and y stay fp32 and the
// accumulation is fp32. Halves the value bytes: bound 4 / (2 d + 1/8) over dense fp32.
// ---------------------------------------------------------------------------------------------
static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void bm_bf16_portable_rows(const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                                  const uint16_t* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                                  int64_t r1) {
    const int64_t Kw = (K + 31) / 32;
    for (int64_t r = r0; r < r1; ++r) {
        for (int64_t b = 0; b < B; ++b) {
            const float* xb = x + b * K;
            const uint16_t* v = vals + rp[r];
            float acc = 0.f;
            for (int64_t w = 0; w < Kw; ++w) {
                uint32_t m = mask[r * Kw + w];
                while (m) {
                    acc += bf2f(*v++) * xb[32 * w + __builtin_ctz(m)];
                    m &= m - 1;
                }
            }
            y[b * N + r] = acc + (bias ? bias[r] : 0.f);
        }
    }
}

static void csr_bf16_portable_rows(const float* x, int64_t B, int64_t K, int64_t N, const uint16_t* idx,
                                   const uint16_t* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                                   int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < B; ++b) {
            const float* xb = x + b * K;
            float acc = 0.f;
            for (int64_t p = rp[r]; p < rp[r + 1]; ++p) acc += bf2f(vals[p]) * xb[idx[p]];
            y[b * N + r] = acc + (bias ? bias[r] : 0.f);
        }
}

#if SR_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,popcnt,bmi,bmi2,fma,avx2")
static inline __m512 bf16x16_to_ps(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One 32-lane 16-bit expand-load per mask word places that word's bf16 values; widen both halves.
static void bm_bf16_avx512_gemv_rows(const float* x, int64_t K, const uint32_t* mask, const uint16_t* vals,
                                     const int64_t* rp, const float* bias, float* y, int64_t r0, int64_t r1) {
    const int64_t Kw = (K + 31) / 32;
    for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* mr = mask + r * Kw;
        const uint16_t* v = vals + rp[r];
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t w = 0; w < Kw; ++w) {
            const uint32_t m = mr[w];
            const __m512i e = _mm512_maskz_expandloadu_epi16((__mmask32)m, v);
            v += _mm_popcnt_u32(m);
            const float* xw = x + 32 * w;
            a0 = _mm512_fmadd_ps(bf16x16_to_ps(_mm512_castsi512_si256(e)),
                                 _mm512_maskz_loadu_ps((__mmask16)m, xw), a0);
            a1 = _mm512_fmadd_ps(bf16x16_to_ps(_mm512_extracti64x4_epi64(e, 1)),
                                 _mm512_maskz_loadu_ps((__mmask16)(m >> 16), xw + 16), a1);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (bias ? bias[r] : 0.f);
    }
}

static void bm_bf16_xt_gemm_rows(const float* xT, int64_t B, int64_t Bp, int64_t K, int64_t N, const uint32_t* mask,
                                 const uint16_t* vals, const int64_t* rp, const float* bias, float* y, int64_t r0,
                                 int64_t r1) {
    const int64_t Kw = (K + 31) / 32;
    float out[8];
    for (int64_t r = r0; r < r1; ++r) {
        for (int64_t b0 = 0; b0 < Bp; b0 += 8) {
            const uint16_t* v = vals + rp[r];
            __m256 acc = _mm256_setzero_ps();
            for (int64_t w = 0; w < Kw; ++w) {
                uint32_t m = mask[r * Kw + w];
                const float* xw = xT + 32 * w * Bp + b0;
                while (m) {
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(bf2f(*v++)),
                                          _mm256_loadu_ps(xw + (int64_t)_tzcnt_u32(m) * Bp), acc);
                    m = _blsr_u32(m);
                }
            }
            _mm256_storeu_ps(out, acc);
            const int64_t nb = B - b0 < 8 ? B - b0 : 8;
            for (int64_t b = 0; b < nb; ++b) y[(b0 + b) * N + r] = out[b] + (bias ? bias[r] : 0.f);
        }
    }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")
static inline __m256 bf16x8_to_ps(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static void csr_bf16_avx2_gemv_rows(const float* x, const uint16_t* idx, const uint16_t* vals, const int64_t* rp,
                                    const float* bias, float* y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        int64_t p = rp[r];
        const int64_t e = rp[r + 1];
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; p + 16 <= e; p += 16) {
            const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(idx + p)));
            const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(idx + p + 8)));
            a0 = _mm256_fmadd_ps(bf16x8_to_ps(_mm_loadu_si128((const __m128i*)(vals + p))),
                                 _mm256_i32gather_ps(x, i0, 4), a0);
            a1 = _mm256_fmadd_ps(bf16x8_to_ps(_mm_loadu_si128((const __m128i*)(vals + p + 8))),
                                 _mm256_i32gather_ps(x, i1, 4), a1);
        }
        float s = hsum256(_mm256_add_ps(a0, a1));
        for (; p < e; ++p) s += bf2f(vals[p]) * x[idx[p]];
        y[r] = s + (bias ? bias[r] : 0.f);
    }
}

static void csr_bf16_avx2_gemm_rows(const float* xT, int64_t B, int64_t Bp, int64_t N, const uint16_t* idx,
                                    const uint16_t* vals, const int64_t* rp, const float* bias, float* y,
                                    int64_t r0, int64_t r1) {
    float out[8];
    for (int64_t r = r0; r < r1; ++r) {
        for (int64_t b0 = 0; b0 < Bp; b0 += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t p = rp[r]; p < rp[r + 1]; ++p)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(bf2f(vals[p])), _mm256_loadu_ps(xT + (int64_t)idx[p] * Bp + b0), acc);
            _mm256_storeu_ps(out, acc);
            const int64_t nb = B - b0 < 8 ? B - b0 : 8;
            for (int64_t b = 0; b < nb; ++b) y[(b0 + b) * N + r] = out[b] + (bias ? bias[r] : 0.f);
        }
    }
}
#pragma GCC pop_options
#endif  // SR_X86

// ---------------------------------------------------------------------------------------------
// C API
// ---------------------------------------------------------------------------------------------
extern "C" {

// Bit 0: portable (always); bit 1: AVX2+FMA; bit 2: AVX-512 F/BW/VL/DQ (OS state checked by libgcc).
int sr_cpu_features(void) {
    int f = 1 << SR_PORTABLE;
#if SR_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        f |= 1 << SR_AVX2;  // F16C: the fp16 K/V cache (every AVX2 CPU has it)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("popcnt"))
        f |= 1 << SR_AVX512;
    if ((f & (1 << SR_AVX512)) && __builtin_cpu_supports("avx512vbmi2")) f |= SR_FEAT_VBMI2;
    if ((f & (1 << SR_AVX512)) && __builtin_cpu_supports("avx512vnni")) f |= SR_FEAT_VNNI;
#endif
    return f;
}

int sr_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// Copies the per-(isa, layout) call counters into out[SR_NISA * SR_NLAYOUT] (isa-major).
void sr_get_counters(int64_t* out) {
    for (int i = 0; i < SR_NISA; ++i)
        for (int l = 0; l < SR_NLAYOUT; ++l) out[i * SR_NLAYOUT + l] = __atomic_load_n(&g_calls[i][l], __ATOMIC_RELAXED);
}

void sr_reset_counters(void) {
    for (int i = 0; i < SR_NISA; ++i)
        for (int l = 0; l < SR_NLAYOUT; ++l) __atomic_store_n(&g_calls[i][l], 0, __ATOMIC_RELAXED);
}

// The ABI check (sparse_runtime.h): the Python side compares its ctypes mirrors with these.
size_t sr_struct_size(const char* name) {
    if (!name) return 0;
    if (!strcmp(name, "SRLinear")) return sizeof(SRLinear);
    if (!strcmp(name, "SRLayer")) return sizeof(SRLayer);
    if (!strcmp(name, "SRModel")) return sizeof(SRModel);
    return 0;
}

int64_t sr_field_offset(const char* struct_name, const char* field) {
    struct Field {
        const char *s, *f;
        size_t off;
    };
#define F(T, f) {#T, #f, offsetof(T, f)}
    static const Field fields[] = {
        F(SRLinear, kind), F(SRLinear, isa), F(SRLinear, N), F(SRLinear, K), F(SRLinear, index),
        F(SRLinear, values), F(SRLinear, row_ptr), F(SRLinear, bias), F(SRLinear, vtype), F(SRLinear, act),
        F(SRLinear, group), F(SRLinear, scales), F(SRLinear, zeros),
        F(SRLayer, in_norm), F(SRLayer, post_norm), F(SRLayer, qkv), F(SRLayer, o), F(SRLayer, gate_up),
        F(SRLayer, down), F(SRLayer, k_cache), F(SRLayer, v_cache), F(SRLayer, window),
        F(SRModel, n_layers), F(SRModel, hidden), F(SRModel, inter), F(SRModel, n_heads), F(SRModel, n_kv_heads),
        F(SRModel, head_dim), F(SRModel, vocab), F(SRModel, cap), F(SRModel, eps), F(SRModel, kv_f16),
        F(SRModel, embed), F(SRModel, final_norm), F(SRModel, lm_head), F(SRModel, layers), F(SRModel, scratch),
    };
#undef F
    if (!struct_name || !field) return -1;
    for (const Field& e : fields)
        if (!strcmp(e.s, struct_name) && !strcmp(e.f, field)) return (int64_t)e.off;
    return -1;
}

static const int64_t kMinRows = 32;  // below this many rows per thread, threading costs more than it gives
// AVX-512: from this batch on, the transposed-x index walk (bm_idx_gemm_rows) beats the expand tiles;
// measured crossover between 4 and 8 tokens on this project's Xeon (docs/kernels.md), so 6.
static int64_t kXtMinBatch = 6;
// AVX-512: from this batch on, the K-blocked walk (bm_blk_gemm_rows) replaces the plain index walk.
static int64_t kBlkMinBatch = 64;
// AVX-512 batches >= kAvx2BlkMinBatch: 1 the walk with zmm accumulators (avx512_blk_tile), 2 the
// AVX2 walk itself, 0 the index walks below (tests and benchmarks compare them)
static int kAvx512Walk = 1;
// The transposed-x width the AVX-512 walks read at B (>= kXtMinBatch) rows: 8 up to 8 rows for the
// index walk (bm_idx_tile8), else B rounded up to 16 (the 16-lane index walk, the K-blocked walk).
static inline int64_t bm_xt_bp(int64_t B) { return B <= 8 && B < kBlkMinBatch ? 8 : (B + 15) / 16 * 16; }
// AVX-512 batch 1: 0 = memory-form expand-load, 1 = 64-byte load + register-form expand. Default 1:
// measured faster here (benchmarks/results/kernels_layers.md, "register expand" rows).
static int kGemvVariant = 1;

// x [B, K] -> xT [K, Bp], zero-padded columns B..Bp-1 (64-byte aligned; caller frees)
static float* transpose_padded(const float* x, int64_t B, int64_t K, int64_t Bp) {
    float* xT = (float*)aligned_alloc(64, (size_t)((K * Bp * 4 + 63) / 64 * 64) + 64);
    if (!xT) return NULL;
    for (int64_t k = 0; k < K; ++k) {
        for (int64_t b = 0; b < B; ++b) xT[k * Bp + b] = x[b * K + k];
        for (int64_t b = B; b < Bp; ++b) xT[k * Bp + b] = 0.f;
    }
    return xT;
}
// Tuning hook (benchmarks): the batch from which AVX-512 switches from expand-load to the xT walk.
void sr_set_xt_min_batch(int64_t b) { kXtMinBatch = b < 2 ? 2 : b; }
// Whether the walk runs with zmm accumulators for a caller on the `isa` path.
int sr_walk_wide(int isa) { return isa == SR_AVX512 && (sr_cpu_features() & (1 << SR_AVX512)) && kAvx512Walk == 1; }

// Tuning hook (benchmarks, tests): what AVX-512 prefill batches run (kAvx512Walk: 1 zmm walk, 2 ymm walk,
// 0 index walks).
void sr_set_avx512_walk(int mode) { kAvx512Walk = mode >= 0 && mode <= 2 ? mode : 1; }
void sr_set_blk_min_batch(int64_t b) { kBlkMinBatch = b < 2 ? 2 : b; }
// Tuning hook (benchmarks): bytes ahead the batch-1 AVX-512 row kernels prefetch (0: none).
void sr_set_row_prefetch(int64_t bytes) { kPrefetchAhead = bytes < 0 ? 0 : bytes; }
void sr_set_gemv_variant(int v) { kGemvVariant = v; }
// Tuning hook (benchmarks, tests): the batch from which AVX2 takes the K-blocked walk (avx2_blk_linear;
// a large value turns it off) and its K block in columns (a multiple of 8; 0 keeps the current one).
void sr_set_avx2_blk(int64_t min_batch, int64_t cols) {
#if SR_X86
    kAvx2BlkMinBatch = min_batch < 2 ? 2 : min_batch;
    if (cols > 0) kAvx2BlkCols = (cols + 7) / 8 * 8;
#else
    (void)min_batch;
    (void)cols;
#endif
}
// The batch-1 form of another ISA path (SR_AVX512: as sr_set_gemv_variant; SR_AVX2: 0 gather, 1 insert).
void sr_set_gemv_form(int isa, int v) {
#if SR_X86
    if (isa == SR_AVX2) kAvx2Form = v;
#endif
    if (isa == SR_AVX512) kGemvVariant = v;
}

}  // extern "C"

// y = x W^T + b on one ISA path, rows split by `run` (OmpRows below, OrtRows in ort_op.inc).
template <class Run>
static int bitmask_linear_impl(const Run& run, int isa, const float* x, int64_t B, int64_t K, int64_t N,
                               const uint32_t* mask, const float* vals, const int64_t* rp, const float* bias,
                               float* y) {
    if (B < 0 || K < 0 || N < 0) return SR_EARG;
    if (!(sr_cpu_features() & (1 << isa))) return SR_EUNSUPPORTED;
    if (isa == SR_AVX512) {
#if SR_X86
        if (B == 1 && kGemvVariant == 1)
            run(N, kMinRows, [&](int64_t r0, int64_t r1) {
                bm_avx512_gemv_rows_reg(x, K, mask, vals, rp, bias, y, r0, r1, vals + rp[N]);
            });
        else if (B == 1)
            run(N, kMinRows, [&](int64_t r0, int64_t r1) {
                bm_avx512_gemv_rows(x, K, mask, vals, rp, bias, y, r0, r1);
            });
        else if (B < kXtMinBatch)
            run(N, kMinRows, [&](int64_t r0, int64_t r1) {
                bm_avx512_gemm_rows(x, B, K, N, mask, vals, rp, bias, y, r0, r1);
            });
        else if (B >= kAvx2BlkMinBatch && K <= 65536 && kAvx512Walk) {
            // prefill-sized: the walk (zmm accumulators; kAvx512Walk) beats the index walks below
            // (docs/kernels.md "The AVX2 prefill walk": measured on AMD Zen 4, and on the Xeon in its
            // ymm form under the AVX2 mask against these walks unmasked)
            const int rc = avx2_blk_linear(run, Avx2Input{x, K, K, SR_IN_PLAIN, NULL, NULL}, B, N, bias, y, false, 0.f,
                                           Avx2BitmaskRows{mask, vals, rp, K, (K + 31) / 32}, kAvx512Walk == 1);
            if (rc != SR_OK) return rc;
        } else {
            const int64_t Bp = bm_xt_bp(B);
            float* xT = transpose_padded(x, B, K, Bp);
            if (!xT) return SR_ENOMEM;
            int failed = 0;
            run(N, kMinRows, [&](int64_t r0, int64_t r1) {
                int32_t* off = (int32_t*)aligned_alloc(64, (size_t)(((K + 31) / 32 * 32 + 16) * 4 + 63) / 64 * 64);
                if (!off) {
                    __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
                    return;
                }
                if (B >= kBlkMinBatch) {
                    float* acc = (float*)aligned_alloc(64, kBlkRows * 128 * sizeof(float));
                    if (!acc) {
                        __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
                        free(off);
                        return;
                    }
                    bm_blk_gemm_rows(xT, B, Bp, K, N, mask, vals, rp, bias, y, r0, r1, acc, off);
                    free(acc);
                } else {
                    bm_idx_gemm_rows(xT, B, Bp, K, N, mask, vals, rp, bias, y, r0, r1, off);
                }
                free(off);
            });
            free(xT);
            if (failed) return SR_ENOMEM;
        }
#endif
    } else if (isa == SR_AVX2) {
#if SR_X86
        if (B == 1) {
            run(N, kMinRows, [&](int64_t r0, int64_t r1) {
                bm_avx2_gemv_rows(x, K, mask, vals, rp, bias, y, r0, r1, vals + rp[N]);
            });
        } else if (B >= kAvx2BlkMinBatch && K <= 65536) {
            const int rc = avx2_blk_linear(run, Avx2Input{x, K, K, SR_IN_PLAIN, NULL, NULL}, B, N, bias, y, false, 0.f,
                                           Avx2BitmaskRows{mask, vals, rp, K, (K + 31) / 32});
            if (rc != SR_OK) return rc;
        } else {
            const int64_t Bp = (B + 7) / 8 * 8;
            float* xT = transpose_padded(x, B, K, Bp);
            if (!xT) return SR_ENOMEM;
            int failed = 0;
            run(N, kMinRows, [&](int64_t r0, int64_t r1) {
                int32_t* off = (int32_t*)malloc((size_t)(K + 16) * sizeof(int32_t));
                if (!off) {
                    __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
                    return;
                }
                bm_avx2_gemm_rows(xT, B, Bp, K, N, mask, vals, rp, bias, y, r0, r1, off);
                free(off);
            });
            free(xT);
            if (failed) return SR_ENOMEM;
        }
#endif
    } else if (isa == SR_PORTABLE) {
        run(N, kMinRows, [&](int64_t r0, int64_t r1) {
            bm_portable_rows(x, B, K, N, mask, vals, rp, bias, y, r0, r1);
        });
    } else {
        return SR_EUNSUPPORTED;
    }

    __atomic_add_fetch(&g_calls[isa][SR_BITMASK], 1, __ATOMIC_RELAXED);
    return SR_OK;
}

template <class Run>
static int csr16_linear_impl(const Run& run, int isa, const float* x, int64_t B, int64_t K, int64_t N,
                             const uint16_t* idx, const float* vals, const int64_t* rp, const float* bias, float* y) {
    if (B < 0 || K < 0 || N < 0 || K > 65536) return SR_EARG;
    if (!(sr_cpu_features() & (1 << isa))) return SR_EUNSUPPORTED;
    if (isa == SR_AVX2) {
#if SR_X86
        if (B == 1) {
            run(N, kMinRows, [&](int64_t r0, int64_t r1) {
                csr_avx2_gemv_rows(x, idx, vals, rp, bias, y, r0, r1);
            });
        } else if (B >= kAvx2BlkMinBatch) {
            const int rc = avx2_blk_linear(run, Avx2Input{x, K, K, SR_IN_PLAIN, NULL, NULL}, B, N, bias, y, false, 0.f,
                                           Avx2Csr16Rows{idx, vals, rp});
            if (rc != SR_OK) return rc;
        } else {
            const int64_t Bp = (B + 7) / 8 * 8;
            float* xT = transpose_padded(x, B, K, Bp);
            if (!xT) return SR_ENOMEM;
            run(N, kMinRows, [&](int64_t r0, int64_t r1) {
                csr_avx2_gemm_rows(xT, B, Bp, N, idx, vals, rp, bias, y, r0, r1);
            });
            free(xT);
        }
#endif
    } else if (isa == SR_PORTABLE) {
        run(N, kMinRows, [&](int64_t r0, int64_t r1) {
            csr_portable_rows(x, B, K, N, idx, vals, rp, bias, y, r0, r1);
        });
    } else {
        return SR_EUNSUPPORTED;  // csr16 has no AVX-512 path of its own: AVX-512 uses bitmask
    }
    __atomic_add_fetch(&g_calls[isa][SR_CSR16], 1, __ATOMIC_RELAXED);
    return SR_OK;
}

// Row-parallel runner for the implementations above: OpenMP here (the extension's pool), ORT's
// intra-op pool in ort_op.inc. run(n, min_rows, f) calls f(r0, r1) over a partition of [0, n).
struct OmpRows {
    int threads;
    template <class F>
    void operator()(int64_t n, int64_t min_rows, F f) const { parallel_rows(n, threads, min_rows, f); }
};

extern "C" {
int sr_bitmask_linear(int isa, const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                      const float* vals, const int64_t* rp, const float* bias, float* y, int n_threads) {
    return bitmask_linear_impl(OmpRows{n_threads}, isa, x, B, K, N, mask, vals, rp, bias, y);
}

int sr_csr16_linear(int isa, const float* x, int64_t B, int64_t K, int64_t N, const uint16_t* idx,
                    const float* vals, const int64_t* rp, const float* bias, float* y, int n_threads) {
    return csr16_linear_impl(OmpRows{n_threads}, isa, x, B, K, N, idx, vals, rp, bias, y);
}

int sr_avx2_prefill_linear(int64_t M, int64_t K, int64_t N, const float* x, int layout, const void* index,
                           const float* vals, const int64_t* rp, const float* bias, float* y, int in_kind,
                           const float* in_w, float eps, int accumulate, int n_threads, int isa) {
    if (M < 0 || K < 0 || N < 0 || K > 65536) return SR_EARG;
    if (in_kind != SR_IN_PLAIN && in_kind != SR_IN_RMSNORM && in_kind != SR_IN_SILU_MUL) return SR_EARG;
    if (layout != SR_BITMASK && layout != SR_CSR16) return SR_EARG;
    if (!(sr_cpu_features() & (1 << SR_AVX2))) return SR_EUNSUPPORTED;
    if (M == 0 || N == 0) return SR_OK;
    if (!x || !rp || !y || (in_kind == SR_IN_RMSNORM && !in_w)) return SR_EARG;
#if SR_X86
    const Avx2Input in{x, K, in_kind == SR_IN_SILU_MUL ? 2 * K : K, in_kind, in_w, NULL};
    const bool wide = sr_walk_wide(isa);
    const int rc = layout == SR_BITMASK
                       ? avx2_blk_linear(OmpRows{n_threads}, in, M, N, bias, y, accumulate != 0, eps,
                                         Avx2BitmaskRows{(const uint32_t*)index, vals, rp, K, (K + 31) / 32}, wide)
                       : avx2_blk_linear(OmpRows{n_threads}, in, M, N, bias, y, accumulate != 0, eps,
                                         Avx2Csr16Rows{(const uint16_t*)index, vals, rp}, wide);
    if (rc == SR_OK) __atomic_add_fetch(&g_calls[wide ? SR_AVX512 : SR_AVX2][layout], 1, __ATOMIC_RELAXED);
    return rc;
#else
    return SR_EUNSUPPORTED;
#endif
}

int sr_bitmask_linear_bf16(int isa, const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                           const uint16_t* vals, const int64_t* rp, const float* bias, float* y, int n_threads) {
    if (B < 0 || K < 0 || N < 0) return SR_EARG;
    const int feat = sr_cpu_features();
    if (!(feat & (1 << isa))) return SR_EUNSUPPORTED;
    if (isa == SR_AVX512) {
#if SR_X86
        if (!(feat & SR_FEAT_VBMI2)) return SR_EUNSUPPORTED;
        if (B == 1) {
            parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
                bm_bf16_avx512_gemv_rows(x, K, mask, vals, rp, bias, y, r0, r1);
            });
        } else {
            const int64_t Bp = (B + 7) / 8 * 8;
            float* xT = transpose_padded(x, B, K, Bp);
            if (!xT) return SR_ENOMEM;
            parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
                bm_bf16_xt_gemm_rows(xT, B, Bp, K, N, mask, vals, rp, bias, y, r0, r1);
            });
            free(xT);
        }
#endif
    } else if (isa == SR_PORTABLE) {
        parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
            bm_bf16_portable_rows(x, B, K, N, mask, vals, rp, bias, y, r0, r1);
        });
    } else {
        return SR_EUNSUPPORTED;
    }
    __atomic_add_fetch(&g_calls[isa][SR_BITMASK_BF16], 1, __ATOMIC_RELAXED);
    return SR_OK;
}

int sr_csr16_linear_bf16(int isa, const float* x, int64_t B, int64_t K, int64_t N, const uint16_t* idx,
                         const uint16_t* vals, const int64_t* rp, const float* bias, float* y, int n_threads) {
    if (B < 0 || K < 0 || N < 0 || K > 65536) return SR_EARG;
    if (!(sr_cpu_features() & (1 << isa))) return SR_EUNSUPPORTED;
    if (isa == SR_AVX2) {
#if SR_X86
        if (B == 1) {
            parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
                csr_bf16_avx2_gemv_rows(x, idx, vals, rp, bias, y, r0, r1);
            });
        } else {
            const int64_t Bp = (B + 7) / 8 * 8;
            float* xT = transpose_padded(x, B, K, Bp);
            if (!xT) return SR_ENOMEM;
            parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
                csr_bf16_avx2_gemm_rows(xT, B, Bp, N, idx, vals, rp, bias, y, r0, r1);
            });
            free(xT);
        }
#endif
    } else if (isa == SR_PORTABLE) {
        parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
            csr_bf16_portable_rows(x, B, K, N, idx, vals, rp, bias, y, r0, r1);
        });
    } else {
        return SR_EUNSUPPORTED;
    }
    __atomic_add_fetch(&g_calls[isa][SR_CSR16_BF16], 1, __ATOMIC_RELAXED);
    return SR_OK;
}

// Scatter a bitmask layout back into a dense [N, K] row-major matrix (zeros elsewhere): the dense
// fallback for large batches when the module keeps no dense copy.
void sr_bitmask_densify(int64_t K, int64_t N, const uint32_t* mask, const float* vals, const int64_t* rp,
                        float* out, int n_threads) {
    const int64_t Kw = (K + 31) / 32;
    parallel_rows(N, n_threads, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            float* o = out + r * K;
            memset(o, 0, (size_t)K * sizeof(float));
            const float* v = vals + rp[r];
            for (int64_t w = 0; w < Kw; ++w) {
                uint32_t m = mask[r * Kw + w];
                while (m) {
                    o[32 * w + __builtin_ctz(m)] = *v++;
                    m &= m - 1;
                }
            }
        }
    });
}

void sr_csr16_densify(int64_t K, int64_t N, const uint16_t* idx, const float* vals, const int64_t* rp, float* out,
                      int n_threads) {
    parallel_rows(N, n_threads, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            float* o = out + r * K;
            memset(o, 0, (size_t)K * sizeof(float));
            for (int64_t p = rp[r]; p < rp[r + 1]; ++p) o[idx[p]] = vals[p];
        }
    });
}

}  // extern "C"

// Quantized values (int8/int4 codes + scales) for the dense and bitmask layouts.
#include "quant_kernels.inc"

// The bf16 prefill walk (AVX512-BF16 without AMX; reuses the AVX2 walk's tiling and glue above).
#include "bf16_walk.inc"

// The lean batch-1 decode step (a whole token in one parallel region; reuses the row kernels above).
#include "lean_decode.inc"

// The ONNX Runtime custom-op library entry point (RegisterCustomOps) and the SparseLinear ops.
#include "ort_op.inc"

// A module with no Python-level functions: it only makes the shared object importable/locatable.
static struct PyModuleDef sr_module = {PyModuleDef_HEAD_INIT, "_sparse_kernels",
                                       "sparse-runtime CPU sparse kernels (C entry points, loaded with ctypes)",
                                       -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__sparse_kernels(void) { return PyModule_Create(&sr_module); }
