"""Protocol ``latency-7b`` (docs/scale.md#latency-7b): a 7B model's decode and prefill, dense against
sparse, each engine in its own memory cgroup.

    python benchmarks/bench_latency_7b.py --dense DIR --sparse DIR [--save NAME]

``--dense``: a LLaMA-2-7B-shaped checkpoint (``sparse-runtime synth``); ``--sparse``: the same model
pruned (``sparse-runtime prune ... --stream on``; random weights: memory and time only, never
quality). A 7B model does not fit twice in this machine's memory, so the configurations run one
after another, each in a fresh process in its own cgroup (``sparse_runtime/measure/cgroup.py``): the
cgroup's anonymous peak is the engine's resident memory, enforced by the kernel cap given per
configuration. Per configuration: load (streamed block by block for the sparse engines), then
``--rounds`` rounds of prefill 1 x 128 and of decode at context 128 (``--steps`` tokens each,
ms/token); medians with min-max. Dense and sparse therefore run back to back in one invocation,
not interleaved (stated in the table). Beside each sparse ratio: the memory-bandwidth bound of the
bytes each token reads (docs/protocols.md#the-memory-bandwidth-bound) and the papers' 7B figures
(ATP 2.63x, LoSA 2.60x end-to-end CPU speedup at 70 %, DeepSparse).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPERS = "ATP 2.63x, LoSA 2.60x (LLaMA-2-7B, 70 %, CPU, DeepSparse)"
# label, engine, which model, dtype, cap
CONFIGS = {
    "dense-bf16-lean": ("lean-cpu", "dense", "bfloat16", "18GiB"),
    "dense-bf16-torch": ("torch-cpu", "dense", "bfloat16", "18GiB"),
    "sparse-bf16": ("sparse-cpu", "sparse", "bfloat16", "8GiB"),
    "sparse-fp32": ("sparse-cpu", "sparse", "float32", "14GiB"),
    # int8 values (per-channel symmetric codes, fp32 scales; lm_head int8 too), quantized at load by
    # round-to-nearest (docs/quantization.md): the sparse row capped at the 6 GiB target
    "dense-int8-lean": ("lean-cpu", "dense", "int8", "12GiB"),
    "sparse-int8": ("sparse-cpu", "sparse", "int8", "6GiB"),
}


def worker(args) -> int:
    """One configuration in this (capped) process: load, time, write JSON to ``args.result``."""
    import torch

    from sparse_runtime.runtime.base import Scenario
    from sparse_runtime.runtime.registry import load_engine

    t0 = time.perf_counter()
    opts = {"dtype": args.dtype}
    if args.engine in ("sparse-cpu", "lean-cpu"):
        opts["stream"] = "on"
    eng = load_engine(args.engine, args.model, threads=args.threads, **opts)
    load_s = time.perf_counter() - t0
    out = {"engine": args.engine, "dtype": args.dtype, "model": args.model, "load_s": load_s,
           "threads": args.threads, "torch": torch.__version__}
    for sc in (Scenario("prefill", 128, 1), Scenario("decode", 128, 1, args.steps)):
        run = eng.timer(sc)
        run()  # warm-up
        times = [sc.per_unit(run()) for _ in range(args.rounds)]
        out[sc.label] = {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": times}
    info = eng.info()
    out["info"] = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
    out["memory"] = eng.memory()
    Path(args.result).write_text(json.dumps(out, indent=1, default=str))
    return 0


def bound(sparse_dir: str, value_bytes: int, dense_bytes: int) -> float:
    """Bytes a decode token reads, dense over sparse (bitmask layout), from the sparsity manifest."""
    from sparse_runtime.measure.stats import bandwidth_bound
    from sparse_runtime.manifest import read_manifest

    m = read_manifest(sparse_dir)
    layers = [(r.shape[0] * r.shape[1], r.nnz) for r in m.layers.values()]
    extra = dense_bytes  # embedding row + lm_head read per token, counted as dense
    return bandwidth_bound(layers, dense_extra=extra, value_bytes=value_bytes)["model"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense")
    ap.add_argument("--sparse")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="decode tokens per round")
    ap.add_argument("--save", default=None, help="result name under benchmarks/results/ (nothing saved without it)")
    ap.add_argument("--work", default="/tmp/sr-latency-7b", help="logs and per-configuration JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    from sparse_runtime.measure.cgroup import parse_bytes, run_capped
    from sparse_runtime.models.streaming import CheckpointReader
    from sparse_runtime.report import save_results

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for label in a.configs.split(","):
        engine, which, dtype, cap = CONFIGS[label]
        model = a.dense if which == "dense" else a.sparse
        res = work / f"{label}.json"
        res.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--model", model, "--dtype", dtype,
               "--threads", str(a.threads), "--rounds", str(a.rounds), "--steps", str(a.steps), "--result", str(res)]
        r = run_capped(cmd, parse_bytes(cap), f"latency7b-{label}", log_dir=work, cwd=ROOT)
        got = json.loads(res.read_text()) if res.is_file() else {}
        results[label] = {"capped": r, **got}
        print(f"{label}: exit {r['exit_code']}{' (OOM kill)' if r['oom_killed'] else ''}, peak anon "
              f"{r['peak_anon_bytes'] / 2**30:.2f} GiB, " + ", ".join(
                  f"{k} {v['median']:.0f}" for k, v in got.items() if isinstance(v, dict) and "median" in v), flush=True)
    reader = CheckpointReader(a.dense)
    vocab_hidden = max(reader.shapes.get("lm_head.weight", (0, 0))[0], 1) * reader.shapes["model.embed_tokens.weight"][1]
    rows = []
    dense_label = next((k for k in ("dense-bf16-lean", "dense-bf16-torch") if results.get(k, {}).get("decode b1 @ ctx 128")), None)
    for label, r in results.items():
        engine, which, dtype, cap = CONFIGS[label]
        row = {"configuration": label, "engine": engine, "values": dtype, "cap": cap,
               "OOM": "yes" if r["capped"]["oom_killed"] else "no",
               "peak anon GiB": round(r["capped"]["peak_anon_bytes"] / 2**30, 2), "load s": round(r.get("load_s", 0), 1)}
        for key, name in (("prefill b1 x 128", "prefill 1x128 ms"), ("decode b1 @ ctx 128", "decode ms/token")):
            v = r.get(key)
            row[name] = f"{v['median']:.0f} [{v['min']:.0f}-{v['max']:.0f}]" if v else "-"
        d = results.get(dense_label, {}) if dense_label else {}
        if which == "sparse" and d and r.get("decode b1 @ ctx 128"):
            row["decode speedup"] = round(d["decode b1 @ ctx 128"]["median"] / r["decode b1 @ ctx 128"]["median"], 2)
            row["prefill speedup"] = round(d["prefill b1 x 128"]["median"] / r["prefill b1 x 128"]["median"], 2)
            vb = {"bfloat16": 2, "int8": 1}.get(dtype, 4)
            row["bandwidth bound"] = round(bound(a.sparse, vb, vocab_hidden) * (2 / vb), 2)  # vs dense bf16 bytes
        q = results.get("dense-int8-lean", {})
        if which == "sparse" and dtype == "int8" and q.get("decode b1 @ ctx 128") and r.get("decode b1 @ ctx 128"):
            row["vs dense int8 (decode)"] = round(q["decode b1 @ ctx 128"]["median"] / r["decode b1 @ ctx 128"]["median"], 2)
            row["bound vs dense int8"] = round(bound(a.sparse, 1, vocab_hidden), 2)
        rows.append(row)
    print(json.dumps(rows, indent=1))
    if a.save:
        save_results(a.save, "Latency at LLaMA-2-7B shapes (protocol latency-7b)", rows, protocol="latency-7b",
                     model=f"dense {a.dense}; sparse {a.sparse}",
                     notes=[f"papers at 70 %: {PAPERS}", f"threads {a.threads}; {a.rounds} rounds after one warm-up; "
                            f"decode: {a.steps} tokens per round at context 128; medians [min-max]",
                            "each configuration in a fresh process in its own memory cgroup (the cap column); peak "
                            "anon = the cgroup's anonymous memory (polled), the engine's resident memory",
                            "configurations run back to back (a 7B model does not fit twice), not interleaved",
                            "bandwidth bound: dense bf16 bytes per token over the sparse engine's (bitmask layout, "
                            "the configuration's value bytes), embedding row and lm_head counted dense",
                            "random weights (sparse-runtime synth; masks from Wanda on them): latency and memory only"],
                     extra={"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
