"""Bad inputs through the command line, one row of ``cases.CASES`` each (docs/reliability.md).

Each case: the exit code, exactly one error line naming the fix, no traceback, and every file that
existed before (the shared fixtures, whatever the case's setup made) byte-identical afterwards,
with nothing new left behind (no half-written output, no hidden temporary)."""
from __future__ import annotations

import pytest

from .cases import CASES
from .harness import assert_one_line, diff, run_inprocess, snapshot


def _params():
    for c in CASES:
        marks = []
        if c.xfail:
            marks.append(pytest.mark.xfail(strict=False, reason=c.xfail))
        if c.slow:
            marks.append(pytest.mark.slow)
        yield pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_one_line_and_loses_nothing(case, world, tmp_path, capsys, monkeypatch):
    T = tmp_path / "case"
    T.mkdir()
    if case.setup:
        case.setup(world, T)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v.format(T=T))
    if case.cwd:
        monkeypatch.chdir(case.cwd.format(T=T))
    before = snapshot(T, *world.shared())
    res = run_inprocess(world.fmt(case.argv, T), capsys)
    assert_one_line(res, case.rc, case.pattern)
    changes = diff(before, snapshot(T, *world.shared()))
    assert not changes, f"a failed run changed files: {changes[:10]}"
