"""Capped measurement (sparse_runtime/measure/cgroup.py, benchmarks/cgroup_run.py): the kernel kills a
step over its cap and the record says so; a step under its cap succeeds and its peak is seen."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sparse_runtime.measure.cgroup import cgroup_support, parse_bytes, run_capped

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# 200 MiB of anonymous memory, touched, held for a moment
ALLOC = [sys.executable, "-c", "import numpy as np, time; a = np.ones(200 * 2**20 // 8); time.sleep(0.3); print('held')"]


def _support():
    cg, why = cgroup_support()
    if cg is None:
        pytest.skip(f"memory cgroups are not writable here: {why}")
    return cg


def _runner():
    spec = importlib.util.spec_from_file_location("cgroup_run", ROOT / "benchmarks" / "cgroup_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_over_the_cap_is_an_oom_kill():
    _support()
    r = run_capped(ALLOC, "100MiB", "over")
    assert r["oom_killed"] and r["exit_code"] == -9 and r["signal"] == "SIGKILL" and not r["ok"]
    assert r["peak_bytes"] <= 100 * MIB


def test_under_the_cap_succeeds_and_the_peak_is_seen():
    _support()
    r = run_capped(ALLOC, 1 << 30, "under")
    assert r["ok"] and r["exit_code"] == 0 and not r["oom_killed"] and "held" in r["output_tail"]
    assert r["peak_bytes"] >= 200 * MIB and r["peak_anon_bytes"] >= 200 * MIB
    assert r["peak_anon_bytes"] <= r["peak_bytes"] + 8 * MIB


def test_timeout_kills_the_step():
    _support()
    r = run_capped([sys.executable, "-c", "import time; time.sleep(30)"], "100MiB", "slow", timeout_s=0.5)
    assert r["timed_out"] and not r["ok"] and r["wall_s"] < 10


def test_plan_runs_and_writes_the_table(tmp_path):
    _support()
    plan = {"name": "cg_test", "cap": "1GiB", "env": {"X_TEST": "1"}, "steps": [
        {"name": "ok", "cmd": ALLOC},
        {"name": "killed", "cmd": ALLOC, "cap": "100MiB"},
    ]}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    rc = _runner().main([str(tmp_path / "p.json"), "--out-dir", str(tmp_path)])
    assert rc == 1  # one step failed
    data = json.loads((tmp_path / "cg_test.json").read_text())
    assert [r["ok"] for r in data["rows"]] == ["yes", "no"] and data["rows"][1]["OOM kill"] == "yes"
    assert "peak anon" in (tmp_path / "cg_test.md").read_text() and data["machine"]["cpu"]
    assert (tmp_path / "cg_test-logs" / "ok.log").read_text().strip() == "held"


def test_bad_plans_are_one_line(tmp_path, capsys):
    run = _runner()
    for plan, pattern in [({"steps": []}, "non-empty 'steps'"), ({"steps": [{"name": "a"}]}, "needs 'name' and 'cmd'"),
                          ({"steps": [{"name": "a", "cmd": "true"}]}, "has no cap"),
                          ({"cap": "8GiB", "steps": [{"name": "a", "cmd": "true", "mem": 1}]}, "unknown keys"),
                          ({"cap": "lots", "steps": [{"name": "a", "cmd": "true"}]}, "8GiB")]:
        (tmp_path / "p.yaml").write_text(json.dumps(plan))
        assert run.main([str(tmp_path / "p.yaml"), "--dry-run"]) == 2
        assert pattern in capsys.readouterr().err
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("1GB") == 10**9 and parse_bytes("100M") == 100 * MIB
