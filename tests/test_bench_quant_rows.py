"""benchmarks/bench_quant_rows.py (the quantized row kernels, warm): with --quick the script times every
scheme's kernel on small shapes (the int8-activation rows only where the CPU has AVX-512 VNNI, else
listed as skipped with the reason) and writes its table to the directory asked, never into the
repository's benchmarks/results/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "bench_quant_rows.py")


def test_quant_rows_quick(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path), "--name", "rows"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "rows.json").read_text())
    kernels = {row["kernel"] for row in data["rows"]}
    assert {"int8 weight-only", "int4-g64 weight-only"} <= kernels
    a8 = {"int8 W8A8", "70 % int8 W8A8", "int4-g64 W4A8", "int4-g64-asym W4A8", "int4-g32 W4A8"}
    md = (tmp_path / "rows.md").read_text()
    assert a8 <= kernels or all(f"skipped {k}:" in md for k in a8)  # no VNNI: each said, not run
    assert all(row["us"] > 0 and row["weights / ns"] > 0 for row in data["rows"])
    assert "TINY" in md
    r = subprocess.run([sys.executable, SCRIPT, "--rounds", "2"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--rounds" in r.stderr
