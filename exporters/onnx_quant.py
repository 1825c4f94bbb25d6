"""Dense quantized ONNX for ONNX Runtime: the honest baselines a sparse-quantized model must beat.

Both formats start from the ``onnx`` export (optimum's decoder with KV cache, fp32) and hand it to
ONNX Runtime's own quantizers, unchanged in method, so the baseline is what an ORT user would ship:

- ``onnx-int8``: ``onnxruntime.quantization.quantize_dynamic`` on every MatMul with a constant
  weight. Weights int8 per output channel (``per_channel``; ``weight_type`` int8 or uint8),
  activations quantized per tensor at run time: ``DynamicQuantizeLinear -> MatMulInteger -> Cast ->
  Mul`` in the file, which ORT's optimiser fuses into ``DynamicQuantizeMatMul`` (u8 x s8 integer
  GEMM, VNNI where the CPU has it).
- ``onnx-int4``: ``MatMulNBitsQuantizer`` (the ``DEFAULT`` round-to-nearest algorithm): each MatMul
  becomes ``com.microsoft.MatMulNBits`` with ``bits`` (4; 8 also runs) weights in blocks of
  ``block_size`` (32/64/128) along the input dimension, symmetric or asymmetric (a uint4 zero point
  per block), fp32 scales. ``accuracy_level`` picks the compute type of ORT's kernel: 4 = int8
  (activations quantized per block, integer dot products: the fastest on AVX-512 VNNI / AVX2 CPUs),
  1 = fp32 (weights dequantized in registers), 0 = ORT's default.

Defaults (no timing behind them, stated so): int4 blocks of 32, symmetric, ``accuracy_level`` 4,
which is what onnxruntime-genai's model builder ships for CPU int4 models; int8 per channel, signed
weights, no ``reduce_range`` (ORT's own recommendation for VNNI CPUs; ``reduce_range=True`` is the
documented choice for AVX2 CPUs without VNNI, where u8 x s8 products can saturate).

**The lm_head.** The quantizers only touch a MatMul whose weight is an initializer. With tied
embeddings (SmolLM2) optimum's graph computes the lm_head as ``MatMul(h, Transpose(embed))``, a
non-constant weight, so both quantizers SKIP it silently. This exporter first materialises every
such transposed weight as its own initializer (:func:`materialize_transposed_weights`), so the
lm_head is quantized like the block linears; the embedding Gather stays fp32 (one row read per token).

The export verifies itself like every format, with checks that fit a lossy method: every linear incl.
the lm_head must have become a quantized op; for MatMulNBits the KV-cached decode step must equal the
graph's own full forward (tight); and the logits of a prefill (batch 2) and one cached decode step
against float32 PyTorch must be within a relative L2 error of 0.75, which catches garbage but not the
quantization error itself (large on a 135M model, see REL_L2_GATE): that is reported (relative L2,
max |diff|, top-1 agreement) in the manifest, with a note when it is large.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparse_runtime.errors import ConfigError

from . import CommonOptions, EXPORTERS, Exporter
from .onnx_common import EXTERNAL_DATA_MODES, load_onnx, ort_session, save_onnx
from .onnx_ort import MODEL_NAME, OnnxOptions, OnnxOrtExporter, run_with_past
from .source import Source
from .verify import fixed_prompt_ids, relative_check, torch_reference

BLOCK_SIZES = (32, 64, 128)
NBITS = (4, 8)  # MatMulNBits' bit widths that ORT's CPU provider runs (2 exists but is not a baseline)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
WEIGHT_TYPES = ("int8", "uint8")
# What the export gates on (docs/formats.md#onnx-int8-and-onnx-int4). Quantization error is a property of
# the method and the model, not a bug: on SmolLM2-135M plain round-to-nearest int4 (g32) in PyTorch moves the
# logits by ~0.4 relative L2 on the verification prompt, ORT's MatMulNBits alike, and quantize_dynamic's
# per-tensor activation scales as much. So the gate against fp32 PyTorch only catches garbage (a wrong or
# transposed weight gives ~1 or more), and the tight checks are structural: every linear quantized, and for
# MatMulNBits (per-row activation blocks) the cached decode step equals the same graph's full forward.
# The quality figures are reported in the manifest (and a note when they are large), never hidden.
REL_L2_GATE = 0.75
# Relative L2 between the cached decode step and the full forward's last row: ORT runs M = 1 and M > 1
# through different MatMulNBits kernels (GEMV / GEMM) that round differently, and SmolLM2's outlier
# activations amplify it (int4-g32 at accuracy_level 4: 0.007, measured while writing this); a lost or
# misplaced cache moves the logits by far more (the context is gone).
CACHE_CONSISTENCY = 0.05
QUALITY_NOTE = 0.1        # above this relative L2 the manifest carries a quality note
QUANT_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "MatMulNBits")


@dataclass
class OnnxInt8Options(CommonOptions):
    """``onnx-int8``: ``per_channel`` (one scale per output channel; False: one per tensor),
    ``weight_type`` int8 | uint8, ``reduce_range`` (7-bit weights, for CPUs without VNNI)."""

    bits: int = 8
    per_channel: bool = True
    weight_type: str = "int8"
    reduce_range: bool = False
    external_data: str = "auto"

    def validate(self) -> None:
        super().validate()
        if self.dtype != "float32":
            raise ConfigError(f"the quantized ONNX formats keep their unquantized parts in float32, not {self.dtype}; "
                              "leave dtype at float32")
        if self.bits != 8:
            raise ConfigError(f"onnx-int8 quantizes to 8 bits, not {self.bits}; for 4 bits export onnx-int4")
        if self.weight_type not in WEIGHT_TYPES:
            raise ConfigError(f"weight_type must be one of {WEIGHT_TYPES}, got {self.weight_type!r}")
        if self.external_data not in EXTERNAL_DATA_MODES:
            raise ConfigError(f"external_data must be one of {EXTERNAL_DATA_MODES}, got {self.external_data!r}")


@dataclass
class OnnxInt4Options(CommonOptions):
    """``onnx-int4``: ``bits`` 4 (8: MatMulNBits' blockwise weight-only int8), ``block_size``
    32/64/128, ``symmetric``, ``accuracy_level`` (4: int8 compute; 0: ORT's default)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    external_data: str = "auto"

    def validate(self) -> None:
        super().validate()
        if self.dtype != "float32":
            raise ConfigError(f"the quantized ONNX formats keep their unquantized parts in float32, not {self.dtype}; "
                              "leave dtype at float32")
        if self.bits not in NBITS:
            raise ConfigError(f"bits must be 4 or 8 for MatMulNBits, got {self.bits} (onnx-int8 is the dynamic int8 "
                              "format)")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"accuracy_level must be one of {ACCURACY_LEVELS} (4 = int8 compute, 1 = fp32), "
                              f"got {self.accuracy_level}")
        if self.external_data not in EXTERNAL_DATA_MODES:
            raise ConfigError(f"external_data must be one of {EXTERNAL_DATA_MODES}, got {self.external_data!r}")


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Import and run ORT's quantizers without their INFO chatter. Importing
    ``onnxruntime.quantization`` calls ``logging.basicConfig(level=INFO)`` on the ROOT logger; the
    root logger's level and handlers are put back as they were before."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    saved: dict[str, int] = {}
    try:
        import onnxruntime.quantization  # noqa: F401  (the import that reconfigures logging)
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its own INFO logger)

        root.setLevel(logging.ERROR)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("onnxruntime.quantization"):
                lg = logging.getLogger(name)
                saved[name] = lg.level
                lg.setLevel(logging.ERROR)
        yield
    finally:
        for name, lvl in saved.items():
            logging.getLogger(name).setLevel(lvl)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def materialize_transposed_weights(model) -> list[str]:
    """Give every MatMul whose weight is ``Transpose(initializer)`` its own transposed initializer.

    Why: the quantizers only quantize constant weights, and optimum writes a tied lm_head as
    ``MatMul(h, Transpose(embed_tokens.weight))``; without this the lm_head (a third of a sparse
    token's reads on SmolLM2) would stay fp32. The embedding keeps its own fp32 copy for the Gather.
    Returns the names of the MatMuls changed."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    changed, made = [], {}
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] in inits:
            continue
        tr = producer.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in tr.attribute if a.name == "perm"]
        w = inits[tr.input[0]]
        if len(w.dims) != 2 or (perm and perm[0] != [1, 0]):
            continue
        name = made.get(tr.output[0])
        if name is None:
            name = f"{tr.input[0]}.materialized_transpose"
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), name))
            made[tr.output[0]] = name
        node.input[1] = name
        changed.append(node.name)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dead = [n for n in g.node if n.op_type == "Transpose" and n.output[0] in made and n.output[0] not in used]
    for n in dead:
        g.node.remove(n)
    return changed


def constant_matmuls(model) -> list[str]:
    """Names of the MatMuls with an initializer weight: what the quantizers can quantize."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


def op_counts(model) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def quantized_weight_bytes(model) -> dict[str, Any]:
    """Bytes of the quantized weights (codes + scales + zero points) per weight of the matrices they
    encode, block linears and lm_head apart: what a decode token reads, from the file itself."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def nbytes(name: str) -> int:
        t = inits.get(name)
        if t is None:
            return 0
        return len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes

    out = {"blocks": [0, 0], "lm_head": [0, 0]}
    for n in model.graph.node:
        part = "lm_head" if "lm_head" in n.name else "blocks"
        if n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            out[part][0] += sum(nbytes(i) for i in n.input[1:])
            out[part][1] += attrs["K"] * attrs["N"]
        elif n.op_type == "MatMulInteger" and n.input[1] in inits:
            w = inits[n.input[1]]
            scale = n.input[1][: -len("_quantized")] + "_scale" if n.input[1].endswith("_quantized") else ""
            out[part][0] += nbytes(n.input[1]) + (nbytes(n.input[3]) if len(n.input) > 3 else 0) + nbytes(scale)
            out[part][1] += int(np.prod(w.dims))
    return {k: (b / w if w else None) for k, (b, w) in out.items()}


class _OnnxQuantExporter(Exporter):
    """Shared steps: the fp32 ``onnx`` graph, the lm_head untied, quantized, verified."""

    method = ""

    def quantize(self, model, work: Path, opts):  # pragma: no cover - interface
        raise NotImplementedError

    def scheme(self, opts) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def write(self, src: Source, out: Path, opts) -> dict[str, Any]:
        work = Path(tempfile.mkdtemp(prefix="sr-onnxq-"))
        try:
            base = work / "fp32"
            base.mkdir()
            OnnxOrtExporter().write(src, base, OnnxOptions())
            model = load_onnx(base / MODEL_NAME)
            untied = materialize_transposed_weights(model)
            targets = constant_matmuls(model)
            with quiet_quantizer():
                qmodel = self.quantize(model, work, opts)
            del model
            external = save_onnx(qmodel, out / MODEL_NAME, opts.external_data)
            for name in ("config.json", "generation_config.json"):
                if (base / name).is_file():
                    shutil.copy2(base / name, out / name)
            src.copy_side_files(out)
            ops = op_counts(qmodel)
            left = constant_matmuls(qmodel)
            return {"model": MODEL_NAME, "kv_cache": True, "external_data": external, "op_types": ops,
                    "quantization": {**self.scheme(opts), "method": self.method,
                                     "matmuls_with_constant_weight": len(targets),
                                     "quantized_matmuls": sum(ops.get(o, 0) for o in QUANT_OPS),
                                     "left_unquantized": left,
                                     "lm_head": ("quantized (materialised from the tied embedding's Transpose)"
                                                 if any("lm_head" in n for n in untied) else
                                                 "quantized" if any("lm_head" in n for n in targets) else
                                                 "not found"),
                                     "bytes_per_weight": quantized_weight_bytes(qmodel)}}
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def verify(self, src: Source, out: Path, opts, contents: dict[str, Any]) -> dict[str, Any]:
        ids = fixed_prompt_ids(src.tokenizer, src.model.config.vocab_size, batch=2)
        ref = torch_reference(src.model, ids, decode=True)
        sess = ort_session(out / MODEL_NAME, level="all")  # what the engines run: ORT's fusions included
        logits, present = run_with_past(sess, ids.numpy(), past=None)
        step, _ = run_with_past(sess, ref["next_token"].numpy(), past=present, past_len=ids.shape[1])
        checks = [relative_check("prefill", ref["prefill"], logits, REL_L2_GATE),
                  relative_check("decode_step", ref["decode"], step, REL_L2_GATE)]
        q = contents["quantization"]
        bad = [f"{c['name']}: relative L2 error of the logits {c['relative_l2']:.3g} > {REL_L2_GATE}" for c in checks
               if not c["ok"]]
        consistency = None
        if "MatMulNBits" in contents["op_types"]:  # activations quantized per row: caching changes nothing
            full, _ = run_with_past(sess, np.concatenate([ids.numpy(), ref["next_token"].numpy()], 1), past=None)
            consistency = relative_check("cache_consistency", full[:, -1:], step, CACHE_CONSISTENCY)
            if not consistency["ok"]:
                bad.append(f"the cached decode step differs from the graph's own full forward by relative L2 "
                           f"{consistency['relative_l2']:.3g} > {CACHE_CONSISTENCY}")
        if q["left_unquantized"]:  # every linear, the lm_head included, must be quantized
            bad.append(f"MatMuls left in fp32: {q['left_unquantized'][:3]}")
        if bad:
            from .verify import ExportVerificationError

            raise ExportVerificationError(f"the {self.name} export is broken, so it was not written: {'; '.join(bad)}. "
                                          "This is a bug in the exporter or ONNX Runtime; rerun with verify=False "
                                          "only to inspect the files")
        self._quality = max(c["relative_l2"] for c in checks)
        return {"logits": checks, "cache_consistency": consistency, "engine": "onnxruntime",
                "graph_optimization": "all", "batch": int(ids.shape[0]),
                "gate": (f"relative L2 error of the logits vs fp32 PyTorch <= {REL_L2_GATE} (catches garbage; "
                         "quantization error itself is reported), every linear quantized, and for MatMulNBits the "
                         f"cached decode step within {CACHE_CONSISTENCY} of the graph's full forward"),
                "ok": True}

    def notes(self, opts) -> list[str]:
        q = getattr(self, "_quality", None)
        extra = ([f"quality: the logits moved by relative L2 {q:.2f} from fp32 PyTorch on the verification prompt "
                  "(see verification.logits for top-1 agreement): this quantization costs accuracy on this model"]
                 if q is not None and q > QUALITY_NOTE else [])
        return extra + ["dense quantized baseline: ONNX Runtime's own quantizer; zeros are stored and multiplied like "
                "any weight (no sparsity exploited)",
                "the lm_head is quantized too (a tied lm_head is materialised from the embedding's Transpose "
                "first: ORT's quantizers skip non-constant weights)"]


@EXPORTERS.register("onnx-int8")
class OnnxInt8Exporter(_OnnxQuantExporter):
    name = "onnx-int8"
    Options = OnnxInt8Options
    description = ("ONNX decoder with KV cache, weights int8 by ONNX Runtime's dynamic quantization "
                   "(MatMulInteger, activations quantized at run time), lm_head included")
    method = "onnxruntime.quantization.quantize_dynamic"

    def scheme(self, opts: OnnxInt8Options) -> dict[str, Any]:
        return {"scheme": "int8" if opts.per_channel else "int8-per-tensor", "bits": 8, "weights": opts.weight_type,
                "per_channel": opts.per_channel, "reduce_range": opts.reduce_range,
                "activations": "uint8 per tensor, dynamic (computed at run time)"}

    def quantize(self, model, work: Path, opts: OnnxInt8Options):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = work / "int8.onnx"
        big = opts.external_data == "always" or (opts.external_data == "auto" and _large(model))
        quantize_dynamic(model, path, op_types_to_quantize=["MatMul"], per_channel=opts.per_channel,
                         reduce_range=opts.reduce_range, use_external_data_format=big,
                         weight_type=QuantType.QInt8 if opts.weight_type == "int8" else QuantType.QUInt8)
        return load_onnx(path)


@EXPORTERS.register("onnx-int4")
class OnnxInt4Exporter(_OnnxQuantExporter):
    name = "onnx-int4"
    Options = OnnxInt4Options
    description = ("ONNX decoder with KV cache, weights int4 in blocks by ONNX Runtime's MatMulNBits quantizer, "
                   "lm_head included")
    method = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer (DEFAULT, round to nearest)"

    def scheme(self, opts: OnnxInt4Options) -> dict[str, Any]:
        name = f"int{opts.bits}-g{opts.block_size}" + ("" if opts.symmetric else "-asym")
        return {"scheme": name, "bits": opts.bits, "block_size": opts.block_size, "symmetric": opts.symmetric,
                "accuracy_level": opts.accuracy_level, "scales": "float32 per block"}

    def quantize(self, model, work: Path, opts: OnnxInt4Options):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, bits=opts.bits, block_size=opts.block_size, is_symmetric=opts.symmetric,
                                 accuracy_level=opts.accuracy_level or None, op_types_to_quantize=("MatMul",))
        q.process()
        return q.model.model


def _large(model) -> bool:
    from .onnx_common import PROTOBUF_LIMIT, tensor_bytes

    return tensor_bytes(model) > PROTOBUF_LIMIT - 64 * 2 ** 20
