"""Recipe stage ``losa``: LoSA from the current (dense) model to an exact sparse checkpoint.

```yaml
- stage: losa
  sparsity: 0.7
  rounds: 5
  steps: 200          # in total, split over the rounds (ft-quick)
  data: c4
  allocation: rmi     # rmi | atp | owl | uniform
```
Every :class:`~sparse_runtime.losa.LoSAConfig` field is a key (unknown keys are an error).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..losa.config import LoSAConfig
from ..recipe import STAGES, Stage, StageContext, StageResult


@STAGES.register("losa")
class LoSAStage(Stage):
    name = "losa"
    writes_checkpoint = True
    prunes = True

    Config = LoSAConfig

    def run(self, ctx: StageContext, cfg: Any, out_dir: Path) -> StageResult:
        from ..losa import run_losa

        if cfg.protocol is None:
            cfg.protocol = ctx.protocol
        res = run_losa(ctx.model, out_dir / "model", cfg, data_dir=ctx.data_dir, overwrite=True)
        metrics = {"sparsity": res.sparsity_measured, "timing": res.timing, "peak_rss_mb": res.peak_rss_mb,
                   "rounds": [{"round": r.round, "target": r.target, "measured": r.measured_mean,
                               "ranks_total": sum(r.ranks), "final_loss": r.final_loss} for r in res.rounds],
                   "plot": res.plot}
        return StageResult(model=str(out_dir / "model"), metrics=metrics)
