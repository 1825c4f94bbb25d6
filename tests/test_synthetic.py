"""Synthetic models of real shapes (sparse_runtime/models/synthetic.py): the directories load in
transformers and in ``load_model``, are sharded with the standard index, keep their dtype, and are
reproducible; the shapes have the published parameter counts. No 7B is written here."""
from __future__ import annotations

import json

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.cli import main
from sparse_runtime.units import parse_bytes
from sparse_runtime.models.synthetic import (SHAPES, copy_tokenizer, plan_shards, synthetic_config,
                                             tensor_plan, write_synthetic)


@pytest.mark.parametrize("shape,params", [("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320),
                                          ("llama-3-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400),
                                          ("mistral-7b", 7_241_732_096), ("qwen2-7b", 7_615_616_512),
                                          ("smollm2-135m", 134_515_008)])
def test_shapes_have_the_published_parameter_counts(shape, params):
    specs = tensor_plan(synthetic_config(shape))  # on the meta device: no memory
    assert sum(s.numel for s in specs) == params


def test_shape_details():
    l3 = {s.name: s.shape for s in tensor_plan(synthetic_config("llama-3-8b", layers=1))}
    assert l3["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)  # 8 KV heads of 128
    assert l3["model.embed_tokens.weight"] == (128256, 4096)
    tied = {s.name for s in tensor_plan(synthetic_config("llama-3.2-1b", layers=1))}
    assert "lm_head.weight" not in tied  # tied embeddings are stored once
    qwen = {s.name for s in tensor_plan(synthetic_config("qwen2-7b", layers=1))}
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= qwen
    assert synthetic_config("llama-2-7b", layers=4).num_hidden_layers == 4


def test_shards_respect_the_limit():
    specs = tensor_plan(synthetic_config("tiny-llama"))
    shards = plan_shards(specs, 4, 40_000)
    assert len(shards) > 2 and [s for g in shards for s in g] == specs
    assert all(sum(s.numel * 4 for s in g) <= 40_000 or len(g) == 1 for g in shards)
    assert parse_bytes("5GB") == 5 * 10**9 and parse_bytes("2GiB") == 2 * 2**30 and parse_bytes(1000) == 1000
    with pytest.raises(sr.ConfigError, match="5GB"):
        parse_bytes("lots")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_tiny_sharded_directory_loads_everywhere(tmp_path, family):
    from transformers import AutoModelForCausalLM

    out = write_synthetic(f"tiny-{family}", tmp_path / "m", dtype="bfloat16", max_shard_bytes=30_000, seed=3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype="auto")
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16  # stored dtype kept
    lm = sr.load_model(out)
    assert isinstance(lm.tokenizer, sr.models.ByteTokenizer)  # vocab 256: no tokenizer files
    ids = lm.tokenizer("hello", return_tensors="pt")["input_ids"]
    assert torch.isfinite(lm.model(ids).logits).all()
    q = lm.model.model.layers[0].self_attn.q_proj
    assert 0.015 < float(q.weight.detach().std()) < 0.025 and torch.equal(lm.model.model.norm.weight, torch.ones(64))
    if family == "qwen2":
        assert float(q.bias.detach().abs().sum()) > 0  # real biases, not zeros
    # reproducible: the same seed gives the same tensors, whatever the sharding
    again = sr.load_model(write_synthetic(f"tiny-{family}", tmp_path / "n", dtype="bfloat16", seed=3))
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), again.model.state_dict().values()))


def test_real_shape_slice_loads_in_transformers_and_load_model(tmp_path):
    """A 2-block slice of SmolLM2-135M's shape (tied embeddings), fp32, one shard."""
    from transformers import AutoModelForCausalLM

    out = write_synthetic("smollm2-135m", tmp_path / "s", dtype="float32", layers=2, tokenizer=None)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 49152
    lm = sr.load_model(out)
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    assert lm.model(torch.tensor([[1, 2, 3, 49151]])).logits.shape == (1, 4, 49152)
    info = json.loads((out / "synthetic_model.json").read_text())
    assert info["synthetic"] and "quality cannot be measured" in info["values"]


def test_tokenizer_is_cut_to_a_smaller_vocabulary(tmp_path):
    """LLaMA-2 shapes have 32,000 ids, the embedded tokenizer 49,152: no produced id may reach past."""
    from transformers import AutoTokenizer

    from sparse_runtime.models.loading import _smollm2_ready, cache_dir

    src = cache_dir() / "models" / "smollm2-135m"
    if not _smollm2_ready(src):
        pytest.skip("the embedded SmolLM2 has not been converted into $SPARSE_RUNTIME_CACHE yet")
    copy_tokenizer(src, tmp_path, 32000)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    full = AutoTokenizer.from_pretrained(src)
    text = "Pneumonoultramicroscopicsilicovolcanoconiosis, naïve café 東京 🙂 " * 3 + " ".join(
        sorted(full.get_vocab())[-3000:])
    assert max(full(text)["input_ids"]) >= 32000  # the uncut tokenizer would overflow the embedding
    ids = tok(text)["input_ids"]
    assert max(ids) < 32000 and tok.decode(ids).startswith("Pneumonoultramicroscopicsilicovolcanoconiosis")


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", "--shape", "tiny-qwen2", "--dtype", "float32", "--out", str(tmp_path / "q")]) == 0
    assert "random weights" in capsys.readouterr().out
    assert sr.load_model(tmp_path / "q").model.dtype == torch.float32
    assert main(["synth", "--shape", "tiny-qwen2", "--out", str(tmp_path / "q")]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", "--shape", "llama-9b", "--out", str(tmp_path / "x")]) == 2
    assert "llama-2-7b" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert set(SHAPES) >= {"llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-3.2-1b", "mistral-7b", "qwen2-7b"}
