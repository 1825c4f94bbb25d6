"""The bf16 prefill walk (csrc/bf16_walk.inc; ``kernels.prefill.bf16_walk_linear`` /
``bf16_walk_quant_linear``): against float64 products of the bf16-rounded operands on odd shapes
(token tiles, K blocks and row blocks all partial; odd nonzero counts, so a pair is padded), every
sparsity from dense to all-zero, empty rows, fp32 and bf16 values, int8 and int4 codes (bitmask and dense,
symmetric and asymmetric, per row and per group), 1 and 2 threads; the fused glue against torch's
ops; bad input; the lean engine taking it in bf16 prefill. Runs where the CPU has AVX512-BF16 and
VBMI2 (AMD Zen 4, Intel Cooper Lake / Sapphire Rapids and later); skipped elsewhere. Also: the
AVX-512 path's prefill batches take the AVX2 walk, equal to the index walks they replaced."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, native, pack, supported_isas
from sparse_runtime.kernels.ops import sparse_linear
from sparse_runtime.kernels.prefill import (avx2_prefill_linear, bf16_walk_available, bf16_walk_linear,
                                            bf16_walk_quant_linear, bf16_walk_quant_runs, choose_prefill_form,
                                            prefill_call)
from sparse_runtime.kernels.quant import QuantLinear, quantize_packed
from sparse_runtime.quant.scheme import QuantScheme

from helpers import pruned_weight

WALK = available() and bf16_walk_available()
needs_walk = pytest.mark.skipif(not WALK, reason="CPU (or build) without AVX512-BF16 + VBMI2: no bf16 walk")

# (M tokens, K, N): 64-token tiles (halves of 32), 256-column K blocks, 32-row blocks, all partial
SHAPES = [(16, 77, 33), (17, 200, 40), (33, 300, 71), (64, 256, 32), (129, 1056, 33), (200, 64, 8)]
SPARSITY = [0.0, 0.5, 0.7, 0.95, 1.0]


def reference(x, w, bias=None):
    """float64 product of the bf16-rounded operands (the walk's contract)."""
    y = x.bfloat16().double() @ w.bfloat16().double().t()
    return y if bias is None else y + bias.double()


def close(y, ref, rel=2e-6):
    scale = max(float(ref.abs().max()), 1e-6)
    assert float((y.double() - ref).abs().max()) <= rel * scale


@needs_walk
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITY)
@pytest.mark.parametrize("values", ["float32", "bfloat16"])
def test_walk_matches_reference(shape, sparsity, values):
    m, k, n = shape
    w = pruned_weight(n, k, sparsity, seed=m)
    if n > 3:
        w[2] = 0  # an empty row
    if values == "bfloat16":
        w = w.bfloat16().float()
    g = torch.Generator().manual_seed(k)
    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    p = pack(w, "bitmask")
    if values == "bfloat16":
        p.values = p.values.bfloat16()
    close(bf16_walk_linear(p, b, x), reference(x, w, b))
    close(bf16_walk_linear(p, None, x, threads=1), reference(x, w))
    close(prefill_call("bf16walk", p, b, x, None), reference(x, w, b))


@needs_walk
@pytest.mark.parametrize("layout", ["bitmask", "dense"])
@pytest.mark.parametrize("scheme,shape", [
    (sch, shape)
    for sch in (QuantScheme(8, 0, True), QuantScheme(8, 0, False), QuantScheme(8, 32, True), QuantScheme(8, 64, False),
                QuantScheme(4, 32, True), QuantScheme(4, 64, False), QuantScheme(4, 0, True), QuantScheme(4, 0, False))
    # (M, K, N); K = 100: a partial 32-column chunk (per-row scales only: a group must divide K)
    for shape in ((17, 128, 40), (70, 320, 33), (130, 64, 8), (21, 100, 9))
    if not sch.group or shape[1] % sch.group == 0])
def test_walk_codes(layout, scheme, shape):
    m, k, n = shape
    w = pruned_weight(n, k, 0.7, seed=k)
    w[1] = 0
    p = quantize_packed(w, scheme, layout)
    wd = QuantLinear(p, None, isa="portable").dequantize()
    assert bf16_walk_quant_runs(p)
    g = torch.Generator().manual_seed(m)
    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    close(bf16_walk_quant_linear(p, b, x), reference(x, wd, b))
    close(bf16_walk_quant_linear(p, None, x, threads=1), reference(x, wd))


@needs_walk
def test_walk_glue_matches_torch():
    m, k, n = 70, 96, 45
    w = pruned_weight(n, k, 0.6, seed=3)
    p = pack(w, "bitmask")
    g = torch.Generator().manual_seed(1)
    x, gu, r, nw = (torch.randn(m, k, generator=g), torch.randn(m, 2 * k, generator=g), torch.randn(m, n, generator=g),
                    torch.rand(k, generator=g) + 0.5)
    normed = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    close(bf16_walk_linear(p, None, x, norm=nw, eps=1e-5), reference(normed, w), rel=1e-2)  # bf16 of a near value
    act = F.silu(gu[:, :k]) * gu[:, k:]
    out = bf16_walk_linear(p, None, gu, silu_mul=True, residual=r.clone())
    close(out, reference(act, w) + r.double(), rel=1e-2)
    plain = bf16_walk_linear(p, None, act, residual=r.clone())
    close(plain, reference(act, w) + r.double())


@needs_walk
def test_walk_bad_input_one_line():
    p = pack(pruned_weight(8, 40, 0.5, seed=0), "bitmask")
    with pytest.raises(ConfigError, match="expects 40 input features"):
        bf16_walk_linear(p, None, torch.randn(20, 41))
    csr = pack(pruned_weight(8, 40, 0.5, seed=0), "csr16")
    with pytest.raises(ConfigError, match="bitmask weights"):
        bf16_walk_linear(csr, None, torch.randn(20, 40))
    q = quantize_packed(pruned_weight(8, 64, 0.1, seed=0), QuantScheme(8, 0, True), "dense")
    assert not bf16_walk_quant_runs(q)  # dense codes, 10 % zeros: the dequantizing GEMM form
    with pytest.raises(ConfigError, match="dequantizing form"):
        bf16_walk_quant_linear(q, None, torch.randn(20, 64))


@needs_walk
def test_walk_is_a_measured_form():
    p = pack(pruned_weight(64, 128, 0.7, seed=0), "bitmask")
    assert choose_prefill_form(p, 40, 1, forms=("bf16walk",)) == "bf16walk"
    assert choose_prefill_form(p, 40, 1, forms=("bf16walk", "float32"), repeats=2) in ("bf16walk", "float32")


def test_walk_off_switch(monkeypatch):
    monkeypatch.setenv("SPARSE_RUNTIME_BF16_WALK", "0")
    assert not bf16_walk_available()
    p = pack(pruned_weight(8, 40, 0.5, seed=0), "bitmask")
    with pytest.raises(ConfigError, match="AVX512-BF16"):
        bf16_walk_linear(p, None, torch.randn(20, 40))


@pytest.mark.skipif(not (available() and "avx512" in supported_isas()), reason="no AVX-512 path")
@pytest.mark.parametrize("shape", [(16, 77, 33), (33, 100, 40), (65, 300, 71), (129, 1056, 33)])
def test_avx512_prefill_takes_the_walk(shape):
    """AVX-512 batches of 16+ tokens run the walk with zmm accumulators; the ymm walk and the index
    walks it replaced give the same."""
    m, k, n = shape
    w = pruned_weight(n, k, 0.7, seed=m)
    x, b = torch.randn(m, k), torch.randn(n)
    p = pack(w, "bitmask")
    ref = x.double() @ w.double().t() + b.double()
    # the glue entry on the AVX-512 path (zmm accumulators), with a residual
    r = torch.randn(m, n)
    close2 = float((avx2_prefill_linear(p, b, x, isa="avx512", residual=r.clone()).double() - ref - r.double())
                   .abs().max())
    assert close2 <= 2e-6 * float((ref + r.double()).abs().max())
    lib = native.lib()
    scale = float(ref.abs().max())
    try:
        for mode in (1, 2, 0):  # zmm walk (default), ymm walk, the index walks
            lib.sr_set_avx512_walk(mode)
            y = sparse_linear(x, p, b, isa="avx512")
            assert float((y.double() - ref).abs().max()) <= 2e-6 * scale, mode
    finally:
        lib.sr_set_avx512_walk(1)


@needs_walk
@pytest.mark.parametrize("dtype", [None, "int8"])
def test_lean_bf16_prefill_takes_the_walk(monkeypatch, dtype):
    """A pruned tiny model with ``prefill_dtype='bfloat16'`` on the AVX-512 path: the products run
    the bf16 walk with the glue fused (int8 codes where no AMX; fp32 values where the measured choice
    picks it: forced here), logits close to the fp32 prefill's (bf16 rounding only)."""
    from helpers import fused_bf16_prefill
    from sparse_runtime.kernels import prefill as P

    monkeypatch.setenv(P.ENV_AMX, "0")  # an AMX CPU would take the AMX form for the codes
    fused_bf16_prefill(monkeypatch, "bf16walk", dtype)
