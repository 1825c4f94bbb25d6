"""``kill -9`` at the instants that matter, then a rerun (docs/reliability.md).

The process is killed by the fault-point hook (``SPARSE_RUNTIME_FAULT=<point>``, see
sparse_runtime/faults.py): during calibration, while a checkpoint is half written into its
temporary directory, just before and just after the rename that publishes it, and during
fine-tuning. After each kill: the exit is SIGKILL, nothing half-written is visible at ``--out``
(an output that is there is complete and identical to an uninterrupted run's), and a rerun
gives the same result as an uninterrupted run (same weights bytes and mask digests; for
fine-tuning, ``--resume`` continues from the last checkpoint to the same adapter bytes) and
leaves no hidden temporary behind."""
from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from .cases import FT
from .harness import diff, run_inprocess, run_subprocess, snapshot

KILLED = -signal.SIGKILL


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _prune_identity(d: Path) -> dict:
    man = json.loads((d / "sparsity_manifest.json").read_text())
    return {"weights": _sha(d / "model.safetensors"), "config": _sha(d / "config.json"),
            "masks": {k: v["mask_sha256"] for k, v in man["layers"].items()},
            "report": (d / "prune_report.json").is_file(), "plot": (d / "layer_sparsity.png").is_file()}


def _export_identity(d: Path) -> dict:
    man = json.loads((d / "export_manifest.json").read_text())
    for k in ("created", "export_seconds", "verify_seconds"):
        man.pop(k, None)
    files = {p.name: _sha(p) for p in d.iterdir() if p.name != "export_manifest.json"}
    return {"files": files, "manifest_layers": json.dumps(man.get("layers", man.get("masks")), sort_keys=True)}


def _adapter_identity(d: Path) -> dict:
    cfg = json.loads((d / "adapter_config.json").read_text())
    return {"weights": _sha(d / "adapter_model.safetensors"), "method": cfg["method"]}


def _no_temporaries(T: Path) -> list[str]:
    return [str(p) for p in T.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def _prune_argv(world, out):
    return ["prune", "tiny-llama", "--sparsity", "0.5", "--protocol", "test", "--data-dir", world.DATA, "--out", out]


@pytest.mark.parametrize("point", ["calibration", "write", "before-rename", "after-rename"])
def test_kill_prune_then_rerun(point, world, tmp_path, capsys):
    inputs = snapshot(*world.shared())
    out = tmp_path / "o"
    res = run_subprocess(_prune_argv(world, out), env={"SPARSE_RUNTIME_FAULT": point})
    assert res.rc == KILLED, f"not killed at {point}: exit {res.rc}\n{res.err[-2000:]}"
    want = _prune_identity(world.P)
    if point == "after-rename":  # published: complete (report and plot inside), identical
        assert _prune_identity(out) == want
        rerun = [*_prune_argv(world, out), "--overwrite"]
    else:
        assert not out.exists(), f"a half-written output is visible after a kill at {point}"
        rerun = _prune_argv(world, out)
    assert run_inprocess(rerun, capsys).rc == 0
    assert _prune_identity(out) == want
    assert not _no_temporaries(tmp_path), _no_temporaries(tmp_path)
    assert not diff(inputs, snapshot(*world.shared())), "an input changed"


@pytest.mark.parametrize("point", ["write", "before-rename", "after-rename"])
def test_kill_export_then_rerun(point, world, tmp_path, capsys):
    inputs = snapshot(*world.shared())
    out = tmp_path / "e"
    argv = ["export", world.P, "--format", "onnx", "--out", out]
    res = run_subprocess(argv, env={"SPARSE_RUNTIME_FAULT": point})
    assert res.rc == KILLED, f"not killed at {point}: exit {res.rc}\n{res.err[-2000:]}"
    want = _export_identity(world.O)
    if point == "after-rename":
        assert _export_identity(out) == want
        argv = [*argv, "--overwrite"]
    else:
        assert not out.exists(), f"a half-written export is visible after a kill at {point}"
    assert run_inprocess(argv, capsys).rc == 0
    assert _export_identity(out) == want
    assert not _no_temporaries(tmp_path), _no_temporaries(tmp_path)
    assert not diff(inputs, snapshot(*world.shared())), "an input changed"


FT4 = ["finetune", "{P}", "--method", "lors", "--rank", "2", "--init-samples", "2", *FT, "--steps", "4",
       "--save-every", "2"]


@pytest.fixture(scope="module")
def ft_reference(world, tmp_path_factory):
    """An uninterrupted 4-step fine-tune with a checkpoint every 2 steps."""
    from sparse_runtime.cli import main

    out = tmp_path_factory.mktemp("ft-ref") / "ad"
    assert main([str(a) for a in world.fmt(FT4, out.parent)] + ["--out", str(out)]) == 0
    return _adapter_identity(out)


@pytest.mark.parametrize("point", ["train-step:3", "before-rename:1", "after-rename:1", "before-rename:3"])
def test_kill_finetune_then_resume(point, world, ft_reference, tmp_path, capsys):
    """train-step:3: after step 3 (the step-2 checkpoint is on disk); before-/after-rename:1: while
    the first resumable checkpoint is published; before-rename:3: the run complete in its temporary
    directory (checkpoints 2 and 4 written), just before it is renamed to --out."""
    inputs = snapshot(*world.shared())
    out = tmp_path / "ad"
    argv = [*world.fmt(FT4, tmp_path), "--out", str(out)]
    res = run_subprocess(argv, env={"SPARSE_RUNTIME_FAULT": point})
    assert res.rc == KILLED, f"not killed at {point}: exit {res.rc}\n{res.err[-2000:]}"
    # the run lives in a hidden temporary directory beside --out until it is complete
    assert not out.exists(), f"a kill at {point} left something at --out: {list(out.rglob('*'))[:5]}"
    runs = list(tmp_path.glob(f".{out.name}.tmp-*"))
    published = any(any((r / "checkpoints").glob("step-*")) for r in runs)
    assert published == (point != "before-rename:1"), (point, runs)
    # the user's rerun is always the same command with --resume: it continues the killed run from its
    # last checkpoint, or, killed before the first one, starts afresh with a note (not a refusal)
    r = run_inprocess([*argv, "--resume"], capsys)
    assert r.rc == 0, r.err[-2000:]
    assert ("nothing to resume" in r.err) == (not published), r.err[-2000:]
    assert _adapter_identity(out) == ft_reference
    assert not _no_temporaries(tmp_path), _no_temporaries(tmp_path)
    assert not diff(inputs, snapshot(*world.shared())), "an input changed"
