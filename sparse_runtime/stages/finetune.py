"""Recipe stage ``finetune``: train a mask-keeping adapter on the current model (optionally merge).

```yaml
- stage: finetune
  method: lors            # lors | masked-lora | dense-lora (| seft | losa when registered)
  data: c4                # alpaca | c4 | text
  steps: 200
  rank: 8
  merge: true             # fold the adapter in and hand the merged checkpoint to the next stage
  distill: both           # optional: distillation from the dense model (none | logits | blocks | both)
  distill_weight: 0.5     # loss = (1-w) CE + w KD; distill_teacher / distill_temperature too
```
Without ``merge`` the adapter directory is recorded in the metrics and a later ``merge`` stage
folds it in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..recipe import STAGES, Stage, StageContext, StageResult


@dataclass
class FinetuneStageConfig:
    method: str = "lors"
    data: str = "alpaca"
    data_path: Optional[str] = None
    steps: Optional[int] = None
    batch_size: int = 8
    micro_batch_size: Optional[int] = None
    seq_len: int = 512
    rank: int = 8
    alpha: Optional[float] = None
    lr: Optional[float] = None
    schedule: Optional[str] = None
    warmup_ratio: Optional[float] = None
    seed: int = 0
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    eval_examples: int = 0
    eval_ppl: bool = False
    save_every: int = 0
    loss_chunk_tokens: int = 0
    distill: str = "none"  # docs/finetuning.md#distillation
    distill_teacher: Optional[str] = None  # default: the dense model the checkpoint's manifest records
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    adapter: dict[str, Any] = field(default_factory=dict)  # further adapter options (grad_mode, init_samples...)
    merge: bool = False
    reprune: str = "wanda"

    def validate(self) -> None:
        from ..adapters import FINETUNE_METHODS

        FINETUNE_METHODS.get(self.method)
        self.train_config().validate()
        if not isinstance(self.adapter, dict):
            raise ConfigError("finetune.adapter must be a mapping of adapter options")

    def train_config(self):
        from ..training import TrainConfig

        keys = ("method", "data", "data_path", "steps", "batch_size", "micro_batch_size", "seq_len", "lr", "schedule",
                "warmup_ratio", "seed", "gradient_checkpointing", "precision", "eval_examples", "eval_ppl",
                "save_every", "loss_chunk_tokens", "distill", "distill_teacher", "distill_weight",
                "distill_temperature")
        return TrainConfig(**{k: getattr(self, k) for k in keys})


@STAGES.register("finetune")
class FinetuneStage(Stage):
    name = "finetune"
    Config = FinetuneStageConfig
    writes_checkpoint = True

    def run(self, ctx: StageContext, cfg: FinetuneStageConfig, out_dir: Path) -> StageResult:
        from ..training import finetune

        adapter_dir = out_dir / "adapter"
        opts = {"rank": cfg.rank, "alpha": cfg.alpha, **cfg.adapter}
        res, _ = finetune(ctx.model, adapter_dir, cfg.train_config(), opts, data_dir=ctx.data_dir, overwrite=True)
        metrics = {"adapter": str(adapter_dir), "method": cfg.method, "steps": res.steps, "final_loss":
                   res.losses[-1] if res.losses else None, "tokens": res.tokens, "seconds": res.seconds,
                   "trainable_parameters": res.trainable_parameters, "peak_rss_mb": res.peak_rss_mb,
                   "evals": res.evals, "distill": cfg.distill}
        if not cfg.merge:
            return StageResult(metrics=metrics)
        from ..merge import merge_adapter_dir

        merged, rep = merge_adapter_dir(adapter_dir, out_dir / "model", reprune=cfg.reprune, overwrite=True,
                                        data_dir=ctx.data_dir, protocol=ctx.protocol)
        metrics["merge"] = rep.as_dict()
        return StageResult(model=str(merged), metrics=metrics)
