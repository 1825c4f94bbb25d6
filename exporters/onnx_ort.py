"""ONNX for ONNX Runtime: a decoder with KV cache (optimum's ``text-generation-with-past`` graph).

Why optimum: its graph is the one ORT users already load (``optimum.onnxruntime.ORTModelForCausalLM``
reads this directory as is when no post-processing option is used), it patches transformers' mask
code for export, and its logits agree with PyTorch's to about 1e-4 on SmolLM2
(benchmarks/results/export.md; docs/stack.md#onnx-export).

One ``model.onnx`` with dynamic batch and sequence; inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value`` ``[batch, kv_heads, past, head_dim]``; outputs
``logits`` and ``present.{i}.key|value``. Prefill passes an empty past (length 0).

Options:
- ``dtype``: float32 (default) or float16 (weights and compute in fp16, inputs/outputs kept fp32
  via ``onnxruntime.transformers.float16``; ORT's CPU provider falls back to fp32 kernels with
  inserted casts where it lacks fp16 ones, so fp16 shrinks the file more than it speeds up CPU).
  bfloat16 is refused: ORT's CPU provider has no bf16 MatMul.
- ``optimize``: none (default) | basic | extended: ORT's offline graph optimisation, saved into the
  file (the result is tied to ORT's CPU provider and is no longer loadable by optimum's classes).
- ``sparse_initializers``: store 2-D weights that get smaller as ONNX sparse initializers (COO,
  int64 indices). **ORT densifies them when it loads the model**: smaller file, same memory, same
  speed. Worth it above ~67 % sparsity in fp32.
- ``external_data``: auto (default: only when the weights pass 2 GB, the protobuf limit) | always | never.
- ``opset``: the ONNX opset (default: optimum's choice, 18 for Llama-like models).
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sparse_runtime.errors import ConfigError

from . import CommonOptions, EXPORTERS, Exporter
from .onnx_common import (EXTERNAL_DATA_MODES, ORT_TYPES, load_onnx, ort_session, save_onnx, to_sparse_initializers,
                          weight_arrays)
from .source import Source
from .verify import check_masks_in_pool, compare_logits, fixed_prompt_ids, summarize, torch_reference

MODEL_NAME = "model.onnx"
OPTIMIZE_LEVELS = ("none", "basic", "extended")


@dataclass
class OnnxOptions(CommonOptions):
    optimize: str = "none"
    sparse_initializers: bool = False
    external_data: str = "auto"
    opset: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        if self.dtype == "bfloat16":
            raise ConfigError("ONNX Runtime's CPU provider has no bfloat16 MatMul; export dtype float16 or float32")
        if self.optimize not in OPTIMIZE_LEVELS:
            raise ConfigError(f"optimize must be one of {OPTIMIZE_LEVELS}, got {self.optimize!r}")
        if self.external_data not in EXTERNAL_DATA_MODES:
            raise ConfigError(f"external_data must be one of {EXTERNAL_DATA_MODES}, got {self.external_data!r}")
        if self.opset is not None and not 14 <= int(self.opset) <= 21:
            raise ConfigError(f"opset {self.opset} is outside what the exporters support (14-21)")


def optimum_export(hf_dir: Path, work: Path, opset: Optional[int]) -> Path:
    """Run optimum's exporter quietly; returns the directory holding model.onnx and config.json."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("the onnx export needs optimum-onnx: pip install 'sparse-runtime[onnx]'") from e
    import warnings

    kw = {"opset": opset} if opset else {}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("optimum").setLevel(logging.ERROR)
        main_export(str(hf_dir), output=str(work), task="text-generation-with-past", do_validation=False,
                    device="cpu", **kw)
    return work


@EXPORTERS.register("onnx")
class OnnxOrtExporter(Exporter):
    name = "onnx"
    Options = OnnxOptions
    description = "ONNX decoder with KV cache (optimum text-generation-with-past) for ONNX Runtime"

    def write(self, src: Source, out: Path, opts: OnnxOptions) -> dict[str, Any]:
        import onnx

        work = Path(tempfile.mkdtemp(prefix="sr-onnx-"))
        try:
            optimum_export(src.hf_dir(), work, opts.opset)
            model = load_onnx(work / MODEL_NAME)
            if opts.dtype == "float16":
                from onnxruntime.transformers.float16 import convert_float_to_float16

                model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
            optimized = None
            if opts.optimize != "none":
                pre, post = work / "pre.onnx", work / "post.onnx"
                save_onnx(model, pre, "always")
                sess = ort_session(pre, optimized_path=post, level=opts.optimize)
                del sess
                model = load_onnx(post)
                optimized = opts.optimize
            sparse_info = {"sparse_initializers": 0, "bytes_saved": 0}
            if opts.sparse_initializers:
                sparse_info = to_sparse_initializers(model)
            external = save_onnx(model, out / MODEL_NAME, opts.external_data)
            for name in ("config.json", "generation_config.json"):
                if (work / name).is_file():
                    shutil.copy2(work / name, out / name)
            src.copy_side_files(out)
            ops: dict[str, int] = {}
            for n in model.graph.node:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
            return {"model": MODEL_NAME, "dtype": opts.dtype, "ir_version": model.ir_version,
                    "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
                    "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
                    "kv_cache": True, "graph_optimization": optimized, "external_data": external,
                    "nodes": len(model.graph.node), "op_types": ops, **sparse_info}
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def verify(self, src: Source, out: Path, opts: OnnxOptions, contents: dict[str, Any]) -> dict[str, Any]:
        ids = fixed_prompt_ids(src.tokenizer, src.model.config.vocab_size, batch=2)
        ref = torch_reference(src.model, ids, decode=True)
        sess = ort_session(out / MODEL_NAME, level="basic" if opts.optimize == "none" else opts.optimize)
        logits, present = run_with_past(sess, ids.numpy(), past=None)
        nxt = ref["next_token"].numpy()
        step, _ = run_with_past(sess, nxt, past=present, past_len=ids.shape[1])
        checks = [compare_logits("prefill", ref["prefill"], logits, opts.dtype),
                  compare_logits("decode_step", ref["decode"], step, opts.dtype)]
        masks = check_masks_in_pool(src.manifest, weight_arrays(load_onnx(out / MODEL_NAME)), opts.dtype)
        return summarize(checks, masks, {"engine": "onnxruntime", "batch": int(ids.shape[0])})

    def notes(self, opts: OnnxOptions) -> list[str]:
        n = ["ONNX Runtime runs every weight dense: unstructured sparsity gives no speedup on ORT (docs/stack.md)"]
        if opts.sparse_initializers:
            n.append("weights stored as ONNX sparse initializers: ORT densifies them on load (file size only)")
        if opts.optimize != "none":
            n.append(f"ORT offline graph optimisation '{opts.optimize}' applied: the file targets ORT's CPU provider")
        return n


def run_with_past(sess, input_ids: np.ndarray, past: Optional[dict[str, np.ndarray]], past_len: int = 0):
    """One call of an optimum-style decoder: returns (logits, {past name: present array})."""
    b, n = input_ids.shape
    feeds: dict[str, np.ndarray] = {}
    present_names = [o.name for o in sess.get_outputs()][1:]
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = input_ids.astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((b, past_len + n), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.tile(np.arange(past_len, past_len + n, dtype=np.int64), (b, 1))
        elif inp.name.startswith("past_key_values"):
            if past is None:
                heads, dim = inp.shape[1], inp.shape[3]
                feeds[inp.name] = np.zeros((b, heads, 0, dim), dtype=ORT_TYPES[inp.type])
            else:
                feeds[inp.name] = past[inp.name]
        else:  # pragma: no cover - unknown optimum input
            raise ConfigError(f"the ONNX graph has an input {inp.name!r} this runner does not know")
    outs = sess.run(None, feeds)
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    new_past = {p: o for p, o in zip(past_names, outs[1:])} if len(present_names) == len(past_names) else {}
    return outs[0], new_past
