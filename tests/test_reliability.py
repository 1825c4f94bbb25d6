"""Issue 19 (reliability): nothing lost, nothing silently wrong. One focused test per fix, on tiny
models (seconds each). The fault-injection suite (tests/test_faults*.py) drives the same cases
through the command line in bulk; these pin each fix where it lives."""
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.cli import main
from sparse_runtime.errors import ConfigError, ManifestError, ModelLoadError
from sparse_runtime.recipe import Recipe, run_recipe
from helpers import save_tiny_pruned

FT = ["--method", "lors", "--data", "c4", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--rank", "2",
      "--init-samples", "2", "--save-every", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_pruned(tmp_path_factory.mktemp("rel") / "base", with_targets=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    """A finished fine-tune with its resumable checkpoints (copied per test)."""
    out = tmp_path_factory.mktemp("rel-ft") / "ad"
    assert main(["finetune", str(base), *FT, "--steps", "3", "--out", str(out)]) == 0
    return out


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- lost data ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["model-typo", "corrupt-data"])
def test_finetune_overwrite_keeps_old_output_when_the_new_run_fails(tmp_path, base, trained, fault):
    out = _copy(trained, tmp_path / "ad")
    before = _snapshot(out)
    assert any(k.startswith("checkpoints/") for k in before)
    if fault == "model-typo":
        args = [str(tmp_path / "no-such-model"), *FT]
    else:
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        args = [str(base), *FT[:2], "--data", "alpaca", "--data-path", str(bad), *FT[4:]]
    assert main(["finetune", *args, "--out", str(out), "--overwrite"]) != 0
    assert _snapshot(out) == before  # adapter and resumable checkpoints untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_finetune_overwrite_replaces_only_when_complete(tmp_path, base, trained):
    out = _copy(trained, tmp_path / "ad")
    old_log = (out / "train_log.jsonl").read_text()
    assert main(["finetune", str(base), "--method", "seft", "--data", "c4", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--rank", "2", "--out", str(out), "--overwrite"]) == 0
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["method"] == "seft" and (out / "train_log.jsonl").read_text() != old_log
    assert json.loads((out / "finetune.json").read_text())["out_dir"] == str(out)  # not the temporary name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_finetune_refuses_out_at_its_input(tmp_path, base, where, capsys):
    model = _copy(base, tmp_path / "m" / "model")
    before = _snapshot(model)
    out = {"same": model, "inside": model / "adapter", "contains": tmp_path / "m"}[where]
    assert main(["finetune", str(model), *FT, "--out", str(out), "--overwrite"]) == 2
    assert "--out" in capsys.readouterr().err
    assert _snapshot(model) == before


def test_bench_writes_nothing_by_default_and_never_replaces(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "tiny-llama", "tiny-llama", "--engines", "torch-cpu", "--scenarios", "prefill:1x8",
            "--repeats", "5", "--warmup", "1", "--threads", "1"]
    assert main(args) == 0
    assert not any(tmp_path.iterdir())  # no benchmarks/results/ (or anything) created
    assert main([*args, "--out", "res"]) == 0
    assert (tmp_path / "res" / "latency.json").is_file()
    before = (tmp_path / "res" / "latency.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--out", "res"]) == 2  # refused before any timing
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "res" / "latency.json").read_bytes() == before


@pytest.mark.parametrize("extra", [["--scenarios", "prefill:0x8"], ["--scenarios", "decode:1@-4"],
                                   ["--scenarios", "prefill:1x100000"], ["--decode-steps", "0"],
                                   ["--threads", "0"]])
def test_bench_impossible_scenarios_are_errors(tmp_path, extra):
    assert main(["bench", "tiny-llama", "tiny-llama", "--engines", "torch-cpu", *extra]) == 2


def test_checkpoint_report_and_plot_are_written_before_the_rename(tmp_path, monkeypatch):
    """A kill -9 right after the rename must not leave a checkpoint without its report and plot."""
    import sparse_runtime.manifest as man

    seen = {}
    real = man.replace_directory

    def spy(src, target):
        seen[Path(target).name] = sorted(p.name for p in Path(src).iterdir())
        return real(src, target)

    monkeypatch.setattr(man, "replace_directory", spy)
    assert main(["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--out",
                 str(tmp_path / "p")]) == 0
    assert {"prune_report.json", "layer_sparsity.png", "sparsity_manifest.json"} <= set(seen["p"])
    rep = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert rep["plot"] == str(tmp_path / "p" / "layer_sparsity.png")


def test_stale_temporaries_are_cleaned_and_a_half_swapped_output_restored(tmp_path):
    target = tmp_path / "ck"
    dead = _dead_pid()
    stale = tmp_path / f".ck.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    alive = tmp_path / f".ck.tmp-{os.getpid()}-xyz"  # a write in progress (this process): left alone
    alive.mkdir()
    other = tmp_path / ".someone-elses.tmp-1-abc"
    other.mkdir()
    aside = tmp_path / f".ck.old-{dead}"  # killed after moving the old output aside, before the rename
    aside.mkdir()
    (aside / "keep.txt").write_text("old")
    lm = sr.load_model("tiny-llama")
    with pytest.raises(sr.errors.CheckpointExistsError):  # the old output is back, so it is not replaced
        sr.save_checkpoint(lm.model, lm.tokenizer, target, sr.build_manifest(lm.model))
    assert (target / "keep.txt").read_text() == "old"
    assert not stale.exists() and alive.exists() and other.exists()


# -- silent wrong results -------------------------------------------------------------------------
def _recipe(sparsity):
    return Recipe.from_dict({"name": "r", "model": "tiny-llama", "protocol": "test", "steps": [
        {"stage": "prune", "method": "magnitude", "sparsity": sparsity}, {"stage": "load"}, {"stage": "report"}]})


def test_recipe_resume_reruns_changed_step_and_everything_after(tmp_path, capsys):
    ctx = run_recipe(_recipe(0.5), tmp_path)
    assert abs(ctx.results[1]["metrics"]["block_sparsity"] - 0.5) < 0.02
    capsys.readouterr()
    ctx = run_recipe(_recipe(0.5), tmp_path)
    assert capsys.readouterr().out.count("skipped (resume)") == 3
    ctx = run_recipe(_recipe(0.75), tmp_path)
    out = capsys.readouterr().out
    assert "skipped" not in out
    assert abs(ctx.results[1]["metrics"]["block_sparsity"] - 0.75) < 0.02
    assert "0.75" in (tmp_path / "report.md").read_text() or "0.74" in (tmp_path / "report.md").read_text()


def test_recipe_resume_reruns_a_step_whose_output_is_gone(tmp_path, capsys):
    import shutil

    run_recipe(_recipe(0.5), tmp_path)
    shutil.rmtree(tmp_path / "00-prune" / "model")
    capsys.readouterr()
    ctx = run_recipe(_recipe(0.5), tmp_path)
    assert "is missing" in capsys.readouterr().out
    assert Path(ctx.model).is_dir() and sr.read_manifest(ctx.model)


def test_recipe_export_before_prune_is_refused(tmp_path):
    steps = [{"stage": "export", "format": "bitmask"}, {"stage": "prune", "method": "magnitude", "sparsity": 0.5}]
    with pytest.raises(ConfigError, match="dense model"):
        run_recipe(Recipe.from_dict({"model": "tiny-llama", "steps": steps}), tmp_path)
    assert not any(tmp_path.iterdir())
    steps[0]["dense"] = True  # on purpose: allowed
    Recipe.from_dict({"model": "tiny-llama", "steps": steps}).validate()


def test_manifest_must_account_for_every_prunable_layer(tmp_path):
    ck = save_tiny_pruned(tmp_path / "ck")
    f = ck / "sparsity_manifest.json"
    data = json.loads(f.read_text())
    name = sorted(data["layers"])[0]
    del data["layers"][name]
    f.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"13 of the model's 14 prunable layers"):
        sr.load_model(ck)
    assert main(["export", str(ck), "--format", "bitmask", "--out", str(tmp_path / "bm")]) == 2
    assert not (tmp_path / "bm").exists()


def test_model_dir_with_a_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    lm = sr.load_model("tiny-llama")
    d = tmp_path / "plain"
    lm.model.save_pretrained(d, safe_serialization=True)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 1 weight tensor"):
        sr.load_model(d)
    assert main(["prune", str(d), "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args", [["--prompt", "x" * 600], ["--prompt", "hi", "--max-new-tokens", "-3"],
                                  ["--prompt", "hi", "--max-new-tokens", "511"]])
def test_generate_refuses_prompts_past_the_context_and_negative_counts(args, capsys):
    assert main(["generate", "tiny-llama", *args]) == 2  # tiny-llama: 512 positions
    err = capsys.readouterr().err
    assert "--max-new-tokens" in err and "Traceback" not in err


def test_bitmask_export_is_not_mistaken_for_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from exporters import export
    from exporters.bitmask import load_bitmask

    ck = save_tiny_pruned(tmp_path / "ck")
    export(ck, "bitmask", tmp_path / "bm")
    assert not (tmp_path / "bm" / "model.safetensors").exists()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "bm")
    ref = sr.load_model(ck).model
    back = load_bitmask(tmp_path / "bm")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), back.state_dict().values()))


# -- also -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask,dmode,fmode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664), (0o077, 0o700, 0o600)])
def test_checkpoints_honour_the_umask(tmp_path, mask, dmode, fmode):
    old = os.umask(mask)
    try:
        ck = save_tiny_pruned(tmp_path / "ck")
    finally:
        os.umask(old)
    assert stat.S_IMODE(ck.stat().st_mode) == dmode
    for p in ck.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (dmode if p.is_dir() else fmode), p


def test_deepsparse_env_is_built_at_its_final_path(tmp_path, monkeypatch):
    """The venv is real (``--without-pip``); pip and the import probe are stand-ins."""
    from sparse_runtime.runtime import deepsparse_env as de

    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path / "cache"))
    real = subprocess.run

    def fake_run(cmd, *a, **kw):
        if cmd[1:3] == ["-m", "venv"]:
            return real([cmd[0], "-m", "venv", "--without-pip", *cmd[3:]], *a, **kw)
        if "pip" in cmd:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 0, "1.8.0 1.14.1 1.26.4 3.11.9\n", "")

    monkeypatch.setattr(de.subprocess, "run", fake_run)
    info = de.install(python=sys.executable, quiet=True)
    target = de.env_dir()
    assert info["installed"] and de.is_installed()
    text = (target / "bin" / "activate").read_text()
    assert str(target) in text and ".partial" not in text and ".old-" not in text
    assert (target / "pyvenv.cfg").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["deepsparse"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_load_semi_structured_cuda_without_cuda_is_one_line(tmp_path):
    from exporters.semi_structured import load_semi_structured

    with pytest.raises(ConfigError, match="no CUDA device"):
        load_semi_structured(tmp_path, device="cuda")


def test_embedded_model_is_converted_once_under_a_lock(tmp_path, monkeypatch):
    from sparse_runtime.models import loading

    monkeypatch.setenv("SPARSE_RUNTIME_CACHE", str(tmp_path))
    calls = []
    lock = threading.Lock()

    def fake_gguf(path, dtype):
        with lock:
            calls.append(path)
        import time

        time.sleep(0.3)  # both threads are inside ensure_smollm2 by now
        return sr.load_model("tiny-llama")

    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(loading, "_load_gguf", fake_gguf)
    results = []
    threads = [threading.Thread(target=lambda: results.append(loading.ensure_smollm2())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]
