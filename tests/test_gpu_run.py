"""benchmarks/gpu_run.py, the prepared GPU run of issue 22, checked on CPU: its dry run executes every
step's code with tiny shapes and CPU stand-ins for the CUDA-only calls, the payload that carries
wheels, data and the model's GGUF in parts survives the trip, and the time box stops a step's whole
process group and lets the next run resume."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_run  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def test_dry_run_steps_1_and_2(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--dry-run", "--inline", "--steps", "1,2", "--work", str(work), "--out", str(out)]
    assert gpu_run.main(args) == 0
    report = json.loads((out / "gpu_run.json").read_text())
    assert report["dry_run"] and [s["status"] for s in report["steps"]] == ["done", "done"]
    check = json.loads((out / "gpu_semi_structured.json").read_text())
    assert check["title"].startswith("DRY RUN") and check["dry_run"]
    statuses = [r["status"] for r in check["rows"]]
    assert len(statuses) == 2 * 2 + 1 and all(s.startswith("ok (stand-in") for s in statuses), statuses
    assert all(r["2:4 tensors"] == 14 for r in check["rows"])  # tiny-llama: 2 blocks x 7 linears, all 2:4
    engine = check["rows"][-1]
    assert engine["part"] == "torch-cuda-24 engine" and "refused" in engine["status"]
    lat = _rows(out / "gpu_latency_24_7b.json")
    assert not [r for r in lat if "status" in r], "every unit ran (no FAILED or skipped rows)"
    linear = [r for r in lat if r["part"] == "linear"]
    assert len(linear) == len(gpu_run.TINY_LINEAR_SHAPES) * len(gpu_run.TINY_TOKENS) * 2 * 2  # dtypes x backends
    assert all(r["rel err 2:4"] < 1e-2 and r["dense"] > 0 and r["2:4"] > 0 for r in linear)
    e2e = [r for r in lat if r["part"] == "end to end"]
    assert [r["tokens / scenario"].split()[0] for r in e2e] == ["prefill", "decode"]
    assert all(r["rel err 2:4"] == 0 for r in e2e)  # the stand-in keeps the masked dense weights
    assert "DRY RUN" in (out / "gpu_latency_24_7b.md").read_text().splitlines()[0]
    # a second run keeps what finished (same settings) and writes the same files again
    capsys.readouterr()
    assert gpu_run.main(args) == 0
    assert capsys.readouterr().out.count("done in an earlier run, kept") == 2


def test_results_flag_refused_in_dry_run():
    with pytest.raises(SystemExit, match="never results"):
        gpu_run.main(["--dry-run", "--results"])


def _tar_xz(src: Path, dst: Path) -> Path:
    with tarfile.open(dst, "w:xz") as tar:
        tar.add(src, arcname="data")
    return dst


def test_payload_parts_stage_and_assemble(tmp_path):
    data = tmp_path / "src" / "data" / "alpaca"
    data.mkdir(parents=True)
    (data / "alpaca_5000.json").write_text("[]")
    archive = _tar_xz(data.parent, tmp_path / "data.tar.xz")
    big = tmp_path / "model.gguf"
    big.write_bytes(os.urandom(10_000))
    carry = tmp_path / "carry"
    cap = archive.stat().st_size + 3_000
    plan = gpu_run.pack_payload([archive], big, carry, cap)
    parts = sorted(plan["parts"], key=lambda p: int(p[1:]))
    assert len(parts) >= 3 and parts[0] == "p1"
    for p in parts:  # every part fits one call's carry
        assert sum(f.stat().st_size for f in (carry / p).iterdir() if f.name != "payload.json") <= cap
    stage_dir = tmp_path / "stage"
    for p in reversed(parts[1:]):  # the quick calls: each stages one part and does not run
        gpu = tmp_path / f"call-{p}"
        (gpu / p).mkdir(parents=True)
        for f in (carry / p).iterdir():
            (gpu / p / f.name).write_bytes(f.read_bytes())
        state = gpu_run.stage(gpu, stage_dir)
        assert not state["run"] and "p1" in state["missing_parts"]
    gpu = tmp_path / "call-p1"
    (gpu / "p1").mkdir(parents=True)
    for f in (carry / "p1").iterdir():
        (gpu / "p1" / f.name).write_bytes(f.read_bytes())
    state = gpu_run.stage(gpu, stage_dir)
    assert state["run"] and state["model_complete"] and not state["missing_parts"]
    env = gpu_run.setup(state, stage_dir, tmp_path / "work")
    site = stage_dir / "site"
    assembled = site / gpu_run.GGUF_PACKAGE / big.name
    assert hashlib.sha256(assembled.read_bytes()).hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
    assert (site / gpu_run.GGUF_PACKAGE / "__init__.py").is_file()
    assert Path(env["SPARSE_RUNTIME_DATA"], "alpaca", "alpaca_5000.json").read_text() == "[]"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    # a part damaged on the way is refused with one line, not assembled
    bad = tmp_path / "call-bad"
    (bad / parts[1]).mkdir(parents=True)
    for f in (carry / parts[1]).iterdir():
        (bad / parts[1] / f.name).write_bytes(f.read_bytes())
    chunk = next(f for f in (bad / parts[1]).iterdir() if f.name != "payload.json")
    raw = chunk.read_bytes()
    chunk.write_bytes(bytes([raw[0] ^ 0xFF]) + raw[1:])  # always a change (b"x" was none when the byte was "x")
    with pytest.raises(SystemExit, match="arrived corrupt"):
        gpu_run.stage(bad, tmp_path / "stage2")


def test_time_box_stops_the_whole_process_group():
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "time.sleep(60)"
    t = time.time()
    status, rc = gpu_run.run_child([sys.executable, "-c", code], dict(os.environ), timeout=1.5)
    assert (status, rc) == ("cut", -1) and time.time() - t < 15


def test_step3_time_boxed_then_resumed(tmp_path, monkeypatch, capsys):
    """Step 3 is bench_ft_alpaca (resumable): cut at the deadline, it is run again next time, never 'kept'."""
    calls = []

    def fake(args, work):
        calls.append(work)
        return [sys.executable, "-c", "import time; time.sleep(60)"] if len(calls) == 1 else [sys.executable, "-c", ""]
    monkeypatch.setattr(gpu_run, "ft_command", fake)
    monkeypatch.setitem(gpu_run.STEP_BUDGET_S, 3, 2)
    monkeypatch.setattr(gpu_run, "MIN_STEP_S", 1)
    args = ["--dry-run", "--steps", "3", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    assert gpu_run.main(args) == 1  # cut
    state = json.loads((tmp_path / "w" / "state.json").read_text())
    assert state["3"]["status"] == "cut" and "continues" in state["3"]["why"]
    assert gpu_run.main(args) == 0 and len(calls) == 2
    assert json.loads((tmp_path / "w" / "state.json").read_text())["3"]["status"] == "done"


@pytest.mark.slow
def test_full_dry_run_in_child_processes(tmp_path):
    """The default dry run: every step as its own time-boxed process, step 3 a tiny bench_ft_alpaca."""
    out = tmp_path / "out"
    assert gpu_run.main(["--dry-run", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    ft = _rows(out / "ft_alpaca_gpu.json")
    assert {r["config"].split(" ")[0] for r in ft} >= {"wanda-50", "seft"}
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
