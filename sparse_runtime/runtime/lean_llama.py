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
- prefill (and decode with batch > 1) runs a short torch forward on the same fused weights, each
  fused linear dispatching sparse/dense by its measured batch threshold (``SparseLinear``).

``sparse=False`` gives the dense variant of the same path (dense fused weights, a dense AVX-512/AVX2
matrix-vector kernel in the C step, F.linear in prefill), so dense and sparse are compared on equal
glue. Logits equal HF's within fp32 tolerance (tests/test_lean_decode.py).

Refused with a clear error (use ``torch-cpu``/``torch-sparse`` for these): other families, Qwen3's
q/k norms, non-SiLU MLPs, rope types whose frequencies depend on the sequence length
(``dynamic``, ``longrope``), partial rotary, non-fp32 weights, and models off the CPU.
"""
from __future__ import annotations

import ctypes
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
    KV slots allocated first (doubled when full)."""

    sparse: bool = True
    min_sparsity: float = 0.3
    isa: Optional[str] = None
    layout: Optional[str] = None
    calibrate: bool = True
    batch_threshold: int = 1
    initial_cache: int = 256


def check_supported(model: nn.Module) -> None:
    """Raise ConfigError naming why ``model`` cannot run on the lean path."""
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
    for name, p in model.named_parameters():
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ConfigError(f"the lean path runs float32 CPU weights; {name} is {p.dtype} on {p.device} "
                              f"(load the model with dtype float32)")


class FusedLinear:
    """One fused linear (q|k|v, gate|up, or a single one): the dense fused weight for large batches
    and, when sparse, a :class:`~sparse_runtime.kernels.SparseLinear` holding the packed layout
    (its forward dispatches by the measured batch threshold)."""

    def __init__(self, linears: list[nn.Linear], lean: LeanConfig, isa: Optional[str]):
        w = torch.cat([l.weight.detach() for l in linears], 0).contiguous()
        biases = [l.bias for l in linears]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else torch.zeros(l.out_features)
                                   for b, l in zip(biases, linears)]).float().contiguous()
        self.weight = w
        self.sparsity = float((w == 0).float().mean())
        self.module = None
        self.decode_packed = False  # whether the C decode step reads the packed form (set below / measured)
        if lean.sparse and isa is not None and self.sparsity >= lean.min_sparsity:
            from ..kernels import SparseLinear, apply_dispatch, pack, select_layout

            # the fused dense weight is kept for products above the measured dispatch (prefill)
            self.module = SparseLinear(pack(w, select_layout(isa, lean.layout)), self.bias, isa=isa, dense_weight=w,
                                       batch_threshold=lean.batch_threshold)
            self.decode_packed = True
            if lean.calibrate:
                apply_dispatch(self.module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        return F.linear(x, self.weight, self.bias)

    def desc(self, isa: str, packed: Optional[bool] = None):
        """The C step's descriptor: the packed form when ``packed`` (default: ``decode_packed``)."""
        from ..kernels.decode import linear_desc

        if (self.decode_packed if packed is None else packed) and self.module is not None:
            return linear_desc(isa, packed=self.module.packed, bias=self.bias)
        return linear_desc(isa, dense=self.weight, bias=self.bias)


@torch.inference_mode()
def choose_decode_forms(linears: list[FusedLinear], isa: str, threads: int, repeats: int = 5) -> None:
    """Set ``decode_packed`` of every sparse fused linear by measurement, per (shape, density) group.

    A group's members (e.g. the 30 q/k/v matrices of SmolLM2) are run in sequence at batch 1
    through the C step's kernels and threads, all dense then all packed, alternately (median of
    ``repeats`` rounds): each weight is read once per round, as in a decode token. Timing one
    matrix repeatedly instead would keep it in cache and favour dense on the small shapes (measured:
    it chose dense for q/k/v and o, which ran ~1.8x slower than packed inside the real step). The
    packed form is kept where it was not slower. Cached per (isa, layout, shape, density to 0.05,
    threads)."""
    from ..kernels import decode as cdec

    groups: dict[tuple, list[FusedLinear]] = {}
    for f in linears:
        if f.module is not None:
            key = (isa, f.module.layout, *f.weight.shape, round(f.module.packed.density * 20) / 20, threads)
            groups.setdefault(key, []).append(f)
    for key, members in groups.items():
        if key not in _DECODE_FORM:
            n, k = members[0].weight.shape
            x, y = torch.randn(k), torch.empty(n)
            forms = {form: [f.desc(isa, form) for f in members] for form in (True, False)}
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(repeats + 1):  # the first round warms up
                for form, descs in forms.items():
                    t = time.perf_counter()
                    for d in descs:
                        cdec.run_linear(d, x, y, threads)
                    times[form].append(time.perf_counter() - t)
            _DECODE_FORM[key] = statistics.median(times[True][1:]) <= statistics.median(times[False][1:])
        for f in members:
            f.decode_packed = _DECODE_FORM[key]


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


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


class LeanLlama:
    """The lean model: weights read from a loaded HF ``*ForCausalLM`` (shared where unchanged),
    one sequence of ``batch`` rows, KV cache ``[layers, batch, kv_heads, capacity, head_dim]``."""

    def __init__(self, model: nn.Module, config: Optional[LeanConfig] = None, threads: Optional[int] = None):
        check_supported(model)
        self.config = lean = config or LeanConfig()
        cfg = model.config
        self.threads = int(threads or torch.get_num_threads())
        from ..kernels import _lib

        self.isa = _lib.select_isa(lean.isa) if _lib.available() else None
        if lean.sparse and self.isa is None:
            raise ConfigError(_lib.unavailable_reason() or "sparse kernels unavailable")
        inner = model.model
        attn0 = inner.layers[0].self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn0, "head_dim", cfg.hidden_size // self.n_heads))
        self.hidden = int(cfg.hidden_size)
        self.inter = int(cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self.vocab = int(model.lm_head.out_features)
        self.embed = inner.embed_tokens.weight.detach().contiguous()
        self.final_norm = inner.norm.weight.detach().contiguous()
        self.lm_head = model.lm_head.weight.detach().contiguous()  # the tied table is the same tensor
        self.lm_bias = None if model.lm_head.bias is None else model.lm_head.bias.detach().contiguous()
        self._rotary = inner.rotary_emb
        window = FAMILIES[cfg.model_type]
        self.layers: list[LeanLayer] = []
        for i, blk in enumerate(inner.layers):
            a, m = blk.self_attn, blk.mlp
            self.layers.append(LeanLayer(
                blk.input_layernorm.weight.detach().contiguous(), blk.post_attention_layernorm.weight.detach().contiguous(),
                FusedLinear([a.q_proj, a.k_proj, a.v_proj], lean, self.isa), FusedLinear([a.o_proj], lean, self.isa),
                FusedLinear([m.gate_proj, m.up_proj], lean, self.isa), FusedLinear([m.down_proj], lean, self.isa),
                window(cfg, i)))
        q_rows = self.layers[0].qkv.weight.shape[0]
        if q_rows != (self.n_heads + 2 * self.n_kv) * self.head_dim:
            raise ConfigError(f"unexpected q/k/v sizes ({q_rows} rows for {self.n_heads} heads, {self.n_kv} kv heads "
                              f"of {self.head_dim}); use torch-sparse")
        if lean.calibrate and self.isa is not None:
            from ..kernels import decode as cdec

            if cdec.available():
                choose_decode_forms(self.linears(), self.isa, self.threads)
        self.batch = 1
        self.length = 0
        self.cap = 0
        self._step = None
        self.c_steps = 0  # decode tokens run by the C step (each runs every fused linear once)
        self._grow(max(16, int(lean.initial_cache)), batch=1)

    # -- summary --------------------------------------------------------------------------------
    def linears(self) -> list[FusedLinear]:
        return [f for l in self.layers for f in (l.qkv, l.o, l.gate_up, l.down)]

    def summary(self) -> str:
        lin = self.linears()
        sp = sum(f.module is not None for f in lin)
        th = sorted({f.module.batch_threshold for f in lin if f.module is not None})
        rng = sorted({r for f in lin if f.module is not None for r in f.module.sparse_ranges})
        dec = sum(f.decode_packed for f in lin)
        return (f"lean {'sparse' if self.config.sparse else 'dense'}: {len(self.layers)} layers, "
                f"{sp}/{len(lin)} fused linears sparse (decode step: {dec} packed; prefill thresholds {th}, "
                f"also sparse at {rng}), isa {self.isa}, "
                f"C decode step {'on' if self._step is not None else 'off'}")

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
        k, v = torch.zeros(shape), torch.zeros(shape)
        if batch == self.batch and self.cap:
            k[..., :self.length, :] = self.k[..., :self.length, :]
            v[..., :self.length, :] = self.v[..., :self.length, :]
        self.k, self.v, self.cap, self.batch = k, v, cap, batch
        pos = torch.arange(cap).unsqueeze(0)
        with torch.no_grad():
            cos, sin = self._rotary(self.embed[:1].unsqueeze(0), pos)
        if cos.shape[-1] != self.head_dim:
            raise ConfigError(f"rotary size {cos.shape[-1]} != head_dim {self.head_dim}; use torch-sparse")
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self._build_step()

    def _build_step(self) -> None:
        """(Re)describe the model to the C step (after every cache reallocation)."""
        from ..kernels import decode as cdec

        self._step = None
        if self.isa is None or not cdec.available() or self.batch != 1:
            return
        arr = (cdec.CLayer * len(self.layers))()
        for i, l in enumerate(self.layers):
            arr[i] = cdec.CLayer(l.in_norm.data_ptr(), l.post_norm.data_ptr(), l.qkv.desc(self.isa), l.o.desc(self.isa),
                                 l.gate_up.desc(self.isa), l.down.desc(self.isa), self.k[i, 0].data_ptr(),
                                 self.v[i, 0].data_ptr(), l.window)
        self._c_layers = arr
        lm = cdec.linear_desc(self.isa, dense=self.lm_head, bias=self.lm_bias)
        model = cdec.CModel(len(self.layers), self.hidden, self.inter, self.n_heads, self.n_kv, self.head_dim,
                            self.vocab, self.cap, self.eps, 0, self.embed.data_ptr(), self.final_norm.data_ptr(), lm,
                            ctypes.addressof(arr), None)
        self._scratch = torch.zeros(cdec.scratch_floats(model))
        model.scratch = self._scratch.data_ptr()
        self._c_model = model
        self._logits = torch.empty(self.vocab)
        self._step = cdec.DecodeStep(model)

    # -- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
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
        return F.linear(_rms(x, self.final_norm, self.eps), self.lm_head, self.lm_bias)

    def _causal_layers(self, ids: torch.Tensor, p0: int, cos_table: torch.Tensor, sin_table: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """The decoder layers over ``ids`` [B, T] appended at position ``p0`` of caches
        ``[layers, B, KV, capacity, D]`` (the sequence cache, or one slot's view of the serving
        cache): causal (and sliding-window) attention over everything cached so far. Returns the
        hidden states [B, T, hidden] before the final norm."""
        B, T = ids.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.embed)
        cos, sin = cos_table[p0:p0 + T], sin_table[p0:p0 + T]
        qpos = torch.arange(p0, p0 + T).unsqueeze(1)
        kpos = torch.arange(p0 + T).unsqueeze(0)
        causal = kpos <= qpos
        masks: dict[int, torch.Tensor] = {}
        for i, l in enumerate(self.layers):
            if l.window not in masks:
                masks[l.window] = causal & (kpos > qpos - l.window) if l.window > 0 else causal
            h = _rms(x, l.in_norm, self.eps)
            q, k, v = l.qkv(h).split([H * D, KV * D, KV * D], -1)
            q = _rotate(q.view(B, T, H, D).transpose(1, 2), cos, sin)
            k = _rotate(k.view(B, T, KV, D).transpose(1, 2), cos, sin)
            k_cache[i, :, :, p0:p0 + T] = k
            v_cache[i, :, :, p0:p0 + T] = v.view(B, T, KV, D).transpose(1, 2)
            kk = k_cache[i, :, :, :p0 + T].repeat_interleave(H // KV, dim=1)
            vv = v_cache[i, :, :, :p0 + T].repeat_interleave(H // KV, dim=1)
            a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=masks[l.window], scale=D ** -0.5)
            x = x + l.o(a.transpose(1, 2).reshape(B, T, H * D))
            g, u = l.gate_up(_rms(x, l.post_norm, self.eps)).split([self.inter, self.inter], -1)
            x = x + l.down(F.silu(g) * u)
        return x

    def reset(self) -> None:
        self.length = 0

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.reset()
        return self.forward(ids)

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
        logits = self.prefill(torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1))[0, -1]
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            yield tok
            if eos_token_id is not None and tok == eos_token_id:
                return
            logits = self.decode_token(tok)

    # -- slots: many sequences served at once (sparse_runtime.serve) ------------------------------
    # A separate, preallocated cache ``[layers, n_slots, kv_heads, capacity, head_dim]``: slot s holds
    # one sequence of ``slot_len[s]`` tokens. The single-sequence cache above is untouched, so
    # prefill/decode/generate behave exactly as before. One decode step of B slots is ONE batched
    # forward (each fused linear sees B rows: the SparseLinear batch > 1 dispatch), attention per
    # sequence over its own length; a step of one slot runs the C step on that slot's cache, the
    # same arithmetic as ``generate``.
    def init_slots(self, n_slots: int, capacity: int) -> None:
        """Allocate the serving cache (zeros) and the rotary table for ``capacity`` positions."""
        if n_slots < 1 or capacity < 2:
            raise ConfigError(f"need at least 1 slot of 2 positions (got {n_slots} x {capacity})")
        shape = (len(self.layers), int(n_slots), self.n_kv, int(capacity), self.head_dim)
        self.slot_k, self.slot_v = torch.zeros(shape), torch.zeros(shape)
        self.slot_len = [0] * int(n_slots)
        self.slot_cap = int(capacity)
        with torch.no_grad():
            cos, sin = self._rotary(self.embed[:1].unsqueeze(0), torch.arange(self.slot_cap).unsqueeze(0))
        self.slot_cos, self.slot_sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self._slot_c: dict[int, tuple] = {}
        self._slot_scratch: Optional[torch.Tensor] = None
        self._lm_chunked: dict[int, bool] = {}
        if self.config.calibrate:
            self._lm_chunked = choose_lm_head_form(self.lm_head, self.lm_bias, int(n_slots), self.threads)

    def _slot_lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the batched step: F.linear, or in row blocks where that was measured
        faster for this batch (see :func:`choose_lm_head_form`)."""
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
            lm = cdec.linear_desc(self.isa, dense=self.lm_head, bias=self.lm_bias)
            model = cdec.CModel(len(self.layers), self.hidden, self.inter, self.n_heads, self.n_kv, self.head_dim,
                                self.vocab, self.slot_cap, self.eps, 0, self.embed.data_ptr(),
                                self.final_norm.data_ptr(), lm, ctypes.addressof(arr), None)
            if self._slot_scratch is None:  # one scratch for every slot: steps run one at a time
                self._slot_scratch = torch.zeros(cdec.scratch_floats(model))
                self._slot_logits = torch.empty(self.vocab)
            model.scratch = self._slot_scratch.data_ptr()
            self._slot_c[slot] = (arr, model, cdec.DecodeStep(model))
        return self._slot_c[slot][2]

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
        return F.linear(_rms(x[0, -1:], self.final_norm, self.eps), self.lm_head, self.lm_bias)[0]

    @torch.inference_mode()
    def decode_slots(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One new token for each of ``slots`` (sequences of different lengths); logits ``[B, V]``.

        B = 1 runs the C step on that slot's cache. B > 1 runs ONE batched forward: every fused linear
        takes B rows (so ``SparseLinear`` dispatches by its measured batch-B choice), the new K/V go to
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
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        lo, hi = min(slots), max(slots) + 1
        R = hi - lo
        slot_t = torch.tensor(slots)
        pos_t = torch.tensor(pos)
        rows = slot_t - lo
        dense_rows = R == B and bool((rows == torch.arange(B)).all())
        L = max(pos) + 1
        x = F.embedding(torch.as_tensor(tokens, dtype=torch.long), self.embed)  # [B, hidden]
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
            self.slot_k[i].view(-1, D).index_copy_(0, rows_kv, k.reshape(B * KV, D))
            self.slot_v[i].view(-1, D).index_copy_(0, rows_kv, v.reshape(B * KV, D))
            if not dense_rows:
                qf = q.new_zeros(R, H, D)
                qf[rows] = q
                q = qf
            kk = self.slot_k[i, lo:hi, :, :L]  # [R, KV, L, D], a view
            vv = self.slot_v[i, lo:hi, :, :L]
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
