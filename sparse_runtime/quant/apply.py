"""Quantize a whole model's kept weights: every block linear and, by default, the lm_head.

Two methods (``docs/quantization.md``):

- ``rtn``: round to nearest on the scheme's grid, layer by layer, no data;
- ``gptq``: GPTQ's column loop with the mask fixed (:func:`sparse_runtime.quant.gptq.gptq_quantize`)
  inside the sequential calibration driver (:mod:`sparse_runtime.calibration`), as GPTQ's
  ``llama_sequential`` does: each block's Hessians come from the outputs of the blocks before it,
  already quantized. The lm_head's Hessian is taken from the last block's outputs after the final
  norm (the official GPTQ keeps the head in full precision; issue #21 needs it quantized because
  every token reads it).

The mask is kept exactly: a pruned weight stays 0; a kept weight whose value rounds to 0 is counted
(``rounded_to_zero``) and stored as the smallest normal float32 (see :mod:`sparse_runtime.quant.io`),
so ``W != 0``, the manifest's digests and N:M are unchanged. A tied lm_head IS the embedding table:
quantizing it puts the dequantized values in the embedding too (recorded as ``lm_head.tied``).

In memory only: a model that the prune verb would stream (more than 60 % of the available memory
in float32) is refused before it is loaded, in one line.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .scheme import CLIPS, QuantizedWeight, QuantScheme, quantize_rtn

METHODS = ("rtn", "gptq")
SIDE_REPORT = "quantize_report.json"


@dataclass
class QuantizeConfig:
    """``scheme`` (``int8``, ``int4-g128``, ``int4-g128-asym``, ...), ``method`` (``rtn`` | ``gptq``),
    ``lm_head`` (quantize it too, tied or not: default yes), GPTQ's ``percdamp`` and ``blocksize``,
    and its calibration (``protocol``'s C4 windows unless ``nsamples``/``seqlen``/``seed`` say otherwise)."""

    scheme: str = "int8"
    method: str = "rtn"
    lm_head: bool = True
    percdamp: float = 0.01
    blocksize: int = 128
    protocol: Optional[str] = None  # default quick
    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: Optional[int] = None
    device: Optional[str] = None
    batch_size: int = 8
    clip: str = "none"  # "mse": each group's range searched for the least rounding error (GPTQ's mse option)

    def validate(self) -> "QuantizeConfig":
        from .gptq import check_blocksize

        scheme = QuantScheme.parse(self.scheme)
        if self.method not in METHODS:
            raise ConfigError(f"quantization method {self.method!r}: use {' or '.join(METHODS)}")
        if self.clip not in CLIPS:
            raise ConfigError(f"quantization clip {self.clip!r}: use {' or '.join(CLIPS)}")
        if not isinstance(self.lm_head, bool):
            raise ConfigError(f"quantize lm_head must be true or false, got {self.lm_head!r}")
        if not 0 <= float(self.percdamp) < 10:
            raise ConfigError(f"percdamp must be in [0, 10), got {self.percdamp}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"blocksize must be an integer >= 1, got {self.blocksize!r}")
        check_blocksize(scheme, self.blocksize)
        for name in ("nsamples", "seqlen", "seed"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1)):
                raise ConfigError(f"quantize {name} must be a positive integer, got {v!r}")
        return self

    @property
    def quant_scheme(self) -> QuantScheme:
        return QuantScheme.parse(self.scheme)

    def calibration(self) -> dict[str, Any]:
        from ..protocols import get_protocol

        p = get_protocol(self.protocol or "quick")
        return {"protocol": p.name, "nsamples": self.nsamples or p.calib_samples,
                "seqlen": self.seqlen or p.calib_seqlen, "seed": p.calib_seed if self.seed is None else self.seed}


@dataclass
class QuantizeResult:
    """What was quantized: per layer the kept count and the kept weights that round to 0."""

    scheme: str
    method: str
    layers: list[str]
    kept: int
    rounded_to_zero: int
    per_layer: dict[str, dict[str, int]]
    lm_head: dict[str, Any]
    calibration: Optional[dict[str, Any]]
    timing: dict[str, float]
    checkpoint: Optional[str] = None
    grids: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=dict, repr=False)
    clip: str = "none"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("grids")
        return d

    def record(self) -> dict[str, Any]:
        """The manifest's ``extra["quantization"]``."""
        return {"scheme": self.scheme, "method": self.method, "clip": self.clip, "layers": self.layers,
                "rounded_to_zero": {"total": self.rounded_to_zero, "kept": self.kept,
                                    "per_layer": {n: v["rounded_to_zero"] for n, v in self.per_layer.items()}},
                "lm_head": self.lm_head}


def head_is_tied(model: nn.Module, family) -> bool:
    head = model.get_output_embeddings()
    embed = family.embed(model)
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def check_widths(model: nn.Module, family, scheme: QuantScheme, lm_head: bool) -> list[tuple[str, nn.Linear]]:
    """The weights to quantize, ``(param name, module)``; raises one line if a width does not fit the group."""
    targets = [(f"{n}.weight", lin) for n, lin in family.iter_linears(model)]
    if lm_head:
        head = model.get_output_embeddings()
        if head is None:
            raise ConfigError("this model has no output embedding (lm_head) to quantize: pass --keep-lm-head")
        targets.append((f"{family.head_path}.weight", head))
    for name, lin in targets:
        scheme.check(lin.weight.shape[1], name.removesuffix(".weight"))
    return targets


@torch.no_grad()
def write_quantized(linear: nn.Module, qw: QuantizedWeight) -> None:
    """Put the dequantized values into ``linear.weight`` in place; a kept 0 holds the smallest normal
    float so the mask stays ``W != 0`` (tied embedding included: same tensor)."""
    from ..pruning.base import fix_kept_zeros_

    w = qw.dequantize()
    fix_kept_zeros_(w, qw.mask)
    linear.weight.data.copy_(w.to(device=linear.weight.device, dtype=linear.weight.dtype))


@torch.no_grad()
def quantize_model(model: nn.Module, tokenizer, cfg: QuantizeConfig, *, family=None, data_dir=None,
                   calib_ids: Optional[torch.Tensor] = None) -> QuantizeResult:
    """Quantize ``model`` in place (see the module docstring); returns the per-layer facts and, in
    ``grids``, every weight's scales and zeros (for the checkpoint's side file)."""
    from ..models.family import family_of
    from ..progress import progress
    from .gptq import gptq_quantize

    cfg.validate()
    family = family or family_of(model)
    scheme = cfg.quant_scheme
    targets = check_widths(model, family, scheme, cfg.lm_head)
    head_name = f"{family.head_path}.weight"
    tied = cfg.lm_head and head_is_tied(model, family)
    t0 = time.perf_counter()
    per_layer: dict[str, dict[str, int]] = {}
    grids: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def done(name: str, linear: nn.Module, qw: QuantizedWeight) -> None:
        write_quantized(linear, qw)
        per_layer[name] = {"kept": int(qw.mask.sum()), "rounded_to_zero": qw.rounded_to_zero}
        grids[name] = (qw.scales, qw.zeros)

    gptq = dict(percdamp=float(cfg.percdamp), blocksize=int(cfg.blocksize), clip=cfg.clip)
    calib = None
    if cfg.method == "rtn":
        for name, lin in progress(targets, desc="quantize (rtn)"):
            w = lin.weight.data.float().cpu()
            done(name, lin, quantize_rtn(w, scheme, w != 0, clip=cfg.clip))
    else:
        calib = cfg.calibration()
        head_stats = _run_gptq(model, tokenizer, family, cfg, calib, data_dir, calib_ids, done, gptq)
        if cfg.lm_head:
            head = model.get_output_embeddings()
            w = head.weight.data.float()
            done(head_name, head, gptq_quantize(w, head_stats.hessian, scheme, w != 0, name="lm_head", **gptq))
    layers = [n for n, _ in targets]
    head_info: dict[str, Any] = {"quantized": cfg.lm_head, "tied": tied}
    if cfg.lm_head:
        head_info["param"] = head_name
        head_info["rounded_to_zero"] = per_layer[head_name]["rounded_to_zero"]
        if tied:  # the embedding table is the same tensor: it now holds the dequantized values
            head_info["embedding"] = f"{family.embed_path}.weight"
    return QuantizeResult(scheme.name, cfg.method, layers, sum(v["kept"] for v in per_layer.values()),
                          sum(v["rounded_to_zero"] for v in per_layer.values()), per_layer, head_info, calib,
                          {"quantize_s": time.perf_counter() - t0}, grids=grids, clip=cfg.clip)


def _run_gptq(model, tokenizer, family, cfg: QuantizeConfig, calib: dict, data_dir, calib_ids, done, gptq):
    """The sequential pass: GPTQ on each block linear from its Hessian; returns the lm_head's input
    statistics (the last block's outputs through the final norm) when the head is to be quantized."""
    from ..calibration import InputStatistics, sequential_pass
    from .gptq import gptq_quantize

    if calib_ids is None:
        from ..data.text import c4_windows

        calib_ids = c4_windows(tokenizer, calib["nsamples"], calib["seqlen"], calib["seed"], data_dir)
    scheme = cfg.quant_scheme
    blocks = family.blocks(model)
    norm = model.get_submodule(family.norm_path)
    head = model.get_output_embeddings()
    head_stats = InputStatistics(head.weight.shape[1], frozenset({"hessian"})) if cfg.lm_head else None

    def on_layer(task) -> None:
        w = task.linear.weight.data.float()
        done(f"{task.name}.weight", task.linear,
             gptq_quantize(w, task.stats.hessian, scheme, w != 0, name=task.name, **gptq))

    def on_block_end(bi, block, inputs, outs) -> None:
        if head_stats is not None and bi == len(blocks) - 1:
            dev = outs[0].device
            home = next(norm.parameters()).device
            norm.to(dev)
            for h in outs:
                head_stats.add_batch(norm(h))
            norm.to(home)

    sequential_pass(model, family, calib_ids, on_layer, needs=("hessian",), device=cfg.device,
                    batch_size=cfg.batch_size, on_block_end=on_block_end, desc="quantize (gptq)")
    return head_stats


def refuse_big(model_spec) -> None:
    """One line, before loading, for a model the in-memory path cannot hold."""
    from ..models.streaming import stream_path

    text = str(model_spec)
    if text.lower().startswith("tiny") or text.lower().endswith(".gguf"):
        return
    if stream_path(model_spec, "float32", "auto") is not None:
        raise ConfigError(f"quantize runs in memory and {model_spec} in float32 needs more than 60 % of the memory "
                          "available: run it on a machine with more memory (a streamed quantize is not built yet)")


def quantize_checkpoint(model_spec, cfg: QuantizeConfig, out, *, overwrite: bool = False, data_dir=None,
                        calib_ids: Optional[torch.Tensor] = None) -> QuantizeResult:
    """Load ``model_spec`` (a checkpoint, dense or pruned), quantize it, write ``out``: the
    dequantized float32 weights, ``quantization.safetensors``, the manifest (previous history
    carried forward, a ``quantize`` step, ``extra["quantization"]``) and ``quantize_report.json``,
    atomically (:func:`sparse_runtime.checkpoint_step.checkpoint_step`)."""
    import json

    from ..checkpoint_step import checkpoint_step, refuse_output
    from ..manifest import build_manifest
    from ..models import load_model

    from .io import read_quantization

    cfg.validate()
    out = refuse_output(out, overwrite, (model_spec,))
    p = Path(str(model_spec)).expanduser()
    done = read_quantization(p) if p.is_dir() else None
    if done is not None:
        raise ConfigError(f"{model_spec} is already quantized ({done.scheme.name}); quantize the unquantized "
                          "checkpoint it came from")
    refuse_big(model_spec)

    def load():
        lm = load_model(model_spec, "float32")
        prev = (lm.manifest.extra.get("quantization") if lm.manifest is not None else None)
        if prev:
            raise ConfigError(f"{model_spec} is already quantized ({prev.get('scheme')}); quantize the "
                              "unquantized checkpoint it came from")
        check_widths(lm.model, lm.family, cfg.quant_scheme, cfg.lm_head)  # one line before any work
        return lm

    def work(lm) -> QuantizeResult:
        return quantize_model(lm.model, lm.tokenizer, cfg, family=lm.family, data_dir=data_dir, calib_ids=calib_ids)

    def manifest(lm, res: QuantizeResult):
        prev = lm.manifest
        res.checkpoint = str(out)
        step = {"stage": "quantize", "input": str(model_spec), "config": asdict(cfg), "scheme": res.scheme,
                "method": res.method, "rounded_to_zero": res.rounded_to_zero, "kept": res.kept,
                "lm_head": res.lm_head, "calibration": res.calibration, "timing": res.timing}
        p = Path(str(model_spec)).expanduser()
        dense = prev.dense_source if prev is not None and prev.dense_source else (
            str(p.resolve()) if p.exists() else str(model_spec))
        base = prev.base_model if prev is not None and prev.base_model else str(model_spec)
        return build_manifest(lm.model, lm.family, base_model=base, dense_source=dense, previous=prev, step=step,
                              extra={"quantization": res.record()})

    def write_extra(tmp: Path, res: QuantizeResult) -> None:
        write_side_file(tmp, res)
        (tmp / SIDE_REPORT).write_text(json.dumps(res.as_dict(), indent=1, default=str))

    return checkpoint_step(out, overwrite=overwrite, inputs=(model_spec,), load=load, work=work,
                           manifest=manifest, write_extra=write_extra).result


def joint_quantization(model: nn.Module, family, quantized: Optional[dict]) -> Optional[QuantizeResult]:
    """The quantization record and grids of a model the SparseGPT pruner quantized jointly
    (``SparseGPTOptions.quant``; ``quantized`` is the pruner's ``{layer: {scheme, scales, zeros,
    kept, rounded_to_zero}}``), for ``prune`` to write the same side file and manifest record as
    ``quantize``; None without one. Every layer's values must still be on its grid with its kept
    count (a refiner after the pruner would move them): one line otherwise."""
    from ..errors import SparseRuntimeError
    from .scheme import codes_from

    if not quantized:
        return None
    lins = dict(family.iter_linears(model))
    per_layer: dict[str, dict[str, int]] = {}
    grids: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    scheme = None
    for name, q in quantized.items():
        scheme = q["scheme"]
        w = lins[name].weight.data.float().cpu()
        stored = torch.where(w.abs() < torch.finfo(torch.float32).tiny * 2, torch.zeros(()), w)
        back = codes_from(w, q["scales"], q["zeros"], scheme, w != 0).dequantize()
        if int((w != 0).sum()) != q["kept"] or not torch.equal(back, stored):
            raise SparseRuntimeError(f"{name}: its values left the {scheme.name} grid after the joint quantization (a "
                                     "refiner?): prune with the quant option and no --refine, or quantize after the repair")
        per_layer[f"{name}.weight"] = {"kept": q["kept"], "rounded_to_zero": q["rounded_to_zero"]}
        grids[f"{name}.weight"] = (q["scales"], q["zeros"])
    return QuantizeResult(scheme.name, "sparsegpt-joint", list(per_layer), sum(v["kept"] for v in per_layer.values()),
                          sum(v["rounded_to_zero"] for v in per_layer.values()), per_layer,
                          {"quantized": False, "tied": head_is_tied(model, family)}, None, {}, grids=grids)


def write_side_file(directory: Path, res: QuantizeResult) -> None:
    """``quantization.safetensors`` for ``res`` (aliases: a tied embedding -> the lm_head)."""
    from .io import write_quantization

    aliases = {res.lm_head["embedding"]: res.lm_head["param"]} if res.lm_head.get("embedding") else {}
    write_quantization(directory, QuantScheme.parse(res.scheme), res.grids, aliases)
