"""Batched decode on AMX tiles (``batch_dtype='bfloat16'``, serve's ``--batch-dtype``): the team
form of the AMX product (``sr_amx_team_linear``, what ``sr_decode_step_batch`` runs for each packed
bitmask linear from 4 rows on) against a plain float64 product of the bf16-rounded operands, fp32
values and int8 codes, odd shapes and every row count of one chunk; and the batched step with the
flag against the fp32 step: close logits, the same rows untouched below the threshold, the flag a
no-op where AMX is off. Skipped where the CPU has no AMX."""
from __future__ import annotations

import ctypes

import pytest
import torch

from sparse_runtime.kernels import available, pack

if not available():
    pytest.skip("sparse kernels unavailable", allow_module_level=True)

from sparse_runtime.kernels import decode as cdec  # noqa: E402
from sparse_runtime.kernels import native  # noqa: E402
from sparse_runtime.kernels.prefill import ENV_AMX, amx_available  # noqa: E402

pytestmark = pytest.mark.skipif(not amx_available(), reason="no AMX here (CPU without AMX-BF16, or Linux without "
                                                            "the tile state)")
MIN_BATCH = 4  # kAmxStepMinBatch in csrc/lean_decode.inc


def _team(desc, x: torch.Tensor) -> torch.Tensor:
    """One team product run by a team of one thread (the barrier inside is then a no-op)."""
    lb = native.lib()
    lb.sr_amx_team_scratch.restype = ctypes.c_int64
    lb.sr_amx_team_linear.argtypes = [ctypes.POINTER(cdec.CLinear), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    assert lb.sr_amx_team_runs(ctypes.byref(desc)) == 1
    m = x.shape[0]
    xv = torch.empty(int(lb.sr_amx_team_scratch(desc.K, m)), dtype=torch.int32)
    y = torch.full((m, desc.N), float("nan"))
    assert lb.sr_amx_team_linear(ctypes.byref(desc), m, x.data_ptr(), y.data_ptr(), xv.data_ptr(), 0, 1) == 0
    return y


def _weight(n: int, k: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    w[min(1, n - 1)] = 0  # an empty row
    return w


def _close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None) -> None:
    ref = x.bfloat16().double() @ w.bfloat16().double().t()
    if bias is not None:
        ref = ref + bias.double()
    assert float((y.double() - ref).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1.0)


@pytest.mark.parametrize("m", [1, 4, 5, 16, 17, 128])
@pytest.mark.parametrize("kn", [(31, 17), (96, 70), (576, 33)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_team_product_matches_reference(m, kn, sparsity):
    k, n = kn
    w = _weight(n, k, sparsity, seed=m + k + n)
    p = pack(w, "bitmask", "float32")
    g = torch.Generator().manual_seed(2)
    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    for bias in (None, b):
        _close(_team(cdec.linear_desc("avx512", packed=p, bias=bias), x), x, w, bias)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 32, 64])
def test_team_int8_codes_match_dequantized(symmetric, group):
    from sparse_runtime.kernels.quant import QuantLinear, quantize_packed
    from sparse_runtime.quant.scheme import QuantScheme

    q = quantize_packed(_weight(70, 128, 0.7, seed=3), QuantScheme(8, group, symmetric), "bitmask")
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    _close(_team(cdec.linear_desc("avx512", quant=q), x), x, QuantLinear(q).dequantize())


def _lean(model, batch_dtype: str, value_dtype: str = "float32"):
    from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama

    lean = LeanLlama(model, LeanConfig(sparse=True, calibrate=False, batch_dtype=batch_dtype,
                                       value_dtype=value_dtype), threads=2)
    lean.init_slots(8, 48)
    return lean


@pytest.mark.parametrize("value_dtype", ["float32", "int8"])
def test_batched_step_in_bf16_against_fp32(value_dtype, monkeypatch):
    """Slots of different lengths decoded at B = 2 (under the threshold: bit for bit the fp32 step)
    and then at B = 6 (over it: bf16 products, so the logits move, but only by bf16 rounding); with
    SPARSE_RUNTIME_AMX=0 the flag changes nothing at any B."""
    from helpers import random_pruned
    from sparse_runtime.models.tiny import tiny_model

    model = random_pruned(tiny_model("llama"))
    leans = {"fp32": _lean(model, "float32", value_dtype), "bf16": _lean(model, "bfloat16", value_dtype)}
    monkeypatch.setenv(ENV_AMX, "0")
    leans["off"] = _lean(model, "bfloat16", value_dtype)
    leans["off"]._slot_batch_step()  # built while AMX is switched off (the flag is read once, here)
    monkeypatch.delenv(ENV_AMX)
    g = torch.Generator().manual_seed(0)
    for s, n in enumerate((3, 9, 14, 6, 20, 1)):
        ids = torch.randint(0, 256, (n,), generator=g)
        for lean in leans.values():
            lean.prefill_slot(s, ids)
    # the tiles take bitmask linears (fp32 values, int8 codes); with another layout (csr16 or dense codes,
    # e.g. SPARSE_RUNTIME_KERNEL_ISA=avx2) the flag changes nothing
    tiles = any((f.qlin.packed if f.qlin is not None else f.module.packed).layout == "bitmask"
                for f in leans["bf16"].linears() if f.qlin is not None or f.module is not None)
    for slots in ([4, 1], [0, 1, 2, 3, 4, 5], [5, 3, 0, 2, 1, 4]):  # B = 2 first: later the caches differ
        toks = torch.randint(0, 256, (len(slots),), generator=g).tolist()
        out = {k: lean.decode_slots(slots, toks) for k, lean in leans.items()}
        assert torch.equal(out["off"], out["fp32"])
        if len(slots) < MIN_BATCH or not tiles:
            assert torch.equal(out["bf16"], out["fp32"])
            continue
        diff = float((out["bf16"] - out["fp32"]).abs().max())
        assert 0 < diff <= 0.02 * float(out["fp32"].abs().max())  # moved (the tiles ran), by rounding only
        assert (out["bf16"].argmax(-1) == out["fp32"].argmax(-1)).float().mean() >= 0.8

