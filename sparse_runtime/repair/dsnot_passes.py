"""DSnoT over a whole model: the options glue, the refiner fused into pruning's pass, and the
standalone repair of a pruned checkpoint (the ``repair`` verb).

:mod:`sparse_runtime.repair.dsnot` holds the method itself (one layer's prune-and-grow, its
configuration and input moments); this module runs it inside the sequential driver
(:func:`sparse_runtime.calibration.sequential_pass`), once fused with a pruner
(:class:`DSnoTRefiner`, what ``prune --refine dsnot`` uses) and once on a checkpoint that is
already pruned (:func:`repair_dsnot_checkpoint`, written through the shared
:func:`sparse_runtime.checkpoint_step.checkpoint_step`). Everything here is re-exported by
:mod:`sparse_runtime.repair.dsnot`, which imports this module last so that importing it registers
the ``dsnot`` refiner.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import torch

from ..errors import ConfigError
from ..sparsity import NMPattern
from .dsnot import DSNOT_NEEDS, DSnoTConfig, InputMoments, dsnot_needs, refine_linear
from .dsnot_heldout import SwapLedger, accept_on_heldout, compare_on_heldout, heldout_ids

# accept=compare without the pruner's own pass to compare against (standalone repair, or a caller
# of on_pass_end that did not run it)
NO_BASELINE_PASS = ("dsnot accept=compare needs the pruner's own pass, which only a pruning run makes (prune --refine "
                    "dsnot); in repair, use accept=heldout (its input is the pruner's model)")
# Official command-line names accepted as aliases (the released code's argparse flags).
_ALIASES = {"max_cycle_time": "max_cycles", "update_threshold": "threshold", "pow_of_var_regrowing": "var_power"}


def make_config(options: Optional[dict[str, Any]] = None, cfg: Optional[DSnoTConfig] = None) -> DSnoTConfig:
    """A validated :class:`DSnoTConfig` from keyword options.

    Accepts the field names, the official flags ``max_cycle_time``, ``update_threshold``,
    ``pow_of_var_regrowing`` and ``without_same_sign``, and ``preset="official"`` (the released
    code's behaviour, see :meth:`DSnoTConfig.official`) which the other options then override.
    """
    opts = dict(options or {})
    preset = opts.pop("preset", None)
    if preset not in (None, "paper", "default", "official"):
        raise ConfigError(f"dsnot preset {preset!r} is unknown; choose 'default' or 'official'")
    base = cfg or (DSnoTConfig.official() if preset == "official" else DSnoTConfig())
    kw: dict[str, Any] = {}
    for k, v in opts.items():
        if k == "without_same_sign":
            kw["same_sign"] = None if v is None else not bool(v)
            continue
        key = _ALIASES.get(k, k)
        if key not in DSnoTConfig.__dataclass_fields__:
            raise ConfigError(f"unknown dsnot option {k!r}; known: {sorted(DSnoTConfig.__dataclass_fields__)} "
                              f"(or the official {sorted(_ALIASES) + ['without_same_sign']}, preset)")
        kw[key] = v
    for key in ("max_cycles", "guard_samples", "heldout_windows"):
        if isinstance(kw.get(key), float) and float(kw[key]).is_integer():
            kw[key] = int(kw[key])
    if kw.get("guard") is False or kw.get("guard") is None and "guard" in kw:
        kw["guard"] = "none"  # YAML reads `guard: off` / `guard: null` as False / None
    if "threshold" in kw:
        try:
            kw["threshold"] = float(kw["threshold"])
        except (TypeError, ValueError):
            raise ConfigError(f"dsnot threshold must be a number, got {kw['threshold']!r}") from None
    return replace(base, **kw).validate()


@dataclass
class LayerRecord:
    """What DSnoT did to one linear (for reports and the manifest's history)."""

    rows: int
    rows_changed: int
    swaps: int
    mean_abs_error_before: float
    mean_abs_error_after: float
    seconds: float
    reverted: bool = False  # the block guard put the pruner's mask back (swaps then counts none)
    swaps_reverted: int = 0


class DSnoTRefiner:
    """The :class:`~sparse_runtime.pruning.base.MaskRefiner` the prune API runs inside its pass
    (fused mode: statistics of the dense block, the mask just made, one pass in all).

    Constructed with DSnoT options as keywords (see :func:`make_config`). Layers outside
    ``cfg.layers`` come back unchanged. ``records`` and ``seconds`` describe the work done
    (``seconds`` includes the block guard's forwards).

    The block guard (``cfg.guard == "block"``) runs in :meth:`on_block_end`, which the driver calls
    after the pruned block's forward: it keeps DSnoT's masks only where they lowered the block's
    output error against the dense block, else it writes the pruner's weights back and replaces the
    block's outputs, so the next block sees the block that was kept.
    """

    needs = DSNOT_NEEDS

    def __init__(self, cfg: Optional[DSnoTConfig] = None, **options: Any) -> None:
        self.cfg = make_config(options, cfg)
        self.needs = dsnot_needs(self.cfg)
        self.records: dict[str, LayerRecord] = {}
        self.seconds = 0.0
        self.guard_seconds = 0.0
        self.guard_log: list[dict[str, Any]] = []  # per guarded block: errors and the decision
        # block index -> {name: (linear, dense weight, pruner's weight)} until the guard has run
        self._pending: dict[int, dict[str, tuple[Any, torch.Tensor, torch.Tensor]]] = {}
        # accept="heldout": DSnoT's weights wait until the block's (pruner) forward is done
        self.ledger = SwapLedger()
        self._deferred: dict[int, list[tuple[Any, torch.Tensor]]] = {}
        self.heldout_log: Optional[dict[str, Any]] = None

    @torch.no_grad()
    def refine(self, task, dense_weight: torch.Tensor, pruned_weight: torch.Tensor, keep: torch.Tensor,
               pattern: Optional[NMPattern], sparsity: float) -> torch.Tensor:
        if self.cfg.guard != "none":  # the guard needs the block's dense and pruner's weights
            if task.block_index not in self._pending:
                self._pending.clear()  # a driver that never calls on_block_end holds one block at most
            self._pending.setdefault(task.block_index, {})[task.name] = (task.linear, dense_weight.detach(),
                                                                          pruned_weight.detach().clone())
        if not self.cfg.applies_to(task.short):
            return pruned_weight
        t0 = time.perf_counter()
        new, res = refine_linear(dense_weight, pruned_weight, InputMoments.from_stats(task.stats), self.cfg,
                                 pattern, keep)
        dt = time.perf_counter() - t0
        self.seconds += dt
        s = res.summary()
        self.records[task.name] = LayerRecord(s["rows"], s["rows_changed"], s["swaps"], s["mean_abs_error_before"],
                                              s["mean_abs_error_after"], dt)
        if self.cfg.accept == "heldout":
            # the block runs with the pruner's weights, so the next block's inputs (and so its masks
            # and statistics) are the pruner's own; DSnoT's are written in on_block_end
            self.ledger.record(task.name, task.linear, pruned_weight.detach(), new)
            self._deferred.setdefault(task.block_index, []).append((task.linear, new))
            return pruned_weight
        return new

    @torch.no_grad()
    def on_block_end(self, bi: int, block, inputs, outputs: Optional[list[torch.Tensor]]) -> None:
        """The block guard (docs/dsnot.md#the-block-guard): after the driver ran the pruned block,
        compare its output error against the dense block with the pruner's masks' error, on the
        first ``guard_samples`` calibration windows (same inputs for all three). Where DSnoT did not
        lower it, write the pruner's weights back and replace ``outputs`` in place (the driver
        hands that list to the next block)."""
        for lin, new in self._deferred.pop(bi, []):  # accept="heldout": after the pruner's forward
            lin.weight.data.copy_(new.to(lin.weight.device, lin.weight.dtype))
        pending = self._pending.pop(bi, {})
        if self.cfg.guard == "none" or not pending or inputs is None or outputs is None:
            return
        changed = [n for n, (lin, _, pw) in pending.items()
                   if not torch.equal(lin.weight.data, pw.to(lin.weight.device, lin.weight.dtype))]
        if not changed:
            return
        from ..calibration import _block_forward

        t0 = time.perf_counter()
        batches, seen = [], 0
        for i, h in enumerate(inputs.hidden):  # whole mini-batches (the kwargs are shaped for them)
            if seen >= self.cfg.guard_samples:
                break
            batches.append(i)
            seen += h.shape[0]

        def load(which: int) -> None:  # 1 = dense, 2 = the pruner's
            for lin, *w in pending.values():
                lin.weight.data.copy_(w[which - 1].to(lin.weight.device, lin.weight.dtype))

        refined = {n: lin.weight.data.clone() for n, (lin, _, _) in pending.items()}
        load(1)
        dense = [_block_forward(block, inputs.hidden[i], inputs.kwargs) for i in batches]
        load(2)
        plain = [_block_forward(block, inputs.hidden[i], inputs.kwargs) for i in batches]

        def sq_err(outs: list[torch.Tensor]) -> float:
            return sum(float((o.double() - d.double()).pow(2).sum()) for o, d in zip(outs, dense))

        err_dsnot, err_plain = sq_err([outputs[i] for i in batches]), sq_err(plain)
        keep_dsnot = err_dsnot < err_plain
        if keep_dsnot:
            for n, (lin, _, _) in pending.items():
                lin.weight.data.copy_(refined[n])
        else:  # the pruner's weights stay; the next block must see this block's outputs
            for j, i in enumerate(batches):
                outputs[i] = plain[j]
            for i in range(len(outputs)):
                if i not in batches:
                    outputs[i] = _block_forward(block, inputs.hidden[i], inputs.kwargs)
            for n in changed:
                rec = self.records.get(n)
                if rec is not None:
                    rec.swaps_reverted, rec.swaps, rec.rows_changed = rec.swaps, 0, 0
                    rec.mean_abs_error_after, rec.reverted = rec.mean_abs_error_before, True
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.guard_seconds += dt
        self.guard_log.append({"block": bi, "error_dsnot": err_dsnot, "error_pruner": err_plain,
                               "kept": bool(keep_dsnot), "windows": seen})

    @property
    def wants_baseline_pass(self) -> bool:
        """``accept="compare"``: the prune API runs the pruner's own pass first and hands its weights
        to :meth:`on_pass_end` (``baseline``)."""
        return self.cfg.accept == "compare"

    def check_run(self, *, streamed: bool, allocation: Optional[str]) -> None:
        """Refuse, before any work, a pass this configuration cannot serve (the prune API calls it)."""
        a = self.cfg.accept
        if a == "always":
            return
        if streamed:
            raise ConfigError(f"dsnot accept={a} needs the whole model in memory for its held-out check: "
                              f"use --stream off, or drop accept={a}")
        if allocation == "atp":
            raise ConfigError(f"dsnot accept={a} cannot follow ATP's beta search (it reuses a trial's weights): "
                              "use accept=always with --allocation atp")

    @torch.no_grad()
    def on_pass_end(self, model, tokenizer, *, seqlen: int, seed: int, data_dir=None, baseline=None) -> None:
        """The held-out acceptance (docs/dsnot.md#held-out-acceptance): keep DSnoT's weights only if
        they lower the model's held-out perplexity, else put the pruner's back everywhere.
        ``accept="heldout"``: the pruner's weights are the ledger's; ``accept="compare"``: they are
        the pruner's own pass, ``baseline`` = ``(weights, snapshot, restore)`` from the prune API.
        ``seed`` draws the C4 held-out windows (calibration seed + 1000)."""
        for bi in list(self._deferred):  # a driver that did not call on_block_end for some block
            self.on_block_end(bi, None, None, None)
        if self.cfg.accept == "always":
            return
        if self.cfg.accept == "compare" and baseline is None:
            raise ConfigError(NO_BASELINE_PASS)
        t0 = time.perf_counter()
        ids = heldout_ids(tokenizer, self.cfg.heldout, self.cfg.heldout_windows, seqlen, seed, data_dir)
        if self.cfg.accept == "compare":
            decision = compare_on_heldout(model, baseline, ids, seqlen, self.summary()["swaps"])
        else:
            decision = accept_on_heldout(model, self.ledger, ids, seqlen)
        if not decision["kept"]:
            for rec in self.records.values():
                rec.swaps_reverted, rec.swaps, rec.rows_changed = rec.swaps, 0, 0
                rec.mean_abs_error_after, rec.reverted = rec.mean_abs_error_before, True
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.heldout_log = {"set": self.cfg.heldout, "windows": self.cfg.heldout_windows, "seqlen": seqlen,
                            "seconds": dt, **decision}
        self.ledger = SwapLedger()

    def summary(self) -> dict[str, Any]:
        """Totals over the refined layers: swaps (kept after the guard), rows changed, mean |e_r|
        before/after, seconds (guard included), and the guard's blocks kept and reverted."""
        recs = list(self.records.values())
        rows = sum(r.rows for r in recs)
        return {
            "layers": len(recs),
            "swaps": sum(r.swaps for r in recs),
            "rows_changed": sum(r.rows_changed for r in recs),
            "rows": rows,
            "mean_abs_error_before": sum(r.mean_abs_error_before * r.rows for r in recs) / max(1, rows),
            "mean_abs_error_after": sum(r.mean_abs_error_after * r.rows for r in recs) / max(1, rows),
            "seconds": self.seconds,
            "guard": self.cfg.guard,
            "blocks_guarded": len(self.guard_log),
            "blocks_reverted": [g["block"] for g in self.guard_log if not g["kept"]],
            "swaps_reverted": sum(r.swaps_reverted for r in recs),
            "guard_seconds": self.guard_seconds,
            "accept": self.cfg.accept,
            "heldout": self.heldout_log,
        }


try:  # the prune API resolves "dsnot" by importing this module
    from ..pruning.base import REFINERS

    REFINERS.register("dsnot")(DSnoTRefiner)
except ImportError:  # pragma: no cover - a build without the pruning package
    REFINERS = None



# -- standalone repair of a pruned checkpoint --------------------------------------------------------
@dataclass
class RepairReport:
    """What :func:`repair_dsnot_checkpoint` did: where, how long, and how much changed."""

    checkpoint: str
    dense_source: str
    config: dict[str, Any]
    calibration: dict[str, Any]
    summary: dict[str, Any]
    timing: dict[str, float]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SparseRuntimeInvariantError(RuntimeError):
    """An internal invariant broke (a bug, not a user error)."""


def _load_dense_weights(spec: str, family, names: list[str], dtype: str) -> dict[str, torch.Tensor]:
    """Only the block linears of the dense model (the rest is not needed and is dropped at once)."""
    from ..errors import ManifestError
    from ..models import load_model

    dense = load_model(spec, dtype)
    if dense.manifest is not None and dense.manifest.total_measured > 0:
        raise ManifestError(f"the dense source {spec!r} is itself sparse ({dense.manifest.total_measured:.1%} zeros); "
                            "DSnoT regrows weights from the dense model: pass dense=<the unpruned model>")
    weights = {n: lin.weight.detach().clone() for n, lin in dense.family.iter_linears(dense.model)}
    missing = [n for n in names if n not in weights]
    if missing:
        raise ManifestError(f"the dense source {spec!r} lacks layers of the pruned model ({', '.join(missing[:3])}); "
                            "it is another model: pass dense=<the model this checkpoint was pruned from>")
    del dense
    return weights


@dataclass
class _Loaded:
    """The pruned model and the dense weights DSnoT regrows from (what the step's ``load`` returns)."""

    lm: Any
    dense_spec: str
    dense_w: dict[str, torch.Tensor]
    dense_load_s: float

    @property
    def model(self):
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer


@torch.no_grad()
def repair_dsnot_checkpoint(pruned_dir, out, cfg: Optional[DSnoTConfig] = None, dense: Optional[str] = None,
                            overwrite: bool = False, data_dir=None, *, protocol: str = "quick",
                            nsamples: Optional[int] = None, seqlen: Optional[int] = None, seed: Optional[int] = None,
                            dtype: str = "float32", device: Optional[str] = None,
                            calib_ids: Optional[torch.Tensor] = None) -> RepairReport:
    """Run DSnoT on an already pruned checkpoint and write the repaired one to ``out``.

    The dense weights come from ``dense`` or, by default, the manifest's ``dense_source``. The
    sequential pass puts each block's dense weights back before its statistics pass (so the
    statistics are those of the dense layer, as when DSnoT is fused with pruning), refines every
    selected linear's mask from the checkpoint's, writes the result, and feeds the repaired block's
    outputs to the next block. Per-row counts, per-layer targets and N:M patterns are unchanged; the
    manifest carries the previous history forward and records this step.
    """
    from ..checkpoint_step import PhaseTimer, checkpoint_step
    from ..manifest import build_manifest
    from ..protocols import get_protocol

    cfg = (cfg or DSnoTConfig()).validate()
    if cfg.accept == "compare":
        raise ConfigError(NO_BASELINE_PASS)
    proto = get_protocol(protocol)
    calib = {"protocol": proto.name, "nsamples": nsamples or proto.calib_samples,
             "seqlen": seqlen or proto.calib_seqlen, "seed": proto.calib_seed if seed is None else seed}
    refiner = DSnoTRefiner(cfg)
    timer = PhaseTimer()

    def load() -> _Loaded:
        return _load_pruned_and_dense(pruned_dir, dense, dtype, device)

    def work(ld: _Loaded):
        ids = calib_ids
        if ids is None:
            from ..data.text import c4_windows

            ids = c4_windows(ld.tokenizer, calib["nsamples"], calib["seqlen"], calib["seed"], data_dir)
        timing = _repair_pass(ld, refiner, ids, device)
        refiner.on_pass_end(ld.model, ld.tokenizer, seqlen=proto.eval_seqlen, seed=calib["seed"] + 1000,
                            data_dir=data_dir)
        return timing

    def manifest(ld: _Loaded, timing):
        step = {"stage": "repair", "method": "dsnot", "input": str(pruned_dir), "dense": ld.dense_spec,
                "config": cfg.as_dict(), "calibration": calib, "summary": refiner.summary(),
                "timing": {"dsnot_s": refiner.seconds, "calibration_forward_s": timing.forward_s,
                           "pass_s": timing.total_s}}
        man = build_manifest(ld.model, ld.lm.family, previous=ld.lm.manifest, step=step)
        if device:
            ld.model.to("cpu")
        return man

    done = checkpoint_step(out, overwrite=overwrite, inputs=(pruned_dir, dense), load=load, work=work,
                           manifest=manifest, timer=timer)
    timing, ld = done.result, done.loaded
    t = {"total_s": done.timing["total_s"], "dsnot_s": refiner.seconds, "pass_s": timing.total_s,
         "calibration_forward_s": timing.forward_s, "dense_load_s": ld.dense_load_s}
    return RepairReport(str(done.out), ld.dense_spec, cfg.as_dict(), calib, refiner.summary(), t,
                        {n: asdict(r) for n, r in refiner.records.items()})


def _load_pruned_and_dense(pruned_dir, dense: Optional[str], dtype: str, device: Optional[str]) -> _Loaded:
    """The pruned checkpoint (it must carry a manifest) and the dense weights of its linears, checked
    to be the same model's."""
    from ..errors import ManifestError
    from ..models import load_model

    lm = load_model(pruned_dir, dtype)
    prev = lm.manifest
    if prev is None:
        raise ManifestError(f"{pruned_dir} has no sparsity manifest: DSnoT repairs a sparse-runtime pruned checkpoint "
                            "(run `sparse-runtime prune` first, or fuse: `prune --refine dsnot`)")
    dense_spec = dense or prev.dense_source
    if not dense_spec:
        raise ConfigError(f"{pruned_dir}'s manifest does not say where its dense weights are (dense_source); "
                          "pass dense=<model spec> (CLI: --dense)")
    if device:
        lm.model.to(device)
    names = [n for n, _ in lm.family.iter_linears(lm.model)]
    t0 = time.perf_counter()
    dense_w = _load_dense_weights(str(dense_spec), lm.family, names, dtype)
    for n, lin in lm.family.iter_linears(lm.model):
        if tuple(dense_w[n].shape) != tuple(lin.weight.shape):
            raise ManifestError(f"{n}: dense weight {tuple(dense_w[n].shape)} vs pruned {tuple(lin.weight.shape)}; "
                                f"{dense_spec!r} is not the model {pruned_dir} was pruned from")
    return _Loaded(lm, str(dense_spec), dense_w, time.perf_counter() - t0)


def _repair_pass(ld: _Loaded, refiner: DSnoTRefiner, calib_ids: torch.Tensor, device: Optional[str]):
    """One sequential pass: each block gets its dense weights back for its statistics, then every
    selected linear's mask is refined from the checkpoint's. Returns the driver's timing."""
    from ..calibration import sequential_pass
    from ..sparsity import parse_structure

    family, model, dense_w = ld.lm.family, ld.model, ld.dense_w
    patterns = {n: parse_structure(rec.structure) for n, rec in ld.lm.manifest.layers.items()}
    pruned_w: dict[str, torch.Tensor] = {}
    nnz_before = {n: (lin.weight != 0).sum(1) for n, lin in family.iter_linears(model)}

    def on_block_start(bi: int, block) -> None:
        # put the dense weights into the block so its statistics pass sees the dense layer's inputs
        for short, lin in family.block_linears(block).items():
            name = f"{family.blocks_path}.{bi}.{short}"
            pruned_w[name] = lin.weight.data.clone()
            lin.weight.data.copy_(dense_w[name].to(lin.weight.device, lin.weight.dtype))

    def on_layer(task) -> None:
        pruned = pruned_w.pop(task.name)
        dense_t = task.linear.weight.data.clone()
        keep = pruned != 0
        new = refiner.refine(task, dense_t, pruned, keep, patterns.get(task.name), 0.0)
        task.linear.weight.data.copy_(new.to(task.linear.weight.dtype))

    timing = sequential_pass(model, family, calib_ids, on_layer, needs=refiner.needs, device=device,
                             on_block_start=on_block_start, on_block_end=refiner.on_block_end, desc="dsnot repair")
    for n, lin in family.iter_linears(model):
        if not torch.equal((lin.weight != 0).sum(1).cpu(), nnz_before[n].cpu()):
            raise SparseRuntimeInvariantError(f"dsnot changed the per-row nonzero count of {n}; this is a bug")
    return timing
