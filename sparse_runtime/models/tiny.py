"""Tiny randomly initialised models of each supported family, built in memory, for tests.

They are small enough that a full prune/eval/export cycle runs in a second on a CPU, but keep the
real block structure (GQA, SwiGLU MLP, RoPE; Qwen2 has q/k/v biases; Mistral has a sliding window).
Sizes are multiples of 8 so every N:M pattern we test divides them.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedModelError

_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**_COMMON)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**_COMMON, sliding_window=256)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**_COMMON, use_sliding_window=False)


TINY_CONFIGS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2}


def tiny_config(family: str = "llama", **overrides):
    try:
        cfg = TINY_CONFIGS[family.lower()]()
    except KeyError:
        raise UnsupportedModelError(
            f"no tiny config for family {family!r}; choose one of {sorted(TINY_CONFIGS)}"
        ) from None
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised causal LM of the family, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


class ByteTokenizer:
    """A minimal tokenizer for tiny models: one token per UTF-8 byte (vocab 256), no special tokens.

    It implements the small surface the package uses (``__call__``/``encode``/``decode``,
    ``eos_token_id``), so tests need no tokenizer files.
    """

    eos_token_id = 0
    bos_token_id = None
    pad_token_id = 0
    eos_token = "\x00"
    name_or_path = "byte-tokenizer"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text, return_tensors=None, add_special_tokens=False, **_):
        ids = self.encode(text) if isinstance(text, str) else [self.encode(t) for t in text]
        if return_tensors == "pt":
            t = torch.tensor([ids] if isinstance(text, str) else ids, dtype=torch.long)
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}
        return {"input_ids": ids}

    def save_pretrained(self, path) -> None:  # tiny models carry no tokenizer files
        return None
