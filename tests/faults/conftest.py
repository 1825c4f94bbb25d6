"""Session fixtures of the fault-injection suite: tiny checkpoints built once (seconds), shared
read-only by every case (each case also checks that they are byte-identical afterwards)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("SPARSE_RUNTIME_DATA", ""))


class World:
    """Paths of the shared fixtures, and ``fmt`` to fill a case's placeholders."""

    def __init__(self, root: Path):
        self.root = root
        self.P = root / "pruned"      # tiny-llama, wanda 50 %, test protocol (manifest verified)
        self.A = root / "adapter"     # LoRS adapter on P (2 steps, with its resumable checkpoint)
        self.O = root / "onnx"        # ONNX export of P
        self.D = root / "dense"       # plain tiny-llama HF directory, no manifest
        self.DATA = root / "data"     # a small copy of the shared C4 sample and WikiText-2

    def fmt(self, argv, T: Path) -> list[str]:
        m = {"P": self.P, "A": self.A, "O": self.O, "D": self.D, "DATA": self.DATA, "T": T}
        return [a.format(**m) if isinstance(a, str) else str(a) for a in argv]

    def shared(self) -> list[Path]:
        return [self.P, self.A, self.O, self.D, self.DATA]


def _run(argv):
    from sparse_runtime.cli import main

    rc = main([str(a) for a in argv])
    assert rc == 0, argv


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    if not DATA.is_dir():
        pytest.skip("SPARSE_RUNTIME_DATA does not point at the shared data")
    import sparse_runtime as sr

    w = World(tmp_path_factory.mktemp("faults-world"))
    (w.DATA / "c4").mkdir(parents=True)
    with open(DATA / "c4" / "c4_sample.jsonl", encoding="utf-8") as f:
        (w.DATA / "c4" / "c4_sample.jsonl").write_text("".join(next(f) for _ in range(60)))
    (w.DATA / "wikitext-2").mkdir()
    src = next((DATA / "wikitext-2").rglob("wiki.test.raw"))
    rel = src.relative_to(DATA)
    (w.DATA / rel).parent.mkdir(parents=True, exist_ok=True)
    (w.DATA / rel).write_text(src.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    (w.DATA / "alpaca").mkdir()
    records = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text(encoding="utf-8"))[:64]
    (w.DATA / "alpaca" / "alpaca_5000.json").write_text(json.dumps(records, indent=1))
    _run(["prune", "tiny-llama", "--sparsity", "0.5", "--protocol", "test", "--data-dir", w.DATA, "--out", w.P])
    _run(["finetune", w.P, "--method", "lors", "--data", "c4", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
          "--rank", "2", "--init-samples", "2", "--save-every", "1", "--data-dir", w.DATA, "--out", w.A])
    _run(["export", w.P, "--format", "onnx", "--out", w.O])
    lm = sr.load_model("tiny-llama")
    lm.model.save_pretrained(w.D, safe_serialization=True)
    return w
