"""Fold trained adapters back into exact sparse weights (docs/methods.md#merge-rules).

For a mask-keeping adapter the merged weight is W' = W + s (B A) ⊙ M, computed in fp32 and cast to
the model's dtype last. Pruned positions are exactly zero (0 + 0, the mask is multiplied in), so
rounding cannot create nonzeros there. Rounding *can* turn a kept weight into an exact zero (a
cancellation, likelier in bf16); such entries are set to the dtype's smallest normal number with
the sign of the fp32 value, so the mask is unchanged, and counted (``kept_zero_fixups``).

Checks, per adapter's ``merge_check``:
- ``mask``: the merged mask digest equals the base's for every layer (so sparsity and any N:M
  pattern are identical);
- ``count``: nonzeros per layer equal the base's and any N:M pattern holds (mask-evolving SEFT);
- ``reprune``: dense LoRA: W + s B A is dense, then re-pruned ("LoRA*"): ``reprune="wanda"``
  (|W'|·‖x‖ on calibration data through the sequential driver), ``"magnitude"`` (|W'|) or ``"mask"``
  (the base mask again); unstructured layers keep each row's count of zeros, N:M layers are
  re-pruned per M-group, so the sparsity equals the base's exactly while the mask may move
  (``mask_changed`` counts the moved positions).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .adapters import SparseAdapter, detach_adapters, iter_adapters
from .errors import ConfigError, SparseRuntimeError
from .sparsity import NMPattern, mask_digest, nm_compliant, parse_structure

log = logging.getLogger(__name__)

REPRUNE_METHODS = ("wanda", "magnitude", "mask")


class MergeError(SparseRuntimeError):
    """The merged weights break the sparsity they must keep (a bug, never a user error)."""


@dataclass
class MergeReport:
    method: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_zero_fixups: int = 0
    mask_changed: int = 0
    reprune: Optional[str] = None
    max_abs_logit_diff: Optional[float] = None
    checkpoint: Optional[str] = None  # where the merged checkpoint was written (not in as_dict: the manifest's)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "kept_zero_fixups": self.kept_zero_fixups, "mask_changed": self.mask_changed,
                "reprune": self.reprune, "max_abs_logit_diff": self.max_abs_logit_diff,
                "layers": len(self.layers), "ranks": sorted({v.get("rank") for v in self.layers.values()
                                                             if v.get("rank") is not None}),
                **self._mask_evolution()}

    def _mask_evolution(self) -> dict[str, Any]:
        """Mask-evolving adapters (SEFT): per layer, weights resurrected and newly pruned."""
        ev = {n: {"resurrected": v["resurrected"], "newly_pruned": v["newly_pruned"]}
              for n, v in self.layers.items() if "resurrected" in v and "newly_pruned" in v}
        return {"mask_evolution": ev} if ev else {}


def _fix_kept_zeros(w: torch.Tensor, w32: torch.Tensor, keep: torch.Tensor) -> int:
    bad = keep & (w == 0)
    n = int(bad.sum())
    if n:
        tiny = torch.finfo(w.dtype).tiny
        sign = torch.where(w32[bad] < 0, -1.0, 1.0).to(w.dtype)
        w[bad] = sign * tiny
    return n


def _structure_of(name: str, weight: torch.Tensor, manifest) -> Optional[NMPattern]:
    if manifest is not None and name in manifest.layers:
        return parse_structure(manifest.layers[name].structure)
    return None


def _reprune_mask(score: torch.Tensor, base_keep: torch.Tensor, structure: Optional[NMPattern]) -> torch.Tensor:
    """Keep-mask with the base's zeros count per row (unstructured) or per M-group (N:M)."""
    rows, cols = score.shape
    if structure is not None:
        m = structure.m
        g = score.reshape(rows, cols // m, m)
        zeros = (~base_keep).reshape(rows, cols // m, m).sum(-1, keepdim=True)
        order = torch.argsort(torch.argsort(g, dim=-1, stable=True), dim=-1, stable=True)
        return (order >= zeros).reshape(rows, cols)
    zeros = (~base_keep).sum(1, keepdim=True)
    order = torch.argsort(torch.argsort(score, dim=1, stable=True), dim=1, stable=True)
    return order >= zeros


@torch.no_grad()
def merge_adapters(model, family=None, *, manifest=None, reprune: str = "wanda", calib_ids: Optional[torch.Tensor] = None,
                   tokenizer=None, data_dir=None, protocol: str = "quick") -> MergeReport:
    """Merge every adapter of ``model`` in place (plain linears come back) and verify the sparsity.
    ``manifest``: the base checkpoint's (for N:M structures); ``reprune``/``calib_ids`` for dense LoRA."""
    from .models.family import family_of

    family = family or family_of(model)
    adapters: dict[str, SparseAdapter] = dict(iter_adapters(model))
    if not adapters:
        raise ConfigError("the model carries no adapters to merge")
    methods = sorted({a.method for a in adapters.values()})
    report = MergeReport(method=",".join(methods))
    reprune_layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    totals = [0, 0]  # merge_check "total" (SEFT, global scope): the model-wide count is kept
    for name, ad in adapters.items():
        base_keep = (ad.base.weight != 0)
        base_nnz = int(base_keep.sum())
        w32 = ad.merged_weight()
        info = {"method": ad.method, "base_nnz": base_nnz, **ad.merge_info()}
        if ad.merge_check == "reprune":
            reprune_layers[name] = (w32, base_keep)
            report.layers[name] = info
            continue
        keep = ad.keep_mask()
        w = w32.to(ad.base.weight.dtype)
        report.kept_zero_fixups += _fix_kept_zeros(w, w32, keep)
        if bool((w[~keep] != 0).any()):
            raise MergeError(f"{name}: merged weight has nonzeros at pruned positions")
        if ad.merge_check == "mask" and not torch.equal(w != 0, base_keep):
            raise MergeError(f"{name}: merged mask differs from the base mask")
        nnz = int((w != 0).sum())
        if ad.merge_check == "count" and nnz != base_nnz:
            raise MergeError(f"{name}: {nnz} nonzeros after merge, base had {base_nnz}")
        if ad.merge_check == "total":
            totals[0] += nnz
            totals[1] += base_nnz
        ad.base.weight.copy_(w)
        report.layers[name] = info | {"nnz": nnz}
    if totals[0] != totals[1]:
        raise MergeError(f"{totals[0]} nonzeros after merge over the globally re-pruned layers, base had {totals[1]}")
    if reprune_layers:
        _reprune(model, family, reprune_layers, adapters, manifest, reprune, calib_ids, tokenizer, data_dir,
                 protocol, report)
    for name, ad in adapters.items():
        st = _structure_of(name, ad.base.weight, manifest)
        if st is not None and not nm_compliant(ad.base.weight, st):
            raise MergeError(f"{name}: merged weight breaks its {st} pattern")
    detach_adapters(model)
    return report


def _reprune(model, family, layers, adapters, manifest, how, calib_ids, tokenizer, data_dir, protocol,
             report: MergeReport) -> None:
    if how not in REPRUNE_METHODS:
        raise ConfigError(f"reprune must be one of {REPRUNE_METHODS}, got {how!r}")
    report.reprune = how
    # every re-pruned layer first holds its dense merged weight (LoRA*: merge, then prune)
    for name, (w32, _) in layers.items():
        adapters[name].base.weight.copy_(w32.to(adapters[name].base.weight.dtype))

    def apply(name: str, lin, norm: Optional[torch.Tensor], score: Optional[torch.Tensor] = None) -> None:
        w32, base_keep = layers[name]
        if score is None:
            score = w32.abs() if norm is None else w32.abs() * norm.to(w32.device).reshape(1, -1)
        keep = _reprune_mask(score, base_keep, _structure_of(name, w32, manifest))
        w = (w32 * keep).to(lin.weight.dtype)
        report.kept_zero_fixups += _fix_kept_zeros(w, w32, keep)
        lin.weight.copy_(w)
        report.mask_changed += int((keep != base_keep).sum()) // 2
        nnz = int((w != 0).sum())
        if nnz != int(base_keep.sum()):
            raise MergeError(f"{name}: re-pruned to {nnz} nonzeros, base had {int(base_keep.sum())}")
        report.layers[name]["nnz"] = nnz

    if how in ("magnitude", "mask"):
        for name, (w32, base_keep) in layers.items():
            apply(name, adapters[name].base, None, base_keep.float() if how == "mask" else None)
        return
    # Wanda: sequential pass over the merged (dense-updated) model, block by block
    if calib_ids is None:
        if tokenizer is None:
            raise ConfigError("re-pruning with wanda needs calibration data: pass calib_ids or a tokenizer")
        from .data import c4_windows
        from .protocols import get_protocol

        p = get_protocol(protocol)
        calib_ids = c4_windows(tokenizer, p.calib_samples, p.calib_seqlen, p.calib_seed, data_dir)
    from .calibration import sequential_pass

    saved = detach_adapters(model)  # plain linears (holding the dense merged weights) for the driver

    def on_layer(task) -> None:
        if task.name in layers:
            apply(task.name, task.linear, task.stats.norm)

    sequential_pass(model, family, calib_ids, on_layer, needs=("norm",), layer_filter=lambda n: n in layers,
                    desc="re-prune (wanda)")
    # put the adapters back so the caller's detach sees a consistent model
    from .adapters.base import _set_module

    for name, ad in adapters.items():
        _set_module(model, name, ad)
    del saved


def _probe_ids(vocab: int, n: int = 2, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def portable_base(base_model: str, adapter_dir: os.PathLike) -> str:
    """How an adapter records its base: a path relative to the adapter directory when the base is a
    local path (so the pair can be moved together, and ``merge`` run from any directory finds it);
    a model name (``tiny-llama``, ``smollm2-135m``) as it is."""
    p = Path(str(base_model)).expanduser()
    if not str(base_model) or not p.exists():
        return str(base_model)
    return os.path.relpath(p.resolve(), Path(adapter_dir).resolve())


def resolve_adapter_base(base_model: Optional[str], adapter_dir: os.PathLike) -> Optional[str]:
    """The inverse of :func:`portable_base`: a relative path is read against the adapter directory
    first; adapters written before that rule stored it relative to the working directory of the
    run, which is tried second."""
    if not base_model:
        return base_model
    p = Path(str(base_model)).expanduser()
    if p.is_absolute():
        return str(p)
    beside = Path(adapter_dir) / p
    if beside.exists():
        return str(beside)
    return str(base_model)


def merge_adapter_dir(adapter_dir: os.PathLike, out: os.PathLike, *, base: Optional[str] = None,
                      reprune: str = "wanda", overwrite: bool = False, data_dir=None, protocol: str = "quick",
                      dtype: str = "float32", logit_tol: float = 1e-3) -> tuple[Path, MergeReport]:
    """Load the base model recorded in ``adapter_dir`` (or ``base``), attach and load the adapters,
    merge, verify (sparsity, pattern, logits against the adapter model), and write a checkpoint whose
    manifest carries the history forward."""
    import warnings

    from .adapters.io import attach_saved_adapter, read_adapter_config
    from .checkpoint_step import checkpoint_step
    from .manifest import build_manifest
    from .models import load_model

    meta = read_adapter_config(adapter_dir)
    base_spec = base or resolve_adapter_base(meta.get("base_model"), adapter_dir)
    if not base_spec:
        raise ConfigError(f"{adapter_dir} does not name its base model; pass --base DIR")
    bases: dict[str, Any] = {}

    def load():
        lm = load_model(base_spec, dtype)
        if lm.manifest is None:
            warnings.warn(f"{base_spec} has no sparsity manifest: the merge checks against masks inferred from zeros",
                          UserWarning, stacklevel=4)
        bases["manifest"] = lm.manifest or build_manifest(lm.model, lm.family, base_model=str(base_spec))
        attach_saved_adapter(lm.model, lm.family, adapter_dir, lm.manifest)
        return lm

    def work(lm) -> MergeReport:
        return _merge_and_compare(lm, bases["manifest"], reprune, data_dir, protocol, logit_tol)

    def manifest(lm, report: MergeReport):
        step = {"stage": "merge", "method": meta["method"], "adapter": str(adapter_dir), "reprune": report.reprune,
                "merge": report.as_dict(), "train": meta.get("train")}
        man = build_manifest(lm.model, lm.family, previous=bases["manifest"], step=step)
        _check_merged_manifest(man, bases["manifest"], report)
        return man

    done = checkpoint_step(out, overwrite=overwrite, inputs=(adapter_dir, base_spec), load=load, work=work,
                           manifest=manifest)
    done.result.checkpoint = str(done.out)
    return done.out, done.result


def _merge_and_compare(lm, base_manifest, reprune: str, data_dir, protocol: str, logit_tol: float) -> MergeReport:
    """Merge the attached adapters and compare logits on a fixed probe with the adapter model's: a
    mask-keeping merge must reproduce them (within ``logit_tol``, relative to the largest logit)."""
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    probe = _probe_ids(vocab)
    lm.model.eval()
    with torch.no_grad():
        before = lm.model(probe, use_cache=False).logits.float()
    report = merge_adapters(lm.model, lm.family, manifest=base_manifest, reprune=reprune, tokenizer=lm.tokenizer,
                            data_dir=data_dir, protocol=protocol)
    with torch.no_grad():
        after = lm.model(probe, use_cache=False).logits.float()
    report.max_abs_logit_diff = float((after - before).abs().max())
    if report.reprune is None:
        tol = logit_tol * max(1.0, float(before.abs().max()))
        if report.max_abs_logit_diff > tol:
            raise MergeError(f"merged logits differ from the adapter model's by {report.max_abs_logit_diff:.3g} "
                             f"(tolerance {tol:.3g})")
    return report


def _check_merged_manifest(manifest, base_manifest, report: MergeReport) -> None:
    """Per layer, the merged nonzeros equal the base's (unless SEFT re-pruned globally), and a
    mask-keeping merge keeps the mask digest."""
    for name, rec in manifest.layers.items():
        b = base_manifest.layers.get(name)
        if b is None:
            continue
        check = report.layers.get(name, {}).get("merge_check", "mask")
        if rec.nnz != b.nnz and check != "total":
            raise MergeError(f"{name}: {rec.nnz} nonzeros after merge, base had {b.nnz}")
        if report.reprune is None and check == "mask" and rec.mask_sha256 != b.mask_sha256:
            raise MergeError(f"{name}: mask digest changed by a mask-keeping merge")
