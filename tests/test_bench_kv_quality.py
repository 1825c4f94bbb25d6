"""benchmarks/bench_kv_quality.py (what an fp16 K/V cache costs): on a tiny model the script decodes
the same windows with an fp32 and an fp16 cache, reports both perplexities, the top-1 agreement and
the largest logit difference, writes its table where asked, and refuses a bad --prefill with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "bench_kv_quality.py")


def test_kv_quality_runs_on_tiny(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, SCRIPT, "--model", "tiny", "--windows", "2", "--window", "40", "--prefill", "8",
                        "--out", str(tmp_path), "--name", "kvq"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "kvq.json").read_text())["rows"]
    assert [row["K/V cache"] for row in rows] == ["float32", "float16"]
    fp32, fp16 = rows
    assert fp32["perplexity (decoded positions)"] > 1 and fp16["perplexity (decoded positions)"] > 1
    assert 0 < fp16["max abs logit difference vs fp32"] < 1e-2  # rounded, and only rounded
    assert fp16["top-1 agreement with fp32"] > 0.9
    assert "TINY" in (tmp_path / "kvq.md").read_text()
    r = subprocess.run([sys.executable, SCRIPT, "--window", "32", "--prefill", "32"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and "--prefill 32" in r.stderr
