"""The verbs of the package, one function each: ``sr.prune``, ``sr.repair``, ``sr.finetune``,
``sr.merge``, ``sr.export``, ``sr.bench``, ``sr.quantize``.

Every verb has the same shape, ``verb(source, config, out, **options) -> result``: the model or
checkpoint it reads, the options of its method in the config object that method already has
(:class:`~sparse_runtime.prune.PruneConfig`, :class:`~sparse_runtime.repair.dsnot.DSnoTConfig`,
:class:`~sparse_runtime.training.TrainConfig`, an export format with its options,
:class:`~sparse_runtime.measure.latency.LatencyConfig`), the directory it writes, and the result
object of the function it wraps. They are thin: the work, the checks and the one-line errors are
those of the functions named in each docstring, which stay public for finer control.

``prune``, ``repair`` and ``merge`` are also the names of modules of this package
(``sparse_runtime.prune`` ...). A function bound to those names would hide the module, so that
``import sparse_runtime.prune as p`` silently returned the function; instead those modules are
made callable (:class:`VerbModule`): ``sr.prune`` stays the module, and calling it runs the verb.
"""
from __future__ import annotations

import importlib
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from .errors import ConfigError


def prune(model, config, out: os.PathLike, *, overwrite: bool = False, **options: Any):
    """Prune ``model`` (a name such as ``tiny-llama``, a checkpoint directory) with ``config`` (a
    :class:`~sparse_runtime.prune.PruneConfig`) into the checkpoint ``out``; returns the
    :class:`~sparse_runtime.prune.PruneResult`. Options: those of
    :func:`~sparse_runtime.prune.prune_checkpoint` (``data_dir``, ``dtype``, ``plot``, ``stream``)."""
    from .prune import prune_checkpoint

    return prune_checkpoint(model, config, out, overwrite=overwrite, **options)


def repair(checkpoint, config=None, out: Optional[os.PathLike] = None, *, overwrite: bool = False,
           **options: Any):
    """Repair the pruned ``checkpoint`` with DSnoT (``config``: a
    :class:`~sparse_runtime.repair.dsnot.DSnoTConfig`, default the paper's) into ``out``; returns the
    :class:`~sparse_runtime.repair.dsnot_passes.RepairReport`. Options: those of
    :func:`~sparse_runtime.repair.dsnot_passes.repair_dsnot_checkpoint` (``dense``, ``protocol``, ...)."""
    from .repair.dsnot_passes import repair_dsnot_checkpoint

    return repair_dsnot_checkpoint(checkpoint, _need_out(out, "repair"), config, overwrite=overwrite, **options)


def finetune(model, config, out: Optional[os.PathLike] = None, *, adapter_options: Optional[dict] = None,
             overwrite: bool = False, **options: Any):
    """Fine-tune ``model`` with ``config`` (a :class:`~sparse_runtime.training.TrainConfig`); the run
    directory with the adapter goes to ``out``. Returns the :class:`~sparse_runtime.training.TrainResult`
    (:func:`sparse_runtime.training.finetune` also returns the model with its adapters attached)."""
    from .training import finetune as _finetune

    result, _model = _finetune(model, _need_out(out, "finetune"), config, adapter_options, overwrite=overwrite,
                               **options)
    return result


MERGE_OPTIONS = ("base", "reprune", "data_dir", "protocol", "dtype", "logit_tol")


def merge(adapter, config: Optional[Mapping[str, Any]] = None, out: Optional[os.PathLike] = None, *,
          overwrite: bool = False, **options: Any):
    """Merge the adapter directory ``adapter`` into its base, as exact sparse weights, into the
    checkpoint ``out``; returns the :class:`~sparse_runtime.merge.MergeReport` (its ``checkpoint``
    is ``out``). ``config``: a mapping of :func:`~sparse_runtime.merge.merge_adapter_dir`'s options
    (``base``, ``reprune``, ``protocol``, ...); keywords override it."""
    from .merge import merge_adapter_dir

    opts = {**dict(config or {}), **options}
    unknown = sorted(set(opts) - set(MERGE_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown merge option(s) {unknown}; known: {', '.join(MERGE_OPTIONS)}")
    _path, report = merge_adapter_dir(adapter, _need_out(out, "merge"), overwrite=overwrite, **opts)
    return report


def export(model, config: Union[str, Mapping[str, Any]], out: Optional[os.PathLike] = None, *,
           overwrite: bool = False, **options: Any):
    """Export ``model`` (a checkpoint directory or model name) for an engine into ``out``;
    ``config`` is a format name (``"bitmask"``, ``"onnx"``, ...) or a mapping with ``format`` and
    that format's options. Returns the :class:`exporters.ExportResult`, verified on reload."""
    from exporters import export as _export

    if isinstance(config, str):
        fmt, opts = config, {}
    elif isinstance(config, Mapping) and "format" in config:
        opts = dict(config)
        fmt = opts.pop("format")
    else:
        raise ConfigError(f"export config must be a format name or a mapping with 'format', got {config!r}")
    return _export(model, fmt, _need_out(out, "export"), overwrite=overwrite, **{**opts, **options})


def bench(dense, config=None, out: Optional[os.PathLike] = None, *, sparse: Iterable = (), name: str = "latency",
          verbose: bool = False):
    """Time ``dense`` against each sparse model in ``sparse`` (paths, or ``(label, path)`` pairs)
    with ``config`` (a :class:`~sparse_runtime.measure.latency.LatencyConfig`); returns the
    :class:`~sparse_runtime.measure.latency.LatencyResult`. With ``out``, the table, JSON and plot
    are written there as ``<name>.md`` / ``.json`` / ``.png``; without, nothing is written."""
    from .measure.latency import run_latency, save_latency

    pairs = [(Path(str(s)).name, str(s)) if isinstance(s, (str, os.PathLike)) else (str(s[0]), str(s[1]))
             for s in sparse]
    result = run_latency(str(dense), pairs, config, verbose=verbose)
    if out is not None:
        save_latency(result, name=name, model=str(dense), out_dir=out)
    return result


def quantize(checkpoint, config=None, out: Optional[os.PathLike] = None, *, overwrite: bool = False,
             **options: Any):
    """Quantize the kept weights of ``checkpoint`` (``config``: a
    :class:`~sparse_runtime.quant.apply.QuantizeConfig`, a scheme name such as ``"int4-g128"``, or a
    mapping of its fields) into ``out``; returns the :class:`~sparse_runtime.quant.apply.QuantizeResult`.
    Options: those of :func:`~sparse_runtime.quant.apply.quantize_checkpoint` (``data_dir``, ...)."""
    from .options import options_from_dict
    from .quant.apply import QuantizeConfig, quantize_checkpoint

    if config is None or isinstance(config, str):
        config = QuantizeConfig() if config is None else QuantizeConfig(scheme=config)
    elif isinstance(config, Mapping):
        config = options_from_dict(QuantizeConfig, dict(config), "quantize option")
    return quantize_checkpoint(checkpoint, config, _need_out(out, "quantize"), overwrite=overwrite, **options)


def _need_out(out: Optional[os.PathLike], verb: str) -> os.PathLike:
    if out is None or not str(out).strip():
        raise ConfigError(f"{verb} writes a new directory: pass out=<path>")
    return out


class VerbModule(types.ModuleType):
    """A module that is also a verb: calling ``sparse_runtime.prune`` runs :func:`prune`, while its
    attributes (``sr.prune.PruneConfig``) and ``import sparse_runtime.prune`` are the module's."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__verb__"](*args, **kwargs)


def make_module_verb(module_name: str, verb) -> types.ModuleType:
    """Import ``module_name`` and make it call ``verb`` (see :class:`VerbModule`)."""
    mod = importlib.import_module(module_name)
    mod.__verb__ = verb
    mod.__class__ = VerbModule
    return mod


VERBS = {"prune": prune, "repair": repair, "finetune": finetune, "merge": merge, "export": export, "bench": bench,
         "quantize": quantize}
