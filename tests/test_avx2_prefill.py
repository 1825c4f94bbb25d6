"""The AVX2 prefill walk (csrc/sparse_kernels.cpp ``avx2_blk_linear``; ``kernels.prefill.avx2_prefill_linear``)
and the causal prefill attention (csrc/prefill_attention.cpp; ``kernels.prefill.prefill_attention``):
against plain float64 references on odd shapes (token tiles, K blocks and row blocks all partial),
every sparsity from dense to all-zero, empty rows, both layouts, with and without bias; the fused
glue (RMSNorm, SiLU-mul, residual add) against torch's ops; NaN kept; bad input; the lean engine
running both on its fp32 prefill. Runs wherever the CPU has AVX2 (AVX-512 machines too: the AVX2
path is chosen explicitly)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, native, pack, supported_isas
from sparse_runtime.kernels.ops import sparse_linear
from sparse_runtime.kernels.prefill import avx2_prefill_linear, prefill_attention

from helpers import pruned_weight

AVX2 = available() and "avx2" in supported_isas()
pytestmark = pytest.mark.skipif(not AVX2, reason="CPU (or build) without the AVX2 path")

# (M tokens, K, N): tiles of 64 tokens, K blocks of 128 columns, row blocks of 32 rows, all partial
SHAPES = [(16, 77, 33), (17, 200, 40), (64, 128, 32), (65, 300, 71), (129, 1056, 33), (200, 64, 8)]
SPARSITY = [0.0, 0.5, 0.7, 0.95, 1.0]


def reference(x, w, bias=None):
    y = x.double() @ w.double().t()
    return y if bias is None else y + bias.double()


def close(y, ref, rel=2e-6):
    scale = max(float(ref.abs().max()), 1e-6)
    assert float((y.double() - ref).abs().max()) <= rel * scale


@pytest.mark.parametrize("layout", ["csr16", "bitmask"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITY)
def test_walk_matches_reference(layout, shape, sparsity):
    m, k, n = shape
    w = pruned_weight(n, k, sparsity, seed=m)
    if n > 3:
        w[2] = 0  # an empty row
    g = torch.Generator().manual_seed(k)
    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    p = pack(w, layout)
    close(avx2_prefill_linear(p, b, x, isa="avx2"), reference(x, w, b))
    close(avx2_prefill_linear(p, None, x, isa="avx2", threads=1), reference(x, w))
    # the plain sparse kernel takes the same walk from 16 tokens on, and the older per-row walk below
    close(sparse_linear(x, p, b, isa="avx2"), reference(x, w, b))
    lib = native.lib()
    lib.sr_set_avx2_blk(1 << 40, 0)
    try:
        close(sparse_linear(x, p, b, isa="avx2"), reference(x, w, b))
    finally:
        lib.sr_set_avx2_blk(16, 0)


@pytest.mark.parametrize("cols", [8, 64, 256])
def test_walk_any_k_block(cols):
    """The K block (a tuning knob) changes the blocking only, never the result."""
    w = pruned_weight(50, 700, 0.7, seed=3)
    x = torch.randn(70, 700, generator=torch.Generator().manual_seed(3))
    p = pack(w, "csr16")
    lib = native.lib()
    lib.sr_set_avx2_blk(16, cols)
    try:
        close(avx2_prefill_linear(p, None, x, isa="avx2"), reference(x, w))
    finally:
        lib.sr_set_avx2_blk(16, 128)


@pytest.mark.parametrize("layout", ["csr16", "bitmask"])
def test_glue_matches_torch_ops(layout):
    """RMSNorm and SiLU-mul inputs and the in-place residual add equal the torch ops they replace."""
    g = torch.Generator().manual_seed(5)
    m, k, n = 70, 136, 72
    w = pruned_weight(n, k, 0.7, seed=6)
    p, b = pack(w, layout), torch.randn(n, generator=g)
    x, nw = torch.randn(m, k, generator=g) * 3, torch.randn(k, generator=g)
    h = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    close(avx2_prefill_linear(p, b, x, isa="avx2", norm=nw, eps=1e-5), reference(h, w, b), rel=1e-5)
    gu = torch.randn(m, 2 * k, generator=g) * 6  # gate values far into both tails of the SiLU
    gate, up = gu.chunk(2, -1)
    close(avx2_prefill_linear(p, b, gu, isa="avx2", silu_mul=True), reference(F.silu(gate) * up, w, b), rel=1e-5)
    r = torch.randn(m, n, generator=g)
    r0 = r.clone()
    out = avx2_prefill_linear(p, b, x, isa="avx2", residual=r)
    assert out.data_ptr() == r.data_ptr()
    close(r, r0.double() + reference(x, w, b))


def test_nan_is_kept():
    """A NaN input (through the SiLU too) makes NaN outputs, never finite ones."""
    w = torch.ones(4, 16)
    p = pack(w, "csr16")
    for kw in ({}, {"silu_mul": True}):
        x = torch.ones(16, 32 if kw else 16)
        x[3, 0] = float("nan")
        y = avx2_prefill_linear(p, None, x, isa="avx2", **kw)
        assert torch.isnan(y[3]).all() and torch.isfinite(y[torch.arange(16) != 3]).all()


def test_bad_input():
    p = pack(pruned_weight(16, 32, 0.5), "csr16")
    with pytest.raises(ConfigError, match="input features"):
        avx2_prefill_linear(p, None, torch.randn(20, 31), isa="avx2")
    with pytest.raises(ConfigError, match="input features"):
        avx2_prefill_linear(p, None, torch.randn(20, 32), isa="avx2", silu_mul=True)  # gate|up is 2K wide
    with pytest.raises(ConfigError, match="residual"):
        avx2_prefill_linear(p, None, torch.randn(20, 32), isa="avx2", residual=torch.zeros(20, 15))
    with pytest.raises(ConfigError, match="one input transform"):
        avx2_prefill_linear(p, None, torch.randn(20, 64), isa="avx2", norm=torch.ones(32), silu_mul=True)
    with pytest.raises(ConfigError, match="fp32 bitmask/csr16"):
        avx2_prefill_linear(pack(pruned_weight(16, 32, 0.5), "csr16", "bfloat16"), None, torch.randn(20, 32),
                            isa="avx2")
    assert avx2_prefill_linear(p, None, torch.randn(0, 32), isa="avx2").shape == (0, 16)


def attention_reference(qkv, h, kv, d):
    b, t, _ = qkv.shape
    q, k, v = qkv.double().split([h * d, kv * d, kv * d], -1)
    q = q.view(b, t, h, d).transpose(1, 2)
    k = k.view(b, t, kv, d).transpose(1, 2).repeat_interleave(h // kv, 1)
    v = v.view(b, t, kv, d).transpose(1, 2).repeat_interleave(h // kv, 1)
    s = (q @ k.transpose(-1, -2)) * d ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, h * d)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("dims", [(1, 128, 9, 3, 64), (2, 37, 4, 2, 16), (1, 1, 2, 1, 32), (1, 70, 8, 8, 128),
                                  (1, 17, 6, 2, 48), (1, 33, 3, 1, 24)])
def test_attention_matches_reference(isa, dims):
    b, t, h, kv, d = dims
    if isa == "avx2" and d % 16:
        pytest.skip("the AVX2 path takes head dims that are multiples of 16")
    qkv = torch.randn(b, t, (h + 2 * kv) * d, generator=torch.Generator().manual_seed(t)) * 2
    close(prefill_attention(qkv, h, kv, d, isa=isa), attention_reference(qkv, h, kv, d), rel=1e-5)


def test_attention_nan_and_bad_input():
    h, kv, d = 4, 2, 16
    qkv = torch.randn(1, 20, (h + 2 * kv) * d)
    qkv[0, 5, 3] = float("nan")  # query head 0 of token 5 only
    y = prefill_attention(qkv, h, kv, d)
    assert torch.isnan(y[0, 5, :d]).all() and torch.isfinite(y[0, :, d:]).all()
    assert torch.isfinite(y[0, torch.arange(20) != 5, :d]).all()
    with pytest.raises(ConfigError, match="does not hold"):
        prefill_attention(torch.randn(1, 4, 100), h, kv, d)
    with pytest.raises(ConfigError, match="multiple of kv heads"):
        prefill_attention(torch.randn(1, 4, (3 + 2 * 2) * d), 3, 2, d)
    with pytest.raises(ConfigError, match="contiguous float32"):
        prefill_attention(qkv.double(), h, kv, d)
    with pytest.raises(ConfigError, match="prefill attention failed"):
        prefill_attention(torch.randn(1, 4, (h + 2 * kv) * 24), h, kv, 24, isa="avx2")  # 24 % 16


@pytest.mark.parametrize("layout", ["csr16", "bitmask"])
def test_lean_prefill_runs_the_walk_and_attention(layout):
    """The lean engine's fp32 prefill on the AVX2 path: every product takes the walk with its glue
    (prompts of 16+ tokens), attention the C kernel; logits equal Hugging Face's, decode after it too."""
    from helpers import compare_with_hf, random_pruned
    from sparse_runtime.models.tiny import tiny_model
    from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama

    model = random_pruned(tiny_model("llama"))
    lean = LeanLlama(model, LeanConfig(isa="avx2", layout=layout, calibrate=False, batch_threshold=1 << 20,
                                       initial_cache=16), threads=2)
    compare_with_hf(model, lean, prompt=40, steps=4, atol=2e-5)
    lin = [f for l in lean.layers for f in (l.qkv, l.o, l.gate_up, l.down)]
    assert all(f.prefill_forms.get("avx2", 0) == 1 for f in lin)


SCHEMES = pytest.mark.parametrize(
    "scheme", [(8, 0, True), (8, 64, True), (8, 0, False), (8, 32, False), (4, 32, True), (4, 64, False), (4, 0, True)],
    ids=["sym", "sym-g64", "asym", "asym-g32", "int4-g32", "int4-g64-asym", "int4-row"])


def _bitmask_codes_pack() -> bool:
    """Bitmask codes are packed for the AVX-512 (VBMI2) path only."""
    return "avx512" in supported_isas() and bool(native.lib().sr_cpu_features() & native.FEAT_VBMI2)


@SCHEMES
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("layout", ["dense", "bitmask"])
def test_code_walk_matches_dequantized(scheme, sparsity, layout):
    """int8 / int4 codes walked as their decoded nonzeros (dense: found by value; bitmask: the kept
    weights): the fp32 product with the dequantized weight, glue included (odd K: a partial last
    8-column chunk, and for int4 a partial 32-column chunk or mask word; a NaN scale stays NaN)."""
    from sparse_runtime.kernels.prefill import avx2_quant_linear, avx2_quant_runs
    from sparse_runtime.kernels.quant import QuantLinear, quantize_packed
    from sparse_runtime.quant.scheme import QuantScheme

    if layout == "bitmask" and not _bitmask_codes_pack():
        pytest.skip("bitmask codes run on the AVX-512 (VBMI2) path only")
    bits, group, sym = scheme
    k = 128 if group else 133
    w = pruned_weight(70, k, sparsity, seed=bits + group)
    g = torch.Generator().manual_seed(7)
    b = torch.randn(70, generator=g)
    q = QuantLinear(quantize_packed(w, QuantScheme(bits, group, sym), layout), b,
                    isa="avx2" if layout == "dense" else "avx512")
    assert avx2_quant_runs(q, 0.7) and not avx2_quant_runs(q, 0.3)
    wd = q.dequantize()
    x = torch.randn(40, k, generator=g) * 2
    close(avx2_quant_linear(q, x), reference(x, wd, b))
    nw = torch.rand(k, generator=g) + 0.5
    h = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    r = torch.randn(40, 70, generator=g)
    want = r.double() + reference(h, wd, b)
    close(avx2_quant_linear(q, x, norm=nw, eps=1e-6, residual=r), want, rel=1e-5)
    if sparsity < 1.0:  # a row with kept weights (a row without any has no weight to carry the NaN)
        r = int((w != 0).sum(1).argmax())
        q.packed.scales[r] = float("nan")  # the descriptor reads the same tensor
        y = avx2_quant_linear(q, x)
        assert torch.isnan(y[:, r]).all() and torch.isfinite(y[:, torch.arange(70) != r]).all()


def test_code_walk_bitmask_rows_of_every_fill():
    """Bitmask int4 codes whose mask words hold 0..32 kept weights (odd counts: a word's last byte
    half used), rows of every length, against the dequantized product."""
    from sparse_runtime.kernels.prefill import avx2_quant_linear
    from sparse_runtime.kernels.quant import QuantLinear, quantize_packed
    from sparse_runtime.quant.scheme import QuantScheme

    if not _bitmask_codes_pack():
        pytest.skip("bitmask codes run on the AVX-512 (VBMI2) path only")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(33, 96, generator=g)
    for r in range(33):  # row r keeps r columns, spread over its three words
        keep = torch.randperm(96, generator=g)[:r]
        row = torch.zeros(96)
        row[keep] = w[r, keep]
        w[r] = row
    for scheme in (QuantScheme(4, 32, False), QuantScheme(8)):
        q = QuantLinear(quantize_packed(w, scheme, "bitmask"), isa="avx512")
        x = torch.randn(20, 96, generator=g)
        close(avx2_quant_linear(q, x), reference(x, q.dequantize(), None))


@pytest.mark.parametrize("dtype,scheme", [("int8", (8, 0)), ("int4", (4, 32))])
def test_lean_code_prefill_runs_the_walk(dtype, scheme):
    """The lean engine with int8 / int4 values on the AVX2 path: a 40-token prompt's products take the
    walk over the decoded codes (form "avx2q"), logits equal the dequantized Hugging Face model's."""
    import copy

    from helpers import compare_with_hf, random_pruned
    from sparse_runtime.models.tiny import tiny_model
    from sparse_runtime.quant.scheme import QuantScheme, quantize_rtn
    from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama

    model = random_pruned(tiny_model("llama"))
    lean = LeanLlama(model, LeanConfig(isa="avx2", value_dtype=dtype, group=scheme[1], calibrate=False,
                                       initial_cache=16), threads=2)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(quantize_rtn(m.weight, QuantScheme(*scheme)).dequantize())
    compare_with_hf(ref, lean, prompt=40, steps=3, atol=1e-4)
    lin = [f for l in lean.layers for f in (l.qkv, l.o, l.gate_up, l.down)]
    assert all(f.prefill_forms.get("avx2q", 0) == 1 for f in lin)


def test_lean_w8a8_prefill_walks_bitmask_codes():
    """The lean engine with int8 activations (W8A8) holds bitmask int8 codes on the AVX-512 path; its
    fp32 prefill (a 40-token prompt: no activation rounding there) walks them (form "avx2q") instead of
    dequantizing each into a GEMM, and the prompt's logits equal the dequantized Hugging Face model's."""
    import copy

    from helpers import random_pruned
    from sparse_runtime.models.tiny import tiny_model
    from sparse_runtime.quant.scheme import QuantScheme, quantize_rtn
    from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama

    if not _bitmask_codes_pack() or not native.lib().sr_cpu_features() & native.FEAT_VNNI:
        pytest.skip("W8A8 bitmask codes run on AVX-512 with VNNI and VBMI2")
    model = random_pruned(tiny_model("llama"))
    lean = LeanLlama(model, LeanConfig(isa="avx512", value_dtype="int8", act_dtype="int8", calibrate=False,
                                       initial_cache=16), threads=2)
    lin = [f for l in lean.layers for f in (l.qkv, l.o, l.gate_up, l.down)]
    assert any(f.qlin.packed.layout == "bitmask" for f in lin)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(quantize_rtn(m.weight, QuantScheme(8)).dequantize())
        ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
        want = ref(ids).logits
        got = lean.prefill(ids)
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
    assert all(f.prefill_forms.get("avx2q", 0) == 1 for f in lin if f.qlin.packed.layout == "bitmask")
