"""The CPU sparse kernels against the NumPy reference and dense F.linear, on every ISA path the CPU has.

Skips (with the reason) when the compiled extension is missing; set SPARSE_RUNTIME_REQUIRE_KERNELS=1
(CI) to make a missing extension a failure instead.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import (SparseLinear, available, counters, pack, reference_linear, sparse_linear,
                                    sparsify_linears, supported_isas, unavailable_reason)
from sparse_runtime.kernels import native
from sparse_runtime.kernels.layout import mask_of, unpack
from sparse_runtime.kernels.module import call_counts, measure_threshold
from sparse_runtime.kernels.ops import densify

if not available():
    if os.environ.get("SPARSE_RUNTIME_REQUIRE_KERNELS") == "1":
        raise RuntimeError(unavailable_reason())
    pytest.skip(unavailable_reason() or "sparse kernels unavailable", allow_module_level=True)

ALL = [("avx512", "bitmask"), ("avx2", "bitmask"), ("avx2", "csr16"), ("portable", "bitmask"), ("portable", "csr16")]
PATHS = [pytest.param(i, l, id=f"{i}-{l}", marks=pytest.mark.skipif(i not in supported_isas(),
                                                                      reason=f"CPU lacks {i}")) for i, l in ALL]
TOL = dict(atol=2e-5, rtol=1e-4)


def sparse_weight(n, k, sparsity, seed=0, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    for r in empty_rows:
        w[r] = 0
    return w


def check(w, b, x, isa, layout):
    p = pack(w, layout)
    assert torch.equal(unpack(p), w)
    y = sparse_linear(x, p, b, isa=isa)
    dense = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
    ref = reference_linear(x.numpy(), p, None if b is None else b.numpy())
    scale = 1 + x.abs().max().item() * w.abs().sum(1).max().item() * 1e-6
    torch.testing.assert_close(y, dense, atol=TOL["atol"] * scale, rtol=TOL["rtol"])
    np.testing.assert_allclose(y.numpy(), ref, atol=TOL["atol"] * scale, rtol=TOL["rtol"])


@pytest.mark.parametrize("isa,layout", PATHS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9, 0.95])
@pytest.mark.parametrize("batch", [1, 3, 8, 17, 40])
def test_random_shapes(isa, layout, sparsity, batch):
    rng = np.random.default_rng(int(sparsity * 100) + batch)
    for n, k in [(1, 1), (7, 13), (33, 31), (64, 100), tuple(rng.integers(1, 300, size=2))]:
        w = sparse_weight(int(n), int(k), sparsity, seed=int(n * k), empty_rows=(0,) if n > 2 else ())
        x = torch.randn(batch, int(k))
        check(w, torch.randn(int(n)), x, isa, layout)
        check(w, None, x, isa, layout)


@pytest.mark.parametrize("isa,layout", PATHS)
def test_all_zero_and_fully_dense(isa, layout):
    for w in (torch.zeros(19, 45), torch.randn(19, 45) + 10.0):
        for batch in (1, 5, 12):
            check(w, torch.randn(19), torch.randn(batch, 45), isa, layout)


@pytest.mark.parametrize("isa,layout", PATHS)
def test_leading_dims_noncontiguous_and_threads(isa, layout):
    w = sparse_weight(150, 77, 0.7)
    p = pack(w, layout)
    x = torch.randn(2, 3, 77 * 2)[..., ::2]  # non-contiguous [2, 3, 77]
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.testing.assert_close(sparse_linear(x, p, isa=isa), F.linear(x, w), **TOL)
    finally:
        torch.set_num_threads(old)


def test_layout_encoding():
    w = torch.zeros(2, 40)
    w[0, [0, 5, 31, 32, 39]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    w[1, 7] = -0.0  # negative zero is a zero
    p = pack(w, "bitmask")
    assert p.index.shape == (2, 2) and p.row_ptr.tolist() == [0, 5, 5]
    assert p.index[0, 0].item() & 0xFFFFFFFF == (1 | 1 << 5 | 1 << 31) and p.index[0, 1].item() == (1 | 1 << 7)
    assert p.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    c = pack(w, "csr16")
    assert c.index.numpy().view(np.uint16).tolist() == [0, 5, 31, 32, 39]
    assert (mask_of(p) == mask_of(c)).all()
    # bound of docs/protocols.md: 70 % fp32 bitmask -> 4 / (0.3 * 4 + 1/8) = 3.0x
    w = sparse_weight(256, 1024, 0.7)
    assert pack(w, "bitmask").bandwidth_bound() == pytest.approx(3.0, rel=0.03)
    with pytest.raises(ConfigError, match="float32"):
        pack(w.half(), "bitmask")
    with pytest.raises(ConfigError, match="65536"):
        pack(torch.zeros(1, 70000), "csr16")


def test_densify_and_counters():
    w = sparse_weight(70, 90, 0.6)
    before = counters()
    for isa in supported_isas():
        layout = native.DEFAULT_LAYOUT[isa]
        p = pack(w, layout)
        assert torch.equal(densify(p), w)
        sparse_linear(torch.randn(1, 90), p, isa=isa)
        assert counters()[f"{layout}/{isa}"] == before[f"{layout}/{isa}"] + 1


def test_isa_env_var(monkeypatch):
    monkeypatch.setenv(native.ENV_ISA, "portable")
    assert native.select_isa() == "portable"
    monkeypatch.setenv(native.ENV_ISA, "sse9")
    with pytest.raises(ConfigError, match="unknown kernel ISA"):
        native.select_isa()
    monkeypatch.delenv(native.ENV_ISA)
    assert native.select_isa() == supported_isas()[-1]
    with pytest.raises(ConfigError, match="no portable kernel|has no"):
        native.select_layout("avx512", "csr16")


def test_custom_op_and_compile_path():
    w = sparse_weight(48, 64, 0.7)
    lin = nn.Linear(64, 48)
    lin.weight.data.copy_(w)
    mod = SparseLinear.from_linear(lin, use_op=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(mod(x), lin(x), **TOL)
    out = torch.ops.sparse_runtime.sparse_linear(x, mod.index, mod.values, mod.row_ptr, mod.bias, 48, 64,
                                                 *mod._ids)
    torch.testing.assert_close(out, lin(x), **TOL)
    torch.library.opcheck(torch.ops.sparse_runtime.sparse_linear.default,
                          (x, mod.index, mod.values, mod.row_ptr, mod.bias, 48, 64, *mod._ids),
                          test_utils=("test_schema", "test_faketensor"))


def test_sparse_linear_module_dispatch():
    w = sparse_weight(40, 56, 0.7)
    lin = nn.Linear(56, 40)
    lin.weight.data.copy_(w)
    for keep_dense in (True, False):
        mod = SparseLinear.from_linear(lin, keep_dense=keep_dense, batch_threshold=4)
        with torch.no_grad():
            torch.testing.assert_close(mod(torch.ones(2, 2, 56)), lin(torch.ones(2, 2, 56)), **TOL)  # 4 tokens
            assert (mod.sparse_calls, mod.dense_calls) == (1, 0)
            torch.testing.assert_close(mod(torch.ones(5, 56)), lin(torch.ones(5, 56)), **TOL)
            assert (mod.sparse_calls, mod.dense_calls) == (1, 1)
        assert torch.equal(mod.weight, w)
    # autograd falls back to dense
    x = torch.randn(1, 56, requires_grad=True)
    mod(x).sum().backward()
    assert x.grad is not None and mod.dense_calls == 2
    th = measure_threshold(mod, batches=(1, 2), repeats=2)
    assert th in (0, 1, 2)


@pytest.mark.parametrize("isa,layout", PATHS)
def test_model_swap_same_logits(isa, layout, monkeypatch):
    monkeypatch.setenv(native.ENV_ISA, isa)  # forced by the environment variable, as a user would
    monkeypatch.setenv(native.ENV_LAYOUT, layout)
    from sparse_runtime.models import tiny_model
    from sparse_runtime.sparsity import topk_prune_mask

    model = tiny_model("llama", seed=0).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                m.weight.mul_(topk_prune_mask(m.weight.abs(), 0.7, per_row=True))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        dense_logits = model(ids).logits
        dense_gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    report = sparsify_linears(model, calibrate=False, batch_threshold=64)
    assert len(report.swapped) == 14 and not report.skipped  # 2 blocks x 7 linears; lm_head untouched
    assert isinstance(model.lm_head, nn.Linear)
    assert {(m.isa, m.layout) for m in report.swapped.values()} == {(isa, layout)}
    with torch.no_grad():
        sparse_logits = model(ids).logits
        sparse_gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(sparse_logits, dense_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(sparse_gen, dense_gen)
    cc = call_counts(model)
    assert cc["sparse_calls"] >= 14 * 6 and cc["dense_calls"] == 0


def test_sparsify_skips_dense_layers():
    from sparse_runtime.models import tiny_model

    model = tiny_model("llama", seed=0)
    report = sparsify_linears(model, calibrate=False)
    assert not report.swapped and len(report.skipped) == 14


def two_matmul_graph(w, dense_w):
    """x -> MatMul(W^T) -> Relu -> MatMul(dense): one sparse and one dense weight."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = w.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(w.t().contiguous().numpy(), "wt"),
         numpy_helper.from_array(dense_w.t().contiguous().numpy(), "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


BACKENDS = [pytest.param("native", id="native"),
            pytest.param("pyop", id="pyop", marks=pytest.mark.skipif(
                __import__("importlib").util.find_spec("onnxruntime_extensions") is None,
                reason="the pyop backend needs onnxruntime-extensions"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("isa,layout", PATHS)
def test_ort_sparse_op_matches_pytorch(backend, isa, layout):
    """The rewritten graph on ORT equals PyTorch, on every path, for both backends; the kernel
    counter proves the sparse node ran our kernel (native: ORT loaded the same shared object)."""
    pytest.importorskip("onnxruntime")
    from sparse_runtime.kernels import ort as sort

    w, dense_w = sparse_weight(45, 70, 0.7), sparse_weight(45, 45, 0.0, seed=3)
    model = two_matmul_graph(w, dense_w)
    sm, count = sort.sparsify_onnx(model, isa=isa, layout=layout)
    assert count == 1  # the dense second MatMul is left alone
    sess = sort.session(sm, threads=2, backend=backend)
    for shape in [(2, 3), (1, 1), (1, 40), (3, 50)]:
        x = torch.randn(*shape, 70)
        before = counters()
        y = sess.run(None, {"x": x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(y), F.linear(torch.relu(F.linear(x, w)), dense_w),
                                   atol=1e-4, rtol=1e-4)
        assert counters()[f"{layout}/{isa}"] == before[f"{layout}/{isa}"] + 1


def test_sparsify_onnx_takes_sparse_initializers():
    pytest.importorskip("onnxruntime")
    from exporters.onnx_common import to_sparse_initializers
    from sparse_runtime.kernels import ort as sort

    w, dense_w = sparse_weight(33, 64, 0.8), sparse_weight(33, 33, 0.0, seed=3)
    model = two_matmul_graph(w, dense_w)
    to_sparse_initializers(model, names=["wt"])
    assert len(model.graph.sparse_initializer) == 1
    sm, count = sort.sparsify_onnx(model)
    assert count == 1 and not sm.graph.sparse_initializer
    x = torch.randn(1, 2, 64)
    y = sort.session(sm).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), F.linear(torch.relu(F.linear(x, w)), dense_w),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pool", ["ort", "openmp"])
def test_ort_native_op_on_either_thread_pool(pool):
    """Rows split over ORT's intra-op pool (default) or the extension's OpenMP pool: same result,
    at 1 and 2 threads, on a layer big enough to be split."""
    pytest.importorskip("onnxruntime")
    from sparse_runtime.kernels import ort as sort

    w, dense_w = sparse_weight(300, 96, 0.7), sparse_weight(300, 300, 0.0, seed=3)
    sm, _ = sort.sparsify_onnx(two_matmul_graph(w, dense_w))
    for threads in (1, 2):
        sess = sort.session(sm, threads=threads, pool=pool)
        for batch in (1, 9):
            x = torch.randn(1, batch, 96)
            y = sess.run(None, {"x": x.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(y), F.linear(torch.relu(F.linear(x, w)), dense_w),
                                       atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="ort, openmp"):
        sort.session(sm, pool="gpu")


def test_ort_session_of_a_model_past_the_inline_limit_goes_through_files(monkeypatch):
    """Models whose weights pass protobuf's 2 GB cap (7B) are saved with external data first."""
    pytest.importorskip("onnxruntime")
    from sparse_runtime.kernels import ort as sort

    monkeypatch.setattr(sort, "INLINE_LIMIT", 0)
    w, dense_w = sparse_weight(40, 64, 0.7), sparse_weight(40, 40, 0.0, seed=3)
    sm, _ = sort.sparsify_onnx(two_matmul_graph(w, dense_w))
    sess = sort.session(sm)
    assert sess._sparse_runtime_files is not None
    x = torch.randn(1, 3, 64)
    torch.testing.assert_close(torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]),
                               F.linear(torch.relu(F.linear(x, w)), dense_w), atol=1e-4, rtol=1e-4)


def test_ort_native_op_falls_back_to_a_path_this_cpu_runs():
    """A graph rewritten for AVX-512 still runs on a CPU without it (the best path of its layout)."""
    pytest.importorskip("onnxruntime")
    from sparse_runtime.kernels import ort as sort

    w = sparse_weight(33, 64, 0.7)
    sm, _ = sort.sparsify_onnx(two_matmul_graph(w, torch.eye(33)), isa="portable")
    for node in sm.graph.node:
        for a in node.attribute:
            if a.name == "isa_id":
                a.i = 7  # no such path anywhere
    x = torch.randn(1, 2, 64)
    y = sort.session(sm).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), torch.relu(F.linear(x, w)), atol=1e-4, rtol=1e-4)


def test_ort_native_op_errors_name_the_problem():
    pytest.importorskip("onnxruntime")
    from sparse_runtime.kernels import ort as sort

    w = sparse_weight(33, 64, 0.7)
    sm, _ = sort.sparsify_onnx(two_matmul_graph(w, torch.eye(33)), isa="portable", layout="bitmask")
    node = next(n for n in sm.graph.node if n.op_type == sort.OP_TYPE)
    next(a for a in node.attribute if a.name == "in_features").i = 65  # index no longer matches
    sess = sort.session(sm)
    with pytest.raises(Exception, match="in_features"):
        sess.run(None, {"x": np.zeros((1, 1, 64), np.float32)})
    with pytest.raises(ConfigError, match="native, pyop"):
        sort.session(sm, backend="cuda")


def test_package_imports_without_extension():
    import subprocess
    import sys

    code = ("import sys; sys.modules['sparse_runtime.kernels._sparse_kernels'] = None\n"
            "import sparse_runtime.kernels as k\n"
            "assert not k.available() and k.supported_isas() == []\n"
            "print(k.unavailable_reason())")
    env = {k: v for k, v in os.environ.items() if k != native.ENV_LIB}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "not installed" in out.stdout


BF16_PATHS = [pytest.param(i, l, id=f"bf16-{i}-{l}", marks=pytest.mark.skipif(
    not native.supports_bf16(i), reason=f"CPU lacks a bf16 {i} path")) for i, l in ALL if (l, i) in native.IMPLEMENTED_BF16]


def test_bf16_bitmask_on_avx2_is_refused_with_the_fix():
    if "avx2" not in supported_isas():
        pytest.skip("CPU lacks avx2")
    p = pack(sparse_weight(8, 40, 0.7), "bitmask", "bfloat16")
    with pytest.raises(ConfigError, match="csr16"):
        sparse_linear(torch.randn(1, 40), p, isa="avx2")


@pytest.mark.parametrize("isa,layout", BF16_PATHS)
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_bf16_values(isa, layout, batch):
    for n, k, sp in [(33, 70, 0.7), (64, 129, 0.5), (5, 32, 0.95), (9, 17, 0.0)]:
        w = sparse_weight(n, k, sp, seed=n + k, empty_rows=(1,))
        b = torch.randn(n)
        p = pack(w, layout, "bfloat16")
        assert p.values.dtype == torch.bfloat16 and torch.equal(unpack(p), w.bfloat16().float())
        x = torch.randn(batch, k)
        y = sparse_linear(x, p, b, isa=isa)
        ref = F.linear(x.double(), w.bfloat16().double(), b.double()).float()  # exact bf16 weights, fp32 math
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(y.numpy(), reference_linear(x.numpy(), p, b.numpy()), atol=1e-4, rtol=1e-4)
        yb = sparse_linear(x.bfloat16(), p, b, isa=isa)  # bf16 in -> bf16 out
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), F.linear(x.bfloat16().double(), w.bfloat16().double(), b.double()).float(),
                                   atol=5e-2, rtol=2e-2)


def test_bf16_module_and_model_swap():
    from sparse_runtime.models import tiny_model
    from sparse_runtime.sparsity import topk_prune_mask

    isa = next((i for i in reversed(supported_isas()) if native.supports_bf16(i)), None)
    if isa is None:
        pytest.skip("no bf16 path")
    model = tiny_model("llama", seed=0).eval().to(torch.bfloat16)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                m.weight.mul_(topk_prune_mask(m.weight.abs(), 0.7, per_row=True))
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        dense = model(ids).logits.float()
        rep = sparsify_linears(model, isa=isa, calibrate=False, batch_threshold=64)
        assert len(rep.swapped) == 14 and all(m.values.dtype == torch.bfloat16 for m in rep.swapped.values())
        sparse = model(ids).logits.float()
    # dense bf16 rounds every product's output to bf16 as well; ours accumulates in fp32: close, not equal
    torch.testing.assert_close(sparse, dense, atol=0.1, rtol=0.05)
    assert call_counts(model)["sparse_calls"] == 14


@pytest.mark.skipif("avx512" not in supported_isas(), reason="CPU lacks avx512")
@pytest.mark.parametrize("form", sorted(native.GEMV_VARIANTS))
def test_avx512_batch1_forms_match_reference(form):
    """Both AVX-512 batch-1 forms (memory / register vexpandps) give the reference result, including
    odd widths where the register form must fall back near the end of the values array."""
    from sparse_runtime.kernels.module import choose_gemv_variant

    chosen = choose_gemv_variant()
    try:
        native.set_gemv_variant(form)
        for n, k, sp in [(1, 1, 0.0), (5, 17, 0.5), (33, 31, 0.7), (64, 100, 0.9), (16, 64, 0.0), (9, 257, 0.3)]:
            w = sparse_weight(n, k, sp, seed=n + k)
            check(w, torch.randn(n), torch.randn(1, k), "avx512", "bitmask")
    finally:
        native.set_gemv_variant(chosen)


@pytest.mark.skipif("avx2" not in supported_isas(), reason="CPU lacks avx2")
@pytest.mark.parametrize("form", sorted(native.GEMV_FORMS["avx2"]))
def test_avx2_batch1_forms_match_reference(form):
    """Both AVX2 csr16 batch-1 forms (gathers / scalar loads + inserts), with row lengths around
    their 16- and 4-nonzero steps."""
    from sparse_runtime.kernels.module import choose_gemv_variant

    chosen = choose_gemv_variant(isa="avx2")
    try:
        native.set_gemv_variant(form, "avx2")
        for n, k, sp in [(1, 1, 0.0), (5, 17, 0.5), (33, 31, 0.7), (64, 100, 0.9), (16, 64, 0.0), (9, 257, 0.3),
                         (4, 3, 0.0), (7, 20, 0.0), (3, 65536, 0.999)]:
            w = sparse_weight(n, k, sp, seed=n + k)
            check(w, torch.randn(n), torch.randn(1, k), "avx2", "csr16")
    finally:
        native.set_gemv_variant(chosen, "avx2")


@pytest.mark.skipif("avx2" not in supported_isas(), reason="CPU lacks avx2")
def test_avx2_gemv_form_choice(monkeypatch):
    from sparse_runtime.kernels.module import choose_gemv_variant, gemv_choice

    env = native.ENV_GEMV_FORM["avx2"]
    monkeypatch.setenv(env, "gather")
    assert choose_gemv_variant(force=True, isa="avx2") == "gather" and gemv_choice("avx2")["how"] == f"${env}"
    monkeypatch.setenv(env, "auto")
    got = choose_gemv_variant(force=True, repeats=3, isa="avx2")
    info = gemv_choice("avx2")
    assert info["how"] == "measured" and got == min(info["ms"], key=info["ms"].get)
    monkeypatch.setenv(env, "sideways")
    with pytest.raises(ConfigError, match="insert"):
        choose_gemv_variant(force=True, isa="avx2")
    monkeypatch.delenv(env)
    choose_gemv_variant(force=True, repeats=3, isa="avx2")


@pytest.mark.skipif("avx512" not in supported_isas(), reason="CPU lacks avx512")
def test_gemv_variant_choice(monkeypatch):
    from sparse_runtime.kernels.module import choose_gemv_variant, gemv_choice

    monkeypatch.setenv(native.ENV_GEMV, "register")
    assert choose_gemv_variant(force=True) == "register" and gemv_choice()["how"] == f"${native.ENV_GEMV}"
    monkeypatch.setenv(native.ENV_GEMV, "auto")
    got = choose_gemv_variant(force=True, repeats=3)
    info = gemv_choice()
    assert got in native.GEMV_VARIANTS and info["how"] == "measured" and got == min(info["ms"], key=info["ms"].get)
    monkeypatch.setenv(native.ENV_GEMV, "sideways")
    with pytest.raises(ConfigError, match="register"):
        choose_gemv_variant(force=True)
    monkeypatch.delenv(native.ENV_GEMV)
    choose_gemv_variant(force=True, repeats=3)


@pytest.mark.skipif("avx512" not in supported_isas(), reason="CPU lacks avx512")
@pytest.mark.parametrize("batch", [4, 5, 6, 7, 16, 31, 63, 64, 65, 130, 257])
def test_avx512_batch_paths_around_the_switches(batch):
    """Batches on both sides of the expand/index-walk switch (6), of the index/K-blocked walk switch
    (64), of the 16/64/128-token tiles (remainder tiles, padding inside a tile), and row counts
    around the K-blocked walk's 32-row blocks."""
    for n, k, sp in [(70, 100, 0.7), (33, 577, 0.5), (5, 32, 0.95), (65, 64, 0.0)]:
        w = sparse_weight(n, k, sp, seed=batch + n, empty_rows=(1,))
        check(w, torch.randn(n), torch.randn(batch, k), "avx512", "bitmask")


def test_dispatch_ranges_and_module_dispatch():
    from sparse_runtime.kernels.module import apply_dispatch, dispatch_ranges

    assert dispatch_ranges([1, 2, 4]) == (4, ())
    assert dispatch_ranges([1, 16, 32]) == (1, ((16, 32),))  # a gap: sparse at 1 and 16..32 only
    assert dispatch_ranges([8, 16, 128]) == (0, ((8, 16), (128, 128)))
    assert dispatch_ranges([]) == (0, ())
    lin = nn.Linear(56, 40)
    lin.weight.data.copy_(sparse_weight(40, 56, 0.7))
    mod = SparseLinear.from_linear(lin, batch_threshold=1)
    mod.sparse_ranges = ((16, 32),)
    assert [mod.takes_sparse(t) for t in (1, 2, 15, 16, 20, 32, 33)] == [True, False, False, True, True, True, False]
    with torch.no_grad():
        for t in (2, 20):
            torch.testing.assert_close(mod(torch.ones(t, 56)), lin(torch.ones(t, 56)), **TOL)
    assert (mod.sparse_calls, mod.dense_calls) == (1, 1)
    apply_dispatch(mod, batches=(1, 2, 4))
    assert mod.batch_threshold in (0, 1, 2, 4) and all(lo >= 2 for lo, _ in mod.sparse_ranges)
