"""The LoSA round loop (Huang et al., ICLR 2025; docs/methods.md#losa-round-loop), from the DENSE model by default.

Once, before the rounds: validate everything; draw the calibration windows; run the dense model
block by block and write each block's outputs on the calibration set to disk (one safetensors file
per block; memory stays bounded by one block); attach the masked LoRA (B = 0, so nothing changes).

Round t = 1..T:

1. merge: W <- W + s (B A) ⊙ M (the current effective weight); the adapters come off;
2. target s_t = S (1 - (1 - t/T)^3) (:mod:`.schedule`);
3. per-block sparsity from the registered allocation (:data:`sparse_runtime.allocation.ALLOCATIONS`):
   ``rmi``, RMI on the current model (Gram matrices only) and the LP with half-width delta(s_t)
   (:mod:`sparse_runtime.allocation.rmi`); or ATP / OWL / uniform at s_t;
4. re-prune the merged weights with Wanda or SparseGPT at those rates through the sequential driver,
   with one-shot pruning's own per-layer step (:func:`sparse_runtime.pruning.base.prune_layer`;
   optionally DSnoT on each layer, at the same point); already-zero weights score 0, so masks nest;
5. per block, reconstruction error of the (sequential, accumulated) sparse outputs O_l against the
   stored dense outputs D_l: err_l = sum((D_l - O_l) / ||D_l||_col)^2 / d;
6. ranks from the errors: total fixed (mean r + t - (T+1)/2), bounded in [r_min, r_max], exact
   (:mod:`.ranks`); each block's seven adapters are RESIZED to it (grow keeps the subspace, shrink
   truncates by SVD; :mod:`.adapter`);
7. unmerge: the adapters go back with the new mask M_t = 1[W_t != 0] and base W_t - s (B A) ⊙ M_t,
   so the effective weight is exactly the pruned one and the learned update carries over;
8. fine-tune this round's slice of the data (fresh optimiser and schedule, as the official code's
   fresh SFTTrainer per round);
9. verify: every layer's effective weight has exactly its pruned zeros (mask unchanged by training)
   and sits at its allocated rate (to the pruner's per-row rounding); the mean target is s_t.

Finally W' = W + s (B A) ⊙ M_T (:func:`sparse_runtime.merge.merge_adapters`, exact, checked), and
the checkpoint's manifest records per-round sparsities, ranks, errors and timings.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..allocation import ALLOCATIONS, AllocationRequest
from ..allocation.base import weighted_mean
from ..errors import CheckpointExistsError, ConfigError, SparseRuntimeError
from ..pruning.base import build_method, fix_kept_zeros_, prune_layer
from .config import LoSAConfig
from .ranks import allocate_ranks, round_rank_budget
from .schedule import sparsity_schedule

log = logging.getLogger(__name__)


class LoSAVerificationError(SparseRuntimeError):
    """A round left a layer off its allocated sparsity (a bug, never a user error)."""


@dataclass
class RoundRecord:
    round: int
    target: float
    delta: Optional[float]
    block_rates: list[float]
    measured_mean: float
    block_measured: list[float]
    ranks: list[int]
    rank_budget: int
    errors: list[float]
    importance: Optional[list[float]] = None
    steps: int = 0
    final_loss: Optional[float] = None
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class LoSAResult:
    rounds: list[RoundRecord]
    blocks: list[int]
    timing: dict[str, float]
    peak_rss_mb: float
    sparsity_measured: float
    calibration: dict[str, Any]
    checkpoint: Optional[str] = None
    plot: Optional[str] = None
    merge: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# ---------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measured_zeros(model, family, names) -> dict[str, int]:
    from ..adapters import SparseAdapter

    out = {}
    for n, lin in family.iter_linears(model):
        if n in names:
            w = lin.merged_weight() if isinstance(lin, SparseAdapter) else lin.weight.detach()
            out[n] = int((w == 0).sum())
    return out


def _keep_effective_nonzero_(w: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor) -> int:
    """Where a kept weight's effective value ``w + delta`` rounds to exactly zero, move ``w`` one ulp
    away. It happens when a layer's rate drops between rounds: a weight pruned earlier is kept again
    holding ``tiny``, and ``(tiny - d) + d`` rounds to 0. One ulp suffices: ``w = -d`` exactly there,
    and the sum of two floats that close is exact (Sterbenz), so it becomes +-ulp(d), not zero."""
    bad = keep & ((w.float() + delta) == 0)
    n = int(bad.sum())
    if n:
        away = torch.where(delta[bad] >= 0, torch.tensor(float("inf"), device=w.device),
                           torch.tensor(float("-inf"), device=w.device)).to(w.dtype)
        w[bad] = torch.nextafter(w[bad], away)
    return n


class _Job:
    """One LoSA run on one loaded model (state shared by the phases)."""

    def __init__(self, lm, cfg: LoSAConfig, data_dir, work: Path) -> None:
        from ..prune import PruneConfig, check_model, make_pruner, resolve_refiner

        self.lm, self.model, self.family, self.tok = lm, lm.model, lm.family, lm.tokenizer
        self.cfg, self.data_dir, self.work = cfg, data_dir, work
        self.calib = cfg.calibration()
        self.pcfg = PruneConfig(method=cfg.prune_method, sparsity=cfg.sparsity, percdamp=cfg.percdamp,
                                blocksize=cfg.blocksize, protocol=cfg.protocol, batch_size=cfg.batch_size,
                                offload=cfg.offload, device=cfg.device, method_options=dict(cfg.prune_options))
        self.pcfg.validate()
        self.selected, self.layout = check_model(self.model, self.family, self.pcfg)
        self.pruner = make_pruner(self.pcfg)
        self.refiner = resolve_refiner(cfg.refine, cfg.refine_options) if cfg.refine else None
        self.needs = frozenset(self.pruner.needs) | frozenset(getattr(self.refiner, "needs", ()) or ())
        self.L = len(self.layout.blocks)
        self.adapters: dict = {}
        self.timing = {"dense_reference_s": 0.0, "rmi_s": 0.0, "allocation_s": 0.0, "prune_s": 0.0,
                       "rank_s": 0.0, "finetune_s": 0.0, "verify_s": 0.0}

    # -- checks that need the model, before any work ----------------------------------------------
    def check(self) -> None:
        cfg = self.cfg
        T = cfg.rounds
        smallest = min(min(lin.in_features, lin.out_features) for _, _, lin in self.selected.values())
        if cfg.r_max > smallest and cfg.r_min > smallest:
            raise ConfigError(f"r_min {cfg.r_min} exceeds the smallest layer's rank limit {smallest}")
        for t in range(1, T + 1):
            budget = round_rank_budget(cfg.rank, t, T, self.L, cfg.rank_schedule)
            if budget < self.L * cfg.r_min:
                raise ConfigError(
                    f"round {t}'s rank budget {budget} is smaller than the {self.L} layers (x r_min {cfg.r_min}) "
                    f"it must cover (mean rank {cfg.rank} with the rising schedule over T={T} rounds starts at "
                    f"{cfg.rank - (T - 1) / 2:g}); raise --rank, lower --rounds, or use rank_schedule='constant'")
            if budget > self.L * min(cfg.r_max, smallest):
                raise ConfigError(f"round {t}'s rank budget {budget} exceeds {self.L} layers x r_max "
                                  f"{min(cfg.r_max, smallest)}; raise r_max or lower --rank")
        zeros = total = 0
        for _, _, lin in self.selected.values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
        measured = zeros / max(1, total)
        if measured > 1e-3 and not cfg.from_pruned:
            raise ConfigError(
                f"the input model is already {measured:.3f} sparse; LoSA prunes progressively from the DENSE model. "
                "Pass the dense model, or from_pruned=True (--from-pruned: a flat schedule at the target, a "
                "deviation from the paper)")
        if cfg.from_pruned and measured > cfg.sparsity + 1e-6:
            raise ConfigError(f"the input model is {measured:.3f} sparse, above the target {cfg.sparsity}; "
                              "LoSA never lowers sparsity")
        if cfg.allocation == "atp" and self.L < 2:
            raise ConfigError("allocation='atp' needs at least 2 blocks")
        if cfg.allocation == "owl":
            for s in sparsity_schedule(cfg.sparsity, T, cfg.resolved_schedule()):
                if cfg.owl_lambda > min(s, 1 - s) + 1e-12:
                    raise ConfigError(f"owl_lambda={cfg.owl_lambda} is too large for round sparsity {s:.4f} "
                                      f"(must be <= min(s_t, 1 - s_t)); lower owl_lambda")

    # -- data -------------------------------------------------------------------------------------
    def calibration_ids(self) -> torch.Tensor:
        from ..data.text import c4_windows

        c = self.calib
        return c4_windows(self.tok, c["nsamples"], c["seqlen"], c["seed"], self.data_dir)

    def training_slices(self, steps: list[int]):
        """Each round's examples: consecutive, disjoint slices of ONE data order over the total budget
        (so LoSA sees exactly the sequences a single run of sum(steps) steps would)."""
        from ..adapters import FINETUNE_METHODS
        from ..training.data import DataOrder, build_datasets

        total = sum(steps)
        if total == 0:
            return [[] for _ in steps]
        tcfg = self.cfg.training_config(total).resolved(FINETUNE_METHODS.get("losa").train_defaults)
        train, _ = build_datasets(tcfg, self.tok, self.data_dir)
        order = DataOrder(len(train), tcfg.data_seed)
        b = tcfg.batch_size
        out, pos = [], 0
        for s in steps:
            out.append([train[i] for i in order.indices(pos * b, s * b)])
            pos += s
        return out

    # -- the sequential passes --------------------------------------------------------------------
    def _pass(self, ids, on_layer=None, needs=(), layer_filter=None, on_block_end=None, desc="blocks"):
        from ..calibration import sequential_pass

        c = self.cfg
        return sequential_pass(self.model, self.family, ids, on_layer, needs=needs, layer_filter=layer_filter,
                               device=c.device, offload=c.offload, batch_size=c.batch_size,
                               on_block_end=on_block_end, desc=desc)

    def dense_reference(self, ids) -> None:
        from safetensors.torch import save_file

        def save(bi, block, inputs, outs) -> None:
            save_file({"out": torch.cat([o.detach().float().cpu() for o in outs], 0).contiguous()},
                      str(self.work / f"dense_block_{bi}.safetensors"))

        t0 = time.perf_counter()
        self._pass(ids, on_block_end=save, desc="LoSA dense reference")
        self.timing["dense_reference_s"] += time.perf_counter() - t0

    def reconstruction_error(self, bi: int, outs) -> float:
        from safetensors.torch import load_file

        D = load_file(str(self.work / f"dense_block_{bi}.safetensors"))["out"].double()
        O = torch.cat([o.detach().double().cpu() for o in outs], 0)
        D2 = D.reshape(-1, D.shape[-1])
        O2 = O.reshape(-1, O.shape[-1])
        col = D2.norm(dim=0).clamp_min(1e-12)
        return float((((D2 - O2) / col) ** 2).sum() / D2.shape[-1])

    # -- allocation -------------------------------------------------------------------------------
    def allocator_options(self, s_t: float):
        """This round's options of the registered allocation ``cfg.allocation`` (LoSA's fields mapped
        onto the allocator's ``Options``; OWL's lambda and ATP's beta are bounded by s_t each round)."""
        from ..allocation import ATPOptions, OWLOptions, RMIOptions, UniformOptions, atp_beta_max

        cfg = self.cfg
        if cfg.allocation == "rmi":
            return RMIOptions(delta=cfg.delta, features=cfg.rmi_features, samples=self.calib["rmi_samples"],
                              beta=cfg.effective_rmi_beta())
        if cfg.allocation == "owl":
            return OWLOptions(m=cfg.owl_m, lam=min(cfg.owl_lambda, s_t, 1 - s_t))
        if cfg.allocation == "atp":
            return ATPOptions(beta=cfg.atp_beta_fraction * atp_beta_max(s_t, self.layout.weights))
        return UniformOptions()

    def allocate(self, s_t: float, calib_ids) -> tuple[list[float], dict[str, Any]]:
        """Per-block rates for round target ``s_t`` from the registered allocation (:data:`ALLOCATIONS`),
        on the current (merged) model. The allocation's calibration pass (RMI's Gram matrices over the
        first ``rmi_samples`` windows, OWL's statistics) is timed as ``rmi_s``."""
        if self.cfg.allocation == "atp" and s_t <= 0:
            return [0.0] * self.L, {"beta": 0.0}  # no legal beta at sparsity 0
        allocator = build_method(ALLOCATIONS.get(self.cfg.allocation), self.allocator_options(s_t))

        def timed(fn):
            def run(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.timing["rmi_s"] += time.perf_counter() - t0
            return run

        filt = lambda n: n in self.selected  # noqa: E731
        stats_pass = timed(lambda on_layer, needs: self._pass(calib_ids, on_layer, needs, filt,
                                                              desc=f"LoSA {self.cfg.allocation} statistics"))
        block_pass = timed(lambda on_block_end, n: self._pass(calib_ids[:n], on_block_end=on_block_end,
                                                              desc="LoSA RMI (Gram)"))
        a = allocator.allocate(AllocationRequest(s_t, self.layout, self.pcfg, stats_pass=stats_pass,
                                                 block_pass=block_pass))
        return a.rates, a.info

    # -- one re-prune with reconstruction errors --------------------------------------------------
    def reprune(self, targets: dict[str, float], calib_ids) -> tuple[dict[int, float], dict[str, int]]:
        """One-shot pruning's own per-layer step (:func:`~sparse_runtime.pruning.base.prune_layer`) on the
        merged weights, with the mask made exact (``W != 0`` is the keep set: the adapters read it)."""
        errors: dict[int, float] = {}
        zeros: dict[str, int] = {}

        def on_layer(task) -> None:
            keep = prune_layer(task, targets[task.name], self.pruner, None, self.refiner, exact_mask=True)
            zeros[task.name] = int((~keep).sum())

        def on_block_end(bi, block, inputs, outs) -> None:
            errors[bi] = self.reconstruction_error(bi, outs)

        self._pass(calib_ids, on_layer, self.needs, lambda n: n in targets, on_block_end,
                   desc=f"LoSA re-prune ({self.cfg.prune_method})")
        return errors, zeros

    # -- adapters on / off ------------------------------------------------------------------------
    @torch.no_grad()
    def merge_in(self) -> None:
        from ..adapters import detach_adapters

        for ad in self.adapters.values():
            ad.base.weight.copy_(ad.merged_weight().to(ad.base.weight.dtype))
        detach_adapters(self.model)

    @torch.no_grad()
    def unmerge(self, ranks_by_block: dict[int, int]) -> None:
        from ..adapters.base import _set_module

        for name, ad in self.adapters.items():
            W = ad.base.weight
            keep = W != 0
            ad.set_mask(keep)
            # the rank first: a shrink (truncated SVD) changes the delta, and the delta subtracted here
            # must be the one that stays, so that W' + delta equals the re-pruned weight
            ad.set_rank(ranks_by_block[self.selected[name][0]])
            d = ad.delta_weight(masked=True)
            new = (W.float() - d).to(W.dtype)
            new[~keep] = 0
            fix_kept_zeros_(new, keep)
            _keep_effective_nonzero_(new, d, keep)
            W.copy_(new)
            _set_module(self.model, name, ad)

    def verify(self, targets: dict[str, float], zeros: dict[str, int], t: int) -> dict[int, float]:
        """Effective weights keep the pruned zeros exactly; each layer is at its allocated rate."""
        got = _measured_zeros(self.model, self.family, set(targets))
        by_block: dict[int, list[int]] = {}
        for name, z in got.items():
            lin = self.selected[name][2]
            n = lin.weight.numel()
            if z != zeros[name]:
                raise LoSAVerificationError(f"round {t}: {name} has {z} zeros, the re-prune left {zeros[name]}")
            if abs(z / n - targets[name]) > 1.0 / lin.in_features + 1e-9:
                raise LoSAVerificationError(f"round {t}: {name} is {z / n:.5f} sparse, allocated {targets[name]:.5f}")
            bi = self.selected[name][0]
            acc = by_block.setdefault(bi, [0, 0])
            acc[0] += z
            acc[1] += n
        return {b: v[0] / v[1] for b, v in by_block.items()}


# ---------------------------------------------------------------------------------------------
def _distill_teacher(lm, cfg: LoSAConfig):
    """The dense teacher of ``cfg.distill``: ``distill_teacher``, else the model LoSA starts from (the
    dense model; with ``from_pruned``, the dense model its manifest records)."""
    if cfg.distill == "none":
        return None
    from ..training.distill import load_teacher, teacher_spec

    spec = cfg.distill_teacher or (teacher_spec(None, lm.manifest, str(lm.source)) if cfg.from_pruned
                                   else str(lm.source))
    cfg.distill_teacher = spec  # recorded in each round's training configuration
    return load_teacher(spec, lm.model, device=next(lm.model.parameters()).device, mode=cfg.distill)


def run_losa_model(lm, cfg: LoSAConfig, *, data_dir=None, work_dir: Optional[Path] = None,
                   calib_ids: Optional[torch.Tensor] = None) -> LoSAResult:
    """Run LoSA on a loaded model in place (the adapters end merged: plain sparse linears)."""
    from ..adapters import attach_adapters, FINETUNE_METHODS
    from ..merge import merge_adapters
    from ..training.data import DataOrder
    from ..training.engine import Trainer

    cfg.validate()
    t_all = time.perf_counter()
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="losa-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        job = _Job(lm, cfg, data_dir, work)
        job.check()
        spec = FINETUNE_METHODS.get("losa")
        acfg = spec.make_config(**cfg.adapter_options())
        steps = cfg.steps_per_round()
        schedule = sparsity_schedule(cfg.sparsity, cfg.rounds, cfg.resolved_schedule())
        ids = calib_ids if calib_ids is not None else job.calibration_ids()
        slices = job.training_slices(steps)
        lm.model.eval()
        job.dense_reference(ids)
        torch.manual_seed(cfg.seed)
        job.adapters = attach_adapters(lm.model, spec, acfg, lm.family, layer_filter=lambda n: n in job.selected)
        teacher = _distill_teacher(lm, cfg)  # loaded once for every round (docs/finetuning.md#distillation)
        records: list[RoundRecord] = []
        for t in range(1, cfg.rounds + 1):
            rt: dict[str, float] = {}
            s_t = schedule[t - 1]
            job.merge_in()
            lm.model.eval()
            t0 = time.perf_counter()
            rmi0 = job.timing["rmi_s"]
            rates, info = job.allocate(s_t, ids)
            rt["rmi_s"] = job.timing["rmi_s"] - rmi0
            rt["allocation_s"] = time.perf_counter() - t0 - rt["rmi_s"]
            job.timing["allocation_s"] += rt["allocation_s"]
            mean = weighted_mean(rates, job.layout.weights)
            if abs(mean - s_t) > 1e-9:
                raise LoSAVerificationError(f"round {t}: allocation averages {mean}, not s_t = {s_t}")
            by_block = dict(zip(job.layout.blocks, rates))
            targets = {n: float(by_block[bi]) for n, (bi, _, _) in job.selected.items()}
            t0 = time.perf_counter()
            errors, zeros = job.reprune(targets, ids)
            rt["prune_s"] = time.perf_counter() - t0
            job.timing["prune_s"] += rt["prune_s"]
            t0 = time.perf_counter()
            budget = round_rank_budget(cfg.rank, t, cfg.rounds, job.L, cfg.rank_schedule)
            smallest = min(min(l.in_features, l.out_features) for _, _, l in job.selected.values())
            ranks = allocate_ranks([errors[b] for b in job.layout.blocks], budget, cfg.r_min, min(cfg.r_max, smallest))
            ranks_by_block = dict(zip(job.layout.blocks, ranks))
            job.unmerge(ranks_by_block)
            rt["rank_s"] = time.perf_counter() - t0
            job.timing["rank_s"] += rt["rank_s"]
            t0 = time.perf_counter()
            job.verify(targets, zeros, t)
            rt["verify_s"] = time.perf_counter() - t0
            final_loss = None
            if steps[t - 1] > 0:
                t0 = time.perf_counter()
                rcfg = cfg.training_config(steps[t - 1])
                rdir = work / f"round_{t}"
                rdir.mkdir(parents=True, exist_ok=True)
                trainer = Trainer(lm.model, lm.tokenizer, lm.family, "losa", acfg, rcfg, rdir,
                                  adapters=job.adapters, data_dir=data_dir, base_model=str(lm.source),
                                  teacher=teacher)
                trainer.train_set = slices[t - 1]
                trainer.order = DataOrder(len(trainer.train_set), trainer.cfg.data_seed + t)
                trainer.total_steps = steps[t - 1]
                res = trainer.train()
                final_loss = res.losses[-1] if res.losses else None
                rt["finetune_s"] = time.perf_counter() - t0
                job.timing["finetune_s"] += rt["finetune_s"]
                shutil.rmtree(rdir / "checkpoints", ignore_errors=True)  # optimiser state: not needed
            t0 = time.perf_counter()
            measured_blocks = job.verify(targets, zeros, t)
            rt["verify_s"] += time.perf_counter() - t0
            job.timing["verify_s"] += rt["verify_s"]
            meas = [measured_blocks[b] for b in job.layout.blocks]
            records.append(RoundRecord(
                round=t, target=s_t, delta=info.get("delta"), block_rates=[float(r) for r in rates],
                measured_mean=weighted_mean(meas, job.layout.weights), block_measured=meas, ranks=ranks,
                rank_budget=budget, errors=[errors[b] for b in job.layout.blocks],
                importance=info.get("importance"), steps=steps[t - 1], final_loss=final_loss, timing=rt))
            log.info("LoSA round %d/%d: target %.4f, measured %.4f, ranks %s", t, cfg.rounds, s_t,
                     records[-1].measured_mean, ranks)
        t0 = time.perf_counter()
        rep = merge_adapters(lm.model, lm.family, reprune="mask")
        job.timing["merge_s"] = time.perf_counter() - t0
        final_z = _measured_zeros(lm.model, lm.family, set(job.selected))
        total = sum(job.selected[n][2].weight.numel() for n in final_z)
        job.timing["total_s"] = time.perf_counter() - t_all
        return LoSAResult(rounds=records, blocks=list(job.layout.blocks), timing=dict(job.timing),
                          peak_rss_mb=_peak_rss_mb(), sparsity_measured=sum(final_z.values()) / total,
                          calibration=job.calib, merge=rep.as_dict())
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def run_losa(model_spec, out, cfg: LoSAConfig, *, data_dir=None, overwrite: bool = False, dtype: str = "float32",
             plot: bool = True) -> LoSAResult:
    """Load ``model_spec`` (the DENSE model, or a pruned one with ``from_pruned``), run LoSA and write
    the merged sparse checkpoint to ``out`` (manifest with per-round sparsities and ranks,
    ``losa_report.json`` and ``losa_allocation.png`` beside it)."""
    from ..manifest import build_manifest, save_checkpoint
    from ..models import load_model

    cfg.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    lm = load_model(model_spec, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..manifest import make_temporary_beside

    work = make_temporary_beside(out)  # named so a later run cleans it if this one is killed
    if cfg.device and not cfg.offload:
        # the whole model on the device: the fine-tuning rounds train where the model is, and the
        # calibration passes then find every block at home
        lm.model.to(cfg.device)
    try:
        result = run_losa_model(lm, cfg, data_dir=data_dir, work_dir=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lm.model.to("cpu")  # the checkpoint is written from host memory
    prev = lm.manifest
    last = result.rounds[-1]
    by_block = dict(zip(result.blocks, last.block_rates))
    targets = {}
    for name, _ in lm.family.iter_linears(lm.model):
        bi = int(name[len(lm.family.blocks_path) + 1:].split(".")[0])
        targets[name] = by_block.get(bi, 0.0)
    step = {"stage": "losa", "input": str(model_spec), "config": cfg.to_dict(), "calibration": result.calibration,
            "rounds": [r.__dict__ for r in result.rounds], "blocks": result.blocks,
            "measured": result.sparsity_measured, "timing": result.timing, "merge": result.merge}
    dense_source = (prev.dense_source if prev is not None and prev.dense_source else
                    str(Path(str(model_spec)).resolve()) if Path(str(model_spec)).exists() else str(model_spec))
    manifest = build_manifest(lm.model, lm.family, targets=targets,
                              base_model=(prev.base_model if prev and prev.base_model else str(model_spec)),
                              dense_source=dense_source, previous=prev, step=step)
    result.checkpoint = str(out)

    def write_report(tmp: Path) -> None:  # inside the temporary directory: the rename is the last step
        if plot:
            from .plot import plot_rounds

            plot_rounds(result, tmp / "losa_allocation.png")
            result.plot = str(out / "losa_allocation.png")
        (tmp / "losa_report.json").write_text(json.dumps(result.as_dict(), indent=1, default=str))

    save_checkpoint(lm.model, lm.tokenizer, out, manifest, overwrite=overwrite, on_write=write_report)
    return result
