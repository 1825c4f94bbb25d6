"""The rest of the reliability promises that are not a bad-input row: the top-level handler, the
fault-point hook itself, repairs that the error lines recommend, and paths that must resolve from
anywhere (docs/reliability.md)."""
from __future__ import annotations

import json
import shutil

import pytest

from .cases import FT
from .harness import assert_one_line, diff, run_inprocess, snapshot


def test_unexpected_error_is_one_line_and_verbose_shows_the_traceback(monkeypatch, capsys):
    import sparse_runtime.commands.inspect as cmd

    def boom(args):
        raise RuntimeError("something nobody foresaw")

    from sparse_runtime import cli

    monkeypatch.setattr(cli, "_commands", lambda: [type(cmd.COMMAND)(cmd.COMMAND.name, cmd.COMMAND.help,
                                                                       cmd.COMMAND.add_arguments, boom)])
    res = run_inprocess(["inspect", "tiny-llama"], capsys)
    assert_one_line(res, 1, r"unexpected RuntimeError: something nobody foresaw.*-v")
    with pytest.raises(RuntimeError):
        cli.main(["-v", "inspect", "tiny-llama"])


@pytest.mark.parametrize("exc,pattern", [
    (OSError(28, "No space left on device", "/x/y"), r"disk is full \(/x/y\).*free space"),
    (OSError(30, "Read-only file system", "/x"), r"read-only.*writable"),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), r"disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                  "data/0: file write failed"), r"disk is full"),
])
def test_system_faults_of_any_library_are_one_line(exc, pattern, monkeypatch, capsys):
    from sparse_runtime import cli
    import sparse_runtime.commands.inspect as cmd

    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_commands", lambda: [type(cmd.COMMAND)("inspect", "x", cmd.COMMAND.add_arguments, fail)])
    assert_one_line(run_inprocess(["inspect", "tiny-llama"], capsys), 2, pattern)


def test_fault_point_is_inert_unless_named(monkeypatch):
    from sparse_runtime import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("before-rename")  # nothing happens
    monkeypatch.setenv(faults.ENV, "calibration")
    faults.fault_point("before-rename")  # another point: nothing happens
    killed = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setenv(faults.ENV, "train-step:3")
    faults._seen.clear()
    for _ in range(2):
        faults.fault_point("train-step")
    assert not killed
    faults.fault_point("train-step")
    assert killed == [faults.signal.SIGKILL]


def test_write_manifest_repairs_what_the_error_line_recommends(world, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(world.P, ck)
    p = ck / "sparsity_manifest.json"
    data = json.loads(p.read_text())
    data["layers"]["model.layers.0.mlp.up_proj"]["nnz"] = "many"
    p.write_text(json.dumps(data))
    res = run_inprocess(["inspect", ck], capsys)
    assert_one_line(res, 2, r"inspect DIR --write-manifest")
    res = run_inprocess(["inspect", ck, "--summary", "--write-manifest"], capsys)
    assert res.rc == 0 and "manifest: verified" in res.out, res.err
    fixed = json.loads(p.read_text())
    want = json.loads((world.P / "sparsity_manifest.json").read_text())["layers"]
    keys = ("mask_sha256", "nnz", "shape", "measured", "structure")
    assert {n: [r[k] for k in keys] for n, r in fixed["layers"].items()} == \
        {n: [r[k] for k in keys] for n, r in want.items()}
    assert fixed["history"][-1]["stage"] == "write-manifest"  # the unreadable one's history is gone
    assert not [x for x in ck.iterdir() if x.name.startswith(".")]


def test_merge_finds_a_relative_base_from_another_directory(world, tmp_path, capsys, monkeypatch):
    """finetune records its base relative to the adapter directory, so merge works from anywhere."""
    work = tmp_path / "work"
    shutil.copytree(world.P, work / "runs" / "base")
    monkeypatch.chdir(work)
    argv = ["finetune", "runs/base", "--method", "lors", "--rank", "2", "--init-samples", "2",
            *[a.format(DATA=world.DATA) for a in FT], "--out", "runs/ad"]
    assert run_inprocess(argv, capsys).rc == 0
    assert json.loads((work / "runs" / "ad" / "adapter_config.json").read_text())["base_model"] == "../base"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = snapshot(work)
    res = run_inprocess(["merge", work / "runs" / "ad", "--out", tmp_path / "merged"], capsys)
    assert res.rc == 0, res.err
    assert not diff(before, snapshot(work))


def test_merge_reads_an_old_adapter_whose_base_is_relative_to_the_old_working_directory(world, tmp_path, capsys,
                                                                                       monkeypatch):
    """Adapters written before the rule recorded the path as typed; run from that directory, it resolves."""
    shutil.copytree(world.P, tmp_path / "base")
    shutil.copytree(world.A, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["base_model"] = "base"
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    res = run_inprocess(["merge", "ad", "--out", "m"], capsys)
    assert res.rc == 0, res.err


def test_a_failed_finetune_keeps_its_checkpoint_for_resume(world, tmp_path, capsys, monkeypatch):
    """A fault after a resumable checkpoint was written (a full disk at the final adapter) leaves
    nothing at --out, keeps the run's hidden directory with a note, and --resume finishes it to the
    adapter of an uninterrupted run (the shared fixture A was trained with the same command)."""
    import errno
    import os

    import sparse_runtime.training.engine as eng

    out = tmp_path / "ad"
    argv = [*world.fmt(["finetune", "{P}", "--method", "lors", "--rank", "2", "--init-samples", "2", *FT,
                        "--save-every", "1"], tmp_path), "--out", str(out)]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    with monkeypatch.context() as m:
        m.setattr(eng, "save_adapter", full)
        res = run_inprocess(argv, capsys)
    assert_one_line(res, 2, r"disk is full")
    assert "is kept in" in res.err and "--resume" in res.err, res.err
    assert not out.exists()
    res = run_inprocess([*argv, "--resume"], capsys)
    assert res.rc == 0 and "nothing to resume" not in res.err, res.err
    assert (out / "adapter_model.safetensors").read_bytes() == (world.A / "adapter_model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*")), list(tmp_path.glob(".*"))
