"""The ``prune`` recipe stage: one-shot pruning of the current model into a new checkpoint.

```yaml
steps:
  - stage: prune
    method: wanda            # magnitude | wanda | sparsegpt
    sparsity: 0.7
    allocation: atp          # uniform | owl | atp
    atp_beta: auto           # or a number in (0, min(2S/(L-1), 2(1-S)/(L-1))]
    refine: dsnot            # optional mask refiner, run inside the same pass
    refine_options: {max_cycle_time: 50}
  - stage: prune
    method: sparsegpt
    sparsity: 0.5
    method_options: {percdamp: 0.05, blocksize: 64}   # the method's own options (SparseGPTOptions)
    allocation: owl
    allocation_options: {lam: 0.1}                    # the allocation's own options (OWLOptions)
```
Options are :class:`sparse_runtime.prune.PruneConfig` fields; ``method_options`` and
``allocation_options`` are checked against the chosen method's ``Options`` dataclass (the flat
``atp_beta``, ``owl_lambda``, ``percdamp``, ... still work as their aliases). A recipe names
registered methods only; it never names a module to import (plugins: ``$SPARSE_RUNTIME_PLUGINS``,
:mod:`sparse_runtime.plugins`). The calibration protocol defaults to the recipe's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..prune import PruneConfig, prune_checkpoint
from ..recipe import STAGES, Stage, StageContext, StageResult


@STAGES.register("prune")
class PruneStage(Stage):
    name = "prune"
    Config = PruneConfig
    writes_checkpoint = True
    prunes = True

    def run(self, ctx: StageContext, cfg: PruneConfig, out_dir: Path) -> StageResult:
        if cfg.protocol is None:
            cfg = dataclasses.replace(cfg, protocol=ctx.protocol)
        out = out_dir / "model"
        r = prune_checkpoint(ctx.model, cfg, out, overwrite=ctx.overwrite, data_dir=ctx.data_dir)
        return StageResult(model=str(out), metrics={
            "method": r.method, "structure": r.structure, "allocation": r.allocation,
            "sparsity_target": r.sparsity_target, "sparsity_measured": r.sparsity_measured,
            "allocation_info": r.allocation_info, "refiner": r.refiner, "timing": r.timing,
            "peak_rss_mb": r.peak_rss_mb, "plot": r.plot, "refiner_check": r.refiner_check})
