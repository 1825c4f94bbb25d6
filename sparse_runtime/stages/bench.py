"""The ``bench`` recipe stage: latency of the recipe's current (sparse) model against its dense source."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..recipe import STAGES, Stage, StageContext, StageResult


@dataclass
class BenchConfig:
    dense: Optional[str] = None  # default: the checkpoint's dense_source / base_model
    engines: list[str] = field(default_factory=lambda: ["torch-cpu", "ort-cpu", "deepsparse"])
    scenarios: list[str] = field(default_factory=lambda: ["prefill:1x128", "decode:1@128"])
    repeats: int = 5
    warmup: int = 1
    decode_steps: int = 16
    threads: Optional[int] = None

    def validate(self) -> None:
        if self.repeats < 5:
            raise ConfigError("bench.repeats must be >= 5 (docs/protocols.md)")
        if self.decode_steps < 1 or (self.threads is not None and self.threads < 1):
            raise ConfigError("bench.decode_steps and bench.threads must be >= 1")
        from ..measure.latency import parse_scenario

        for sc in self.scenarios:
            parse_scenario(sc, self.decode_steps)  # impossible scenarios fail before any work


@STAGES.register("bench")
class BenchStage(Stage):
    """Dense vs the current model on each available engine; writes latency.md/.json/.png."""

    name = "bench"
    Config = BenchConfig

    def run(self, ctx: StageContext, cfg: BenchConfig, out_dir: Path) -> StageResult:
        from ..measure.latency import LatencyConfig, run_latency, save_latency
        from ..manifest import MANIFEST_NAME, read_manifest

        dense = cfg.dense
        if dense is None:
            p = Path(str(ctx.model))
            if (p / MANIFEST_NAME).is_file():
                m = read_manifest(p)
                dense = m.dense_source or m.base_model
        if not dense:
            raise ConfigError("bench needs the dense model: set bench.dense (the current model has no manifest "
                              "naming its dense source)")
        lc = LatencyConfig(engines=list(cfg.engines), scenarios=list(cfg.scenarios), repeats=cfg.repeats,
                           warmup=cfg.warmup, decode_steps=cfg.decode_steps, threads=cfg.threads)
        res = run_latency(dense, [("sparse", str(ctx.model))], lc)
        save_latency(res, name="latency", model=str(ctx.model), out_dir=out_dir)
        speed = {f"{r['engine']} {r['scenario']}": r["speedup"] for r in res.rows if "speedup" in r}
        # the report's summary line: each pair's medians side by side (the raw times stay in latency.json)
        dense_med = {(r["engine"], r["scenario"]): r["median"] for r in res.rows if "speedup" not in r}
        pairs = [{"engine": r["engine"], "scenario": r["scenario"], "unit": r["unit"],
                  "dense": dense_med.get((r["engine"], r["scenario"])), "sparse": r["median"],
                  "speedup": r["speedup"], "verdict": r.get("verdict", "")} for r in res.rows if "speedup" in r]
        return StageResult(metrics={"latency": str(out_dir / "latency.md"), "speedups": speed, "pairs": pairs,
                                    "skipped": res.skipped})
