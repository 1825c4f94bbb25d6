"""Sparse x quantized decode and prefill latency against the dense quantized baselines (issue 21, item 5).

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_quant_latency.py --prepare-only
    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_quant_latency.py --out benchmarks/results
    python benchmarks/bench_quant_latency.py --quick --model tiny      # proves the script runs (seconds)

One run per machine: every row below is loaded into this one process and timed in the SAME
interleaved rounds (``sparse_runtime.measure.latency``'s timer protocol: each row's unit prepared,
warmed up, then ``--repeats`` rounds in an order rotated each round), decode first, then prefill:

- dense fp32 on our lean path (``lean-cpu``), and on ORT (``ort-cpu``) for reference;
- dense quantized on ORT: ``ort-int8`` (dynamic int8, MatMulInteger), ``ort-int4`` with blocks of 32
  (the engine's default) and of ``--int4-group``, and MatMulNBits with 8-bit blocks (a second ORT
  int8 path, weight-only);
- dense int8 / int4-g``--int4-group`` on our kernels (``lean-cpu`` with that value type);
- ``sparse-cpu`` on Wanda 50 % / 70 % / 2:4 x {fp32, int8, int4-g``--int4-group``};
- the int4 group defaults to 64, not the issue's 128: SmolLM2's width 576 is 4.5 x 128, and our
  quantization refuses groups that do not divide a row (ORT pads the last block);
- llama.cpp (``llamacpp``, where llama-cpp-python is installed) on dense GGUF Q8_0 and Q4_0, and on
  the 70 % checkpoint in Q4_0 (it multiplies the zeros: the dense speed);
- DeepSparse (fp32 values, dense and the three sparse checkpoints) where it runs.

A row that cannot run here (an engine not installed, a value type our engines do not accept yet) is
listed under "skipped" with its reason; nothing else changes. Columns: decode ms/token at context
``--context`` (median, IQR, min-max), prefill 1 x ``--prefill`` ms, bytes per weight of the block
linears and of the lm_head, MB read per token, and each row's speedup against our dense int8 row,
against the fastest dense quantized ORT row and against the fastest llama.cpp row, each beside its
memory-bandwidth bound (bytes per token of the reference / bytes per token of the row;
docs/protocols.md#the-memory-bandwidth-bound).

Checkpoints: SmolLM2-135M pruned with Wanda exactly as ``bench_latency.py`` does (its
``checkpoints`` helper; cached under ``$SPARSE_RUNTIME_CACHE/bench-latency``). ``--model tiny``
uses a small random Llama (hidden 128) pruned by magnitude instead: for testing the script only.
Nothing is written to benchmarks/results unless ``--out`` says so (default: a temporary directory).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SPARSE = ("wanda-50", "wanda-70", "wanda-2:4")
# real shapes of random weights (--model): latency at a user's size; the pruned rows are magnitude-pruned
SYNTHETIC = ("llama-3.2-1b",)
# int4 group of our rows: 64, because SmolLM2's hidden width 576 = 4.5 x 128, so groups of 128 do not
# divide the q/k/v/gate/up rows (the quantization contract refuses that; ORT's MatMulNBits pads the last
# block instead). --int4-group 128 runs g128 on models whose widths allow it.
INT4_GROUP = 64
# variables that restrict an engine's instruction set (ours, torch/oneDNN/MKL, DeepSparse): named in the notes
ISA_OVERRIDES = ("SPARSE_RUNTIME_KERNEL_ISA", "SPARSE_RUNTIME_AMX", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                 "MKL_ENABLE_INSTRUCTIONS", "NM_ARCH")


@dataclass
class Row:
    """One timed configuration: ``engine`` on checkpoint ``ckpt`` with engine ``options``."""

    label: str
    engine: str
    ckpt: str                      # "dense" or one of SPARSE
    values: str                    # fp32 | int8 | int4-g32 | int4-g128 | int8-g32 ...
    options: dict[str, Any] = field(default_factory=dict)
    group: str = ""                # "ours-dense-int8" / "ort-quant": the references of the ratio columns


def lean_value_options(engine: str, values: str) -> tuple[Optional[dict[str, Any]], str]:
    """The engine options that give the lean path ``values`` weights, or (None, why not).

    The contract: an engine lists the value types its ``dtype`` option accepts in ``Engine.dtypes``
    (``int8``, ``int4``), and the lean engines also take a full scheme name (``int4-g64``,
    ``int4-g64-asym``: sparse_runtime.quant.scheme) as ``dtype``. The full name is passed, so the
    row runs exactly the scheme it is labelled with (a group that does not divide a row is refused
    by the engine and the row is skipped with that line). The ONE place to change if the quantized
    values end up behind another option."""
    if values == "fp32":
        return {}, ""
    from sparse_runtime.runtime import get_engine

    accepted = tuple(getattr(get_engine(engine), "dtypes", ("float32",)))
    if values.split("-")[0] in accepted:
        return {"dtype": values}, ""
    return None, (f"{engine} does not accept {values} values (its dtype option takes {', '.join(accepted)})")


def planned_rows(with_deepsparse: bool, group: int) -> list[Row]:
    """The rows, in load order. ``group``: the int4 group of our rows and of the matching ORT row."""
    g4 = f"int4-g{group}"
    rows = [Row("dense fp32, lean", "lean-cpu", "dense", "fp32"),
            Row("dense fp32, ORT", "ort-cpu", "dense", "fp32"),
            Row("dense int8, ORT dynamic", "ort-int8", "dense", "int8", group="ort-quant"),
            Row("dense int4-g32, ORT MatMulNBits", "ort-int4", "dense", "int4-g32", {"block_size": 32},
                group="ort-quant")]
    if group != 32:
        rows.append(Row(f"dense {g4}, ORT MatMulNBits", "ort-int4", "dense", g4, {"block_size": group},
                        group="ort-quant"))
    rows += [Row("dense int8-g32, ORT MatMulNBits", "ort-int4", "dense", "int8-g32", {"bits": 8, "block_size": 32},
                 group="ort-quant"),
             Row("dense int8, lean", "lean-cpu", "dense", "int8", group="ours-dense-int8"),
             Row(f"dense {g4}, lean", "lean-cpu", "dense", g4)]
    for ck in SPARSE:
        for v in ("fp32", "int8", g4):
            rows.append(Row(f"{ck} {v}, sparse-cpu", "sparse-cpu", ck, v))
    # prefill in bf16 (opt-in: docs/kernels.md#prefill-in-bf16-amx): the AMX form where the CPU has AMX,
    # the bf16 walk where it has AVX512-BF16 (docs/kernels.md#the-bf16-prefill-walk); decode is unchanged by it
    bf16_prefill = {"prefill_dtype": "bfloat16"}
    rows += [Row("dense fp32 + bf16 prefill, lean", "lean-cpu", "dense", "fp32", bf16_prefill)]
    rows += [Row(f"{ck} {v} + bf16 prefill, sparse-cpu", "sparse-cpu", ck, v, bf16_prefill)
             for ck in SPARSE if "70" in ck for v in ("fp32", "int8")]
    # int8 activations (W8A8, VNNI; opt-in: docs/kernels.md#w8a8-decode), one scale per token or per 64
    # columns, dense and sparse
    for act, tag in (("int8", "W8A8"), ("int8-g64", "W8A8-g64")):
        a8 = {"act_dtype": act}
        rows += [Row(f"dense int8 + {tag}, lean", "lean-cpu", "dense", "int8", a8)]
        rows += [Row(f"{ck} int8 + {tag}, sparse-cpu", "sparse-cpu", ck, "int8", a8) for ck in SPARSE]
    rows += [Row("wanda-70 int8 + W8A8 + bf16 prefill, sparse-cpu", "sparse-cpu", "wanda-70", "int8",
                 {"act_dtype": "int8", **bf16_prefill})]
    # int4 codes with int8 activations (W4A8, VNNI; docs/kernels.md#w4a8-decode): held dense, so dense rows only,
    # symmetric and with zero points (GPTQ's usual form)
    rows += [Row(f"dense {v} + W4A8, lean", "lean-cpu", "dense", v, {"act_dtype": "int8"}) for v in (g4, f"{g4}-asym")]
    # an fp16 K/V cache (opt-in: docs/kernels.md#decode-attention): half the cache's bytes, which both tokens
    # of a ratio read; the like-for-like reference of the sparse row is the dense row with the same cache
    kv16 = {"kv_dtype": "float16"}
    rows += [Row("dense int8 + fp16 K/V, lean", "lean-cpu", "dense", "int8", kv16),
             Row("dense int8 + W8A8 + fp16 K/V, lean", "lean-cpu", "dense", "int8", {"act_dtype": "int8", **kv16}),
             Row("wanda-70 int8 + W8A8 + fp16 K/V, sparse-cpu", "sparse-cpu", "wanda-70", "int8",
                 {"act_dtype": "int8", **kv16})]
    # llama.cpp on its dense GGUF types (every 2-D weight incl. the lm_head in the type; fp16 K/V, its default):
    # the runtime CPU users would otherwise pick for 8- and 4-bit models; a pruned checkpoint runs at dense speed
    rows += [Row(f"dense {q}, llama.cpp", "llamacpp", "dense", q, {"qtype": q}, group="llamacpp")
             for q in ("Q8_0", "Q4_0")]
    rows += [Row("wanda-70 Q4_0, llama.cpp", "llamacpp", "wanda-70", "Q4_0", {"qtype": "Q4_0"})]
    if with_deepsparse:
        rows += [Row(f"{ck} fp32, deepsparse", "deepsparse", ck, "fp32") for ck in ("dense", *SPARSE)]
    return rows


# -- bytes per weight -------------------------------------------------------------------------------
def layer_shapes(path: str) -> list[tuple[int, int, int]]:
    """(out rows N, in columns K, nonzeros) of every block linear, from the manifest or the weights."""
    from sparse_runtime.manifest import MANIFEST_NAME, read_manifest

    if (Path(path) / MANIFEST_NAME).is_file():
        return [(int(r.shape[0]), int(r.shape[1]), int(r.nnz)) for r in read_manifest(Path(path)).layers.values()]
    from sparse_runtime.models import load_model

    lm = load_model(path)
    out = [(int(l.weight.shape[0]), int(l.weight.shape[1]), int((l.weight != 0).sum()))
           for _, l in lm.family.iter_linears(lm.model)]
    del lm
    gc.collect()
    return out


def scheme_overhead(values: str, k: int) -> tuple[float, float]:
    """(bytes per stored value, bytes of scales/zeros per weight) of a value type, per the
    quantization contract: int8 = one fp32 scale per output row; int4-gG = one fp32 scale per G;
    -asym adds an fp32 zero point per scale."""
    if values == "fp32":
        return 4.0, 0.0
    from sparse_runtime.quant.scheme import QuantScheme

    s = QuantScheme.parse(values)
    per = 4.0 / (s.group or k)
    return s.bits / 8, per * (1 if s.symmetric else 2)


def bytes_per_token(row: Row, shapes, vocab_hidden: int, hidden: int, eng, kv_fp32: float) -> dict[str, Any]:
    """Bytes a decode token reads: block linears + lm_head + the K/V cache (``kv_fp32``: the timed
    steps' mean K/V bytes with fp32 elements; halved for a row with ``kv_dtype`` float16; the
    embedding row is left out). The K/V cache belongs in the bound: both tokens of a ratio read it,
    so leaving it out overstates what fewer weight bytes can buy (at SmolLM2's 136 cached positions
    it is 6.3 MB against 45 MB of 70 % W8A8 products). ORT's quantized rows: weights measured from the
    graph's initializers (export manifest), the cache fp32 (its past/present tensors). Our rows: from
    the scheme (values + 1-bit bitmask for sparse layers; the lm_head dense in the same value type).
    DeepSparse's internal format is not public: n/a."""
    if row.engine == "deepsparse":
        return {"bpw_blocks": None, "bpw_lm_head": None, "kv_mb": None, "mb_per_token": None}
    kv = kv_fp32 / (2 if row.options.get("kv_dtype") == "float16" else 1)
    numel = sum(n * k for n, k, _ in shapes)
    if row.engine.startswith("ort-int"):
        bpw = eng.scheme().get("bytes_per_weight", {})
        blocks, head = bpw.get("blocks"), bpw.get("lm_head")
        total = blocks * numel + head * vocab_hidden
    elif row.engine == "llamacpp":  # one GGUF type for every 2-D weight; llama.cpp's K/V cache is fp16
        blocks = head = eng.scheme().get("bytes_per_weight")
        total = blocks * (numel + vocab_hidden)
        kv = kv_fp32 / (1 if row.options.get("kv_dtype") == "float32" else 2)
    elif row.engine == "ort-cpu":
        blocks = head = 4.0
        total = 4.0 * (numel + vocab_hidden)
    else:
        total = 0.0
        for n, k, nnz in shapes:
            vb, sb = scheme_overhead(row.values, k)
            dense_b = n * k * (vb + sb)
            sparse_b = nnz * vb + n * k / 8 + n * k * sb
            total += min(dense_b, sparse_b) if row.engine == "sparse-cpu" else dense_b
        blocks = total / numel
        vb, sb = scheme_overhead(row.values, hidden)
        head = vb + sb
        total += head * vocab_hidden
    return {"bpw_blocks": blocks, "bpw_lm_head": head, "kv_mb": kv / 2 ** 20, "mb_per_token": (total + kv) / 2 ** 20,
            "logit_rel_l2": export_error(eng)}


def export_error(eng) -> Optional[str]:
    """ORT quantized rows: the relative L2 error of the logits against fp32 PyTorch and the top-1
    agreement from the export's own verification (its fixed prompt); None for other rows."""
    d = getattr(eng, "export_dir", None)
    if d is None or not getattr(eng, "name", "").startswith("ort-int"):
        return None
    try:
        checks = json.loads((Path(d) / "export_manifest.json").read_text())["verification"]["logits"]
        return " / ".join(f"{c['relative_l2']:.3f} (top-1 {c['argmax_agreement']:.2f})" for c in checks)
    except (OSError, KeyError, ValueError, TypeError):
        return None


# -- checkpoints ------------------------------------------------------------------------------------
def tiny_checkpoints(root: Path) -> tuple[Path, dict[str, Path]]:
    """A small random Llama (hidden 128, so int4 groups of 128 divide every row) and magnitude-pruned
    copies at 50 % / 70 % / 2:4: enough to run every row of the script in seconds."""
    import sparse_runtime as sr
    from sparse_runtime.models.tiny import tiny_model
    from sparse_runtime.prune import PruneConfig, prune_checkpoint

    dense = root / "tiny-dense"
    if not (dense / "sparsity_manifest.json").is_file():
        m = tiny_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2)
        fam = sr.load_model("tiny-llama")
        sr.save_checkpoint(m, fam.tokenizer, dense, sr.build_manifest(m, fam.family, base_model="tiny-llama-128"),
                           overwrite=True)
    cfgs = {"wanda-50": dict(sparsity=0.5), "wanda-70": dict(sparsity=0.7), "wanda-2:4": dict(structure="2:4")}
    out = {}
    for label, kw in cfgs.items():
        d = root / ("tiny-" + label.replace(":", ""))
        if not (d / "sparsity_manifest.json").is_file():
            prune_checkpoint(str(dense), PruneConfig(method="magnitude", **kw), d, overwrite=True)
        out[label] = d
    return dense, out


def bench_checkpoints(model: str, needed: Optional[set[str]] = None) -> tuple[Path, dict[str, Path]]:
    """The dense checkpoint and the pruned ones (``SPARSE`` keys) a benchmark's ``--model`` names:
    ``smollm2`` (SmolLM2-135M and the latency benchmark's Wanda checkpoints), ``tiny`` (a small
    random Llama, for the scripts' tests) or a real shape of random weights (``SYNTHETIC``; only the
    ``needed`` pruned checkpoints are made)."""
    if model == "tiny":
        return tiny_checkpoints(Path(tempfile.gettempdir()) / "sr-bench-quant-tiny")
    if model in SYNTHETIC:
        return synthetic_checkpoints(model, needed)
    return smollm2_checkpoints()


def synthetic_checkpoints(shape: str, needed: Optional[set[str]] = None) -> tuple[Path, dict[str, Path]]:
    """A random-weight model of a real shape (``sparse_runtime.models.synthetic``, bf16, the embedded
    tokenizer) and magnitude-pruned copies at 50 % / 70 % / 2:4, cached under
    ``$SPARSE_RUNTIME_CACHE/bench-quant-synthetic``: latency and bytes at that size (they do not depend
    on the values), never quality."""
    from sparse_runtime.models.loading import cache_dir
    from sparse_runtime.models.synthetic import write_synthetic
    from sparse_runtime.prune import PruneConfig, prune_checkpoint

    root = cache_dir() / "bench-quant-synthetic" / shape
    dense = root / "dense"
    if not (dense / "config.json").is_file():
        write_synthetic(shape, dense, dtype="bfloat16", overwrite=True)
    cfgs = {"wanda-50": dict(sparsity=0.5), "wanda-70": dict(sparsity=0.7), "wanda-2:4": dict(structure="2:4")}
    out = {}
    for label, kw in cfgs.items():
        d = root / ("magnitude-" + label.split("-")[1].replace(":", ""))
        if (needed is None or label in needed) and not (d / "sparsity_manifest.json").is_file():
            prune_checkpoint(str(dense), PruneConfig(method="magnitude", **kw), d, overwrite=True)
        out[label] = d
    return dense, out


def save_bench(args, prefix: str, title: str, rows, *, protocol: str, model: str, notes, extra=None) -> int:
    """Write a benchmark's table (markdown and JSON) into ``--out``, or a new temporary directory (never
    the repository's benchmarks/results/ unless asked), and print where; main()'s exit code."""
    from sparse_runtime.report import save_results

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"sr-bench-{prefix}-"))
    save_results(args.name, title, rows, protocol=protocol, model=model, notes=notes, out_dir=out_dir, extra=extra)
    print(f"written: {out_dir / args.name}.md")
    return 0


def count_list(ap, flag: str, text: str, unit: str, example: str) -> list[int]:
    """``text`` (positive integers separated by commas: contexts, batches) as a list, or the parser's
    one-line error naming the fix."""
    try:
        values = [int(c) for c in text.split(",")]
    except ValueError:
        ap.error(f"{flag} {text!r}: give {unit} counts separated by commas, e.g. {example}")
    if not values or min(values) < 1:
        ap.error(f"{flag}: every value must be at least 1 {unit}")
    return values


def leading_notes(model: str) -> list[str]:
    """The notes a table must open with when its figures are not plain ones: the ISA masked
    (benchmarks/isa_mask.py) or the tiny test model."""
    from isa_mask import MARKER

    notes = []
    if model == "tiny":
        notes.append("TINY random model: this run tests the script, its figures mean nothing")
    if os.environ.get(MARKER):
        notes.append(f"ISA MASKED to {os.environ[MARKER]} (benchmarks/isa_mask.py; docs/protocols.md#emulating-avx2)")
    return notes


def smollm2_checkpoints() -> tuple[Path, dict[str, Path]]:
    from bench_latency import checkpoints  # the same Wanda checkpoints as the latency benchmark

    from sparse_runtime.models.loading import cache_dir, ensure_smollm2

    return ensure_smollm2(), checkpoints(cache_dir() / "bench-latency", SPARSE)


# -- the run ----------------------------------------------------------------------------------------
def runtime_group(row: Row) -> str:
    """Rows that share a runtime are timed together (interleaved); runtimes one after the other."""
    # llama.cpp's OpenMP regions run on the same libgomp pool as our kernels', so its rows are interleaved
    # with ours: their per-round ratio against our dense int8 is a side-by-side one
    return "ort" if row.engine.startswith("ort-") else "deepsparse" if row.engine == "deepsparse" else "lean"


def load_rows(rows: list[Row], paths: dict[str, Path], threads: int, ds_opts: dict, log) -> tuple[dict, dict]:
    from sparse_runtime.runtime import get_engine

    engines: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for row in rows:
        cls = get_engine(row.engine)
        ok, why = cls.available()
        if not ok:
            skipped[row.label] = why
            continue
        opts = dict(row.options)
        if row.engine in ("lean-cpu", "sparse-cpu"):
            extra, why = lean_value_options(row.engine, row.values)
            if extra is None:
                skipped[row.label] = why
                continue
            opts.update(extra)
        if row.engine == "deepsparse":
            opts.update(ds_opts)
        t = time.perf_counter()
        try:
            engines[row.label] = cls(str(paths[row.ckpt]), threads=threads, **opts)
        except Exception as e:  # one broken row must not lose the others
            skipped[row.label] = f"failed to load: {type(e).__name__}: {str(e)[:300]}"
            log(f"  {row.label}: {skipped[row.label]}")
            continue
        log(f"  {row.label}: loaded in {time.perf_counter() - t:.1f} s")
    return engines, skipped


def llama_cpp_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("llama_cpp_python")
    except md.PackageNotFoundError:
        return "(not installed)"


def ratio(ref: Optional[float], got: Optional[float]) -> Optional[float]:
    return ref / got if ref and got else None


def table(rows: list[Row], evidence, times, bytes_, shapes_by_ckpt, decode_sc, prefill_sc) -> tuple[list[dict], dict]:
    from sparse_runtime.measure.stats import summarize

    stats: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.label not in evidence:
            continue
        s = {}
        for key, sc in (("decode", decode_sc), ("prefill", prefill_sc)):
            ts = times.get(key, {}).get(r.label)
            if ts:
                s[key] = summarize([sc.per_unit(t) for t in ts])
        stats[r.label] = s
    med = {k: v["decode"].median for k, v in stats.items() if "decode" in v}
    ours = next((r.label for r in rows if r.group == "ours-dense-int8" and r.label in med), None)

    def same_kind(r: Row) -> Optional[str]:
        """Our dense row with r's values, activations and K/V cache (decode is what is compared): the
        like-for-like reference of a sparse row of ours."""
        keys = ("act_dtype", "kv_dtype")
        return next((d.label for d in rows if d.engine == "lean-cpu" and d.ckpt == "dense" and d.values == r.values
                     and all(d.options.get(k) == r.options.get(k) for k in keys) and d.label in med),
                    None) if r.engine == "sparse-cpu" else None
    ort_q = [r.label for r in rows if r.group == "ort-quant" and r.label in med]
    fastest_ort = min(ort_q, key=med.get) if ort_q else None
    llama = [r.label for r in rows if r.group == "llamacpp" and r.label in med]
    fastest_llama = min(llama, key=med.get) if llama else None
    out = []
    for r in rows:
        if r.label not in stats:
            continue
        s, b = stats[r.label], bytes_[r.label]
        d, p = s.get("decode"), s.get("prefill")
        prof = shapes_by_ckpt[r.ckpt]
        row = {"row": r.label, "engine": r.engine, "checkpoint": r.ckpt, "sparsity": round(prof["sparsity"], 3),
               "values": r.values,
               "decode ms/token": d.median if d else None, "decode IQR": f"{d.q1:.4g}-{d.q3:.4g}" if d else None,
               "decode min-max": f"{d.min:.4g}-{d.max:.4g}" if d else None,
               "prefill ms": p.median if p else None, "prefill IQR": f"{p.q1:.4g}-{p.q3:.4g}" if p else None,
               "B/w blocks": b["bpw_blocks"], "B/w lm_head": b["bpw_lm_head"], "K/V MB/token": b.get("kv_mb"),
               "MB/token": b["mb_per_token"],
               "logit rel L2 prefill / decode": b.get("logit_rel_l2")}
        for ref, col in ((ours, "vs our dense int8"), (same_kind(r), "vs our dense, same values"),
                         (fastest_ort, "vs fastest ORT quant"), (fastest_llama, "vs fastest llama.cpp")):
            if ref is None or d is None:
                row[col] = None
                continue
            x = ratio(med[ref], d.median)
            bound = ratio(bytes_[ref]["mb_per_token"], b["mb_per_token"])
            row[col] = f"{x:.2f}x (bound {bound:.2f}x)" if bound else f"{x:.2f}x (bound n/a)"
        row["vs our dense int8, per round"] = per_round_ratio(times.get("decode", {}), ours, r, rows)
        row["evidence"] = str(evidence[r.label].get("sparse_path", ""))[:90]
        out.append(row)
    return out, {"our_dense_int8": ours, "fastest_ort_quant": fastest_ort, "fastest_llama_cpp": fastest_llama}


def per_round_ratio(decode_times: dict[str, list[float]], ref: Optional[str], r: Row, rows: list[Row]) -> Optional[str]:
    """``ref``'s decode time / ``r``'s, round by round: "median (min-max)", for rows timed in the same
    rounds as ``ref`` (its runtime group: interleaved, so round i of both ran seconds apart), None
    otherwise. The pace of this kind of VM drifts over minutes, which moves two medians apart more
    than the ratio of the times taken side by side (docs/protocols.md)."""
    ref_row = next((x for x in rows if x.label == ref), None)
    a, b = decode_times.get(ref or ""), decode_times.get(r.label)
    if ref_row is None or not a or not b or len(a) != len(b) or runtime_group(ref_row) != runtime_group(r):
        return None
    q = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(q):.2f}x ({min(q):.2f}-{max(q):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny", *SYNTHETIC), default="smollm2",
                    help="tiny: a small random Llama, to test the script (no meaningful figures); "
                         f"{', '.join(SYNTHETIC)}: random weights of that shape, magnitude-pruned (latency "
                         "only; pick rows with --rows, every row of a runtime is held in memory at once)")
    ap.add_argument("--quick", action="store_true", help="2 repeats, context 32, prefill 1x32, 4 decode steps")
    ap.add_argument("--prepare-only", action="store_true", help="prune and export, no timing")
    ap.add_argument("--out", default=None, help="directory for <name>.md/.json (default: a temporary directory)")
    ap.add_argument("--name", default="quant_latency")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-deepsparse", action="store_true")
    ap.add_argument("--int4-group", type=int, default=INT4_GROUP, choices=(32, 64, 128),
                    help="int4 group of our rows and of the matching ORT row (default 64: 128 does not divide "
                         "SmolLM2's width 576)")
    ap.add_argument("--rows", default="", help="substrings separated by commas, or by semicolons when they hold "
                                               "commas (whole labels): keep only rows whose label has one")
    args = ap.parse_args()
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")
    if args.quick:
        args.repeats, args.context, args.prefill, args.decode_steps = 2, 32, 32, 4
    if args.repeats < (2 if args.quick else 5):
        ap.error("the latency protocol needs at least 5 repeats (--quick: 2, and then it is not a result)")

    from _common import kv_bytes_per_token
    from sparse_runtime.measure.latency import LatencyConfig, _time_scenario
    from sparse_runtime.report import save_results
    from sparse_runtime.runtime.base import Scenario, default_threads, peak_rss_mb

    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    threads = args.threads or default_threads()
    rows = planned_rows(not args.no_deepsparse, args.int4_group)
    if args.rows:
        keys = [k.strip() for k in args.rows.split(";" if ";" in args.rows else ",") if k.strip()]
        rows = [r for r in rows if any(k in r.label for k in keys)]
    dense, ckpts = bench_checkpoints(args.model, {r.ckpt for r in rows})
    paths = {k: p for k, p in {"dense": dense, **ckpts}.items() if k == "dense" or any(r.ckpt == k for r in rows)}
    ds_opts = {"prefill_length": args.prefill, "cache_length": args.context + max(64, args.decode_steps + 1)}
    if args.prepare_only:  # the ORT exports (cached; ~1 min each on SmolLM2), pruning done above
        from sparse_runtime.runtime.exports import ensure_export

        for r in rows:
            if r.engine.startswith("ort-") or r.engine == "llamacpp":
                fmt = {"ort-cpu": "onnx", "ort-int8": "onnx-int8", "ort-int4": "onnx-int4", "llamacpp": "gguf"}[r.engine]
                ensure_export(str(paths[r.ckpt]), fmt, **r.options)
                log(f"export ready: {r.label}")
        return 0

    cfg_json = json.loads((Path(dense) / "config.json").read_text())
    hidden, vocab = int(cfg_json["hidden_size"]), int(cfg_json["vocab_size"])
    kv_fp32 = kv_bytes_per_token(cfg_json, args.context, args.decode_steps, 4)
    shapes = {k: layer_shapes(str(p)) for k, p in paths.items()}
    prof = {k: {"sparsity": 1 - sum(z for *_, z in v) / max(1, sum(n * kk for n, kk, _ in v))}
            for k, v in shapes.items()}
    cfg = LatencyConfig(repeats=args.repeats, warmup=1, decode_steps=args.decode_steps, threads=threads)
    decode_sc = Scenario("decode", args.context, 1, args.decode_steps)
    prefill_sc = Scenario("prefill", args.prefill, 1)
    times: dict[str, dict[str, list[float]]] = {"decode": {}, "prefill": {}}
    skipped: dict[str, str] = {}
    bytes_: dict[str, dict] = {}
    evidence: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for group in dict.fromkeys(runtime_group(r) for r in rows):  # one runtime's rows in memory at a time
        members = [r for r in rows if runtime_group(r) == group]
        log(f"[{group}] loading {len(members)} rows ({threads} threads)")
        engines, why = load_rows(members, paths, threads, ds_opts, log)
        skipped.update(why)
        try:
            for r in members:
                if r.label in engines:
                    bytes_[r.label] = bytes_per_token(r, shapes[r.ckpt], vocab * hidden, hidden, engines[r.label],
                                                      kv_fp32)
            for key, sc in (("decode", decode_sc), ("prefill", prefill_sc)):
                if not engines:
                    break
                log(f"  {sc.label}: {len(engines)} rows, {args.repeats} interleaved rounds")
                try:
                    times[key].update(_time_scenario(engines, sc, cfg, log))
                except Exception as e:  # keep what the other groups timed
                    skipped[f"{group} {sc.label}"] = f"{type(e).__name__}: {str(e)[:300]}"
            for k, e in engines.items():
                evidence[k], info[k] = e.evidence(), e.info()
        finally:
            for e in engines.values():
                e.close()
            engines.clear()
            gc.collect()
    out_rows, refs = table(rows, evidence, times, bytes_, prof, decode_sc, prefill_sc)

    quick = "QUICK (not a result: 2 repeats, short context) " if args.quick else ""
    notes = [
        f"{quick}rows timed per runtime ({', '.join(dict.fromkeys(runtime_group(r) for r in rows))}: each "
        "group's rows loaded together, interleaved, then unloaded, so no idle thread pool of one runtime (ORT's "
        "spinning workers, OpenMP) competes with another's timed run; ratios across groups compare medians of "
        f"the same run): decode {decode_sc.label} ({args.decode_steps} steps, ms/token), then prefill 1 x "
        f"{args.prefill} (ms, the last position's logits: Engine.prefill_next); warm-up 1, {args.repeats} interleaved rounds, median [IQR], min-max; "
        f"{threads} threads for every engine",
        f"ratio references: our dense int8 = {refs['our_dense_int8'] or 'not run'} (weight-only: fp32 activations); "
        "our dense, same values = our dense row with the row's value type and activations (fp32, int8 weight-only, "
        "W8A8 per token, W8A8-g64: the like-for-like comparison of a sparse row); fastest dense quantized ORT "
        f"(by decode median) = {refs['fastest_ort_quant'] or 'not run'}; fastest llama.cpp = "
        f"{refs['fastest_llama_cpp'] or 'not run'}; ratio = median(reference) / median(row)",
        f"llama.cpp rows: llama-cpp-python {llama_cpp_version()} (llama.cpp compiled by pip for this CPU, "
        "-march=native, OpenMP) on the "
        "gguf export (exporters/gguf.py): Q8_0 = blocks of 32 int8 + an fp16 scale (8.5 bits), Q4_0 = blocks of "
        "32 4-bit codes + an fp16 scale (4.5 bits), every 2-D weight incl. the embedding and lm_head (--pure); "
        "its K/V cache fp16 and attention as llama.cpp picks (its defaults); timed in the same interleaved "
        "rounds as our rows",
        "W8A8 rows (--act-dtype int8): the decode products (and prompt products of at most 8 tokens) quantize "
        "each token's input to int8 with one scale per token (W8A8-g64: per 64 columns, --act-dtype int8-g64) and "
        "multiply int8 x int8 on AVX-512 VNNI (vpdpbusd); "
        "prefill 1 x 128 keeps fp32 (or bf16) activations: the walk over the held codes (dense or bitmask; "
        "the row's evidence lists the forms) as without it; their logits move by the activation "
        "rounding (perplexity cost: quant_quality.md); the W4A8 row: int4 codes (held dense) with the same "
        "int8 activations per token",
        "bf16 prefill rows (prefill_dtype bfloat16, opt-in): x and W rounded to bf16, fp32 sums; the products run "
        "the AMX form where the CPU has AMX, the bf16 walk where it has AVX512-BF16 without AMX (the forms each "
        "row ran: prefill_forms in the JSON evidence)",
        "vs our dense int8, per round: the reference's decode time / the row's in each round, median (min-max), "
        "for our rows (timed in the same interleaved rounds as the reference; this VM's pace drifts over "
        "minutes, which moves two medians more than side-by-side ratios)",
        "bound = MB/token of the reference / MB/token of the row (bytes read per decode token: block linears + "
        "lm_head + the K/V cache, its mean over the timed steps in the K/V MB/token column, fp32 unless the row "
        "says kv_dtype float16; the embedding row left out; MB = 2^20 bytes). ORT rows: weights = bytes of "
        "codes + scales + zero points from the graph; ours: from the scheme (int8: 1 B + an fp32 scale per row; "
        "int4-gG: 0.5 B + an fp32 scale per G; sparse: stored values + a 1-bit bitmask, or dense where smaller); "
        "our quantized lm_head assumed in the row's value type (the issue-21 contract); DeepSparse: n/a (its "
        "format is not public)",
        "ORT quantized exports: onnx-int8 = quantize_dynamic (int8 weights per channel, activations per tensor at "
        "run time), onnx-int4 = MatMulNBits (symmetric blocks, accuracy_level 4 = int8 compute); the lm_head is "
        "quantized in every one (docs/runtime.md#ort-int8-and-ort-int4)",
        "logit rel L2: ORT quantized rows only, ||logits - fp32 PyTorch|| / ||fp32||, prefill (batch 2 x 24) and one "
        "cached decode step of the export's own verification prompt, top-1 agreement beside it (a speed baseline "
        "that loses accuracy is marked by it, not hidden)",
        "ONNX Runtime ran sessions loaded later faster than earlier identical ones on this machine "
        "(load_order.md); the ORT rows load in the order listed",
        f"peak RSS of the process: {peak_rss_mb():.0f} MB; wall time {time.perf_counter() - t0:.0f} s",
    ]
    forced = {k: os.environ[k] for k in ISA_OVERRIDES if os.environ.get(k)}
    from isa_mask import MARKER as ISA_MASK_MARKER

    if os.environ.get(ISA_MASK_MARKER):  # benchmarks/isa_mask.py: the CPU itself reports less
        notes.insert(0, f"ISA MASKED to {os.environ[ISA_MASK_MARKER]} (benchmarks/isa_mask.py): every process "
                        "(ours, torch/oneDNN/MKL, ORT, DeepSparse) saw a CPU without AVX-512, AVX-VNNI or AMX in "
                        "CPUID and /proc/cpuinfo, and the engines' switches were set too ("
                        + ", ".join(f"{k}={v}" for k, v in forced.items()) + "); an emulation: the memory system, "
                        "caches and clocks are still this machine's (docs/protocols.md#emulating-avx2)")
    elif forced:  # an ISA restricted by the engines' switches only: the table says so first
        notes.insert(0, "ISA OVERRIDDEN by the environment (each engine's switch, as listed; DeepSparse still JITs "
                        "AVX-512 code under NM_ARCH=avx2 on an AVX-512 CPU: use benchmarks/isa_mask.py; the memory "
                        "system is still this machine's): " + ", ".join(f"{k}={v}" for k, v in forced.items()))
    if args.model == "tiny":
        notes.insert(0, "TINY random model (hidden 128, magnitude-pruned): this run tests the script, its figures "
                        "mean nothing")
    if any(r.engine == "deepsparse" for r in rows):
        from sparse_runtime.runtime.deepsparse_engine import LICENCE

        notes.append(f"deepsparse licence: {LICENCE}")
    for k, why in skipped.items():
        notes.append(f"skipped {k}: {why}")
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sr-bench-quant-"))
    cols = ["row", "engine", "checkpoint", "sparsity", "values", "decode ms/token", "decode IQR", "decode min-max",
            "prefill ms", "prefill IQR", "B/w blocks", "B/w lm_head", "K/V MB/token", "MB/token", "vs our dense int8",
            "vs our dense int8, per round", "vs our dense, same values", "vs fastest ORT quant", "vs fastest llama.cpp",
            "logit rel L2 prefill / decode", "evidence"]
    model = ("tiny random Llama (hidden 128), not a benchmark model" if args.model == "tiny"
             else f"{args.model}: RANDOM weights of that shape (bf16 on disk), magnitude-pruned (rows named wanda-* "
                  "are magnitude here): latency only, never quality" if args.model in SYNTHETIC
             else "SmolLM2-135M-Instruct (fp32, dequantised Q4_1 GGUF) and its Wanda 50/70/2:4 checkpoints")
    protocol = (f"latency (docs/protocols.md), rows interleaved within each runtime group: decode:1@{args.context} "
                f"x {args.decode_steps} steps, prefill:1x{args.prefill}; {args.repeats} rounds, {threads} threads")
    extra = {"raw_seconds": times, "skipped": skipped, "engines": info, "bytes": bytes_, "references": refs,
             "config": {"repeats": args.repeats, "context": args.context, "prefill": args.prefill,
                        "decode_steps": args.decode_steps, "threads": threads, "quick": args.quick,
                        "model": args.model, "rows": [r.__dict__ for r in rows]}}
    md = save_results(args.name, "Dense and sparse x quantized latency, against ORT's dense quantized baselines",
                      out_rows, protocol=protocol, model=model, notes=notes, columns=cols, out_dir=out_dir, extra=extra)
    print(f"written: {md} and {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
