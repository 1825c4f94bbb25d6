"""Every benchmark script at least compiles.

Why: benchmarks run for hours outside the test suite, and a script that does not parse is found
only when someone starts it (bench_dsnot.py carried an unterminated string for a session). Parsing
costs milliseconds; running them is the benchmarks' own job (docs/protocols.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_there_are_benchmarks():
    assert len(SCRIPTS) > 10


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_parses(path):
    ast.parse(path.read_text(), filename=str(path))
