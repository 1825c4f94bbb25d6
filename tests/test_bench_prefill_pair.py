"""benchmarks/bench_prefill_pair.py (engines in one loop, docs/protocols.md): on a tiny pruned Llama
the script loads our engines (and DeepSparse where installed), alternates them for the rounds
asked, and writes its table (engine medians; per-round DeepSparse / ours ratios where DeepSparse ran)
to the directory asked, never into the repository's benchmarks/results/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pair_runs_on_tiny(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prefill_pair.py"), "--model", "tiny",
                        "--rounds", "5", "--pause", "0", "--prefill", "32", "--out", str(tmp_path), "--name", "pair"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "pair.json").read_text())
    engines = [row["engine"] for row in data["rows"]]
    assert engines[:3] == ["ours, fp32", "ours, bf16 prefill, fp32 values", "ours, bf16 prefill, int8 codes"]
    assert all(len(data["times_ms"][e]) == 5 for e in engines)
    if "DeepSparse, fp32" in engines:  # installed here: every row of ours carries the per-round ratio
        assert all(row.get("DeepSparse / this, per round: median") for row in data["rows"][:3])
    assert "TINY" in (tmp_path / "pair.md").read_text()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prefill_pair.py"), "--rounds", "2"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--rounds must be at least 5" in r.stderr
