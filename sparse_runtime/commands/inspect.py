"""``sparse-runtime inspect MODEL``: per-layer and total sparsity, and N:M compliance.

``--write-manifest`` (re)writes a checkpoint directory's sparsity manifest from the weights as they
are: the repair that a manifest error recommends when the manifest, not the weights, is wrong
(deleted, corrupt, or from another model). It keeps the old manifest's history when it is readable.

A Hugging Face directory is never loaded: config.json, the safetensors headers and each block
linear's weight, read in row chunks one tensor at a time in its stored dtype
(``sparse_runtime.inspect.inspect_directory``), so a 7B checkpoint needs the memory of one chunk.
A manifest is still checked against every layer's mask: read off the checkpoint's masks file
(``sparsity_masks.st``, 1 bit per weight: seconds at 7B) when the weight files'
fingerprints show them unchanged since it was written, else off the weights, saying why;
``--verify`` always scans the weights (and checks the masks file against them). ``--trust-manifest``
reads neither and reports what the manifest records. Tiny test models and GGUF files are measured
in memory.
"""
from __future__ import annotations

import json

from ._common import add_model_args, check_output_file
from . import Command


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    p.add_argument("--summary", action="store_true", help="only the totals, not every layer")
    p.add_argument("--write-manifest", action="store_true",
                   help="rewrite MODEL's sparsity_manifest.json and masks file (sparsity_masks.st) from its weights "
                        "(only if you trust the weights)")
    p.add_argument("--verify", action="store_true",
                   help="scan every weight even when the masks file could stand for them, and check the masks "
                        "file against the weights (a checkpoint's full check: as long as reading the model)")
    p.add_argument("--trust-manifest", action="store_true",
                   help="report a checkpoint's recorded sparsity without scanning its weights (seconds at 7B; "
                        "the manifest is not checked against the tensors)")


def run(args) -> int:
    from ..errors import ConfigError
    from ..inspect import _dir_of, compare_with_manifest, inspect_directory, inspect_sparsity
    from ..models import load_model
    from ..report import markdown_table

    check_output_file(args.json_out)
    if args.write_manifest and args.trust_manifest:
        raise ConfigError("--write-manifest rebuilds the manifest from the weights, --trust-manifest skips reading "
                          "them: pass one of the two")
    if args.verify and args.trust_manifest:
        raise ConfigError("--verify scans the weights, --trust-manifest skips reading them: pass one of the two")
    d = None if args.trust_remote_code else _dir_of(args.model)
    if args.write_manifest:
        found = write_manifest(args)
        compare_with_manifest(found.scans, found.manifest)  # what was written describes the weights scanned
        source, family, rep, manifest = found.source, found.family, found.report, "verified"
    elif d is not None:
        found = inspect_directory(args.model, trust_manifest=args.trust_manifest, full_scan=args.verify)
        source, family, rep = found.source, found.family, found.report
        manifest = ("none (plain model)" if found.manifest is None else
                    "trusted, weights not scanned (--trust-manifest)" if found.from_manifest else
                    _verified_how(found, args.verify))
        if found.bitmask_layers:
            manifest += (f"; bitmask export ({found.bitmask_layers} compressed layers"
                         + (", masks match its export manifest)" if found.export_masks_verified else ")"))
    else:
        if args.trust_manifest:
            raise ConfigError(f"--trust-manifest reads a checkpoint directory's manifest; {args.model} is not one")
        lm = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
        rep = inspect_sparsity(lm.model, lm.family)
        source, family = lm.source, lm.family
        manifest = "verified" if lm.manifest is not None else "none (plain model)"
    if not args.summary:
        print(markdown_table(rep.rows()))
    print(f"model: {source} ({family.name}); block linears: {len(rep.layers)}; "
          f"total sparsity: {rep.total:.4f}; N:M compliant everywhere: {', '.join(rep.nm_all) or 'no'}; "
          f"sparsity manifest: {manifest}")
    if d is not None and (q := _quantization(d)):
        print(q)
    if args.json_out:
        from ..manifest import write_file_atomic
        write_file_atomic(args.json_out, json.dumps({"model": source, "total": rep.total, "nm_all": rep.nm_all,
                                                     "layers": rep.rows()}, indent=1))
    return 0


def _verified_how(found, verify: bool) -> str:
    """Where a verified manifest's figures came from: the masks file, or the weights and why."""
    if found.from_masks:
        return "verified against the masks file (shards unchanged since written; --verify scans the weights)"
    if verify:
        return ("verified (weights scanned, --verify; "
                + ("the masks file matches them)" if found.masks_file_matches else "no masks file)"))
    if found.masks_note and not found.bitmask_layers:
        return f"verified (weights scanned: {found.masks_note})"
    return "verified"


def _quantization(d) -> str:
    """One line naming a quantized checkpoint's scheme and method (docs/quantization.md), or ''."""
    from ..quant.io import read_quantization

    info = read_quantization(d)
    if info is None:
        return ""
    r = info.record.get("rounded_to_zero") or {}
    return (f"quantization: {info.scheme.name} by {info.method or '?'}, {len(info.layers)} weights"
            + (f", {r['total']} kept values round to 0" if "total" in r else ""))


def write_manifest(args):
    """Describe the weights of the directory ``args.model`` in a new manifest, written atomically.

    The weights are scanned one tensor at a time (``inspect_directory``), never loaded; the records
    are those :func:`sparse_runtime.manifest.build_manifest` makes from a loaded model (same nonzero
    counts, digests, structures, history). The masks file is rewritten from the same scan (with
    fresh fingerprints), before the manifest: each file is replaced atomically, and should the
    manifest's write fail, the masks file disagrees with the old manifest, which only sends the next
    ``inspect`` back to the weights. Returns the scan with the new manifest in it."""
    import datetime as _dt
    from pathlib import Path

    from ..errors import ConfigError
    from ..inspect import _dir_of, inspect_directory
    from ..manifest import MANIFEST_NAME, LayerRecord, Manifest, package_versions, write_file_atomic
    from ..sparsity import NMPattern, parse_structure
    from ._common import _probe_writable

    d = _dir_of(args.model) if str(args.model).lower() == "smollm2-135m" else Path(args.model)
    if d is None or not d.is_dir():
        raise ConfigError(f"--write-manifest needs a checkpoint directory, got {args.model!r}")
    _probe_writable(d, args.model, "--write-manifest")  # a read-only directory fails here, before reading
    from ..masks_file import MasksWriter

    masks = MasksWriter(d)  # the masks file is rebuilt from the same scan, one mask at a time
    try:
        found = inspect_directory(d, verify=False, digests=True, mask_sink=masks)
        if found.bitmask_layers:
            masks.abort()  # an export: its masks are its bitmasks
        else:
            masks.close()
    except BaseException:
        masks.abort()
        raise
    prev = found.manifest  # None when absent or unreadable: start afresh
    if prev is not None and not set(prev.layers) <= set(found.scans):
        prev = None  # another model's manifest: nothing of it applies
    layers = {}
    for name, scan in found.scans.items():
        rec = prev.layers.get(name) if prev else None
        try:
            pat = parse_structure(rec.structure) if rec else None
        except Exception:  # noqa: BLE001 - an unreadable structure is replaced
            pat = None
        structure = rec.structure if rec else "unstructured"
        if rec is not None and (pat is None and str(rec.structure).strip().lower() not in ("unstructured", "none", "")):
            structure = "unstructured"
        if isinstance(pat, NMPattern) and str(pat) not in scan.nm:
            structure = "unstructured"  # the weights no longer keep the recorded pattern
        n = scan.shape[0] * scan.shape[1]
        layers[name] = LayerRecord(structure=structure, target=rec.target if rec else None,
                                   measured=1.0 - scan.nnz / max(1, n), nnz=scan.nnz, shape=list(scan.shape),
                                   mask_sha256=scan.digest)
    man = Manifest(layers=layers, base_model=(prev.base_model if prev and prev.base_model else str(d)),
                   dense_source=prev.dense_source if prev else None, history=list(prev.history) if prev else [],
                   extra=dict(prev.extra) if prev else {}, versions=package_versions(),
                   created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    man.history.append({"stage": "write-manifest", "reason": "rebuilt from the weights by inspect"})
    write_file_atomic(d / MANIFEST_NAME, json.dumps(man.to_json(), indent=1))
    print(f"wrote {d / MANIFEST_NAME} from the weights ({len(man.layers)} layers, total sparsity "
          f"{man.total_measured:.4f})")
    found.manifest = man
    return found


COMMAND = Command("inspect", "print per-layer and total sparsity of the block linears and N:M compliance",
                  add_arguments, run)
