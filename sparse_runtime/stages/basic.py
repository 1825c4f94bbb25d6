"""The foundation's stages: load, evaluate, report."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..recipe import STAGES, Stage, StageContext, StageResult


@dataclass
class LoadConfig:
    model: Optional[str] = None  # default: the recipe's model
    dtype: str = "float32"


@STAGES.register("load")
class LoadStage(Stage):
    """Resolve the model (converting the embedded GGUF once), check its family, measure sparsity."""

    name = "load"
    Config = LoadConfig

    def run(self, ctx: StageContext, cfg: LoadConfig, out_dir: Path) -> StageResult:
        from ..inspect import inspect_sparsity
        from ..models import load_model

        lm = load_model(cfg.model or ctx.model, cfg.dtype)
        rep = inspect_sparsity(lm.model, lm.family)
        spec = str(lm.path) if lm.path else lm.source
        n_params = sum(p.numel() for p in lm.model.parameters())
        return StageResult(model=spec, metrics={"model": lm.source, "family": lm.family.name, "parameters": n_params,
                                                "block_sparsity": rep.total, "nm": rep.nm_all})


@dataclass
class EvaluateConfig:
    ppl: bool = True
    protocol: Optional[str] = None  # default: the recipe's protocol
    zeroshot: list[str] = field(default_factory=list)  # task names, or ["all"] / ["wanda"] / ["atp"]
    limit: Optional[int] = None  # items per zero-shot task (first N)
    batch_size: int = 8
    dtype: str = "float32"

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError("evaluate.limit must be a positive number of items per task")


@STAGES.register("evaluate")
class EvaluateStage(Stage):
    """WikiText-2 perplexity under the protocol and, optionally, zero-shot accuracy."""

    name = "evaluate"
    Config = EvaluateConfig

    def run(self, ctx: StageContext, cfg: EvaluateConfig, out_dir: Path) -> StageResult:
        from ..eval.perplexity import wikitext2_perplexity
        from ..models import load_model

        lm = load_model(ctx.model, cfg.dtype)
        metrics: dict = {"model": ctx.model}
        if cfg.ppl:
            r = wikitext2_perplexity(lm.model, lm.tokenizer, cfg.protocol or ctx.protocol, ctx.data_dir)
            metrics["perplexity"] = r.as_dict()
        if cfg.zeroshot:
            from ..eval.zeroshot import PROTOCOL_LIMITS, evaluate_zeroshot

            tasks = cfg.zeroshot[0] if len(cfg.zeroshot) == 1 else cfg.zeroshot
            # no limit given: the protocol's (quick = a stated prefix of each set, paper = all items)
            limit = cfg.limit if cfg.limit is not None else PROTOCOL_LIMITS.get(cfg.protocol or ctx.protocol)
            z = evaluate_zeroshot(lm.model, lm.tokenizer, tasks=tasks, limit=limit,
                                  batch_size=cfg.batch_size, data_dir=ctx.data_dir)
            metrics["zeroshot"] = z.as_dict()
        (out_dir / "results.json").write_text(json.dumps(metrics, indent=1, default=str))
        return StageResult(metrics=metrics)


@dataclass
class ReportConfig:
    title: Optional[str] = None


@STAGES.register("report")
class ReportStage(Stage):
    """Collect every earlier step's metrics into ``report.md`` (with machine and versions)."""

    name = "report"
    Config = ReportConfig

    def run(self, ctx: StageContext, cfg: ReportConfig, out_dir: Path) -> StageResult:
        from ..report import header_lines, markdown_table

        rows = []
        for i, rec in enumerate(ctx.results):
            m = rec.get("metrics", {}) or {}
            row = {"step": i, "stage": rec.get("stage"), "seconds": round(rec.get("seconds", 0.0), 1),
                   "model": rec.get("output_model")}
            if "perplexity" in m:
                row["ppl"] = m["perplexity"]["ppl"]
                row["ppl protocol"] = f"{m['perplexity']['protocol']} (seqlen {m['perplexity']['seqlen']}, {m['perplexity']['windows']} windows)"
            for key in ("block_sparsity", "sparsity_measured"):
                if key in m:
                    row["sparsity"] = m[key]
            if "method" in m:
                row["method"] = " ".join(str(m[k]) for k in ("method", "structure", "allocation", "refiner")
                                         if m.get(k) not in (None, ""))
            if "zeroshot" in m:
                row["zero-shot mean acc"] = m["zeroshot"].get("mean_acc")
            detail = _detail(rec.get("stage"), m)
            if detail:
                row["detail"] = detail
            rows.append(row)
        report = ctx.workdir / "report.md"
        lines = header_lines(cfg.title or f"Run report: {ctx.workdir.name}", ctx.protocol, ctx.model)
        summary = _summary(ctx.results)
        text = "\n".join(lines) + "\n" + (summary + "\n" if summary else "") + markdown_table(rows)
        text += _zeroshot_side_by_side(ctx.results)
        (out_dir / "report.md").write_text(text)
        report.write_text(text)
        print(text)
        print(f"report written to {report}")
        return StageResult(metrics={"report": str(report)})


def _detail(stage: object, m: dict) -> str:
    """One readable cell for the steps whose result is not a perplexity: the export, the bench, and a
    prune whose refiner made a model-level decision (DSnoT's held-out check)."""
    if stage == "prune" and m.get("refiner_check"):
        from ..repair.dsnot_heldout import describe_check

        return describe_check(m["refiner_check"], m.get("method", "the pruner"))
    if stage == "export" and m.get("format"):
        size = f", {m['total_bytes'] / 2**20:.1f} MiB" if m.get("total_bytes") else ""
        ok = {True: "verified on load", False: "VERIFICATION FAILED"}.get(m.get("verified"), "not verified")
        return f"{m['format']} -> {m.get('out')}{size}, {ok}"
    if stage == "bench":
        cells = [f"{p['engine']} {p['scenario']}: {p['speedup']:.2f}x ({p['verdict']})" for p in m.get("pairs", [])]
        cells += [f"{e}: skipped ({why})" for e, why in (m.get("skipped") or {}).items()]
        return "; ".join(cells)
    return ""


def _summary(results: list[dict]) -> str:
    """The point of the run in two lines: the quality change (first against last perplexity) and
    the latency change (each dense/sparse pair the bench step measured), side by side."""
    ppl = [(i, (rec.get("metrics") or {})["perplexity"]) for i, rec in enumerate(results)
           if "perplexity" in (rec.get("metrics") or {})]
    pairs = [p for rec in results if rec.get("stage") == "bench" for p in (rec.get("metrics") or {}).get("pairs", [])]
    pruned_at = [i for i, rec in enumerate(results) if (rec.get("metrics") or {}).get("sparsity_measured")]
    out = []
    if len(ppl) >= 2:
        (i, a), (j, b) = ppl[0], ppl[-1]
        # "dense"/"sparse" only when a pruning step lies between the two evaluations
        between = any(i < k < j for k in pruned_at) and not any(k < i for k in pruned_at)
        la, lb = ("dense", "sparse") if between else (f"step {i}", f"step {j}")
        out.append(f"- quality: WikiText-2 perplexity ({b['protocol']}: {b['windows']} windows of {b['seqlen']} "
                   f"tokens) {a['ppl']:.2f} {la} -> {b['ppl']:.2f} {lb} ({(b['ppl'] / a['ppl'] - 1) * 100:+.1f} %)")
    for p in pairs:
        out.append(f"- speed: {p['engine']} {p['scenario']}: {p['dense']:.4g} -> {p['sparse']:.4g} {p['unit']} "
                   f"(median), {p['speedup']:.2f}x dense ({p['verdict']})")
    for rec in results:
        if rec.get("stage") == "bench":
            for e, why in ((rec.get("metrics") or {}).get("skipped") or {}).items():
                out.append(f"- speed: {e} not measured: {why}")
    return ("## Summary\n\n" + "\n".join(out) + "\n") if out else ""


def _zeroshot_side_by_side(results: list[dict]) -> str:
    """One table: a row per task, an ``acc`` column per evaluated step (dense and sparse side by side)."""
    from ..report import markdown_table

    cols: list[tuple[str, dict]] = []
    for i, rec in enumerate(results):
        z = (rec.get("metrics") or {}).get("zeroshot")
        if z and z.get("rows"):
            cols.append((f"step {i} acc", {r["task"]: r for r in z["rows"]}))
    if not cols:
        return ""
    tasks = list(dict.fromkeys(t for _, by in cols for t in by))
    rows = []
    for t in tasks:
        row = {"task": t, "limit": next((by[t].get("limit") for _, by in cols if t in by), None)}
        for label, by in cols:
            row[label] = by.get(t, {}).get("acc")
        rows.append(row)
    return "\n## Zero-shot accuracy (lm-eval conventions, 0-shot, first `limit` items per task)\n\n" + markdown_table(rows)
