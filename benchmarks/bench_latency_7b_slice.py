"""Protocol ``latency-7b-slice`` (docs/scale.md#latency-7b-slice): ONNX Runtime and DeepSparse beside
our engines on a depth slice of LLaMA-2-7B (the first N of 32 decoder blocks, full-size embedding and
lm_head), dense against Wanda 70 %, fp32 values.

    python benchmarks/bench_latency_7b_slice.py --prepare-only          # synth, prune, exports (untimed)
    python benchmarks/bench_latency_7b_slice.py [--save NAME]          # time every configuration
    python benchmarks/bench_latency_7b_slice.py --smoke                # the same on tiny-llama (~1 min)

Why a slice: the full 7B model in fp32 is 27 GB, more than this machine's memory, and the ONNX engines
need a whole-graph export (ORT loads it entirely; DeepSparse compiles static graphs and copies them),
so the whole model cannot run there. A slice keeps every per-token matrix at its real 7B shape; what
it changes is the share of the embedding row and lm_head in a token's bytes, which the
memory-bandwidth bound beside each ratio accounts for. Latency and memory only: random weights
(``sparse-runtime synth``), masks from Wanda on them (``--protocol scale`` calibration).

Configurations (each in a fresh process, in its own memory cgroup when the machine allows it, as
``bench_latency_7b.py``): ``lean-cpu`` dense and ``sparse-cpu`` 70 % (ours, fp32), ``ort-cpu`` dense
ONNX, ``ort-sparse`` (the same ONNX with pruned MatMuls as our SparseLinear custom op) on the 70 %
model, ``deepsparse`` dense and 70 %, and ours again with ``--prefill-dtype bfloat16`` (``-bf16p``:
prompt products in bf16, on AMX tiles where the CPU has them; decode unchanged), the 70 % model also
with int8 codes. Per configuration, after one warm-up: ``--rounds`` rounds of
prefill 1 x 128 and decode at context 128 (``--steps`` tokens per round, ms/token), 2 threads,
medians with min-max. An engine that is not installed or fails gets a row that says why.

Disk: each fp32 copy of a 2-block slice is ~2.6 GB. ``--prepare-only`` keeps the checkpoints and the
two ORT exports (~10 GB); DeepSparse's exports (three graphs per model, each with every weight, and a
copy per compile: ~4.5x the checkpoint) are made at the start of its configuration, after removing the
ORT exports no later configuration needs if disk is short, and removed after it unless
``--keep-exports``; without enough disk its row says so (docs/scale.md#latency-7b-slice).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency_7b import PAPERS, bound  # noqa: E402  (same bound and papers as latency-7b)

PROTOCOL = "latency-7b-slice"
# label: (engine, which model); the sparse partner of each dense engine is in PAIRS
CONFIGS = {
    "lean-dense": ("lean-cpu", "dense"),
    "sparse-cpu-70": ("sparse-cpu", "sparse"),
    "ort-dense": ("ort-cpu", "dense"),
    "ort-sparse-70": ("ort-sparse", "sparse"),
    "deepsparse-dense": ("deepsparse", "dense"),
    "deepsparse-70": ("deepsparse", "sparse"),
    # ours with --prefill-dtype bfloat16 (AMX tiles where the CPU has them; decode unchanged), and the
    # 70 % model with int8 codes on top
    "lean-dense-bf16p": ("lean-cpu", "dense"),
    "sparse-cpu-70-bf16p": ("sparse-cpu", "sparse"),
    "sparse-cpu-70-int8-bf16p": ("sparse-cpu", "sparse"),
    # int8 codes, weight-only and with int8 activations (W8A8, --act-dtype int8 / int8-g64), dense and 70 %
    "lean-dense-int8": ("lean-cpu", "dense"),
    "sparse-cpu-70-int8": ("sparse-cpu", "sparse"),
    "lean-dense-int8-a8": ("lean-cpu", "dense"),
    "sparse-cpu-70-int8-a8": ("sparse-cpu", "sparse"),
    "lean-dense-int8-a8g64": ("lean-cpu", "dense"),
    "sparse-cpu-70-int8-a8g64": ("sparse-cpu", "sparse"),
}
EXTRA_OPTIONS = {"lean-dense-bf16p": {"prefill_dtype": "bfloat16"},
                 "sparse-cpu-70-bf16p": {"prefill_dtype": "bfloat16"},
                 "sparse-cpu-70-int8-bf16p": {"prefill_dtype": "bfloat16", "dtype": "int8"},
                 "lean-dense-int8": {"dtype": "int8"}, "sparse-cpu-70-int8": {"dtype": "int8"},
                 "lean-dense-int8-a8": {"dtype": "int8", "act_dtype": "int8"},
                 "sparse-cpu-70-int8-a8": {"dtype": "int8", "act_dtype": "int8"},
                 "lean-dense-int8-a8g64": {"dtype": "int8", "act_dtype": "int8-g64"},
                 "sparse-cpu-70-int8-a8g64": {"dtype": "int8", "act_dtype": "int8-g64"}}
PAIRS = {"sparse-cpu-70": "lean-dense", "ort-sparse-70": "ort-dense", "deepsparse-70": "deepsparse-dense",
         "sparse-cpu-70-bf16p": "lean-dense-bf16p", "sparse-cpu-70-int8-bf16p": "lean-dense-bf16p",
         "sparse-cpu-70-int8": "lean-dense-int8", "sparse-cpu-70-int8-a8": "lean-dense-int8-a8",
         "sparse-cpu-70-int8-a8g64": "lean-dense-int8-a8g64"}
OURS = "sparse-cpu-70"
MARGIN = 2 * 10**9  # disk left free for the machine's other work
DECODE, PREFILL = "decode b1 @ ctx 128", "prefill b1 x 128"


def engine_options(engine: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load options per engine: ours fp32 and streamed (as latency-7b), updated by a configuration's
    ``EXTRA_OPTIONS``; the ONNX engines run fp32 exports with their defaults (so the cached exports
    made by --prepare-only are the ones used)."""
    if engine in ("sparse-cpu", "lean-cpu"):
        return {"dtype": "float32", "stream": "on", **(extra or {})}
    return {}


# -- workers (fresh processes) -------------------------------------------------------------------
def worker(a) -> int:
    """One configuration: load, warm up, time, write JSON to ``a.result``."""
    import torch

    from sparse_runtime.runtime.base import Scenario
    from sparse_runtime.runtime.registry import load_engine

    t0 = time.perf_counter()
    eng = load_engine(a.engine, a.model, threads=a.threads,
                      **engine_options(a.engine, json.loads(a.options) if a.options else None))
    out: dict[str, Any] = {"engine": a.engine, "model": a.model, "load_s": time.perf_counter() - t0,
                           "threads": a.threads, "torch": torch.__version__}
    try:
        for sc in (Scenario("prefill", 128, 1), Scenario("decode", 128, 1, a.steps)):
            run = eng.timer(sc)
            run()  # warm-up
            times = [sc.per_unit(run()) for _ in range(a.rounds)]
            out[sc.label] = {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": times}
            eng.release(sc)  # DeepSparse: drop the prefill-only graph before the decode graphs compile
        out["info"] = {k: v for k, v in eng.info().items() if isinstance(v, (str, int, float, bool))}
        out["memory"] = eng.memory()
        out["evidence"] = eng.evidence()
    finally:
        eng.close()
    Path(a.result).write_text(json.dumps(out, indent=1, default=str))
    return 0


def prepare_worker(a) -> int:
    """Make the exports ``a.engine`` will use on ``a.model`` (cached under $SPARSE_RUNTIME_CACHE)."""
    if a.engine in ("ort-cpu", "ort-sparse"):
        from sparse_runtime.runtime.exports import ensure_export

        print(ensure_export(a.model, "onnx"))
    elif a.engine == "deepsparse":
        from sparse_runtime.runtime.registry import load_engine

        eng = load_engine("deepsparse", a.model, threads=a.threads)  # exports the default L=128 graphs
        try:
            print(eng._export(1, 128, False, logits="last"))  # the prefill timer's graph
        finally:
            eng.close()
    return 0


# -- driver ------------------------------------------------------------------------------------
def _env(work: Path) -> dict[str, str]:
    """The children's environment: exports cached under ``work/cache`` (so removing ``work`` removes
    everything this benchmark wrote), the installed engines (DeepSparse's env) linked from the usual cache."""
    from sparse_runtime.models.loading import cache_dir

    engines, link = cache_dir() / "engines", work / "cache" / "engines"
    if engines.is_dir() and not link.exists() and engines.resolve() != link.resolve():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(engines.resolve(), target_is_directory=True)
    env = dict(os.environ)
    env.update(SPARSE_RUNTIME_CACHE=str(work / "cache"), SPARSE_RUNTIME_QUIET="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    return env


def _cli(args: list[str], work: Path) -> None:
    """``sparse-runtime ARGS`` in a child process (its memory is returned when it exits)."""
    cmd = [sys.executable, "-c", "import sys; from sparse_runtime.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    print("+ sparse-runtime " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=_env(work), cwd=ROOT)


def make_models(a, work: Path) -> tuple[Path, Path]:
    """The dense slice and its Wanda 70 % pruning (each made once; kept under ``work``)."""
    dense, sparse = work / "dense", work / "w70"
    if (dense / "config.json").is_file():  # made by an earlier run: it must be the slice asked for now
        cfg = json.loads((dense / "config.json").read_text())
        from sparse_runtime.models.synthetic import synthetic_config

        want = synthetic_config(a.shape, a.layers)
        if (cfg.get("num_hidden_layers"), cfg.get("hidden_size")) != (want.num_hidden_layers, want.hidden_size):
            raise SystemExit(f"{dense} holds another model ({cfg.get('num_hidden_layers')} blocks, hidden "
                             f"{cfg.get('hidden_size')}); pass another --work or remove {work}")
    if not (dense / "config.json").is_file():
        _cli(["synth", "--shape", a.shape, "--layers", str(a.layers), "--dtype", "float32", "--out", str(dense),
              "--overwrite"], work)
    if not (sparse / "sparsity_manifest.json").is_file():
        _cli(["prune", str(dense), "--method", "wanda", "--sparsity", "0.7", "--protocol", "scale", "--stream", "on",
              "--out", str(sparse), "--overwrite"], work)
    return dense, sparse


def unavailable(engine: str) -> Optional[str]:
    from sparse_runtime.runtime.registry import get_engine

    ok, why = get_engine(engine).available()
    return None if ok else why


def prepare(a, work: Path, labels: list[str], dense: Path, sparse: Path, deepsparse: bool) -> dict[str, str]:
    """Exports for the ONNX engines (untimed); {label: error} for those that could not be made."""
    errors = {}
    for label in labels:
        engine, which = CONFIGS[label]
        if engine == "deepsparse" and not deepsparse or engine in ("lean-cpu", "sparse-cpu") or unavailable(engine):
            continue
        model = dense if which == "dense" else sparse
        cmd = [sys.executable, __file__, "--prepare-worker", "--engine", engine, "--model", str(model),
               "--threads", str(a.threads)]
        print(f"+ prepare {label}", flush=True)
        log = work / "logs" / f"prepare-{label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            r = subprocess.run(cmd, env=_env(work), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        if r.returncode:
            errors[label] = f"export failed (exit {r.returncode}): {last_error(log)}"
            print(f"  {label}: {errors[label]}", flush=True)
    return errors


def disk_short(work: Path, model: Path) -> Optional[str]:
    """Why DeepSparse cannot run for lack of disk, or None. Its three graphs each hold every weight
    and each compile works on a copy of one, which took 3.3 GB more for a 2.6 GB graph here (so
    about 4.5x the checkpoint at the peak); 2 GB are left for the machine's other work."""
    from sparse_runtime.runtime.exports import source_key

    if any((d / "deepsparse").is_dir() for d in (work / "cache" / "exports").glob(f"{source_key(str(model))}-*")):
        return None
    need = 4.5 * sum(f.stat().st_size for f in model.glob("*.safetensors")) + MARGIN
    free = shutil.disk_usage(work).free
    if free < need:
        return (f"skipped: its exports and compile need about {need / 1e9:.1f} GB of free disk (2 GB margin "
                f"included), {free / 1e9:.1f} GB free under {work}")
    return None


def drop_exports(work: Path, model: Path, fmt: str) -> bool:
    """Remove the cached ``fmt`` exports of ``model`` (GBs each at 7B shapes); whether any were there."""
    from sparse_runtime.runtime.exports import source_key

    found = False
    for d in (work / "cache" / "exports").glob(f"{source_key(str(model))}-*"):
        if (d / fmt).is_dir():
            shutil.rmtree(d, ignore_errors=True)
            found = True
    return found


def last_error(log: Path) -> str:
    """The most telling line of a failed run's log: the last one naming an error, else the last."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    hits = [ln for ln in lines if "Error" in ln or "error" in ln or "failed" in ln or "Killed" in ln]
    return ((hits or lines or ["no output"])[-1])[:300]


def run_config(a, work: Path, label: str, model: Path) -> dict[str, Any]:
    """Run one configuration's worker, capped when cgroups allow; what it measured plus how it ended."""
    from sparse_runtime.measure.cgroup import cgroup_support, parse_bytes, run_capped

    engine, _ = CONFIGS[label]
    res = work / "logs" / f"{label}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--model", str(model), "--threads",
           str(a.threads), "--rounds", str(a.rounds), "--steps", str(a.steps), "--result", str(res)]
    if label in EXTRA_OPTIONS:
        cmd += ["--options", json.dumps(EXTRA_OPTIONS[label])]
    log = work / "logs" / f"slice-{label}.log"
    if cgroup_support()[0] is not None:
        r = run_capped(cmd, parse_bytes(a.cap), f"slice-{label}", env=_env(work), log_dir=work / "logs", cwd=ROOT)
    else:  # no cgroup here (containers, CI): uncapped, peak not measured
        t0 = time.perf_counter()
        with open(log, "wb") as fh:
            p = subprocess.run(cmd, env=_env(work), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        r = {"exit_code": p.returncode, "oom_killed": False, "peak_anon_bytes": None, "wall_s": time.perf_counter() - t0}
    got = json.loads(res.read_text()) if res.is_file() else {}
    out = {"capped": r, **got}
    if not got:
        out["error"] = "OOM kill at the cap" if r.get("oom_killed") else f"exit {r['exit_code']}: {last_error(log)}"
    return out


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ms(v: Optional[dict]) -> str:
    return f"{_num(v['median'])} [{_num(v['min'])}-{_num(v['max'])}]" if v else "-"


def table(a, results: dict[str, dict], sparse: Path, dense: Path, slice_text: str) -> list[dict[str, Any]]:
    """One row per configuration: times, the sparse/dense ratio of its engine, our sparse-cpu's
    speedup over it, and (sparse rows) the memory-bandwidth bound of the ratio."""
    from sparse_runtime.models.streaming import CheckpointReader

    reader = CheckpointReader(str(dense))
    vocab_hidden = max(reader.shapes.get("lm_head.weight", (0, 0))[0], 1) * reader.shapes["model.embed_tokens.weight"][1]
    bw = round(bound(str(sparse), 4, vocab_hidden), 2)  # fp32 dense bytes over fp32 bitmask bytes
    ours = results.get(OURS, {})
    rows = []
    for label, r in results.items():
        engine, which = CONFIGS[label]
        peak = (r.get("capped") or {}).get("peak_anon_bytes")
        row: dict[str, Any] = {"configuration": label, "engine": engine, "model": f"{which} ({slice_text})",
                               "peak anon GiB": round(peak / 2**30, 2) if peak else "-",
                               "load s": round(r["load_s"], 1) if "load_s" in r else "-",
                               "prefill 1x128 ms": _ms(r.get(PREFILL)), "decode ms/token": _ms(r.get(DECODE))}
        d = results.get(PAIRS.get(label, ""), {})
        if d.get(DECODE) and r.get(DECODE):
            row["decode sparse/dense"] = round(d[DECODE]["median"] / r[DECODE]["median"], 2)
            row["prefill sparse/dense"] = round(d[PREFILL]["median"] / r[PREFILL]["median"], 2)
        if which == "sparse" and "int8" not in label:  # the bound is of fp32 values
            row["bandwidth bound"] = bw
        if label != OURS and ours.get(DECODE) and r.get(DECODE):
            row["sparse-cpu speedup (decode)"] = round(r[DECODE]["median"] / ours[DECODE]["median"], 2)
            row["sparse-cpu speedup (prefill)"] = round(r[PREFILL]["median"] / ours[PREFILL]["median"], 2)
        row["status"] = r.get("error") or r.get("skipped") or "ok"
        ev = (r.get("evidence") or {}).get("sparse_path")
        if ev and engine == "ort-sparse":
            row["status"] += f"; {ev.split(';')[0]}"
        if ev and engine == "deepsparse":
            row["status"] += (f"; {ev}, supported ops {(r.get('evidence') or {}).get('fraction_of_supported_ops')}, "
                              f"compile {(r.get('memory') or {}).get('compile_seconds')} s (not in load s)")
        rows.append(row)
    return rows


COLUMNS = ["configuration", "engine", "model", "peak anon GiB", "load s", "prefill 1x128 ms", "decode ms/token",
           "decode sparse/dense", "prefill sparse/dense", "bandwidth bound", "sparse-cpu speedup (decode)",
           "sparse-cpu speedup (prefill)", "status"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Protocol latency-7b-slice: ORT and DeepSparse beside our engines on a "
                                             "depth slice of LLaMA-2-7B (docs/scale.md#latency-7b-slice)")
    ap.add_argument("--work", default=None, help="models, exports and logs (default /work/scale/slice; "
                                                  "--smoke: /tmp/sr-latency-7b-slice-smoke)")
    ap.add_argument("--shape", default=None, help="synthetic shape (default llama-2-7b; --smoke: tiny-llama)")
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks kept (default 2)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="decode tokens per round (default 8; --smoke 2)")
    ap.add_argument("--cap", default="16GiB", help="memory cap of each configuration's cgroup")
    ap.add_argument("--prepare-only", action="store_true", help="make the models and ORT exports, time nothing")
    ap.add_argument("--keep-exports", action="store_true",
                    help="keep DeepSparse's exports (and make them in --prepare-only); default: removed after use")
    ap.add_argument("--smoke", action="store_true", help="tiny-llama, 1 round of 2 steps (checks the plumbing)")
    ap.add_argument("--save", default=None, help="result name under benchmarks/results/ (nothing saved without it)")
    for hidden in ("--engine", "--model", "--result", "--options"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.rounds = a.rounds or (1 if a.smoke else 3)
    a.steps = a.steps or (2 if a.smoke else 8)
    if a.worker:
        return worker(a)
    if a.prepare_worker:
        return prepare_worker(a)
    labels = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in labels if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configuration(s) {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
    a.shape = a.shape or ("tiny-llama" if a.smoke else "llama-2-7b")
    work = Path(a.work or ("/tmp/sr-latency-7b-slice-smoke" if a.smoke else "/work/scale/slice"))
    work.mkdir(parents=True, exist_ok=True)
    from sparse_runtime.models.synthetic import synthetic_config

    full = synthetic_config(a.shape).num_hidden_layers
    slice_text = f"{a.layers} of {full} blocks, full-size embedding and lm_head"

    dense, sparse = make_models(a, work)
    missing = {c: f"skipped: {why}" for c in labels if (why := unavailable(CONFIGS[c][0]))}
    if a.prepare_only:
        errors = prepare(a, work, [c for c in labels if c not in missing], dense, sparse, deepsparse=a.keep_exports)
        print(f"prepared under {work} ({', '.join(missing) or 'no'} skipped; export errors: {errors or 'none'})")
        return 0

    results: dict[str, dict] = {}
    for i, label in enumerate(labels):
        engine, which = CONFIGS[label]
        model = dense if which == "dense" else sparse
        if label in missing:
            results[label] = {"skipped": missing[label]}
        else:
            err = disk_short(work, model) if engine == "deepsparse" else None
            if err and not a.keep_exports:  # make room: the ORT exports no later configuration needs
                later = {CONFIGS[c][1] for c in labels[i + 1:] if CONFIGS[c][0] in ("ort-cpu", "ort-sparse")}
                for w, m in (("dense", dense), ("sparse", sparse)):
                    if w not in later and drop_exports(work, m, "onnx"):
                        print(f"  removed the ORT export of {m} (done with it) to make room for DeepSparse")
                err = disk_short(work, model)
            if err is None:  # exports made here, untimed (a cache hit when --prepare-only made them)
                err = prepare(a, work, [label], dense, sparse, deepsparse=True).get(label)
            results[label] = run_config(a, work, label, model) if err is None else {"error": err}
            if engine == "deepsparse" and not a.keep_exports:
                drop_exports(work, model, "deepsparse")
        r = results[label]
        print(f"{label}: " + (r.get("error") or r.get("skipped") or
                              f"prefill {_ms(r.get(PREFILL))} ms, decode {_ms(r.get(DECODE))} ms/token"), flush=True)
    rows = table(a, results, sparse, dense, slice_text)
    from sparse_runtime.report import markdown_table, save_results

    title = f"Latency on a depth slice of {a.shape} ({slice_text}): ORT and DeepSparse beside ours (protocol {PROTOCOL})"
    notes = [f"model: {a.shape} shapes, {slice_text}; random fp32 weights (sparse-runtime synth), 70 % = Wanda "
             "(protocol scale calibration) on them: latency and memory only, never quality",
             "ORT and DeepSparse need a whole-graph export, so they cannot run the full 7B model here; every "
             "engine runs this same slice, so the ratios compare; full-model figures: latency_7b.md",
             f"threads {a.threads}; {a.rounds} rounds after one warm-up; decode: {a.steps} tokens per round at "
             "context 128; prefill 1 x 128 (last position's logits); ms, medians [min-max]",
             "each configuration in a fresh process, in its own memory cgroup when available (cap "
             f"{a.cap}; peak anon = the cgroup's anonymous memory, DeepSparse's worker included); run back to "
             "back, not interleaved",
             "sparse/dense: the same engine's dense row over its 70 % row (ours: lean-cpu over sparse-cpu); "
             "sparse-cpu speedup: this row's time over sparse-cpu 70 %'s",
             "bandwidth bound: dense fp32 bytes per decode token over the bitmask layout's, embedding row and "
             "lm_head counted dense (docs/protocols.md#the-memory-bandwidth-bound)",
             "ort-sparse: ORT with the pruned MatMuls as our SparseLinear custom op; ort-cpu multiplies dense",
             f"papers at 70 % (full model): {PAPERS}"]
    if any(CONFIGS[c][0] == "deepsparse" for c in labels):
        from sparse_runtime.runtime.deepsparse_engine import LICENCE

        notes.append(f"DeepSparse 1.8: {LICENCE}")
    print(markdown_table(rows, COLUMNS))
    if a.save:
        save_results(a.save, title, rows, protocol=PROTOCOL, model=f"dense {dense}; sparse {sparse}", notes=notes,
                     columns=COLUMNS, out_dir=ROOT / "benchmarks" / "results", extra={"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
