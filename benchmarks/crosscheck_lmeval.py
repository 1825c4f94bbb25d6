"""Cross-check our zero-shot scorer against lm-eval-harness itself on the first N items of each task.

lm-eval is NOT a dependency of the package. This script runs in two steps, in two environments:

1. In a throwaway venv that has lm-eval (``python -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip
   install "lm-eval[hf]" transformers==4.57.6 torch==2.13.0``; it resolves beside the pinned stack):

       /tmp/lmeval-venv/bin/python benchmarks/crosscheck_lmeval.py side --out /tmp/lmeval_samples.json \\
           --model-dir ~/.cache/sparse-runtime/models/smollm2-135m --limit 20

   It converts the shared data files into each HF dataset's schema and runs lm-eval's OWN task YAMLs
   on them (``include:`` of the installed YAML; only the dataset location is overridden), logging
   every request (context, continuation) and its log-likelihood. It imports nothing from this package.

2. In the project venv:

       python benchmarks/crosscheck_lmeval.py compare --samples /tmp/lmeval_samples.json

   It builds the same items with ``sparse_runtime.data.zeroshot``, checks that every request string is
   identical, re-scores them with ``sparse_runtime.eval.zeroshot.loglikelihoods`` (batched) and compares
   per-request log-likelihoods and per-task acc / acc_norm. Saves ``results/zeroshot_lmeval_crosscheck``.
"""
from __future__ import annotations

import argparse
import bz2
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]
# lm-eval YAML (relative to lm_eval/tasks) and the split key it evaluates on
LMEVAL_YAML = {"boolq": ("super_glue/boolq/default.yaml", "validation"), "rte": ("glue/rte/default.yaml", "validation"),
               "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
               "winogrande": ("winogrande/default.yaml", "validation"),
               "arc_easy": ("arc/arc_easy.yaml", "test"), "arc_challenge": ("arc/arc_challenge.yaml", "test"),
               "openbookqa": ("openbookqa/openbookqa.yaml", "test"), "piqa": ("piqa/piqa.yaml", "validation")}


def _jsonl(p: Path):
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def to_hf_schema(task: str, data: Path, limit: int) -> list[dict]:
    """The first ``limit`` records of the shared file, in the HF dataset's schema lm-eval expects."""
    if task == "boolq":
        return [{"passage": d["passage"], "question": d["question"], "label": int(d["label"])}
                for d in _jsonl(data / "boolq/val.jsonl")[:limit]]
    if task == "rte":
        return [{"sentence1": d["premise"], "sentence2": d["hypothesis"],
                 "label": 0 if d["label"] == "entailment" else 1} for d in _jsonl(data / "rte/val.jsonl")[:limit]]
    if task == "hellaswag":
        lines = bz2.open(data / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().split("\n")
        out = []
        for i in range(0, 6 * limit, 6):
            label, ctx = lines[i].split(": ", 1)
            # lm-eval builds activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), then strips
            out.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": lines[i + 2:i + 6],
                        "label": lines[i + 1]})
        return out
    if task == "winogrande":
        out = []
        for d in _jsonl(data / "winogrande/winogrande.jsonl")[:limit]:
            a, b = d["context_options"]
            k = len(os.path.commonprefix([a, b]))  # any split of the common prefix rebuilds the same contexts
            out.append({"sentence": a[:k] + "_ " + d["continuation"], "option1": a[k:], "option2": b[k:],
                        "answer": str(d["gold"] + 1)})
        return out
    if task in ("arc_easy", "arc_challenge"):
        name = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
        return [{"question": d["question"]["stem"],
                 "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                             "label": [c["label"] for c in d["question"]["choices"]]},
                 "answerKey": d["answerKey"]} for d in _jsonl(data / f"arc/{name}-Test.jsonl")[:limit]]
    if task == "openbookqa":
        return [{"question_stem": d["query"], "choices": {"text": d["choices"], "label": list("ABCD")[:len(d["choices"])]},
                 "answerKey": "ABCD"[d["gold"]]} for d in _jsonl(data / "openbookqa/openbook_qa.jsonl")[:limit]]
    if task == "piqa":
        labels = (data / "piqa/valid-labels.lst").read_text().split()
        return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(lab)}
                for d, lab in zip(_jsonl(data / "piqa/valid.jsonl")[:limit], labels)]
    raise KeyError(task)


def side(args) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(lm_eval.__file__).parent / "tasks"
    work = Path(tempfile.mkdtemp(prefix="sr_lmeval_"))
    for t in TASKS:
        yaml_rel, split = LMEVAL_YAML[t]
        f = work / f"{t}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in to_hf_schema(t, Path(args.data_dir), args.limit)))
        (work / f"sr_{t}.yaml").write_text(
            f"include: {root / yaml_rel}\ntask: sr_{t}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {f}\n"
            f"training_split: null\nvalidation_split: {'validation' if split == 'validation' else 'null'}\n"
            f"test_split: {'test' if split == 'test' else 'null'}\nfewshot_split: null\nnum_fewshot: 0\n")
    tm = TaskManager(include_path=str(work))
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={args.model_dir},dtype=float32",
                                  tasks=[f"sr_{t}" for t in TASKS], num_fewshot=0, limit=args.limit,
                                  batch_size=args.batch_size, device="cpu", log_samples=True, task_manager=tm)
    out = {"lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
           "seconds": time.perf_counter() - t0, "limit": args.limit, "model_dir": str(args.model_dir), "tasks": {}}
    for t in TASKS:
        samples = sorted(res["samples"][f"sr_{t}"], key=lambda s: s["doc_id"])
        out["tasks"][t] = {
            "metrics": {k: v for k, v in res["results"][f"sr_{t}"].items() if isinstance(v, (int, float))},
            "samples": [{"doc_id": s["doc_id"], "requests": [list(a[:2]) for a in s["arguments"]],
                         "loglik": [float(r[0][0]) for r in s["resps"]], "target": s["target"],
                         "acc": s.get("acc"), "acc_norm": s.get("acc_norm")} for s in samples]}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({t: out["tasks"][t]["metrics"] for t in TASKS}, indent=1))


def compare(args) -> None:
    import torch

    import sparse_runtime as sr
    from sparse_runtime.data.zeroshot import ZEROSHOT_TASKS
    from sparse_runtime.eval.zeroshot import loglikelihoods, score_items
    from sparse_runtime.report import save_results

    ref = json.loads(Path(args.samples).read_text())
    limit = ref["limit"]
    lm = sr.load_model(args.model)
    rows, worst = [], 0.0
    for t in TASKS:
        task = ZEROSHOT_TASKS.get(t)
        items = task.load(args.data_dir, limit)
        ours_req = [list(r) for it in items for r in it.requests()]
        theirs = ref["tasks"][t]["samples"]
        theirs_req = [r for s in theirs for r in s["requests"]]
        same_prompts = sum(a == b for a, b in zip(ours_req, theirs_req))
        # WinoGrande's lm-eval target is the shared continuation (the gold index is its doc_to_text)
        golds_equal = (all(int(s["target"]) == it.gold for s, it in zip(theirs, items)) if t != "winogrande"
                       else "n/a (partial)")
        t0 = time.perf_counter()
        lls = [ll for ll, _ in loglikelihoods(lm.model, lm.tokenizer, [tuple(r) for r in theirs_req],
                                              batch_size=args.batch_size, desc=t, add_special_tokens=None)]
        secs = time.perf_counter() - t0
        ref_lls = [x for s in theirs for x in s["loglik"]]
        diff = max(abs(a - b) for a, b in zip(lls, ref_lls))
        worst = max(worst, diff)
        m = score_items(items, lls, task.metrics, norm_unit="chars")
        ref_m = ref["tasks"][t]["metrics"]
        preds_equal = sum(
            int(max(range(len(s["loglik"])), key=lambda j: s["loglik"][j]) ==
                max(range(len(s["loglik"])), key=lambda j: lls_slice[j]))
            for s, lls_slice in zip(theirs, _split(lls, [len(s["loglik"]) for s in theirs])))
        rows.append({"task": t, "items": len(items), "requests": len(ours_req),
                     "identical requests": f"{same_prompts}/{len(theirs_req)}", "gold equal": golds_equal,
                     "max |dll|": diff, "same argmax": f"{preds_equal}/{len(items)}",
                     "acc (ours)": m["acc"], "acc (lm-eval)": ref_m.get("acc,none"),
                     "acc_norm (ours)": m.get("acc_norm"), "acc_norm (lm-eval)": ref_m.get("acc_norm,none"),
                     "ours s": round(secs, 1)})
        print(rows[-1], flush=True)
    save_results("zeroshot_lmeval_crosscheck", f"Zero-shot scorer vs lm-eval-harness {ref['lm_eval_version']}: "
                 f"{args.model}, first {limit} items per task", rows, protocol=f"zero-shot, first {limit} items",
                 model=args.model,
                 notes=[f"lm-eval {ref['lm_eval_version']} ran its own task YAMLs (dataset location overridden to "
                        "the shared files converted to the HF schema) in a separate venv (torch 2.13.0+cpu, "
                        f"transformers 4.57.6), model {ref['model_dir']}, batch 8, {ref['seconds']:.0f} s",
                        "ours: sparse_runtime loaders + loglikelihoods(), batch "
                        f"{args.batch_size}, add_special_tokens=None (lm-eval 0.4's default); acc_norm in chars "
                        "as lm-eval's acc_norm (the package default divides by bytes; same on ASCII)",
                        "'identical requests' compares the (context, continuation) strings exactly; "
                        "'max |dll|' is the largest per-request log-likelihood difference (float rounding, "
                        "batching, sdpa vs eager attention)",
                        f"worst |dll| over all tasks: {worst:.2e}; torch threads {torch.get_num_threads()}"],
                 out_dir=args.out_dir)


def _split(xs, sizes):
    out, pos = [], 0
    for k in sizes:
        out.append(xs[pos:pos + k])
        pos += k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("side", help="run lm-eval (in its own venv) and log every request")
    s.add_argument("--out", required=True)
    s.add_argument("--model-dir", default=str(Path("~/.cache/sparse-runtime/models/smollm2-135m").expanduser()))
    s.add_argument("--data-dir", default=os.environ.get("SPARSE_RUNTIME_DATA", "/work/shared/data"))
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--batch-size", type=int, default=8)
    c = sub.add_parser("compare", help="re-score the logged requests with sparse_runtime and compare")
    c.add_argument("--samples", required=True)
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--data-dir", default=None)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    (side if args.mode == "side" else compare)(args)


if __name__ == "__main__":
    sys.exit(main())
