"""benchmarks/bench_latency_7b_slice.py (protocol latency-7b-slice): the table has a row per
configuration, ratios pair each engine's dense and sparse rows, failures become rows, and ``--smoke``
runs every engine end to end on tiny-llama (slow: each configuration is a fresh process)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import save_tiny_pruned

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_latency_7b_slice.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_latency_7b_slice", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timing(ms: float) -> dict:
    return {"median": ms, "min": ms, "max": ms, "runs": [ms]}


def test_table_ratios_and_failure_rows(tmp_path):
    b = _bench()
    model = save_tiny_pruned(tmp_path / "w70", sparsity=0.7)
    t = {"lean-dense": (100.0, 10.0), "sparse-cpu-70": (50.0, 4.0), "ort-dense": (80.0, 8.0),
         "ort-sparse-70": (40.0, 8.0), "lean-dense-bf16p": (60.0, 10.0), "sparse-cpu-70-bf16p": (20.0, 4.0),
         "sparse-cpu-70-int8-bf16p": (15.0, 2.0), "lean-dense-int8": (90.0, 8.0), "sparse-cpu-70-int8": (90.0, 5.0),
         "lean-dense-int8-a8": (90.0, 6.0), "sparse-cpu-70-int8-a8": (90.0, 3.0),
         "lean-dense-int8-a8g64": (90.0, 7.0), "sparse-cpu-70-int8-a8g64": (90.0, 3.5)}
    results = {k: {"load_s": 1.0, "capped": {"peak_anon_bytes": 2 ** 30}, b.PREFILL: _timing(p), b.DECODE: _timing(d)}
               for k, (p, d) in t.items()}
    results["deepsparse-dense"] = {"skipped": "skipped: DeepSparse is not installed"}
    results["deepsparse-70"] = {"capped": {"exit_code": 1}, "error": "exit 1: boom"}
    rows = {r["configuration"]: r for r in b.table(None, results, model, model, "2 of 2 blocks")}
    assert sorted(rows) == sorted(b.CONFIGS)
    assert rows["sparse-cpu-70-bf16p"]["prefill sparse/dense"] == 3.0  # its pair is the bf16-prefill dense row
    assert rows["sparse-cpu-70-int8-bf16p"]["decode sparse/dense"] == 5.0
    assert rows["sparse-cpu-70-int8"]["decode sparse/dense"] == 1.6  # int8 against dense int8
    assert rows["sparse-cpu-70-int8-a8"]["decode sparse/dense"] == 2.0  # W8A8 against dense W8A8
    assert "bandwidth bound" not in rows["sparse-cpu-70-int8-bf16p"]  # the bound is of fp32 values
    assert rows["sparse-cpu-70"]["decode sparse/dense"] == 2.5  # lean 10 / sparse 4
    assert rows["ort-sparse-70"]["decode sparse/dense"] == 1.0 and rows["ort-sparse-70"]["prefill sparse/dense"] == 2.0
    assert rows["ort-dense"]["sparse-cpu speedup (decode)"] == 2.0  # 8 / 4
    assert "sparse-cpu speedup (decode)" not in rows["sparse-cpu-70"]
    assert rows["sparse-cpu-70"]["bandwidth bound"] > 1 and "bandwidth bound" not in rows["lean-dense"]
    assert rows["deepsparse-dense"]["status"].startswith("skipped") and rows["deepsparse-dense"]["decode ms/token"] == "-"
    assert rows["deepsparse-70"]["status"] == "exit 1: boom"


def test_unknown_configuration_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path), "--configs", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown configuration(s) nope" in r.stderr


@pytest.mark.slow
def test_smoke_has_every_configuration_row(tmp_path):
    """Every configuration runs (or, for DeepSparse without its env, says why) and nothing is saved."""
    b = _bench()
    before = set((ROOT / "benchmarks" / "results").iterdir())
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    got = {ln.split("|")[1].strip(): ln for ln in lines[1:]}
    assert set(got) == set(b.CONFIGS), r.stdout[-2000:]
    from sparse_runtime.kernels import native

    vnni = native.w8a8_isa(native.select_isa(), "dense") != "portable"
    for label, (engine, _) in b.CONFIGS.items():
        status = got[label].rstrip(" |").rsplit("|", 1)[-1].strip()
        refused = (engine == "deepsparse" and "not installed" in status) or (
            "-a8" in label and not vnni and "AVX-512 VNNI" in status)  # W8A8 needs VNNI: refused in one line
        assert status.startswith("ok") or refused, got[label]
    assert set((ROOT / "benchmarks" / "results").iterdir()) == before


def test_deepsparse_disk_check_and_export_cleanup(tmp_path, monkeypatch):
    """DeepSparse is skipped with a reason rather than filling the disk; exports are removed per format."""
    from collections import namedtuple

    from sparse_runtime.runtime.exports import source_key

    b = _bench()
    model = tmp_path / "w70"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(b.shutil, "disk_usage", lambda p: usage(0, 0, b.MARGIN + 1000))
    assert "free disk" in b.disk_short(tmp_path, model)
    monkeypatch.setattr(b.shutil, "disk_usage", lambda p: usage(0, 0, b.MARGIN + 10**6))
    assert b.disk_short(tmp_path, model) is None
    onnx = tmp_path / "cache" / "exports" / f"{source_key(str(model))}-x" / "onnx"
    onnx.mkdir(parents=True)
    assert not b.drop_exports(tmp_path, model, "deepsparse") and onnx.is_dir()
    assert b.drop_exports(tmp_path, model, "onnx") and not onnx.exists()
