"""DeepSparse export: static graphs verified with ONNX Runtime always, with DeepSparse when its own
env is installed (``sparse-runtime engines install deepsparse``); otherwise those tests skip."""
import json

import onnx
import pytest

from exporters import export
from wanda_reference import make_checkpoint
from sparse_runtime.errors import ConfigError
from sparse_runtime.runtime import deepsparse_env

needs_ds = pytest.mark.skipif(not deepsparse_env.is_installed(),
                              reason="DeepSparse env not installed (sparse-runtime engines install deepsparse)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "llama-50", "llama", 0.5)


@pytest.mark.parametrize("fam", ["llama", "mistral", "qwen2"])
def test_static_graphs_match_pytorch(fam, tmp_path):
    res = export(f"tiny-{fam}", "deepsparse", tmp_path / "ds", prefill_length=32, cache_length=48,
                 check_engine=False)
    v = res.verification
    assert [c["name"] for c in v["logits"]] == ["prefill", "decode_step"]
    assert all(c["max_abs_diff"] < 1e-4 for c in v["logits"])
    for name, n_in in (("prefill.onnx", 3), ("decode.onnx", 3 + 4)):
        m = onnx.load(str(tmp_path / "ds" / name))
        assert m.ir_version == 8
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) <= 19
        assert len(m.graph.input) == n_in
        for i in m.graph.input:  # static shapes everywhere
            assert all(d.HasField("dim_value") for d in i.type.tensor_type.shape.dim), i.name
        # the RoPE MatMul that DeepSparse 1.8 cannot compile is replaced by table lookups
        assert "Cos" not in {n.op_type for n in m.graph.node}
    layout = json.loads((tmp_path / "ds" / "deepsparse_layout.json").read_text())
    assert layout["cache_length"] == 48 and layout["prefill_length"] == 32


def test_last_position_prefill_graph(tmp_path):
    """prefill_logits=last: the prefill graph returns [B, 1, V], equal to PyTorch's last position (the
    graph DeepSparse's prefill timer runs, so it does the work our engines' prefill does)."""
    res = export("tiny-llama", "deepsparse", tmp_path / "ds", prefill_length=16, cache_length=32,
                 prefill_logits="last", check_engine=False)
    assert all(c["max_abs_diff"] < 1e-4 for c in res.verification["logits"])
    m = onnx.load(str(tmp_path / "ds" / "prefill.onnx"))
    dims = [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    assert dims[:2] == [1, 1]
    assert json.loads((tmp_path / "ds" / "deepsparse_layout.json").read_text())["prefill_logits"] == "last"
    with pytest.raises(ConfigError, match="prefill_logits"):
        export("tiny-llama", "deepsparse", tmp_path / "x", prefill_logits="first")


def test_report_says_not_checked_without_engine(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(deepsparse_env, "is_installed", lambda: False)
    res = export(ckpt, "deepsparse", tmp_path / "ds", prefill_length=16, cache_length=32, decode=False)
    ds = res.verification["deepsparse"]
    assert ds["checked"] is False and "engines install deepsparse" in ds["reason"]
    assert res.contents["graphs"] == ["prefill.onnx"]
    with pytest.raises(deepsparse_env.EngineNotInstalledError, match="sparse-runtime engines install deepsparse"):
        deepsparse_env.run_worker({"action": "info"})


def test_options_validated():
    with pytest.raises(ConfigError, match="opset"):
        export("tiny-llama", "deepsparse", "/nonexistent/x", opset=20)
    with pytest.raises(ConfigError, match="prefill_length < cache_length"):
        export("tiny-llama", "deepsparse", "/nonexistent/x", prefill_length=64, cache_length=64)


@needs_ds
def test_deepsparse_engine_runs_optimised_and_matches(ckpt, tmp_path):
    res = export(ckpt, "deepsparse", tmp_path / "ds", prefill_length=32, cache_length=64)
    ds = res.verification["deepsparse"]
    assert ds["checked"] and ds["fraction_of_supported_ops"] > 0.9
    assert ds["parity_ok"] and all(c["ok"] for c in ds["logits"]) and len(ds["logits"]) == 2
    assert "evaluation" in ds["licence"]
    # the engine was given copies: our files are untouched (DeepSparse rewrites what it compiles)
    assert onnx.load(str(tmp_path / "ds" / "prefill.onnx")).ir_version == 8
