"""Latency of SmolLM2-135M dense vs Wanda 50/60/70 % and 2:4 on torch-cpu, ort-cpu and DeepSparse.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_latency.py --prepare-only
    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_latency.py

Step 1 (``--prepare-only``, done once and cached under ``$SPARSE_RUNTIME_CACHE/bench-latency``):
prune the checkpoints with Wanda (``sparse_runtime.prune``, protocol ``quick``: 32 x 512 C4
calibration tokens, seed 0; uniform per-layer sparsity; 2:4 = two zeros in every four), export each
for ONNX Runtime (optimum decoder with KV cache) and for DeepSparse (static graphs: batch 1 x 128
with a decode graph of 192 cache slots, batch 1 x 512, batch 8 x 128).

Step 2: ``sparse_runtime.measure.latency.run_latency``: per engine, per scenario, every model warmed up
then timed in 5 interleaved rounds; medians, IQR, min-max, speedup of medians and pairwise speedups,
the bandwidth bound beside decode, the evidence of which path ran; saved via ``save_results`` as
``benchmarks/results/latency.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {  # label -> PruneConfig kwargs
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "wanda-60": dict(method="wanda", sparsity=0.6),
    "wanda-70": dict(method="wanda", sparsity=0.7),
    "wanda-2:4": dict(method="wanda", structure="2:4"),
}
DS_SHAPES = [dict(prefill_length=128, cache_length=192, batch_size=1, decode=True)]
# DeepSparse needs one static export (~40 s) + compile per shape and model; on the shared 2-core
# machine the default run times its batch-1 shapes only (--ds-scenarios adds prefill:1x512 or
# prefill:8x128: the engine then exports those shapes on demand)
DS_SCENARIOS = "prefill:1x128,decode:1@128"


def checkpoints(root: Path, labels) -> dict[str, Path]:
    from sparse_runtime.prune import PruneConfig, prune_checkpoint

    out = {}
    for label in labels:
        d = root / label.replace(":", "")
        if not (d / "sparsity_manifest.json").is_file():
            t = time.perf_counter()
            prune_checkpoint("smollm2-135m", PruneConfig(protocol="quick", **CONFIGS[label]), d, overwrite=True)
            print(f"pruned {label} -> {d} in {time.perf_counter() - t:.0f} s", flush=True)
        out[label] = d
    return out


def prepare(dense: Path, ckpts: dict[str, Path], engines) -> None:
    from sparse_runtime.runtime.exports import ensure_export

    for label, path in [("dense", dense), *ckpts.items()]:
        if "ort-cpu" in engines:
            t = time.perf_counter()
            ensure_export(str(path), "onnx")
            print(f"onnx export {label}: {time.perf_counter() - t:.0f} s", flush=True)
        if "deepsparse" in engines:
            for shape in DS_SHAPES:
                t = time.perf_counter()
                ensure_export(str(path), "deepsparse", check_engine=False, **shape)
                print(f"deepsparse export {label} {shape}: {time.perf_counter() - t:.0f} s", flush=True)


def talk(models, prompt: str = "The capital of France is", tokens: int = 12) -> list[str]:
    """Greedy continuations (torch-cpu) so the table sits beside what each model says."""
    from sparse_runtime.runtime import load_engine

    out = []
    for label, path in models:
        try:
            eng = load_engine("torch-cpu", str(path))
            ids = eng.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            text = eng.tokenizer.decode(list(eng.generate(ids, tokens, eng.tokenizer.eos_token_id)),
                                        skip_special_tokens=True)
            out.append(f"greedy continuation of {prompt!r}, {label}: {text.strip()!r}")
        except Exception as e:  # informative only
            out.append(f"generation with {label} failed: {e}")
    return out


def findings(rows) -> list[str]:
    """Plain-language verdicts computed from the rows (no figure is typed by hand)."""
    out = []
    for eng in dict.fromkeys(r["engine"] for r in rows):
        parts = []
        for sc in dict.fromkeys(r["scenario"] for r in rows if r["engine"] == eng):
            rs = [r for r in rows if r["engine"] == eng and r["scenario"] == sc and "speedup" in r]
            fast = [f"{r['model']} {r['speedup']:.2f}x" + (" (noisy)" if "noisy" in r["verdict"] else "")
                    for r in rs if r["verdict"].startswith("faster")]
            slow = [f"{r['model']} {r['speedup']:.2f}x" + (" (noisy)" if "noisy" in r["verdict"] else "")
                    for r in rs if r["verdict"].startswith("slower")]
            rng = f"{min(r['speedup'] for r in rs):.2f}-{max(r['speedup'] for r in rs):.2f}x" if rs else "n/a"
            txt = f"{sc}: " + (f"FASTER for {', '.join(fast)}" if fast else "no speedup")
            txt += (f"; SLOWER for {', '.join(slow)}" if slow else "") + f" (range {rng})"
            parts.append(txt)
        out.append(f"finding, {eng}: " + "; ".join(parts))
    best = {}
    for r in rows:
        k = r["scenario"]
        if k not in best or r["median"] < best[k]["median"]:
            best[k] = r
    out.append("fastest per scenario (medians across engines, not paired): "
               + "; ".join(f"{k}: {r['engine']} {r['model']} {r['median']:.4g} {r['unit']}" for k, r in best.items()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare-only", action="store_true", help="prune and export, no timing")
    ap.add_argument("--engines", default="torch-cpu,ort-cpu,deepsparse,torch-sparse",
                    help="torch-sparse (the project's kernels, issue 9) runs last: a native crash loses only it")
    ap.add_argument("--scenarios", default="prefill:1x128,prefill:1x512,decode:1@128,prefill:8x128")
    ap.add_argument("--ds-scenarios", default=DS_SCENARIOS, help="DeepSparse's own scenario list")
    ap.add_argument("--models", default=",".join(CONFIGS), help="sparse configurations to include")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--name", default="latency")
    from sparse_runtime.measure.latency import LOAD_ORDERS

    ap.add_argument("--load-order", default="dense-first", choices=sorted(LOAD_ORDERS),
                    help="order in which in-process engines load the models (ORT ran its first session slower)")
    args = ap.parse_args()
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")

    from sparse_runtime.measure.latency import LatencyConfig, run_latency, save_latency
    from sparse_runtime.models.loading import cache_dir, ensure_smollm2

    t0 = time.perf_counter()
    engines = [e for e in args.engines.split(",") if e]
    labels = [m for m in args.models.split(",") if m]
    dense = ensure_smollm2()
    ckpts = checkpoints(cache_dir() / "bench-latency", labels)
    prepare(dense, ckpts, engines)
    print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.prepare_only:
        return 0
    cfg = LatencyConfig(engines=engines, scenarios=args.scenarios.split(","), repeats=args.repeats,
                        decode_steps=args.decode_steps, engine_scenarios={"deepsparse": args.ds_scenarios.split(",")},
                        load_order=args.load_order)
    notes = ["checkpoints: sparse_runtime.prune Wanda (uniform, per-output-row groups), protocol quick "
             "(32 x 512 C4 calibration tokens, seed 0); 2:4 = two zeros in every four consecutive inputs; "
             "embeddings and the tied lm_head stay dense",
             f"DeepSparse scenarios: {args.ds_scenarios} (each static shape is one export + compile per model)",
             "decode: context 128 tokens, then 16 timed single-token steps with KV cache (torch/ORT: the cache "
             "grows 128->144; DeepSparse: a static 192-slot cache, masked, shifted each step)",
             f"load order: {args.load_order} (torch/ORT load every model into one process in this order; DeepSparse "
             "runs one worker process per model)"]
    for label, path in ckpts.items():  # provenance of each checkpoint, from its own prune report
        try:
            rep = json.loads((path / "prune_report.json").read_text())
            notes.append(f"{label}: {rep.get('method')} {rep.get('structure')} {rep.get('allocation')}, measured "
                         f"sparsity {rep.get('sparsity_measured'):.4f}, calibration {rep.get('calibration')}")
        except (OSError, ValueError, TypeError):
            notes.append(f"{label}: no prune_report.json")
    title = "Latency: SmolLM2-135M dense vs Wanda 50/60/70 % and 2:4, per engine"
    model = "SmolLM2-135M-Instruct (fp32, dequantised Q4_1 GGUF)"

    def save_partial(partial):  # after each engine: a crash in a native backend keeps the rest
        save_latency(partial, name=args.name, title=title + " (partial: run in progress)", model=model,
                     notes=notes + findings(partial.rows))

    res = run_latency(str(dense), [(k, str(v)) for k, v in ckpts.items()], cfg, on_engine_done=save_partial)
    if "deepsparse" in res.engines:
        try:
            from sparse_runtime.runtime.deepsparse_env import engine_info

            info = engine_info()
            notes.append(f"DeepSparse sees: isa {info.get('isa')}, vnni {info.get('vnni')}, version "
                         f"{info.get('deepsparse')}")
        except Exception as e:  # informative only
            notes.append(f"DeepSparse ISA query failed: {e}")
    notes += findings(res.rows)
    notes += talk([("dense", dense), *ckpts.items()])
    save_latency(res, name=args.name, title=title, model=model, notes=notes)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
