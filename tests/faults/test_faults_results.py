"""The "silent wrong results" and "also" cases of issue 19 that finish with exit 0: driven through
the command line, they must now give the right result or refuse (docs/reliability.md)."""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from .harness import diff, run_inprocess, snapshot

RECIPE = """name: r
model: tiny-llama
protocol: test
data_dir: {data}
steps:
  - stage: prune
    method: magnitude
    sparsity: {s}
  - stage: evaluate
"""


def _recipe(world, tmp_path, s):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(data=world.DATA, s=s))
    return ["run", p, "--workdir", tmp_path / "w"]


def _sparsity(tmp_path):
    """Measured sparsity of the recipe's pruned model (all its layers are pruned alike)."""
    man = json.loads(next((tmp_path / "w").rglob("sparsity_manifest.json")).read_text())
    return next(iter(man["layers"].values()))["measured"]


def test_recipe_rerun_after_a_settings_change_reruns_the_step(world, tmp_path, capsys):
    assert run_inprocess(_recipe(world, tmp_path, 0.5), capsys).rc == 0
    assert _sparsity(tmp_path) == pytest.approx(0.5, abs=0.02)
    res = run_inprocess(_recipe(world, tmp_path, 0.75), capsys)
    assert res.rc == 0 and "skipped" not in res.out
    assert _sparsity(tmp_path) == pytest.approx(0.75, abs=0.02)


def test_recipe_rerun_after_an_output_was_deleted_rebuilds_it(world, tmp_path, capsys):
    assert run_inprocess(_recipe(world, tmp_path, 0.5), capsys).rc == 0
    model = next((tmp_path / "w").rglob("sparsity_manifest.json")).parent
    shutil.rmtree(model)
    res = run_inprocess(_recipe(world, tmp_path, 0.5), capsys)
    assert res.rc == 0, res.err
    assert (model / "sparsity_manifest.json").is_file()


def test_bitmask_export_is_refused_by_a_plain_transformers_client(world, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert run_inprocess(["export", world.P, "--format", "bitmask", "--out", tmp_path / "bm"], capsys).rc == 0
    with pytest.raises(Exception):  # loudly, not a model with randomly initialised layers
        AutoModelForCausalLM.from_pretrained(tmp_path / "bm")


def test_bench_without_out_writes_nothing(world, tmp_path, capsys, monkeypatch):
    """Its default once replaced benchmarks/results/ in the working directory without a word."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "latency.md").write_text("an earlier measurement")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    res = run_inprocess(["bench", "tiny-llama", world.P, "--engines", "torch-cpu", "--scenarios", "decode:1@2",
                         "--repeats", "5"], capsys)
    assert res.rc == 0, res.err
    assert not diff(before, snapshot(tmp_path))


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_honour_the_umask(mask, world, tmp_path, capsys):
    old = os.umask(mask)
    try:
        res = run_inprocess(["export", world.P, "--format", "onnx", "--out", tmp_path / "e"], capsys)
    finally:
        os.umask(old)
    assert res.rc == 0, res.err
    assert stat.S_IMODE(os.stat(tmp_path / "e").st_mode) == 0o777 & ~mask
    for f in (tmp_path / "e").iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~mask, f
