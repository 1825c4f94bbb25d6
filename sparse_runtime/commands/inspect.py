"""``sparse-runtime inspect MODEL``: per-layer and total sparsity, and N:M compliance.

``--write-manifest`` (re)writes a checkpoint directory's sparsity manifest from the weights as they
are: the repair that a manifest error recommends when the manifest, not the weights, is wrong
(deleted, corrupt, or from another model). It keeps the old manifest's history when it is readable.
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
                   help="rewrite MODEL's sparsity_manifest.json from its weights (only if you trust the weights)")


def run(args) -> int:
    from ..inspect import inspect_sparsity
    from ..models import load_model
    from ..report import markdown_table

    check_output_file(args.json_out)
    if args.write_manifest:
        write_manifest(args)
    lm = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    rep = inspect_sparsity(lm.model, lm.family)
    if not args.summary:
        print(markdown_table(rep.rows()))
    manifest = "verified" if lm.manifest is not None else "none (plain model)"
    print(f"model: {lm.source} ({lm.family.name}); block linears: {len(rep.layers)}; "
          f"total sparsity: {rep.total:.4f}; N:M compliant everywhere: {', '.join(rep.nm_all) or 'no'}; "
          f"sparsity manifest: {manifest}")
    if args.json_out:
        from ..manifest import write_file_atomic
        write_file_atomic(args.json_out, json.dumps({"model": lm.source, "total": rep.total, "nm_all": rep.nm_all,
                                                     "layers": rep.rows()}, indent=1))
    return 0


def write_manifest(args) -> None:
    """Describe the weights of the directory ``args.model`` in a new manifest, written atomically."""
    from pathlib import Path

    from ..errors import ConfigError, SparseRuntimeError
    from ..manifest import MANIFEST_NAME, build_manifest, read_manifest, write_file_atomic
    from ..models import load_model
    from ..sparsity import NMPattern, nm_compliant, parse_structure
    from ._common import _probe_writable

    d = Path(args.model)
    if not d.is_dir():
        raise ConfigError(f"--write-manifest needs a checkpoint directory, got {args.model!r}")
    _probe_writable(d, args.model, "--write-manifest")  # a read-only directory fails here, before loading
    lm = load_model(d, args.dtype, trust_remote_code=args.trust_remote_code, verify_manifest=False)
    try:
        prev = read_manifest(d) if (d / MANIFEST_NAME).exists() else None
    except SparseRuntimeError:
        prev = None  # unreadable: start afresh
    structures = {}
    for name, lin in lm.family.iter_linears(lm.model):
        rec = prev.layers.get(name) if prev else None
        pat = parse_structure(rec.structure) if rec else None
        if isinstance(pat, NMPattern) and not nm_compliant(lin.weight, pat):
            structures[name] = "unstructured"  # the weights no longer keep the recorded pattern
    if prev is not None and not set(prev.layers) <= {n for n, _ in lm.family.iter_linears(lm.model)}:
        prev = None  # another model's manifest: nothing of it applies
    man = build_manifest(lm.model, lm.family, structures=structures, previous=prev,
                         base_model=(prev.base_model if prev and prev.base_model else str(d)),
                         step={"stage": "write-manifest", "reason": "rebuilt from the weights by inspect"})
    write_file_atomic(d / MANIFEST_NAME, json.dumps(man.to_json(), indent=1))
    print(f"wrote {d / MANIFEST_NAME} from the weights ({len(man.layers)} layers, total sparsity "
          f"{man.total_measured:.4f})")


COMMAND = Command("inspect", "print per-layer and total sparsity of the block linears and N:M compliance",
                  add_arguments, run)
