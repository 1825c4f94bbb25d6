// Prefill's elementwise glue in C, where torch spends more in dispatch and temporaries than in
// arithmetic: on a 128-token SmolLM2 prefill, the rotary embedding alone was ~15 torch ops per layer
// (muls, a cat of a negated half, adds) for ~100 K values. Used by the lean engines' bf16 prefill
// (sparse_runtime/runtime/lean_llama.py, docs/kernels.md "Prefill on AMX tiles").
//
// Plain C++: the loops are simple enough for the compiler to vectorise for the baseline ISA, and the
// work is small, so no per-ISA paths and no threads.
#include <stdint.h>

#include "sparse_runtime.h"

extern "C" {

// The rotary embedding (HF Llama's rotate_half form), in place on the first `heads` heads of each
// row of x [B * T, row_stride]: for head h and d < D/2, with c = cos[t, :], s = sin[t, :] (t = the
// row's position within its sequence, cos/sin [T, D]):
//   x[d]       <- x[d] * c[d] - x[d + D/2] * s[d]
//   x[d + D/2] <- x[d + D/2] * c[d + D/2] + x[d] * s[d + D/2]
// The q and k heads lead each row of the fused qkv product, so one call rotates both.
int sr_rope_rows(float* x, int64_t B, int64_t T, int64_t row_stride, int64_t heads, int64_t D, const float* cos_,
                 const float* sin_) {
    if (!x || !cos_ || !sin_ || B < 0 || T < 0 || D <= 0 || D % 2 || heads < 0 || row_stride < heads * D)
        return SR_EARG;
    const int64_t h2 = D / 2;
    for (int64_t r = 0; r < B * T; ++r) {
        const float* c = cos_ + (r % T) * D;
        const float* s = sin_ + (r % T) * D;
        for (int64_t h = 0; h < heads; ++h) {
            float* a = x + r * row_stride + h * D;
            float* b = a + h2;
            for (int64_t d = 0; d < h2; ++d) {
                const float lo = a[d], hi = b[d];
                a[d] = lo * c[d] - hi * s[d];
                b[d] = hi * c[d + h2] + lo * s[d + h2];
            }
        }
    }
    return SR_OK;
}

}  // extern "C"
