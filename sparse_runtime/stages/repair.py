"""The ``repair`` recipe stage: a training-free repair of the current (pruned) checkpoint.

```yaml
steps:
  - stage: prune
    method: wanda
    sparsity: 0.6
  - stage: repair
    method: dsnot            # the only training-free repair so far
    max_cycles: 50           # DSnoT options: see sparse_runtime.repair.dsnot.DSnoTConfig
    threshold: 0.1
    threshold_unit: initial  # or token_sum (the official unit), per_token, output_rms
    # dense: smollm2-135m    # default: the checkpoint manifest's dense_source
```
Running DSnoT fused with pruning (``prune`` with ``refine: dsnot``) is one pass instead of two;
this stage is for a checkpoint that already exists.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError
from ..recipe import STAGES, Stage, StageContext, StageResult
from ..registry import Registry
from ..repair.dsnot import DSnoTConfig

# method name -> runner(ctx, cfg, out) -> RepairReport-like object with .as_dict()
REPAIR_METHODS: Registry[Callable] = Registry("repair method")


@dataclass
class RepairConfig(DSnoTConfig):
    """``method`` plus the method's options (DSnoT's, inherited), the dense source and calibration."""

    method: str = "dsnot"
    dense: Optional[str] = None
    protocol: Optional[str] = None  # default: the recipe's
    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: Optional[int] = None
    device: Optional[str] = None

    def validate(self) -> "RepairConfig":
        REPAIR_METHODS.get(self.method)
        super().validate()
        for name in ("nsamples", "seqlen", "seed"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1)):
                raise ConfigError(f"repair {name} must be a positive integer, got {v!r}")
        return self

    def dsnot(self) -> DSnoTConfig:
        names = {f.name for f in dataclasses.fields(DSnoTConfig)}
        return DSnoTConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names}).validate()


@REPAIR_METHODS.register("dsnot")
def _run_dsnot(model: str, cfg: RepairConfig, out: Path, *, protocol: str, data_dir=None, overwrite: bool = False):
    from ..repair.dsnot import repair_dsnot_checkpoint

    return repair_dsnot_checkpoint(model, out, cfg.dsnot(), dense=cfg.dense, overwrite=overwrite, data_dir=data_dir,
                                   protocol=cfg.protocol or protocol, nsamples=cfg.nsamples, seqlen=cfg.seqlen,
                                   seed=cfg.seed, device=cfg.device)


@STAGES.register("repair")
class RepairStage(Stage):
    name = "repair"
    Config = RepairConfig
    writes_checkpoint = True

    def run(self, ctx: StageContext, cfg: RepairConfig, out_dir: Path) -> StageResult:
        out = out_dir / "model"
        rep = REPAIR_METHODS.get(cfg.method)(ctx.model, cfg, out, protocol=ctx.protocol, data_dir=ctx.data_dir,
                                             overwrite=ctx.overwrite)
        d = rep.as_dict()
        d.pop("layers", None)
        (out_dir / "repair_report.json").write_text(json.dumps(rep.as_dict(), indent=1, default=str))
        return StageResult(model=str(out), metrics={"method": cfg.method, **d})
