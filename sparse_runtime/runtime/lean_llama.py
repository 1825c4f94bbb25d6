"""A lean forward for Llama-family decoders (Llama, Mistral, Qwen2): fused linears, a preallocated
KV cache, and a batch-1 decode step that runs entirely in C.

Why: on SmolLM2-135M the Hugging Face eager forward spends ~40 % of a decode token outside the
linears (modules, hooks, cache objects, masks, Python), and each of the 210 linears per token costs
tens of microseconds of call overhead, about what the sparse kernel saves on the small shapes. So
swapping kernels into HF's forward gave ~1.06x. Here:

- q/k/v become one matrix and gate/up another (same input, rows concatenated; packed in the same
  bitmask/csr16 layout), so a layer is 4 products instead of 7;
- decode (batch 1, one token) is ONE C call per token (``sr_decode_step``): norms, RoPE, GQA
  attention over the cache, SwiGLU, residuals and the dense lm_head, in one OpenMP region;
- the serving slots' decode of B > 1 sequences is ONE C call too (``sr_decode_step_batch``): each
  linear's weights are read once for the B rows, attention runs per sequence over its own length;
- prefill (and the single-sequence ``forward`` with batch > 1) runs a short torch forward on the same
  fused weights, each fused linear dispatching sparse/dense by its measured batch threshold
  (``SparseLinear``); the rotary embedding is one C call, a prompt that starts its sequence attends
  in one C call reading q/k/v from the qkv product (``kernels.prefill.prefill_attention``), and on
  the AVX2 path each sparse product takes its RMSNorm / SiLU-mul input and residual add inside the
  prefill walk (``kernels.prefill.avx2_prefill_linear``; docs/kernels.md "The AVX2 prefill walk").

``sparse=False`` gives the dense variant of the same path (dense fused weights, a dense AVX-512/AVX2
matrix-vector kernel in the C step, F.linear in prefill), so dense and sparse are compared on equal
glue. Logits equal HF's within fp32 tolerance (tests/test_lean_decode.py).

Memory: a fused linear holds ONE form of its weight, packed or dense, never both, so a sparse model
takes less memory than its dense original, prefill included: products the measured dispatch sends
to the GEMM rebuild the packed weight into one scratch buffer shared by the whole model
(:class:`~sparse_runtime.kernels.module.DenseScratch`, the size of the largest fused weight). The
HF model's linears are not referenced once built (``release_source`` frees them layer by layer).

``value_dtype='bfloat16'``: packed values (or the dense variant's weights, the embedding and the
lm_head) stored in bf16; sparse products accumulate in fp32 on fp32 activations, dense ones run a
bf16 GEMM (what a dense bf16 model does). The C decode step reads fp32 only, so bf16 models decode
on the torch path (one batched forward per token). fp32 stays the default and is exact.

``value_dtype='int8'`` / ``'int4'`` (with ``group`` and ``symmetric``, the scheme of
:mod:`sparse_runtime.quant.scheme`): every fused linear holds int8/int4 codes and float32 scales
(:class:`~sparse_runtime.kernels.quant.QuantLinear`): bitmask codes where it has at least
``min_sparsity`` zeros (sparse variant), dense codes otherwise; the lm_head too (dense codes, unless
``lm_head_fp32``), and a tied embedding then reads its rows dequantized from those codes, so each
weight has ONE form (no fp32 copy beside the codes). The mask is the fp32 weight's (``W != 0``),
never the codes'. The codes come from the quantized checkpoint's own scales (``quantization``,
a ``sparse_runtime.quant.io`` record: ``codes_from``, exact) or, for an ordinary checkpoint, from
round-to-nearest at load. Decode runs in C (both steps); prefill dequantizes each weight into the
shared scratch and runs the fp32 GEMM (products of up to ``C_MAX_TOKENS`` tokens run the C kernel).
The logits are those of the fp32 model whose weights are the dequantized values, up to fp32 rounding.

Refused with a clear error (use ``torch-cpu``/``torch-sparse`` for these): other families, Qwen3's
q/k norms, non-SiLU MLPs, rope types whose frequencies depend on the sequence length
(``dynamic``, ``longrope``), partial rotary, weights neither fp32 nor (with bf16 values) bf16, and
models off the CPU.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# model_type -> how to read the per-layer sliding window (0 = full causal attention)
def _window_mistral(cfg, layer: int) -> int:
    return int(getattr(cfg, "sliding_window", None) or 0)


def _window_layer_types(cfg, layer: int) -> int:
    types = getattr(cfg, "layer_types", None)
    if types and types[layer] == "sliding_attention":
        return int(cfg.sliding_window or 0)
    return 0


FAMILIES: dict[str, Callable[[object, int], int]] = {
    "llama": lambda cfg, layer: 0,
    "mistral": _window_mistral,
    "qwen2": _window_layer_types,
}
UNSUPPORTED_ROPE = ("dynamic", "longrope")  # frequencies depend on the sequence length: not tabulated
_DECODE_FORM: dict[tuple, bool] = {}  # measured: does the C step run this (shape, density) packed?


@dataclass
class LeanConfig:
    """``sparse``: pack linears with at least ``min_sparsity`` zeros (False: the dense variant).
    ``isa``/``layout``: kernel path (default: best for the CPU). ``calibrate``: measure, per fused
    shape and density, whether the C decode step runs it packed or dense (batch 1, the step's own
    kernels and threads) and the sparse/dense dispatch for prefill (threshold and further winning
    token ranges); without it the step always runs packed weights and prefill uses
    ``batch_threshold``. ``initial_cache``:
    KV slots allocated first (doubled when full). ``value_dtype``: ``float32`` (exact, default) or
    ``bfloat16`` (see the module docstring)."""

    sparse: bool = True
    min_sparsity: float = 0.3
    isa: Optional[str] = None
    layout: Optional[str] = None
    calibrate: bool = True
    batch_threshold: int = 1
    initial_cache: int = 256
    value_dtype: str = "float32"
    group: int = 0  # int8/int4: columns per scale (32/64/128, dividing every input width); 0 per row
    symmetric: bool = True  # int8/int4: symmetric codes, else GPTQ-style zero points
    lm_head_fp32: bool = False  # int8/int4: keep the lm_head (and a tied embedding) in fp32
    # "bfloat16": products of at least PREFILL_BF16_MIN tokens (prefill) run AMX/bf16 GEMMs on bf16-rounded
    # operands with fp32 accumulation (opt-in: it changes the numerics; docs/kernels.md#prefill-in-bf16-amx)
    prefill_dtype: str = "float32"
    # "bfloat16": the batched decode steps of the serving slots run their packed bitmask linears on
    # AMX tiles (bf16 operands, fp32 accumulation) from 4 sequences on; opt-in for the same reason
    # (docs/kernels.md#batched-decode-on-amx). Batch-1 steps (generate) are never affected.
    batch_dtype: str = "float32"
    # "int8" / "int8-g64" / "int8-g128" (W8A8, int8 symmetric per-row codes only): the decode products (the
    # C step's, and the torch path's up to C_MAX_TOKENS tokens) quantize their input to int8, one scale per
    # token or per 64 / 128 columns of it, and multiply in integers on AVX-512 VNNI; opt-in, it changes the
    # numerics (docs/kernels.md#w8a8-decode). With int4 codes (any group, symmetric or not) "int8" only: W4A8, the
    # codes held dense (docs/kernels.md#w4a8-decode). Prefill GEMMs and the AMX batched steps of
    # batch_dtype="bfloat16" keep their own dtype.
    act_dtype: str = "float32"
    # "float16": the K/V cache holds fp16 (IEEE half, rounded to nearest even) instead of fp32: half the bytes
    # a decode token reads from it, which decide long-context decode (docs/kernels.md#decode-attention);
    # opt-in, K and V are rounded (the prompt's own attention sees the same rounded values)
    kv_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.value_dtype not in VALUE_DTYPES and self.value_dtype not in QUANT_DTYPES:
            raise ConfigError(f"value_dtype {self.value_dtype!r}: the lean path stores float32, bfloat16, int8 or "
                              f"int4 weights")
        if self.quantized:
            self.scheme  # validates group (one line naming the fix)
        if self.prefill_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"prefill_dtype {self.prefill_dtype!r}: choose float32 (exact) or bfloat16 (AMX GEMMs)")
        if self.batch_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"batch_dtype {self.batch_dtype!r}: choose float32 (exact) or bfloat16 (AMX tiles)")
        from ..kernels.decode import ACT_DTYPES  # the C descriptor's values (SRLinear.act)

        if self.act_dtype not in ACT_DTYPES:
            raise ConfigError(f"act_dtype {self.act_dtype!r}: choose {' or '.join(ACT_DTYPES)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype {self.kv_dtype!r}: choose {' or '.join(KV_DTYPES)} (the K/V cache's values)")
        if self.act_dtype == "float32":
            return
        if self.value_dtype == "int4":  # W4A8: any group, symmetric or not
            if self.act_dtype != "int8":
                raise ConfigError("int8 activations with int4 codes (W4A8) take one activation scale per token: "
                                  "--act-dtype int8")
        elif not (self.value_dtype == "int8" and self.group == 0 and self.symmetric):
            raise ConfigError("int8 activations (W8A8) multiply int8 symmetric codes with one scale per row (or "
                              "int4 codes, W4A8): load with --dtype int8 (not a group size or -asym) or "
                              "--dtype int4, or leave --act-dtype out")

    @property
    def quantized(self) -> bool:
        return self.value_dtype in QUANT_DTYPES

    @property
    def scheme(self):
        """The :class:`~sparse_runtime.quant.scheme.QuantScheme` of int8/int4 values (None otherwise)."""
        if not self.quantized:
            return None
        from ..quant.scheme import QuantScheme

        return QuantScheme(QUANT_DTYPES[self.value_dtype], int(self.group), bool(self.symmetric))


VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KV_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # LeanConfig.kv_dtype: the cache's torch dtype
QUANT_DTYPES = {"int8": 8, "int4": 4}  # value_dtype -> bits (codes + fp32 scales; fp32 activations)
W8A8_NO_VNNI = ("int8 activations (W8A8) run on AVX-512 VNNI, which this CPU (or the kernel ISA chosen) lacks (its "
                "portable integer loops are several times slower than the weight-only int8 kernels): leave --act-dtype out")
PREFILL_BF16_MIN = 16  # prefill_dtype bf16: fewer tokens keep the fp32 path (the decode kernels' regime)
DECODE_FORM_BUDGET = 256 << 20  # bytes of dense weights rebuilt at once to time the C step's forms
DENSE_DECODE_MARGIN = 0.9  # a group is held dense only where dense took at most this share of packed's time


def check_supported(model: nn.Module, value_dtype: str = "float32", skeleton: bool = False) -> None:
    """Raise ConfigError naming why ``model`` cannot run on the lean path (with ``value_dtype``).
    ``skeleton``: a streamed model's module tree on ``meta`` (its weights are read block by block)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILIES:
        raise ConfigError(f"the lean decode path supports {', '.join(sorted(FAMILIES))} models, not {mt!r}; "
                          f"use the torch-cpu or torch-sparse engine")
    layers = model.model.layers
    attn = layers[0].self_attn
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        raise ConfigError("q/k norms (Qwen3-style) are not in the lean path; use torch-sparse")
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"the lean path implements SwiGLU with SiLU, not {act!r}; use torch-sparse")
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope in UNSUPPORTED_ROPE:
        raise ConfigError(f"rope type {rope!r} depends on the sequence length and is not supported by the lean "
                          f"path; use torch-sparse")
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ConfigError("partial rotary embeddings are not supported by the lean path; use torch-sparse")
    ok = (torch.float32,) if value_dtype == "float32" else (torch.float32, torch.bfloat16)
    for name, p in model.named_parameters():
        if p.dtype not in ok or p.device.type not in (("cpu", "meta") if skeleton else ("cpu",)):
            raise ConfigError(f"the lean path runs {' or '.join(str(d).replace('torch.', '') for d in ok)} CPU weights "
                              f"with {value_dtype} values; {name} is {p.dtype} on {p.device} (load the model with "
                              f"dtype float32, or use bfloat16 values: dtype='bfloat16' / --dtype bfloat16)")


class FusedLinear:
    """One fused linear (q|k|v, gate|up, or a single one) holding ONE form of its weight:

    - packed (``module``, a :class:`~sparse_runtime.kernels.SparseLinear` with no dense copy): its
      forward dispatches by the measured batch threshold; products sent to the GEMM rebuild the
      weight into the model's shared ``scratch`` (see ``measure_dispatch``, which times exactly that);
    - dense (``weight``): the dense variant, layers below ``min_sparsity``, and sparse layers whose
      packed form lost to dense in the C decode step (:func:`choose_decode_forms`; setting
      ``decode_packed`` converts between the forms, exactly: fp32 packing and rebuilding are lossless).
    """

    def __init__(self, linears: list[nn.Linear], lean: LeanConfig, isa: Optional[str], scratch=None,
                 names: Optional[list[str]] = None, quantization=None):
        dtype = VALUE_DTYPES.get(lean.value_dtype, torch.float32)
        w = torch.cat([l.weight.detach() for l in linears], 0).to(dtype).contiguous()
        biases = [l.bias for l in linears]
        self.bias = None  # fp32 (the kernels and the C step add it in fp32)
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach().float() if b is not None else torch.zeros(l.out_features)
                                   for b, l in zip(biases, linears)]).contiguous()
        self.shape = tuple(w.shape)
        self.sparsity = 1.0 - int(torch.count_nonzero(w)) / max(w.numel(), 1)
        self.lean, self.isa, self.scratch = lean, isa, scratch
        self.can_pack = bool(lean.sparse and isa is not None and self.sparsity >= lean.min_sparsity)
        self.module = None
        self.qlin = None  # int8/int4: the codes (QuantLinear), the only form held
        self.prefill_forms: dict[str, int] = {}  # calls per fused prefill form (evidence)
        self._avx2_runs: Optional[bool] = None  # whether the AVX2 prefill walk runs the packed weight
        self._fused_q: Optional[tuple] = None  # (form,): the fused bf16 form of the codes held (asked once)
        self.weight: Optional[torch.Tensor] = w
        if lean.quantized and isa is not None:
            grid = quant_grid(lean, names or [], quantization)
            if grid is not None:
                scheme, scales = grid
                layout = "bitmask" if self.can_pack else "dense"
                self.qlin = quantized_linear(w, scheme, layout, isa, self.bias, scratch, scales, lean.act_dtype)
                self.weight = None
                self.can_pack = False
                return
        if self.can_pack:
            self._to_packed()

    def _to_packed(self) -> None:
        from ..kernels import SparseLinear, apply_dispatch, pack, select_layout

        vd = self.lean.value_dtype if self.lean.value_dtype in VALUE_DTYPES else "float32"  # unquantized member
        p = pack(self.weight, select_layout(self.isa, self.lean.layout), vd)
        self.weight = None  # the packed form only, from here on
        self.module = SparseLinear(p, self.bias, isa=self.isa, batch_threshold=self.lean.batch_threshold,
                                   scratch=self.scratch)
        self._avx2_runs = None
        if self.lean.calibrate:
            apply_dispatch(self.module)

    def _to_dense(self) -> None:
        from ..kernels.module import densify_into

        m = self.module
        self.weight = densify_into(m.packed, torch.empty(self.shape, dtype=m.values.dtype))
        self.module = None

    @property
    def decode_packed(self) -> bool:
        """Whether the weight is held (and the C decode step reads it) packed. Setting False
        rebuilds the dense weight and drops the packed one; True packs a packable one again.
        Quantized weights keep their one form (bitmask codes count as packed)."""
        if self.qlin is not None:
            return self.qlin.packed.layout == "bitmask"
        return self.module is not None

    @decode_packed.setter
    def decode_packed(self, packed: bool) -> None:
        if self.qlin is not None:  # codes: bitmask -> dense only (the measured choice), exact
            if not packed and self.qlin.packed.layout == "bitmask":
                self.qlin = self.dense_codes()
                self._fused_q = None
            return
        if packed and self.module is None and self.can_pack:
            self._to_packed()
        elif not packed and self.module is not None:
            self._to_dense()

    def dense_codes(self):
        """The held bitmask codes as dense codes (a new QuantLinear; the same values: the codes are
        recovered from the dequantized weight with the same scales, exactly)."""
        from ..kernels.quant import QuantLinear, quantize_packed
        from ..quant.scheme import QuantScheme

        q = self.qlin
        p = q.packed
        dense = quantize_packed(q.dequantize(), QuantScheme(p.bits, p.group, p.symmetric), "dense",
                                scales=p.scales, zeros=p.zeros)
        return QuantLinear(dense, self.bias, isa=q.isa, scratch=self.scratch, act=q.act)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean.prefill_dtype == "bfloat16" and x.numel() // self.shape[1] >= PREFILL_BF16_MIN:
            return self._bf16_prefill(x)
        if self.qlin is not None:
            return self.qlin(x)
        if self.module is not None:
            return self.module(x)
        w = self.weight
        if w.dtype == x.dtype:
            return F.linear(x, w, self.bias)
        y = F.linear(x.to(w.dtype), w).to(x.dtype)  # bf16 weights: a bf16 GEMM, like a dense bf16 model
        return y if self.bias is None else y + self.bias

    def _bf16_prefill(self, x: torch.Tensor) -> torch.Tensor:
        """A prefill product with bf16 GEMMs (``prefill_dtype='bfloat16'``): a packed weight takes the
        measured fastest of its sparse kernel, fp32 rebuild + GEMM, bf16 rebuild + AMX GEMM and the
        fused AMX form or the bf16 walk (``kernels.prefill.choose_prefill_form``); int8 codes run the
        fused AMX form where the CPU has AMX (bitmask codes), int8 and int4 codes the bf16 walk where
        it has AVX512-BF16 (bitmask codes, or dense ones at least half zeros): both read only the codes;
        dense weights and other codes (rebuilt in fp32 by ``QuantLinear``) run their fp32 GEMM in
        oneDNN's bf16 math mode, with no bf16 copy."""
        from ..kernels.prefill import bf16_fpmath, choose_prefill_form, dense_bf16_linear, prefill_call

        if self.module is None:
            if self.qlin is None:
                return dense_bf16_linear(x, self.weight, self.bias)
            fused = self._fused_quant_form()
            if fused:  # codes on AMX or the bf16 walk: no dequantized copy at all
                return self.prefill_glued(x, fused)
            with bf16_fpmath():
                return self.qlin(x)
        m = self.module
        x2 = x.reshape(-1, self.shape[1]).contiguous()
        form = choose_prefill_form(m.packed, x2.shape[0], torch.get_num_threads(), bias=self.bias,
                                   scratch=self.scratch, isa=self.isa)
        self.prefill_forms[form] = self.prefill_forms.get(form, 0) + 1
        return prefill_call(form, m.packed, self.bias, x2, self.scratch, isa=self.isa).reshape(*x.shape[:-1], -1)

    def _fused_quant_form(self) -> Optional[str]:
        """``kernels.prefill.fused_quant_form`` of the codes held, asked once per codes (a prefill asks
        per product; the answer reads the environment and the CPU)."""
        from ..kernels.prefill import fused_quant_form

        if self._fused_q is None:
            self._fused_q = (fused_quant_form(self.qlin.packed),)
        return self._fused_q[0]

    def glue_form(self, tokens: int) -> Optional[str]:
        """The fused prefill form a product of ``tokens`` rows runs, if any, so the caller can hand
        it the neighbouring glue (:func:`_glued`): ``"amx"`` or ``"bf16walk"`` (``prefill_dtype`` bf16;
        int8 bitmask codes where the CPU has AMX, else int8 / int4 codes on the bf16 walk where it has
        AVX512-BF16; packed
        weights where the measured choice picked either) or
        ``"avx2"`` (fp32 packed weights on the AVX2 path from 16 tokens: in fp32 prefill where the
        module's measured dispatch takes the sparse kernel at this size, in bf16 prefill where the
        measured form choice picked it; the same walk either way, called with the glue) or ``"avx2q"``
        (int8 / int4 codes, dense or bitmask, on the AVX2 or AVX-512 path, at least half zeros: the
        walk over the decoded nonzeros)."""
        from ..kernels.prefill import (AVX2_PREFILL_MIN, WALK_ISAS, avx2_prefill_runs, avx2_quant_runs,
                                       choose_prefill_form)

        if self.qlin is not None and tokens >= AVX2_PREFILL_MIN and not (
                self.lean.prefill_dtype == "bfloat16" and self._fused_quant_form()):
            if self._avx2_runs is None:  # int8 / int4 codes on the walk's path, sparse enough: checked once
                self._avx2_runs = avx2_quant_runs(self.qlin, self.sparsity)
            if self._avx2_runs:
                return "avx2q"
        if self.lean.prefill_dtype != "bfloat16":
            m = self.module
            if m is None or tokens < AVX2_PREFILL_MIN or m.isa not in WALK_ISAS or not m.takes_sparse(tokens):
                return None
            if self._avx2_runs is None:  # fixed for the weight held: checked once
                self._avx2_runs = avx2_prefill_runs(m.packed, m.isa)
            return "avx2" if self._avx2_runs else None
        if tokens < PREFILL_BF16_MIN:
            return None
        if self.qlin is not None:
            return self._fused_quant_form()
        if self.module is None:
            return None
        form = choose_prefill_form(self.module.packed, tokens, torch.get_num_threads(), bias=self.bias,
                                   scratch=self.scratch, isa=self.isa)
        if form == "sparse" and self.module.isa in WALK_ISAS:  # the measured choice is the walk: with its glue
            if self._avx2_runs is None:
                self._avx2_runs = avx2_prefill_runs(self.module.packed, self.module.isa)
            return "avx2" if self._avx2_runs else None
        return form if form in ("amx", "bf16walk") else None

    def prefill_glued(self, x: torch.Tensor, form: str, **glue) -> torch.Tensor:
        """The fused prefill product ``form`` (from :meth:`glue_form`), with ``glue`` as in
        ``kernels.prefill.amx_prefill_linear``."""
        from ..kernels.prefill import (amx_prefill_linear, amx_quant_linear, avx2_prefill_run, avx2_quant_linear,
                                       bf16_walk_linear, bf16_walk_quant_linear)

        self.prefill_forms[form] = self.prefill_forms.get(form, 0) + 1
        if form == "avx2":  # glue_form checked that the walk runs this weight
            return avx2_prefill_run(self.module.packed, self.bias, x, isa=self.module.isa, **glue)
        if form == "avx2q":
            return avx2_quant_linear(self.qlin, x, **glue)
        if form == "bf16walk":
            if self.qlin is not None:
                return bf16_walk_quant_linear(self.qlin.packed, self.bias, x, **glue)
            return bf16_walk_linear(self.module.packed, self.bias, x, **glue)
        if self.qlin is not None:
            return amx_quant_linear(self.qlin.packed, self.bias, x, **glue)
        return amx_prefill_linear(self.module.packed, self.bias, x, **glue)

    def desc(self, isa: str, packed: Optional[bool] = None):
        """The C step's descriptor of the form held (``packed`` must name that form if given)."""
        from ..kernels.decode import linear_desc

        if self.qlin is not None:
            return self.qlin.desc
        if (self.decode_packed if packed is None else packed) and self.module is not None:
            return linear_desc(isa, packed=self.module.packed, bias=self.bias)
        if self.weight is None:
            raise ConfigError("this fused linear holds only its packed form (set decode_packed = False to rebuild "
                              "the dense one)")
        return linear_desc(isa, dense=self.weight, bias=self.bias)


def quant_grid(lean: LeanConfig, names: list[str], quantization=None):
    """``(scheme, scales)`` for a weight made of the params ``names`` (rows concatenated):
    ``scales`` None = round to nearest at load with the config's scheme; from a quantized checkpoint
    (``quantization``, ``sparse_runtime.quant.io.QuantizationInfo``) its scheme and every member's
    ``(scales, zeros)`` concatenated by rows. None: the checkpoint did not quantize this weight, so
    it stays fp32 (what the checkpoint holds)."""
    if quantization is None:
        return lean.scheme, None
    got = [quantization.scales_for(n) for n in names]
    if not names or any(g is None for g in got):
        return None
    zeros = None if got[0][1] is None else torch.cat([g[1].float() for g in got], 0)
    return quantization.scheme, (torch.cat([g[0].float() for g in got], 0), zeros)


def quantized_linear(w: torch.Tensor, scheme, layout: str, isa: str, bias, scratch, scales=None,
                     act: str = "float32"):
    """A :class:`~sparse_runtime.kernels.quant.QuantLinear` of fp32 ``w`` (mask ``w != 0``): codes by
    round-to-nearest, or from the checkpoint's ``scales = (scales, zeros)`` (``codes_from``, exact);
    ``act="int8[-gG]"``: its C products take int8 activations (W8A8; the scheme must be int8 per row, or
    int4 with one activation scale per token, W4A8, held dense; the ISA path one with VNNI:
    LeanLlama checks that once, before any weight is quantized)."""
    from ..kernels import native
    from ..kernels.quant import QuantLinear, quantize_packed

    if layout == "bitmask" and native.quant_isa(isa, "bitmask") == "portable" and isa != "portable":
        layout = "dense"  # no vectorised bitmask-code kernel on this path: dense codes stream faster
    if layout == "bitmask" and act != "float32" and scheme.bits == 4:
        layout = "dense"  # W4A8 runs dense int4 codes (csrc/w4a8.inc): no bitmask int4 form with int8 activations
    sc, zr = scales if scales is not None else (None, None)
    packed = quantize_packed(w, scheme, layout, scales=sc, zeros=zr)
    return QuantLinear(packed, bias, isa=isa, scratch=scratch, act=act)


@torch.inference_mode()
def choose_decode_forms(linears: list[FusedLinear], isa: str, threads: int, repeats: int = 5) -> None:
    """Set ``decode_packed`` of every sparse fused linear by measurement, per (shape, density) group.

    A group's members (e.g. the 30 q/k/v matrices of SmolLM2) are run in sequence at batch 1
    through the C step's kernels and threads, all dense then all packed, alternately (median of
    ``repeats`` rounds): each weight is read once per pass, as in a decode token, and every pass
    starts with the caches emptied (:func:`~sparse_runtime.kernels.cache.evict_caches`), as a
    token finds its weights in memory. Timing one matrix repeatedly would keep it in cache and
    favour dense on the small shapes (measured: it chose dense for q/k/v and o, which ran ~1.8x
    slower than packed inside the real step); so did timing a whole group whose dense form fits in
    the last-level cache (SmolLM2's q/k/v and o as int8 codes: 10-17 MB against a 32 MB L3 on AMD
    Zen 4, where W8A8's bitmask rows do more arithmetic than its dense rows; the 70 % model's token
    then ran 0.1-0.2 ms slower, docs/kernels.md "Measured dispatch in the streamed regime"). The
    dense forms are rebuilt for the timing only, for as many members as fit in
    ``DECODE_FORM_BUDGET`` bytes (at least one; all of them on SmolLM2), then freed. The packed form
    is kept unless dense was clearly faster (median at most ``DENSE_DECODE_MARGIN`` of packed's:
    dense is then held instead, ~3x the bytes at 70 %, so a tie or the noise of a loaded machine
    must not buy it; measured under load, the plain "not slower" rule flipped whole groups to dense).
    Quantized bitmask codes are measured the same way against dense codes of the same scheme (the
    bitmask-code kernels do more vector work per weight than the dense ones, so where a matrix is not
    memory-bound, or at 50 %, dense codes can win). Cached per (isa, layout, shape, density to 0.05,
    threads) (+ the scheme for codes)."""
    from ..kernels import decode as cdec
    from ..kernels.cache import evict_caches, release_eviction_buffer
    from ..kernels.module import densify_into

    groups: dict[tuple, list[FusedLinear]] = {}
    for f in linears:
        if f.module is not None:
            key = (isa, f.module.layout, *f.shape, round(f.module.packed.density * 20) / 20, threads)
            groups.setdefault(key, []).append(f)
        elif f.qlin is not None and f.qlin.packed.layout == "bitmask":
            p = f.qlin.packed
            key = (isa, "q-bitmask", p.bits, p.group, p.symmetric, f.qlin.act, *f.shape, round(p.density * 20) / 20,
                   threads)
            groups.setdefault(key, []).append(f)
    for key, members in groups.items():
        if key not in _DECODE_FORM:
            n, k = members[0].shape
            timed = members[:max(1, DECODE_FORM_BUDGET // max(4 * n * k, 1))]
            x, y = torch.randn(k), torch.empty(n)
            if members[0].qlin is not None:
                dense = [f.dense_codes() for f in timed]
                forms = {True: [f.desc(isa) for f in timed], False: [q.desc for q in dense]}
            else:
                dense = [densify_into(f.module.packed, torch.empty(n, k)) for f in timed]
                forms = {True: [f.desc(isa, True) for f in timed],
                         False: [cdec.linear_desc(isa, dense=d, bias=f.bias) for d, f in zip(dense, timed)]}
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(repeats + 1):  # the first round warms up
                for form, descs in forms.items():
                    evict_caches()
                    t = time.perf_counter()
                    for d in descs:
                        cdec.run_linear(d, x, y, threads)
                    times[form].append(time.perf_counter() - t)
            del forms, dense
            dense_s, packed_s = statistics.median(times[False][1:]), statistics.median(times[True][1:])
            _DECODE_FORM[key] = not dense_s <= DENSE_DECODE_MARGIN * packed_s
        for f in members:
            f.decode_packed = _DECODE_FORM[key]
    release_eviction_buffer()


def held_tensor_bytes(root: object) -> int:
    """Bytes of every distinct tensor storage reachable from ``root`` through attributes, lists,
    tuples, dicts and modules: what an engine holds (weights, caches, scratch), each storage counted
    once however many views share it. Used to check that sparse holds less than dense."""
    seen_obj: set[int] = set()
    storages: dict[tuple[int, int], int] = {}
    stack = [root]
    while stack:
        o = stack.pop()
        if id(o) in seen_obj or o is None or isinstance(o, (str, bytes, int, float, bool, type)):
            continue
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[(st.data_ptr(), st.nbytes())] = st.nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and type(o).__module__.split(".")[0] in ("sparse_runtime", "torch", "transformers"):
            stack.extend(vars(o).values())
    return sum(storages.values())


LM_BLOCK = 256  # rows of the output table per product in lm_head_blocked
_LM_FORM: dict[tuple, dict[int, bool]] = {}


def lm_head_blocked(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, w, bias)`` as products of ``LM_BLOCK`` output rows each (same arithmetic per
    element). For a few rows of x against a large table (the vocabulary projection) the GEMM
    library repacks the whole table per call; in blocks each block is packed from cache."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    for i in range(0, w.shape[0], LM_BLOCK):
        torch.mm(x, w[i:i + LM_BLOCK].t(), out=out[:, i:i + LM_BLOCK])
    if bias is not None:
        out += bias
    return out


@torch.inference_mode()
def choose_lm_head_form(w: torch.Tensor, bias: Optional[torch.Tensor], max_batch: int, threads: int,
                        repeats: int = 3) -> dict[int, bool]:
    """{batch: blocked is faster} for batches 2, 4, 8, ... up to ``max_batch``, measured (F.linear
    and :func:`lm_head_blocked` alternately, best of ``repeats``): on this project's Xeon the blocked
    form was faster from batch 4 and slower at 2 (informal), so it is measured per machine, not
    assumed. Cached per (table shape, threads)."""
    key = (*w.shape, threads, max_batch)
    if key not in _LM_FORM:
        torch.set_num_threads(threads)
        res: dict[int, bool] = {}
        b = 2
        while b <= max(2, max_batch):
            x = torch.randn(b, w.shape[1])
            best = {True: float("inf"), False: float("inf")}
            for _ in range(repeats + 1):
                for blocked in (False, True):
                    t = time.perf_counter()
                    lm_head_blocked(x, w, bias) if blocked else F.linear(x, w, bias)
                    best[blocked] = min(best[blocked], time.perf_counter() - t)
            res[b] = best[True] < best[False]
            b *= 2
        _LM_FORM[key] = res
    return _LM_FORM[key]


def _own(t: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of ``t`` that shares no storage with the source model (see LeanLlama.__init__)."""
    return t.detach().to(torch.float32, copy=True).contiguous()


def _release_linears(*linears: nn.Linear) -> None:
    """Replace the source model's linear weights by empty tensors (their storage is freed unless
    someone else holds it): the engine owns the fused copies from here on."""
    for lin in linears:
        lin.weight = nn.Parameter(lin.weight.new_empty(0), requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.new_empty(0), requires_grad=False)


def _bf16_isa(isa: str, lean: LeanConfig) -> str:
    """The ISA path that runs bf16 values here: ``isa`` when it has a bf16 kernel for its layout,
    else (AVX-512 without VBMI2) the AVX2 csr16 path, else portable; an explicit isa/layout that
    cannot is refused with the fix."""
    from ..kernels import native

    if native.supports_bf16(isa, native.select_layout(isa, lean.layout)):
        return isa
    if lean.isa is not None or lean.layout is not None:
        layout = lean.layout or native.select_layout(isa, None)
        raise ConfigError(f"the {isa} path has no bf16 kernel for layout {layout} on this CPU; leave isa/layout "
                          f"unset, or use value_dtype='float32'")
    for alt in ("avx2", "portable"):
        if native.supports_bf16(alt, native.DEFAULT_LAYOUT[alt]):
            return alt
    raise ConfigError("no bf16 sparse kernel runs on this CPU; use value_dtype='float32'")


@dataclass
class LeanLayer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear
    window: int


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _glued(lin: FusedLinear, x: torch.Tensor, *, norm: Optional[torch.Tensor] = None, eps: float = 0.0,
           silu_mul: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + lin(f(x))`` with ``f`` the RMSNorm (``norm``, ``eps``) or, with ``silu_mul``,
    ``silu(gate) * up`` of a gate|up ``x``. When ``lin`` runs a fused prefill form at this size
    (:meth:`FusedLinear.glue_form`: the AMX form, or the AVX2 walk), ``f`` happens while the kernel
    reads x and the residual add in its write of y (in place: ``residual`` must be owned by the
    caller); otherwise the same ops in torch."""
    form = lin.glue_form(x.numel() // x.shape[-1])
    if form is not None:
        if residual is not None and not residual.is_contiguous():
            residual = residual.contiguous()
        return lin.prefill_glued(x, form, norm=norm, eps=eps, silu_mul=silu_mul, residual=residual)
    if norm is not None:
        x = _rms(x, norm, eps)
    if silu_mul:
        g, u = x.chunk(2, -1)
        x = F.silu(g) * u
    y = lin(x)
    return y if residual is None else residual + y


def _attend_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: bool,
                 head_dim: int) -> torch.Tensor:
    """Prefill attention with ``prefill_dtype='bfloat16'``: q, k, v rounded to bf16 (torch's CPU flash
    attention runs its bf16 products on AMX where present; fp32 accumulation and softmax inside),
    the result widened to fp32; GQA without copying the kv heads (``enable_gqa``); and when the
    block starts the sequence (``causal``: no earlier positions, no window narrower than the block)
    the built-in causal mask, which skips the masked half of the products, instead of ``mask``."""
    bf = torch.bfloat16
    kw = {"is_causal": True} if causal else {"attn_mask": mask}
    return F.scaled_dot_product_attention(q.to(bf), k.to(bf), v.to(bf), scale=head_dim ** -0.5, enable_gqa=True,
                                          **kw).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


class LeanLlama:
    """The lean model: weights read from a loaded HF ``*ForCausalLM`` (shared where unchanged),
    one sequence of ``batch`` rows, KV cache ``[layers, batch, kv_heads, capacity, head_dim]``.

    No reference to the HF model's linears is kept (the fused weights are new tensors), so the
    caller can drop the model; ``release_source=True`` also empties each block's linears as soon as
    that block is built, so the dense model and the built engine never coexist whole (the peak is
    the source model plus one block). ``streamed`` (a
    :class:`~sparse_runtime.models.streaming.StreamedModel`; ``model`` is then ignored): the model is
    read from its safetensors shards one block at a time, so the peak is the engine plus ONE block in
    the compute dtype: how a model larger than memory in its dense form is loaded."""

    def __init__(self, model: Optional[nn.Module], config: Optional[LeanConfig] = None,
                 threads: Optional[int] = None, release_source: bool = False, streamed=None, quantization=None):
        self.config = lean = config or LeanConfig()
        if streamed is not None:
            model = streamed.model
        check_supported(model, "float32" if lean.quantized else lean.value_dtype, skeleton=streamed is not None)
        if lean.quantized and quantization is not None and quantization.scheme.bits != QUANT_DTYPES[lean.value_dtype]:
            raise ConfigError(f"this checkpoint is quantized {quantization.scheme.name}; run it with value dtype "
                              f"int{quantization.scheme.bits} (its own codes and scales) or float32")
        quantization = quantization if lean.quantized else None
        cfg = model.config
        self.threads = int(threads or torch.get_num_threads())
        from ..kernels import native
        from ..kernels.module import DenseScratch

        self.isa = native.select_isa(lean.isa) if native.available() else None
        if lean.sparse and self.isa is None:
            raise ConfigError(native.unavailable_reason() or "sparse kernels unavailable")
        if lean.act_dtype != "float32" and self.isa not in (None, "portable") and \
                native.w8a8_isa(self.isa, "dense") == "portable":  # before any weight is quantized
            raise ConfigError(W8A8_NO_VNNI)
        self.value_dtype = lean.value_dtype
        self.prefill_bf16 = lean.prefill_dtype == "bfloat16"  # attention in bf16 too (_attend_bf16)
        dtype = VALUE_DTYPES.get(lean.value_dtype, torch.float32)
        if lean.sparse and dtype == torch.bfloat16:
            self.isa = _bf16_isa(self.isa, lean)
        self.scratch = DenseScratch()  # one rebuilt weight at a time, for every packed fused linear
        inner = model.model
        attn0 = inner.layers[0].self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn0, "head_dim", cfg.hidden_size // self.n_heads))
        self.hidden = int(cfg.hidden_size)
        self.inter = int(cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self.vocab = int(model.lm_head.out_features)
        # Every kept tensor is COPIED, not shared with the HF model: a view into a memory-mapped
        # safetensors file keeps the whole mapping alive, and every page the build touched resident.
        if streamed is not None:
            streamed.load_embed()
            streamed.load_head()
        emb, head = inner.embed_tokens.weight.detach(), model.lm_head.weight.detach()
        tied = head.data_ptr() == emb.data_ptr() and head.shape == emb.shape
        self.final_norm = _own(inner.norm.weight)
        self.lm_bias = None if model.lm_head.bias is None else _own(model.lm_head.bias)
        self.lm_q = None  # int8/int4 lm_head: its codes (QuantLinear); a tied embedding reads its rows
        self._lm_c = None  # the fp32 table's C descriptor, for one-row products (built on first use)
        grid = None
        if lean.quantized and not lean.lm_head_fp32 and self.isa is not None:
            grid = quant_grid(lean, ["lm_head.weight"], quantization)
            if grid is None and tied and quantization is not None:
                grid = quant_grid(lean, ["model.embed_tokens.weight"], quantization)
        if grid is not None:
            self.lm_q = quantized_linear(head.float(), grid[0], "dense", self.isa, self.lm_bias, self.scratch, grid[1],
                                         lean.act_dtype)
            self.lm_head = None
            self.embed = None if tied else emb.to(dtype, copy=True).contiguous()
        else:
            self.embed = emb.to(dtype, copy=True).contiguous()
            self.lm_head = self.embed if tied else head.to(dtype, copy=True).contiguous()  # tied: the same tensor
        del emb, head  # views of the source's tensors: held past here they would double the table's memory
        if streamed is not None:
            streamed.release_head()
            streamed.release_embed()
        self._rotary = inner.rotary_emb
        window = FAMILIES[cfg.model_type]
        names = {id(mod): n for n, mod in model.named_modules()}
        self.layers: list[LeanLayer] = []
        sc = self.scratch
        def fused(lins: list[nn.Linear]) -> FusedLinear:
            # the source linears go as soon as their fused form exists: a block's peak is its
            # unfused rest plus one fused group, not the whole block twice
            f = FusedLinear(lins, lean, self.isa, sc, [f"{names.get(id(l), '?')}.weight" for l in lins], quantization)
            if streamed is not None:
                for lin in lins:
                    lin.to("meta")
            elif release_source:
                _release_linears(*lins)
            return f

        for i, blk in enumerate(inner.layers):
            if streamed is not None:
                streamed.load_block(i)  # fills this skeleton block in place (the compute dtype)
            a, m = blk.self_attn, blk.mlp
            self.layers.append(LeanLayer(
                _own(blk.input_layernorm.weight), _own(blk.post_attention_layernorm.weight),
                fused([a.q_proj, a.k_proj, a.v_proj]), fused([a.o_proj]), fused([m.gate_proj, m.up_proj]),
                fused([m.down_proj]), window(cfg, i)))
            if streamed is not None:
                streamed.release_block(i)
        if release_source:
            gc.collect()
        q_rows = self.layers[0].qkv.shape[0]
        if q_rows != (self.n_heads + 2 * self.n_kv) * self.head_dim:
            raise ConfigError(f"unexpected q/k/v sizes ({q_rows} rows for {self.n_heads} heads, {self.n_kv} kv heads "
                              f"of {self.head_dim}); use torch-sparse")
        if lean.calibrate and self.isa is not None and self.c_step_supported:
            from ..kernels import decode as cdec

            if cdec.available():
                choose_decode_forms(self.linears(), self.isa, self.threads)
        self.batch = 1
        self.length = 0
        self.cap = 0
        self.kv_dtype = KV_DTYPES[lean.kv_dtype]  # the caches' element type (the C step reads it from kv_f16)
        self.kv_f16 = int(self.kv_dtype == torch.float16)
        self._step = None
        self.c_steps = 0  # decode tokens run by the C step (each runs every fused linear once)
        self._grow(max(16, int(lean.initial_cache)), batch=1)

    @property
    def c_step_supported(self) -> bool:
        """The C decode step reads fp32 weights and int8/int4 codes; bf16 models decode on the torch path."""
        return self.value_dtype == "float32" or self.value_dtype in QUANT_DTYPES

    def held_bytes(self) -> int:
        """Bytes of every tensor this model holds (weights, KV cache, scratch; see held_tensor_bytes)."""
        return held_tensor_bytes(self)

    def _lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The vocabulary projection of fp32 hidden states (bf16 table: a bf16 GEMM, fp32 logits). One
        row of an fp32 table (a prompt's last position, what generation asks for) runs the decode
        step's C matrix-vector kernel: on SmolLM2's 49152 x 576 table 5.3 ms against 10.2 for
        F.linear (AMD Zen 4, 2 threads), the same kernel the decode steps' logits come from."""
        from ..kernels import decode as cdec

        if self.lm_q is not None:
            return self.lm_q(x)
        if self.lm_head.dtype == x.dtype:
            if x.numel() == self.hidden and x.dtype == torch.float32 and self._lm_c_ok():
                y = torch.empty(*x.shape[:-1], self.vocab)
                cdec.run_linear(self._lm_c, x.reshape(-1).contiguous(), y.view(-1), self.threads)
                return y
            return F.linear(x, self.lm_head, self.lm_bias)
        y = F.linear(x.to(self.lm_head.dtype), self.lm_head).float()
        return y if self.lm_bias is None else y + self.lm_bias

    def _lm_c_ok(self) -> bool:
        """Whether the fp32 table's one-row product runs in C (the descriptor built once)."""
        from ..kernels import decode as cdec

        if self._lm_c is None:
            if self.isa is None or not cdec.available():
                return False
            self._lm_c = self._lm_desc()
        return True

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``ids`` (fp32): the table, or rows dequantized from the quantized tied lm_head."""
        if self.embed is None:
            return self.lm_q.rows(ids)
        return F.embedding(ids, self.embed).float()  # a no-op for fp32 tables

    def _lm_desc(self):
        """The C descriptor of the lm_head (dense fp32 table or its codes)."""
        from ..kernels import decode as cdec

        if self.lm_q is not None:
            return self.lm_q.desc
        return cdec.linear_desc(self.isa, dense=self.lm_head, bias=self.lm_bias)

    def _embed_ptr(self) -> Optional[int]:
        return None if self.embed is None else self.embed.data_ptr()

    # -- summary --------------------------------------------------------------------------------
    def linears(self) -> list[FusedLinear]:
        return [f for l in self.layers for f in (l.qkv, l.o, l.gate_up, l.down)]

    def summary(self) -> str:
        lin = self.linears()
        sp = sum(f.module is not None or (f.qlin is not None and f.decode_packed) for f in lin)
        th = sorted({f.module.batch_threshold for f in lin if f.module is not None})
        rng = sorted({r for f in lin if f.module is not None for r in f.module.sparse_ranges})
        dec = sum(f.decode_packed for f in lin)
        vals = self.value_dtype
        if self.config.quantized:
            q = next((f.qlin for f in lin if f.qlin is not None), self.lm_q)
            vals = (f"{self._scheme_name(q)} codes, lm_head {'codes' if self.lm_q else 'fp32'}"
                    if q is not None else f"{vals} requested, no weight quantized")
            if q is not None and q.act != "float32":
                per = "token" if q.act == "int8" else f"{q.act.split('-g')[1]} columns of each token"
                vals += (f", int8 activations per {per} in decode products "
                         f"({'W4A8' if q.packed.bits == 4 else 'W8A8'}, {q.run_isa})")
        if self.kv_f16:
            vals += ", fp16 K/V cache"
        return (f"lean {'sparse' if self.config.sparse else 'dense'} ({vals}): {len(self.layers)} layers, "
                f"{sp}/{len(lin)} fused linears sparse (decode step: {dec} packed; prefill thresholds {th}, "
                f"also sparse at {rng}), isa {self.isa}, "
                f"C decode step {'on' if self._step is not None else 'off'}")

    @staticmethod
    def _scheme_name(q) -> str:
        p = q.packed
        return f"int{p.bits}" + (f"-g{p.group}" if p.group else "") + ("" if p.symmetric else "-asym")

    def call_counts(self) -> dict[str, int]:
        """This model's own evidence (the C library's counters are process-wide), in the keys of
        :func:`sparse_runtime.kernels.call_counts`: ``modules`` = sparse fused linears,
        ``sparse_calls`` = sparse products run (C decode steps x sparse fused linears + torch-path
        sparse calls), ``dense_calls`` = their dense products (prefill outside the measured
        dispatch); plus ``c_decode_steps``."""
        mods = [f.module for f in self.linears() if f.module is not None]
        packed = sum(f.decode_packed for f in self.linears())
        return {"modules": len(mods), "sparse_calls": self.c_steps * packed + sum(m.sparse_calls for m in mods),
                "dense_calls": sum(m.dense_calls for m in mods), "c_decode_steps": self.c_steps}

    # -- cache ----------------------------------------------------------------------------------
    def _grow(self, need: int, batch: int) -> None:
        """Make room for ``need`` positions for ``batch`` rows (capacity doubles; contents kept)."""
        cap = self.cap
        if need <= cap and batch == self.batch:
            return
        while cap < need:
            cap = max(16, cap * 2)
        shape = (len(self.layers), batch, self.n_kv, cap, self.head_dim)
        k, v = torch.zeros(shape, dtype=self.kv_dtype), torch.zeros(shape, dtype=self.kv_dtype)
        if batch == self.batch and self.cap:
            k[..., :self.length, :] = self.k[..., :self.length, :]
            v[..., :self.length, :] = self.v[..., :self.length, :]
        self.k, self.v, self.cap, self.batch = k, v, cap, batch
        pos = torch.arange(cap).unsqueeze(0)
        with torch.no_grad():  # an fp32 probe: the rotary tables take x's dtype
            cos, sin = self._rotary(torch.zeros(1, 1, self.hidden), pos)
        if cos.shape[-1] != self.head_dim:
            raise ConfigError(f"rotary size {cos.shape[-1]} != head_dim {self.head_dim}; use torch-sparse")
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self._build_step()

    def _build_step(self) -> None:
        """(Re)describe the model to the C step (after every cache reallocation)."""
        from ..kernels import decode as cdec

        self._step = None
        if self.isa is None or not cdec.available() or self.batch != 1 or not self.c_step_supported:
            return
        arr = (cdec.CLayer * len(self.layers))()
        for i, l in enumerate(self.layers):
            arr[i] = cdec.CLayer(l.in_norm.data_ptr(), l.post_norm.data_ptr(), l.qkv.desc(self.isa), l.o.desc(self.isa),
                                 l.gate_up.desc(self.isa), l.down.desc(self.isa), self.k[i, 0].data_ptr(),
                                 self.v[i, 0].data_ptr(), l.window)
        self._c_layers = arr
        lm = self._lm_desc()
        model = cdec.CModel(len(self.layers), self.hidden, self.inter, self.n_heads, self.n_kv, self.head_dim,
                            self.vocab, self.cap, self.eps, self.kv_f16, self._embed_ptr(), self.final_norm.data_ptr(),
                            lm, ctypes.addressof(arr), None)
        self._scratch = torch.zeros(cdec.scratch_floats(model))
        model.scratch = self._scratch.data_ptr()
        self._c_model = model
        self._logits = torch.empty(self.vocab)
        self._step = cdec.DecodeStep(model)

    # -- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` for ``ids`` ``[B, T]`` appended at the current position (the torch
        path: prefill, and decode with batch > 1)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 2:
            raise ConfigError(f"ids must be [batch, tokens], got shape {tuple(ids.shape)}")
        B, T = ids.shape
        if self.length and B != self.batch:
            raise ConfigError(f"the sequence holds {self.batch} rows; got {B} (call reset() to start a new one)")
        p0 = self.length
        self._grow(p0 + T, B)
        x = self._causal_layers(ids, p0, self.cos, self.sin, self.k, self.v)
        self.length = p0 + T
        if last_only:  # what generation needs: the vocabulary projection of the last position only
            x = x[:, -1:]
        return self._lm_logits(_rms(x, self.final_norm, self.eps))

    def _causal_layers(self, ids: torch.Tensor, p0: int, cos_table: torch.Tensor, sin_table: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """The decoder layers over ``ids`` [B, T] appended at position ``p0`` of caches
        ``[layers, B, KV, capacity, D]`` (the sequence cache, or one slot's view of the serving
        cache): causal (and sliding-window) attention over everything cached so far. Returns the
        hidden states [B, T, hidden] before the final norm."""
        B, T = ids.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        x = self._embed(ids)
        cos, sin = cos_table[p0:p0 + T], sin_table[p0:p0 + T]
        qpos = torch.arange(p0, p0 + T).unsqueeze(1)
        kpos = torch.arange(p0 + T).unsqueeze(0)
        causal = kpos <= qpos
        masks: dict[int, torch.Tensor] = {}
        # Each product that runs a fused prefill form (AMX, the bf16 walk, or the AVX2 walk) takes its
        # RMSNorm / SiLU-mul input and residual add inside the kernel (_glued)
        from ..kernels.prefill import (amx_available, bf16_arithmetic, prefill_attention, prefill_attention_available,
                                       rope_rows_, rope_rows_available)
        # prompts of several tokens rotate q and k in one C call (the same products and rounding as
        # _rotate, ~15 torch ops fewer per layer); single-token steps keep the torch ops
        rope_c = T > 1 and rope_rows_available()
        # a block that starts the sequence with no window narrower than itself attends causally from
        # position 0: in fp32, one C call reading q, k, v from the qkv product (AVX2; head_dim a
        # multiple of 16), else torch's built-in causal mask (flash attention skips the masked half)
        # and GQA without copying the kv heads
        starts = p0 == 0 and T > 1
        attend_c = (starts and rope_c and D % 16 == 0 and prefill_attention_available()
                    and self.isa in ("avx2", "avx512"))  # the engine's kernel path (a forced portable one: SDPA)
        # prefill_dtype bf16: attention in bf16 where the CPU multiplies bf16 (elsewhere torch emulates
        # it, slower than fp32); without AMX the C fp32 attention is faster still where it runs
        # (AMD Zen 4: 0.56 ms a layer for bf16 SDPA and its conversions; docs/kernels.md)
        attend_bf16 = (self.prefill_bf16 and B * T >= PREFILL_BF16_MIN and bf16_arithmetic()
                       and not (attend_c and not amx_available()))
        attend_c = attend_c and not attend_bf16
        # an fp16 cache (kv_dtype float16): K and V are rounded to fp16 before anything reads them, so
        # the prompt's own attention sees the values later tokens will read from the cache
        f16 = k_cache.dtype == torch.float16
        cached = (lambda t: t.float()) if f16 else (lambda t: t)
        for i, l in enumerate(self.layers):
            if l.window not in masks:
                masks[l.window] = causal & (kpos > qpos - l.window) if l.window > 0 else causal
            qkv = _glued(l.qkv, x, norm=l.in_norm, eps=self.eps)
            whole = l.window <= 0 or l.window >= T  # no window narrower than the block
            if rope_c:  # q and k rotated in place, one C call
                qkv = rope_rows_(qkv.contiguous(), cos, sin, H + KV, D)
                if f16:  # k and v in place (the views below and the C attention read qkv)
                    qkv[..., H * D:] = qkv[..., H * D:].half()
                q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
                q, k = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, KV, D).transpose(1, 2)
            else:
                q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
                q = _rotate(q.view(B, T, H, D).transpose(1, 2), cos, sin)
                k = _rotate(k.view(B, T, KV, D).transpose(1, 2), cos, sin)
                if f16:
                    k, v = k.half().float(), v.half().float()
            k_cache[i, :, :, p0:p0 + T] = k
            v_cache[i, :, :, p0:p0 + T] = v.view(B, T, KV, D).transpose(1, 2)
            if attend_c and whole:  # [B, T, H * D] straight from qkv: no transposes
                a = prefill_attention(qkv, H, KV, D)
            else:
                if attend_bf16:
                    a = _attend_bf16(q, k_cache[i, :, :, :p0 + T], v_cache[i, :, :, :p0 + T], masks[l.window],
                                     p0 == 0 and whole, D)
                elif starts and whole:
                    a = F.scaled_dot_product_attention(q, cached(k_cache[i, :, :, :T]), cached(v_cache[i, :, :, :T]),
                                                       is_causal=True, scale=D ** -0.5, enable_gqa=True)
                else:
                    kk = cached(k_cache[i, :, :, :p0 + T]).repeat_interleave(H // KV, dim=1)
                    vv = cached(v_cache[i, :, :, :p0 + T]).repeat_interleave(H // KV, dim=1)
                    a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=masks[l.window], scale=D ** -0.5)
                a = a.transpose(1, 2).reshape(B, T, H * D)
            x = _glued(l.o, a, residual=x)
            gu = _glued(l.gate_up, x, norm=l.post_norm, eps=self.eps)
            x = _glued(l.down, gu, silu_mul=True, residual=x)
        return x

    def reset(self) -> None:
        self.length = 0

    def prefill(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Start a new sequence with ``ids`` [B, T]: logits ``[B, T, V]``, or ``[B, 1, V]`` of the last
        position with ``last_only`` (generation's need: on SmolLM2 the lm_head over 128 positions is
        about a fifth of a 128-token prefill's arithmetic)."""
        self.reset()
        return self.forward(ids, last_only=last_only)

    def decode_token(self, token: int) -> torch.Tensor:
        """One batch-1 step in C: logits ``[V]`` (a buffer reused by the next step: copy to keep)."""
        if self.batch != 1 or self.length == 0:
            raise ConfigError("decode_token needs a batch-1 sequence started by prefill")
        self._grow(self.length + 1, 1)
        if self._step is None:
            return self.forward(torch.tensor([[token]]))[0, -1]
        pos = self.length
        row = self.head_dim * 4 * pos
        self._step(int(token), pos, self.cos.data_ptr() + row, self.sin.data_ptr() + row, self._logits.data_ptr(),
                   self.threads)
        self.length = pos + 1
        self.c_steps += 1
        return self._logits

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, V]`` for one new token per row (C step at batch 1, torch otherwise)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.shape[0] == 1 and ids.shape[1] == 1 and self._step is not None:
            return self.decode_token(int(ids[0, 0])).clone().view(1, 1, -1)
        return self.forward(ids)

    def generate(self, prompt_ids, max_new_tokens: int = 32, eos_token_id: Optional[int] = None) -> Iterator[int]:
        """Greedy tokens, batch 1."""
        logits = self.prefill(torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1), last_only=True)[0, -1]
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            yield tok
            if eos_token_id is not None and tok == eos_token_id:
                return
            logits = self.decode_token(tok)

    # -- slots: many sequences served at once (sparse_runtime.serve) ------------------------------
    # A separate, preallocated cache ``[layers, n_slots, kv_heads, capacity, head_dim]``: slot s holds
    # one sequence of ``slot_len[s]`` tokens. The single-sequence cache above is untouched, so
    # prefill/decode/generate behave exactly as before. One decode step of B slots is ONE C call
    # (``sr_decode_step_batch``: every weight read once for the B rows, attention per sequence over its
    # own length), or without the C library one batched torch forward; a step of one slot runs the
    # batch-1 C step on that slot's cache, the same arithmetic as ``generate``.
    def init_slots(self, n_slots: int, capacity: int) -> None:
        """Allocate the serving cache (zeros) and the rotary table for ``capacity`` positions."""
        if n_slots < 1 or capacity < 2:
            raise ConfigError(f"need at least 1 slot of 2 positions (got {n_slots} x {capacity})")
        shape = (len(self.layers), int(n_slots), self.n_kv, int(capacity), self.head_dim)
        self.slot_k, self.slot_v = torch.zeros(shape, dtype=self.kv_dtype), torch.zeros(shape, dtype=self.kv_dtype)
        self.slot_len = [0] * int(n_slots)
        self.slot_cap = int(capacity)
        with torch.no_grad():
            cos, sin = self._rotary(torch.zeros(1, 1, self.hidden), torch.arange(self.slot_cap).unsqueeze(0))
        self.slot_cos, self.slot_sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self._slot_c: dict[int, tuple] = {}
        self._slot_scratch: Optional[torch.Tensor] = None
        self._slot_batch: Optional[tuple] = None
        self.slot_batch_c = True  # B > 1 steps in C (sr_decode_step_batch); False: the torch path
        self._lm_chunked: dict[int, bool] = {}
        if self.config.calibrate and self.lm_head is not None:
            self._lm_chunked = choose_lm_head_form(self.lm_head, self.lm_bias, int(n_slots), self.threads)

    def _slot_lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the batched step: F.linear, or in row blocks where that was measured
        faster for this batch (see :func:`choose_lm_head_form`); int8/int4: the codes' product."""
        if self.lm_head is None or self.lm_head.dtype != x.dtype:
            return self._lm_logits(x)
        tried = [b for b in self._lm_chunked if b <= x.shape[0]]
        if tried and self._lm_chunked[max(tried)]:
            return lm_head_blocked(x, self.lm_head, self.lm_bias)
        return F.linear(x, self.lm_head, self.lm_bias)

    def slot_bytes(self) -> int:
        """Bytes held by the serving cache (K and V)."""
        return 2 * self.slot_k.numel() * self.slot_k.element_size() if hasattr(self, "slot_k") else 0

    def free_slot(self, slot: int) -> None:
        """Forget slot ``slot``'s sequence (its cache rows are overwritten by the next one)."""
        self.slot_len[slot] = 0

    def _slot_step(self, slot: int):
        """The C decode step bound to slot ``slot``'s cache rows (built once per slot), or None."""
        from ..kernels import decode as cdec

        if self.isa is None or not cdec.available():
            return None
        if slot not in self._slot_c:
            arr = (cdec.CLayer * len(self.layers))()
            for i, l in enumerate(self.layers):
                arr[i] = cdec.CLayer(l.in_norm.data_ptr(), l.post_norm.data_ptr(), l.qkv.desc(self.isa),
                                     l.o.desc(self.isa), l.gate_up.desc(self.isa), l.down.desc(self.isa),
                                     self.slot_k[i, slot].data_ptr(), self.slot_v[i, slot].data_ptr(), l.window)
            lm = self._lm_desc()
            model = cdec.CModel(len(self.layers), self.hidden, self.inter, self.n_heads, self.n_kv, self.head_dim,
                                self.vocab, self.slot_cap, self.eps, self.kv_f16, self._embed_ptr(),
                                self.final_norm.data_ptr(), lm, ctypes.addressof(arr), None)
            if self._slot_scratch is None:  # one scratch for every slot: steps run one at a time
                self._slot_scratch = torch.zeros(cdec.scratch_floats(model))
                self._slot_logits = torch.empty(self.vocab)
            model.scratch = self._slot_scratch.data_ptr()
            self._slot_c[slot] = (arr, model, cdec.DecodeStep(model))
        return self._slot_c[slot][2]

    def _slot_batch_step(self):
        """The batched C step over the serving cache (built once), or None (no C library, bf16
        values, or ``slot_batch_c`` off). Each fused linear is described in the form it holds."""
        from ..kernels import decode as cdec

        if (self.isa is None or not self.slot_batch_c or not getattr(self, "c_step_supported", True)
                or not cdec.batch_available()):
            return None
        forms = tuple(f.module is not None for f in self.linears())  # rebuilt if a form was switched since
        if self._slot_batch is None or self._slot_batch[0] != forms:
            arr = (cdec.CLayer * len(self.layers))()
            for i, l in enumerate(self.layers):  # cache pointers unused: the call passes the whole slot cache
                arr[i] = cdec.CLayer(l.in_norm.data_ptr(), l.post_norm.data_ptr(), l.qkv.desc(self.isa),
                                     l.o.desc(self.isa), l.gate_up.desc(self.isa), l.down.desc(self.isa), None,
                                     None, l.window)
            lm = self._lm_desc()
            model = cdec.CModel(len(self.layers), self.hidden, self.inter, self.n_heads, self.n_kv, self.head_dim,
                                self.vocab, self.slot_cap, self.eps, self.kv_f16, self._embed_ptr(),
                                self.final_norm.data_ptr(), lm, ctypes.addressof(arr), None)
            from ..kernels.prefill import amx_available  # SPARSE_RUNTIME_AMX=0 turns it off here too

            step = cdec.DecodeStepBatch(model, self.slot_k, self.slot_v, self.slot_cos, self.slot_sin,
                                        bf16=self.config.batch_dtype == "bfloat16" and amx_available())
            self._slot_batch = (forms, arr, model, step)
        return self._slot_batch[3]

    def _check_room(self, slot: int, tokens: int) -> int:
        p0 = self.slot_len[slot]
        if p0 + tokens > self.slot_cap:
            raise ConfigError(f"slot {slot} holds {p0} tokens; {tokens} more exceed its capacity {self.slot_cap}")
        return p0

    @torch.inference_mode()
    def prefill_slot(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (one chunk of a prompt, [T]) to slot ``slot``; logits ``[V]`` of its last
        token. Chunks of one prompt may be fed in turn (chunked prefill): the causal mask is offset
        by what the slot already holds. The same torch ops as :meth:`forward` at batch 1."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        T = ids.shape[1]
        p0 = self._check_room(slot, T)
        x = self._causal_layers(ids, p0, self.slot_cos, self.slot_sin, self.slot_k[:, slot:slot + 1],
                                self.slot_v[:, slot:slot + 1])
        self.slot_len[slot] = p0 + T
        return self._lm_logits(_rms(x[0, -1:], self.final_norm, self.eps))[0]

    @torch.inference_mode()
    def decode_slots(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One new token for each of ``slots`` (sequences of different lengths); logits ``[B, V]``.

        B = 1 runs the C step on that slot's cache. B > 1 (distinct slots) runs the batched C step
        (``sr_decode_step_batch``: the whole step in one call, each linear's weights read once for the B
        rows) when the library has it and ``slot_batch_c`` is set. Otherwise ONE batched torch forward:
        every fused linear takes B rows (so ``SparseLinear`` dispatches by its measured batch-B choice), the new K/V go to
        each slot's own position, and attention runs as one batched product over the slot range
        ``min(slots)..max(slots)`` with a per-row length mask: q of a kv-head group is ``[G, D]`` against
        that head's ``[L, D]`` cache, so the cache is read in place (no gather, no GQA repeat)."""
        B = len(slots)
        pos = [self._check_room(s, 1) for s in slots]
        if B == 1:
            step = self._slot_step(slots[0])
            if step is not None:
                p = pos[0]
                row = self.head_dim * 4 * p
                step(int(tokens[0]), p, self.slot_cos.data_ptr() + row, self.slot_sin.data_ptr() + row,
                     self._slot_logits.data_ptr(), self.threads)
                self.slot_len[slots[0]] = p + 1
                self.c_steps += 1
                return self._slot_logits.clone().view(1, -1)
        elif len(set(slots)) == B:
            bstep = self._slot_batch_step()
            if bstep is not None:
                out = torch.empty(B, self.vocab)
                bstep([int(t) for t in tokens], [int(s_) for s_ in slots], pos, out, self.threads)
                for s_, p in zip(slots, pos):
                    self.slot_len[s_] = p + 1
                self.c_steps += 1
                return out
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        lo, hi = min(slots), max(slots) + 1
        R = hi - lo
        slot_t = torch.tensor(slots)
        pos_t = torch.tensor(pos)
        rows = slot_t - lo
        dense_rows = R == B and bool((rows == torch.arange(B)).all())
        L = max(pos) + 1
        x = self._embed(torch.as_tensor(tokens, dtype=torch.long))  # [B, hidden]
        cos, sin = self.slot_cos[pos_t].unsqueeze(1), self.slot_sin[pos_t].unsqueeze(1)  # [B, 1, D]
        lens = torch.ones(R, dtype=torch.long)  # rows of idle slots in the range attend to position 0 only
        lens[rows] = pos_t + 1
        kpos = torch.arange(L).unsqueeze(0)
        valid = kpos < lens.unsqueeze(1)
        cap = self.slot_cap  # cache row of (slot, kv head, position) in a layer's [slots * KV * cap, D] view
        rows_kv = ((slot_t.unsqueeze(1) * KV + torch.arange(KV).unsqueeze(0)) * cap + pos_t.unsqueeze(1)).reshape(-1)
        masks: dict[int, torch.Tensor] = {}
        for i, l in enumerate(self.layers):
            if l.window not in masks:
                m = valid & (kpos > lens.unsqueeze(1) - 1 - l.window) if l.window > 0 else valid
                masks[l.window] = torch.zeros(R, L).masked_fill_(~m, float("-inf")).view(R, 1, 1, L)
            h = F.rms_norm(x, (self.hidden,), l.in_norm, self.eps)
            q, k, v = l.qkv(h).split([H * D, KV * D, KV * D], -1)
            q = _rotate(q.view(B, H, D), cos, sin)
            k = _rotate(k.view(B, KV, D), cos, sin)
            kv_t = self.slot_k.dtype  # an fp16 cache: K and V rounded as they are stored
            self.slot_k[i].view(-1, D).index_copy_(0, rows_kv, k.reshape(B * KV, D).to(kv_t))
            self.slot_v[i].view(-1, D).index_copy_(0, rows_kv, v.reshape(B * KV, D).to(kv_t))
            if not dense_rows:
                qf = q.new_zeros(R, H, D)
                qf[rows] = q
                q = qf
            kk = self.slot_k[i, lo:hi, :, :L].float()  # [R, KV, L, D]: a view (fp32 cache) or a copy (fp16)
            vv = self.slot_v[i, lo:hi, :, :L].float()
            # the G query heads of a kv head are G "positions" of one query against its cache
            a = F.scaled_dot_product_attention(q.view(R, KV, G, D), kk, vv, attn_mask=masks[l.window],
                                               scale=D ** -0.5).reshape(R, H * D)
            if not dense_rows:
                a = a[rows]
            x = x + l.o(a)
            g, u = l.gate_up(F.rms_norm(x, (self.hidden,), l.post_norm, self.eps)).split([self.inter, self.inter], -1)
            x = x + l.down(F.silu(g) * u)
        for s_, p in zip(slots, pos):
            self.slot_len[s_] = p + 1
        return self._slot_lm_head(F.rms_norm(x, (self.hidden,), self.final_norm, self.eps))
