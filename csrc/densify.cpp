// Rebuild a packed sparse weight straight into a dense bf16 [N, K] row-major matrix: the weight
// operand of a bf16 GEMM (oneDNN runs it on AMX tiles where the CPU has them), so a sparse model's
// prefill costs one dense bf16 GEMM plus this rebuild (sparse_runtime/kernels/prefill.py,
// docs/kernels.md "Prefill in bf16 (AMX)").
//
// Why a kernel of its own: the fp32 scatter (sr_bitmask_densify) plus a Python-side narrowing to
// bf16 reads and writes the whole fp32 matrix twice more than needed and cost more than the bf16
// GEMM it feeds. Here each mask word produces 32 bf16 outputs in registers and one 64-byte store.
//
// Rounding: fp32 values are rounded to nearest even EXACTLY as torch's `.to(torch.bfloat16)`
// (u + 0x7FFF + ((u >> 16) & 1)) >> 16, denormals kept; NaN becomes 0x7FC0 (torch's scalar rule;
// torch's vector loop writes 0xFFFF, so NaN payloads are not part of the bit-exact contract).
// vcvtneps2bf16 (AVX512_BF16) is NOT used: it treats denormal inputs as zero whatever MXCSR says,
// so it would differ from torch on denormal weights; the rounding above is 4 integer ops per 16
// values and the rebuild is bound by its stores anyway. bf16 values are copied bit for bit.
//
// Paths (isa argument, as the other entry points; the caller picks a supported one):
//   avx512  bitmask: per mask word, two 16-lane vexpandps (fp32 values) or one 32-lane vpexpandw
//           (bf16 values, needs AVX512-VBMI2), the rounding, one vpermt2w packing the 32 high
//           halves, one store; csr16: the scalar scatter
//   avx2    bitmask: per mask byte, a 256-entry table gives each lane its packed value's index
//           (vpermd on the next 8 values) and a keep mask; packed to 16-bit with vpackusdw
//   portable: tzcnt walk / index loop
// Threads: OpenMP over contiguous row blocks (sr_common.h), n_threads given by the caller.
#include <stdint.h>
#include <string.h>

#include "sparse_runtime.h"
#include "sr_common.h"

// fp32 -> bf16, round to nearest even (torch's c10::BFloat16 rule; NaN -> 0x7FC0).
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One value (fp32 or bf16 storage) as bf16.
template <bool BF16>
static inline uint16_t value_bf16(const void* vals, int64_t p) {
    if (BF16) return ((const uint16_t*)vals)[p];
    return f32_to_bf16(((const float*)vals)[p]);
}

// The last (partial) mask word of a row is produced into a 32-entry buffer and copied: every path
// writes whole words, so none writes past K.
static inline int64_t full_words(int64_t K) { return K / 32; }

// ---------------------------------------------------------------------------------------------
// portable
// ---------------------------------------------------------------------------------------------
template <bool BF16>
static void bm_portable_word(uint32_t m, const void* vals, int64_t& p, uint16_t* o) {
    while (m) {
        o[__builtin_ctz(m)] = value_bf16<BF16>(vals, p++);
        m &= m - 1;
    }
}

template <bool BF16>
static void bm_portable_rows(int64_t K, const uint32_t* mask, const void* vals, const int64_t* rp, uint16_t* out,
                             int64_t r0, int64_t r1) {
    const int64_t Kw = (K + 31) / 32;
    for (int64_t r = r0; r < r1; ++r) {
        uint16_t* o = out + r * K;
        memset(o, 0, (size_t)K * 2);
        int64_t p = rp[r];
        const uint32_t* mr = mask + r * Kw;
        for (int64_t w = 0; w < Kw; ++w) bm_portable_word<BF16>(mr[w], vals, p, o + 32 * w);  // pad bits are 0
    }
}

template <bool BF16>
static void csr_rows(int64_t K, const uint16_t* idx, const void* vals, const int64_t* rp, uint16_t* out, int64_t r0,
                     int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        uint16_t* o = out + r * K;
        memset(o, 0, (size_t)K * 2);
        for (int64_t p = rp[r]; p < rp[r + 1]; ++p) o[idx[p]] = value_bf16<BF16>(vals, p);
    }
}

#if SR_X86
// ---------------------------------------------------------------------------------------------
// AVX-512
// ---------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,popcnt,bmi,bmi2,fma,avx2")
// The rounded 32-bit pattern whose HIGH half is the bf16 value (torch's rule; NaN -> 0x7FC0).
static inline __m512i round_hi_avx512(__m512 e) {
    const __m512i u = _mm512_castps_si512(e);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i t = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_mask_mov_epi32(t, _mm512_cmp_ps_mask(e, e, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

// 32 bf16 of one mask word from fp32 values: two expand-loads, rounding, the 32 high halves packed
// by one two-source word permute (indices 1, 3, ..., 63).
static inline __m512i word_f32_avx512(uint32_t m, const float*& v, __m512i hi_idx) {
    const __m512 e0 = _mm512_maskz_expandloadu_ps((__mmask16)m, v);
    v += _mm_popcnt_u32(m & 0xffffu);
    const __m512 e1 = _mm512_maskz_expandloadu_ps((__mmask16)(m >> 16), v);
    v += _mm_popcnt_u32(m >> 16);
    return _mm512_permutex2var_epi16(round_hi_avx512(e0), hi_idx, round_hi_avx512(e1));
}

static void bm_f32_avx512_rows(int64_t K, const uint32_t* mask, const float* vals, const int64_t* rp, uint16_t* out,
                               int64_t r0, int64_t r1) {
    const int64_t Kw = (K + 31) / 32, Kf = full_words(K);
    alignas(64) uint16_t idx16[32];
    for (int i = 0; i < 32; ++i) idx16[i] = (uint16_t)(2 * i + 1);
    const __m512i hi_idx = _mm512_load_si512(idx16);
    for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* mr = mask + r * Kw;
        const float* v = vals + rp[r];
        uint16_t* o = out + r * K;
        for (int64_t w = 0; w < Kf; ++w) _mm512_storeu_si512(o + 32 * w, word_f32_avx512(mr[w], v, hi_idx));
        if (Kf < Kw) _mm512_mask_storeu_epi16(o + 32 * Kf, (__mmask32)((1u << (K - 32 * Kf)) - 1u),
                                              word_f32_avx512(mr[Kf], v, hi_idx));
    }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,popcnt,bmi,bmi2,fma,avx2")
// bf16 values: one 32-lane 16-bit expand-load per mask word IS the output word.
static void bm_bf16_avx512_rows(int64_t K, const uint32_t* mask, const uint16_t* vals, const int64_t* rp,
                                uint16_t* out, int64_t r0, int64_t r1) {
    const int64_t Kw = (K + 31) / 32, Kf = full_words(K);
    for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* mr = mask + r * Kw;
        const uint16_t* v = vals + rp[r];
        uint16_t* o = out + r * K;
        for (int64_t w = 0; w < Kf; ++w) {
            const uint32_t m = mr[w];
            _mm512_storeu_si512(o + 32 * w, _mm512_maskz_expandloadu_epi16((__mmask32)m, v));
            v += _mm_popcnt_u32(m);
        }
        if (Kf < Kw) _mm512_mask_storeu_epi16(o + 32 * Kf, (__mmask32)((1u << (K - 32 * Kf)) - 1u),
                                              _mm512_maskz_expandloadu_epi16((__mmask32)mr[Kf], v));
    }
}
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX2: no expand instruction; a table per mask byte: lane j takes packed value popcount(b & (2^j - 1))
// when bit j is set (vpermd), the keep mask zeroes the other lanes.
// ---------------------------------------------------------------------------------------------
struct ExpandTable {
    alignas(32) int32_t idx[256][8];
    alignas(32) int32_t keep[256][8];
    ExpandTable() {
        for (int b = 0; b < 256; ++b)
            for (int j = 0; j < 8; ++j) {
                const bool on = (b >> j) & 1;
                idx[b][j] = on ? __builtin_popcount(b & ((1 << j) - 1)) : 0;
                keep[b][j] = on ? -1 : 0;
            }
    }
};
static const ExpandTable kExpand;

#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")
static inline __m256i round_hi_avx2(__m256 e) {  // as round_hi_avx512, then >> 16
    const __m256i u = _mm256_castps_si256(e);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i t = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm256_blendv_epi8(t, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(e, e, _CMP_UNORD_Q)));
}

// The next 8 packed values as 32-bit lanes (fp32 bits, or bf16 zero-extended), never reading past vend.
template <bool BF16>
static inline __m256i load8(const void* vals, int64_t p, int64_t end) {
    if (BF16) {
        const uint16_t* v = (const uint16_t*)vals + p;
        if (p + 8 <= end) return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)v));
        alignas(16) uint16_t tmp[8] = {0};
        memcpy(tmp, v, (size_t)(end - p) * 2);
        return _mm256_cvtepu16_epi32(_mm_load_si128((const __m128i*)tmp));
    }
    const float* v = (const float*)vals + p;
    if (p + 8 <= end) return _mm256_castps_si256(_mm256_loadu_ps(v));
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(end - p)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_castps_si256(_mm256_maskload_ps(v, lanes));
}

// 8 output lanes (32-bit, bf16 in the low half) of one mask byte.
template <bool BF16>
static inline __m256i byte_avx2(uint32_t b, const void* vals, int64_t& p, int64_t end) {
    __m256i e = _mm256_permutevar8x32_epi32(load8<BF16>(vals, p, end), _mm256_load_si256((const __m256i*)kExpand.idx[b]));
    e = _mm256_and_si256(e, _mm256_load_si256((const __m256i*)kExpand.keep[b]));
    p += __builtin_popcount(b);
    return BF16 ? e : round_hi_avx2(_mm256_castsi256_ps(e));
}

// 16 bf16 (one mask half-word): two bytes' lanes packed to 16 bits, lane order restored.
template <bool BF16>
static inline __m256i half_avx2(uint32_t h, const void* vals, int64_t& p, int64_t end) {
    const __m256i a = byte_avx2<BF16>(h & 0xffu, vals, p, end);
    const __m256i b = byte_avx2<BF16>(h >> 8, vals, p, end);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
}

template <bool BF16>
static void bm_avx2_rows(int64_t K, const uint32_t* mask, const void* vals, const int64_t* rp, int64_t end,
                         uint16_t* out, int64_t r0, int64_t r1) {
    const int64_t Kw = (K + 31) / 32, Kf = full_words(K);
    alignas(32) uint16_t tail[32];
    for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* mr = mask + r * Kw;
        int64_t p = rp[r];
        uint16_t* o = out + r * K;
        for (int64_t w = 0; w < Kf; ++w) {
            const uint32_t m = mr[w];
            _mm256_storeu_si256((__m256i*)(o + 32 * w), half_avx2<BF16>(m & 0xffffu, vals, p, end));
            _mm256_storeu_si256((__m256i*)(o + 32 * w + 16), half_avx2<BF16>(m >> 16, vals, p, end));
        }
        if (Kf < Kw) {
            const uint32_t m = mr[Kf];
            _mm256_store_si256((__m256i*)tail, half_avx2<BF16>(m & 0xffffu, vals, p, end));
            _mm256_store_si256((__m256i*)(tail + 16), half_avx2<BF16>(m >> 16, vals, p, end));
            memcpy(o + 32 * Kf, tail, (size_t)(K - 32 * Kf) * 2);
        }
    }
}
#pragma GCC pop_options
#endif  // SR_X86

// ---------------------------------------------------------------------------------------------
// C API (declared in sparse_runtime.h, block "densify to bf16")
// ---------------------------------------------------------------------------------------------
static const int64_t kMinRows = 32;  // rows per thread at least (a 576-wide row is 1.1 KB of output)

static bool isa_ok(int isa) {
    return isa >= 0 && isa < SR_NISA && (sr_cpu_features() & (1 << isa));
}

extern "C" {

int sr_densify_bf16_supported(int isa, int layout, int val_dtype) {
    if (!isa_ok(isa) || (layout != SR_BITMASK && layout != SR_CSR16) || (val_dtype != SR_VAL_F32 && val_dtype != SR_VAL_BF16))
        return 0;
    if (isa == SR_AVX512 && layout == SR_BITMASK && val_dtype == SR_VAL_BF16) return (sr_cpu_features() & SR_FEAT_VBMI2) != 0;
    return 1;
}

int sr_bitmask_densify_bf16(int isa, int64_t K, int64_t N, const uint32_t* mask, const void* vals, int val_dtype,
                            const int64_t* rp, uint16_t* out, int n_threads) {
    if (K <= 0 || N < 0 || !mask || !rp || !out) return SR_EARG;
    if (!sr_densify_bf16_supported(isa, SR_BITMASK, val_dtype)) return SR_EUNSUPPORTED;
    const bool bf = val_dtype == SR_VAL_BF16;
#if SR_X86
    if (isa == SR_AVX512) {
        parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
            if (bf) bm_bf16_avx512_rows(K, mask, (const uint16_t*)vals, rp, out, r0, r1);
            else bm_f32_avx512_rows(K, mask, (const float*)vals, rp, out, r0, r1);
        });
        return SR_OK;
    }
    if (isa == SR_AVX2) {
        const int64_t end = rp[N];
        parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
            if (bf) bm_avx2_rows<true>(K, mask, vals, rp, end, out, r0, r1);
            else bm_avx2_rows<false>(K, mask, vals, rp, end, out, r0, r1);
        });
        return SR_OK;
    }
#endif
    parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
        if (bf) bm_portable_rows<true>(K, mask, vals, rp, out, r0, r1);
        else bm_portable_rows<false>(K, mask, vals, rp, out, r0, r1);
    });
    return SR_OK;
}

// csr16: one indexed store per nonzero is already what a vector scatter would do, so every ISA
// runs the same loop (isa is checked only).
int sr_csr16_densify_bf16(int isa, int64_t K, int64_t N, const uint16_t* idx, const void* vals, int val_dtype,
                          const int64_t* rp, uint16_t* out, int n_threads) {
    if (K <= 0 || K > 65536 || N < 0 || !rp || !out) return SR_EARG;
    if (!sr_densify_bf16_supported(isa, SR_CSR16, val_dtype)) return SR_EUNSUPPORTED;
    parallel_rows(N, n_threads, kMinRows, [&](int64_t r0, int64_t r1) {
        if (val_dtype == SR_VAL_BF16) csr_rows<true>(K, idx, vals, rp, out, r0, r1);
        else csr_rows<false>(K, idx, vals, rp, out, r0, r1);
    });
    return SR_OK;
}

}  // extern "C"
