"""The fine-tuning engine for sparse models: one loop every mask-keeping method stands on.

``finetune(model_spec, out, cfg, adapter_options)`` loads the pruned checkpoint (warning and
inferring masks from zeros when it has no sparsity manifest), wraps the target linears in the
method's :class:`~sparse_runtime.adapters.SparseAdapter`, and trains only the adapters:

- AdamW with constant/linear/cosine schedules, warmup and a floor (:mod:`.optim`);
- ``batch_size`` sequences per optimiser step split into micro-batches over gradient accumulation
  and processes; the loss is normalised by the target tokens of the whole step, so 1 process x 4
  micro-batches and 2 processes x 2 give the same update as one batch;
- gradient checkpointing (HF, non-reentrant), bf16 autocast (``precision``), chunked LM-head loss;
- distillation from the dense teacher (``distill``: logits, blocks or both; :mod:`.distill`);
- data parallel through ``torchrun`` (``torch.distributed`` + DDP; gloo on CPU, nccl on GPU):
  each process takes its slice of each step's batch;
- periodic evaluation: held-out loss and WikiText-2 perplexity (protocol ``quick``);
- checkpoints that resume exactly (:mod:`.checkpoint`), a progress bar with loss and tokens/s,
  a JSON-lines log, and determinism from ``seed``.

The output directory holds the final ``adapter_model.safetensors`` + ``adapter_config.json`` (merge
them with :func:`sparse_runtime.merge.merge_adapter_dir`), ``train_log.jsonl``, ``finetune.json``
and ``checkpoints/``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..adapters import (FINETUNE_METHODS, AdapterConfig, attach_adapters, count_trainable, infer_masks_warning,
                        trainable_parameters)
from ..adapters.io import mask_fingerprint, save_adapter
from ..errors import CheckpointExistsError, ConfigError
from ..faults import fault_point
from ..progress import progress
from . import checkpoint as ckpt_mod
from .config import TrainConfig
from .data import DataOrder, build_datasets, collate, target_count
from .distill import Distiller, load_teacher
from .loss import CausalLMLoss
from .optim import build_optimizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# processes
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    here = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), here)


def _has_cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        ok = (torch.cuda.is_bf16_supported() if device.type == "cuda" else _has_cpu_bf16())
        if not ok:
            return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Silent:
    """A progress bar that shows nothing (processes other than rank 0)."""

    def __init__(self, it) -> None:
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **_) -> None:
        pass


# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    losses: list[float]
    evals: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    trainable_parameters: int = 0
    peak_rss_mb: float = 0.0
    resumed_from: Optional[str] = None
    # on a CUDA device: torch.cuda.max_memory_allocated over the training loop (weights, adapters,
    # optimiser state, activations; the allocator's cached slack excluded), MiB; None on CPU
    peak_device_mb: Optional[float] = None
    # the process's CUDA peak before the loop (model load, adapter init such as LoRS's gradient SVD)
    peak_device_setup_mb: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        return d


class Trainer:
    """Trains the adapters already attached to ``model``; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, family, method: str, adapter_cfg: AdapterConfig,
                 cfg: TrainConfig, out_dir: Path, *, adapters: dict, data_dir=None, base_model: str = "",
                 fingerprint: str = "", dist: Optional[DistInfo] = None, final_dir: Optional[Path] = None,
                 teacher: Optional[nn.Module] = None) -> None:
        self.spec = FINETUNE_METHODS.get(method)
        self.model, self.tokenizer, self.family = model, tokenizer, family
        self.method, self.adapter_cfg = method, adapter_cfg
        self.cfg = cfg.resolved(self.spec.train_defaults)
        self.cfg.validate()
        self.out_dir = Path(out_dir)
        # where the run ends up: out_dir itself, or the directory a staging out_dir replaces at the end
        self.final_dir = Path(final_dir) if final_dir is not None else self.out_dir
        self.adapters = adapters
        self.data_dir = data_dir
        self.base_model, self.fingerprint = base_model, fingerprint
        self.dist = dist or DistInfo()
        self.device = next(model.parameters()).device
        self.callbacks = self.spec.callbacks(adapter_cfg)
        self.train_set, self.held_set = build_datasets(self.cfg, tokenizer, data_dir)
        self.order = DataOrder(len(self.train_set), self.cfg.data_seed)
        self.total_steps = self.cfg.steps or self.order.steps_per_epoch(self.cfg.batch_size)
        w = self.dist.world
        if self.cfg.batch_size % w:
            raise ConfigError(f"batch_size {self.cfg.batch_size} does not split over {w} processes")
        per_rank = self.cfg.batch_size // w
        self.micro = self.cfg.micro_batch_size or per_rank
        if per_rank % self.micro:
            raise ConfigError(f"micro_batch_size {self.micro} does not divide the {per_rank} sequences per process "
                              f"and step (batch_size {self.cfg.batch_size} / {w} processes)")
        self.accum = per_rank // self.micro
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
        self.distiller = None
        if self.cfg.distill != "none":
            if teacher is None:  # a caller without a manifest to read (LoSA): the config names the teacher
                if not self.cfg.distill_teacher:
                    raise ConfigError(f"--distill {self.cfg.distill} needs the dense teacher: give --distill-teacher "
                                      "PATH")
                teacher = load_teacher(self.cfg.distill_teacher, model, device=self.device, mode=self.cfg.distill)
            self.distiller = Distiller(teacher, self.cfg.distill, self.cfg.distill_weight,
                                       self.cfg.distill_temperature, student=model)
        self.loss_module = CausalLMLoss(model, self.cfg.loss_chunk_tokens, self.distiller)
        self.step = 0
        self.losses: list[float] = []
        self.evals: list[dict[str, Any]] = []
        self.tokens = 0

    # -- identity of a run (what a resume must match) ------------------------------------------
    def identity(self) -> dict[str, Any]:
        d = {k: getattr(self.cfg, k) for k in TrainConfig.IDENTITY_FIELDS}
        if self.cfg.distill != "none":
            d.update({k: getattr(self.cfg, k) for k in TrainConfig.DISTILL_IDENTITY_FIELDS})
        d.update(adapter=self.adapter_cfg.to_dict(), base_mask_fingerprint=self.fingerprint,
                 train_examples=len(self.train_set))
        return json.loads(json.dumps(d, default=str))

    # -- batches --------------------------------------------------------------------------------
    def step_examples(self, step: int) -> list:
        idx = self.order.indices(step * self.cfg.batch_size, self.cfg.batch_size)
        return [self.train_set[i] for i in idx]

    def rank_micro_batches(self, examples: list) -> list[dict[str, torch.Tensor]]:
        per = len(examples) // self.dist.world
        mine = examples[self.dist.rank * per:(self.dist.rank + 1) * per]
        return [collate(mine[i:i + self.micro], self.pad_id) for i in range(0, len(mine), self.micro)]

    def _to(self, b):
        return {k: v.to(self.device) for k, v in b.items()}

    def accumulate_dense_gradients(self, nsamples: int, micro_batch: Optional[int] = None) -> int:
        """Average d loss / d W over the first ``nsamples`` training examples into the ``.grad`` of
        every weight that requires grad (see :func:`~sparse_runtime.adapters.dense_weight_gradients`),
        summed over processes. Used by LoRS's initialisation (and SEFT's growth). ``micro_batch``:
        examples per forward/backward (default: the training micro-batch); smaller lowers the peak."""
        n = min(nsamples, len(self.train_set))
        examples = [self.train_set[i] for i in self.order.indices(0, n)]
        per = max(1, len(examples) // self.dist.world)
        mine = examples[self.dist.rank * per:(self.dist.rank + 1) * per] if self.dist.enabled else examples
        total = max(1, target_count(examples[:per * self.dist.world] if self.dist.enabled else examples))
        self.model.train()
        micro = micro_batch or self.micro
        for i in progress(range(0, len(mine), micro), desc="dense gradient (init)"):
            b = self._to(collate(mine[i:i + micro], self.pad_id))
            with autocast_context(self.cfg.precision, self.device):
                loss_sum, _ = self.loss_module(b["input_ids"], b["labels"], b["attention_mask"])
            (loss_sum / total).backward()
        if self.dist.enabled:
            for p in self.model.parameters():
                if p.requires_grad and p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
        return n

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step}
        if self.dist.rank != 0:
            return out
        was = self.model.training
        self.model.eval()
        if self.held_set:
            s = n = 0.0
            for i in range(0, len(self.held_set), self.micro):
                b = self._to(collate(self.held_set[i:i + self.micro], self.pad_id))
                with autocast_context(self.cfg.precision, self.device):  # held-out CE, never the distillation
                    ls, k = self.loss_module(b["input_ids"], b["labels"], b["attention_mask"], distill=False)
                s += float(ls)
                n += float(k)
            out["eval_loss"] = s / max(1.0, n)
        if self.cfg.eval_ppl:
            from ..eval.perplexity import wikitext2_perplexity

            r = wikitext2_perplexity(self.model, self.tokenizer, self.cfg.ppl_protocol, self.data_dir)
            out["ppl"] = r.ppl
            out["ppl_protocol"] = r.protocol
        self.model.train(was)
        return out

    # -- the loop -------------------------------------------------------------------------------
    def train(self, resume: Union[bool, str, os.PathLike] = False) -> TrainResult:
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(self.model, "config"):
            self.model.config.use_cache = False
        resumed_from = self._resume_source(resume)
        for cb in self.callbacks:
            cb.on_train_begin(self, resumed_from is not None)
        params = [p for _, p in trainable_parameters(self.model)]
        if not params:
            raise ConfigError("the model has no trainable parameters: no target linear was adapted")
        optimizer, scheduler = build_optimizer(params, cfg, self.total_steps)
        if resumed_from is not None:
            st = ckpt_mod.load_checkpoint(resumed_from, model=self.model, optimizer=optimizer, scheduler=scheduler,
                                          rank=self.dist.rank)
            self.step, self.tokens = int(st["step"]), int(st["tokens"])
            self.losses, self.evals = list(st["losses"]), list(st["evals"])
            for cb, s in zip(self.callbacks, st.get("callbacks", [])):
                cb.load_state_dict(s)
            self._truncate_log()
        self.optimizer, self.scheduler = optimizer, scheduler
        module = self.loss_module
        if self.dist.enabled:
            module = torch.nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model.train()
        cuda = self.device.type == "cuda"
        setup_peak = None
        if cuda:  # the peak of this loop alone, not of whatever ran in the process before
            torch.cuda.synchronize(self.device)
            setup_peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        t_start = time.perf_counter()
        steps = range(self.step, self.total_steps)
        bar = (progress(steps, desc=f"finetune [{self.method}]", initial=self.step, total=self.total_steps)
               if self.dist.rank == 0 else _Silent(steps))
        for _ in bar:
            t0 = time.perf_counter()
            examples = self.step_examples(self.step)
            total = target_count(examples)
            micro = self.rank_micro_batches(examples)
            loss_acc = torch.zeros((), dtype=torch.float64)
            parts = torch.zeros(3, dtype=torch.float64)  # distillation: CE, KL, block sums of the step
            for i, b in enumerate(micro):
                b = self._to(b)
                sync = (i == len(micro) - 1) or not self.dist.enabled
                ctx = contextlib.nullcontext() if sync else module.no_sync()
                with ctx:
                    with autocast_context(cfg.precision, self.device):
                        loss_sum, _ = module(b["input_ids"], b["labels"], b["attention_mask"])
                    # DDP averages gradients over processes: scale by world so the step's update is
                    # the gradient of (sum of losses / target tokens of the whole step)
                    (loss_sum * (self.dist.world / max(1, total))).backward()
                loss_acc += loss_sum.detach().double().cpu()
                if self.distiller is not None and self.loss_module.last_parts is not None:
                    parts += self.loss_module.last_parts.double().cpu()
            if self.dist.enabled:
                torch.distributed.all_reduce(loss_acc)
                if self.distiller is not None:
                    torch.distributed.all_reduce(parts)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:  # kernels run asynchronously: a step's time ends when its work has
                torch.cuda.synchronize(self.device)
            self.step += 1
            fault_point("train-step")  # test hook (sparse_runtime/faults.py); nothing when unset
            step_tokens = sum(len(e.input_ids) for e in examples)
            self.tokens += step_tokens
            loss = float(loss_acc) / max(1, total)
            self.losses.append(loss)
            dt = time.perf_counter() - t0
            for cb in self.callbacks:
                cb.on_step_end(self, self.step)
            rec = {"step": self.step, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": self.tokens,
                   "step_s": dt, "tokens_per_s": step_tokens / dt if dt > 0 else None}
            if self.distiller is not None:  # per target token, as the loss
                rec.update(ce=float(parts[0]) / max(1, total), kd_logits=float(parts[1]) / max(1, total),
                           kd_blocks=float(parts[2]) / max(1, total))
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                ev = self.evaluate()
                self.evals.append(ev)
                rec.update({k: v for k, v in ev.items() if k != "step"})
            self._log(rec)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self._save_checkpoint()
        seconds = time.perf_counter() - t_start
        if cfg.eval_examples or cfg.eval_ppl:
            ev = self.evaluate()
            self.evals.append(ev)
            self._log({"step": self.step, **ev, "final": True})
        self._save_checkpoint()
        if self.distiller is not None:  # hooks off, teacher released before the caller merges or evaluates
            self.distiller.close()
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_disable()
        self.model.eval()
        res = TrainResult(self.final_dir, self.step, self.losses, self.evals, self.tokens, seconds,
                          count_trainable(self.model), peak_rss_mb(),
                          str(resumed_from) if resumed_from is not None else None,
                          torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None, setup_peak)
        if self.dist.rank == 0:
            save_adapter(self.model, self.out_dir, self.method, self.adapter_cfg, base_model=self.base_model,
                         fingerprint=self.fingerprint,
                         extra={"train": self.cfg.to_dict(), "ranks": {n: getattr(a, "rank", None)
                                                                        for n, a in self.adapters.items()}})
            (self.out_dir / "finetune.json").write_text(json.dumps(res.as_dict(), indent=1, default=str))
        self.dist.barrier()
        return res

    # -- helpers --------------------------------------------------------------------------------
    def _resume_source(self, resume) -> Optional[Path]:
        if resume is False or resume is None:
            return None
        if resume is True:
            found = ckpt_mod.latest_checkpoint(self.out_dir)
            if found is None:
                raise ConfigError(f"nothing to resume: {self.out_dir / 'checkpoints'} holds no checkpoint; "
                                  "run without --resume")
        else:
            found = Path(resume)
            if not found.is_dir():
                raise ConfigError(f"checkpoint {found} does not exist")
        st = ckpt_mod.read_state(found)
        ckpt_mod.check_identity(st.get("identity", {}), self.identity(), found)
        return found

    def _save_checkpoint(self) -> None:
        state = {"step": self.step, "sequences": self.step * self.cfg.batch_size, "tokens": self.tokens,
                 "losses": self.losses, "evals": self.evals, "identity": self.identity(),
                 "world": self.dist.world, "callbacks": [cb.state_dict() for cb in self.callbacks]}
        ckpt_mod.save_checkpoint(self.out_dir, self.step, model=self.model, optimizer=self.optimizer,
                                 scheduler=self.scheduler, state=state, rank=self.dist.rank, world=self.dist.world,
                                 keep=self.cfg.keep_checkpoints, barrier=self.dist.barrier if self.dist.enabled else None)

    def _log(self, rec: dict[str, Any]) -> None:
        if self.dist.rank == 0:
            with (self.out_dir / "train_log.jsonl").open("a") as f:
                f.write(json.dumps(rec, default=str) + "\n")

    def _truncate_log(self) -> None:
        f = self.out_dir / "train_log.jsonl"
        if self.dist.rank != 0 or not f.is_file():
            return
        keep = [ln for ln in f.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= self.step
                and not json.loads(ln).get("final")]
        f.write_text("".join(ln + "\n" for ln in keep))


# ---------------------------------------------------------------------------------------------
def prepare_model(model_spec, method: str, adapter_options: Optional[dict[str, Any]] = None, *, dtype="float32",
                  device: Optional[str] = None, seed: int = 0):
    """Load ``model_spec``, attach the method's adapters (seeded init). Returns
    (LoadedModel, adapters, adapter_cfg, fingerprint)."""
    from ..models import load_model

    spec = FINETUNE_METHODS.get(method)
    adapter_cfg = spec.make_config(**(adapter_options or {}))
    lm = model_spec if hasattr(model_spec, "model") else load_model(model_spec, dtype)
    if device:
        lm.model.to(device)
    infer_masks_warning(lm.model, lm.family, lm.manifest)
    fingerprint = mask_fingerprint(lm.model, lm.family, lm.manifest)
    torch.manual_seed(seed)
    adapters = attach_adapters(lm.model, spec, adapter_cfg, lm.family)
    return lm, adapters, adapter_cfg, fingerprint


def finetune(model_spec, out: os.PathLike, cfg: TrainConfig, adapter_options: Optional[dict[str, Any]] = None, *,
             data_dir=None, resume: Union[bool, str] = False, overwrite: bool = False, dtype="float32",
             device: Optional[str] = None) -> tuple[TrainResult, Any]:
    """Fine-tune ``model_spec`` (a checkpoint dir, a model name or a LoadedModel) with ``cfg.method``;
    write the adapter to ``out``. Returns (TrainResult, LoadedModel with the trained adapters attached).

    Nothing appears at ``out`` until the run is complete: the model, adapter options and data are
    checked first, then the run (log, resumable checkpoints, adapter) is written into a hidden
    temporary directory beside ``out`` that replaces ``out`` at the end. A failure removes it (a
    bad input or a full disk leaves no trace) unless it holds a resumable checkpoint, which is kept
    for ``--resume``; a ``kill -9`` leaves it too, and ``--resume`` continues it (see
    :func:`_choose_run_dir`). ``resume=True`` with no checkpoint to continue starts afresh, with a note."""
    cfg.validate()
    FINETUNE_METHODS.get(cfg.method)  # unknown method: clear error before loading anything
    out = Path(out)
    check_out_apart_from_input(model_spec, out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose another --out")
    dist = init_distributed()
    if resume is False and _nonempty_dir(out) and not overwrite:
        raise CheckpointExistsError(f"{out} already exists; choose another --out, pass --overwrite, "
                                    "or --resume to continue it")
    if resume not in (False, True, None) and not Path(resume).is_dir():
        raise ConfigError(f"checkpoint {resume} does not exist; give a checkpoints/step-N directory of the run")
    if device is None and dist.enabled and torch.cuda.is_available():
        device = f"cuda:{dist.local_rank}"
    # everything that can fail on the user's input (model, adapter options, data) fails here, before
    # anything is created on disk
    lm, adapters, adapter_cfg, fp = prepare_model(model_spec, cfg.method, adapter_options, dtype=dtype,
                                                  device=device, seed=cfg.seed)
    base = str(lm.path) if getattr(lm, "path", None) else str(lm.source)
    teacher = None
    if cfg.distill != "none":  # the dense teacher: named, or the one the manifest records; loaded before any write
        from dataclasses import replace

        from .distill import teacher_spec

        cfg = replace(cfg, distill_teacher=teacher_spec(cfg.distill_teacher, lm.manifest, base))
        teacher = load_teacher(cfg.distill_teacher, lm.model, device=next(lm.model.parameters()).device,
                               mode=cfg.distill)
    trainer = Trainer(lm.model, lm.tokenizer, lm.family, cfg.method, adapter_cfg, cfg, out, adapters=adapters,
                      data_dir=data_dir, base_model=base, fingerprint=fp, dist=dist, final_dir=out, teacher=teacher)
    made = _missing_parents(out)
    work, source = _shared_run_dir(out, resume, overwrite, dist)
    trainer.out_dir = work
    try:
        result = trainer.train(resume=source if source is not None else False)
        if dist.rank == 0:
            from ..manifest import replace_directory

            replace_directory(work, out)
        dist.barrier()
    except BaseException:
        if dist.rank == 0:
            _discard_run_dir(work, made)
        raise
    result.out_dir = out
    if result.resumed_from and result.resumed_from.startswith(str(work)):  # where it lies now
        result.resumed_from = str(out) + result.resumed_from[len(str(work)):]
    return result, lm


def _nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def _missing_parents(out: Path) -> list[Path]:
    """The ancestors of ``out`` that do not exist yet (deepest first): a failed run removes them again."""
    missing, p = [], out.absolute().parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _discard_run_dir(work: Path, made: list[Path]) -> None:
    """After a failure: remove the run's temporary directory, unless it holds a resumable checkpoint
    (hours of training a ``--resume`` can continue); then the parents this run created, if empty."""
    import sys

    found = ckpt_mod.latest_checkpoint(work) if work.is_dir() else None
    if found is not None:
        print(f"note: the interrupted run's last checkpoint ({found.name}) is kept in {work}; rerun the same "
              "command with --resume to continue it", file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)
    for p in made:
        with contextlib.suppress(OSError):
            p.rmdir()


def _stale_runs(out: Path) -> list[tuple[float, Path]]:
    """Temporary run directories beside ``out`` that a killed (or failed) run left, with a resumable
    checkpoint: (mtime of that checkpoint, directory)."""
    from ..manifest import TMP_MARK, _pid_alive

    prefix = f".{out.name}{TMP_MARK}"
    found = []
    if not out.parent.is_dir():
        return found
    for p in out.parent.iterdir():
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue  # another process's run in progress (ours: an earlier call that failed)
        ck = ckpt_mod.latest_checkpoint(p)
        if ck is not None:
            found.append((ck.stat().st_mtime, p))
    return sorted(found)


def _clean_inner_temporaries(run_dir: Path) -> None:
    """Hidden half-written checkpoints a kill left inside an adopted run directory."""
    from ..manifest import OLD_MARK, TMP_MARK, clean_stale_temporaries

    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for p in list(root.iterdir()):
        for mark in (TMP_MARK, OLD_MARK):
            if p.name.startswith(".") and mark in p.name:
                clean_stale_temporaries(root / p.name[1:].split(mark, 1)[0])


def _choose_run_dir(out: Path, resume, overwrite: bool) -> tuple[Path, Optional[str]]:
    """Where this run writes (a hidden temporary directory beside ``out``) and the checkpoint it
    continues from (None: from step 0).

    ``resume=True`` continues the newest checkpoint of: a run a kill or a failure left beside
    ``out`` (that directory is taken over), else the finished run at ``out`` (copied, so ``out``
    stays intact until the continued run is complete); with neither, it starts afresh with a note
    (a run killed before its first checkpoint). ``resume=PATH`` continues that checkpoint."""
    import secrets
    import sys
    import tempfile

    from ..manifest import TMP_MARK, make_temporary_beside

    def fresh_name() -> Path:
        return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"

    out.parent.mkdir(parents=True, exist_ok=True)
    if resume is True:
        stale = _stale_runs(out)
        if stale:
            work = fresh_name()
            os.rename(stale[-1][1], work)  # ours now: a concurrent cleaner sees a live pid
            _clean_inner_temporaries(work)
            return work, str(ckpt_mod.latest_checkpoint(work))
        if ckpt_mod.latest_checkpoint(out) is not None:
            work = make_temporary_beside(out)
            shutil.copytree(out, work, dirs_exist_ok=True)
            return work, str(ckpt_mod.latest_checkpoint(work))
        if _nonempty_dir(out) and not overwrite:
            raise CheckpointExistsError(f"nothing to resume: {out} holds no checkpoint (and no interrupted run is "
                                        "beside it); pass --overwrite to replace it, or choose another --out")
        print(f"note: nothing to resume for {out} (no checkpoint was written before the run stopped); "
              "starting from step 0", file=sys.stderr)
        return make_temporary_beside(out), None
    if resume not in (False, None):
        # an explicit checkpoint may lie in an interrupted run's directory: no stale-temporary cleaning here
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
        if out.is_dir():
            shutil.copytree(out, work, dirs_exist_ok=True)
        return work, str(resume)
    return make_temporary_beside(out), None


def _shared_run_dir(out: Path, resume, overwrite: bool, dist: DistInfo) -> tuple[Path, Optional[str]]:
    """:func:`_choose_run_dir` on rank 0, its answer sent to every process."""
    msg = [list(map(lambda x: None if x is None else str(x), _choose_run_dir(out, resume, overwrite)))
           if dist.rank == 0 else None]
    if dist.enabled:
        torch.distributed.broadcast_object_list(msg, src=0)
    work, source = msg[0]
    return Path(work), source


def check_out_apart_from_input(model_spec, out: Path) -> None:
    """Refuse an output directory that is, or lies inside, or contains the input model directory:
    writing (or, with ``--overwrite``, replacing) it would destroy the model being trained."""
    from ..manifest import overlaps_input

    src = getattr(model_spec, "path", None) if hasattr(model_spec, "model") else model_spec
    if overlaps_input(out, src):
        raise ConfigError(f"--out {out} is the input model {src} (or inside it, or holds it), which must stay "
                          "intact: choose another --out")
