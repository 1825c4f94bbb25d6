"""Random-weight Hugging Face directories of real model shapes, for scale tests and benchmarks.

Why: latency and memory depend on shapes, not on values, and nobody should need a 13 GB download
(or a licence click) to check that a verb works at 7B. ``write_synthetic("llama-2-7b", out)``
writes ``config.json``, ``generation_config.json``, a tokenizer and safetensors shards of at most
``max_shard_bytes`` (5 GB by default, like ``save_pretrained``) with the standard
``model.safetensors.index.json``. Quality cannot be measured on these models, and no table may
pretend it is: ``synthetic_model.json`` in the directory says what it is.

How it stays small and fast: the tensor list comes from the model skeleton built on the ``meta``
device (no memory), and each shard is written by hand in the safetensors format (an 8-byte header
length, a JSON header of names, dtypes, shapes and byte offsets, then the raw little-endian bytes)
one chunk of rows at a time. So the writer never holds more than one chunk (``CHUNK_ELEMS``
values), not even one whole tensor, and a 7B fp32 directory takes as long as drawing 6.7 billion
normal numbers and writing 27 GB.

Values: every tensor has its own generator, seeded from ``seed`` and the tensor's name, so a
tensor does not change when the depth (``layers``) or the shard size changes. Linear and embedding
weights and the Qwen2 q/k/v biases are N(0, initializer_range = 0.02) like the Hugging Face
initialisation (biases drawn too, not zero, so that exporters see real biases); norm weights are
1.0.

The tokenizer is only there to run text through the model: the embedded SmolLM2 tokenizer
(49,152 ids) is copied and, where the shape's vocabulary is smaller (LLaMA-2 and Mistral: 32,000),
cut to the ids below it (its BPE vocabulary, merges and added tokens), so no id it produces can
fall outside the embedding. Ids above the tokenizer's vocabulary never appear. The tiny shapes
(vocabulary 256) carry no tokenizer files and load with the byte tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..units import parse_bytes
from ..errors import ConfigError

CHUNK_ELEMS = 1 << 23  # values drawn and written at a time (32 MiB in fp32)
DEFAULT_SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size "5GB"
INFO_NAME = "synthetic_model.json"

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")

# The published configs' shape fields (the model cards' config.json), nothing else.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                       "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     use_sliding_window=False, sliding_window=131072, max_window_layers=28,
                     tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
SHAPES["tiny-llama"] = dict(model_type="llama", **_TINY)
SHAPES["tiny-mistral"] = dict(model_type="mistral", sliding_window=256, **_TINY)
SHAPES["tiny-qwen2"] = dict(model_type="qwen2", use_sliding_window=False, **_TINY)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: its name, shape and how it is initialised."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "ones"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    from .loading import _dtype as parse

    d = parse(dtype)
    if d not in _ST_DTYPES:  # pragma: no cover - parse only knows these three
        raise ConfigError(f"--dtype {dtype}: synthetic models are written in float32, bfloat16 or float16")
    return d


def synthetic_config(shape: str, layers: Optional[int] = None):
    """The transformers config of ``shape``, cut to ``layers`` decoder blocks when given."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ConfigError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape])
    if layers is not None:
        if not isinstance(layers, int) or layers < 1:
            raise ConfigError(f"--layers must be a positive number of decoder blocks, got {layers!r}")
        fields["num_hidden_layers"] = min(layers, fields["num_hidden_layers"])
        if "max_window_layers" in fields:
            fields["max_window_layers"] = fields["num_hidden_layers"]
    model_type = fields.pop("model_type")
    cfg = AutoConfig.for_model(model_type, initializer_range=0.02, **fields)
    cfg.use_cache = True
    return cfg


def tensor_plan(config) -> list[TensorSpec]:
    """Every tensor ``save_pretrained`` would write for ``config``, in its order (tied weights once).

    The skeleton is built on the ``meta`` device, so even a 13B plan costs no memory; asking the
    real model class (not a hand-written list) keeps the names right for every family."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied lm_head: stored once, as the embedding
            continue
        seen.add(id(t))
        init = "ones" if t.dim() == 1 and "norm" in name else "normal"
        specs.append(TensorSpec(name, tuple(int(s) for s in t.shape), init))
    return specs


def architecture_of(config) -> str:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return type(AutoModelForCausalLM.from_config(config)).__name__


def plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order, like ``save_pretrained``: a tensor larger than the limit gets its own shard."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = s.numel * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def _tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _write_tensor(f, spec: TensorSpec, dtype: torch.dtype, seed: int, std: float, bar=None) -> None:
    """Write ``spec``'s values chunk by chunk: memory is one chunk, whatever the tensor's size."""
    g = torch.Generator().manual_seed(_tensor_seed(seed, spec.name))
    left = spec.numel
    while left:
        n = min(left, CHUNK_ELEMS)
        if spec.init == "ones":
            chunk = torch.ones(n, dtype=dtype)
        else:
            chunk = torch.empty(n, dtype=torch.float32).normal_(0.0, std, generator=g).to(dtype)
        raw = chunk.view(torch.int16) if dtype in (torch.bfloat16, torch.float16) else chunk
        f.write(memoryview(raw.numpy()).cast("B"))
        left -= n
        if bar is not None:
            bar.update(n * chunk.element_size())


def write_shard(path: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int, std: float, bar=None) -> int:
    """One safetensors file written by hand (the format is documented at huggingface.co/docs/safetensors):
    little-endian u64 header length, the JSON header (padded with spaces to 8 bytes), the data."""
    code, item = _ST_DTYPES[dtype], torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": code, "shape": list(s.shape), "data_offsets": [offset, offset + s.numel * item]}
        offset += s.numel * item
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            _write_tensor(f, s, dtype, seed, std, bar)
    return offset


def write_synthetic(shape: str, out: Union[str, os.PathLike], *, dtype: Union[str, torch.dtype] = "bfloat16",
                    layers: Optional[int] = None, seed: int = 0, max_shard_bytes: Union[int, str] = DEFAULT_SHARD_BYTES,
                    tokenizer: Union[str, os.PathLike, None] = "default", overwrite: bool = False) -> Path:
    """Write the random-weight directory of ``shape`` to ``out`` (atomically) and return it.

    ``tokenizer``: "default" (the embedded SmolLM2 one for real shapes, none for tiny shapes), a
    directory whose tokenizer files are copied, or None. ``max_shard_bytes``: bytes or a size text."""
    from transformers import GenerationConfig

    from ..manifest import atomic_directory
    from ..progress import progress

    dt = _dtype(dtype)
    limit = parse_bytes(max_shard_bytes, "max shard size")
    cfg = synthetic_config(shape, layers)
    cfg.architectures = [architecture_of(cfg)]
    cfg.dtype = str(dt).replace("torch.", "")
    specs = tensor_plan(cfg)
    tok_src = _tokenizer_source(tokenizer, cfg.vocab_size)
    item = torch.empty((), dtype=dt).element_size()
    shards = plan_shards(specs, item, limit)
    total = sum(s.numel for s in specs) * item
    with atomic_directory(Path(out), overwrite) as tmp:
        cfg.save_pretrained(tmp)
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        if tok_src is not None:
            copy_tokenizer(tok_src, tmp, cfg.vocab_size)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        with progress(total=total, unit="B", unit_scale=True, desc=f"writing {shape}") as bar:
            for fname, group in zip(names, shards):
                write_shard(tmp / fname, group, dt, seed, cfg.initializer_range, bar)
                weight_map.update({s.name: fname for s in group})
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / INFO_NAME).write_text(json.dumps({
            "synthetic": True, "shape": shape, "layers": cfg.num_hidden_layers, "dtype": cfg.dtype, "seed": seed,
            "values": "random normal (std initializer_range) per tensor, norms 1.0: for latency and memory only; "
                      "quality cannot be measured on this model",
            "tokenizer": None if tok_src is None else str(tok_src),
        }, indent=1))
    return Path(out)


def _tokenizer_source(tokenizer, vocab_size: int) -> Optional[Path]:
    if tokenizer is None or str(tokenizer).lower() == "none":
        return None
    if str(tokenizer) == "default":
        if vocab_size < 1024:  # tiny shapes: the byte tokenizer
            return None
        from .loading import ensure_smollm2

        return ensure_smollm2()
    p = Path(tokenizer).expanduser()
    if not p.is_dir() or not any((p / n).is_file() for n in _TOKENIZER_FILES):
        raise ConfigError(f"--tokenizer {tokenizer}: no tokenizer files there; give a model directory with "
                          "tokenizer.json, or 'none'")
    return p


def copy_tokenizer(src: Path, dst: Path, vocab_size: int) -> None:
    """Copy ``src``'s tokenizer files; when its vocabulary is larger than ``vocab_size``, cut it so
    no produced id reaches past the embedding (see the module docstring)."""
    for n in _TOKENIZER_FILES:
        if (src / n).is_file():
            shutil.copyfile(src / n, dst / n)
    tj = dst / "tokenizer.json"
    if not tj.is_file():
        return
    data = json.loads(tj.read_text())
    model = data.get("model", {})
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or max(vocab.values(), default=-1) < vocab_size:
        return
    if model.get("type") != "BPE":
        raise ConfigError(f"the tokenizer in {src} has more ids than the shape's vocabulary ({vocab_size}) and is "
                          "not BPE, so it cannot be cut: pass --tokenizer none or another tokenizer")
    kept = {t: i for t, i in vocab.items() if i < vocab_size}
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in kept and b in kept and a + b in kept:
            merges.append(m)
    model["vocab"], model["merges"] = kept, merges
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("id", 0) < vocab_size]
    tj.write_text(json.dumps(data, ensure_ascii=False))
    tc = dst / "tokenizer_config.json"
    if tc.is_file():
        conf = json.loads(tc.read_text())
        dec = conf.get("added_tokens_decoder")
        if isinstance(dec, dict):
            conf["added_tokens_decoder"] = {k: v for k, v in dec.items() if int(k) < vocab_size}
        tc.write_text(json.dumps(conf, indent=2, ensure_ascii=False))


if __name__ == "__main__":  # python -m sparse_runtime.models.synthetic --shape ... --out ... (= sparse-runtime synth)
    import sys

    from ..cli import main

    sys.exit(main(["synth", *sys.argv[1:]]))
