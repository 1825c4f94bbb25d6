"""Quantized values (int8 / int4 codes + fp32 scales) in the CPU kernels and the lean engines:
every kernel path against the NumPy reference that decodes the packed layout row by row, the
packers against the contract's ``dequantize``, and the lean decode (batch 1, batched slots, the
torch path) against the Hugging Face model whose weights are the dequantized values."""
import copy
import os

import numpy as np
import pytest
import torch

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, supported_isas, unavailable_reason
from sparse_runtime.models.tiny import tiny_model
from sparse_runtime.quant.scheme import QuantScheme, quantize_rtn

from helpers import compare_with_hf, pruned_weight as _weight, random_pruned as _pruned

if not available():
    if os.environ.get("SPARSE_RUNTIME_REQUIRE_KERNELS") == "1":
        raise RuntimeError(unavailable_reason())
    pytest.skip(unavailable_reason() or "sparse kernels unavailable", allow_module_level=True)

from sparse_runtime.kernels import native  # noqa: E402
from sparse_runtime.kernels.layout import pack_quantized  # noqa: E402
from sparse_runtime.kernels.quant import QuantLinear  # noqa: E402
from sparse_runtime.kernels.reference import quant_decode, reference_qlinear  # noqa: E402
from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama  # noqa: E402

ISAS = [pytest.param(i, marks=pytest.mark.skipif(i not in supported_isas(), reason=f"CPU lacks {i}"))
        for i in ("avx512", "avx2", "portable")]
SCHEMES = [QuantScheme(8), QuantScheme(8, 0, False), QuantScheme(8, 64), QuantScheme(8, 128, False),
           QuantScheme(4), QuantScheme(4, 0, False), QuantScheme(4, 32), QuantScheme(4, 64),
           QuantScheme(4, 128, False)]
SPARSITIES = (0.0, 0.5, 0.7, 0.95, "2:4")
ATOL = 2e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["dense", "bitmask"])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_match_the_reference(isa, layout, bits):
    """Every scheme (sym/asym, per channel/groups), sparsity and batch 1/3 on odd shapes: K = 77
    (not a multiple of 32) per channel, K = 256 grouped; the path that ran is counted."""
    for sch in (s for s in SCHEMES if s.bits == bits):
        for sp in SPARSITIES:
            K = 256 if sch.group else 77
            w = _weight(37, K, sp)
            qw = quantize_rtn(w, sch)
            p = pack_quantized(qw, layout)
            bias = torch.randn(37)
            ql = QuantLinear(p, bias, isa=isa)
            slot = f"{layout}-int{bits}/{ql.run_isa}"
            for B in (1, 3):
                x = torch.randn(B, K)
                before = native.counters()[slot]
                y = ql(x)
                assert native.counters()[slot] == before + 1, (slot, sch.name)
                want = reference_qlinear(x.numpy(), p, bias.numpy())
                np.testing.assert_allclose(y.numpy(), want, atol=1e-4, rtol=1e-5, err_msg=f"{sch.name} {sp} B={B}")
            y = ql(torch.randn(12, K))  # prefill size: dequantized weight + GEMM
            assert y.shape == (12, 37)


def test_quantized_paths_run_vectorised_here():
    """On this project's AVX-512 machine the quantized AVX-512 paths (VBMI2) are the ones that run."""
    if "avx512" not in supported_isas() or not native.lib().sr_cpu_features() & native.FEAT_VBMI2:
        pytest.skip("no AVX512-VBMI2")
    assert native.quant_isa("avx512", "bitmask") == "avx512"
    assert native.quant_isa("avx2", "bitmask") == "portable"
    assert native.quant_isa("avx2", "dense") == "avx2"


@pytest.mark.parametrize("sch", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("layout", ["dense", "bitmask"])
def test_packing_decodes_to_the_contract(sch, layout):
    """The layout decodes (NumPy reference and the C densify) to exactly ``QuantizedWeight.dequantize``;
    the mask is the fp32 weight's, so a kept weight whose code is 0 stays kept."""
    w = _weight(21, 128, 0.6, seed=3)
    w[0, 7] = 1e-9  # kept, rounds to code 0 (or to the zero point)
    qw = quantize_rtn(w, sch)
    assert qw.rounded_to_zero >= 1
    p = pack_quantized(qw, layout)
    assert p.kept == int((w != 0).sum())
    want = qw.dequantize().numpy()
    np.testing.assert_array_equal(quant_decode(p), want)
    np.testing.assert_array_equal(QuantLinear(p).dequantize().numpy(), want)
    if layout == "bitmask":
        bits = np.unpackbits(p.index.numpy().view(np.uint8).reshape(21, -1), axis=1, bitorder="little")[:, :128]
        np.testing.assert_array_equal(bits.astype(bool), (w != 0).numpy())


def test_bytes_per_weight():
    """70 %: bitmask int8 reads about 0.3 + 1/8 bytes per weight, int4 about 0.15 + 1/8 (+ word padding),
    both below the dense int4 codes' 0.5; the scales are counted."""
    w = _weight(256, 512, 0.7)
    b8 = pack_quantized(quantize_rtn(w, QuantScheme(8)), "bitmask").bytes_per_weight
    b4 = pack_quantized(quantize_rtn(w, QuantScheme(4, 128)), "bitmask").bytes_per_weight
    d8 = pack_quantized(quantize_rtn(w, QuantScheme(8)), "dense").bytes_per_weight
    d4 = pack_quantized(quantize_rtn(w, QuantScheme(4, 128)), "dense").bytes_per_weight
    assert 0.40 < b8 < 0.45 and 0.28 < b4 < 0.33  # int4: + 4 scales of 4 bytes per 512-wide row
    assert d8 == pytest.approx(1 + 4 / 512) and d4 == pytest.approx(0.5 + 4 * 4 / 512)
    assert b4 < b8 < d4 < d8  # 70 % int8 reads fewer bytes than dense int4-g128


def test_bad_group_is_refused_with_one_line():
    w = torch.randn(8, 96)
    with pytest.raises(ConfigError, match="not a multiple of the quantization group 64") as e:
        quantize_rtn(w, QuantScheme(4, 64))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="quantization group 48"):
        LeanConfig(value_dtype="int4", group=48)
    with pytest.raises(ConfigError, match="not a multiple of the quantization group 128") as e:
        LeanLlama(tiny_model("llama"), LeanConfig(value_dtype="int4", group=128, calibrate=False))
    assert "\n" not in str(e.value)


def test_struct_check_passes():
    from sparse_runtime.kernels.decode import STRUCTS, CLinear

    native.check_structs(native.lib(), STRUCTS)  # raises on a mismatch
    assert native.lib().sr_struct_size(b"SRLinear") == __import__("ctypes").sizeof(CLinear)


# ---- the lean engine -----------------------------------------------------------------------------
def _dequantized(model, scheme, lm_head=True):
    """The HF model whose linears (and lm_head, tied table included) hold the dequantized values."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and (lm_head or "lm_head" not in n):
                m.weight.copy_(quantize_rtn(m.weight, scheme).dequantize())
    return ref


def _bitmask_codes_here() -> bool:
    """Whether the lean engines hold sparse int8/int4 weights as bitmask codes on this machine's ISA
    (AVX-512 with VBMI2); AVX2 and AVX-512 without VBMI2 hold dense codes (lean_llama.quantized_linear)."""
    isa = native.select_isa()
    return isa == "portable" or native.quant_isa(isa, "bitmask") != "portable"


def _lean(model, sch, sparse=True, **cfg):
    cfg = {"calibrate": False, "initial_cache": 16, **cfg}
    return LeanLlama(model, LeanConfig(sparse=sparse, value_dtype=f"int{sch.bits}", group=sch.group,
                                       symmetric=sch.symmetric, **cfg), threads=2)


def _compare(ref, lean, batch=1, prompt=12, steps=6, seed=0, atol=ATOL):
    compare_with_hf(ref, lean, prompt, steps, batch, seed, atol=atol)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("sch", [QuantScheme(8), QuantScheme(4, 32, False), QuantScheme(4)], ids=lambda s: s.name)
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_lean_logits_equal_the_dequantized_model(family, sch, sparse):
    model = _pruned(tiny_model(family))
    lean = _lean(model, sch, sparse)
    assert lean._step is not None and lean.lm_q is not None
    # bitmask codes where this ISA has a vectorised bitmask-code kernel (AVX-512 with VBMI2); an AVX2
    # machine holds dense codes instead (quantized_linear: they stream faster than a portable walk)
    packed = sparse and _bitmask_codes_here()
    assert all(f.qlin is not None and f.decode_packed == packed for f in lean.linears())
    before = native.counters()
    _compare(_dequantized(model, sch), lean)
    after = native.counters()
    isa = lean.lm_q.run_isa
    assert after[f"dense-int{sch.bits}/{isa}"] > before[f"dense-int{sch.bits}/{isa}"]  # the lm_head (+ dense linears)
    if packed:
        assert after[f"bitmask-int{sch.bits}/{isa}"] - before[f"bitmask-int{sch.bits}/{isa}"] >= 6 * 4 * 2


@pytest.mark.parametrize("isa", ISAS)
def test_lean_every_isa_batch_two_and_tied_table(isa):
    """Tied embedding: its rows come from the quantized lm_head's codes (one form of the table)."""
    model = _pruned(tiny_model("llama", tie_word_embeddings=True))
    sch = QuantScheme(4, 64)
    lean = _lean(model, sch, isa=isa)
    assert lean.embed is None and lean.lm_head is None
    ref = _dequantized(model, sch)
    _compare(ref, lean)
    _compare(ref, _lean(model, sch, isa=isa), batch=2)  # batch 2: the torch path on the C kernels


def test_lean_lm_head_kept_fp32():
    model = _pruned(tiny_model("qwen2"))
    sch = QuantScheme(8)
    lean = _lean(model, sch, lm_head_fp32=True)
    assert lean.lm_q is None and lean.lm_head is not None
    _compare(_dequantized(model, sch, lm_head=False), lean)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_batched_slots_equal_the_dequantized_model(family):
    """``decode_slots`` at B = 3 (``sr_decode_step_batch`` with quantized linears and lm_head) against
    the dequantized HF model run on each sequence."""
    model = _pruned(tiny_model(family))
    sch = QuantScheme(4, 32, False) if family == "llama" else QuantScheme(8)
    lean = _lean(model, sch)
    lean.init_slots(4, 32)
    assert lean._slot_batch_step() is not None
    ref = _dequantized(model, sch)
    g = torch.Generator().manual_seed(1)
    seqs = {s: torch.randint(0, 256, (n,), generator=g) for s, n in ((0, 5), (2, 9), (3, 3))}
    for s, ids in seqs.items():
        torch.testing.assert_close(lean.prefill_slot(s, ids), ref(ids[None]).logits[0, -1], atol=ATOL, rtol=0)
    for _ in range(3):
        toks = [int(t) for t in torch.randint(0, 256, (3,), generator=g)]
        out = lean.decode_slots(list(seqs), toks)
        for i, (s, ids) in enumerate(seqs.items()):
            seqs[s] = torch.cat([ids, torch.tensor([toks[i]])])
            torch.testing.assert_close(out[i], ref(seqs[s][None]).logits[0, -1], atol=1e-4, rtol=0)


class _Checkpoint:
    """A quantized checkpoint's record as ``sparse_runtime.quant.io.read_quantization`` returns it."""

    def __init__(self, scheme, grids):
        self.scheme, self._grids = scheme, grids

    def scales_for(self, name):
        return self._grids.get(name)


@torch.no_grad()
def test_quantized_checkpoint_scales_are_used_exactly():
    """A checkpoint holding dequantized weights + its scales: the engine recovers the codes (codes_from)
    and reproduces the checkpoint's weights bit for bit; a weight without scales stays fp32."""
    sch = QuantScheme(4, 32, False)
    model = _pruned(tiny_model("llama"))
    grids = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "o_proj" not in n:
            qw = quantize_rtn(m.weight, sch)
            m.weight.copy_(qw.dequantize())
            grids[f"{n}.weight"] = (qw.scales, qw.zeros)
    lean = LeanLlama(model, LeanConfig(value_dtype="int4", calibrate=False, initial_cache=16), threads=2,
                     quantization=_Checkpoint(sch, grids))
    inner = model.model.layers[0]
    qkv = torch.cat([inner.self_attn.q_proj.weight, inner.self_attn.k_proj.weight, inner.self_attn.v_proj.weight])
    assert torch.equal(lean.layers[0].qkv.qlin.dequantize(), qkv)
    assert lean.layers[0].o.qlin is None  # no scales in the checkpoint: held as the fp32 it stores
    _compare(model, lean)
    with pytest.raises(ConfigError, match="quantized int4"):
        LeanLlama(model, LeanConfig(value_dtype="int8", calibrate=False), quantization=_Checkpoint(sch, grids))


def test_engine_and_cli_dtype(tmp_path):
    from wanda_reference import make_checkpoint

    from sparse_runtime.commands._dtype import engine_dtype_options, parse_dtype
    from sparse_runtime.runtime import load_engine

    assert parse_dtype("int4-g64-asym") == "int4-g64-asym" and parse_dtype("int8") == "int8"
    assert engine_dtype_options("sparse-cpu", "int4-g32") == {"dtype": "int4-g32"}
    with pytest.raises(ConfigError, match="runs"):
        engine_dtype_options("torch-cpu", "int8")
    ckpt = str(make_checkpoint(tmp_path / "tiny70", "llama", sparsity=0.7))
    prompt = np.array([[3, 17, 99, 4, 250, 31, 7, 64, 12, 200, 5, 77]], dtype=np.int64)
    for name in ("sparse-cpu", "lean-cpu"):
        eng = load_engine(name, ckpt, threads=2, calibrate=False, dtype="int8")
        eng.prefill(prompt)
        eng.decode(np.array([[42]]))
        ev = eng.evidence()
        assert ev["module_calls"]["c_decode_steps"] == 1
        assert any(k.startswith("dense-int8") for k in ev["kernel_calls"])
        assert any(k.startswith("bitmask-int8") for k in ev["kernel_calls"]) == (name == "sparse-cpu" and
                                                                               _bitmask_codes_here())


def test_one_form_per_weight_and_less_memory():
    """int8 values: every fused linear and the lm_head hold only their codes (no fp32 copy), so the
    engine holds fewer bytes than the fp32 one, sparse fewer than dense."""
    model = _pruned(tiny_model("llama", tie_word_embeddings=True))
    held = {}
    for vd, sparse in (("float32", True), ("int8", True), ("int8", False)):
        lean = LeanLlama(model, LeanConfig(sparse=sparse, value_dtype=vd, calibrate=False, initial_cache=16),
                         threads=1)
        if vd == "int8":
            assert all(f.weight is None and f.module is None for f in lean.linears())
            assert lean.embed is None and lean.lm_head is None
        held[vd, sparse] = lean.held_bytes()
    # sparse codes are smaller where they are held as bitmask codes (not on AVX2: dense codes there)
    assert held["int8", True] <= held["int8", False] < held["float32", True]
    assert (held["int8", True] < held["int8", False]) == _bitmask_codes_here()


def test_measured_decode_form_of_codes_keeps_logits():
    """With calibration, each group of bitmask codes is timed against dense codes; whichever is held,
    the values (and so the logits) are the same."""
    model = _pruned(tiny_model("llama"), sparsity=0.5)
    sch = QuantScheme(8)
    lean = _lean(model, sch, calibrate=True)
    assert all(f.qlin is not None for f in lean.linears())
    f = lean.linears()[0]
    if f.decode_packed:
        before = f.qlin.dequantize()
        f.decode_packed = False
        assert f.qlin.packed.layout == "dense" and torch.equal(f.qlin.dequantize(), before)
        lean._build_step()
    _compare(_dequantized(model, sch), lean)


def test_quantized_checkpoint_end_to_end(tmp_path):
    """``quantize_checkpoint`` (RTN, int4-g32-asym, lm_head too) then sparse-cpu / lean-cpu with
    ``dtype="int4"``: the checkpoint's own scheme and scales are used (not per-channel symmetric), and
    the logits equal torch-cpu's on the checkpoint (which holds the dequantized weights)."""
    from wanda_reference import make_checkpoint

    from sparse_runtime.quant.apply import QuantizeConfig, quantize_checkpoint
    from sparse_runtime.runtime import load_engine

    ckpt = make_checkpoint(tmp_path / "tiny70", "llama", sparsity=0.7)
    out = tmp_path / "tiny70-int4"
    quantize_checkpoint(str(ckpt), QuantizeConfig(scheme="int4-g32-asym", method="rtn"), out)
    prompt = np.array([[3, 17, 99, 4, 250, 31, 7, 64, 12, 200, 5, 77]], dtype=np.int64)
    ref = load_engine("torch-cpu", str(out))
    want_prefill, want_decode = ref.prefill(prompt), ref.decode(np.array([[42]]))
    for name in ("sparse-cpu", "lean-cpu"):
        eng = load_engine(name, str(out), threads=2, calibrate=False, dtype="int4")
        f = eng.lean.layers[0].gate_up
        assert f.qlin.packed.group == 32 and not f.qlin.packed.symmetric
        assert eng.lean.lm_q is not None
        np.testing.assert_allclose(eng.prefill(prompt), want_prefill, atol=1e-4, rtol=0)
        np.testing.assert_allclose(eng.decode(np.array([[42]])), want_decode, atol=1e-4, rtol=0)
