"""One interface for every adapter that repairs a sparse model by training: :class:`SparseAdapter`.

An adapter wraps one frozen ``nn.Linear`` of a pruned model and adds trainable parameters whose
effect can be folded back into the weight (``merged_weight``). Mask-keeping adapters (masked LoRA,
LoRS, LoSA) add an update multiplied by the keep-mask M = 1[W != 0], so the merge is exact and the
sparsity pattern (N:M included) does not change. Mask-evolving adapters (SEFT) change M but keep the
count; dense LoRA (the papers' "LoRA*" baseline) is merged densely and re-pruned.

The contract the training engine, the merge and the later methods rely on:

- ``weight``/``bias``/``in_features``/``out_features`` delegate to the wrapped linear, so
  :func:`~sparse_runtime.manifest.build_manifest` and the family adapter work on a wrapped model;
- ``keep_mask()``: the current boolean keep-mask (recomputed from ``W != 0`` by default, or a stored
  bool buffer with ``mask_source="stored"``);
- ``merged_weight()``: the fp32 weight the adapter's forward is equivalent to; merge casts it last;
- ``merge_check``: what the merge must verify ("mask": same mask digest as the base; "count": same
  nonzeros per layer and the N:M pattern; "reprune": merged densely, then re-pruned);
- trainable tensors are ``nn.Parameter`` attributes of the adapter, sized as the method needs (a
  LoRA pair, or SEFT's |I| delta values), so optimiser state is sized by them and nothing dense;
- extra, non-trainable state that must survive a resume (SEFT's index set, LoSA's rank) lives in
  buffers, which :func:`adapter_state_dict` saves with the parameters.

Methods register a :class:`FinetuneMethod` in :data:`FINETUNE_METHODS`: the adapter class, its
config dataclass, its training defaults (from its paper or official code) and optional training
callbacks (LoRS's gradient-SVD initialisation; SEFT's evolution step).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

log = logging.getLogger(__name__)

MASK_SOURCES = ("weights", "stored")
MERGE_CHECKS = ("mask", "count", "reprune")


@dataclass
class AdapterConfig:
    """Options shared by every adapter. ``targets``: block-relative linear names to wrap (the
    family's seven projections by default); ``mask_source``: "weights" recomputes M = 1[W != 0] when
    needed (LoRS's choice: no mask kept in memory), "stored" keeps it as a bool buffer."""

    targets: list[str] = field(default_factory=lambda: [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    mask_source: str = "weights"

    def validate(self) -> None:
        if self.mask_source not in MASK_SOURCES:
            raise ConfigError(f"mask_source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        if not self.targets:
            raise ConfigError("targets is empty: name at least one linear to adapt (e.g. self_attn.q_proj)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown adapter option(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg


class SparseAdapter(nn.Module):
    """Base class; see the module docstring for the contract."""

    method: ClassVar[str] = ""
    merge_check: ClassVar[str] = "mask"

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, name: str = "") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"{name or 'layer'} is a {type(base).__name__}, not an nn.Linear; cannot adapt it")
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.base = base
        self.cfg = cfg
        self.layer_name = name
        self._dense_grad = False
        if cfg.mask_source == "stored":
            self.register_buffer("mask", base.weight.detach() != 0, persistent=False)
        else:
            self.mask = None

    # -- the wrapped linear's surface -------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def keep_mask(self) -> torch.Tensor:
        """Boolean keep-mask (True = kept). Recomputed from the frozen weight unless stored."""
        return self.mask if self.mask is not None else (self.base.weight.detach() != 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_grad:
            # d loss / d W_eff, flowing into the frozen weight's .grad (see dense_weight_gradients)
            W = self.base.weight
            w = W + (self.merged_weight().to(W.dtype) - W).detach()
            return torch.nn.functional.linear(x, w, self.base.bias)
        return self.adapter_forward(x)

    # -- what subclasses implement ----------------------------------------------------------------
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """fp32 weight equivalent to this adapter's forward (merge casts it to the base dtype)."""
        raise NotImplementedError

    def merge_info(self) -> dict[str, Any]:
        """Per-layer facts the merge records in the manifest (ranks, mask changes...)."""
        return {}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"{self.layer_name}: {self.in_features}->{self.out_features}, method={self.method}"


@dataclass
class TrainingCallback:
    """Hooks a method may need around the engine's loop. ``trainer`` is the
    :class:`~sparse_runtime.training.engine.Trainer` (model, optimizer, data, config, step)."""

    def on_train_begin(self, trainer, resumed: bool) -> None:
        pass

    def on_step_end(self, trainer, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class FinetuneMethod:
    """A registered fine-tuning method: its adapter, config, defaults and callbacks."""

    name: str
    adapter_cls: type
    config_cls: type
    train_defaults: dict[str, Any] = field(default_factory=dict)
    callbacks: Callable[[Any], list[TrainingCallback]] = lambda cfg: []
    description: str = ""

    def make_config(self, **options: Any) -> AdapterConfig:
        opts = {k: v for k, v in options.items() if v is not None}
        return self.config_cls.from_dict(opts)


FINETUNE_METHODS: Registry[FinetuneMethod] = Registry("fine-tuning method")
ADAPTERS = FINETUNE_METHODS  # one registry: a method is its adapter plus defaults


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def infer_masks_warning(model, family, manifest) -> None:
    """Warn when the model carries no sparsity manifest: masks come from its zeros (W != 0)."""
    if manifest is not None:
        return
    total = zeros = 0
    for _, lin in family.iter_linears(model):
        total += lin.weight.numel()
        zeros += int((lin.weight == 0).sum())
    msg = ("the model has no sparsity manifest: keep-masks are inferred from its zeros (W != 0), "
           f"measured block sparsity {zeros / max(1, total):.3f}")
    if zeros == 0:
        msg += "; it is DENSE, so a mask-keeping adapter keeps it dense (prune it first to get a sparse model)"
    warnings.warn(msg, UserWarning, stacklevel=3)
    log.warning(msg)


def attach_adapters(model: nn.Module, method: str | FinetuneMethod, cfg: Optional[AdapterConfig] = None,
                    family=None, layer_filter: Optional[Callable[[str], bool]] = None) -> dict[str, SparseAdapter]:
    """Wrap every target linear of ``model`` in the method's adapter (in place) and freeze everything
    else. Returns {full layer name: adapter}. Rank and shape problems fail before anything changes."""
    from ..models.family import family_of

    spec = FINETUNE_METHODS.get(method) if isinstance(method, str) else method
    cfg = cfg if cfg is not None else spec.config_cls()
    cfg.validate()
    family = family or family_of(model)
    unknown = sorted(set(cfg.targets) - set(family.linear_names))
    if unknown:
        raise ConfigError(f"unknown target linear(s) {unknown} for family {family.name}; "
                          f"choose from {list(family.linear_names)}")
    chosen = [(n, lin) for n, lin in family.iter_linears(model)
              if n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] in cfg.targets
              and (layer_filter is None or layer_filter(n))]
    if any(isinstance(lin, SparseAdapter) for _, lin in chosen):
        raise ConfigError("the model already carries adapters; merge or detach them first")
    check = getattr(spec.adapter_cls, "check_layer", None)
    if check is not None:
        for n, lin in chosen:
            check(cfg, n, lin)
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, SparseAdapter] = {}
    for n, lin in chosen:
        ad = spec.adapter_cls(lin, cfg, name=n)
        _set_module(model, n, ad)
        out[n] = ad
    return out


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, SparseAdapter]]:
    for n, m in model.named_modules():
        if isinstance(m, SparseAdapter):
            yield n, m


def detach_adapters(model: nn.Module) -> dict[str, nn.Linear]:
    """Put the plain linears back (without merging). Returns them by name."""
    out = {}
    for n, ad in list(iter_adapters(model)):
        _set_module(model, n, ad.base)
        out[n] = ad.base
    return out


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers of every adapter (not the frozen base)."""
    state = {}
    for n, ad in iter_adapters(model):
        for k, v in ad.state_dict().items():
            if k.startswith("base."):
                continue
            state[f"{n}.{k}"] = v.detach().clone().contiguous()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    from ..errors import ManifestError

    adapters = dict(iter_adapters(model))
    seen = set()
    for n, ad in adapters.items():
        own = {k: v for k, v in ad.state_dict().items() if not k.startswith("base.")}
        for k, v in own.items():
            key = f"{n}.{k}"
            if key not in state:
                if strict:
                    raise ManifestError(f"adapter state lacks {key}: it was saved for another model or method")
                continue
            src = state[key]
            if hasattr(ad, "resize_for_state") and tuple(src.shape) != tuple(v.shape):
                ad.resize_for_state(k, src.shape)
                v = dict(ad.state_dict())[k]
            if tuple(src.shape) != tuple(v.shape):
                raise ManifestError(f"adapter tensor {key} has shape {tuple(src.shape)}, the model needs "
                                    f"{tuple(v.shape)}: the adapter belongs to another model or rank")
            with torch.no_grad():
                v.copy_(src.to(v.dtype))
            seen.add(key)
    extra = sorted(set(state) - seen)
    if strict and extra:
        raise ManifestError(f"adapter state has tensors the model does not ({extra[:3]}...): it was saved for "
                            "another model or method")


class dense_weight_gradients:
    """Context manager: the adapters' forwards become plain linears at the current effective weight,
    and the frozen base weights collect d loss / d W_eff in ``.grad`` (the dense, unmasked gradient
    LoRS's initialisation and SEFT's growth step need). Restores everything on exit."""

    def __init__(self, adapters: dict[str, SparseAdapter]) -> None:
        self.adapters = adapters

    def __enter__(self) -> dict[str, SparseAdapter]:
        for ad in self.adapters.values():
            ad._dense_grad = True
            ad.base.weight.grad = None
            ad.base.weight.requires_grad_(True)
        return self.adapters

    def __exit__(self, *exc) -> bool:
        for ad in self.adapters.values():
            ad._dense_grad = False
            ad.base.weight.requires_grad_(False)
            ad.base.weight.grad = None
        return False


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable_parameters(model))


def adapters_of(model: nn.Module) -> dict[str, SparseAdapter]:
    return dict(iter_adapters(model))


def parse_ranks(items: Optional[Iterable[str]]) -> dict[str, int]:
    """``["model.layers.3.mlp.down_proj=16", ...]`` -> {name: rank}."""
    out = {}
    for it in items or []:
        name, sep, r = str(it).partition("=")
        if not sep:
            raise ConfigError(f"per-layer rank {it!r} must read NAME=RANK")
        try:
            out[name.strip()] = int(r)
        except ValueError:
            raise ConfigError(f"per-layer rank {it!r}: {r!r} is not an integer") from None
    return out
