"""The six top-level verbs (sparse_runtime/verbs.py) run end to end on tiny-llama under the ``test``
protocol: prune -> repair -> finetune -> merge -> export, and bench on the result. Each writes what
it says and returns its result object; the work itself is tested in each verb's own test file."""
from __future__ import annotations

import json

import pytest

import sparse_runtime as sr
from sparse_runtime.errors import ConfigError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("verbs")


@pytest.fixture(scope="module")
def pruned(root):
    res = sr.prune("tiny-llama", sr.PruneConfig(method="wanda", sparsity=0.5, protocol="test"), root / "pruned",
                   plot=False)
    assert isinstance(res, sr.PruneResult) and res.checkpoint == str(root / "pruned")
    return root / "pruned"


def test_prune_is_the_module_and_the_verb(pruned):
    import sparse_runtime.prune as module

    assert sr.prune is module and callable(sr.prune) and sr.prune.PruneConfig is sr.PruneConfig
    lm = sr.load_model(pruned)  # verifies the manifest against the weights
    assert lm.manifest.history[-1]["stage"] == "prune"
    assert abs(lm.manifest.total_measured - 0.5) < 0.01
    assert (pruned / "prune_report.json").is_file()


def test_repair(pruned, root):
    from sparse_runtime.repair.dsnot import DSnoTConfig

    rep = sr.repair(pruned, DSnoTConfig(threshold=0.0), root / "repaired", protocol="test")
    lm = sr.load_model(root / "repaired")
    assert [h["stage"] for h in lm.manifest.history] == ["prune", "repair"]
    assert rep.checkpoint == str(root / "repaired") and rep.summary["layers"] > 0
    assert set(rep.timing) == {"total_s", "dsnot_s", "pass_s", "calibration_forward_s", "dense_load_s"}


def test_finetune_then_merge(pruned, root):
    from sparse_runtime.training import TrainConfig, TrainResult

    res = sr.finetune(pruned, TrainConfig(method="masked-lora", data="c4", steps=1, batch_size=2, seq_len=32),
                      root / "adapter", adapter_options={"rank": 2})
    assert isinstance(res, TrainResult) and (root / "adapter").is_dir()
    rep = sr.merge(root / "adapter", {"protocol": "test"}, root / "merged")
    assert rep.checkpoint == str(root / "merged") and rep.max_abs_logit_diff < 1e-3
    merged = sr.load_model(root / "merged")
    assert merged.manifest.history[-1]["stage"] == "merge"
    assert merged.manifest.total_measured == pytest.approx(sr.load_model(pruned).manifest.total_measured)
    with pytest.raises(ConfigError, match="unknown merge option"):
        sr.merge(root / "adapter", {"repruning": "wanda"}, root / "never")
    assert not (root / "never").exists()


def test_export(pruned, root):
    res = sr.export(pruned, "bitmask", root / "bitmask")
    assert res.format == "bitmask" and res.verification.get("ok") is not False
    man = json.loads((root / "bitmask" / "export_manifest.json").read_text())
    assert man["export_format"] == "bitmask"
    with pytest.raises(ConfigError, match="format name"):
        sr.export(pruned, {"dtype": "float32"}, root / "never")


def test_bench(pruned, root):
    from sparse_runtime.manifest import build_manifest, save_checkpoint
    from sparse_runtime.measure.latency import LatencyConfig
    from sparse_runtime.models import ByteTokenizer, family_of, tiny_model

    m = tiny_model("llama", 0)
    save_checkpoint(m, ByteTokenizer(), root / "dense", build_manifest(m, family_of(m), base_model="tiny-llama"))
    cfg = LatencyConfig(engines=["torch-cpu"], scenarios=["prefill:1x8"], repeats=5, warmup=1, decode_steps=2)
    res = sr.bench(root / "dense", cfg, root / "bench", sparse=[pruned], name="verbs")
    assert {r["model"] for r in res.rows} == {"dense", "pruned"}
    assert (root / "bench" / "verbs.md").is_file() and (root / "bench" / "verbs.json").is_file()


def test_verbs_refuse_a_missing_or_existing_out(pruned, root):
    with pytest.raises(ConfigError, match="pass out="):
        sr.repair(pruned, None, None)
    with pytest.raises(sr.CheckpointExistsError):
        sr.prune("tiny-llama", sr.PruneConfig(method="magnitude", sparsity=0.5), pruned)
    with pytest.raises(ConfigError, match="is the input"):  # replacing the input would destroy it
        sr.prune(pruned, sr.PruneConfig(method="magnitude", sparsity=0.5), pruned, overwrite=True)
