"""Recipe stage ``export``: write the current model in a serving format (verified on load).

```yaml
- stage: export
  format: onnx            # onnx | deepsparse | semi-structured | bitmask
  options: {dtype: float16, optimize: basic}
```
The export goes to ``<step dir>/<format>`` unless ``out`` is given. The model spec is unchanged
(an export is not a checkpoint the next stage could prune or evaluate). An export placed before the
step that prunes the model would export the dense model: the recipe is refused unless the export
step says ``dense: true``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..recipe import STAGES, Stage, StageContext, StageResult


@dataclass
class ExportConfig:
    format: str = "onnx"
    out: Optional[str] = None
    options: dict = field(default_factory=dict)
    dense: bool = False  # true: exporting the dense model before a pruning step is intended

    def validate(self) -> None:
        from exporters import formats, make_options

        if self.format not in formats():
            raise ConfigError(f"export.format {self.format!r} is not one of {formats()}")
        if not isinstance(self.options, dict):
            raise ConfigError("export.options must be a mapping of exporter options")
        make_options(self.format, self.options)  # unknown or invalid options fail before any work


@STAGES.register("export")
class ExportStage(Stage):
    name = "export"
    Config = ExportConfig

    def run(self, ctx: StageContext, cfg: ExportConfig, out_dir: Path) -> StageResult:
        from exporters import export

        out = Path(cfg.out) if cfg.out else out_dir / cfg.format
        res = export(ctx.model, cfg.format, out, overwrite=True if not cfg.out else ctx.overwrite, **cfg.options)
        v = res.verification
        metrics: dict[str, Any] = {"format": res.format, "out": str(res.out), "total_bytes": res.total_bytes,
                                   "export_seconds": res.export_seconds, "verified": v.get("ok")}
        for c in v.get("logits", []):
            metrics[f"{c['name']}_max_abs_diff"] = c["max_abs_diff"]
            metrics[f"{c['name']}_argmax_agreement"] = c["argmax_agreement"]
        ds = v.get("deepsparse")
        if ds and ds.get("checked"):
            metrics["deepsparse_fraction_of_supported_ops"] = ds.get("fraction_of_supported_ops")
        return StageResult(model=None, metrics=metrics)
