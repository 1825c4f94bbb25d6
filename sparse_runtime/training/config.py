"""The training configuration: one dataclass, validated before any work starts.

``None`` for an optimisation field means "the method's default" (its paper or official code, from
:data:`~sparse_runtime.adapters.FINETUNE_METHODS`), then the engine's fallback below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from ..errors import ConfigError

DATA_SOURCES = ("alpaca", "c4", "text")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "auto")
DISTILL_MODES = ("none", "logits", "blocks", "both")  # distillation from the dense model (training/distill.py)

ENGINE_DEFAULTS = dict(lr=2e-4, schedule="linear", min_lr=0.0, warmup_ratio=0.0, weight_decay=0.0)


@dataclass
class TrainConfig:
    method: str = "lors"
    data: str = "alpaca"  # alpaca (prompt template, loss on the response) | c4 (windows) | text (a file)
    data_path: Optional[str] = None  # alpaca JSON or text file instead of the shared data set
    steps: Optional[int] = None  # optimiser steps; None = one epoch (alpaca/text) or required (c4)
    batch_size: int = 8  # sequences per optimiser step, over all processes
    micro_batch_size: Optional[int] = None  # per forward; None = batch_size / world size
    seq_len: int = 512
    packing: bool = False  # alpaca: concatenate examples into full windows (labels still masked)
    data_seed: Optional[int] = None  # c4 window sampling seed (ft-quick: 1); default: 1 for c4
    lr: Optional[float] = None
    schedule: Optional[str] = None
    min_lr: Optional[float] = None  # floor of the schedule (LoRS: cosine to 1e-6)
    warmup_ratio: Optional[float] = None
    warmup_steps: Optional[int] = None  # overrides warmup_ratio
    weight_decay: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 where the hardware has it)
    loss_chunk_tokens: int = 0  # >0: cross-entropy over the LM head in checkpointed chunks
    eval_every: int = 0  # steps between evaluations (0: only at the end if eval is on)
    eval_examples: int = 0  # held-out examples for the eval loss (0: no held-out loss)
    eval_ppl: bool = False  # WikiText-2 perplexity at each evaluation
    ppl_protocol: str = "quick"
    save_every: int = 0  # steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    # distillation from the dense teacher (docs/finetuning.md#distillation): loss = (1-w) CE + w KD
    distill: str = "none"  # none | logits (KL, Hinton) | blocks (per-block normalised MSE, SquareHead) | both
    distill_teacher: Optional[str] = None  # default: the pruned checkpoint's manifest (dense_source, else base_model)
    distill_weight: float = 0.5  # w in [0, 1]
    distill_temperature: float = 1.0  # T of the softened logits; the KL term is scaled by T^2

    def validate(self) -> None:
        if self.data not in DATA_SOURCES:
            raise ConfigError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        if self.data == "text" and not self.data_path:
            raise ConfigError("data 'text' needs --data-path FILE (a UTF-8 text file)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.data == "c4" and self.data_path:
            raise ConfigError("--data-path does not apply to --data c4 (it reads c4/c4_sample.jsonl under --data-dir): "
                              "drop --data-path, or give --data-dir DIR holding that file")
        if self.data == "c4" and self.steps is None:
            raise ConfigError("data 'c4' draws steps x batch_size windows: give --steps")
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ConfigError("batch_size and micro_batch_size must be >= 1")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for k in ("eval_every", "eval_examples", "save_every", "loss_chunk_tokens"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0")
        if self.keep_checkpoints < 1 or self.log_every < 1:
            raise ConfigError("keep_checkpoints and log_every must be >= 1")
        if self.distill not in DISTILL_MODES:
            raise ConfigError(f"distill must be one of {DISTILL_MODES}, got {self.distill!r}")
        if not 0.0 <= float(self.distill_weight) <= 1.0:
            raise ConfigError(f"distill_weight must be in [0, 1] (loss = (1-w) CE + w KD), got {self.distill_weight}")
        if not float(self.distill_temperature) > 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.distill == "none" and self.distill_teacher:
            raise ConfigError("--distill-teacher is given but --distill is none: add --distill logits|blocks|both, "
                              "or drop --distill-teacher")

    def resolved(self, method_defaults: dict[str, Any]) -> "TrainConfig":
        """A copy with every ``None`` optimisation field filled from the method, then the engine."""
        d = asdict(self)
        for k, v in ENGINE_DEFAULTS.items():
            if d.get(k) is None:
                d[k] = method_defaults.get(k, v)
        if d["data_seed"] is None:
            d["data_seed"] = 1 if self.data == "c4" else self.seed
        d["betas"] = tuple(d["betas"])
        return TrainConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    # what must match for a checkpoint to be resumable by this run
    IDENTITY_FIELDS = ("method", "data", "data_path", "batch_size", "seq_len", "packing", "data_seed", "seed",
                       "lr", "schedule", "min_lr", "warmup_ratio", "warmup_steps", "weight_decay", "steps")
    # part of the identity only when distillation is on (checkpoints written before it existed stay resumable)
    DISTILL_IDENTITY_FIELDS = ("distill", "distill_teacher", "distill_weight", "distill_temperature")
