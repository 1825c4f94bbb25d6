"""The AMX prefill product (csrc/amx_prefill.cpp, ``kernels.prefill.amx_prefill_linear``): against a
plain float64 product of the bf16-rounded operands on odd shapes (partial tiles in every dimension,
more tokens than one chunk), every sparsity from dense to all-zero, empty rows, fp32 / bf16 values,
int8 codes (symmetric, asymmetric, per row and per group), 1 and 2 threads; the fused glue (RMSNorm,
SiLU-mul, residual add) against torch's ops; bad input; the lean engine with it on. Skipped where
the CPU has no AMX (the form is then never chosen)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, pack
from sparse_runtime.kernels.prefill import (ENV_AMX, amx_available, amx_prefill_linear, amx_quant_linear,
                                            choose_prefill_form, prefill_call)

pytestmark = pytest.mark.skipif(not (available() and amx_available()),
                                reason="no AMX here (CPU without AMX-BF16, or Linux without the tile state)")

SHAPES = [(1, 1, 1), (5, 31, 17), (16, 32, 16), (17, 33, 33), (33, 100, 70), (130, 96, 40)]  # (M, K, N)


def weight(n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    if n > 2:
        w[1] = 0  # an empty row
    return w


def reference(x, w, bias=None):
    """float64 product of the bf16-rounded operands (what the tiles multiply; fp32 accumulation
    differs from it by summation order only)."""
    y = x.bfloat16().double() @ w.bfloat16().double().t()
    return y if bias is None else y + bias.double()


def close(y, ref, rel=1e-5):
    scale = max(float(ref.abs().max()), 1.0)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert float((y.double() - ref).abs().max()) <= rel * scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("values", ["float32", "bfloat16"])
def test_amx_product_matches_reference(shape, sparsity, values):
    m, k, n = shape
    w = weight(n, k, sparsity, seed=m + k + n)
    p = pack(w, "bitmask", values)
    g = torch.Generator().manual_seed(1)
    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    for bias in (None, b):
        for threads in (1, 2):
            close(amx_prefill_linear(p, bias, x, threads=threads), reference(x, w, bias))
    y3 = amx_prefill_linear(p, b, x.view(1, m, k))  # leading dims kept
    assert y3.shape == (1, m, n)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 32, 64])
def test_amx_int8_codes_match_dequantized(symmetric, group):
    from sparse_runtime.kernels.quant import QuantLinear, quantize_packed
    from sparse_runtime.quant.scheme import QuantScheme

    w = weight(70, 128, 0.7, seed=3)
    q = quantize_packed(w, QuantScheme(8, group, symmetric), "bitmask")
    wq = QuantLinear(q).dequantize()  # scale * (code - zero), zeros where pruned
    assert not bool(((wq != 0) & (w == 0)).any())  # pruned stays pruned (a small kept weight may round to 0)
    x = torch.randn(45, 128, generator=torch.Generator().manual_seed(2))
    close(amx_quant_linear(q, None, x), reference(x, wq))


def test_amx_glue_matches_torch_ops():
    """RMSNorm and SiLU-mul inputs and the in-place residual add equal the torch ops they replace
    (the input is rounded to bf16 after the fp32 op, so a value at a rounding boundary may land one
    bf16 step away: hence the looser bound than the plain product's)."""
    g = torch.Generator().manual_seed(5)
    m, k, n = 40, 96, 72
    w = weight(n, k, 0.7, seed=6)
    p, b = pack(w, "bitmask"), torch.randn(n, generator=g)
    x, nw = torch.randn(m, k, generator=g) * 3, torch.randn(k, generator=g)
    h = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    close(amx_prefill_linear(p, b, x, norm=nw, eps=1e-5), reference(h, w, b), rel=2e-3)
    gu = torch.randn(m, 2 * k, generator=g) * 4
    gate, up = gu.chunk(2, -1)
    close(amx_prefill_linear(p, b, gu, silu_mul=True), reference(F.silu(gate) * up, w, b), rel=2e-3)
    r = torch.randn(m, n, generator=g)
    r0 = r.clone()
    out = amx_prefill_linear(p, b, x, residual=r)
    assert out.data_ptr() == r.data_ptr()
    close(r, r0.double() + reference(x, w, b))


def test_amx_bad_input_and_switch(monkeypatch):
    p = pack(weight(16, 32, 0.5), "bitmask")
    with pytest.raises(ConfigError, match="input features"):
        amx_prefill_linear(p, None, torch.randn(4, 31))
    with pytest.raises(ConfigError, match="input features"):
        amx_prefill_linear(p, None, torch.randn(4, 32), silu_mul=True)  # gate|up is 2K wide
    with pytest.raises(ConfigError, match="residual"):
        amx_prefill_linear(p, None, torch.randn(4, 32), residual=torch.zeros(4, 16, dtype=torch.float64))
    with pytest.raises(ConfigError, match="one input transform"):
        amx_prefill_linear(p, None, torch.randn(4, 64), norm=torch.ones(32), silu_mul=True)
    with pytest.raises(ConfigError, match="bitmask"):
        amx_prefill_linear(pack(weight(16, 32, 0.5), "csr16"), None, torch.randn(4, 32))
    x = torch.randn(20, 32)
    assert choose_prefill_form(p, 20, 1, forms=("amx",)) == "amx"
    close(prefill_call("amx", p, None, x, None), reference(x, weight(16, 32, 0.5)))
    monkeypatch.setenv(ENV_AMX, "0")
    assert not amx_available()
    with pytest.raises(ConfigError, match="none of the prefill forms"):
        choose_prefill_form(p, 20, 1, forms=("amx",))


@pytest.mark.parametrize("dtype", [None, "int8"])
def test_lean_engine_runs_the_fused_form(dtype, monkeypatch):
    """A pruned tiny model with ``prefill_dtype='bfloat16'``: the products run the AMX form with the
    glue fused (int8 codes always; fp32 values where the measured choice picks it: forced here),
    logits close to the fp32 prefill and to the same engine without AMX."""
    from helpers import fused_bf16_prefill
    from sparse_runtime.kernels import prefill as P
    from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama

    real_choice = P.choose_prefill_form
    model, opts, ids, got = fused_bf16_prefill(monkeypatch, "amx", dtype)
    scale = float(got.abs().max())
    monkeypatch.setattr(P, "choose_prefill_form", real_choice)
    monkeypatch.setenv(ENV_AMX, "0")
    plain = LeanLlama(model, LeanConfig(prefill_dtype="bfloat16", **opts), threads=2).prefill(ids)
    assert float((got - plain).abs().max()) <= 0.02 * scale
