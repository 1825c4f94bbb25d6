"""Family adapters: where a model keeps its decoder blocks and their linears.

Nothing else in the package hard-codes ``model.model.layers``: stages ask the adapter. Adding a
family is one ``@FAMILIES.register`` entry. Families whose decoder block matches Llama's layout
(Mistral, Qwen2, DeepSeek's Llama/Qwen-based distills) share the same adapter class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from ..errors import UnsupportedModelError
from ..registry import Registry


@dataclass(frozen=True)
class FamilyAdapter:
    """Describes one decoder-only family.

    ``linear_names`` are the block-relative names of the prunable linears, and ``sequential_groups``
    the order SparseGPT's "true sequential" mode prunes them in (each group sees inputs recomputed
    after the previous groups were pruned).
    """

    name: str
    model_types: tuple[str, ...]
    blocks_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"
    head_path: str = "lm_head"
    linear_names: tuple[str, ...] = (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
    sequential_groups: tuple[tuple[str, ...], ...] = field(default=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ))

    # Linears that always receive the same input tensor (after the same norm): their input statistics
    # are identical, so the calibration driver gathers them once per group.
    shared_input_groups: tuple[tuple[str, ...], ...] = field(default=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.blocks_path)

    def embed(self, model: nn.Module) -> nn.Module:
        return _get(model, self.embed_path)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {n: _get(block, n) for n in self.linear_names}

    def iter_linears(self, model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
        """(full name, module) of every prunable block linear, in block order."""
        for i, block in enumerate(self.blocks(model)):
            for n, lin in self.block_linears(block).items():
                yield f"{self.blocks_path}.{i}.{n}", lin


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


FAMILIES: Registry[FamilyAdapter] = Registry("model family")

for _fam in (
    FamilyAdapter("llama", ("llama",)),
    FamilyAdapter("mistral", ("mistral",)),
    FamilyAdapter("qwen2", ("qwen2",)),
    FamilyAdapter("qwen3", ("qwen3",)),
):
    FAMILIES.register(_fam.name)(_fam)

_BY_MODEL_TYPE = {t: FAMILIES.get(f) for f in FAMILIES for t in FAMILIES.get(f).model_types}


def family_for_model_type(model_type: str) -> FamilyAdapter:
    fam = _BY_MODEL_TYPE.get(str(model_type).lower())
    if fam is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(_BY_MODEL_TYPE))} (DeepSeek-R1 distills load as llama or qwen2)"
        )
    return fam


def family_of(model: nn.Module) -> FamilyAdapter:
    cfg = getattr(model, "config", None)
    return family_for_model_type(getattr(cfg, "model_type", type(model).__name__))
