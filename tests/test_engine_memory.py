"""The lean engines hold one form of each weight (issue 17, "the runtime at 7B"): a sparse model's
engine holds fewer tensor bytes than the dense one, prefill included; the no-dense-copy path gives
the old path's logits; bf16 values stay within bf16 tolerance of fp32; the --dtype flags parse,
refuse what an engine cannot run in one line, and run on tiny models."""
import gc
import os
import weakref

import numpy as np
import pytest
import torch

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, unavailable_reason
from sparse_runtime.models.tiny import tiny_model

if not available():
    if os.environ.get("SPARSE_RUNTIME_REQUIRE_KERNELS") == "1":
        raise RuntimeError(unavailable_reason())
    pytest.skip(unavailable_reason() or "sparse kernels unavailable", allow_module_level=True)

from sparse_runtime.kernels.module import DenseScratch, densify_into  # noqa: E402
from sparse_runtime.kernels import pack, supported_isas  # noqa: E402
from sparse_runtime.kernels.native import DEFAULT_LAYOUT, supports_bf16  # noqa: E402
from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama, held_tensor_bytes  # noqa: E402


from helpers import random_pruned as pruned  # noqa: E402  (one random pruner for the engine tests)


def lean_of(model, **cfg):
    cfg.setdefault("calibrate", False)
    return LeanLlama(model, LeanConfig(**cfg), threads=2)


IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def test_sparse_engine_holds_less_than_dense_prefill_included():
    """70 %: every tensor the engine references (weights, KV cache, rotary tables and, after a
    prefill that ran the GEMM, the shared scratch) sums to less than the dense engine's."""
    dense = lean_of(tiny_model("llama"), sparse=False)
    sparse = lean_of(pruned(tiny_model("llama")))  # batch_threshold 1: the 12-token prefill rebuilds into scratch
    for lean in (dense, sparse):
        lean.prefill(IDS)
        lean.decode(torch.tensor([[3]]))
    assert sparse.call_counts()["dense_calls"] == 8 and sparse.scratch.nbytes > 0  # the rebuild path ran
    assert all(f.weight is None and f.module.dense_weight is None for f in sparse.linears())  # one form each
    assert sparse.held_bytes() < dense.held_bytes()
    # the linears alone: packed (fp32 at 70 %: bitmask 1.325 of 4 bytes a weight, ~0.33; csr16, the
    # AVX2 default, 0.3 x (4 + 2) = 1.8, 0.45) plus ONE rebuilt weight (the largest, gate|up; a large
    # share of a 2-layer model, little of 32 layers)
    lin_dense = held_tensor_bytes(dense.linears())
    packed = held_tensor_bytes([(f.module.index, f.module.values, f.module.row_ptr) for f in sparse.linears()])
    layouts = {f.module.packed.layout for f in sparse.linears()}
    assert packed < (0.4 if layouts == {"bitmask"} else 0.5) * lin_dense
    assert sparse.scratch.nbytes == max(4 * f.shape[0] * f.shape[1] for f in sparse.linears())
    assert held_tensor_bytes([f.module for f in sparse.linears()]) == packed + sparse.scratch.nbytes < lin_dense


def test_engine_keeps_no_reference_to_the_source_model():
    """The HF model can be dropped: nothing the engine holds keeps its linears (or its file mapping)
    alive; release_source frees them while building."""
    model = pruned(tiny_model("llama"))
    ref = weakref.ref(model.model.layers[0].mlp.gate_proj.weight)
    emb = weakref.ref(model.model.embed_tokens.weight)
    lean = lean_of(model)
    del model
    gc.collect()
    assert ref() is None and emb() is None
    lean.prefill(IDS)
    model = pruned(tiny_model("llama"))
    lean_of(model, sparse=True).prefill(IDS)
    LeanLlama(model, LeanConfig(calibrate=False), threads=2, release_source=True)
    assert model.model.layers[1].self_attn.q_proj.weight.numel() == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("threshold", [1, 64], ids=["prefill-rebuilds", "prefill-sparse"])
def test_no_dense_copy_matches_old_path(family, threshold):
    """Prefill and decode logits of the one-form engine equal the old path's (a dense fp32 copy kept
    beside the packed one) within 1e-4, whichever way prefill dispatches."""
    model = pruned(tiny_model(family))
    new = lean_of(model, batch_threshold=threshold)
    old = lean_of(model, batch_threshold=threshold)
    for f in old.linears():  # the old path: the dense weight kept for the GEMM
        f.module.dense_weight = densify_into(f.module.packed, torch.empty(f.shape))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 9), generator=g)  # batch 2: the torch path for decode too
    torch.testing.assert_close(new.prefill(ids), old.prefill(ids), atol=1e-4, rtol=0)
    for _ in range(3):
        tok = torch.randint(0, 256, (2, 1), generator=g)
        torch.testing.assert_close(new.decode(tok), old.decode(tok), atol=1e-4, rtol=0)
    got = new.prefill(ids[:1])
    torch.testing.assert_close(got, old.prefill(ids[:1]), atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids[:1]).logits, atol=1e-4, rtol=0)
    for _ in range(3):  # batch 1: the C step on the packed weights
        tok = torch.randint(0, 256, (1, 1), generator=g)
        torch.testing.assert_close(new.decode(tok), old.decode(tok), atol=1e-4, rtol=0)
    assert (new.call_counts()["dense_calls"] > 0) == (threshold == 1)


def test_decode_form_switch_keeps_one_form_and_logits():
    """decode_packed = False rebuilds the dense weight and drops the packed one (and back), exactly."""
    model = pruned(tiny_model("llama"))
    lean = lean_of(model)
    ref = lean.prefill(IDS).clone()
    for f in lean.linears():
        f.decode_packed = False
        assert f.module is None and f.weight is not None
    lean._build_step()
    torch.testing.assert_close(lean.prefill(IDS), ref, atol=1e-5, rtol=0)
    for f in lean.linears():
        f.decode_packed = True
        assert f.module is not None and f.weight is None


@pytest.mark.parametrize("isa", [pytest.param(i, marks=pytest.mark.skipif(
    i not in supported_isas() or not supports_bf16(i, DEFAULT_LAYOUT[i]), reason=f"no bf16 {i} kernel here"))
    for i in ("avx512", "avx2", "portable")])
def test_densify_into_bf16_values(isa):
    """bf16 values rebuilt in row blocks (the fp32 scatter kernel on staged blocks) give the packed
    weight exactly, into a bf16 or an fp32 buffer."""
    import sparse_runtime.kernels.module as km

    w = pruned(torch.nn.Linear(40, 70)).weight.detach()
    p = pack(w, DEFAULT_LAYOUT[isa], "bfloat16")
    old, km.DENSIFY_CHUNK = km.DENSIFY_CHUNK, 40 * 16  # several blocks
    try:
        for dt in (torch.bfloat16, torch.float32):
            got = densify_into(p, torch.empty(70, 40, dtype=dt))
            assert torch.equal(got, w.to(torch.bfloat16).to(dt))
    finally:
        km.DENSIFY_CHUNK = old
    sc = DenseScratch()
    assert sc.get(4, 5, torch.float32).shape == (4, 5) and sc.get(2, 3, torch.float32).shape == (2, 3)
    assert sc.nbytes == 4 * 5 * 4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_values_close_to_fp32(family):
    """bf16 packed values (fp32 accumulate) and the dense bf16 baseline stay within bf16 tolerance of
    the fp32 engine; both hold less than their fp32 versions; decode runs the torch path."""
    model = pruned(tiny_model(family))
    f32 = lean_of(model)
    ref = f32.prefill(IDS)
    ref_dec = f32.decode(torch.tensor([[7]]))
    scale = float(ref.abs().max())
    for sparse in (True, False):
        b = lean_of(model, sparse=sparse, value_dtype="bfloat16")
        assert b._step is None and b.embed.dtype == torch.bfloat16
        got = b.prefill(IDS)
        assert got.dtype == torch.float32
        assert float((got - ref).abs().max()) < 2e-2 * scale
        assert float((b.decode(torch.tensor([[7]])) - ref_dec).abs().max()) < 2e-2 * scale
        if sparse:
            assert all(f.module.values.dtype == torch.bfloat16 for f in b.linears())
            assert b.held_bytes() < f32.held_bytes()
    bf16_model = pruned(tiny_model(family)).to(torch.bfloat16)  # a bf16 checkpoint loads as is
    got = lean_of(bf16_model, value_dtype="bfloat16").prefill(IDS)
    assert float((got - ref).abs().max()) < 5e-2 * scale
    with pytest.raises(ConfigError, match="bfloat16"):
        lean_of(bf16_model)  # fp32 values from a bf16 model: refused with the fix


def test_bf16_engine_and_refusals(tmp_path):
    from sparse_runtime.runtime import load_engine

    eng = load_engine("sparse-cpu", "tiny-llama", threads=1, dtype="bfloat16", calibrate=False)
    toks = list(eng.generate(np.array([1, 2, 3]), 4))
    assert len(toks) == 4 and eng.info()["dtype"] == "bfloat16" and "held_tensor_mb" in eng.memory()
    with pytest.raises(ConfigError, match="float32"):
        eng.init_slots(2, 16)  # the serving slots read fp32
    with pytest.raises(ConfigError, match="float16"):
        load_engine("lean-cpu", "tiny-llama", threads=1, dtype="float16")


def test_streamed_build_holds_one_block(tmp_path):
    """From a Hugging Face directory read block by block (the dense model never whole in memory):
    at most one block materialised, the same logits as the in-memory build, and the engine path."""
    import sparse_runtime as sr
    from helpers import save_tiny_pruned
    from sparse_runtime.models.streaming import StreamedModel
    from sparse_runtime.runtime import load_engine

    ck = save_tiny_pruned(tmp_path / "ck", family="qwen2", sparsity=0.7)
    sm = StreamedModel(ck)
    streamed = LeanLlama(None, LeanConfig(calibrate=False), threads=2, streamed=sm)
    assert sm.max_live_blocks == 1 and sm.live_blocks == 0
    whole = lean_of(sr.load_model(str(ck)).model)
    torch.testing.assert_close(streamed.prefill(IDS), whole.prefill(IDS), atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed.decode(torch.tensor([[9]])), whole.decode(torch.tensor([[9]])),
                               atol=1e-5, rtol=0)
    for dtype in ("float32", "bfloat16"):
        eng = load_engine("sparse-cpu", str(ck), threads=1, stream="on", calibrate=False, dtype=dtype)
        assert eng.info()["streamed"] and len(list(eng.generate(np.array([1, 2, 3]), 3))) == 3


def test_dtype_flags(tmp_path, capsys):
    from sparse_runtime.cli import main
    from sparse_runtime.commands._dtype import engine_dtype_options

    assert engine_dtype_options("ort-cpu", None) == {}
    assert engine_dtype_options("sparse-cpu", "bfloat16") == {"dtype": "bfloat16"}
    with pytest.raises(ConfigError, match="ort-cpu runs float32.*--dtype float32"):
        engine_dtype_options("ort-cpu", "bfloat16")
    assert main(["generate", "tiny-llama", "--engine", "sparse-cpu", "--dtype", "bfloat16", "--prompt", "Hi",
                 "--max-new-tokens", "3", "--threads", "1"]) == 0
    assert main(["generate", "tiny-llama", "--engine", "ort-cpu", "--dtype", "bfloat16", "--prompt", "Hi"]) == 2
    assert "runs float32" in capsys.readouterr().err
    assert main(["bench", "tiny-llama", "tiny-llama", "--engines", "lean-cpu", "--dtype", "bfloat16",
                 "--scenarios", "decode:1@8", "--decode-steps", "2", "--threads", "1"]) == 0
    # --prefill-dtype: the lean engines' prompt products in bf16; refused by the others, with the fix
    assert engine_dtype_options("sparse-cpu", "int8", "bfloat16") == {"prefill_dtype": "bfloat16", "dtype": "int8"}
    with pytest.raises(ConfigError, match="ort-cpu has no --prefill-dtype.*sparse-cpu"):
        engine_dtype_options("ort-cpu", None, "bfloat16")
    assert main(["generate", "tiny-llama", "--engine", "sparse-cpu", "--prefill-dtype", "bfloat16", "--prompt",
                 "Hello there, " * 4, "--max-new-tokens", "3", "--threads", "1"]) == 0
    assert main(["generate", "tiny-llama", "--engine", "torch-cpu", "--prefill-dtype", "bfloat16", "--prompt",
                 "Hi"]) == 2
    assert "has no --prefill-dtype" in capsys.readouterr().err
    # --batch-dtype (serve): the batched steps' sparse products in bf16; refused early by the others
    assert engine_dtype_options("sparse-cpu", None, None, "bfloat16") == {"batch_dtype": "bfloat16"}
    with pytest.raises(ConfigError, match="ort-cpu has no --batch-dtype bfloat16.*sparse-cpu"):
        engine_dtype_options("ort-cpu", None, None, "bfloat16")
    assert main(["serve", "tiny-llama", "--engine", "ort-cpu", "--batch-dtype", "bfloat16"]) == 2
    assert "has no --batch-dtype" in capsys.readouterr().err
    from sparse_runtime.runtime.lean_llama import LeanConfig

    with pytest.raises(ConfigError, match="batch_dtype 'float16'"):
        LeanConfig(batch_dtype="float16")
    from helpers import save_tiny_pruned

    ck = save_tiny_pruned(tmp_path / "ck", sparsity=0.7)
    out = tmp_path / "bm"
    assert main(["export", str(ck), "--format", "bitmask", "--out", str(out), "--load-dtype", "bfloat16"]) == 0
    from exporters.bitmask import load_bitmask

    model = load_bitmask(out)
    assert next(model.parameters()).dtype == torch.bfloat16  # bf16 in, bf16 out
    assert main(["export", str(ck), "--format", "onnx", "--out", str(tmp_path / "o"), "--load-dtype",
                 "bfloat16"]) == 2
    assert "traces the model in float32" in capsys.readouterr().err
