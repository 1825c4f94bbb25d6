"""Streaming (docs/scale.md#streaming): a model read and written block by block gives exactly the
in-memory result, never holds more than one block, keeps its storage dtype, refuses early what
cannot fit, and leaves nothing half-written when killed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparse_runtime as sr
from sparse_runtime.errors import ConfigError, ManifestError
from sparse_runtime.models import streaming
from sparse_runtime.models.streaming import CheckpointReader, ShardWriter, StreamedModel
from sparse_runtime.prune import PruneConfig, prune_checkpoint


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _save(tmp: Path, family: str = "llama", dtype=torch.float32, shard: str | None = None, **overrides) -> Path:
    from sparse_runtime.models.tiny import tiny_model

    m = tiny_model(family, **overrides).to(dtype)
    d = tmp / f"dense-{family}-{str(dtype)[6:]}"
    kw = {"max_shard_size": shard} if shard else {}
    m.save_pretrained(d, safe_serialization=True, **kw)
    return d


def _same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype, k
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = sr.read_manifest(a), sr.read_manifest(b)
    assert {k: v.mask_sha256 for k, v in ma.layers.items()} == {k: v.mask_sha256 for k, v in mb.layers.items()}


@pytest.mark.parametrize("family,case", [
    ("llama", dict(method="wanda", sparsity=0.5)),
    ("llama", dict(method="sparsegpt", sparsity=0.6)),
    ("llama", dict(method="magnitude", structure="2:4")),
    ("llama", dict(method="wanda", sparsity=0.6, allocation="owl")),
    ("llama", dict(method="wanda", sparsity=0.5, refine="dsnot")),
    ("mistral", dict(method="wanda", sparsity=0.6, allocation="atp")),
    ("qwen2", dict(method="sparsegpt", structure="2:4")),
])
def test_streamed_prune_equals_in_memory(tmp_path, family, case):
    src = _save(tmp_path, family)
    res = {}
    for mode in ("off", "on"):
        res[mode] = prune_checkpoint(str(src), PruneConfig(protocol="test", **case), tmp_path / mode, stream=mode,
                                     plot=False)
    _same(tmp_path / "off", tmp_path / "on")
    assert res["on"].sparsity_measured == res["off"].sparsity_measured
    assert res["on"].allocation_info.get("beta") == res["off"].allocation_info.get("beta")
    step = sr.read_manifest(tmp_path / "on").history[-1]
    assert step["streamed"] and step["max_live_blocks"] == 1
    lm = sr.load_model(tmp_path / "on")  # transformers reads the result; the manifest verifies
    assert lm.manifest is not None


def test_tied_sharded_bf16_in_bf16_out(tmp_path, monkeypatch):
    """Sharded input (an index) -> sharded output with the standard index; a bf16 model computed in
    fp32 is written in bf16 (and says so); tied embeddings stay tied; equal to the in-memory path."""
    src = _save(tmp_path, "llama", torch.bfloat16, shard="60KB", tie_word_embeddings=True)
    assert (src / streaming.INDEX_NAME).is_file()
    monkeypatch.setattr(streaming, "DEFAULT_SHARD_BYTES", 50_000)
    monkeypatch.setattr(ShardWriter.__init__, "__defaults__", (50_000, None, "model"))
    for mode in ("off", "on"):
        prune_checkpoint(str(src), PruneConfig(protocol="test", method="wanda", sparsity=0.5), tmp_path / mode,
                         stream=mode, plot=False)
    out = tmp_path / "on"
    index = json.loads((out / streaming.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((out / f).is_file() for f in set(index["weight_map"].values()))
    _same(tmp_path / "off", out)
    w = _weights(out)
    assert {v.dtype for v in w.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in w  # tied: stored once, as the input had it
    step = sr.read_manifest(out).history[-1]
    assert step["storage_dtype"] == "bfloat16" and step["compute_dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_never_more_than_one_block(tmp_path, monkeypatch):
    """A counter around the loader: at no time are two blocks materialised."""
    src = _save(tmp_path, "llama", num_hidden_layers=4)
    live, peak = [0], [0]
    real_load, real_release = StreamedModel.load_block, StreamedModel.release_block

    def load(self, i):
        was_meta = next(self.blocks[i].parameters()).device.type == "meta"
        b = real_load(self, i)
        if was_meta:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        materialised = sum(next(x.parameters()).device.type != "meta" for x in self.blocks)
        assert materialised <= 1, f"{materialised} blocks in memory"
        return b

    def release(self, i):
        if next(self.blocks[i].parameters()).device.type != "meta":
            live[0] -= 1
        real_release(self, i)

    monkeypatch.setattr(StreamedModel, "load_block", load)
    monkeypatch.setattr(StreamedModel, "release_block", release)
    prune_checkpoint(str(src), PruneConfig(protocol="test", method="wanda", sparsity=0.6, allocation="atp"),
                     tmp_path / "o", stream="on", plot=False)
    assert peak[0] == 1 and live[0] == 0


def test_streamed_perplexity_equals_full_forward(tmp_path):
    from sparse_runtime.eval.perplexity import perplexity_from_ids, streamed_perplexity

    src = _save(tmp_path, "qwen2")
    ids = torch.randint(0, 200, (5 * 32,), generator=torch.Generator().manual_seed(0))
    full = perplexity_from_ids(sr.load_model(src).model, ids, 32)
    sm = StreamedModel(src)
    got = streamed_perplexity(sm, ids, 32, group_bytes=2 * 32 * sm.config.hidden_size * 4)  # 3 groups
    assert got.windows == full.windows == 5
    assert got.ppl == pytest.approx(full.ppl, rel=1e-6)
    assert sm.live_blocks == 0 and sm.max_live_blocks == 1


def test_reader_headers_only_and_missing_tensor(tmp_path):
    src = _save(tmp_path, "llama")
    r = CheckpointReader(src)
    full = _weights(src)
    assert r.shapes == {k: tuple(v.shape) for k, v in full.items()}
    assert all(torch.equal(r.get(k), v) for k, v in full.items())
    assert r.storage_dtype() == torch.float32
    with pytest.raises(sr.errors.ModelLoadError, match="lacks the weight tensor"):
        r.get("model.layers.9.nothing.weight")


def test_memory_estimate_refuses_with_the_fix(tmp_path, monkeypatch):
    src = _save(tmp_path, "llama")
    monkeypatch.setattr(streaming, "available_memory", lambda: (10 << 20, "cgroup limit 0.0 GiB"))
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"--nsamples.*--dtype bfloat16"):
        prune_checkpoint(str(src), PruneConfig(protocol="test", method="sparsegpt", sparsity=0.5), out, stream="on")
    assert not out.exists()


def test_stream_on_needs_a_directory():
    with pytest.raises(ConfigError, match="drop --stream on"):
        streaming.stream_path("tiny-llama", mode="on")


def test_tampered_sparse_input_is_refused_when_streamed(tmp_path):
    from helpers import save_tiny_pruned
    from safetensors.torch import save_file

    src = save_tiny_pruned(tmp_path / "p", "llama")
    w = load_file(str(src / "model.safetensors"))
    w["model.layers.1.mlp.up_proj.weight"][0, :] = 1.0
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ManifestError, match="up_proj"):
        prune_checkpoint(str(src), PruneConfig(protocol="test", method="wanda", sparsity=0.6), tmp_path / "o",
                         stream="on", plot=False)
    assert not (tmp_path / "o").exists()


def test_kill_during_streamed_write_leaves_nothing(tmp_path):
    """SIGKILL right after the first shard: no output, no temporaries after a rerun, and the rerun
    equals an uninterrupted run."""
    src = _save(tmp_path, "llama", num_hidden_layers=4)
    out = tmp_path / "o"
    code = ("import sys; from sparse_runtime.models import streaming as s; s.DEFAULT_SHARD_BYTES = 40000; "
            "s.ShardWriter.__init__.__defaults__ = (40000, None, \"model\"); "
            "from sparse_runtime.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = [sys.executable, "-c", code, "prune", str(src), "--sparsity", "0.5", "--protocol", "test", "--stream",
            "on", "--out", str(out)]
    import os

    env = dict(os.environ, SPARSE_RUNTIME_FAULT="shard")
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not out.exists()
    env.pop("SPARSE_RUNTIME_FAULT")
    assert subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    assert not [q for q in tmp_path.rglob(".*") if ".tmp-" in q.name]
    ref = tmp_path / "ref"
    prune_checkpoint(str(src), PruneConfig(protocol="test", method="wanda", sparsity=0.5), ref, stream="off")
    _same(ref, out)


def test_streamed_bitmask_export_equals_in_memory(tmp_path, monkeypatch):
    """The bitmask export of a model read tensor by tensor: sharded, verified per layer, and it
    decompresses to exactly the weights the in-memory export gives."""
    from helpers import save_tiny_pruned

    from exporters import export
    from exporters.bitmask import load_bitmask

    src = save_tiny_pruned(tmp_path / "p", "qwen2", sparsity=0.7)
    export(str(src), "bitmask", tmp_path / "mem", stream="off")
    monkeypatch.setattr(ShardWriter.__init__, "__defaults__", (40_000, None, "model"))
    r = export(str(src), "bitmask", tmp_path / "st", stream="on")
    assert r.verification["ok"] and r.contents["streamed"]
    assert (tmp_path / "st" / "model.bitmask.safetensors.index.json").is_file()
    a, b = load_bitmask(tmp_path / "mem"), load_bitmask(tmp_path / "st")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert r.manifest["source"]["masks_sha256"] == json.loads(
        (tmp_path / "mem" / "export_manifest.json").read_text())["source"]["masks_sha256"]


def test_streamed_export_of_a_format_that_needs_memory_says_so(tmp_path):
    from helpers import save_tiny_pruned

    from exporters import export

    src = save_tiny_pruned(tmp_path / "p", "llama")
    with pytest.raises(ConfigError, match="export it as bitmask"):
        export(str(src), "onnx", tmp_path / "o", stream="on")
