"""One-shot pruning, the public verb: ``prune_model(model, tokenizer, PruneConfig(...))``.

The flow (docs/methods.md: the sequential driver, OWL, ATP, composition):

1. validate everything (options, layer selection, N:M divisibility, ATP's beta range) BEFORE any
   work: a bad option costs nothing;
2. draw the calibration windows (C4, the protocol's count/length/seed) unless the method needs no
   data (plain magnitude);
3. allocate per-block sparsities (uniform, OWL's outlier pass, ATP's schedule and its held-out beta
   search);
4. one sequential pass (:func:`sparse_runtime.calibration.sequential_pass`): per block, statistics
   on the block's inputs, then for each selected linear the pruner makes the mask, an optional
   refiner (DSnoT) changes it on the same statistics, the weight is written, and the pruned block
   produces the next block's inputs.

``prune_checkpoint`` wraps it: load, prune, write the checkpoint with its sparsity manifest (whose
``dense_source`` records where the dense weights came from) and a per-layer sparsity plot.

Which layers: the family's decoder-block linears (q, k, v, o, gate, up, down), filtered by
``include``/``exclude`` glob patterns over full names (``model.layers.*.mlp.*``). Embeddings and
lm_head are never pruned (dense, as in every paper here).

Options belong to their method: each pruner and allocator declares an ``Options`` dataclass in its
own file (``SparseGPTOptions``, ``OWLOptions``, ``ATPOptions``, ...), filled from
``PruneConfig.method_options`` / ``allocation_options`` (``--method-option KEY=VALUE``, a recipe's
``method_options: {...}``) by :func:`resolve_options`. The older flat fields (``percdamp``,
``owl_lambda``, ``atp_beta``, ...) stay as aliases for a release; each options class lists the ones
it takes in ``CONFIG_ALIASES``. Methods from outside the package load through
:mod:`sparse_runtime.plugins`.
"""
from __future__ import annotations

import fnmatch
import importlib
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .allocation import ALLOCATIONS, AllocationRequest, BlockLayout
from .allocation.atp import HELDOUT_SETS  # noqa: F401  (its home is ATP's options; re-exported)
from .calibration import DriverTiming, InputStatistics, LayerTask, sequential_pass
from .errors import ConfigError
from .options import options_from_dict
from .progress import progress
from .pruning import PRUNERS, REFINERS, MaskRefiner
from .pruning.base import build_method, prune_layer
from .sparsity import NMPattern, check_sparsity, parse_structure, structure_name

# Refiners are imported by a fixed name -> module table, never from a user string.
_REFINER_MODULES = {"dsnot": "sparse_runtime.repair.dsnot"}
WIKITEXT2_VALID_REL = "wikitext-2/tokens_pytorch_examples/valid.txt"


@dataclass
class PruneConfig:
    """Options of one-shot pruning (defaults follow the papers; see docs/pruning.md).

    ``structure``: ``"unstructured"`` or ``"N:M"`` = N ZEROS in every M consecutive inputs of a row
    (the papers' "prune N of M": ``2:4`` keeps 2 of 4, ``4:8`` prunes 4 of 8). With N:M the
    sparsity is N/M; ``sparsity`` may be left out or must equal it.
    ``allocation``: ``uniform`` | ``owl`` | ``atp``.
    ``method_options`` / ``allocation_options``: the chosen method's own options, checked against
    its ``Options`` dataclass (``{"percdamp": 0.05}`` for SparseGPT, ``{"lam": 0.1}`` for OWL,
    ``{"beta": "auto"}`` for ATP; docs/pruning.md). The flat ``owl_*``, ``atp_*``, ``percdamp``,
    ``blocksize`` and ``per_row`` fields are their older aliases, kept for a release.
    Calibration ``nsamples``/``seqlen``/``seed`` default to the ``protocol``'s (``quick``).
    """

    method: str = "wanda"
    sparsity: Optional[float] = None
    structure: str = "unstructured"
    allocation: str = "uniform"
    # older aliases of the methods' options (OWLOptions, ATPOptions, SparseGPTOptions, MagnitudeOptions)
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    atp_beta: Union[float, str] = "auto"
    atp_candidates: int = 4
    atp_step: Optional[float] = None
    atp_heldout: str = "wikitext2-valid"
    atp_heldout_windows: int = 16
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    per_row: bool = False
    true_sequential: bool = False
    protocol: Optional[str] = None
    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: Optional[int] = None
    percdamp: float = 0.01
    blocksize: int = 128
    device: Optional[str] = None
    offload: bool = False
    batch_size: int = 8
    refine: Optional[str] = None
    refine_options: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    allocation_options: dict = field(default_factory=dict)

    # -- resolved views -------------------------------------------------------------------------
    @property
    def pattern(self) -> Optional[NMPattern]:
        return parse_structure(self.structure)

    @property
    def target(self) -> float:
        p = self.pattern
        return p.sparsity if p is not None else float(self.sparsity)

    def calibration(self) -> dict[str, Any]:
        from .protocols import get_protocol

        proto = get_protocol(self.protocol or "quick")
        return {"protocol": proto.name, "nsamples": self.nsamples or proto.calib_samples,
                "seqlen": self.seqlen or proto.calib_seqlen,
                "seed": proto.calib_seed if self.seed is None else self.seed}

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Model-independent checks; :func:`check_model` does the rest. Raises ConfigError."""
        from .plugins import load_plugins
        from .protocols import get_protocol

        load_plugins()
        PRUNERS.get(self.method)
        ALLOCATIONS.get(self.allocation)
        pattern = parse_structure(self.structure)
        if pattern is None:
            if self.sparsity is None:
                raise ConfigError("give a sparsity in [0, 1) (the fraction of weights set to zero), e.g. 0.5")
            check_sparsity(self.sparsity)
        elif self.sparsity is not None and abs(float(self.sparsity) - pattern.sparsity) > 1e-9:
            raise ConfigError(f"N:M {pattern} prunes exactly {pattern.sparsity:g} of the weights ({pattern.n} zeros of "
                              f"every {pattern.m}); drop the sparsity option or set it to {pattern.sparsity:g}")
        if pattern is not None and self.allocation != "uniform":
            raise ConfigError(
                f"allocation {self.allocation!r} cannot be combined with N:M {pattern}: a uniform N:M pattern leaves "
                "nothing to allocate, and the papers' mixed per-layer-N N:M mode is not implemented; use "
                "allocation='uniform' with N:M, or unstructured sparsity with OWL/ATP")
        get_protocol(self.protocol or "quick")
        for name, v, lo in (("nsamples", self.nsamples, 1), ("seqlen", self.seqlen, 2), ("batch_size", self.batch_size, 1)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        pruner = make_pruner(self)  # builds and validates the method's own options
        check = getattr(pruner, "check", None)
        if callable(check):
            check(pattern)
        allocator = make_allocator(self)
        check = getattr(allocator, "check", None)
        if callable(check):  # two equal blocks: the loosest bounds; check_model repeats it on the model
            check(self.target, BlockLayout([0, 1], [1, 1]), self)
        if not isinstance(self.include, (list, tuple)) or not isinstance(self.exclude, (list, tuple)):
            raise ConfigError("include/exclude are lists of glob patterns over full layer names")
        if self.refine is not None and str(self.refine).lower() not in _REFINER_MODULES:
            raise ConfigError(f"unknown refiner {self.refine!r}; choose one of: {', '.join(sorted(_REFINER_MODULES))}")
        if not isinstance(self.refine_options, dict):
            raise ConfigError("refine_options must be a mapping of option names to values")
        if self.refine is not None and getattr(getattr(pruner, "options", None), "quant", None):
            raise ConfigError("a refiner after the joint quantization would move values off the grid: drop --refine, "
                              "or prune and repair first, then `sparse-runtime quantize`")


_PRUNE_DEFAULTS = {f.name: f.default for f in fields(PruneConfig)}


def resolve_options(cls: Any, cfg: PruneConfig, kind: str, name: Optional[str] = None) -> Any:
    """The validated options of the registered class ``cls`` (a pruner for ``kind="method"``, an
    allocator for ``kind="allocation"``): ``cfg.<kind>_options`` over the older flat PruneConfig
    fields its ``Options.CONFIG_ALIASES`` names (those changed from their default). An option given
    both ways with different values is an error; unknown keys and wrong types are one line each."""
    opts_cls = getattr(cls, "Options", None)
    name = name or getattr(cfg, kind)
    explicit = getattr(cfg, f"{kind}_options")
    what = f"{kind} {name!r} option"
    if explicit is None:
        explicit = {}
    if not isinstance(explicit, Mapping):
        raise ConfigError(f"{kind}_options must be a mapping of option names to values, got {explicit!r}")
    aliases = dict(getattr(opts_cls, "CONFIG_ALIASES", {}) or {})
    data: dict[str, Any] = {}
    via: dict[str, str] = {}
    for old, new in aliases.items():
        v = getattr(cfg, old, _PRUNE_DEFAULTS.get(old))
        if old in _PRUNE_DEFAULTS and v != _PRUNE_DEFAULTS[old]:
            data[new], via[new] = v, old
    for k, v in explicit.items():
        key = aliases.get(k, k)
        if key in via and data[key] != v:
            raise ConfigError(f"{what} {key!r} is given twice ({kind}_options {k}={v!r}, and {via[key]}="
                              f"{data[key]!r}); give it once, in {kind}_options")
        data[key], via[key] = v, k
    return options_from_dict(opts_cls, data, what)


def make_pruner(cfg: PruneConfig):
    """The registered pruner ``cfg.method`` built from its validated options."""
    cls = PRUNERS.get(cfg.method)
    return build_method(cls, resolve_options(cls, cfg, "method"))


def make_allocator(cfg: PruneConfig):
    """The registered allocator ``cfg.allocation`` built from its validated options."""
    cls = ALLOCATIONS.get(cfg.allocation)
    return build_method(cls, resolve_options(cls, cfg, "allocation"))


def _options_dict(obj) -> dict[str, Any]:
    opts = getattr(obj, "options", None)
    return asdict(opts) if opts is not None and is_dataclass(opts) else {}


@dataclass
class PruneResult:
    method: str
    structure: str
    allocation: str
    sparsity_target: float  # parameter-weighted over the selected linears
    sparsity_measured: float
    targets: dict[str, float]
    structures: dict[str, str]
    measured: dict[str, float]
    block_rates: dict[int, float]
    allocation_info: dict[str, Any]
    timing: dict[str, float]
    peak_rss_mb: Optional[float]
    calibration: dict[str, Any]
    refiner: Optional[str] = None
    checkpoint: Optional[str] = None
    plot: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)  # the resolved method / allocation options
    refiner_check: Optional[dict[str, Any]] = None  # a refiner's model-level decision (DSnoT accept=heldout/compare)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- helpers ------------------------------------------------------------------------------------
class _PeakRSS:
    """Peak resident memory of this process over a region (Linux: reset VmHWM via clear_refs)."""

    def __init__(self) -> None:
        self.reset_ok = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            pass

    @staticmethod
    def read_mb() -> Optional[float]:
        try:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
            if m:
                return int(m.group(1)) / 1024
        except OSError:
            pass
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except Exception:
            return None


def select_layers(model, family, cfg: PruneConfig) -> dict[str, tuple[int, str, torch.nn.Linear]]:
    """``{full name: (block index, short name, linear)}`` of the layers to prune, in model order."""
    out = {}
    for bi, block in enumerate(family.blocks(model)):
        for short, lin in family.block_linears(block).items():
            name = f"{family.blocks_path}.{bi}.{short}"
            if any(fnmatch.fnmatchcase(name, p) for p in cfg.include) and \
                    not any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
                out[name] = (bi, short, lin)
    if not out:
        raise ConfigError(f"include={cfg.include} / exclude={cfg.exclude} select no layer; names look like "
                          f"'{family.blocks_path}.0.self_attn.q_proj' (embeddings and lm_head are never pruned)")
    return out


def layout_of(selected: dict[str, tuple[int, str, torch.nn.Linear]]) -> BlockLayout:
    params: dict[int, int] = {}
    for bi, _, lin in selected.values():
        params[bi] = params.get(bi, 0) + lin.weight.numel()
    blocks = sorted(params)
    return BlockLayout(blocks, [params[b] for b in blocks])


def check_model(model, family, cfg: PruneConfig):
    """Model-dependent checks (selection, N:M divisibility, allocation options such as ATP's beta
    bound). Returns (selected, layout)."""
    selected = select_layers(model, family, cfg)
    pattern = cfg.pattern
    if pattern is not None:
        for name, (_, _, lin) in selected.items():
            pattern.check_divides(lin.in_features, name)
    layout = layout_of(selected)
    check = getattr(make_allocator(cfg), "check", None)
    if callable(check):
        check(cfg.target, layout, cfg)
    return selected, layout


def resolve_refiner(spec: Union[None, str, MaskRefiner], options: Optional[dict] = None) -> Optional[MaskRefiner]:
    """``None``, a refiner object, or a known name (imported from a fixed table, never from the string)."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        if not callable(getattr(spec, "refine", None)):
            raise ConfigError(f"refiner {spec!r} has no refine() method (see sparse_runtime.pruning.MaskRefiner)")
        return spec
    key = spec.lower()
    module = _REFINER_MODULES.get(key)
    if module is None:
        raise ConfigError(f"unknown refiner {spec!r}; choose one of: {', '.join(sorted(_REFINER_MODULES))}")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ConfigError(f"refiner {spec!r} is not available in this installation ({e})") from e
    if key not in REFINERS:
        raise ConfigError(f"refiner {spec!r} is not available: {module} did not register it "
                          f"(REFINERS.register({key!r})); update sparse-runtime or run without the refiner")
    obj = REFINERS.get(key)
    if isinstance(obj, type) or (callable(obj) and not callable(getattr(obj, "refine", None))):
        try:
            return obj(**(options or {}))
        except TypeError as e:
            raise ConfigError(f"bad options for refiner {spec!r}: {e}") from e
    if options:
        raise ConfigError(f"refiner {spec!r} takes no options")
    return obj


def heldout_ids(tokenizer, cfg: PruneConfig, data_dir=None) -> tuple[torch.Tensor, int]:
    """Held-out tokens for an allocator's search (ATP's beta), never the WikiText-2 TEST split: the
    WikiText-2 validation split (its first ``heldout_windows`` windows), or fresh C4 windows drawn
    with seed calibration seed + 1000. Which and how many: the allocator's ``heldout`` and
    ``heldout_windows`` options (ATP's; the defaults for an allocator without them)."""
    from .data.paths import find_file
    from .data.text import c4_windows, tokenize_stream
    from .protocols import get_protocol

    seqlen = get_protocol(cfg.protocol or "quick").eval_seqlen
    opts = getattr(make_allocator(cfg), "options", None)
    n = int(getattr(opts, "heldout_windows", 16))
    if getattr(opts, "heldout", "wikitext2-valid") == "c4":
        seed = cfg.calibration()["seed"] + 1000
        return c4_windows(tokenizer, n, seqlen, seed, data_dir).reshape(-1), seqlen
    p = find_file(WIKITEXT2_VALID_REL, data_dir, what="WikiText-2 validation split (tokens_pytorch_examples/valid.txt)")
    text = p.read_text(encoding="utf-8")
    ids = tokenize_stream(tokenizer, text[: max(4000, 12 * seqlen * n)])  # enough text for n windows
    if ids.numel() < seqlen * n:
        ids = tokenize_stream(tokenizer, text)
    return ids[: seqlen * n], seqlen


class _Pruning:
    """One pruning job on one model: the pass, the allocation trials, the timing."""

    def __init__(self, model, family, cfg, pruner, refiner, selected, calib_ids, streamed=None):
        self.model, self.family, self.cfg = model, family, cfg
        self.pruner, self.refiner, self.selected, self.calib_ids = pruner, refiner, selected, calib_ids
        self.pattern = cfg.pattern
        self.needs = frozenset(pruner.needs) | frozenset(getattr(refiner, "needs", frozenset()) if refiner else ())
        self.uses_data = bool(self.needs) or refiner is not None
        # streaming mode (sparse_runtime.models.streaming): blocks are read from the input's files for
        # each pass and released after it; ``sink`` (the final pass only) writes each pruned block
        self.streamed = streamed
        self.sink = None

    def _streamer(self):
        if self.streamed is None:
            return None
        from .models.streaming import BlockStreamer

        return BlockStreamer(self.streamed, self.sink)

    def _driver(self, on_layer, needs, layer_filter, desc, on_block_end=None) -> DriverTiming:
        c = self.cfg
        return sequential_pass(self.model, self.family, self.calib_ids, on_layer, needs=needs, layer_filter=layer_filter,
                               true_sequential=c.true_sequential, device=c.device, offload=c.offload,
                               batch_size=c.batch_size, desc=desc, on_block_end=on_block_end,
                               streamer=self._streamer())

    def stats_pass(self, on_layer, needs) -> DriverTiming:
        """A pass WITHOUT pruning (OWL's pass 1)."""
        return self._driver(on_layer, needs, lambda n: n in self.selected, "statistics (no pruning)")

    def block_pass(self, on_block_end, max_samples: int) -> DriverTiming:
        """A pass WITHOUT pruning over the first ``max_samples`` windows, calling ``on_block_end``
        after each block (the ``rmi`` allocation's Gram matrices)."""
        c = self.cfg
        return sequential_pass(self.model, self.family, self.calib_ids[:max_samples], None, needs=(),
                               device=c.device, offload=c.offload, batch_size=c.batch_size,
                               on_block_end=on_block_end, desc="RMI Gram matrices (no pruning)",
                               streamer=self._streamer())

    def prune_linear(self, task: LayerTask, sparsity: float) -> None:
        """The shared per-layer step (:func:`~sparse_runtime.pruning.base.prune_layer`, also LoSA's
        re-prune); a dense target with no pattern or refiner leaves the layer untouched."""
        if sparsity <= 0 and self.pattern is None and self.refiner is None:
            return
        prune_layer(task, sparsity, self.pruner, self.pattern, self.refiner)

    def run(self, targets: dict[str, float], on_block_end=None, desc: Optional[str] = None) -> DriverTiming:
        """Prune every selected layer to ``targets``. ``on_block_end(i, block, inputs, outputs)``
        sees each pruned block (streaming ATP carries its held-out activations through it)."""
        def on_layer(task: LayerTask) -> None:
            self.prune_linear(task, targets[task.name])

        desc = desc or f"prune {self.cfg.method}"
        guard = getattr(self.refiner, "on_block_end", None)  # a refiner's block check (DSnoT's guard)
        if guard is not None:
            after, on_block_end = on_block_end, (lambda *a: (guard(*a), after and after(*a)))
        if self.uses_data:
            return self._driver(on_layer, self.needs, lambda n: n in targets, desc, on_block_end)
        t0 = time.perf_counter()  # plain magnitude: no calibration data needed
        streamer = self._streamer()
        by_block: dict[int, list] = {}
        for name, (bi, short, lin) in self.selected.items():
            by_block.setdefault(bi, []).append((name, short, lin))
        blocks = self.family.blocks(self.model)
        todo = range(len(blocks)) if streamer is not None or on_block_end is not None else sorted(by_block)
        for bi in progress(todo, desc=desc):
            if streamer is not None:
                streamer.load(bi, blocks[bi])
            for name, short, lin in by_block.get(bi, []):
                on_layer(LayerTask(bi, name, short, lin, InputStatistics(lin.in_features, frozenset())))
            if on_block_end is not None:
                on_block_end(bi, blocks[bi], None, None)
            if streamer is not None:
                streamer.done(bi, blocks[bi])
        dt = time.perf_counter() - t0
        return DriverTiming(layer_s=dt, total_s=dt)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: lin.weight.data.detach().to("cpu", copy=True) for n, (_, _, lin) in self.selected.items()}

    def restore(self, weights: dict[str, torch.Tensor]) -> None:
        for n, (_, _, lin) in self.selected.items():
            lin.weight.data.copy_(weights[n].to(lin.weight.device))


def _targets(selected, layout: BlockLayout, rates) -> dict[str, float]:
    by_block = dict(zip(layout.blocks, rates))
    return {name: float(by_block[bi]) for name, (bi, _, _) in selected.items()}


@torch.no_grad()
def prune_model(model, tokenizer, cfg: PruneConfig, *, family=None, data_dir=None,
                refiner: Union[None, str, MaskRefiner] = None, calib_ids: Optional[torch.Tensor] = None,
                streamed=None, sink=None, records: Optional[dict] = None) -> PruneResult:
    """Prune ``model`` in place (see the module docstring) and describe what was done.

    ``refiner`` (an object, or a name such as ``"dsnot"``) overrides ``cfg.refine``; ``calib_ids``
    ([n, seqlen] token ids) skips drawing the calibration windows (benchmarks cache them).

    Streaming (``streamed``, a :class:`sparse_runtime.models.streaming.StreamedModel` whose skeleton
    is ``model``): every pass reads the blocks from the input's files one at a time; the final
    pass hands each pruned block to ``sink(i, block)`` (which writes it) and measures it into
    ``records`` (``{layer: LayerRecord}``, for the manifest). ATP's trials then score held-out
    perplexity by carrying the held-out windows through each freshly pruned block, keep nothing,
    and the chosen rates are pruned once more in the final pass (docs/scale.md#streaming).
    """
    from .models.family import family_of

    t_all = time.perf_counter()
    cfg.validate()
    family = family or family_of(model)
    selected, layout = check_model(model, family, cfg)
    refiner_obj = resolve_refiner(refiner if refiner is not None else cfg.refine, cfg.refine_options)
    refiner_name = (refiner if isinstance(refiner, str) else type(refiner).__name__) if refiner is not None else cfg.refine
    check_run = getattr(refiner_obj, "check_run", None)  # a refiner's own refusals, before any work
    if check_run is not None:
        check_run(streamed=streamed is not None, allocation=cfg.allocation)
    pruner = make_pruner(cfg)
    allocator = make_allocator(cfg)
    S = cfg.target
    calib = cfg.calibration()
    peak = _PeakRSS()
    job = _Pruning(model, family, cfg, pruner, refiner_obj, selected, calib_ids, streamed)

    t0 = time.perf_counter()
    if (job.uses_data or allocator.needs_calibration) and job.calib_ids is None:
        from .data.text import c4_windows

        job.calib_ids = c4_windows(tokenizer, calib["nsamples"], calib["seqlen"], calib["seed"], data_dir)
    data_s = time.perf_counter() - t0

    # ATP's beta search: prune from dense with each candidate, score on held-out data, keep the best.
    best: dict[str, Any] = {"score": math.inf, "key": None}
    dense_copy: dict[str, torch.Tensor] = {}
    held: dict[str, Any] = {}

    def trial(rates) -> float:
        from .eval.perplexity import perplexity_from_ids

        if streamed is not None:
            return streamed_trial(rates)
        if not dense_copy:
            dense_copy.update(job.snapshot())
        if not held:
            held["ids"], held["seqlen"] = heldout_ids(tokenizer, cfg, data_dir)
        timing = job.run(_targets(selected, layout, rates))
        r = perplexity_from_ids(model, held["ids"], held["seqlen"], desc="held-out ppl", protocol="heldout")
        score = r.ppl if math.isfinite(r.ppl) else math.inf
        if score < best["score"] or best["key"] is None:
            best.update(score=score, key=tuple(rates), weights=job.snapshot(), timing=timing)
        job.restore(dense_copy)
        return score

    def streamed_trial(rates) -> float:
        from .eval.perplexity import streamed_nll
        from .models.streaming import StreamedForward

        if not held:
            held["ids"], held["seqlen"] = heldout_ids(tokenizer, cfg, data_dir)
        sl = held["seqlen"]
        windows = held["ids"][: held["ids"].numel() // sl * sl].view(-1, sl)
        carry = StreamedForward(streamed, windows)
        timing = job.run(_targets(selected, layout, rates), on_block_end=lambda bi, block, *_: carry.step(block),
                         desc=f"trial {cfg.method}")
        r = streamed_nll(carry, windows, desc="held-out ppl", protocol="heldout")
        score = r.ppl if math.isfinite(r.ppl) else math.inf
        if score < best["score"] or best["key"] is None:
            best.update(score=score, key=tuple(rates), timing=timing)
        return score

    t0 = time.perf_counter()
    req = AllocationRequest(S, layout, cfg, stats_pass=job.stats_pass, trial=trial, block_pass=job.block_pass)
    alloc = allocator.allocate(req)
    targets = _targets(selected, layout, alloc.rates)
    reused = streamed is None and best["key"] is not None and best["key"] == tuple(alloc.rates)
    if reused:
        job.restore(best["weights"])
        timing = best["timing"]
    alloc_s = time.perf_counter() - t0
    dense_copy.clear()
    best.pop("weights", None)

    if streamed is not None:
        from .manifest import layer_record

        records = records if records is not None else {}

        def final_sink(bi, block) -> None:
            for short, lin in family.block_linears(block).items():
                records[f"{family.blocks_path}.{bi}.{short}"] = layer_record(lin.weight)
            if sink is not None:
                sink(bi, block)

        job.sink = final_sink
    baseline = None
    if getattr(refiner_obj, "wants_baseline_pass", False) and streamed is None and not reused:
        # the refiner compares its pass with the pruner's own (DSnoT accept=compare): that pass first,
        # from the same dense weights, without the refiner; its weights are kept for the comparison
        dense_w = job.snapshot()
        job.refiner = None
        job.run(targets, desc=f"{cfg.method} alone (for the refiner's comparison)")
        baseline = (job.snapshot(), job.snapshot, job.restore)
        job.restore(dense_w)
        del dense_w
        job.refiner = refiner_obj
    if not reused:
        timing = job.run(targets)
    job.sink = None
    finish = getattr(refiner_obj, "on_pass_end", None)  # a refiner's model-level check (DSnoT accept=heldout)
    if finish is not None and streamed is None:
        from .protocols import get_protocol

        extra = {"baseline": baseline} if baseline is not None else {}
        finish(model, tokenizer, seqlen=get_protocol(cfg.protocol or "quick").eval_seqlen,
               seed=calib["seed"] + 1000, data_dir=data_dir, **extra)

    structures = {n: structure_name(cfg.pattern) for n in selected}
    measured, nz, nn_ = {}, 0, 0
    for name, (_, _, lin) in selected.items():
        if streamed is not None:
            z = lin.weight.numel() - records[name].nnz
        else:
            z = int((lin.weight.data == 0).sum().item())
        measured[name] = z / lin.weight.numel()
        nz += z
        nn_ += lin.weight.numel()
    target_w = sum(targets[n] * selected[n][2].weight.numel() for n in selected) / nn_
    total_s = time.perf_counter() - t_all
    t = {"total_s": total_s, "calibration_data_s": data_s,
         "allocation_s": alloc_s - (timing.total_s if reused else 0.0),
         "prune_pass_s": timing.total_s, "calibration_forward_s": timing.forward_s,
         "stats_mask_s": timing.layer_s, "embed_s": timing.embed_s}
    result = PruneResult(method=cfg.method, structure=structure_name(cfg.pattern), allocation=cfg.allocation,
                         sparsity_target=target_w, sparsity_measured=nz / nn_, targets=targets, structures=structures,
                         measured=measured, block_rates=dict(zip(layout.blocks, alloc.rates)),
                         allocation_info=alloc.info, timing=t, peak_rss_mb=peak.read_mb(), calibration=calib,
                         refiner=refiner_name,
                         options={"method": _options_dict(pruner), "allocation": _options_dict(allocator)},
                         refiner_check=(refiner_obj.summary().get("heldout")
                                        if hasattr(refiner_obj, "summary") else None))
    result._quantized = getattr(pruner, "quantized", None)  # SparseGPT's joint quant option (docs/quantization.md#joint)
    return result


def _dense_source(lm, model_spec) -> str:
    prev = lm.manifest
    if prev is not None and prev.dense_source and prev.total_measured > 0:
        return prev.dense_source  # the input was already sparse: its dense origin is further back
    p = Path(str(model_spec)).expanduser()
    return str(p.resolve()) if p.exists() else str(model_spec)


def prune_checkpoint(model_spec, cfg: PruneConfig, out, overwrite: bool = False, data_dir=None, *,
                     dtype: str = "float32", refiner: Union[None, str, MaskRefiner] = None,
                     plot: bool = True, stream: str = "auto") -> PruneResult:
    """Load ``model_spec``, prune it, write ``out`` (HF safetensors + sparsity manifest, atomically),
    plus ``layer_sparsity.png`` and ``prune_report.json`` beside it. Returns the :class:`PruneResult`.

    ``stream`` (``auto`` | ``on`` | ``off``; :func:`sparse_runtime.models.streaming.stream_path`):
    a model too large for memory is pruned block by block from its files and written shard by
    shard (docs/scale.md#streaming); ``dtype`` is the compute dtype, and the weights are written in
    the input's storage dtype either way (bf16 in, bf16 out)."""
    from .checkpoint_step import checkpoint_step, refuse_output
    from .manifest import build_manifest
    from .models import load_model
    from .models.streaming import stream_path

    cfg.validate()
    out = refuse_output(out, overwrite, (model_spec,))  # before loading anything, streamed or not
    path = stream_path(model_spec, dtype, stream)
    if path is not None:
        if getattr(getattr(make_pruner(cfg), "options", None), "quant", None):
            raise ConfigError(f"the joint quantization (quant option) runs in memory and {model_spec} would be "
                              "streamed: prune without it (streamed), then `sparse-runtime quantize` on a larger machine")
        return _prune_streamed(model_spec, path, cfg, out, overwrite, data_dir, dtype, refiner, plot)

    def load():
        lm = load_model(model_spec, dtype)
        check_model(lm.model, lm.family, cfg)
        return lm

    def work(lm) -> PruneResult:
        return prune_model(lm.model, lm.tokenizer, cfg, family=lm.family, data_dir=data_dir, refiner=refiner)

    def manifest(lm, result: PruneResult):
        prev = lm.manifest
        targets = _all_targets(result, lm.family, lm.model, prev)
        step = _step_record(model_spec, cfg, result)
        from .quant.apply import joint_quantization

        result._joint = joint_quantization(lm.model, lm.family, getattr(result, "_quantized", None))
        storage = None if result._joint else _storage_dtype(lm)  # quantized values stay float32 (on the grid)
        if storage is not None and storage != next(lm.model.parameters()).dtype:
            lm.model.to(storage)  # bf16 in, bf16 out: the compute dtype is not the stored one
        step["storage_dtype"] = str(next(lm.model.parameters()).dtype).replace("torch.", "")
        result.checkpoint = str(out)
        return build_manifest(lm.model, lm.family, targets=targets, structures=result.structures,
                              base_model=(prev.base_model if prev and prev.base_model else str(model_spec)),
                              dense_source=_dense_source(lm, model_spec), previous=prev, step=step,
                              extra={"quantization": result._joint.record()} if result._joint else None)

    def write_extra(tmp, result) -> None:
        _write_report(result, cfg, out, tmp, plot)
        if getattr(result, "_joint", None):
            from .quant.apply import write_side_file

            write_side_file(tmp, result._joint)

    return checkpoint_step(out, overwrite=overwrite, inputs=(model_spec,), load=load, work=work, manifest=manifest,
                           write_extra=write_extra).result


def _all_targets(result: PruneResult, family, model, prev) -> dict[str, float]:
    """Every block linear's target: this prune's, else the previous manifest's, else dense (0)."""
    targets = dict(result.targets)
    for name, _ in family.iter_linears(model):
        if name not in targets:
            rec = prev.layers.get(name) if prev else None
            targets[name] = rec.target if rec is not None and rec.target is not None else 0.0
    return targets


def _step_record(model_spec, cfg: PruneConfig, result: PruneResult) -> dict[str, Any]:
    """The manifest history's record of this prune."""
    return {"stage": "prune", "input": str(model_spec), "method": cfg.method, "structure": result.structure,
            "sparsity": cfg.target, "allocation": cfg.allocation, "allocation_info": result.allocation_info,
            "refine": result.refiner, "config": asdict(cfg), "options": result.options,
            "calibration": result.calibration, "measured": result.sparsity_measured, "timing": result.timing}


def _write_report(result: PruneResult, cfg: PruneConfig, out: Path, tmp: Path, plot: bool) -> None:
    """The per-layer plot and ``prune_report.json``, inside the temporary directory (the rename
    is the last step, so a checkpoint never lacks them)."""
    import json

    if plot:
        from .plots import plot_layer_sparsity

        title = f"{cfg.method} {result.structure} {cfg.allocation}: target {result.sparsity_target:.3f}, " \
                f"measured {result.sparsity_measured:.3f}"
        made = plot_layer_sparsity(result.targets, result.measured, tmp / "layer_sparsity.png", title)
        result.plot = str(out / Path(made).name) if made else None
    (tmp / "prune_report.json").write_text(json.dumps(result.as_dict(), indent=1, default=str))


def _storage_dtype(lm) -> Optional[torch.dtype]:
    """The floating dtype the input's block weights are stored in (None for tiny / GGUF models)."""
    if lm.path is None or not Path(lm.path).is_dir():
        return None
    from .models.streaming import CheckpointReader

    reader = CheckpointReader(lm.path)
    names = [n for n in reader.names() if n.startswith(lm.family.blocks_path + ".")]
    return reader.storage_dtype(names)


def _prune_streamed(model_spec, path: Path, cfg: PruneConfig, out: Path, overwrite: bool, data_dir, dtype,
                    refiner, plot: bool) -> PruneResult:
    """:func:`prune_checkpoint` block by block: read each block from ``path``'s shards, prune it,
    write it into ``out``'s shards in the stored dtype, release it (docs/scale.md#streaming)."""
    import json
    import shutil

    from .faults import fault_point
    from .manifest import MANIFEST_NAME, atomic_directory, build_manifest
    from .masks_file import MasksWriter
    from .models.loading import _load_tokenizer
    from .models.streaming import SIDE_FILES, ShardWriter, StreamedModel, check_fits, dtype_name, estimate_stream_peak

    sm = StreamedModel(path, dtype)
    family = sm.family
    check_model(sm.model, family, cfg)
    prev = sm.manifest
    pruner = make_pruner(cfg)
    ref = resolve_refiner(refiner if refiner is not None else cfg.refine, cfg.refine_options)
    needs = set(pruner.needs) | set(getattr(ref, "needs", ()) if ref else ())
    calib = cfg.calibration()
    held = 0
    if cfg.allocation == "atp":
        from .protocols import get_protocol

        opts = getattr(make_allocator(cfg), "options", None)
        held = int(getattr(opts, "heldout_windows", 16)) * get_protocol(cfg.protocol or "quick").eval_seqlen
    est = estimate_stream_peak(sm, nsamples=calib["nsamples"] if needs or ref else 0, seqlen=calib["seqlen"],
                               batch_size=cfg.batch_size, needs=needs, refiner=ref is not None, heldout_tokens=held)
    check_fits(est, f"pruning {path} block by block in {dtype_name(sm.dtype)}",
               "give fewer or shorter calibration windows (--nsamples, --seqlen), a smaller --batch-size, or "
               "compute in bfloat16 (--dtype bfloat16)")
    tok = _load_tokenizer(path, False)
    storage = sm.storage_dtype
    records: dict = {}
    result_box: dict = {}
    linear_weights = {n + ".weight": n for n, _ in family.iter_linears(sm.model)}
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardWriter(tmp)
        masks = MasksWriter(tmp)  # each mask appended as its block is written: never all in memory

        def sink(bi, block) -> None:
            for name, t in sm.block_state(bi, storage).items():
                writer.add(name, t)
                if name in linear_weights:
                    masks.add(linear_weights[name], t)  # the stored values' mask, as inspect reads it

        result = prune_model(sm.model, tok, cfg, family=family, data_dir=data_dir, refiner=refiner,
                             streamed=sm, sink=sink, records=records)
        result_box["r"] = result
        for name in sm.reader.names():  # embeddings, norms, head: copied as stored
            if name not in writer.written and name not in writer._buf:
                t = sm.reader.get(name)
                writer.add(name, t)
                if name in linear_weights:
                    masks.add(linear_weights[name], t)
        writer.close()
        masks.close()  # after the shards have their final names: it fingerprints them
        fault_point("write")
        config = json.loads((path / "config.json").read_text())
        config["torch_dtype"] = dtype_name(storage)
        if "dtype" in config:
            config["dtype"] = dtype_name(storage)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in SIDE_FILES:
            if (path / f).is_file():
                shutil.copyfile(path / f, tmp / f)
        if not (tmp / "tokenizer_config.json").exists() and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(tmp)
        targets = _all_targets(result, family, sm.model, prev)
        step = {**_step_record(model_spec, cfg, result), "streamed": True, "compute_dtype": dtype_name(sm.dtype),
                "storage_dtype": dtype_name(storage), "max_live_blocks": sm.max_live_blocks}
        dense_source = prev.dense_source if prev is not None and prev.dense_source and prev.total_measured > 0 \
            else str(path.resolve())
        manifest = build_manifest(sm.model, family, targets=targets, structures=result.structures,
                                  base_model=(prev.base_model if prev and prev.base_model else str(model_spec)),
                                  dense_source=dense_source, previous=prev, step=step, records=records)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=1))
        result.checkpoint = str(out)
        _write_report(result, cfg, out, tmp, plot)
    return result_box["r"]
