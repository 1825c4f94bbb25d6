"""Our CPU sparse kernels vs dense, per layer shape and end to end on SmolLM2-135M (issue 9).

Run under the shared lock:  flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_kernels.py

Part 1, layers: SmolLM2-135M shapes (576x576, 192x576, 1536x576, 576x1536) and 7B-like shapes
(4096x4096, 11008x4096, 4096x11008) at 50 %, 70 %, 90 % unstructured and 2:4, batch 1/8/16.
Dense = PyTorch F.linear (oneDNN/MKL) and ORT MatMul on the same weight; sparse = our kernel on
each ISA path this CPU runs (the default path's layout, plus csr16/AVX2 on an AVX-512 CPU as a
preview of AVX2 machines). Median of --repeats timed calls after warm-up, dense and sparse
alternating call by call; threads fixed per row. GB/s = bytes of the weight encoding read / time;
bound = dense bytes / encoding bytes (docs/protocols.md). The measured dense/sparse batch threshold of
the module (SparseLinear.batch_threshold) is printed per shape.

Part 2, end to end (``--e2e-only`` runs just this): SmolLM2-135M dense and the Wanda 70 % / 2:4
checkpoints of bench_latency.py on every engine that matters here, loaded in one process and
timed in the same interleaved rounds: torch-cpu (HF eager, dense), ort-cpu (dense), torch-sparse
(HF eager + SparseLinear), lean-cpu (the lean path, dense) and sparse-cpu (the lean path, sparse).
Decode ms/token after a --context prefill, prefill 1 x --prefill-tokens; speedups against the same
path's dense model, torch-cpu dense and ORT dense; the lean path's bound (its dense lm_head
counted), achieved weight GB/s, and its per-stage decode profile at 1 and 2 threads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_runtime.kernels import (SparseLinear, available, counters, pack, reset_counters,
                                    supported_isas, unavailable_reason)
from sparse_runtime.kernels import native
from sparse_runtime.kernels.native import DEFAULT_LAYOUT
from sparse_runtime.kernels.module import choose_gemv_variant, gemv_choice, measure_threshold
from sparse_runtime.report import save_results
from sparse_runtime.sparsity import NMPattern, nm_prune_mask, topk_prune_mask

FORM_PATHS = {isa: f"{isa}/{lay}" for isa, lay in native.GEMV_FORM_LAYOUT.items()}  # paths with two batch-1 forms
SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
SEVEN_B = [(4096, 4096), (11008, 4096), (4096, 11008)]
STRUCTS = ["50%", "70%", "90%", "2:4"]


def prune(w: torch.Tensor, struct: str) -> torch.Tensor:
    if ":" in struct:
        return w * nm_prune_mask(w.abs(), NMPattern.parse(struct))
    return w * topk_prune_mask(w.abs(), float(struct.rstrip("%")) / 100, per_row=True)


def matmul_model(w: torch.Tensor):
    """A one-node ONNX graph computing x @ W^T (the weight as an initializer)."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                          [numpy_helper.from_array(w.t().contiguous().numpy(), "wt")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def ort_matmul(w: torch.Tensor, threads: int):
    """An ORT session of that graph (dense MatMul), or None without ORT."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(matmul_model(w).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def ort_sparse(w: torch.Tensor, threads: int, isa: str, layout: str):
    """The same graph with the MatMul rewritten to our SparseLinear node, on ORT with the native
    custom-op library (the compiled extension), or None without ORT."""
    try:
        import onnxruntime  # noqa: F401

        from sparse_runtime.kernels import ort as sort
    except ImportError:
        return None
    sm, count = sort.sparsify_onnx(matmul_model(w), min_sparsity=0.0, isa=isa, layout=layout)
    if count != 1:
        return None
    sess = sort.session(sm, threads)
    return lambda x: sess.run(None, {"x": x})[0]


def timed(fns: dict, repeats: int, warmup: int = 3) -> dict:
    for f in fns.values():
        for _ in range(warmup):
            f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():  # alternate call by call
            t = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t) * 1e3)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in ts.items()}


@torch.inference_mode()
def bench_layers(threads_list, batches, repeats, shapes, structs, with_ort):
    rows = []
    isas = supported_isas()
    paths = [(isas[-1], DEFAULT_LAYOUT[isas[-1]])]
    if "avx2" in isas:  # the other AVX2 paths beside the default (on AVX-512 CPUs: a preview)
        paths += [("avx2", lay) for lay in ("bitmask", "csr16") if ("avx2", lay) not in paths]
    for threads in threads_list:
        torch.set_num_threads(threads)
        for n, k in shapes:
            w0 = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k))
            for struct in structs:
                w = prune(w0, struct).contiguous()
                mods = {f"{isa}/{lay}": SparseLinear(pack(w, lay), None, isa=isa, dense_weight=w,
                                                     batch_threshold=1 << 30) for isa, lay in paths}
                ort_w = ort_matmul(w, threads) if with_ort else None
                ort_s = ort_sparse(w, threads, *paths[0]) if with_ort else None  # the default path
                thr = {key: measure_threshold(m, repeats=5) for key, m in mods.items()}
                for b in batches:
                    x = torch.randn(b, k)
                    xn = x.numpy()
                    fns = {"dense": lambda: F.linear(x, w)}
                    if ort_w is not None:
                        fns["ort"] = lambda: ort_w(xn)
                    if ort_s is not None:
                        fns["ort_sparse"] = lambda: ort_s(xn)
                    for key, m in mods.items():
                        fns[key] = (lambda m=m: m.sparse_forward(x))
                    others = {}  # tuning: each path's batch-1 form that the process did NOT choose
                    for isa, key in FORM_PATHS.items():
                        if b == 1 and key in mods:
                            chosen = choose_gemv_variant(isa=isa)
                            other = next(v for v in native.GEMV_FORMS[isa] if v != chosen)
                            others[key] = other
                            fns[key + "-other"] = (lambda isa=isa, key=key, other=other, chosen=chosen: (
                                native.set_gemv_variant(other, isa), mods[key].sparse_forward(x),
                                native.set_gemv_variant(chosen, isa)))
                    res = timed(fns, repeats)
                    for key, other in others.items():
                        r = res[key + "-other"]
                        rows.append({"threads": threads, "shape": f"{n}x{k}", "sparsity": struct, "batch": b,
                                     "path": f"{key} ({other} form, not chosen)", "dense_torch_ms": res["dense"][0],
                                     "sparse_ms": r[0], "sparse_min_max": f"{r[1]:.3g}-{r[2]:.3g}",
                                     "speedup_vs_torch": res["dense"][0] / r[0],
                                     "sparse_GBps": mods[key].packed.nbytes / r[0] / 1e6,
                                     "bound": mods[key].packed.bandwidth_bound()})
                    dense_ms = res["dense"][0]
                    for key, m in mods.items():
                        p = m.packed
                        s_ms = res[key][0]
                        rows.append({
                            "threads": threads, "shape": f"{n}x{k}", "sparsity": struct, "batch": b,
                            "path": key, "dense_torch_ms": dense_ms,
                            "dense_ort_ms": res["ort"][0] if "ort" in res else None,
                            "sparse_ms": s_ms, "sparse_min_max": f"{res[key][1]:.3g}-{res[key][2]:.3g}",
                            "speedup_vs_torch": dense_ms / s_ms,
                            "speedup_vs_ort": res["ort"][0] / s_ms if "ort" in res else None,
                            "ort_sparse_ms": res["ort_sparse"][0] if "ort_sparse" in res else None,
                            "ort_sparse_vs_ort": (res["ort"][0] / res["ort_sparse"][0]
                                                  if "ort_sparse" in res and "ort" in res else None),
                            "dense_GBps": n * k * 4 / dense_ms / 1e6, "sparse_GBps": p.nbytes / s_ms / 1e6,
                            "bound": p.bandwidth_bound(), "threshold": thr[key],
                        })
                        r = rows[-1]
                        print(f"t{threads} {r['shape']:>10} {struct:>4} b{b:<3} {r['path']:<16} dense {dense_ms:8.3f} "
                              f"ort {r['dense_ort_ms'] or float('nan'):8.3f} sparse {s_ms:8.3f} "
                              f"x{r['speedup_vs_torch']:5.2f} (bound {r['bound']:.2f}) thr {thr[key]}", flush=True)
    return rows


@torch.inference_mode()
def bench_bf16(threads, batches, repeats, shapes, structs):
    """bf16 values vs dense bf16 F.linear (the issue's option), default ISA path if it has bf16."""
    from sparse_runtime.kernels.native import supports_bf16

    rows = []
    isa = next((i for i in reversed(supported_isas()) if supports_bf16(i)), None)
    if isa is None:
        return rows
    torch.set_num_threads(threads)
    for n, k in shapes:
        w0 = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k))
        for struct in structs:
            w = prune(w0, struct).bfloat16().contiguous()
            m = SparseLinear(pack(w, DEFAULT_LAYOUT[isa], "bfloat16"), None, isa=isa, dense_weight=w,
                             batch_threshold=1 << 30)
            for b in batches:
                x = torch.randn(b, k, dtype=torch.bfloat16)
                res = timed({"dense": lambda: F.linear(x, w), "sparse": lambda: m.sparse_forward(x)}, repeats)
                p = m.packed
                rows.append({"threads": threads, "shape": f"{n}x{k}", "sparsity": struct, "batch": b,
                             "path": f"{isa}/{p.layout}/bf16", "dense_bf16_ms": res["dense"][0],
                             "sparse_bf16_ms": res["sparse"][0],
                             "sparse_min_max": f"{res['sparse'][1]:.3g}-{res['sparse'][2]:.3g}",
                             "speedup": res["dense"][0] / res["sparse"][0],
                             "dense_GBps": n * k * 2 / res["dense"][0] / 1e6, "sparse_GBps": p.nbytes / res["sparse"][0] / 1e6,
                             "bound_vs_dense_bf16": 2.0 * n * k / p.nbytes})
                print(rows[-1], flush=True)
    return rows


def cpu_times() -> tuple[list[int], float]:
    """Aggregate CPU jiffies from /proc/stat (user, nice, system, idle, iowait, irq, softirq, steal)
    and this process's own CPU seconds."""
    t = os.times()
    try:
        return [int(v) for v in open("/proc/stat").readline().split()[1:9]], t.user + t.system
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        return [], t.user + t.system


def machine_state(t0: tuple[list[int], float], load0: float) -> str:
    """How busy the machine was over a run: the CPU shares of all processes and how much of the
    machine OTHER processes used (busy time minus this process's CPU time). Other processes above
    a few percent, or a high system/steal share, mark a degraded run."""
    (j0, own0), (j1, own1) = t0, cpu_times()
    if not j0 or not j1:
        return f"machine state: load average {load0:.2f} at start (no /proc/stat)"
    d = [b - a for a, b in zip(j0, j1)]
    tot = max(sum(d), 1)
    hz = os.sysconf("SC_CLK_TCK")
    busy = tot - d[3] - d[4]
    other = max(0.0, (busy - (own1 - own0) * hz) / tot)
    us, sy, st = (d[0] + d[1]) / tot, (d[2] + d[5] + d[6]) / tot, d[7] / tot
    return (f"machine state over the run: all processes user {us:.0%}, system {sy:.0%}, steal {st:.0%}, idle "
            f"{(d[3] + d[4]) / tot:.0%}; other processes than this benchmark {other:.0%} of the machine; load "
            f"average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")


E2E_ENGINES = (  # (engine, model label): one unit each, all timed in the same interleaved rounds
    ("torch-cpu", "dense"), ("ort-cpu", "dense"), ("torch-sparse", "wanda-70"), ("torch-sparse", "wanda-2:4"),
    ("ort-sparse", "wanda-70"), ("ort-sparse", "wanda-2:4"),
    ("lean-cpu", "dense"), ("sparse-cpu", "wanda-70"), ("sparse-cpu", "wanda-2:4"))
DENSE_TWIN = {"torch-sparse": "torch-cpu", "sparse-cpu": "lean-cpu", "ort-sparse": "ort-cpu"}  # same path, dense
CHECKPOINTS = {"wanda-70": "wanda-70", "wanda-2:4": "wanda-24"}  # label -> dir under <cache>/bench-latency


def e2e_sources() -> dict[str, str]:
    """The dense model spec and the Wanda checkpoints of bench_latency.py (the models latency.md and
    its DeepSparse rows used), so the figures compare like with like."""
    from sparse_runtime.models.loading import cache_dir

    root = cache_dir() / "bench-latency"
    out = {"dense": "smollm2-135m"}
    for label, d in CHECKPOINTS.items():
        if not (root / d / "sparsity_manifest.json").is_file():
            raise SystemExit(f"missing {root / d}: run `python benchmarks/bench_latency.py --prepare-only` first")
        out[label] = str(root / d)
    return out


def lean_bytes(lean) -> tuple[float, float]:
    """(dense bytes, bytes actually read) of one decode token's weights: fused linears + lm_head."""
    head = lean.lm_head.numel() * 4
    dense = head + sum(f.weight.numel() * 4 for f in lean.linears())
    read = head + sum(f.module.packed.nbytes if f.module is not None else f.weight.numel() * 4 for f in lean.linears())
    return dense, read


@torch.inference_mode()
def lean_stages(engines: dict, threads_list, steps: int = 32, context: int = 128) -> list[dict]:
    """Per-stage ms/token of the lean C step (sr_decode_profile) at each thread count."""
    from sparse_runtime.kernels import decode as cdec

    rows = []
    ids = torch.randint(100, 20000, (1, context), generator=torch.Generator().manual_seed(0))
    for (name, label), eng in engines.items():
        if not name.endswith("-cpu") or not hasattr(eng, "lean"):
            continue
        lean = eng.lean
        saved = lean.threads
        for th in threads_list:
            lean.threads = th
            per = []
            for _ in range(3):
                lean.prefill(ids)
                cdec.profile_start()
                t = time.perf_counter()
                for i in range(steps):
                    lean.decode_token(100 + i)
                total = (time.perf_counter() - t) * 1e3 / steps
                per.append((total, cdec.profile_stop()))
            total, stages = sorted(per, key=lambda p: p[0])[1]  # the median round
            row = {"part": "lean decode stages", "engine": name, "model": label, "threads": th,
                   "median_ms": total}
            row.update({f"{k} ms": v * 1e3 / steps for k, v in stages.items()})
            rows.append(row)
            print(row, flush=True)
        lean.threads = saved
    return rows


def bench_e2e(threads: int, repeats: int, context: int, steps: int, prefill_tokens: int, with_ort: bool,
              stage_threads) -> tuple[list[dict], list[str]]:
    """Decode (batch 1, ``steps`` tokens after ``context``) and prefill (1 x ``prefill_tokens``) on every
    (engine, model) of E2E_ENGINES, all loaded in one process and timed in the same rounds (order
    rotated each round; one warm-up round)."""
    from sparse_runtime.runtime import Scenario, load_engine

    src = e2e_sources()
    engines, notes = {}, []
    for name, label in E2E_ENGINES:
        if name.startswith("ort-") and not with_ort:
            continue
        t = time.perf_counter()
        try:
            engines[(name, label)] = load_engine(name, src[label], threads=threads)
        except Exception as e:  # an engine that cannot run here is reported, not fatal
            notes.append(f"{name} {label}: not run ({e})")
            continue
        notes.append(f"{name} {label}: loaded in {time.perf_counter() - t:.1f}s; "
                     f"{engines[(name, label)].evidence().get('sparse_path', '')}")
    scen = {"decode": Scenario("decode", context, 1, steps), "prefill": Scenario("prefill", prefill_tokens, 1)}
    times = {(k, s): [] for k in engines for s in scen}
    for s, sc in scen.items():
        units = {k: eng.timer(sc) for k, eng in engines.items()}
        keys = list(units)
        for k in keys:  # warm-up
            units[k]()
        for r in range(repeats):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[(k, s)].append(sc.per_unit(units[k]()))
    med = {ks: statistics.median(v) for ks, v in times.items()}
    rows = []
    for (name, label), eng in engines.items():
        dense_same = next((k for k in engines if k[0] == DENSE_TWIN.get(name, name) and k[1] == "dense"), None)
        row = {"part": "end to end", "engine": name, "model": label, "threads": threads}
        for s, sc in scen.items():
            v = times[((name, label), s)]
            col = "decode ms/token" if s == "decode" else f"prefill 1x{prefill_tokens} ms"
            row[col] = med[((name, label), s)]
            row[f"{s} min-max"] = f"{min(v):.3g}-{max(v):.3g}"
            if dense_same:
                row[f"{s} vs same-path dense"] = med[(dense_same, s)] / med[((name, label), s)]
            for ref in (("torch-cpu", "dense"), ("ort-cpu", "dense")):
                if ref in engines:
                    row[f"{s} vs {ref[0]} dense"] = med[(ref, s)] / med[((name, label), s)]
        if hasattr(eng, "lean"):
            dense_b, read_b = lean_bytes(eng.lean)
            row["bound"] = dense_b / read_b
            row["weights GB/s (decode)"] = read_b / (row["decode ms/token"] * 1e-3) / 1e9
        mc = eng.evidence().get("module_calls", {})
        row["sparse products"] = mc.get("sparse_calls", "")
        row["dense products (fallback)"] = mc.get("dense_calls", "")
        rows.append(row)
        print(row, flush=True)
    rows += lean_stages(engines, stage_threads)
    for eng in engines.values():
        eng.close()
    return rows, notes


def _suffix(a) -> str:
    return f"_{a.tag}" if a.tag else ""


def layer_part(a, shapes, threads, batches) -> None:
    reset_counters()
    state0, load0 = cpu_times(), os.getloadavg()[0]
    rows = bench_layers(threads, batches, a.repeats, shapes, STRUCTS, not a.no_ort)
    layer_counters = counters()
    notes = [f"layer table: median of {a.repeats} alternating calls after 3 warm-up calls; fp32; "
             f"random N(0,1) weights pruned per row by magnitude (N:M by groups); kernel counters {layer_counters}",
             "dense_torch = F.linear (oneDNN/MKL); dense_ort = onnxruntime MatMul session, same threads; "
             "ort_sparse = the MatMul rewritten to our SparseLinear node, run by ORT with the compiled extension "
             "registered as its native custom-op library (default path; includes ORT's session.run overhead, "
             "as dense_ort does); ort_sparse_vs_ort = dense_ort / ort_sparse",
             ("path avx2/csr16 on an AVX-512 CPU previews the AVX2 kernel; AVX2-only CPUs (AMD EPYC) differ"
              if "avx512" in supported_isas() else "AVX2-only CPU: the avx2 paths are this machine's default"),
             "threshold = measured largest batch (of 1,2,4,...,128) where the sparse kernel was not slower "
             "than dense; SparseLinear dispatches larger batches to dense F.linear",
             "shared 2-core machine: other engineers' processes may run unlocked; see min-max spread",
             f"AVX-512 batch-1 form used by the 'avx512/bitmask' rows (chosen at first use, "
             f"sparse_runtime.kernels.choose_gemv_variant): {gemv_choice()}; the '(... form, not chosen)' rows time "
             "the other form in the same run",
             f"AVX2 csr16 batch-1 form (gather | insert, chosen the same way): {gemv_choice('avx2') or 'n/a'}",
             machine_state(state0, load0)]
    save_results("kernels_layers" + _suffix(a), "Sparse kernels vs dense, per layer (fp32)", rows,
                 protocol=f"layer latency, batches {batches}, threads {threads}", notes=notes, out_dir=a.out_dir)
    if not a.no_bf16:
        bf = bench_bf16(threads[0], [1, 8], a.repeats, [(1536, 576)] + SEVEN_B if a.shapes != "smol" else [(1536, 576)],
                        ["70%", "2:4"])
        if bf:
            save_results("kernels_bf16" + _suffix(a), "Sparse kernels with bf16 values vs dense bf16 F.linear", bf,
                         protocol=f"layer latency, batches [1, 8], threads {threads[0]}",
                         notes=[f"median of {a.repeats} alternating calls; x/y bf16, fp32 accumulation in our kernel",
                                "bound_vs_dense_bf16 = 2 bytes per dense weight / encoding bytes"], out_dir=a.out_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts for the layer table")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default="all", choices=["all", "smol", "7b"])
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end part")
    ap.add_argument("--e2e-threads", type=int, default=2)
    ap.add_argument("--e2e-repeats", type=int, default=7)
    ap.add_argument("--context", type=int, default=128, help="decode context (tokens prefilled untimed)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the result names (kernels_layers_TAG...), e.g. the ISA "
                    "of the machine, so a run on another kind of CPU does not replace the committed tables")
    a = ap.parse_args(argv)
    if not available():
        raise SystemExit(unavailable_reason())
    t0 = time.perf_counter()
    shapes = {"all": SMOL + SEVEN_B, "smol": SMOL, "7b": SEVEN_B}[a.shapes]
    threads = [int(t) for t in a.threads.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    if not a.e2e_only:
        layer_part(a, shapes, threads, batches)
    if not a.no_e2e:
        reset_counters()
        state0, load0 = cpu_times(), os.getloadavg()[0]
        e2e, notes = bench_e2e(a.e2e_threads, a.e2e_repeats, a.context, a.decode_tokens, a.prefill_tokens,
                               not a.no_ort, sorted({1, a.e2e_threads}))
        notes_e2e = [
            f"decode: context {a.context} tokens prefilled untimed, then {a.decode_tokens} single-token steps with "
            f"KV cache, ms/token; prefill: one forward of 1 x {a.prefill_tokens} tokens, full logits; median of "
            f"{a.e2e_repeats} rounds after one warm-up round, every (engine, model) once per round in an order "
            f"rotated each round, all in one process; {a.e2e_threads} threads for every engine",
            "models: SmolLM2-135M dense and the Wanda 70 % / 2:4 checkpoints of bench_latency.py (uniform, "
            "32 x 512 C4 calibration tokens); embeddings and the tied lm_head stay dense",
            "engines: torch-cpu = HF eager dense; ort-cpu = ONNX Runtime on the optimum export (dense); "
            "torch-sparse = HF eager with SparseLinear swapped in (7 linears per layer, measured thresholds); "
            "lean-cpu = the lean path (runtime/lean_llama.py: fused q/k/v and gate/up, preallocated KV cache, "
            "a whole decode token in one C call) with dense weights and a dense C matrix-vector kernel; "
            "sparse-cpu = the same lean path on the packed sparse weights; ort-sparse = ort-cpu's export with the "
            "pruned MatMuls rewritten to our SparseLinear op at load, run by ORT with the compiled extension as its "
            "native custom-op library (our kernel inside ORT's graph; KV cache and everything else ORT's)",
            "bound = bytes of the dense weights read per token (fused linears + lm_head) / bytes of what the path "
            "reads (packed sparse linears + the dense lm_head); weights GB/s = bytes read per token / decode time",
            "lean decode stages: sr_decode_profile, thread 0's time between barriers, median of 3 rounds of "
            f"{a.decode_tokens} steps after a {a.context}-token prefill (so a stage includes waiting for the "
            "slowest thread); 'norms' includes the residual adds",
            "for comparison, from ANOTHER run (benchmarks/results/latency.md, same models, 2 threads, decode @ ctx "
            "128, 16 steps): DeepSparse 1.8 decode 30.5 ms/token at Wanda 70 % (dense 44.8), 40.3 at 2:4; prefill "
            "1 x 128 164 ms at 70 % (dense 308); ORT dense decode 63.0 ms/token (96.7 with dense loaded last, "
            "latency_dense_last.md); those figures are not paired with these",
            *notes, f"kernel counters {counters()}",
            f"AVX-512 batch-1 form: {gemv_choice() or 'n/a (no AVX-512 module)'}; "
            f"AVX2 csr16 batch-1 form: {gemv_choice('avx2') or 'n/a (no AVX2 csr16 module)'}",
            "shared 2-core VM: other processes may run unlocked; read the min-max columns",
            machine_state(state0, load0)]
        save_results("kernels_e2e" + _suffix(a), "SmolLM2-135M end to end: lean sparse path vs dense (PyTorch, ORT, lean)", e2e,
                     protocol=f"latency, batch 1, threads {a.e2e_threads}", model="SmolLM2-135M-Instruct (fp32)",
                     notes=notes_e2e, out_dir=a.out_dir)
    print(f"wall time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
