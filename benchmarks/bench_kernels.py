"""Our CPU sparse kernels vs dense, per layer shape and end to end on SmolLM2-135M (issue 9).

Run under the shared lock:  flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_kernels.py

Part 1, layers: SmolLM2-135M shapes (576x576, 192x576, 1536x576, 576x1536) and 7B-like shapes
(4096x4096, 11008x4096, 4096x11008) at 50 %, 70 %, 90 % unstructured and 2:4, batch 1/8/16.
Dense = PyTorch F.linear (oneDNN/MKL) and ORT MatMul on the same weight; sparse = our kernel on
each ISA path this CPU runs (the default path's layout, plus csr16/AVX2 on an AVX-512 CPU as a
preview of AVX2 machines). Median of --repeats timed calls after warm-up, dense and sparse
alternating call by call; threads fixed per row. GB/s = bytes of the weight encoding read / time;
bound = dense bytes / encoding bytes (protocols.md). The measured dense/sparse batch threshold of
the module (SparseLinear.batch_threshold) is printed per shape.

Part 2, end to end: SmolLM2-135M pruned by per-row magnitude (70 %) and 2:4 magnitude on all block
linears, swapped to SparseLinear; decode ms/token (KV cache, after a --prompt-token prefill) and
prefill ms, dense vs sparse in the same process, alternating, median of --repeats. The model's
bound counts its dense tied lm_head.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_runtime.kernels import (SparseLinear, available, call_counts, counters, pack, reset_counters,
                                    sparsify_linears, supported_isas, unavailable_reason)
from sparse_runtime.kernels import _lib
from sparse_runtime.kernels._lib import DEFAULT_LAYOUT
from sparse_runtime.kernels.module import choose_gemv_variant, gemv_choice, measure_threshold
from sparse_runtime.report import save_results
from sparse_runtime.sparsity import NMPattern, nm_prune_mask, topk_prune_mask

SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
SEVEN_B = [(4096, 4096), (11008, 4096), (4096, 11008)]
STRUCTS = ["50%", "70%", "90%", "2:4"]


def prune(w: torch.Tensor, struct: str) -> torch.Tensor:
    if ":" in struct:
        return w * nm_prune_mask(w.abs(), NMPattern.parse(struct))
    return w * topk_prune_mask(w.abs(), float(struct.rstrip("%")) / 100, per_row=True)


def ort_matmul(w: torch.Tensor, threads: int):
    """A one-node ORT session computing x @ W^T (weight as an initializer), or None without ORT."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    n, k = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                          [numpy_helper.from_array(w.t().contiguous().numpy(), "wt")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def ort_sparse(w: torch.Tensor, threads: int):
    """The same MatMul rewritten to our SparseLinear op (onnxruntime-extensions PyOp), or None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime_extensions  # noqa: F401
        from onnx import TensorProto, helper, numpy_helper

        from sparse_runtime.kernels import ort as sort
    except ImportError:
        return None
    n, k = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                          [numpy_helper.from_array(w.t().contiguous().numpy(), "wt")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sm, count = sort.sparsify_onnx(model, min_sparsity=0.0)
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
    if "avx512" in isas and "avx2" in isas:
        paths.append(("avx2", "csr16"))
    for threads in threads_list:
        torch.set_num_threads(threads)
        for n, k in shapes:
            w0 = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k))
            for struct in structs:
                w = prune(w0, struct).contiguous()
                mods = {isa: SparseLinear(pack(w, lay), None, isa=isa, dense_weight=w, batch_threshold=1 << 30)
                        for isa, lay in paths}
                ort_w = ort_matmul(w, threads) if with_ort else None
                ort_s = ort_sparse(w, threads) if with_ort else None
                thr = {isa: measure_threshold(m, repeats=5) for isa, m in mods.items()}
                for b in batches:
                    x = torch.randn(b, k)
                    xn = x.numpy()
                    fns = {"dense": lambda: F.linear(x, w)}
                    if ort_w is not None:
                        fns["ort"] = lambda: ort_w(xn)
                    if ort_s is not None:
                        fns["ort_sparse"] = lambda: ort_s(xn)
                    for isa, m in mods.items():
                        fns[isa] = (lambda m=m: m.sparse_forward(x))
                    if b == 1 and "avx512" in mods:  # tuning: the batch-1 form the process did NOT choose
                        chosen = choose_gemv_variant()
                        other = next(v for v in _lib.GEMV_VARIANTS if v != chosen)
                        fns["avx512-other"] = lambda: (_lib.set_gemv_variant(other), mods["avx512"].sparse_forward(x),
                                                        _lib.set_gemv_variant(chosen))
                    res = timed(fns, repeats)
                    if "avx512-other" in res:
                        rows.append({"threads": threads, "shape": f"{n}x{k}", "sparsity": struct, "batch": b,
                                     "path": f"avx512/bitmask ({other} form, not chosen)", "dense_torch_ms": res["dense"][0],
                                     "sparse_ms": res["avx512-other"][0],
                                     "sparse_min_max": f"{res['avx512-other'][1]:.3g}-{res['avx512-other'][2]:.3g}",
                                     "speedup_vs_torch": res["dense"][0] / res["avx512-other"][0],
                                     "sparse_GBps": mods["avx512"].packed.nbytes / res["avx512-other"][0] / 1e6,
                                     "bound": mods["avx512"].packed.bandwidth_bound()})
                    dense_ms = res["dense"][0]
                    for isa, m in mods.items():
                        p = m.packed
                        s_ms = res[isa][0]
                        rows.append({
                            "threads": threads, "shape": f"{n}x{k}", "sparsity": struct, "batch": b,
                            "path": f"{isa}/{p.layout}", "dense_torch_ms": dense_ms,
                            "dense_ort_ms": res["ort"][0] if "ort" in res else None,
                            "sparse_ms": s_ms, "sparse_min_max": f"{res[isa][1]:.3g}-{res[isa][2]:.3g}",
                            "speedup_vs_torch": dense_ms / s_ms,
                            "speedup_vs_ort": res["ort"][0] / s_ms if "ort" in res else None,
                            "ort_sparse_pyop_ms": res["ort_sparse"][0] if "ort_sparse" in res else None,
                            "dense_GBps": n * k * 4 / dense_ms / 1e6, "sparse_GBps": p.nbytes / s_ms / 1e6,
                            "bound": p.bandwidth_bound(), "threshold": thr[isa],
                        })
                        r = rows[-1]
                        print(f"t{threads} {r['shape']:>10} {struct:>4} b{b:<3} {r['path']:<16} dense {dense_ms:8.3f} "
                              f"ort {r['dense_ort_ms'] or float('nan'):8.3f} sparse {s_ms:8.3f} "
                              f"x{r['speedup_vs_torch']:5.2f} (bound {r['bound']:.2f}) thr {thr[isa]}", flush=True)
    return rows


@torch.inference_mode()
def bench_bf16(threads, batches, repeats, shapes, structs):
    """bf16 values vs dense bf16 F.linear (the issue's option), default ISA path if it has bf16."""
    from sparse_runtime.kernels._lib import supports_bf16

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


@torch.inference_mode()
def bench_e2e(threads, repeats, prompt_tokens, decode_tokens, structs):
    import sparse_runtime as sr
    from sparse_runtime.models import family_of

    torch.set_num_threads(threads)
    models = {}
    dense = sr.load_model("smollm2-135m").model.eval()
    models["dense"] = dense
    bound = {}
    head_bytes = dense.lm_head.weight.numel() * 4
    info = {}
    for struct in structs:
        m = sr.load_model("smollm2-135m").model.eval()
        fam = family_of(m)
        for _, lin in fam.iter_linears(m):
            lin.weight.copy_(prune(lin.weight, struct))
        t = time.perf_counter()
        rep = sparsify_linears(m, calibrate=True)
        info[struct] = f"{rep.summary()} in {time.perf_counter() - t:.1f}s"
        dense_bytes = head_bytes + sum(mod.in_features * mod.out_features * 4 for mod in rep.swapped.values())
        sparse_bytes = head_bytes + sum(mod.packed.nbytes for mod in rep.swapped.values())
        bound[struct] = dense_bytes / sparse_bytes
        models[struct] = m
    ids = torch.randint(100, 20000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def prefill(model):
        return model(ids, use_cache=True)

    def decode(model):
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t) * 1e3 / decode_tokens

    for m in models.values():  # warm-up
        decode(m)
    reset_counters()
    dec = {k: [] for k in models}
    pre = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            dec[k].append(decode(m))
            t = time.perf_counter()
            prefill(m)
            pre[k].append((time.perf_counter() - t) * 1e3)
    rows = []
    d_dec, d_pre = statistics.median(dec["dense"]), statistics.median(pre["dense"])
    for k in models:
        cc = call_counts(models[k])
        rows.append({"model": "SmolLM2-135M", "weights": k, "threads": threads,
                     "decode_ms_per_token": statistics.median(dec[k]),
                     "decode_min_max": f"{min(dec[k]):.3g}-{max(dec[k]):.3g}",
                     "decode_speedup": d_dec / statistics.median(dec[k]),
                     f"prefill{prompt_tokens}_ms": statistics.median(pre[k]),
                     "prefill_speedup": d_pre / statistics.median(pre[k]),
                     "bound": bound.get(k, 1.0), "sparse_calls": cc["sparse_calls"], "dense_calls": cc["dense_calls"]})
        print(rows[-1], flush=True)
    return rows, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts for the layer table")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default="all", choices=["all", "smol", "7b"])
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--e2e-threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    if not available():
        raise SystemExit(unavailable_reason())
    t0 = time.perf_counter()
    shapes = {"all": SMOL + SEVEN_B, "smol": SMOL, "7b": SEVEN_B}[a.shapes]
    threads = [int(t) for t in a.threads.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    reset_counters()
    rows = bench_layers(threads, batches, a.repeats, shapes, STRUCTS, not a.no_ort)
    layer_counters = counters()
    notes = [f"layer table: median of {a.repeats} alternating calls after 3 warm-up calls; fp32; "
             f"random N(0,1) weights pruned per row by magnitude (N:M by groups); kernel counters {layer_counters}",
             "dense_torch = F.linear (oneDNN/MKL); dense_ort = onnxruntime MatMul session, same threads; "
             "ort_sparse_pyop = the MatMul rewritten to our SparseLinear node run through onnxruntime-extensions' "
             "Python custom op (interim ORT path, default ISA; includes the Python round trip)",
             "path avx2/csr16 on an AVX-512 CPU previews the AVX2 kernel; AVX2-only CPUs (AMD EPYC) differ",
             "threshold = measured largest batch (of 1,2,4,...,128) where the sparse kernel was not slower "
             "than dense; SparseLinear dispatches larger batches to dense F.linear",
             "shared 2-core machine: other engineers' processes may run unlocked; see min-max spread",
             f"AVX-512 batch-1 form used by the 'avx512/bitmask' rows (chosen at first use, "
             f"sparse_runtime.kernels.choose_gemv_variant): {gemv_choice()}; the '(... form, not chosen)' rows time "
             "the other form in the same run"]
    save_results("kernels_layers", "Sparse kernels vs dense, per layer (fp32)", rows,
                 protocol=f"layer latency, batches {batches}, threads {threads}", notes=notes, out_dir=a.out_dir)
    if not a.no_bf16:
        bf = bench_bf16(threads[0], [1, 8], a.repeats, [(1536, 576)] + SEVEN_B if a.shapes != "smol" else [(1536, 576)],
                        ["70%", "2:4"])
        if bf:
            save_results("kernels_bf16", "Sparse kernels with bf16 values vs dense bf16 F.linear", bf,
                         protocol=f"layer latency, batches [1, 8], threads {threads[0]}",
                         notes=[f"median of {a.repeats} alternating calls; x/y bf16, fp32 accumulation in our kernel",
                                "bound_vs_dense_bf16 = 2 bytes per dense weight / encoding bytes"], out_dir=a.out_dir)
    if not a.no_e2e:
        e2e, info = bench_e2e(a.e2e_threads, 5, a.prompt_tokens, a.decode_tokens, ["70%", "2:4"])
        notes_e2e = [f"decode: {a.decode_tokens} greedy tokens after a {a.prompt_tokens}-token prompt (KV cache), "
                     f"ms/token, median of 5 alternating runs; prefill {a.prompt_tokens} tokens batch 1",
                     "pruning: per-row magnitude (70 %) / 2:4 magnitude on all 210 block linears; lm_head (tied) dense",
                     "bound = (dense bytes of block linears + lm_head) / (sparse encoding bytes + lm_head)",
                     *[f"sparsify {k}: {v}" for k, v in info.items()], f"kernel counters {counters()}",
                     f"AVX-512 batch-1 form: {gemv_choice() or 'n/a (no AVX-512 module)'}",
                     "dense ORT end to end is measured by the engines benchmark (bench_latency.py), not here"]
        save_results("kernels_e2e", "SmolLM2-135M decode/prefill: SparseLinear vs dense PyTorch", e2e,
                     protocol=f"latency, batch 1, threads {a.e2e_threads}", model="SmolLM2-135M-Instruct (fp32)",
                     notes=notes_e2e, out_dir=a.out_dir)
    print(f"wall time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
