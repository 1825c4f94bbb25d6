"""The ``gguf`` export and the ``llamacpp`` engine: llama.cpp as a dense quantized baseline.

Without llama-cpp-python the file layout is still tested (the ``gguf`` package reads it back); with
it, llama.cpp itself must reproduce PyTorch's logits from the file, and the engine its greedy tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sparse_runtime as sr
from exporters import export
from exporters.gguf import GGUF_NAME, decode_tensor, rope_halves, rope_pairs
from sparse_runtime.errors import ConfigError
from sparse_runtime.runtime.llamacpp_model import llama_cpp_available
from wanda_reference import make_checkpoint

gguf = pytest.importorskip("gguf")
HAS_LLAMA, WHY_NOT = llama_cpp_available()
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason=WHY_NOT or "llama-cpp-python")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gguf") / "llama-50", "llama", 0.5)


def _field(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if v.dtype == np.uint8 else v.tolist()[0]


def test_rope_reorder_turns_halves_into_pairs():
    """HF rotates each head's two halves; llama.cpp's ``llama`` architecture adjacent pairs. Rows
    reordered by rope_pairs and rotated pairwise give HF's rotated q in the pair layout."""
    H, D, C, pos = 3, 8, 5, 7
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(H * D, C, generator=g), torch.randn(C, generator=g)
    ang = pos * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    cos, sin = ang.cos(), ang.sin()
    q = (w @ x).view(H, D)
    q1, q2 = q[:, :D // 2], q[:, D // 2:]
    hf = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], -1)  # rotate_half
    p = (torch.from_numpy(rope_pairs(w.numpy(), H)) @ x).view(H, D // 2, 2)
    a, b = p[..., 0], p[..., 1]
    pairs = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).view(H, D)
    want = torch.from_numpy(rope_pairs(hf.reshape(-1).numpy(), H)).view(H, D)
    torch.testing.assert_close(pairs, want, atol=1e-5, rtol=0)
    assert np.array_equal(rope_halves(rope_pairs(w.numpy(), H), H), w.numpy())


@pytest.mark.parametrize("qtype,bpw", [("F32", 4.0), ("F16", 2.0), ("BF16", 2.0), ("Q8_0", 1.0625), ("Q4_0", 0.5625)])
def test_every_zero_stays_zero_and_the_file_reads_back(ckpt, tmp_path, qtype, bpw):
    res = export(ckpt, "gguf", tmp_path / "g", qtype=qtype, llama_cpp=False)
    q = res.contents["quantization"]
    assert q["scheme"] == qtype and q["bytes_per_weight"] == bpw
    reader = gguf.GGUFReader(str(tmp_path / "g" / GGUF_NAME))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2 and _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "tokenizer.ggml.model") == "none"  # a byte tokenizer: token ids only
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 * 9  # embedding, final norm, lm_head; per block 2 norms + 7 linears
    lm = sr.load_model(str(ckpt))
    counted = q["kept_weights_rounded_to_zero"]  # reported per tensor, never hidden
    for i, layer in enumerate(lm.model.model.layers):
        for gname, lin, heads in (("attn_q", layer.self_attn.q_proj, 4), ("attn_k", layer.self_attn.k_proj, 2),
                                  ("ffn_down", layer.mlp.down_proj, None)):
            w = lin.weight.detach().numpy()
            t = tensors[f"blk.{i}.{gname}.weight"]
            got = decode_tensor(t.data, t.tensor_type, w.shape)
            if heads:
                got = rope_halves(got, heads)
            assert not ((w == 0) & (got != 0)).any()  # the mask survives every type
            if qtype == "F32":
                assert np.array_equal(got, w)
            assert counted.get(t.name, 0) == int(((w != 0) & (got == 0)).sum())


def test_bad_input_gets_one_line_and_writes_nothing(tmp_path):
    from sparse_runtime.models.tiny import tiny_model

    m = tiny_model("llama", hidden_size=48, intermediate_size=96)  # rows of 48: not whole blocks of 32
    src = sr.save_checkpoint(m, sr.models.ByteTokenizer(), tmp_path / "w48",
                             sr.build_manifest(m, sr.load_model("tiny-llama").family, base_model="tiny-48"))
    with pytest.raises(ConfigError, match="blocks of 32.*qtype F16 or F32"):
        export(src, "gguf", tmp_path / "out", qtype="Q8_0")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="not one of"):
        export("tiny-llama", "gguf", tmp_path / "out", qtype="Q5_K")
    with pytest.raises(ConfigError, match="vocab"):
        export("tiny-llama", "gguf", tmp_path / "out", vocab="spm")
    assert not (tmp_path / "out").exists()


@needs_llama
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_cpp_reproduces_pytorch_from_the_file(family, tmp_path):
    res = export(f"tiny-{family}", "gguf", tmp_path / "g", qtype="F32")
    checks = res.verification["logits"]
    assert [c["name"] for c in checks] == ["prefill", "decode_step"]
    assert all(c["relative_l2"] <= 1e-3 for c in checks)


@needs_llama
def test_a_scaled_rope_is_written_as_rope_freqs(tmp_path):
    from sparse_runtime.models.tiny import tiny_model

    m = tiny_model("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    src = sr.save_checkpoint(m, sr.models.ByteTokenizer(), tmp_path / "l3",
                             sr.build_manifest(m, sr.load_model("tiny-llama").family, base_model="tiny-llama3"))
    res = export(src, "gguf", tmp_path / "g", qtype="F32")
    assert res.contents["rope_freqs"] is True
    assert all(c["relative_l2"] <= 1e-3 for c in res.verification["logits"])


@needs_llama
def test_llamacpp_engine_decodes_like_pytorch(tmp_path):
    from test_ort_quant import structured_tiny

    from sparse_runtime.runtime import Scenario, load_engine

    src = structured_tiny(tmp_path / "structured")
    ids = np.array([[5, 17, 42, 99, 7, 3]], dtype=np.int64)
    ref = load_engine("torch-cpu", str(src))
    want = list(ref.generate(ids, 12))
    ref_logits = ref.prefill(ids)
    for qtype in ("F32", "Q8_0"):
        eng = load_engine("llamacpp", str(src), threads=2, qtype=qtype, kv_dtype="float32")
        try:
            assert list(eng.generate(ids, 12)) == want  # margins are half the logit range: no near-ties
            full = eng.prefill(ids)
            assert full.shape == ref_logits.shape
            np.testing.assert_allclose(eng.prefill_next(ids)[0, -1], full[0, -1], rtol=0, atol=1e-4)
            rel = np.linalg.norm(full - ref_logits) / np.linalg.norm(ref_logits)
            assert rel < (1e-3 if qtype == "F32" else 0.05)
            step = eng.decode(np.array([[11]]))
            again = eng.prefill(np.concatenate([ids, [[11]]], 1))[:, -1:]
            np.testing.assert_allclose(step, again, rtol=0, atol=1e-3 * float(np.abs(again).max()))
            f = eng.timer(Scenario("decode", 8, 1, 3))
            assert f() > 0 and f() > 0  # the timer restores the cache between rounds
            assert eng.evidence()["sparse_path"].startswith("none")
            from sparse_runtime.serve.slots import make_slots

            assert make_slots(eng, 4, 256).n == 1  # its state cannot be swapped: served one sequence at a time
            with pytest.raises(ConfigError, match="batch 1"):
                eng.prefill(np.zeros((2, 4), dtype=np.int64))
        finally:
            eng.close()


@needs_llama
def test_a_bpe_vocabulary_tokenizes_as_hugging_face(tmp_path):
    """SmolLM2's byte-level BPE tokenizer on a tiny model of its vocabulary size: written as llama.cpp's
    gpt2 vocabulary with the pre-tokenizer it knows, and llama.cpp tokenizes the fixed text as Hugging
    Face does (the export checks it); a pre-tokenizer llama.cpp does not know fails the export, in one
    line that names the option, and writes nothing."""
    from transformers import AutoTokenizer

    from exporters.verify import ExportVerificationError
    from sparse_runtime.models.loading import ensure_smollm2
    from sparse_runtime.models.tiny import tiny_model

    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    m = tiny_model("llama", vocab_size=49152)
    src = sr.save_checkpoint(m, tok, tmp_path / "bpe", sr.build_manifest(m, sr.load_model("tiny-llama").family,
                                                                          base_model="tiny-bpe"))
    res = export(src, "gguf", tmp_path / "g", qtype="Q8_0")
    assert res.contents["vocab"] == "gpt2 BPE, 49152 tokens" and res.contents["pre_tokenizer"] == "smollm"
    assert res.verification["tokenizer"]["same_as_hugging_face"] is True
    with pytest.raises(ExportVerificationError, match="pre_tokenizer 'no-such-pre'"):
        export(src, "gguf", tmp_path / "bad", qtype="Q8_0", pre_tokenizer="no-such-pre")
    assert not (tmp_path / "bad").exists()


def test_a_bf16_source_exports_with_half_the_memory(ckpt, tmp_path):
    """``load_dtype="bfloat16"``: the source held in bf16; the file holds its values (F32 exactly the
    bf16 values, zeros intact)."""
    res = export(ckpt, "gguf", tmp_path / "g", qtype="F32", load_dtype="bfloat16")
    reader = gguf.GGUFReader(str(tmp_path / "g" / GGUF_NAME))
    t = {x.name: x for x in reader.tensors}["blk.0.ffn_down.weight"]
    w = sr.load_model(str(ckpt)).model.model.layers[0].mlp.down_proj.weight.detach()
    got = decode_tensor(t.data, t.tensor_type, tuple(w.shape))
    assert np.array_equal(got, w.to(torch.bfloat16).float().numpy())
    if HAS_LLAMA:  # bf16 compute on the reference side: the loose gate
        assert all(c["tolerance"] == 0.75 for c in res.verification["logits"])


@needs_llama
def test_qwen3_with_its_qk_norms_and_a_wider_head(tmp_path):
    """Qwen3: q/k RMS norms per head and head_dim 32 != hidden / heads (llama.cpp's key/value length)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from sparse_runtime.models import ByteTokenizer, family_of

    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms that are not all ones, so a missing or misplaced one shows
        for layer in m.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    src = sr.save_checkpoint(m, ByteTokenizer(), tmp_path / "q3", sr.build_manifest(m, family_of(m), base_model="q3"))
    res = export(src, "gguf", tmp_path / "g", qtype="F32")
    assert res.contents["architecture"] == "qwen3" and res.contents["rope_rows_reordered"] is False
    assert all(c["relative_l2"] <= 1e-3 for c in res.verification["logits"])


def test_a_tokenizer_larger_than_the_embedding_gets_one_line(tmp_path):
    from transformers import AutoTokenizer

    from sparse_runtime.models.loading import ensure_smollm2
    from sparse_runtime.models.tiny import tiny_model

    m = tiny_model("llama")  # 256 embedding rows, a 49,152-token tokenizer
    src = sr.save_checkpoint(m, AutoTokenizer.from_pretrained(ensure_smollm2()), tmp_path / "big-tok",
                             sr.build_manifest(m, sr.load_model("tiny-llama").family, base_model="tiny"))
    with pytest.raises(ConfigError, match="49152 token ids.*256 rows.*vocab=none"):
        export(src, "gguf", tmp_path / "g", qtype="F32")
    assert not (tmp_path / "g").exists()
    assert export(src, "gguf", tmp_path / "g", qtype="F32", vocab="none").contents["vocab"] == "none (token ids only)"
