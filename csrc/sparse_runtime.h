// The C interface of sparse-runtime's compiled kernels: every struct and exported function the
// Python side calls through ctypes (sparse_runtime/kernels/native.py binds the kernel entry points,
// sparse_runtime/kernels/decode.py the decode-step structs and functions).
//
// Why a header: the Python side mirrors these structs field for field in ctypes, and ctypes cannot
// read a C header. A struct that changes here without its ctypes mirror would make the decode step
// read garbage, silently. So the library reports the size and field offsets of each struct
// (sr_struct_size, sr_field_offset) and the Python side compares them with its mirrors when it
// binds the library, refusing a mismatch with one line ("rebuild with pip install -e .").
// The ONNX Runtime custom-op entry point (RegisterCustomOps) is ORT's, declared in ort_abi.h.
#ifndef SPARSE_RUNTIME_H
#define SPARSE_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

// Instruction-set paths (the `isa` argument; bit i of sr_cpu_features() says the CPU runs path i).
enum { SR_PORTABLE = 0, SR_AVX2 = 1, SR_AVX512 = 2, SR_NISA = 3 };
// Call-counter slots per ISA (sr_get_counters).
enum { SR_BITMASK = 0, SR_CSR16 = 1, SR_BITMASK_BF16 = 2, SR_CSR16_BF16 = 3, SR_BITMASK_INT8 = 4, SR_BITMASK_INT4 = 5,
       SR_DENSE_INT8 = 6, SR_DENSE_INT4 = 7, SR_NLAYOUT = 8 };
// feature bit: AVX512-VBMI2 (16/8-bit expand), needed by the bf16 and the quantized AVX-512 paths
enum { SR_FEAT_VBMI2 = 1 << 3, SR_FEAT_VNNI = 1 << 4 };  // AVX-512 extras: vpexpandb; vpdpbusd (W8A8)
// Return codes of the int-returning entry points.
enum { SR_OK = 0, SR_EUNSUPPORTED = -1, SR_ENOMEM = -2, SR_EARG = -3 };
// SRLinear.kind
enum { SR_LIN_DENSE = 0, SR_LIN_BITMASK = 1, SR_LIN_CSR16 = 2 };
// SRLinear.vtype: fp32 values, or int8 / int4 codes with float32 scales (quant_kernels.inc)
enum { SR_VT_F32 = 0, SR_VT_INT8 = 1, SR_VT_INT4 = 2 };
// SRLinear.act: the activations of its decode products (SR_ACT_INT8: W8A8, int8 per token; csrc/w8a8.inc)
enum { SR_ACT_F32 = 0, SR_ACT_INT8 = 1 };

// ---------------------------------------------------------------------------------------------
// The lean decode step's model description (lean_decode.inc; mirrored by CLinear, CLayer and
// CModel in sparse_runtime/kernels/decode.py).
// ---------------------------------------------------------------------------------------------
// One linear layer of the step: dense or a packed sparse layout, optional bias; fp32 values or
// quantized codes (vtype; the code layouts and the dequantization are in quant_kernels.inc).
typedef struct {
    int32_t kind;  // 0 dense (weight), 1 bitmask (index = uint32 mask), 2 csr16 (index = uint16)
    int32_t isa;   // SR_PORTABLE / SR_AVX2 / SR_AVX512
    int64_t N, K;  // out, in features
    const void* index;
    const float* values;  // packed nonzeros (sparse) or the dense [N, K] row-major weight; the codes
                          // (bytes) when vtype != SR_VT_F32
    const int64_t* row_ptr;  // quantized bitmask: byte offset of each row's codes
    const float* bias;  // NULL: none
    int32_t vtype;      // SR_VT_F32 / SR_VT_INT8 / SR_VT_INT4 (int4: dense or bitmask only)
    int32_t act;        // SR_ACT_F32; SR_ACT_INT8: x quantized per token (W8A8); 64 / 128: per that many columns
    int64_t group;        // quantized: columns per scale (32/64/128, dividing K); 0 = one scale per row
    const float* scales;  // quantized: [N, G] (G = K / group, or 1)
    const float* zeros;   // quantized asymmetric: [N, G] zero points (integers as float); NULL: symmetric
} SRLinear;

typedef struct {
    const float* in_norm;
    const float* post_norm;
    SRLinear qkv;      // q, k, v rows concatenated (one product instead of three)
    SRLinear o;
    SRLinear gate_up;  // gate rows then up rows
    SRLinear down;
    void* k_cache;     // [n_kv_heads, cap, head_dim], fp32 or fp16 (SRModel.kv_f16)
    void* v_cache;
    int64_t window;    // sliding window (0: full causal)
} SRLayer;

typedef struct {
    int64_t n_layers, hidden, inter, n_heads, n_kv_heads, head_dim, vocab, cap;
    float eps;
    int32_t kv_f16;  // 1: the K/V caches hold IEEE fp16 values (rounded to nearest even); 0: fp32
    const float* embed;       // [vocab, hidden]; NULL: rows dequantized from the (tied, quantized) lm_head
    const float* final_norm;  // [hidden]
    SRLinear lm_head;
    const SRLayer* layers;
    float* scratch;  // sr_decode_scratch_floats() floats
} SRModel;

#ifdef __cplusplus
extern "C" {
#endif

// ---- the ABI check (sparse_kernels.cpp) ----
// sizeof the named struct ("SRLinear", "SRLayer", "SRModel"); 0 for an unknown name.
size_t sr_struct_size(const char* name);
// offsetof(struct_name, field), by name (so a renamed or reordered field is caught even where the
// offsets in order would agree); -1 for an unknown struct or field.
int64_t sr_field_offset(const char* struct_name, const char* field);

// ---- CPU features and tuning (sparse_kernels.cpp) ----
int sr_cpu_features(void);  // bit SR_*: path supported; SR_FEAT_VBMI2
int sr_has_openmp(void);
void sr_get_counters(int64_t* out);  // out[SR_NISA * SR_NLAYOUT], isa-major
void sr_reset_counters(void);
void sr_set_xt_min_batch(int64_t b);
void sr_set_avx512_walk(int mode);  // AVX-512 prefill batches: 1 zmm walk (default), 2 ymm walk, 0 index walks
void sr_set_blk_min_batch(int64_t b);
void sr_set_row_prefetch(int64_t bytes);  // batch-1 AVX-512 row kernels: prefetch distance in bytes (0: off)
void sr_set_gemv_variant(int v);
void sr_set_avx2_blk(int64_t min_batch, int64_t cols);  // AVX2 K-blocked prefill walk: from min_batch tokens, K block
void sr_set_gemv_form(int isa, int v);

// ---- sparse linears y[B, N] = x[B, K] W^T + bias (sparse_kernels.cpp; layouts: docs/kernels.md) ----
int sr_bitmask_linear(int isa, const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                      const float* vals, const int64_t* rp, const float* bias, float* y, int n_threads);
int sr_csr16_linear(int isa, const float* x, int64_t B, int64_t K, int64_t N, const uint16_t* idx,
                    const float* vals, const int64_t* rp, const float* bias, float* y, int n_threads);
int sr_bitmask_linear_bf16(int isa, const float* x, int64_t B, int64_t K, int64_t N, const uint32_t* mask,
                           const uint16_t* vals, const int64_t* rp, const float* bias, float* y, int n_threads);
int sr_csr16_linear_bf16(int isa, const float* x, int64_t B, int64_t K, int64_t N, const uint16_t* idx,
                         const uint16_t* vals, const int64_t* rp, const float* bias, float* y, int n_threads);
void sr_bitmask_densify(int64_t K, int64_t N, const uint32_t* mask, const float* vals, const int64_t* rp,
                        float* out, int n_threads);
void sr_csr16_densify(int64_t K, int64_t N, const uint16_t* idx, const float* vals, const int64_t* rp, float* out,
                      int n_threads);

// ---- SparseGPT's column solver (sparsegpt_solver.cpp) ----
int sr_obs_columns(int isa, float* W1, float* Err1, const float* Hinv1, const float* scale, int64_t rows,
                   int64_t count, int64_t i0, int64_t i1, int n_threads);

// ---- the lean decode steps (lean_decode.inc) ----
int64_t sr_decode_scratch_floats(const SRModel* m);
void sr_decode_profile(int on);
void sr_decode_profile_get(double* out);
// batch-1 attention's form: 0 equal shares of the (kv head, position) pairs per thread (the default),
// 1 one range per thread of every kv head; set when form >= 0, returns the previous form (-1 asks;
// -2: form unknown, nothing changed)
int sr_attn_form(int form);
// each of n_threads OpenMP threads' microseconds for the same dependent chain of iters multiply-adds,
// started together at a barrier (-1: a thread the runtime did not start): the machine-pace sample
int sr_thread_pace(int n_threads, int64_t iters, double* us);
// benchmarking only (w8a8.inc): on = 1 makes every batch-1 W8A8 product with one scale per token read
// its weight bytes and write zeros, wrong results by design; set when on >= 0, returns the previous
// setting (-1 asks)
int sr_a8_bytes_only(int on);
int sr_linear_desc_run(const SRLinear* L, const float* x, float* y, int n_threads);
// y [B, N] = x [B, K] W^T + b for any descriptor at any batch (fp32 or quantized; the standalone
// entry of the quantized kernels), and the listed rows (all when rows is NULL, n = N) of a quantized
// descriptor dequantized into out [n, K] (prefill's dense form, the tied embedding's rows).
int sr_linear_desc_run_batch(const SRLinear* L, const float* x, int64_t B, float* y, int n_threads);
int sr_linear_desc_densify_rows(const SRLinear* L, const int64_t* rows, int64_t n, float* out, int n_threads);
// out[i] = x[i] rounded to fp16 (nearest even) as the K/V cache stores it with SRModel.kv_f16, by the
// conversion isa uses (F16C on SR_AVX2 / SR_AVX512, bit arithmetic on SR_PORTABLE).
int sr_kv_f16_store(const float* x, uint16_t* out, int64_t n, int isa);
int sr_decode_step(const SRModel* m, int64_t token, int64_t pos, const float* cos_, const float* sin_,
                   float* logits, int n_threads);
// flags: SR_STEP_BF16 runs the packed bitmask linears (fp32 values or int8 codes) on AMX tiles with
// x and W rounded to bf16 (fp32 accumulation) from sr_set_amx_step_min_batch() rows on, where the
// CPU has AMX (elsewhere, and for every other linear, the fp32 kernels as without the flag).
enum { SR_STEP_BF16 = 1 };
int sr_decode_step_batch(const SRModel* m, int64_t B, const int64_t* tokens, const int64_t* slots,
                         const int64_t* pos, void* k_base, void* v_base, int64_t n_slots, const float* cos_table,
                         const float* sin_table, float* logits, int n_threads, int flags);
void sr_set_amx_step_min_batch(int64_t b);

#ifdef __cplusplus
}  // extern "C"
#endif

// ---------------------------------------------------------------------------------------------
// densify to bf16 (densify.cpp): a packed weight rebuilt into a dense bf16 [N, K] row-major matrix,
// the weight of prefill's bf16 GEMM (sparse_runtime/kernels/prefill.py). fp32 values are rounded to
// nearest even exactly as torch's .to(torch.bfloat16); bf16 values are copied bit for bit.
// ---------------------------------------------------------------------------------------------
// val_dtype: the packed values' storage (int8 codes: the AMX form and the bf16 walk; int4 codes: the bf16 walk)
enum { SR_VAL_F32 = 0, SR_VAL_BF16 = 1, SR_VAL_I8 = 2, SR_VAL_I4 = 3 };

#ifdef __cplusplus
extern "C" {
#endif
// 1 when path isa runs this layout (SR_BITMASK / SR_CSR16) and value dtype on this CPU (AVX-512
// bitmask with bf16 values needs VBMI2), else 0.
int sr_densify_bf16_supported(int isa, int layout, int val_dtype);
// out[N, K] (uint16 bf16 bits) from the whole packed arrays; SR_OK, SR_EUNSUPPORTED or SR_EARG.
int sr_bitmask_densify_bf16(int isa, int64_t K, int64_t N, const uint32_t* mask, const void* vals, int val_dtype,
                            const int64_t* rp, uint16_t* out, int n_threads);
int sr_csr16_densify_bf16(int isa, int64_t K, int64_t N, const uint16_t* idx, const void* vals, int val_dtype,
                          const int64_t* rp, uint16_t* out, int n_threads);
// ---- prefill on AMX tiles (amx_prefill.cpp): y[M, N] = x[M, K] W^T + bias with the bitmask W
// rebuilt 32 rows at a time into bf16 tiles (x and W rounded to bf16, fp32 accumulation and output).
// 1 when the CPU has AMX-TILE + AMX-BF16 (+ AVX512-VBMI2) and Linux granted the tile state.
int sr_amx_supported(void);
// vtype SR_VAL_F32 / SR_VAL_BF16 (rp: value offsets) or SR_VAL_I8 (rp: byte offsets of the codes;
// scales [N, G], group columns per scale, 0 = one per row; zeros NULL: signed codes, else unsigned
// codes and their zero points). in_kind: the product's input from x (prefill's glue, fused into the
// bf16 conversion): SR_IN_PLAIN x [M, K]; SR_IN_RMSNORM in_w[k] * x[m, k] / sqrt(mean_k x^2 + eps);
// SR_IN_SILU_MUL x [M, 2K] = gate | up, input SiLU(gate) * up. accumulate: y += (y holds the
// residual) instead of y =. SR_OK, SR_EUNSUPPORTED (no AMX), SR_ENOMEM or SR_EARG.
enum { SR_IN_PLAIN = 0, SR_IN_RMSNORM = 1, SR_IN_SILU_MUL = 2 };
int sr_amx_bitmask_linear(int64_t M, int64_t K, int64_t N, const float* x, const uint32_t* mask, const void* vals,
                          int vtype, const int64_t* rp, int64_t group, const float* scales, const float* zeros,
                          const float* bias, float* y, int in_kind, const float* in_w, float eps, int accumulate,
                          int n_threads);
// The same contract on AVX512-BF16 without AMX (bf16_walk.inc, "the bf16 prefill walk"): the
// nonzeros walked two at a time with vdpbf16ps over 64-token bf16 tiles of x; K <= 65536; also int4
// codes (SR_VAL_I4, kernels.layout.QuantPacked's layouts) and dense codes (mask NULL, vtype SR_VAL_I8
// or SR_VAL_I4, rp unused): their nonzero weights walked.
// sr_bf16_walk_supported: 1 when the CPU has AVX-512 F/BW/VL/DQ, VBMI2 and BF16.
int sr_bf16_walk_supported(void);
int sr_bf16_walk_linear(int64_t M, int64_t K, int64_t N, const float* x, const uint32_t* mask, const void* vals,
                        int vtype, const int64_t* rp, int64_t group, const float* scales, const float* zeros,
                        const float* bias, float* y, int in_kind, const float* in_w, float eps, int accumulate,
                        int n_threads);
// The batched decode step's form (lean_decode.inc, flag SR_STEP_BF16): one product of M <= 128
// rows of x [M, K] with a bitmask linear (fp32 values or int8 codes) on AMX tiles, run by EVERY
// thread t of T of the caller's OpenMP team (it meets them at one barrier inside). xv: shared
// scratch of sr_amx_team_scratch(K, M) uint32. sr_amx_team_runs: 1 when it runs L here.
int sr_amx_team_runs(const SRLinear* L);
int64_t sr_amx_team_scratch(int64_t K, int64_t M);
int sr_amx_team_linear(const SRLinear* L, int64_t M, const float* x, float* y, uint32_t* xv, int t, int T);
// The AVX2 prefill walk (fp32 values, bitmask or csr16 layout by `layout`, K <= 65536) with the AMX
// form's input transforms and accumulate (in_kind, in_w, eps, accumulate as above): x [M, K] (or
// [M, 2K] for SR_IN_SILU_MUL) -> y [M, N]. The kernel the plain calls take from 16 tokens on.
int sr_avx2_prefill_linear(int64_t M, int64_t K, int64_t N, const float* x, int layout, const void* index,
                           const float* vals, const int64_t* rp, const float* bias, float* y, int in_kind,
                           const float* in_w, float eps, int accumulate, int n_threads, int isa);
// isa: the caller's path; SR_AVX512 walks with zmm accumulators (sr_walk_wide: 1 when it does)
int sr_walk_wide(int isa);
// Causal grouped-query attention of a prompt that starts its sequence (prefill_attention.cpp): q
// [B, T, H, D], k and v [B, T, KV, D], out [B, T, H, D], each with its own batch and token strides
// (floats; the heads of a token contiguous). isa SR_AVX2 (D % 16 == 0) or SR_PORTABLE.
int sr_prefill_attention(const float* q, int64_t q_batch, int64_t q_tok, const float* k, const float* v,
                         int64_t kv_batch, int64_t kv_tok, float* out, int64_t out_batch, int64_t out_tok, int64_t B,
                         int64_t T, int64_t H, int64_t KV, int64_t D, float scale, int isa, int n_threads);
// The same walk over an int8 or int4 linear's codes, dense or bitmask (symmetric or asymmetric, per row
// or per group; quant_kernels.inc): rows decoded once per call into their nonzero (dense: found by
// value; bitmask: the kept) fp32 weights, then walked.
int sr_avx2_q_prefill_linear(const SRLinear* L, int64_t M, const float* x, float* y, int in_kind, const float* in_w,
                             float eps, int accumulate, int n_threads);
// ---- prefill's elementwise glue (prefill_glue.cpp) ----
// The rotary embedding in place on the first `heads` heads (of D) of each row of x [B * T, row_stride],
// cos/sin [T, D] (HF's rotate_half form); SR_OK or SR_EARG.
int sr_rope_rows(float* x, int64_t B, int64_t T, int64_t row_stride, int64_t heads, int64_t D, const float* cos_,
                 const float* sin_);
#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // SPARSE_RUNTIME_H
