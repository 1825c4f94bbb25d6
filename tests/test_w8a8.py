"""W8A8 decode products (``act_dtype="int8"``, csrc/w8a8.inc): int8 codes times int8 activations
quantized per token. The kernels against the NumPy reference of the contract bit for bit (the sum is
an exact integer, the rest the same fp32 operations in the same order), every path, odd shapes, empty
rows, all sparsities, batch 1 and batch > 1; the edge inputs; the refusals; and the lean engine
(decode step and batched slots) against the Hugging Face model with the dequantized weights and the
same activation rounding applied to every product's input."""
import copy
import ctypes
import os

import numpy as np
import pytest
import torch

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, supported_isas, unavailable_reason
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
from sparse_runtime.kernels.reference import quantize_activations, reference_w8a8  # noqa: E402
from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama  # noqa: E402

VNNI = "avx512" in supported_isas() and native.w8a8_isa("avx512", "bitmask") == "avx512"
PATHS = [pytest.param("avx512", marks=pytest.mark.skipif(not VNNI, reason="CPU lacks AVX-512 VNNI/VBMI2")),
         "portable"]
INT8 = QuantScheme(8)
SPARSITIES = (0.0, 0.5, 0.7, 0.95, 1.0, "2:4")


def _x(B, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g) * 2
    x[:, (7 * torch.arange(B)) % K] = 30.0  # an outlier per token (sets amax)
    return x


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("layout", ["dense", "bitmask"])
def test_kernels_equal_the_contract_bit_for_bit(isa, layout):
    """K = 77 (a partial mask word), 576, 1056 (an odd number of mask words: the single-word step),
    every sparsity, batch 1 / 3 / 8 through the QuantLinear (the decode sizes) and 16 through the C
    entry; bias and none. The AVX-512 path must be the one counted where it runs."""
    for K in (77, 576, 1056):
        for sp in SPARSITIES:
            w = _weight(37, K, sp)
            p = pack_quantized(quantize_rtn(w, INT8), layout)
            for bias in (torch.randn(37), None):
                ql = QuantLinear(p, bias, isa=isa, act="int8")
                assert ql.run_isa == isa
                slot = f"{layout}-int8/{isa}"
                for B in (1, 3, 8):
                    x = _x(B, K, seed=B)
                    before = native.counters()[slot]
                    y = ql(x).numpy()
                    assert native.counters()[slot] == before + 1
                    want = reference_w8a8(x.numpy(), p, None if bias is None else bias.numpy())
                    np.testing.assert_array_equal(y, want, err_msg=f"K={K} {sp} B={B} bias={bias is not None}")
                x = _x(16, K, seed=16)
                y = torch.empty(16, 37)
                run_linear_batch(ql.desc, x, y, 2)
                want = reference_w8a8(x.numpy(), p, None if bias is None else bias.numpy())
                np.testing.assert_array_equal(y.numpy(), want, err_msg=f"K={K} {sp} B=16")


@pytest.mark.skipif(not VNNI, reason="CPU lacks AVX-512 VNNI/VBMI2")
@pytest.mark.parametrize("layout", ["dense", "bitmask"])
def test_bytes_only_hook_is_scoped(layout):
    """kernels.decode.bytes_only (the timing floor's hook): off by default; inside the block a batch-1
    AVX-512 W8A8 product writes zeros (its bytes only read; K = 77: a masked last read, 1056: an odd
    number of mask words; the last rows end at the end of the codes); on exit the setting before is
    back and the products equal the contract again, also when the block raises."""
    from sparse_runtime.kernels import decode as cdec

    lib = native.lib()
    assert lib.sr_a8_bytes_only(-1) == 0
    for K in (77, 1056):
        w = _weight(37, K, 0.7)
        p = pack_quantized(quantize_rtn(w, INT8), layout)
        ql = QuantLinear(p, torch.randn(37), isa="avx512", act="int8")
        x = _x(1, K)
        want = ql(x).numpy()
        with cdec.bytes_only():
            assert lib.sr_a8_bytes_only(-1) == 1
            assert not ql(x).any()
        assert lib.sr_a8_bytes_only(-1) == 0
        np.testing.assert_array_equal(ql(x).numpy(), want)
        with pytest.raises(RuntimeError, match="inside"):
            with cdec.bytes_only():
                raise RuntimeError("inside")
        assert lib.sr_a8_bytes_only(-1) == 0


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("layout", ["dense", "bitmask"])
@pytest.mark.parametrize("act", ["int8-g64", "int8-g128"])
def test_grouped_kernels_match_the_reference(isa, layout, act):
    """One scale per 64 / 128 columns: K = 77, 200 (a partial last group), 576, 1056, every sparsity,
    batch 1 / 3 / 8 and 16; each group's integer sum is exact, the groups are summed in fp32 (float64
    in the reference), so they agree to fp32 rounding. The two paths agree with each other as well."""
    group = int(act.split("-g")[1])
    for K in (77, 200, 576, 1056):
        for sp in SPARSITIES:
            w = _weight(37, K, sp)
            p = pack_quantized(quantize_rtn(w, INT8), layout)
            bias = torch.randn(37)
            ql = QuantLinear(p, bias, isa=isa, act=act)
            for B in (1, 3, 8, 16):
                x = _x(B, K, seed=B)
                if B <= 8:
                    y = ql(x).numpy()
                else:
                    out = torch.empty(B, 37)
                    run_linear_batch(ql.desc, x, out, 2)
                    y = out.numpy()
                want = reference_w8a8(x.numpy(), p, bias.numpy(), group=group)
                scale = np.abs(want).max() + 1
                np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-6 * scale, err_msg=f"K={K} {sp} B={B}")


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("scheme,layout,act", [(INT8, "bitmask", "int8"), (INT8, "bitmask", "int8-g64"),
                                               (QuantScheme(4, 32), "dense", "int8")])  # the last: W4A8
def test_edge_inputs(isa, scheme, layout, act):
    """A zero token gives the bias exactly; a token with a NaN or an infinity gives NaN rows (as fp32
    would), never a finite value from a clamped input; the others in the batch are unaffected."""
    p = pack_quantized(quantize_rtn(_weight(19, 96, 0.7), scheme), layout)
    bias = torch.randn(19)
    ql = QuantLinear(p, bias, isa=isa, act=act)
    x = _x(4, 96)
    x[0] = 0
    x[1, 5] = float("nan")
    x[2, 9] = float("inf")
    y = ql(x)
    torch.testing.assert_close(y[0], bias, atol=0, rtol=0)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    group = 0 if act == "int8" else 64
    np.testing.assert_allclose(y[3].numpy(), reference_w8a8(x[3:].numpy(), p, bias.numpy(), group)[0], rtol=1e-5,
                               atol=1e-5)


def test_activation_rounding_is_the_contract():
    """amax maps to +-127, halves round to even, and the result is within half a step of x; with
    groups, each group has its own amax; the torch emulation equals the reference."""
    from sparse_runtime.quant.activations import round_activations

    x = np.array([1.0, -2.0, 0.5 * 2 / 127, 1.5 * 2 / 127, 0.3], np.float32)
    q, s = quantize_activations(x)
    sx = s[0]
    assert sx == np.float32(2.0) / np.float32(127) and q[1] == -127 and np.all(s == sx)
    assert list(q[2:4]) == [0, 2]  # 0.5 and 1.5 steps: to even
    assert np.all(np.abs(q * sx - x) <= sx / 2 + 1e-7)
    q2, s2 = quantize_activations(x, group=2)
    assert list(s2) == [np.float32(2) / 127] * 2 + [np.float32(1.5 * 2 / 127) / 127] * 2 + [np.float32(0.3) / 127]
    assert q2[4] == 127 and q2[3] == 127
    xr = torch.randn(3, 200) * 4
    for g in (0, 64):
        want = np.stack([np.float32(1) * quantize_activations(r, g)[0] * quantize_activations(r, g)[1]
                         for r in xr.numpy()])
        np.testing.assert_array_equal(round_activations(xr, g).numpy(), want.astype(np.float32))


@pytest.mark.parametrize("scheme,layout", [(INT8, "bitmask"), (QuantScheme(4, 64), "dense")])  # W8A8, W4A8
def test_int8_activations_move_the_result_by_their_rounding(scheme, layout):
    """Against the weight-only product of the same codes: close (per-token int8 keeps ~2 significant
    digits per element) and not equal (the integer path ran)."""
    p = pack_quantized(quantize_rtn(_weight(64, 576, 0.7), scheme), layout)
    x = torch.randn(1, 576)
    isa = "avx512" if VNNI else "portable"
    a8, wo = QuantLinear(p, isa=isa, act="int8")(x), QuantLinear(p, isa=isa)(x)
    rel = float((a8 - wo).norm() / wo.norm())
    assert 0 < rel < 0.03, rel


def test_ineligible_weights_are_refused_with_one_line():
    w = _weight(8, 128, 0.5)
    for sch, what in ((QuantScheme(4), "int4"), (QuantScheme(8, 64), "int8-g64"), (QuantScheme(8, 0, False), "asym")):
        with pytest.raises(ConfigError, match=what) as e:
            QuantLinear(pack_quantized(quantize_rtn(w, sch), "bitmask"), act="int8")
        assert "\n" not in str(e.value)
    for cfg in (dict(value_dtype="float32"), dict(value_dtype="int8", group=64),
                dict(value_dtype="int8", symmetric=False)):
        with pytest.raises(ConfigError, match="--dtype int8"):
            LeanConfig(act_dtype="int8", **cfg)
    with pytest.raises(ConfigError, match="int4") as e:  # W4A8: one activation scale per token only
        LeanConfig(value_dtype="int4", act_dtype="int8-g64")
    assert "\n" not in str(e.value)
    LeanConfig(value_dtype="int4", group=64, act_dtype="int8")  # W4A8 (tests/test_w4a8.py)
    with pytest.raises(ConfigError, match="act_dtype"):
        LeanConfig(value_dtype="int8", act_dtype="int4")
    # the C side refuses a descriptor that asks for int8 activations on codes it cannot take (int4 codes
    # take one activation scale per token only)
    ql = QuantLinear(pack_quantized(quantize_rtn(w, QuantScheme(4)), "dense"))
    desc = type(ql.desc).from_buffer_copy(ql.desc)
    desc.act = 64
    rc = native.lib().sr_linear_desc_run(ctypes.byref(desc), torch.randn(128).data_ptr(), torch.empty(8).data_ptr(), 1)
    assert rc == -3


def test_without_vnni_the_engine_refuses(monkeypatch):
    """On a CPU without AVX-512 VNNI the integer loops would be portable (several times slower than the
    weight-only kernels): the engine says so instead of running them."""
    isa = next((i for i in ("avx2", "avx512") if i in supported_isas()), None)
    if isa is None:
        pytest.skip("no vector ISA: every path here is portable")
    monkeypatch.setattr(native, "w8a8_isa", lambda isa, layout: "portable")
    with pytest.raises(ConfigError, match="VNNI"):  # refused once, before any weight is quantized
        LeanLlama(tiny_model("llama"), LeanConfig(value_dtype="int8", act_dtype="int8", isa=isa, calibrate=False))


# ---- the lean engine -----------------------------------------------------------------------------
def _fake_quant(x: torch.Tensor, group: int) -> torch.Tensor:
    """Each token's x rounded as the kernels round it (the torch emulation, tested equal to the
    contract's reference above), in fp32."""
    from sparse_runtime.quant.activations import round_activations

    return round_activations(x, group)


def _reference(model, group: int = 0, scheme: QuantScheme = INT8):
    """The HF model with ``scheme`` RTN weights (lm_head included) and every linear's input rounded per
    token as W8A8 rounds it, from position ``ref.a8_from`` of the call on: the engine's products of
    up to 8 tokens (decode, short prompts) take int8 activations, its prefill of more tokens the fp32
    GEMM, so a whole-sequence reference rounds only the positions the engine decoded. The lm_head
    rounds from ``ref.a8_head_from`` when set: a slot's prefill projects its last token alone."""
    ref = copy.deepcopy(model)
    ref.a8_from, ref.a8_head_from = 0, None

    def hook(mod, args):
        x = args[0]
        flat = x.reshape(-1, x.shape[-1]).clone()  # batch 1: rows are positions
        i0 = ref.a8_head_from if mod is ref.lm_head and ref.a8_head_from is not None else ref.a8_from
        flat[i0:] = _fake_quant(flat[i0:], group)
        return (flat.view_as(x),)

    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(quantize_rtn(m.weight, scheme).dequantize())
                m.register_forward_pre_hook(hook)
    return ref


def _prompt_rounded_from(n: int) -> int:
    """The first position of an n-token prompt whose products the engine runs in W8A8."""
    return 0 if n <= 8 else n


def _lean(model, act="int8", value_dtype="int8", **cfg):
    isa = "avx512" if VNNI else "portable"
    return LeanLlama(model, LeanConfig(value_dtype=value_dtype, act_dtype=act, calibrate=False, initial_cache=16,
                                       isa=isa, **cfg), threads=2)


ACTS = [("int8", 0), ("int8-g64", 64)]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The reference sums q * sx * w in fp32 where the kernel sums q * code exactly, and a last-bit
    difference upstream can move one rounded activation by a step: the engine is compared by the
    relative L2 error and a loose elementwise bound (the kernels are compared bit for bit above;
    the weight-only rounding of W8A8 itself moves these logits by ~1e-2 relative)."""
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-3, rel
    torch.testing.assert_close(got, want, atol=1e-2, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("act,group", ACTS)
@torch.no_grad()
def test_lean_decode_equals_the_rounded_reference(family, act, group):
    model = random_pruned(tiny_model(family))
    lean = _lean(model, act)
    assert lean._step is not None and lean.lm_q is not None and lean.lm_q.act == act
    assert "W8A8" in lean.summary()
    _check_decode(lean, _reference(model, group))


def _check_decode(lean, ref) -> None:
    """A 12-token prompt (fp32 GEMMs: no activation rounding), then 6 decoded tokens (rounded), against
    the reference."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, 12), generator=g)
    ref.a8_from = _prompt_rounded_from(12)
    r = ref(ids, use_cache=True)
    torch.testing.assert_close(lean.prefill(ids), r.logits, atol=2e-5, rtol=0)
    cache = r.past_key_values
    ref.a8_from = 0
    for _ in range(6):
        tok = torch.randint(0, 256, (1, 1), generator=g)
        r = ref(tok, past_key_values=cache, use_cache=True)
        cache = r.past_key_values
        _close(lean.decode(tok), r.logits)


@pytest.mark.parametrize("act,group", ACTS)
@torch.no_grad()
def test_batched_slots_equal_the_rounded_reference(act, group):
    """``decode_slots`` at B = 3 (the batched C step, each token quantized with its own scales)."""
    model = random_pruned(tiny_model("llama"))
    _check_slots(_lean(model, act), _reference(model, group))


def _check_slots(lean, ref) -> None:
    """Three slots of different lengths prefilled, then three batched steps, against the reference."""
    lean.init_slots(4, 32)
    g = torch.Generator().manual_seed(1)
    seqs = {s: torch.randint(0, 256, (n,), generator=g) for s, n in ((0, 5), (2, 9), (3, 3))}
    start = {s: _prompt_rounded_from(len(ids)) for s, ids in seqs.items()}
    for s, ids in seqs.items():
        ref.a8_from, ref.a8_head_from = start[s], len(ids) - 1
        _close(lean.prefill_slot(s, ids), ref(ids[None]).logits[0, -1])
    for _ in range(3):
        toks = [int(t) for t in torch.randint(0, 256, (3,), generator=g)]
        out = lean.decode_slots(list(seqs), toks)
        for i, (s, ids) in enumerate(seqs.items()):
            seqs[s] = torch.cat([ids, torch.tensor([toks[i]])])
            ref.a8_from, ref.a8_head_from = start[s], None
            _close(out[i], ref(seqs[s][None]).logits[0, -1])


def test_engine_option(tmp_path):
    from wanda_reference import make_checkpoint

    from sparse_runtime.commands._dtype import engine_dtype_options
    from sparse_runtime.runtime import load_engine

    from sparse_runtime.commands import _dtype
    from sparse_runtime.kernels import decode

    from sparse_runtime.runtime import get_engine

    # the parser's and the engines' copies of the descriptor's values
    assert _dtype.ACT_DTYPES == decode.ACT_DTYPES == get_engine("sparse-cpu").act_dtypes
    assert engine_dtype_options("sparse-cpu", "int8", act_dtype="int8") == {"dtype": "int8", "act_dtype": "int8"}
    with pytest.raises(ConfigError, match="no --act-dtype int8"):
        engine_dtype_options("torch-cpu", None, act_dtype="int8")
    if native.w8a8_isa(native.select_isa(), "bitmask") != "avx512":
        pytest.skip("the engines refuse W8A8 where their ISA path has no AVX-512 VNNI")
    from sparse_runtime.quant.apply import QuantizeConfig, quantize_checkpoint

    ckpt = make_checkpoint(tmp_path / "tiny70", "llama", sparsity=0.7)
    q8, q4 = tmp_path / "tiny70-int8", tmp_path / "tiny70-int4"
    quantize_checkpoint(str(ckpt), QuantizeConfig(scheme="int8", method="rtn"), q8)
    quantize_checkpoint(str(ckpt), QuantizeConfig(scheme="int4-g32", method="rtn"), q4)
    for model in (ckpt, q8):  # RTN at load, and a quantized checkpoint's own int8 codes and scales
        eng = load_engine("sparse-cpu", str(model), threads=2, calibrate=False, dtype="int8", act_dtype="int8-g64")
        try:
            eng.prefill(np.array([[3, 17, 99, 4, 250]], dtype=np.int64))
            assert np.isfinite(eng.decode(np.array([[42]]))).all()
            assert "W8A8" in eng.lean.summary() and eng.lean.lm_q.act == "int8-g64"
        finally:
            eng.close()
    # an int4 checkpoint takes int8 activations with one scale per token (W4A8, tests/test_w4a8.py), not grouped
    eng = load_engine("sparse-cpu", str(q4), threads=2, calibrate=False, dtype="int4", act_dtype="int8")
    try:
        assert "W4A8" in eng.lean.summary() and np.isfinite(eng.prefill(np.array([[3, 17, 99]]))).all()
    finally:
        eng.close()
    with pytest.raises(ConfigError, match="int4"):
        load_engine("sparse-cpu", str(q4), threads=2, calibrate=False, dtype="int4", act_dtype="int8-g64")
