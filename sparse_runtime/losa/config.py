"""LoSA's options in one dataclass, validated before any work (bad input costs nothing)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import ConfigError
from .ranks import RANK_SCHEDULES
from ..allocation.rmi import FEATURES

# the registered allocations whose options LoSA maps each round (rounds._Job.allocator_options)
LOSA_ALLOCATIONS = ("rmi", "atp", "owl", "uniform")
PRUNE_METHODS = ("wanda", "sparsegpt")  # the built-in methods LoSA was checked with; any registered pruner runs


@dataclass
class LoSAConfig:
    """Defaults follow the paper/official code (docs/methods.md#losa-round-loop) except where docs/losa.md says why.

    Budget: ``steps`` optimiser steps IN TOTAL, split over the rounds (``round_steps`` to set each
    round's share explicitly; the default is an even split with the remainder to the last rounds).
    """

    sparsity: float = 0.5
    rounds: int = 5  # T
    schedule: Optional[str] = None  # cubic (paper) | flat; None: cubic from dense, flat from pruned
    from_pruned: bool = False  # start from an already pruned checkpoint (flat schedule: a deviation)
    prune_method: str = "wanda"  # wanda | sparsegpt | any registered pruner (sparse_runtime.pruning.PRUNERS)
    prune_options: dict = field(default_factory=dict)  # the pruner's own options (its Options dataclass)
    structure: str = "unstructured"
    mixed_nm: bool = False  # per-layer N for N:M: not implemented (an error, never ignored)
    allocation: str = "rmi"  # a registered allocation (sparse_runtime.allocation): rmi (paper) | atp | owl | uniform
    delta: Optional[float] = None  # LP half-width; None: delta_for(s_t)
    rmi_features: str = "outputs"  # outputs (paper reading) | inputs (official code)
    rmi_samples: Optional[int] = None  # calibration samples for RMI (official 64 of 128); None: min(nsamples, 64)
    rmi_beta: Optional[float] = None  # None: 1 (wanda) / 100 (sparsegpt), as the code; no effect on the LP
    atp_beta_fraction: float = 0.5  # allocation=atp: beta = fraction x the legal bound at s_t
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    refine: Optional[str] = None  # "dsnot": DSnoT inside each re-prune
    refine_options: dict = field(default_factory=dict)
    percdamp: float = 0.01
    blocksize: int = 128
    # adapter
    rank: int = 8  # r_base: mean rank of the middle round; scale s = alpha / rank
    alpha: float = 16.0
    dropout: float = 0.1
    rank_schedule: str = "rising"  # rising (code: 6..10 for T=5, r=8) | constant
    r_min: int = 1
    r_max: int = 16
    shrink: str = "svd"
    targets: Optional[list[str]] = None
    # calibration (pruning statistics, RMI, reconstruction errors)
    protocol: Optional[str] = None
    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    calib_seed: Optional[int] = None
    batch_size: int = 8
    offload: bool = False
    device: Optional[str] = None
    # training (ft-quick by default: C4 windows of 512, 200 steps x 8 in total)
    data: str = "c4"
    data_path: Optional[str] = None
    steps: int = 200
    round_steps: Optional[list[int]] = None
    train_batch_size: int = 8
    micro_batch_size: Optional[int] = None
    seq_len: int = 512
    data_seed: Optional[int] = None
    lr: Optional[float] = None
    lr_schedule: Optional[str] = None
    warmup_ratio: Optional[float] = None
    weight_decay: Optional[float] = None
    max_grad_norm: Optional[float] = 0.3  # official SFTTrainer argument
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 0  # >0: LM-head cross-entropy in checkpointed chunks (same loss, less memory)
    # distillation from the dense model (docs/finetuning.md#distillation); teacher default: the dense input
    distill: str = "none"
    distill_teacher: Optional[str] = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0

    def validate(self) -> None:
        from ..sparsity import check_sparsity, parse_structure

        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ConfigError(f"LoSA needs at least one round: rounds (T) must be an integer >= 1, got {self.rounds!r}")
        try:
            s = float(self.sparsity)
        except (TypeError, ValueError):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}") from None
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"target sparsity {s} is outside [0, 1): give the fraction of weights to zero, e.g. 0.5")
        check_sparsity(s)
        pattern = parse_structure(self.structure)
        if pattern is not None:
            if not self.mixed_nm:
                raise ConfigError(
                    f"LoSA gives every layer its own sparsity each round, which a uniform N:M pattern ({pattern}) "
                    "cannot honour; use structure='unstructured' (or the mixed per-layer-N N:M mode, mixed_nm=True)")
            raise ConfigError("mixed N:M (a per-layer N, the paper's mixed N:8) is not implemented in this LoSA; "
                              "use structure='unstructured'")
        from ..plugins import load_plugins
        from ..pruning import PRUNERS

        load_plugins()
        PRUNERS.get(self.prune_method)  # unknown names list the known ones
        if not isinstance(self.prune_options, dict):
            raise ConfigError(f"prune_options must be a mapping of option names to values, got {self.prune_options!r}")
        if self.allocation not in LOSA_ALLOCATIONS:
            raise ConfigError(f"LoSA's allocation must be one of {LOSA_ALLOCATIONS}, got {self.allocation!r}")
        if self.schedule is not None and self.schedule not in ("cubic", "flat"):
            raise ConfigError(f"schedule must be 'cubic' or 'flat', got {self.schedule!r}")
        if self.delta is not None and not 0.0 <= float(self.delta) < 1.0:
            raise ConfigError(f"delta must be in [0, 1), got {self.delta}")
        if self.rmi_features not in FEATURES:
            raise ConfigError(f"rmi_features must be one of {FEATURES}, got {self.rmi_features!r}")
        if self.rank_schedule not in RANK_SCHEDULES:
            raise ConfigError(f"rank_schedule must be one of {RANK_SCHEDULES}, got {self.rank_schedule!r}")
        for k in ("rank", "r_min", "r_max", "batch_size", "train_batch_size", "seq_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k} must be an integer >= 1, got {v!r}")
        if self.r_max < self.r_min:
            raise ConfigError(f"r_max ({self.r_max}) must be >= r_min ({self.r_min})")
        for k in ("nsamples", "seqlen", "rmi_samples", "micro_batch_size"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < (2 if k == "seqlen" else 1)):
                raise ConfigError(f"{k} must be a positive integer, got {v!r}")
        if self.rmi_samples is not None and self.rmi_samples < 2 and self.allocation == "rmi":
            raise ConfigError("RMI (CKA over samples) needs rmi_samples >= 2")
        if not 0 < self.atp_beta_fraction <= 1:
            raise ConfigError(f"atp_beta_fraction must be in (0, 1], got {self.atp_beta_fraction}")
        if self.allocation == "owl" and not self.owl_m > 0:
            raise ConfigError(f"owl_m must be > 0, got {self.owl_m}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps (the total over all rounds) must be an integer >= 0, got {self.steps!r}")
        if self.round_steps is not None:
            if len(self.round_steps) != self.rounds or any((not isinstance(x, int)) or x < 0 for x in self.round_steps):
                raise ConfigError(f"round_steps must list {self.rounds} integers >= 0 (one per round), "
                                  f"got {self.round_steps!r}")
        if self.alpha is None or not float(self.alpha) > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.refine is not None and str(self.refine).lower() != "dsnot":
            raise ConfigError(f"refine must be None or 'dsnot', got {self.refine!r}")
        if self.rank_schedule == "rising" and self.rank - (self.rounds - 1) / 2.0 < self.r_min:
            raise ConfigError(
                f"the first round's mean rank {self.rank - (self.rounds - 1) / 2.0:g} (rank {self.rank} - (T-1)/2 with "
                f"T={self.rounds}) is below r_min={self.r_min}: the rank budget would be smaller than the number of "
                "layers; raise --rank, lower --rounds, or use rank_schedule='constant'")
        # the per-round rank budgets must be feasible (checked against L again once the model is known)
        self.training_config(self.steps_per_round()[0] or 1).validate()

    # -- resolved views ---------------------------------------------------------------------------
    def resolved_schedule(self) -> str:
        return self.schedule or ("flat" if self.from_pruned else "cubic")

    def steps_per_round(self) -> list[int]:
        if self.round_steps is not None:
            return list(self.round_steps)
        base, rem = divmod(self.steps, self.rounds)
        return [base + (1 if t >= self.rounds - rem else 0) for t in range(self.rounds)]

    def calibration(self) -> dict[str, Any]:
        from ..protocols import get_protocol

        p = get_protocol(self.protocol or "quick")
        n = self.nsamples or p.calib_samples
        return {"protocol": p.name, "nsamples": n, "seqlen": self.seqlen or p.calib_seqlen,
                "seed": p.calib_seed if self.calib_seed is None else self.calib_seed,
                "rmi_samples": min(n, self.rmi_samples or 64)}

    def effective_rmi_beta(self) -> float:
        if self.rmi_beta is not None:
            return float(self.rmi_beta)
        return 100.0 if self.prune_method == "sparsegpt" else 1.0

    def adapter_options(self) -> dict[str, Any]:
        d = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "shrink": self.shrink}
        if self.targets:
            d["targets"] = list(self.targets)
        return d

    def training_config(self, steps: int):
        from ..training import TrainConfig

        return TrainConfig(method="losa", data=self.data, data_path=self.data_path, steps=max(1, steps),
                           batch_size=self.train_batch_size, micro_batch_size=self.micro_batch_size,
                           seq_len=self.seq_len, data_seed=self.data_seed, lr=self.lr, schedule=self.lr_schedule,
                           warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, seed=self.seed, precision=self.precision,
                           gradient_checkpointing=self.gradient_checkpointing,
                           loss_chunk_tokens=self.loss_chunk_tokens, log_every=1, distill=self.distill,
                           distill_teacher=self.distill_teacher, distill_weight=self.distill_weight,
                           distill_temperature=self.distill_temperature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
