"""Every documentation reference resolves inside the repository.

Code comments, docstrings, docs, recipes and benchmark results cite ``docs/FILE.md`` (sometimes with a
``#section`` anchor) for the facts they rely on. These tests keep those citations honest: the file
exists, the anchor is a heading of that file (GitHub's slug rules), and nothing points at notes
that live outside the repository (the project's development notes were never part of it; what the
code relies on is written in ``docs/``). Plain text scanning, well under a second.
"""
from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cpp", ".inc", ".h", ".json", ".sh", ".cfg", ".txt"}
TEXT_NAMES = {"Makefile", "run"}  # .ci/run
SKIP_DIRS = {".git", ".venv", ".cache", "__pycache__", "runs", "build", "dist", ".pytest_cache", "node_modules"}

# ``docs/x.md`` or ``docs/x.md#anchor``, not part of a longer path (``foo/docs/x.md``)
CITE = re.compile(r"(?<![\w./-])docs/([\w./-]+?\.md)(?:#([\w-]+))?")
# notes outside the repository: the development reference notes, by path or by bare name
OUTSIDE = [
    (re.compile(r"shared/reference"), "the outside reference notes"),
    (re.compile(r"shared/data/README"), "the outside data folder's README (see docs/data.md)"),
    (re.compile(r"(?<![\w./-])(methods|protocols|stack|ecosystem)\.md"), "a bare note name (cite docs/NAME.md)"),
]


def _listed_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), else a walk that skips build/venv dirs."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, timeout=20).stdout.decode()
        return [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        return [p for p in ROOT.rglob("*") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]


@lru_cache(maxsize=1)
def text_files() -> tuple[tuple[Path, str], ...]:
    files = []
    for p in _listed_files():
        if p.resolve() == THIS or not (p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES):
            continue
        if not p.is_file():  # listed by git but deleted in the work tree
            continue
        try:
            files.append((p, p.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return tuple(files)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)  # keeps letters, digits, '_', '-' and spaces
    return s.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(doc: Path) -> frozenset[str]:
    """Every heading anchor of a markdown file (fenced code skipped; repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s{0,3}(`{3,}|~{3,})", line)
        if m:
            if fence is None:
                fence = m.group(1)[0]
            elif m.group(1)[0] == fence:
                fence = None
            continue
        if fence is not None:
            continue
        h = re.match(r"\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not h:
            continue
        slug = github_slug(h.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


def _citations():
    for path, text in text_files():
        for m in CITE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            yield f"{path.relative_to(ROOT)}:{line}", m.group(1), m.group(2)


def test_github_slug_rules():
    assert github_slug("Latency and speedup") == "latency-and-speedup"
    assert github_slug("N:M notation") == "nm-notation"
    assert github_slug("`bitmask`: compressed-tensors' former `sparse-bitmask`") == \
        "bitmask-compressed-tensors-former-sparse-bitmask"
    assert github_slug("LoSA round loop") == "losa-round-loop"


def test_cited_docs_exist():
    missing = sorted({f"{where}: docs/{name}" for where, name, _ in _citations() if not (ROOT / "docs" / name).is_file()})
    assert not missing, "cited documentation files that do not exist:\n" + "\n".join(missing)


def test_cited_anchors_resolve():
    bad = []
    for where, name, anchor in _citations():
        doc = ROOT / "docs" / name
        if anchor and doc.is_file() and anchor.lower() not in anchors(doc):
            bad.append(f"{where}: docs/{name}#{anchor}")
    assert not bad, "cited anchors that are no heading of their file:\n" + "\n".join(sorted(set(bad)))


def test_no_reference_outside_the_repository():
    bad = []
    for path, text in text_files():
        for pattern, what in OUTSIDE:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r} ({what})")
    assert not bad, "references to notes outside the repository:\n" + "\n".join(bad)


def test_docs_are_found():
    """The scan sees the documentation itself (guards against a scan that silently reads nothing)."""
    names = {p.relative_to(ROOT).as_posix() for p, _ in text_files()}
    assert "docs/architecture.md" in names and "sparse_runtime/protocols.py" in names
