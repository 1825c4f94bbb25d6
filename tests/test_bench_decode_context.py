"""benchmarks/bench_decode_context.py (decode ms/token as the context grows): on a tiny pruned Llama
the script times its rows at each context asked, reports the attention stage and the per-round
dense int8 / 70 % W8A8 ratio, writes its table to the directory asked (never into the repository's
benchmarks/results/), and refuses a bad --contexts with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "bench_decode_context.py")


def _run_tiny(tmp_path, name: str, *args: str) -> dict:
    """The script on the tiny model, 3 rounds of 3 steps, its table written to tmp_path; its JSON."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, SCRIPT, "--model", "tiny", "--rounds", "3", "--steps", "3", *args,
                        "--out", str(tmp_path), "--name", name], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_decode_context_runs_on_tiny(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    data = _run_tiny(tmp_path, "ctx", "--contexts", "8,33", "--kv-dtypes", "float32,float16")
    # 70 % with W8A8 where the CPU has AVX-512 VNNI, else weight-only int8 (said in the label)
    fast = "70 % int8 + W8A8" if any(r["row"] == "70 % int8 + W8A8" for r in data["rows"]) else \
        "70 % int8 (weight-only: no W8A8 here)"
    h = ", fp16 K/V"
    assert [(row["context"], row["row"]) for row in data["rows"]] == [
        (c, r) for c in (8, 33) for r in ("dense int8", fast, "dense int8" + h, fast + h)]
    assert all(row["attention ms"] > 0 and row["K/V MB/token"] > 0 for row in data["rows"])
    assert all(row.get("dense int8 / this, per round: median") for row in data["rows"][1::2])
    assert data["rows"][2]["K/V MB/token"] == data["rows"][0]["K/V MB/token"] / 2  # fp16: half the bytes
    assert all(len(v) == 3 for ctx in data["times_ms"].values() for v in ctx["total_ms"].values())
    assert "TINY" in (tmp_path / "ctx.md").read_text()
    assert "vCPU pace at context 33" in (tmp_path / "ctx.md").read_text()  # per round, each thread's pace
    assert all(len(data["times_ms"][c]["vcpu_pace_us"]) == 3 for c in ("8", "33"))
    r = subprocess.run([sys.executable, SCRIPT, "--contexts", "128,lots"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "--contexts '128,lots'" in r.stderr
    r = subprocess.run([sys.executable, SCRIPT, "--kv-dtypes", "int8"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "--kv-dtypes 'int8'" in r.stderr


def test_decode_context_stages_and_dense_a8(tmp_path):
    """--stages puts every stage of the profile in the rows (summing to about the token); --dense-a8
    adds the dense rows with int8 activations where W8A8 runs and says why where it does not."""
    data = _run_tiny(tmp_path, "st", "--contexts", "8", "--stages", "--dense-a8")
    labels = [row["row"] for row in data["rows"]]
    md = (tmp_path / "st.md").read_text()
    if "70 % int8 + W8A8" in labels:
        assert labels == ["dense int8", "70 % int8 + W8A8", "dense int8 + W8A8", "dense int4-g64 + W4A8"]
    else:  # no VNNI: the dense W8A8 row is left out, with the reason
        assert labels == ["dense int8", "70 % int8 (weight-only: no W8A8 here)"]
        assert "dense int8 + W8A8: not run, W8A8 refused" in md and "dense int4-g64 + W4A8: not run" in md
    from sparse_runtime.kernels.decode import STAGES

    for row in data["rows"]:
        parts = [row[f"{st} ms"] for st in STAGES]
        assert all(p >= 0 for p in parts)  # "attention ms" is the same column as before
        assert 0.3 * row["decode ms/token"] < sum(parts) < 1.2 * row["decode ms/token"]  # medians of each
    assert "<stage> ms" in md


def test_decode_context_attn_forms(tmp_path):
    """--attn-forms times every row a second time in the attention's ranges form (the same engine,
    kernels.decode.attn_form("ranges") around its steps), with its own per-round ratio."""
    data = _run_tiny(tmp_path, "af", "--contexts", "8", "--attn-forms")
    labels = [row["row"] for row in data["rows"]]
    assert labels[2:] == [k + " [ranges]" for k in labels[:2]]
    assert data["rows"][3].get("dense int8 / this, per round: median")
    assert "attn_form('ranges')" in (tmp_path / "af.md").read_text()


def test_decode_context_bytes_only(tmp_path):
    """--bytes-only times every W8A8 row a second time with its products only reading their bytes
    (kernels.decode.bytes_only() around its steps), with the per-round ratio of the real dense int8 row
    to it; no W8A8 row (no VNNI) means no such row."""
    data = _run_tiny(tmp_path, "bo", "--contexts", "8", "--bytes-only", "--dense-a8")
    labels = [row["row"] for row in data["rows"]]
    if "70 % int8 + W8A8" not in labels:
        assert not any(k.endswith("[bytes only]") for k in labels)
        return
    assert labels == ["dense int8", "70 % int8 + W8A8", "dense int8 + W8A8", "dense int4-g64 + W4A8",
                      "70 % int8 + W8A8 [bytes only]", "dense int8 + W8A8 [bytes only]"]
    assert data["rows"][4].get("dense int8 / this, per round: median")
    assert all(len(v) == 3 for v in data["times_ms"]["8"]["total_ms"].values())
    assert "wrong by design" in (tmp_path / "bo.md").read_text()
