"""A full disk and a read-only output for every verb that writes (docs/reliability.md).

Real faults where the machine allows (root, as in CI): a tmpfs filled to the last page, and a
tmpfs remounted read-only. The same faults are also injected in-process (Python's writes and the
native safetensors/torch writers raise ``OSError(ENOSPC | EROFS)`` under the output), so the cases
run where mounting is impossible too. Each asserts exit code 2, one line naming the fix, no
traceback, nothing left at the output (not even a hidden temporary) and, with ``--overwrite``, the
previous output byte-identical."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from .cases import FT, LORS, LOSA, PRUNE, SEFT
from .harness import assert_one_line, can_mount, diff, fill_up, injected, run_inprocess, snapshot, tmpfs

# verb -> argv writing to {OUT}; every verb that writes an output
WRITERS = {
    "prune": [*PRUNE, "--out", "{OUT}"],
    "repair": ["repair", "{P}", "--protocol", "test", "--data-dir", "{DATA}", "--out", "{OUT}"],
    "repair-json": ["repair", "{P}", "--protocol", "test", "--data-dir", "{DATA}", "--out", "{T}/r",
                    "--json", "{OUT}.json"],
    "finetune": [*LORS, "--out", "{OUT}"],
    "finetune-checkpoints": [*LORS, "--save-every", "1", "--out", "{OUT}"],
    "finetune-merge-to": [*LORS, "--out", "{T}/ft", "--merge-to", "{OUT}"],
    "seft": [*SEFT, "--out", "{OUT}"],
    "losa": [*LOSA, "--out", "{OUT}"],
    "merge": ["merge", "{A}", "--out", "{OUT}"],
    "export-onnx": ["export", "{P}", "--format", "onnx", "--out", "{OUT}"],
    "export-bitmask": ["export", "{P}", "--format", "bitmask", "--out", "{OUT}"],
    "eval-json": ["eval", "tiny-llama", "--protocol", "test", "--data-dir", "{DATA}", "--json", "{OUT}.json"],
    "inspect-json": ["inspect", "{P}", "--summary", "--json", "{OUT}.json"],
    "inspect-write-manifest": ["inspect", "{OUT}", "--summary", "--write-manifest"],
    "run": ["run", "{T}/r.yaml", "--workdir", "{OUT}"],
    "bench": ["bench", "tiny-llama", "{P}", "--engines", "torch-cpu", "--scenarios", "decode:1@2", "--repeats", "5",
              "--out", "{OUT}"],
}
# an earlier output at OUT (kept byte-identical by a failed --overwrite run)
PREVIOUS = {"prune", "repair", "finetune", "seft", "losa", "merge", "export-onnx", "export-bitmask"}
RECIPE = "name: x\nmodel: tiny-llama\nprotocol: test\nsteps:\n  - stage: prune\n    sparsity: 0.5\n"

FULL = r"(?i)disk (holding .* )?is full.*free space|full disk"
READ_ONLY = r"read-only.*(choose|writable)"


def _prepare(world, T, verb, mnt, overwrite):
    (T / "r.yaml").write_text(RECIPE + f"data_dir: {world.DATA}\n")
    argv = list(WRITERS[verb])
    if verb == "inspect-write-manifest":
        shutil.copytree(world.P, mnt / "out")
    elif overwrite:
        shutil.copytree(world.P, mnt / "out")  # "an earlier result" that must survive
        argv.append("--overwrite")
    return world.fmt([a.replace("{OUT}", str(mnt / "out")) for a in argv], T)


def _params(kind):
    for verb in WRITERS:
        for overwrite in ([False, True] if verb in PREVIOUS and kind == "full" else [False]):
            yield pytest.param(verb, overwrite, id=f"{verb}{'-overwrite' if overwrite else ''}")


def _check(res, pattern, before, world, T, verb):
    assert_one_line(res, 2, pattern)
    changes = diff(before, snapshot(T, *world.shared()))
    if verb == "repair-json":  # the checkpoint went to a healthy disk and is complete; only the report failed
        changes = [c for c in changes if not c.startswith(f"created {T / 'r'}")]
    if verb == "finetune-merge-to":  # the adapter went to a healthy disk and is complete; only the merge failed
        changes = [c for c in changes if not c.startswith(f"created {T / 'ft'}")]
    if verb == "run":  # a recipe's run directory may keep empty step directories (it resumes there)
        changes = [c for c in changes if not (c.startswith("created ") and Path(c[8:]).is_dir()
                                              and not any(Path(c[8:]).rglob("*.*")))]
    assert not changes, changes[:10]


@pytest.mark.skipif(not can_mount(), reason="cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); "
                                             "the injected variants below cover the same cases")
@pytest.mark.parametrize("verb,overwrite", list(_params("full")))
def test_full_disk(verb, overwrite, world, tmp_path, capsys):
    T = tmp_path
    mnt = T / "mnt"
    with tmpfs(mnt, size="2m") as m:
        argv = _prepare(world, T, verb, m, overwrite)
        fill_up(m)  # now, after the earlier output is in place
        before = snapshot(T, *world.shared())
        res = run_inprocess(argv, capsys)
        _check(res, FULL, before, world, T, verb)


@pytest.mark.skipif(not can_mount(), reason="cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); "
                                             "the injected variants below cover the same cases")
@pytest.mark.parametrize("verb,overwrite", list(_params("ro")))
def test_read_only_output(verb, overwrite, world, tmp_path, capsys):
    T = tmp_path
    mnt = T / "mnt"
    with tmpfs(mnt, size="2m") as m:
        argv = _prepare(world, T, verb, m, overwrite)
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", str(m)], check=True)
        before = snapshot(T, *world.shared())
        res = run_inprocess(argv, capsys)
        _check(res, READ_ONLY, before, world, T, verb)


# with real mounts available the injected variants repeat them; then a few keep the injection honest
INJECTED_ALWAYS = {"prune", "export-onnx", "eval-json", "finetune"}


def _injected_params():
    for kind, code in (("full", errno.ENOSPC), ("ro", errno.EROFS)):
        for p in _params(kind):
            verb, overwrite = p.values
            if can_mount() and verb not in INJECTED_ALWAYS:
                continue
            yield pytest.param(verb, overwrite, code, id=f"{p.id}-{'full' if kind == 'full' else 'read-only'}",
                               marks=p.marks)


@pytest.mark.parametrize("verb,overwrite,code", list(_injected_params()))
def test_injected_fault(verb, overwrite, code, world, tmp_path, capsys, monkeypatch):
    T = tmp_path
    mnt = T / "mnt"
    mnt.mkdir()
    argv = _prepare(world, T, verb, mnt, overwrite)
    before = snapshot(T, *world.shared())
    with injected(mnt, code, monkeypatch):
        res = run_inprocess(argv, capsys)
    _check(res, FULL if code == errno.ENOSPC else READ_ONLY, before, world, T, verb)
