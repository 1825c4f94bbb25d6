"""benchmarks/bench_slot_steps.py (the serving slots' batched step per value type): on a tiny Llama the
script times every row at each batch asked (the int8-activation rows where the CPU has AVX-512 VNNI,
else listed as skipped with the reason), writes its table to the directory asked (never into the
repository's benchmarks/results/), and refuses a bad --batches with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "bench_slot_steps.py")


def test_slot_steps_on_tiny(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, SCRIPT, "--model", "tiny", "--batches", "1,3", "--steps", "2", "--rounds", "3",
                        "--out", str(tmp_path), "--name", "slots"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "slots.json").read_text())
    md = (tmp_path / "slots.md").read_text()
    rows = {(row["sequences"], row["row"]) for row in data["rows"]}
    assert {(b, k) for b in (1, 3) for k in ("int8 weight-only", "int4-g64 weight-only")} <= rows
    for k in ("int8 + W8A8", "int4-g64 + W4A8"):
        assert {(1, k), (3, k)} <= rows or f"skipped {k}:" in md
    assert all(row["ms/step"] > 0 and row["tokens/s"] > 0 for row in data["rows"])
    assert "TINY" in md
    r = subprocess.run([sys.executable, SCRIPT, "--batches", "1,many"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "--batches '1,many'" in r.stderr
