"""``deepsparse``: Neural Magic's DeepSparse 1.8 through a worker in its own virtual environment.

Licence: the DeepSparse Community License allows evaluation in development and testing only, not
production use; DeepSparse is end of life (deprecated June 2025). Every report that uses this
engine says so (:data:`LICENCE`).

How it runs:
- the env is made by ``sparse-runtime engines install deepsparse``
  (:mod:`sparse_runtime.runtime.deepsparse_env`: Python 3.11, deepsparse 1.8.0, onnx 1.14, numpy<2);
- this engine starts :mod:`deepsparse_session` in that env (``NM_DISABLE_ANALYTICS=1`` always) and
  keeps it alive; compiled engines stay in the worker; each compile is on a COPY of the .onnx;
- DeepSparse optimises static shapes only, so it runs the exporters' ``deepsparse`` export (a
  prefill graph of fixed batch x length and a single-token decode graph with a fixed-size cache).
  Given a checkpoint, the engine exports the shapes it needs once (cached); a prompt shorter than the
  prefill length is left-padded and masked; a sequence may grow to ``cache_length`` tokens in all
  (default prefill_length + 64): DeepSparse 1.8 ABORTS the process on a position id >= the cache
  length it compiled (found here), so the worker refuses that step and ``generate`` stops there;
- evidence: ``fraction_of_supported_ops`` of every compiled graph (1.0 = all of it runs in
  DeepSparse's optimised runtime; 0 = it fell back to its bundled ONNX Runtime).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import SparseRuntimeError
from .base import Engine, EngineUnavailableError, Scenario, benchmark_ids, load_tokenizer
from .registry import ENGINES

TAG = "@@SPARSE-RUNTIME-RESULT@@"


def _env_module():
    from . import deepsparse_env

    return deepsparse_env


LICENCE = ("DeepSparse Community License: evaluation in development and testing only, not production use "
           "(DeepSparse is end of life since June 2025)")


class _Worker:
    """The persistent worker process and its line protocol."""

    def __init__(self) -> None:
        env = _env_module()
        self.log = tempfile.NamedTemporaryFile(prefix="ds-session-", suffix=".log", delete=False)
        penv = env._env()
        penv["NM_DISABLE_ANALYTICS"] = "1"
        self.proc = subprocess.Popen([str(env.python_path()), "-u", str(Path(__file__).with_name("deepsparse_session.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=penv, bufsize=1)
        self.lock = threading.Lock()

    def call(self, **req: Any) -> dict[str, Any]:
        with self.lock:
            if self.proc.poll() is not None:
                raise SparseRuntimeError(f"the DeepSparse worker exited ({self.proc.returncode}): {self._tail()}")
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise SparseRuntimeError(f"the DeepSparse worker died during {req.get('op')}: {self._tail()}")
                if line.startswith(TAG):
                    res = json.loads(line[len(TAG):])
                    if "error" in res:
                        raise SparseRuntimeError(f"DeepSparse {req.get('op')} failed: {res['error']}")
                    return res

    def _tail(self) -> str:
        try:
            return Path(self.log.name).read_text()[-600:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


@ENGINES.register("deepsparse")
class DeepSparseEngine(Engine):
    name = "deepsparse"
    description = "DeepSparse 1.8 (own venv, static-shape ONNX; evaluation-only licence)"
    install_hint = "sparse-runtime engines install deepsparse"
    exploits_sparsity = "unstructured (AVX-512 only)"

    @classmethod
    def check_available(cls) -> None:
        env = _env_module()
        if not env.is_installed():
            raise EngineUnavailableError(f"DeepSparse is not installed (looked in {env.env_dir()}); run "
                                         f"`{cls.install_hint}` (its own Python 3.11 env; {LICENCE})")

    def _load(self, model: str, prefill_length: int = 128, cache_length: Optional[int] = None,
              batch_size: int = 1, **_: Any) -> None:
        from .exports import export_format

        p = Path(model)
        self.checkpoint: Optional[str] = model
        self._exports: dict[tuple[int, int, bool, str], Path] = {}
        self._cache_len: dict[Path, int] = {}
        if p.is_dir() and export_format(p) == "deepsparse":
            lay = json.loads((p / "deepsparse_layout.json").read_text())
            prefill_length, cache_length, batch_size = lay["prefill_length"], lay["cache_length"], lay["batch_size"]
            self._exports[(batch_size, prefill_length, "decode.onnx" in lay["graphs"],
                           lay.get("prefill_logits", "all"))] = p
            self._cache_len[p] = int(cache_length)
            src = json.loads((p / "export_manifest.json").read_text()).get("source", {})
            self.checkpoint = src.get("path") or src.get("spec")
        self.L = int(prefill_length)
        self.C = int(cache_length or self.L + 64)
        self.B = int(batch_size)
        self.worker = _Worker()
        self.compiled: dict[str, dict[str, Any]] = {}  # live in the worker
        self.seen: dict[str, dict[str, Any]] = {}  # every graph compiled so far (for the evidence)
        self._tmp = Path(tempfile.mkdtemp(prefix="sr-ds-io-"))
        self.default = self._export(self.B, self.L, True, self.C)
        self.tokenizer = load_tokenizer(self.default)
        self._vocab = int(json.loads((self.default / "config.json").read_text())["vocab_size"])
        self._seq: Optional[tuple[str, str]] = None

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_length(self) -> int:
        return self.C

    # -- exports and compiled graphs ------------------------------------------------------------
    def _export(self, batch: int, length: int, decode: bool, cache: Optional[int] = None,
                logits: str = "all") -> Path:
        """An export with these static shapes; ``logits="last"``: its prefill graph keeps only the last
        position's logits (the prefill timer's graph: the work our own engines' prefill does)."""
        for (b, l, d, lg), path in self._exports.items():
            if b == batch and l == length and (d or not decode) and lg == logits:
                return path
        if not self.checkpoint:
            raise SparseRuntimeError("this DeepSparse export has other static shapes and its source checkpoint "
                                     "is unknown; export it again for the needed shape")
        from .exports import ensure_export

        path = ensure_export(self.checkpoint, "deepsparse", prefill_length=int(length),
                             cache_length=int(cache or length + 64), batch_size=int(batch), decode=bool(decode),
                             check_engine=False, **({"prefill_logits": logits} if logits != "all" else {}))
        self._exports[(batch, length, decode, logits)] = path
        self._cache_len[path] = int(cache or length + 64)
        return path

    def _compile(self, path: Path, graph: str, batch: int) -> str:
        key = f"{path}/{graph}"
        if key not in self.compiled:
            res = self.worker.call(op="compile", key=key, model=str(path / graph), batch_size=batch,
                                   num_cores=self.threads)
            shape = json.loads((path / "deepsparse_layout.json").read_text())
            self.compiled[key] = self.seen[key] = {"graph": graph, "batch": batch,
                                  "shape": f"b{shape['batch_size']} L{shape['prefill_length']} C{shape['cache_length']}"
                                           + (" last-logits" if shape.get("prefill_logits") == "last" else ""),
                                  **{k: res[k] for k in ("fraction_of_supported_ops", "compile_seconds", "rss_delta_mb")}}
        return key

    def _save(self, name: str, arr: np.ndarray) -> str:
        f = self._tmp / f"{name}.npy"
        np.save(f, np.ascontiguousarray(arr, dtype=np.int64))
        return str(f)

    # -- sequence ---------------------------------------------------------------------------------
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        b, n = ids.shape
        if b != self.B:
            raise SparseRuntimeError(f"this DeepSparse engine was compiled for batch {self.B}, got {b}")
        if n > self.L:
            raise SparseRuntimeError(f"prompt of {n} tokens exceeds the static prefill length {self.L}; "
                                     "load the engine with a larger prefill_length")
        pk = self._compile(self.default, "prefill.onnx", self.B)
        dk = self._compile(self.default, "decode.onnx", self.B)
        out = str(self._tmp / "logits.npy")
        self.worker.call(op="prefill", prefill=pk, decode=dk, ids=self._save("ids", ids), out=out, L=self.L, C=self.C)
        self._seq = (pk, dk)
        return np.load(out)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        if self._seq is None:
            raise RuntimeError("decode before prefill")
        out = str(self._tmp / "logits.npy")
        self.worker.call(op="decode", decode=self._seq[1], ids=self._save("ids", ids), out=out)
        return np.load(out)

    # -- timing (measured inside the worker) --------------------------------------------------------
    def timer(self, scenario: Scenario, seed: int = 0) -> Callable[[], float]:
        ids = benchmark_ids(self.vocab_size, scenario.batch, scenario.tokens, seed)
        if scenario.kind == "prefill":
            # last-position logits, as Engine.prefill_next and every engine's prefill timer (docs/protocols.md)
            path = self._export(scenario.batch, scenario.tokens, False, logits="last")
            pk = self._compile(path, "prefill.onnx", scenario.batch)
            f = self._save(f"p{scenario.batch}x{scenario.tokens}", ids)

            def run_prefill() -> float:
                return self.worker.call(op="time_prefill", prefill=pk, ids=f, L=scenario.tokens)["seconds"][0]
            return run_prefill
        path = self._export(scenario.batch, scenario.tokens, True, scenario.tokens + max(64, scenario.steps))
        C = self._cache_len[path]
        if scenario.tokens + scenario.steps > C:
            raise SparseRuntimeError(f"{scenario.label} with {scenario.steps} steps needs a cache of "
                                     f"{scenario.tokens + scenario.steps}, the export has {C}")
        pk = self._compile(path, "prefill.onnx", scenario.batch)
        dk = self._compile(path, "decode.onnx", scenario.batch)
        self.worker.call(op="prepare_decode", prefill=pk, decode=dk, ids=self._save("ctx", ids),
                         L=scenario.tokens, C=C)
        steps = self._save("steps", benchmark_ids(self.vocab_size, scenario.batch, scenario.steps, seed + 1))

        def run_decode() -> float:
            return self.worker.call(op="time_decode", decode=dk, ids=steps)["seconds"][0]
        return run_decode

    def release(self, scenario: Scenario) -> None:
        """Drop the compiled graphs of other shapes than the engine's default (batch B x L prefill and
        its decode graph, which prefill/decode/generate and the default-shape scenarios share):
        with five models in five workers, keeping every scenario's graphs would hold gigabytes,
        and recompiling the shared ones would cost a compile each time."""
        keep = {f"{self.default}/prefill.onnx", f"{self.default}/decode.onnx"}
        for key in list(self.compiled):
            if key not in keep:
                self.worker.call(op="release", key=key)
                self.compiled.pop(key)

    # -- reporting --------------------------------------------------------------------------------
    def evidence(self) -> dict[str, Any]:
        fr = {f"{v['shape']}/{v['graph']}": round(v["fraction_of_supported_ops"], 4) for v in self.seen.values()}
        vals = [v["fraction_of_supported_ops"] for v in self.seen.values()]
        return {"sparse_path": "DeepSparse optimised runtime" if vals and min(vals) > 0 else "fallback (0 % optimised)",
                "fraction_of_supported_ops": min(vals) if vals else None, "graphs": fr}

    def info(self) -> dict[str, Any]:
        st = _env_module().status()
        return {**super().info(), "deepsparse": st.get("deepsparse"), "deepsparse_numpy": st.get("numpy"),
                "licence": LICENCE, "prefill_length": self.L, "cache_length": self.C, "batch": self.B}

    def memory(self) -> dict[str, Any]:
        try:
            rss = self.worker.call(op="rss")["rss_mb"]
        except SparseRuntimeError:
            rss = None
        return {"worker_rss_mb": None if rss is None else round(rss, 1),
                "max_graph_rss_mb": round(max([v["rss_delta_mb"] for v in self.seen.values()] or [0]), 1),
                "compile_seconds": round(sum(v["compile_seconds"] for v in self.seen.values()), 1)}

    def close(self) -> None:
        w = getattr(self, "worker", None)
        if w is not None:
            w.close()
            self.worker = None
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True) if getattr(self, "_tmp", None) else None
