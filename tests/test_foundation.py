"""Foundation invariants: perplexity reference, manifest round trip and tamper detection, bad inputs."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparse_runtime as sr
from sparse_runtime.data import c4_windows, find_file
from sparse_runtime.eval.perplexity import perplexity_from_ids
from sparse_runtime.manifest import MANIFEST_NAME, atomic_directory
from sparse_runtime.models.tiny import ByteTokenizer
from sparse_runtime.sparsity import NMPattern, check_sparsity, nm_compliant, nm_prune_mask, topk_prune_mask


def _prune_rows(model, s=0.5):
    for _, lin in sr.family_of(model).iter_linears(model):
        keep = topk_prune_mask(lin.weight.abs(), s, per_row=True)
        lin.weight.data *= keep
    return model


def test_perplexity_matches_hand_computation():
    model = sr.tiny_model("llama")
    ids = torch.randint(0, 256, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    res = perplexity_from_ids(model, ids, seqlen=16)
    # reference: plain loop, log-softmax, mean NLL over every predicted token of each window
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 16:(w + 1) * 16]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            for t in range(15):
                total -= logp[t, x[t + 1]].item()
            count += 15
    assert res.windows == 3 and res.tokens == 48
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_too_short_text():
    with pytest.raises(sr.ConfigError, match="fewer than one window"):
        perplexity_from_ids(sr.tiny_model("llama"), torch.arange(10), seqlen=16)


def test_wikitext_quick_protocol_windows(data_dir):
    model = sr.tiny_model("llama")
    r = sr.wikitext2_perplexity(model, ByteTokenizer(), "test")
    assert r.windows == 4 and r.seqlen == 32 and r.protocol == "test" and r.ppl > 1


def test_c4_windows_seeded(data_dir):
    tok = ByteTokenizer()
    a, b = c4_windows(tok, 3, 64, seed=0), c4_windows(tok, 3, 64, seed=0)
    assert a.shape == (3, 64) and torch.equal(a, b)
    assert not torch.equal(a, c4_windows(tok, 3, 64, seed=1))


def test_missing_data_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_RUNTIME_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sr.DataNotFoundError, match=str(tmp_path)):
        find_file("wikitext-2/wiki.test.raw", what="WikiText-2", hub=lambda: 1 / 0)


def test_manifest_round_trip(tmp_path, family_name):
    lm = sr.load_model(f"tiny-{family_name}")
    _prune_rows(lm.model)
    man = sr.build_manifest(lm.model, targets={n: 0.5 for n, _ in lm.family.iter_linears(lm.model)},
                            base_model=lm.source, step={"stage": "test"})
    out = sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ckpt", man)
    back = sr.load_model(out)
    assert back.manifest is not None and back.manifest.total_measured == pytest.approx(0.5)
    assert back.manifest.total_target == pytest.approx(0.5)
    assert back.manifest.history == [{"stage": "test"}]
    for (n1, a), (n2, b) in zip(lm.family.iter_linears(lm.model), back.family.iter_linears(back.model)):
        assert n1 == n2 and torch.equal(a.weight, b.weight)


def test_manifest_tamper_detected(tmp_path):
    from safetensors.torch import load_file, save_file

    lm = sr.load_model("tiny-llama")
    _prune_rows(lm.model)
    out = sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ckpt", sr.build_manifest(lm.model))
    f = next(out.glob("*.safetensors"))
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("mlp.up_proj.weight"))
    sd[key][0, :] = 1.0  # densify one row: the mask no longer matches the manifest
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(sr.ManifestError, match="disagrees"):
        sr.load_model(out)


def test_manifest_nm_claim_checked(tmp_path):
    lm = sr.load_model("tiny-llama")
    _prune_rows(lm.model)  # 50 % per row, but not 2:4
    man = sr.build_manifest(lm.model, structures={n: "2:4" for n, _ in lm.family.iter_linears(lm.model)})
    with pytest.raises(sr.ManifestError, match="2:4"):
        sr.verify_manifest(lm.model, man)


def test_corrupt_and_foreign_manifest(tmp_path):
    lm = sr.load_model("tiny-llama")
    out = sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ckpt", sr.build_manifest(lm.model))
    (out / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(sr.ManifestError, match="not valid JSON"):
        sr.load_model(out)
    (out / MANIFEST_NAME).write_text(json.dumps({"format": "someone-else", "layers": {}}))
    with pytest.raises(sr.ManifestError, match="not a sparse-runtime"):
        sr.load_model(out)


def test_refuses_overwrite_and_writes_atomically(tmp_path):
    lm = sr.load_model("tiny-llama")
    man = sr.build_manifest(lm.model)
    out = sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ckpt", man)
    with pytest.raises(sr.CheckpointExistsError, match="--overwrite"):
        sr.save_checkpoint(lm.model, lm.tokenizer, out, man)
    sr.save_checkpoint(lm.model, lm.tokenizer, out, man, overwrite=True)
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "broken") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "broken").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_bad_model_inputs(tmp_path):
    with pytest.raises(sr.ModelLoadError, match="does not exist"):
        sr.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sr.ModelLoadError, match="no config.json"):
        sr.load_model(tmp_path / "empty")
    with pytest.raises(sr.ModelLoadError, match="unknown tiny model"):
        sr.load_model("tiny-gpt2")
    # a foreign architecture
    from transformers import GPT2Config, GPT2LMHeadModel

    g = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    g.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    with pytest.raises(sr.UnsupportedModelError, match="llama"):
        sr.load_model(tmp_path / "gpt2")
    # pickled weights are refused
    lm = sr.load_model("tiny-llama")
    lm.model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with pytest.raises(sr.ModelLoadError, match="pickle"):
        sr.load_model(tmp_path / "pickle")


def test_structures_and_sparsity_validation():
    assert NMPattern.parse("2:4").kept == 2 and NMPattern.parse("4:8").sparsity == 0.5
    for bad in ("4:4", "0:4", "x", "5:4"):
        with pytest.raises(sr.ConfigError):
            NMPattern.parse(bad)
    for bad in (-0.1, 1.0, "abc"):
        with pytest.raises(sr.ConfigError):
            check_sparsity(bad)
    with pytest.raises(sr.ConfigError, match="multiple of M"):
        NMPattern(2, 4).check_divides(6, "layer x")
    w = torch.randn(8, 16)
    keep = nm_prune_mask(w.abs(), NMPattern(2, 4))
    assert nm_compliant(w * keep, NMPattern(2, 4)) and not nm_compliant(w, NMPattern(2, 4))
    keep = topk_prune_mask(w.abs(), 0.25, per_row=False)
    assert int((~keep).sum()) == 32


def test_family_adapter_and_unknown_registry_name():
    with pytest.raises(sr.ConfigError, match="choose one of"):
        sr.FAMILIES.get("gpt-j")
    m = sr.tiny_model("qwen2")
    names = [n for n, _ in sr.family_of(m).iter_linears(m)]
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"


def test_driver_shares_statistics_of_linears_with_one_input():
    """q/k/v (and gate/up) read the same tensor: one statistics object, equal to a direct computation."""
    from sparse_runtime.calibration import sequential_pass

    lm = sr.load_model("tiny-llama")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    got = {}
    sequential_pass(lm.model, lm.family, ids, lambda t: got.__setitem__(t.name, t.stats), needs=("norm", "hessian"))
    q, k = got["model.layers.0.self_attn.q_proj"], got["model.layers.0.self_attn.k_proj"]
    assert q is k and q is not got["model.layers.0.self_attn.o_proj"]
    assert got["model.layers.1.mlp.gate_proj"] is got["model.layers.1.mlp.up_proj"]
    ref = sr.load_model("tiny-llama")
    seen = []
    h = ref.family.blocks(ref.model)[0].self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        ref.model(ids, use_cache=False)
    h.remove()
    x = torch.cat(seen).reshape(-1, 64).float()
    torch.testing.assert_close(k.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k.sq_sum, (x * x).sum(0) / 4, rtol=1e-4, atol=1e-5)
