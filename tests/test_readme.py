"""The README as a newcomer reads it: every command and the Python snippet work as written.

The commands are taken from the README's ``bash`` blocks, so an edit that breaks one fails here.
Each is parsed by the CLI's own parser; those that run in seconds on a tiny model are then run in
README order, in a temporary directory, with the real model swapped for ``tiny-llama`` and tiny
calibration/training settings appended (argparse keeps the last value of a repeated option). The
few that cannot run here (a GPU, the network, a server that does not return) are parsed only. The
real-model runs (``-m slow``) do what ``make demo`` does.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REAL_MODEL = "smollm2-135m"
TINY = "tiny-llama"

# appended to a command (by its verb) so it runs in seconds on the tiny model
TINY_ARGS = {
    "prune": ["--protocol", "test"],
    "repair": ["--protocol", "test"],
    "finetune": ["--protocol", "test", "--steps", "2", "--seq-len", "512", "--batch-size", "2"],
    "merge": ["--protocol", "test"],
    "eval": ["--protocol", "test", "--limit", "2"],
    "generate": ["--max-new-tokens", "4"],
    "bench": ["--scenarios", "decode:1@16", "--decode-steps", "2"],
}
# verbs only parsed: they need the network (engines install), never return (serve), or are slow
# even on a tiny model (zero-shot over every task)
PARSE_ONLY = {"engines", "serve", "eval"}
# what a command's output must show the user
EXPECT = {
    "repair": ("| sparsity (measured) |", "| masks |"),
    "merge": ("| sparsity | target ", "verified", "| checkpoint |"),
    "export bitmask": ("compressed-tensors==0.14.0.1",),
    "export gguf": ("llama-cli -m",),
}


def expected_output(argv: list[str]) -> tuple[str, ...]:
    """What ``argv``'s output must show: by verb, or by verb and format for exports."""
    if argv[0] == "export" and "--format" in argv:
        return EXPECT.get(f"export {argv[argv.index('--format') + 1]}", ())
    return EXPECT.get(argv[0], ())


def bash_lines(text: str) -> list[str]:
    return [ln.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def readme_commands() -> list[str]:
    return [ln for ln in bash_lines(README.read_text()) if ln.startswith("sparse-runtime ")]


def argv_of(line: str) -> list[str]:
    return shlex.split(line, comments=True)[1:]


def test_readme_commands_are_plain_words():
    """A pasted line must not hold shell syntax the reader did not mean (``--format a|b`` pipes)."""
    for line in readme_commands():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.commenters = "#"
        ops = [t for t in lex if t and set(t) <= set("|&;<>()")]
        assert not ops, f"README command holds shell operators {ops}: {line}"


def test_readme_commands_parse():
    from sparse_runtime.cli import build_parser

    parser = build_parser()
    cmds = readme_commands()
    assert len(cmds) >= 10
    for line in cmds:
        try:
            parser.parse_args(argv_of(line))
        except SystemExit as e:  # argparse's way of saying no
            pytest.fail(f"README command does not parse ({e}): {line}")


def test_readme_outputs_are_distinct():
    """Two lines writing the same --out would make the second refuse (or replace the first)."""
    outs = [a[a.index("--out") + 1] for a in map(argv_of, readme_commands()) if "--out" in a]
    assert len(outs) == len(set(outs)), outs


def test_readme_says_where_data_is_before_any_command():
    text = README.read_text()
    first = text.index("sparse-runtime ", text.index("## Command line"))
    assert "export SPARSE_RUNTIME_DATA=" in text[text.index("## Command line"):first + 200]


def _tiny(argv: list[str]) -> list[str]:
    argv = [TINY if a == REAL_MODEL else str(ROOT / a) if a.startswith("recipes/") else a for a in argv]
    if argv[0] == "run":
        argv += ["--model", TINY, "--protocol", "test"]
    if argv[0] == "prune" and "atp" in argv:  # ATP's beta search: 2 candidates on 2 held-out windows
        argv += ["--atp-candidates", "2", "--allocation-option", "heldout_windows=2"]
    if argv[0] == "finetune" and "lors" in argv:
        argv += ["--init-samples", "2"]
    if argv[0] == "finetune" and "seft" in argv:  # the tiny layers hold fewer free positions than rank 8 asks
        argv += ["--rank", "2", "--seft-init-samples", "2"]
    return argv + TINY_ARGS.get(argv[0], [])


def _slow_on_tiny(argv: list[str]) -> bool:
    """Lines that take 10-20 s even on the tiny model (an ONNX export per model, LoSA's pruning
    schedule): the fast suite parses them, ``-m slow`` runs them too."""
    return argv[0] == "bench" or (argv[0] == "finetune" and "losa" in argv)


def _hardware_missing(argv: list[str]) -> bool:
    """Lines for hardware this machine lacks: a CUDA device, or AVX-512 VNNI for W8A8 (``--act-dtype``,
    which the engines refuse in one line elsewhere)."""
    if "--device" in argv and not torch.cuda.is_available():
        return True
    if "--act-dtype" in argv:
        from sparse_runtime.kernels import native

        return not native.available() or native.w8a8_isa(native.select_isa(), "dense") != "avx512"
    return False


def _run_readme(tmp_path: Path, capsys, include_slow: bool) -> list[str]:
    from sparse_runtime.cli import main

    ran = []
    for line in readme_commands():
        argv = _tiny(argv_of(line))
        if argv[0] in PARSE_ONLY or _hardware_missing(argv):
            continue
        if _slow_on_tiny(argv) and not include_slow:
            continue
        t0 = time.perf_counter()
        rc = main(argv)
        out = capsys.readouterr()
        print(f"{time.perf_counter() - t0:6.1f} s  {' '.join(argv)}", file=sys.__stderr__)
        assert rc == 0, f"README command failed on {TINY} (rc {rc}): {' '.join(argv)}\n{out.err[-2000:]}"
        ran.append(argv[0])
        for want in expected_output(argv):  # results a user can read, not raw dicts
            assert want in out.out, f"{' '.join(argv)} printed no {want!r}:\n{out.out[-2000:]}"
    from sparse_runtime.runtime import get_engine

    report = (tmp_path / "runs" / "demo" / "report.md").read_text()
    speed = "x dense" if get_engine("sparse-cpu").available()[0] else "sparse-cpu not measured"
    assert "## Summary" in report and "- quality:" in report and speed in report and "bitmask ->" in report
    return ran


def test_readme_commands_run_on_a_tiny_model(tmp_path, monkeypatch, data_dir, capsys):
    monkeypatch.chdir(tmp_path)
    ran = _run_readme(tmp_path, capsys, include_slow=False)
    assert {"prune", "repair", "finetune", "merge", "export", "generate", "run"} <= set(ran)


@pytest.mark.slow
def test_readme_commands_all_run_on_a_tiny_model(tmp_path, monkeypatch, data_dir, capsys):
    monkeypatch.chdir(tmp_path)
    ran = _run_readme(tmp_path, capsys, include_slow=True)
    assert {"prune", "repair", "finetune", "merge", "export", "generate", "bench", "run"} <= set(ran)


def python_snippet() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_readme_python_snippet_runs(data_dir):
    code = python_snippet().replace(f'"{REAL_MODEL}"', f'"{TINY}"')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, SPARSE_RUNTIME_DATA=str(data_dir)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) > 1


@pytest.mark.slow
def test_demo_on_the_real_model(tmp_path, data_dir):
    """What ``make demo`` runs (minutes): the report shows the quality change and the speedup."""
    from sparse_runtime.cli import main

    assert main(["run", str(ROOT / "recipes" / "demo.yaml"), "--workdir", str(tmp_path / "demo")]) == 0
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "- quality: WikiText-2 perplexity" in report and "- speed: sparse-cpu decode" in report
    assert "bitmask ->" in report and "verified on load" in report


@pytest.mark.slow
def test_readme_python_snippet_on_the_real_model(data_dir):
    r = subprocess.run([sys.executable, "-c", python_snippet()], capture_output=True, text=True, cwd=ROOT,
                       timeout=900, env=dict(os.environ, SPARSE_RUNTIME_DATA=str(data_dir)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 10 < float(r.stdout.strip().splitlines()[-1]) < 100


def test_top_level_help_is_plain_text():
    from sparse_runtime.cli import build_parser

    text = build_parser().format_help()
    assert "``" not in text and ":func:" not in text and "$SPARSE_RUNTIME_DATA" in text


def test_known_harmless_messages_are_dropped_and_others_kept():
    import logging

    from sparse_runtime import quiet

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    lg = logging.getLogger("transformers.models.llama.tokenization_llama_fast")
    h = Keep()
    lg.addHandler(h)
    try:
        quiet.install()
        lg.warning("You are using the default legacy behaviour of the <class 'X'>. This is expected")
        lg.warning("something the user must read")
        quiet.uninstall()
        lg.warning("You are using the default legacy behaviour again")
    finally:
        lg.removeHandler(h)
        quiet.uninstall()
    assert seen == ["something the user must read", "You are using the default legacy behaviour again"]


def test_phase_labels_every_bar_inside_it(monkeypatch):
    """ATP's beta search and LoRS's init name themselves on every bar they open."""
    import io

    from sparse_runtime.progress import phase, progress

    monkeypatch.delenv("SPARSE_RUNTIME_QUIET", raising=False)
    sink = io.StringIO()
    with phase("ATP beta search: candidate 1/4, beta=0.002"):
        list(progress(range(2), desc="held-out ppl", file=sink))
    list(progress(range(2), desc="plain", file=sink))
    text = sink.getvalue()
    assert "ATP beta search: candidate 1/4, beta=0.002: held-out ppl" in text
    assert "plain" in text and ": plain" not in text


def test_every_option_has_help():
    """`--help` is the newcomer's reference: no flag without a line saying what it does."""
    import argparse

    from sparse_runtime.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{name} {a.option_strings[-1] if a.option_strings else a.dest}"
            for name, sp in sub.choices.items() for a in sp._actions
            if not a.help and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    assert not bare, f"options without help: {bare}"
