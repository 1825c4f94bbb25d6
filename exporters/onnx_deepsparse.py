"""ONNX for DeepSparse: static shapes, opset 18 / IR 8, prefill + fixed-cache decode.

DeepSparse 1.8 accepts IR <= 9 and opset <= 19 and optimises only static shapes: optimum's dynamic
KV-cache graph runs there with 0 % optimised ops (it falls back to its bundled ONNX Runtime;
docs/stack.md#deepsparse). So this exporter writes two static graphs, the layout DeepSparse's own LLM pipeline used:

- ``prefill.onnx``: ``input_ids``, ``attention_mask``, ``position_ids`` ``[B, L]`` (a prompt shorter
  than L is left-padded and masked) -> ``logits [B, L, V]`` and ``present.{i}.key|value
  [B, kv_heads, L, head_dim]``; with ``prefill_logits="last"``, ``logits [B, 1, V]`` of the last
  position only: what generation needs, and the work our own engines' prefill does
  (``Engine.prefill_next``), so a prefill timing compares equal work (docs/protocols.md);
- ``decode.onnx``: one token with a fixed-size cache: ``input_ids``, ``position_ids`` ``[B, 1]``,
  ``attention_mask [B, C]`` and ``past_key_values.{i}.key|value [B, kv_heads, C-1, head_dim]`` ->
  ``logits [B, 1, V]`` and ``present.* [B, kv_heads, C, head_dim]``. The caller keeps the last C-1
  entries of ``present`` (and of the mask) for the next step: empty slots sit on the left with mask 0.

The graphs take an explicit additive causal+padding mask built inside the wrapper (transformers uses
a 4-D mask as given), so no data-dependent mask code is traced. Export uses the TorchScript
exporter by default (the fast path here; with the explicit mask it traces cleanly) or
``exporter="dynamo"``; then the IR version is set to 8 (docs/stack.md: opset 18 + IR 8 is what
DeepSparse 1.8 reads).

The check: ONNX Runtime runs both graphs against PyTorch (always), and, when the DeepSparse env is
installed (``sparse-runtime engines install deepsparse``), DeepSparse compiles copies of them and
reports ``fraction_of_supported_ops`` (the share of the graph its optimised runtime executes) and
its own logits. Without the env the report says "not checked".
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparse_runtime.errors import ConfigError, SparseRuntimeError

from . import CommonOptions, EXPORTERS, Exporter
from .onnx_common import ort_session, save_onnx, weight_arrays, load_onnx
from .source import Source
from .verify import check_masks_in_pool, compare_logits, fixed_prompt_ids, summarize, torch_reference

PREFILL_NAME = "prefill.onnx"
DECODE_NAME = "decode.onnx"
LAYOUT_NAME = "deepsparse_layout.json"
MAX_OPSET = 19
IR_VERSION = 8


@dataclass
class DeepSparseOptions(CommonOptions):
    """``prefill_length`` L and ``cache_length`` C (total context of the decode graph) are fixed at
    export time; ``batch_size`` too. ``decode=False`` writes only the prefill graph.
    ``prefill_logits``: ``all`` (every position's logits: perplexity, parity) or ``last`` (the last
    position's only: generation, and equal work in prefill timings)."""

    prefill_length: int = 64
    cache_length: int = 256
    batch_size: int = 1
    decode: bool = True
    opset: int = 18
    exporter: str = "torchscript"
    check_engine: bool = True
    prefill_logits: str = "all"

    def validate(self) -> None:
        super().validate()
        if self.prefill_logits not in ("all", "last"):
            raise ConfigError(f"prefill_logits must be 'all' or 'last', got {self.prefill_logits!r}")
        if self.dtype != "float32":
            raise ConfigError("DeepSparse runs float32 (or its own int8 quantisation); export dtype float32")
        if not 1 <= self.prefill_length < self.cache_length:
            raise ConfigError(f"need 1 <= prefill_length < cache_length, got {self.prefill_length}, {self.cache_length}")
        if not 13 <= self.opset <= MAX_OPSET:
            raise ConfigError(f"DeepSparse 1.8 reads opset <= {MAX_OPSET}; got {self.opset}")
        if self.exporter not in ("torchscript", "dynamo"):
            raise ConfigError("exporter must be 'torchscript' or 'dynamo'")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")


class TableRope(nn.Module):
    """Rotary embedding as a lookup in precomputed cos/sin tables.

    transformers computes RoPE as ``inv_freq @ position_ids`` (a weightless batched MatMul) followed
    by Cos/Sin; DeepSparse 1.8's compiler aborts on that subgraph (assertion in graph.cpp, measured
    here), while a Gather from constant tables compiles with 100 % of ops optimised. The tables come
    from the model's own rotary module, so any rope scaling is kept exactly."""

    def __init__(self, rope: nn.Module, max_positions: int) -> None:
        super().__init__()
        with torch.no_grad():
            cos, sin = rope(torch.zeros(1), torch.arange(max_positions)[None])
        self.register_buffer("cos_table", cos[0].float().contiguous(), persistent=False)
        self.register_buffer("sin_table", sin[0].float().contiguous(), persistent=False)

    def forward(self, x, position_ids):
        return self.cos_table[position_ids].to(x.dtype), self.sin_table[position_ids].to(x.dtype)


@contextlib.contextmanager
def rope_as_tables(model: nn.Module, max_positions: int):
    """Temporarily swap every ``*RotaryEmbedding`` module of ``model`` for a :class:`TableRope`."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, name, TableRope(child, max_positions))
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class StaticDecoder(nn.Module):
    """Flat-tensor wrapper: (input_ids, attention_mask, position_ids, *past) -> (logits, *present).
    ``last_only``: logits of the last position only (the model's ``logits_to_keep=1``)."""

    def __init__(self, model: nn.Module, last_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers
        self.keep = 1 if last_only else 0

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        b, n = input_ids.shape
        p = past[0].shape[2] if past else 0
        t = p + n
        j = torch.arange(t).view(1, 1, 1, t)
        i = torch.arange(n).view(1, 1, n, 1) + p
        allowed = (j <= i) & (attention_mask[:, None, None, :] > 0)
        mask = torch.zeros(b, 1, n, t, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
        cache = DynamicCache()
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=self.keep)
        presents = []
        for layer in range(self.n_layers):
            lay = out.past_key_values.layers[layer]
            presents += [lay.keys, lay.values]
        return (out.logits, *presents)


def kv_shape(cfg) -> tuple[int, int]:
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(heads), int(dim)


def _export(wrapper: nn.Module, args: tuple, path: Path, in_names: list[str], out_names: list[str], opts) -> None:
    import onnx

    tmp = Path(tempfile.mkdtemp(prefix="sr-ds-"))
    try:
        f = tmp / "m.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(f), dynamo=(opts.exporter == "dynamo"), opset_version=opts.opset,
                              input_names=in_names, output_names=out_names)
        model = onnx.load(str(f), load_external_data=True)
        if opts.exporter == "dynamo":  # dynamo names outputs itself; rename to ours
            _rename_io(model, in_names, out_names)
        model.ir_version = IR_VERSION
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version > MAX_OPSET:
                raise ConfigError(f"the exporter produced opset {o.version} > {MAX_OPSET}")
        save_onnx(model, path, "auto")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_io(model, in_names, out_names) -> None:
    mapping = {}
    for vi, name in zip(model.graph.input, in_names):
        mapping[vi.name] = name
        vi.name = name
    for vi, name in zip(model.graph.output, out_names):
        mapping[vi.name] = name
        vi.name = name
    for node in model.graph.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
        node.output[:] = [mapping.get(x, x) for x in node.output]


def io_names(n_layers: int, with_past: bool) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "attention_mask", "position_ids"]
    if with_past:
        ins += [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ins, outs


@EXPORTERS.register("deepsparse")
class DeepSparseExporter(Exporter):
    name = "deepsparse"
    Options = DeepSparseOptions
    description = "static-shape ONNX (opset <= 19, IR 8) prefill + fixed-cache decode graphs for DeepSparse 1.8"

    def write(self, src: Source, out: Path, opts: DeepSparseOptions) -> dict[str, Any]:
        model = src.model
        cfg = model.config
        b, L, C = opts.batch_size, opts.prefill_length, opts.cache_length
        heads, dim = kv_shape(cfg)
        n_layers = cfg.num_hidden_layers
        ids = torch.zeros(b, L, dtype=torch.long)
        files = [PREFILL_NAME]
        with rope_as_tables(model, C) as n_rope:
            ins, outs = io_names(n_layers, False)
            _export(StaticDecoder(model, opts.prefill_logits == "last").eval(),
                    (ids, torch.ones(b, L, dtype=torch.long), torch.arange(L).repeat(b, 1)),
                    out / PREFILL_NAME, ins, outs, opts)
            wrapper = StaticDecoder(model).eval()
            if opts.decode:
                past = tuple(torch.zeros(b, heads, C - 1, dim) for _ in range(2 * n_layers))
                ins, outs = io_names(n_layers, True)
                _export(wrapper, (ids[:, :1], torch.ones(b, C, dtype=torch.long), torch.zeros(b, 1, dtype=torch.long),
                                  *past), out / DECODE_NAME, ins, outs, opts)
                files.append(DECODE_NAME)
        src.copy_side_files(out)
        layout = {"format": "sparse-runtime/deepsparse-static-kv", "version": 1, "batch_size": b,
                  "prefill_length": L, "cache_length": C, "prefill_logits": opts.prefill_logits, "kv_heads": heads,
                  "head_dim": dim, "layers": n_layers,
                  "graphs": files, "opset": opts.opset, "ir_version": IR_VERSION,
                  "protocol": "prefill: left-pad prompt to L (mask 0 on pads, positions of real tokens from 0); "
                              "decode: past = last C-1 cache entries (left-padded with zeros, mask 0), "
                              "attention_mask [B, C] covers past + the new token; keep present[:, :, 1:] next step"}
        (out / LAYOUT_NAME).write_text(json.dumps(layout, indent=1))
        return {"graphs": files, "batch_size": b, "prefill_length": L, "cache_length": C,
                "prefill_logits": opts.prefill_logits, "opset": opts.opset,
                "ir_version": IR_VERSION, "exporter": opts.exporter, "static_shapes": True,
                "rope": "precomputed cos/sin tables" if n_rope else "model's own"}

    def verify(self, src: Source, out: Path, opts: DeepSparseOptions, contents: dict[str, Any]) -> dict[str, Any]:
        cfg = src.model.config
        n = min(24, opts.prefill_length)
        ids = fixed_prompt_ids(src.tokenizer, cfg.vocab_size, length=n, batch=opts.batch_size)
        ref = torch_reference(src.model, ids, decode=opts.decode)
        feeds = prefill_feeds(ids.numpy(), opts.prefill_length)
        sess = ort_session(out / PREFILL_NAME)
        outs = sess.run(None, feeds)
        checks = [compare_logits("prefill", *prefill_pair(ref["prefill"], outs[0], n), "float32")]
        dfeeds = None
        if opts.decode:
            dfeeds = decode_feeds(ref["next_token"].numpy(), outs[1:], n, opts.prefill_length, opts.cache_length)
            dsess = ort_session(out / DECODE_NAME)
            douts = dsess.run(None, dfeeds)
            checks.append(compare_logits("decode_step", ref["decode"], douts[0], "float32"))
        masks = check_masks_in_pool(src.manifest, weight_arrays(load_onnx(out / PREFILL_NAME)), "float32")
        extra = {"engine": "onnxruntime (static graphs)", "opset": opts.opset, "ir_version": IR_VERSION,
                 "deepsparse": deepsparse_check(out, feeds, dfeeds, ref, n, opts) if opts.check_engine
                 else {"checked": False, "reason": "check_engine=False"}}
        # The files are judged by ONNX Runtime (the reference ONNX implementation). DeepSparse's own
        # parity is reported beside it, not gated: an engine that disagrees is a finding about the
        # engine (and is flagged in ``deepsparse.parity_ok``), not a broken export.
        ds = extra["deepsparse"]
        if ds.get("checked"):
            ds["parity_ok"] = bool(ds.get("logits")) and all(c["ok"] for c in ds["logits"])
        return summarize(checks, masks, extra)

    def notes(self, opts) -> list[str]:
        from sparse_runtime.runtime.deepsparse_env import LICENCE

        return [LICENCE, f"static shapes: batch {opts.batch_size}, prefill {opts.prefill_length}, "
                         f"cache {opts.cache_length}; re-export for other sizes",
                "DeepSparse speeds up unstructured sparsity only on AVX-512 CPUs (docs/stack.md); check its ISA"]


def prefill_pair(ref, logits: np.ndarray, n: int) -> tuple:
    """(reference, graph) logits of a prefill of ``n`` real tokens: the last ``n`` positions, or the
    last one when the graph keeps only the last position (``prefill_logits="last"``)."""
    return (ref, logits[:, -n:]) if logits.shape[1] > 1 else (ref[:, -1:], logits)


def prefill_feeds(ids: np.ndarray, L: int) -> dict[str, np.ndarray]:
    b, n = ids.shape
    pad = L - n
    input_ids = np.concatenate([np.zeros((b, pad), np.int64), ids.astype(np.int64)], 1)
    mask = np.concatenate([np.zeros((b, pad), np.int64), np.ones((b, n), np.int64)], 1)
    pos = np.concatenate([np.zeros((b, pad), np.int64), np.tile(np.arange(n, dtype=np.int64), (b, 1))], 1)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos}


def decode_feeds(next_ids: np.ndarray, presents: list[np.ndarray], n: int, L: int, C: int) -> dict[str, np.ndarray]:
    """Feeds for the first decode step after a prefill of ``n`` real tokens (left-padded to L)."""
    b = next_ids.shape[0]
    feeds = {"input_ids": next_ids.astype(np.int64).reshape(b, 1),
             "position_ids": np.full((b, 1), n, np.int64)}
    mask = np.zeros((b, C), np.int64)
    mask[:, C - 1 - n:] = 1  # the n real cache entries and the new token
    feeds["attention_mask"] = mask
    for i, p in enumerate(presents):
        h, d = p.shape[1], p.shape[3]
        past = np.zeros((b, h, C - 1, d), np.float32)
        past[:, :, C - 1 - n:] = p[:, :, L - n:]
        layer, kv = divmod(i, 2)
        feeds[f"past_key_values.{layer}.{'key' if kv == 0 else 'value'}"] = past
    return feeds


def deepsparse_check(out: Path, feeds, dfeeds, ref, n: int, opts) -> dict[str, Any]:
    """Compile the graphs in DeepSparse (its own env) and report optimised-op share and parity."""
    from sparse_runtime.runtime import deepsparse_env as env

    if not env.is_installed():
        return {"checked": False, "reason": f"DeepSparse env not installed (run `{env.INSTALL_HINT}`): "
                                            "share of optimised ops not checked"}
    res: dict[str, Any] = {"checked": True, "licence": env.LICENCE, "graphs": {}, "logits": []}
    tmp = Path(tempfile.mkdtemp(prefix="sr-ds-check-"))
    try:
        for name, fd, key in ((PREFILL_NAME, feeds, "prefill"), (DECODE_NAME, dfeeds, "decode_step")):
            if fd is None:
                continue
            inputs = {}
            for k, v in fd.items():
                p = tmp / f"{key}-{k}.npy"
                np.save(p, v)
                inputs[k] = str(p)
            try:
                r = env.run_worker({"action": "run", "model": str(out / name), "batch_size": opts.batch_size,
                                    "inputs": inputs, "outputs_dir": str(tmp / f"{key}-out")})
            except SparseRuntimeError as e:  # a compiler abort is a finding, not an export failure
                res["graphs"][name] = {"fraction_of_supported_ops": 0.0, "error": str(e)[:300]}
                continue
            res["graphs"][name] = {"fraction_of_supported_ops": r["fraction_of_supported_ops"],
                                   "compile_seconds": r["compile_seconds"]}
            logits = np.load(r["outputs"][0])
            want, got = prefill_pair(ref["prefill"], logits, n) if key == "prefill" else (ref["decode"], logits)
            c = compare_logits(key, want, got, "float32")
            res["logits"].append(c.__dict__)
        res["fraction_of_supported_ops"] = min((g["fraction_of_supported_ops"] for g in res["graphs"].values()),
                                               default=0.0)
        res["engine"] = env.status().get("deepsparse")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res
