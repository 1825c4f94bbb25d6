"""The ``quantize`` recipe stage: quantize the current checkpoint's kept weights (after prune, repair
or merge), masks kept exactly (:mod:`sparse_runtime.quant.apply`, docs/quantization.md).

```yaml
steps:
  - stage: prune
    method: wanda
    sparsity: 0.5
  - stage: quantize
    scheme: int4-g64         # int8 | int4-g32/64/128 (a group must divide every row), -asym: a zero point
    method: gptq             # or rtn (no data)
    lm_head: true            # default: the lm_head (tied or not) is quantized too
```
"""
from __future__ import annotations

import json
from pathlib import Path

from ..quant.apply import QuantizeConfig
from ..recipe import STAGES, Stage, StageContext, StageResult


@STAGES.register("quantize")
class QuantizeStage(Stage):
    name = "quantize"
    Config = QuantizeConfig
    writes_checkpoint = True

    def run(self, ctx: StageContext, cfg: QuantizeConfig, out_dir: Path) -> StageResult:
        from dataclasses import replace

        from ..quant.apply import quantize_checkpoint

        cfg = replace(cfg, protocol=cfg.protocol or ctx.protocol)
        out = out_dir / "model"
        res = quantize_checkpoint(ctx.model, cfg, out, overwrite=ctx.overwrite, data_dir=ctx.data_dir)
        d = res.as_dict()
        (out_dir / "quantize_report.json").write_text(json.dumps(d, indent=1, default=str))
        d.pop("per_layer", None)
        d.pop("layers", None)
        return StageResult(model=str(out), metrics=d)
