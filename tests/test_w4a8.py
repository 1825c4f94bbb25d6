"""W4A8 decode products (csrc/w4a8.inc): dense int4 symmetric codes of every group times int8
activations with one scale per token. The kernels against the plain reference (each group's integer
sum exact, the groups summed in fp32, so the paths agree to fp32 rounding), the refusals, and the
lean engine (step and batched slots) against the Hugging Face model with int4 weights and every
product's input rounded the same way. Edge inputs and the activation rounding's effect: tests/test_w8a8.py,
parametrized over both."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, unavailable_reason
from sparse_runtime.models.tiny import tiny_model
from sparse_runtime.quant.scheme import QuantScheme, quantize_rtn

from helpers import pruned_weight as _weight, random_pruned

if not available():
    if os.environ.get("SPARSE_RUNTIME_REQUIRE_KERNELS") == "1":
        raise RuntimeError(unavailable_reason())
    pytest.skip(unavailable_reason() or "sparse kernels unavailable", allow_module_level=True)

from sparse_runtime.kernels import native  # noqa: E402
from sparse_runtime.kernels.decode import run_linear_batch  # noqa: E402
from sparse_runtime.kernels.layout import pack_quantized  # noqa: E402
from sparse_runtime.kernels.quant import QuantLinear  # noqa: E402
from sparse_runtime.kernels.reference import reference_w8a8  # noqa: E402
from sparse_runtime.runtime.lean_llama import LeanConfig  # noqa: E402

from test_w8a8 import PATHS, _check_decode, _check_slots, _lean, _reference, _x  # noqa: E402

# (K, groups): a partial 32-column chunk and a partial 64-column step (77, per row only), an odd
# number of chunks (96, 1056: a last step of one chunk), SmolLM2's 576 and 1536
SHAPES = [(77, (0,)), (96, (0, 32)), (128, (0, 32, 64, 128)), (576, (0, 32, 64)), (1056, (0, 32)),
          (1536, (32, 64, 128))]


def _close_to(y: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = np.abs(want).max() + 1
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-6 * scale, err_msg=what)


@pytest.mark.parametrize("isa", PATHS)
def test_kernels_match_the_reference(isa):
    """Every group (0 = one scale per row, 32, 64, 128), symmetric codes and codes with zero points
    (-asym: a zero weight holds its zero point), sparsity 0 / 0.7 / 1, batch 1 / 3 / 8 through the
    QuantLinear (the decode sizes, the counted path) and 16 through the C entry, bias and none; the
    AVX-512 and portable paths agree with each other too."""
    for K, groups in SHAPES:
        for g in groups:
            for sp, sym in ((0.0, True), (0.7, True), (1.0, True), (0.0, False), (0.7, False)):
                p = pack_quantized(quantize_rtn(_weight(37, K, sp), QuantScheme(4, g, sym)), "dense")
                for bias in (torch.randn(37), None):
                    ql = QuantLinear(p, bias, isa=isa, act="int8")
                    assert ql.run_isa == isa
                    other = QuantLinear(p, bias, isa="portable", act="int8")
                    b = None if bias is None else bias.numpy()
                    slot = f"dense-int4/{isa}"
                    for B in (1, 3, 8):
                        x = _x(B, K, seed=B)
                        before = native.counters()[slot]
                        y = ql(x).numpy()
                        assert native.counters()[slot] == before + 1
                        what = f"K={K} g={g} sym={sym} {sp} B={B} bias={bias is not None}"
                        _close_to(y, reference_w8a8(x.numpy(), p, b), what)
                        _close_to(y, other(x).numpy(), what + " (portable)")
                    x = _x(16, K, seed=16)
                    y = torch.empty(16, 37)
                    run_linear_batch(ql.desc, x, y, 2)
                    _close_to(y.numpy(), reference_w8a8(x.numpy(), p, b), f"K={K} g={g} sym={sym} {sp} B=16")


def test_ineligible_int4_is_refused_with_one_line():
    """W4A8 takes dense int4 codes and one activation scale per token: bitmask codes and
    per-column-group activations are refused by the descriptor, the engine's config and the reference
    alike."""
    w = _weight(8, 128, 0.5)
    cases = [(QuantScheme(4, 32), "bitmask", "int8"), (QuantScheme(4, 32, False), "dense", "int8-g64")]
    for scheme, layout, act in cases:
        p = pack_quantized(quantize_rtn(w, scheme), layout)
        with pytest.raises(ConfigError, match="int4") as e:
            QuantLinear(p, act=act)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="int4"):
            reference_w8a8(np.zeros((1, 128), np.float32), p, group=64 if act == "int8-g64" else 0)
    with pytest.raises(ConfigError, match="--act-dtype int8"):
        LeanConfig(value_dtype="int4", symmetric=False, act_dtype="int8-g128")
    LeanConfig(value_dtype="int4", group=64, symmetric=False, act_dtype="int8")


@pytest.mark.parametrize("family,group,sym", [("llama", 32, True), ("qwen2", 0, True), ("llama", 32, False)])
@torch.no_grad()
def test_lean_decode_equals_the_rounded_reference(family, group, sym):
    """The lean engine with int4 codes (held dense, also for a pruned model) and W4A8 decode: the
    prompt of 12 tokens runs fp32 GEMMs on the int4 weights, each decoded token's products (lm_head
    included) take int8 activations."""
    model = random_pruned(tiny_model(family))
    lean = _lean(model, "int8", value_dtype="int4", group=group, symmetric=sym, sparse=True)
    assert lean._step is not None and lean.lm_q is not None and lean.lm_q.act == "int8"
    assert "W4A8" in lean.summary()
    assert all(f.qlin.packed.layout == "dense" for f in lean.linears())
    _check_decode(lean, _reference(model, 0, QuantScheme(4, group, sym)))


@torch.no_grad()
def test_batched_slots_equal_the_rounded_reference():
    """``decode_slots`` at B = 3: each row of int4 codes made bytes once and dotted with every token."""
    model = random_pruned(tiny_model("llama"))
    _check_slots(_lean(model, "int8", value_dtype="int4", group=32), _reference(model, 0, QuantScheme(4, 32)))

