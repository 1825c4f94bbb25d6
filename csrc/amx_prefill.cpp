// Prefill products of packed sparse weights on AMX tiles, the rebuild fused into the GEMM:
// y[M, N] = x[M, K] W^T + bias, W given packed (bitmask layout; fp32 or bf16 values, or int8 codes
// with fp32 scales), x and W rounded to bf16, products accumulated in fp32, y written in fp32.
//
// Why (docs/kernels.md "Prefill on AMX tiles"): at 64+ tokens a product is compute-bound, and AMX
// runs bf16 products far faster than any vector loop, so skipping zeros in arithmetic cannot win
// there. What sparsity CAN save is memory traffic: the older bf16 path rebuilt the whole dense
// [N, K] bf16 weight into a scratch buffer (written to memory, then read back by oneDNN), which
// cost as much as the GEMM. Here each thread rebuilds 32 rows of W at a time into a buffer that
// stays in L1/L2 and feeds the tiles straight away, so the only weight bytes that cross the memory
// bus are the packed ones (30 % of the values plus the 1-bit mask at 70 % sparsity).
//
// Tiles (palette 1, 16 rows x 64 bytes each): C = W x^T, so that the rebuilt weight rows are the
// A operand as they are (row-major bf16, 32 columns = 64 bytes per tile row) and x is the B
// operand in AMX's pair-interleaved layout xv[k/2][m] (dword = bf16 pair x[m][2j], x[m][2j+1]),
// built once per call from x by rounding + a 16x16 dword transpose. Per 32-row block of W and
// 32-token block of x: four accumulators C[n][m] (tmm0-3), two weight tiles (tmm4-5), two x tiles
// (tmm6-7); the accumulators are stored, transposed in registers (16x16) and written to y with
// the bias added.
//
// Numerics: x and W are rounded to nearest even by vcvtne2ps2bf16 (as torch's `.to(torch.bfloat16)`,
// except that fp32 denormal inputs become 0; TDPBF16PS treats denormal bf16 inputs as 0 anyway; int8
// codes: scale * (code - zero) in fp32 first, then rounded), accumulation in fp32 by TDPBF16PS,
// which flushes denormal results and rounds to nearest even; the summation order is the kernel's,
// so results equal the fp32 product of the bf16-rounded operands up to fp32 summation order
// (tested), NOT bit for bit oneDNN's bf16 GEMM (which rounds y to bf16).
//
// Availability (sr_amx_supported): the CPU reports AMX-TILE and AMX-BF16, the OS enables the tile
// state (XCR0 bits 17-18), and Linux grants this process the tile data (arch_prctl
// ARCH_REQ_XCOMP_PERM, Linux >= 5.16). Anything else answers 0 and the caller uses another form.
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "sparse_runtime.h"
#include "sr_common.h"

#if SR_X86 && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define SR_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define SR_AMX 0
#endif

#if SR_AMX
namespace {

const int64_t kRows = 32;    // weight rows per block (two A tiles)
const int64_t kChunk = 128;  // tokens per x chunk (the pair-interleaved x stays in L2)

bool amx_probe() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
    if (!((b >> 16) & 1) || !((b >> 30) & 1) || !((b >> 31) & 1) || !((c >> 6) & 1)) return false;  // AVX512F/BW/VL, VBMI2
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1)) return false;  // AVX512_BF16
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) return false;  // XTILECFG, XTILEDATA enabled by the OS
    // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): granted once for the whole process
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

bool amx_ok() {
    static const bool ok = amx_probe();  // thread-safe static init (C++11)
    return ok;
}

struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Palette 1, tiles 0-7 all 16 rows x 64 bytes. A constant in static storage: GCC's
// _tile_loadconfig declares only the first 8 bytes as its memory operand, so a config built in a
// local variable could have its other stores dropped as dead.
const TileConfig kTileConfig = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// A grow-only buffer per thread and Tag (SrThreadBuf, sr_common.h), held for the thread's life: at
// most K * 256 bytes (x) and K * 64 bytes (a weight block) for the widest input K seen (3.5 MB at
// LLaMA-2-7B's 11008). Returns NULL when out of memory.
template <int Tag>
void* thread_buffer(size_t bytes) {
    static thread_local SrThreadBuf buf;
    return buf.get(bytes);
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,popcnt,bmi,bmi2,fma,avx2")

// 16x16 transpose of 32-bit elements, in place (r[i] = row i in, column i out).
inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; ++g) {  // per 128-bit lane: u[4g + c] = rows 4g..4g+3 of column 4L + c
        u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // gather lane L of u[c], u[4+c], u[8+c], u[12+c] into column 4L + c
        const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
        const __m512i v1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88),
                      w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_i32x4(v0, v1, 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(v0, v1, 0xDD);
        r[4 + c] = _mm512_shuffle_i32x4(w0, w1, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(w0, w1, 0xDD);
    }
}

// fp32 -> bf16 of 32 values (lo: elements 0-15, hi: 16-31), round to nearest even; vcvtne2ps2bf16
// treats denormal inputs as zero, as TDPBF16PS does with denormal bf16 inputs anyway.
inline __m512i pack_bf16(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

// The next values of a row placed into the lanes of k: a plain load + the register-form expand
// (one uop; the memory form is microcoded on Intel), or the memory form near vend (the end of the
// whole values array: the plain load reads a full vector).
inline __m512 expand_f32(__mmask16 k, const float* v, const float* vend) {
    return v + 16 <= vend ? _mm512_maskz_expand_ps(k, _mm512_loadu_ps(v)) : _mm512_maskz_expandloadu_ps(k, v);
}

// One mask word (32 columns) of a row as 32 bf16, pruned lanes 0; v advances past its values.
inline __m512i word_f32(uint32_t m, const float*& v, const float* vend) {
    const __m512 e0 = expand_f32((__mmask16)m, v, vend);
    v += _mm_popcnt_u32(m & 0xffffu);
    const __m512 e1 = expand_f32((__mmask16)(m >> 16), v, vend);
    v += _mm_popcnt_u32(m >> 16);
    return pack_bf16(e0, e1);
}

inline __m512i word_bf16(uint32_t m, const uint16_t*& v, const uint16_t* vend) {
    const __m512i e = v + 32 <= vend ? _mm512_maskz_expand_epi16((__mmask32)m, _mm512_loadu_si512(v))
                                     : _mm512_maskz_expandloadu_epi16((__mmask32)m, v);
    v += _mm_popcnt_u32(m);
    return e;
}

// int8 codes: scale * (code - zero) in fp32, then rounded.
inline __m512i word_i8(uint32_t m, const uint8_t*& c, const uint8_t* cend, bool sgn, float scale, float zq) {
    const __m256i b = c + 32 <= cend ? _mm256_maskz_expand_epi8((__mmask32)m, _mm256_loadu_si256((const __m256i*)c))
                                     : _mm256_maskz_expandloadu_epi8((__mmask32)m, c);
    c += _mm_popcnt_u32(m);
    const __m128i b0 = _mm256_castsi256_si128(b), b1 = _mm256_extracti128_si256(b, 1);
    const __m512i i0 = sgn ? _mm512_cvtepi8_epi32(b0) : _mm512_cvtepu8_epi32(b0);
    const __m512i i1 = sgn ? _mm512_cvtepi8_epi32(b1) : _mm512_cvtepu8_epi32(b1);
    const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zq);
    const __m512 f0 = _mm512_maskz_mul_ps((__mmask16)m, _mm512_sub_ps(_mm512_cvtepi32_ps(i0), z), s);
    const __m512 f1 = _mm512_maskz_mul_ps((__mmask16)(m >> 16), _mm512_sub_ps(_mm512_cvtepi32_ps(i1), z), s);
    return pack_bf16(f0, f1);
}

// exp(x) in fp32 for the SiLU of the input transform: x = n ln2 + r, |r| <= ln2/2, a degree-6
// polynomial for e^r (relative error ~2e-7, far below the bf16 rounding that follows), times 2^n.
inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// The input of the product, x_eff[m, k], from what the caller holds (SR_IN_*): x itself; the
// RMSNorm of x (w[k] * (x[m, k] * inv[m]), inv[m] = 1 / sqrt(mean_k x[m, k]^2 + eps), the
// HF Llama order); or SiLU(gate) * up of a gate|up row (x is [M, 2K]: gate columns, then up).
struct Input {
    const float* x;
    int64_t K, stride;  // stride: floats per row of x (K, or 2K for SR_IN_SILU_MUL)
    int kind;
    const float* w;    // SR_IN_RMSNORM: the norm weight [K]
    const float* inv;  // SR_IN_RMSNORM: per row of the chunk
};

inline __m512 input16(const Input& in, int64_t m, int64_t k, __mmask16 keep) {
    const float* row = in.x + m * in.stride + k;
    const __m512 a = _mm512_maskz_loadu_ps(keep, row);
    if (in.kind == SR_IN_RMSNORM)
        return _mm512_mul_ps(_mm512_maskz_loadu_ps(keep, in.w + k), _mm512_mul_ps(a, _mm512_set1_ps(in.inv[m])));
    if (in.kind == SR_IN_SILU_MUL) {
        const __m512 u = _mm512_maskz_loadu_ps(keep, row + in.K);
        const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                                             exp512(_mm512_sub_ps(_mm512_setzero_ps(), a))));
        return _mm512_mul_ps(_mm512_mul_ps(a, sig), u);
    }
    return a;
}

// Rows [m0, m0 + 16) x columns [32 kc, 32 kc + 32) of the chunk's input -> 16 rows (pairs j of
// the chunk) x 16 tokens of xv (dwords; stride Mp); rows past M and columns past K are zero.
inline void x_tile(const Input& in, int64_t M, int64_t m0, int64_t kc, uint32_t* xv, int64_t Mp) {
    __m512i r[16];
    const int64_t k0 = 32 * kc;
    const int64_t nk = in.K - k0 < 32 ? in.K - k0 : 32;
    const __mmask16 lo = (__mmask16)(nk >= 16 ? 0xffff : ((1u << nk) - 1u));
    const __mmask16 hi = (__mmask16)(nk >= 32 ? 0xffff : nk <= 16 ? 0 : ((1u << (nk - 16)) - 1u));
    for (int i = 0; i < 16; ++i)
        r[i] = m0 + i < M ? pack_bf16(input16(in, m0 + i, k0, lo), input16(in, m0 + i, k0 + 16, hi))
                          : _mm512_setzero_si512();
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_store_si512(xv + (16 * kc + j) * Mp + m0, r[j]);
}

// 1 / sqrt(mean(x[m, :K]^2) + eps), fp32.
inline float inv_rms(const float* row, int64_t K, float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps((__mmask16)(K - k >= 16 ? 0xffff : ((1u << (K - k)) - 1u)), row + k);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)K + eps);
}

struct Packed {
    int64_t K, N, Kw, Kp;
    const uint32_t* mask;
    const void* vals;
    int vtype;  // SR_VAL_F32 / SR_VAL_BF16 / SR_VAL_I8
    const int64_t* rp;
    int64_t group;  // int8: columns per scale (a multiple of 32 dividing K), 0 = one per row
    const float* scales;
    const float* zeros;  // int8 asymmetric (codes unsigned); NULL: symmetric (codes signed)
};

// Rows [n0, n0 + 32) of W rebuilt into w (32 rows x Kp bf16, pad columns and rows past N zero).
void rebuild_block(const Packed& P, int64_t n0, uint16_t* w) {
    for (int64_t i = 0; i < kRows; ++i) {
        uint16_t* o = w + i * P.Kp;
        const int64_t r = n0 + i;
        if (r >= P.N) {
            memset(o, 0, (size_t)P.Kp * 2);
            continue;
        }
        const uint32_t* mr = P.mask + r * P.Kw;
        if (P.vtype == SR_VAL_F32) {
            const float* v = (const float*)P.vals + P.rp[r];
            const float* vend = (const float*)P.vals + P.rp[P.N];
            for (int64_t k = 0; k < P.Kw; ++k) _mm512_store_si512(o + 32 * k, word_f32(mr[k], v, vend));
        } else if (P.vtype == SR_VAL_BF16) {
            const uint16_t* v = (const uint16_t*)P.vals + P.rp[r];
            const uint16_t* vend = (const uint16_t*)P.vals + P.rp[P.N];
            for (int64_t k = 0; k < P.Kw; ++k) _mm512_store_si512(o + 32 * k, word_bf16(mr[k], v, vend));
        } else {
            const uint8_t* c = (const uint8_t*)P.vals + P.rp[r];
            const uint8_t* cend = (const uint8_t*)P.vals + P.rp[P.N];
            const int64_t G = P.group > 0 ? P.K / P.group : 1, words_per_group = P.group > 0 ? P.group / 32 : P.Kw;
            const float* sc = P.scales + r * G;
            const float* zr = P.zeros ? P.zeros + r * G : nullptr;
            for (int64_t k = 0; k < P.Kw; ++k) {
                const int64_t g = k / words_per_group;
                _mm512_store_si512(o + 32 * k, word_i8(mr[k], c, cend, zr == nullptr, sc[g], zr ? zr[g] : 0.f));
            }
        }
    }
}

// y rows [m0, m0 + mm) x columns [n0, n0 + nn) from the accumulator block c[n][m] (16 x 16, row
// stride 32 floats), transposed in registers, bias added; acc: added to what y holds (a residual).
inline void write_tile(const float* c, float* y, int64_t N, int64_t m0, int64_t mm, int64_t n0, int64_t nn,
                       const float* bias, bool acc) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + 32 * i);
    transpose16(r);
    const __mmask16 keep = (__mmask16)(nn >= 16 ? 0xffff : ((1u << nn) - 1u));
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
    for (int64_t j = 0; j < mm; ++j) {
        float* o = y + (m0 + j) * N + n0;
        const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[j]), b);
        _mm512_mask_storeu_ps(o, keep, acc ? _mm512_add_ps(_mm512_maskz_loadu_ps(keep, o), v) : v);
    }
}

// Block rows [n0, n0 + 32) x all tokens of the chunk [mc, mc + M_c) (xv: its pair-interleaved x).
void block_product(const uint16_t* w, int64_t Kp, const uint32_t* xv, int64_t Mp, int64_t Mc, int64_t mc,
                   int64_t n0, int64_t N, const float* bias, float* y, bool acc) {
    alignas(64) float c[32 * 32];  // [n][m]
    const int64_t chunks = Kp / 32;
    for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
        const bool two = m0 + 16 < Mp;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kc = 0; kc < chunks; ++kc) {
            _tile_loadd(4, w + 32 * kc, Kp * 2);
            _tile_loadd(5, w + 16 * Kp + 32 * kc, Kp * 2);
            _tile_loadd(6, xv + 16 * kc * Mp + m0, Mp * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (two) {
                _tile_loadd(7, xv + 16 * kc * Mp + m0 + 16, Mp * 4);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, c, 128);
        _tile_stored(1, c + 16, 128);
        _tile_stored(2, c + 16 * 32, 128);
        _tile_stored(3, c + 16 * 32 + 16, 128);
        __asm__ volatile("" ::: "memory");  // the tile stores (inline asm) wrote c
        for (int half = 0; half < 2; ++half) {
            const int64_t nb = n0 + 16 * half, nn = N - nb < 16 ? N - nb : 16;
            if (nn <= 0) break;
            for (int64_t mh = 0; mh < (two ? 2 : 1); ++mh) {
                const int64_t mt = m0 + 16 * mh, mm = Mc - mt < 16 ? Mc - mt : 16;
                if (mm <= 0) break;
                write_tile(c + 16 * 32 * half + 16 * mh, y, N, mc + mt, mm, nb, nn, bias, acc);
            }
        }
    }
}

int amx_linear(const Packed& P, Input in, int64_t M, const float* bias, float* y, bool acc, float eps,
               int n_threads) {
    uint32_t* xv = (uint32_t*)thread_buffer<0>((size_t)(P.Kp / 2) * kChunk * 4);
    if (!xv) return SR_ENOMEM;
    const int64_t blocks = (P.N + kRows - 1) / kRows;
    int nt = n_threads > 0 ? n_threads : 1;
    if (nt > blocks) nt = (int)blocks;
    const float* x = in.x;
    float inv[kChunk];
    int rc = SR_OK;
    for (int64_t mc = 0; mc < M; mc += kChunk) {
        const int64_t Mc = M - mc < kChunk ? M - mc : kChunk, Mp = (Mc + 15) / 16 * 16;
        in.x = x + mc * in.stride;
        in.inv = inv;
        const int64_t mtiles = Mp / 16, xtasks = mtiles * (P.Kp / 32);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
        {
            if (in.kind == SR_IN_RMSNORM) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
                for (int64_t m = 0; m < Mc; ++m) inv[m] = inv_rms(in.x + m * in.stride, in.K, eps);
            }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t t = 0; t < xtasks; ++t) x_tile(in, Mc, 16 * (t % mtiles), t / mtiles, xv, Mp);
            // (the implicit barriers of the loops above: every thread reads all of inv and xv below)
            uint16_t* w = (uint16_t*)thread_buffer<1>((size_t)kRows * P.Kp * 2);
            if (!w) rc = SR_ENOMEM;  // every thread still meets the loop below (an OpenMP rule)
            else _tile_loadconfig(&kTileConfig);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t b = 0; b < blocks; ++b) {
                if (!w) continue;
                rebuild_block(P, kRows * b, w);
                __asm__ volatile("" ::: "memory");  // the tile loads (inline asm) read w
                block_product(w, P.Kp, xv, Mp, Mc, mc, kRows * b, P.N, bias, y, acc);
            }
            if (w) _tile_release();
        }
        if (rc != SR_OK) return rc;
    }
    return SR_OK;
}
// The team form (sr_amx_team_linear): the caller's OpenMP team runs one product of M <= kChunk
// rows; thread t of T converts its share of x's tiles into the shared xv, meets the others at a
// barrier (an orphaned one: it binds to the caller's parallel region), then runs its share of the
// 32-row weight blocks.
int amx_team(const Packed& P, const Input& in, int64_t M, const float* bias, float* y, uint32_t* xv, int t,
             int T) {
    const int64_t Mp = (M + 15) / 16 * 16, mtiles = Mp / 16, xtasks = mtiles * (P.Kp / 32);
    for (int64_t i = t; i < xtasks; i += T) x_tile(in, M, 16 * (i % mtiles), i / mtiles, xv, Mp);
#ifdef _OPENMP
#pragma omp barrier
#endif
    uint16_t* w = (uint16_t*)thread_buffer<1>((size_t)kRows * P.Kp * 2);
    if (!w) return SR_ENOMEM;
    _tile_loadconfig(&kTileConfig);
    const int64_t blocks = (P.N + kRows - 1) / kRows, b1 = blocks * (t + 1) / T;
    for (int64_t b = blocks * t / T; b < b1; ++b) {
        rebuild_block(P, kRows * b, w);
        __asm__ volatile("" ::: "memory");  // the tile loads (inline asm) read w
        block_product(w, P.Kp, xv, Mp, M, 0, kRows * b, P.N, bias, y, false);
    }
    _tile_release();
    return SR_OK;
}
#pragma GCC pop_options

}  // namespace
#endif  // SR_AMX

extern "C" {

int sr_amx_supported(void) {
#if SR_AMX
    return amx_ok() ? 1 : 0;
#else
    return 0;
#endif
}

int sr_amx_bitmask_linear(int64_t M, int64_t K, int64_t N, const float* x, const uint32_t* mask, const void* vals,
                          int vtype, const int64_t* rp, int64_t group, const float* scales, const float* zeros,
                          const float* bias, float* y, int in_kind, const float* in_w, float eps, int accumulate,
                          int n_threads) {
    if (M < 0 || K <= 0 || N < 0 || (M > 0 && (!x || !y)) || (N > 0 && (!mask || !rp))) return SR_EARG;
    if (vtype != SR_VAL_F32 && vtype != SR_VAL_BF16 && vtype != SR_VAL_I8) return SR_EARG;
    if (vtype == SR_VAL_I8 && (!scales || group < 0 || (group > 0 && (group % 32 || K % group)))) return SR_EARG;
    if (in_kind != SR_IN_PLAIN && in_kind != SR_IN_RMSNORM && in_kind != SR_IN_SILU_MUL) return SR_EARG;
    if (in_kind == SR_IN_RMSNORM && !in_w) return SR_EARG;
#if SR_AMX
    if (!amx_ok()) return SR_EUNSUPPORTED;
    if (M == 0 || N == 0) return SR_OK;
    const int64_t Kw = (K + 31) / 32;
    const Packed P{K, N, Kw, Kw * 32, mask, vals, vtype, rp, vtype == SR_VAL_I8 ? group : 0, scales, zeros};
    const Input in{x, K, in_kind == SR_IN_SILU_MUL ? 2 * K : K, in_kind, in_w, nullptr};
    return amx_linear(P, in, M, bias, y, accumulate != 0, eps, n_threads);
#else
    (void)bias;
    (void)in_w;
    (void)eps;
    (void)accumulate;
    (void)n_threads;
    return SR_EUNSUPPORTED;
#endif
}

int sr_amx_team_runs(const SRLinear* L) {
#if SR_AMX
    return L && L->kind == SR_LIN_BITMASK && (L->vtype == SR_VT_F32 || L->vtype == SR_VT_INT8) &&
           (L->vtype == SR_VT_F32 || L->group == 0 || (L->group % 32 == 0 && L->K % L->group == 0)) && amx_ok();
#else
    (void)L;
    return 0;
#endif
}

int64_t sr_amx_team_scratch(int64_t K, int64_t M) { return (K + 31) / 32 * 16 * ((M + 15) / 16 * 16); }

int sr_amx_team_linear(const SRLinear* L, int64_t M, const float* x, float* y, uint32_t* xv, int t, int T) {
#if SR_AMX
    const int64_t Kw = (L->K + 31) / 32;
    const bool q = L->vtype == SR_VT_INT8;
    const Packed P{L->K, L->N, Kw, Kw * 32, (const uint32_t*)L->index, L->values, q ? SR_VAL_I8 : SR_VAL_F32,
                   L->row_ptr, q ? L->group : 0, L->scales, L->zeros};
    const Input in{x, L->K, L->K, SR_IN_PLAIN, nullptr, nullptr};
    return amx_team(P, in, M, L->bias, y, xv, t, T);
#else
    (void)L, (void)M, (void)x, (void)y, (void)xv, (void)t, (void)T;
    return SR_EUNSUPPORTED;
#endif
}

}  // extern "C"
