// SparseGPT's column solver (the pruning side of the compiled kernels, kept out of the inference
// kernels in sparse_kernels.cpp): the sequential OBS updates of one column block, called from
// sparse_runtime/pruning/sparsegpt.py through sparse_runtime/kernels/native.py (obs_columns).
// Compiled into the same shared object; its C entry point is declared in sparse_runtime.h.
#include <stdint.h>

#include "sparse_runtime.h"
#include "sr_common.h"

// ---------------------------------------------------------------------------------------------
// SparseGPT's sequential OBS updates inside one column block (sparse_runtime/pruning/sparsegpt.py,
// Alg. 1 of the paper), in the layout of W^T: "column" i of W is the contiguous row W1[i]. For
// i in [i0, i1):   err_i = W1[i] * scale[i];   W1[j] -= Hinv1[i, j] * err_i  for j in [i, count).
// Output rows of W (entries r of each W1 row) never interact, so threads split r and the whole
// i/j loop runs without synchronisation. One body, compiled for each ISA by inlining.
// ---------------------------------------------------------------------------------------------
static inline __attribute__((always_inline)) void obs_body(float* W1, float* Err1, const float* Hinv1,
                                                           const float* scale, int64_t rows, int64_t count,
                                                           int64_t i0, int64_t i1, int64_t r0, int64_t r1) {
    for (int64_t i = i0; i < i1; ++i) {
        const float* wi = W1 + i * rows;
        const float* si = scale + i * rows;
        float* ei = Err1 + i * rows;
        for (int64_t r = r0; r < r1; ++r) ei[r] = wi[r] * si[r];
        const float* h = Hinv1 + i * count;
        for (int64_t j = i; j < count; ++j) {
            const float hj = h[j];
            float* wj = W1 + j * rows;
            for (int64_t r = r0; r < r1; ++r) wj[r] -= hj * ei[r];
        }
    }
}

// One instantiation of obs_body per ISA (the body is inlined, so it is vectorised for that target).
#define SR_OBS_VARIANT(name)                                                                          \
    static void name(float* W1, float* Err1, const float* Hinv1, const float* scale, int64_t rows,     \
                     int64_t count, int64_t i0, int64_t i1, int64_t r0, int64_t r1) {                 \
        obs_body(W1, Err1, Hinv1, scale, rows, count, i0, i1, r0, r1);                                \
    }
SR_OBS_VARIANT(obs_portable)
#if SR_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
SR_OBS_VARIANT(obs_avx2)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
SR_OBS_VARIANT(obs_avx512)
#pragma GCC pop_options
#endif

extern "C" {

// SparseGPT OBS column updates (see obs_body): W1, Err1, scale [count, rows]; Hinv1 [count, count],
// all row-major fp32. Returns SR_EUNSUPPORTED if the CPU lacks the ISA.
int sr_obs_columns(int isa, float* W1, float* Err1, const float* Hinv1, const float* scale, int64_t rows,
                   int64_t count, int64_t i0, int64_t i1, int n_threads) {
    if (!W1 || !Err1 || !Hinv1 || !scale || rows < 0 || count < 0 || i0 < 0 || i1 > count || i0 > i1) return SR_EARG;
    if (isa < 0 || isa >= SR_NISA || !(sr_cpu_features() & (1 << isa))) return SR_EUNSUPPORTED;
    parallel_rows(rows, n_threads, 256, [&](int64_t r0, int64_t r1) {
#if SR_X86
        if (isa == SR_AVX512) { obs_avx512(W1, Err1, Hinv1, scale, rows, count, i0, i1, r0, r1); return; }
        if (isa == SR_AVX2) { obs_avx2(W1, Err1, Hinv1, scale, rows, count, i0, i1, r0, r1); return; }
#endif
        obs_portable(W1, Err1, Hinv1, scale, rows, count, i0, i1, r0, r1);
    });
    return SR_OK;
}

}  // extern "C"
