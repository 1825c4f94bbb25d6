"""The bf16 rebuild of packed weights (csrc/densify.cpp) and the bf16 prefill product
(sparse_runtime/kernels/prefill.py): bit-exact against torch's own rounding on every ISA path the
CPU runs, both layouts, fp32 and bf16 values, 1 and 2 threads; the product against torch's bf16
GEMM (exact) and against fp32 (bf16 tolerance); the measured form choice."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, native, pack, supported_isas, unavailable_reason, unpack
from sparse_runtime.kernels.module import DenseScratch
from sparse_runtime.kernels.prefill import (PREFILL_FORMS, amx_available, bf16_fpmath, bf16_prefill_linear,
                                            bf16_walk_available, choose_prefill_form, dense_bf16_linear,
                                            densify_bf16_into, densify_isa, fpmath_available, prefill_call,
                                            prefill_form_timings, token_bucket)

if not available():
    if os.environ.get("SPARSE_RUNTIME_REQUIRE_KERNELS") == "1":
        raise RuntimeError(unavailable_reason())
    pytest.skip(unavailable_reason() or "sparse kernels unavailable", allow_module_level=True)

ISAS = [pytest.param(i, marks=pytest.mark.skipif(i not in supported_isas(), reason=f"CPU lacks {i}"))
        for i in native.ISAS]
SHAPES = [(1, 1), (3, 31), (7, 33), (37, 45), (64, 96), (70, 576)]  # odd K, partial mask words, > 1 row block


def weight(n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if sparsity == "2:4":
        kk = k - k % 4
        blk = w[:, :kk].reshape(n, -1, 4)
        drop = blk.abs().argsort(-1)[..., :2]
        blk.scatter_(-1, drop, 0.0)
        w[:, :kk] = blk.reshape(n, kk)
    else:
        w[torch.rand(n, k, generator=g) < sparsity] = 0
    if n > 2:
        w[1] = 0  # an empty row
        w[-1] = 0
    return w


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def forced(p, isa):
    """Run on ``isa`` itself (not a fallback) when it supports this layout and value dtype."""
    lb = native.lib()
    if not lb.sr_densify_bf16_supported(native.ISAS.index(isa), native.LAYOUT_IDS[p.layout],
                                        int(p.values.dtype == torch.bfloat16)):
        pytest.skip(f"{isa} has no bf16 rebuild of {p.layout} with {p.values.dtype} values on this CPU")
    assert densify_isa(p, isa) == isa


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["bitmask", "csr16"])
@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.95, "2:4"])
def test_densify_bf16_bit_exact(isa, layout, value_dtype, sparsity):
    for i, (n, k) in enumerate(SHAPES):
        p = pack(weight(n, k, sparsity, seed=i), layout, value_dtype)
        if i == 0:
            forced(p, isa)
        ref = unpack(p).to(torch.bfloat16)
        for threads in (1, 2):
            out = torch.full((n, k), 7.0, dtype=torch.bfloat16)  # stale contents must be overwritten
            densify_bf16_into(p, out, threads=threads, isa=isa)
            assert torch.equal(bits(out), bits(ref)), (isa, layout, value_dtype, sparsity, n, k, threads)


@pytest.mark.parametrize("isa", ISAS)
def test_rounding_matches_torch_on_edge_values(isa):
    """Ties to even both ways, denormals (kept, not flushed), the largest finite value (rounds to
    inf), tiny and negative values: the fp32 -> bf16 rounding is torch's, bit for bit."""
    raw = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x00000001, 0x00400000, 0x807FFFFF,
                        0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBF808001, 0x00017FFF], dtype=torch.int64)
    vals = raw.to(torch.int32).view(torch.float32)
    w = torch.zeros(3, 40)
    w[0, :12] = vals
    w[2, 40 - 12:] = vals.flip(0)
    p = pack(w, "bitmask")
    forced(p, isa)
    out = torch.empty(3, 40, dtype=torch.bfloat16)
    densify_bf16_into(p, out, threads=1, isa=isa)
    assert torch.equal(bits(out), bits(w.to(torch.bfloat16)))


def test_densify_bf16_refuses_bad_output():
    p = pack(weight(8, 40, 0.7), "bitmask")
    with pytest.raises(ConfigError, match="contiguous bfloat16"):
        densify_bf16_into(p, torch.empty(8, 40))
    with pytest.raises(ConfigError, match="contiguous bfloat16"):
        densify_bf16_into(p, torch.empty(40, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("layout", ["bitmask", "csr16"])
@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
def test_bf16_prefill_linear(layout, value_dtype):
    g = torch.Generator().manual_seed(1)
    w = weight(96, 200, 0.7)
    b = torch.randn(96, generator=g)
    x = torch.randn(2, 65, 200, generator=g)
    p = pack(w, layout, value_dtype)
    wd = unpack(p)
    scratch = DenseScratch()
    for bias in (None, b):
        y = bf16_prefill_linear(p, bias, x, scratch)
        assert y.dtype == torch.float32 and y.shape == (2, 65, 96)
        ref = F.linear(x.bfloat16(), wd.bfloat16()).float() + (0 if bias is None else bias)
        torch.testing.assert_close(y, ref, atol=0, rtol=0)  # the same GEMM: identical
        exact = F.linear(x, wd, bias)
        # bf16 rounding of x and W (and of the output): relative 2^-8 each, over sums of ~60 products
        torch.testing.assert_close(y, exact, atol=0.15, rtol=2e-2)
    assert scratch.nbytes == 96 * 200 * 2  # one bf16 buffer, reused


def test_choose_prefill_form_measures_and_caches():
    p = pack(weight(128, 96, 0.7), "bitmask")
    scratch = DenseScratch()
    form = choose_prefill_form(p, 100, 1, scratch=scratch, repeats=2)
    assert form in PREFILL_FORMS
    med = prefill_form_timings(p, 128, 1)  # same bucket
    runnable = [f for f in PREFILL_FORMS if (f != "amx" or amx_available())  # AMX: Sapphire Rapids and later
                and (f != "bf16walk" or bf16_walk_available())]  # AVX512-BF16: Zen 4, Cooper Lake and later
    assert set(med) == set(runnable) and all(t > 0 for t in med.values())
    assert choose_prefill_form(p, 128, 1) == form  # cached: no new measurement
    assert choose_prefill_form(p, 100, 1, forms=("float32",)) == "float32"
    with pytest.raises(ConfigError, match="unknown prefill form"):
        choose_prefill_form(p, 100, 1, forms=("int8",))
    assert [token_bucket(t) for t in (1, 2, 3, 64, 65, 128, 129)] == [1, 2, 4, 64, 128, 128, 256]
    x = torch.randn(5, 96)
    ys = {f: prefill_call(f, p, None, x, scratch) for f in runnable}
    torch.testing.assert_close(ys["sparse"], ys["float32"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ys["bfloat16"], ys["float32"], atol=0.1, rtol=2e-2)
    for fused in ("amx", "bf16walk"):  # the same bf16 operands, fp32 output (no output rounding)
        if fused in ys:
            torch.testing.assert_close(ys[fused], ys["float32"], atol=0.1, rtol=2e-2)


def test_dense_bf16_linear():
    """Dense weights (lean-cpu): a bf16 weight is the bf16 GEMM exactly; an fp32 weight in oneDNN's
    bf16 math mode keeps an fp32 output (no output rounding), so it is at least as close to fp32;
    the flag is restored afterwards."""
    g = torch.Generator().manual_seed(2)
    w, b, x = torch.randn(80, 200, generator=g), torch.randn(80, generator=g), torch.randn(70, 200, generator=g)
    exact = F.linear(x, w, b)
    y16 = dense_bf16_linear(x, w.bfloat16(), b)
    torch.testing.assert_close(y16, F.linear(x.bfloat16(), w.bfloat16()).float() + b, atol=0, rtol=0)
    y = dense_bf16_linear(x, w, b)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, exact, atol=0.15, rtol=2e-2)
    if fpmath_available():
        before = torch.backends.mkldnn.matmul.fp32_precision
        with bf16_fpmath():
            assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        assert torch.backends.mkldnn.matmul.fp32_precision == before
        assert torch.equal(F.linear(x, w, b), exact)  # fp32 again outside


def test_rope_rows_equals_torch_rotation():
    """The C rotary embedding (prefill's glue) against the lean path's torch ops, on the q and k heads
    leading each row of a fused qkv product (v untouched), batch 2, odd head count."""
    from sparse_runtime.kernels.prefill import rope_rows_
    from sparse_runtime.runtime.lean_llama import _rotate

    g = torch.Generator().manual_seed(9)
    B, T, H, KV, D = 2, 7, 3, 1, 8
    qkv = torch.randn(B, T, (H + 2 * KV) * D, generator=g)
    ang = torch.randn(T, D // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
    want_q = _rotate(q.reshape(B, T, H, D).transpose(1, 2), cos, sin)
    want_k = _rotate(k.reshape(B, T, KV, D).transpose(1, 2), cos, sin)
    v0 = v.clone()
    out = rope_rows_(qkv, cos, sin, H + KV, D)
    assert out.data_ptr() == qkv.data_ptr()
    q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
    torch.testing.assert_close(q.reshape(B, T, H, D).transpose(1, 2), want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k.reshape(B, T, KV, D).transpose(1, 2), want_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(v, v0)
    with pytest.raises(ConfigError, match="contiguous float32"):
        rope_rows_(qkv.double(), cos, sin, H + KV, D)
    with pytest.raises(ConfigError, match="cos/sin"):
        rope_rows_(qkv, cos[:3], sin[:3], H + KV, D)
