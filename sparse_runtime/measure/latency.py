"""Dense against sparse on each engine: prefill, decode, batch prefill; table, JSON and plot.

``run_latency(dense, sparse, LatencyConfig(...))`` loads every model on every available engine and,
scenario by scenario: builds each model's timed unit (:meth:`Engine.timer`), warms all of them up,
then runs ``repeats`` interleaved rounds (:func:`stats.interleaved_order`), and reports per model the
median and spread and, against the dense model, the speedup of medians and the pairwise speedups
with a plain verdict. Decode rows carry the memory-bandwidth bound of docs/protocols.md. Evidence that
the sparse path ran (or that none exists) comes from each engine's :meth:`Engine.evidence`.

Thread count: fixed for every engine (``threads``, default min(2, cores)) and printed.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError
from ..runtime.base import Scenario, default_threads, peak_rss_mb
from .stats import bandwidth_bound, interleaved_order, speedup, summarize

DEFAULT_SCENARIOS = ("prefill:1x128", "prefill:1x512", "decode:1@128", "prefill:8x128")
DEFAULT_ENGINES = ("torch-cpu", "ort-cpu", "deepsparse")
NOISY = 0.2  # relative IQR above which a verdict is flagged as noisy
LOAD_ORDERS = {"dense-first": lambda models: list(models), "dense-last": lambda models: [*models[1:], models[0]]}


def parse_scenario(text: str, steps: int = 16) -> Scenario:
    """``prefill:BxT`` (batch x tokens) or ``decode:B@C`` (batch at context C)."""
    try:
        kind, rest = text.split(":", 1)
        if kind == "prefill":
            b, t = rest.lower().split("x")
            sc = Scenario("prefill", int(t), int(b))
        elif kind == "decode":
            b, c = rest.split("@")
            sc = Scenario("decode", int(c), int(b), steps)
        else:
            sc = None
    except ValueError:
        sc = None
    if sc is not None:
        if sc.batch < 1 or sc.tokens < 1 or sc.steps < 1:
            raise ConfigError(f"impossible scenario {text!r}: batch, tokens/context and decode steps must be >= 1")
        return sc
    raise ConfigError(f"bad scenario {text!r}: use prefill:BxT (e.g. prefill:1x128) or decode:B@C (decode:1@128)")


@dataclass
class LatencyConfig:
    engines: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINES))
    scenarios: list[str] = field(default_factory=lambda: list(DEFAULT_SCENARIOS))
    repeats: int = 5
    warmup: int = 1
    decode_steps: int = 16
    threads: Optional[int] = None
    engine_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    engine_scenarios: dict[str, list[str]] = field(default_factory=dict)  # per-engine override of scenarios
    # Order in which an in-process engine loads the models. It is not neutral: on this machine ONNX
    # Runtime ran sessions created later faster than earlier ones holding the SAME weights
    # (benchmarks/results/load_order.md), which reads as a sparse "speedup" when dense is loaded
    # first and as a slowdown when it is loaded last. Run both orders; engines with one worker
    # process per model (DeepSparse) are unaffected.
    load_order: str = "dense-first"

    def validate(self) -> None:
        if self.repeats < 5:
            raise ConfigError("the latency protocol needs at least 5 timed repeats (docs/protocols.md)")
        if self.warmup < 1:
            raise ConfigError("at least one warm-up run per model is needed before timing")
        if self.load_order not in LOAD_ORDERS:
            raise ConfigError(f"unknown load_order {self.load_order!r}: choose from {sorted(LOAD_ORDERS)}")
        for s in [*self.scenarios, *(x for v in self.engine_scenarios.values() for x in v)]:
            parse_scenario(s)
        from ..runtime import engine_names

        known = engine_names()
        bad = [e for e in self.engines if e not in known]
        if bad:
            raise ConfigError(f"unknown engine(s) {bad}; choose from {known}")


@dataclass
class ModelProfile:
    """What the bound and the table need to know about a model (from its manifest or weights)."""

    label: str
    path: str
    sparsity: float
    structure: str
    layers: list[tuple[int, int]]  # (numel, nnz) of each prunable linear
    lm_head: int                   # weights of the (dense) output projection, read every token

    def bound(self) -> dict[str, float]:
        return bandwidth_bound(self.layers, dense_extra=self.lm_head)


def profile_model(label: str, path: str) -> ModelProfile:
    """Per-layer sizes and nonzeros: from the sparsity manifest when there is one, else measured."""
    from ..manifest import MANIFEST_NAME, read_manifest

    p = Path(path)
    if (p / MANIFEST_NAME).is_file():
        m = read_manifest(p)
        cfg = json.loads((p / "config.json").read_text())
        layers = [(int(r.shape[0]) * int(r.shape[1]), int(r.nnz)) for r in m.layers.values()]
        structs = sorted({r.structure for r in m.layers.values()})
        sp = m.total_measured
        return ModelProfile(label, str(path), sp, "/".join(structs) if sp >= 0.01 else "dense", layers,
                            int(cfg["vocab_size"]) * int(cfg["hidden_size"]))
    from ..models import load_model
    from ..sparsity import NMPattern, nm_compliant

    lm = load_model(path)
    layers, nm = [], True
    for _, lin in lm.family.iter_linears(lm.model):
        w = lin.weight.detach()
        layers.append((w.numel(), int((w != 0).sum())))
        nm = nm and nm_compliant(w, NMPattern(2, 4))
    total = sum(n for n, _ in layers)
    sp = 1 - sum(z for _, z in layers) / total if total else 0.0
    cfg = lm.model.config
    prof = ModelProfile(label, str(path), sp, "2:4" if nm and sp > 0.4 else "unstructured" if sp > 0 else "dense",
                        layers, int(cfg.vocab_size) * int(cfg.hidden_size))
    del lm
    gc.collect()
    return prof


@dataclass
class LatencyResult:
    rows: list[dict[str, Any]]
    raw: dict[str, Any]
    engines: dict[str, Any]
    skipped: dict[str, str]
    profiles: dict[str, ModelProfile]
    config: LatencyConfig
    seconds: float


def _time_scenario(engines: dict[str, Any], sc: Scenario, cfg: LatencyConfig, log) -> dict[str, list[float]]:
    timers = {}
    for label, eng in engines.items():
        t0 = time.perf_counter()
        timers[label] = eng.timer(sc)
        log(f"    prepared {label} ({time.perf_counter() - t0:.1f} s)")
    for _ in range(cfg.warmup):
        for label in timers:
            timers[label]()
    times: dict[str, list[float]] = {k: [] for k in timers}
    for order in interleaved_order(list(timers), cfg.repeats):
        for label in order:
            times[label].append(timers[label]())
    for eng in engines.values():
        eng.release(sc)
    return times


def run_latency(dense: str, sparse: Sequence[tuple[str, str]], cfg: Optional[LatencyConfig] = None,
                dense_label: str = "dense", verbose: bool = True, on_engine_done=None) -> LatencyResult:
    """Benchmark ``dense`` against each ``(label, path)`` in ``sparse`` on ``cfg.engines``.
    ``on_engine_done(partial_result)`` is called after each engine (e.g. to save what is done so
    far: a crash in a native backend then loses only that engine)."""
    from ..runtime import get_engine

    cfg = cfg or LatencyConfig()
    cfg.validate()
    log = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    threads = cfg.threads or default_threads()
    models = [(dense_label, dense), *sparse]
    t_start = time.perf_counter()
    profiles = {label: profile_model(label, path) for label, path in models}
    scenarios = [parse_scenario(s, cfg.decode_steps) for s in cfg.scenarios]
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    engine_info: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for ename in cfg.engines:
        cls = get_engine(ename)
        ok, why = cls.available()
        if not ok:
            skipped[ename] = why
            log(f"[{ename}] skipped: {why}")
            continue
        log(f"[{ename}] loading {len(models)} models")
        engines: dict[str, Any] = {}
        try:
            try:
                for label, path in LOAD_ORDERS[cfg.load_order](models):
                    engines[label] = cls(path, threads=threads, **cfg.engine_options.get(ename, {}))
                    log(f"  {label}: loaded in {engines[label].load_seconds:.1f} s")
            except Exception as e:  # one broken engine must not lose the others' results
                skipped[ename] = f"failed to load: {type(e).__name__}: {str(e)[:400]}"
                log(f"[{ename}] {skipped[ename]}")
                continue
            raw[ename] = {}
            own = cfg.engine_scenarios.get(ename)
            for sc in ([parse_scenario(x, cfg.decode_steps) for x in own] if own else scenarios):
                log(f"  {sc.label}")
                try:
                    times = _time_scenario(engines, sc, cfg, log)
                except Exception as e:
                    skipped[f"{ename} {sc.label}"] = f"{type(e).__name__}: {str(e)[:400]}"
                    log(f"  failed: {skipped[f'{ename} {sc.label}']}")
                    continue
                raw[ename][sc.label] = times
                rows += _rows(ename, sc, times, profiles, dense_label)
            engine_info[ename] = {
                "info": engines[dense_label].info(),
                "evidence": {label: e.evidence() for label, e in engines.items()},
                "memory": {label: {**e.memory(), "load_seconds": round(e.load_seconds, 2)} for label, e in engines.items()},
                "peak_rss_mb_process": round(peak_rss_mb(), 1),
            }
            _attach_evidence(rows, ename, engine_info[ename])
        finally:
            for e in engines.values():
                e.close()
            engines.clear()
            gc.collect()
        if on_engine_done is not None:
            on_engine_done(LatencyResult(list(rows), raw, engine_info, skipped, profiles, cfg,
                                         time.perf_counter() - t_start))
    return LatencyResult(rows, raw, engine_info, skipped, profiles, cfg, time.perf_counter() - t_start)


def _rows(ename: str, sc: Scenario, times: dict[str, list[float]], profiles: dict[str, ModelProfile],
          dense_label: str) -> list[dict[str, Any]]:
    out = []
    dense_t = times[dense_label]
    dense_noise = summarize(dense_t).rel_iqr
    for label in [m for m in profiles if m in times]:  # table order = the models' order, whatever the load order
        ts = times[label]
        s = summarize([sc.per_unit(t) for t in ts])
        prof = profiles[label]
        row = {"engine": ename, "scenario": sc.label, "model": label, "sparsity": round(prof.sparsity, 3),
               "structure": prof.structure, "unit": sc.unit, "median": s.median, "IQR": f"{s.q1:.4g}-{s.q3:.4g}",
               "min-max": f"{s.min:.4g}-{s.max:.4g}", "n": s.n}
        if label != dense_label:
            sp = speedup(dense_t, ts)
            verdict = sp.verdict
            noise = max(dense_noise, s.rel_iqr)
            if noise > NOISY:  # a shared machine: say so next to the verdict instead of trusting it
                verdict += f" (noisy: IQR {noise:.0%} of median)"
            row.update({"speedup": sp.speedup, "paired": f"{sp.paired_median:.3f} [{sp.paired_q1:.3f}-{sp.paired_q3:.3f}]",
                        "verdict": verdict})
            if sc.kind == "decode" and sc.batch == 1:
                b = prof.bound()
                row["bw bound (pruned/model)"] = f"{b['pruned_layers']:.2f}x / {b['model']:.2f}x"
        out.append(row)
    return out


def _attach_evidence(rows: list[dict[str, Any]], ename: str, info: dict[str, Any]) -> None:
    for r in rows:
        if r["engine"] != ename:
            continue
        ev = info["evidence"].get(r["model"], {})
        if "fraction_of_supported_ops" in ev and ev["fraction_of_supported_ops"] is not None:
            r["evidence"] = f"DS optimised ops {ev['fraction_of_supported_ops']:.0%}"
        elif "module_calls" in ev:
            mc = ev["module_calls"]
            r["evidence"] = (f"{mc.get('modules', 0)} SparseLinear: {mc.get('sparse_calls', 0)} sparse / "
                             f"{mc.get('dense_calls', 0)} dense calls (all scenarios)")
        elif "kernel_calls" in ev:  # ort-sparse: SparseLinear nodes run by the native custom op
            r["evidence"] = (f"{ev.get('sparse_nodes', 0)} SparseLinear nodes: "
                             f"{sum(ev['kernel_calls'].values())} kernel calls (all scenarios)")
        elif "sparse_kernels" in ev:
            r["evidence"] = ", ".join(list(ev["sparse_kernels"])[:1]) or "no sparse kernel seen"
        else:
            r["evidence"] = "dense kernels only"


def plot_speedups(result: LatencyResult, path: Path, dense_label: str = "dense") -> Optional[Path]:
    """Speedup (median dense / median sparse) against sparsity, one panel per scenario, one line
    per engine; 2:4 models as open markers; y = 1 drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    scen = list(dict.fromkeys(r["scenario"] for r in result.rows))
    if not scen:
        return None
    fig, axes = plt.subplots(1, len(scen), figsize=(4.2 * len(scen), 3.6), squeeze=False)
    for ax, sc in zip(axes[0], scen):
        for ename in dict.fromkeys(r["engine"] for r in result.rows):
            pts = [r for r in result.rows if r["engine"] == ename and r["scenario"] == sc and r["model"] != dense_label]
            un = sorted((r["sparsity"], r["speedup"]) for r in pts if "2:4" not in r["structure"])
            nm = [(r["sparsity"], r["speedup"]) for r in pts if "2:4" in r["structure"]]
            line, = ax.plot([0.0] + [x for x, _ in un], [1.0] + [y for _, y in un], "o-", label=ename)
            if nm:
                ax.plot([x for x, _ in nm], [y for _, y in nm], "s", mfc="none", color=line.get_color(),
                        label=f"{ename} 2:4")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(sc, fontsize=10)
        ax.set_xlabel("sparsity of the block linears")
        ax.set_ylabel("speedup vs dense (median)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120)
    finally:  # a full disk must not leave the figure open
        plt.close(fig)
    return path


def save_latency(result: LatencyResult, name: str = "latency", title: str = "", model: str = "",
                 out_dir="benchmarks/results", notes: Sequence[str] = ()) -> Path:
    """Table + JSON (via report.save_results) + ``<name>.png``, published together: they are written
    into a hidden temporary directory first and moved into ``out_dir`` only when all are complete,
    so a full disk or a kill leaves the earlier results (or nothing), never a plot without its table."""
    import os
    import shutil

    from ..manifest import make_temporary_beside, replace_directory

    final = Path(out_dir)
    if not final.exists():  # a new directory: build it beside and rename it in whole
        tmp = make_temporary_beside(final)
        try:
            _save_latency_files(result, name, title, model, tmp, notes)
            replace_directory(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final / f"{name}.md"
    tmp = make_temporary_beside(final / name)  # hidden, inside out_dir, on its file system
    try:
        _save_latency_files(result, name, title, model, tmp, notes)
        for f in sorted(tmp.iterdir()):  # renames within one file system: no space needed
            os.replace(f, final / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / f"{name}.md"


def _save_latency_files(result: LatencyResult, name: str, title: str, model: str, out_dir: Path,
                        notes: Sequence[str]) -> Path:
    """:func:`save_latency`'s files, written into ``out_dir`` one after the other."""
    from ..report import save_results

    cfg = result.config
    threads = cfg.threads or default_threads()
    protocol = (f"latency (docs/protocols.md): scenarios {', '.join(cfg.scenarios)}; decode = {cfg.decode_steps} steps "
                f"with KV cache after the stated context, ms/token; warm-up {cfg.warmup}, {cfg.repeats} interleaved "
                f"repeats per model, median [IQR], pairwise speedups; {threads} threads fixed for every engine; "
                "float32 on CPU")
    notes = list(notes)
    notes.append("speedup = median(dense) / median(sparse); paired = median [IQR] of per-round dense/sparse ratios; "
                 "verdict 'faster' only when the whole pairwise IQR is above 1.05")
    notes.append("bw bound = bytes of dense weights read per token / bytes of a fp32 values + 1-bit bitmask "
                 "encoding (docs/protocols.md), on the pruned matrices alone / on the whole model with its dense lm_head; "
                 "engines that store weights dense (torch-cpu, ort-cpu) read dense bytes, so their own bound is 1.0x")
    for e, info in result.engines.items():
        ev = info["evidence"]
        notes.append(f"{e}: {json.dumps(info['info'], default=str)}; evidence: "
                     + "; ".join(f"{k}: {v.get('sparse_path')}" for k, v in ev.items()))
        if e == "deepsparse":
            from ..runtime.deepsparse_engine import LICENCE

            notes.append(f"deepsparse licence: {LICENCE}")
    for e, why in result.skipped.items():
        notes.append(f"skipped {e}: {why}")
    png = plot_speedups(result, Path(out_dir) / f"{name}.png")
    if png:
        notes.append(f"plot: {png.name}")
    notes.append(f"wall time of the run: {result.seconds:.0f} s")
    extra = {"raw_seconds": result.raw, "engines": result.engines, "skipped": result.skipped,
             "profiles": {k: {"path": p.path, "sparsity": p.sparsity, "structure": p.structure, "bound": p.bound()}
                          for k, p in result.profiles.items()},
             "config": {"engines": cfg.engines, "scenarios": cfg.scenarios, "repeats": cfg.repeats,
                        "warmup": cfg.warmup, "decode_steps": cfg.decode_steps, "threads": threads}}
    cols = ["engine", "scenario", "model", "sparsity", "structure", "unit", "median", "IQR", "min-max", "n",
            "speedup", "paired", "verdict", "bw bound (pruned/model)", "evidence"]
    return save_results(name, title or "Latency: dense vs sparse per engine", result.rows, protocol=protocol,
                        model=model, notes=notes, columns=cols, out_dir=out_dir, extra=extra)
