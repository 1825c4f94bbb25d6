"""Recipe stage ``merge``: fold a fine-tuned adapter into exact sparse weights (see
:mod:`sparse_runtime.merge`). The adapter is ``adapter:`` or the latest ``finetune`` step's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..recipe import STAGES, Stage, StageContext, StageResult


@dataclass
class MergeStageConfig:
    adapter: Optional[str] = None
    reprune: str = "wanda"  # dense-lora only: wanda | magnitude | mask

    def validate(self) -> None:
        from ..merge import REPRUNE_METHODS

        if self.reprune not in REPRUNE_METHODS:
            raise ConfigError(f"merge.reprune must be one of {REPRUNE_METHODS}, got {self.reprune!r}")


@STAGES.register("merge")
class MergeStage(Stage):
    name = "merge"
    Config = MergeStageConfig
    writes_checkpoint = True

    def run(self, ctx: StageContext, cfg: MergeStageConfig, out_dir: Path) -> StageResult:
        from ..merge import merge_adapter_dir

        adapter = cfg.adapter
        if adapter is None:
            for r in reversed(ctx.results):
                adapter = (r.get("metrics") or {}).get("adapter")
                if adapter:
                    break
        if not adapter:
            raise ConfigError("merge: no adapter given and no earlier finetune step produced one")
        out, rep = merge_adapter_dir(adapter, out_dir / "model", base=ctx.model, reprune=cfg.reprune,
                                     overwrite=True, data_dir=ctx.data_dir, protocol=ctx.protocol)
        return StageResult(model=str(out), metrics=rep.as_dict())
