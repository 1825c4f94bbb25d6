"""``ort-int8`` and ``ort-int4``: ONNX Runtime's CPU provider on its own dense quantized graphs.

The honest dense baselines of issue 21: what an ORT user ships to make a model small and fast on a
CPU. ``ort-int8`` runs the ``onnx-int8`` export (``quantize_dynamic``: int8 weights per channel,
activations quantized at run time, ``MatMulInteger``, fused by ORT into ``DynamicQuantizeMatMul``);
``ort-int4`` runs the ``onnx-int4`` export (``MatMulNBits``, 4-bit blocks, ``accuracy_level`` 4 =
int8 compute by default). Both quantize every linear including the lm_head (the exporter unties a
tied lm_head first; ORT's quantizers would skip it). Zeros are stored and multiplied like any other
weight: a pruned checkpoint runs at the dense quantized speed here.

Options: ``graph_optimization`` (as ``ort-cpu``) and the export options of the format (``block_size``,
``symmetric``, ``accuracy_level``, ``bits`` for int4; ``per_channel``, ``weight_type``,
``reduce_range`` for int8), which key the cached export (:mod:`.exports`).
"""
from __future__ import annotations

from typing import Any

from .ort_cpu import MODEL_FILE, OrtCPUEngine
from .registry import ENGINES

QUANT_OPS = ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul")


class _OrtQuantEngine(OrtCPUEngine):
    exploits_sparsity = "no"

    def scheme(self) -> dict[str, Any]:
        """The export manifest's quantization record (scheme, method, lm_head, bytes per weight)."""
        from .exports import export_quantization

        return export_quantization(self.export_dir)

    def info(self) -> dict[str, Any]:
        q = self.scheme()
        return {**super().info(), "dtype": q.get("scheme", self.export_format),
                "quantization": {k: q.get(k) for k in ("scheme", "method", "lm_head", "bytes_per_weight",
                                                        "accuracy_level") if k in q}}

    def evidence(self) -> dict[str, Any]:
        import onnx

        m = onnx.load(str(self.export_dir / MODEL_FILE), load_external_data=False)
        ops: dict[str, int] = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        quant = {k: v for k, v in ops.items() if k in QUANT_OPS}
        return {"sparse_path": f"none: dense quantized MatMuls {quant} (ORT multiplies stored zeros)",
                "quantized_matmuls": sum(quant.values()), "fp32_matmuls": ops.get("MatMul", 0),
                "scheme": self.scheme().get("scheme")}


@ENGINES.register("ort-int8")
class OrtInt8Engine(_OrtQuantEngine):
    name = "ort-int8"
    description = "ONNX Runtime CPU, dynamic int8 quantization (MatMulInteger, per-channel weights, lm_head included)"
    export_format = "onnx-int8"


@ENGINES.register("ort-int4")
class OrtInt4Engine(_OrtQuantEngine):
    name = "ort-int4"
    description = "ONNX Runtime CPU, MatMulNBits int4 blocks (accuracy_level 4: int8 compute), lm_head included"
    export_format = "onnx-int4"
