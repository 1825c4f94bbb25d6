"""``gguf``: one GGUF file for llama.cpp, the runtime most CPU users run 8- and 4-bit models on.

llama.cpp has no sparse formats: a pruned model runs there at its dense speed, its zeros stored and
multiplied like any weight. So this export is a *baseline*, like ``onnx-int8`` / ``onnx-int4``: what a
user would otherwise ship, against which the sparse-quantized paths must show their speed
(docs/formats.md#gguf-llamacpp, docs/quantization.md). It is also a way out: a model pruned and
repaired here runs in every llama.cpp tool (``llama-cli``, ``llama-server``, ``llama-bench``).

**Layout.** The writer is the ``gguf`` package's (the llama.cpp project's own Python writer). Tensor
names and metadata keys follow llama.cpp's architectures ``llama`` (LLaMA, Mistral, SmolLM2),
``qwen2`` and ``qwen3``. llama.cpp's ``llama`` architecture rotates adjacent pairs of a head's
dimensions while Hugging Face's LLaMA rotates its two halves, so q_proj and k_proj rows are reordered
per head (pairs interleaved) for that architecture; ``qwen2``/``qwen3`` rotate halves in llama.cpp
too and keep their order. A rope whose frequencies are static but not the default ones (LLaMA-3.1's
``llama3``, ``linear``) is written as llama.cpp's ``rope_freqs`` tensor, the ratio of the default
to the model's own inverse frequencies; a rope with an attention scale (YaRN) or frequencies that
change with the length is refused with one line.

**Types** (``qtype``): ``F32``, ``F16``, ``BF16``, or llama.cpp's ``Q8_0`` (blocks of 32 int8 with
one fp16 scale: 8.5 bits a weight) and ``Q4_0`` (blocks of 32 4-bit codes, one fp16 scale: 4.5
bits). Every 2-D weight, the embedding and the lm_head included, gets ``qtype`` (llama.cpp's
``--pure``: no tensor kept at a higher precision), norms and biases stay F32. Quantized types need
every input dimension to be a multiple of 32. A zero stays zero in every type (a block's codes are
``round(w / d)``; Q4_0's code 8 is zero), so the export keeps the sparsity; kept weights that round
to zero are counted per tensor and reported, never hidden.

**Vocabulary.** A byte-level BPE tokenizer (LLaMA-3, Qwen2/3, SmolLM2, the DeepSeek distills) is
written as llama.cpp's ``gpt2`` vocabulary (tokens, types, merges, special ids, chat template). Its
pre-tokenizer is a name llama.cpp knows (``pre_tokenizer``; ``auto`` picks it from the family and the
vocabulary size, ``default`` otherwise). ``vocab="none"`` writes no vocabulary (token ids only: what
timing needs; tiny test models with a byte tokenizer get it). A SentencePiece tokenizer (LLaMA-2,
Mistral v0.1) gets one line naming ``vocab=none`` or llama.cpp's own converter.

**Verification.** The file is read back with the ``gguf`` reader: every tensor present, every weight
dequantized and compared with the source (F32 exactly; F16/BF16 within their rounding; Q8_0/Q4_0
within half a quantization step of their block), every source zero still zero. Where
``llama-cpp-python`` is installed, llama.cpp itself loads the file and computes the fixed prompt's
logits and one cached decode step, compared with float32 PyTorch (F32: relative L2 <= 1e-3; the
others catch garbage only, their error reported), and tokenizes the fixed text as Hugging Face does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sparse_runtime.errors import ConfigError

from . import CommonOptions, EXPORTERS, Exporter
from .source import Source
from .verify import FIXED_PROMPT, ExportVerificationError, fixed_prompt_ids, relative_check, torch_reference

GGUF_NAME = "model.gguf"
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
QUANT_BLOCK = 32  # Q8_0 and Q4_0: 32 weights a block along the input dimension
# llama.cpp's architecture for each model_type we export, and whether its rope rotates adjacent pairs
# (``llama``: HF's q/k rows are reordered) or halves (``qwen2``/``qwen3``: kept as they are).
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
          "qwen3": ("qwen3", False)}
VOCABS = ("auto", "none")
# Pre-tokenizer names llama.cpp knows, by (model_type, the TOKENIZER's vocabulary size: a model may carry
# another model's tokenizer, as the synthetic shapes do); anything else is "default". The verification
# compares llama.cpp's tokens with Hugging Face's, so a wrong guess fails loudly.
KNOWN_PRE = {("llama", 128256): "llama-bpe", ("llama", 49152): "smollm", ("qwen2", None): "qwen2",
             ("qwen3", None): "qwen2"}
LOGITS_GATE_F32 = 1e-3  # relative L2 of llama.cpp's F32 logits against PyTorch's
LOGITS_GATE = 0.75      # the other types: catches garbage (a transposed weight, a wrong rope), not rounding


@dataclass
class GgufOptions(CommonOptions):
    """``qtype``: the 2-D weights' type (``F32`` | ``F16`` | ``BF16`` | ``Q8_0`` | ``Q4_0``; empty: from
    ``dtype``); ``vocab``: ``auto`` (the tokenizer's BPE vocabulary) or ``none`` (token ids only);
    ``pre_tokenizer``: llama.cpp's pre-tokenizer name (``auto``: from the family); ``llama_cpp``:
    verify with llama.cpp itself when ``llama-cpp-python`` is installed."""

    qtype: str = ""
    vocab: str = "auto"
    pre_tokenizer: str = "auto"
    llama_cpp: bool = True

    def validate(self) -> None:
        super().validate()
        q = str(self.qtype or {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[self.dtype]).upper()
        if q not in QTYPES:
            raise ConfigError(f"gguf qtype {self.qtype!r} is not one of {', '.join(QTYPES)}")
        self.qtype = q
        if self.vocab not in VOCABS:
            raise ConfigError(f"gguf vocab {self.vocab!r}: choose one of {', '.join(VOCABS)}")


def rope_pairs(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows (each head's dims as two halves) -> llama.cpp ``llama`` rows (adjacent pairs)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_halves(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`rope_pairs`."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ConfigError("the gguf export needs the gguf package: pip install gguf") from e
    return gguf


def ggml_type(qtype: str):
    return getattr(_gguf().GGMLQuantizationType, qtype)


def tensor_map(model, arch: str, reorder: bool) -> list[tuple[str, str, Optional[str]]]:
    """``(gguf name, HF state-dict name, rope reorder: "q" | "k" | None)`` for every stored tensor."""
    cfg = model.config
    sd_names = set(model.state_dict())
    out = [("token_embd.weight", "model.embed_tokens.weight", None), ("output_norm.weight", "model.norm.weight", None)]
    if not getattr(cfg, "tie_word_embeddings", False):
        out.append(("output.weight", "lm_head.weight", None))
    parts = [("attn_norm", "input_layernorm", None), ("ffn_norm", "post_attention_layernorm", None),
             ("attn_q", "self_attn.q_proj", "q"), ("attn_k", "self_attn.k_proj", "k"),
             ("attn_v", "self_attn.v_proj", None), ("attn_output", "self_attn.o_proj", None),
             ("ffn_gate", "mlp.gate_proj", None), ("ffn_up", "mlp.up_proj", None), ("ffn_down", "mlp.down_proj", None),
             ("attn_q_norm", "self_attn.q_norm", None), ("attn_k_norm", "self_attn.k_norm", None)]
    for i in range(cfg.num_hidden_layers):
        for g, h, r in parts:
            for suffix in ("weight", "bias"):
                hf = f"model.layers.{i}.{h}.{suffix}"
                if hf in sd_names:
                    out.append((f"blk.{i}.{g}.{suffix}", hf, r if reorder else None))
    known = {hf for _, hf, _ in out} | {"lm_head.weight"}
    extra = sorted(n for n in sd_names - known if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConfigError(f"the gguf export does not know where llama.cpp's {arch} architecture keeps {extra[:3]}; "
                          "export this model as onnx or bitmask")
    return out


def rope_heads(cfg) -> dict[str, int]:
    """Heads of q_proj's and k_proj's rows (the rope reorder works head by head)."""
    return {"q": int(cfg.num_attention_heads),
            "k": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)}


def head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def rope_freq_factors(model) -> Optional[np.ndarray]:
    """llama.cpp's ``rope_freqs`` (default inverse frequencies / the model's), or None when the model
    uses the default ones. Refuses ropes llama.cpp's ``rope_freqs`` cannot express."""
    cfg = model.config
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    rope_type = getattr(rot, "rope_type", "default")
    if rope_type in ("dynamic", "longrope") or float(getattr(rot, "attention_scaling", 1.0) or 1.0) != 1.0:
        raise ConfigError(f"rope type {rope_type!r} (frequencies that change with the length, or an attention "
                          "scale) is not exported to gguf here; use llama.cpp's convert_hf_to_gguf.py")
    if rot is None or rope_type == "default":
        return None
    d = head_dim(cfg)
    base = float(getattr(cfg, "rope_theta", 10000.0))
    default = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    own = rot.inv_freq.detach().double().cpu().numpy()
    return (default / own).astype(np.float32)


def pick_pre_tokenizer(cfg, tokenizer_size: int, requested: str) -> str:
    if requested != "auto":
        return requested
    mt = getattr(cfg, "model_type", "")
    return KNOWN_PRE.get((mt, int(tokenizer_size)), KNOWN_PRE.get((mt, None), "default"))


def bpe_vocabulary(tokenizer, vocab_size: int) -> dict[str, Any]:
    """Tokens (by id, padded to the model's vocabulary), token types, merges and special ids of a
    byte-level BPE tokenizer, as llama.cpp's ``gpt2`` vocabulary stores them."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("the gguf export writes Hugging Face fast BPE tokenizers; this model has "
                          f"{type(tokenizer).__name__}: pass vocab=none (token ids only)")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or '"ByteLevel"' not in json.dumps(spec.get("pre_tokenizer")):
        raise ConfigError("this tokenizer is SentencePiece-style (LLaMA-2, Mistral v0.1), not byte-level BPE: "
                          "export with vocab=none (token ids only) or convert it with llama.cpp's "
                          "convert_hf_to_gguf.py")
    gguf = _gguf()
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: int(gguf.TokenType.NORMAL) for i in tokens}
    for a in spec.get("added_tokens", []):
        tokens[int(a["id"])] = a["content"]
        types[int(a["id"])] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    if max(tokens) + 1 > vocab_size:  # llama.cpp would refuse the file: one token per embedding row
        raise ConfigError(f"the tokenizer has {max(tokens) + 1} token ids and the model's embedding {vocab_size} rows: "
                          "export with vocab=none (token ids only), or give the model its own tokenizer")
    n = vocab_size
    toks = [tokens.get(i, f"[PAD{i}]") for i in range(n)]
    tys = [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    return {"tokens": toks, "types": tys, "merges": merges, "special": special, "add_bos": add_bos,
            "tokenizer_size": max(tokens) + 1,
            "chat_template": getattr(tokenizer, "chat_template", None)}


def encode_tensor(w: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """``w`` (float32) as the bytes/array GGUFWriter takes, and its GGML type."""
    gguf = _gguf()
    if w.ndim == 1 or qtype == "F32":
        return np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType.F32
    if qtype == "F16":
        return np.ascontiguousarray(w, dtype=np.float16), gguf.GGMLQuantizationType.F16
    t = ggml_type(qtype)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), t), t


def decode_tensor(data: np.ndarray, t, shape: tuple[int, ...]) -> np.ndarray:
    gguf = _gguf()
    return np.asarray(gguf.quants.dequantize(np.asarray(data), t), dtype=np.float32).reshape(shape)


@EXPORTERS.register("gguf")
class GgufExporter(Exporter):
    name = "gguf"
    Options = GgufOptions
    description = "one GGUF file for llama.cpp (dense: zeros stored; F32/F16/BF16/Q8_0/Q4_0, --pure)"

    def write(self, src: Source, out: Path, opts: GgufOptions) -> dict[str, Any]:
        gguf = _gguf()
        model, cfg = src.model, src.model.config
        mt = getattr(cfg, "model_type", "")
        if mt not in ARCHES:
            raise ConfigError(f"the gguf export writes {', '.join(sorted(ARCHES))} models; this one is {mt!r}")
        arch, reorder = ARCHES[mt]
        names = tensor_map(model, arch, reorder)
        sd = model.state_dict()
        if opts.qtype in ("Q8_0", "Q4_0"):
            bad = [hf for _, hf, _ in names if sd[hf].ndim == 2 and sd[hf].shape[-1] % QUANT_BLOCK]
            if bad:
                raise ConfigError(f"{opts.qtype} quantizes blocks of {QUANT_BLOCK} along a row, and {bad[0]} has "
                                  f"{sd[bad[0]].shape[-1]} columns: export with qtype F16 or F32")
        freqs = rope_freq_factors(model)
        if freqs is not None and arch != "llama":
            raise ConfigError(f"a scaled rope on llama.cpp's {arch} architecture is not exported here; use "
                              "llama.cpp's convert_hf_to_gguf.py")
        vocab = None  # tiny models' byte tokenizer: token ids only, as vocab=none
        if opts.vocab == "auto" and src.tokenizer is not None and not _is_byte_tokenizer(src.tokenizer):
            vocab = bpe_vocabulary(src.tokenizer, int(cfg.vocab_size))

        logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file at INFO
        # use_temp_file: each tensor goes to a spooled temporary file as it is made (memory holds one
        # tensor, not the whole quantized model, on top of the source)
        w = gguf.GGUFWriter(str(out / GGUF_NAME), arch, use_temp_file=True)
        w.add_name(str(src.manifest.base_model or src.spec)[:200])
        w.add_file_type(int(getattr(gguf.LlamaFileType, {"F32": "ALL_F32"}.get(opts.qtype, "MOSTLY_" + opts.qtype))))
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(int(cfg.num_attention_heads))
        w.add_head_count_kv(rope_heads(cfg)["k"])
        w.add_rope_dimension_count(head_dim(cfg))
        if head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
            w.add_key_length(head_dim(cfg))
            w.add_value_length(head_dim(cfg))
        w.add_rope_freq_base(float(getattr(cfg, "rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(cfg.vocab_size))
        pre = None
        if vocab is None:
            w.add_tokenizer_model("none")
        else:
            pre = pick_pre_tokenizer(cfg, vocab["tokenizer_size"], opts.pre_tokenizer)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(pre)
            w.add_token_list(vocab["tokens"])
            w.add_token_types(vocab["types"])
            w.add_token_merges(vocab["merges"])
            for k, v in vocab["special"].items():
                if v is not None:
                    getattr(w, {"pad": "add_pad_token_id"}.get(k, f"add_{k}_token_id"))(int(v))
            w.add_add_bos_token(vocab["add_bos"])
            if vocab["chat_template"]:
                w.add_chat_template(vocab["chat_template"])

        heads = rope_heads(cfg)
        rounded_to_zero: dict[str, int] = {}  # kept weights the type rounds to 0, per tensor: reported, never hidden
        stored_bytes, weights = 0, 0
        for gname, hf, r in names:
            a = sd[hf].detach().float().cpu().numpy()
            if r is not None:
                a = rope_pairs(a, heads[r])
            data, t = encode_tensor(a, opts.qtype)
            if a.ndim == 2:
                lost = int(((a != 0) & (decode_tensor(data, t, a.shape) == 0)).sum())
                if lost:
                    rounded_to_zero[gname] = lost
                weights += a.size
                stored_bytes += data.nbytes
            plain = t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            w.add_tensor(gname, data, raw_dtype=None if plain else t)
        if freqs is not None:
            w.add_tensor("rope_freqs.weight", freqs)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        src.copy_side_files(out)
        return {"model": GGUF_NAME, "architecture": arch, "rope_rows_reordered": reorder,
                "rope_freqs": freqs is not None, "tensors": len(names) + (freqs is not None),
                "vocab": "none (token ids only)" if vocab is None else f"gpt2 BPE, {len(vocab['tokens'])} tokens",
                "pre_tokenizer": pre,
                "quantization": {"scheme": opts.qtype, "method": "round-to-nearest (gguf package, llama.cpp's "
                                 "reference quantizer)" if opts.qtype.startswith("Q") else "cast",
                                 "lm_head": "tied to the embedding" if getattr(cfg, "tie_word_embeddings", False)
                                 else opts.qtype, "embedding": opts.qtype,
                                 "bytes_per_weight": round(stored_bytes / max(1, weights), 4),
                                 "kept_weights_rounded_to_zero": rounded_to_zero}}

    def verify(self, src: Source, out: Path, opts: GgufOptions, contents: dict[str, Any]) -> dict[str, Any]:
        problems = self._verify_tensors(src, out, opts, contents)
        if problems:
            raise ExportVerificationError(f"the gguf export does not hold its source's weights, so it was not written: "
                                          f"{'; '.join(problems[:3])}. This is a bug in the exporter")
        report: dict[str, Any] = {"tensors": "every weight read back and compared with the source", "ok": True}
        if not opts.llama_cpp:
            report["llama_cpp"] = "skipped (llama_cpp=False)"
            return report
        from sparse_runtime.runtime.llamacpp_model import LlamaCppModel, llama_cpp_available

        ok, why = llama_cpp_available()
        if not ok:
            report["llama_cpp"] = f"skipped: {why}"
            return report
        return {**report, **self._verify_llama_cpp(src, out, opts, contents, LlamaCppModel)}

    def _verify_tensors(self, src: Source, out: Path, opts: GgufOptions, contents: dict[str, Any]) -> list[str]:
        gguf = _gguf()
        model, cfg = src.model, src.model.config
        arch, reorder = ARCHES[cfg.model_type]
        reader = gguf.GGUFReader(str(out / GGUF_NAME))
        got = {t.name: t for t in reader.tensors}
        sd = model.state_dict()
        heads = rope_heads(cfg)
        problems = []
        for gname, hf, r in tensor_map(model, arch, reorder):
            t = got.get(gname)
            if t is None:
                problems.append(f"{gname} is missing")
                continue
            ref = sd[hf].detach().float().cpu().numpy()
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            if shape != ref.shape:
                problems.append(f"{gname}: shape {shape}, source {ref.shape}")
                continue
            deq = decode_tensor(t.data, t.tensor_type, shape)
            if r is not None:
                deq = rope_halves(deq, heads[r])
            if ((ref == 0) & (deq != 0)).any():
                problems.append(f"{gname}: a zero of the source is nonzero in the file")
            err = np.abs(deq - ref)
            name = t.tensor_type.name
            if name == "F32":
                tol = np.zeros_like(ref)
            elif name in ("F16", "BF16"):
                tol = np.abs(ref) * (2.0 ** -10 if name == "F16" else 2.0 ** -7) + 6e-8
            else:  # a step of the block's scale d (Q8_0: amax / 127, at most half of it lost to rounding;
                # Q4_0: amax / 8, a whole step where the side opposite the block's extreme clamps at +7),
                # plus d's own rounding to fp16
                amax = np.abs(ref).reshape(ref.shape[0], -1, QUANT_BLOCK).max(-1, keepdims=True)
                step = amax / 127.0 * 0.5 if name == "Q8_0" else amax / 8.0
                tol = np.broadcast_to(step * (1 + 2.0 ** -9) + amax * 2.0 ** -10 + 1e-12,
                                      (ref.shape[0], ref.shape[1] // QUANT_BLOCK, QUANT_BLOCK)).reshape(ref.shape)
            if (err > tol).any():
                problems.append(f"{gname}: max |error| {float(err.max()):.3g} exceeds {name}'s rounding")
        return problems

    def _verify_llama_cpp(self, src: Source, out: Path, opts: GgufOptions, contents: dict[str, Any],
                          runner) -> dict[str, Any]:
        ids = fixed_prompt_ids(src.tokenizer, src.model.config.vocab_size, batch=1)
        ref = torch_reference(src.model, ids, decode=True)
        fp32_source = next(src.model.parameters()).dtype == torch.float32  # --load-dtype bfloat16: bf16 compute
        gate = LOGITS_GATE_F32 if opts.qtype == "F32" and fp32_source else LOGITS_GATE
        try:
            m = runner(out / GGUF_NAME, threads=1, n_ctx=64, kv_f32=opts.qtype == "F32")
        except RuntimeError as e:
            raise ExportVerificationError(f"{e}, so the gguf export was not written"
                                          + (f"; pre_tokenizer {contents['pre_tokenizer']!r} must be a name llama.cpp "
                                             "knows" if contents.get("pre_tokenizer") else "")) from e
        with m:
            pre = m.prefill(ids.numpy()[0])
            step = m.decode(int(ref["next_token"][0, 0]))
            checks = [relative_check("prefill", ref["prefill"][0], pre, gate),
                      relative_check("decode_step", ref["decode"][0], step[None], gate)]
            tokens = None
            if contents.get("pre_tokenizer") is not None:
                hf = list(src.tokenizer(FIXED_PROMPT, add_special_tokens=False)["input_ids"])
                lc = m.tokenize(FIXED_PROMPT)
                tokens = {"same_as_hugging_face": hf == lc, "tokens": len(hf)}
        bad = [f"{c['name']}: relative L2 error of llama.cpp's logits {c['relative_l2']:.3g} > {gate}"
               for c in checks if not c["ok"]]
        if tokens is not None and not tokens["same_as_hugging_face"]:
            bad.append(f"llama.cpp tokenizes the fixed text differently from Hugging Face with pre-tokenizer "
                       f"{contents['pre_tokenizer']!r}: pass pre_tokenizer=NAME (a name llama.cpp knows)")
        if bad:
            raise ExportVerificationError(f"llama.cpp does not reproduce the source model from the gguf export, so it "
                                          f"was not written: {'; '.join(bad)}")
        self._quality = max(c["relative_l2"] for c in checks)
        import llama_cpp

        return {"llama_cpp": f"llama-cpp-python {llama_cpp.__version__} loaded the file", "logits": checks,
                "tokenizer": tokens, "gate": f"relative L2 of the logits vs fp32 PyTorch <= {gate}"}

    def notes(self, opts: GgufOptions) -> list[str]:
        q = getattr(self, "_quality", None)
        extra = ([f"quality: llama.cpp's logits moved by relative L2 {q:.2f} from fp32 PyTorch on the verification "
                  "prompt: this quantization costs accuracy on this model"] if q is not None and q > 0.1 else [])
        return extra + ["dense baseline: llama.cpp stores and multiplies the zeros (no sparsity exploited)",
                        f"every 2-D weight, embedding and lm_head included, is {opts.qtype} (llama.cpp's --pure)"]


def _is_byte_tokenizer(tok) -> bool:
    from sparse_runtime.models import ByteTokenizer

    return isinstance(tok, ByteTokenizer)
