"""Exporters: turn a (pruned) model into files an engine can serve, each verified on load.

``export(model_dir_or_spec, format, out, overwrite=False, **options) -> ExportResult``

Formats (one module each, registered in :data:`EXPORTERS`):

- ``onnx`` (:mod:`exporters.onnx_ort`): decoder with KV cache for ONNX Runtime (optimum's
  text-generation-with-past graph); float32 or float16; optional ORT graph optimisation; optional
  ONNX sparse initializers (smaller file only: ORT densifies them on load); external data > 2 GB.
- ``onnx-int8`` / ``onnx-int4`` (:mod:`exporters.onnx_quant`): the ``onnx`` graph quantized by ONNX
  Runtime's own tools (dynamic int8 / MatMulNBits int4 blocks), lm_head included: the dense quantized
  baselines of the ``ort-int8`` / ``ort-int4`` engines.
- ``deepsparse`` (:mod:`exporters.onnx_deepsparse`): static-shape prefill + fixed-cache decode
  graphs, opset 18 / IR 8, with DeepSparse's share of optimised ops when its engine is installed.
- ``semi-structured`` (:mod:`exporters.semi_structured`): 2:4 values + 2-bit position metadata,
  loaded as ``SparseSemiStructuredTensor`` on CUDA and as dense weights on CPU.
- ``bitmask`` (:mod:`exporters.bitmask`): compressed-tensors' former ``sparse-bitmask`` layout.

Every export is written into a temporary directory, reloaded and checked against the float32
PyTorch model (logits on a fixed prompt, masks and N:M patterns), and only then renamed into place
with an ``export_manifest.json``. A failed check leaves nothing behind.
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

from sparse_runtime.errors import ConfigError
from sparse_runtime.registry import Registry

from .manifest import EXPORT_MANIFEST_NAME, read_export_manifest, write_export_manifest
from .verify import ExportVerificationError

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class CommonOptions:
    """Options every format takes. ``dtype``: the dtype of the stored weights; ``verify``: reload
    and compare with PyTorch before the directory is renamed into place."""

    dtype: str = "float32"
    verify: bool = True

    def validate(self) -> None:
        aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
        self.dtype = aliases.get(str(self.dtype).lower(), str(self.dtype).lower())
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {DTYPES}")


class Exporter:
    """One export format: ``write`` files into a directory, ``verify`` them by reloading."""

    name: str = ""
    Options: type = CommonOptions
    description: str = ""

    def write(self, src, out: Path, opts) -> dict[str, Any]:  # pragma: no cover - interface
        """Write the export into ``out``; return a JSON-able description of its contents."""
        raise NotImplementedError

    def verify(self, src, out: Path, opts, contents: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        """Reload ``out`` and compare with ``src``; return a report with ``ok``."""
        raise NotImplementedError

    def notes(self, opts) -> list[str]:
        return []


EXPORTERS: Registry[type[Exporter]] = Registry("export format")
_MODULES = ("onnx_ort", "onnx_deepsparse", "semi_structured", "bitmask", "onnx_quant", "gguf")


def _discover() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


def get_exporter(fmt: str) -> type[Exporter]:
    _discover()
    return EXPORTERS.get(fmt)


def formats() -> list[str]:
    _discover()
    return EXPORTERS.names()


def make_options(fmt: str, options: dict[str, Any]):
    """Validate ``options`` against the format's Options dataclass (unknown keys are errors)."""
    from sparse_runtime.options import make_config

    cls = get_exporter(fmt)
    return make_config(cls.Options, dict(options), f"export format {fmt!r} option")


@dataclass
class ExportResult:
    format: str
    out: Path
    files: dict[str, int]
    total_bytes: int
    export_seconds: float
    verify_seconds: float
    verification: dict[str, Any]
    contents: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)


LOAD_DTYPES = ("float32", "bfloat16")
LOAD_DTYPE_FORMATS = ("bitmask", "semi-structured", "gguf")  # formats that read the weights without tracing the model


def export(model_dir_or_spec, format: str, out: os.PathLike, overwrite: bool = False, *,
           trust_remote_code: bool = False, stream: str = "auto", load_dtype: str = "float32",
           **options) -> ExportResult:
    """Export ``model_dir_or_spec`` (a checkpoint dir or any load_model spec) as ``format`` to ``out``.

    ``stream`` (``auto`` | ``on`` | ``off``, :func:`sparse_runtime.models.streaming.stream_path`):
    formats with a ``write_streamed`` (bitmask) convert a model too large for memory tensor by tensor
    from its shards, verifying each layer as it goes (docs/scale.md#streaming).

    ``load_dtype``: the compute dtype the source model is loaded (and verified) in, distinct from the
    ``dtype`` option (the stored dtype). ``bfloat16`` halves the source's memory; the bitmask then
    stores bf16 unless ``dtype`` says otherwise. The ONNX formats trace the model in float32."""
    from sparse_runtime.faults import fault_point
    from sparse_runtime.manifest import atomic_directory
    from sparse_runtime.models.streaming import stream_path

    from .source import load_source

    exporter = get_exporter(format)()
    if load_dtype not in LOAD_DTYPES:
        raise ConfigError(f"load dtype {load_dtype!r}: choose one of {', '.join(LOAD_DTYPES)}")
    if load_dtype != "float32":
        if exporter.name not in LOAD_DTYPE_FORMATS:
            raise ConfigError(f"the {exporter.name} export traces the model in float32: use --load-dtype float32 "
                              f"(--dtype sets the stored dtype), or export {' / '.join(LOAD_DTYPE_FORMATS)}")
        if exporter.name == "bitmask":
            options.setdefault("dtype", load_dtype)  # bf16 in, bf16 out
    opts = make_options(format, options)
    from sparse_runtime.checkpoint_step import refuse_output

    out = refuse_output(out, overwrite, (model_dir_or_spec,))  # fail before loading anything
    path = stream_path(model_dir_or_spec, load_dtype, stream)
    if path is not None:
        return _export_streamed(exporter, path, str(model_dir_or_spec), out, overwrite, opts, stream)
    src = load_source(model_dir_or_spec, trust_remote_code=trust_remote_code, dtype=load_dtype)
    try:
        with atomic_directory(out, overwrite) as tmp:
            t0 = time.perf_counter()
            contents = exporter.write(src, tmp, opts)
            fault_point("write")  # test hook (sparse_runtime/faults.py): the model written, not yet verified
            t_export = time.perf_counter() - t0
            report: dict[str, Any] = {"ok": None, "skipped": "verify=False"}
            t1 = time.perf_counter()
            if opts.verify:
                from .verify import raise_if_failed

                report = exporter.verify(src, tmp, opts, contents)
                raise_if_failed(report, exporter.name)
            t_verify = time.perf_counter() - t1
            payload = {
                "export_format": exporter.name,
                "description": exporter.description,
                "source": src.describe(),
                "options": asdict(opts) if is_dataclass(opts) else dict(opts),
                "contents": contents,
                "verification": report,
                "export_seconds": t_export,
                "verify_seconds": t_verify,
                "notes": exporter.notes(opts),
            }
            manifest = write_export_manifest(tmp, payload)
    finally:
        src.cleanup()
    return ExportResult(exporter.name, out, manifest["files"], manifest["total_bytes"], t_export, t_verify,
                        report, contents, manifest)


def _export_streamed(exporter: Exporter, path: Path, spec: str, out: Path, overwrite: bool, opts,
                     stream: str) -> ExportResult:
    """An export written and verified tensor by tensor from the checkpoint's shards."""
    from sparse_runtime.faults import fault_point
    from sparse_runtime.manifest import atomic_directory

    if not callable(getattr(exporter, "write_streamed", None)):
        raise ConfigError(f"the {exporter.name} export needs the whole model in memory, which this model does not "
                          f"fit (--stream {stream}); export it as bitmask, which streams, or on a machine with "
                          "more memory with --stream off")
    with atomic_directory(out, overwrite) as tmp:
        t0 = time.perf_counter()
        contents, report, source = exporter.write_streamed(path, spec, tmp, opts)
        fault_point("write")
        t_export = time.perf_counter() - t0
        if opts.verify:
            from .verify import raise_if_failed

            raise_if_failed(report, exporter.name)
        payload = {"export_format": exporter.name, "description": exporter.description, "source": source,
                   "options": asdict(opts) if is_dataclass(opts) else dict(opts), "contents": contents,
                   "verification": report, "export_seconds": t_export, "verify_seconds": 0.0,
                   "notes": exporter.notes(opts) + ["streamed: written and verified tensor by tensor"]}
        manifest = write_export_manifest(tmp, payload)
    return ExportResult(exporter.name, out, manifest["files"], manifest["total_bytes"], t_export, 0.0, report,
                        contents, manifest)


__all__ = ["EXPORTERS", "Exporter", "CommonOptions", "ExportResult", "ExportVerificationError", "export",
           "formats", "get_exporter", "make_options", "read_export_manifest", "EXPORT_MANIFEST_NAME"]
