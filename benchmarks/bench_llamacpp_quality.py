"""What llama.cpp's dense types cost in quality, beside our own quantized values (issue 21's baselines).

    nice -n 19 python benchmarks/bench_llamacpp_quality.py --out benchmarks/results
    python benchmarks/bench_llamacpp_quality.py --model tiny      # proves the script runs (seconds)

WikiText-2 perplexity under the ``quick`` protocol (docs/protocols.md#perplexity: the test text
tokenized once, the first 40 windows of 512 tokens, batch 1), computed from the logits llama.cpp
itself returns for each window (the ``llamacpp`` engine's prefill on the ``gguf`` export, its K/V
cache fp16 as users run it), beside the same windows through PyTorch in fp32. The llama.cpp F32 row
checks the harness: it must give PyTorch's perplexity. Checkpoints: the dense model and Wanda 50 %
(the latency table's; 50 % is where int4 meets llama.cpp's Q4_0 in speed). Our own int8 / int4 rows
on the same protocol are in quant_quality.md (perplexity does not depend on the machine).
Nothing is written to benchmarks/results unless ``--out`` says so.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class EngineLM:
    """An engine seen as the ``model(x).logits`` callable the perplexity function takes."""

    def __init__(self, engine):
        self.engine = engine

    def parameters(self):
        return iter(())  # no torch parameters: the perplexity loop runs on the CPU

    def __call__(self, x, use_cache: bool = False):
        import torch

        return SimpleNamespace(logits=torch.from_numpy(self.engine.prefill(x.numpy())))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--qtypes", default="F32,Q8_0,Q4_0")
    ap.add_argument("--checkpoints", default="dense,wanda-50")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="directory for <name>.md/.json (default: a temporary directory)")
    ap.add_argument("--name", default="llamacpp_quality")
    args = ap.parse_args()

    import sparse_runtime as sr
    from bench_quant_latency import bench_checkpoints, leading_notes
    from sparse_runtime.data.text import tokenize_stream, wikitext2_text
    from sparse_runtime.eval.perplexity import perplexity_from_ids
    from sparse_runtime.protocols import get_protocol
    from sparse_runtime.report import save_results
    from sparse_runtime.runtime import get_engine, load_engine
    from sparse_runtime.runtime.base import default_threads

    ok, why = get_engine("llamacpp").available()
    if not ok:
        print(f"error: {why}", file=sys.stderr)
        return 2
    proto = get_protocol("quick" if args.model == "smollm2" else "test")
    threads = args.threads or default_threads()
    dense, sparse = bench_checkpoints(args.model)
    paths = {"dense": dense, **sparse}
    rows, t0 = [], time.perf_counter()
    for ck in [c for c in args.checkpoints.split(",") if c]:
        lm = sr.load_model(str(paths[ck]))
        ids = tokenize_stream(lm.tokenizer, wikitext2_text())
        seqlen, windows = proto.eval_seqlen, proto.eval_windows
        ref = perplexity_from_ids(lm.model, ids, seqlen, windows, desc=f"{ck} torch fp32", protocol=proto.name)
        rows.append({"row": f"{ck} fp32, PyTorch", "checkpoint": ck, "values": "fp32", "ppl": round(ref.ppl, 3),
                     "vs fp32 %": 0.0, "bytes/weight": 4.0, "seconds": round(ref.seconds, 1)})
        del lm
        for q in [q for q in args.qtypes.split(",") if q]:
            eng = load_engine("llamacpp", str(paths[ck]), threads=threads, qtype=q, n_ctx=seqlen)
            try:
                res = perplexity_from_ids(EngineLM(eng), ids, seqlen, windows, desc=f"{ck} llama.cpp {q}",
                                          protocol=proto.name)
                rows.append({"row": f"{ck} {q}, llama.cpp", "checkpoint": ck, "values": q, "ppl": round(res.ppl, 3),
                             "vs fp32 %": round(100 * (res.ppl / ref.ppl - 1), 2),
                             "bytes/weight": eng.scheme().get("bytes_per_weight"), "seconds": round(res.seconds, 1)})
            finally:
                eng.close()
            print(rows[-1], flush=True)
    import llama_cpp

    notes = leading_notes(args.model) + [
        f"WikiText-2 test, protocol {proto.name}: {proto.eval_windows} windows of {proto.eval_seqlen} tokens, batch 1; "
        "llama.cpp rows: the logits of every position from llama.cpp (llamacpp engine, prefill), fp16 K/V "
        "(its default), the gguf export with every 2-D weight incl. the embedding and lm_head in the row's type "
        "(--pure); vs fp32 % = ppl / ppl(the same checkpoint in PyTorch fp32) - 1",
        f"llama-cpp-python {llama_cpp.__version__}; {threads} threads; wall {time.perf_counter() - t0:.0f} s",
        "our int8 / int4-g64 rows on the same protocol and checkpoints: quant_quality.md",
    ]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sr-bench-llamacpp-q-"))
    model = ("tiny random Llama, not a benchmark model" if args.model == "tiny"
             else "SmolLM2-135M-Instruct (fp32, dequantised Q4_1 GGUF) and its Wanda 50 % checkpoint")
    md = save_results(args.name, "llama.cpp's dense types: what they cost in perplexity", rows,
                      protocol=f"perplexity {proto.name} (docs/protocols.md#perplexity)", model=model, notes=notes,
                      out_dir=out)
    print(f"written: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
