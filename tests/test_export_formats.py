"""Round trip of every export format on tiny models of each family, verified against PyTorch."""
import hashlib
import json

import pytest
import torch

from exporters import EXPORT_MANIFEST_NAME, export, formats, read_export_manifest
from exporters.bitmask import load_bitmask
from exporters.semi_structured import Not24Error, load_semi_structured
from wanda_reference import make_checkpoint
from exporters.verify import ExportVerificationError
from sparse_runtime.errors import CheckpointExistsError, ConfigError
from sparse_runtime.models import load_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fam in ("llama", "mistral", "qwen2"):
        out[(fam, "50")] = make_checkpoint(root / f"{fam}-50", fam, 0.5)
        out[(fam, "2:4")] = make_checkpoint(root / f"{fam}-24", fam, structure="2:4")
    out[("llama", "80")] = make_checkpoint(root / "llama-80", "llama", 0.8)
    return out


def test_registry_lists_the_formats():
    assert formats() == ["bitmask", "deepsparse", "gguf", "onnx", "onnx-int4", "onnx-int8", "semi-structured"]
    with pytest.raises(ConfigError, match="choose one of"):
        export("tiny-llama", "tflite", "/nonexistent/x")


def _manifest_checks(out, ckpt, fmt):
    man = read_export_manifest(out)
    assert man["export_format"] == fmt and man["verification"]["ok"] is True
    digest = hashlib.sha256((ckpt / "sparsity_manifest.json").read_bytes()).hexdigest()
    assert man["source"]["sparsity_manifest_sha256"] == digest
    assert man["versions"]["torch"] and man["total_bytes"] == sum(man["files"].values())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]  # temp dir gone
    return man


@pytest.mark.parametrize("fam", ["llama", "mistral", "qwen2"])
def test_bitmask_round_trip(fam, ckpts, tmp_path):
    ck = ckpts[(fam, "50")]
    res = export(ck, "bitmask", tmp_path / "bm")
    man = _manifest_checks(tmp_path / "bm", ck, "bitmask")
    assert res.verification["weights_bitwise_equal"] is True
    assert res.verification["logits"][0]["max_abs_diff"] < 1e-5  # weights are bitwise equal; kernels may differ
    assert res.contents["compressed_layers"] == 14 and res.contents["size_ratio"] < 0.8
    src = load_model(ck).model
    back = load_bitmask(tmp_path / "bm")
    for (n, a), (_, b) in zip(src.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n
    assert "quantization_config" not in json.loads((tmp_path / "bm" / "config.json").read_text())
    assert man["contents"]["bytes_on_disk"] < man["contents"]["dense_bytes"]


def test_bitmask_fp16_and_legacy_config(ckpts, tmp_path):
    res = export(ckpts[("llama", "80")], "bitmask", tmp_path / "bm", dtype="fp16", write_sparsity_config=True)
    assert res.contents["size_ratio"] < 0.7  # embeddings and head stay dense
    cfg = json.loads((tmp_path / "bm" / "config.json").read_text())
    assert cfg["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    assert load_bitmask(tmp_path / "bm").dtype == torch.float16


@pytest.mark.parametrize("fam", ["llama", "mistral", "qwen2"])
def test_semi_structured_round_trip(fam, ckpts, tmp_path):
    ck = ckpts[(fam, "2:4")]
    res = export(ck, "semi-structured", tmp_path / "ss")
    _manifest_checks(tmp_path / "ss", ck, "semi-structured")
    assert res.contents["packed_layers"] == 14 and res.verification["weights_bitwise_equal"]
    model, info = load_semi_structured(tmp_path / "ss")
    assert info["backend"] == "dense" and info["semi_structured_tensors"] == 0
    src = load_model(ck).model
    for (n, a), (_, b) in zip(src.named_parameters(), model.named_parameters()):
        assert torch.equal(a.to(torch.float16), b), n


def test_semi_structured_refuses_unstructured_and_writes_nothing(ckpts, tmp_path):
    with pytest.raises(Not24Error, match="is not 2:4"):
        export(ckpts[("llama", "50")], "semi-structured", tmp_path / "ss")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fam", ["llama", "mistral", "qwen2"])
def test_onnx_round_trip_with_kv_cache(fam, ckpts, tmp_path):
    ck = ckpts[(fam, "50")]
    res = export(ck, "onnx", tmp_path / "onnx")
    _manifest_checks(tmp_path / "onnx", ck, "onnx")
    names = [c["name"] for c in res.verification["logits"]]
    assert names == ["prefill", "decode_step"]
    for c in res.verification["logits"]:
        assert c["max_abs_diff"] < 1e-4 and c["argmax_agreement"] == 1.0
    assert res.verification["masks"]["matched"] == 14 and res.verification["batch"] == 2
    assert "past_key_values.0.key" in res.contents["inputs"]


def test_onnx_fp16_optimised_external_data(ckpts, tmp_path):
    res = export(ckpts[("llama", "50")], "onnx", tmp_path / "o", dtype="float16", optimize="extended",
                 external_data="always")
    assert res.contents["external_data"] and (tmp_path / "o" / "model.onnx_data").is_file()
    assert res.verification["ok"] and res.contents["graph_optimization"] == "extended"


def test_onnx_sparse_initializers_shrink_file(ckpts, tmp_path):
    dense = export(ckpts[("llama", "80")], "onnx", tmp_path / "d")
    sp = export(ckpts[("llama", "80")], "onnx", tmp_path / "s", sparse_initializers=True)
    assert sp.contents["sparse_initializers"] >= 14 and sp.verification["ok"]
    assert sp.files["model.onnx"] < 0.8 * dense.files["model.onnx"]
    assert any("densifies" in n for n in sp.manifest["notes"])


def test_onnx_rejects_bf16_and_bad_options():
    with pytest.raises(ConfigError, match="bfloat16"):
        export("tiny-llama", "onnx", "/nonexistent/x", dtype="bf16")
    with pytest.raises(ConfigError, match="unknown option"):
        export("tiny-llama", "onnx", "/nonexistent/x", cache_length=3)


def test_existing_out_refused_and_failed_verification_leaves_nothing(ckpts, tmp_path, monkeypatch):
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointExistsError):
        export("tiny-llama", "bitmask", tmp_path / "exists")
    from exporters.bitmask import BitmaskExporter

    def broken(self, src, out, opts, contents):
        return {"ok": False, "logits": [{"name": "prefill", "max_abs_diff": 1.0, "tolerance": 0.001, "ok": False}]}

    monkeypatch.setattr(BitmaskExporter, "verify", broken)
    with pytest.raises(ExportVerificationError, match="was not written"):
        export("tiny-llama", "bitmask", tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_plain_spec_source_has_no_checkpoint_digest(tmp_path):
    res = export("tiny-qwen2", "bitmask", tmp_path / "bm")
    src = res.manifest["source"]
    assert src["sparsity_manifest_sha256"] is None and len(src["masks_sha256"]) == 64
    assert (tmp_path / "bm" / EXPORT_MANIFEST_NAME).is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (SparseSemiStructuredTensor is CUDA-only)")
@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
def test_semi_structured_cuda_matches_dense(backend, tmp_path):
    from wanda_reference import prune_model
    from sparse_runtime.models import tiny_model, family_of
    from sparse_runtime.manifest import build_manifest, save_checkpoint

    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("PyTorch built without cuSPARSELt")
    m = tiny_model("llama", 0, hidden_size=256, intermediate_size=512)
    fam = family_of(m)
    prune_model(m, fam, structure="2:4")
    ck = save_checkpoint(m, None, tmp_path / "ck", build_manifest(m, fam))
    export(ck, "semi-structured", tmp_path / "ss")
    dense, _ = load_semi_structured(tmp_path / "ss", device="cuda", backend="dense")
    sparse, info = load_semi_structured(tmp_path / "ss", device="cuda", backend=backend)
    assert info["semi_structured_tensors"] == 14
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.no_grad():
        ref, got = dense(input_ids=ids).logits.float(), sparse(input_ids=ids).logits.float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_compressed_tensors_014_reads_bitmask_export(ckpts, tmp_path):
    """Only where compressed-tensors 0.14 (the last with sparse-bitmask) is importable, e.g.
    PYTHONPATH=/tmp/ct after `pip install --no-deps --target /tmp/ct compressed-tensors==0.14.0.1
    loguru pydantic pydantic-core annotated-types typing-inspection`."""
    ct = pytest.importorskip("compressed_tensors")
    if not ct.__version__.startswith("0.14"):
        pytest.skip(f"compressed-tensors {ct.__version__} has no sparse-bitmask compressor")
    from compressed_tensors.compressors import BitmaskCompressor, ModelCompressor
    from compressed_tensors.config import BitmaskConfig

    ck = ckpts[("llama", "50")]
    export(ck, "bitmask", tmp_path / "bm", write_sparsity_config=True)
    dec = dict(BitmaskCompressor(config=BitmaskConfig()).decompress(str(tmp_path / "bm" / "model.bitmask.safetensors")))
    ref = load_model(ck).model.state_dict()
    assert all(torch.equal(dec[k], ref[k]) for k in dec if k in ref) and set(ref) - set(dec) <= {"lm_head.weight"}
    assert type(ModelCompressor.from_pretrained(str(tmp_path / "bm")).sparsity_compressor).__name__ == "BitmaskCompressor"
