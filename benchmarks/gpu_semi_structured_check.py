"""GPU check of the 2:4 semi-structured export: SparseSemiStructuredTensor vs dense reconstruction.

On a CUDA machine: makes (or takes, ``--export DIR``) a 2:4 semi-structured export, loads it twice
on the GPU, once as dense weights (the reconstruction) and once per backend (CUTLASS, cuSPARSELt)
with every packed linear as ``torch.sparse.SparseSemiStructuredTensor``, and compares the logits
(max |diff|, argmax agreement) on fixed token batches. It also times a prefill forward of both
(median of repeats, after warm-up) so the result says whether the 2:4 kernels ran and what they
gave. Results go to ``benchmarks/results/gpu_semi_structured.{md,json}``.

Without a GPU it prints why and exits 0. Model: ``--model`` (default smollm2-135m); if that cannot
be loaded on the GPU machine (no cached weights, no network) it falls back to a random Llama with
SmolLM2's shapes (hidden 576, intermediate 1536, 9/3 heads) and fewer layers, and says so.
2:4 masks: magnitude (tests/wanda_reference.py prune_model); the check is about kernels, not quality.

    python benchmarks/gpu_semi_structured_check.py [--export DIR] [--dtype float16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_export(model_spec: str, dtype: str, work: Path) -> tuple[Path, str]:
    from exporters import export
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the plain reference pruner
    from wanda_reference import prune_model
    from sparse_runtime.manifest import build_manifest, save_checkpoint
    from sparse_runtime.models import family_of, load_model, tiny_model

    try:
        lm = load_model(model_spec)
        model, tok, what = lm.model, lm.tokenizer, model_spec
    except Exception as e:  # no cached SmolLM2 on this machine
        print(f"cannot load {model_spec} ({str(e)[:120]}); using a random Llama with SmolLM2's shapes")
        model = tiny_model("llama", 0, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                           num_key_value_heads=3, num_hidden_layers=6, vocab_size=49152, head_dim=64)
        tok, what = None, "random Llama (SmolLM2 shapes, 6 layers)"
    fam = family_of(model)
    st = prune_model(model, fam, structure="2:4")
    ck = save_checkpoint(model, tok, work / "ckpt", build_manifest(model, fam, structures=st), overwrite=True)
    out = work / "semi"
    export(ck, "semi-structured", out, overwrite=True, dtype=dtype)
    return out, what


def timed(fn, repeats: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", default=None, help="an existing semi-structured export directory")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--backends", default="cutlass,cusparselt")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: SparseSemiStructuredTensor is CUDA-only, nothing to check. "
              "Run this script on a machine with an Ampere-or-newer NVIDIA GPU.")
        return 0
    from exporters.semi_structured import load_semi_structured
    from sparse_runtime.report import save_results

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sr-gpu-24-"))
    if args.export:
        exp, what = Path(args.export), f"export {args.export}"
    else:
        exp, what = build_export(args.model, args.dtype, work)
    dense, info_d = load_semi_structured(exp, device="cuda", backend="dense")
    vocab = dense.config.vocab_size
    shapes = [(1, 128), (4, 128), (16, 128)]
    batches = {s: torch.randint(0, vocab, s, device="cuda") for s in shapes}
    rows = []
    with torch.no_grad():
        ref = {s: dense(input_ids=b).logits.float() for s, b in batches.items()}
        t_dense = {s: timed(lambda b=b: dense(input_ids=b)) for s, b in batches.items()}
        for backend in args.backends.split(","):
            row_base = {"backend": backend, "dtype": args.dtype}
            if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
                rows.append({**row_base, "status": "cuSPARSELt not available in this PyTorch build"})
                continue
            try:
                sparse, info = load_semi_structured(exp, device="cuda", backend=backend)
            except Exception as e:
                rows.append({**row_base, "status": f"load failed: {str(e)[:160]}"})
                continue
            from torch.sparse import SparseSemiStructuredTensor

            n_sst = sum(isinstance(m.weight, SparseSemiStructuredTensor) for m in sparse.modules()
                        if isinstance(m, torch.nn.Linear))
            for s, b in batches.items():
                try:
                    got = sparse(input_ids=b).logits.float()
                    ms = timed(lambda b=b: sparse(input_ids=b))
                except Exception as e:
                    rows.append({**row_base, "batch x tokens": f"{s[0]}x{s[1]}", "status": f"forward failed: {str(e)[:160]}"})
                    continue
                diff = (got - ref[s]).abs().max().item()
                agree = (got.argmax(-1) == ref[s].argmax(-1)).float().mean().item()
                rows.append({**row_base, "batch x tokens": f"{s[0]}x{s[1]}", "status": "ok",
                             "sparse_tensors": n_sst, "max_abs_logit_diff": diff,
                             "max_abs_logit": ref[s].abs().max().item(), "argmax_agreement": agree,
                             "dense_ms": t_dense[s], "sparse_ms": ms, "speedup": t_dense[s] / ms})
            del sparse
            torch.cuda.empty_cache()
    save_results("gpu_semi_structured", "2:4 semi-structured export on GPU: SparseSemiStructuredTensor vs dense "
                 "reconstruction", rows, protocol="fixed random token batches, seed 0; median of 20 forwards after "
                 "3 warm-up", model=what, out_dir=args.out_dir,
                 notes=[f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}",
                        "reference = the same export loaded as dense weights on the GPU (same dtype)",
                        "2:4 masks by magnitude; timings are whole-model prefill forwards (attention dense)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
