"""2:4 semi-structured vs dense on a CUDA GPU: linear layers and end to end (prepared for a lent GPU).

    python benchmarks/gpu_latency_24.py [--dtype float16] [--quick]

1. Linear layers y = x W^T at SmolLM2-135M's shapes (576x576, 192x576, 1536x576, 576x1536) and
   LLaMA-7B-like shapes (4096x4096, 11008x4096, 4096x11008), for M = 1, 16, 128, 2048 tokens: dense
   ``F.linear`` against the same weight as ``torch.sparse.SparseSemiStructuredTensor`` (cuSPARSELt when
   available, and CUTLASS), fp16. 2:4 masks by magnitude (kernels do not care which weights are kept).
2. End to end: a Llama with SmolLM2's shapes (the real weights are not on the GPU machine; the random
   init changes nothing about speed) with every block linear 2:4, dense fp16 vs the
   ``torch-cuda-24`` engine: prefill batch 1 x 128 / 512, batch 16 x 128, and decode ms/token at
   context 128.
Timing: CUDA-synchronised wall clock, warm-up, interleaved dense/sparse rounds, median and IQR,
pairwise speedups (sparse_runtime.measure.stats). Evidence: the CUDA kernel names the profiler saw for
the sparse matmul. Results: ``benchmarks/results/gpu_latency_24.{md,json}`` with the GPU name.

Without a CUDA GPU it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in)
SEVEN_B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def stats_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_stats", ROOT / "sparse_runtime" / "measure" / "stats.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # plain Python, no package import (the GPU image has other versions)
    return mod


def prune_24(w):
    import torch

    g = w.reshape(w.shape[0], -1, 4)
    idx = g.abs().topk(2, dim=-1).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * keep).reshape(w.shape)


def interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict:
    import torch

    st = stats_module()
    for _ in range(warmup):
        for f in fns.values():
            f()
    torch.cuda.synchronize()
    out = {k: [] for k in fns}
    for order in st.interleaved_order(list(fns), repeats):
        for k in order:
            torch.cuda.synchronize()
            t = time.perf_counter()
            fns[k]()
            torch.cuda.synchronize()
            out[k].append(time.perf_counter() - t)
    return out


def kernels_of(fn) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if "cuda" in str(e.device_type).lower()})[:6]


def linear_rows(dtype, repeats: int, ms, backends) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    st = stats_module()
    rows = []
    for group, shapes in (("SmolLM2-135M", SMOL_SHAPES), ("7B-like", SEVEN_B_SHAPES)):
        for (n, k) in shapes:
            w = prune_24(torch.randn(n, k, device="cuda", dtype=dtype))
            sparse_w = {}
            for b in backends:
                SparseSemiStructuredTensor._FORCE_CUTLASS = b == "cutlass"
                sparse_w[b] = to_sparse_semi_structured(w)
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = F.linear(x, w)
                fns = {"dense": lambda x=x: F.linear(x, w)}
                for b, sw in sparse_w.items():
                    fns[b] = (lambda x=x, sw=sw: F.linear(x, sw))
                    err = (F.linear(x, sw) - ref).abs().max().item()
                times = interleaved(fns, repeats)
                d = st.summarize(times["dense"])
                for b in sparse_w:
                    s = st.summarize(times[b])
                    sp = st.speedup(times["dense"], times[b])
                    rows.append({"part": "linear", "shapes": group, "W (out x in)": f"{n}x{k}", "tokens M": m,
                                 "backend": b, "dense us": d.median * 1e6, "2:4 us": s.median * 1e6,
                                 "2:4 IQR us": f"{s.q1 * 1e6:.1f}-{s.q3 * 1e6:.1f}", "speedup": sp.speedup,
                                 "paired": f"{sp.paired_median:.2f} [{sp.paired_q1:.2f}-{sp.paired_q3:.2f}]",
                                 "verdict": sp.verdict, "max |diff|": err,
                                 "kernel": ", ".join(k for k in kernels_of(fns[b]) if "gemm" in k.lower()
                                                     or "sparse" in k.lower() or "cutlass" in k.lower())[:120]})
                    print(rows[-1], flush=True)
    return rows


def model_rows(dtype, repeats: int, layers: int, scenarios) -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    st = stats_module()
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                      max_position_embeddings=8192)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in base.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(prune_24(lin.weight))
    import copy

    dense = copy.deepcopy(base).to("cuda", dtype).eval()
    sparse = base.to("cuda", dtype).eval()

    # the same conversion as the torch-cuda-24 engine (sparse_runtime.runtime.torch_cuda.to_semi_structured),
    # inlined so this script runs under the GPU image's own transformers without importing the package
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = not (getattr(torch.backends, "cusparselt", None) is not None
                                                     and torch.backends.cusparselt.is_available())
    converted = []
    for i, layer in enumerate(sparse.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
                converted.append(f"model.layers.{i}.{name}")
    rows = []
    for kind, b, t in scenarios:
        fns, per = model_timers(dense, sparse, kind, b, t, 16, 49152, "cuda")
        with torch.inference_mode():
            times = interleaved(fns, repeats)
            kern = kernels_of(fns["2:4"])
        d, s = st.summarize(times["dense"]), st.summarize(times["2:4"])
        sp = st.speedup(times["dense"], times["2:4"])
        rows.append({"part": "end to end", "shapes": f"Llama SmolLM2-shaped, {layers} layers, {len(converted)} 2:4 linears",
                     "scenario": f"{kind} b{b} x {t}" if kind == "prefill" else f"decode b{b} @ ctx {t} (ms/token)",
                     "dense ms": d.median * 1e3 / per, "2:4 ms": s.median * 1e3 / per,
                     "2:4 IQR ms": f"{s.q1 * 1e3 / per:.3f}-{s.q3 * 1e3 / per:.3f}", "speedup": sp.speedup,
                     "paired": f"{sp.paired_median:.2f} [{sp.paired_q1:.2f}-{sp.paired_q3:.2f}]", "verdict": sp.verdict,
                     "kernel": ", ".join(k for k in kern if "sparse" in k.lower() or "cutlass" in k.lower()
                                         or "cslt" in k.lower())[:160]})
        print(rows[-1], flush=True)
    return rows


def model_timers(dense, sparse, kind: str, b: int, t: int, steps: int, vocab: int, device) -> tuple[dict, int]:
    """{"dense": fn, "2:4": fn} running one prefill (``b x t``) or ``steps`` decode steps after a
    context of ``t`` (each call crops the cache back to ``t``), and how many tokens a call times per
    row (1 for prefill, ``steps`` for decode)."""
    import torch

    ids = torch.randint(3, vocab, (b, t), device=device)
    if kind == "prefill":
        return {name: (lambda m=m: m(input_ids=ids, use_cache=False)) for name, m in
                (("dense", dense), ("2:4", sparse))}, 1
    from transformers import DynamicCache

    nxt = torch.randint(3, vocab, (b, steps), device=device)
    fns = {}
    for name, m in (("dense", dense), ("2:4", sparse)):
        cache = m(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).past_key_values

        def run(m=m, cache=cache):
            cache.crop(t)
            for i in range(steps):
                m(input_ids=nxt[:, i:i + 1], past_key_values=cache, use_cache=True)
        fns[name] = run
    return fns, steps


def save(rows, notes, gpu):
    try:
        from sparse_runtime.report import save_results

        save_results("gpu_latency_24", f"2:4 semi-structured vs dense on {gpu}", rows,
                     protocol="CUDA-synchronised wall clock; warm-up 3; interleaved dense/2:4 rounds; median [IQR]; "
                              "pairwise speedups", model="linear layers + SmolLM2-shaped Llama", notes=notes)
    except Exception as e:  # the GPU image may not import the whole package: write the files directly
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_latency_24.json").write_text(json.dumps({"gpu": gpu, "notes": notes, "rows": rows}, indent=1,
                                                            default=str))
        cols = list(dict.fromkeys(k for r in rows for k in r))
        md = [f"# 2:4 semi-structured vs dense on {gpu}", ""] + [f"- {n}" for n in notes] + [
            f"- (save_results unavailable here: {e})", "", "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols)] + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        (out / "gpu_latency_24.md").write_text("\n".join(md) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer token counts and scenarios")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("no torch here: nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU visible (torch.cuda.is_available() is False): the 2:4 GPU benchmark needs one; exiting")
        return 0
    major, minor = torch.cuda.get_device_capability(0)
    gpu = torch.cuda.get_device_name(0)
    if major < 8:
        print(f"{gpu} (sm_{major}{minor}) has no 2:4 sparse tensor cores (needs 8.0+); exiting")
        return 0
    dtype = getattr(torch, args.dtype)
    cslt = getattr(torch.backends, "cusparselt", None)
    backends = (["cusparselt"] if cslt is not None and cslt.is_available() else []) + ["cutlass"]
    ms = [1, 128, 2048] if args.quick else [1, 16, 128, 2048]
    t0 = time.perf_counter()
    rows = linear_rows(dtype, args.repeats, ms, backends)
    scen = [("prefill", 1, 128), ("prefill", 1, 512), ("prefill", 16, 128), ("decode", 1, 128)]
    try:
        rows += model_rows(dtype, args.repeats, args.layers, scen[:2] + scen[3:] if args.quick else scen)
    except Exception as e:  # report what ran
        rows.append({"part": "end to end", "error": f"{type(e).__name__}: {e}"[:300]})
        print(rows[-1])
    import transformers

    notes = [f"GPU {gpu} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}, transformers "
             f"{transformers.__version__}, dtype {args.dtype}, backends {backends}",
             "speedup = median dense / median 2:4; verdict 'faster' only when the pairwise IQR is above 1.05",
             f"wall time {time.perf_counter() - t0:.0f} s"]
    save(rows, notes, gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
