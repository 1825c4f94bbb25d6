"""The lean Llama-family decode path (sparse_runtime/runtime/lean_llama.py + the C step) against
Hugging Face's eager forward: logits, cache growth, sliding windows, rope scaling, batch > 1,
greedy generation, fused packing, engines, and the clear refusals."""
import os

import numpy as np
import pytest
import torch

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import available, pack, supported_isas, unavailable_reason
from sparse_runtime.models.tiny import tiny_model

from helpers import compare_with_hf, random_pruned as pruned

if not available():
    if os.environ.get("SPARSE_RUNTIME_REQUIRE_KERNELS") == "1":
        raise RuntimeError(unavailable_reason())
    pytest.skip(unavailable_reason() or "sparse kernels unavailable", allow_module_level=True)

from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama  # noqa: E402

ATOL = 2e-5
ISAS = [pytest.param(i, marks=pytest.mark.skipif(i not in supported_isas(), reason=f"CPU lacks {i}"))
        for i in ("avx512", "avx2", "portable")]


def lean_of(model, threads=2, **cfg):
    cfg.setdefault("calibrate", False)
    cfg.setdefault("initial_cache", 16)  # small: the tests cross a cache reallocation
    return LeanLlama(model, LeanConfig(**cfg), threads=threads)


def compare(model, lean, prompt=12, steps=20, batch=1, seed=0):
    compare_with_hf(model, lean, prompt, steps, batch, seed, atol=ATOL)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_logits_equal_hf(family_name, sparse):
    model = pruned(tiny_model(family_name)) if sparse else tiny_model(family_name)
    lean = lean_of(model, sparse=sparse)
    assert lean._step is not None
    assert all((f.module is not None) == sparse for f in lean.linears())
    compare(model, lean)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_every_isa_and_thread_count(isa, threads):
    model = pruned(tiny_model("qwen2"))  # q/k/v biases: the fused bias
    compare(model, lean_of(model, threads=threads, isa=isa), steps=6)
    compare(model, lean_of(model, threads=threads, isa=isa, sparse=False), steps=3)


@pytest.mark.parametrize("isa", ISAS)
def test_head_dim_not_a_multiple_of_the_vector_width(isa):
    """head_dim 12: the 8-/16-lane attention kernels' scalar tails."""
    model = pruned(tiny_model("llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2))
    compare(model, lean_of(model, isa=isa), steps=5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_odd_widths_and_thread_shares(isa, threads):
    """hidden 40 and intermediate 37: the vector tails of the norm's sum of squares and of SiLU * up;
    3 threads: uneven shares of whole q/k/v heads (each thread rotates and caches its own heads) and
    of gate/up row pairs (each thread takes SiLU of its own rows), and every thread's own copy of the
    residual stream; dense and sparse."""
    model = tiny_model("llama", hidden_size=40, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2)
    compare(model, lean_of(model, threads=threads, isa=isa, sparse=False), steps=4)
    model = pruned(model)
    compare(model, lean_of(model, threads=threads, isa=isa), steps=4)


@pytest.mark.parametrize("isa", ISAS)
def test_wide_head_dim(isa):
    """head_dim 160: past the AVX-512 sum of p v's register tile (its 16-column fallback) and over
    three AVX2 column blocks (64, 64, 32)."""
    model = pruned(tiny_model("llama", hidden_size=320, num_attention_heads=2, num_key_value_heads=1))
    compare(model, lean_of(model, isa=isa), prompt=20, steps=4)


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(16, 8, 1), (32, 5, 1), (48, 6, 2), (64, 9, 3), (128, 3, 1),
                                                     (64, 12, 1), (112, 2, 2)],
                         ids=["d16-g8", "d32-g5", "d48-g3", "d64-g3", "d128-g3", "d64-g12", "d112-g1"])
@pytest.mark.parametrize("threads,prompt", [(1, 40), (2, 40), (2, 270)])
def test_grouped_attention_head_dims_and_groups(head_dim, heads, kv_heads, threads, prompt, kv_dtype):
    """The AVX-512 grouped-query attention (every D = 16 NC up to 128 has its own form): query heads
    per kv head 1 to 12 (the V pass in chunks of 4, or 2 at D > 64; the running maxima 8 heads at a
    time), 40 and 270 prompt positions (whole and partial 16-position blocks; with 2 threads whole kv
    heads where their count is even, else one head cut between the threads' shares), fp32 and fp16
    caches, against Hugging Face's forward."""
    if "avx512" not in supported_isas():
        pytest.skip("CPU lacks avx512")
    model = pruned(tiny_model("llama", hidden_size=head_dim * heads, num_attention_heads=heads,
                              num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512))
    lean = lean_of(model, threads=threads, isa="avx512", kv_dtype=kv_dtype)
    compare_with_hf(model, lean, prompt, 4, 1, 0, atol=ATOL if kv_dtype == "float32" else 2e-3)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("form", ["shares", "ranges"])
@pytest.mark.parametrize("threads", [3, 4])
def test_attention_split_across_threads(isa, form, threads):
    """The batch-1 step cuts the attention into pieces and merges the pieces' partial softmaxes: equal
    shares of the (kv head, position) pairs (3 threads over 2 kv heads: both heads cut, one of them
    between 2 shares; 4: each head between 2) or one range per thread of every head. 2 kv heads of 2
    query heads: prompts of 40, 1 (fewer pairs than threads: fewer shares), 300 and 254 positions, a
    sliding window of 270 (pieces over the window only) and one of 5."""
    from sparse_runtime.kernels import decode as cdec

    old = cdec.attn_form(form)
    try:
        model = pruned(tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
        for prompt, steps in ((40, 4), (1, 4), (300, 3), (254, 4)):
            compare(model, lean_of(model, threads=threads, isa=isa), prompt=prompt, steps=steps)
        windowed = pruned(tiny_model("mistral", sliding_window=270, max_position_embeddings=512))
        compare(windowed, lean_of(windowed, threads=threads, isa=isa), prompt=280, steps=3)
        windowed = pruned(tiny_model("mistral", sliding_window=5))
        compare(windowed, lean_of(windowed, threads=threads, isa=isa), prompt=9, steps=6)
    finally:
        cdec.attn_form(old)


@pytest.mark.parametrize("kv_heads", [1, 3, 5])
@pytest.mark.parametrize("threads", [2, 5, 7])
def test_attention_equal_shares(kv_heads, threads):
    """Equal shares at head and thread counts that do not divide each other: a share holding the end
    of one head and the start of the next, a head cut into up to 7 pieces (1 kv head, 7 threads), whole
    heads between cut ones (5 kv heads, 2 threads), and as few positions as threads (prompt 1), against
    Hugging Face's forward. The shares do not depend on the ISA: the widest the CPU has runs them."""
    isa = next(i for i in ("avx512", "avx2", "portable") if i in supported_isas())
    model = pruned(tiny_model("llama", hidden_size=16 * kv_heads * 2, num_attention_heads=2 * kv_heads,
                              num_key_value_heads=kv_heads, max_position_embeddings=512))
    for prompt in (1, 5, 40, 300):
        compare(model, lean_of(model, threads=threads, isa=isa), prompt=prompt, steps=3)


def test_attention_form_hook():
    """kernels.decode.attn_form: shares by default, returns the form before each call, refuses an
    unknown name (and the C entry an unknown number) without changing the form."""
    from sparse_runtime.kernels import decode as cdec
    from sparse_runtime.kernels import native

    assert cdec.attn_form() == "shares"
    try:
        assert cdec.attn_form("ranges") == "shares"
        assert cdec.attn_form() == "ranges"
        with pytest.raises(ValueError, match="choose shares or ranges"):
            cdec.attn_form("whole")
        assert native.lib().sr_attn_form(7) == -2
        assert cdec.attn_form() == "ranges"
    finally:
        cdec.attn_form("shares")
    assert cdec.attn_form() == "shares"


def test_thread_pace():
    """kernels.decode.thread_pace: one positive time per thread asked (the team may share cores: only
    the count and the sign are checked), and bad arguments refused."""
    from sparse_runtime.kernels import decode as cdec

    for n in (1, 2, 3):
        us = cdec.thread_pace(n, 1000)
        assert len(us) == n and all(u > 0 for u in us)
    with pytest.raises(ValueError, match="at least one thread"):
        cdec.thread_pace(0)


@pytest.mark.parametrize("isa", ISAS)
def test_fp16_cache_rounds_as_torch(isa):
    """The steps' fp32 -> fp16 conversion (kv_dtype float16) against torch's .half(), bit for bit:
    ties to even, subnormals, the largest finite values, overflow to infinity, signed zeros."""
    from sparse_runtime.kernels import decode as cdec

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, -7e4, float("inf"), -float("inf"),
                                 6.1035156e-05, 6.0e-05, 5.96e-08, 2.98e-08, 2.99e-08, 1e-9, 1.00048828125,
                                 1.000244140625, 1.0007324]),
                   torch.randn(999, generator=g) * 10, torch.randn(999, generator=g) * 1e-5,
                   (torch.rand(999, generator=g) - 0.5) * 140000])
    assert torch.equal(cdec.kv_f16_store(x, isa), x.half().view(torch.int16))
    assert torch.isnan(cdec.kv_f16_store(torch.tensor([float("nan")]), isa).view(torch.float16)).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("hidden", [64, 48], ids=["head_dim16", "head_dim12"])
def test_fp16_kv_cache(isa, threads, hidden):
    """kv_dtype float16: the cache holds fp16 K/V (half the bytes); the C step (with 3 threads its kv
    heads cut between the threads' shares) equals the torch path reading the same rounded cache (a
    batch of 2 equal rows), and the logits stay near the fp32 model's (the rounding of K and V only).
    head_dim 12: the vector tails."""
    model = pruned(tiny_model("llama", hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2))
    c = lean_of(model, threads=threads, isa=isa, kv_dtype="float16")
    t = lean_of(model, threads=threads, isa=isa, kv_dtype="float16")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, 30), generator=g)
    torch.testing.assert_close(c.prefill(ids), t.prefill(ids.repeat(2, 1))[:1], atol=ATOL, rtol=0)
    for _ in range(6):
        tok = torch.randint(0, 256, (1, 1), generator=g)
        torch.testing.assert_close(c.decode(tok), t.decode(tok.repeat(2, 1))[:1], atol=ATOL, rtol=0)
    assert c.k.dtype == c.v.dtype == torch.float16 and c.c_steps == 6
    assert "fp16 K/V cache" in c.summary()
    compare_with_hf(model, lean_of(model, threads=threads, isa=isa, kv_dtype="float16"), 12, 6, 1, 0, atol=2e-3)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fp16_kv_cache_long_context(threads):
    """An fp16 cache over 1100 positions (every 16-position block and vector width of the fp16 loads;
    2 threads: a whole kv head each, 3: both heads cut between shares): the AVX-512 step still equals
    the torch path."""
    if "avx512" not in supported_isas():
        pytest.skip("CPU lacks avx512")
    model = pruned(tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    c = lean_of(model, threads=threads, isa="avx512", kv_dtype="float16")
    t = lean_of(model, threads=threads, isa="avx512", kv_dtype="float16")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 1100), generator=g)
    c.prefill(ids)
    t.prefill(ids.repeat(2, 1))
    for _ in range(3):
        tok = torch.randint(0, 256, (1, 1), generator=g)
        torch.testing.assert_close(c.decode(tok), t.decode(tok.repeat(2, 1))[:1], atol=ATOL, rtol=0)
    assert c.c_steps == 3


def test_kv_dtype_option(tmp_path):
    """--kv-dtype: one list in the parser and the engines; refused with one line where an engine has no
    such cache or the value is unknown; the engine loads with an fp16 cache and says so."""
    from sparse_runtime.commands import _dtype
    from sparse_runtime.runtime import get_engine, load_engine
    from sparse_runtime.runtime.lean_llama import KV_DTYPES

    from wanda_reference import make_checkpoint

    assert _dtype.KV_DTYPES == tuple(KV_DTYPES) == get_engine("sparse-cpu").kv_dtypes == get_engine("lean-cpu").kv_dtypes
    assert _dtype.engine_dtype_options("lean-cpu", None, kv_dtype="float16") == {"kv_dtype": "float16"}
    with pytest.raises(ConfigError, match="no --kv-dtype float16"):
        _dtype.engine_dtype_options("torch-cpu", None, kv_dtype="float16")
    with pytest.raises(ConfigError, match="kv_dtype 'bfloat16': choose float32 or float16"):
        LeanConfig(kv_dtype="bfloat16")
    eng = load_engine("sparse-cpu", str(make_checkpoint(tmp_path / "ck", "llama", sparsity=0.7)), threads=1,
                      kv_dtype="float16")
    try:
        assert eng.lean.k.dtype == torch.float16 and "fp16 K/V cache" in eng.evidence()["sparse_path"]
        eng.prefill(np.array([[1, 2, 3]]))
        assert np.isfinite(eng.decode(np.array([[4]]))).all()
    finally:
        eng.close()


@pytest.mark.parametrize("layout", ["bitmask", "csr16"])
def test_avx2_both_layouts(layout):
    """AVX2 runs both layouts in the C step (csr16 by default; bitmask by the left-pack kernel)."""
    if "avx2" not in supported_isas():
        pytest.skip("CPU lacks avx2")
    model = pruned(tiny_model("llama"))
    lean = lean_of(model, isa="avx2", layout=layout)
    assert {f.module.packed.layout for f in lean.linears() if f.module is not None} == {layout}
    compare(model, lean, steps=6)


def test_sliding_window_is_applied():
    model = pruned(tiny_model("mistral", sliding_window=6))
    lean = lean_of(model)
    assert [l.window for l in lean.layers] == [6, 6]
    compare(model, lean, prompt=10, steps=12)
    # the window matters here (else the test above would not test it)
    ids = torch.randint(0, 256, (1, 16))
    wide = tiny_model("mistral", sliding_window=256)
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(wide(ids).logits, model(ids).logits, atol=1e-3)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}],
                         ids=lambda r: r["rope_type"])
def test_rope_scaling(rope):
    model = pruned(tiny_model("llama", rope_scaling=rope, rope_theta=500000.0))
    compare(model, lean_of(model), steps=4)


def test_tied_lm_head_shares_the_table():
    model = pruned(tiny_model("llama", tie_word_embeddings=True))
    model.tie_weights()
    lean = lean_of(model)
    assert lean.lm_head.data_ptr() == lean.embed.data_ptr()
    compare(model, lean, steps=4)


def test_batch_two_uses_the_torch_path():
    model = pruned(tiny_model("llama"))
    compare(model, lean_of(model), batch=2, steps=3)


def test_greedy_generate_equals_hf():
    model = pruned(tiny_model("llama"), sparsity=0.5)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             pad_token_id=0)[0, 9:].tolist()  # explicit mask: id 0 is not padding here
    assert list(lean_of(model).generate(ids, 24)) == ref


def test_fused_packing_equals_separate_packs():
    model = pruned(tiny_model("llama"))
    a = model.model.layers[0].self_attn
    fused = lean_of(model).layers[0].qkv.module.packed  # the CPU's layout: bitmask, or csr16 on AVX2
    parts = [pack(l.weight.detach(), fused.layout) for l in (a.q_proj, a.k_proj, a.v_proj)]
    assert torch.equal(fused.index, torch.cat([p.index for p in parts]))
    assert torch.equal(fused.values, torch.cat([p.values for p in parts]))
    offsets = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
    rp = torch.cat([parts[0].row_ptr] + [p.row_ptr[1:] + int(o) for p, o in zip(parts[1:], offsets[1:])])
    assert torch.equal(fused.row_ptr, rp)


def test_dense_layers_stay_dense_below_min_sparsity():
    model = tiny_model("llama")
    lean = lean_of(model, min_sparsity=0.3)
    assert all(f.module is None for f in lean.linears())
    assert "0/8 fused linears sparse" in lean.summary()


def test_decode_counts_sparse_kernel_calls():
    from sparse_runtime.kernels import counters

    model = pruned(tiny_model("llama"))
    lean = lean_of(model)
    lean.prefill(torch.tensor([[1, 2, 3]]))
    before = sum(counters().values())
    lean.decode_token(4)
    assert sum(counters().values()) - before == 4 * len(lean.layers)  # 4 fused linears per layer


def test_refusals_name_the_fix():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    qwen3 = Qwen3ForCausalLM(cfg)
    with pytest.raises(ConfigError, match="not 'qwen3'.*torch-sparse"):
        LeanLlama(qwen3)
    qwen3.config.model_type = "qwen2"  # a family the path knows, with layers it does not implement
    with pytest.raises(ConfigError, match="q/k norms.*torch-sparse"):
        LeanLlama(qwen3)
    with pytest.raises(ConfigError, match="dynamic.*torch-sparse"):
        LeanLlama(tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ConfigError, match="float32"):
        LeanLlama(tiny_model("llama").to(torch.bfloat16))
    gpt = tiny_model("llama")
    gpt.config.model_type = "gpt2"
    with pytest.raises(ConfigError, match="supports llama, mistral, qwen2"):
        LeanLlama(gpt)
    lean = lean_of(tiny_model("llama"))
    with pytest.raises(ConfigError, match="prefill"):
        lean.decode_token(1)


def test_engines_match_torch_cpu(tmp_path):
    from wanda_reference import make_checkpoint

    from sparse_runtime.runtime import Scenario, load_engine

    ckpt = str(make_checkpoint(tmp_path / "tiny50", "llama", sparsity=0.5))
    prompt = np.array([[3, 17, 99, 4, 250, 31, 7, 64, 12, 200, 5, 77]], dtype=np.int64)
    ref = load_engine("torch-cpu", ckpt)
    want_prefill = ref.prefill(prompt)
    want_decode = ref.decode(np.array([[42]]))
    want_tokens = list(ref.generate(prompt[0], 8))
    for name in ("sparse-cpu", "lean-cpu"):
        eng = load_engine(name, ckpt, threads=2, calibrate=False)
        np.testing.assert_allclose(eng.prefill(prompt), want_prefill, atol=1e-4, rtol=0)
        np.testing.assert_allclose(eng.decode(np.array([[42]])), want_decode, atol=1e-4, rtol=0)
        assert list(eng.generate(prompt[0], 8)) == want_tokens
        f = eng.timer(Scenario("decode", 8, 1, 3))
        assert f() > 0 and f() > 0
        mc = eng.evidence()["module_calls"]
        assert mc["c_decode_steps"] > 0
        assert (mc["sparse_calls"] > 0) == (name == "sparse-cpu") == (mc["modules"] > 0)


def test_stage_profile_accounts_for_the_step():
    from sparse_runtime.kernels import decode as cdec

    lean = lean_of(pruned(tiny_model("llama")))
    lean.prefill(torch.tensor([[1, 2, 3]]))
    cdec.profile_start()
    for t in range(5):
        lean.decode_token(t)
    stages = cdec.profile_stop()
    assert set(stages) == set(cdec.STAGES) and all(v >= 0 for v in stages.values())
    assert stages["lm_head"] > 0 and stages["qkv"] > 0


def test_measured_decode_form_keeps_logits():
    """calibrate=True times each fused product dense vs packed in the C step and keeps the faster;
    either choice gives HF's logits (here: forced both ways, then measured)."""
    model = pruned(tiny_model("llama"))
    for forced in (False, True):
        lean = lean_of(model)
        for f in lean.linears():
            f.decode_packed = forced
        lean._build_step()
        compare(model, lean, steps=3)
        assert lean.call_counts()["sparse_calls"] == (3 * 8 if forced else 0)
    lean = lean_of(model, calibrate=True)
    # each packable linear holds the measured form only: packed, or (where dense won) dense
    assert all(isinstance(f.decode_packed, bool) and f.can_pack and (f.module is None) == (f.weight is not None)
               for f in lean.linears())
    assert "packed" in lean.summary()
    compare(model, lean, steps=3)


def test_measured_decode_form_times_from_memory(monkeypatch):
    """Every timed pass of the dense/packed measurement starts with the caches emptied (a decode token
    finds its weights in memory; a group that fits in cache would favour dense), and the eviction
    buffer is freed after."""
    from sparse_runtime.kernels import cache
    from sparse_runtime.runtime import lean_llama

    monkeypatch.setattr(lean_llama, "_DECODE_FORM", {})
    passes = []
    monkeypatch.setattr(cache, "evict_caches", lambda: passes.append(1))
    released = []
    monkeypatch.setattr(cache, "release_eviction_buffer", lambda: released.append(1))
    lean = lean_of(pruned(tiny_model("llama")))
    groups = {(f.shape, round(f.module.packed.density * 20)) for f in lean.linears() if f.module is not None}
    lean_llama.choose_decode_forms(lean.linears(), lean.isa, 2, repeats=2)
    assert len(passes) == len(lean_llama._DECODE_FORM) * 3 * 2 and len(lean_llama._DECODE_FORM) == len(groups)
    assert released == [1]


def test_last_level_cache_size():
    from sparse_runtime.kernels.cache import _parse_size, last_level_cache_bytes

    assert _parse_size("32768K\n") == 32 << 20 and _parse_size("1M") == 1 << 20 and _parse_size("512") == 512
    assert last_level_cache_bytes() >= 1 << 20


@pytest.mark.skipif(not available(), reason="compiled kernels unavailable")
def test_prefill_last_only_equals_last_row():
    """``prefill(last_only=True)`` (what generation and the prefill timer use) is the last position
    of the full prefill (to the GEMM's rounding: one row instead of twenty takes another BLAS
    kernel); the cache is filled identically (the next step agrees bit for bit)."""
    model = pruned(tiny_model("llama"))
    lean = lean_of(model)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    full = lean.prefill(ids).clone()
    nxt_full = lean.decode(torch.tensor([[7]])).clone()
    last = lean.prefill(ids, last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[0, 0], full[0, -1], atol=ATOL, rtol=1e-5)
    assert torch.equal(lean.decode(torch.tensor([[7]])), nxt_full)


@pytest.mark.skipif(not available(), reason="compiled kernels unavailable")
@pytest.mark.parametrize("sparse", [True, False])
def test_prefill_bf16_close_to_fp32(sparse):
    """``prefill_dtype='bfloat16'``: prompts of >= PREFILL_BF16_MIN tokens run bf16 GEMMs (operands
    rounded to bf16, fp32 accumulation): logits close to the fp32 prefill, decode unchanged after it."""
    from sparse_runtime.runtime.lean_llama import PREFILL_BF16_MIN

    model = pruned(tiny_model("llama")) if sparse else tiny_model("llama")
    ids = torch.randint(0, 256, (1, PREFILL_BF16_MIN + 8), generator=torch.Generator().manual_seed(4))
    ref = lean_of(model, sparse=sparse).prefill(ids)
    bf = lean_of(model, sparse=sparse, prefill_dtype="bfloat16")
    got = bf.prefill(ids)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 0.02 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    if sparse:
        assert sum(sum(f.prefill_forms.values()) for l in bf.layers for f in (l.qkv, l.o, l.gate_up, l.down)) > 0
    with pytest.raises(ConfigError, match="prefill_dtype"):
        LeanConfig(prefill_dtype="float16")
