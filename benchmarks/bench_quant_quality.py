"""What quantizing the kept values costs on top of sparsity: SmolLM2-135M, WikiText-2 perplexity.

    nice -n 19 python benchmarks/bench_quant_quality.py [--rows a,b,...] [--work runs/bench_quant]
    nice -n 19 python benchmarks/bench_quant_quality.py --zeroshot [--zeroshot-limit 200]   # quant_zeroshot

Bases (one-shot, ``quick`` calibration, pruned once and cached as checkpoints in ``--work``): dense,
Wanda 50 %, Wanda 70 %, Wanda 2:4, SparseGPT 50 %. Values: fp32 (the base as it is), int8 per output
channel and int4 groups of 64 (symmetric; SmolLM2's hidden width 576 is no multiple of 128, so
groups of 128 do not fit its q/k/v/gate/up rows and 64 is the largest group that fits every layer), each by round-to-nearest (``rtn``) and by GPTQ with the
mask fixed (``gptq``, :mod:`sparse_runtime.quant.gptq`); every block linear AND the lm_head are
quantized (SmolLM2's lm_head is tied: the embedding table holds the same quantized values). Joint:
SparseGPT 50 % with int4-g64 chosen in the same pass (the pruner's ``quant`` option, paper Sec. 3.5)
beside SparseGPT 50 % then RTN (and then GPTQ) int4. "cost" is the perplexity change against the SAME
base with fp32 values. "mask" says whether every layer's keep-mask (``W != 0``) is bit-identical to
the base's after quantization (a kept value that rounds to 0 is stored as the smallest normal
float and counted in "rounded to 0"); for the joint row, whether every layer has exactly
floor(numel / 2) zeros.

Resumable: each row is saved to benchmarks/results/quant_quality.{md,json} as soon as it is measured,
and a rerun skips the rows already there (same model and protocol), so the run may be paused
(SIGSTOP) or killed and restarted.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

import sparse_runtime as sr
from sparse_runtime.data.text import c4_windows
from sparse_runtime.prune import PruneConfig, prune_checkpoint, prune_model
from sparse_runtime.quant import QuantScheme, quantize_rtn
from sparse_runtime.quant.apply import QuantizeConfig, quantize_model, write_quantized
from sparse_runtime.report import save_results
from sparse_runtime.sparsity import mask_digest

NAME = "quant_quality"
BASES: dict[str, Optional[dict]] = {
    "dense": None,
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "wanda-70": dict(method="wanda", sparsity=0.7),
    "wanda-2:4": dict(method="wanda", structure="2:4"),
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
}
WANDA = ("dense", "wanda-50", "wanda-70", "wanda-2:4")
# (row key, base, values, method), in the order of the table
ROWS: list[tuple[str, str, str, str]] = (
    [(f"{b} {v}" + ("" if m in ("-", "rtn") else f" {m}"), b, v, m) for b in WANDA
     for v, m in (("fp32", "-"), ("int8", "rtn"), ("int8", "gptq"), ("int4-g64", "rtn"), ("int4-g64", "gptq"))]
    + [("sparsegpt-50 fp32", "sparsegpt-50", "fp32", "-"), ("sparsegpt-50 int4-g64", "sparsegpt-50", "int4-g64", "rtn"),
       ("sparsegpt-50 int4-g64 gptq", "sparsegpt-50", "int4-g64", "gptq"),
       ("sparsegpt-50 joint int4-g64", "sparsegpt-50", "int4-g64", "joint")]
    # where int4's cost comes from: the same, with the lm_head (and SmolLM2's tied embedding) left in fp32
    + [(f"{b} int4-g64 head-fp32", b, "int4-g64", "rtn+fp32-head") for b in ("dense", "wanda-50")]
    # the range searched for the least rounding error (--clip mse), symmetric and asymmetric codes
    + [("dense int4-g64 mse", "dense", "int4-g64", "rtn+mse"), ("dense int4-g64 gptq+mse", "dense", "int4-g64", "gptq+mse"),
       ("dense int4-g64-asym mse", "dense", "int4-g64-asym", "rtn+mse"),
       ("dense int4-g64-asym gptq+mse", "dense", "int4-g64-asym", "gptq+mse"),
       ("dense int4-g64-asym gptq", "dense", "int4-g64-asym", "gptq"),
       ("dense int4-g32-asym gptq+mse", "dense", "int4-g32-asym", "gptq+mse")]
    + [(f"{b} int4-g64 gptq+mse", b, "int4-g64", "gptq+mse") for b in ("wanda-50", "wanda-70", "wanda-2:4")]
    + [(f"{b} int4-g64-asym gptq+mse", b, "int4-g64-asym", "gptq+mse") for b in ("wanda-50", "wanda-70", "wanda-2:4")]
    + [(f"{b} int8 mse", b, "int8", "rtn+mse") for b in ("wanda-50", "wanda-70")]
    # int8 activations per token on top (the engines' --act-dtype int8, W8A8)
    + [(f"{b} int8 w8a8", b, "int8", "rtn+a8") for b in WANDA]
    + [(f"{b} int8 w8a8-g64", b, "int8", "rtn+a8g64") for b in WANDA]
    + [(f"{b} int8 w8a8-g128", b, "int8", "rtn+a8g128") for b in ("dense", "wanda-70")]
    # int4 codes with int8 activations per token (--dtype int4-g64 --act-dtype int8, W4A8)
    + [(f"{b} int4-g64 w4a8", b, "int4-g64", "rtn+a8") for b in WANDA]
)
# the order they are measured in: what the acceptance needs first (int8 and int4 on a 50 % model,
# the joint method against round-to-nearest), so a run cut short still answers it
PRIORITY = ["wanda-50 fp32", "wanda-50 int8", "wanda-50 int4-g64", "wanda-50 int4-g64 gptq",
            "sparsegpt-50 fp32", "sparsegpt-50 int4-g64", "sparsegpt-50 joint int4-g64",
            "wanda-50 int4-g64 head-fp32", "dense int4-g64 head-fp32",
            "dense fp32", "dense int8", "dense int4-g64", "wanda-70 fp32", "wanda-70 int8", "wanda-70 int4-g64",
            "wanda-2:4 fp32", "wanda-2:4 int8", "wanda-2:4 int4-g64", "wanda-50 int8 gptq",
            "wanda-70 int4-g64 gptq", "wanda-2:4 int4-g64 gptq", "dense int4-g64 gptq",
            "sparsegpt-50 int4-g64 gptq", "wanda-70 int8 gptq", "wanda-2:4 int8 gptq", "dense int8 gptq",
            "dense int4-g64 mse", "dense int4-g64 gptq+mse", "dense int4-g64-asym mse", "dense int4-g64-asym gptq+mse",
            "wanda-50 int4-g64 gptq+mse", "wanda-50 int4-g64-asym gptq+mse", "wanda-70 int4-g64 gptq+mse",
            "wanda-70 int4-g64-asym gptq+mse", "wanda-2:4 int4-g64 gptq+mse", "wanda-2:4 int4-g64-asym gptq+mse",
            "dense int4-g32-asym gptq+mse", "wanda-50 int8 mse", "wanda-70 int8 mse", "dense int4-g64-asym gptq",
            "dense int8 w8a8", "wanda-50 int8 w8a8", "wanda-70 int8 w8a8", "wanda-2:4 int8 w8a8",
            "dense int8 w8a8-g64", "wanda-70 int8 w8a8-g64", "wanda-50 int8 w8a8-g64", "wanda-2:4 int8 w8a8-g64",
            "dense int8 w8a8-g128", "wanda-70 int8 w8a8-g128",
            "dense int4-g64 w4a8", "wanda-70 int4-g64 w4a8", "wanda-50 int4-g64 w4a8", "wanda-2:4 int4-g64 w4a8"]
assert sorted(PRIORITY) == sorted(k for k, *_ in ROWS)
COLUMNS = ["row", "base", "values", "method", "sparsity", "mask", "ppl", "cost vs fp32 %", "rounded to 0 %", "quant s"]
# --zeroshot: fp32, int8 and GPTQ int4 (the int4 the perplexity table measured at every base) of each Wanda base
ZS_NAME = "quant_zeroshot"
ZS_ROWS = [k for b in WANDA for k in (f"{b} fp32", f"{b} int8", f"{b} int4-g64 gptq")]
ZS_COLUMNS = ["row", "values", "method", "sparsity", "boolq", "rte", "hellaswag", "winogrande", "arc_easy",
              "arc_challenge", "openbookqa", "mean acc"]


def base_checkpoint(work: Path, base: str, model: str, protocol: str, data_dir) -> str:
    """The pruned base as a checkpoint in ``work`` (made once; the model name for the dense base)."""
    spec = BASES[base]
    if spec is None:
        return model
    out = work / base.replace(":", "_")
    if not (out / "sparsity_manifest.json").is_file():
        prune_checkpoint(model, PruneConfig(protocol=protocol, **spec), out, overwrite=True, data_dir=data_dir,
                         plot=False)
    return str(out)


def masks(lm) -> dict[str, str]:
    return {n: mask_digest(lin.weight != 0) for n, lin in lm.family.iter_linears(lm.model)}


def sparsity(lm) -> float:
    lins = [lin for _, lin in lm.family.iter_linears(lm.model)]
    return sum(int((lin.weight == 0).sum()) for lin in lins) / sum(lin.weight.numel() for lin in lins)


def measure(key: str, base: str, values: str, method: str, args, calib: torch.Tensor) -> dict[str, Any]:
    """One row: the base with its values quantized, and its WikiText-2 perplexity."""
    t0 = time.perf_counter()
    lm, row = quantized(key, base, values, method, args, calib)
    p = sr.wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol, args.data_dir)
    row["ppl"] = round(p.ppl, 3)
    row["wall s"] = round(time.perf_counter() - t0, 1)
    return row


def measure_zeroshot(key: str, base: str, values: str, method: str, args, calib: torch.Tensor) -> dict[str, Any]:
    """One row of the zero-shot table: the same model as :func:`measure` builds, on Wanda's seven
    tasks (first ``--zeroshot-limit`` items of each)."""
    from sparse_runtime.eval.zeroshot import evaluate_zeroshot

    t0 = time.perf_counter()
    lm, row = quantized(key, base, values, method, args, calib)
    r = evaluate_zeroshot(lm.model, lm.tokenizer, tasks="wanda", limit=args.zeroshot_limit, data_dir=args.data_dir)
    for x in r.rows:
        row[x["task"]] = round(x["acc"], 4)
    row["mean acc"] = round(sum(x["acc"] for x in r.rows) / len(r.rows), 4)
    row["wall s"] = round(time.perf_counter() - t0, 1)
    return {k: v for k, v in row.items() if k not in ("quant s",)}


def quantized(key: str, base: str, values: str, method: str, args, calib: torch.Tensor):
    """The base model with ``values`` by ``method`` (the model and the row's facts so far)."""
    values = args.int4 if values == "int4-g64" else values
    row: dict[str, Any] = {"row": key, "base": base, "values": values, "method": method}
    t0 = time.perf_counter()
    if method == "joint":
        lm = sr.load_model(args.model)
        cfg = PruneConfig(protocol=args.protocol, method_options={"quant": values}, **BASES[base])
        prune_model(lm.model, lm.tokenizer, cfg, family=lm.family, data_dir=args.data_dir, calib_ids=calib)
        row["quant s"] = round(time.perf_counter() - t0, 1)
        exact = all(int((lin.weight == 0).sum()) == lin.weight.numel() // 2 for _, lin in lm.family.iter_linears(lm.model))
        row["mask"] = "floor(numel/2) zeros in every layer" if exact else "NOT EXACT"
        # a kept value that rounds to 0 is stored as the smallest normal float (pruning/base.fix_kept_zeros_)
        tiny = sum(int(((lin.weight != 0) & (lin.weight.abs() < 1e-30)).sum()) for _, lin in lm.family.iter_linears(lm.model))
        kept = sum(int((lin.weight != 0).sum()) for _, lin in lm.family.iter_linears(lm.model))
        row["rounded to 0 %"] = round(100 * tiny / kept, 3)
        # the pruner quantizes the block linears; the lm_head gets RTN, as in the 'rtn' row beside it
        head = lm.model.get_output_embeddings()
        write_quantized(head, quantize_rtn(head.weight.data.float(), QuantScheme.parse(values)))
        row["lm_head"] = "rtn"
    else:
        lm = sr.load_model(base_checkpoint(Path(args.work), base, args.model, args.protocol, args.data_dir))
        before = masks(lm)
        if values != "fp32":
            qcfg = QuantizeConfig(scheme=values, method=method.split("+")[0], protocol=args.protocol,
                                  lm_head=not method.endswith("+fp32-head"),
                                  clip="mse" if "+mse" in method else "none")
            res = quantize_model(lm.model, lm.tokenizer, qcfg,
                                 family=lm.family, data_dir=args.data_dir, calib_ids=calib)
            row["quant s"] = round(time.perf_counter() - t0, 1)
            row["rounded to 0 %"] = round(100 * res.rounded_to_zero / max(1, res.kept), 3)
            row["lm_head"] = res.lm_head
            row["mask"] = "identical" if masks(lm) == before else "CHANGED"
            if "+a8" in method:  # +a8: one scale per token; +a8gG: per G columns
                from sparse_runtime.quant.activations import attach_int8_activations

                attach_int8_activations(lm.model, int(method.split("+a8")[1].lstrip("g") or 0))
        else:
            row["mask"] = "-"
    row["sparsity"] = round(sparsity(lm), 4)
    return lm, row


def with_costs(rows: list[dict]) -> list[dict]:
    """Each row's perplexity change against its base's fp32 row (the joint row: SparseGPT 50 % fp32)."""
    fp32 = {r["base"]: r["ppl"] for r in rows if r["values"] == "fp32"}
    for r in rows:
        ref = fp32.get(r["base"])
        r["cost vs fp32 %"] = None if ref is None or r["values"] == "fp32" else round(100 * (r["ppl"] / ref - 1), 2)
    order = [k for k, *_ in ROWS]
    return sorted(rows, key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))


def notes(args, proto, wall: Optional[float]) -> list[str]:
    out = [
        f"calibration (pruning and GPTQ): C4 {proto.calib_samples} x {proto.calib_seqlen} tokens, seed "
        f"{proto.calib_seed}, the same windows for every row; perplexity: WikiText-2 test, first "
        f"{proto.eval_windows} windows of {proto.eval_seqlen} tokens (docs/protocols.md)",
        "values: int8 = per output channel, symmetric [-127, 127]; int4-g64 = one scale per 64 inputs of a row, "
        "symmetric [-7, 7] (groups of 128 do not divide SmolLM2's hidden width 576); every block linear and the lm_head (tied to the embedding in SmolLM2: the embedding "
        "holds the quantized values) are quantized; in the joint row the pruner quantizes the block linears and "
        "the lm_head gets round-to-nearest, as in the rtn row beside it",
        "methods: rtn = round to nearest; rtn+fp32-head = the same with the lm_head (and the tied embedding) "
        "left in fp32; gptq = GPTQ's column loop with the mask fixed, sequential over blocks, "
        "lm_head from the final-norm outputs; +mse = each group's range shrunk where that lowers its rounding error "
        "(GPTQ's mse search, --clip mse); -asym = codes 0..15 with a zero point per group; joint = SparseGPT's mask selection and GPTQ quantization in one "
        "pass (docs/quantization.md); +a8 (w8a8 rows) = the int8 rtn model with every linear's input (lm_head "
        "included) rounded to int8 per token, as the engines' --act-dtype int8 does in decode "
        "(sparse_runtime.quant.activations; every token measured as if decoded); +a8g64 / +a8g128 = one scale per "
        "64 / 128 columns of each token (--act-dtype int8-g64 / int8-g128); w4a8 rows: the int4-g64 rtn model "
        "with the same per-token rounding (--dtype int4-g64 --act-dtype int8)",
        "cost vs fp32 % = ppl / ppl(same base, fp32 values) - 1; mask = every layer's W != 0 bit-identical to the "
        "base's after quantization",
        "quant s = wall from loading the base to the end of its quantization (the load included; for the joint "
        "row, the whole SparseGPT+quantization pass); wall s adds the perplexity",
        "the process ran under nice -n 19 on a shared 2-core machine (times are not benchmarks); each row's "
        "'wall s' is in the JSON",
    ]
    if wall is not None:
        out.append(f"the invocation that measured the last row so far: wall {wall:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=sr.DEFAULT_MODEL)
    ap.add_argument("--protocol", default="quick")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", default="runs/bench_quant", help="where the pruned bases are cached")
    ap.add_argument("--rows", default=None, help="comma list of row keys (default: all)")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows of an earlier run")
    ap.add_argument("--name", default=NAME, help=f"result file name (default {NAME})")
    ap.add_argument("--int4", default="int4-g64", help="the int4 scheme measured (a smoke run on a tiny model: int4-g32)")
    ap.add_argument("--zeroshot", action="store_true",
                    help=f"zero-shot accuracy instead of perplexity (rows default: {','.join(ZS_ROWS)}; result "
                         f"{ZS_NAME} unless --name)")
    ap.add_argument("--zeroshot-limit", type=int, default=200, help="first N items of each task (default 200)")
    args = ap.parse_args()
    if args.zeroshot:
        args.name = ZS_NAME if args.name == NAME else args.name
        args.rows = args.rows or ",".join(ZS_ROWS)
    t_run = time.perf_counter()
    proto = sr.get_protocol(args.protocol)
    path = Path("benchmarks/results") / f"{args.name}.json"
    # the protocol string save() writes: an earlier run's rows are reused only when it matches, so a
    # zero-shot run resumes (and keeps) the rows of the last one instead of starting over and overwriting them
    saved_protocol = f"zero-shot, first {args.zeroshot_limit} items per task" if args.zeroshot else args.protocol
    done: dict[str, dict] = {}
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text())
        if old.get("model") == args.model and old.get("protocol") == saved_protocol:
            done = {r["row"]: r for r in old.get("rows", [])}
    want = [r for r in ROWS if args.rows is None or r[0] in args.rows.split(",")]
    todo = sorted((r for r in want if r[0] not in done), key=lambda r: PRIORITY.index(r[0]))
    print(f"{len(done)} rows reused, {len(todo)} to measure", flush=True)

    def save(wall: Optional[float]) -> None:
        if args.zeroshot:
            order = [k for k, *_ in ROWS]
            rows = sorted(done.values(), key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
            nts = notes(args, proto, wall)[1:] + [
                f"zero-shot: Wanda's seven tasks, first {args.zeroshot_limit} items of each (fixed prefix, file "
                "order; a quick variant, not the full sets), lm-eval conventions, acc (docs/evaluation.md); "
                "the models are built exactly as in quant_quality (same bases, calibration and quantization)"]
            save_results(args.name, f"Zero-shot accuracy of quantized sparse models: {args.model}", rows,
                         protocol=saved_protocol, model=args.model,
                         notes=nts, columns=ZS_COLUMNS)
            return
        save_results(args.name, f"Quantized values on sparse models: {args.model}", with_costs(list(done.values())),
                     protocol=args.protocol, model=args.model, notes=notes(args, proto, wall), columns=COLUMNS)

    if not todo:  # rewrite the files from the saved rows (notes and costs as this version writes them)
        save(None)
        return
    tok = sr.load_model(args.model).tokenizer
    calib = c4_windows(tok, proto.calib_samples, proto.calib_seqlen, proto.calib_seed, args.data_dir)
    for key, base, values, method in todo:
        row = (measure_zeroshot if args.zeroshot else measure)(key, base, values, method, args, calib)
        done[key] = row
        print(f"{key}: {row}", flush=True)
        save(time.perf_counter() - t_run)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
