"""Export benchmark: SmolLM2-135M dense, Wanda 50 %, 70 % (unstructured) and 2:4, in every format.

Per (model, format): export wall time, verification time, size on disk, and the parity figures the
export's own verification measured against float32 PyTorch (max |logit diff| and greedy argmax
agreement on a fixed 24-token prompt, batch 2 for ONNX Runtime / batch 1 for the static graphs;
prefill and one KV-cached decode step), plus DeepSparse's share of optimised ops when its env is
installed. Pruned checkpoints are made with the project's Wanda (``sparse_runtime.prune``, quick
protocol calibration: 32 x 512 C4 tokens, seed 0) when available, else with a one-pass Wanda-style
score from ``tests/wanda_reference.py`` (the notes say which).

Run under the shared lock:  flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_export.py
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_checkpoints(work: Path, data_dir, which: list[str]) -> tuple[dict[str, str], str]:
    """Dense spec + pruned checkpoint dirs (cached in ``work`` between runs)."""
    out = {"dense": "smollm2-135m"}
    cfgs = {"wanda-50": dict(sparsity=0.5), "wanda-70": dict(sparsity=0.7), "wanda-2:4": dict(structure="2:4")}
    how = "sparse_runtime.prune (Wanda, quick protocol calibration 32x512 C4, seed 0, uniform allocation)"
    for name in which:
        if name == "dense":
            continue
        ck = work / f"ckpt-{name.replace(':', '-')}"
        out[name] = str(ck)
        if (ck / "sparsity_manifest.json").is_file():
            continue
        t0 = time.perf_counter()
        try:
            from sparse_runtime.prune import PruneConfig, prune_checkpoint

            prune_checkpoint("smollm2-135m", PruneConfig(method="wanda", protocol="quick", **cfgs[name]), ck,
                             overwrite=True, data_dir=data_dir, plot=False)
        except ImportError:
            how = "tests/wanda_reference.py prune_model (one-pass Wanda score on 8x512 C4 tokens)"
            _fallback_prune(ck, cfgs[name], data_dir)
        print(f"pruned {name} in {time.perf_counter() - t0:.0f} s -> {ck}", flush=True)
    return out, how


def _fallback_prune(ck: Path, cfg: dict, data_dir) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the plain reference pruner
    from wanda_reference import prune_model
    from sparse_runtime.data import c4_windows
    from sparse_runtime.manifest import build_manifest, save_checkpoint
    from sparse_runtime.models import load_model

    lm = load_model("smollm2-135m")
    ids = c4_windows(lm.tokenizer, 8, 512, 0, data_dir)
    st = prune_model(lm.model, lm.family, cfg.get("sparsity", 0.5), cfg.get("structure"), "wanda", ids)
    save_checkpoint(lm.model, lm.tokenizer, ck, build_manifest(lm.model, lm.family, structures=st,
                                                               base_model="smollm2-135m"), overwrite=True)


PLAN = [  # (format, options, which models)
    ("onnx", {}, "all"),
    ("onnx", {"dtype": "float16"}, "all"),
    ("onnx", {"sparse_initializers": True}, "sparse"),
    ("deepsparse", {"prefill_length": 128, "cache_length": 256}, "all"),
    ("bitmask", {}, "all"),
    ("semi-structured", {"dtype": "float16"}, "2:4"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sr-bench-export", help="scratch dir for checkpoints and exports")
    ap.add_argument("--models", default="dense,wanda-50,wanda-70,wanda-2:4")
    ap.add_argument("--formats", default=None, help="comma list to restrict formats")
    ap.add_argument("--keep", action="store_true", help="keep the export directories")
    args = ap.parse_args()
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")
    import torch

    torch.set_num_threads(2)
    from exporters import export
    from sparse_runtime.report import save_results

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = os.environ.get("SPARSE_RUNTIME_DATA", "/work/shared/data")
    which = args.models.split(",")
    t_all = time.perf_counter()
    specs, how = make_checkpoints(work, data_dir, which)
    dense_hf = None
    rows = []
    for name in which:
        spec = specs[name]
        for fmt, opts, scope in PLAN:
            if args.formats and fmt not in args.formats.split(","):
                continue
            if (scope == "sparse" and name == "dense") or (scope == "2:4" and name != "wanda-2:4"):
                continue
            out = work / f"out-{name.replace(':', '-')}-{fmt}-{'-'.join(f'{k}{v}' for k, v in opts.items())}"
            t0 = time.perf_counter()
            try:
                res = export(spec, fmt, out, overwrite=True, **opts)
            except Exception as e:  # record and go on: one format failing must not hide the others
                rows.append({"model": name, "format": fmt, "options": _opt(opts), "error": str(e)[:200]})
                print(f"{name} {fmt} FAILED: {e}", flush=True)
                continue
            wall = time.perf_counter() - t0
            v = res.verification
            lg = {c["name"]: c for c in v.get("logits", [])}
            ds = v.get("deepsparse") or {}
            if dense_hf is None:
                from sparse_runtime.models import load_model

                p = load_model("smollm2-135m").path
                dense_hf = sum(f.stat().st_size for f in Path(p).glob("*.safetensors"))
            row = {
                "model": name, "sparsity": res.manifest["source"]["total_sparsity"], "format": fmt,
                "options": _opt(opts), "export_s": res.export_seconds, "verify_s": res.verify_seconds,
                "wall_s": wall, "size_MiB": res.total_bytes / 2 ** 20,
                "vs_dense_fp32_safetensors": res.total_bytes / dense_hf,
                "prefill_max_diff": lg.get("prefill", {}).get("max_abs_diff"),
                "prefill_argmax": lg.get("prefill", {}).get("argmax_agreement"),
                "decode_max_diff": lg.get("decode_step", {}).get("max_abs_diff"),
                "decode_argmax": lg.get("decode_step", {}).get("argmax_agreement"),
                "masks": f"{v['masks']['matched']}/{v['masks']['layers']}" if "masks" in v else None,
                "ds_optimised_ops": ds.get("fraction_of_supported_ops") if ds.get("checked") else
                ("not checked" if ds else None),
                "ds_prefill_max_diff": next((c["max_abs_diff"] for c in ds.get("logits", []) if c["name"] == "prefill"), None),
                "ds_decode_max_diff": next((c["max_abs_diff"] for c in ds.get("logits", []) if c["name"] == "decode_step"), None),
            }
            rows.append(row)
            print({k: row[k] for k in ("model", "format", "options", "export_s", "size_MiB", "prefill_max_diff",
                                       "decode_max_diff", "ds_optimised_ops")}, flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    total = time.perf_counter() - t_all
    save_results(
        "export", "Export formats: size, time and parity (SmolLM2-135M-Instruct)", rows, protocol="quick",
        model="SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)",
        notes=[f"pruning: {how}",
               "parity: the export's own verification against fp32 PyTorch on a fixed 24-token prompt; "
               "onnx batch 2 (prefill + 1 KV-cached decode step), deepsparse graphs batch 1 via ONNX Runtime",
               "deepsparse: static prefill 128 / cache 256, opset 18, IR 8; ds_optimised_ops = DeepSparse 1.8 "
               "fraction_of_supported_ops (evaluation-only licence)",
               "sizes include config/tokenizer files; dense reference = fp32 HF safetensors "
               f"({(dense_hf or 0) / 2 ** 20:.1f} MiB)",
               "ONNX sparse initializers are densified by ORT on load (file size only)",
               f"total wall time {total:.0f} s on 2 cores"],
    )


def _opt(opts: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "defaults"


if __name__ == "__main__":
    main()
